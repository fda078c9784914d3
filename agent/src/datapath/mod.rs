//! The node's kernel state in domain terms: the VXLAN tunnel endpoint, the
//! pod bridge, the peer entries on the tunnel, forwarding and masquerade.
//! [`Datapath`] is the narrow seam between decisions and side effects: the
//! real implementation is [`netlink::NetlinkDatapath`]; unit tests
//! inject [`fake::RecordingDatapath`].

pub mod netlink;

use std::{collections::BTreeSet, future::Future, net::Ipv4Addr};

use ipnet::Ipv4Net;
use thiserror::Error;

use crate::peers::{Entry, MacAddr};

/// Name of the VXLAN device Weft owns.
pub const VXLAN_NAME: &str = "weft.vxlan";
/// Name of the pod bridge Weft owns.
pub const BRIDGE_NAME: &str = "weft0";
/// IANA VXLAN port.
pub const VXLAN_PORT: u16 = 4789;
/// Outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14) headers.
pub const VXLAN_OVERHEAD: u32 = 50;

#[derive(Debug, Error)]
pub enum DatapathError {
    #[error("{op}: {source}")]
    Netlink {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

impl DatapathError {
    pub fn netlink(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Self {
        let op = op.into();
        move |source| DatapathError::Netlink { op, source }
    }

    pub fn io(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let op = op.into();
        move |source| DatapathError::Io { op, source }
    }
}

pub type Result<T, E = DatapathError> = std::result::Result<T, E>;

/// The interface toward the other nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    pub ip: Ipv4Addr,
    pub ifindex: u32,
    pub ifname: String,
    pub mtu: u32,
}

/// The VXLAN device as it must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VtepSpec {
    pub vni: u32,
    pub local: Ipv4Addr,
    pub underlay_ifindex: u32,
    pub mtu: u32,
    pub mac: MacAddr,
    /// The node block's network address as /32.
    pub address: Ipv4Addr,
}

/// The bridge as it must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeSpec {
    /// Gateway address with the block's prefix, e.g. 10.244.3.1/24.
    pub gateway: Ipv4Net,
    pub mtu: u32,
    /// Set explicitly: a bridge otherwise takes the lowest port MAC, and
    /// the gateway's MAC would change under the pods as they come and go.
    pub mac: MacAddr,
}

/// Masquerade traffic from `block` to anywhere outside `cluster`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MasqueradeSpec {
    pub block: Ipv4Net,
    pub cluster: Ipv4Net,
}

/// Kernel operations the agent needs, in domain terms. Every `ensure_*` is
/// idempotent: it changes only what differs from the spec.
pub trait Datapath: Send + Sync {
    /// The existing VXLAN device's MAC, if the device exists.
    fn vtep_mac(&self) -> impl Future<Output = Result<Option<MacAddr>>> + Send;
    fn ensure_vtep(&self, spec: &VtepSpec) -> impl Future<Output = Result<()>> + Send;
    fn ensure_bridge(&self, spec: &BridgeSpec) -> impl Future<Output = Result<()>> + Send;
    /// IPv4 forwarding, and bridged traffic through netfilter (so Service
    /// DNAT between two pods on one bridge sees its replies).
    fn ensure_forwarding(&self) -> impl Future<Output = Result<()>> + Send;
    fn ensure_masquerade(&self, spec: &MasqueradeSpec) -> impl Future<Output = Result<()>> + Send;
    /// The Weft-owned peer entries the kernel has now.
    fn peer_entries(&self) -> impl Future<Output = Result<BTreeSet<Entry>>> + Send;
    /// Adds (or replaces in place) one entry.
    fn add_entry(&self, entry: &Entry) -> impl Future<Output = Result<()>> + Send;
    /// Removes one entry; one already gone is not an error.
    fn remove_entry(&self, entry: &Entry) -> impl Future<Output = Result<()>> + Send;
    /// Adds (`add`) or removes every entry of `group`, entries that do not
    /// depend on each other; each with its outcome, in order. One by one
    /// unless an implementation has a cheaper way for many.
    fn apply_entries(
        &self,
        group: &[Entry],
        add: bool,
    ) -> impl Future<Output = Vec<(Entry, Result<()>)>> + Send {
        one_by_one(self, group, add)
    }
}

