//! Node-local state in `--state-dir`: what must survive an agent restart
//! while weft-server is away. `node.json` holds the node's last assignment
//! (so CHECK and ADD know the pod MTU before the server answers); the
//! address reserve keeps its own files there ([`crate::reserve::journal`]).
//! `node.json` is replaced whole: written to a temporary file, fsynced,
//! renamed over the old one, and the directory fsynced, so a crash at any
//! point leaves either the old or the new content.

use std::{
    fs::{self, File},
    io::Write,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StateError {
    #[error("state directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt: {source}; move it away to start afresh")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// What the server last assigned to this node: enough to build the
/// datapath again after a reboot while the server is away.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedNode {
    pub node_name: String,
    pub block: String,
    pub mtu: u32,
    /// Written since per-node reserves; older files lack them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_cidr: Option<String>,
}

/// The directory and its files.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
}

const NODE_FILE: &str = "node.json";

impl StateDir {
    /// Creates the directory (root only) if it is missing.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        use std::os::unix::fs::DirBuilderExt;
        let io = |source| StateError::Io {
            path: path.to_owned(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(io)?;
        Ok(Self {
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StateError> {
        let path = self.path.join(name);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StateError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    fn write<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StateError> {
        let path = self.path.join(name);
        let tmp = self.path.join(format!(".{name}.tmp"));
        let io = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(value).map_err(|source| StateError::Corrupt {
            path: path.clone(),
            source,
        })?;
        let mut file = File::create(&tmp).map_err(io)?;
        file.write_all(&bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        fs::rename(&tmp, &path).map_err(io)?;
        // The rename itself is durable only once the directory is.
        File::open(&self.path)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }

    pub fn load_node(&self) -> Result<Option<SavedNode>, StateError> {
        self.read(NODE_FILE)
    }

    pub fn save_node(&self, node: &SavedNode) -> Result<(), StateError> {
        if self.load_node().ok().flatten().as_ref() == Some(node) {
            return Ok(());
        }
        self.write(NODE_FILE, node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("weft-state-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn the_node_assignment_round_trips_and_corruption_is_reported() {
        let path = tempdir("node");
        let dir = StateDir::open(&path).unwrap();
        assert_eq!(dir.load_node().unwrap(), None);
        let node = SavedNode {
            node_name: "node-a".into(),
            block: "10.244.3.0/24".into(),
            mtu: 1450,
            gateway: Some("10.244.3.1".into()),
            vni: Some(1),
            cluster_cidr: Some("10.244.0.0/16".into()),
        };
        dir.save_node(&node).unwrap();
        assert_eq!(dir.load_node().unwrap(), Some(node));
        fs::write(path.join(NODE_FILE), b"{not json").unwrap();
        let err = dir.load_node().unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
        fs::remove_dir_all(&path).unwrap();
    }
}
