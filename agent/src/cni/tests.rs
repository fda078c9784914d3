//! The service's decisions against recording fakes: no root, no server.

use std::{path::PathBuf, time::Duration};

use super::{
    pod::PodSide,
    pod_error::{PodError, PodErrorKind},
    seams::fake::{FakeIpam, FakePods},
    *,
};
use crate::state::StateDir;

struct Rig {
    service: CniService<FakeIpam, FakePods>,
    ipam: FakeIpam,
    pods: FakePods,
    journal: Arc<ReleaseJournal>,
    phase: watch::Sender<NodePhase>,
    dir: PathBuf,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rig(name: &str) -> Rig {
    let dir = std::env::temp_dir().join(format!("weft-cni-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let journal = Arc::new(ReleaseJournal::open(StateDir::open(&dir).unwrap()).unwrap());
    let (phase, rx) = watch::channel(NodePhase::Ready { mtu: 1450 });
    let (ipam, pods) = (FakeIpam::default(), FakePods::default());
    Rig {
        service: CniService::new(
            "node-a".into(),
            rx,
            ipam.clone(),
            pods.clone(),
            journal.clone(),
        ),
        ipam,
        pods,
        journal,
        phase,
        dir,
    }
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

#[tokio::test]
async fn a_failed_wiring_gives_the_address_back() {
    let r = rig("rollback");
    *r.pods.fail_wire.lock().unwrap() = Some(PodError::new(PodErrorKind::Kernel, "veth refused"));
    let err = r.service.handle(&env("ADD", "c1"), CONF).await.unwrap_err();
    assert_eq!(err.code, Code::Datapath);
    assert_eq!(r.ipam.calls(), ["allocate c1", "release c1"]);
    assert!(r.ipam.held.lock().unwrap().is_empty());
    assert!(r.journal.pending().is_empty());
}

#[tokio::test]
async fn a_rollback_the_server_cannot_take_is_journalled() {
    let r = rig("rollback-journal");
    *r.pods.fail_wire.lock().unwrap() = Some(PodError::new(PodErrorKind::Kernel, "veth refused"));
    // The server answers the Allocate, then cannot take the Release.
    let service = CniService::new(
        "node-a".into(),
        r.phase.subscribe(),
        FailReleases(r.ipam.clone()),
        r.pods.clone(),
        r.journal.clone(),
    );
    let err = service.handle(&env("ADD", "c1"), CONF).await.unwrap_err();
    assert_eq!(err.code, Code::Datapath);
    let pending: Vec<String> = r
        .journal
        .pending()
        .into_iter()
        .map(|p| p.container_id)
        .collect();
    assert_eq!(pending, ["c1"]);
}

/// The fake server, with every Release UNAVAILABLE.
#[derive(Debug, Clone)]
struct FailReleases(FakeIpam);

impl Ipam for FailReleases {
    async fn allocate(&self, req: pb::AllocateRequest) -> Result<pb::AllocateResponse, Status> {
        self.0.allocate(req).await
    }
    async fn release(&self, _: &str, _: &str, _: &str) -> Result<Option<String>, Status> {
        Err(Status::unavailable("down"))
    }
    async fn lookup(&self, req: pb::LookupRequest) -> Result<pb::Allocation, Status> {
        self.0.lookup(req).await
    }
    async fn gc(&self, req: pb::GcRequest) -> Result<Vec<pb::Allocation>, Status> {
        self.0.gc(req).await
    }
    async fn heartbeat(&self, node: &str) -> Result<(), Status> {
        self.0.heartbeat(node).await
    }
}

#[tokio::test]
async fn del_reports_every_failure_and_still_flushes_conntrack() {
    let r = rig("del");
    r.service.handle(&env("ADD", "c1"), CONF).await.unwrap();
    *r.pods.fail_delete.lock().unwrap() = Some(PodError::new(
        PodErrorKind::Kernel,
        "deleting the host veth: EBUSY",
    ));
    let err = r.service.handle(&env("DEL", "c1"), CONF).await.unwrap_err();
    assert_eq!(err.code, Code::Datapath);
    assert!(err.msg.contains("EBUSY"), "{err:?}");
    let calls = r.pods.calls();
    assert!(
        calls.iter().any(|c| c == "flush_conntrack 10.244.0.2"),
        "the flush ran although the unlink failed: {calls:?}"
    );
    assert!(r.ipam.held.lock().unwrap().is_empty(), "released anyway");
}

#[tokio::test]
async fn del_with_the_server_down_succeeds_and_the_flusher_reports_it_later() {
    let r = rig("del-down");
    r.service.handle(&env("ADD", "c1"), CONF).await.unwrap();
    *r.ipam.down.lock().unwrap() = true;
    r.service.handle(&env("DEL", "c1"), CONF).await.unwrap();
    assert!(r.journal.contains("c1", "eth0"));
    *r.ipam.down.lock().unwrap() = false;
    let (stop_tx, stop) = watch::channel(false);
    let flusher = tokio::spawn(
        r.service
            .clone()
            .flush_releases(Duration::from_millis(10), stop),
    );
    for _ in 0..200 {
        if r.journal.pending().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop_tx.send_replace(true);
    flusher.await.unwrap();
    assert!(r.journal.pending().is_empty());
    assert!(r.ipam.held.lock().unwrap().is_empty());
}

#[tokio::test]
async fn add_waits_for_registration_and_refuses_on_a_fenced_node() {
    let r = rig("phase");
    r.phase.send_replace(NodePhase::Starting { mtu: None });
    let err = r.service.handle(&env("ADD", "c1"), CONF).await.unwrap_err();
    assert_eq!(err.code, Code::TryAgainLater);
    r.phase.send_replace(NodePhase::Fenced { mtu: 1450 });
    let err = r.service.handle(&env("ADD", "c1"), CONF).await.unwrap_err();
    assert_eq!(err.code, Code::Ipam);
    assert!(err.msg.contains("deleted"), "{err:?}");
    assert!(r.ipam.calls().is_empty(), "no allocation was asked for");
    let mut status = env("STATUS", "");
    status.remove("CNI_CONTAINERID");
    let conf = br#"{"cniVersion":"1.1.0","name":"weft","type":"weft"}"#;
    let err = r.service.handle(&status, conf).await.unwrap_err();
    assert_eq!(err.code, Code::NotAvailable);
    assert!(err.msg.contains("deleted"), "{err:?}");
    // DEL is served in both phases.
    r.service.handle(&env("DEL", "c1"), CONF).await.unwrap();
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
    // The server holding another address is drift; the server away is not.
    r.ipam
        .held
        .lock()
        .unwrap()
        .insert("c1".into(), "10.244.0.9/24".into());
    *r.pods.side.lock().unwrap() = good;
    *r.pods.host_attached.lock().unwrap() = Some(true);
    let err = r
        .service
        .handle(&env("CHECK", "c1"), &conf)
        .await
        .unwrap_err();
    assert!(err.msg.contains("10.244.0.9"), "{err:?}");
    *r.ipam.down.lock().unwrap() = true;
    r.service.handle(&env("CHECK", "c1"), &conf).await.unwrap();
}

#[tokio::test]
async fn gc_deletes_only_veths_of_unlisted_attachments() {
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
    assert_eq!(deleted, [orphan]);
    let held: Vec<String> = r.ipam.held.lock().unwrap().keys().cloned().collect();
    assert_eq!(held, ["keep"]);
}
