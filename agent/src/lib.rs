//! weft-agent: the node daemon.
//!
//! At start-up the agent opens its state ([`state`]) and serves CNI
//! ([`socket`], [`cni`]) at once, then finds its underlay, registers the
//! node with weft-server (retrying while the server is unreachable), and
//! builds the datapath through the [`datapath::Datapath`] seam: the VXLAN
//! device `weft.vxlan`, the bridge `weft0` with the gateway, forwarding and
//! one masquerade rule. [`sync`] then keeps routes, neighbours and FDB
//! entries on the tunnel equal to the server's peer set, using the pure
//! planning in [`peers`] and [`reconcile`]. Once the node is in sync it
//! writes the CNI conflist ([`cni_conf`], weft followed by the reference
//! portmap and bandwidth plugins), the runtime's readiness signal.
//! On SIGTERM it stops and leaves the datapath in place, so pods keep
//! working across agent restarts and upgrades.

//!
//! Modules: [`bootstrap`] (underlay, registration, datapath, heartbeats),
//! [`client`] (the server channel), [`socket`] (the CNI endpoint), [`cni`]
//! (the CNI service), [`datapath`] (the kernel seam and its netlink
//! implementation), [`peers`]/[`reconcile`]/[`sync`] (the peer set and
//! keeping the kernel equal to it), [`state`] (the state directory).

pub mod bootstrap;
pub mod client;
pub mod cni;
pub mod cni_conf;
pub mod config;
pub mod datapath;
pub mod metrics;
pub mod peers;
pub mod reconcile;
pub mod reserve;
pub mod socket;
pub mod state;
pub mod sync;

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::sync::watch;
use tracing::{error, info, warn};
use weft_proto::v1::topology_client::TopologyClient;

use crate::{
    config::Config,
    datapath::{Datapath, netlink::NetlinkDatapath},
    metrics::AgentMetrics,
    sync::PeerSync,
};

pub use bootstrap::{NodeAssignment, build_datapath};
pub use weft_core::names::{bridge_mac_for, vtep_mac_for};

