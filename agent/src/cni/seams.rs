//! What the CNI service needs from the outside, in domain terms: the
//! server's IPAM ([`Ipam`], over gRPC in [`GrpcIpam`]) and the kernel's pod
//! plumbing ([`Pods`], on rtnetlink in [`super::pod::PodNetwork`]). The
//! service is generic over both, so its decisions (rollback, DEL
//! aggregation, CHECK drift, GC selection) are unit-tested against the
//! recording fakes in [`fake`] without root.

use std::{future::Future, path::Path, time::Duration};

use tonic::{Request, Status, transport::Channel};
use weft_proto::v1::{self as pb, ipam_client::IpamClient, topology_client::TopologyClient};

use super::{
    pod::{PodNetwork, PodSide, PodSpec},
    pod_error::PodError,
    result::Wired,
};

/// ADD must fail fast (with "try again later") when the server is away.
const IPAM_TIMEOUT: Duration = Duration::from_secs(5);
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// The server's IPAM, for one node.
pub trait Ipam: Clone + Send + Sync + 'static {
    fn allocate(
        &self,
        req: pb::AllocateRequest,
    ) -> impl Future<Output = Result<pb::AllocateResponse, Status>> + Send;
    /// The released address, if the server held one.
    fn release(
        &self,
        node: &str,
        container_id: &str,
        ifname: &str,
    ) -> impl Future<Output = Result<Option<String>, Status>> + Send;
    fn lookup(
        &self,
        req: pb::LookupRequest,
    ) -> impl Future<Output = Result<pb::Allocation, Status>> + Send;
    fn gc(
        &self,
        req: pb::GcRequest,
    ) -> impl Future<Output = Result<Vec<pb::Allocation>, Status>> + Send;
    /// Whether the server answers for this node (STATUS).
    fn heartbeat(&self, node: &str) -> impl Future<Output = Result<(), Status>> + Send;
}

/// Pod plumbing in the kernel.
pub trait Pods: Clone + Send + Sync + 'static {
    /// Fails unless `netns` is a network namespace the agent can enter.
    fn check_netns(&self, netns: &Path) -> Result<(), PodError>;
    fn wire(&self, spec: &PodSpec) -> impl Future<Output = Result<Wired, PodError>> + Send;
    fn inspect(
        &self,
        netns: &Path,
        ifname: &str,
    ) -> impl Future<Output = Result<PodSide, PodError>> + Send;
    /// Deletes a host veth; a missing one is not an error.
    fn delete_link(&self, name: &str) -> impl Future<Output = Result<(), PodError>> + Send;
    /// `None`: the host end is missing; `Some(attached to weft0)`.
    fn host_side(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> impl Future<Output = Result<Option<bool>, PodError>> + Send;
    fn host_veths(&self) -> impl Future<Output = Result<Vec<String>, PodError>> + Send;
    fn bridge_exists(&self) -> impl Future<Output = Result<bool, PodError>> + Send;
    /// Drops conntrack entries of a released address, best-effort.
    fn flush_conntrack(&self, ip: &str) -> impl Future<Output = ()> + Send;
}

fn with_timeout<T>(msg: T, timeout: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(timeout);
    r
}

// === impl GrpcIpam ===

/// [`Ipam`] over the agent's channel to weft-server.
#[derive(Debug, Clone)]
pub struct GrpcIpam {
    channel: Channel,
}

impl GrpcIpam {
    pub fn new(channel: Channel) -> Self {
        Self { channel }
    }

    fn client(&self) -> IpamClient<Channel> {
        IpamClient::new(self.channel.clone())
    }
}

impl Ipam for GrpcIpam {
    async fn allocate(&self, req: pb::AllocateRequest) -> Result<pb::AllocateResponse, Status> {
        Ok(self
            .client()
            .allocate(with_timeout(req, IPAM_TIMEOUT))
            .await?
            .into_inner())
    }

