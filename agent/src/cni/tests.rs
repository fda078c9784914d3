//! The service's decisions against recording fakes: no root, no server.

use std::{path::PathBuf, time::Duration};

use super::{
    background::ReserveSettings,
    pod::PodSide,
    pod_error::{PodError, PodErrorKind},
    seams::fake::{FakeIpam, FakePods},
    *,
};

struct Rig {
    service: CniService<FakeIpam, FakePods>,
    ipam: FakeIpam,
    pods: FakePods,
    reserve: Arc<Reserve>,
    phase: watch::Sender<NodePhase>,
    dir: PathBuf,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ip(last: u8) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(10, 244, 0, last)
}

/// A registered node whose reserve holds 10.244.0.2 ..= .(1 + `free`).
fn rig_with(name: &str, free: u8) -> Rig {
    let dir = std::env::temp_dir().join(format!("weft-cni-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let reserve = Arc::new(Reserve::open(&dir).unwrap());
    reserve
        .registered(1, "10.244.0.0/24".parse().unwrap(), ip(1), 60_000)
        .unwrap();
    let addresses: Vec<_> = (0..free).map(|i| ip(2 + i)).collect();
    reserve.grant(&addresses).unwrap();
    let (phase, rx) = watch::channel(NodePhase::Ready { mtu: 1450 });
    let (ipam, pods) = (FakeIpam::default(), FakePods::default());
    *ipam.next.lock().unwrap() = free;
    Rig {
        service: CniService::new(
            "node-a".into(),
            rx,
            ipam.clone(),
            pods.clone(),
            reserve.clone(),
        ),
        ipam,
        pods,
        reserve,
        phase,
        dir,
    }
}

fn rig(name: &str) -> Rig {
    rig_with(name, 8)
}

fn env(command: &str, cid: &str) -> HashMap<String, String> {
    [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", cid),
        ("CNI_NETNS", "/var/run/netns/fake"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p"),
        ("CNI_PATH", "/opt/cni/bin"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

const CONF: &[u8] = br#"{"cniVersion":"1.0.0","name":"weft","type":"weft"}"#;

fn conf_with_prev(address: &str) -> Vec<u8> {
    serde_json::json!({
        "cniVersion": "1.0.0", "name": "weft", "type": "weft",
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/fake"}],
            "ips": [{"address": address, "gateway": "10.244.0.1", "interface": 0}],
        }
    })
    .to_string()
    .into_bytes()
}

fn address_of(stdout: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(stdout).unwrap();
    v["ips"][0]["address"].as_str().unwrap().to_owned()
}

fn bound(r: &Rig) -> Vec<String> {
    r.reserve
        .book()
        .bound
        .iter()
        .map(|((c, _), b)| format!("{c} {}", b.address))
        .collect()
}

#[tokio::test]
async fn adds_bind_from_the_reserve_without_asking_the_server() {
    let r = rig("hot-path");
    *r.ipam.down.lock().unwrap() = true;
    r.service.set_online(false);
    let a = r.service.handle(&env("ADD", "c1"), CONF).await.unwrap();
    let b = r.service.handle(&env("ADD", "c2"), CONF).await.unwrap();
    assert_eq!(address_of(&a), "10.244.0.2/24");
    assert_eq!(address_of(&b), "10.244.0.3/24");
    // A retried ADD answers the same address.
    let again = r.service.handle(&env("ADD", "c1"), CONF).await.unwrap();
    assert_eq!(address_of(&again), "10.244.0.2/24");
    assert!(r.ipam.calls().is_empty(), "{:?}", r.ipam.calls());
    // Bound while the server was away: the events say so.
    let book = r.reserve.book();
    assert_eq!(book.pending.len(), 2);
    assert!(book.pending.iter().all(|e| e.offline));
}

#[tokio::test]
async fn an_exhausted_reserve_with_the_server_down_answers_11_at_once() {
    let r = rig_with("exhausted", 1);
    r.service.handle(&env("ADD", "c1"), CONF).await.unwrap();
    // The background's last call failed: the server is known to be away.
    *r.ipam.down.lock().unwrap() = true;
    r.service.set_online(false);
    let started = std::time::Instant::now();
    let err = r.service.handle(&env("ADD", "c2"), CONF).await.unwrap_err();
    assert_eq!(err.code, Code::TryAgainLater);
    assert!(err.msg.contains("not reachable"), "{err:?}");
    // Not the refill wait (5 s) an online node allows.
    assert!(started.elapsed() < REFILL_WAIT, "{:?}", started.elapsed());
}

#[tokio::test]
async fn status_names_postgresql_when_the_server_answers_that_its_database_is_away() {
    let r = rig_with("status-db", 0);
    let mut status = env("STATUS", "");
    status.remove("CNI_CONTAINERID");
    let conf = br#"{"cniVersion":"1.1.0","name":"weft","type":"weft"}"#;
    *r.ipam.down.lock().unwrap() = true;
    let err = r.service.handle(&status, conf).await.unwrap_err();
    assert_eq!(err.code, Code::NotAvailable);
    assert!(err.msg.contains("weft-server is not reachable"), "{err:?}");
    *r.ipam.down_message.lock().unwrap() = Some("database unavailable; retry".into());
    let err = r.service.handle(&status, conf).await.unwrap_err();
    assert!(err.msg.contains("cannot reach PostgreSQL"), "{err:?}");
    assert!(err.msg.contains("reserve is empty"), "{err:?}");
}

#[tokio::test]
async fn a_failed_wiring_gives_the_address_back() {
    let r = rig("rollback");
    *r.pods.fail_wire.lock().unwrap() = Some(PodError::new(PodErrorKind::Kernel, "veth refused"));
    let err = r.service.handle(&env("ADD", "c1"), CONF).await.unwrap_err();
    assert_eq!(err.code, Code::Datapath);
    let book = r.reserve.book();
    assert!(book.bound.is_empty());
    assert_eq!(book.free.back(), Some(&ip(2)), "last to come back");
    let kinds: Vec<_> = book.pending.iter().map(|e| e.kind).collect();
    use crate::reserve::book::EventKind;
    assert_eq!(kinds, [EventKind::Bind, EventKind::Release]);
}

#[tokio::test]
async fn a_del_whose_veth_cannot_be_deleted_keeps_the_address_bound() {
    let r = rig("del");
    r.service.handle(&env("ADD", "c1"), CONF).await.unwrap();
    *r.pods.fail_delete.lock().unwrap() = Some(PodError::new(PodErrorKind::Kernel, "link busy"));
    let err = r.service.handle(&env("DEL", "c1"), CONF).await.unwrap_err();
    assert!(err.msg.contains("link busy"), "{err:?}");
    assert_eq!(
        bound(&r),
        ["c1 10.244.0.2"],
        "still reachable: not released"
    );
    *r.pods.fail_delete.lock().unwrap() = None;
    r.service.handle(&env("DEL", "c1"), CONF).await.unwrap();
    assert!(bound(&r).is_empty());
    // The flush runs after the answer; the address is held until it is done.
    let flushed = "flush_conntrack 10.244.0.2".to_owned();
    for _ in 0..200 {
        if r.pods.calls().contains(&flushed) && r.reserve.book().held.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(r.pods.calls().contains(&flushed));
    assert!(r.reserve.book().held.is_empty(), "let go after its flush");
    // DEL again (a retried DEL) is a success with nothing to do.
    r.service.handle(&env("DEL", "c1"), CONF).await.unwrap();
}

#[tokio::test]
async fn add_waits_for_registration_and_refuses_on_a_fenced_node() {
    let r = rig("phase");
    r.phase.send_replace(NodePhase::Starting { mtu: None });
    let err = r.service.handle(&env("ADD", "c1"), CONF).await.unwrap_err();
    assert_eq!(err.code, Code::TryAgainLater);
    // Restarted with the datapath of the last run in place: ADD binds.
    r.phase
        .send_replace(NodePhase::Starting { mtu: Some(1450) });
    r.service.handle(&env("ADD", "c0"), CONF).await.unwrap();
    r.phase.send_replace(NodePhase::Fenced { mtu: 1450 });
    let err = r.service.handle(&env("ADD", "c1"), CONF).await.unwrap_err();
    assert_eq!(err.code, Code::Ipam);
    assert!(err.msg.contains("deleted"), "{err:?}");
    assert_eq!(bound(&r), ["c0 10.244.0.2"], "nothing bound while fenced");
    let mut status = env("STATUS", "");
    status.remove("CNI_CONTAINERID");
    let conf = br#"{"cniVersion":"1.1.0","name":"weft","type":"weft"}"#;
    let err = r.service.handle(&status, conf).await.unwrap_err();
    assert_eq!(err.code, Code::NotAvailable);
    assert!(err.msg.contains("deleted"), "{err:?}");
    // DEL is served in every phase.
    r.service.handle(&env("DEL", "c0"), CONF).await.unwrap();
}

#[tokio::test]
async fn check_names_what_drifted() {
    let r = rig("check");
    r.service.handle(&env("ADD", "c1"), CONF).await.unwrap();
    let good = PodSide {
        exists: true,
        up: true,
        mac: String::new(),
        mtu: 1450,
        addresses: vec!["10.244.0.2/24".parse().unwrap()],
        default_gateway: Some("10.244.0.1".parse().unwrap()),
    };
    *r.pods.host_attached.lock().unwrap() = Some(true);
    let conf = conf_with_prev("10.244.0.2/24");
    for (side, attached, want) in [
        (good.clone(), Some(true), None),
        (
            PodSide {
                mtu: 1400,
                ..good.clone()
            },
            Some(true),
            Some("MTU 1400"),
        ),
        (
            PodSide {
                up: false,
                ..good.clone()
            },
            Some(true),
            Some("down"),
        ),
        (
            PodSide {
                default_gateway: None,
                ..good.clone()
            },
            Some(true),
            Some("default route"),
        ),
        (good.clone(), None, Some("host interface")),
        (good.clone(), Some(false), Some("not attached")),
    ] {
        *r.pods.side.lock().unwrap() = side.clone();
        *r.pods.host_attached.lock().unwrap() = attached;
        let got = r.service.handle(&env("CHECK", "c1"), &conf).await;
        match want {
            None => assert!(got.is_ok(), "{side:?}: {got:?}"),
            Some(text) => {
                let err = got.unwrap_err();
                assert_eq!(err.code, Code::Drift, "{side:?}");
                assert!(err.msg.contains(text), "{text}: {err:?}");
            }
        }
    }
    // An attachment the node never bound (or released) is drift.
    *r.pods.side.lock().unwrap() = good;
    *r.pods.host_attached.lock().unwrap() = Some(true);
    let err = r
        .service
        .handle(&env("CHECK", "other"), &conf)
        .await
        .unwrap_err();
    assert!(err.msg.contains("holds no address"), "{err:?}");
}

#[tokio::test]
async fn gc_deletes_veths_and_releases_bindings_of_unlisted_attachments() {
    let r = rig("gc");
    r.service.handle(&env("ADD", "keep"), CONF).await.unwrap();
    r.service.handle(&env("ADD", "gone"), CONF).await.unwrap();
    let keep = host_ifname("keep", "eth0");
    let orphan = host_ifname("gone", "eth0");
    *r.pods.veths.lock().unwrap() = vec![keep.clone(), orphan.clone()];
    let conf = serde_json::json!({
        "cniVersion": "1.1.0", "name": "weft", "type": "weft",
        "cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"}],
    })
    .to_string();
    let mut gc = env("GC", "");
    gc.remove("CNI_CONTAINERID");
    r.service.handle(&gc, conf.as_bytes()).await.unwrap();
    let deleted: Vec<String> = r
        .pods
        .calls()
        .into_iter()
        .filter_map(|c| c.strip_prefix("delete_link ").map(str::to_owned))
        .collect();
    assert!(deleted.iter().all(|d| *d == orphan), "{deleted:?}");
    assert!(!deleted.is_empty());
    assert_eq!(bound(&r), ["keep 10.244.0.2"]);
}

#[tokio::test]
async fn the_kernel_check_releases_bindings_whose_veth_is_gone() {
    let r = rig("kernel");
    r.service.handle(&env("ADD", "wired"), CONF).await.unwrap();
    r.service
        .handle(&env("ADD", "crashed"), CONF)
        .await
        .unwrap();
    *r.pods.veths.lock().unwrap() = vec![host_ifname("wired", "eth0")];
    assert_eq!(r.service.check_kernel().await.unwrap(), 1);
    assert_eq!(bound(&r), ["wired 10.244.0.2"]);
}

#[tokio::test]
async fn a_fresh_agents_first_add_waits_for_the_first_refill() {
    let r = rig_with("first-refill", 0);
    let (stop_tx, stop) = watch::channel(false);
    // The ADD comes first; the background starts a moment later.
    let service = r.service.clone();
    let add = tokio::spawn(async move { service.handle(&env("ADD", "c1"), CONF).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let task = tokio::spawn(r.service.clone().run_background(
        ReserveSettings {
            low: 4,
            high: 8,
            reconcile_every: Duration::from_secs(3600),
            grace: Duration::from_secs(3600),
        },
        r.phase.clone(),
        crate::metrics::AgentMetrics::new(),
        stop,
    ));
    let out = add.await.unwrap().unwrap();
    assert_eq!(address_of(&out), "10.244.0.2/24");
    stop_tx.send_replace(true);
    task.await.unwrap();
}

#[tokio::test]
async fn the_background_reports_in_order_refills_and_syncs() {
    let r = rig_with("background", 2);
    let (stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(r.service.clone().run_background(
        ReserveSettings {
            low: 4,
            high: 6,
            reconcile_every: Duration::from_secs(3600),
            grace: Duration::from_secs(3600),
        },
        r.phase.clone(),
        crate::metrics::AgentMetrics::new(),
        stop,
    ));
    r.service.handle(&env("ADD", "c1"), CONF).await.unwrap();
    r.service.handle(&env("DEL", "c1"), CONF).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while r.ipam.recorded().len() < 2 || r.reserve.book().free.len() < 6 {
        assert!(std::time::Instant::now() < deadline, "{:?}", r.ipam.calls());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        r.ipam.recorded(),
        ["1 Bind c1 10.244.0.2", "2 Release c1 10.244.0.2"]
    );
    assert!(r.reserve.book().pending.is_empty(), "acknowledged");
    let calls = r.ipam.calls();
    assert!(calls.iter().any(|c| c.starts_with("reserve ")), "{calls:?}");
    assert!(calls.iter().any(|c| c.starts_with("sync ")), "{calls:?}");
    stop_tx.send_replace(true);
    task.await.unwrap();
}
