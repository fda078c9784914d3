//! weftctl's config file: named contexts (server URL, CA, client
//! certificate and key), one of them current, as kubectl's contexts. JSON,
//! at `$WEFTCTL_CONFIG` or `~/.config/weft/weftctl.json`, written 0600.
//! Choosing the context is pure ([`Config::context`]) and unit-tested.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

/// How to reach one cluster's weft-server as one operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Context {
    /// "https://198.51.100.254:7400".
    pub server: String,
    /// CA that signed the server's certificate.
    pub ca: PathBuf,
    /// This operator's admin or viewer certificate and its key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Name to check the server certificate against, when the URL holds an
    /// address the certificate does not name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

/// Where the config lives.
pub fn path() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("WEFTCTL_CONFIG") {
        return Ok(PathBuf::from(p));
    }
    let home = std::env::var_os("HOME").context("neither WEFTCTL_CONFIG nor HOME is set")?;
    Ok(PathBuf::from(home).join(".config/weft/weftctl.json"))
}

impl Config {
    /// The file's contents; a missing file is an empty config.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a weftctl config", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the file (0600: it names key files).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("writing {}", path.display()))?;
        std::io::Write::write_all(&mut file, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))
    }

    /// The context to use: `--context` if given, else the current one.
    pub fn context(&self, flag: Option<&str>) -> anyhow::Result<(&str, &Context)> {
        let name = match flag.or(self.current.as_deref()) {
            Some(n) => n,
            None if self.contexts.len() == 1 => {
                return self
                    .contexts
                    .iter()
                    .next()
                    .map(|(n, c)| (n.as_str(), c))
                    .context("no context");
            }
            None if self.contexts.is_empty() => bail!(
                "no context configured: weftctl config set-context NAME --server URL --ca CA --cert CERT --key KEY"
            ),
            None => bail!(
                "several contexts ({}) and none current: weftctl config use-context NAME, or --context NAME",
                self.names()
            ),
        };
        self.contexts
            .get_key_value(name)
            .map(|(n, c)| (n.as_str(), c))
            .with_context(|| format!("no context {name:?}; known: {}", self.names()))
    }

    fn names(&self) -> String {
        self.contexts.keys().cloned().collect::<Vec<_>>().join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(server: &str) -> Context {
        Context {
            server: server.into(),
            ca: "ca.pem".into(),
            cert: "admin.pem".into(),
            key: "admin-key.pem".into(),
            server_name: None,
        }
    }

    #[test]
    fn the_flag_wins_then_the_current_context_then_a_lone_one() {
        let mut c = Config::default();
        assert!(
            c.context(None)
                .unwrap_err()
                .to_string()
                .contains("set-context")
        );
        c.contexts.insert("prod".into(), ctx("https://prod:7400"));
        assert_eq!(c.context(None).unwrap().0, "prod", "the only one");
        c.contexts.insert("local".into(), ctx("https://local:7400"));
        let err = c.context(None).unwrap_err().to_string();
        assert!(
            err.contains("use-context") && err.contains("local, prod"),
            "{err}"
        );
        c.current = Some("local".into());
        assert_eq!(c.context(None).unwrap().1.server, "https://local:7400");
        assert_eq!(c.context(Some("prod")).unwrap().0, "prod");
        let err = c.context(Some("qa")).unwrap_err().to_string();
        assert!(err.contains("\"qa\"") && err.contains("known"), "{err}");
    }

    #[test]
    fn a_saved_config_loads_back_and_is_private() {
        let path = std::env::temp_dir().join(format!("weftctl-{}.json", std::process::id()));
        let _ = std::fs::remove_file(&path);
        assert_eq!(Config::load(&path).unwrap(), Config::default());
        let mut c = Config::default();
        c.contexts.insert("local".into(), ctx("https://local:7400"));
        c.current = Some("local".into());
        c.save(&path).unwrap();
        assert_eq!(Config::load(&path).unwrap(), c);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::write(&path, b"{not json").unwrap();
        assert!(Config::load(&path).is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
