//! Routes, neighbours and FDB entries on `weft.vxlan`: dumped into
//! [`Entry`] values for the planner, and applied one by one or, many at a
//! time, in batches.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::{
    AddressFamily,
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
    },
    route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
        RouteType,
    },
};
use rtnetlink::RouteMessageBuilder;

use crate::{
    datapath::{DatapathError, Result, VXLAN_NAME},
    peers::{Entry, MacAddr},
};

use super::attrs::*;
use super::*;

/// Groups at least this large go in batches.
const BATCH_FROM: usize = 16;

impl NetlinkDatapath {
    pub(super) async fn dump_entries(&self) -> Result<BTreeSet<Entry>> {
        let Some(index) = self.vxlan_index().await? else {
            return Ok(BTreeSet::new());
        };
        let mut out = BTreeSet::new();

        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(DatapathError::netlink("listing IPv4 routes"))?;
        for r in routes {
            if r.header.table != RouteHeader::RT_TABLE_MAIN
                || r.header.kind != RouteType::Unicast
                || r.header.protocol == RouteProtocol::Kernel
            {
                continue;
            }
            let mut dst = Ipv4Addr::UNSPECIFIED;
            let mut via = Ipv4Addr::UNSPECIFIED;
            let mut oif = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = *ip,
                    RouteAttribute::Gateway(RouteAddress::Inet(ip)) => via = *ip,
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            if oif != Some(index) {
                continue;
            }
            if let Ok(block) = Ipv4Net::new(dst, r.header.destination_prefix_length) {
                out.insert(Entry::Route { block, via });
            }
        }

        let neighbours: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute()
            .try_collect()
            .await
            .map_err(DatapathError::netlink("listing neighbours"))?;
        for n in neighbours {
            if n.header.ifindex != index || n.header.state != NeighbourState::Permanent {
                continue;
            }
            let ip = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
                _ => None,
            });
            let mac = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(m) => <[u8; 6]>::try_from(m.as_slice())
                    .ok()
                    .and_then(|o| MacAddr::try_from(o).ok()),
                _ => None,
            });
            if let (Some(ip), Some(mac)) = (ip, mac) {
                out.insert(Entry::Neighbour { ip, mac });
            }
        }

        let fdb: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .map_err(DatapathError::netlink("listing FDB entries"))?;
        for n in fdb {
            if n.header.ifindex != index {
                continue;
            }
            let dst = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
                // AF_BRIDGE leaves NDA_DST raw: the parser cannot know its family.
                NeighbourAttribute::Destination(NeighbourAddress::Other(raw)) => {
                    <[u8; 4]>::try_from(raw.as_slice()).ok().map(Ipv4Addr::from)
                }
                _ => None,
            });
            let mac = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(m) => <[u8; 6]>::try_from(m.as_slice())
                    .ok()
                    .and_then(|o| MacAddr::try_from(o).ok()),
                _ => None,
            });
            // The all-zero flood entry is the kernel's, not Weft's (and not
            // a MacAddr).
            if let (Some(dst), Some(mac)) = (dst, mac) {
                out.insert(Entry::Fdb { mac, dst });
            }
        }
        Ok(out)
    }

    pub(super) async fn apply_add(&self, entry: &Entry) -> Result<()> {
        let index = self
            .vxlan_index()
            .await?
            .ok_or_else(|| DatapathError::Other(format!("{VXLAN_NAME} does not exist")))?;
        // The operation's text is built only for an error: this runs once
        // per entry, 15,000 times for a 5,000-node snapshot.
        let op = || format!("adding {entry}");
        let result = match *entry {
            Entry::Route { block, via } => {
                self.handle
                    .route()
                    .add(route_message(block, via, index))
                    .replace()
                    .execute()
                    .await
            }
            Entry::Neighbour { ip, mac } => {
                self.handle
                    .neighbours()
                    .add(index, IpAddr::V4(ip))
                    .link_layer_address(&mac.octets())
                    .state(NeighbourState::Permanent)
                    .replace()
                    .execute()
                    .await
            }
            Entry::Fdb { mac, dst } => {
                self.handle
                    .neighbours()
                    .add_bridge(index, &mac.octets())
                    .destination(IpAddr::V4(dst))
                    .flags(NeighbourFlags::Own)
                    .state(NeighbourState::Permanent)
                    .replace()
                    .execute()
                    .await
            }
        };
        match result {
            Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
            Err(e) if errno(&e) == Some(ENODEV) => {
                self.forget_vxlan();
                Err(DatapathError::netlink(op())(e))
            }
            other => other.map_err(|e| DatapathError::netlink(op())(e)),
        }
    }

    /// A group of entries: in batches ([`super::batch`]) when there are
    /// many, one by one when there are a few (a peer change: one request
    /// each either way, and no thread hop).
    pub(super) async fn apply_group(&self, group: &[Entry], add: bool) -> Vec<(Entry, Result<()>)> {
        if group.len() < BATCH_FROM {
            return crate::datapath::one_by_one(self, group, add).await;
        }
        let index = match self.vxlan_index().await {
            Ok(Some(index)) => index,
            // Nothing to remove from a device that is not there.
            Ok(None) if !add => return group.iter().map(|e| (*e, Ok(()))).collect(),
            Ok(None) => {
                return group
                    .iter()
                    .map(|e| {
                        (
                            *e,
                            Err(DatapathError::Other(format!("{VXLAN_NAME} does not exist"))),
                        )
                    })
                    .collect();
            }
            Err(e) => {
                let msg = e.to_string();
                return group
                    .iter()
                    .map(|e| (*e, Err(DatapathError::Other(msg.clone()))))
                    .collect();
            }
        };
        let entries = group.to_vec();
        let codes =
            match tokio::task::spawn_blocking(move || super::batch::send(&entries, add, index))
                .await
            {
                Ok(codes) => codes,
                Err(e) => {
                    let msg = format!("the netlink batch thread failed: {e}");
                    return group
                        .iter()
                        .map(|e| (*e, Err(DatapathError::Other(msg.clone()))))
                        .collect();
                }
            };
        let mut gone = false;
        let out = group
            .iter()
            .zip(codes)
            .map(|(entry, code)| {
                let result = match code {
                    0 => Ok(()),
                    EEXIST if add => Ok(()),
                    ENOENT | ESRCH if !add => Ok(()),
                    code => {
                        gone |= code == ENODEV;
                        let op = if add { "adding" } else { "removing" };
                        Err(DatapathError::io(format!("{op} {entry}"))(
                            std::io::Error::from_raw_os_error(code),
                        ))
                    }
                };
                (*entry, result)
            })
            .collect();
        if gone {
            self.forget_vxlan();
        }
        out
    }

    pub(super) async fn apply_remove(&self, entry: &Entry) -> Result<()> {
        let Some(index) = self.vxlan_index().await? else {
            return Ok(());
        };
        let op = || format!("removing {entry}");
        let result = match *entry {
            Entry::Route { block, via } => {
                // A stray may carry any protocol or scope; on delete the
                // kernel treats protocol 0 and scope "nowhere" as wildcards.
                let mut msg = route_message(block, via, index);
                msg.header.protocol = RouteProtocol::Unspec;
                msg.header.scope = RouteScope::NoWhere;
                self.handle.route().del(msg).execute().await
            }
            Entry::Neighbour { ip, .. } => {
                self.handle
                    .neighbours()
                    .del(neighbour_message(ip, index))
                    .execute()
                    .await
            }
            Entry::Fdb { mac, dst } => {
                self.handle
                    .neighbours()
                    .del(fdb_message(mac, dst, index))
                    .execute()
                    .await
            }
        };
        match result {
            Err(e) if matches!(errno(&e), Some(ENOENT | ESRCH)) => Ok(()),
            Err(e) if errno(&e) == Some(ENODEV) => {
                self.forget_vxlan();
                Err(DatapathError::netlink(op())(e))
            }
            other => other.map_err(|e| DatapathError::netlink(op())(e)),
        }
    }
}
