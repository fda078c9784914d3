//! The peer feed: one task per server reads committed topology events from
//! PostgreSQL (woken by NOTIFY, by this process after its own commits, and
//! by a periodic check that catches a missed notification) and fans them out
//! over a bounded broadcast channel. Each watch stream is its own task: a
//! slow client only blocks itself, and when it falls further behind than the
//! channel holds it gets a fresh snapshot instead of an ever-growing queue.
//!
//! At thousands of watchers the expensive moments are storms: every agent
//! reconnecting after a restart, or resyncing at once. The feed keeps the
//! revision it has fanned out and the last snapshot it read, so a watcher
//! resuming at that revision costs no query and a snapshot is read once for
//! all who ask for it at the same time.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::future::{BoxFuture, FutureExt as _, Shared};
use sqlx::postgres::PgListener;
use tokio::sync::{Notify, broadcast, mpsc};
use tracing::{debug, info, warn};

use crate::store::{PeerRecord, Store, StoreError, TOPOLOGY_CHANNEL, TopologyEvent};

/// Events the shared channel holds before a lagging watcher is resynced.
pub const DEFAULT_FEED_CAPACITY: usize = 1024;
/// Messages queued per stream toward the client.
pub const STREAM_BUFFER: usize = 16;
/// Safety net for a lost NOTIFY (e.g. while the LISTEN connection reconnects).
const POLL_INTERVAL: Duration = Duration::from_secs(5);

/// What a watcher receives, already filtered for its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchMessage {
    Snapshot { revision: u64, peers: SnapshotPeers },
    Change(TopologyEvent),
}

/// Every peer of a snapshot but the watcher's own node, over one copy of
/// the snapshot shared by all watchers that read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotPeers {
    all: Arc<Vec<PeerRecord>>,
    except: String,
}

