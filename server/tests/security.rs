//! Mutual TLS: node certificates act only for their own node, admin RPCs
//! need an admin (or, to read, a viewer) certificate, and certificates from
//! another CA, expired ones or none at all are refused. Refusals are
//! audited with the presented identity.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use common::*;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use weft_proto::v1::{
    self as pb, admin_client::AdminClient, ipam_client::IpamClient, topology_client::TopologyClient,
};
use weft_server::{
    RunningServer, TlsMaterial,
    pki::{Ca, Issued, Role},
    store::MIGRATOR,
};

struct Pki {
    ca: Ca,
    server: Issued,
}

impl Pki {
    fn new() -> Self {
        let ca = Ca::generate("test-ca").unwrap();
        let server = ca
            .issue(Role::Server, "weft-server", &["127.0.0.1".into()], None)
            .unwrap();
        Self { ca, server }
    }

    fn client(&self, role: Role, name: &str) -> Issued {
        self.ca.issue(role, name, &[], None).unwrap()
    }
}

async fn start_tls(pool: PgPool, pki: &Pki) -> RunningServer {
    let mut s = settings();
    s.tls = Some(TlsMaterial {
        cert: pki.server.cert_pem.clone(),
        key: pki.server.key_pem.clone(),
        client_ca: pki.ca.cert_pem.clone(),
    });
    RunningServer::start(
        s,
        pool,
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await
    .unwrap()
}

async fn channel(
    server: &RunningServer,
    pki: &Pki,
    client: Option<&Issued>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca.cert_pem));
    if let Some(c) = client {
        tls = tls.identity(Identity::from_pem(&c.cert_pem, &c.key_pem));
    }
    Endpoint::from_shared(format!("https://127.0.0.1:{}", server.grpc_addr.port()))?
        .tls_config(tls)?
        .connect()
        .await
}

async fn as_client(server: &RunningServer, pki: &Pki, role: Role, name: &str) -> Channel {
    channel(server, pki, Some(&pki.client(role, name)))
        .await
        .unwrap()
}

