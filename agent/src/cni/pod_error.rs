//! What pod plumbing fails with, in its own terms; the CNI service turns
//! it into the CNI error the runtime sees ([`From<PodError> for CniError`]),
//! so kernel code does not speak the CNI protocol.

use super::error::{CniError, Code};

/// Which part of the plumbing failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodErrorKind {
    /// The pod's network namespace is missing, not one, or not enterable.
    Netns,
    /// The kernel refused a change.
    Kernel,
    /// The node is not ready for pods yet (no bridge).
    NotReady,
    /// A local resource failed: a thread, a runtime, a socket.
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodError {
    pub kind: PodErrorKind,
    pub msg: String,
    pub details: String,
}

impl PodError {
    pub fn new(kind: PodErrorKind, msg: impl Into<String>) -> Self {
        Self {
            kind,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }
}

impl std::fmt::Display for PodError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for PodError {}

impl From<PodError> for CniError {
    fn from(e: PodError) -> Self {
        let code = match e.kind {
            PodErrorKind::Netns => Code::Netns,
            PodErrorKind::Kernel => Code::Datapath,
            PodErrorKind::NotReady => Code::TryAgainLater,
            PodErrorKind::Local => Code::Io,
        };
        CniError::new(code, e.msg).with_details(e.details)
    }
}
