//! Parsing and validating a CNI request (environment + stdin config) into a
//! typed [`Request`], before anything is touched. Every problem maps to the
//! spec's error code; nothing here has side effects.
//! (Over 400 lines because the second half is its table-driven tests.)

use std::{collections::HashMap, net::Ipv4Addr, path::PathBuf};

use ipnet::Ipv4Net;
use serde_json::Value;

use super::error::{CniError, Code};

pub use weft_core::cni::SUPPORTED_VERSIONS;
use weft_core::domain::{ContainerId, IfName, MAX_TEXT};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Gc,
    Status,
}

impl Command {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "VERSION" => Self::Version,
            "GC" => Self::Gc,
            "STATUS" => Self::Status,
            _ => return None,
        })
    }
}

/// Kubernetes pod identity from CNI_ARGS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodArgs {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub infra_container_id: String,
}

/// One attachment the runtime still considers valid (GC).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValidAttachment {
    pub container_id: String,
    pub ifname: String,
}

/// What CHECK compares against: the ADD result the runtime kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrevResult {
    pub address: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub container_ifname: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub command: Command,
    /// The config's cniVersion: results are shaped for it.
    pub version: String,
    pub network: String,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub pod: PodArgs,
    pub prev_result: Option<PrevResult>,
    pub valid_attachments: Vec<ValidAttachment>,
}

/// Compares dotted versions numerically ("0.4.0" < "1.0.0").
pub fn version_at_least(version: &str, min: &str) -> bool {
    weft_core::cni::at_least(version, min)
}

fn invalid_env(msg: impl Into<String>) -> CniError {
    CniError::new(Code::InvalidEnv, msg)
}

fn invalid_config(msg: impl Into<String>) -> CniError {
    CniError::new(Code::InvalidConfig, msg)
}

/// The server's own rules (weft-core), so the agent never forwards an id
/// the server would refuse.
fn valid_container_id(id: &str) -> bool {
    id.parse::<ContainerId>().is_ok()
}

/// An interface name the kernel accepts: 1–15 bytes, no '/', ':' or
/// whitespace, not "." or "..".
pub fn valid_ifname(name: &str) -> bool {
    name.parse::<IfName>().is_ok()
}

fn parse_args(raw: &str) -> Result<PodArgs, CniError> {
    let mut pod = PodArgs::default();
    let mut unknown = Vec::new();
    let mut ignore_unknown = false;
    for pair in raw.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| invalid_env(format!("CNI_ARGS: {pair:?} is not KEY=VALUE")))?;
        match k {
            "K8S_POD_NAMESPACE" => pod.namespace = v.to_owned(),
            "K8S_POD_NAME" => pod.name = v.to_owned(),
            "K8S_POD_UID" => pod.uid = v.to_owned(),
            "K8S_POD_INFRA_CONTAINER_ID" => pod.infra_container_id = v.to_owned(),
            "IgnoreUnknown" => {
                ignore_unknown = matches!(v.to_ascii_lowercase().as_str(), "1" | "true")
            }
            other => unknown.push(other.to_owned()),
        }
    }
    if !unknown.is_empty() && !ignore_unknown {
        return Err(invalid_env(format!(
            "CNI_ARGS: unknown keys {unknown:?} (set IgnoreUnknown=1 to allow them)"
        )));
    }
    for (field, value) in [
        ("K8S_POD_NAMESPACE", &pod.namespace),
        ("K8S_POD_NAME", &pod.name),
        ("K8S_POD_UID", &pod.uid),
    ] {
        if value.len() > MAX_TEXT || value.chars().any(char::is_control) {
            return Err(invalid_env(format!(
                "CNI_ARGS: {field} is not a valid Kubernetes name"
            )));
        }
    }
    Ok(pod)
}

