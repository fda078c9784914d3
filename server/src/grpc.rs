//! The gRPC face of the server: `weft.v1.Topology`, `Ipam` and `Admin`.
//! Requests are validated here into domain types (bad input becomes
//! INVALID_ARGUMENT naming the field), handed to the store, and store errors
//! are mapped to status codes in one place ([`status_from`]).

use std::{net::Ipv4Addr, pin::Pin, sync::Arc, time::Instant};

use chrono::{DateTime, Utc};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};
use tracing::{info, instrument, warn};
use weft_proto::v1::{
    self as pb, admin_server::Admin, ipam_server::Ipam, topology_server::Topology,
};

use crate::{
    domain::{
        Attachment, ContainerId, IfName, InvalidField, MacAddr, NodeName, PodRef, UnderlayIp,
        bounded_text, parse_field,
    },
    ipam::NodeBlock,
    metrics::Metrics,
    store::{
        AllocationFilter, AllocationRecord, AuditRecord, HistoryKey, NodeRecord, PeerRecord, Store,
        StoreError, TopologyChange,
    },
    watch::{PeerFeed, STREAM_BUFFER, WatchMessage},
};

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

// === validation helpers ===

fn invalid(e: InvalidField) -> Status {
    Status::invalid_argument(e.to_string())
}

fn check<T: std::str::FromStr<Err = String>>(
    field: &'static str,
    value: &str,
) -> Result<T, Status> {
    parse_field(field, value).map_err(invalid)
}

fn check_text(field: &'static str, value: &str) -> Result<String, Status> {
    bounded_text(field, value, 253).map_err(invalid)
}

fn check_optional<T: std::str::FromStr<Err = String>>(
    field: &'static str,
    value: &str,
) -> Result<Option<T>, Status> {
    if value.is_empty() {
        Ok(None)
    } else {
        check(field, value).map(Some)
    }
}

fn check_ipv4(field: &'static str, value: &str) -> Result<Ipv4Addr, Status> {
    value.parse().map_err(|_| {
        Status::invalid_argument(format!("invalid {field}: {value:?} is not an IPv4 address"))
    })
}

fn page_size(requested: u32) -> Result<u32, Status> {
    match requested {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n <= MAX_PAGE_SIZE => Ok(n),
        n => Err(Status::invalid_argument(format!(
            "invalid page_size: {n}, at most {MAX_PAGE_SIZE}"
        ))),
    }
}

fn check_attachment(container_id: &str, ifname: &str) -> Result<Attachment, Status> {
    Ok(Attachment {
        container_id: check::<ContainerId>("container_id", container_id)?,
        ifname: check::<IfName>("ifname", ifname)?,
    })
}

/// The one place store errors become gRPC statuses.
fn status_from(e: StoreError) -> Status {
    match e {
        StoreError::UnknownNode(_) => Status::not_found(e.to_string()),
        StoreError::BlockExhausted { .. } | StoreError::NoFreeBlock { .. } => {
            Status::resource_exhausted(e.to_string())
        }
        StoreError::AttachmentOnOtherNode { .. } => Status::failed_precondition(e.to_string()),
        StoreError::EndpointTaken { .. } => Status::already_exists(e.to_string()),
        StoreError::Conflict => Status::aborted(e.to_string()),
        // A database that restarts, fails over or is out of reach: the
        // caller retries (the CNI plugin answers 11, not 100).
        e if e.is_unavailable() => {
            warn!(error = %e, "database unavailable");
            Status::unavailable("database unavailable; retry")
        }
        // Internals stay in the log; the client gets a stable message.
        StoreError::Database(_)
        | StoreError::Corrupt(_)
        | StoreError::LayoutMismatch { .. }
        | StoreError::LayoutChanged { .. } => {
            warn!(error = %e, "internal error");
            Status::internal("internal database error; see the server log")
        }
    }
}

// === conversions to the wire ===

fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

fn peer_pb(p: PeerRecord) -> pb::Peer {
    pb::Peer {
        node_name: p.node_name,
        underlay_ip: p.underlay_ip.to_string(),
        vtep_mac: p.vtep_mac,
        block: p.block.to_string(),
    }
}

