//! [`Datapath`] on rtnetlink, in the network namespace the agent runs in.
//! Only Weft-owned objects are ever changed: `weft.vxlan`, `weft0`, routes,
//! neighbours and FDB entries on `weft.vxlan`, and the `weft` nftables
//! table. Masquerade is the one step done through the `nft` binary (there
//! is no nftables netlink support in the dependency set); its input is a
//! single atomic transaction.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    process::Stdio,
};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::{
    AddressFamily,
    address::{AddressAttribute, AddressMessage},
    link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
    },
    route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
        RouteType,
    },
};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVxlan, RouteMessageBuilder};
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use crate::{
    datapath::{
        BRIDGE_NAME, BridgeSpec, Datapath, DatapathError, MasqueradeSpec, Result, Underlay,
        VXLAN_NAME, VXLAN_PORT, VtepSpec,
    },
    peers::{Entry, MacAddr},
};

pub(crate) const ENODEV: i32 = 19;
const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const EEXIST: i32 = 17;
/// nftables table that holds Weft's NAT rule.
pub const NFT_TABLE: &str = "weft";

#[derive(Debug, Clone)]
pub struct NetlinkDatapath {
    handle: Handle,
    /// weft.vxlan's ifindex, so programming thousands of entries does not
    /// look the device up for each; forgotten when an operation says the
    /// device is gone.
    vxlan: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

pub(crate) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

fn link_name(link: &LinkMessage) -> Option<&str> {
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

fn link_mac(link: &LinkMessage) -> Option<MacAddr> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(a) => <[u8; 6]>::try_from(a.as_slice()).ok().map(MacAddr),
        _ => None,
    })
}

fn vxlan_info(link: &LinkMessage) -> Option<&[InfoVxlan]> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Data(InfoData::Vxlan(v)) => Some(v.as_slice()),
            _ => None,
        }),
        _ => None,
    })
}

fn link_kind(link: &LinkMessage) -> Option<&InfoKind> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k),
            _ => None,
        }),
        _ => None,
    })
}

/// Why an existing VXLAN device cannot be adopted as is, if it cannot.
fn vtep_mismatch(link: &LinkMessage, spec: &VtepSpec) -> Option<String> {
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

// === impl NetlinkDatapath ===

impl NetlinkDatapath {
    /// Opens a netlink socket in the current network namespace. Must run
    /// inside a tokio runtime, which drives the connection.
    pub fn connect() -> Result<Self> {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(DatapathError::io("opening netlink socket"))?;
        tokio::spawn(connection);
        Ok(Self {
            handle,
            vxlan: std::sync::Arc::default(),
        })
    }

    /// The underlying handle, for pod wiring in the same namespace.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    async fn link(&self, name: &str) -> Result<Option<LinkMessage>> {
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

    async fn link_by_index(&self, index: u32) -> Result<LinkMessage> {
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

    async fn ipv4_addresses(&self, index: u32) -> Result<Vec<(AddressMessage, Ipv4Net)>> {
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
            .filter_map(|m| {
                let ip = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(ip))
                    | AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                })?;
                let net = Ipv4Net::new(ip, m.header.prefix_len).ok()?;
                Some((m, net))
            })
            .collect())
    }

    /// Makes `want` the only IPv4 address of the link.
    async fn ensure_only_address(&self, index: u32, name: &str, want: Ipv4Net) -> Result<()> {
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
    async fn ensure_mac(&self, link: &LinkMessage, name: &str, mac: MacAddr) -> Result<()> {
        if link_mac(link) == Some(mac) {
            return Ok(());
        }
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(link.header.index)
                    .address(mac.0.to_vec())
                    .build(),
            )
            .execute()
            .await
            .map_err(DatapathError::netlink(format!("setting the MAC of {name}")))
    }

    /// Sets MTU and up, only where they differ.
    async fn ensure_mtu_up(&self, link: &LinkMessage, name: &str, mtu: u32) -> Result<()> {
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

    async fn vxlan_index(&self) -> Result<Option<u32>> {
        use std::sync::atomic::Ordering;
        let cached = self.vxlan.load(Ordering::Acquire);
        if cached != 0 {
            return Ok(Some(cached));
        }
        let index = self.link(VXLAN_NAME).await?.map(|l| l.header.index);
        self.vxlan.store(index.unwrap_or(0), Ordering::Release);
        Ok(index)
    }

    fn forget_vxlan(&self) {
        self.vxlan.store(0, std::sync::atomic::Ordering::Release);
    }

    async fn create_vtep(&self, spec: &VtepSpec) -> Result<()> {
        let msg = LinkVxlan::new(VXLAN_NAME, spec.vni)
            .dev(spec.underlay_ifindex)
            .local(spec.local)
            .port(VXLAN_PORT)
            .learning(false)
            .mtu(spec.mtu)
            .address(spec.mac.0.to_vec())
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
}

fn route_message(block: Ipv4Net, via: Ipv4Addr, index: u32) -> RouteMessage {
    let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(block.network(), block.prefix_len())
        .output_interface(index);
    if !via.is_unspecified() {
        builder = builder.gateway(via).onlink();
    }
    builder.build()
}

fn neighbour_message(ip: Ipv4Addr, index: u32) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.ifindex = index;
    msg.header.state = NeighbourState::Permanent;
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
    msg
}

