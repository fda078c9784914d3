//! Command line and environment of `weft-agent`, validated together so an
//! operator sees every mistake at once.

use std::{net::Ipv4Addr, net::SocketAddr, path::PathBuf};

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "weft-agent",
    version,
    about = "Weft's node agent: bridge, VXLAN tunnels, peer sync and pod wiring"
)]
pub struct Cli {
    /// weft-server's gRPC URL, e.g. https://weft-server.weft-system.svc:7400
    /// (http:// only for a server run with --insecure-plaintext). Several
    /// replicas: a comma-separated list, or a name with several addresses;
    /// calls go to the replicas that answer.
    #[arg(long, env = "WEFT_SERVER")]
    pub server: Option<String>,

    /// This node's name (Kubernetes node name); defaults to the hostname.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// IPv4 address tunnels use on this node; defaults to the source
    /// address of the route toward the server.
    #[arg(long, env = "WEFT_UNDERLAY_IP")]
    pub underlay_ip: Option<String>,

    /// Interface that carries the tunnels; defaults to the one holding the
    /// underlay address.
    #[arg(long, env = "WEFT_UNDERLAY_INTERFACE")]
    pub underlay_interface: Option<String>,

    /// MTU of the underlay; defaults to the interface's MTU. Pods get this
    /// minus the 50 bytes of VXLAN overhead.
    #[arg(long, env = "WEFT_UNDERLAY_MTU")]
    pub underlay_mtu: Option<String>,

    /// Unix socket the CNI plugin talks to.
    #[arg(
        long,
        env = "WEFT_AGENT_SOCKET",
        default_value = "/run/weft/agent.sock"
    )]
    pub socket: PathBuf,

    /// Where the CNI network configuration is written once the node is ready.
    #[arg(long, env = "WEFT_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,

    /// Where the runtime finds CNI plugins: the chained plugins are looked
    /// for here, and asked which spec versions they support.
    #[arg(long, env = "WEFT_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,

    /// Reference plugins chained after weft in the conflist, in order
    /// (comma-separated; "" for none): portmap (hostPort, with SNAT for
    /// hairpin) and bandwidth (the kubernetes.io/*-bandwidth annotations).
    #[arg(long, env = "WEFT_CHAIN", default_value = "portmap,bandwidth")]
    pub chain: String,

    /// Node-local state that must survive restarts and reboots while the
    /// server is away: the node's assignment and its address reserve with
    /// the journal of binds and releases (a hostPath in the DaemonSet).
    #[arg(long, env = "WEFT_STATE_DIR", default_value = "/var/lib/weft")]
    pub state_dir: PathBuf,

    /// Prometheus /metrics and /healthz listen address.
    #[arg(long, env = "WEFT_METRICS_LISTEN", default_value = "0.0.0.0:7402")]
    pub metrics_listen: String,

    /// Seconds between heartbeats to the server.
    #[arg(long, env = "WEFT_HEARTBEAT_SECONDS", default_value = "10")]
    pub heartbeat_seconds: String,

    /// Refill the address reserve when fewer than this many are free.
    #[arg(long, env = "WEFT_RESERVE_LOW", default_value = "64")]
    pub reserve_low: String,

    /// Refill the address reserve up to this many free addresses: enough
    /// for a 110-pod node to start every pod at once without waiting on
    /// the server (the block is the node's alone, so a large reserve takes
    /// nothing from other nodes).
    #[arg(long, env = "WEFT_RESERVE_HIGH", default_value = "128")]
    pub reserve_high: String,

    /// Seconds the agent binds from its reserve without hearing from a
    /// server; the server's lease (half its --block-quarantine) caps it.
    #[arg(long, env = "WEFT_RESERVE_LEASE", default_value = "1800")]
    pub reserve_lease: String,

    /// Seconds between syncs of PostgreSQL with the node's bindings and
    /// checks of the bindings against the kernel; a binding whose pod is
    /// gone is released after two checks (reconcile without runtime GC).
    #[arg(long, env = "WEFT_RECONCILE_SECONDS", default_value = "30")]
    pub reconcile_seconds: String,

    /// Log output format.
    #[arg(long, env = "WEFT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter in RUST_LOG syntax, e.g. "info,weft_agent=debug".
    #[arg(long, env = "WEFT_LOG", default_value = "info")]
    pub log: String,

    /// Validate flags and environment, then exit without touching the
    /// node or the network (for manifests and CI).
    #[arg(long)]
    pub check_config: bool,

    /// CA certificate (PEM) that signed weft-server's certificate; with
    /// --tls-cert and --tls-key, turns on mutual TLS (https:// servers).
    #[arg(long, env = "WEFT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// This node's client certificate (PEM), CN = the node name.
    #[arg(long, env = "WEFT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "WEFT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// Name to verify the server certificate against, when the URL holds an
    /// address the certificate does not name (a Service's ClusterIP).
    #[arg(long, env = "WEFT_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
}

