//! The real `NodeOs` over a root directory.

use super::{NodeOs, OsError, OsFacts, parse_env_file, parse_node_image};
use std::path::{Path, PathBuf};

/// Image metadata, relative to the root.
pub const NODE_IMAGE_FILE: &str = "etc/upkeep/node-image";
/// Security patch marker written when a patch is applied, relative to the root.
pub const SECURITY_PATCH_FILE: &str = "etc/upkeep/security-patch";
/// Debian's reboot-required flag, relative to the root.
pub const REBOOT_REQUIRED_FILE: &str = "var/run/reboot-required";
/// Kubernetes version marker, relative to the root.
pub const KUBERNETES_VERSION_FILE: &str = "etc/upkeep/kubernetes-version";

/// The node as seen through `root`.
#[derive(Debug, Clone)]
pub struct HostOs {
    root: PathBuf,
}

impl HostOs {
    /// Over `root` (`/` on a real node).
    pub fn new(root: impl Into<PathBuf>) -> HostOs {
        HostOs { root: root.into() }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn read_optional(&self, rel: &str) -> Result<Option<String>, OsError> {
        read_optional(&self.path(rel))
    }
}

fn read_optional(path: &Path) -> Result<Option<String>, OsError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(OsError::Io { path: path.to_path_buf(), source }),
    }
}

impl NodeOs for HostOs {
    fn facts(&self) -> Result<OsFacts, OsError> {
        let os_release = match self.read_optional("etc/os-release")? {
            Some(s) => Some(s),
            None => self.read_optional("usr/lib/os-release")?,
        };
        let kv = os_release.as_deref().map(parse_env_file).unwrap_or_default();
        let get = |k: &str| kv.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).unwrap_or_default();
        let os_family = if kv.is_empty() { "unknown".to_string() } else { get("ID") };
        let node_image = match self.read_optional(NODE_IMAGE_FILE)? {
            Some(text) => Some(
                parse_node_image(&text)
                    .map_err(|reason| OsError::Malformed { path: self.path(NODE_IMAGE_FILE), reason })?,
            ),
            None => None,
        };
        let trimmed = |rel: &str| -> Result<String, OsError> {
            Ok(self.read_optional(rel)?.map(|s| s.trim().to_string()).unwrap_or_default())
        };
        let kernel = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into());
        Ok(OsFacts {
            os_family,
            os_version: get("VERSION_ID"),
            kernel,
            node_image,
            security_patch_version: trimmed(SECURITY_PATCH_FILE)?,
            reboot_required: self.path(REBOOT_REQUIRED_FILE).exists(),
            kubernetes_version: trimmed(KUBERNETES_VERSION_FILE)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_facts_under_a_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc/upkeep")).expect("mkdir");
        std::fs::create_dir_all(root.join("var/run")).expect("mkdir");
        std::fs::write(root.join("etc/os-release"), "ID=debian\nVERSION_ID=\"12\"\n").expect("write");
        std::fs::write(root.join(NODE_IMAGE_FILE), "FAMILY=Debian-12\nVERSION=202311.07.0\n").expect("write");
        let os = HostOs::new(root);
        let f = os.facts().expect("facts");
        assert_eq!(f.os_family, "debian");
        assert_eq!(f.os_version, "12");
        assert_eq!(f.node_image.expect("image").label(), "Debian-12-202311.07.0");
        assert!(!f.reboot_required);
        std::fs::write(root.join(REBOOT_REQUIRED_FILE), "").expect("write");
        assert!(os.facts().expect("facts").reboot_required);
        std::fs::write(root.join(NODE_IMAGE_FILE), "FAMILY=Debian-12\n").expect("write");
        let err = os.facts().expect_err("malformed");
        assert!(err.to_string().contains("node-image: missing VERSION="), "{err}");
    }

    #[test]
    fn a_root_without_os_release_is_unknown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = HostOs::new(dir.path()).facts().expect("facts");
        assert_eq!(f.os_family, "unknown");
        assert_eq!(f.node_image, None);
    }
}