fn parse_prev_result(v: &Value) -> Result<PrevResult, CniError> {
    let bad = |msg: &str| invalid_config(format!("prevResult: {msg}"));
    let ips = v
        .get("ips")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no ips"))?;
    let ip = ips
        .iter()
        .find(|ip| {
            ip.get("address")
                .and_then(Value::as_str)
                .is_some_and(|a| a.parse::<Ipv4Net>().is_ok())
        })
        .ok_or_else(|| bad("no IPv4 address"))?;
    let address: Ipv4Net = ip["address"]
        .as_str()
        .unwrap_or_default()
        .parse()
        .map_err(|_| bad("bad address"))?;
    let gateway = match ip.get("gateway").and_then(Value::as_str) {
        Some(g) => Some(g.parse().map_err(|_| bad("bad gateway"))?),
        None => None,
    };
    let container_ifname = ip
        .get("interface")
        .and_then(Value::as_u64)
        .and_then(|i| {
            v.get("interfaces")?
                .as_array()?
                .get(usize::try_from(i).ok()?)
                .cloned()
        })
        .and_then(|iface| iface.get("name")?.as_str().map(str::to_owned));
    Ok(PrevResult {
        address,
        gateway,
        container_ifname,
    })
}

fn parse_valid_attachments(conf: &Value) -> Result<Vec<ValidAttachment>, CniError> {
    let list = conf
        .get("cni.dev/valid-attachments")
        .or_else(|| conf.get("cni.dev/gc-attachments"))
        .ok_or_else(|| invalid_config("GC needs cni.dev/valid-attachments"))?
        .as_array()
        .ok_or_else(|| invalid_config("cni.dev/valid-attachments is not a list"))?;
    list.iter()
        .map(|a| {
            let id = a
                .get("containerID")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let ifname = a.get("ifname").and_then(Value::as_str).unwrap_or_default();
            if !valid_container_id(id) || !valid_ifname(ifname) {
                return Err(invalid_config(format!(
                    "cni.dev/valid-attachments: bad entry {a}"
                )));
            }
            Ok(ValidAttachment {
                container_id: id.to_owned(),
                ifname: ifname.to_owned(),
            })
        })
        .collect()
}

/// The version an error object is shaped for: the config's cniVersion if
/// it can be read and is supported, else the newest.
pub fn error_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .filter(|v| weft_core::cni::is_supported(v))
        .unwrap_or_else(|| weft_core::cni::NEWEST.to_owned())
}

