//! Peer sync: holds a WatchPeers stream to the server, folds its snapshots
//! and changes into the [`PeerSet`], and brings the kernel along: a
//! snapshot by a reconcile (dump, diff, apply), one peer's change by that
//! change's few requests alone.
//! A broken stream is reopened with backoff from the last applied revision,
//! so the server sends only what was missed (or a snapshot, after which
//! every Weft-owned entry not in it is removed). A periodic pass repairs
//! entries changed behind the agent's back.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;
use tonic::transport::Channel;
use tracing::{error, info, warn};
use weft_proto::v1::{self as pb, peer_event::Event, topology_client::TopologyClient};

use crate::{
    datapath::Datapath,
    metrics::AgentMetrics,
    peers::{BadPeer, Peer, PeerSet},
    reconcile::{apply_change, reconcile},
};

/// How often the kernel is re-checked without any event.
const RESYNC_INTERVAL: Duration = Duration::from_secs(30);

/// Resolves once `stop` turns true (or its sender is gone). Unlike
/// `wait_for`, it holds no borrow of the value across an await.
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

pub use weft_plumbing::Backoff;

/// Peers per snapshot page asked of the server: ~50 bytes each on the wire,
/// so a page (~6 KiB) fits the 8 KiB encode buffer each stream keeps
/// (`weft_proto::codec`), and a 5,000-node snapshot grows no buffer.
pub const SNAPSHOT_PAGE_SIZE: u32 = 128;

/// Gathers the pages of a snapshot into the one snapshot they make; one per
/// stream.
#[derive(Debug, Default)]
pub struct SnapshotPages {
    revision: u64,
    peers: Vec<pb::Peer>,
}

impl SnapshotPages {
    /// The event to apply: a change as it came, a snapshot once its last
    /// page arrived, `None` while pages are still to come.
    pub fn gather(&mut self, event: pb::PeerEvent) -> Option<pb::PeerEvent> {
        let Some(Event::Snapshot(mut page)) = event.event else {
            // Pages of one snapshot come together; a change cannot split
            // them, so what was gathered is no snapshot.
            self.peers.clear();
            return Some(event);
        };
        if self.revision != event.revision {
            self.peers.clear();
            self.revision = event.revision;
        }
        self.peers.append(&mut page.peers);
        if page.more {
            return None;
        }
        Some(pb::PeerEvent {
            revision: event.revision,
            event: Some(Event::Snapshot(pb::PeerSnapshot {
                peers: std::mem::take(&mut self.peers),
                more: false,
            })),
        })
    }
}

fn peer_from(p: &pb::Peer) -> Result<Peer, BadPeer> {
    Peer::parse(&p.node_name, &p.underlay_ip, &p.vtep_mac, &p.block)
}

/// Folds one event into the set. A malformed peer is skipped (and
/// reported) rather than programmed wrong; the revision still advances.
pub fn apply_event(
    set: &mut PeerSet,
    event: &pb::PeerEvent,
    own: &str,
) -> Result<(), Vec<BadPeer>> {
    if event.revision <= set.revision() && !matches!(event.event, Some(Event::Snapshot(_))) {
        return Ok(());
    }
    let mut bad = Vec::new();
    match &event.event {
        Some(Event::Snapshot(s)) => {
            let peers = s
                .peers
                .iter()
                .filter_map(|p| peer_from(p).map_err(|e| bad.push(e)).ok())
                .collect();
            bad.extend(set.reset(event.revision, peers, own));
        }
        Some(Event::Upsert(p)) => match peer_from(p) {
            Ok(peer) => {
                if let Err(e) = set.upsert(event.revision, peer, own) {
                    bad.push(e);
                }
            }
            Err(e) => {
                // Better no tunnel to that node than a wrong one.
                set.remove(event.revision, &p.node_name);
                bad.push(e);
            }
        },
        Some(Event::Delete(name)) => set.remove(event.revision, name),
        None => set.remove(event.revision, ""),
    }
    if bad.is_empty() { Ok(()) } else { Err(bad) }
}

