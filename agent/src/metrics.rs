//! The agent's Prometheus metrics and /healthz (200 once the node is ready:
//! registered, datapath built, peers in sync).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{net::TcpListener, sync::watch};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Debug, Clone)]
pub struct AgentMetrics {
    registry: Arc<Mutex<Registry>>,
    pub peers: Gauge,
    pub reconciles: Family<ResultLabels, Counter>,
    pub entry_changes: Counter,
    /// Per-node reserves (docs/design.md).
    pub reserve_free: Gauge,
    pub reserve_bound: Gauge,
    pub reports_pending: Gauge,
    pub oldest_pending_report_seconds: Gauge,
    pub offline_seconds: Gauge,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("weft_agent");
        let peers = Gauge::default();
        let reconciles = Family::<ResultLabels, Counter>::default();
        let entry_changes = Counter::default();
        registry.register("peers", "Peers this node has tunnels to", peers.clone());
        registry.register(
            "reconciles",
            "Reconcile passes by result",
            reconciles.clone(),
        );
        registry.register(
            "entry_changes",
            "Routes, neighbours and FDB entries added or removed",
            entry_changes.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let reserve_free = gauge(
            &mut registry,
            "reserve_free",
            "Addresses reserved for this node and not bound",
        );
        let reserve_bound = gauge(
            &mut registry,
            "reserve_bound",
            "Addresses bound to attachments on this node",
        );
        let reports_pending = gauge(
            &mut registry,
            "reports_pending",
            "Binds and releases weft-server has not recorded yet",
        );
        let oldest_pending_report_seconds = gauge(
            &mut registry,
            "oldest_pending_report_seconds",
            "Age of the oldest bind or release not recorded yet (0 if none)",
        );
        let offline_seconds = gauge(
            &mut registry,
            "offline_seconds",
            "Seconds since weft-server last answered, while it does not (0 when online)",
        );
        Self {
            registry: Arc::new(Mutex::new(registry)),
            peers,
            reconciles,
            entry_changes,
            reserve_free,
            reserve_bound,
            reports_pending,
            oldest_pending_report_seconds,
            offline_seconds,
        }
    }

    pub fn count_reconcile(&self, result: &str, changes: usize) {
        self.reconciles
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc();
        self.entry_changes.inc_by(changes as u64);
    }

    fn render(&self) -> Result<String, String> {
        let mut out = String::new();
        let registry = self
            .registry
            .lock()
            .map_err(|_| "metrics registry poisoned".to_string())?;
        encode(&mut out, &registry).map_err(|e| e.to_string())?;
        Ok(out)
    }
}

#[derive(Clone)]
struct HttpState {
    metrics: AgentMetrics,
    ready: watch::Receiver<bool>,
}

pub async fn serve(
    addr: SocketAddr,
    metrics: AgentMetrics,
    ready: watch::Receiver<bool>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(s): State<HttpState>| async move {
                match s.metrics.render() {
                    Ok(body) => (StatusCode::OK, body),
                    Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e),
                }
            }),
        )
        .route(
            "/healthz",
            get(|State(s): State<HttpState>| async move {
                if *s.ready.borrow() {
                    (StatusCode::OK, "ok\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }),
        )
        .with_state(HttpState { metrics, ready });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
