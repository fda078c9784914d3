//! Bringing the node up: find the underlay, register (retrying while the
//! server is away), build the datapath for the assignment, and keep
//! heartbeating; a heartbeat that finds the node deleted fences the CNI
//! service.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, bail};
use ipnet::Ipv4Net;
use tokio::sync::watch;
use tonic::{Code, transport::Channel};
use tracing::{error, warn};
use weft_proto::v1::{self as pb, topology_client::TopologyClient};

use weft_core::domain::MacAddr;

use crate::{
    config::Config,
    datapath::{
        BridgeSpec, Datapath, MasqueradeSpec, Underlay, VXLAN_OVERHEAD, VtepSpec,
        netlink::NetlinkDatapath,
    },
    sync::Backoff,
};

/// Bound on every unary call to the server.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// What the server assigned to this node.
#[derive(Debug, Clone)]
pub struct NodeAssignment {
    pub block: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub vni: u32,
    pub cluster_cidr: Ipv4Net,
    pub mtu_hint: u32,
    /// The node row's epoch (docs/design.md, fencing).
    pub epoch: u64,
    /// The server's cap on the reserve lease.
    pub reserve_lease_seconds: u32,
}

/// The assignment a saved node file describes, if it is complete (files
/// written before reserves lack the gateway, VNI and cluster CIDR). The
/// saved pod MTU becomes the hint, so the rebuilt datapath has the MTU the
/// pods were wired with.
pub fn saved_assignment(saved: &crate::state::SavedNode) -> Option<NodeAssignment> {
    Some(NodeAssignment {
        block: saved.block.parse().ok()?,
        gateway: saved.gateway.as_deref()?.parse().ok()?,
        vni: saved.vni?,
        cluster_cidr: saved.cluster_cidr.as_deref()?.parse().ok()?,
        mtu_hint: saved.mtu,
        epoch: 0,
        reserve_lease_seconds: 0,
    })
}

pub async fn find_underlay(config: &Config, dp: &NetlinkDatapath) -> anyhow::Result<Underlay> {
    let mut underlay = match (&config.underlay_interface, config.underlay_ip) {
        (Some(name), ip) => dp.underlay_named(name, ip).await?,
        (None, Some(ip)) => dp.underlay_with_ip(ip).await?,
        (None, None) => {
            let server = crate::client::resolve_server(config).await?;
            dp.underlay_toward(server)
                .await
                .with_context(|| format!("finding the underlay toward the server at {server}"))?
        }
    };
    if let Some(mtu) = config.underlay_mtu {
        underlay.mtu = mtu;
    }
    Ok(underlay)
}