fn node_pb(n: NodeRecord) -> pb::Node {
    pb::Node {
        name: n.name,
        underlay_ip: n.underlay_ip.to_string(),
        vtep_mac: n.vtep_mac,
        block: n.block.to_string(),
        gateway: n.block.gateway().to_string(),
        registered_at: Some(timestamp(n.registered_at)),
        last_seen: Some(timestamp(n.last_seen)),
        allocated: n.allocated,
        capacity: n.block.capacity(),
    }
}

fn address_with_prefix(address: Ipv4Addr, block: NodeBlock) -> String {
    format!("{address}/{}", block.net().prefix_len())
}

fn allocation_pb(a: AllocationRecord) -> pb::Allocation {
    pb::Allocation {
        node_name: a.node_name,
        address: address_with_prefix(a.address, a.block),
        gateway: a.block.gateway().to_string(),
        container_id: a.container_id,
        ifname: a.ifname,
        pod_namespace: a.pod.namespace,
        pod_name: a.pod.name,
        pod_uid: a.pod.uid,
        allocated_at: Some(timestamp(a.allocated_at)),
    }
}

fn audit_pb(a: AuditRecord) -> pb::AuditEntry {
    pb::AuditEntry {
        id: u64::try_from(a.id).unwrap_or(0),
        at: Some(timestamp(a.at)),
        action: a.action,
        actor: a.actor,
        node_name: a.node_name,
        address: a.address.map(|ip| ip.to_string()).unwrap_or_default(),
        container_id: a.container_id.unwrap_or_default(),
        ifname: a.ifname.unwrap_or_default(),
        pod_namespace: a.pod.namespace,
        pod_name: a.pod.name,
        pod_uid: a.pod.uid,
    }
}

fn watch_pb(m: WatchMessage) -> pb::PeerEvent {
    use pb::peer_event::Event;
    match m {
        WatchMessage::Snapshot { revision, peers } => pb::PeerEvent {
            revision,
            event: Some(Event::Snapshot(pb::PeerSnapshot {
                peers: peers.into_iter().map(peer_pb).collect(),
            })),
        },
        WatchMessage::Change(e) => pb::PeerEvent {
            revision: e.revision,
            event: Some(match e.change {
                TopologyChange::Upsert(p) => Event::Upsert(peer_pb(p)),
                TopologyChange::Delete(name) => Event::Delete(name),
            }),
        },
    }
}

/// Who is calling, from the client certificate (docs/security.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The server runs without TLS (`--insecure-plaintext`): nobody is
    /// authenticated, and node RPCs are attributed to the node they name.
    Plaintext,
    Node(String),
    Admin(String),
    Viewer(String),
}

impl Caller {
    fn actor(&self) -> String {
        match self {
            Caller::Plaintext => "unauthenticated".into(),
            Caller::Node(n) => format!("node/{n}"),
            Caller::Admin(n) => format!("admin/{n}"),
            Caller::Viewer(n) => format!("viewer/{n}"),
        }
    }
}