/// Requests in flight at once when entries go one by one.
const IN_FLIGHT: usize = 64;

/// [`Datapath::apply_entries`] through [`Datapath::add_entry`] and
/// [`Datapath::remove_entry`], [`IN_FLIGHT`] at a time.
pub async fn one_by_one<D: Datapath + ?Sized>(
    dp: &D,
    group: &[Entry],
    add: bool,
) -> Vec<(Entry, Result<()>)> {
    use futures::StreamExt;
    futures::stream::iter(group.iter().copied())
        .map(|e| async move {
            let result = if add {
                dp.add_entry(&e).await
            } else {
                dp.remove_entry(&e).await
            };
            (e, result)
        })
        .buffered(IN_FLIGHT)
        .collect()
        .await
}

/// Test doubles.
#[cfg(test)]
pub mod fake {
    use std::sync::Mutex;

    use super::*;

    /// Keeps peer entries in memory and records every call, in order.
    #[derive(Debug, Default)]
    pub struct RecordingDatapath {
        pub entries: Mutex<BTreeSet<Entry>>,
        pub calls: Mutex<Vec<String>>,
        pub mac: Mutex<Option<MacAddr>>,
        /// Entries whose add fails, to test error handling.
        pub failing: Mutex<BTreeSet<Entry>>,
        /// How often the entries were read (a dump, in the kernel).
        pub reads: Mutex<usize>,
    }

    impl RecordingDatapath {
        pub fn with_entries(entries: BTreeSet<Entry>) -> Self {
            Self {
                entries: Mutex::new(entries),
                ..Self::default()
            }
        }

        pub fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }

        pub fn take_calls(&self) -> Vec<String> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }

        fn record(&self, call: String) {
            self.calls.lock().unwrap().push(call);
        }
    }

    impl Datapath for RecordingDatapath {
        async fn vtep_mac(&self) -> Result<Option<MacAddr>> {
            Ok(*self.mac.lock().unwrap())
        }

        async fn ensure_vtep(&self, spec: &VtepSpec) -> Result<()> {
            *self.mac.lock().unwrap() = Some(spec.mac);
            self.record(format!(
                "ensure_vtep vni={} local={} mtu={} mac={}",
                spec.vni, spec.local, spec.mtu, spec.mac
            ));
            Ok(())
        }

        async fn ensure_bridge(&self, spec: &BridgeSpec) -> Result<()> {
            self.record(format!(
                "ensure_bridge {} mtu={} mac={}",
                spec.gateway, spec.mtu, spec.mac
            ));
            Ok(())
        }

        async fn ensure_forwarding(&self) -> Result<()> {
            self.record("ensure_forwarding".into());
            Ok(())
        }

        async fn ensure_masquerade(&self, spec: &MasqueradeSpec) -> Result<()> {
            self.record(format!(
                "ensure_masquerade {} !{}",
                spec.block, spec.cluster
            ));
            Ok(())
        }

        async fn peer_entries(&self) -> Result<BTreeSet<Entry>> {
            *self.reads.lock().unwrap() += 1;
            Ok(self.entries.lock().unwrap().clone())
        }

        async fn add_entry(&self, entry: &Entry) -> Result<()> {
            self.record(format!("add {entry}"));
            if self.failing.lock().unwrap().contains(entry) {
                return Err(DatapathError::Other(format!(
                    "injected failure adding {entry}"
                )));
            }
            let mut entries = self.entries.lock().unwrap();
            // Replace semantics, as the kernel has for routes and neighbours.
            match entry {
                Entry::Route { block, .. } => {
                    entries.retain(|e| !matches!(e, Entry::Route { block: b, .. } if b == block))
                }
                Entry::Neighbour { ip, .. } => {
                    entries.retain(|e| !matches!(e, Entry::Neighbour { ip: i, .. } if i == ip))
                }
                Entry::Fdb { .. } => {}
            }
            entries.insert(*entry);
            Ok(())
        }

        async fn remove_entry(&self, entry: &Entry) -> Result<()> {
            self.record(format!("remove {entry}"));
            self.entries.lock().unwrap().remove(entry);
            Ok(())
        }
    }
}
