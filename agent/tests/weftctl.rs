//! weftctl, the operator's CLI (issue 19), as an operator runs it: the
//! real binary with a config file and the cluster's admin certificate over
//! mutual TLS, against the real server with real agents. Needs root (the
//! server runs in a namespace); CI runs as root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

use serde_json::Value;
use weft_testbed::{cluster::*, process::bin_dir};

struct Ctl<'a> {
    c: &'a Cluster,
    config: std::path::PathBuf,
}

impl Ctl<'_> {
    fn run(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.c.control])
            .arg(bin_dir().join("weftctl"))
            .args(args)
            .env("WEFTCTL_CONFIG", &self.config)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "weftctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&all)).unwrap()
    }
}

#[test]
fn an_operator_lists_finds_and_deletes_with_weftctl() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(2);
    c.start_agent(0);
    c.start_agent(1);
    let (ip, _) = c.add_pod(0, "web");
    c.sql_settles(
        "SELECT count(*) FROM allocations WHERE state = 'bound'",
        &["1"],
    );
    let config = c.dir.join("weftctl.json");
    let ctl = Ctl { c: &c, config };
    let pki = c.pki();
    ctl.ok(&[
        "config",
        "set-context",
        "local",
        "--server",
        &format!("https://{SERVER_IP}:7400"),
        "--ca",
        pki.join("ca.pem").to_str().unwrap(),
        "--cert",
        pki.join("admin-admin.pem").to_str().unwrap(),
        "--key",
        pki.join("admin-admin-key.pem").to_str().unwrap(),
    ]);

    // A table for people...
    let table = ctl.ok(&["nodes"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("RESERVED"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("node1 ") && lines[2].starts_with("node2 "),
        "{table}"
    );
    // ...JSON and YAML for scripts.
    let nodes = ctl.json(&["nodes"]);
    assert_eq!(nodes[0]["name"], "node1");
    assert_eq!(nodes[0]["used"], 1);
    let yaml = ctl.ok(&["node", "node1", "-o", "yaml"]);
    assert!(yaml.starts_with("- block: 10.244.0.0/24\n"), "{yaml}");

    // The question operators ask most.
    let who = ctl.json(&["whois", &ip]);
    assert_eq!(who[0]["pod"], "default/web");
    assert_eq!(who[0]["node"], "node1");
    assert_eq!(who[0]["state"], "bound");
    assert!(who[0]["since"].as_str().unwrap().ends_with('Z'));
    let allocations = ctl.json(&["allocations", "--node", "node1", "--pod", "web"]);
    assert_eq!(allocations.as_array().unwrap().len(), 1);
    let by_pod = ctl.json(&["history", "--pod", "default/web"]);
    assert_eq!(by_pod[0]["action"], "bind");
    let by_address = ctl.json(&["history", &ip]);
    let actions: Vec<&str> = by_address
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["reserve", "bind"]);
    let util = ctl.json(&["utilization"]);
    assert_eq!(
        util.as_array().unwrap().last().unwrap()["node"],
        "(cluster)"
    );

    // Errors point the right way.
    let unknown = ctl.run(&["node", "node9"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("NotFound"));

    // A live node's address is not released behind its agent's back.
    let live = ctl.run(&["release", &ip]);
    assert!(!live.status.success());
    let msg = String::from_utf8_lossy(&live.stderr);
    assert!(msg.contains("heartbeated"), "{msg}");

    // node2 heartbeats: deleting it needs --force.
    let refused = ctl.run(&["delete-node", "node2"]);
    assert!(!refused.status.success());
    let msg = String::from_utf8_lossy(&refused.stderr);
    assert!(
        msg.contains("heartbeated") && msg.contains("--force"),
        "{msg}"
    );
    assert_eq!(
        c.sql("SELECT count(*) FROM nodes WHERE name = 'node2'"),
        ["1"]
    );
    ctl.ok(&["delete-node", "node2", "--force"]);
    assert_eq!(
        c.sql("SELECT count(*) FROM nodes WHERE name = 'node2'"),
        ["0"]
    );
    assert_eq!(
        c.sql("SELECT actor FROM audit_log WHERE action = 'node_delete'"),
        ["admin/admin"]
    );
}