/// The binary's whole life.
pub async fn run(cli: config::Cli) -> anyhow::Result<()> {
    let hostname = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok());
    let config = Config::from_cli(cli, hostname)?;
    weft_plumbing::init_tracing(config.log_format, &config.log).map_err(anyhow::Error::msg)?;
    if config.check_only {
        info!(node = %config.node_name, servers = ?config.servers, "configuration is valid");
        return Ok(());
    }
    let node = config.node_name.clone();

    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        match weft_plumbing::shutdown_signal().await {
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
    let underlay = bootstrap::find_underlay(&config, &dp).await?;
    let mac = match dp.vtep_mac().await? {
        Some(mac) => mac,
        None => vtep_mac_for(&node),
    };
    info!(%node, underlay_ip = %underlay.ip, underlay_if = %underlay.ifname, underlay_mtu = underlay.mtu, %mac, servers = ?config.servers, "starting");

    let channel = client::server_channel(&config).await?;
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
    // After a reboot (no bridge) with the server away, the last
    // assignment builds the datapath again so pods can start from the
    // reserve; on a plain restart the datapath is there and untouched.
    if let Some(assignment) = saved.as_ref().and_then(bootstrap::saved_assignment) {
        let pods = cni::pod::PodNetwork::new(dp.handle());
        if !pods.bridge_exists().await.unwrap_or(true) {
            match build_datapath(dp.as_ref(), &underlay, mac, &assignment).await {
                Ok(mtu) => {
                    info!(block = %assignment.block, mtu, "datapath built from the saved assignment (the node rebooted)")
                }
                Err(e) => warn!(
                    error = format!("{e:#}"),
                    "cannot build the datapath from the saved assignment"
                ),
            }
        }
    }
    let reserve = Arc::new(reserve::Reserve::open(state.path())?);
    {
        let book = reserve.book();
        info!(
            epoch = book.epoch,
            free = book.free.len(),
            bound = book.bound.len(),
            pending = book.pending.len(),
            "address book loaded from the state directory"
        );
    }
    let (phase_tx, phase) = watch::channel(cni::NodePhase::Starting {
        mtu: saved.as_ref().map(|s| s.mtu),
    });
    let service = cni::CniService::new(
        node.clone(),
        phase,
        cni::seams::GrpcIpam::new(channel.clone()),
        cni::pod::PodNetwork::new(dp.handle()),
        reserve.clone(),
    );
    // The kernel is the ground truth of what is wired: a binding whose
    // veth is gone (a crash between journalling and wiring, or mid-DEL) is
    // released before any CNI call is served.
    match service.check_kernel().await {
        Ok(0) => {}
        Ok(n) => info!(released = n, "bindings without a wired pod released"),
        Err(e) => warn!(error = %e, "cannot check the address book against the kernel"),
    }
    let cni_task = socket::serve_cni(&config.socket, service.clone(), stop.clone()).await?;

    let mut stop_reg = stop.clone();
    let Some(assignment) =
        bootstrap::register(&mut client, &node, underlay.ip, mac, &mut stop_reg).await?
    else {
        return Ok(());
    };
    let mtu = build_datapath(dp.as_ref(), &underlay, mac, &assignment).await?;
    info!(block = %assignment.block, gateway = %assignment.gateway, vni = assignment.vni, mtu, "node registered and datapath ready");
    let lease = config.reserve_lease.min(Duration::from_secs(u64::from(
        assignment.reserve_lease_seconds,
    )));
    let fresh_book = reserve.epoch() == 0;
    let new_epoch = reserve.registered(
        assignment.epoch,
        assignment.block,
        assignment.gateway,
        i64::try_from(lease.as_millis()).unwrap_or(i64::MAX),
    )?;
    if new_epoch {
        info!(
            epoch = assignment.epoch,
            "registered under a new epoch: the old reserve is void"
        );
    }
    if fresh_book {
        // Pods an older agent (or a lost state directory) left wired keep
        // their addresses.
        match service.adopt().await {
            Ok(0) => {}
            Ok(n) => info!(
                adopted = n,
                "adopted pods wired before this state directory existed"
            ),
            Err(e) => {
                warn!(error = %e, "cannot adopt the node's existing pods; the first sync may release their rows")
            }
        }
    }
    if let Err(e) = state.save_node(&state::SavedNode {
        node_name: node.clone(),
        block: assignment.block.to_string(),
        mtu,
        gateway: Some(assignment.gateway.to_string()),
        vni: Some(assignment.vni),
        cluster_cidr: Some(assignment.cluster_cidr.to_string()),
    }) {
        warn!(error = %e, "cannot save the node state; CHECK during a later outage skips the MTU");
    }
    phase_tx.send_replace(cni::NodePhase::Ready { mtu });

    let mut fenced = phase_tx.subscribe();
    let background = tokio::spawn(service.clone().run_background(
        cni::background::ReserveSettings {
            low: config.reserve_low,
            high: config.reserve_high,
            reconcile_every: config.reconcile,
            grace: config.reconcile,
        },
        phase_tx.clone(),
        metrics.clone(),
        stop.clone(),
    ));
    let heartbeat = tokio::spawn(bootstrap::heartbeats(
        client.clone(),
        node.clone(),
        Duration::from_secs(config.heartbeat_seconds),
        phase_tx,
        reserve.clone(),
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
            let chain = chained_plugins(&config).await;
            let path = cni_conf::write(&config.cni_conf_dir, &cni_conf::render(&config.socket, &chain))
                .with_context(|| format!("writing the CNI config into {}", config.cni_conf_dir.display()))?;
            ready_tx.send_replace(true);
            info!(path = %path.display(), "node ready; CNI config written");
        },
    }

    let mut stop_wait = stop.clone();
    tokio::select! {
        () = crate::sync::stopped(&mut stop_wait) => {}
        r = fenced.wait_for(|p| matches!(p, cni::NodePhase::Fenced { .. })) => if r.is_ok() {
            // A deleted node takes no new pods: /healthz says so too.
            ready_tx.send_replace(false);
            crate::sync::stopped(&mut stop_wait).await;
        },
    }
    for task in [sync, heartbeat, metrics_task, cni_task, background] {
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

/// The chained plugins of `--chain` found in `--cni-bin-dir`. One that is
/// missing, broken or speaks none of weft's versions is left out of the
/// list (pods still start, without what it adds), loudly: a list naming a
/// plugin the runtime cannot run fails every ADD on the node.
async fn chained_plugins(config: &Config) -> Vec<cni_conf::Found> {
    let mut chain = Vec::new();
    for &plugin in &config.chain {
        match cni_conf::probe(&config.cni_bin_dir, plugin).await {
            Ok(found) if !cni_conf::common_versions(std::slice::from_ref(&found)).is_empty() => {
                info!(plugin = plugin.binary(), versions = ?found.versions, "chaining CNI plugin");
                chain.push(found);
            }
            Ok(found) => error!(
                plugin = plugin.binary(),
                versions = ?found.versions,
                "chained CNI plugin speaks none of weft's spec versions; left out of the conflist"
            ),
            Err(e) => error!(
                plugin = plugin.binary(),
                error = %e,
                "chained CNI plugin not usable; left out of the conflist (install the reference plugins in --cni-bin-dir, docs/install.md)"
            ),
        }
    }
    // Each speaks a version of weft's; together they must share one too.
    while cni_conf::common_versions(&chain).is_empty() {
        let Some(dropped) = chain.pop() else { break };
        error!(
            plugin = dropped.plugin.binary(),
            "chained CNI plugins share no spec version with each other; left out of the conflist"
        );
    }
    chain
}