impl Services {
    /// The caller's identity; with TLS on, a client certificate is required.
    fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        if !self.inner.tls {
            return Ok(Caller::Plaintext);
        }
        let certs = request
            .peer_certs()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let (org, name) = crate::pki::subject_of(certs[0].as_ref())
            .ok_or_else(|| Status::unauthenticated("the client certificate has no O and CN"))?;
        match org.as_str() {
            "weft-node" => Ok(Caller::Node(name)),
            "weft-admin" => Ok(Caller::Admin(name)),
            "weft-viewer" => Ok(Caller::Viewer(name)),
            other => Err(Status::permission_denied(format!(
                "certificate role {other:?} may not call Weft"
            ))),
        }
    }

    /// A node may act only for itself; returns the audit actor.
    async fn authorize_node(
        &self,
        caller: &Caller,
        node: &NodeName,
        method: &str,
    ) -> Result<String, Status> {
        match caller {
            Caller::Plaintext => Ok(format!("node/{node}")),
            Caller::Node(name) if name == node.as_str() => Ok(caller.actor()),
            _ => Err(self.deny(caller, node.as_str(), method).await),
        }
    }

    /// Admin RPCs: admins do anything, viewers only read.
    async fn authorize_admin(
        &self,
        caller: &Caller,
        write: bool,
        method: &str,
    ) -> Result<String, Status> {
        match caller {
            Caller::Plaintext => Ok("admin".into()),
            Caller::Admin(_) => Ok(caller.actor()),
            Caller::Viewer(_) if !write => Ok(caller.actor()),
            _ => Err(self.deny(caller, "", method).await),
        }
    }

    /// Waits for one of the node's [`MAX_CALLS_PER_NODE`] call slots.
    async fn admit(&self, node: &NodeName) -> Result<NodePermit, Status> {
        let semaphore = {
            let mut permits = self.inner.permits.lock().unwrap_or_else(|p| p.into_inner());
            permits
                .entry(node.to_string())
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(MAX_CALLS_PER_NODE)))
                .clone()
        };
        let permit = semaphore
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("server shutting down"))?;
        Ok(NodePermit {
            shared: self.inner.clone(),
            node: node.to_string(),
            permit: Some(permit),
        })
    }

    async fn deny(&self, caller: &Caller, node: &str, method: &str) -> Status {
        let actor = caller.actor();
        warn!(%actor, node, method, "permission denied");
        if let Err(e) = self.inner.store.audit_denied(&actor, node, method).await {
            warn!(error = %e, "recording a denied call");
        }
        Status::permission_denied(format!("{actor} may not call {method} for {node:?}"))
    }
}

// === impl Topology ===

