//! `weft.v1.Ipam`: Allocate, Release, Gc and Lookup for one node's pods;
//! Reserve, Report and Sync are in [`super::reserves`].

use tonic::{Request, Response, Status};
use tracing::{info, instrument};
use weft_core::domain::{NodeName, PodRef};
use weft_proto::v1::{self as pb, ipam_server::Ipam};

use super::{
    MAX_GC_ATTACHMENTS, Services,
    check::{check, check_attachment, check_text, status_from},
    convert::{address_with_prefix, allocation_pb},
};

// === impl Ipam ===

#[tonic::async_trait]
impl Ipam for Services {
    #[instrument(skip_all, fields(node = %request.get_ref().node_name, container_id = %request.get_ref().container_id, ifname = %request.get_ref().ifname))]
    async fn allocate(
        &self,
        request: Request<pb::AllocateRequest>,
    ) -> Result<Response<pb::AllocateResponse>, Status> {
        self.unary("Allocate", request, async |caller, req| {
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
        })
        .await
    }

    #[instrument(skip_all, fields(node = %request.get_ref().node_name, container_id = %request.get_ref().container_id, ifname = %request.get_ref().ifname))]
    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        self.unary("Release", request, async |caller, req| {
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
        })
        .await
    }

    #[instrument(skip_all, fields(node = %request.get_ref().node_name, valid = request.get_ref().valid.len()))]
    async fn gc(
        &self,
        request: Request<pb::GcRequest>,
    ) -> Result<Response<pb::GcResponse>, Status> {
        self.unary("Gc", request, async |caller, req| {
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
        })
        .await
    }

    async fn lookup(
        &self,
        request: Request<pb::LookupRequest>,
    ) -> Result<Response<pb::Allocation>, Status> {
        self.unary("Lookup", request, async |caller, req| {
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
        })
        .await
    }

    async fn reserve(
        &self,
        request: Request<pb::ReserveRequest>,
    ) -> Result<Response<pb::ReserveResponse>, Status> {
        self.reserve_rpc(request).await
    }

    async fn report(
        &self,
        request: Request<pb::ReportRequest>,
    ) -> Result<Response<pb::ReportResponse>, Status> {
        self.report_rpc(request).await
    }

    async fn sync(
        &self,
        request: Request<pb::SyncRequest>,
    ) -> Result<Response<pb::SyncResponse>, Status> {
        self.sync_rpc(request).await
    }
}
