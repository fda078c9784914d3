//! Per-attachment locks: requests for one (container id, ifname) run one at
//! a time, different attachments concurrently; an entry lives only while
//! someone holds or waits for it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

/// (container id, ifname)
type AttachmentKey = (String, String);

/// Per-attachment locks; entries go away when nobody holds them.
#[derive(Debug, Default)]
pub(super) struct AttachmentLocks {
    map: Mutex<HashMap<AttachmentKey, Arc<tokio::sync::Mutex<()>>>>,
}

impl AttachmentLocks {
    pub(super) async fn lock(&self, key: (String, String)) -> LockGuard<'_> {
        let lock = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key.clone()).or_default().clone()
        };
        let guard = lock.clone().lock_owned().await;
        LockGuard {
            locks: self,
            key,
            guard: Some(guard),
        }
    }
}

impl AttachmentLocks {
    /// The lock if nobody holds or waits for it (a CNI call in flight).
    pub(super) fn try_lock(&self, key: (String, String)) -> Option<LockGuard<'_>> {
        let lock = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key.clone()).or_default().clone()
        };
        let guard = lock.try_lock_owned().ok();
        let guard = LockGuard {
            locks: self,
            key,
            guard,
        };
        guard.guard.is_some().then_some(guard)
    }
}

pub(super) struct LockGuard<'a> {
    locks: &'a AttachmentLocks,
    key: (String, String),
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.locks.map.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map still holds it: nobody waits, drop the entry.
        if map
            .get(&self.key)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            map.remove(&self.key);
        }
    }
}
