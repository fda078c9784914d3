//! Command line and environment. Values arrive as text and are validated
//! together, so an operator sees every mistake in one start attempt.
//! (Over 400 lines because the second half is its table-driven tests.)

use std::net::SocketAddr;

use clap::{Parser, Subcommand};
use ipnet::Ipv4Net;

use weft_core::ipam::ClusterLayout;

#[derive(Debug, Parser)]
#[command(
    name = "weft-server",
    version,
    about = "Weft's central IPAM and topology service"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// gRPC listen address (Topology, Ipam, Admin, health, reflection).
    #[arg(
        long,
        env = "WEFT_LISTEN",
        default_value = "0.0.0.0:7400",
        global = true
    )]
    pub listen: String,

    /// PostgreSQL URL, e.g. postgres://weft@db/weft or
    /// postgres:///weft?host=/run/postgresql for a unix socket.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,

    /// The pod network, split into one block per node.
    #[arg(
        long,
        env = "WEFT_CLUSTER_CIDR",
        default_value = "10.244.0.0/16",
        global = true
    )]
    pub cluster_cidr: String,

    /// Prefix length of each node's block.
    #[arg(
        long,
        env = "WEFT_NODE_PREFIX_LEN",
        default_value = "24",
        global = true
    )]
    pub node_prefix_len: String,

    /// Prometheus /metrics and /healthz listen address.
    #[arg(
        long,
        env = "WEFT_METRICS_LISTEN",
        default_value = "0.0.0.0:7401",
        global = true
    )]
    pub metrics_listen: String,

    /// VXLAN network identifier handed to agents (1..=16777215).
    #[arg(long, env = "WEFT_VNI", default_value = "1", global = true)]
    pub vni: String,

    /// Pod MTU suggested to agents; 0 lets each agent derive it from its
    /// underlay MTU.
    #[arg(long, env = "WEFT_MTU_HINT", default_value = "0", global = true)]
    pub mtu_hint: String,

    /// Topology changes kept for resuming watchers; older ones get a snapshot.
    #[arg(
        long,
        env = "WEFT_TOPOLOGY_HISTORY",
        default_value = "10000",
        global = true
    )]
    pub topology_history: String,

    /// Seconds a deleted node's block is held back from other nodes, so a
    /// still-running agent's pods never share addresses with a new node's
    /// (the same node name registering again gets the block back at once).
    /// Agents bind from their reserve for at most half of it without
    /// hearing from a server (the reserve lease, docs/design.md).
    #[arg(
        long,
        env = "WEFT_BLOCK_QUARANTINE",
        default_value = "3600",
        global = true
    )]
    pub block_quarantine: String,

    /// Seconds without a heartbeat after which a node is taken to be gone
    /// for good (a machine that vanished without DeleteNode): it is fenced
    /// and deleted as DeleteNode would, its block quarantined for
    /// --block-quarantine, then reclaimed. 0 (the default) turns the
    /// policy off; otherwise at least 60, and meant to be hours (e.g.
    /// 21600), far above the agents' --heartbeat-seconds.
    #[arg(
        long,
        env = "WEFT_STALE_NODE_AFTER",
        default_value = "0",
        global = true
    )]
    pub stale_node_after: String,

    /// Log output format.
    #[arg(long, env = "WEFT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// Log filter in RUST_LOG syntax, e.g. "info,weft_server=debug".
    #[arg(long, env = "WEFT_LOG", default_value = "info", global = true)]
    pub log: String,

    /// Validate flags and environment, then exit without connecting to
    /// anything (for manifests and CI).
    #[arg(long, global = true)]
    pub check_config: bool,

    /// Server certificate (PEM) for mutual TLS.
    #[arg(long, env = "WEFT_TLS_CERT", global = true)]
    pub tls_cert: Option<std::path::PathBuf>,

    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "WEFT_TLS_KEY", global = true)]
    pub tls_key: Option<std::path::PathBuf>,

    /// CA certificate (PEM) that signs node, admin and viewer certificates.
    #[arg(long, env = "WEFT_TLS_CLIENT_CA", global = true)]
    pub tls_client_ca: Option<std::path::PathBuf>,

    /// Serve plaintext without authenticating anyone (local development
    /// only; logged as a warning).
    /// (WEFT_INSECURE_PLAINTEXT takes true/false, 1/0, yes/no, on/off.)
    #[arg(
        long,
        env = "WEFT_INSECURE_PLAINTEXT",
        global = true,
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub insecure_plaintext: bool,
}