type PeerStream = Pin<Box<dyn Stream<Item = Result<pb::PeerEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Topology for Services {
    #[instrument(skip_all, fields(node = %request.get_ref().node_name))]
    async fn register_node(
        &self,
        request: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeResponse>, Status> {
        let start = Instant::now();
        let result = async {
            let caller = self.caller(&request)?;
            let req = request.into_inner();
            let node: NodeName = check("node_name", &req.node_name)?;
            let underlay: UnderlayIp = check("underlay_ip", &req.underlay_ip)?;
            let mac: MacAddr = check("vtep_mac", &req.vtep_mac)?;
            let actor = self.authorize_node(&caller, &node, "RegisterNode").await?;
            let _permit = self.admit(&node).await?;
            let store = &self.inner.store;
            let reg = match store.register_node(&node, underlay, mac, &actor).await {
                Ok(reg) => reg,
                Err(e @ StoreError::EndpointTaken { .. }) => {
                    // A claim on another node's tunnel endpoint is either a
                    // misconfiguration or an attack: refuse and record it.
                    warn!(%node, %underlay, %mac, %actor, error = %e, "registration refused");
                    let detail = format!("RegisterNode: {e}");
                    if let Err(audit) = store.audit_denied(&actor, node.as_str(), &detail).await {
                        warn!(error = %audit, "recording a refused registration");
                    }
                    return Err(status_from(e));
                }
                Err(e) => return Err(status_from(e)),
            };
            if reg.changed {
                self.inner.feed.poke();
                info!(%node, %underlay, %mac, block = %reg.block, revision = reg.revision, "node registered");
            }
            Ok(Response::new(pb::RegisterNodeResponse {
                block: reg.block.to_string(),
                gateway: reg.block.gateway().to_string(),
                vni: self.inner.vni,
                cluster_cidr: store.layout().cidr().to_string(),
                mtu_hint: self.inner.mtu_hint,
                revision: reg.revision,
            }))
        }
        .await;
        self.finish("RegisterNode", start, result)
    }

    type WatchPeersStream = PeerStream;

    #[instrument(skip_all, fields(node = %request.get_ref().node_name))]
    async fn watch_peers(
        &self,
        request: Request<pb::WatchPeersRequest>,
    ) -> Result<Response<Self::WatchPeersStream>, Status> {
        let caller = self.caller(&request)?;
        let req = request.into_inner();
        let node: NodeName = check("node_name", &req.node_name)?;
        self.authorize_node(&caller, &node, "WatchPeers").await?;
        let slot = {
            let mut streams = self.inner.streams.lock().unwrap_or_else(|p| p.into_inner());
            let open = streams.entry(node.to_string()).or_default();
            if *open >= MAX_STREAMS_PER_NODE {
                warn!(%node, open = *open, "too many watch streams");
                return Err(Status::resource_exhausted(format!(
                    "node {node} already holds {MAX_STREAMS_PER_NODE} watch streams"
                )));
            }
            *open += 1;
            StreamSlot {
                shared: self.inner.clone(),
                node: node.to_string(),
            }
        };
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let feed = self.inner.feed.clone();
        let store = self.inner.store.clone();
        let watchers = self.inner.metrics.watchers.clone();
        info!(%node, since = req.since_revision, "watcher connected");
        tokio::spawn(async move {
            watchers.inc();
            feed.serve_watcher(store, node.to_string(), req.since_revision, tx)
                .await;
            watchers.dec();
            drop(slot);
            info!(%node, "watcher gone");
        });
        let stream = ReceiverStream::new(rx).map(|m| m.map(watch_pb).map_err(status_from));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let start = Instant::now();
        let result = async {
            let caller = self.caller(&request)?;
            let node: NodeName = check("node_name", &request.get_ref().node_name)?;
            self.authorize_node(&caller, &node, "Heartbeat").await?;
            let _permit = self.admit(&node).await?;
            self.inner
                .store
                .heartbeat(&node)
                .await
                .map_err(status_from)?;
            Ok(Response::new(pb::HeartbeatResponse {}))
        }
        .await;
        self.finish("Heartbeat", start, result)
    }
}

// === impl Ipam ===

#[tonic::async_trait]
impl Ipam for Services {
    #[instrument(skip_all, fields(node = %request.get_ref().node_name, container_id = %request.get_ref().container_id, ifname = %request.get_ref().ifname))]
    async fn allocate(
        &self,
        request: Request<pb::AllocateRequest>,
    ) -> Result<Response<pb::AllocateResponse>, Status> {
        let start = Instant::now();
        let result = async {
            let caller = self.caller(&request)?;
            let req = request.into_inner();
            let node: NodeName = check("node_name", &req.node_name)?;
            let actor = self.authorize_node(&caller, &node, "Allocate").await?;
            let _permit = self.admit(&node).await?;
            let attachment = check_attachment(&req.container_id, &req.ifname)?;
            let pod = PodRef {
                namespace: check_text("pod_namespace", &req.pod_namespace)?,
                name: check_text("pod_name", &req.pod_name)?,
                uid: check_text("pod_uid", &req.pod_uid)?,
            };
            let (record, created) = self
                .inner
                .store
                .allocate(&node, &attachment, &pod, &actor)
                .await
                .map_err(status_from)?;
            if created {
                self.inner
                    .metrics
                    .allocations
                    .get_or_create(&crate::metrics::NodeLabels { node: node.to_string() })
                    .inc();
                info!(address = %record.address, pod_namespace = %pod.namespace, pod_name = %pod.name, "allocated");
            }
            Ok(Response::new(pb::AllocateResponse {
                address: address_with_prefix(record.address, record.block),
                gateway: record.block.gateway().to_string(),
                mtu: self.inner.mtu_hint,
            }))
        }
        .await;
        self.finish("Allocate", start, result)
    }

    #[instrument(skip_all, fields(node = %request.get_ref().node_name, container_id = %request.get_ref().container_id, ifname = %request.get_ref().ifname))]
    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let start = Instant::now();
        let result = async {
            let caller = self.caller(&request)?;
            let req = request.into_inner();
            let node: NodeName = check("node_name", &req.node_name)?;
            let actor = self.authorize_node(&caller, &node, "Release").await?;
            let _permit = self.admit(&node).await?;
            let attachment = check_attachment(&req.container_id, &req.ifname)?;
            let released = self
                .inner
                .store
                .release(&node, &attachment, &actor)
                .await
                .map_err(status_from)?;
            let address = match released {
                Some(r) => {
                    self.inner.metrics.count_release(&r.node_name, "release", 1);
                    info!(address = %r.address, "released");
                    r.address.to_string()
                }
                None => String::new(),
            };
            Ok(Response::new(pb::ReleaseResponse { address }))
        }
        .await;
        self.finish("Release", start, result)
    }

    #[instrument(skip_all, fields(node = %request.get_ref().node_name, valid = request.get_ref().valid.len()))]
    async fn gc(
        &self,
        request: Request<pb::GcRequest>,
    ) -> Result<Response<pb::GcResponse>, Status> {
        let start = Instant::now();
        let result = async {
            let caller = self.caller(&request)?;
            let req = request.into_inner();
            let node: NodeName = check("node_name", &req.node_name)?;
            let actor = self.authorize_node(&caller, &node, "Gc").await?;
            let _permit = self.admit(&node).await?;
            if req.valid.len() > MAX_GC_ATTACHMENTS {
                return Err(Status::invalid_argument(format!(
                    "invalid valid: {} attachments, at most {MAX_GC_ATTACHMENTS} allowed",
                    req.valid.len()
                )));
            }
            let valid = req
                .valid
                .iter()
                .map(|a| check_attachment(&a.container_id, &a.ifname))
                .collect::<Result<Vec<_>, _>>()?;
            let released = self
                .inner
                .store
                .gc(&node, &valid, &actor)
                .await
                .map_err(status_from)?;
            self.inner
                .metrics
                .count_release(node.as_str(), "gc", released.len());
            if !released.is_empty() {
                info!(released = released.len(), "garbage-collected allocations");
            }
            Ok(Response::new(pb::GcResponse {
                released: released.into_iter().map(allocation_pb).collect(),
            }))
        }
        .await;
        self.finish("Gc", start, result)
    }

    async fn lookup(
        &self,
        request: Request<pb::LookupRequest>,
    ) -> Result<Response<pb::Allocation>, Status> {
        let start = Instant::now();
        let result = async {
            let caller = self.caller(&request)?;
            let req = request.into_inner();
            let node: NodeName = check("node_name", &req.node_name)?;
            self.authorize_node(&caller, &node, "Lookup").await?;
            let _permit = self.admit(&node).await?;
            let attachment = check_attachment(&req.container_id, &req.ifname)?;
            self.inner
                .store
                .lookup(&node, &attachment)
                .await
                .map_err(status_from)?
                .map(|a| Response::new(allocation_pb(a)))
                .ok_or_else(|| {
                    Status::not_found(format!(
                        "no allocation for {}/{} on node {node}",
                        attachment.container_id, attachment.ifname
                    ))
                })
        }
        .await;
        self.finish("Lookup", start, result)
    }
}

