//! `weft.v1.Admin`: nodes, allocations, history, utilization, deletion.

use tonic::{Request, Response, Status};
use tracing::{info, instrument};
use weft_core::domain::NodeName;
use weft_proto::v1::{self as pb, admin_server::Admin};

use super::{
    Services,
    check::{check, check_address, check_ipv4, check_optional, check_text, page_size, status_from},
    convert::{allocation_pb, audit_pb, node_pb},
};
use crate::store::{AllocationFilter, HistoryKey};

// === impl Admin ===

#[tonic::async_trait]
impl Admin for Services {
    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.unary("ListNodes", request, async |caller, _req| {
            self.authorize_admin(&caller, false, "ListNodes").await?;
            let nodes = self.inner.store.list_nodes().await.map_err(status_from)?;
            Ok(Response::new(pb::ListNodesResponse {
                nodes: nodes.into_iter().map(node_pb).collect(),
            }))
        })
        .await
    }

    async fn get_node(
        &self,
        request: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        self.unary("GetNode", request, async |caller, req| {
            self.authorize_admin(&caller, false, "GetNode").await?;
            let name: NodeName = check("name", &req.name)?;
            let node = self
                .inner
                .store
                .get_node(&name)
                .await
                .map_err(status_from)?;
            Ok(Response::new(node_pb(node)))
        })
        .await
    }

    #[instrument(skip_all, fields(node = %request.get_ref().name))]
    async fn delete_node(
        &self,
        request: Request<pb::DeleteNodeRequest>,
    ) -> Result<Response<pb::DeleteNodeResponse>, Status> {
        self.unary("DeleteNode", request, async |caller, req| {
            let actor = self.authorize_admin(&caller, true, "DeleteNode").await?;
            let name: NodeName = check("name", &req.name)?;
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
        })
        .await
    }

    async fn list_allocations(
        &self,
        request: Request<pb::ListAllocationsRequest>,
    ) -> Result<Response<pb::ListAllocationsResponse>, Status> {
        self.unary("ListAllocations", request, async |caller, req| {
            self.authorize_admin(&caller, false, "ListAllocations")
                .await?;
            let node = check_optional::<NodeName>("node_name", &req.node_name)?;
            // An unknown node is NOT_FOUND here as in GetNode, not an
            // empty list.
            if let Some(node) = &node {
                self.inner.store.get_node(node).await.map_err(status_from)?;
            }
            let filter = AllocationFilter {
                node_name: node.map(|n| n.to_string()),
                pod_namespace: Some(check_text("pod_namespace", &req.pod_namespace)?)
                    .filter(|s| !s.is_empty()),
                pod_name: Some(check_text("pod_name", &req.pod_name)?).filter(|s| !s.is_empty()),
                address: if req.address.is_empty() {
                    None
                } else {
                    Some(check_address("address", &req.address)?)
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
        })
        .await
    }

    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        self.unary("History", request, async |caller, req| {
            self.authorize_admin(&caller, false, "History").await?;
            let pod = !req.pod_namespace.is_empty() || !req.pod_name.is_empty();
            let keys = [
                !req.address.is_empty(),
                !req.container_id.is_empty(),
                pod,
                !req.node_name.is_empty(),
            ];
            if keys.iter().filter(|k| **k).count() != 1 {
                return Err(Status::invalid_argument(
                    "invalid key: set exactly one of address, container_id, pod_namespace + pod_name, node_name",
                ));
            }
            let key = if !req.address.is_empty() {
                HistoryKey::Address(check_address("address", &req.address)?)
            } else if !req.container_id.is_empty() {
                HistoryKey::Container(check("container_id", &req.container_id)?)
            } else if pod {
                if req.pod_namespace.is_empty() || req.pod_name.is_empty() {
                    return Err(Status::invalid_argument(
                        "invalid pod: set pod_namespace and pod_name together",
                    ));
                }
                HistoryKey::Pod {
                    namespace: check_text("pod_namespace", &req.pod_namespace)?,
                    name: check_text("pod_name", &req.pod_name)?,
                }
            } else {
                HistoryKey::Node(check::<NodeName>("node_name", &req.node_name)?.to_string())
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
        })
        .await
    }

    async fn utilization(
        &self,
        request: Request<pb::UtilizationRequest>,
    ) -> Result<Response<pb::UtilizationResponse>, Status> {
        self.unary("Utilization", request, async |caller, _req| {
            self.authorize_admin(&caller, false, "Utilization").await?;
            let store = &self.inner.store;
            let rows = store.utilization().await.map_err(status_from)?;
            let layout = store.layout();
            let per_block = layout.block(0).map(|b| b.capacity()).unwrap_or(0);
            let nodes: Vec<pb::NodeUtilization> = rows
                .into_iter()
                .map(|n| pb::NodeUtilization {
                    node_name: n.name,
                    block: n.block.to_string(),
                    used: n.used,
                    capacity: n.block.capacity(),
                    reserved: n.reserved,
                    silent_seconds: n.silent_seconds,
                })
                .collect();
            let blocks_quarantined = store.quarantined_blocks().await.map_err(status_from)?;
            let blocks_used = u32::try_from(nodes.len()).unwrap_or(u32::MAX);
            Ok(Response::new(pb::UtilizationResponse {
                used: nodes.iter().map(|n| u64::from(n.used)).sum(),
                reserved: nodes.iter().map(|n| u64::from(n.reserved)).sum(),
                // The cluster's capacity counts every block, assigned or not.
                capacity: u64::from(layout.block_count()) * u64::from(per_block),
                blocks_used,
                blocks_capacity: layout.block_count(),
                blocks_quarantined,
                nodes,
            }))
        })
        .await
    }

    async fn whois(
        &self,
        request: Request<pb::WhoisRequest>,
    ) -> Result<Response<pb::Allocation>, Status> {
        self.unary("Whois", request, async |caller, req| {
            self.authorize_admin(&caller, false, "Whois").await?;
            let address = check_address("address", &req.address)?;
            let store = &self.inner.store;
            if let Some(a) = store.whois(address).await.map_err(status_from)? {
                return Ok(Response::new(allocation_pb(a)));
            }
            let last = store.last_entry(address).await.map_err(status_from)?;
            Err(Status::not_found(match last {
                Some(e) => format!(
                    "{address} is free; its last entry: {} by {} at {} (node {}{})",
                    e.action,
                    e.actor,
                    e.at.to_rfc3339(),
                    e.node_name,
                    e.container_id
                        .map(|c| format!(", container {c}"))
                        .unwrap_or_default()
                ),
                None => format!("{address} was never allocated"),
            }))
        })
        .await
    }

    #[instrument(skip_all, fields(address = %request.get_ref().address))]
    async fn release(
        &self,
        request: Request<pb::AdminReleaseRequest>,
    ) -> Result<Response<pb::Allocation>, Status> {
        self.unary("Release", request, async |caller, req| {
            let actor = self.authorize_admin(&caller, true, "Release").await?;
            let address = check_address("address", &req.address)?;
            let released = self
                .inner
                .store
                .admin_release(address, ADMIN_RELEASE_ALIVE, &actor)
                .await
                .map_err(status_from)?;
            self.inner
                .metrics
                .count_release(&released.node_name, "admin", 1);
            info!(%address, node = %released.node_name, %actor, "address released by an operator");
            Ok(Response::new(allocation_pb(released)))
        })
        .await
    }
}

/// A node that heartbeated within this is alive: its agent is the
/// authority on what it wires (the default heartbeat is 10 s).
pub const ADMIN_RELEASE_ALIVE: std::time::Duration = std::time::Duration::from_secs(60);
