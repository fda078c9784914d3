//! Benchmark 8: a 5,000-node cluster on one machine. Two weft-server
//! replica processes share one PostgreSQL holding 5,000 nodes and 150,000
//! allocations; 5,000 in-process watchers, each on its own TCP connection
//! as an agent would be, hold WatchPeers streams spread over both. Measures
//! a node join reaching every watcher, each replica's memory, and a
//! replica's restart: serving again, and its watchers resumed from their
//! revision rather than re-sent a snapshot.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::sync::{Semaphore, mpsc};
use weft_proto::v1::{self as pb, peer_event::Event, topology_client::TopologyClient};

use crate::{
    cluster::Env,
    control::{channel, connect_when_up, register_req, seed, spawn_server},
    harness::{Latency, wait_until_async},
    report::{Figure, Report, Target},
};

/// What every watcher task reports into.
struct Shared {
    epoch: Instant,
    /// Streams opened and answered (first connections and resumes).
    opened: AtomicU64,
    /// Snapshots received, first ones included.
    snapshots: AtomicU64,
    /// Nanoseconds after `epoch` of the newest stream opened.
    last_open_ns: AtomicU64,
    /// (probe node name, when it arrived) for every upsert of a probe.
    arrivals: mpsc::UnboundedSender<(String, Instant)>,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// One agent's WatchPeers loop: a fresh connection per attempt, resuming
/// from the last revision seen, as the agent's own sync does.
async fn watcher(name: String, addr: SocketAddr, shared: Arc<Shared>, first: Arc<Semaphore>) {
    let mut since = 0;
    let mut permit = first.acquire_owned().await.ok();
    loop {
        let stream = async {
            let ch = channel(addr).await?;
            let s = TopologyClient::new(ch)
                .max_decoding_message_size(64 << 20)
                .watch_peers(pb::WatchPeersRequest {
                    node_name: name.clone(),
                    since_revision: since,
                    snapshot_page_size: weft_agent::sync::SNAPSHOT_PAGE_SIZE,
                })
                .await?;
            anyhow::Ok(s.into_inner())
        }
        .await;
        let Ok(mut stream) = stream else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        shared.opened.fetch_add(1, Ordering::SeqCst);
        shared
            .last_open_ns
            .fetch_max(shared.now_ns(), Ordering::SeqCst);
        while let Ok(Some(ev)) = stream.message().await {
            since = ev.revision;
            match ev.event {
                Some(Event::Snapshot(s)) if !s.more => {
                    shared.snapshots.fetch_add(1, Ordering::SeqCst);
                    // The next watcher may start once this one has its
                    // snapshot: agents do not all boot in one millisecond.
                    permit = None;
                }
                Some(Event::Upsert(p)) if p.node_name.starts_with("probe") => {
                    let _ = shared.arrivals.send((p.node_name, Instant::now()));
                }
                _ => {}
            }
        }
        drop(permit.take());
    }
}

/// Waits until `count` arrivals of `probe` were reported, and returns their
/// latencies after `t0` in milliseconds.
async fn arrivals_of(
    rx: &mut mpsc::UnboundedReceiver<(String, Instant)>,
    probe: &str,
    count: usize,
    t0: Instant,
) -> anyhow::Result<Vec<f64>> {
    let mut samples = Vec::with_capacity(count);
    while samples.len() < count {
        let (name, at) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .with_context(|| format!("{probe}: {} of {count} watchers told", samples.len()))?
            .context("watchers gone")?;
        if name == probe {
            samples.push(at.duration_since(t0).as_secs_f64() * 1e3);
        }
    }
    Ok(samples)
}

pub async fn bench(
    env: &Env,
    report: &mut Report,
    nodes: u32,
    allocations: u32,
) -> anyhow::Result<()> {
    let url = env.database("bench_scale")?;
    seed(env, &url, nodes, allocations)?;
    let (replica_a, addr_a) = spawn_server(env, &url, None, "scale-a.log")?;
    let (mut replica_b, addr_b) = spawn_server(env, &url, None, "scale-b.log")?;
    let admin = connect_when_up(addr_a)
        .await
        .context("replica a did not start")?;
    connect_when_up(addr_b)
        .await
        .context("replica b did not start")?;

    let (tx, mut rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        opened: AtomicU64::new(0),
        snapshots: AtomicU64::new(0),
        last_open_ns: AtomicU64::new(0),
        arrivals: tx,
    });
    // 64 agents at a time between connecting and holding their snapshot.
    let first = Arc::new(Semaphore::new(64));
    let t = Instant::now();
    let tasks: Vec<_> = (0..nodes)
        .map(|i| {
            let addr = if i % 2 == 0 { addr_a } else { addr_b };
            tokio::spawn(watcher(
                format!("n{i}"),
                addr,
                shared.clone(),
                first.clone(),
            ))
        })
        .collect();
    let all = u64::from(nodes);
    wait_until_async("every watcher's snapshot", Duration::from_secs(600), || {
        shared.snapshots.load(Ordering::SeqCst) >= all
    })
    .await?;
    let connect_s = t.elapsed().as_secs_f64();

