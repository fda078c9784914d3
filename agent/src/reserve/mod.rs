//! Per-node address reserves (docs/design.md, "Per-node reserves"): the
//! agent binds addresses the server reserved for this node without a
//! round trip, keeps every change in a crash-safe journal in the state
//! directory ([`journal`]) before acting on it, and reports binds and
//! releases to the server in the background ([`crate::cni::background`]).
//! The decisions are pure ([`book`]); [`Reserve`] pairs them with the
//! journal under one lock, so the book in memory is always the journal
//! replayed.

pub mod book;
pub mod journal;

use std::{
    net::Ipv4Addr,
    path::Path,
    sync::{Mutex, MutexGuard},
    time::{SystemTime, UNIX_EPOCH},
};

use ipnet::Ipv4Net;
use tokio::sync::Notify;

use self::{
    book::{BindError, Book, Bound, Event, Key, Pod, Record},
    journal::Journal,
};
use crate::state::StateError;

/// Contacts are written to the journal at most this often (they only
/// carry the lease across a restart; losing the last one shortens it).
const CONTACT_EVERY_MS: i64 = 10_000;

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[derive(Debug)]
struct Inner {
    book: Book,
    journal: Journal,
    contact_written_ms: i64,
}

/// The book and its journal behind one lock; wakers for the reporter
/// (`changed`) and for ADDs waiting on a refill (`granted`).
#[derive(Debug)]
pub struct Reserve {
    inner: Mutex<Inner>,
    pub changed: Notify,
    pub granted: Notify,
}

/// Outcome of [`Reserve::bind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind {
    pub address: Ipv4Addr,
    /// False when the attachment already had the address (a retried ADD).
    pub fresh: bool,
}

