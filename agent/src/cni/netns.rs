//! Entering a pod's network namespace: checking that the path is one the
//! agent can see, and talking netlink inside it through a socket made
//! there by a short-lived OS thread (setns() moves only that thread; the
//! socket stays bound to the namespace).

use std::{fs::File, path::Path};

use futures::future::BoxFuture;
use netlink_sys::{AsyncSocket, TokioSocket, protocols::NETLINK_ROUTE};
use rtnetlink::Handle;
use tokio::sync::oneshot;

use super::pod_error::{PodError, PodErrorKind};

/// Fails unless `netns` is a network namespace this process can see. A
/// bind mount made in another mount namespace after the agent started (or
/// under a path without shared propagation) shows up here as the empty file
/// it was mounted over, and setns() on that would fail late and obscurely.
pub fn check_netns(netns: &Path) -> Result<(), PodError> {
    let not_here = |what: String| {
        PodError::new(
            PodErrorKind::Netns,
            format!(
                "CNI_NETNS {} is {what}, not a network namespace the agent can see; \
                 if the runtime mounted it, the mount did not propagate into the agent's \
                 mount namespace (mount /run/netns into the agent with HostToContainer \
                 propagation, see docs/troubleshooting.md)",
                netns.display()
            ),
        )
    };
    let stat = match nix::sys::statfs::statfs(netns) {
        Ok(stat) => stat,
        Err(nix::errno::Errno::ENOENT) => {
            return Err(PodError::new(
                PodErrorKind::Netns,
                format!("network namespace {} does not exist", netns.display()),
            ));
        }
        Err(e) => {
            return Err(PodError::new(
                PodErrorKind::Netns,
                format!("cannot inspect network namespace {}", netns.display()),
            )
            .with_details(e.to_string()));
        }
    };
    if stat.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
        let kind = match std::fs::metadata(netns) {
            Ok(m) if m.is_file() && m.len() == 0 => "an empty file".to_owned(),
            Ok(m) if m.is_dir() => "a directory".to_owned(),
            _ => "not on nsfs".to_owned(),
        };
        return Err(not_here(kind));
    }
    Ok(())
}

/// Runs `work` with a netlink handle inside the namespace at `netns`.
///
/// Only the socket is made inside the namespace, on a throwaway OS thread
/// (setns() moves just that thread, and a socket stays in the namespace it
/// was created in); the conversation runs on the caller's runtime. A thread
/// that entered a pod's namespace never runs anything else.
pub(super) async fn in_netns<T: Send + 'static>(
    netns: &Path,
    work: impl FnOnce(Handle) -> BoxFuture<'static, Result<T, PodError>> + Send + 'static,
) -> Result<T, PodError> {
    let file = File::open(netns).map_err(|e| {
        PodError::new(
            PodErrorKind::Netns,
            format!("cannot open network namespace {}", netns.display()),
        )
        .with_details(e.to_string())
    })?;
    let runtime = tokio::runtime::Handle::current();
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("weft-netns".into())
        .spawn(move || {
            let result = (|| {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                    PodError::new(
                        PodErrorKind::Netns,
                        "cannot enter the pod network namespace",
                    )
                    .with_details(e.to_string())
                })?;
                // Registered with the caller's reactor, which is not bound
                // to any namespace.
                let _context = runtime.enter();
                TokioSocket::new(NETLINK_ROUTE).map_err(|e| {
                    PodError::new(
                        PodErrorKind::Local,
                        format!("netlink socket in the pod namespace: {e}"),
                    )
                })
            })();
            let _ = tx.send(result);
        })
        .map_err(|e| {
            PodError::new(
                PodErrorKind::Local,
                format!("spawning the netns thread: {e}"),
            )
        })?;
    let socket = rx
        .await
        .map_err(|_| PodError::new(PodErrorKind::Local, "the netns thread died"))??;
    let (conn, handle, _) = rtnetlink::from_socket(socket);
    // Ends once `work` drops the handle.
    tokio::spawn(conn);
    work(handle).await
}
