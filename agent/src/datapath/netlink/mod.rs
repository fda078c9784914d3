//! [`Datapath`] on rtnetlink, in the network namespace the agent runs in.
//! Only Weft-owned objects are ever changed: `weft.vxlan`, `weft0`, routes,
//! neighbours and FDB entries on `weft.vxlan`, and the `weft` nftables
//! table. Masquerade is the one step done through the `nft` binary (there
//! is no nftables netlink support in the dependency set); its input is a
//! single atomic transaction.

//!
//! [`attrs`] reads and builds messages, [`links`] owns `weft.vxlan` and
//! `weft0`, [`underlay`] finds the tunnel's interface, [`entries`] dumps and
//! applies peer entries (many at once through [`batch`]), [`host`] sets
//! forwarding and the masquerade rule.

mod attrs;
mod batch;
mod entries;
mod host;
mod links;
mod underlay;

use std::collections::BTreeSet;

use rtnetlink::Handle;

use crate::{
    datapath::{BridgeSpec, Datapath, DatapathError, MasqueradeSpec, Result, VXLAN_NAME, VtepSpec},
    peers::{Entry, MacAddr},
};

use attrs::link_mac;
pub(crate) use attrs::{EEXIST, ENODEV, address_net, errno, link_mtu};

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

// === impl NetlinkDatapath ===

impl NetlinkDatapath {
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
}

impl Datapath for NetlinkDatapath {
    async fn vtep_mac(&self) -> Result<Option<MacAddr>> {
        Ok(self.link(VXLAN_NAME).await?.as_ref().and_then(link_mac))
    }

    async fn ensure_vtep(&self, spec: &VtepSpec) -> Result<()> {
        self.set_up_vtep(spec).await
    }

    async fn ensure_bridge(&self, spec: &BridgeSpec) -> Result<()> {
        self.set_up_bridge(spec).await
    }

    async fn ensure_forwarding(&self) -> Result<()> {
        self.set_forwarding().await
    }

    async fn ensure_masquerade(&self, spec: &MasqueradeSpec) -> Result<()> {
        self.set_masquerade(spec).await
    }

    async fn peer_entries(&self) -> Result<BTreeSet<Entry>> {
        self.dump_entries().await
    }

    async fn add_entry(&self, entry: &Entry) -> Result<()> {
        self.apply_add(entry).await
    }

    async fn remove_entry(&self, entry: &Entry) -> Result<()> {
        self.apply_remove(entry).await
    }

    async fn apply_entries(&self, group: &[Entry], add: bool) -> Vec<(Entry, Result<()>)> {
        self.apply_group(group, add).await
    }
}
