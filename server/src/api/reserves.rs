//! `weft.v1.Ipam` Reserve, Report and Sync: per-node reserves
//! (docs/design.md). The node binds addresses of its reserve itself; these
//! calls keep PostgreSQL's record of it exact.

use chrono::{DateTime, Utc};
use tonic::{Request, Response, Status};
use tracing::{info, instrument, warn};
use weft_core::domain::{NodeName, PodRef};
use weft_proto::v1::{self as pb, binding_event::Kind};

use super::{
    Services,
    check::{check, check_attachment, check_ipv4, check_text, status_from},
    convert::allocation_pb,
};
use crate::store::{Binding, MAX_RESERVE, NodeEvent, NodeEventKind, ReportOutcome};

/// Most events one Report or Sync carries.
pub const MAX_EVENTS: usize = 4096;

fn check_len(field: &str, n: usize) -> Result<(), Status> {
    if n > MAX_EVENTS {
        return Err(Status::invalid_argument(format!(
            "invalid {field}: {n} entries, at most {MAX_EVENTS} allowed"
        )));
    }
    Ok(())
}

fn node_time(t: Option<&prost_types::Timestamp>) -> Result<DateTime<Utc>, Status> {
    let t = t.ok_or_else(|| Status::invalid_argument("invalid at: missing"))?;
    u32::try_from(t.nanos)
        .ok()
        .and_then(|nanos| DateTime::from_timestamp(t.seconds, nanos))
        .ok_or_else(|| Status::invalid_argument(format!("invalid at: {t:?}")))
}

fn binding(e: &pb::BindingEvent) -> Result<Binding, Status> {
    let attachment = check_attachment(&e.container_id, &e.ifname)?;
    Ok(Binding {
        container_id: attachment.container_id.to_string(),
        ifname: attachment.ifname.to_string(),
        pod: PodRef {
            namespace: check_text("pod_namespace", &e.pod_namespace)?,
            name: check_text("pod_name", &e.pod_name)?,
            uid: check_text("pod_uid", &e.pod_uid)?,
        },
        at: node_time(e.at.as_ref())?,
        offline: e.offline,
    })
}

fn event(e: &pb::BindingEvent) -> Result<NodeEvent, Status> {
    let kind = match e.kind() {
        Kind::Bind => NodeEventKind::Bind,
        Kind::Release => NodeEventKind::Release,
        Kind::Unspecified => return Err(Status::invalid_argument("invalid kind: unspecified")),
    };
    Ok(NodeEvent {
        seq: e.seq,
        kind,
        address: check_ipv4("address", &e.address)?,
        binding: binding(e)?,
    })
}

// === impl Services ===

impl Services {
    #[instrument(skip_all, fields(node = %request.get_ref().node_name, count = request.get_ref().count))]
    pub(super) async fn reserve_rpc(
        &self,
        request: Request<pb::ReserveRequest>,
    ) -> Result<Response<pb::ReserveResponse>, Status> {
        self.unary("Reserve", request, async |caller, req| {
            let node: NodeName = check("node_name", &req.node_name)?;
            let actor = self.authorize_node(&caller, &node, "Reserve").await?;
            let _permit = self.admit(&node).await?;
            if req.count > MAX_RESERVE {
                return Err(Status::invalid_argument(format!(
                    "invalid count: {}, at most {MAX_RESERVE}",
                    req.count
                )));
            }
            let store = &self.inner.store;
            let granted = store
                .reserve(&node, req.epoch, req.count, &actor)
                .await
                .map_err(status_from)?;
            let bound = if req.adopt {
                store
                    .bound_allocations(&node)
                    .await
                    .map_err(status_from)?
                    .into_iter()
                    .map(allocation_pb)
                    .collect()
            } else {
                Vec::new()
            };
            if !granted.is_empty() {
                info!(granted = granted.len(), "reserved addresses for the node");
            }
            Ok(Response::new(pb::ReserveResponse {
                addresses: granted.iter().map(ToString::to_string).collect(),
                bound,
            }))
        })
        .await
    }

    #[instrument(skip_all, fields(node = %request.get_ref().node_name, events = request.get_ref().events.len()))]
    pub(super) async fn report_rpc(
        &self,
        request: Request<pb::ReportRequest>,
    ) -> Result<Response<pb::ReportResponse>, Status> {
        self.unary("Report", request, async |caller, req| {
            let node: NodeName = check("node_name", &req.node_name)?;
            let actor = self.authorize_node(&caller, &node, "Report").await?;
            let _permit = self.admit(&node).await?;
            check_len("events", req.events.len())?;
            let events = req
                .events
                .iter()
                .map(event)
                .collect::<Result<Vec<_>, _>>()?;
            let outcome = self
                .inner
                .store
                .report(&node, req.epoch, &events, &actor)
                .await
                .map_err(status_from)?;
            let metrics = &self.inner.metrics;
            let binds = events
                .iter()
                .filter(|e| e.kind == NodeEventKind::Bind)
                .count();
            Ok(Response::new(match outcome {
                ReportOutcome::Applied(seq) => {
                    metrics
                        .allocations
                        .get_or_create(&crate::metrics::NodeLabels {
                            node: node.to_string(),
                        })
                        .inc_by(binds as u64);
                    metrics.count_release(node.as_str(), "release", events.len() - binds);
                    pb::ReportResponse {
                        applied_seq: seq,
                        resync: false,
                    }
                }
                ReportOutcome::Gap { recorded } => {
                    warn!(recorded, first = events.first().map(|e| e.seq), "the node's events do not follow the recorded ones (lost commits?); asking for a sync");
                    pb::ReportResponse {
                        applied_seq: recorded,
                        resync: true,
                    }
                }
            }))
        })
        .await
    }

    #[instrument(skip_all, fields(node = %request.get_ref().node_name, seq = request.get_ref().seq))]
    pub(super) async fn sync_rpc(
        &self,
        request: Request<pb::SyncRequest>,
    ) -> Result<Response<pb::SyncResponse>, Status> {
        self.unary("Sync", request, async |caller, req| {
            let node: NodeName = check("node_name", &req.node_name)?;
            let actor = self.authorize_node(&caller, &node, "Sync").await?;
            let _permit = self.admit(&node).await?;
            check_len("bound", req.bound.len())?;
            check_len("reserved", req.reserved.len())?;
            let bound = req
                .bound
                .iter()
                .map(|b| Ok((check_ipv4("bound.address", &b.address)?, binding(b)?)))
                .collect::<Result<Vec<_>, Status>>()?;
            let reserved = req
                .reserved
                .iter()
                .map(|a| check_ipv4("reserved", a))
                .collect::<Result<Vec<_>, _>>()?;
            let counts = self
                .inner
                .store
                .sync(&node, req.epoch, req.seq, &bound, &reserved, &actor)
                .await
                .map_err(status_from)?;
            if counts.stale {
                return Err(Status::aborted(
                    "the database recorded later events than this view; report them and sync again",
                ));
            }
            if counts.created + counts.changed + counts.removed > 0 {
                warn!(
                    created = counts.created,
                    changed = counts.changed,
                    removed = counts.removed,
                    "the database differed from the node; repaired"
                );
            }
            Ok(Response::new(pb::SyncResponse {
                created: counts.created,
                changed: counts.changed,
                removed: counts.removed,
            }))
        })
        .await
    }
}
