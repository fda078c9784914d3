//! Weft's gRPC API.
//!
//! `weft.v1` is the server's API: `Topology` (node registration, the peer
//! stream agents turn into tunnels), `Ipam` (pod addresses) and `Admin`
//! (operator queries). [`FILE_DESCRIPTOR_SET`] feeds server reflection so
//! grpcurl can list and describe every service.

pub mod codec;

/// The server API, package `weft.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_debug_implementations)]
    tonic::include_proto!("weft.v1");
}

/// The node agent's API, package `weft.agent.v1`: the CNI endpoint the
/// `weft` plugin binary calls over the agent's unix socket.
pub mod agent {
    pub mod v1 {
        #![allow(clippy::all, missing_debug_implementations)]
        tonic::include_proto!("weft.agent.v1");
    }
}

/// Encoded descriptors of every Weft proto file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("weft_descriptor");