pub fn parse(env: &HashMap<String, String>, stdin: &[u8]) -> Result<Request, CniError> {
    let var = |k: &str| env.get(k).map(String::as_str).filter(|v| !v.is_empty());
    let command_raw = var("CNI_COMMAND").ok_or_else(|| invalid_env("CNI_COMMAND is not set"))?;
    let command = Command::parse(command_raw)
        .ok_or_else(|| invalid_env(format!("CNI_COMMAND {command_raw:?} is not a CNI command")))?;

    let conf: Value = if stdin.iter().all(u8::is_ascii_whitespace) && command == Command::Version {
        Value::Object(Default::default())
    } else {
        serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(Code::Decode, "network config is not valid JSON")
                .with_details(e.to_string())
        })?
    };
    if !conf.is_object() {
        return Err(CniError::new(
            Code::Decode,
            "network config is not a JSON object",
        ));
    }
    let version = match conf.get("cniVersion") {
        Some(Value::String(v)) => v.clone(),
        None if command == Command::Version => "1.1.0".to_owned(),
        None => return Err(invalid_config("cniVersion is missing")),
        Some(_) => return Err(invalid_config("cniVersion is not a string")),
    };
    if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            format!(
                "cniVersion {version} is not supported; weft supports {}",
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    let empty = Request {
        command,
        version: version.clone(),
        network: String::new(),
        container_id: String::new(),
        netns: None,
        ifname: String::new(),
        pod: PodArgs::default(),
        prev_result: None,
        valid_attachments: Vec::new(),
    };
    if command == Command::Version {
        return Ok(empty);
    }
    if let Some(min) = weft_core::cni::min_version(command_raw)
        && !version_at_least(&version, min)
    {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            format!("{command_raw} needs cniVersion {min} or newer, the config says {version}"),
        ));
    }
    let network = conf
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| invalid_config("name is missing"))?
        .to_owned();
    match conf.get("type").and_then(Value::as_str) {
        Some("weft") => {}
        Some(other) => {
            return Err(invalid_config(format!(
                "type is {other:?}, this plugin is \"weft\""
            )));
        }
        None => return Err(invalid_config("type is missing")),
    }
    if let Some(sock) = conf.get("agentSocket")
        && !sock.as_str().is_some_and(|s| s.starts_with('/'))
    {
        return Err(invalid_config("agentSocket must be an absolute path"));
    }
    if command == Command::Status {
        return Ok(Request { network, ..empty });
    }
    if command == Command::Gc {
        return Ok(Request {
            network,
            valid_attachments: parse_valid_attachments(&conf)?,
            ..empty
        });
    }

    let container_id =
        var("CNI_CONTAINERID").ok_or_else(|| invalid_env("CNI_CONTAINERID is not set"))?;
    if !valid_container_id(container_id) {
        return Err(invalid_env(format!(
            "CNI_CONTAINERID {container_id:?} has characters outside [A-Za-z0-9_.-]"
        )));
    }
    let ifname = var("CNI_IFNAME").ok_or_else(|| invalid_env("CNI_IFNAME is not set"))?;
    if !valid_ifname(ifname) {
        return Err(invalid_env(format!(
            "CNI_IFNAME {ifname:?} is not a valid interface name (1-15 bytes, no '/')"
        )));
    }
    let netns = var("CNI_NETNS").map(PathBuf::from);
    match (&netns, command) {
        (None, Command::Add | Command::Check) => return Err(invalid_env("CNI_NETNS is not set")),
        (Some(p), _) if !p.is_absolute() => {
            return Err(invalid_env(format!(
                "CNI_NETNS {} is not an absolute path",
                p.display()
            )));
        }
        _ => {}
    }
    let pod = parse_args(var("CNI_ARGS").unwrap_or_default())?;
    let prev_result = match (command, conf.get("prevResult")) {
        (Command::Check, None) => return Err(invalid_config("CHECK needs prevResult")),
        (_, Some(prev)) if command == Command::Check => Some(parse_prev_result(prev)?),
        _ => None,
    };
    Ok(Request {
        network,
        container_id: container_id.to_owned(),
        netns,
        ifname: ifname.to_owned(),
        pod,
        prev_result,
        ..empty
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const K8S_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=1f2e";

    fn add_env() -> HashMap<String, String> {
        env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/var/run/netns/cni-1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", K8S_ARGS),
            ("CNI_PATH", "/opt/cni/bin"),
        ])
    }

    fn conf(version: &str) -> Vec<u8> {
        format!(r#"{{"cniVersion":"{version}","name":"weft","type":"weft"}}"#).into_bytes()
    }

    #[test]
    fn a_kubelet_add_parses_for_every_version() {
        for v in SUPPORTED_VERSIONS {
            let r = parse(&add_env(), &conf(v)).unwrap();
            assert_eq!(r.command, Command::Add);
            assert_eq!(r.version, v);
            assert_eq!(r.container_id, "abc123");
            assert_eq!(r.ifname, "eth0");
            assert_eq!(
                r.netns.as_deref(),
                Some(std::path::Path::new("/var/run/netns/cni-1"))
            );
            assert_eq!(
                r.pod,
                PodArgs {
                    namespace: "default".into(),
                    name: "web-0".into(),
                    uid: "1f2e".into(),
                    infra_container_id: "abc123".into()
                }
            );
        }
    }

    #[test]
    fn bad_requests_get_the_spec_code() {
        type Case = (&'static str, HashMap<String, String>, Vec<u8>, Code);
        let mut cases: Vec<Case> = Vec::new();
        let with = |k: &str, v: Option<&str>| {
            let mut e = add_env();
            match v {
                Some(v) => e.insert(k.to_owned(), v.to_owned()),
                None => e.remove(k),
            };
            e
        };
        cases.push((
            "no command",
            with("CNI_COMMAND", None),
            conf("1.0.0"),
            Code::InvalidEnv,
        ));
        cases.push((
            "bad command",
            with("CNI_COMMAND", Some("ATTACH")),
            conf("1.0.0"),
            Code::InvalidEnv,
        ));
        cases.push((
            "no container id",
            with("CNI_CONTAINERID", None),
            conf("1.0.0"),
            Code::InvalidEnv,
        ));
        cases.push((
            "bad container id",
            with("CNI_CONTAINERID", Some("a/b")),
            conf("1.0.0"),
            Code::InvalidEnv,
        ));
        cases.push((
            "no ifname",
            with("CNI_IFNAME", None),
            conf("1.0.0"),
            Code::InvalidEnv,
        ));
        cases.push((
            "long ifname",
            with("CNI_IFNAME", Some("a234567890123456")),
            conf("1.0.0"),
            Code::InvalidEnv,
        ));
        cases.push((
            "slash ifname",
            with("CNI_IFNAME", Some("eth/0")),
            conf("1.0.0"),
            Code::InvalidEnv,
        ));
        cases.push((
            "no netns on ADD",
            with("CNI_NETNS", None),
            conf("1.0.0"),
            Code::InvalidEnv,
        ));
        cases.push((
            "relative netns",
            with("CNI_NETNS", Some("netns/x")),
            conf("1.0.0"),
            Code::InvalidEnv,
        ));
        cases.push((
            "args without =",
            with("CNI_ARGS", Some("K8S_POD_NAME")),
            conf("1.0.0"),
            Code::InvalidEnv,
        ));
        cases.push((
            "unknown arg",
            with("CNI_ARGS", Some("FOO=1")),
            conf("1.0.0"),
            Code::InvalidEnv,
        ));
        cases.push(("not json", add_env(), b"{".to_vec(), Code::Decode));
        cases.push(("not an object", add_env(), b"[1]".to_vec(), Code::Decode));
        cases.push((
            "no version",
            add_env(),
            br#"{"name":"weft","type":"weft"}"#.to_vec(),
            Code::InvalidConfig,
        ));
        cases.push((
            "old version",
            add_env(),
            conf("0.2.0"),
            Code::IncompatibleVersion,
        ));
        cases.push((
            "future version",
            add_env(),
            conf("9.0.0"),
            Code::IncompatibleVersion,
        ));
        cases.push((
            "no name",
            add_env(),
            br#"{"cniVersion":"1.0.0","type":"weft"}"#.to_vec(),
            Code::InvalidConfig,
        ));
        cases.push((
            "wrong type",
            add_env(),
            br#"{"cniVersion":"1.0.0","name":"n","type":"bridge"}"#.to_vec(),
            Code::InvalidConfig,
        ));
        cases.push((
            "relative socket",
            add_env(),
            br#"{"cniVersion":"1.0.0","name":"n","type":"weft","agentSocket":"x.sock"}"#.to_vec(),
            Code::InvalidConfig,
        ));
        cases.push((
            "CHECK on 0.3.1",
            with("CNI_COMMAND", Some("CHECK")),
            conf("0.3.1"),
            Code::IncompatibleVersion,
        ));
        cases.push((
            "CHECK without prevResult",
            with("CNI_COMMAND", Some("CHECK")),
            conf("1.0.0"),
            Code::InvalidConfig,
        ));
        cases.push((
            "GC on 1.0.0",
            with("CNI_COMMAND", Some("GC")),
            conf("1.0.0"),
            Code::IncompatibleVersion,
        ));
        cases.push((
            "STATUS on 0.4.0",
            with("CNI_COMMAND", Some("STATUS")),
            conf("0.4.0"),
            Code::IncompatibleVersion,
        ));
        cases.push((
            "GC without list",
            with("CNI_COMMAND", Some("GC")),
            conf("1.1.0"),
            Code::InvalidConfig,
        ));
        for (name, env, stdin, code) in cases {
            let err = parse(&env, &stdin).expect_err(name);
            assert_eq!(err.code, code, "{name}: {err}");
            assert!(!err.msg.is_empty());
        }
    }

    #[test]
    fn del_tolerates_a_missing_netns() {
        let mut e = add_env();
        e.insert("CNI_COMMAND".into(), "DEL".into());
        e.remove("CNI_NETNS");
        let r = parse(&e, &conf("0.3.1")).unwrap();
        assert_eq!((r.command, r.netns), (Command::Del, None));
    }

    #[test]
    fn version_needs_no_config() {
        let r = parse(&env(&[("CNI_COMMAND", "VERSION")]), b"").unwrap();
        assert_eq!((r.command, r.version.as_str()), (Command::Version, "1.1.0"));
    }

    #[test]
    fn gc_reads_valid_attachments_under_either_key() {
        for key in ["cni.dev/valid-attachments", "cni.dev/gc-attachments"] {
            let stdin = format!(
                r#"{{"cniVersion":"1.1.0","name":"weft","type":"weft","{key}":[{{"containerID":"c1","ifname":"eth0"}}]}}"#
            );
            let r = parse(&env(&[("CNI_COMMAND", "GC")]), stdin.as_bytes()).unwrap();
            assert_eq!(
                r.valid_attachments,
                [ValidAttachment {
                    container_id: "c1".into(),
                    ifname: "eth0".into()
                }]
            );
        }
        let bad = r#"{"cniVersion":"1.1.0","name":"weft","type":"weft","cni.dev/valid-attachments":[{"containerID":"c/1","ifname":"eth0"}]}"#;
        assert_eq!(
            parse(&env(&[("CNI_COMMAND", "GC")]), bad.as_bytes())
                .unwrap_err()
                .code,
            Code::InvalidConfig
        );
    }

    #[test]
    fn check_reads_prev_result() {
        let mut e = add_env();
        e.insert("CNI_COMMAND".into(), "CHECK".into());
        let stdin = r#"{"cniVersion":"1.0.0","name":"weft","type":"weft","prevResult":{
            "interfaces":[{"name":"weftabc"},{"name":"eth0","sandbox":"/var/run/netns/cni-1"}],
            "ips":[{"address":"10.244.1.5/24","gateway":"10.244.1.1","interface":1}]}}"#;
        let r = parse(&e, stdin.as_bytes()).unwrap();
        assert_eq!(
            r.prev_result,
            Some(PrevResult {
                address: "10.244.1.5/24".parse().unwrap(),
                gateway: Some("10.244.1.1".parse().unwrap()),
                container_ifname: Some("eth0".into()),
            })
        );
    }

    /// A stable stand-in for the cargo-fuzz target (agent/fuzz): arbitrary
    /// bytes and mangled configs never panic the parser.
    #[test]
    fn arbitrary_input_never_panics() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let base = br#"{"cniVersion":"1.1.0","name":"weft","type":"weft","prevResult":{"ips":[{"address":"10.244.1.5/24","interface":1}]},"cni.dev/valid-attachments":[{"containerID":"c","ifname":"eth0"}]}"#;
        for command in ["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION"] {
            let mut e = add_env();
            e.insert("CNI_COMMAND".into(), command.into());
            for _ in 0..2000 {
                let mut input = base.to_vec();
                for _ in 0..(next() % 6) {
                    let i = (next() as usize) % input.len();
                    input[i] = (next() % 256) as u8;
                }
                let cut = (next() as usize) % (input.len() + 1);
                let _ = parse(&e, &input[..cut]);
                let _ = parse(&e, &input);
            }
        }
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(version_at_least("1.1.0", "1.1.0"));
        assert!(version_at_least("1.0.0", "0.4.0"));
        assert!(!version_at_least("0.3.1", "0.4.0"));
        assert!(!version_at_least("0.10.0", "1.0.0"));
    }
}
