//! Shaping an ADD result for the cniVersion the runtime asked for: 0.3.x
//! and 0.4.0 tag each IP with "version": "4"; 1.0.0 drops that; 1.1.0 adds
//! the interface MTU.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde_json::{Value, json};

use super::request::version_at_least;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    /// The netns path for the container side; `None` on the host.
    pub sandbox: Option<String>,
}

/// Everything an ADD produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wired {
    pub host: Interface,
    pub container: Interface,
    pub address: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
}

pub fn render(w: &Wired, version: &str) -> String {
    let with_mtu = version_at_least(version, "1.1.0");
    let iface = |i: &Interface| {
        let mut v = json!({ "name": i.name, "mac": i.mac });
        if let Some(sandbox) = &i.sandbox {
            v["sandbox"] = json!(sandbox);
        }
        if with_mtu {
            v["mtu"] = json!(w.mtu);
        }
        v
    };
    let mut ip = json!({
        "address": w.address.to_string(),
        "gateway": w.gateway.to_string(),
        // Index into `interfaces`: the container side.
        "interface": 1,
    });
    if !version_at_least(version, "1.0.0") {
        ip["version"] = json!("4");
    }
    let v: Value = json!({
        "cniVersion": version,
        "interfaces": [iface(&w.host), iface(&w.container)],
        "ips": [ip],
        "routes": [{ "dst": "0.0.0.0/0", "gw": w.gateway.to_string() }],
        "dns": {},
    });
    format!("{v}\n")
}

/// VERSION's answer.
pub fn render_version(version: &str) -> String {
    let v = json!({
        "cniVersion": version,
        "supportedVersions": super::request::SUPPORTED_VERSIONS,
    });
    format!("{v}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wired() -> Wired {
        Wired {
            host: Interface {
                name: "weft1a2b3c4d".into(),
                mac: "02:00:00:00:00:01".into(),
                sandbox: None,
            },
            container: Interface {
                name: "eth0".into(),
                mac: "02:00:00:00:00:02".into(),
                sandbox: Some("/var/run/netns/p".into()),
            },
            address: "10.244.1.5/24".parse().unwrap(),
            gateway: "10.244.1.1".parse().unwrap(),
            mtu: 1450,
        }
    }

    #[test]
    fn results_are_shaped_per_version() {
        let cases = [
            ("0.3.0", true, false),
            ("0.3.1", true, false),
            ("0.4.0", true, false),
            ("1.0.0", false, false),
            ("1.1.0", false, true),
        ];
        for (version, ip_version, mtu) in cases {
            let v: Value = serde_json::from_str(&render(&wired(), version)).unwrap();
            assert_eq!(v["cniVersion"], version);
            assert_eq!(v["ips"][0]["address"], "10.244.1.5/24");
            assert_eq!(v["ips"][0]["gateway"], "10.244.1.1");
            assert_eq!(v["ips"][0]["interface"], 1);
            assert_eq!(
                v["ips"][0].get("version").is_some(),
                ip_version,
                "{version}"
            );
            assert_eq!(v["interfaces"][1]["name"], "eth0");
            assert_eq!(v["interfaces"][1]["sandbox"], "/var/run/netns/p");
            assert!(v["interfaces"][0].get("sandbox").is_none());
            assert_eq!(v["interfaces"][1].get("mtu").is_some(), mtu, "{version}");
            assert_eq!(
                v["routes"],
                json!([{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}])
            );
        }
    }

    #[test]
    fn version_lists_every_supported_version() {
        let v: Value = serde_json::from_str(&render_version("0.4.0")).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["supportedVersions"].as_array().unwrap().len(), 5);
    }
}
