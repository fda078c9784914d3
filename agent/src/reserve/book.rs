//! The node's address book, pure: the reserve (addresses the server
//! reserved for this node, unbound), the bindings (address per
//! attachment), and the events not yet recorded by the server. Every
//! change is a [`Record`]; [`Book::apply`] is the one place a record takes
//! effect, used both live and when the journal is replayed, so the book
//! after a crash is the book before it.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet, VecDeque},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// (container id, ifname).
pub type Key = (String, String);

/// The pod an attachment belongs to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// An address wired (or being wired) to an attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bound {
    pub address: Ipv4Addr,
    pub pod: Pod,
    /// Node clock, milliseconds since the Unix epoch.
    pub at_ms: i64,
    pub offline: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Bind,
    Release,
}

/// A bind or release the server has not recorded yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Report sequence number: 1, 2, 3, ... per epoch, without gaps.
    pub rseq: u64,
    pub kind: EventKind,
    pub container_id: String,
    pub ifname: String,
    pub address: Ipv4Addr,
    pub pod: Pod,
    pub at_ms: i64,
    pub offline: bool,
}

/// One change of the book, as the journal stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Record {
    /// The node registered under a new epoch: the old reserve is void.
    Epoch {
        epoch: u64,
        block: Ipv4Net,
        gateway: Ipv4Addr,
        lease_ms: i64,
    },
    Grant {
        addresses: Vec<Ipv4Addr>,
    },
    Bind(Event),
    Release(Event),
    /// The server recorded events up to `rseq`.
    Ack {
        rseq: u64,
    },
    /// A server answered (the lease runs from here).
    Contact {
        at_ms: i64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    #[error("this node has never registered with weft-server, so it holds no addresses yet")]
    NeverRegistered,
    #[error("the node's address reserve is empty")]
    Exhausted,
    #[error(
        "weft-agent has not heard from weft-server for {silent_s} s, longer than the reserve lease ({lease_s} s): \
         the node may have been deleted, so its reserve is not used"
    )]
    LeaseExpired { silent_s: i64, lease_s: i64 },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Book {
    pub epoch: u64,
    pub block: Option<Ipv4Net>,
    pub gateway: Option<Ipv4Addr>,
    pub lease_ms: i64,
    pub last_contact_ms: i64,
    pub free: VecDeque<Ipv4Addr>,
    #[serde(with = "as_entries")]
    pub bound: BTreeMap<Key, Bound>,
    /// Last report sequence number handed out.
    pub rseq: u64,
    /// Highest report sequence number the server recorded.
    pub acked: u64,
    pub pending: VecDeque<Event>,
    /// Released addresses whose old flows are still being flushed from
    /// conntrack: free, but not bound until the flush is done, so a new
    /// pod never inherits a dead one's connections. In memory only.
    #[serde(skip)]
    pub held: BTreeSet<Ipv4Addr>,
}

/// JSON maps need string keys: the bindings are stored as a list.
mod as_entries {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{Bound, Key};

