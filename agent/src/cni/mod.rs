//! The agent's CNI service (`weft.agent.v1.Cni` on the unix socket): parses
//! the runtime's request ([`request`]), does the work (an address from the
//! node's reserve, [`crate::reserve`]; wiring through [`pod`]) and answers
//! with a result shaped for the requested version ([`result`]) or an error
//! object ([`error`]). Requests for one (container, ifname) run one at a
//! time; different attachments run concurrently.
//!
//! No verb waits for weft-server: ADD binds a reserved address and DEL
//! releases it, each journalled on the node before it is acted on, and
//! [`background`] reports them, refills the reserve, syncs PostgreSQL with
//! the node and releases what the kernel no longer has. The service
//! answers from the moment the agent starts ([`NodePhase`]), so pods start
//! and stop during a server or database outage.
//!
//! (Near 500 lines: the verbs share the phase, the locks and the reserve,
//! and each is kept whole where it can be read top to bottom.)

pub mod background;
mod conntrack;
pub mod error;
mod locks;
mod netns;
pub mod pod;
pub mod pod_error;
pub mod request;
pub mod result;
pub mod seams;

use locks::AttachmentLocks;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use ipnet::Ipv4Net;
use tokio::sync::watch;
use tonic::{Code as GrpcCode, Request, Response, Status};
use tracing::{debug, info, instrument, warn};
use weft_proto::agent::v1::{ExecRequest, ExecResponse, cni_server::Cni};

use crate::reserve::{
    Reserve,
    book::{BindError, Key, Pod},
};

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

/// What the CNI service needs from the rest of the agent: the node's
/// reserve, the server behind a narrow trait ([`seams::Ipam`], used only
/// in the background and by STATUS) and the kernel's pod plumbing.
#[derive(Debug, Clone)]
pub struct CniService<I = GrpcIpam, P = PodNetwork> {
    node: String,
    phase: watch::Receiver<NodePhase>,
    ipam: I,
    pods: P,
    locks: Arc<AttachmentLocks>,
    reserve: Arc<Reserve>,
    /// Whether the server answered the last background call.
    online: Arc<AtomicBool>,
    /// The server answers but says PostgreSQL is away (UNAVAILABLE
    /// "database unavailable"): messages name the database, not the server.
    database_away: Arc<AtomicBool>,
    /// Events up to this report seq waited for an unreachable server:
    /// they are reported as made offline.
    offline_upto: Arc<AtomicU64>,
}

/// How long an ADD that finds the reserve empty waits for a refill while
/// the server answers (a burst larger than the reserve).
const REFILL_WAIT: Duration = Duration::from_secs(5);

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

fn away_text(database: bool) -> &'static str {
    if database {
        "weft-server cannot reach PostgreSQL"
    } else {
        "weft-server is not reachable"
    }
}

/// Whether a failed call says the server's database is away (the server
/// itself answered).
fn database_away(status: &tonic::Status) -> bool {
    status.code() == GrpcCode::Unavailable && status.message().starts_with("database unavailable")
}

fn state_error(e: crate::state::StateError) -> CniError {
    CniError::new(Code::Io, format!("the node's state directory: {e}"))
}

fn key(req: &CniRequest) -> Key {
    (req.container_id.clone(), req.ifname.clone())
}

impl<I: Ipam, P: Pods> CniService<I, P> {
    pub fn new(
        node: String,
        phase: watch::Receiver<NodePhase>,
        ipam: I,
        pods: P,
        reserve: Arc<Reserve>,
    ) -> Self {
        // Events an earlier run could not report reach the server late.
        let offline_upto = Arc::new(AtomicU64::new(reserve.book().rseq));
        Self {
            offline_upto,
            database_away: Arc::default(),
            node,
            phase,
            ipam,
            pods,
            locks: Arc::default(),
            reserve,
            // Until a call fails, the server is taken to answer: a fresh
            // agent's first ADD waits for the first refill instead of
            // failing before the background has tried.
            online: Arc::new(AtomicBool::new(true)),
        }
    }

    fn phase(&self) -> NodePhase {
        *self.phase.borrow()
    }

    /// Whether the server answers: not before this run registered, and not
    /// since a call failed.
    fn online(&self) -> bool {
        matches!(self.phase(), NodePhase::Ready { .. }) && self.online.load(Ordering::Relaxed)
    }

    pub(crate) fn set_online(&self, online: bool) {
        self.online.store(online, Ordering::Relaxed);
    }