impl Reserve {
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let (journal, book) = Journal::open(dir)?;
        Ok(Self {
            inner: Mutex::new(Inner {
                contact_written_ms: book.last_contact_ms,
                book,
                journal,
            }),
            changed: Notify::new(),
            granted: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Journals then applies: a record that did not reach the journal has
    /// no effect.
    fn commit(inner: &mut Inner, record: &Record, durable: bool) -> Result<(), StateError> {
        inner.journal.append(record, durable)?;
        inner.book.apply(record);
        inner.journal.maybe_compact(&inner.book)
    }

    /// Binds the attachment to the next reserved address, durably, before
    /// anything is wired with it.
    pub fn bind(
        &self,
        key: &Key,
        pod: &Pod,
        offline: bool,
    ) -> Result<Result<Bind, BindError>, StateError> {
        let mut inner = self.lock();
        let (address, record) = match inner.book.bind(key, pod, now_ms(), offline) {
            Ok(x) => x,
            Err(e) => return Ok(Err(e)),
        };
        let fresh = record.is_some();
        if let Some(r) = record {
            // Written and applied under the lock, so no other bind takes
            // the address; the wait for the disk is outside it, so binds
            // side by side share one flush. Nothing is wired with the
            // address before that wait returns; if it fails, the binding
            // stays in the book unwired and reconcile releases it.
            Self::commit(&mut inner, &r, false)?;
            let durable = inner.journal.durability();
            drop(inner);
            durable.sync()?;
            self.changed.notify_one();
        }
        Ok(Ok(Bind { address, fresh }))
    }

    /// Adopts a binding an older agent made; true if it was new.
    pub fn adopt(
        &self,
        key: &Key,
        address: Ipv4Addr,
        pod: &Pod,
        at_ms: i64,
    ) -> Result<bool, StateError> {
        let mut inner = self.lock();
        let Some(record) = inner.book.adopt(key, address, pod, at_ms) else {
            return Ok(false);
        };
        Self::commit(&mut inner, &record, true)?;
        drop(inner);
        self.changed.notify_one();
        Ok(true)
    }

    /// Releases the attachment's address, durably; `None` if it had none.
    pub fn release(&self, key: &Key, offline: bool) -> Result<Option<Ipv4Addr>, StateError> {
        self.release_and_hold(key, offline, false)
    }

    /// Releases, and when `hold` keeps the address from binds until
    /// [`Self::let_go`] (its conntrack flush is still running).
    pub fn release_and_hold(
        &self,
        key: &Key,
        offline: bool,
        hold: bool,
    ) -> Result<Option<Ipv4Addr>, StateError> {
        let mut inner = self.lock();
        let Some(record) = inner.book.release(key, now_ms(), offline) else {
            return Ok(None);
        };
        let address = match &record {
            Record::Release(e) => Some(e.address),
            _ => None,
        };
        Self::commit(&mut inner, &record, true)?;
        if hold && let Some(ip) = address {
            inner.book.held.insert(ip);
        }
        drop(inner);
        self.changed.notify_one();
        Ok(address)
    }

    /// Lets a held address be bound again.
    pub fn let_go(&self, address: Ipv4Addr) {
        self.lock().book.held.remove(&address);
    }

    /// Adds addresses the server reserved; returns how many were new.
    pub fn grant(&self, addresses: &[Ipv4Addr]) -> Result<usize, StateError> {
        let mut inner = self.lock();
        let Some(record) = inner.book.grant(addresses) else {
            return Ok(0);
        };
        let n = match &record {
            Record::Grant { addresses } => addresses.len(),
            _ => 0,
        };
        Self::commit(&mut inner, &record, true)?;
        drop(inner);
        self.granted.notify_waiters();
        Ok(n)
    }

    /// Records a registration; true if it started a new epoch.
    pub fn registered(
        &self,
        epoch: u64,
        block: Ipv4Net,
        gateway: Ipv4Addr,
        lease_ms: i64,
    ) -> Result<bool, StateError> {
        let mut inner = self.lock();
        let new_epoch = inner.book.epoch != epoch;
        if let Some(r) = inner.book.registered(epoch, block, gateway, lease_ms) {
            Self::commit(&mut inner, &r, true)?;
        }
        let at_ms = now_ms();
        Self::commit(&mut inner, &Record::Contact { at_ms }, true)?;
        inner.contact_written_ms = at_ms;
        Ok(new_epoch)
    }

    /// A server answered: the lease runs from now.
    pub fn contact(&self) -> Result<(), StateError> {
        let mut inner = self.lock();
        let at_ms = now_ms();
        let durable_due = at_ms - inner.contact_written_ms >= CONTACT_EVERY_MS;
        inner.book.apply(&Record::Contact { at_ms });
        if durable_due {
            Self::commit(&mut inner, &Record::Contact { at_ms }, false)?;
            inner.contact_written_ms = at_ms;
        }
        Ok(())
    }

    /// The server recorded events up to `rseq`.
    pub fn ack(&self, rseq: u64) -> Result<(), StateError> {
        let mut inner = self.lock();
        if rseq <= inner.book.acked {
            return Ok(());
        }
        // Not synced: a lost ack only resends events, which the server
        // skips by their seq.
        Self::commit(&mut inner, &Record::Ack { rseq }, false)
    }

    /// The epoch and up to `max` events the server has not recorded.
    pub fn pending(&self, max: usize) -> (u64, Vec<Event>) {
        let inner = self.lock();
        (
            inner.book.epoch,
            inner.book.pending.iter().take(max).cloned().collect(),
        )
    }

    pub fn binding(&self, key: &Key) -> Option<Bound> {
        self.lock().book.bound.get(key).cloned()
    }

    /// A copy of the whole book (sync, metrics, reconcile).
    pub fn book(&self) -> Book {
        self.lock().book.clone()
    }

    pub fn epoch(&self) -> u64 {
        self.lock().book.epoch
    }

    /// The address a new attachment would get now, or why none.
    pub fn next_free(&self) -> Result<Ipv4Addr, BindError> {
        self.lock().book.next_free(now_ms())
    }

    /// How many to ask the server for, if a refill is due.
    pub fn refill(&self, low: usize, high: usize) -> Option<usize> {
        self.lock().book.refill(low, high)
    }

    /// The gateway and block of the current epoch.
    pub fn network(&self) -> Option<(Ipv4Net, Ipv4Addr)> {
        let inner = self.lock();
        inner.book.block.zip(inner.book.gateway)
    }
}