    async fn release(
        &self,
        node: &str,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<String>, Status> {
        let released = self
            .client()
            .release(with_timeout(
                pb::ReleaseRequest {
                    node_name: node.to_owned(),
                    container_id: container_id.to_owned(),
                    ifname: ifname.to_owned(),
                },
                IPAM_TIMEOUT,
            ))
            .await?
            .into_inner()
            .address;
        Ok(Some(released).filter(|a| !a.is_empty()))
    }

    async fn lookup(&self, req: pb::LookupRequest) -> Result<pb::Allocation, Status> {
        Ok(self
            .client()
            .lookup(with_timeout(req, IPAM_TIMEOUT))
            .await?
            .into_inner())
    }

    async fn gc(&self, req: pb::GcRequest) -> Result<Vec<pb::Allocation>, Status> {
        Ok(self
            .client()
            .gc(with_timeout(req, IPAM_TIMEOUT))
            .await?
            .into_inner()
            .released)
    }

    async fn heartbeat(&self, node: &str) -> Result<(), Status> {
        TopologyClient::new(self.channel.clone())
            .heartbeat(with_timeout(
                pb::HeartbeatRequest {
                    node_name: node.to_owned(),
                },
                STATUS_TIMEOUT,
            ))
            .await?;
        Ok(())
    }
}

// === impl Pods for PodNetwork ===

impl Pods for PodNetwork {
    fn check_netns(&self, netns: &Path) -> Result<(), PodError> {
        super::pod::check_netns(netns)
    }

    async fn wire(&self, spec: &PodSpec) -> Result<Wired, PodError> {
        PodNetwork::wire(self, spec).await
    }

    async fn inspect(&self, netns: &Path, ifname: &str) -> Result<PodSide, PodError> {
        PodNetwork::inspect(self, netns, ifname).await
    }

    async fn delete_link(&self, name: &str) -> Result<(), PodError> {
        PodNetwork::delete_link(self, name).await
    }

    async fn host_side(&self, container_id: &str, ifname: &str) -> Result<Option<bool>, PodError> {
        PodNetwork::host_side(self, container_id, ifname).await
    }

    async fn host_veths(&self) -> Result<Vec<String>, PodError> {
        PodNetwork::host_veths(self).await
    }

    async fn bridge_exists(&self) -> Result<bool, PodError> {
        PodNetwork::bridge_exists(self).await
    }

    async fn flush_conntrack(&self, ip: &str) {
        flush_conntrack(ip).await
    }
}

/// Drops conntrack entries of a released address, so a new pod that later
/// gets it does not inherit flows. Best-effort: `conntrack` exits 1 when
/// nothing matched, and may not be installed.
async fn flush_conntrack(ip: &str) {
    let delete = |flag: &'static str| {
        tokio::process::Command::new("conntrack")
            .args(["-D", flag, ip])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
    };
    // Flows from and to the address, flushed side by side.
    let (from, to) = tokio::join!(delete("-s"), delete("-d"));
    if let Err(e) = from.and(to) {
        tracing::warn!(%ip, error = %e, "conntrack not available; flows of the released address are not flushed");
    }
}

#[cfg(test)]
pub mod fake {
    //! Recording fakes: each call is logged as a line, and each answer is
    //! set by the test beforehand.

    use std::{
        collections::HashMap,
        sync::{Arc, Mutex},
    };

    use super::*;
    use crate::cni::result::Interface;

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A server whose answers the test sets; `down` makes every call
    /// UNAVAILABLE.
    #[derive(Debug, Clone, Default)]
    pub struct FakeIpam {
        pub calls: Arc<Mutex<Vec<String>>>,
        pub down: Arc<Mutex<bool>>,
        /// container id → address (with prefix) it holds.
        pub held: Arc<Mutex<HashMap<String, String>>>,
        pub next: Arc<Mutex<u8>>,
    }

    impl FakeIpam {
        fn call(&self, line: String) -> Result<(), Status> {
            lock(&self.calls).push(line);
            if *lock(&self.down) {
                return Err(Status::unavailable("fake server down"));
            }
            Ok(())
        }

        pub fn calls(&self) -> Vec<String> {
            lock(&self.calls).clone()
        }
    }

    impl Ipam for FakeIpam {
        async fn allocate(&self, req: pb::AllocateRequest) -> Result<pb::AllocateResponse, Status> {
            self.call(format!("allocate {}", req.container_id))?;
            let mut held = lock(&self.held);
            let address = held
                .entry(req.container_id)
                .or_insert_with(|| {
                    let mut next = lock(&self.next);
                    *next += 1;
                    format!("10.244.0.{}/24", *next + 1)
                })
                .clone();
            Ok(pb::AllocateResponse {
                address,
                gateway: "10.244.0.1".into(),
                mtu: 0,
            })
        }