/// Files for mutual TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub client_ca: std::path::PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Serve gRPC and metrics (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Write a CA and certificates for mutual TLS into a directory.
    Certs(CertsArgs),
    /// Check a running server's grpc.health.v1 status; exit 0 when SERVING
    /// (an exec probe: kubelet's own gRPC probe cannot speak TLS).
    Probe(ProbeArgs),
}

#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct ProbeArgs {
    /// Where the server listens.
    #[arg(long, default_value = "127.0.0.1:7400")]
    pub addr: String,
    /// CA of the server certificate; without it the probe speaks plaintext.
    #[arg(long)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Name the server certificate carries.
    #[arg(long, default_value = "weft-server.weft-system.svc")]
    pub tls_server_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
#[command(subcommand_negates_reqs = true, args_conflicts_with_subcommands = true)]
pub struct CertsArgs {
    #[command(subcommand)]
    pub add: Option<CertsCommand>,
    /// Directory to write ca.pem, ca-key.pem, server.pem, node-NAME.pem,
    /// admin-NAME.pem ... into.
    #[arg(long, required = true)]
    pub out: Option<std::path::PathBuf>,
    /// Replace a CA that is already in --out (every certificate it issued
    /// stops being trusted).
    #[arg(long)]
    pub force: bool,
    /// Names and addresses the server certificate answers to (comma-separated).
    #[arg(long, value_delimiter = ',', required = true)]
    pub server_san: Vec<String>,
    /// Node names to issue node certificates for (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub nodes: Vec<String>,
    /// Admin certificates to issue.
    #[arg(long, value_delimiter = ',', default_value = "admin")]
    pub admins: Vec<String>,
    /// Read-only certificates to issue.
    #[arg(long, value_delimiter = ',')]
    pub viewers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum CertsCommand {
    /// Issue more certificates from the CA already in --out (ca.pem and
    /// ca-key.pem), e.g. for a node that joins later.
    Add(CertsAddArgs),
}

#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct CertsAddArgs {
    /// Directory holding ca.pem and ca-key.pem; the new files go there.
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// Node certificates to issue (comma-separated node names).
    #[arg(long, value_delimiter = ',')]
    pub node: Vec<String>,
    /// Admin certificates to issue.
    #[arg(long, value_delimiter = ',')]
    pub admin: Vec<String>,
    /// Read-only certificates to issue.
    #[arg(long, value_delimiter = ',')]
    pub viewer: Vec<String>,
}

impl Cli {
    /// The command line as clap sees it, with the serving flags (global,
    /// so `serve --listen ...` and `migrate --database-url ...` work)
    /// hidden from the help of `certs` and `probe`, which use none of them.
    pub fn command_for_help() -> clap::Command {
        use clap::CommandFactory;
        let cmd = Self::command();
        // Hidden copies of the globals in those subcommands: clap then
        // propagates nothing visible there, and still accepts them.
        let globals: Vec<clap::Arg> = cmd
            .get_arguments()
            .filter(|a| a.is_global_set())
            .cloned()
            .collect();
        let hide = |mut c: clap::Command| {
            for a in &globals {
                c = c.arg(a.clone().hide(true));
            }
            c
        };
        cmd.mut_subcommand("probe", hide)
            .mut_subcommand("certs", |c| hide(c).mut_subcommand("add", hide))
    }

    /// Parses the process's arguments (exits on --help or a bad flag).
    pub fn parse_args() -> Self {
        use clap::FromArgMatches;
        let matches = Self::command_for_help().get_matches();
        Self::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }
}

pub use weft_plumbing::{ConfigErrors, LogFormat};

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub command: Command,
    pub listen: SocketAddr,
    pub database_url: String,
    pub layout: ClusterLayout,
    pub metrics_listen: SocketAddr,
    pub vni: u32,
    pub mtu_hint: u32,
    pub topology_history: u32,
    pub block_quarantine: std::time::Duration,
    /// `None`: the stale-node policy is off.
    pub stale_node_after: Option<std::time::Duration>,
    pub log_format: LogFormat,
    pub log: String,
    pub check_only: bool,
    /// `None` only with --insecure-plaintext.
    pub tls: Option<TlsFiles>,
}

