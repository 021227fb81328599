//! The one seam between the agent and the machine: trait `NodeOs`. Every side effect and every read of the
//! node's state goes through it; nothing else in the agent touches files under the root or builds a Command.
//!
//! `host::HostOs` is the real implementation over a root directory (`/` on a real node, a tree per simulated
//! node in tests and the demo). `fake::FakeOs` exists only for unit tests of the engine.

pub mod fake;
pub mod host;

use upkeep_core::version::NodeImageVersion;

/// What the agent reads off the node to report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OsFacts {
    /// os-release ID (debian, ubuntu, rhel, ...), or "unknown".
    pub os_family: String,
    /// os-release VERSION_ID.
    pub os_version: String,
    /// Kernel release.
    pub kernel: String,
    /// The booted image, from its own metadata.
    pub node_image: Option<NodeImageVersion>,
    /// The security patch applied on top of the image, `YYYYMM.DD.N`.
    pub security_patch_version: String,
    /// The OS says a reboot is required.
    pub reboot_required: bool,
    /// Kubernetes version of the node's components, if any.
    pub kubernetes_version: String,
}

/// A failure reading or changing the node, naming the path or command.
#[derive(Debug, thiserror::Error)]
pub enum OsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file's content is not what it should be.
    #[error("{path}: {reason}")]
    Malformed {
        /// The path.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Everything the agent may read from or do to its node.
pub trait NodeOs: Send + Sync {
    /// Reads the facts the agent reports.
    fn facts(&self) -> Result<OsFacts, OsError>;
}

/// Parses image metadata (`/etc/upkeep/node-image`): `KEY=VALUE` lines with `FAMILY` and `VERSION`;
/// `#` comments and blank lines ignored, values may be double-quoted.
pub fn parse_node_image(text: &str) -> Result<NodeImageVersion, String> {
    let kv = parse_env_file(text);
    let family = kv.iter().find(|(k, _)| k == "FAMILY").map(|(_, v)| v.as_str()).ok_or("missing FAMILY=")?;
    let version = kv.iter().find(|(k, _)| k == "VERSION").map(|(_, v)| v.as_str()).ok_or("missing VERSION=")?;
    let version = version.parse().map_err(|e: upkeep_core::version::VersionError| format!("VERSION: {e}"))?;
    NodeImageVersion::new(family, version).map_err(|e| format!("FAMILY: {e}"))
}

/// Parses os-release style `KEY=VALUE` text.
pub fn parse_env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let v = v.trim();
            let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
            (k.trim().to_string(), v.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_image_metadata_parses() {
        let n = parse_node_image("# built by mkimage\nFAMILY=\"Ubuntu-2204gen2\"\nVERSION=202311.07.0\n").expect("ok");
        assert_eq!(n.label(), "Ubuntu-2204gen2-202311.07.0");
        assert!(parse_node_image("FAMILY=x\n").expect_err("no version").contains("VERSION"));
        assert!(parse_node_image("FAMILY=x\nVERSION=1.2\n").expect_err("bad").contains("YYYYMM.DD.N"));
    }

    #[test]
    fn os_release_parses() {
        let kv = parse_env_file("ID=debian\nVERSION_ID=\"12\"\nPRETTY_NAME=\"Debian GNU/Linux 12\"\n");
        assert_eq!(kv[0], ("ID".into(), "debian".into()));
        assert_eq!(kv[1], ("VERSION_ID".into(), "12".into()));
    }
}
