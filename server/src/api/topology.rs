//! `weft.v1.Topology`: registration, the peer stream, heartbeats.

use std::pin::Pin;

use futures::Stream;
use futures::StreamExt as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{info, instrument, warn};
use weft_core::domain::{MacAddr, NodeName, UnderlayIp};
use weft_proto::v1::{self as pb, topology_server::Topology};

use super::{
    MAX_STREAMS_PER_NODE, Services, StreamSlot,
    check::{check, status_from},
    convert::watch_events,
};
use crate::{store::StoreError, watch::STREAM_BUFFER};

// === impl Topology ===

type PeerStream = Pin<Box<dyn Stream<Item = Result<pb::PeerEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Topology for Services {
    #[instrument(skip_all, fields(node = %request.get_ref().node_name))]
    async fn register_node(
        &self,
        request: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeResponse>, Status> {
        self.unary("RegisterNode", request, async |caller, req| {
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
                epoch: reg.epoch,
                reserve_lease_seconds: u32::try_from(store.reserve_lease().as_secs())
                    .unwrap_or(u32::MAX),
            }))
        })
        .await
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
        let page = usize::try_from(req.snapshot_page_size).unwrap_or(usize::MAX);
        let stream = ReceiverStream::new(rx).flat_map(move |m| {
            let events: Box<dyn Iterator<Item = Result<pb::PeerEvent, Status>> + Send> = match m {
                Ok(m) => Box::new(watch_events(m, page).map(Ok)),
                Err(e) => Box::new(std::iter::once(Err(status_from(e)))),
            };
            futures::stream::iter(events)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.unary("Heartbeat", request, async |caller, req| {
            let node: NodeName = check("node_name", &req.node_name)?;
            self.authorize_node(&caller, &node, "Heartbeat").await?;
            let _permit = self.admit(&node).await?;
            self.inner
                .store
                .heartbeat(&node)
                .await
                .map_err(status_from)?;
            Ok(Response::new(pb::HeartbeatResponse {}))
        })
        .await
    }
}