    // Node joins, through one replica and then the other: each watcher of
    // both must be told.
    let mut samples = Vec::new();
    for k in 0..6u32 {
        let probe = format!("probe{k}");
        let via = if k % 2 == 0 {
            &admin
        } else {
            &channel(addr_b).await?
        };
        let t0 = Instant::now();
        TopologyClient::new(via.clone())
            .register_node(register_req(&probe, nodes + 1000 + k))
            .await?;
        samples.extend(arrivals_of(&mut rx, &probe, nodes as usize, t0).await?);
    }
    let join = Latency::of(&samples);
    let (rss_a, hwm_a) = replica_a.rss_mib();
    let (rss_b, hwm_b) = replica_b.rss_mib();

    // Replica b crashes and comes back on its address; its watchers retry
    // every 50 ms, as agents back off.
    let on_b = u64::from(nodes / 2);
    let opened_before = shared.opened.load(Ordering::SeqCst);
    let snapshots_before = shared.snapshots.load(Ordering::SeqCst);
    drop(replica_b);
    let t0 = Instant::now();
    let (restarted, _) = spawn_server(env, &url, Some(addr_b.port()), "scale-b2.log")?;
    replica_b = restarted;
    let serving_ms = loop {
        if let Ok(ch) = channel(addr_b).await
            && TopologyClient::new(ch)
                .heartbeat(pb::HeartbeatRequest {
                    node_name: "n1".into(),
                })
                .await
                .is_ok()
        {
            break t0.elapsed().as_secs_f64() * 1e3;
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "replica b did not serve again"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    wait_until_async(
        "replica b's watchers to resume",
        Duration::from_secs(60),
        || shared.opened.load(Ordering::SeqCst) >= opened_before + on_b,
    )
    .await?;
    let resumed_ms = Duration::from_nanos(shared.last_open_ns.load(Ordering::SeqCst))
        .saturating_sub(t0.duration_since(shared.epoch))
        .as_secs_f64()
        * 1e3;
    // Resumed for real: the next join reaches every watcher as a change.
    let t1 = Instant::now();
    TopologyClient::new(admin.clone())
        .register_node(register_req("probe-after", nodes + 2000))
        .await?;
    let after = Latency::of(&arrivals_of(&mut rx, "probe-after", nodes as usize, t1).await?);
    let resent = shared.snapshots.load(Ordering::SeqCst) - snapshots_before;
    let (rss_b2, _) = replica_b.rss_mib();

    for t in &tasks {
        t.abort();
    }
    let n = format!("{nodes} nodes, {allocations} allocations, 2 replicas");
    let ms = |name: String, v: f64, target: Option<Target>| Figure {
        name,
        unit: "ms",
        weft: v,
        anchor: None,
        target,
    };
    let mib = |name: String, v: f64, target: Option<Target>| Figure {
        name,
        unit: "MiB",
        weft: v,
        anchor: None,
        target,
    };
    for f in [
        Figure {
            name: format!("{nodes} watchers connected, each with its snapshot ({n})"),
            unit: "s",
            weft: connect_s,
            anchor: None,
            target: None,
        },
        ms(
            format!("node join → all {nodes} watchers told, p50"),
            join.p50,
            None,
        ),
        ms(
            format!("node join → all {nodes} watchers told, p99"),
            join.p99,
            Some(Target::AtMost(100.0)),
        ),
        ms(
            format!("node join → all {nodes} watchers told, max"),
            join.max,
            None,
        ),
        mib(
            format!("replica a RSS ({} watchers)", nodes - nodes / 2),
            rss_a,
            Some(Target::AtMost(64.0)),
        ),
        mib(
            format!("replica b RSS ({} watchers)", nodes / 2),
            rss_b,
            Some(Target::AtMost(64.0)),
        ),
        mib("replica a peak RSS (VmHWM)".into(), hwm_a, None),
        mib("replica b peak RSS (VmHWM)".into(), hwm_b, None),
        ms(
            "replica restart → serving (Heartbeat answered)".into(),
            serving_ms,
            Some(Target::AtMost(1000.0)),
        ),
        ms(
            format!("replica restart → all {on_b} of its watchers resumed"),
            resumed_ms,
            Some(Target::AtMost(5000.0)),
        ),
        Figure {
            name: "snapshots re-sent to resuming watchers".into(),
            unit: "",
            weft: resent as f64,
            anchor: None,
            target: Some(Target::AtMost(0.0)),
        },
        ms(
            format!("after the restart: node join → all {nodes} told, p99"),
            after.p99,
            Some(Target::AtMost(100.0)),
        ),
        mib("restarted replica b RSS".into(), rss_b2, None),
    ] {
        report.push(f);
    }
    Ok(())
}
