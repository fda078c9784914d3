//! The agent's CNI service (`weft.agent.v1.Cni` on the unix socket): parses
//! the runtime's request ([`request`]), does the work (IPAM through the
//! server, wiring through [`pod`]) and answers with a result shaped for the
//! requested version ([`result`]) or an error object ([`error`]).
//! Requests for one (container, ifname) run one at a time; different
//! attachments run concurrently.
//!
//! The service answers from the moment the agent starts, before the node
//! is registered ([`NodePhase`]): DEL and CHECK need only the kernel and
//! the state directory, so pods can be torn down during a server outage. A
//! release the server cannot take is written to the [`ReleaseJournal`]
//! and sent by [`CniService::flush_releases`] once the server answers.
//!
//! (Near 500 lines: the verbs share the phase, the locks and the journal,
//! and each is kept whole where it can be read top to bottom.)

pub mod error;
mod locks;
mod netns;
pub mod pod;
pub mod pod_error;
mod releases;
pub mod request;
pub mod result;
pub mod seams;

use locks::AttachmentLocks;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use ipnet::Ipv4Net;
use tokio::sync::watch;
use tonic::{Code as GrpcCode, Request, Response, Status};
use tracing::{info, instrument, warn};
use weft_proto::{
    agent::v1::{ExecRequest, ExecResponse, cni_server::Cni},
    v1 as pb,
};

use crate::state::ReleaseJournal;

use self::{
    error::{CniError, Code},
    pod::{PodNetwork, PodSpec, host_ifname},
    request::{Command, Request as CniRequest},
    seams::{GrpcIpam, Ipam, Pods},
};

/// Where the node stands with weft-server, as the CNI service sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodePhase {
    /// Not registered yet (the server may be away). DEL and CHECK are
    /// served; ADD answers "try again later". `mtu` is the one saved by
    /// the last run, if any.
    Starting {
        mtu: Option<u32>,
    },
    Ready {
        mtu: u32,
    },
    /// The node was deleted from weft-server while this agent ran: no new
    /// pods, DEL still served so the node drains.
    Fenced {
        mtu: u32,
    },
}

impl NodePhase {
    fn mtu(&self) -> Option<u32> {
        match *self {
            NodePhase::Starting { mtu } => mtu,
            NodePhase::Ready { mtu } | NodePhase::Fenced { mtu } => Some(mtu),
        }
    }
}

/// What the CNI service needs from the rest of the agent: the server's
/// IPAM and the kernel's pod plumbing behind narrow traits ([`seams`]).
#[derive(Debug, Clone)]
pub struct CniService<I = GrpcIpam, P = PodNetwork> {
    node: String,
    phase: watch::Receiver<NodePhase>,
    ipam: I,
    pods: P,
    locks: Arc<AttachmentLocks>,
    journal: Arc<ReleaseJournal>,
}

