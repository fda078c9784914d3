//! CNI errors: a code from the spec (or Weft's own, 100 and up), a message
//! and details, rendered as the spec's error object on stdout.

use serde_json::json;

/// Error codes. 1–99 are the spec's; 100+ are Weft's (docs/cni.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnv = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    NotAvailable = 50,
    LimitedConnectivity = 51,
    /// The IPAM server refused the request (block exhausted, unknown node,
    /// attachment on another node).
    Ipam = 100,
    /// The kernel refused a datapath change.
    Datapath = 101,
    /// CNI_NETNS cannot be opened.
    Netns = 102,
    /// CHECK found the pod's network differing from prevResult.
    Drift = 103,
    /// The caller on the agent socket is not root.
    NotPermitted = 104,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The spec's error object for `version`.
    pub fn render(&self, version: &str) -> String {
        let mut v = json!({
            "cniVersion": version,
            "code": self.code as u32,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            v["details"] = json!(self.details);
        }
        format!("{v}\n")
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CNI error {}: {}", self.code as u32, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_render_as_the_spec_object() {
        let e =
            CniError::new(Code::TryAgainLater, "server unreachable").with_details("dial: refused");
        let v: serde_json::Value = serde_json::from_str(&e.render("1.0.0")).unwrap();
        assert_eq!(
            v,
            json!({"cniVersion": "1.0.0", "code": 11, "msg": "server unreachable", "details": "dial: refused"})
        );
        let v: serde_json::Value =
            serde_json::from_str(&CniError::new(Code::Drift, "x").render("0.4.0")).unwrap();
        assert_eq!(v["code"], 103);
        assert!(v.get("details").is_none());
    }
}
