//! Prometheus metrics and the HTTP endpoint that serves them with /healthz.
//! Utilization is read from PostgreSQL at scrape time, so every replica
//! reports the same figures without keeping state of its own.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::net::TcpListener;
use tracing::warn;

use crate::store::Store;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReleaseLabels {
    pub node: String,
    /// release, gc, node_delete or node_stale
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub method: String,
    pub code: String,
}

/// Every metric the server exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    pub allocations: Family<NodeLabels, Counter>,
    pub releases: Family<ReleaseLabels, Counter>,
    pub rpc_duration: Family<RpcLabels, Histogram>,
    pub watchers: Gauge,
    /// Nodes the stale-node policy fenced and deleted.
    pub stale_nodes: Counter,
    quarantined: Gauge,
    used: Family<NodeLabels, Gauge>,
    reserved: Family<NodeLabels, Gauge>,
    capacity: Family<NodeLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

// === impl Metrics ===

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("weft");
        let allocations = Family::<NodeLabels, Counter>::default();
        let releases = Family::<ReleaseLabels, Counter>::default();
        let rpc_duration = Family::<RpcLabels, Histogram>::new_with_constructor(|| {
            // 100 µs .. ~3 s
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.0001, 2.5, 12,
            ))
        });
        let watchers = Gauge::default();
        let stale_nodes = Counter::default();
        let quarantined = Gauge::default();
        registry.register(
            "stale_nodes_fenced",
            "Nodes deleted by the stale-node policy (no heartbeat for --stale-node-after)",
            stale_nodes.clone(),
        );
        registry.register(
            "blocks_quarantined",
            "Blocks of deleted or stale nodes held back from other nodes",
            quarantined.clone(),
        );
        let used = Family::<NodeLabels, Gauge>::default();
        let capacity = Family::<NodeLabels, Gauge>::default();
        let reserved = Family::<NodeLabels, Gauge>::default();
        registry.register("allocations", "Addresses allocated", allocations.clone());
        registry.register("releases", "Addresses released", releases.clone());
        registry.register(
            "rpc_duration_seconds",
            "gRPC handling time by method and status code",
            rpc_duration.clone(),
        );
        registry.register("watchers", "Open WatchPeers streams", watchers.clone());
        registry.register(
            "node_addresses_used",
            "Pod addresses in use per node",
            used.clone(),
        );
        registry.register(
            "node_addresses_reserved",
            "Pod addresses reserved for a node and not bound",
            reserved.clone(),
        );
        registry.register(
            "node_addresses_capacity",
            "Pod addresses a node's block holds",
            capacity.clone(),
        );
        Self {
            registry: Arc::new(Mutex::new(registry)),
            allocations,
            releases,
            rpc_duration,
            watchers,
            stale_nodes,
            quarantined,
            used,
            reserved,
            capacity,
        }
    }

    pub fn observe_rpc(&self, method: &str, code: tonic::Code, elapsed: Duration) {
        self.rpc_duration
            .get_or_create(&RpcLabels {
                method: method.to_owned(),
                code: format!("{code:?}"),
            })
            .observe(elapsed.as_secs_f64());
    }

    pub fn count_release(&self, node: &str, reason: &str, n: usize) {
        self.releases
            .get_or_create(&ReleaseLabels {
                node: node.to_owned(),
                reason: reason.to_owned(),
            })
            .inc_by(n as u64);
    }

    /// Renders the text exposition, refreshing utilization from the store.
    pub async fn render(&self, store: &Store) -> Result<String, String> {
        let rows = store.utilization().await.map_err(|e| e.to_string())?;
        let quarantined = store
            .quarantined_blocks()
            .await
            .map_err(|e| e.to_string())?;
        self.quarantined.set(i64::from(quarantined));
        // Nodes deleted since the last scrape must disappear.
        self.used.clear();
        self.capacity.clear();
        self.reserved.clear();
        for n in rows {
            let labels = NodeLabels { node: n.name };
            self.used.get_or_create(&labels).set(i64::from(n.used));
            self.reserved
                .get_or_create(&labels)
                .set(i64::from(n.reserved));
            self.capacity
                .get_or_create(&labels)
                .set(i64::from(n.block.capacity()));
        }
        let mut out = String::new();
        let registry = self
            .registry
            .lock()
            .map_err(|_| "metrics registry poisoned")?;
        encode(&mut out, &registry).map_err(|e| e.to_string())?;
        Ok(out)
    }
}

#[derive(Clone)]
struct HttpState {
    metrics: Metrics,
    store: Store,
}

/// Serves /metrics and /healthz until `shutdown` resolves.
pub async fn serve_http(
    listener: TcpListener,
    metrics: Metrics,
    store: Store,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz_handler))
        .with_state(HttpState { metrics, store });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics_handler(State(state): State<HttpState>) -> impl IntoResponse {
    match state.metrics.render(&state.store).await {
        Ok(body) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
            body,
        ),
        Err(e) => {
            warn!(error = %e, "rendering metrics");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [("content-type", "text/plain; charset=utf-8")],
                format!("metrics unavailable: {e}\n"),
            )
        }
    }
}

async fn healthz_handler(State(state): State<HttpState>) -> impl IntoResponse {
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("database unreachable: {e}\n"),
        ),
    }
}
