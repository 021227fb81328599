//! The one seam between the agent and the machine: trait `NodeOs`. Every side effect and every read of the
//! node's state goes through it; nothing else in the agent touches files under the root or builds a Command.
//!
//! `host::HostOs` is the real implementation over a root directory (`/` on a real node, a tree per simulated
//! node in tests and the demo); it delegates slots and boot control to one backend of `slots` (directory
//! trees, the GRUB environment block, or configured hooks), cordon/drain to `cordon`, and every external
//! program to `command`. `copy` is the one image copy (read, hash and write overlapped) the slot backends
//! share. `image` owns the agent's download staging and image verification.
//! `autoupdate` carries out a node OS channel plan (the agent's own drop-ins and the OS's update timers), `apt`
//! and `dnf` install security patches and Kubernetes packages and read dnf's reboot-required answer. `kube`
//! talks to the Kubernetes API server (cordon, drain, node labels) when `[kubernetes] api_server` is set.
//! `remote::RemoteOs` is the `NodeOs` of a privilege-separated agent's network half: each call is a request to
//! `executor`, the privileged half, which checks it again and does it with `HostOs`.
//! `fake::FakeOs` exists only for unit tests of the engine.

pub mod apt;
pub mod autoupdate;
pub mod command;
pub mod copy;
pub mod cordon;
pub mod dnf;
pub mod executor;
pub mod facts_feed;
pub mod fake;
pub mod host;
pub mod https;
pub mod image;
pub mod kube;
pub mod remote;
pub mod slots;

use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::channel::{ChannelPlan, OsKind, PackagePin};
use upkeep_core::version::{KubernetesVersion, NodeImageVersion};

/// Image metadata, relative to the node's root (the booted image's own; slot backends restore it).
pub const NODE_IMAGE_FILE: &str = "etc/upkeep/node-image";
/// Debian's reboot-required flag, relative to the root.
pub const REBOOT_REQUIRED_FILE: &str = "var/run/reboot-required";
/// The same flag where `/var/run` points on current systems, relative to the root.
pub const RUN_REBOOT_REQUIRED_FILE: &str = "run/reboot-required";

/// What the agent reads off the node to report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsFacts {
    /// os-release ID (debian, ubuntu, rhel, ...), or "unknown".
    pub os_family: String,
    /// os-release VERSION_ID.
    pub os_version: String,
    /// Kernel release.
    pub kernel: String,
    /// The booted image, from its own metadata.
    #[serde(with = "label")]
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
    /// An external command failed: its argv, exit status and the tail of its stderr.
    #[error("command {argv:?} {status}: {stderr_tail}")]
    Command {
        /// The argv.
        argv: Vec<String>,
        /// How it ended.
        status: String,
        /// Last lines of stderr.
        stderr_tail: String,
    },
    /// The bytes written to a slot do not hash to the expected digest.
    #[error("{path}: image hashes to {actual} while writing, expected {expected}; {slot_state}")]
    Digest {
        /// The image.
        path: std::path::PathBuf,
        /// Expected sha256.
        expected: String,
        /// What the bytes hash to.
        actual: String,
        /// What the slot holds now, as the backend knows it (untouched, or overwritten and not marked to boot).
        slot_state: String,
    },
    /// The bytes a slot write streamed are not signed by a trusted key (or not of the size ordered).
    #[error("{path}: {reason}; {slot_state}")]
    Unverified {
        /// The image.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
        /// What the slot holds now.
        slot_state: String,
    },
    /// A configured health check failed.
    #[error("health check failed: {0}")]
    Unhealthy(String),
    /// A request to the Kubernetes API server failed: the server, what was being done, why, and what to check.
    #[error("kubernetes API {api_server}: {action}: {reason}")]
    Kube {
        /// `[kubernetes] api_server`.
        api_server: String,
        /// What the agent was doing, naming the object (e.g. "cordoning Node n1").
        action: String,
        /// What went wrong.
        reason: String,
    },
    /// Drain did not finish in time: the pods still in the way and what blocks each.
    #[error("drain timed out after {after_seconds}s: {blocking}")]
    DrainTimedOut {
        /// The timeout.
        after_seconds: u64,
        /// E.g. `pod shop/web-1 blocked by PodDisruptionBudget shop/web-pdb`.
        blocking: String,
    },
    /// Something this node's configuration does not provide was asked for (names the section or key to add).
    #[error("{0}")]
    NotConfigured(String),
    /// The privileged executor refused a request of the agent's network half (or could not be reached).
    #[error("executor: {0}")]
    Executor(String),
}

