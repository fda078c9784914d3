//! weftctl: the operator's command line, a thin client of weft-server's
//! Admin API over mutual TLS (the same API grpcurl reaches). Contexts come
//! from a small config file ([`config`]); output is a table for people or
//! JSON/YAML for scripts ([`output`]).
//!
//! Its own binary rather than a `weft-server admin` subcommand: operators
//! run it from their own machines, where the server (and its database
//! flags) has no business, and it pulls in no database or netlink code.

mod config;
mod output;

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use weft_proto::v1::{self as pb, admin_client::AdminClient};

use output::Format;

#[derive(Debug, Parser)]
#[command(
    name = "weftctl",
    version,
    about = "Query and operate a Weft cluster through weft-server's Admin API"
)]
struct Cli {
    /// Context from the config file (default: the current one).
    #[arg(long, global = true, env = "WEFTCTL_CONTEXT")]
    context: Option<String>,
    /// Output: a table, or every field as JSON or YAML.
    #[arg(short, long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Every node: block, underlay, addresses used and reserved, last heartbeat.
    Nodes,
    /// One node.
    Node { name: String },
    /// Allocations, filtered (paged through to the end).
    Allocations {
        #[arg(long)]
        node: Option<String>,
        #[arg(long)]
        namespace: Option<String>,
        #[arg(long)]
        pod: Option<String>,
        /// "10.244.3.7" or "10.244.3.7/24".
        #[arg(long)]
        address: Option<String>,
    },
    /// The audit trail of an address or a container id, of a pod
    /// (--pod NAMESPACE/NAME) or of a node (--node), oldest first.
    History {
        /// An address ("10.244.3.7") or a container id.
        key: Option<String>,
        #[arg(long, conflicts_with_all = ["key", "node"])]
        pod: Option<String>,
        #[arg(long, conflicts_with_all = ["key", "pod"])]
        node: Option<String>,
    },
    /// Addresses used and reserved per node and for the cluster.
    Utilization,
    /// Who holds an address now: pod, node, since when.
    Whois { address: String },
    /// Deletes a node: releases its addresses and withdraws it from every
    /// peer. Refused while the node still heartbeats, unless --force.
    DeleteNode {
        name: String,
        #[arg(long)]
        force: bool,
    },
    /// Releases a leaked address (audited). Refused while its node
    /// heartbeats: a live agent releases what is gone by itself.
    Release { address: String },
    /// Manage the config file's contexts.
    #[command(subcommand)]
    Config(ConfigCmd),
}

#[derive(Debug, Subcommand)]
enum ConfigCmd {
    /// Adds or replaces a context and makes it current.
    SetContext {
        name: String,
        /// "https://HOST:7400".
        #[arg(long)]
        server: String,
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        server_name: Option<String>,
    },
    UseContext {
        name: String,
    },
    /// Prints the config file.
    View,
}

/// A node that heartbeated this recently is alive: deleting it would
/// strand its pods (its agent fences itself, but they keep their addresses).
const ALIVE_WITHIN: Duration = Duration::from_secs(60);

fn ts(t: Option<&prost_types::Timestamp>) -> Value {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .map(|d| Value::String(d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)))
        .unwrap_or(Value::Null)
}

fn node_json(n: &pb::Node) -> Value {
    json!({
        "name": n.name, "block": n.block, "gateway": n.gateway, "underlayIp": n.underlay_ip,
        "vtepMac": n.vtep_mac, "used": n.used, "reserved": n.reserved, "capacity": n.capacity,
        "registeredAt": ts(n.registered_at.as_ref()), "lastSeen": ts(n.last_seen.as_ref()),
    })
}

fn allocation_json(a: &pb::Allocation) -> Value {
    let pod = if a.pod_name.is_empty() {
        String::new()
    } else {
        format!("{}/{}", a.pod_namespace, a.pod_name)
    };
    json!({
        "address": a.address, "state": a.state, "node": a.node_name, "pod": pod,
        "podUid": a.pod_uid, "containerId": a.container_id, "ifname": a.ifname,
        "offline": a.offline, "since": ts(a.bound_at.as_ref()),
        "recordedAt": ts(a.recorded_at.as_ref()), "gateway": a.gateway,
    })
}

fn entry_json(e: &pb::AuditEntry) -> Value {
    let pod = if e.pod_name.is_empty() {
        String::new()
    } else {
        format!("{}/{}", e.pod_namespace, e.pod_name)
    };
    json!({
        "id": e.id, "at": ts(e.at.as_ref()), "recordedAt": ts(e.recorded_at.as_ref()),
        "action": e.action, "actor": e.actor, "node": e.node_name, "address": e.address,
        "containerId": e.container_id, "ifname": e.ifname, "pod": pod, "offline": e.offline,
        "detail": e.detail,
    })
}

