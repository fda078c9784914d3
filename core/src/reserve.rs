//! Per-node reserves: the decisions shared by the server and the agent.
//! A node's addresses are either reserved (held for the node, unbound) or
//! bound to an attachment; [`plan_sync`] says what makes the database's
//! view of a node equal to the node's own, which is the ground truth of
//! what is wired (docs/design.md, "Per-node reserves").

use std::{collections::BTreeMap, net::Ipv4Addr};

/// What makes `stored` equal to `node`: rows to create, rows whose holder
/// changed, rows to remove. `None` is a reserved address, `Some(a)` one
/// bound to `a`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncPlan<A> {
    pub create: Vec<(Ipv4Addr, Option<A>)>,
    pub change: Vec<(Ipv4Addr, Option<A>)>,
    pub remove: Vec<Ipv4Addr>,
}

impl<A> SyncPlan<A> {
    pub fn is_empty(&self) -> bool {
        self.create.is_empty() && self.change.is_empty() && self.remove.is_empty()
    }
}

/// Compares the database's rows of a node with what the node holds. The
/// node wins everywhere: it is the only one that binds addresses of its
/// block, and a row it does not hold is one the database kept by mistake
/// (a lost release) or one a lost commit dropped (a lost bind).
pub fn plan_sync<A: Clone + PartialEq>(
    stored: &BTreeMap<Ipv4Addr, Option<A>>,
    node: &BTreeMap<Ipv4Addr, Option<A>>,
) -> SyncPlan<A> {
    let mut plan = SyncPlan {
        create: Vec::new(),
        change: Vec::new(),
        remove: Vec::new(),
    };
    for (ip, held) in node {
        match stored.get(ip) {
            None => plan.create.push((*ip, held.clone())),
            Some(s) if s != held => plan.change.push((*ip, held.clone())),
            Some(_) => {}
        }
    }
    plan.remove = stored
        .keys()
        .filter(|ip| !node.contains_key(ip))
        .copied()
        .collect();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, 0, last)
    }

    #[test]
    fn the_node_wins_every_difference_and_equal_views_plan_nothing() {
        let stored: BTreeMap<_, _> = [
            (ip(2), Some("a")), // still bound to a
            (ip(3), Some("b")), // the node released it: lost release
            (ip(4), None),      // the node bound it: lost bind
            (ip(5), None),      // the node no longer holds it at all
        ]
        .into();
        let node: BTreeMap<_, _> = [
            (ip(2), Some("a")),
            (ip(3), None),
            (ip(4), Some("c")),
            (ip(6), Some("d")), // bound while the database lost the row
        ]
        .into();
        let plan = plan_sync(&stored, &node);
        assert_eq!(plan.create, [(ip(6), Some("d"))]);
        assert_eq!(plan.change, [(ip(3), None), (ip(4), Some("c"))]);
        assert_eq!(plan.remove, [ip(5)]);
        assert!(plan_sync(&node, &node).is_empty());
    }
}