#[derive(Debug)]
pub struct PeerSync<D> {
    pub datapath: Arc<D>,
    pub client: TopologyClient<Channel>,
    pub node: String,
    /// This node's block: no peer may claim it.
    pub own_block: ipnet::Ipv4Net,
    pub metrics: AgentMetrics,
}

impl<D: Datapath + 'static> PeerSync<D> {
    /// Runs until `stop` turns true. `synced` turns true after the first
    /// successful reconcile against the server's view.
    pub async fn run(mut self, synced: watch::Sender<bool>, mut stop: watch::Receiver<bool>) {
        let mut set = PeerSet::with_own_block(self.own_block);
        let mut backoff = Backoff::default();
        let mut resync = tokio::time::interval(RESYNC_INTERVAL);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let request = pb::WatchPeersRequest {
                node_name: self.node.clone(),
                since_revision: set.revision(),
                snapshot_page_size: SNAPSHOT_PAGE_SIZE,
            };
            let opened = tokio::select! {
                () = crate::sync::stopped(&mut stop) => return,
                r = self.client.watch_peers(request) => r,
            };
            match opened {
                Err(status) => {
                    warn!(code = ?status.code(), message = status.message(), "cannot watch peers; retrying")
                }
                Ok(response) => {
                    info!(since = set.revision(), "watching peers");
                    let mut stream = response.into_inner();
                    let mut pages = SnapshotPages::default();
                    loop {
                        tokio::select! {
                            () = crate::sync::stopped(&mut stop) => return,
                            _ = resync.tick() => {
                                let was_synced = *synced.borrow();
                                if was_synced {
                                    self.reconcile(&set, &synced).await;
                                }
                            }
                            msg = stream.message() => match msg {
                                Ok(Some(event)) => {
                                    backoff.reset();
                                    let Some(event) = pages.gather(event) else {
                                        continue;
                                    };
                                    // One peer's change is applied as that
                                    // change; a snapshot (a new stream) is
                                    // reconciled against the kernel.
                                    let changed = match &event.event {
                                        Some(Event::Upsert(p)) => Some(p.node_name.clone()),
                                        Some(Event::Delete(name)) => Some(name.clone()),
                                        _ => None,
                                    };
                                    let before = changed.as_deref().and_then(|n| set.get(n).cloned());
                                    if let Err(bad) = apply_event(&mut set, &event, &self.node) {
                                        for e in bad {
                                            error!(error = %e, "peer not programmed");
                                        }
                                    }
                                    self.metrics.peers.set(i64::try_from(set.len()).unwrap_or(i64::MAX));
                                    match changed {
                                        Some(name) if *synced.borrow() => {
                                            let after = set.get(&name);
                                            self.apply_change(&set, before.as_ref(), after, &synced).await;
                                        }
                                        _ => self.reconcile(&set, &synced).await,
                                    }
                                }
                                Ok(None) => {
                                    warn!("server ended the peer stream; reconnecting");
                                    break;
                                }
                                Err(status) => {
                                    warn!(code = ?status.code(), message = status.message(), "peer stream broke; reconnecting");
                                    break;
                                }
                            }
                        }
                    }
                }
            }
            let delay = backoff.next_delay();
            tokio::select! {
                () = crate::sync::stopped(&mut stop) => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Applies one peer's change; if any of it fails, the whole set is
    /// reconciled against the kernel instead.
    async fn apply_change(
        &self,
        set: &PeerSet,
        before: Option<&Peer>,
        after: Option<&Peer>,
        synced: &watch::Sender<bool>,
    ) {
        match apply_change(self.datapath.as_ref(), before, after).await {
            Ok(applied) => self
                .metrics
                .count_reconcile("ok", applied.added + applied.removed),
            Err(e) => {
                warn!(error = %e, revision = set.revision(), "applying a peer change; reconciling every entry");
                self.reconcile(set, synced).await;
            }
        }
    }

    async fn reconcile(&self, set: &PeerSet, synced: &watch::Sender<bool>) {
        match reconcile(self.datapath.as_ref(), set).await {
            Ok(applied) => {
                self.metrics
                    .count_reconcile("ok", applied.added + applied.removed);
                let was_synced = *synced.borrow();
                if !was_synced {
                    info!(
                        peers = set.len(),
                        revision = set.revision(),
                        "peer entries in sync"
                    );
                    synced.send_replace(true);
                }
            }
            Err(e) => {
                self.metrics.count_reconcile("error", 0);
                error!(error = %e, revision = set.revision(), "reconciling peer entries");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pb_peer(name: &str, n: u8) -> pb::Peer {
        pb::Peer {
            node_name: name.into(),
            underlay_ip: format!("198.51.100.{n}"),
            vtep_mac: format!("02:00:00:00:00:{n:02x}"),
            block: format!("10.244.{n}.0/24"),
        }
    }

    fn ev(revision: u64, event: Event) -> pb::PeerEvent {
        pb::PeerEvent {
            revision,
            event: Some(event),
        }
    }

    fn page(revision: u64, peers: Vec<pb::Peer>, more: bool) -> pb::PeerEvent {
        ev(revision, Event::Snapshot(pb::PeerSnapshot { peers, more }))
    }

    fn names(event: &pb::PeerEvent) -> Vec<&str> {
        match &event.event {
            Some(Event::Snapshot(s)) => s.peers.iter().map(|p| p.node_name.as_str()).collect(),
            other => panic!("not a snapshot: {other:?}"),
        }
    }

    #[test]
    fn snapshot_pages_are_applied_only_whole() {
        let mut pages = SnapshotPages::default();
        assert!(pages.gather(page(7, vec![pb_peer("a", 1)], true)).is_none());
        assert!(pages.gather(page(7, vec![pb_peer("b", 2)], true)).is_none());
        let whole = pages.gather(page(7, vec![pb_peer("c", 3)], false)).unwrap();
        assert_eq!(whole.revision, 7);
        assert_eq!(names(&whole), ["a", "b", "c"]);

        // The next snapshot starts empty, even one with no peers at all.
        let empty = pages.gather(page(9, Vec::new(), false)).unwrap();
        assert!(names(&empty).is_empty());

        // Pages of an unfinished snapshot never leak into a later one.
        assert!(
            pages
                .gather(page(10, vec![pb_peer("x", 4)], true))
                .is_none()
        );
        let whole = pages
            .gather(page(12, vec![pb_peer("y", 5)], false))
            .unwrap();
        assert_eq!(names(&whole), ["y"]);
        assert!(
            pages
                .gather(page(13, vec![pb_peer("x", 4)], true))
                .is_none()
        );
        let change = pages.gather(ev(14, Event::Delete("a".into()))).unwrap();
        assert_eq!(change.event, Some(Event::Delete("a".into())));
        let whole = pages
            .gather(page(15, vec![pb_peer("z", 6)], false))
            .unwrap();
        assert_eq!(names(&whole), ["z"]);
    }

    #[test]
    fn events_fold_into_the_peer_set() {
        let mut set = PeerSet::default();
        apply_event(
            &mut set,
            &ev(
                3,
                Event::Snapshot(pb::PeerSnapshot {
                    peers: vec![pb_peer("a", 1), pb_peer("me", 9)],
                    more: false,
                }),
            ),
            "me",
        )
        .unwrap();
        apply_event(&mut set, &ev(4, Event::Upsert(pb_peer("b", 2))), "me").unwrap();
        apply_event(&mut set, &ev(5, Event::Delete("a".into())), "me").unwrap();
        // A replayed old event changes nothing.
        apply_event(&mut set, &ev(4, Event::Upsert(pb_peer("a", 1))), "me").unwrap();
        assert_eq!(set.revision(), 5);
        let names: Vec<&str> = set.peers().map(|p| p.node_name.as_str()).collect();
        assert_eq!(names, ["b"]);
    }

    #[test]
    fn a_malformed_upsert_withdraws_the_peer_and_is_reported() {
        let mut set = PeerSet::default();
        apply_event(&mut set, &ev(1, Event::Upsert(pb_peer("b", 2))), "me").unwrap();
        let mut bad = pb_peer("b", 2);
        bad.vtep_mac = "garbage".into();
        let err = apply_event(&mut set, &ev(2, Event::Upsert(bad)), "me").unwrap_err();
        assert_eq!(err.len(), 1);
        assert!(set.is_empty());
        assert_eq!(set.revision(), 2);
    }
}