impl Config {
    pub fn from_cli(cli: Cli) -> Result<Self, ConfigErrors> {
        let mut errors = weft_plumbing::Collect::default();

        let listen = errors.take(parse_addr("--listen/WEFT_LISTEN", &cli.listen));
        let metrics_listen = errors.take(parse_addr(
            "--metrics-listen/WEFT_METRICS_LISTEN",
            &cli.metrics_listen,
        ));
        let database_url = errors.take(match cli.database_url {
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Ok(url)
            }
            Some(_) => Err(
                "--database-url/DATABASE_URL: must start with postgres:// or postgresql://".into(),
            ),
            None => Err("--database-url/DATABASE_URL: required".into()),
        });
        let cidr = errors.take(cli.cluster_cidr.parse::<Ipv4Net>().map_err(|_| {
            format!(
                "--cluster-cidr/WEFT_CLUSTER_CIDR: {:?} is not an IPv4 CIDR like 10.244.0.0/16",
                cli.cluster_cidr
            )
        }));
        let prefix = errors.take(
            cli.node_prefix_len
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= 32)
                .ok_or_else(|| format!("--node-prefix-len/WEFT_NODE_PREFIX_LEN: {:?} is not a prefix length (0-32)", cli.node_prefix_len)),
        );
        let vni = errors.take(parse_range("--vni/WEFT_VNI", &cli.vni, 1, (1 << 24) - 1));
        let mtu_hint = errors.take(
            parse_range("--mtu-hint/WEFT_MTU_HINT", &cli.mtu_hint, 0, 65_535).and_then(|m| {
                if m != 0 && m < 576 {
                    Err(format!(
                        "--mtu-hint/WEFT_MTU_HINT: {m} is below the IPv4 minimum of 576"
                    ))
                } else {
                    Ok(m)
                }
            }),
        );
        let topology_history = errors.take(parse_range(
            "--topology-history/WEFT_TOPOLOGY_HISTORY",
            &cli.topology_history,
            1,
            10_000_000,
        ));
        let block_quarantine = errors
            .take(parse_range(
                "--block-quarantine/WEFT_BLOCK_QUARANTINE",
                &cli.block_quarantine,
                0,
                30 * 24 * 3600,
            ))
            .map(|s| std::time::Duration::from_secs(u64::from(s)));
        let stale_node_after = errors
            .take(parse_range(
                "--stale-node-after/WEFT_STALE_NODE_AFTER",
                &cli.stale_node_after,
                0,
                30 * 24 * 3600,
            ))
            .and_then(|s| {
                // Below a minute a node between two heartbeats (10 s by
                // default) and a slow network could be taken for gone.
                if (1..60).contains(&s) {
                    errors.push(format!(
                        "--stale-node-after/WEFT_STALE_NODE_AFTER: {s} s is below the minimum of 60 s (0 turns the policy off; hours are meant)"
                    ));
                }
                (s > 0).then(|| std::time::Duration::from_secs(u64::from(s)))
            });
        let layout = match (cidr, prefix) {
            (Some(cidr), Some(prefix)) => errors.take(
                ClusterLayout::new(cidr, prefix)
                    .map_err(|e| format!("--cluster-cidr/--node-prefix-len: {e}")),
            ),
            _ => None,
        };
        let tls = match (
            cli.tls_cert.clone(),
            cli.tls_key.clone(),
            cli.tls_client_ca.clone(),
            cli.insecure_plaintext,
        ) {
            (Some(cert), Some(key), Some(client_ca), false) => Some(TlsFiles {
                cert,
                key,
                client_ca,
            }),
            (None, None, None, true) => None,
            (_, _, _, true) => {
                errors.push("--insecure-plaintext: cannot be combined with --tls-* flags".into());
                None
            }
            // Migrating serves nothing.
            (None, None, None, false) if cli.command == Some(Command::Migrate) => None,
            (None, None, None, false) => {
                errors.push(
                    "--tls-cert, --tls-key and --tls-client-ca are required (or --insecure-plaintext for local development)"
                        .into(),
                );
                None
            }
            _ => {
                errors.push(
                    "--tls-cert, --tls-key and --tls-client-ca go together: set all three".into(),
                );
                None
            }
        };
        if let Err(e) = weft_plumbing::check_log_filter(&cli.log) {
            errors.push(format!("--log/WEFT_LOG: {e}"));
        }

        match (
            listen,
            metrics_listen,
            database_url,
            layout,
            vni,
            mtu_hint,
            topology_history,
            block_quarantine,
        ) {
            (
                Some(listen),
                Some(metrics_listen),
                Some(database_url),
                Some(layout),
                Some(vni),
                Some(mtu_hint),
                Some(topology_history),
                Some(block_quarantine),
            ) if errors.is_empty() => Ok(Self {
                command: cli.command.clone().unwrap_or(Command::Serve),
                listen,
                database_url,
                layout,
                metrics_listen,
                vni,
                mtu_hint,
                topology_history,
                block_quarantine,
                stale_node_after,
                log_format: cli.log_format,
                log: cli.log,
                check_only: cli.check_config,
                tls,
            }),
            _ => Err(errors.into_errors()),
        }
    }
}

fn parse_addr(name: &str, value: &str) -> Result<SocketAddr, String> {
    value
        .parse()
        .map_err(|_| format!("{name}: {value:?} is not an address like 0.0.0.0:7400"))
}

