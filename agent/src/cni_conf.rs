//! The CNI network configuration the agent writes once the node is ready.
//! Container runtimes treat the file's appearance as "the network is up",
//! so it is written last and atomically (temporary file + rename).
//!
//! The list chains the reference `portmap` (hostPort) and `bandwidth`
//! plugins after `weft`, as Flannel and Calico ship them. A runtime picks
//! one version from `cniVersions` and passes it to every plugin of the
//! list, so the list names only versions every chained plugin answered to
//! `VERSION` ([`probe`]); deciding that is pure ([`common_versions`]).

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;

/// File name; sorts early so runtimes pick Weft over leftovers.
pub const CONFLIST_NAME: &str = "10-weft.conflist";
/// Spec versions the plugin serves.
pub use weft_core::cni::SUPPORTED_VERSIONS as CNI_VERSIONS;

/// Runtimes that know `cniVersions` (libcni >= 1.2) pick the newest they
/// support from it; older ones (containerd 1.6) use `cniVersion` and
/// cannot parse a 1.1.0 result, so that names at most this one.
const LEGACY_VERSION: &str = "1.0.0";

/// A reference plugin chained after weft.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chained {
    /// hostPort: DNAT from the node's ports, SNAT for hairpin traffic.
    Portmap,
    /// Ingress/egress limits from the kubernetes.io/*-bandwidth annotations.
    Bandwidth,
}

impl Chained {
    pub fn binary(self) -> &'static str {
        match self {
            Self::Portmap => "portmap",
            Self::Bandwidth => "bandwidth",
        }
    }

    /// Its entry in the list; the runtime fills in what the capability
    /// names (`runtimeConfig.portMappings`, `runtimeConfig.bandwidth`).
    fn conf(self) -> Value {
        match self {
            Self::Portmap => json!({
                "type": "portmap",
                "capabilities": {"portMappings": true},
                "snat": true,
            }),
            Self::Bandwidth => json!({
                "type": "bandwidth",
                "capabilities": {"bandwidth": true},
            }),
        }
    }
}

/// `--chain`: plugin names, comma-separated, each at most once.
pub fn parse_chain(s: &str) -> Result<Vec<Chained>, String> {
    let mut chain = Vec::new();
    for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let plugin = match name {
            "portmap" => Chained::Portmap,
            "bandwidth" => Chained::Bandwidth,
            other => {
                return Err(format!(
                    "{other:?} is not a plugin weft chains (portmap, bandwidth)"
                ));
            }
        };
        if chain.contains(&plugin) {
            return Err(format!("{name} is named twice"));
        }
        chain.push(plugin);
    }
    Ok(chain)
}

/// A chained plugin found on the node, with the versions it supports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub plugin: Chained,
    pub versions: Vec<String>,
}

/// weft's versions that every plugin of `chain` supports, oldest first.
pub fn common_versions(chain: &[Found]) -> Vec<&'static str> {
    CNI_VERSIONS
        .iter()
        .copied()
        .filter(|v| chain.iter().all(|f| f.versions.iter().any(|x| x == v)))
        .collect()
}

/// The conflist for `chain` (plugins whose versions share none with
/// weft's must have been left out: [`common_versions`] is not empty).
pub fn render(socket: &Path, chain: &[Found]) -> String {
    let versions = common_versions(chain);
    let legacy = versions
        .iter()
        .rev()
        .find(|v| **v <= LEGACY_VERSION)
        .or(versions.last())
        .copied()
        .unwrap_or(LEGACY_VERSION);
    let mut plugins = vec![json!({
        "type": "weft",
        "agentSocket": socket,
    })];
    plugins.extend(chain.iter().map(|f| f.plugin.conf()));
    let conf = json!({
        "cniVersion": legacy,
        "cniVersions": versions,
        "name": "weft",
        "plugins": plugins,
    });
    // serde_json cannot fail on a value built from strings.
    format!("{conf:#}\n")
}

/// Longest a plugin may take to answer VERSION.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks `<bin_dir>/<plugin>` which spec versions it supports, as a
/// runtime would (CNI_COMMAND=VERSION, the request's version on stdin).
pub async fn probe(bin_dir: &Path, plugin: Chained) -> Result<Found, String> {
    let path = bin_dir.join(plugin.binary());
    if !path.exists() {
        return Err(format!("{} does not exist", path.display()));
    }
    let mut child = tokio::process::Command::new(&path)
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", path.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A plugin that does not read its stdin is fine: it has answered.
        let _ = stdin.write_all(br#"{"cniVersion":"0.4.0"}"#).await;
    }
    let out = tokio::time::timeout(PROBE_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| {
            format!(
                "{} did not answer VERSION within {PROBE_TIMEOUT:?}",
                path.display()
            )
        })?
        .map_err(|e| format!("running {}: {e}", path.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} VERSION exited with {}: {}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim()
        ));
    }
    let v: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{} VERSION printed no JSON: {e}", path.display()))?;
    let versions = v["supportedVersions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    Ok(Found { plugin, versions })
}

