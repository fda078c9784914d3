//! Pod plumbing on rtnetlink: the veth pair between `weft0` and the pod's
//! network namespace. Work inside the pod namespace runs on a short-lived
//! OS thread that enters it with setns() and opens its own netlink socket
//! there ([`super::netns`]); a tokio worker never changes namespace.
//! (A little over 400 lines: wiring and its undo read best as one piece.)

use std::{
    collections::HashSet,
    fs::File,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::{
    link::{InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    route::{RouteAddress, RouteAttribute, RouteHeader},
};
use rtnetlink::{Handle, LinkBridgePort, LinkUnspec, LinkVeth, RouteMessageBuilder};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::{
    netns::in_netns,
    pod_error::{PodError, PodErrorKind},
    result::{Interface, Wired},
};
use crate::{
    datapath::BRIDGE_NAME,
    datapath::netlink::{EEXIST, ENODEV, address_net, errno, link_mtu},
};

fn datapath_err(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> PodError {
    let op = op.into();
    move |e| PodError::new(PodErrorKind::Kernel, format!("{op}: {e}"))
}

pub use super::netns::check_netns;
pub use weft_core::names::host_ifname;

fn mac_string(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(a) if a.len() == 6 => Some(format_mac(a)),
            _ => None,
        })
        .unwrap_or_default()
}

fn link_controller(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(c) => Some(*c),
        _ => None,
    })
}

async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, PodError> {
    match handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(datapath_err(format!("looking up {name}"))(e)),
    }
}

/// Puts the veth's peer into the namespace `fd` refers to, with `mtu`.
/// (It cannot be made up in the same request: the kernel configures the
/// peer before it links the pair, and a veth without a peer refuses to
/// open.)
fn place_peer(msg: &mut LinkMessage, fd: std::os::fd::RawFd, mtu: u32) {
    for attr in &mut msg.attributes {
        if let LinkAttribute::LinkInfo(infos) = attr {
            for info in infos {
                if let LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))) = info {
                    peer.attributes.push(LinkAttribute::NetNsFd(fd));
                    peer.attributes.push(LinkAttribute::Mtu(mtu));
                }
            }
        }
    }
}

/// A random locally administered unicast MAC, as the kernel would pick;
/// chosen here so the host end needs no lookup after it is made.
fn random_mac() -> Result<[u8; 6], PodError> {
    use std::io::Read;
    let mut mac = [0u8; 6];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut mac))
        .map_err(|e| PodError::new(PodErrorKind::Local, format!("reading /dev/urandom: {e}")))?;
    mac[0] = (mac[0] & 0xfe) | 0x02;
    Ok(mac)
}

fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Weft's host veths by state.
#[derive(Debug, Default)]
struct Veths {
    live: Vec<String>,
    cut_off: Vec<(String, u32)>,
}

/// In [`CUT_OFF_GROUP`], as [`PodNetwork::unlink`] leaves a veth.
fn is_cut_off(link: &LinkMessage) -> bool {
    link.attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::Group(g) if *g == CUT_OFF_GROUP))
}

/// The link group DEL moves a cut-off veth into ("weft" in ASCII): the
/// mark of a veth that is only waiting to be deleted.
pub const CUT_OFF_GROUP: u32 = 0x7765_6674;

/// How long the reaper waits for more DELs before it deletes what is cut
/// off: DELs come in runs (a rollout, a node drained), and one deletion of
/// the whole group pays the kernel's RCU grace periods once for the run.
const REAP_WINDOW: std::time::Duration = std::time::Duration::from_millis(20);

/// Wakes the reaper, starting it on first use.
fn poke_reaper() {
    static REAPER: OnceLock<Arc<Notify>> = OnceLock::new();
    REAPER
        .get_or_init(|| {
            let poke = Arc::new(Notify::new());
            let waker = poke.clone();
            // Its own OS thread and netlink socket: the kernel answers a
            // deletion only after the grace periods, and meanwhile the
            // thread sending it is blocked; neither the agent's runtime
            // nor requests queued on its socket (the next ADD's) wait.
            let started = std::thread::Builder::new()
                .name("weft-veth-reaper".into())
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt.block_on(reap(waker)),
                        Err(e) => warn!(error = %e, "no runtime for the veth reaper; reconcile deletes cut-off veths"),
                    }
                });
            if let Err(e) = started {
                warn!(error = %e, "cannot start the veth reaper; reconcile deletes cut-off veths");
            }
            poke
        })
        .notify_one();
}

