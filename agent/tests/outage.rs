//! Issue 14: pods start and stop while weft-server and PostgreSQL are both
//! down, on several nodes, across an agent restart and a simulated reboot
//! (SIGKILL, state dir kept); when both return, PostgreSQL converges to
//! exactly the wired pods with the addresses they really have, each with
//! its audit row. Real binaries, a PostgreSQL of the test's own (it is
//! stopped), real namespaces (needs root; CI runs as root).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use weft_testbed::cluster::*;

const NODES: usize = 3;

fn host_veths(c: &Cluster, node: usize) -> usize {
    in_ns_json(
        &c.nodes[node],
        &["ip", "-j", "link", "show", "master", "weft0"],
    )
    .as_array()
    .unwrap()
    .len()
}

#[test]
fn pods_start_and_stop_with_server_and_postgres_down_and_postgres_converges_after() {
    if !require_root() {
        return;
    }
    let pg = PrivatePostgres::start(55871);
    let mut c = Cluster::on_database(NODES, pg.url.clone());
    for n in 0..NODES {
        c.start_agent(n);
    }
    // Every node holds a full reserve (128 by default).
    c.sql_settles(
        "SELECT count(*) FROM allocations WHERE state = 'reserved'",
        &[&(128 * NODES).to_string()],
    );
    let mut pods = LivePods::default();
    let mut released_during_outage = 0;
    for n in 0..NODES {
        pods.add(&mut c, n, &format!("before{n}"));
    }

    // Both go away.
    c.stop_server();
    pg.halt();
    for round in 0..12 {
        for n in 0..NODES {
            pods.add(&mut c, n, &format!("out{n}x{round}"));
        }
    }
    // Pods started in the outage reach each other across nodes.
    let on0 = pods.on(0)[1].1.clone();
    let on1 = pods.on(1)[1].1.clone();
    let on2 = pods.on(2)[1].1.clone();
    let (name0, _) = on0.split_once(' ').unwrap();
    let ip1 = on1.split_once(' ').unwrap().1;
    let (name2, _) = on2.split_once(' ').unwrap();
    let ip0 = on0.split_once(' ').unwrap().1;
    assert!(c.pod_ping(name0, ip1), "{name0} → {ip1}");
    assert!(c.pod_ping(name2, ip0), "{name2} → {ip0}");
    // DELs succeed.
    for n in 0..NODES {
        for (cid, _) in pods.on(n).into_iter().take(3) {
            pods.del(&mut c, &cid);
            released_during_outage += 1;
        }
    }

    // Node 1's agent restarts (SIGTERM); node 2's machine "reboots": the
    // agent dies on SIGKILL with its state directory kept.
    c.stop_agent(1);
    let mut killed = c.agents[2].take().unwrap();
    killed.child.kill().unwrap();
    killed.child.wait().unwrap();
    for n in [1, 2] {
        c.spawn_agent(n);
        wait_until("the CNI socket", Duration::from_secs(10), || {
            c.agent_log(n).contains("serving CNI requests")
        });
    }
    // They go on binding from the reserve they kept, never a live address.
    for round in 0..4 {
        for n in [1, 2] {
            pods.add(&mut c, n, &format!("after{n}x{round}"));
        }
    }
    let (cid, _) = pods.on(2)[0].clone();
    pods.del(&mut c, &cid);
    released_during_outage += 1;
    for n in 0..NODES {
        assert_eq!(host_veths(&c, n), pods.on(n).len(), "node {n}'s veths");
    }

    // Both return: PostgreSQL converges to exactly what is wired.
    pg.resume();
    c.start_server();
    let mut want: Vec<String> = pods
        .live
        .iter()
        .map(|(cid, (n, _, ip))| format!("node{} {cid} {ip}", n + 1))
        .collect();
    want.sort();
    let want: Vec<&str> = want.iter().map(String::as_str).collect();
    c.sql_settles(
        "SELECT node_name || ' ' || container_id || ' ' || host(address) FROM allocations
         WHERE state = 'bound' ORDER BY 1",
        &want,
    );
    // Each with its audit row, written at the node's time and marked offline
    // when it was bound during the outage.
    c.sql_settles(
        "SELECT count(*) FROM allocations a WHERE state = 'bound' AND NOT EXISTS (
            SELECT 1 FROM audit_log l WHERE l.action = 'bind' AND l.address = a.address
              AND l.container_id = a.container_id AND l.at = a.at)",
        &["0"],
    );
    let offline = pods
        .live
        .keys()
        .filter(|c| !c.starts_with("ctr-before"))
        .count();
    c.sql_settles(
        "SELECT count(*) FROM allocations WHERE state = 'bound' AND offline",
        &[&offline.to_string()],
    );
    c.sql_settles(
        "SELECT count(*) FROM audit_log WHERE action = 'release' AND offline",
        &[&released_during_outage.to_string()],
    );
    // Every row lies in its own node's block: nothing a node recorded
    // during the outage landed in another node's.
    assert_eq!(
        c.sql("SELECT count(*) FROM allocations a JOIN nodes n ON n.name = a.node_name WHERE NOT a.address << n.block"),
        ["0"]
    );
}

