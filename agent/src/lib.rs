//! weft-agent: the node daemon.
//!
//! At start-up the agent finds its underlay ([`netlink`]), registers the
//! node with weft-server (retrying while the server is unreachable), and
//! builds the datapath through the [`datapath::Datapath`] seam: the VXLAN
//! device `weft.vxlan`, the bridge `weft0` with the gateway, forwarding and
//! one masquerade rule. [`sync`] then keeps routes, neighbours and FDB
//! entries on the tunnel equal to the server's peer set, using the pure
//! planning in [`peers`] and [`reconcile`]. Once the node is in sync it
//! writes the CNI conflist ([`cni_conf`]), the runtime's readiness signal.
//! On SIGTERM it stops and leaves the datapath in place, so pods keep
//! working across agent restarts and upgrades.

pub mod cni;
pub mod cni_conf;
pub mod config;
pub mod datapath;
pub mod metrics;
pub mod peers;
pub mod reconcile;
pub mod state;
pub mod sync;

use std::{net::Ipv4Addr, sync::Arc, time::Duration};

use anyhow::{Context as _, bail};
use ipnet::Ipv4Net;
use tokio::sync::watch;
use tonic::{
    Code,
    transport::{Channel, Endpoint},
};
use tracing::{error, info, warn};
use weft_proto::v1::{self as pb, topology_client::TopologyClient};

use weft_core::domain::MacAddr;

use crate::{
    config::{Config, LogFormat},
    datapath::{
        BridgeSpec, Datapath, MasqueradeSpec, Underlay, VXLAN_OVERHEAD, VtepSpec,
        netlink::NetlinkDatapath,
    },
    metrics::AgentMetrics,
    sync::{Backoff, PeerSync},
};

/// Bound on every unary call to the server.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// How often journalled releases are retried while the server is away.
const RELEASE_RETRY: Duration = Duration::from_secs(1);

/// What the server assigned to this node.
#[derive(Debug, Clone)]
pub struct NodeAssignment {
    pub block: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub vni: u32,
    pub cluster_cidr: Ipv4Net,
    pub mtu_hint: u32,
}

pub use weft_core::names::{bridge_mac_for, vtep_mac_for};

fn init_tracing(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)?;
    // Colour only for a person at a terminal, never into log files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    }
    .map_err(|e| anyhow::anyhow!(e))
}

/// One endpoint per server replica: each listed URL, and each address of a
/// name that resolves to several. The channel sends each call to a replica
/// that is up, so one replica dying is a reconnect, not an outage.
async fn server_channel(config: &Config) -> anyhow::Result<Channel> {
    let endpoint = |uri: tonic::transport::Uri| {
        Endpoint::from(uri)
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            // A server that vanishes without closing the connection (node
            // crash, partition) is noticed within seconds.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .tcp_keepalive(Some(Duration::from_secs(10)))
    };
    let tls = match &config.tls {
        Some(files) => {
            let read = |p: &std::path::Path| {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
            };
            {
                let tls = tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(read(&files.ca)?))
                    .identity(tonic::transport::Identity::from_pem(
                        read(&files.cert)?,
                        read(&files.key)?,
                    ));
                Some(match &files.server_name {
                    Some(name) => tls.domain_name(name.clone()),
                    None => tls,
                })
            }
        }
        None => None,
    };
    let endpoint = |uri: tonic::transport::Uri| -> anyhow::Result<Endpoint> {
        let e = endpoint(uri);
        Ok(match &tls {
            Some(tls) => e.tls_config(tls.clone())?,
            None => e,
        })
    };
    let mut endpoints = Vec::new();
    for uri in &config.servers {
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(7400);
        let addrs: Vec<std::net::SocketAddr> = if host.parse::<std::net::IpAddr>().is_ok() {
            Vec::new()
        } else {
            tokio::net::lookup_host((host, port))
                .await
                .map(Iterator::collect)
                .unwrap_or_default()
        };
        if addrs.len() > 1 {
            for addr in addrs {
                let scheme = uri.scheme_str().unwrap_or("http");
                endpoints.push(endpoint(format!("{scheme}://{addr}").parse()?)?);
            }
        } else {
            endpoints.push(endpoint(uri.clone())?);
        }
    }
    match endpoints.len() {
        1 => Ok(endpoints.remove(0).connect_lazy()),
        _ => Ok(Channel::balance_list(endpoints.into_iter())),
    }
}

