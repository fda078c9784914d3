//! Who is calling (from the client certificate) and what they may do.
//! The policy ([`authorize`]) is a pure function of the caller and the
//! access asked for; [`Services`] wraps it with the audit row a refusal
//! writes, and with the per-node call slots.

use std::sync::Arc;

use tonic::{Request, Status};
use tracing::warn;
use weft_core::domain::NodeName;

use super::{MAX_CALLS_PER_NODE, NodePermit, Services};

/// Who is calling, from the client certificate (docs/security.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The server runs without TLS (`--insecure-plaintext`): nobody is
    /// authenticated, and node RPCs are attributed to the node they name.
    Plaintext,
    Node(String),
    Admin(String),
    Viewer(String),
}

impl Caller {
    pub fn actor(&self) -> String {
        match self {
            Caller::Plaintext => "unauthenticated".into(),
            Caller::Node(n) => format!("node/{n}"),
            Caller::Admin(n) => format!("admin/{n}"),
            Caller::Viewer(n) => format!("viewer/{n}"),
        }
    }
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access<'a> {
    /// A node RPC for this node.
    Node(&'a NodeName),
    AdminRead,
    AdminWrite,
}

/// The policy: a node acts only for itself, admins do anything on the
/// admin API, viewers only read. Returns the audit actor, or `None` when
/// the call is refused.
pub fn authorize(caller: &Caller, access: Access<'_>) -> Option<String> {
    match (caller, access) {
        (Caller::Plaintext, Access::Node(node)) => Some(format!("node/{node}")),
        (Caller::Plaintext, _) => Some("admin".into()),
        (Caller::Node(name), Access::Node(node)) if name == node.as_str() => Some(caller.actor()),
        (Caller::Admin(_), Access::AdminRead | Access::AdminWrite) => Some(caller.actor()),
        (Caller::Viewer(_), Access::AdminRead) => Some(caller.actor()),
        _ => None,
    }
}

impl Services {
    /// The caller's identity; with TLS on, a client certificate is required.
    pub(super) fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        if !self.inner.tls {
            return Ok(Caller::Plaintext);
        }
        let certs = request
            .peer_certs()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let (org, name) = crate::pki::subject_of(certs[0].as_ref())
            .ok_or_else(|| Status::unauthenticated("the client certificate has no O and CN"))?;
        match org.as_str() {
            "weft-node" => Ok(Caller::Node(name)),
            "weft-admin" => Ok(Caller::Admin(name)),
            "weft-viewer" => Ok(Caller::Viewer(name)),
            other => Err(Status::permission_denied(format!(
                "certificate role {other:?} may not call Weft"
            ))),
        }
    }

    /// A node may act only for itself; returns the audit actor.
    pub(super) async fn authorize_node(
        &self,
        caller: &Caller,
        node: &NodeName,
        method: &str,
    ) -> Result<String, Status> {
        match authorize(caller, Access::Node(node)) {
            Some(actor) => Ok(actor),
            None => Err(self.deny(caller, node.as_str(), method).await),
        }
    }

    /// Admin RPCs: admins do anything, viewers only read.
    pub(super) async fn authorize_admin(
        &self,
        caller: &Caller,
        write: bool,
        method: &str,
    ) -> Result<String, Status> {
        let access = if write {
            Access::AdminWrite
        } else {
            Access::AdminRead
        };
        match authorize(caller, access) {
            Some(actor) => Ok(actor),
            None => Err(self.deny(caller, "", method).await),
        }
    }

    /// Waits for one of the node's [`MAX_CALLS_PER_NODE`] call slots.
    pub(super) async fn admit(&self, node: &NodeName) -> Result<NodePermit, Status> {
        let semaphore = {
            let mut permits = self.inner.permits.lock().unwrap_or_else(|p| p.into_inner());
            permits
                .entry(node.to_string())
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(MAX_CALLS_PER_NODE)))
                .clone()
        };
        let permit = semaphore
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("server shutting down"))?;
        Ok(NodePermit {
            shared: self.inner.clone(),
            node: node.to_string(),
            permit: Some(permit),
        })
    }

    pub(super) async fn deny(&self, caller: &Caller, node: &str, method: &str) -> Status {
        let actor = caller.actor();
        warn!(%actor, node, method, "permission denied");
        if let Err(e) = self.inner.store.audit_denied(&actor, node, method).await {
            warn!(error = %e, "recording a denied call");
        }
        Status::permission_denied(format!("{actor} may not call {method} for {node:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_act_for_themselves_admins_write_viewers_read() {
        let a: NodeName = "node-a".parse().unwrap();
        let node_a = Caller::Node("node-a".into());
        let node_b = Caller::Node("node-b".into());
        let admin = Caller::Admin("ops".into());
        let viewer = Caller::Viewer("audit".into());
        let table = [
            (&node_a, Access::Node(&a), Some("node/node-a")),
            (&node_b, Access::Node(&a), None),
            (&node_a, Access::AdminRead, None),
            (&admin, Access::Node(&a), None),
            (&admin, Access::AdminWrite, Some("admin/ops")),
            (&viewer, Access::AdminRead, Some("viewer/audit")),
            (&viewer, Access::AdminWrite, None),
            (&Caller::Plaintext, Access::Node(&a), Some("node/node-a")),
            (&Caller::Plaintext, Access::AdminWrite, Some("admin")),
        ];
        for (caller, access, want) in table {
            assert_eq!(
                authorize(caller, access).as_deref(),
                want,
                "{caller:?} {access:?}"
            );
        }
    }
}
