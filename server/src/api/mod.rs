//! The gRPC face of the server: `weft.v1.Topology` ([`topology`]), `Ipam`
//! ([`ipam`]) and `Admin` ([`admin`]), all on one [`Services`] value.
//! Requests are validated into weft-core types ([`check`]), authorised by
//! a pure policy ([`auth`]), handed to the store, and store errors are
//! mapped to status codes in one place ([`check::status_from`]); records
//! become wire messages in [`convert`].

pub mod admin;
pub mod auth;
mod check;
mod convert;
pub mod ipam;
mod reserves;
pub mod topology;

use std::{sync::Arc, time::Instant};

use tonic::Status;
use tracing::warn;

pub use auth::Caller;

use crate::{metrics::Metrics, store::Store, watch::PeerFeed};

/// Page size of ListAllocations when the caller names none, and the most
/// it may ask for: a listing never holds the whole table in memory.
pub const DEFAULT_PAGE_SIZE: u32 = 1000;
pub const MAX_PAGE_SIZE: u32 = 10_000;

/// Most attachments one Gc call may list; a node runs far fewer pods.
pub const MAX_GC_ATTACHMENTS: usize = 16_384;

/// What every service shares.
#[derive(Debug, Clone)]
pub struct Services {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    store: Store,
    feed: PeerFeed,
    metrics: Metrics,
    vni: u32,
    mtu_hint: u32,
    /// Open watch streams per node name.
    streams: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    /// Whether callers present client certificates (mutual TLS).
    tls: bool,
    /// Unary calls in flight per node, so one node's burst queues behind
    /// its own permits instead of taking every database connection.
    permits: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

/// Unary calls one node may have in the store at once. An agent's ADD
/// burst at boot waits its turn; the pool's other connections stay free
/// for every other node.
pub const MAX_CALLS_PER_NODE: usize = 4;

/// A node's unary call slot; the map entry goes when nobody holds or
/// waits for one.
#[derive(Debug)]
struct NodePermit {
    shared: Arc<Shared>,
    node: String,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for NodePermit {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut permits = self
            .shared
            .permits
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if permits
            .get(&self.node)
            .is_some_and(|s| Arc::strong_count(s) == 1)
        {
            permits.remove(&self.node);
        }
    }
}

/// Watch streams one node may hold at once: an agent needs one; a few more
/// cover reconnects racing the old stream's teardown.
pub const MAX_STREAMS_PER_NODE: usize = 4;

/// Counts a node's open stream; the count drops when the stream ends.
#[derive(Debug)]
struct StreamSlot {
    shared: Arc<Shared>,
    node: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut streams = self
            .shared
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = streams.get_mut(&self.node) {
            *n -= 1;
            if *n == 0 {
                streams.remove(&self.node);
            }
        }
    }
}

impl Services {
    pub fn new(
        store: Store,
        feed: PeerFeed,
        metrics: Metrics,
        vni: u32,
        mtu_hint: u32,
        tls: bool,
    ) -> Self {
        Self {
            inner: Arc::new(Shared {
                store,
                feed,
                metrics,
                vni,
                mtu_hint,
                streams: Default::default(),
                tls,
                permits: Default::default(),
            }),
        }
    }

    /// Runs one unary handler: the caller's identity from the certificate
    /// first, then `handler` with it and the message, then latency and
    /// status recorded (and failures logged) in one place.
    async fn unary<Req, Resp>(
        &self,
        method: &'static str,
        request: tonic::Request<Req>,
        handler: impl AsyncFnOnce(Caller, Req) -> Result<tonic::Response<Resp>, Status>,
    ) -> Result<tonic::Response<Resp>, Status> {
        let start = Instant::now();
        let result = match self.caller(&request) {
            Ok(caller) => handler(caller, request.into_inner()).await,
            Err(status) => Err(status),
        };
        self.finish(method, start, result)
    }

    /// Records latency and status code of one call.
    fn finish<T>(
        &self,
        method: &'static str,
        start: Instant,
        result: Result<T, Status>,
    ) -> Result<T, Status> {
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        self.inner
            .metrics
            .observe_rpc(method, code, start.elapsed());
        if let Err(status) = &result
            && matches!(
                status.code(),
                tonic::Code::Internal | tonic::Code::Unavailable
            )
        {
            warn!(method, code = ?status.code(), message = status.message(), "request failed");
        }
        result
    }
}