    pub fn serialize<S: Serializer>(m: &BTreeMap<Key, Bound>, s: S) -> Result<S::Ok, S::Error> {
        m.iter().collect::<Vec<_>>().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<Key, Bound>, D::Error> {
        Ok(Vec::<(Key, Bound)>::deserialize(d)?.into_iter().collect())
    }
}

impl Book {
    /// Applies one record. Records are facts already decided by the
    /// methods below, so applying never fails; replaying a journal applies
    /// the same records in the same order.
    pub fn apply(&mut self, record: &Record) {
        match record {
            Record::Epoch {
                epoch,
                block,
                gateway,
                lease_ms,
            } => {
                self.epoch = *epoch;
                self.block = Some(*block);
                self.gateway = Some(*gateway);
                self.lease_ms = *lease_ms;
                self.free.clear();
                self.rseq = 0;
                self.acked = 0;
                self.pending.clear();
            }
            Record::Grant { addresses } => {
                let known = self.known();
                let mut seen = HashSet::new();
                for ip in addresses {
                    if !known.contains(ip) && seen.insert(*ip) {
                        self.free.push_back(*ip);
                    }
                }
            }
            Record::Bind(e) => {
                self.free.retain(|ip| *ip != e.address);
                self.bound.insert(
                    (e.container_id.clone(), e.ifname.clone()),
                    Bound {
                        address: e.address,
                        pod: e.pod.clone(),
                        at_ms: e.at_ms,
                        offline: e.offline,
                    },
                );
                self.push_event(e);
            }
            Record::Release(e) => {
                let key = (e.container_id.clone(), e.ifname.clone());
                if self.bound.remove(&key).is_some() && !self.free.contains(&e.address) {
                    // Last to come back, as host-local's round-robin.
                    if self.block.is_some_and(|b| b.contains(&e.address)) {
                        self.free.push_back(e.address);
                    }
                }
                self.push_event(e);
            }
            Record::Ack { rseq } => {
                self.acked = self.acked.max(*rseq);
                while self.pending.front().is_some_and(|e| e.rseq <= self.acked) {
                    self.pending.pop_front();
                }
            }
            Record::Contact { at_ms } => {
                self.last_contact_ms = self.last_contact_ms.max(*at_ms);
            }
        }
    }

    fn push_event(&mut self, e: &Event) {
        self.rseq = self.rseq.max(e.rseq);
        if e.rseq > self.acked {
            self.pending.push_back(e.clone());
        }
    }

    /// Every address this book holds, free or bound.
    fn known(&self) -> HashSet<Ipv4Addr> {
        self.free
            .iter()
            .copied()
            .chain(self.bound.values().map(|b| b.address))
            .collect()
    }

    /// The next event's record: numbered after the last, in the variant
    /// its kind names.
    fn next_event(
        &self,
        kind: EventKind,
        key: &Key,
        address: Ipv4Addr,
        pod: &Pod,
        at_ms: i64,
        offline: bool,
    ) -> Record {
        let e = Event {
            rseq: self.rseq + 1,
            kind,
            container_id: key.0.clone(),
            ifname: key.1.clone(),
            address,
            pod: pod.clone(),
            at_ms,
            offline,
        };
        match kind {
            EventKind::Bind => Record::Bind(e),
            EventKind::Release => Record::Release(e),
        }
    }

    /// The address a new attachment would get now, or why none: the one
    /// rule ADD binds by and STATUS reports.
    pub fn next_free(&self, now_ms: i64) -> Result<Ipv4Addr, BindError> {
        if self.epoch == 0 {
            return Err(BindError::NeverRegistered);
        }
        let silent = now_ms - self.last_contact_ms;
        if silent > self.lease_ms {
            return Err(BindError::LeaseExpired {
                silent_s: silent / 1000,
                lease_s: self.lease_ms / 1000,
            });
        }
        self.free
            .iter()
            .find(|ip| !self.held.contains(ip))
            .copied()
            .ok_or(BindError::Exhausted)
    }

    /// The record that binds `key` to the next free address, or the
    /// address it already has (`None`: nothing to record).
    pub fn bind(
        &self,
        key: &Key,
        pod: &Pod,
        now_ms: i64,
        offline: bool,
    ) -> Result<(Ipv4Addr, Option<Record>), BindError> {
        if let Some(b) = self.bound.get(key) {
            return Ok((b.address, None));
        }
        let address = self.next_free(now_ms)?;
        let record = self.next_event(EventKind::Bind, key, address, pod, now_ms, offline);
        Ok((address, Some(record)))
    }

    /// The record that adopts a binding made before this book existed (an
    /// older agent wired the pod): `None` if the attachment or the address
    /// is already in the book.
    pub fn adopt(&self, key: &Key, address: Ipv4Addr, pod: &Pod, at_ms: i64) -> Option<Record> {
        if self.bound.contains_key(key) || self.known().contains(&address) || self.epoch == 0 {
            return None;
        }
        Some(self.next_event(EventKind::Bind, key, address, pod, at_ms, false))
    }

