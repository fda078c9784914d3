//! The reserve's background work, one task, one server call at a time:
//! report binds and releases in order (idempotent by their seq), refill
//! the reserve between its water marks, sync PostgreSQL's rows of the node
//! with the book (after registration, after a gap the server saw, and
//! periodically), and release bindings whose host veth is gone
//! (reconcile without runtime GC). At start, [`CniService::check_kernel`]
//! checks the book against the kernel before any CNI call is served.

use std::{
    collections::HashSet,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tonic::{Code as GrpcCode, Status};
use tracing::{debug, error, info, warn};
use weft_proto::v1::{self as pb, binding_event::Kind};

use super::{
    CniService, NodePhase,
    pod::host_ifname,
    seams::{Ipam, Pods},
};
use crate::{
    metrics::AgentMetrics,
    reserve::{
        book::{Event, EventKind, Key},
        now_ms,
    },
};

/// Events per Report.
const REPORT_BATCH: usize = 512;

/// How long a new event waits for others before it is reported. Pods start
/// in runs (a node booting, a rollout): one Report per window carries the
/// run, instead of one round trip and one PostgreSQL commit per pod
/// competing for the CPU with the ADDs still coming. Well inside the
/// 100 ms a binding may take to reach PostgreSQL.
const REPORT_WINDOW: Duration = Duration::from_millis(20);

/// The reserve's knobs (agent flags, docs/agent.md).
#[derive(Debug, Clone)]
pub struct ReserveSettings {
    /// Refill below this many free addresses ...
    pub low: usize,
    /// ... up to this many.
    pub high: usize,
    /// How often PostgreSQL is synced with the book, and bindings checked
    /// against the kernel.
    pub reconcile_every: Duration,
    /// A binding whose veth is missing is released only once it has been
    /// missing this long (an ADD between binding and wiring is not a leak).
    pub grace: Duration,
}

/// Whether a failed call may succeed later unchanged: the server (or its
/// database) is away, not refusing the request.
pub(super) fn transient(status: &Status) -> bool {
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

fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

fn event_pb(e: &Event, offline_upto: u64) -> pb::BindingEvent {
    pb::BindingEvent {
        seq: e.rseq,
        kind: match e.kind {
            EventKind::Bind => Kind::Bind,
            EventKind::Release => Kind::Release,
        } as i32,
        address: e.address.to_string(),
        container_id: e.container_id.clone(),
        ifname: e.ifname.clone(),
        pod_namespace: e.pod.namespace.clone(),
        pod_name: e.pod.name.clone(),
        pod_uid: e.pod.uid.clone(),
        at: Some(timestamp(e.at_ms)),
        offline: e.offline || e.rseq <= offline_upto,
    }
}

/// Why a round stopped early.
enum Stop {
    /// The server is away; retry soon.
    Away,
    /// The node was deleted or registered anew elsewhere: stop for good.
    Fenced,
}

impl<I: Ipam, P: Pods> CniService<I, P> {
    /// Releases bindings whose host veth is gone: the kernel is the ground
    /// truth of what is wired. Run before the socket serves (no call can
    /// be in flight) and from the background with a grace period.
    pub async fn check_kernel(&self) -> anyhow::Result<usize> {
        // Veths a DEL cut off but did not see die (a restart): nothing of
        // them is reachable, and nothing else can be in flight now.
        self.pods.reap_cut_off(None).await?;
        let veths: HashSet<String> = self.pods.host_veths().await?.into_iter().collect();
        let mut released = 0;
        for key in self.reserve.book().bound.into_keys() {
            if !veths.contains(&host_ifname(&key.0, &key.1))
                && let Some(ip) = self.reserve.release(&key, !self.online())?
            {
                info!(container_id = %key.0, ifname = %key.1, %ip, "released a binding whose pod is not wired (a crash mid-ADD or mid-DEL)");
                released += 1;
            }
        }
        Ok(released)
    }

    /// Adopts the pods an agent without this book wired (an upgrade, a
    /// lost state directory): the server's bound rows of the node whose
    /// host veth exists become bindings, so their addresses are never
    /// granted again while the pods run.
    pub async fn adopt(&self) -> anyhow::Result<usize> {
        let epoch = self.reserve.epoch();
        let resp = self
            .ipam
            .reserve(pb::ReserveRequest {
                node_name: self.node.clone(),
                epoch,
                count: 0,
                adopt: true,
            })
            .await?;
        let veths: HashSet<String> = self.pods.host_veths().await?.into_iter().collect();
        let mut adopted = 0;
        for a in resp.bound {
            if !veths.contains(&host_ifname(&a.container_id, &a.ifname)) {
                continue;
            }
            let Some(ip) = a.address.split('/').next().and_then(|ip| ip.parse().ok()) else {
                continue;
            };
            let pod = crate::reserve::book::Pod {
                namespace: a.pod_namespace.clone(),
                name: a.pod_name.clone(),
                uid: a.pod_uid.clone(),
            };
            let at_ms = a
                .bound_at
                .as_ref()
                .map(|t| t.seconds.saturating_mul(1000))
                .unwrap_or_else(now_ms);
            if self
                .reserve
                .adopt(&(a.container_id.clone(), a.ifname.clone()), ip, &pod, at_ms)?
            {
                adopted += 1;
            }
        }
        Ok(adopted)
    }

    /// One reconcile pass: bindings missing from the kernel for longer
    /// than `grace` (seen missing on an earlier pass, no CNI call in
    /// flight) are released.
    async fn reconcile(
        &self,
        missing_before: &mut HashSet<Key>,
        cut_off_before: &mut HashSet<String>,
    ) {
        // A veth cut off on two passes in a row is no DEL's background
        // deletion still running.
        match self.pods.reap_cut_off(Some(cut_off_before)).await {
            Ok(left) => *cut_off_before = left.into_iter().collect(),
            Err(e) => warn!(error = %e, "cannot reap cut-off veths"),
        }
        let veths: HashSet<String> = match self.pods.host_veths().await {
            Ok(v) => v.into_iter().collect(),
            Err(e) => {
                warn!(error = %e, "cannot list host veths; reconcile skipped");
                return;
            }
        };
        let mut missing = HashSet::new();
        for key in self.reserve.book().bound.into_keys() {
            if veths.contains(&host_ifname(&key.0, &key.1)) {
                continue;
            }
            if !missing_before.contains(&key) {
                missing.insert(key);
                continue;
            }
            let Some(_guard) = self.locks.try_lock(key.clone()) else {
                missing.insert(key);
                continue;
            };
            // Checked again under the lock: an ADD may have wired it.
            if self
                .pods
                .host_side(&key.0, &key.1)
                .await
                .ok()
                .flatten()
                .is_some()
            {
                continue;
            }
            match self.reserve.release_and_hold(&key, !self.online(), true) {
                Ok(Some(ip)) => {
                    info!(container_id = %key.0, ifname = %key.1, %ip, "released an address whose pod is gone (no DEL or GC came)");
                    self.pods.flush_conntrack(ip).await;
                    self.reserve.let_go(ip);
                }
                Ok(None) => {}
                Err(e) => error!(error = %e, "cannot journal a reconcile release"),
            }
        }
        *missing_before = missing;
    }

    fn fail(&self, what: &str, status: &Status, phase: &watch::Sender<NodePhase>) -> Stop {
        if matches!(
            status.code(),
            GrpcCode::NotFound | GrpcCode::FailedPrecondition
        ) {
            let fenced = phase.send_if_modified(|p| match *p {
                NodePhase::Ready { mtu } => {
                    *p = NodePhase::Fenced { mtu };
                    true
                }
                _ => false,
            });
            if fenced {
                error!(node = %self.node, what, message = status.message(), "the server no longer knows this node under its epoch; no new pods are wired here; restart the agent to register again");
            }
            return Stop::Fenced;
        }
        // An ADD waiting for a refill re-checks: offline, it answers 11 at
        // once instead of waiting out the refill.
        self.reserve.granted.notify_waiters();
        if transient(status) {
            self.set_away(status);
            // What is pending now waited for the server.
            self.offline_upto
                .fetch_max(self.reserve.book().rseq, Ordering::Relaxed);
            if self.online() {
                warn!(what, code = ?status.code(), message = status.message(), away = self.away(), "binding from the reserve and reporting later");
            }
            self.set_online(false);
        } else {
            warn!(what, code = ?status.code(), message = status.message(), "weft-server refused a reserve call");
        }
        Stop::Away
    }

    fn answered(&self) {
        if !self.online() {
            info!("weft-server answers again; reporting what happened meanwhile");
        }
        self.set_online(true);
        if let Err(e) = self.reserve.contact() {
            warn!(error = %e, "cannot journal the server's contact");
        }
    }

    /// Reports every pending event, in batches.
    async fn report(&self, phase: &watch::Sender<NodePhase>) -> Result<bool, Stop> {
        loop {
            let (epoch, events) = self.reserve.pending(REPORT_BATCH);
            if events.is_empty() {
                return Ok(false);
            }
            let req = pb::ReportRequest {
                node_name: self.node.clone(),
                epoch,
                events: events
                    .iter()
                    .map(|e| event_pb(e, self.offline_upto.load(Ordering::Relaxed)))
                    .collect(),
            };
            let resp = match self.ipam.report(req).await {
                Ok(r) => r,
                Err(s) => return Err(self.fail("report", &s, phase)),
            };
            self.answered();
            if resp.resync {
                warn!(
                    recorded = resp.applied_seq,
                    "weft-server lost events this node reported (a database failover?); syncing the whole book"
                );
                return Ok(true);
            }
            if let Err(e) = self.reserve.ack(resp.applied_seq) {
                warn!(error = %e, "cannot journal a report acknowledgement");
            }
            debug!(acked = resp.applied_seq, "events recorded");
        }
    }

    async fn refill(
        &self,
        s: &ReserveSettings,
        phase: &watch::Sender<NodePhase>,
    ) -> Result<(), Stop> {
        let Some(count) = self.reserve.refill(s.low, s.high) else {
            return Ok(());
        };
        let epoch = self.reserve.epoch();
        let resp = self
            .ipam
            .reserve(pb::ReserveRequest {
                node_name: self.node.clone(),
                epoch,
                count: u32::try_from(count).unwrap_or(u32::MAX),
                adopt: false,
            })
            .await
            .map_err(|st| self.fail("reserve", &st, phase))?;
        self.answered();
        let addresses: Vec<_> = resp
            .addresses
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        match self.reserve.grant(&addresses) {
            Ok(n) => {
                if n > 0 {
                    debug!(granted = n, "reserve refilled");
                } else if addresses.is_empty() {
                    warn!("the node's block has no free address left to reserve");
                }
            }
            Err(e) => {
                error!(error = %e, "cannot journal a grant; the addresses stay reserved unused until the next sync")
            }
        }
        Ok(())
    }

    /// Makes PostgreSQL's rows of the node equal to the book, as of its
    /// last event. Normally only with nothing pending, so every event got
    /// its own audit row first; `after_gap` (the server lost recorded
    /// events, and refuses the pending ones until it has the book) sends it
    /// with events pending and counts them as recorded once it is taken.
    async fn sync(&self, phase: &watch::Sender<NodePhase>, after_gap: bool) -> Result<bool, Stop> {
        let book = self.reserve.book();
        if (!after_gap && !book.pending.is_empty()) || book.epoch == 0 {
            return Ok(false);
        }
        let req = pb::SyncRequest {
            node_name: self.node.clone(),
            epoch: book.epoch,
            seq: book.rseq,
            bound: book
                .bound
                .iter()
                .map(|((cid, ifname), b)| {
                    // A binding is sent as the bind that made it (seq unused).
                    let bind = Event {
                        rseq: 0,
                        kind: EventKind::Bind,
                        container_id: cid.clone(),
                        ifname: ifname.clone(),
                        address: b.address,
                        pod: b.pod.clone(),
                        at_ms: b.at_ms,
                        offline: b.offline,
                    };
                    event_pb(&bind, 0)
                })
                .collect(),
            reserved: book.free.iter().map(ToString::to_string).collect(),
        };
        match self.ipam.sync(req).await {
            Ok(r) => {
                self.answered();
                if let Err(e) = self.reserve.ack(book.rseq) {
                    warn!(error = %e, "cannot journal a sync acknowledgement");
                }
                if r.created + r.changed + r.removed > 0 {
                    warn!(
                        created = r.created,
                        changed = r.changed,
                        removed = r.removed,
                        "PostgreSQL differed from this node's book; repaired"
                    );
                }
                Ok(true)
            }
            // Events reached the server in between: report, sync later.
            Err(st) if st.code() == GrpcCode::Aborted => Ok(false),
            Err(st) => Err(self.fail("sync", &st, phase)),
        }
    }

    fn observe(&self, metrics: &AgentMetrics, offline_since: Option<Instant>) {
        let book = self.reserve.book();
        let n = |x: usize| i64::try_from(x).unwrap_or(i64::MAX);
        metrics.reserve_free.set(n(book.free.len()));
        metrics.reserve_bound.set(n(book.bound.len()));
        metrics.reports_pending.set(n(book.pending.len()));
        metrics.oldest_pending_report_seconds.set(
            book.oldest_pending_ms()
                .map(|at| (now_ms() - at).max(0) / 1000)
                .unwrap_or(0),
        );
        metrics.offline_seconds.set(
            offline_since
                .map(|t| i64::try_from(t.elapsed().as_secs()).unwrap_or(i64::MAX))
                .unwrap_or(0),
        );
    }

    /// The background task, until `stop` or the node is fenced.
    pub async fn run_background(
        self,
        settings: ReserveSettings,
        phase: watch::Sender<NodePhase>,
        metrics: AgentMetrics,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut needs_sync = true;
        let mut gap = false;
        let mut last_sync = Instant::now();
        let mut last_reconcile = Instant::now();
        let mut missing = HashSet::new();
        let mut cut_off = HashSet::new();
        let mut backoff =
            weft_plumbing::Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut offline_since = None;
        loop {
            let ready = matches!(*phase.borrow(), NodePhase::Ready { .. });
            let mut failed = false;
            if ready {
                let round = async {
                    if self.report(&phase).await? {
                        needs_sync = true;
                        gap = true;
                    }
                    self.refill(&settings, &phase).await?;
                    if (needs_sync || last_sync.elapsed() >= settings.reconcile_every)
                        && self.sync(&phase, gap).await?
                    {
                        needs_sync = false;
                        gap = false;
                        last_sync = Instant::now();
                    }
                    Ok::<(), Stop>(())
                };
                match round.await {
                    Ok(()) => {
                        backoff.reset();
                        offline_since = None;
                    }
                    Err(Stop::Fenced) => {
                        self.observe(&metrics, offline_since);
                        return;
                    }
                    Err(Stop::Away) => {
                        failed = true;
                        // Whatever was lost while away is checked as soon
                        // as the server is back.
                        needs_sync = true;
                        offline_since.get_or_insert_with(Instant::now);
                    }
                }
            }
            if last_reconcile.elapsed() >= settings.reconcile_every.min(settings.grace) {
                self.reconcile(&mut missing, &mut cut_off).await;
                last_reconcile = Instant::now();
            }
            self.observe(&metrics, offline_since);
            let wait = if failed {
                backoff.next_delay()
            } else {
                Duration::from_secs(1)
            };
            tokio::select! {
                () = crate::sync::stopped(&mut stop) => return,
                () = self.reserve.changed.notified(), if !failed => {
                    // A reserve that needs topping up now is not held back.
                    if self.reserve.refill(settings.low, settings.high).is_none() {
                        tokio::select! {
                            () = crate::sync::stopped(&mut stop) => return,
                            () = tokio::time::sleep(REPORT_WINDOW) => {}
                        }
                    }
                }
                () = tokio::time::sleep(wait) => {}
                _ = async { let mut p = phase.subscribe(); p.changed().await }, if !ready => {}
            }
        }
    }
}