async fn connect(ctx: &config::Context) -> anyhow::Result<AdminClient<Channel>> {
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    if !ctx.server.starts_with("https://") {
        bail!(
            "server {:?}: weft-server speaks mutual TLS; use an https:// URL",
            ctx.server
        );
    }
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&ctx.ca)?))
        .identity(Identity::from_pem(read(&ctx.cert)?, read(&ctx.key)?));
    if let Some(name) = &ctx.server_name {
        tls = tls.domain_name(name.clone());
    }
    let channel = Endpoint::from_shared(ctx.server.clone())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .tls_config(tls)?
        .connect()
        .await
        .with_context(|| format!("connecting to {}", ctx.server))?;
    Ok(AdminClient::new(channel))
}

/// A gRPC failure as one line for the operator.
fn status(what: &str, s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{what}: {} ({:?})", s.message(), s.code())
}

/// The command's output: stdout is this tool's product (the workspace
/// bans print! for daemons, whose output is their log).
fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    // A closed pipe (| head) ends the output, nothing else.
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

fn print(format: Format, rows: &[Value], columns: &[(&str, &str)]) {
    emit(&output::render(format, rows, columns));
}

const NODE_COLUMNS: &[(&str, &str)] = &[
    ("NAME", "name"),
    ("BLOCK", "block"),
    ("UNDERLAY", "underlayIp"),
    ("USED", "used"),
    ("RESERVED", "reserved"),
    ("CAPACITY", "capacity"),
    ("LAST SEEN", "lastSeen"),
];
const ALLOCATION_COLUMNS: &[(&str, &str)] = &[
    ("ADDRESS", "address"),
    ("STATE", "state"),
    ("NODE", "node"),
    ("POD", "pod"),
    ("CONTAINER", "containerId"),
    ("SINCE", "since"),
    ("OFFLINE", "offline"),
];
const ENTRY_COLUMNS: &[(&str, &str)] = &[
    ("AT", "at"),
    ("ACTION", "action"),
    ("ACTOR", "actor"),
    ("NODE", "node"),
    ("ADDRESS", "address"),
    ("POD", "pod"),
    ("CONTAINER", "containerId"),
    ("DETAIL", "detail"),
];

