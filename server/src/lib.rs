//! weft-server: Weft's central IPAM and topology service.
//!
//! Agents call [`api`]'s `Topology` to register their node and receive its
//! pod block, then hold a `WatchPeers` stream fed by [`watch`] to learn every
//! other node's tunnel endpoint. The CNI path calls `Ipam` to allocate and
//! release pod addresses; operators use `Admin`. [`store`] keeps all state
//! in PostgreSQL, where unique constraints guarantee that no address or
//! block is handed out twice and every change is audited in the same
//! transaction; `weft_core::ipam` is the address arithmetic it relies on.
//! [`metrics`] serves Prometheus figures and /healthz.

pub mod api;
pub mod config;
pub mod metrics;
pub mod pki;
mod probe;
pub mod startup;
pub mod store;
pub mod watch;

use std::{net::SocketAddr, time::Duration};

use anyhow::Context as _;
use sqlx::PgPool;
use tokio::{net::TcpListener, sync::watch as signal_watch, task::JoinHandle};
use tonic::transport::{Server as GrpcServer, server::TcpIncoming};
use tonic_health::ServingStatus;
use tracing::{error, info, warn};
use weft_proto::v1::{
    admin_server::AdminServer, ipam_server::IpamServer, topology_server::TopologyServer,
};

use crate::{
    api::Services,
    config::{Command, Config},
    metrics::Metrics,
    store::{MIGRATOR, Store},
    watch::PeerFeed,
};

/// How long in-flight requests may take to finish after SIGTERM.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest any request handler may take.
const RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request the server decodes; Gc with thousands of attachments fits.
const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// Settings of a running server that tests set directly.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub layout: weft_core::ipam::ClusterLayout,
    pub vni: u32,
    pub mtu_hint: u32,
    pub topology_history: u32,
    /// Changes buffered for all watchers; one that falls further behind
    /// is resynced with a snapshot.
    pub feed_capacity: usize,
    /// Mutual TLS; `None` serves plaintext without authentication.
    pub tls: Option<TlsMaterial>,
    /// How long a deleted node's block is held back from other nodes.
    pub block_quarantine: Duration,
    /// After how long without a heartbeat a node is fenced and deleted
    /// (the stale-node policy); `None` is off.
    pub stale_node_after: Option<Duration>,
    /// HTTP/2 PING interval on idle connections, and how long an
    /// unanswered PING may stay so before the connection (and every watch
    /// stream on it) is dropped. A peer that vanished without a FIN is
    /// noticed within the sum.
    pub keepalive: Keepalive,
}

/// Dead-peer detection on the gRPC listener.
#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(20),
            timeout: Duration::from_secs(10),
        }
    }
}

/// PEM contents for mutual TLS.
#[derive(Debug, Clone)]
pub struct TlsMaterial {
    pub cert: String,
    pub key: String,
    /// CA that signs the clients' certificates.
    pub client_ca: String,
}