    /// What is away, for messages: the database behind the server, or the
    /// server itself.
    fn away(&self) -> &'static str {
        away_text(self.database_away.load(Ordering::Relaxed))
    }

    pub(crate) fn set_away(&self, status: &tonic::Status) {
        self.database_away
            .store(database_away(status), Ordering::Relaxed);
    }

    pub fn reserve(&self) -> &Arc<Reserve> {
        &self.reserve
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

    /// The pod MTU if this node may wire new pods now.
    async fn add_mtu(&self) -> Result<u32, CniError> {
        match self.phase() {
            NodePhase::Ready { mtu } => Ok(mtu),
            // Restarted while the server is away: the datapath the last
            // run built is still there, and so is the reserve.
            NodePhase::Starting { mtu: Some(mtu) } if self.pods.bridge_exists().await? => Ok(mtu),
            NodePhase::Starting { .. } => Err(CniError::new(
                Code::TryAgainLater,
                format!(
                    "weft-agent has not registered node {} with weft-server yet and has no datapath from an earlier run; try again later",
                    self.node
                ),
            )),
            NodePhase::Fenced { .. } => Err(CniError::new(
                Code::Ipam,
                format!(
                    "node {} was deleted from weft-server; no new pods are wired here until weft-agent is restarted",
                    self.node
                ),
            )),
        }
    }

    /// Binds the attachment from the reserve; an empty reserve waits for a
    /// refill only while the server answers.
    async fn bind(&self, req: &CniRequest) -> Result<crate::reserve::Bind, CniError> {
        let pod = Pod {
            namespace: req.pod.namespace.clone(),
            name: req.pod.name.clone(),
            uid: req.pod.uid.clone(),
        };
        let deadline = tokio::time::Instant::now() + REFILL_WAIT;
        loop {
            let granted = self.reserve.granted.notified();
            tokio::pin!(granted);
            granted.as_mut().enable();
            let e = match self
                .reserve
                .bind(&key(req), &pod, !self.online())
                .map_err(state_error)?
            {
                Ok(bound) => return Ok(bound),
                Err(e) => e,
            };
            // Only a registered node refills (before registration nothing
            // runs that could).
            let refills = matches!(self.phase(), NodePhase::Ready { .. });
            if e == BindError::Exhausted
                && refills
                && self.online()
                && tokio::time::Instant::now() < deadline
            {
                self.reserve.changed.notify_one();
                if tokio::time::timeout_at(deadline, granted).await.is_ok() {
                    continue;
                }
            }
            let hint = match e {
                BindError::Exhausted if refills && self.online() => {
                    "weft-server did not refill it in time; try again later".to_owned()
                }
                BindError::Exhausted => format!("{} to refill it; try again later", self.away()),
                _ => "try again later".to_owned(),
            };
            return Err(CniError::new(Code::TryAgainLater, format!("{e}; {hint}")));
        }
    }

    #[instrument(skip_all, fields(container_id = %req.container_id, ifname = %req.ifname, pod = %format!("{}/{}", req.pod.namespace, req.pod.name)))]
    async fn add(&self, req: &CniRequest) -> Result<String, CniError> {
        let mtu = self.add_mtu().await?;
        let netns = req
            .netns
            .clone()
            .ok_or_else(|| CniError::new(Code::InvalidEnv, "CNI_NETNS is not set"))?;
        // Fail before binding when the namespace is not there at all, or
        // is a file the agent cannot enter.
        self.pods.check_netns(&netns)?;
        let (block, gateway) = self.reserve.network().ok_or_else(|| {
            CniError::new(
                Code::TryAgainLater,
                "this node has never registered with weft-server; try again later",
            )
        })?;
        let bound = self.bind(req).await?;
        failpoint("add-after-bind");
        let address = Ipv4Net::new(bound.address, block.prefix_len())
            .map_err(|e| CniError::new(Code::Ipam, e.to_string()))?;
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
                info!(%address, host_if = %wired.host.name, fresh = bound.fresh, "pod wired");
                Ok(result::render(&wired, &req.version))
            }
            Err(e) => {
                // Nothing of the attachment is left: give the address back.
                if bound.fresh
                    && let Err(je) = self.reserve.release(&key(req), !self.online())
                {
                    warn!(error = %je, "cannot journal the rollback; the address stays bound until the next reconcile");
                }
                Err(e.into())
            }
        }
    }

    #[instrument(skip_all, fields(container_id = %req.container_id, ifname = %req.ifname))]
    async fn del(&self, req: &CniRequest) -> Result<(), CniError> {
        // The pod's address, for the conntrack flush, if the book has none.
        let mut address = self.reserve.binding(&key(req)).map(|b| b.address);
        if address.is_none()
            && let Some(netns) = req.netns.as_deref().filter(|p| p.exists())
        {
            match self.pods.inspect(netns, &req.ifname).await {
                Ok(side) => address = side.addresses.first().map(|a| a.addr()),
                Err(e) => {
                    warn!(error = %e, "cannot read the pod side; tearing down the host side only")
                }
            }
        }
        // The pod must be unreachable before its address can go to another;
        // its veth may finish dying after the answer.
        let host = host_ifname(&req.container_id, &req.ifname);
        let unlinked = self.pods.unlink(&host).await;
        if let Err(e) = unlinked {
            // The veth may still carry traffic: keep the address bound.
            return Err(e.into());
        }
        failpoint("del-after-teardown");
        let released = self
            .reserve
            .release_and_hold(&key(req), !self.online(), true)
            .map_err(state_error)?;
        failpoint("del-after-release");
        if let Some(ip) = released.or(address) {
            info!(%ip, "pod unwired and released");
            // A conntrack flush walks the whole table (~10 ms here), so it
            // runs after the answer; the address is held from binds until
            // it is done, and a new pod never inherits the old one's flows.
            let (pods, reserve) = (self.pods.clone(), self.reserve.clone());
            tokio::spawn(async move {
                pods.flush_conntrack(ip).await;
                if let Some(a) = released {
                    reserve.let_go(a);
                }
            });
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
        // The node is the authority on what it bound (the server hears of
        // it from the node).
        match self.reserve.binding(&key(req)) {
            Some(b) if b.address == prev.address.addr() => Ok(()),
            Some(b) => Err(drift(format!(
                "weft-agent bound {} to this attachment, prevResult says {}",
                b.address, prev.address
            ))),
            None => Err(drift(
                "weft-agent holds no address for this attachment (it was deleted)".into(),
            )),
        }
    }

    async fn gc(&self, req: &CniRequest) -> Result<(), CniError> {
        let keep: HashSet<Key> = req
            .valid_attachments
            .iter()
            .map(|a| (a.container_id.clone(), a.ifname.clone()))
            .collect();
        let keep_veths: HashSet<String> = keep.iter().map(|(c, i)| host_ifname(c, i)).collect();
        let mut orphans = 0;
        for name in self.pods.host_veths().await? {
            if !keep_veths.contains(&name) {
                self.pods.delete_link(&name).await?;
                orphans += 1;
            }
        }
        let mut released = 0;
        for k in self.reserve.book().bound.into_keys() {
            if keep.contains(&k) {
                continue;
            }
            // Not while a CNI call for it is in flight.
            let Some(_guard) = self.locks.try_lock(k.clone()) else {
                continue;
            };
            let _ = self.pods.delete_link(&host_ifname(&k.0, &k.1)).await;
            if let Some(ip) = self
                .reserve
                .release_and_hold(&k, !self.online(), true)
                .map_err(state_error)?
            {
                self.pods.flush_conntrack(ip).await;
                self.reserve.let_go(ip);
                released += 1;
            }
        }
        info!(released, orphans, "GC done");
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
            NodePhase::Starting { mtu: None } => {
                return Err(CniError::new(
                    Code::NotAvailable,
                    format!(
                        "weft-agent has not registered node {} with weft-server yet",
                        self.node
                    ),
                ));
            }
            NodePhase::Starting { .. } | NodePhase::Ready { .. } => {}
        }
        if !self.pods.bridge_exists().await? {
            return Err(CniError::new(
                Code::NotAvailable,
                "the bridge weft0 is missing; restart weft-agent",
            ));
        }
        // A reserve at hand serves ADDs whatever the server does.
        let Err(e) = self.reserve.next_free() else {
            return Ok(());
        };
        match self.ipam.heartbeat(&self.node).await {
            Ok(()) => Ok(()),
            Err(s) => Err(CniError::new(
                Code::NotAvailable,
                format!(
                    "{e}, and {}: new pods cannot get addresses",
                    away_text(database_away(&s))
                ),
            )
            .with_details(s.message().to_owned())),
        }
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
        let started = std::time::Instant::now();
        let outcome = self.handle(&req.env, &req.stdin).await;
        debug!(
            elapsed_us = started.elapsed().as_micros() as u64,
            "CNI request handled"
        );
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