fn denied<T: std::fmt::Debug>(r: Result<T, tonic::Status>, what: &str) {
    let err = r.expect_err(what);
    assert_eq!(err.code(), Code::PermissionDenied, "{what}: {err:?}");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_node_certificate_acts_only_for_its_own_node(pool: PgPool) {
    let pki = Pki::new();
    let server = start_tls(pool.clone(), &pki).await;
    let b = as_client(&server, &pki, Role::Node, "node-b").await;
    TopologyClient::new(b.clone())
        .register_node(register_req("node-b", 2, 2))
        .await
        .unwrap();
    IpamClient::new(b)
        .allocate(allocate_req("node-b", "cb", "eth0"))
        .await
        .unwrap();

    let a = as_client(&server, &pki, Role::Node, "node-a").await;
    let mut topo = TopologyClient::new(a.clone());
    let mut ipam = IpamClient::new(a.clone());
    denied(
        topo.register_node(register_req("node-b", 9, 9)).await,
        "RegisterNode as B",
    );
    denied(
        topo.watch_peers(pb::WatchPeersRequest {
            node_name: "node-b".into(),
            since_revision: 0,
            snapshot_page_size: 0,
        })
        .await,
        "WatchPeers as B",
    );
    denied(
        topo.heartbeat(pb::HeartbeatRequest {
            node_name: "node-b".into(),
        })
        .await,
        "Heartbeat as B",
    );
    denied(
        ipam.allocate(allocate_req("node-b", "evil", "eth0")).await,
        "Allocate in B's block",
    );
    denied(
        ipam.release(pb::ReleaseRequest {
            node_name: "node-b".into(),
            container_id: "cb".into(),
            ifname: "eth0".into(),
        })
        .await,
        "Release B's address",
    );
    denied(
        ipam.gc(pb::GcRequest {
            node_name: "node-b".into(),
            valid: vec![],
        })
        .await,
        "Gc B",
    );
    denied(
        ipam.lookup(pb::LookupRequest {
            node_name: "node-b".into(),
            container_id: "cb".into(),
            ifname: "eth0".into(),
        })
        .await,
        "Lookup B",
    );
    // The reserve calls (issue 14): A can neither take addresses of B's
    // block, nor record binds for B, nor rewrite B's rows by a sync.
    denied(
        ipam.reserve(pb::ReserveRequest {
            node_name: "node-b".into(),
            epoch: 0,
            count: 4,
            adopt: true,
        })
        .await,
        "Reserve in B's block",
    );
    denied(
        ipam.report(pb::ReportRequest {
            node_name: "node-b".into(),
            epoch: 0,
            events: vec![],
        })
        .await,
        "Report for B",
    );
    denied(
        ipam.sync(pb::SyncRequest {
            node_name: "node-b".into(),
            ..Default::default()
        })
        .await,
        "Sync B",
    );
    // B's state is untouched, every refusal is audited with A's identity.
    let left: Vec<String> = sqlx::query_scalar("SELECT container_id FROM allocations")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(left, ["cb"]);
    let audit: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT actor, node_name, detail FROM audit_log WHERE action = 'denied' ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let methods: Vec<&str> = audit
        .iter()
        .map(|(_, _, d)| d.as_deref().unwrap_or(""))
        .collect();
    assert_eq!(
        methods,
        [
            "RegisterNode",
            "WatchPeers",
            "Heartbeat",
            "Allocate",
            "Release",
            "Gc",
            "Lookup",
            "Reserve",
            "Report",
            "Sync"
        ]
    );
    assert!(
        audit
            .iter()
            .all(|(actor, node, _)| actor == "node/node-a" && node == "node-b")
    );

    // Acting for itself works, and the audit names the certificate's node.
    topo.register_node(register_req("node-a", 1, 1))
        .await
        .unwrap();
    ipam.allocate(allocate_req("node-a", "ca", "eth0"))
        .await
        .unwrap();
    let actor: String = sqlx::query_scalar("SELECT actor FROM audit_log WHERE container_id = 'ca'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(actor, "node/node-a");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn admin_rpcs_need_an_admin_and_reads_allow_a_viewer(pool: PgPool) {
    let pki = Pki::new();
    let server = start_tls(pool.clone(), &pki).await;
    let node = as_client(&server, &pki, Role::Node, "node-a").await;
    TopologyClient::new(node.clone())
        .register_node(register_req("node-a", 1, 1))
        .await
        .unwrap();
    let mut as_node = AdminClient::new(node);
    denied(
        as_node.list_nodes(pb::ListNodesRequest {}).await,
        "ListNodes with a node cert",
    );
    denied(
        as_node
            .delete_node(pb::DeleteNodeRequest {
                name: "node-a".into(),
            })
            .await,
        "DeleteNode with a node cert",
    );

    let mut viewer = AdminClient::new(as_client(&server, &pki, Role::Viewer, "auditor").await);
    assert_eq!(
        viewer
            .list_nodes(pb::ListNodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes
            .len(),
        1
    );
    viewer.utilization(pb::UtilizationRequest {}).await.unwrap();
    denied(
        viewer
            .delete_node(pb::DeleteNodeRequest {
                name: "node-a".into(),
            })
            .await,
        "DeleteNode as viewer",
    );

    let mut admin = AdminClient::new(as_client(&server, &pki, Role::Admin, "ops").await);
    admin
        .delete_node(pb::DeleteNodeRequest {
            name: "node-a".into(),
        })
        .await
        .unwrap();
    let actor: String =
        sqlx::query_scalar("SELECT actor FROM audit_log WHERE action = 'node_delete'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(actor, "admin/ops");
    // An admin certificate is not a node's.
    denied(
        TopologyClient::new(as_client(&server, &pki, Role::Admin, "ops").await)
            .register_node(register_req("ops", 3, 3))
            .await,
        "RegisterNode with an admin cert",
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn no_foreign_or_expired_certificate_gets_in(pool: PgPool) {
    let pki = Pki::new();
    let server = start_tls(pool.clone(), &pki).await;

    // No client certificate: health answers (for probes), Weft does not.
    let anonymous = channel(&server, &pki, None).await.unwrap();
    HealthClient::new(anonymous.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    let err = TopologyClient::new(anonymous)
        .register_node(register_req("node-a", 1, 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // Signed by another CA, or expired: the TLS handshake fails.
    let other = Ca::generate("mallory-ca")
        .unwrap()
        .issue(Role::Node, "node-a", &[], None)
        .unwrap();
    let expired = pki
        .ca
        .issue(Role::Node, "node-a", &[], Some((2019, 2020)))
        .unwrap();
    for (what, cert) in [("foreign CA", other), ("expired", expired)] {
        let result = match channel(&server, &pki, Some(&cert)).await {
            Err(e) => Err(e.to_string()),
            Ok(ch) => TopologyClient::new(ch)
                .register_node(register_req("node-a", 1, 1))
                .await
                .map(drop)
                .map_err(|s| s.to_string()),
        };
        assert!(result.is_err(), "{what} certificate was accepted");
    }
    let nodes: i64 = sqlx::query_scalar("SELECT count(*) FROM nodes")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(nodes, 0);
}