fn parse_range(name: &str, value: &str, min: u32, max: u32) -> Result<u32, String> {
    value
        .parse::<u32>()
        .ok()
        .filter(|v| (min..=max).contains(v))
        .ok_or_else(|| format!("{name}: {value:?} is not a number in {min}..={max}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut argv = vec!["weft-server"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap()
    }

    #[test]
    fn defaults_match_the_design() {
        let c = Config::from_cli(cli(&[
            "--database-url",
            "postgres://weft@db/weft",
            "--insecure-plaintext",
        ]))
        .unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:7400");
        assert_eq!(c.metrics_listen.to_string(), "0.0.0.0:7401");
        assert_eq!(c.layout.cidr().to_string(), "10.244.0.0/16");
        assert_eq!(c.layout.node_prefix(), 24);
        assert_eq!(c.vni, 1);
        assert_eq!(c.command, Command::Serve);
        assert_eq!(c.stale_node_after, None, "the stale-node policy is off");
    }

    #[test]
    fn the_stale_node_policy_takes_zero_or_at_least_a_minute() {
        let with = |v: &str| {
            Config::from_cli(cli(&[
                "--database-url",
                "postgres://weft@db/weft",
                "--insecure-plaintext",
                "--stale-node-after",
                v,
            ]))
        };
        assert_eq!(with("0").unwrap().stale_node_after, None);
        assert_eq!(
            with("21600").unwrap().stale_node_after,
            Some(std::time::Duration::from_secs(21600))
        );
        for bad in ["30", "1", "six hours"] {
            let err = with(bad).unwrap_err().to_string();
            assert!(err.contains("--stale-node-after"), "{bad}: {err}");
        }
    }

    #[test]
    fn every_mistake_is_reported_at_once() {
        let mut bad = cli(&[
            "--listen",
            "nope",
            "--metrics-listen",
            "1.2.3.4",
            "--cluster-cidr",
            "10.244.0.0/33",
            "--node-prefix-len",
            "x",
            "--vni",
            "0",
            "--mtu-hint",
            "100",
            "--log",
            "=[",
        ]);
        // DATABASE_URL may be set in the test environment; clap reads it.
        bad.database_url = None;
        let err = Config::from_cli(bad).unwrap_err();
        let text = err.to_string();
        for flag in [
            "--listen",
            "--metrics-listen",
            "--database-url",
            "--cluster-cidr",
            "--node-prefix-len",
            "--vni",
            "--mtu-hint",
            "--log",
        ] {
            assert!(text.contains(flag), "{flag} missing from:\n{text}");
        }
        assert_eq!(err.0.len(), 9, "{text}");
        assert!(text.contains("--tls-cert"), "{text}");
    }

    #[test]
    fn serving_needs_tls_or_an_explicit_plaintext_flag() {
        let url = ["--database-url", "postgres://x/y"];
        let err = Config::from_cli(cli(&url)).unwrap_err();
        assert!(err.to_string().contains("--insecure-plaintext"), "{err}");
        let partial = Config::from_cli(cli(&[url[0], url[1], "--tls-cert", "/c.pem"])).unwrap_err();
        assert!(partial.to_string().contains("go together"), "{partial}");
        let both = Config::from_cli(cli(&[
            url[0],
            url[1],
            "--tls-cert",
            "/c",
            "--tls-key",
            "/k",
            "--tls-client-ca",
            "/ca",
            "--insecure-plaintext",
        ]))
        .unwrap_err();
        assert!(both.to_string().contains("cannot be combined"), "{both}");
        let tls = Config::from_cli(cli(&[
            url[0],
            url[1],
            "--tls-cert",
            "/c",
            "--tls-key",
            "/k",
            "--tls-client-ca",
            "/ca",
        ]))
        .unwrap();
        assert_eq!(tls.tls.map(|t| t.client_ca), Some("/ca".into()));
        assert!(
            Config::from_cli(cli(&["migrate", url[0], url[1]])).is_ok(),
            "migrate serves nothing"
        );
    }

    #[test]
    fn an_impossible_layout_is_rejected() {
        let err = Config::from_cli(cli(&[
            "--database-url",
            "postgres://x/y",
            "--node-prefix-len",
            "12",
        ]))
        .unwrap_err();
        assert!(
            err.to_string().contains("shorter than the cluster CIDR"),
            "{err}"
        );
    }

    #[test]
    fn migrate_takes_the_global_flags() {
        let c = Config::from_cli(cli(&["migrate", "--database-url", "postgres://x/y"])).unwrap();
        assert_eq!(c.command, Command::Migrate);
    }
}