        async fn release(
            &self,
            _node: &str,
            container_id: &str,
            _ifname: &str,
        ) -> Result<Option<String>, Status> {
            self.call(format!("release {container_id}"))?;
            Ok(lock(&self.held)
                .remove(container_id)
                .map(|a| a.split('/').next().unwrap_or_default().to_owned()))
        }

        async fn lookup(&self, req: pb::LookupRequest) -> Result<pb::Allocation, Status> {
            self.call(format!("lookup {}", req.container_id))?;
            lock(&self.held)
                .get(&req.container_id)
                .map(|a| pb::Allocation {
                    address: a.clone(),
                    ..Default::default()
                })
                .ok_or_else(|| Status::not_found("no allocation"))
        }

        async fn gc(&self, req: pb::GcRequest) -> Result<Vec<pb::Allocation>, Status> {
            self.call(format!("gc {}", req.valid.len()))?;
            let keep: Vec<String> = req.valid.into_iter().map(|a| a.container_id).collect();
            let mut held = lock(&self.held);
            let gone: Vec<String> = held.keys().filter(|k| !keep.contains(k)).cloned().collect();
            Ok(gone
                .into_iter()
                .filter_map(|k| held.remove(&k))
                .map(|address| pb::Allocation {
                    address,
                    ..Default::default()
                })
                .collect())
        }

        async fn heartbeat(&self, _node: &str) -> Result<(), Status> {
            self.call("heartbeat".into())
        }
    }

    /// A kernel whose answers the test sets.
    #[derive(Debug, Clone, Default)]
    pub struct FakePods {
        pub calls: Arc<Mutex<Vec<String>>>,
        pub fail_wire: Arc<Mutex<Option<PodError>>>,
        pub fail_delete: Arc<Mutex<Option<PodError>>>,
        pub side: Arc<Mutex<PodSide>>,
        pub host_attached: Arc<Mutex<Option<bool>>>,
        pub veths: Arc<Mutex<Vec<String>>>,
    }

    impl FakePods {
        fn call(&self, line: String) {
            lock(&self.calls).push(line);
        }

        pub fn calls(&self) -> Vec<String> {
            lock(&self.calls).clone()
        }
    }

    impl Pods for FakePods {
        fn check_netns(&self, _netns: &Path) -> Result<(), PodError> {
            Ok(())
        }

        async fn wire(&self, spec: &PodSpec) -> Result<Wired, PodError> {
            self.call(format!("wire {} {}", spec.container_id, spec.address));
            if let Some(e) = lock(&self.fail_wire).clone() {
                return Err(e);
            }
            Ok(Wired {
                host: Interface {
                    name: crate::cni::pod::host_ifname(&spec.container_id, &spec.ifname),
                    mac: "02:00:00:00:00:01".into(),
                    sandbox: None,
                },
                container: Interface {
                    name: spec.ifname.clone(),
                    mac: "02:00:00:00:00:02".into(),
                    sandbox: Some(spec.netns.display().to_string()),
                },
                address: spec.address,
                gateway: spec.gateway,
                mtu: spec.mtu,
            })
        }

        async fn inspect(&self, _netns: &Path, ifname: &str) -> Result<PodSide, PodError> {
            self.call(format!("inspect {ifname}"));
            Ok(lock(&self.side).clone())
        }

        async fn delete_link(&self, name: &str) -> Result<(), PodError> {
            self.call(format!("delete_link {name}"));
            match lock(&self.fail_delete).clone() {
                Some(e) => Err(e),
                None => Ok(()),
            }
        }

        async fn host_side(&self, _cid: &str, _ifname: &str) -> Result<Option<bool>, PodError> {
            Ok(*lock(&self.host_attached))
        }

        async fn host_veths(&self) -> Result<Vec<String>, PodError> {
            Ok(lock(&self.veths).clone())
        }

        async fn bridge_exists(&self) -> Result<bool, PodError> {
            Ok(true)
        }

        async fn flush_conntrack(&self, ip: &str) {
            self.call(format!("flush_conntrack {ip}"));
        }
    }
}
