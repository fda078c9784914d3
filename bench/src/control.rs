//! Benchmarks 3, 4 and the server half of 7: IPAM throughput against
//! pgbench on the same PostgreSQL, peer propagation to many watchers, a
//! large snapshot, and the server's memory idle and loaded.
//! (Over 400 lines: the control-plane figures share one set-up each.)

use std::{
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tokio::net::TcpListener;
use tonic::transport::{Channel, Endpoint};
use weft_core::ipam::ClusterLayout;
use weft_proto::v1::{
    self as pb, ipam_client::IpamClient, peer_event::Event, topology_client::TopologyClient,
};
use weft_server::{RunningServer, ServerSettings, store::MIGRATOR};

use crate::{
    cluster::Env,
    harness::{Latency, Proc, wait_until_async},
    report::{Figure, Report, Target},
};

async fn server(url: &str, layout: ClusterLayout) -> anyhow::Result<(RunningServer, sqlx::PgPool)> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect(url)
        .await?;
    MIGRATOR.run(&pool).await?;
    let settings = ServerSettings {
        layout,
        vni: 1,
        mtu_hint: 0,
        topology_history: 10_000,
        feed_capacity: 4096,
        tls: None,
        block_quarantine: weft_server::store::DEFAULT_QUARANTINE,
        stale_node_after: None,
        keepalive: weft_server::Keepalive::default(),
    };
    let s = RunningServer::start(
        settings,
        pool.clone(),
        TcpListener::bind("127.0.0.1:0").await?,
        TcpListener::bind("127.0.0.1:0").await?,
    )
    .await?;
    Ok((s, pool))
}

pub async fn channel(addr: std::net::SocketAddr) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?)
}

pub fn register_req(name: &str, i: u32) -> pb::RegisterNodeRequest {
    pb::RegisterNodeRequest {
        node_name: name.to_owned(),
        // Underlay addresses are unique per node; these are only data (no
        // packet is ever sent to them), from the benchmarking range.
        underlay_ip: std::net::Ipv4Addr::from(
            u32::from(std::net::Ipv4Addr::new(198, 18, 0, 0)) + i,
        )
        .to_string(),
        vtep_mac: format!(
            "02:00:{:02x}:{:02x}:{:02x}:01",
            (i >> 16) & 0xff,
            (i >> 8) & 0xff,
            i & 0xff
        ),
    }
}

/// Registers `count` nodes with `parallel` callers.
async fn register_many(
    ch: &Channel,
    prefix: &str,
    count: u32,
    parallel: u32,
) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..parallel)
        .map(|_| {
            let (mut client, next, prefix) = (
                TopologyClient::new(ch.clone()),
                next.clone(),
                prefix.to_owned(),
            );
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst) as u32;
                    if i >= count {
                        return Ok::<_, anyhow::Error>(());
                    }
                    client
                        // Below 100: the single nodes (base, probe).
                        .register_node(register_req(&format!("{prefix}{i}"), i + 100))
                        .await?;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(())
}