/// A small deterministic generator (the seed is printed, so a failure can
/// be replayed with WEFT_CHURN_SEED).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        usize::try_from(self.0 % n as u64).unwrap()
    }
}

#[test]
fn churn_with_agents_server_and_postgres_killed_at_random_leaves_no_duplicate_and_no_leak() {
    if !require_root() {
        return;
    }
    let seed = std::env::var("WEFT_CHURN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1234_u64);
    eprintln!("churn seed {seed} (WEFT_CHURN_SEED)");
    let mut rng = Rng(seed | 1);
    let pg = PrivatePostgres::start(55872);
    let mut c = Cluster::on_database(2, pg.url.clone());
    c.start_agent(0);
    c.start_agent(1);
    let mut pods = LivePods::default();
    let (mut server_up, mut pg_up) = (true, true);
    let mut agent_up = [true, true];
    let mut next = 0;
    for _ in 0..150 {
        match rng.below(10) {
            // Most steps are pod churn, no CNI GC ever.
            0..=4 => {
                let n = rng.below(2);
                if agent_up[n] {
                    pods.add(&mut c, n, &format!("c{next}"));
                    next += 1;
                }
            }
            5 | 6 => {
                let live: Vec<(String, usize)> =
                    pods.live.iter().map(|(k, v)| (k.clone(), v.0)).collect();
                if !live.is_empty() {
                    let (cid, n) = live[rng.below(live.len())].clone();
                    if agent_up[n] {
                        pods.del(&mut c, &cid);
                    }
                }
            }
            7 => {
                // SIGKILL an agent, or bring a killed one back.
                let n = rng.below(2);
                if agent_up[n] {
                    let mut a = c.agents[n].take().unwrap();
                    a.child.kill().unwrap();
                    a.child.wait().unwrap();
                } else {
                    c.spawn_agent(n);
                    wait_until("the CNI socket", Duration::from_secs(10), || {
                        c.agent_log(n).contains("serving CNI requests")
                    });
                }
                agent_up[n] = !agent_up[n];
            }
            8 => {
                // weft-server waits for PostgreSQL before it listens.
                if server_up {
                    c.stop_server();
                    server_up = false;
                } else if pg_up {
                    c.start_server();
                    server_up = true;
                }
            }
            _ => {
                if pg_up {
                    pg.halt();
                } else {
                    pg.resume();
                }
                pg_up = !pg_up;
            }
        }
    }
    // Everything comes back.
    if !pg_up {
        pg.resume();
    }
    if !server_up {
        c.start_server();
    }
    for (n, up) in agent_up.iter().enumerate() {
        if !up {
            c.spawn_agent(n);
        }
    }
    for n in 0..2 {
        assert_eq!(host_veths(&c, n), pods.on(n).len(), "node {n}'s veths");
    }
    let mut want: Vec<String> = pods
        .live
        .iter()
        .map(|(cid, (_, _, ip))| format!("{cid} {ip}"))
        .collect();
    want.sort();
    let want: Vec<&str> = want.iter().map(String::as_str).collect();
    // 0 leaks, 0 missing: PostgreSQL holds exactly the wired pods (agents
    // restarted during the outage register on their backoff first).
    let query = "SELECT container_id || ' ' || host(address) FROM allocations
         WHERE state = 'bound' ORDER BY 1";
    wait_until("PostgreSQL to converge", Duration::from_secs(40), || {
        c.sql(query) == want
    });
    c.sql_settles(query, &want);
    eprintln!("{} pods live after {next} ADDs", pods.live.len());
}
