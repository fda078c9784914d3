//! `weft`, the CNI plugin binary the container runtime execs. It holds no
//! networking logic: it forwards the CNI environment and the stdin config,
//! untouched, to the node agent's `weft.agent.v1.Cni` service on a unix
//! socket and prints the reply. It answers VERSION itself, and reports CNI
//! error 11 (try again later) when the agent cannot be reached.

use std::{collections::HashMap, io::Write, path::PathBuf, time::Duration};

use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tonic::transport::Uri;
use tower::service_fn;
use weft_proto::agent::v1::{ExecRequest, ExecResponse, cni_client::CniClient};

pub const DEFAULT_SOCKET: &str = "/run/weft/agent.sock";
pub use weft_core::cni::SUPPORTED_VERSIONS;
/// The CNI variables the runtime sets; nothing else is forwarded.
pub const CNI_ENV: [&str; 6] = [
    "CNI_COMMAND",
    "CNI_CONTAINERID",
    "CNI_NETNS",
    "CNI_IFNAME",
    "CNI_ARGS",
    "CNI_PATH",
];
/// Longest a request may take end to end; runtimes time out on their own too.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// The config's cniVersion if it is one we speak, else the newest.
pub fn reply_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .filter(|v| weft_core::cni::is_supported(v))
        .unwrap_or_else(|| weft_core::cni::NEWEST.to_owned())
}

/// `agentSocket` from the plugin config, else the default.
pub fn socket_path(stdin: &[u8]) -> PathBuf {
    config_socket(stdin).unwrap_or_else(|_| PathBuf::from(DEFAULT_SOCKET))
}

/// Why the shim itself refuses a config: it cannot tell which agent to ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadConfig {
    /// CNI code: 6 (decoding failure) or 7 (invalid network config).
    pub code: u32,
    pub msg: String,
}

/// The socket the config names. Garbage on stdin is the caller's mistake
/// (code 6), not an unreachable agent (code 11), so it is answered here.
pub fn config_socket(stdin: &[u8]) -> Result<PathBuf, BadConfig> {
    let value: Value = serde_json::from_slice(stdin).map_err(|e| BadConfig {
        code: 6,
        msg: format!("the network configuration on stdin is not JSON: {e}"),
    })?;
    let Some(config) = value.as_object() else {
        return Err(BadConfig {
            code: 6,
            msg: "the network configuration on stdin is not a JSON object".into(),
        });
    };
    match config.get("agentSocket") {
        None => Ok(PathBuf::from(DEFAULT_SOCKET)),
        Some(Value::String(s)) if !s.is_empty() => Ok(PathBuf::from(s)),
        Some(other) => Err(BadConfig {
            code: 7,
            msg: format!("agentSocket must be a non-empty path string, not {other}"),
        }),
    }
}

pub fn version_reply(stdin: &[u8]) -> String {
    format!(
        "{}\n",
        json!({ "cniVersion": reply_version(stdin), "supportedVersions": SUPPORTED_VERSIONS })
    )
}

pub fn error_reply(stdin: &[u8], code: u32, msg: &str, details: &str) -> String {
    format!(
        "{}\n",
        json!({ "cniVersion": reply_version(stdin), "code": code, "msg": msg, "details": details })
    )
}

/// Why the agent could not be asked.
struct CallError {
    msg: String,
    /// The socket refused this caller (file mode): not "agent down".
    denied: bool,
}

impl From<String> for CallError {
    fn from(msg: String) -> Self {
        Self { msg, denied: false }
    }
}

async fn call(socket: PathBuf, request: ExecRequest) -> Result<ExecResponse, CallError> {
    let stream = tokio::net::UnixStream::connect(&socket)
        .await
        .map_err(|e| CallError {
            msg: format!("connect: {e}"),
            denied: e.kind() == std::io::ErrorKind::PermissionDenied,
        })?;
    // One request on one connection: a bare HTTP/2 connection, none of a
    // channel's buffering and reconnecting, which a short-lived process
    // would only pay for.
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    tokio::spawn(connection);
    let service = service_fn(move |req: http::Request<tonic::body::Body>| {
        let mut sender = sender.clone();
        async move { sender.send_request(req).await }
    });
    // The authority is required by HTTP/2 but unused: the socket is the address.
    let mut client = CniClient::with_origin(service, Uri::from_static("http://weft-agent"));
    let response = tokio::time::timeout(CALL_TIMEOUT, client.exec(request))
        .await
        .map_err(|_| format!("no answer within {CALL_TIMEOUT:?}"))?
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    Ok(response.into_inner())
}

/// What `weft --help` and `weft --version` print: the plugin is run by a
/// container runtime, not by hand.
pub fn run_by_hand(arg: &str, out: &mut impl Write) -> i32 {
    let (text, code) = match arg {
        "--version" | "-V" => (format!("weft {}\n", env!("CARGO_PKG_VERSION")), 0),
        "--help" | "-h" => (usage(), 0),
        other => (
            format!("weft: unknown argument {other:?}\n\n{}", usage()),
            2,
        ),
    };
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
    code
}

