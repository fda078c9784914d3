//! The two links Weft owns: `weft.vxlan` and `weft0`, created or adopted
//! and corrected in place; a VXLAN device whose tunnel parameters differ is
//! recreated (they cannot change in place).

use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::{
    address::AddressMessage,
    link::{InfoKind, LinkFlags, LinkMessage},
};
use rtnetlink::{LinkBridge, LinkUnspec, LinkVxlan};
use tracing::{debug, info, warn};

use crate::{
    datapath::{BRIDGE_NAME, BridgeSpec, DatapathError, Result, VXLAN_NAME, VXLAN_PORT, VtepSpec},
    peers::MacAddr,
};

use super::attrs::*;
use super::*;

impl NetlinkDatapath {
    pub(super) async fn link(&self, name: &str) -> Result<Option<LinkMessage>> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(link) => Ok(link),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
            Err(e) => Err(DatapathError::netlink(format!("looking up link {name}"))(e)),
        }
    }

    pub(super) async fn link_by_index(&self, index: u32) -> Result<LinkMessage> {
        self.handle
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_next()
            .await
            .map_err(DatapathError::netlink(format!("looking up link #{index}")))?
            .ok_or_else(|| DatapathError::Other(format!("link #{index} not found")))
    }

    pub(super) async fn ipv4_addresses(
        &self,
        index: u32,
    ) -> Result<Vec<(AddressMessage, Ipv4Net)>> {
        let addrs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(DatapathError::netlink(format!(
                "listing addresses of link #{index}"
            )))?;
        Ok(addrs
            .into_iter()
            .filter(|m| m.header.index == index)
            .filter_map(|m| address_net(&m).map(|net| (m, net)))
            .collect())
    }

    /// Makes `want` the only IPv4 address of the link.
    pub(super) async fn ensure_only_address(
        &self,
        index: u32,
        name: &str,
        want: Ipv4Net,
    ) -> Result<()> {
        let mut present = false;
        for (msg, net) in self.ipv4_addresses(index).await? {
            if net == want {
                present = true;
            } else {
                info!(link = name, address = %net, "removing stale address");
                self.handle
                    .address()
                    .del(msg)
                    .execute()
                    .await
                    .map_err(DatapathError::netlink(format!(
                        "removing {net} from {name}"
                    )))?;
            }
        }
        if !present {
            info!(link = name, address = %want, "adding address");
            self.handle
                .address()
                .add(index, IpAddr::V4(want.addr()), want.prefix_len())
                .execute()
                .await
                .map_err(DatapathError::netlink(format!("adding {want} to {name}")))?;
        }
        Ok(())
    }

    /// Sets the MAC address, only if it differs.
    pub(super) async fn ensure_mac(
        &self,
        link: &LinkMessage,
        name: &str,
        mac: MacAddr,
    ) -> Result<()> {
        if link_mac(link) == Some(mac) {
            return Ok(());
        }
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(link.header.index)
                    .address(mac.octets().to_vec())
                    .build(),
            )
            .execute()
            .await
            .map_err(DatapathError::netlink(format!("setting the MAC of {name}")))
    }

    /// Sets MTU and up, only where they differ.
    pub(super) async fn ensure_mtu_up(
        &self,
        link: &LinkMessage,
        name: &str,
        mtu: u32,
    ) -> Result<()> {
        let up = link.header.flags.contains(LinkFlags::Up);
        if link_mtu(link) == Some(mtu) && up {
            return Ok(());
        }
        debug!(link = name, mtu, "setting MTU and up");
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(link.header.index)
                    .mtu(mtu)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(DatapathError::netlink(format!(
                "setting MTU {mtu} and up on {name}"
            )))
    }

    pub(super) async fn vxlan_index(&self) -> Result<Option<u32>> {
        use std::sync::atomic::Ordering;
        let cached = self.vxlan.load(Ordering::Acquire);
        if cached != 0 {
            return Ok(Some(cached));
        }
        let index = self.link(VXLAN_NAME).await?.map(|l| l.header.index);
        self.vxlan.store(index.unwrap_or(0), Ordering::Release);
        Ok(index)
    }

    pub(super) fn forget_vxlan(&self) {
        self.vxlan.store(0, std::sync::atomic::Ordering::Release);
    }

    pub(super) async fn create_vtep(&self, spec: &VtepSpec) -> Result<()> {
        let msg = LinkVxlan::new(VXLAN_NAME, spec.vni)
            .dev(spec.underlay_ifindex)
            .local(spec.local)
            .port(VXLAN_PORT)
            .learning(false)
            .mtu(spec.mtu)
            .address(spec.mac.octets().to_vec())
            .up()
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(DatapathError::netlink(format!(
                "creating {VXLAN_NAME} (VNI {})",
                spec.vni
            )))
    }

    pub(super) async fn set_up_vtep(&self, spec: &VtepSpec) -> Result<()> {
        // The device may be recreated below.
        self.forget_vxlan();
        let existing = self.link(VXLAN_NAME).await?;
        let link = match existing {
            Some(link) => match vtep_mismatch(&link, spec) {
                None => link,
                Some(reason) => {
                    // Tunnel parameters cannot be changed in place.
                    warn!(reason, "recreating {VXLAN_NAME}");
                    self.handle
                        .link()
                        .del(link.header.index)
                        .execute()
                        .await
                        .map_err(DatapathError::netlink(format!("deleting {VXLAN_NAME}")))?;
                    self.create_vtep(spec).await?;
                    self.link(VXLAN_NAME).await?.ok_or_else(|| {
                        DatapathError::Other(format!("{VXLAN_NAME} vanished after creation"))
                    })?
                }
            },
            None => {
                info!(vni = spec.vni, local = %spec.local, mtu = spec.mtu, mac = %spec.mac, "creating {VXLAN_NAME}");
                self.create_vtep(spec).await?;
                self.link(VXLAN_NAME).await?.ok_or_else(|| {
                    DatapathError::Other(format!("{VXLAN_NAME} vanished after creation"))
                })?
            }
        };
        self.ensure_mac(&link, VXLAN_NAME, spec.mac).await?;
        self.ensure_mtu_up(&link, VXLAN_NAME, spec.mtu).await?;
        let address =
            Ipv4Net::new(spec.address, 32).map_err(|e| DatapathError::Other(e.to_string()))?;
        self.ensure_only_address(link.header.index, VXLAN_NAME, address)
            .await
    }

    pub(super) async fn set_up_bridge(&self, spec: &BridgeSpec) -> Result<()> {
        let link = match self.link(BRIDGE_NAME).await? {
            Some(link) if link_kind(&link) == Some(&InfoKind::Bridge) => link,
            Some(_) => {
                return Err(DatapathError::Other(format!(
                    "{BRIDGE_NAME} exists but is not a bridge; remove it and restart the agent"
                )));
            }
            None => {
                info!(gateway = %spec.gateway, mtu = spec.mtu, "creating {BRIDGE_NAME}");
                self.handle
                    .link()
                    .add(LinkBridge::new(BRIDGE_NAME).mtu(spec.mtu).build())
                    .execute()
                    .await
                    .map_err(DatapathError::netlink(format!("creating {BRIDGE_NAME}")))?;
                self.link(BRIDGE_NAME).await?.ok_or_else(|| {
                    DatapathError::Other(format!("{BRIDGE_NAME} vanished after creation"))
                })?
            }
        };
        self.ensure_mac(&link, BRIDGE_NAME, spec.mac).await?;
        self.ensure_mtu_up(&link, BRIDGE_NAME, spec.mtu).await?;
        self.ensure_only_address(link.header.index, BRIDGE_NAME, spec.gateway)
            .await
    }
}