    /// The record that releases `key`'s address, if it has one.
    pub fn release(&self, key: &Key, now_ms: i64, offline: bool) -> Option<Record> {
        let b = self.bound.get(key)?;
        Some(self.next_event(EventKind::Release, key, b.address, &b.pod, now_ms, offline))
    }

    /// The record of a grant, leaving out what the book already holds (a
    /// grant the server repeats because it lost the commit of the first
    /// must not put a bound address back into the reserve) and what lies
    /// outside the node's block.
    pub fn grant(&self, addresses: &[Ipv4Addr]) -> Option<Record> {
        let known = self.known();
        let fresh: Vec<Ipv4Addr> = addresses
            .iter()
            .copied()
            .filter(|ip| !known.contains(ip) && self.block.is_some_and(|b| b.contains(ip)))
            .collect();
        (!fresh.is_empty()).then_some(Record::Grant { addresses: fresh })
    }

    /// The record of a registration, if it starts a new epoch (or changes
    /// the block or lease).
    pub fn registered(
        &self,
        epoch: u64,
        block: Ipv4Net,
        gateway: Ipv4Addr,
        lease_ms: i64,
    ) -> Option<Record> {
        let same = self.epoch == epoch
            && self.block == Some(block)
            && self.gateway == Some(gateway)
            && self.lease_ms == lease_ms;
        (!same).then_some(Record::Epoch {
            epoch,
            block,
            gateway,
            lease_ms,
        })
    }

    /// How many addresses to ask for: up to `high` once fewer than `low`
    /// are free.
    pub fn refill(&self, low: usize, high: usize) -> Option<usize> {
        (self.epoch != 0 && self.free.len() < low).then(|| high.saturating_sub(self.free.len()))
    }

    /// The oldest unrecorded event's time.
    pub fn oldest_pending_ms(&self) -> Option<i64> {
        self.pending.front().map(|e| e.at_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, 3, last)
    }

    fn key(c: &str) -> Key {
        (c.to_owned(), "eth0".to_owned())
    }

    fn registered(now: i64) -> Book {
        let mut b = Book::default();
        let r = b
            .registered(7, "10.244.3.0/24".parse().unwrap(), ip(1), 60_000)
            .unwrap();
        b.apply(&r);
        b.apply(&Record::Contact { at_ms: now });
        b
    }

    fn apply(b: &mut Book, r: Option<Record>) {
        if let Some(r) = r {
            b.apply(&r);
        }
    }

    fn grant(b: &mut Book, addresses: &[Ipv4Addr]) {
        let r = b.grant(addresses);
        apply(b, r);
    }

    #[test]
    fn a_held_address_is_not_bound_until_it_is_let_go() {
        let mut b = registered(0);
        grant(&mut b, &[ip(2), ip(3)]);
        b.held.insert(ip(2));
        assert_eq!(b.next_free(10), Ok(ip(3)));
        b.held.insert(ip(3));
        assert_eq!(b.next_free(10), Err(BindError::Exhausted));
        b.held.remove(&ip(2));
        let (a, _) = b.bind(&key("c"), &Pod::default(), 10, false).unwrap();
        assert_eq!(a, ip(2));
    }

    #[test]
    fn binds_take_the_reserve_in_order_and_a_retry_keeps_its_address() {
        let mut b = registered(0);
        grant(&mut b, &[ip(2), ip(3), ip(4)]);
        let (a, r) = b.bind(&key("c1"), &Pod::default(), 10, false).unwrap();
        apply(&mut b, r);
        assert_eq!(a, ip(2));
        let (again, r) = b.bind(&key("c1"), &Pod::default(), 11, false).unwrap();
        assert_eq!((again, r), (ip(2), None));
        let (a2, r) = b.bind(&key("c2"), &Pod::default(), 12, false).unwrap();
        apply(&mut b, r);
        assert_eq!(a2, ip(3));
        // A released address goes to the back of the reserve.
        {
            let r = b.release(&key("c1"), 13, false);
            apply(&mut b, r);
        }
        assert_eq!(Vec::from(b.free.clone()), [ip(4), ip(2)]);
        assert_eq!(b.release(&key("c1"), 14, false), None);
        // Three events, numbered without gaps.
        let seqs: Vec<u64> = b.pending.iter().map(|e| e.rseq).collect();
        assert_eq!(seqs, [1, 2, 3]);
        apply(&mut b, Some(Record::Ack { rseq: 2 }));
        assert_eq!(b.pending.len(), 1);
        assert_eq!(b.oldest_pending_ms(), Some(13));
    }

