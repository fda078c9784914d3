//! What the CNI service needs from the outside, in domain terms: the
//! server's side of the node's reserve ([`Ipam`], over gRPC in [`GrpcIpam`]) and the kernel's pod
//! plumbing ([`Pods`], on rtnetlink in [`super::pod::PodNetwork`]). The
//! service is generic over both, so its decisions (rollback, DEL
//! aggregation, CHECK drift, GC selection) are unit-tested against the
//! recording fakes in [`fake`] without root.

use std::{collections::HashSet, future::Future, net::Ipv4Addr, path::Path, time::Duration};

use tonic::{Request, Status, transport::Channel};
use weft_proto::v1::{self as pb, ipam_client::IpamClient, topology_client::TopologyClient};

use super::{
    pod::{PodNetwork, PodSide, PodSpec},
    pod_error::PodError,
    result::Wired,
};

/// Background calls give up this soon (the reporter retries).
const IPAM_TIMEOUT: Duration = Duration::from_secs(5);
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// The server's side of the node's reserve (docs/design.md), for one node.
pub trait Ipam: Clone + Send + Sync + 'static {
    fn reserve(
        &self,
        req: pb::ReserveRequest,
    ) -> impl Future<Output = Result<pb::ReserveResponse, Status>> + Send;
    fn report(
        &self,
        req: pb::ReportRequest,
    ) -> impl Future<Output = Result<pb::ReportResponse, Status>> + Send;
    fn sync(
        &self,
        req: pb::SyncRequest,
    ) -> impl Future<Output = Result<pb::SyncResponse, Status>> + Send;
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
    /// Makes a host veth's pod unreachable now and deletes the veth in the
    /// background; a missing one is not an error.
    fn unlink(&self, name: &str) -> impl Future<Output = Result<(), PodError>> + Send;
    /// Deletes the veths DELs cut off, among `only` or all; those it left.
    fn reap_cut_off(
        &self,
        only: Option<&HashSet<String>>,
    ) -> impl Future<Output = Result<Vec<String>, PodError>> + Send;
    /// `None`: the host end is missing; `Some(attached to weft0)`.
    fn host_side(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> impl Future<Output = Result<Option<bool>, PodError>> + Send;
    fn host_veths(&self) -> impl Future<Output = Result<Vec<String>, PodError>> + Send;
    fn bridge_exists(&self) -> impl Future<Output = Result<bool, PodError>> + Send;
    /// Drops conntrack entries of a released address, best-effort.
    fn flush_conntrack(&self, ip: Ipv4Addr) -> impl Future<Output = ()> + Send;
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
    async fn reserve(&self, req: pb::ReserveRequest) -> Result<pb::ReserveResponse, Status> {
        Ok(self
            .client()
            .reserve(with_timeout(req, IPAM_TIMEOUT))
            .await?
            .into_inner())
    }

    async fn report(&self, req: pb::ReportRequest) -> Result<pb::ReportResponse, Status> {
        Ok(self
            .client()
            .report(with_timeout(req, IPAM_TIMEOUT))
            .await?
            .into_inner())
    }

    async fn sync(&self, req: pb::SyncRequest) -> Result<pb::SyncResponse, Status> {
        Ok(self
            .client()
            .sync(with_timeout(req, IPAM_TIMEOUT))
            .await?
            .into_inner())
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

    async fn unlink(&self, name: &str) -> Result<(), PodError> {
        PodNetwork::unlink(self, name).await
    }

    async fn reap_cut_off(&self, only: Option<&HashSet<String>>) -> Result<Vec<String>, PodError> {
        PodNetwork::reap_cut_off(self, only).await
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

    async fn flush_conntrack(&self, ip: Ipv4Addr) {
        super::conntrack::flush(ip).await
    }
}

#[cfg(test)]
pub mod fake {
    //! Recording fakes: each call is logged as a line, and each answer is
    //! set by the test beforehand.

    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::cni::result::Interface;

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A server that reserves 10.244.0.2.. in order and records what it
    /// is told; `down` makes every call UNAVAILABLE.
    #[derive(Debug, Clone, Default)]
    pub struct FakeIpam {
        pub calls: Arc<Mutex<Vec<String>>>,
        pub down: Arc<Mutex<bool>>,
        pub next: Arc<Mutex<u8>>,
        /// Events recorded, in order.
        pub recorded: Arc<Mutex<Vec<pb::BindingEvent>>>,
        pub synced: Arc<Mutex<Option<pb::SyncRequest>>>,
        /// The UNAVAILABLE message while `down` (default: the server is away).
        pub down_message: Arc<Mutex<Option<String>>>,
    }

    impl FakeIpam {
        fn call(&self, line: String) -> Result<(), Status> {
            lock(&self.calls).push(line);
            if *lock(&self.down) {
                let msg = lock(&self.down_message).clone();
                return Err(Status::unavailable(
                    msg.unwrap_or_else(|| "fake server down".into()),
                ));
            }
            Ok(())
        }

        pub fn calls(&self) -> Vec<String> {
            lock(&self.calls).clone()
        }

        pub fn recorded(&self) -> Vec<String> {
            lock(&self.recorded)
                .iter()
                .map(|e| format!("{} {:?} {} {}", e.seq, e.kind(), e.container_id, e.address))
                .collect()
        }
    }

    impl Ipam for FakeIpam {
        async fn reserve(&self, req: pb::ReserveRequest) -> Result<pb::ReserveResponse, Status> {
            self.call(format!("reserve {}", req.count))?;
            let mut next = lock(&self.next);
            let addresses = (0..req.count)
                .map(|_| {
                    *next += 1;
                    format!("10.244.0.{}", *next + 1)
                })
                .collect();
            Ok(pb::ReserveResponse {
                addresses,
                bound: Vec::new(),
            })
        }

        async fn report(&self, req: pb::ReportRequest) -> Result<pb::ReportResponse, Status> {
            self.call(format!("report {}", req.events.len()))?;
            let mut recorded = lock(&self.recorded);
            let mut last = recorded.last().map(|e| e.seq).unwrap_or(0);
            for e in req.events {
                if e.seq > last {
                    last = e.seq;
                    recorded.push(e);
                }
            }
            Ok(pb::ReportResponse {
                applied_seq: last,
                resync: false,
            })
        }

        async fn sync(&self, req: pb::SyncRequest) -> Result<pb::SyncResponse, Status> {
            self.call(format!("sync {} bound", req.bound.len()))?;
            *lock(&self.synced) = Some(req);
            Ok(pb::SyncResponse::default())
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

        async fn unlink(&self, name: &str) -> Result<(), PodError> {
            self.call(format!("unlink {name}"));
            match lock(&self.fail_delete).clone() {
                Some(e) => Err(e),
                None => Ok(()),
            }
        }

        async fn reap_cut_off(
            &self,
            _only: Option<&HashSet<String>>,
        ) -> Result<Vec<String>, PodError> {
            Ok(Vec::new())
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

        async fn flush_conntrack(&self, ip: Ipv4Addr) {
            self.call(format!("flush_conntrack {ip}"));
        }
    }
}