pub async fn ipam(env: &Env, report: &mut Report, secs: u64) -> anyhow::Result<()> {
    let url = env.database("bench_ipam")?;
    // /22 blocks: 100 nodes hold 102,100 addresses, more than a run uses.
    let layout = ClusterLayout::new("10.0.0.0/8".parse()?, 22)?;
    let (s, _pool) = server(&url, layout).await?;
    let channels: Vec<Channel> =
        futures::future::try_join_all((0..4).map(|_| channel(s.grpc_addr))).await?;
    register_many(&channels[0], "n", 100, 8).await?;

    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let tasks: Vec<_> = (0..64u64)
        .map(|t| {
            let (mut client, done) = (
                IpamClient::new(channels[(t % 4) as usize].clone()),
                done.clone(),
            );
            tokio::spawn(async move {
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let req = pb::AllocateRequest {
                        node_name: format!("n{}", (t * 7 + i) % 100),
                        container_id: format!("t{t}-{i}"),
                        ifname: "eth0".into(),
                        pod_namespace: "bench".into(),
                        pod_name: format!("p{t}-{i}"),
                        pod_uid: String::new(),
                    };
                    client.allocate(req).await?;
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
                Ok::<_, anyhow::Error>(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let weft_rate = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    s.shutdown().await;

    // pgbench: one single-row UPDATE per transaction, 64 clients, same server.
    crate::harness::run(Command::new("psql").args([
        &url,
        "-q",
        "-c",
        "CREATE TABLE bench (id int PRIMARY KEY, v bigint NOT NULL DEFAULT 0); INSERT INTO bench (id) SELECT generate_series(1, 100)",
    ]))?;
    let script = env.dir.join("pgbench.sql");
    std::fs::write(
        &script,
        "\\set id random(1, 100)\nUPDATE bench SET v = v + 1 WHERE id = :id;\n",
    )?;
    let pgbench = std::fs::read_dir("/usr/lib/postgresql")?
        .flatten()
        .map(|d| d.path().join("bin/pgbench"))
        .find(|p| p.exists())
        .context("pgbench not found under /usr/lib/postgresql")?;
    let out = crate::harness::run(
        Command::new(pgbench)
            .args(["-n", "-c", "64", "-j", "2", "-T", &secs.to_string(), "-f"])
            .arg(&script)
            .arg(&url),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let tps: f64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("tps = ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .with_context(|| format!("no tps in pgbench output: {text}"))?;
    report.push(Figure {
        name: "IPAM allocations/s, 64 clients over 100 nodes".into(),
        unit: "/s",
        weft: weft_rate,
        anchor: Some(("pgbench 1-row UPDATE tps".into(), tps)),
        target: Some(Target::RatioAtLeast(0.5)),
    });
    Ok(())
}

pub async fn propagation(
    env: &Env,
    report: &mut Report,
    watchers: usize,
    snapshot_peers: u32,
) -> anyhow::Result<()> {
    let url = env.database("bench_watch")?;
    let layout = ClusterLayout::new("10.244.0.0/16".parse()?, 29)?;
    let (s, _pool) = server(&url, layout).await?;
    let ch = channel(s.grpc_addr).await?;
    TopologyClient::new(ch.clone())
        .register_node(register_req("base", 0))
        .await?;

    let conns: Vec<Channel> =
        futures::future::try_join_all((0..8).map(|_| channel(s.grpc_addr))).await?;
    let ready = Arc::new(AtomicU64::new(0));
    let (go_tx, go_rx) = tokio::sync::watch::channel::<Option<Instant>>(None);
    let tasks: Vec<_> = (0..watchers)
        .map(|w| {
            let (mut client, ready, mut go) = (
                TopologyClient::new(conns[w % 8].clone()),
                ready.clone(),
                go_rx.clone(),
            );
            tokio::spawn(async move {
                let mut stream = client
                    .watch_peers(pb::WatchPeersRequest {
                        node_name: format!("watcher{w}"),
                        since_revision: 0,
                        snapshot_page_size: 0,
                    })
                    .await?
                    .into_inner();
                stream.message().await?.context("no snapshot")?;
                ready.fetch_add(1, Ordering::SeqCst);
                while let Some(ev) = stream.message().await? {
                    if matches!(ev.event, Some(Event::Upsert(ref p)) if p.node_name == "probe") {
                        let arrived = Instant::now();
                        let t0 = go.wait_for(Option::is_some).await?.context("no start")?;
                        return Ok::<_, anyhow::Error>(
                            arrived.duration_since(t0).as_secs_f64() * 1e3,
                        );
                    }
                }
                bail!("stream ended")
            })
        })
        .collect();
    wait_until_async("every watcher's snapshot", Duration::from_secs(120), || {
        ready.load(Ordering::SeqCst) >= watchers as u64
    })
    .await?;
    let t0 = Instant::now();
    go_tx.send_replace(Some(t0));
    TopologyClient::new(ch.clone())
        .register_node(register_req("probe", 1))
        .await?;
    let mut samples = Vec::new();
    for t in tasks {
        samples.push(tokio::time::timeout(Duration::from_secs(60), t).await???);
    }
    report.tail_latency(
        &format!("peer propagation to {watchers} watchers"),
        Latency::of(&samples),
        Some(Target::AtMost(100.0)),
    );

    register_many(&ch, "peer", snapshot_peers, 16).await?;
    let t = Instant::now();
    let mut stream = TopologyClient::new(channel(s.grpc_addr).await?)
        .max_decoding_message_size(64 << 20)
        .watch_peers(pb::WatchPeersRequest {
            node_name: "fresh".into(),
            since_revision: 0,
            snapshot_page_size: 0,
        })
        .await?
        .into_inner();
    let snap = stream.message().await?.context("no snapshot")?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let count = match snap.event {
        Some(Event::Snapshot(s)) => s.peers.len(),
        _ => 0,
    };
    report.push(Figure {
        name: format!("deliver a {count}-peer snapshot"),
        unit: "ms",
        weft: ms,
        anchor: None,
        target: None,
    });
    s.shutdown().await;
    Ok(())
}

/// Migrates `url` and fills it as a cluster of `nodes` nodes (/24 blocks of
/// 10.0.0.0/8, as [`spawn_server`] runs it) holding `allocations` pods
/// spread evenly, in two statements.
pub fn seed(env: &Env, url: &str, nodes: u32, allocations: u32) -> anyhow::Result<()> {
    crate::harness::run(
        Command::new(env.bin.join("weft-server"))
            .args(["migrate", "--log", "warn"])
            .env("DATABASE_URL", url),
    )?;
    let per_node = allocations.div_ceil(nodes).max(1);
    crate::harness::run(Command::new("psql").args([
        url,
        "-q",
        "-c",
        &format!(
            "INSERT INTO nodes (name, underlay_ip, vtep_mac, block_index, block)
             SELECT 'n' || i, '198.18.0.0'::inet + i,
                    ('02:00:' || lpad(to_hex(i / 65536 % 256), 2, '0') || ':' || lpad(to_hex(i / 256 % 256), 2, '0')
                       || ':' || lpad(to_hex(i % 256), 2, '0') || ':01')::macaddr,
                    i, set_masklen('10.0.0.0'::inet + i * 256, 24)::cidr
             FROM generate_series(0, {}) i",
            nodes - 1
        ),
        "-c",
        &format!(
            "INSERT INTO allocations (address, node_name, container_id, ifname, pod_namespace, pod_name)
             SELECT host(n.block)::inet + g, n.name, n.name || '-' || g, 'eth0', 'bench', n.name || '-' || g
             FROM nodes n, generate_series(2, {}) g
             LIMIT {allocations}",
            per_node + 1
        ),
    ]))?;
    Ok(())
}

/// A weft-server process on the database [`seed`] filled, on `port` (a
/// free one when `None`, so a restart can take the same again).
pub fn spawn_server(
    env: &Env,
    url: &str,
    port: Option<u16>,
    log: &str,
) -> anyhow::Result<(Proc, std::net::SocketAddr)> {
    let free = || -> anyhow::Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    let port = match port {
        Some(p) => p,
        None => free()?,
    };
    let mport = free()?;
    let proc = Proc::spawn(
        Command::new(env.bin.join("weft-server"))
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--metrics-listen",
                &format!("127.0.0.1:{mport}"),
            ])
            .args([
                "--cluster-cidr",
                "10.0.0.0/8",
                "--node-prefix-len",
                "24",
                "--log",
                "warn",
                "--insecure-plaintext",
            ])
            .env("DATABASE_URL", url),
        &env.dir.join(log),
    )?;
    Ok((proc, format!("127.0.0.1:{port}").parse()?))
}

/// A channel once the server at `addr` accepts connections (15 s at most).
pub async fn connect_when_up(addr: std::net::SocketAddr) -> Option<Channel> {
    for _ in 0..300 {
        if let Ok(c) = channel(addr).await {
            return Some(c);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// The server process's memory with `peers` nodes and `allocations`
/// allocations in its database, idle and while watchers pull the full
/// snapshot and operators list everything.
pub async fn server_footprint(
    env: &Env,
    report: &mut Report,
    peers: u32,
    allocations: u32,
) -> anyhow::Result<()> {
    let url = env.database("bench_footprint")?;
    seed(env, &url, peers, allocations)?;
    let (proc, addr) = spawn_server(env, &url, None, "footprint-server.log")?;
    let ch = connect_when_up(addr)
        .await
        .context("footprint server did not start")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (idle, _) = proc.rss_mib();

    // Load: watchers pulling the full snapshot, admin queries, allocations.
    let mut streams = Vec::new();
    for w in 0..50 {
        let mut s = TopologyClient::new(ch.clone())
            .max_decoding_message_size(64 << 20)
            .watch_peers(pb::WatchPeersRequest {
                node_name: format!("w{w}"),
                since_revision: 0,
                snapshot_page_size: 0,
            })
            .await?
            .into_inner();
        s.message().await?;
        streams.push(s);
    }
    let mut admin = weft_proto::v1::admin_client::AdminClient::new(ch.clone())
        .max_decoding_message_size(256 << 20);
    admin.utilization(pb::UtilizationRequest {}).await?;
    admin.list_nodes(pb::ListNodesRequest {}).await?;
    admin
        .list_allocations(pb::ListAllocationsRequest::default())
        .await?;
    let (loaded, peak) = proc.rss_mib();
    for (name, v, target) in [
        ("weft-server RSS idle".to_owned(), idle, None),
        (
            format!(
                "weft-server RSS loaded ({peers} peers, {allocations} allocations, 50 watchers)"
            ),
            loaded,
            None,
        ),
        (
            "weft-server peak RSS (VmHWM) under that load".to_owned(),
            peak,
            Some(Target::AtMost(64.0)),
        ),
    ] {
        report.push(Figure {
            name,
            unit: "MiB",
            weft: v,
            anchor: None,
            target,
        });
    }
    drop(streams);
    Ok(())
}
