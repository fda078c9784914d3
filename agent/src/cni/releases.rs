//! Releases the server could not take: journalled on the node (in
//! [`crate::state`]) and sent again until it takes them.

use std::time::Duration;

use tokio::sync::watch;
use tonic::Status;
use tracing::{debug, error, info, warn};

use super::{
    CniService,
    seams::{Ipam, Pods},
    transient,
};

impl<I: Ipam, P: Pods> CniService<I, P> {
    /// Sends journalled releases until `stop`: at once, after every
    /// change of phase, and every `every` while any are pending. Each runs
    /// under its attachment's lock, so it never races an ADD that wires the
    /// attachment again.
    pub async fn flush_releases(self, every: Duration, mut stop: watch::Receiver<bool>) {
        let mut phase = self.phase.clone();
        loop {
            for pending in self.journal.pending() {
                let _guard = self
                    .locks
                    .lock((pending.container_id.clone(), pending.ifname.clone()))
                    .await;
                if !self
                    .journal
                    .contains(&pending.container_id, &pending.ifname)
                {
                    continue;
                }
                match self
                    .release_rpc(&pending.container_id, &pending.ifname)
                    .await
                {
                    Ok(address) => {
                        if let Err(e) = self.journal.remove(&pending.container_id, &pending.ifname)
                        {
                            error!(error = %e, "cannot update the release journal");
                        }
                        info!(container_id = %pending.container_id, ifname = %pending.ifname, address = address.as_deref().unwrap_or(""), queued_at = pending.at, "journalled release reported");
                        if let Some(ip) = address {
                            self.pods.flush_conntrack(&ip).await;
                        }
                    }
                    Err(status) if transient(&status) => {
                        debug!(code = ?status.code(), message = status.message(), "server not taking releases yet");
                        break;
                    }
                    Err(status) => {
                        // The server will never take this one (a refused
                        // identity, a malformed id): keeping it would retry
                        // forever.
                        error!(container_id = %pending.container_id, code = ?status.code(), message = status.message(), "journalled release refused; dropping it");
                        if let Err(e) = self.journal.remove(&pending.container_id, &pending.ifname)
                        {
                            error!(error = %e, "cannot update the release journal");
                        }
                    }
                }
            }
            tokio::select! {
                () = crate::sync::stopped(&mut stop) => return,
                changed = phase.changed() => if changed.is_err() {
                    // The phase's sender is gone (the agent is stopping):
                    // fall back to the timer instead of spinning.
                    tokio::time::sleep(every).await;
                },
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    /// Records a release for later; a journal that cannot be written is
    /// logged (the address then waits for GC or an operator).
    pub(super) fn journal_release(&self, container_id: &str, ifname: &str, status: &Status) {
        match self.journal.add(container_id, ifname) {
            Ok(()) => {
                warn!(code = ?status.code(), message = status.message(), "server unreachable; release journalled and sent when it answers")
            }
            Err(e) => {
                error!(error = %e, code = ?status.code(), "server unreachable and the release journal cannot be written; the address stays allocated")
            }
        }
    }
}