/// Registers the node, retrying with backoff while the server cannot be
/// reached; a request the server rejects is fatal (it will not change).
pub async fn register(
    client: &mut TopologyClient<Channel>,
    node: &str,
    underlay: Ipv4Addr,
    mac: MacAddr,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<Option<NodeAssignment>> {
    let mut backoff = Backoff::default();
    loop {
        let mut request = tonic::Request::new(pb::RegisterNodeRequest {
            node_name: node.to_owned(),
            underlay_ip: underlay.to_string(),
            vtep_mac: mac.to_string(),
        });
        request.set_timeout(RPC_TIMEOUT);
        let result = tokio::select! {
            () = crate::sync::stopped(stop) => return Ok(None),
            r = client.register_node(request) => r,
        };
        match result {
            Ok(r) => {
                let r = r.into_inner();
                return Ok(Some(NodeAssignment {
                    block: r
                        .block
                        .parse()
                        .with_context(|| format!("server sent block {:?}", r.block))?,
                    gateway: r
                        .gateway
                        .parse()
                        .with_context(|| format!("server sent gateway {:?}", r.gateway))?,
                    vni: r.vni,
                    cluster_cidr: r.cluster_cidr.parse().with_context(|| {
                        format!("server sent cluster CIDR {:?}", r.cluster_cidr)
                    })?,
                    mtu_hint: r.mtu_hint,
                    epoch: r.epoch,
                    reserve_lease_seconds: r.reserve_lease_seconds,
                }));
            }
            Err(s)
                if matches!(
                    s.code(),
                    Code::InvalidArgument
                        | Code::ResourceExhausted
                        | Code::PermissionDenied
                        | Code::AlreadyExists
                ) =>
            {
                bail!(
                    "the server refused to register node {node}: {}",
                    s.message()
                );
            }
            Err(s) => {
                let delay = backoff.next_delay();
                warn!(code = ?s.code(), message = s.message(), retry_in = ?delay, "server unreachable; retrying registration");
                tokio::select! {
                    () = crate::sync::stopped(stop) => return Ok(None),
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Builds the node's datapath for its assignment. Idempotent: on a
/// configured node nothing changes.
pub async fn build_datapath<D: Datapath>(
    dp: &D,
    underlay: &Underlay,
    mac: MacAddr,
    assignment: &NodeAssignment,
) -> anyhow::Result<u32> {
    let mtu = if assignment.mtu_hint > 0 {
        assignment.mtu_hint
    } else {
        underlay.mtu.saturating_sub(VXLAN_OVERHEAD)
    };
    dp.ensure_vtep(&VtepSpec {
        vni: assignment.vni,
        local: underlay.ip,
        underlay_ifindex: underlay.ifindex,
        mtu,
        mac,
        address: weft_core::ipam::vtep_address(assignment.block),
    })
    .await
    .context("setting up the VXLAN device")?;
    dp.ensure_bridge(&BridgeSpec {
        gateway: Ipv4Net::new(assignment.gateway, assignment.block.prefix_len())?,
        mtu,
        mac: weft_core::names::bridge_mac_for(mac),
    })
    .await
    .context("setting up the bridge")?;
    dp.ensure_forwarding()
        .await
        .context("enabling forwarding")?;
    dp.ensure_masquerade(&MasqueradeSpec {
        block: assignment.block,
        cluster: assignment.cluster_cidr,
    })
    .await
    .context("installing the masquerade rule")?;
    Ok(mtu)
}

pub async fn heartbeats(
    mut client: TopologyClient<Channel>,
    node: String,
    every: Duration,
    phase: watch::Sender<crate::cni::NodePhase>,
    reserve: std::sync::Arc<crate::reserve::Reserve>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = crate::sync::stopped(&mut stop) => return,
            _ = tick.tick() => {}
        }
        let mut request = tonic::Request::new(pb::HeartbeatRequest {
            node_name: node.clone(),
        });
        request.set_timeout(RPC_TIMEOUT);
        match client.heartbeat(request).await {
            // The reserve lease runs from the last answer.
            Ok(_) => {
                if let Err(e) = reserve.contact() {
                    warn!(error = %e, "cannot journal the server's contact");
                }
            }
            // Deleted by an operator: re-registering on our own would undo
            // the deletion, so stop wiring new pods (the block is
            // quarantined for the pods still here) and leave it to them.
            Err(s) if s.code() == Code::NotFound => {
                let fenced = phase.send_if_modified(|p| match *p {
                    crate::cni::NodePhase::Ready { mtu } => {
                        *p = crate::cni::NodePhase::Fenced { mtu };
                        true
                    }
                    _ => false,
                });
                if fenced {
                    error!(%node, "this node was deleted from weft-server; no new pods are wired here; restart the agent to register it again");
                }
            }
            Err(s) => warn!(code = ?s.code(), message = s.message(), "heartbeat failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::fake::RecordingDatapath;
    use weft_core::names::{bridge_mac_for, vtep_mac_for};

    fn assignment(mtu_hint: u32) -> NodeAssignment {
        NodeAssignment {
            block: "10.244.3.0/24".parse().unwrap(),
            gateway: "10.244.3.1".parse().unwrap(),
            vni: 1,
            cluster_cidr: "10.244.0.0/16".parse().unwrap(),
            mtu_hint,
            epoch: 1,
            reserve_lease_seconds: 1800,
        }
    }

    fn underlay() -> Underlay {
        Underlay {
            ip: "198.51.100.3".parse().unwrap(),
            ifindex: 2,
            ifname: "eth0".into(),
            mtu: 1500,
        }
    }

    #[tokio::test]
    async fn the_datapath_is_built_vtep_first_with_the_overhead_subtracted() {
        let dp = RecordingDatapath::default();
        let mac = vtep_mac_for("n");
        let mtu = build_datapath(&dp, &underlay(), mac, &assignment(0))
            .await
            .unwrap();
        assert_eq!(mtu, 1450);
        assert_eq!(
            dp.calls(),
            [
                format!("ensure_vtep vni=1 local=198.51.100.3 mtu=1450 mac={mac}"),
                format!(
                    "ensure_bridge 10.244.3.1/24 mtu=1450 mac={}",
                    bridge_mac_for(mac)
                ),
                "ensure_forwarding".to_string(),
                "ensure_masquerade 10.244.3.0/24 !10.244.0.0/16".to_string(),
            ]
        );
    }

    #[tokio::test]
    async fn a_server_mtu_hint_wins() {
        let dp = RecordingDatapath::default();
        assert_eq!(
            build_datapath(&dp, &underlay(), vtep_mac_for("n"), &assignment(1400))
                .await
                .unwrap(),
            1400
        );
    }
}