async fn reap(poke: Arc<Notify>) {
    let handle = match rtnetlink::new_connection() {
        Ok((conn, handle, _)) => {
            tokio::spawn(conn);
            handle
        }
        Err(e) => {
            warn!(error = %e, "no netlink socket for the veth reaper; reconcile deletes cut-off veths");
            return;
        }
    };
    loop {
        poke.notified().await;
        tokio::time::sleep(REAP_WINDOW).await;
        let mut group = LinkMessage::default();
        group.attributes.push(LinkAttribute::Group(CUT_OFF_GROUP));
        match handle.link().del_with_message(group).execute().await {
            Ok(()) => debug!("deleted the cut-off veths"),
            // Nothing in the group: an earlier pass took them.
            Err(e) if errno(&e) == Some(ENODEV) => {}
            Err(e) => warn!(error = %e, "deleting cut-off veths failed; reconcile retries"),
        }
    }
}

/// A failed veth creation, with the kernel's errno when it gave one.
struct CreateError {
    errno: Option<i32>,
    error: PodError,
}

/// The loopback device's index in every network namespace.
const LOOPBACK_INDEX: u32 = 1;

/// What the pod side looks like, read from inside its namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodSide {
    pub exists: bool,
    pub up: bool,
    pub mac: String,
    pub mtu: u32,
    pub addresses: Vec<Ipv4Net>,
    pub default_gateway: Option<Ipv4Addr>,
}

async fn inspect(handle: Handle, ifname: String) -> Result<PodSide, PodError> {
    let Some(link) = link_by_name(&handle, &ifname).await? else {
        return Ok(PodSide::default());
    };
    let index = link.header.index;
    let addrs: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(datapath_err(format!("listing addresses of {ifname}")))?;
    let addresses = addrs
        .iter()
        .filter(|m| m.header.index == index)
        .filter_map(address_net)
        .collect();
    let routes: Vec<_> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(datapath_err("listing pod routes"))?;
    let default_gateway = routes
        .iter()
        .filter(|r| {
            r.header.table == RouteHeader::RT_TABLE_MAIN && r.header.destination_prefix_length == 0
        })
        .filter(|r| {
            r.attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index))
        })
        .find_map(|r| {
            r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(RouteAddress::Inet(gw)) => Some(*gw),
                _ => None,
            })
        });
    Ok(PodSide {
        exists: true,
        up: link.header.flags.contains(LinkFlags::Up),
        mac: mac_string(&link),
        mtu: link_mtu(&link).unwrap_or(0),
        addresses,
        default_gateway,
    })
}

/// Addresses the pod end (created there under its final name), brings it
/// up and routes through the gateway; its MAC.
async fn configure(
    handle: Handle,
    ifname: String,
    address: Ipv4Net,
    gateway: Ipv4Addr,
) -> Result<String, PodError> {
    // lo has index 1 in every network namespace.
    handle
        .link()
        .set(LinkUnspec::new_with_index(LOOPBACK_INDEX).up().build())
        .execute()
        .await
        .map_err(datapath_err("bringing lo up in the pod"))?;
    let link = link_by_name(&handle, &ifname).await?.ok_or_else(|| {
        PodError::new(
            PodErrorKind::Kernel,
            format!("{ifname} did not appear in the pod namespace"),
        )
    })?;
    let index = link.header.index;
    handle
        .address()
        .add(index, IpAddr::V4(address.addr()), address.prefix_len())
        .execute()
        .await
        .map_err(datapath_err(format!("adding {address} to {ifname}")))?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(datapath_err(format!("bringing {ifname} up")))?;
    handle
        .route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                .gateway(gateway)
                .output_interface(index)
                .build(),
        )
        .execute()
        .await
        .map_err(datapath_err(format!(
            "adding the default route via {gateway}"
        )))?;
    Ok(mac_string(&link))
}

/// What ADD asks for.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub container_id: String,
    pub ifname: String,
    pub netns: PathBuf,
    pub address: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
}

/// Pod wiring in the host namespace the agent runs in.
#[derive(Debug, Clone)]
pub struct PodNetwork {
    handle: Handle,
}

impl PodNetwork {
    pub fn new(handle: Handle) -> Self {
        Self { handle }
    }

    /// Reads the pod side of an attachment (nothing if the netns is gone).
    pub async fn inspect(&self, netns: &Path, ifname: &str) -> Result<PodSide, PodError> {
        let ifname = ifname.to_owned();
        in_netns(netns, move |h| Box::pin(inspect(h, ifname))).await
    }