    #[test]
    fn a_repeated_grant_never_returns_a_bound_address_to_the_reserve() {
        let mut b = registered(0);
        grant(&mut b, &[ip(2), ip(3)]);
        let (_, r) = b.bind(&key("c1"), &Pod::default(), 1, false).unwrap();
        apply(&mut b, r);
        // The server lost the commit and grants .2 again, with .5, and
        // something outside the block.
        let r = b.grant(&[ip(2), ip(5), Ipv4Addr::new(10, 244, 4, 2)]);
        assert_eq!(
            r,
            Some(Record::Grant {
                addresses: vec![ip(5)]
            })
        );
        apply(&mut b, r);
        assert_eq!(Vec::from(b.free.clone()), [ip(3), ip(5)]);
        assert_eq!(b.grant(&[ip(3)]), None);
    }

    #[test]
    fn an_empty_reserve_an_expired_lease_and_no_registration_refuse_to_bind() {
        let b = Book::default();
        assert_eq!(
            b.bind(&key("c"), &Pod::default(), 0, false),
            Err(BindError::NeverRegistered)
        );
        let mut b = registered(1_000);
        assert_eq!(
            b.bind(&key("c"), &Pod::default(), 2_000, false),
            Err(BindError::Exhausted)
        );
        grant(&mut b, &[ip(2)]);
        assert!(b.bind(&key("c"), &Pod::default(), 61_000, true).is_ok());
        assert!(matches!(
            b.bind(&key("c"), &Pod::default(), 61_001, true),
            Err(BindError::LeaseExpired { .. })
        ));
        // An attachment already bound keeps answering (a retried ADD).
        let (_, r) = b.bind(&key("c"), &Pod::default(), 2_000, true).unwrap();
        apply(&mut b, r);
        assert!(b.bind(&key("c"), &Pod::default(), 900_000, true).is_ok());
    }

    #[test]
    fn a_new_epoch_voids_the_reserve_and_keeps_what_is_wired() {
        let mut b = registered(0);
        grant(&mut b, &[ip(2), ip(3)]);
        let (_, r) = b.bind(&key("c1"), &Pod::default(), 1, false).unwrap();
        apply(&mut b, r);
        assert_eq!(
            b.registered(7, "10.244.3.0/24".parse().unwrap(), ip(1), 60_000),
            None
        );
        let r = b.registered(8, "10.244.3.0/24".parse().unwrap(), ip(1), 60_000);
        apply(&mut b, r);
        assert!(b.free.is_empty());
        assert!(b.pending.is_empty());
        assert_eq!(b.rseq, 0);
        assert_eq!(b.bound[&key("c1")].address, ip(2));
    }

    #[test]
    fn refills_start_below_the_low_mark_and_fill_to_the_high_mark() {
        let mut b = Book::default();
        assert_eq!(b.refill(16, 48), None, "not registered");
        b = registered(0);
        assert_eq!(b.refill(16, 48), Some(48));
        let all: Vec<Ipv4Addr> = (2..=17).map(ip).collect();
        grant(&mut b, &all);
        assert_eq!(b.refill(16, 48), None);
        let (_, r) = b.bind(&key("c"), &Pod::default(), 0, false).unwrap();
        apply(&mut b, r);
        assert_eq!(b.refill(16, 48), Some(33));
    }
}
