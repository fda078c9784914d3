//! The CNI network configuration the agent writes once the node is ready.
//! Container runtimes treat the file's appearance as "the network is up",
//! so it is written last and atomically (temporary file + rename).

use std::path::{Path, PathBuf};

use serde_json::json;

/// File name; sorts early so runtimes pick Weft over leftovers.
pub const CONFLIST_NAME: &str = "10-weft.conflist";
/// Spec versions the plugin serves.
pub use weft_core::cni::SUPPORTED_VERSIONS as CNI_VERSIONS;

pub fn render(socket: &Path) -> String {
    let conf = json!({
        // Runtimes that know `cniVersions` (libcni >= 1.2) pick the newest
        // they support from it; older ones (containerd 1.6) use
        // `cniVersion` and cannot parse a 1.1.0 result.
        "cniVersion": "1.0.0",
        "cniVersions": CNI_VERSIONS,
        "name": "weft",
        "plugins": [{
            "type": "weft",
            "agentSocket": socket,
        }],
    });
    // serde_json cannot fail on a value built from strings.
    format!("{conf:#}\n")
}

/// Writes the conflist into `dir` unless it already has this content.
pub fn write(dir: &Path, socket: &Path) -> std::io::Result<PathBuf> {
    let path = dir.join(CONFLIST_NAME);
    let content = render(socket);
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

    #[test]
    fn the_conflist_names_the_plugin_versions_and_socket() {
        let v: serde_json::Value =
            serde_json::from_str(&render(Path::new("/run/weft/agent.sock"))).unwrap();
        assert_eq!(v["name"], "weft");
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["cniVersions"].as_array().unwrap().len(), 5);
        assert_eq!(v["plugins"][0]["type"], "weft");
        assert_eq!(v["plugins"][0]["agentSocket"], "/run/weft/agent.sock");
    }

    #[test]
    fn writing_is_atomic_and_idempotent() {
        let dir = std::env::temp_dir().join(format!("weft-conf-test-{}", std::process::id()));
        let path = write(&dir, Path::new("/s.sock")).unwrap();
        let before = std::fs::metadata(&path).unwrap().modified().unwrap();
        write(&dir, Path::new("/s.sock")).unwrap();
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