    /// Wires the pod, or returns the existing wiring if it is already as
    /// requested (a retried ADD). Undoes its own steps on failure.
    pub async fn wire(&self, spec: &PodSpec) -> Result<Wired, PodError> {
        let host = host_ifname(&spec.container_id, &spec.ifname);
        let bridge = link_by_name(&self.handle, BRIDGE_NAME)
            .await?
            .ok_or_else(|| {
                PodError::new(
                    PodErrorKind::NotReady,
                    format!("{BRIDGE_NAME} does not exist yet; the node is not ready"),
                )
            })?
            .header
            .index;
        let host_mac = random_mac()?;
        // A fresh attachment (the usual case) costs no lookup: the veth is
        // made at once, and only a name already taken means a retry.
        let created = match self.create_veth(spec, &host, bridge, &host_mac).await {
            Err(e) if e.errno == Some(EEXIST) => {
                if let Some(existing) = link_by_name(&self.handle, &host).await? {
                    let side = self.inspect(&spec.netns, &spec.ifname).await?;
                    if side.exists
                        && side.addresses.contains(&spec.address)
                        && link_controller(&existing) == Some(bridge)
                    {
                        debug!(%host, "attachment already wired");
                        return Ok(self.wired(spec, mac_string(&existing), side.mac));
                    }
                }
                warn!(%host, "replacing a half-made attachment");
                self.delete_link(&host).await?;
                self.create_veth(spec, &host, bridge, &host_mac).await
            }
            other => other,
        };
        created.map_err(|e| e.error)?;
        match self.finish_wiring(spec, &host).await {
            Ok(pod_mac) => Ok(self.wired(spec, format_mac(&host_mac), pod_mac)),
            Err(e) => {
                // Deleting the host end takes the pod end with it, wherever it is.
                if let Err(cleanup) = self.delete_link(&host).await {
                    warn!(%host, error = %cleanup, "cleaning up after a failed ADD");
                }
                Err(e)
            }
        }
    }

    /// Makes the veth pair in one request: the host end on the bridge and
    /// up, the pod end inside the pod's namespace under its final name
    /// (moving a device between namespaces waits for RCU grace periods,
    /// ~15 ms here; creating it there does not).
    async fn create_veth(
        &self,
        spec: &PodSpec,
        host: &str,
        bridge: u32,
        host_mac: &[u8; 6],
    ) -> Result<(), CreateError> {
        let netns = File::open(&spec.netns).map_err(|e| CreateError {
            errno: None,
            error: PodError::new(
                PodErrorKind::Netns,
                format!("cannot open network namespace {}", spec.netns.display()),
            )
            .with_details(e.to_string()),
        })?;
        let t = std::time::Instant::now();
        let mut msg = LinkVeth::new(host, &spec.ifname)
            .mtu(spec.mtu)
            .address(host_mac.to_vec())
            .controller(bridge)
            .up()
            .build();
        place_peer(&mut msg, netns.as_raw_fd(), spec.mtu);
        let result = self.handle.link().add(msg).execute().await;
        drop(netns);
        debug!(elapsed_us = t.elapsed().as_micros() as u64, "veth created");
        result.map_err(|e| CreateError {
            errno: errno(&e),
            error: datapath_err(format!("creating veth {host} into the pod"))(e),
        })
    }

    async fn finish_wiring(&self, spec: &PodSpec, host: &str) -> Result<String, PodError> {
        let t = std::time::Instant::now();
        let (ifname, address, gateway) = (spec.ifname.clone(), spec.address, spec.gateway);
        let pod_mac = in_netns(&spec.netns, move |h| {
            Box::pin(configure(h, ifname, address, gateway))
        })
        .await?;
        debug!(
            elapsed_us = t.elapsed().as_micros() as u64,
            "pod side configured"
        );
        let t = std::time::Instant::now();
        // Hairpin lets a pod reach itself through a Service VIP. The port
        // is named, not numbered, so the new link needs no lookup.
        let mut port = LinkBridgePort::new(0).hairpin(true).build();
        port.attributes.push(LinkAttribute::IfName(host.to_owned()));
        self.handle
            .link()
            .set_port(port)
            .execute()
            .await
            .map_err(datapath_err(format!("enabling hairpin on {host}")))?;
        debug!(
            elapsed_us = t.elapsed().as_micros() as u64,
            "host side attached"
        );
        Ok(pod_mac)
    }