async fn run(cli: Cli) -> anyhow::Result<()> {
    let path = config::path()?;
    let mut cfg = config::Config::load(&path)?;
    if let Cmd::Config(cmd) = cli.command {
        match cmd {
            ConfigCmd::SetContext {
                name,
                server,
                ca,
                cert,
                key,
                server_name,
            } => {
                cfg.contexts.insert(
                    name.clone(),
                    config::Context {
                        server,
                        ca,
                        cert,
                        key,
                        server_name,
                    },
                );
                cfg.current = Some(name);
                cfg.save(&path)?;
            }
            ConfigCmd::UseContext { name } => {
                if !cfg.contexts.contains_key(&name) {
                    bail!("no context {name:?} in {}", path.display());
                }
                cfg.current = Some(name);
                cfg.save(&path)?;
            }
            ConfigCmd::View => emit(&format!("{}\n", serde_json::to_string_pretty(&cfg)?)),
        }
        return Ok(());
    }
    let (_, ctx) = cfg.context(cli.context.as_deref())?;
    let mut admin = connect(ctx).await?;
    let out = cli.output;
    match cli.command {
        Cmd::Nodes => {
            let nodes = admin
                .list_nodes(pb::ListNodesRequest {})
                .await
                .map_err(|s| status("listing nodes", s))?
                .into_inner()
                .nodes;
            print(
                out,
                &nodes.iter().map(node_json).collect::<Vec<_>>(),
                NODE_COLUMNS,
            );
        }
        Cmd::Node { name } => {
            let node = admin
                .get_node(pb::GetNodeRequest { name: name.clone() })
                .await
                .map_err(|s| status(&format!("node {name}"), s))?
                .into_inner();
            print(out, &[node_json(&node)], NODE_COLUMNS);
        }
        Cmd::Allocations {
            node,
            namespace,
            pod,
            address,
        } => {
            let mut rows = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = admin
                    .list_allocations(pb::ListAllocationsRequest {
                        node_name: node.clone().unwrap_or_default(),
                        pod_namespace: namespace.clone().unwrap_or_default(),
                        pod_name: pod.clone().unwrap_or_default(),
                        address: address.clone().unwrap_or_default(),
                        page_size: 0,
                        page_token,
                    })
                    .await
                    .map_err(|s| status("listing allocations", s))?
                    .into_inner();
                rows.extend(page.allocations.iter().map(allocation_json));
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            print(out, &rows, ALLOCATION_COLUMNS);
        }
        Cmd::History { key, pod, node } => {
            let mut req = pb::HistoryRequest::default();
            match (key, pod, node) {
                (Some(k), None, None) => {
                    if k.split('/')
                        .next()
                        .is_some_and(|ip| ip.parse::<std::net::Ipv4Addr>().is_ok())
                    {
                        req.address = k;
                    } else {
                        req.container_id = k;
                    }
                }
                (None, Some(p), None) => {
                    let (ns, name) = p
                        .split_once('/')
                        .with_context(|| format!("--pod {p:?}: give NAMESPACE/NAME"))?;
                    req.pod_namespace = ns.to_owned();
                    req.pod_name = name.to_owned();
                }
                (None, None, Some(n)) => req.node_name = n,
                _ => bail!(
                    "history needs an ADDRESS or CONTAINER, --pod NAMESPACE/NAME or --node NAME"
                ),
            }
            let mut rows = Vec::new();
            loop {
                let page = admin
                    .history(req.clone())
                    .await
                    .map_err(|s| status("reading the history", s))?
                    .into_inner();
                rows.extend(page.entries.iter().map(entry_json));
                if page.next_page_token.is_empty() {
                    break;
                }
                req.page_token = page.next_page_token;
            }
            print(out, &rows, ENTRY_COLUMNS);
        }
        Cmd::Utilization => {
            let u = admin
                .utilization(pb::UtilizationRequest {})
                .await
                .map_err(|s| status("utilization", s))?
                .into_inner();
            let mut rows: Vec<Value> = u
                .nodes
                .iter()
                .map(|n| json!({"node": n.node_name, "block": n.block, "used": n.used, "reserved": n.reserved, "capacity": n.capacity}))
                .collect();
            rows.push(json!({
                "node": "(cluster)",
                "block": format!("{}/{} blocks, {} quarantined", u.blocks_used, u.blocks_capacity, u.blocks_quarantined),
                "used": u.used, "reserved": u.reserved, "capacity": u.capacity,
            }));
            print(
                out,
                &rows,
                &[
                    ("NODE", "node"),
                    ("BLOCK", "block"),
                    ("USED", "used"),
                    ("RESERVED", "reserved"),
                    ("CAPACITY", "capacity"),
                ],
            );
        }
        Cmd::Whois { address } => {
            let a = admin
                .whois(pb::WhoisRequest {
                    address: address.clone(),
                })
                .await
                .map_err(|s| status(&address, s))?
                .into_inner();
            print(out, &[allocation_json(&a)], ALLOCATION_COLUMNS);
        }
        Cmd::DeleteNode { name, force } => {
            let node = admin
                .get_node(pb::GetNodeRequest { name: name.clone() })
                .await
                .map_err(|s| status(&format!("node {name}"), s))?
                .into_inner();
            let silent = node
                .last_seen
                .as_ref()
                .map(|t| chrono::Utc::now().timestamp() - t.seconds)
                .unwrap_or(i64::MAX);
            if !force && silent < ALIVE_WITHIN.as_secs() as i64 {
                bail!(
                    "node {name} heartbeated {silent} s ago: its agent is running, and its pods would keep addresses the cluster no longer records. Drain and stop it first, or pass --force"
                );
            }
            let released = admin
                .delete_node(pb::DeleteNodeRequest { name: name.clone() })
                .await
                .map_err(|s| status(&format!("deleting {name}"), s))?
                .into_inner()
                .released;
            eprintln!("node {name} deleted; {} addresses released", released.len());
            print(
                out,
                &released.iter().map(allocation_json).collect::<Vec<_>>(),
                ALLOCATION_COLUMNS,
            );
        }
        Cmd::Release { address } => {
            let a = admin
                .release(pb::AdminReleaseRequest {
                    address: address.clone(),
                })
                .await
                .map_err(|s| status(&format!("releasing {address}"), s))?
                .into_inner();
            print(out, &[allocation_json(&a)], ALLOCATION_COLUMNS);
        }
        Cmd::Config(_) => {}
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("weftctl: {e:#}");
        std::process::exit(1);
    }
}