/// Files for mutual TLS toward the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub server_name: Option<String>,
}

pub use weft_plumbing::{ConfigErrors, LogFormat};

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub servers: Vec<tonic::transport::Uri>,
    pub node_name: String,
    pub underlay_ip: Option<Ipv4Addr>,
    pub underlay_interface: Option<String>,
    pub underlay_mtu: Option<u32>,
    pub socket: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub chain: Vec<crate::cni_conf::Chained>,
    pub state_dir: PathBuf,
    pub metrics_listen: SocketAddr,
    pub heartbeat_seconds: u64,
    pub reserve_low: usize,
    pub reserve_high: usize,
    pub reserve_lease: std::time::Duration,
    pub reconcile: std::time::Duration,
    pub log_format: LogFormat,
    pub log: String,
    pub check_only: bool,
    pub tls: Option<TlsFiles>,
}

/// The server's rule (weft-core), checked at start so a bad name is a
/// config error, not a registration that fails forever.
fn valid_node_name(s: &str) -> Result<String, String> {
    s.parse::<weft_core::domain::NodeName>()
        .map(|n| n.to_string())
        .map_err(|why| format!("--node-name/NODE_NAME: {s:?} is not a valid node name: {why}"))
}

impl Config {
    /// `hostname` is the fallback node name (passed in so tests control it).
    pub fn from_cli(cli: Cli, hostname: Option<String>) -> Result<Self, ConfigErrors> {
        let mut errors = weft_plumbing::Collect::default();
        let server = errors.take(match cli.server.as_deref() {
            None => Err(
                "--server/WEFT_SERVER: required (e.g. https://weft-server.weft-system.svc:7400)"
                    .into(),
            ),
            Some(list) => list
                .split(',')
                .map(str::trim)
                .map(|s| {
                    s.parse::<tonic::transport::Uri>()
                        .ok()
                        .filter(|u| {
                            matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
                        })
                        .ok_or_else(|| {
                            format!(
                                "--server/WEFT_SERVER: {s:?} is not a URL like https://host:7400"
                            )
                        })
                })
                .collect::<Result<Vec<_>, _>>(),
        });
        let node_name = errors.take(match cli.node_name.or(hostname) {
            Some(n) => valid_node_name(&n.to_ascii_lowercase()),
            None => Err("--node-name/NODE_NAME: not set and the hostname is unknown".into()),
        });
        let underlay_ip = cli.underlay_ip.as_deref().and_then(|s| {
            errors.take(s.parse::<Ipv4Addr>().map_err(|_| {
                format!("--underlay-ip/WEFT_UNDERLAY_IP: {s:?} is not an IPv4 address")
            }))
        });
        let underlay_mtu = cli.underlay_mtu.as_deref().and_then(|s| {
            errors.take(
                s.parse::<u32>()
                    .ok()
                    .filter(|m| (626..=65_535).contains(m))
                    .ok_or_else(|| {
                        format!(
                            "--underlay-mtu/WEFT_UNDERLAY_MTU: {s:?} is not an MTU in 626..=65535"
                        )
                    }),
            )
        });
        if let Some(name) = &cli.underlay_interface
            && (name.is_empty() || name.len() > 15 || name.contains('/'))
        {
            errors.push(format!(
                "--underlay-interface/WEFT_UNDERLAY_INTERFACE: {name:?} is not an interface name"
            ));
        }
        let metrics_listen = errors.take(cli.metrics_listen.parse::<SocketAddr>().map_err(|_| {
            format!(
                "--metrics-listen/WEFT_METRICS_LISTEN: {:?} is not an address like 0.0.0.0:7402",
                cli.metrics_listen
            )
        }));
        let heartbeat_seconds = errors.take(
            cli.heartbeat_seconds
                .parse::<u64>()
                .ok()
                .filter(|s| (1..=3600).contains(s))
                .ok_or_else(|| {
                    format!(
                        "--heartbeat-seconds/WEFT_HEARTBEAT_SECONDS: {:?} is not in 1..=3600",
                        cli.heartbeat_seconds
                    )
                }),
        );
        let mut number = |flag: &str, value: &str, range: std::ops::RangeInclusive<u64>| {
            errors.take(
                value
                    .parse::<u64>()
                    .ok()
                    .filter(|n| range.contains(n))
                    .ok_or_else(|| {
                        format!(
                            "{flag}: {value:?} is not in {}..={}",
                            range.start(),
                            range.end()
                        )
                    }),
            )
        };
        let reserve_low = number("--reserve-low/WEFT_RESERVE_LOW", &cli.reserve_low, 1..=256);
        let reserve_high = number(
            "--reserve-high/WEFT_RESERVE_HIGH",
            &cli.reserve_high,
            1..=256,
        );
        let reserve_lease = number(
            "--reserve-lease/WEFT_RESERVE_LEASE",
            &cli.reserve_lease,
            1..=7 * 24 * 3600,
        );
        let reconcile = number(
            "--reconcile-seconds/WEFT_RECONCILE_SECONDS",
            &cli.reconcile_seconds,
            1..=3600,
        );
        if let (Some(low), Some(high)) = (reserve_low, reserve_high)
            && low > high
        {
            errors.push(format!(
                "--reserve-low ({low}) must not exceed --reserve-high ({high})"
            ));
        }
        if !cli.socket.is_absolute() {
            errors.push(format!(
                "--socket/WEFT_AGENT_SOCKET: {} is not an absolute path",
                cli.socket.display()
            ));
        }
        if !cli.state_dir.is_absolute() {
            errors.push(format!(
                "--state-dir/WEFT_STATE_DIR: {} is not an absolute path",
                cli.state_dir.display()
            ));
        }
        if !cli.cni_conf_dir.is_absolute() {
            errors.push(format!(
                "--cni-conf-dir/WEFT_CNI_CONF_DIR: {} is not an absolute path",
                cli.cni_conf_dir.display()
            ));
        }
        if !cli.cni_bin_dir.is_absolute() {
            errors.push(format!(
                "--cni-bin-dir/WEFT_CNI_BIN_DIR: {} is not an absolute path",
                cli.cni_bin_dir.display()
            ));
        }
        let chain = errors
            .take(
                crate::cni_conf::parse_chain(&cli.chain)
                    .map_err(|e| format!("--chain/WEFT_CHAIN: {e}")),
            )
            .unwrap_or_default();
        if let Err(e) = weft_plumbing::check_log_filter(&cli.log) {
            errors.push(format!("--log/WEFT_LOG: {e}"));
        }
        let tls = match (
            cli.tls_ca.clone(),
            cli.tls_cert.clone(),
            cli.tls_key.clone(),
        ) {
            (Some(ca), Some(cert), Some(key)) => Some(TlsFiles {
                ca,
                cert,
                key,
                server_name: cli.tls_server_name.clone(),
            }),
            (None, None, None) => None,
            _ => {
                errors.push("--tls-ca, --tls-cert and --tls-key go together: set all three".into());
                None
            }
        };
        if let Some(servers) = &server {
            let https = servers
                .iter()
                .filter(|u| u.scheme_str() == Some("https"))
                .count();
            if tls.is_some() && https != servers.len() {
                errors.push(
                    "--server/WEFT_SERVER: with --tls-* every server URL must be https://".into(),
                );
            }
            if tls.is_none() && https > 0 {
                errors.push("--server/WEFT_SERVER: an https:// server needs --tls-ca, --tls-cert and --tls-key".into());
            }
        }
        let reserve = reserve_low
            .zip(reserve_high)
            .zip(reserve_lease.zip(reconcile));
        match (
            server,
            node_name,
            metrics_listen,
            heartbeat_seconds,
            reserve,
        ) {
            (
                Some(server),
                Some(node_name),
                Some(metrics_listen),
                Some(heartbeat_seconds),
                Some(((low, high), (lease, reconcile))),
            ) if errors.is_empty() => Ok(Self {
                servers: server,
                node_name,
                underlay_ip,
                underlay_interface: cli.underlay_interface,
                underlay_mtu,
                socket: cli.socket,
                cni_conf_dir: cli.cni_conf_dir,
                cni_bin_dir: cli.cni_bin_dir,
                chain,
                state_dir: cli.state_dir,
                metrics_listen,
                heartbeat_seconds,
                reserve_low: usize::try_from(low).unwrap_or(64),
                reserve_high: usize::try_from(high).unwrap_or(128),
                reserve_lease: std::time::Duration::from_secs(lease),
                reconcile: std::time::Duration::from_secs(reconcile),
                log_format: cli.log_format,
                log: cli.log,
                check_only: cli.check_config,
                tls,
            }),
            _ => Err(errors.into_errors()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut argv = vec!["weft-agent"];
        argv.extend_from_slice(args);
        let mut cli = Cli::try_parse_from(argv).unwrap();
        // The test environment may carry WEFT_*/NODE_NAME; only flags count here.
        if !args.contains(&"--server") {
            cli.server = None;
        }
        if !args.contains(&"--node-name") {
            cli.node_name = None;
        }
        cli
    }

    #[test]
    fn defaults_match_the_design() {
        let c = Config::from_cli(
            cli(&["--server", "http://198.51.100.254:7400"]),
            Some("Node-A".into()),
        )
        .unwrap();
        assert_eq!(
            c.node_name, "node-a",
            "hostnames are lower-cased as Kubernetes does"
        );
        assert_eq!(c.socket, PathBuf::from("/run/weft/agent.sock"));
        assert_eq!(c.cni_conf_dir, PathBuf::from("/etc/cni/net.d"));
        assert_eq!(c.cni_bin_dir, PathBuf::from("/opt/cni/bin"));
        assert_eq!(
            c.chain,
            [
                crate::cni_conf::Chained::Portmap,
                crate::cni_conf::Chained::Bandwidth
            ]
        );
        assert_eq!(c.metrics_listen.to_string(), "0.0.0.0:7402");
        assert_eq!(c.underlay_ip, None);
    }

    #[test]
    fn every_mistake_is_reported_at_once() {
        let err = Config::from_cli(
            cli(&[
                "--underlay-ip",
                "nope",
                "--underlay-mtu",
                "100",
                "--metrics-listen",
                "x",
                "--socket",
                "relative.sock",
                "--heartbeat-seconds",
                "0",
                "--node-name",
                "Bad_Name",
            ]),
            None,
        )
        .unwrap_err();
        let text = err.to_string();
        for flag in [
            "--server",
            "--node-name",
            "--underlay-ip",
            "--underlay-mtu",
            "--metrics-listen",
            "--socket",
            "--heartbeat-seconds",
        ] {
            assert!(text.contains(flag), "{flag} missing from:\n{text}");
        }
    }

    #[test]
    fn several_servers_are_comma_separated() {
        let c = Config::from_cli(
            cli(&[
                "--server",
                "http://198.51.100.254:7400, http://198.51.100.253:7400",
                "--node-name",
                "a",
            ]),
            None,
        )
        .unwrap();
        assert_eq!(c.servers.len(), 2);
        assert_eq!(c.servers[1].host(), Some("198.51.100.253"));
        assert!(
            Config::from_cli(
                cli(&["--server", "http://a:1,nope", "--node-name", "a"]),
                None
            )
            .is_err()
        );
    }

    #[test]
    fn server_must_be_an_http_url() {
        for bad in ["198.51.100.254:7400", "ftp://x:1", "http://"] {
            let err =
                Config::from_cli(cli(&["--server", bad, "--node-name", "a"]), None).unwrap_err();
            assert!(err.to_string().contains("--server"), "{bad}: {err}");
        }
    }
}