    fn wired(&self, spec: &PodSpec, host_mac: String, pod_mac: String) -> Wired {
        Wired {
            host: Interface {
                name: host_ifname(&spec.container_id, &spec.ifname),
                mac: host_mac,
                sandbox: None,
            },
            container: Interface {
                name: spec.ifname.clone(),
                mac: pod_mac,
                sandbox: Some(spec.netns.display().to_string()),
            },
            address: spec.address,
            gateway: spec.gateway,
            mtu: spec.mtu,
        }
    }

    /// Deletes a host link; one already gone is fine.
    pub async fn delete_link(&self, name: &str) -> Result<(), PodError> {
        let Some(link) = link_by_name(&self.handle, name).await? else {
            return Ok(());
        };
        match self.handle.link().del(link.header.index).execute().await {
            Err(e) if errno(&e) == Some(ENODEV) => Ok(()),
            other => other.map_err(datapath_err(format!("deleting {name}"))),
        }
    }

    /// The host end of an attachment: exists, and is on the bridge?
    pub async fn host_side(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<bool>, PodError> {
        let Some(link) = link_by_name(&self.handle, &host_ifname(container_id, ifname)).await?
        else {
            return Ok(None);
        };
        let bridge = link_by_name(&self.handle, BRIDGE_NAME)
            .await?
            .map(|b| b.header.index);
        Ok(Some(bridge.is_some() && link_controller(&link) == bridge))
    }

    /// Cuts a host veth off (down, off weft0, into [`CUT_OFF_GROUP`]) in one
    /// request, so its pod is unreachable at once, and leaves it to the
    /// reaper: a deletion waits for RCU grace periods (10-20 ms here, far
    /// more under concurrent DELs) and nothing of the pod is reachable
    /// meanwhile. A missing veth is fine; one a restart left cut off is
    /// deleted by [`Self::reap_cut_off`].
    pub async fn unlink(&self, name: &str) -> Result<(), PodError> {
        let Some(link) = link_by_name(&self.handle, name).await? else {
            return Ok(());
        };
        let index = link.header.index;
        match self
            .handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .down()
                    .nocontroller()
                    .link_group(CUT_OFF_GROUP)
                    .build(),
            )
            .execute()
            .await
        {
            Err(e) if errno(&e) == Some(ENODEV) => return Ok(()),
            other => other.map_err(datapath_err(format!("cutting {name} off")))?,
        }
        poke_reaper();
        Ok(())
    }

    /// Weft's host veths (by name): `live` on the bridge or not (a veth
    /// that lost its bridge, weft0 deleted by hand, still carries its pod's
    /// address, so the reserve must not count it gone), `cut_off` those
    /// in [`CUT_OFF_GROUP`], as [`Self::unlink`] leaves them to die.
    async fn weft_veths(&self) -> Result<Veths, PodError> {
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(datapath_err("listing links"))?;
        let mut veths = Veths::default();
        for l in &links {
            let Some(name) = l.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) if n.starts_with("weft") && n.len() == 15 => Some(n),
                _ => None,
            }) else {
                continue;
            };
            if is_cut_off(l) {
                veths.cut_off.push((name.clone(), l.header.index));
            } else {
                veths.live.push(name.clone());
            }
        }
        Ok(veths)
    }

    /// Host-side veths of wired pods, see [`Self::weft_veths`].
    pub async fn host_veths(&self) -> Result<Vec<String>, PodError> {
        Ok(self.weft_veths().await?.live)
    }

    /// Deletes cut-off veths (a DEL whose background deletion a crash or
    /// restart interrupted) among `only`, or all of them; the cut-off ones
    /// it left.
    pub async fn reap_cut_off(
        &self,
        only: Option<&HashSet<String>>,
    ) -> Result<Vec<String>, PodError> {
        let mut left = Vec::new();
        for (name, index) in self.weft_veths().await?.cut_off {
            if !only.is_none_or(|o| o.contains(&name)) {
                left.push(name);
                continue;
            }
            match self.handle.link().del(index).execute().await {
                Err(e) if errno(&e) != Some(ENODEV) => {
                    return Err(datapath_err(format!("deleting {name}"))(e));
                }
                _ => info!(%name, "deleted a veth a DEL had cut off"),
            }
        }
        Ok(left)
    }

    pub async fn bridge_exists(&self) -> Result<bool, PodError> {
        Ok(link_by_name(&self.handle, BRIDGE_NAME).await?.is_some())
    }
}