impl OsError {
    /// An I/O error on `path`.
    pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OsError + '_ {
        move |source| OsError::Io { path: path.to_path_buf(), source }
    }
}

/// A staged image the engine verified, handed to `NodeOs::write_slot` with what it was verified against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotImage {
    /// The staged file.
    pub path: std::path::PathBuf,
    /// Its SHA-256 (lower-case hex): what the written bytes must hash to.
    pub sha256: String,
    /// Its size in bytes as the command gave it (0: not given).
    pub size: u64,
    /// The minisign signature text the command carried.
    pub signature: String,
    /// Check the signature (against the node's trusted keys) and the size on the bytes as they are written,
    /// before the slot holds them as an image: the privileged executor does; an agent in one process verified
    /// the staged file it downloaded itself.
    pub check_signature: bool,
}

/// One of the two A/B slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    /// Slot A (the node's original image lives here).
    A,
    /// Slot B.
    B,
}

impl Slot {
    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// `a` or `b`.
    pub fn as_str(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    /// Parses `a` / `b` (case-insensitive, surrounding white space ignored).
    pub fn parse(s: &str) -> Option<Slot> {
        match s.trim().to_ascii_lowercase().as_str() {
            "a" => Some(Slot::A),
            "b" => Some(Slot::B),
            _ => None,
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The boot-control state of the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootState {
    /// The slot the node runs now.
    pub booted: Slot,
    /// The slot the bootloader boots by default (the last committed one).
    pub committed: Slot,
    /// A slot marked to be booted once, not yet taken.
    pub next_once: Option<Slot>,
    /// Boot attempts left for the boot-once slot, where the backend counts them.
    pub tries_left: Option<u32>,
    /// Identifies the current boot; changes with every boot (real or simulated).
    pub boot_id: String,
}

/// What a reboot request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rebooted {
    /// The (simulated, in-process) boot has completed; the node runs whatever the bootloader chose.
    Done,
    /// The machine is going down; the agent continues from its journal after the boot.
    Pending,
}

/// Everything the agent may read from or do to its node.
pub trait NodeOs: Send + Sync {
    /// Reads the facts the agent reports.
    fn facts(&self) -> Result<OsFacts, OsError>;
    /// The trusted image signing keys: (file, text) of each `*.pub` in the trusted-keys directory.
    fn trusted_keys(&self) -> Result<Vec<(std::path::PathBuf, String)>, OsError>;
    /// The boot-control state.
    fn boot_state(&self) -> Result<BootState, OsError>;
    /// Writes the verified image `image.path` into `slot`, hashing what it streams and refusing (before the slot
    /// is made visible) if it does not hash to `image.sha256`; fsyncs. Returns the bytes written. (The
    /// privileged executor checks the signature and size of the bytes it is handed again before it writes.)
    fn write_slot(&self, slot: Slot, image: &SlotImage) -> Result<u64, OsError>;
    /// Removes what an interrupted or failed slot write left outside the slots (the directory backend's
    /// `<slot>.incoming` trees); never touches a slot itself. Returns what it removed. The engine calls it only
    /// when no slot write is under way.
    fn remove_slot_leftovers(&self) -> Result<Vec<std::path::PathBuf>, OsError>;
    /// Marks `slot` to be booted once, with the configured number of tries.
    fn mark_boot_once(&self, slot: Slot) -> Result<(), OsError>;
    /// Reboots (or, for the directory backend, boots in-process).
    fn reboot(&self) -> Result<Rebooted, OsError>;
    /// Makes the booted `slot` the default.
    fn commit(&self, slot: Slot) -> Result<(), OsError>;
    /// Makes `to` the default again, drops any boot-once mark, and boots it if it is not the booted slot.
    fn fall_back(&self, to: Slot) -> Result<Rebooted, OsError>;
    /// Runs the configured health commands against the booted image.
    fn health_check(&self) -> Result<(), OsError>;
    /// Marks the node unschedulable.
    fn cordon(&self) -> Result<(), OsError>;
    /// Makes the node schedulable again.
    fn uncordon(&self) -> Result<(), OsError>;
    /// Evicts workloads within `timeout`; `force` ignores disruption budgets (pods are deleted, not evicted; a
    /// drain hook gets `{force}` = `force` and `UPKEEP_DRAIN_FORCE=1`).
    fn drain(&self, timeout: std::time::Duration, force: bool) -> Result<(), OsError>;
    /// The node's os-release `KEY=VALUE` pairs (`/etc/os-release`, else `/usr/lib/os-release`); empty if none.
    fn os_release(&self) -> Result<Vec<(String, String)>, OsError>;
    /// Puts a node OS channel plan in force: writes the plan's files, removes every other file the agent owns,
    /// switches the timers. Returns notes on what is missing (a timer or an updater not installed).
    fn apply_channel(&self, plan: &ChannelPlan) -> Result<Vec<String>, OsError>;
    /// Installs exactly `pins` from the configured repositories with the package manager of `os` (apt or dnf),
    /// and checks each package is then at its pinned version.
    fn install_packages(&self, os: &OsKind, pins: &[PackagePin]) -> Result<(), OsError>;
    /// Records the security patch `version` as applied (read back as `OsFacts::security_patch_version`).
    fn record_security_patch(&self, version: &str) -> Result<(), OsError>;
    /// The Kubernetes version the node runs (`[kubernetes] version_command`, else the installed version of the
    /// first configured package); None when it is not installed. `NotConfigured` without `[kubernetes]`.
    fn kubernetes_version(&self) -> Result<Option<KubernetesVersion>, OsError>;
    /// Installs the configured Kubernetes packages at `version` with the package manager of `os` (apt: the
    /// candidate `<version>-*`; dnf: `name-<version>`), and checks each is then at that version.
    fn install_kubernetes(&self, os: &OsKind, version: &KubernetesVersion) -> Result<(), OsError>;
    /// Runs the configured Kubernetes upgrade hook for `version`: `upgrade_first_control_plane` on the member's
    /// first control-plane node, else `upgrade_other`.
    fn upgrade_kubernetes_hook(&self, version: &KubernetesVersion, first_control_plane: bool) -> Result<(), OsError>;
    /// Keeps the Node's `upkeep.io/node-image-version` and `upkeep.io/security-patch-version` labels at these
    /// values (empty: no label). Never blocks on the network; a no-op without `[kubernetes] api_server`.
    fn publish_node_labels(&self, image: &str, patch: &str) -> Result<(), OsError>;
    /// The paths whose changes can change `facts` (files, and directories whose contents count), for a
    /// watcher that re-reads the facts only when one of them changes (`os::facts_feed`). Empty: none known,
    /// the facts change only through this `NodeOs`'s own operations.
    fn facts_sources(&self) -> Vec<std::path::PathBuf> {
        Vec::new()
    }
    /// Forgets what `facts` caches (dnf's reboot answer): a watched source changed.
    fn forget_cached_facts(&self) {}
}

/// `OsFacts::node_image` as its label (`<family>-<version>`) on the executor's wire.
mod label {
    use serde::{Deserialize, Deserializer, Serializer};
    use upkeep_core::version::NodeImageVersion;

    pub fn serialize<S: Serializer>(v: &Option<NodeImageVersion>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(n) => s.serialize_some(&n.label()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<NodeImageVersion>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|l| l.parse::<NodeImageVersion>().map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Publishes the node labels of a report through `os`, logging (not failing) when the values are refused.
pub fn publish_labels(os: &dyn NodeOs, image: &str, patch: &str) {
    if let Err(e) = os.publish_node_labels(image, patch) {
        tracing::warn!(error = %e, "node labels not published");
    }
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
