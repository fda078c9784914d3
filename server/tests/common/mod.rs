//! Shared fixtures: an in-process server on 127.0.0.1:0 over the fresh
//! database `#[sqlx::test]` hands each test, and clients for it.

#![allow(dead_code)]

use std::time::Duration;

use sqlx::PgPool;
use tokio::net::TcpListener;
use tonic::transport::Channel;
use weft_core::ipam::ClusterLayout;
use weft_proto::v1::{
    self as pb, admin_client::AdminClient, ipam_client::IpamClient, topology_client::TopologyClient,
};
use weft_server::{RunningServer, ServerSettings};

pub struct TestServer {
    pub server: RunningServer,
    pub channel: Channel,
    pub pool: PgPool,
}

pub fn layout(cidr: &str, prefix: u8) -> ClusterLayout {
    ClusterLayout::new(cidr.parse().unwrap(), prefix).unwrap()
}

pub fn settings() -> ServerSettings {
    ServerSettings {
        layout: layout("10.244.0.0/16", 24),
        vni: 1,
        mtu_hint: 0,
        topology_history: 10_000,
        feed_capacity: 1024,
        // In-process API tests run plaintext on purpose; tests/security.rs
        // covers mutual TLS.
        tls: None,
        block_quarantine: weft_server::store::DEFAULT_QUARANTINE,
        stale_node_after: None,
        keepalive: weft_server::Keepalive::default(),
    }
}

pub async fn start(pool: PgPool) -> TestServer {
    start_with(pool, settings()).await
}

/// The serving role of the two-role set-up (scripts/pg.sh creates it): the
/// server under test reads and writes as `weft`, never as the owner that
/// `#[sqlx::test]` migrated with.
pub const SERVING_ROLE: &str = "weft";

/// A pool on the same database as `owner`, logged in as the serving role.
pub async fn serving_pool(owner: &PgPool) -> PgPool {
    let options = (*owner.connect_options()).clone().username(SERVING_ROLE);
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
        .expect("connecting as the serving role `weft` (scripts/pg.sh creates it)")
}

pub async fn start_with(pool: PgPool, settings: ServerSettings) -> TestServer {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let serving = serving_pool(&pool).await;
    let server = RunningServer::start(settings, serving, grpc, metrics)
        .await
        .unwrap();
    let channel = Channel::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    TestServer {
        server,
        channel,
        pool,
    }
}

impl TestServer {
    pub fn topology(&self) -> TopologyClient<Channel> {
        TopologyClient::new(self.channel.clone())
    }

    pub fn ipam(&self) -> IpamClient<Channel> {
        IpamClient::new(self.channel.clone())
    }

    pub fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel.clone())
    }

    /// Registers `name` with an underlay address and MAC derived from `n`.
    pub async fn register(&self, name: &str, n: u8) -> pb::RegisterNodeResponse {
        self.topology()
            .register_node(register_req(name, n, n))
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn allocate(
        &self,
        node: &str,
        cid: &str,
    ) -> Result<pb::AllocateResponse, tonic::Status> {
        self.ipam()
            .allocate(allocate_req(node, cid, "eth0"))
            .await
            .map(|r| r.into_inner())
    }

    /// Releases `cid`'s eth0 on `node`; the released address, if any.
    pub async fn release(&self, node: &str, cid: &str) -> Result<String, tonic::Status> {
        self.ipam()
            .release(pb::ReleaseRequest {
                node_name: node.into(),
                container_id: cid.into(),
                ifname: "eth0".into(),
            })
            .await
            .map(|r| r.into_inner().address)
    }

    pub async fn audit_count(&self, action: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = $1")
            .bind(action)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}

pub fn register_req(name: &str, ip: u8, mac: u8) -> pb::RegisterNodeRequest {
    pb::RegisterNodeRequest {
        node_name: name.into(),
        underlay_ip: format!("198.51.100.{ip}"),
        vtep_mac: format!("02:00:00:00:00:{mac:02x}"),
    }
}

pub fn allocate_req(node: &str, cid: &str, ifname: &str) -> pb::AllocateRequest {
    pb::AllocateRequest {
        node_name: node.into(),
        container_id: cid.into(),
        ifname: ifname.into(),
        pod_namespace: "default".into(),
        pod_name: format!("pod-{cid}"),
        pod_uid: format!("uid-{cid}"),
    }
}

/// The next message of a watch stream, failing the test after 10 s.
pub async fn next_event(stream: &mut tonic::Streaming<pb::PeerEvent>) -> pb::PeerEvent {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("no peer event within 10 s")
        .unwrap()
        .expect("stream ended")
}

/// Asserts that no message arrives within `wait`.
pub async fn assert_quiet(stream: &mut tonic::Streaming<pb::PeerEvent>, wait: Duration) {
    if let Ok(msg) = tokio::time::timeout(wait, stream.message()).await {
        panic!("unexpected message: {msg:?}");
    }
}

pub async fn watch(ts: &TestServer, node: &str, since: u64) -> tonic::Streaming<pb::PeerEvent> {
    ts.topology()
        .watch_peers(pb::WatchPeersRequest {
            node_name: node.into(),
            since_revision: since,
            snapshot_page_size: 0,
        })
        .await
        .unwrap()
        .into_inner()
}

/// Plain HTTP/1.0 GET against the metrics listener.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    conn.read_to_string(&mut buf).await.unwrap();
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}