async fn resolve_server(config: &Config) -> anyhow::Result<Ipv4Addr> {
    let uri = config.servers.first().context("no --server")?;
    let host = uri.host().context("--server has no host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(ip);
    }
    let port = uri.port_u16().unwrap_or(7400);
    tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("resolving {host}"))?
        .find_map(|a| match a.ip() {
            std::net::IpAddr::V4(v4) => Some(v4),
            std::net::IpAddr::V6(_) => None,
        })
        .with_context(|| format!("{host} has no IPv4 address"))
}

async fn find_underlay(config: &Config, dp: &NetlinkDatapath) -> anyhow::Result<Underlay> {
    let mut underlay = match (&config.underlay_interface, config.underlay_ip) {
        (Some(name), ip) => dp.underlay_named(name, ip).await?,
        (None, Some(ip)) => dp.underlay_with_ip(ip).await?,
        (None, None) => {
            let server = resolve_server(config).await?;
            dp.underlay_toward(server)
                .await
                .with_context(|| format!("finding the underlay toward the server at {server}"))?
        }
    };
    if let Some(mtu) = config.underlay_mtu {
        underlay.mtu = mtu;
    }
    Ok(underlay)
}

/// Registers the node, retrying with backoff while the server cannot be
/// reached; a request the server rejects is fatal (it will not change).
async fn register(
    client: &mut TopologyClient<Channel>,
    node: &str,
    underlay: Ipv4Addr,
    mac: MacAddr,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<Option<NodeAssignment>> {
    let mut backoff = Backoff::default();
    loop {
        let mut request = tonic::Request::new(pb::RegisterNodeRequest {
            node_name: node.to_owned(),
            underlay_ip: underlay.to_string(),
            vtep_mac: mac.to_string(),
        });
        request.set_timeout(RPC_TIMEOUT);
        let result = tokio::select! {
            () = crate::sync::stopped(stop) => return Ok(None),
            r = client.register_node(request) => r,
        };
        match result {
            Ok(r) => {
                let r = r.into_inner();
                return Ok(Some(NodeAssignment {
                    block: r
                        .block
                        .parse()
                        .with_context(|| format!("server sent block {:?}", r.block))?,
                    gateway: r
                        .gateway
                        .parse()
                        .with_context(|| format!("server sent gateway {:?}", r.gateway))?,
                    vni: r.vni,
                    cluster_cidr: r.cluster_cidr.parse().with_context(|| {
                        format!("server sent cluster CIDR {:?}", r.cluster_cidr)
                    })?,
                    mtu_hint: r.mtu_hint,
                }));
            }
            Err(s)
                if matches!(
                    s.code(),
                    Code::InvalidArgument
                        | Code::ResourceExhausted
                        | Code::PermissionDenied
                        | Code::AlreadyExists
                ) =>
            {
                bail!(
                    "the server refused to register node {node}: {}",
                    s.message()
                );
            }
            Err(s) => {
                let delay = backoff.next_delay();
                warn!(code = ?s.code(), message = s.message(), retry_in = ?delay, "server unreachable; retrying registration");
                tokio::select! {
                    () = crate::sync::stopped(stop) => return Ok(None),
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Builds the node's datapath for its assignment. Idempotent: on a
/// configured node nothing changes.
pub async fn build_datapath<D: Datapath>(
    dp: &D,
    underlay: &Underlay,
    mac: MacAddr,
    assignment: &NodeAssignment,
) -> anyhow::Result<u32> {
    let mtu = if assignment.mtu_hint > 0 {
        assignment.mtu_hint
    } else {
        underlay.mtu.saturating_sub(VXLAN_OVERHEAD)
    };
    dp.ensure_vtep(&VtepSpec {
        vni: assignment.vni,
        local: underlay.ip,
        underlay_ifindex: underlay.ifindex,
        mtu,
        mac,
        address: weft_core::ipam::vtep_address(assignment.block),
    })
    .await
    .context("setting up the VXLAN device")?;
    dp.ensure_bridge(&BridgeSpec {
        gateway: Ipv4Net::new(assignment.gateway, assignment.block.prefix_len())?,
        mtu,
        mac: bridge_mac_for(mac),
    })
    .await
    .context("setting up the bridge")?;
    dp.ensure_forwarding()
        .await
        .context("enabling forwarding")?;
    dp.ensure_masquerade(&MasqueradeSpec {
        block: assignment.block,
        cluster: assignment.cluster_cidr,
    })
    .await
    .context("installing the masquerade rule")?;
    Ok(mtu)
}

async fn heartbeats(
    mut client: TopologyClient<Channel>,
    node: String,
    every: Duration,
    phase: watch::Sender<cni::NodePhase>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = crate::sync::stopped(&mut stop) => return,
            _ = tick.tick() => {}
        }
        let mut request = tonic::Request::new(pb::HeartbeatRequest {
            node_name: node.clone(),
        });
        request.set_timeout(RPC_TIMEOUT);
        match client.heartbeat(request).await {
            Ok(_) => {}
            // Deleted by an operator: re-registering on our own would undo
            // the deletion, so stop wiring new pods (the block is
            // quarantined for the pods still here) and leave it to them.
            Err(s) if s.code() == Code::NotFound => {
                let fenced = phase.send_if_modified(|p| match *p {
                    cni::NodePhase::Ready { mtu } => {
                        *p = cni::NodePhase::Fenced { mtu };
                        true
                    }
                    _ => false,
                });
                if fenced {
                    error!(%node, "this node was deleted from weft-server; no new pods are wired here; restart the agent to register it again");
                }
            }
            Err(s) => warn!(code = ?s.code(), message = s.message(), "heartbeat failed"),
        }
    }
}

/// Serves the CNI endpoint on the unix socket, root-only (0600).
async fn serve_cni(
    path: &std::path::Path,
    service: cni::CniService,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        // A directory we create is root's alone; an existing one (it may be
        // shared) is left as the operator made it.
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {}", dir.display()))?;
    }
    // A socket left by a previous run would make bind fail.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("removing stale socket {}", path.display()));
        }
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    info!(socket = %path.display(), "serving CNI requests");
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let router = tonic::transport::Server::builder().add_service(
        weft_proto::agent::v1::cni_server::CniServer::new(service)
            .max_decoding_message_size(1 << 20),
    );
    Ok(tokio::spawn(async move {
        let shutdown = async move { crate::sync::stopped(&mut stop).await };
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
        {
            error!(error = %e, "CNI server failed");
        }
    }))
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// The binary's whole life.
pub async fn run(cli: config::Cli) -> anyhow::Result<()> {
    let hostname = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok());
    let config = Config::from_cli(cli, hostname)?;
    init_tracing(config.log_format, &config.log)?;
    if config.check_only {
        info!(node = %config.node_name, servers = ?config.servers, "configuration is valid");
        return Ok(());
    }
    let node = config.node_name.clone();

    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        match shutdown_signal().await {
            Ok(()) => info!("signal received; stopping and leaving the datapath in place"),
            Err(e) => error!(error = %e, "cannot wait for signals"),
        }
        stop_tx.send_replace(true);
    });

    let (ready_tx, ready) = watch::channel(false);
    let metrics = AgentMetrics::new();
    let metrics_task = tokio::spawn({
        let (metrics, ready, mut stop) = (metrics.clone(), ready.clone(), stop.clone());
        let addr = config.metrics_listen;
        async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = metrics::serve(addr, metrics, ready, shutdown).await {
                error!(error = %e, %addr, "metrics listener failed");
            }
        }
    });

    let dp = Arc::new(NetlinkDatapath::connect()?);
    let underlay = find_underlay(&config, &dp).await?;
    let mac = match dp.vtep_mac().await? {
        Some(mac) => mac,
        None => vtep_mac_for(&node),
    };
    info!(%node, underlay_ip = %underlay.ip, underlay_if = %underlay.ifname, underlay_mtu = underlay.mtu, %mac, servers = ?config.servers, "starting");

    let channel = server_channel(&config).await?;
    let mut client = TopologyClient::new(channel.clone());

    // CNI is served before registration: DEL and CHECK of pods already on
    // the node must not wait for a server that may be away.
    let state = state::StateDir::open(&config.state_dir)?;
    let saved = match state.load_node() {
        Ok(saved) => saved.filter(|s| s.node_name == node),
        Err(e) => {
            warn!(error = %e, "ignoring the saved node state");
            None
        }
    };
    let journal = Arc::new(state::ReleaseJournal::open(state)?);
    let pending = journal.pending().len();
    if pending > 0 {
        info!(pending, "releases from an earlier run wait for weft-server");
    }
    let (phase_tx, phase) = watch::channel(cni::NodePhase::Starting {
        mtu: saved.as_ref().map(|s| s.mtu),
    });
    let service = cni::CniService::new(
        node.clone(),
        phase,
        channel.clone(),
        cni::pod::PodNetwork::new(dp.handle()),
        journal.clone(),
    );
    let cni_task = serve_cni(&config.socket, service.clone(), stop.clone()).await?;
    let flusher = tokio::spawn(service.flush_releases(RELEASE_RETRY, stop.clone()));

    let mut stop_reg = stop.clone();
    let Some(assignment) = register(&mut client, &node, underlay.ip, mac, &mut stop_reg).await?
    else {
        return Ok(());
    };
    let mtu = build_datapath(dp.as_ref(), &underlay, mac, &assignment).await?;
    info!(block = %assignment.block, gateway = %assignment.gateway, vni = assignment.vni, mtu, "node registered and datapath ready");
    if let Err(e) = journal.dir().save_node(&state::SavedNode {
        node_name: node.clone(),
        block: assignment.block.to_string(),
        mtu,
    }) {
        warn!(error = %e, "cannot save the node state; CHECK during a later outage skips the MTU");
    }
    phase_tx.send_replace(cni::NodePhase::Ready { mtu });

    let heartbeat = tokio::spawn(heartbeats(
        client.clone(),
        node.clone(),
        Duration::from_secs(config.heartbeat_seconds),
        phase_tx,
        stop.clone(),
    ));
    let (synced_tx, mut synced) = watch::channel(false);
    let sync = tokio::spawn(
        PeerSync {
            datapath: dp.clone(),
            client,
            node: node.clone(),
            own_block: assignment.block,
            metrics: metrics.clone(),
        }
        .run(synced_tx, stop.clone()),
    );

    let mut stop_wait = stop.clone();
    tokio::select! {
        () = crate::sync::stopped(&mut stop_wait) => {}
        r = async { synced.wait_for(|s| *s).await.map(|_| ()) } => if r.is_ok() {
            let path = cni_conf::write(&config.cni_conf_dir, &config.socket)
                .with_context(|| format!("writing the CNI config into {}", config.cni_conf_dir.display()))?;
            ready_tx.send_replace(true);
            info!(path = %path.display(), "node ready; CNI config written");
        },
    }

    let mut stop_wait = stop.clone();
    let _ = stop_wait.wait_for(|s| *s).await;
    for task in [sync, heartbeat, metrics_task, cni_task, flusher] {
        if tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .is_err()
        {
            warn!("a task did not stop in time");
        }
    }
    info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::fake::RecordingDatapath;

    fn assignment(mtu_hint: u32) -> NodeAssignment {
        NodeAssignment {
            block: "10.244.3.0/24".parse().unwrap(),
            gateway: "10.244.3.1".parse().unwrap(),
            vni: 1,
            cluster_cidr: "10.244.0.0/16".parse().unwrap(),
            mtu_hint,
        }
    }

    fn underlay() -> Underlay {
        Underlay {
            ip: "198.51.100.3".parse().unwrap(),
            ifindex: 2,
            ifname: "eth0".into(),
            mtu: 1500,
        }
    }

    #[tokio::test]
    async fn the_datapath_is_built_vtep_first_with_the_overhead_subtracted() {
        let dp = RecordingDatapath::default();
        let mac = vtep_mac_for("n");
        let mtu = build_datapath(&dp, &underlay(), mac, &assignment(0))
            .await
            .unwrap();
        assert_eq!(mtu, 1450);
        assert_eq!(
            dp.calls(),
            [
                format!("ensure_vtep vni=1 local=198.51.100.3 mtu=1450 mac={mac}"),
                format!(
                    "ensure_bridge 10.244.3.1/24 mtu=1450 mac={}",
                    bridge_mac_for(mac)
                ),
                "ensure_forwarding".to_string(),
                "ensure_masquerade 10.244.3.0/24 !10.244.0.0/16".to_string(),
            ]
        );
    }

    #[tokio::test]
    async fn a_server_mtu_hint_wins() {
        let dp = RecordingDatapath::default();
        assert_eq!(
            build_datapath(&dp, &underlay(), vtep_mac_for("n"), &assignment(1400))
                .await
                .unwrap(),
            1400
        );
    }
}
