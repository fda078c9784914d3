//! weft-core: the rules every part of Weft must agree on, written once.
//!
//! - [`domain`]: values parsed once at the edge (node names, container ids,
//!   interface names, MAC and underlay addresses, pods, attachments).
//! - [`ipam`]: the cluster layout (CIDR split into per-node blocks) and the
//!   arithmetic inside a block, including the round-robin choice the
//!   server's store makes for every allocation.
//! - [`names`]: names and addresses derived from identities: a node's VTEP
//!   and bridge MACs, a pod's host-side interface name.
//! - [`reserve`]: per-node reserves, what makes the database equal to a
//!   node's own view.
//! - [`cni`]: the CNI spec versions Weft speaks and which commands each
//!   version allows.
//!
//! The server, the agent and the CNI plugin depend on this crate; it
//! depends on no runtime, transport, database or netlink crate.

pub mod cni;
pub mod domain;
pub mod ipam;
pub mod names;
pub mod reserve;