fn fdb_message(mac: MacAddr, dst: Ipv4Addr, index: u32) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = index;
    msg.header.state = NeighbourState::Permanent;
    msg.header.flags = NeighbourFlags::Own;
    msg.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
    msg
}

fn masquerade_rule(spec: &MasqueradeSpec) -> String {
    format!(
        "ip saddr {} ip daddr != {} masquerade",
        spec.block, spec.cluster
    )
}

impl Datapath for NetlinkDatapath {
    async fn vtep_mac(&self) -> Result<Option<MacAddr>> {
        Ok(self.link(VXLAN_NAME).await?.as_ref().and_then(link_mac))
    }

    async fn ensure_vtep(&self, spec: &VtepSpec) -> Result<()> {
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

    async fn ensure_bridge(&self, spec: &BridgeSpec) -> Result<()> {
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

    async fn ensure_forwarding(&self) -> Result<()> {
        const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
        let now = tokio::fs::read_to_string(PATH)
            .await
            .map_err(DatapathError::io(format!("reading {PATH}")))?;
        if now.trim() != "1" {
            info!("enabling IPv4 forwarding");
            tokio::fs::write(PATH, "1\n")
                .await
                .map_err(DatapathError::io(format!("writing {PATH}")))?;
        }
        Ok(())
    }

    async fn ensure_masquerade(&self, spec: &MasqueradeSpec) -> Result<()> {
        let rule = masquerade_rule(spec);
        let listed = tokio::process::Command::new("nft")
            .args(["list", "table", "ip", NFT_TABLE])
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(DatapathError::io(
                "running nft (is the nftables package installed?)",
            ))?;
        let text = String::from_utf8_lossy(&listed.stdout);
        let rules: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| l.contains("masquerade"))
            .collect();
        if listed.status.success() && rules == [rule.as_str()] {
            return Ok(());
        }
        info!(%rule, "installing masquerade rule");
        // One nft transaction: create-if-missing, flush by deleting, then
        // define, so the rule is replaced atomically.
        let script = format!(
            "table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n\
             table ip {NFT_TABLE} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    {rule}\n  }}\n}}\n"
        );
        let mut child = tokio::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(DatapathError::io("running nft"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .await
                .map_err(DatapathError::io("writing to nft"))?;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(DatapathError::io("waiting for nft"))?;
        if !out.status.success() {
            return Err(DatapathError::Other(format!(
                "nft rejected the masquerade table: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    async fn peer_entries(&self) -> Result<BTreeSet<Entry>> {
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
                NeighbourAttribute::LinkLayerAddress(m) => {
                    <[u8; 6]>::try_from(m.as_slice()).ok().map(MacAddr)
                }
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
                NeighbourAttribute::LinkLayerAddress(m) => {
                    <[u8; 6]>::try_from(m.as_slice()).ok().map(MacAddr)
                }
                _ => None,
            });
            if let (Some(dst), Some(mac)) = (dst, mac)
                && mac.0 != [0; 6]
            {
                out.insert(Entry::Fdb { mac, dst });
            }
        }
        Ok(out)
    }

    async fn add_entry(&self, entry: &Entry) -> Result<()> {
        let index = self
            .vxlan_index()
            .await?
            .ok_or_else(|| DatapathError::Other(format!("{VXLAN_NAME} does not exist")))?;
        let op = format!("adding {entry}");
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
                    .link_layer_address(&mac.0)
                    .state(NeighbourState::Permanent)
                    .replace()
                    .execute()
                    .await
            }
            Entry::Fdb { mac, dst } => {
                self.handle
                    .neighbours()
                    .add_bridge(index, &mac.0)
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
                Err(DatapathError::netlink(op)(e))
            }
            other => other.map_err(DatapathError::netlink(op)),
        }
    }

    async fn remove_entry(&self, entry: &Entry) -> Result<()> {
        let Some(index) = self.vxlan_index().await? else {
            return Ok(());
        };
        let op = format!("removing {entry}");
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
                Err(DatapathError::netlink(op)(e))
            }
            other => other.map_err(DatapathError::netlink(op)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_masquerade_rule_excludes_the_cluster() {
        let spec = MasqueradeSpec {
            block: "10.244.3.0/24".parse().unwrap(),
            cluster: "10.244.0.0/16".parse().unwrap(),
        };
        assert_eq!(
            masquerade_rule(&spec),
            "ip saddr 10.244.3.0/24 ip daddr != 10.244.0.0/16 masquerade"
        );
    }
}