// === impl Admin ===

#[tonic::async_trait]
impl Admin for Services {
    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let start = Instant::now();
        let result = async {
            let caller = self.caller(&request)?;
            self.authorize_admin(&caller, false, "ListNodes").await?;
            let nodes = self.inner.store.list_nodes().await.map_err(status_from)?;
            Ok(Response::new(pb::ListNodesResponse {
                nodes: nodes.into_iter().map(node_pb).collect(),
            }))
        }
        .await;
        self.finish("ListNodes", start, result)
    }

    async fn get_node(
        &self,
        request: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let start = Instant::now();
        let result = async {
            let caller = self.caller(&request)?;
            self.authorize_admin(&caller, false, "GetNode").await?;
            let name: NodeName = check("name", &request.get_ref().name)?;
            let node = self
                .inner
                .store
                .get_node(&name)
                .await
                .map_err(status_from)?;
            Ok(Response::new(node_pb(node)))
        }
        .await;
        self.finish("GetNode", start, result)
    }

    #[instrument(skip_all, fields(node = %request.get_ref().name))]
    async fn delete_node(
        &self,
        request: Request<pb::DeleteNodeRequest>,
    ) -> Result<Response<pb::DeleteNodeResponse>, Status> {
        let start = Instant::now();
        let result = async {
            let caller = self.caller(&request)?;
            let actor = self.authorize_admin(&caller, true, "DeleteNode").await?;
            let name: NodeName = check("name", &request.get_ref().name)?;
            let (revision, released) = self
                .inner
                .store
                .delete_node(&name, &actor)
                .await
                .map_err(status_from)?;
            self.inner.feed.poke();
            self.inner
                .metrics
                .count_release(name.as_str(), "node_delete", released.len());
            info!(%name, revision, released = released.len(), "node deleted");
            Ok(Response::new(pb::DeleteNodeResponse {
                released: released.into_iter().map(allocation_pb).collect(),
            }))
        }
        .await;
        self.finish("DeleteNode", start, result)
    }

    async fn list_allocations(
        &self,
        request: Request<pb::ListAllocationsRequest>,
    ) -> Result<Response<pb::ListAllocationsResponse>, Status> {
        let start = Instant::now();
        let result = async {
            let caller = self.caller(&request)?;
            self.authorize_admin(&caller, false, "ListAllocations")
                .await?;
            let req = request.into_inner();
            let filter = AllocationFilter {
                node_name: check_optional::<NodeName>("node_name", &req.node_name)?
                    .map(|n| n.to_string()),
                pod_namespace: Some(check_text("pod_namespace", &req.pod_namespace)?)
                    .filter(|s| !s.is_empty()),
                pod_name: Some(check_text("pod_name", &req.pod_name)?).filter(|s| !s.is_empty()),
                address: if req.address.is_empty() {
                    None
                } else {
                    Some(check_ipv4("address", &req.address)?)
                },
                after: if req.page_token.is_empty() {
                    None
                } else {
                    Some(check_ipv4("page_token", &req.page_token)?)
                },
                limit: page_size(req.page_size)?,
            };
            let allocations = self
                .inner
                .store
                .list_allocations(&filter)
                .await
                .map_err(status_from)?;
            let next_page_token = match allocations.last() {
                Some(last) if allocations.len() == filter.limit as usize => {
                    last.address.to_string()
                }
                _ => String::new(),
            };
            Ok(Response::new(pb::ListAllocationsResponse {
                allocations: allocations.into_iter().map(allocation_pb).collect(),
                next_page_token,
            }))
        }
        .await;
        self.finish("ListAllocations", start, result)
    }

    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        let start = Instant::now();
        let result = async {
            let caller = self.caller(&request)?;
            self.authorize_admin(&caller, false, "History").await?;
            let req = request.into_inner();
            let key = match (req.address.is_empty(), req.container_id.is_empty()) {
                (false, true) => HistoryKey::Address(check_ipv4("address", &req.address)?),
                (true, false) => HistoryKey::Container(check("container_id", &req.container_id)?),
                _ => {
                    return Err(Status::invalid_argument(
                        "invalid address/container_id: set exactly one of them",
                    ));
                }
            };
            let limit = page_size(req.page_size)?;
            let after = if req.page_token.is_empty() {
                0
            } else {
                req.page_token
                    .parse::<i64>()
                    .ok()
                    .filter(|id| *id > 0)
                    .ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "invalid page_token: {:?} is not a token from a previous page",
                            req.page_token
                        ))
                    })?
            };
            let entries = self
                .inner
                .store
                .history(&key, after, limit)
                .await
                .map_err(status_from)?;
            let next_page_token = match entries.last() {
                Some(last) if entries.len() == limit as usize => last.id.to_string(),
                _ => String::new(),
            };
            Ok(Response::new(pb::HistoryResponse {
                entries: entries.into_iter().map(audit_pb).collect(),
                next_page_token,
            }))
        }
        .await;
        self.finish("History", start, result)
    }

    async fn utilization(
        &self,
        request: Request<pb::UtilizationRequest>,
    ) -> Result<Response<pb::UtilizationResponse>, Status> {
        let start = Instant::now();
        let result = async {
            let caller = self.caller(&request)?;
            self.authorize_admin(&caller, false, "Utilization").await?;
            let store = &self.inner.store;
            let rows = store.utilization().await.map_err(status_from)?;
            let layout = store.layout();
            let per_block = layout.block(0).map(|b| b.capacity()).unwrap_or(0);
            let nodes: Vec<pb::NodeUtilization> = rows
                .into_iter()
                .map(|(node_name, block, used)| pb::NodeUtilization {
                    node_name,
                    block: block.to_string(),
                    used,
                    capacity: block.capacity(),
                })
                .collect();
            let blocks_used = u32::try_from(nodes.len()).unwrap_or(u32::MAX);
            Ok(Response::new(pb::UtilizationResponse {
                used: nodes.iter().map(|n| u64::from(n.used)).sum(),
                // The cluster's capacity counts every block, assigned or not.
                capacity: u64::from(layout.block_count()) * u64::from(per_block),
                blocks_used,
                blocks_capacity: layout.block_count(),
                nodes,
            }))
        }
        .await;
        self.finish("Utilization", start, result)
    }
}