/// Writes the conflist into `dir` unless it already has this content.
pub fn write(dir: &Path, content: &str) -> std::io::Result<PathBuf> {
    let path = dir.join(CONFLIST_NAME);
    if std::fs::read_to_string(&path).is_ok_and(|c| c == content) {
        return Ok(path);
    }
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{CONFLIST_NAME}.tmp"));
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(plugin: Chained, versions: &[&str]) -> Found {
        Found {
            plugin,
            versions: versions.iter().map(|v| (*v).to_owned()).collect(),
        }
    }

    /// What Debian 12's containernetworking-plugins 1.1.1 answer.
    const DEBIAN: [&str; 6] = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"];

    #[test]
    fn alone_the_conflist_names_every_version_weft_serves() {
        let v: serde_json::Value =
            serde_json::from_str(&render(Path::new("/run/weft/agent.sock"), &[])).unwrap();
        assert_eq!(v["name"], "weft");
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["cniVersions"].as_array().unwrap().len(), 5);
        assert_eq!(v["plugins"].as_array().unwrap().len(), 1);
        assert_eq!(v["plugins"][0]["type"], "weft");
        assert_eq!(v["plugins"][0]["agentSocket"], "/run/weft/agent.sock");
    }

    #[test]
    fn a_chain_names_only_the_versions_every_plugin_supports() {
        let chain = [
            found(Chained::Portmap, &DEBIAN),
            found(Chained::Bandwidth, &DEBIAN),
        ];
        let v: serde_json::Value =
            serde_json::from_str(&render(Path::new("/s.sock"), &chain)).unwrap();
        assert_eq!(
            v["cniVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0"]),
            "1.1.0 is weft's alone: a runtime picking it would fail the chain"
        );
        assert_eq!(v["cniVersion"], "1.0.0");
        let types: Vec<_> = v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["weft", "portmap", "bandwidth"]);
        assert_eq!(v["plugins"][1]["capabilities"]["portMappings"], true);
        assert_eq!(v["plugins"][1]["snat"], true);
        assert_eq!(v["plugins"][2]["capabilities"]["bandwidth"], true);

        // Newer plugins (1.5+) that speak 1.1.0 get it back; an old one
        // holds the whole list down to what it speaks.
        let newer = [found(Chained::Portmap, &["0.4.0", "1.0.0", "1.1.0"])];
        assert_eq!(common_versions(&newer), ["0.4.0", "1.0.0", "1.1.0"]);
        let old = [
            found(Chained::Portmap, &["0.3.0", "0.3.1", "0.4.0"]),
            found(Chained::Bandwidth, &DEBIAN),
        ];
        assert_eq!(common_versions(&old), ["0.3.0", "0.3.1", "0.4.0"]);
        let v: serde_json::Value =
            serde_json::from_str(&render(Path::new("/s.sock"), &old)).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
    }

    #[test]
    fn the_chain_flag_takes_known_plugins_once() {
        assert_eq!(
            parse_chain("portmap,bandwidth").unwrap(),
            [Chained::Portmap, Chained::Bandwidth]
        );
        assert_eq!(parse_chain(" bandwidth ").unwrap(), [Chained::Bandwidth]);
        assert!(parse_chain("").unwrap().is_empty());
        assert!(
            parse_chain("portmap,firewall")
                .unwrap_err()
                .contains("firewall")
        );
        assert!(
            parse_chain("portmap,portmap")
                .unwrap_err()
                .contains("twice")
        );
    }

    #[tokio::test]
    async fn a_missing_or_broken_plugin_is_an_error_naming_it() {
        let dir = std::env::temp_dir().join(format!("weft-probe-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = probe(&dir, Chained::Portmap).await.unwrap_err();
        assert!(e.contains("portmap does not exist"), "{e}");
        let fake = dir.join("bandwidth");
        std::fs::write(&fake, "#!/bin/sh\necho not json\n").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = probe(&dir, Chained::Bandwidth).await.unwrap_err();
        assert!(e.contains("no JSON"), "{e}");
        std::fs::write(
            &fake,
            "#!/bin/sh\n[ \"$CNI_COMMAND\" = VERSION ] && echo '{\"cniVersion\":\"0.4.0\",\"supportedVersions\":[\"0.4.0\",\"1.0.0\"]}'\n",
        )
        .unwrap();
        assert_eq!(
            probe(&dir, Chained::Bandwidth).await.unwrap(),
            found(Chained::Bandwidth, &["0.4.0", "1.0.0"])
        );
        // One that never answers is given up on (waited for, it would end
        // after a minute with no JSON) and killed.
        std::fs::write(&fake, "#!/bin/sh\nexec sleep 60\n").unwrap();
        let e = probe(&dir, Chained::Bandwidth).await.unwrap_err();
        assert!(e.contains("did not answer VERSION"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn writing_is_atomic_and_idempotent() {
        let dir = std::env::temp_dir().join(format!("weft-conf-test-{}", std::process::id()));
        let content = render(Path::new("/s.sock"), &[]);
        let path = write(&dir, &content).unwrap();
        let before = std::fs::metadata(&path).unwrap().modified().unwrap();
        write(&dir, &content).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            before
        );
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            [std::ffi::OsString::from(CONFLIST_NAME)],
            "no temporary file left"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