impl SnapshotPeers {
    pub fn new(all: Arc<Vec<PeerRecord>>, except: impl Into<String>) -> Self {
        Self {
            all,
            except: except.into(),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &PeerRecord> {
        self.all.iter().filter(|p| self.keeps(p))
    }

    /// The peers by value, copied one at a time as they are taken.
    pub fn into_owned(self) -> impl Iterator<Item = PeerRecord> + Send {
        (0..self.all.len()).filter_map(move |i| {
            let p = &self.all[i];
            self.keeps(p).then(|| p.clone())
        })
    }

    fn keeps(&self, p: &PeerRecord) -> bool {
        p.node_name != self.except
    }
}

#[derive(Debug, Clone)]
enum FeedItem {
    Event(Arc<TopologyEvent>),
    /// The feed itself lost track (history pruned under it); every
    /// watcher must re-read a snapshot.
    Resync,
}

/// Shared handle to the feed.
#[derive(Debug, Clone)]
pub struct PeerFeed {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    tx: broadcast::Sender<FeedItem>,
    wake: Notify,
    /// The newest revision fanned out, stored before its event is sent: a
    /// watcher that subscribed and then reads `n` receives every event
    /// after `n` from the channel.
    revision: AtomicU64,
    /// The last snapshot read, and the read in flight that every watcher
    /// asking meanwhile awaits (its result, or its error, reaches them all
    /// at once). Never held across an await.
    snapshot: std::sync::Mutex<SnapshotCache>,
}

/// A snapshot's revision and peers.
type Snapshot = (u64, Arc<Vec<PeerRecord>>);
/// A snapshot read in flight, shared by its waiters; the generation it was
/// started in comes with its result.
type Reading = Shared<BoxFuture<'static, (u64, Result<Snapshot, Arc<StoreError>>)>>;

#[derive(Debug, Default)]
struct SnapshotCache {
    cached: Option<Snapshot>,
    reading: Option<Reading>,
    /// Bumped when the history went backwards: a read started before must
    /// neither be cached nor handed out.
    generation: u64,
}

/// How long a snapshot read may take before its waiters are told the
/// database is unavailable (a database gone without a RST would otherwise
/// hold them until TCP gives up).
pub const SNAPSHOT_READ_TIMEOUT: Duration = Duration::from_secs(10);

// === impl PeerFeed ===

impl PeerFeed {
    /// Starts the feed task at the database's current revision.
    pub async fn start(store: Store, capacity: usize) -> Result<Self, StoreError> {
        let revision = store.current_revision().await?;
        let (tx, _) = broadcast::channel(capacity.max(1));
        let feed = Self {
            inner: Arc::new(Inner {
                tx,
                wake: Notify::new(),
                revision: AtomicU64::new(revision),
                snapshot: std::sync::Mutex::default(),
            }),
        };
        tokio::spawn(feed.clone().run(store, revision));
        Ok(feed)
    }

    /// Tells the feed a topology change was just committed here, so local
    /// watchers do not wait for the NOTIFY round trip.
    pub fn poke(&self) {
        self.inner.wake.notify_one();
    }

    async fn run(self, store: Store, start: u64) {
        let mut listener = None;
        let mut last = start;
        loop {
            if listener.is_none() {
                listener = match listen(&store).await {
                    Ok(l) => Some(l),
                    Err(e) => {
                        warn!(error = %e, "cannot LISTEN for topology changes; polling");
                        None
                    }
                };
            }
            let notified = async {
                match listener.as_mut() {
                    Some(l) => l.recv().await.map(|_| ()),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = self.inner.wake.notified() => {}
                r = notified => if let Err(e) = r {
                    warn!(error = %e, "topology LISTEN connection failed; reconnecting");
                    listener = None;
                },
                () = tokio::time::sleep(POLL_INTERVAL) => {}
            }
            // Page by page until caught up: a burst of changes is followed
            // event by event, not answered with a resync of every watcher.
            let read = loop {
                match store.events_page(last).await {
                    Ok(Some(events)) => {
                        let full = events.len() >= crate::store::MAX_REPLAY as usize;
                        for event in events {
                            last = event.revision;
                            self.inner.revision.store(last, Ordering::SeqCst);
                            // No receivers is fine: the revision still advances.
                            let _ = self.inner.tx.send(FeedItem::Event(Arc::new(event)));
                        }
                        if !full {
                            break Ok(Some(()));
                        }
                    }
                    Ok(None) => break Ok(None),
                    Err(e) => break Err(e),
                }
            };
            match read {
                Ok(Some(())) => {}
                Ok(None) => {
                    info!(
                        last,
                        "topology history moved past the feed; resyncing watchers"
                    );
                    match store.current_revision().await {
                        Ok(rev) => last = rev,
                        Err(e) => warn!(error = %e, "reading topology revision"),
                    }
                    // The history may have gone backwards (a failover that
                    // lost commits): the cached snapshot may hold what the
                    // database no longer has.
                    {
                        let mut cache = self.inner.cache();
                        cache.cached = None;
                        cache.reading = None;
                        cache.generation += 1;
                    }
                    self.inner.revision.store(last, Ordering::SeqCst);
                    let _ = self.inner.tx.send(FeedItem::Resync);
                }
                Err(e) => warn!(error = %e, "reading topology events"),
            }
        }
    }

    /// Serves one watcher until its client goes away: catch-up from
    /// `since` (or a snapshot), then live changes. `node` is left out.
    pub async fn serve_watcher(
        &self,
        store: Store,
        node: String,
        since: u64,
        out: mpsc::Sender<Result<WatchMessage, StoreError>>,
    ) {
        // Subscribe before reading the database, so nothing committed in
        // between is missed; duplicates are dropped by revision below.
        let mut rx = self.inner.tx.subscribe();
        let mut last = match self.catch_up(&store, &node, since, &out).await {
            Some(rev) => rev,
            None => return,
        };
        loop {
            let item = tokio::select! {
                item = rx.recv() => item,
                () = out.closed() => return,
            };
            let next = match item {
                Ok(FeedItem::Event(event)) if event.revision <= last => continue,
                Ok(FeedItem::Event(event)) if event.revision == last + 1 => {
                    last = event.revision;
                    if event.change.node_name() == node {
                        continue;
                    }
                    if out
                        .send(Ok(WatchMessage::Change((*event).clone())))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    continue;
                }
                // A gap means this watcher raced the feed; read it from the
                // database instead of guessing.
                Ok(FeedItem::Event(_)) => self.catch_up(&store, &node, last, &out).await,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    debug!(%node, skipped = n, "slow watcher fell behind; sending a snapshot");
                    self.catch_up(&store, &node, 0, &out).await
                }
                Ok(FeedItem::Resync) => self.catch_up(&store, &node, 0, &out).await,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            match next {
                Some(rev) => last = rev,
                None => return,
            }
        }
    }

    /// Sends what the watcher missed after `since`, or a snapshot when that is
    /// not available (or `since` is 0). Returns the revision reached, or `None`
    /// when the stream is over.
    async fn catch_up(
        &self,
        store: &Store,
        node: &str,
        since: u64,
        out: &mpsc::Sender<Result<WatchMessage, StoreError>>,
    ) -> Option<u64> {
        if since > 0 {
            // Resuming where the feed stands: nothing to replay, and the
            // channel brings everything after (see `Inner::revision`).
            if since == self.inner.revision.load(Ordering::SeqCst) {
                return Some(since);
            }
            match store.events_since(since).await {
                Ok(Some(events)) => {
                    let mut last = since;
                    for event in events {
                        last = event.revision;
                        if event.change.node_name() == node {
                            continue;
                        }
                        out.send(Ok(WatchMessage::Change(event))).await.ok()?;
                    }
                    return Some(last);
                }
                Ok(None) => {}
                Err(e) => {
                    let _ = out.send(Err(e)).await;
                    return None;
                }
            }
        }
        match self.snapshot(store).await {
            Ok((revision, all)) => {
                let peers = SnapshotPeers::new(all, node);
                out.send(Ok(WatchMessage::Snapshot { revision, peers }))
                    .await
                    .ok()?;
                Some(revision)
            }
            Err(e) => {
                let _ = out.send(Err(e)).await;
                None
            }
        }
    }

    /// A snapshot at least as new as what the feed has fanned out: any such
    /// snapshot is consistent, and the channel brings what follows it.
    async fn snapshot(&self, store: &Store) -> Result<Snapshot, StoreError> {
        loop {
            let fed = self.inner.revision.load(Ordering::SeqCst);
            let reading = {
                let mut cache = self.inner.cache();
                if let Some((revision, peers)) = cache.cached.as_ref()
                    && *revision >= fed
                {
                    return Ok((*revision, peers.clone()));
                }
                let generation = cache.generation;
                cache
                    .reading
                    .get_or_insert_with(|| {
                        read_snapshot(self.inner.clone(), store.clone(), generation)
                    })
                    .clone()
            };
            let (generation, read) = reading.await;
            if generation != self.inner.cache().generation {
                // The history went backwards while it read: what it read
                // may be gone from the database.
                continue;
            }
            match read {
                Ok((revision, peers)) if revision >= fed => return Ok((revision, peers)),
                // Started before `fed` was fanned out.
                Ok(_) => continue,
                Err(e) => return Err(StoreError::Shared(e)),
            }
        }
    }
}

impl Inner {
    fn cache(&self) -> std::sync::MutexGuard<'_, SnapshotCache> {
        self.snapshot.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One snapshot read for every watcher that asks while it runs; cached if
/// the history did not go backwards meanwhile.
fn read_snapshot(inner: Arc<Inner>, store: Store, generation: u64) -> Reading {
    async move {
        let read = match tokio::time::timeout(SNAPSHOT_READ_TIMEOUT, store.peer_snapshot()).await {
            Ok(Ok((revision, peers))) => Ok((revision, Arc::new(peers))),
            Ok(Err(e)) => Err(Arc::new(e)),
            Err(_) => Err(Arc::new(StoreError::TimedOut("reading a peer snapshot"))),
        };
        let mut cache = inner.cache();
        if cache.generation == generation {
            cache.reading = None;
            if let Ok(snapshot) = &read
                && cache.cached.as_ref().is_none_or(|(r, _)| *r <= snapshot.0)
            {
                cache.cached = Some(snapshot.clone());
            }
        }
        (generation, read)
    }
    .boxed()
    .shared()
}

/// LISTEN on a connection of its own, outside the request pool: a pool
/// drained by a burst of calls must not also cut the topology feed.
async fn listen(store: &Store) -> Result<PgListener, sqlx::Error> {
    let own = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with((*store.pool().connect_options()).clone());
    let mut listener = PgListener::connect_with(&own).await?;
    listener.listen(TOPOLOGY_CHANNEL).await?;
    Ok(listener)
}