/// Crash tests: in debug builds, `WEFT_FAILPOINTS` (comma-separated)
/// names steps of ADD and DEL at which the agent aborts on the spot, with
/// no cleanup, as a SIGKILL or a power cut there would. Release builds
/// never read it.
fn failpoint(name: &str) {
    static NAMED: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    if !cfg!(debug_assertions) {
        return;
    }
    let named = NAMED.get_or_init(|| {
        std::env::var("WEFT_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    });
    if named.iter().any(|n| n == name) {
        tracing::error!(failpoint = name, "failpoint reached; aborting");
        std::process::abort();
    }
}

/// Whether a failed call may succeed later unchanged: the server (or its
/// database) is away, not refusing the request.
fn transient(status: &Status) -> bool {
    matches!(
        status.code(),
        GrpcCode::Unavailable
            | GrpcCode::DeadlineExceeded
            | GrpcCode::Cancelled
            | GrpcCode::Unknown
            | GrpcCode::Aborted
            | GrpcCode::Internal
    )
}

fn ipam_error(status: Status, what: &str) -> CniError {
    match status.code() {
        GrpcCode::Unavailable
        | GrpcCode::DeadlineExceeded
        | GrpcCode::Cancelled
        | GrpcCode::Unknown
        | GrpcCode::Aborted => CniError::new(
            Code::TryAgainLater,
            format!("{what}: weft-server is not reachable; try again later"),
        )
        .with_details(status.message().to_owned()),
        _ => CniError::new(Code::Ipam, format!("{what}: {}", status.message())),
    }
}

impl<I: Ipam, P: Pods> CniService<I, P> {
    pub fn new(
        node: String,
        phase: watch::Receiver<NodePhase>,
        ipam: I,
        pods: P,
        journal: Arc<ReleaseJournal>,
    ) -> Self {
        Self {
            node,
            phase,
            ipam,
            pods,
            locks: Arc::default(),
            journal,
        }
    }

    fn phase(&self) -> NodePhase {
        *self.phase.borrow()
    }

    /// Handles one request: `Ok(stdout)` or the error to print.
    pub async fn handle(
        &self,
        env: &HashMap<String, String>,
        stdin: &[u8],
    ) -> Result<String, CniError> {
        let req = request::parse(env, stdin)?;
        match req.command {
            Command::Version => Ok(result::render_version(&req.version)),
            Command::Status => self.status().await.map(|()| String::new()),
            Command::Gc => self.gc(&req).await.map(|()| String::new()),
            Command::Add | Command::Del | Command::Check => {
                let _guard = self
                    .locks
                    .lock((req.container_id.clone(), req.ifname.clone()))
                    .await;
                match req.command {
                    Command::Add => self.add(&req).await,
                    Command::Del => self.del(&req).await.map(|()| String::new()),
                    _ => self.check(&req).await.map(|()| String::new()),
                }
            }
        }
    }

    #[instrument(skip_all, fields(container_id = %req.container_id, ifname = %req.ifname, pod = %format!("{}/{}", req.pod.namespace, req.pod.name)))]
    async fn add(&self, req: &CniRequest) -> Result<String, CniError> {
        let mtu = match self.phase() {
            NodePhase::Ready { mtu } => mtu,
            NodePhase::Starting { .. } => {
                return Err(CniError::new(
                    Code::TryAgainLater,
                    format!(
                        "weft-agent has not registered node {} with weft-server yet; try again later",
                        self.node
                    ),
                ));
            }
            NodePhase::Fenced { .. } => {
                return Err(CniError::new(
                    Code::Ipam,
                    format!(
                        "node {} was deleted from weft-server; no new pods are wired here until weft-agent is restarted",
                        self.node
                    ),
                ));
            }
        };
        let netns = req
            .netns
            .clone()
            .ok_or_else(|| CniError::new(Code::InvalidEnv, "CNI_NETNS is not set"))?;
        // Fail before allocating when the namespace is not there at all,
        // or is a file the agent cannot enter.
        self.pods.check_netns(&netns)?;
        let alloc = self
            .ipam
            .allocate(pb::AllocateRequest {
                node_name: self.node.clone(),
                container_id: req.container_id.clone(),
                ifname: req.ifname.clone(),
                pod_namespace: req.pod.namespace.clone(),
                pod_name: req.pod.name.clone(),
                pod_uid: req.pod.uid.clone(),
            })
            .await
            .map_err(|s| ipam_error(s, "allocating an address"))?;
        failpoint("add-after-allocate");
        // An attachment whose release is still journalled gets its address
        // back (Allocate is idempotent): the journal must not release it
        // under the new pod. Dropped only now that the server answered, so
        // a failed Allocate leaves the owed release in place.
        if self
            .journal
            .remove(&req.container_id, &req.ifname)
            .map_err(|e| CniError::new(Code::Io, e.to_string()))?
        {
            info!("attachment wired again before its journalled release was sent");
        }
        let address: Ipv4Net = alloc.address.parse().map_err(|_| {
            CniError::new(
                Code::Ipam,
                format!("server sent address {:?}", alloc.address),
            )
        })?;
        let gateway = alloc.gateway.parse().map_err(|_| {
            CniError::new(
                Code::Ipam,
                format!("server sent gateway {:?}", alloc.gateway),
            )
        })?;
        let spec = PodSpec {
            container_id: req.container_id.clone(),
            ifname: req.ifname.clone(),
            netns,
            address,
            gateway,
            mtu,
        };
        match self.pods.wire(&spec).await {
            Ok(wired) => {
                failpoint("add-after-wire");
                info!(%address, host_if = %wired.host.name, "pod wired");
                Ok(result::render(&wired, &req.version))
            }
            Err(e) => {
                // Nothing of the attachment is left: give the address back.
                if let Err(status) = self.release(req).await {
                    self.journal_release(&req.container_id, &req.ifname, &status);
                }
                Err(e.into())
            }
        }
    }

    async fn release(&self, req: &CniRequest) -> Result<Option<String>, Status> {
        self.release_rpc(&req.container_id, &req.ifname).await
    }

    async fn release_rpc(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<String>, Status> {
        self.ipam.release(&self.node, container_id, ifname).await
    }

    #[instrument(skip_all, fields(container_id = %req.container_id, ifname = %req.ifname))]
    async fn del(&self, req: &CniRequest) -> Result<(), CniError> {
        // The pod's address, for the conntrack flush, in case the server
        // cannot tell us (it may be down; DEL must still succeed).
        let mut address = None;
        if let Some(netns) = req.netns.as_deref().filter(|p| p.exists()) {
            match self.pods.inspect(netns, &req.ifname).await {
                Ok(side) => address = side.addresses.first().map(|a| a.addr().to_string()),
                Err(e) => {
                    warn!(error = %e, "cannot read the pod side; tearing down the host side only")
                }
            }
        }
        // Unlinking waits for the kernel's RCU grace period; release the
        // address meanwhile.
        let host = host_ifname(&req.container_id, &req.ifname);
        let (unlinked, released) = tokio::join!(self.pods.delete_link(&host), self.release(req));
        failpoint("del-after-teardown");
        let mut failures = Vec::new();
        match released {
            Ok(released) => {
                address = released.or(address);
                // A release journalled by an earlier DEL is done now too.
                if let Err(e) = self.journal.remove(&req.container_id, &req.ifname) {
                    failures.push(format!("updating the release journal: {e}"));
                }
            }
            // The pod is gone; the server hears of it when it is back.
            Err(status) if transient(&status) => {
                self.journal_release(&req.container_id, &req.ifname, &status);
                failpoint("del-after-journal");
            }
            Err(status) => {
                warn!(code = ?status.code(), message = status.message(), "the server refused the release")
            }
        }
        // Every step runs whatever failed before it, and every failure is
        // reported together (netavark's teardown does the same).
        if let Some(ip) = &address {
            self.pods.flush_conntrack(ip).await;
        }
        if let Err(e) = unlinked {
            let e = CniError::from(e);
            failures.insert(0, e.msg.clone());
            return Err(CniError::new(e.code, failures.join("; ")).with_details(e.details));
        }
        if !failures.is_empty() {
            return Err(CniError::new(Code::Io, failures.join("; ")));
        }
        if let Some(ip) = address {
            info!(%ip, "pod unwired and released");
        }
        Ok(())
    }

    async fn check(&self, req: &CniRequest) -> Result<(), CniError> {
        let prev = req
            .prev_result
            .as_ref()
            .ok_or_else(|| CniError::new(Code::InvalidConfig, "CHECK needs prevResult"))?;
        let drift = |msg: String| CniError::new(Code::Drift, msg);
        let netns = req
            .netns
            .as_deref()
            .ok_or_else(|| CniError::new(Code::InvalidEnv, "CNI_NETNS is not set"))?;
        let side = self.pods.inspect(netns, &req.ifname).await?;
        if !side.exists {
            return Err(drift(format!(
                "interface {} is missing in {}",
                req.ifname,
                netns.display()
            )));
        }
        if !side.up {
            return Err(drift(format!("interface {} is down", req.ifname)));
        }
        if !side.addresses.contains(&prev.address) {
            return Err(drift(format!(
                "{} has {:?}, prevResult says {}",
                req.ifname, side.addresses, prev.address
            )));
        }
        if let Some(mtu) = self.phase().mtu()
            && side.mtu != mtu
        {
            return Err(drift(format!(
                "{} has MTU {}, expected {mtu}",
                req.ifname, side.mtu
            )));
        }
        if let Some(gw) = prev.gateway
            && side.default_gateway != Some(gw)
        {
            return Err(drift(format!(
                "default route is via {:?}, expected {gw}",
                side.default_gateway
            )));
        }
        match self.pods.host_side(&req.container_id, &req.ifname).await? {
            None => {
                return Err(drift(format!(
                    "host interface {} is missing",
                    host_ifname(&req.container_id, &req.ifname)
                )));
            }
            Some(false) => return Err(drift("host interface is not attached to weft0".into())),
            Some(true) => {}
        }
        if self.journal.contains(&req.container_id, &req.ifname) {
            return Err(drift(
                "the attachment was deleted; its release is waiting for weft-server".into(),
            ));
        }
        let alloc = self
            .ipam
            .lookup(pb::LookupRequest {
                node_name: self.node.clone(),
                container_id: req.container_id.clone(),
                ifname: req.ifname.clone(),
            })
            .await;
        match alloc {
            Ok(a) if a.address == prev.address.to_string() => Ok(()),
            Ok(a) => Err(drift(format!(
                "the server allocated {}, prevResult says {}",
                a.address, prev.address
            ))),
            Err(s) if s.code() == GrpcCode::NotFound => Err(drift(
                "the server has no allocation for this attachment".into(),
            )),
            // The kernel is the ground truth of what is wired, and it
            // matches prevResult: a server outage is not drift.
            Err(s) if transient(&s) => {
                warn!(code = ?s.code(), message = s.message(), "CHECK without the server: the kernel matches prevResult");
                Ok(())
            }
            Err(s) => Err(ipam_error(s, "looking up the allocation")),
        }
    }

    async fn gc(&self, req: &CniRequest) -> Result<(), CniError> {
        let valid: Vec<pb::Attachment> = req
            .valid_attachments
            .iter()
            .map(|a| pb::Attachment {
                container_id: a.container_id.clone(),
                ifname: a.ifname.clone(),
            })
            .collect();
        let released = self
            .ipam
            .gc(pb::GcRequest {
                node_name: self.node.clone(),
                valid,
            })
            .await
            .map_err(|s| ipam_error(s, "garbage-collecting addresses"))?;
        let keep: HashSet<String> = req
            .valid_attachments
            .iter()
            .map(|a| host_ifname(&a.container_id, &a.ifname))
            .collect();
        let mut orphans = 0;
        for name in self.pods.host_veths().await? {
            if !keep.contains(&name) {
                self.pods.delete_link(&name).await?;
                orphans += 1;
            }
        }
        for a in &released {
            if let Some(ip) = a.address.split('/').next() {
                self.pods.flush_conntrack(ip).await;
            }
        }
        info!(released = released.len(), orphans, "GC done");
        Ok(())
    }

    async fn status(&self) -> Result<(), CniError> {
        match self.phase() {
            NodePhase::Fenced { .. } => {
                return Err(CniError::new(
                    Code::NotAvailable,
                    format!(
                        "node {} was deleted from weft-server; restart weft-agent to register it again",
                        self.node
                    ),
                ));
            }
            NodePhase::Starting { .. } => {
                return Err(CniError::new(
                    Code::NotAvailable,
                    format!(
                        "weft-agent has not registered node {} with weft-server yet",
                        self.node
                    ),
                ));
            }
            NodePhase::Ready { .. } => {}
        }
        if !self.pods.bridge_exists().await? {
            return Err(CniError::new(
                Code::NotAvailable,
                "the bridge weft0 is missing; restart weft-agent",
            ));
        }
        self.ipam.heartbeat(&self.node).await.map_err(|s| {
            CniError::new(
                Code::NotAvailable,
                "weft-server is not reachable: new pods cannot get addresses",
            )
            .with_details(s.message().to_owned())
        })?;
        Ok(())
    }
}

#[tonic::async_trait]
impl<I: Ipam, P: Pods> Cni for CniService<I, P> {
    async fn exec(&self, request: Request<ExecRequest>) -> Result<Response<ExecResponse>, Status> {
        // The socket is root-only (0600); the kernel-reported credentials
        // are checked too, so a loosened mode does not open the datapath.
        let caller = request
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            .and_then(|info| info.peer_cred)
            .map(|cred| cred.uid());
        if caller != Some(0) {
            warn!(?caller, "refusing a CNI request from a non-root caller");
            let version = request::error_version(&request.get_ref().stdin);
            let e = CniError::new(Code::NotPermitted, "only root may call weft-agent")
                .with_details(format!("caller uid {caller:?}"));
            return Ok(Response::new(ExecResponse {
                stdout: e.render(&version).into_bytes(),
                exit_code: 1,
            }));
        }
        let req = request.into_inner();
        let outcome = self.handle(&req.env, &req.stdin).await;
        let reply = match outcome {
            Ok(stdout) => ExecResponse {
                stdout: stdout.into_bytes(),
                exit_code: 0,
            },
            Err(e) => {
                let version = request::error_version(&req.stdin);
                warn!(command = req.env.get("CNI_COMMAND").map(String::as_str).unwrap_or(""), error = %e, "CNI request failed");
                ExecResponse {
                    stdout: e.render(&version).into_bytes(),
                    exit_code: 1,
                }
            }
        };
        Ok(Response::new(reply))
    }
}

#[cfg(test)]
mod tests;
