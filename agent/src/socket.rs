//! The CNI endpoint: `weft.agent.v1.Cni` on a root-only unix socket.

use anyhow::Context as _;
use tokio::sync::watch;
use tracing::{error, info};

/// Serves the CNI endpoint on the unix socket, root-only (0600).
pub async fn serve_cni(
    path: &std::path::Path,
    service: crate::cni::CniService,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        // A directory we create is root's alone; an existing one (it may be
        // shared) is left as the operator made it.
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {}", dir.display()))?;
    }
    // A socket left by a previous run would make bind fail.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("removing stale socket {}", path.display()));
        }
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    info!(socket = %path.display(), "serving CNI requests");
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let router = tonic::transport::Server::builder().add_service(
        weft_proto::agent::v1::cni_server::CniServer::new(service)
            .max_decoding_message_size(1 << 20),
    );
    Ok(tokio::spawn(async move {
        let shutdown = async move { crate::sync::stopped(&mut stop).await };
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
        {
            error!(error = %e, "CNI server failed");
        }
    }))
}
