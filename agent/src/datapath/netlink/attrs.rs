//! Reading rtnetlink messages (names, MTUs, MACs, VXLAN attributes) and
//! building the route, neighbour and FDB messages Weft writes.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use netlink_packet_route::{
    AddressFamily,
    address::{AddressAttribute, AddressMessage},
    link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage},
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
    },
    route::RouteMessage,
};
use rtnetlink::RouteMessageBuilder;

use crate::{
    datapath::{VXLAN_PORT, VtepSpec},
    peers::MacAddr,
};

pub(crate) const ENODEV: i32 = 19;
pub(super) const ENOENT: i32 = 2;
pub(super) const ESRCH: i32 = 3;
pub(crate) const EEXIST: i32 = 17;

pub(crate) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

/// The IPv4 address and prefix an address message carries.
pub(crate) fn address_net(m: &AddressMessage) -> Option<Ipv4Net> {
    let ip = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(IpAddr::V4(ip)) | AddressAttribute::Address(IpAddr::V4(ip)) => {
            Some(*ip)
        }
        _ => None,
    })?;
    Ipv4Net::new(ip, m.header.prefix_len).ok()
}

pub(super) fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

pub(crate) fn link_mtu(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

pub(super) fn link_mac(link: &LinkMessage) -> Option<MacAddr> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(a) => <[u8; 6]>::try_from(a.as_slice())
            .ok()
            .and_then(|o| MacAddr::try_from(o).ok()),
        _ => None,
    })
}

pub(super) fn vxlan_info(link: &LinkMessage) -> Option<&[InfoVxlan]> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Data(InfoData::Vxlan(v)) => Some(v.as_slice()),
            _ => None,
        }),
        _ => None,
    })
}

pub(super) fn link_kind(link: &LinkMessage) -> Option<&InfoKind> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k),
            _ => None,
        }),
        _ => None,
    })
}

/// Why an existing VXLAN device cannot be adopted as is, if it cannot.
pub(super) fn vtep_mismatch(link: &LinkMessage, spec: &VtepSpec) -> Option<String> {
    if link_kind(link) != Some(&InfoKind::Vxlan) {
        return Some("not a vxlan device".into());
    }
    let info = vxlan_info(link)?;
    let has = |want: &InfoVxlan| info.iter().any(|i| i == want);
    if !has(&InfoVxlan::Id(spec.vni)) {
        return Some(format!("VNI is not {}", spec.vni));
    }
    if !has(&InfoVxlan::Local(spec.local)) {
        return Some(format!("local address is not {}", spec.local));
    }
    if !has(&InfoVxlan::Port(VXLAN_PORT)) {
        return Some(format!("port is not {VXLAN_PORT}"));
    }
    if !has(&InfoVxlan::Learning(false)) {
        return Some("learning is on".into());
    }
    if !has(&InfoVxlan::Link(spec.underlay_ifindex)) {
        return Some(format!(
            "not bound to underlay interface {}",
            spec.underlay_ifindex
        ));
    }
    None
}

pub(super) fn route_message(block: Ipv4Net, via: Ipv4Addr, index: u32) -> RouteMessage {
    let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(block.network(), block.prefix_len())
        .output_interface(index);
    if !via.is_unspecified() {
        builder = builder.gateway(via).onlink();
    }
    builder.build()
}

pub(super) fn neighbour_message(ip: Ipv4Addr, index: u32) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.ifindex = index;
    msg.header.state = NeighbourState::Permanent;
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
    msg
}

pub(super) fn fdb_message(mac: MacAddr, dst: Ipv4Addr, index: u32) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = index;
    msg.header.state = NeighbourState::Permanent;
    msg.header.flags = NeighbourFlags::Own;
    msg.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.octets().to_vec()));
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
    msg
}