/// A running server: gRPC plus metrics, stopped by [`RunningServer::shutdown`].
#[derive(Debug)]
pub struct RunningServer {
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    stop: signal_watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningServer {
    /// Binds nothing itself: takes listeners so tests can use port 0.
    pub async fn start(
        settings: ServerSettings,
        pool: PgPool,
        grpc: TcpListener,
        metrics_listener: TcpListener,
    ) -> anyhow::Result<Self> {
        let store = Store::new(pool, settings.layout, settings.topology_history)
            .with_quarantine(settings.block_quarantine);
        store.check_layout().await?;
        let feed = PeerFeed::start(store.clone(), settings.feed_capacity).await?;
        let metrics = Metrics::new();
        let services = Services::new(
            store.clone(),
            feed.clone(),
            metrics.clone(),
            settings.vni,
            settings.mtu_hint,
            settings.tls.is_some(),
        );

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        set_health(&health_reporter, ServingStatus::Serving).await;
        // The descriptor set also holds the agent's API; list only what
        // this server serves.
        let reflection = || {
            [
                "weft.v1.Topology",
                "weft.v1.Ipam",
                "weft.v1.Admin",
                "grpc.health.v1.Health",
            ]
            .into_iter()
            .fold(
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(weft_proto::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
                |b, name| b.with_service_name(name),
            )
        };
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;

        let grpc_addr = grpc.local_addr()?;
        let metrics_addr = metrics_listener.local_addr()?;
        let (stop, stopped) = signal_watch::channel(false);

        // serve_with_incoming ignores Server::tcp_nodelay; without it small
        // RPCs wait ~40 ms on delayed ACKs.
        // TCP keepalive catches a dead peer on connections that carry no
        // HTTP/2 traffic the PINGs below would notice.
        let incoming = TcpIncoming::from(grpc)
            .with_nodelay(Some(true))
            .with_keepalive(Some(settings.keepalive.interval))
            .with_keepalive_interval(Some(settings.keepalive.interval))
            .with_keepalive_retries(Some(3));
        let mut builder = GrpcServer::builder()
            .http2_keepalive_interval(Some(settings.keepalive.interval))
            .http2_keepalive_timeout(Some(settings.keepalive.timeout));
        if let Some(tls) = &settings.tls {
            // Client certificates are optional at the TLS layer so health
            // checks (`weft-server probe`, load balancers) need none; every
            // Weft RPC demands one (api::Services::caller).
            builder = builder.tls_config(
                tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(&tls.cert, &tls.key))
                    .client_ca_root(tonic::transport::Certificate::from_pem(&tls.client_ca))
                    .client_auth_optional(true),
            )?;
        }
        let router = builder
            // Bounds every handler; a watch handler returns its stream at
            // once, so streams are not cut by it.
            .timeout(RPC_TIMEOUT)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(
                TopologyServer::new(services.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                IpamServer::new(services.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(AdminServer::new(services).max_decoding_message_size(MAX_MESSAGE_BYTES));
        let grpc_task = tokio::spawn({
            let stopped = stopped.clone();
            async move {
                if let Err(e) = router
                    .serve_with_incoming_shutdown(incoming, wait_for(stopped))
                    .await
                {
                    error!(error = %e, "gRPC server failed");
                }
            }
        });
        let health_task = tokio::spawn(watch_database(
            store.clone(),
            health_reporter,
            stopped.clone(),
        ));
        let mut tasks = Vec::new();
        if let Some(after) = settings.stale_node_after {
            info!(after_secs = after.as_secs(), "stale-node policy on");
            tasks.push(tokio::spawn(fence_stale_nodes(
                store.clone(),
                feed,
                metrics.clone(),
                after,
                stopped.clone(),
            )));
        }
        let metrics_task = tokio::spawn(async move {
            if let Err(e) =
                metrics::serve_http(metrics_listener, metrics, store, wait_for(stopped)).await
            {
                error!(error = %e, "metrics server failed");
            }
        });
        info!(%grpc_addr, %metrics_addr, "weft-server listening");
        Ok(Self {
            grpc_addr,
            metrics_addr,
            stop,
            tasks: [grpc_task, metrics_task, health_task]
                .into_iter()
                .chain(tasks)
                .collect(),
        })
    }

    /// Stops accepting, lets in-flight calls finish within [`DRAIN_TIMEOUT`].
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            // Watch streams never end on their own; the bound cuts them off.
            match tokio::time::timeout(DRAIN_TIMEOUT, task).await {
                Ok(_) => {}
                Err(_) => warn!("drain timed out; closing remaining streams"),
            }
        }
    }
}

/// Who the stale-node policy's deletions are audited as.
const STALE_NODE_ACTOR: &str = "weft-server (stale-node policy)";

/// The stale-node policy: every so often, each node silent for `after` is
/// fenced and deleted (docs/server.md, "Nodes that never come back"). Every
/// replica runs it; the topology lock orders them, and the silence is
/// checked again under the node's lock, so a node whose heartbeat commits
/// first is kept and none is deleted twice.
async fn fence_stale_nodes(
    store: Store,
    feed: PeerFeed,
    metrics: Metrics,
    after: Duration,
    mut stopped: signal_watch::Receiver<bool>,
) {
    let mut tick =
        tokio::time::interval((after / 10).clamp(Duration::from_secs(1), Duration::from_secs(60)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.changed() => return,
        }
        let candidates = match store.stale_nodes(after).await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "stale-node policy: cannot list nodes");
                continue;
            }
        };
        for (name, silent) in candidates {
            match store.fence_stale_node(&name, after, STALE_NODE_ACTOR).await {
                Ok(Some((revision, released))) => {
                    feed.poke();
                    metrics.count_release(&name, "node_stale", released.len());
                    metrics.stale_nodes.inc();
                    warn!(
                        node = %name,
                        silent_secs = silent as u64,
                        revision,
                        released = released.len(),
                        "node silent past --stale-node-after: fenced and deleted, its block quarantined"
                    );
                }
                Ok(None) => {
                    info!(node = %name, "stale-node policy: the node heartbeated meanwhile; kept")
                }
                Err(e) => {
                    warn!(node = %name, error = %e, "stale-node policy: cannot fence the node")
                }
            }
        }
    }
}

