//! Finding the underlay: the interface and address tunnels leave from.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage},
    route::{RouteAddress, RouteAttribute, RouteHeader},
};
use rtnetlink::RouteMessageBuilder;

use crate::datapath::{DatapathError, Result, Underlay};

use super::attrs::*;
use super::*;

impl NetlinkDatapath {
    /// The underlay interface the kernel would use to reach `dst`.
    pub async fn underlay_toward(&self, dst: Ipv4Addr) -> Result<Underlay> {
        let mut req = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, 32)
            .build();
        req.header.table = RouteHeader::RT_TABLE_UNSPEC;
        let route = self
            .handle
            .route()
            .get(req)
            .execute()
            .try_next()
            .await
            .map_err(DatapathError::netlink(format!(
                "looking up the route to {dst}"
            )))?
            .ok_or_else(|| DatapathError::Other(format!("no route to {dst}")))?;
        let mut src = None;
        let mut oif = None;
        for attr in &route.attributes {
            match attr {
                RouteAttribute::PrefSource(RouteAddress::Inet(ip)) => src = Some(*ip),
                RouteAttribute::Oif(i) => oif = Some(*i),
                _ => {}
            }
        }
        let (Some(ip), Some(ifindex)) = (src, oif) else {
            return Err(DatapathError::Other(format!(
                "the route to {dst} names no source address or interface; pass --underlay-ip"
            )));
        };
        let link = self.link_by_index(ifindex).await?;
        Ok(Underlay {
            ip,
            ifindex,
            ifname: link_name(&link).unwrap_or_default().to_owned(),
            mtu: link_mtu(&link).unwrap_or(1500),
        })
    }

    /// The interface that holds `ip`.
    pub async fn underlay_with_ip(&self, ip: Ipv4Addr) -> Result<Underlay> {
        let addrs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_address_filter(IpAddr::V4(ip))
            .execute()
            .try_collect()
            .await
            .map_err(DatapathError::netlink(format!("looking up address {ip}")))?;
        let index = addrs
            .iter()
            .find(|m| {
                m.attributes
                    .iter()
                    .any(|a| matches!(a, AddressAttribute::Local(IpAddr::V4(x)) | AddressAttribute::Address(IpAddr::V4(x)) if *x == ip))
            })
            .map(|m| m.header.index)
            .ok_or_else(|| DatapathError::Other(format!("no interface on this node holds {ip}")))?;
        let link = self.link_by_index(index).await?;
        Ok(Underlay {
            ip,
            ifindex: index,
            ifname: link_name(&link).unwrap_or_default().to_owned(),
            mtu: link_mtu(&link).unwrap_or(1500),
        })
    }

    /// The interface named `name`, with `ip` or its first IPv4 address.
    pub async fn underlay_named(&self, name: &str, ip: Option<Ipv4Addr>) -> Result<Underlay> {
        let link = self.link(name).await?.ok_or_else(|| {
            DatapathError::Other(format!("underlay interface {name} does not exist"))
        })?;
        let index = link.header.index;
        let ip = match ip {
            Some(ip) => ip,
            None => self
                .ipv4_addresses(index)
                .await?
                .first()
                .map(|(_, net)| net.addr())
                .ok_or_else(|| {
                    DatapathError::Other(format!("{name} has no IPv4 address; pass --underlay-ip"))
                })?,
        };
        Ok(Underlay {
            ip,
            ifindex: index,
            ifname: name.to_owned(),
            mtu: link_mtu(&link).unwrap_or(1500),
        })
    }
}