fn usage() -> String {
    format!(
        "weft {}: the Weft CNI plugin.\n\n\
         Container runtimes run it as CNI plugin type \"weft\": CNI_COMMAND, CNI_CONTAINERID,\n\
         CNI_NETNS, CNI_IFNAME, CNI_ARGS and CNI_PATH in the environment, the network\n\
         configuration on stdin. It forwards each request to weft-agent on the node's socket\n\
         (the configuration's \"agentSocket\", default {DEFAULT_SOCKET}) and prints the answer.\n\
         VERSION is answered without the agent.\n\n\
         Usage: weft [--help | --version]\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// Runs the plugin: reads stdin, writes the reply to stdout, returns the
/// exit code.
pub fn run(env: HashMap<String, String>, stdin: Vec<u8>, out: &mut impl Write) -> i32 {
    let (text, code) = if env.get("CNI_COMMAND").map(String::as_str) == Some("VERSION") {
        (version_reply(&stdin), 0)
    } else {
        match config_socket(&stdin) {
            Ok(socket) => forward(socket, env, &stdin),
            Err(bad) => (error_reply(&stdin, bad.code, &bad.msg, ""), 1),
        }
    };
    // A runtime that closed our stdout cannot be told anything else.
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
    code
}

/// Sends the request to the agent: its stdout and exit code, or error 11.
fn forward(socket: PathBuf, env: HashMap<String, String>, stdin: &[u8]) -> (String, i32) {
    let request = ExecRequest {
        env,
        stdin: stdin.to_vec(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let result = match runtime {
        Ok(rt) => rt.block_on(call(socket.clone(), request)),
        Err(e) => Err(CallError::from(format!("starting the runtime: {e}"))),
    };
    match result {
        Ok(reply) => (
            String::from_utf8_lossy(&reply.stdout).into_owned(),
            reply.exit_code,
        ),
        Err(CallError { msg, denied: true }) => (
            error_reply(
                stdin,
                104,
                &format!(
                    "permission denied on the weft-agent socket {}: the plugin must run as root, as container runtimes run it",
                    socket.display()
                ),
                &msg,
            ),
            1,
        ),
        Err(CallError { msg: e, .. }) => {
            eprintln!("weft: cannot reach weft-agent at {}: {e}", socket.display());
            (
                error_reply(
                    stdin,
                    11,
                    &format!(
                        "cannot reach weft-agent at {}; check that the weft-agent pod is running on this node",
                        socket.display()
                    ),
                    &e,
                ),
                1,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_by_hand_it_prints_usage_and_version_not_a_cni_error() {
        let mut out = Vec::new();
        assert_eq!(run_by_hand("--help", &mut out), 0);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("Usage: weft") && text.contains("CNI_COMMAND"),
            "{text}"
        );
        let mut out = Vec::new();
        assert_eq!(run_by_hand("--version", &mut out), 0);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("weft {}\n", env!("CARGO_PKG_VERSION"))
        );
        let mut out = Vec::new();
        assert_eq!(run_by_hand("--frobnicate", &mut out), 2);
        assert!(String::from_utf8(out).unwrap().contains("unknown argument"));
    }

    #[test]
    fn version_is_answered_without_the_agent() {
        let mut out = Vec::new();
        let env = HashMap::from([("CNI_COMMAND".to_owned(), "VERSION".to_owned())]);
        assert_eq!(run(env, br#"{"cniVersion":"0.4.0"}"#.to_vec(), &mut out), 0);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["supportedVersions"].as_array().unwrap().len(), 5);
    }

    #[test]
    fn an_unreachable_agent_is_error_11_naming_the_socket() {
        let mut out = Vec::new();
        let env = HashMap::from([("CNI_COMMAND".to_owned(), "ADD".to_owned())]);
        let stdin = br#"{"cniVersion":"1.0.0","name":"weft","type":"weft","agentSocket":"/nonexistent/weft.sock"}"#;
        assert_eq!(run(env, stdin.to_vec(), &mut out), 1);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["code"], 11);
        assert_eq!(v["cniVersion"], "1.0.0");
        assert!(
            v["msg"]
                .as_str()
                .unwrap()
                .contains("/nonexistent/weft.sock")
        );
    }

    #[test]
    fn garbage_on_stdin_is_a_decoding_failure_not_an_unreachable_agent() {
        for (stdin, code) in [
            (&b"garbage"[..], 6),
            (b"[1,2]", 6),
            (b"", 6),
            (br#"{"cniVersion":"1.0.0","agentSocket":42}"#, 7),
        ] {
            let mut out = Vec::new();
            let env = HashMap::from([("CNI_COMMAND".to_owned(), "ADD".to_owned())]);
            assert_eq!(run(env, stdin.to_vec(), &mut out), 1);
            let v: Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v["code"], code, "{}", String::from_utf8_lossy(stdin));
        }
    }

    #[test]
    fn the_socket_defaults_and_can_be_overridden() {
        assert_eq!(socket_path(b"{}"), PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(
            socket_path(br#"{"agentSocket":"/x.sock"}"#),
            PathBuf::from("/x.sock")
        );
        assert_eq!(reply_version(b"garbage"), "1.1.0");
        assert_eq!(reply_version(br#"{"cniVersion":"0.2.0"}"#), "1.1.0");
    }
}