/// Services whose health follows the database.
const SERVICES: [&str; 4] = ["", "weft.v1.Topology", "weft.v1.Ipam", "weft.v1.Admin"];
/// How often the database is checked for the health status.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);

async fn set_health(reporter: &tonic_health::server::HealthReporter, status: ServingStatus) {
    for name in SERVICES {
        reporter.set_service_status(name, status).await;
    }
}

/// A replica that cannot reach PostgreSQL cannot answer anything: report
/// NOT_SERVING so load balancers and probes route around it, and SERVING
/// again once the pool reconnects.
async fn watch_database(
    store: Store,
    reporter: tonic_health::server::HealthReporter,
    mut stopped: signal_watch::Receiver<bool>,
) {
    let mut serving = true;
    let mut tick = tokio::time::interval(HEALTH_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.changed() => return,
        }
        let ok = matches!(
            tokio::time::timeout(HEALTH_INTERVAL, store.ping()).await,
            Ok(Ok(()))
        );
        if ok != serving {
            serving = ok;
            if ok {
                info!("database reachable again; serving");
                set_health(&reporter, ServingStatus::Serving).await;
            } else {
                warn!("database unreachable; reporting NOT_SERVING");
                set_health(&reporter, ServingStatus::NotServing).await;
            }
        }
    }
}

async fn wait_for(mut stopped: signal_watch::Receiver<bool>) {
    let _ = stopped.wait_for(|s| *s).await;
}

/// The binary's whole life: validate, migrate, serve until SIGTERM/SIGINT.
pub async fn run(cli: config::Cli) -> anyhow::Result<()> {
    if let Some(Command::Certs(args)) = &cli.command {
        // Needs neither a database nor TLS flags.
        match (&args.add, &args.out) {
            (Some(config::CertsCommand::Add(add)), _) => {
                pki::add_certificates(&add.out, &add.node, &add.admin, &add.viewer)?;
            }
            (None, Some(out)) => {
                pki::write_cluster(
                    out,
                    &args.server_san,
                    &args.nodes,
                    &args.admins,
                    &args.viewers,
                    args.force,
                )?;
            }
            (None, None) => anyhow::bail!("certs needs --out"),
        }
        return Ok(());
    }
    if let Some(Command::Probe(args)) = &cli.command {
        return probe::probe(args).await;
    }
    let config = Config::from_cli(cli)?;
    weft_plumbing::init_tracing(config.log_format, &config.log).map_err(anyhow::Error::msg)?;
    if config.check_only {
        info!(listen = %config.listen, cluster_cidr = %config.layout.cidr(), "configuration is valid");
        return Ok(());
    }
    match weft_plumbing::raise_fd_limit() {
        Ok(limit) => info!(limit, "open file limit"),
        Err(e) => warn!(error = %e, "cannot raise the open file limit"),
    }
    let tls = match &config.tls {
        Some(files) => {
            let read = |p: &std::path::Path| {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
            };
            Some(TlsMaterial {
                cert: read(&files.cert)?,
                key: read(&files.key)?,
                client_ca: read(&files.client_ca)?,
            })
        }
        None => None,
    };

    // `migrate` serves nothing, so its missing TLS is no warning.
    if tls.is_none() && config.command != Command::Migrate {
        warn!(
            "serving plaintext without authentication (--insecure-plaintext): anyone who reaches the port can allocate, release and delete"
        );
    }
    let pool = startup::connect_with_retry(&config.database_url).await?;
    if config.command == Command::Migrate {
        // sqlx takes an advisory lock, so replicas starting together
        // migrate once.
        MIGRATOR
            .run(&pool)
            .await
            .context("applying database migrations")?;
        info!("database migrations applied");
        return Ok(());
    }
    startup::ensure_migrated(&pool).await?;
    let grpc = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding gRPC listener {}", config.listen))?;
    let metrics_listener = TcpListener::bind(config.metrics_listen)
        .await
        .with_context(|| format!("binding metrics listener {}", config.metrics_listen))?;
    let settings = ServerSettings {
        layout: config.layout,
        vni: config.vni,
        mtu_hint: config.mtu_hint,
        topology_history: config.topology_history,
        feed_capacity: watch::DEFAULT_FEED_CAPACITY,
        tls,
        block_quarantine: config.block_quarantine,
        stale_node_after: config.stale_node_after,
        keepalive: Keepalive::default(),
    };
    let server = RunningServer::start(settings, pool, grpc, metrics_listener).await?;
    weft_plumbing::shutdown_signal()
        .await
        .context("waiting for SIGTERM/SIGINT")?;
    info!("shutting down");
    server.shutdown().await;
    Ok(())
}
