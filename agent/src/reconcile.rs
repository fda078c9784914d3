//! One reconcile pass: read the peer entries the kernel has, plan against
//! what the peer set implies, apply the plan; and one change: plan one
//! peer's entries before against after and apply that, with no read (a
//! change costs its own few requests, not a dump of every peer's entries).
//! Best-effort like a teardown: one failing entry does not stop the others,
//! and every failure is reported together.

use std::fmt;

use tracing::{debug, info};

use crate::{
    datapath::{Datapath, DatapathError},
    peers::{Entry, Peer, PeerSet, Plan, desired_entries, plan},
};

/// What one pass changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub added: usize,
    pub removed: usize,
}

#[derive(Debug)]
pub enum ReconcileError {
    /// The kernel state could not be read; nothing was changed.
    Read(DatapathError),
    /// Some changes failed; the rest were applied.
    Partial {
        applied: Applied,
        failed: Vec<(Entry, DatapathError)>,
    },
}

impl fmt::Display for ReconcileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReconcileError::Read(e) => write!(f, "reading peer entries: {e}"),
            ReconcileError::Partial { failed, .. } => {
                write!(f, "{} peer entry changes failed:", failed.len())?;
                for (entry, e) in failed {
                    write!(f, " [{entry}: {e}]")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ReconcileError {}

/// Splits an ordered plan into runs of one entry kind.
fn by_layer(entries: &[Entry]) -> Vec<&[Entry]> {
    entries
        .chunk_by(|a, b| std::mem::discriminant(a) == std::mem::discriminant(b))
        .collect()
}

pub async fn reconcile<D: Datapath>(dp: &D, peers: &PeerSet) -> Result<Applied, ReconcileError> {
    let current = dp.peer_entries().await.map_err(ReconcileError::Read)?;
    let desired = desired_entries(peers.peers());
    let plan = plan(&current, &desired);
    if plan.is_empty() {
        debug!(
            peers = peers.len(),
            revision = peers.revision(),
            "peer entries in sync"
        );
        return Ok(Applied::default());
    }
    apply(dp, &plan).await
}

/// Applies one peer's change (`None`: absent before, or after) without
/// reading the kernel: the entries of the peer as it was are planned
/// against the peer as it is. A kernel that drifted from the set is the
/// periodic reconcile's to repair.
pub async fn apply_change<D: Datapath>(
    dp: &D,
    before: Option<&Peer>,
    after: Option<&Peer>,
) -> Result<Applied, ReconcileError> {
    let plan = plan(&desired_entries(before), &desired_entries(after));
    apply(dp, &plan).await
}

async fn apply<D: Datapath>(dp: &D, plan: &Plan) -> Result<Applied, ReconcileError> {
    let mut applied = Applied::default();
    let mut failed = Vec::new();
    // Entries of one kind do not depend on each other: send them
    // together. Kinds still go in order (see `plan`).
    for group in by_layer(&plan.remove) {
        for (entry, result) in dp.apply_entries(group, false).await {
            match result {
                Ok(()) => {
                    applied.removed += 1;
                    info!(%entry, "removed");
                }
                Err(e) => failed.push((entry, e)),
            }
        }
    }
    for group in by_layer(&plan.add) {
        for (entry, result) in dp.apply_entries(group, true).await {
            match result {
                Ok(()) => {
                    applied.added += 1;
                    debug!(%entry, "added");
                }
                Err(e) => failed.push((entry, e)),
            }
        }
    }
    if applied.added > 0 {
        info!(added = applied.added, "peer entries added");
    }
    if failed.is_empty() {
        Ok(applied)
    } else {
        Err(ReconcileError::Partial { applied, failed })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::fake::RecordingDatapath;

    fn peer(name: &str, n: u8, mac: u8) -> Peer {
        Peer::parse(
            name,
            &format!("198.51.100.{n}"),
            &format!("02:00:00:00:00:{mac:02x}"),
            &format!("10.244.{n}.0/24"),
        )
        .unwrap()
    }

    fn set(peers: Vec<Peer>) -> PeerSet {
        let mut s = PeerSet::default();
        s.reset(1, peers, "self");
        s
    }

    #[tokio::test]
    async fn one_change_among_many_peers_costs_its_own_requests_and_no_read() {
        let many: Vec<Peer> = (2..=200).map(|n| peer(&format!("n{n}"), n, n)).collect();
        let mut s = set(many);
        let dp = RecordingDatapath::default();
        reconcile(&dp, &s).await.unwrap();
        dp.take_calls();
        let reads = *dp.reads.lock().unwrap();

        // A new node: its three entries, FDB first.
        let newcomer = peer("n201", 201, 201);
        s.upsert(2, newcomer.clone(), "self").unwrap();
        apply_change(&dp, None, s.get("n201")).await.unwrap();
        assert_eq!(
            dp.take_calls(),
            [
                "add fdb 02:00:00:00:00:c9 dst 198.51.100.201",
                "add neighbour 10.244.201.0 lladdr 02:00:00:00:00:c9",
                "add route 10.244.201.0/24 via 10.244.201.0 onlink",
            ]
        );
        // It moves to another underlay: one FDB entry out, one in; the
        // route and neighbour stay.
        let before = s.get("n201").cloned();
        let mut moved = newcomer.clone();
        moved.underlay_ip = "203.0.113.201".parse().unwrap();
        s.upsert(3, moved, "self").unwrap();
        apply_change(&dp, before.as_ref(), s.get("n201"))
            .await
            .unwrap();
        assert_eq!(
            dp.take_calls(),
            [
                "remove fdb 02:00:00:00:00:c9 dst 198.51.100.201",
                "add fdb 02:00:00:00:00:c9 dst 203.0.113.201",
            ]
        );
        // Deleted: its three entries, route first.
        let before = s.get("n201").cloned();
        s.remove(4, "n201");
        apply_change(&dp, before.as_ref(), None).await.unwrap();
        assert_eq!(dp.take_calls().len(), 3);
        assert_eq!(*dp.reads.lock().unwrap(), reads, "a change read the kernel");
        // And the kernel equals the set, as a reconcile would leave it.
        assert_eq!(*dp.entries.lock().unwrap(), desired_entries(s.peers()));
    }

    #[tokio::test]
    async fn adds_every_entry_of_a_new_peer_in_order() {
        let dp = RecordingDatapath::default();
        let applied = reconcile(&dp, &set(vec![peer("b", 2, 2)])).await.unwrap();
        assert_eq!(
            applied,
            Applied {
                added: 3,
                removed: 0
            }
        );
        assert_eq!(
            dp.calls(),
            [
                "add fdb 02:00:00:00:00:02 dst 198.51.100.2",
                "add neighbour 10.244.2.0 lladdr 02:00:00:00:00:02",
                "add route 10.244.2.0/24 via 10.244.2.0 onlink",
            ]
        );
    }

    #[tokio::test]
    async fn a_second_pass_changes_nothing() {
        let dp = RecordingDatapath::default();
        let peers = set(vec![peer("b", 2, 2), peer("c", 3, 3)]);
        reconcile(&dp, &peers).await.unwrap();
        dp.take_calls();
        assert_eq!(reconcile(&dp, &peers).await.unwrap(), Applied::default());
        assert!(dp.calls().is_empty());
    }

    #[tokio::test]
    async fn a_removed_peer_loses_all_three_entries() {
        let dp = RecordingDatapath::default();
        reconcile(&dp, &set(vec![peer("b", 2, 2), peer("c", 3, 3)]))
            .await
            .unwrap();
        dp.take_calls();
        reconcile(&dp, &set(vec![peer("b", 2, 2)])).await.unwrap();
        assert_eq!(
            dp.calls(),
            [
                "remove route 10.244.3.0/24 via 10.244.3.0 onlink",
                "remove neighbour 10.244.3.0 lladdr 02:00:00:00:00:03",
                "remove fdb 02:00:00:00:00:03 dst 198.51.100.3",
            ]
        );
        assert_eq!(dp.entries.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn a_mac_change_swaps_the_neighbour_and_fdb_entry() {
        let dp = RecordingDatapath::default();
        reconcile(&dp, &set(vec![peer("b", 2, 2)])).await.unwrap();
        dp.take_calls();
        reconcile(&dp, &set(vec![peer("b", 2, 0x22)]))
            .await
            .unwrap();
        assert_eq!(
            dp.calls(),
            [
                "remove fdb 02:00:00:00:00:02 dst 198.51.100.2",
                "add fdb 02:00:00:00:00:22 dst 198.51.100.2",
                "add neighbour 10.244.2.0 lladdr 02:00:00:00:00:22",
            ]
        );
        let expected = desired_entries(set(vec![peer("b", 2, 0x22)]).peers());
        assert_eq!(*dp.entries.lock().unwrap(), expected);
    }

    #[tokio::test]
    async fn an_underlay_change_moves_the_fdb_entry() {
        let dp = RecordingDatapath::default();
        reconcile(&dp, &set(vec![peer("b", 2, 2)])).await.unwrap();
        dp.take_calls();
        let mut moved = peer("b", 2, 2);
        moved.underlay_ip = "198.51.100.99".parse().unwrap();
        reconcile(&dp, &set(vec![moved])).await.unwrap();
        assert_eq!(
            dp.calls(),
            [
                "remove fdb 02:00:00:00:00:02 dst 198.51.100.2",
                "add fdb 02:00:00:00:00:02 dst 198.51.100.99"
            ]
        );
    }

    #[tokio::test]
    async fn a_snapshot_resync_removes_strays() {
        let stray = Entry::Route {
            block: "10.244.99.0/24".parse().unwrap(),
            via: "0.0.0.0".parse().unwrap(),
        };
        let mut kernel = desired_entries(set(vec![peer("b", 2, 2), peer("old", 7, 7)]).peers());
        kernel.insert(stray);
        let dp = RecordingDatapath::with_entries(kernel);
        let applied = reconcile(&dp, &set(vec![peer("b", 2, 2)])).await.unwrap();
        assert_eq!(
            applied,
            Applied {
                added: 0,
                removed: 4
            }
        );
        assert!(
            dp.calls()
                .contains(&"remove route 10.244.99.0/24 direct".to_string())
        );
        assert_eq!(
            *dp.entries.lock().unwrap(),
            desired_entries(set(vec![peer("b", 2, 2)]).peers())
        );
    }

    #[tokio::test]
    async fn one_failing_entry_does_not_stop_the_others() {
        let dp = RecordingDatapath::default();
        let bad = Entry::Fdb {
            mac: "02:00:00:00:00:02".parse().unwrap(),
            dst: "198.51.100.2".parse().unwrap(),
        };
        dp.failing.lock().unwrap().insert(bad);
        let err = reconcile(&dp, &set(vec![peer("b", 2, 2), peer("c", 3, 3)]))
            .await
            .unwrap_err();
        let ReconcileError::Partial { applied, failed } = err else {
            panic!("expected a partial failure")
        };
        assert_eq!(applied.added, 5);
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].0, bad);
    }
}
