//! The hub's persistent state behind one trait, `Store`.
//!
//! `sqlite` is the embedded default (one file, WAL). PostgreSQL for several hubs is the planned second
//! implementation of the same trait. The store holds facts; it makes no decisions.

pub mod sqlite;

use serde::{Deserialize, Serialize};
use upkeep_core::channel::{AutoUpgradeChannel, NodeOsChannel};

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed an operation.
    #[error("{context}: {source}")]
    Db {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: rusqlite::Error,
    },
    /// A stored value could not be decoded (corruption or a newer schema).
    #[error("{context}: stored value is unreadable: {reason}")]
    Corrupt {
        /// Where.
        context: String,
        /// Why.
        reason: String,
    },
    /// The named thing does not exist.
    #[error("{kind} {name:?} not found; {hint}")]
    NotFound {
        /// Member, node...
        kind: &'static str,
        /// The name asked for.
        name: String,
        /// Where to look.
        hint: &'static str,
    },
}

/// Everything a node last reported about itself (mirrors the wire NodeReport, minus the node name).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFacts {
    /// Member the node belongs to.
    pub member: String,
    /// Node pool inside the member.
    pub node_pool: String,
    /// Region.
    pub region: String,
    /// os-release ID.
    pub os_family: String,
    /// os-release VERSION_ID.
    pub os_version: String,
    /// Kernel release.
    pub kernel: String,
    /// `<family>-<YYYYMM.DD.N>`, empty if unknown.
    pub node_image_version: String,
    /// Security patch version, empty if none.
    pub security_patch_version: String,
    /// Whether the OS says a reboot is required.
    pub reboot_required: bool,
    /// Channel the agent enforces.
    pub channel: String,
    /// Agent version.
    pub agent_version: String,
    /// Kubernetes version, empty if none.
    pub kubernetes_version: String,
    /// Runs the member's control plane.
    pub control_plane: bool,
    /// Hardware class of the pool.
    pub hardware_class: String,
    /// Operations in flight: (id, kind, step, state).
    pub operations: Vec<OperationFact>,
}

/// One operation in flight on a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationFact {
    /// Operation id.
    pub operation_id: String,
    /// Kind (cordon, drain, reimage...).
    pub kind: String,
    /// Step reached.
    pub step: String,
    /// running, succeeded, failed.
    pub state: String,
}

/// A node in the inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// Node name (from its certificate).
    pub name: String,
    /// Last report.
    pub facts: NodeFacts,
    /// First registration, Unix ms.
    pub first_seen_ms: i64,
    /// Last message of any kind, Unix ms.
    pub last_seen_ms: i64,
    /// Last report, Unix ms.
    pub last_report_ms: i64,
}

/// A member and its configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRecord {
    /// Member name.
    pub name: String,
    /// Node OS upgrade channel.
    pub node_os_channel: NodeOsChannel,
    /// Cluster auto-upgrade channel.
    pub auto_upgrade_channel: AutoUpgradeChannel,
    /// Bumped on every configuration change; agents ignore older ones.
    pub generation: u64,
    /// Nodes currently in the inventory.
    pub node_count: u32,
    /// Distinct regions of its nodes.
    pub regions: Vec<String>,
    /// Distinct node pools.
    pub node_pools: Vec<String>,
}

/// The hub's persistent state. Implementations must be safe to call from many tasks.
pub trait Store: Send + Sync {
    /// Records a node's report (creating the node, and its member with the default channel, if new).
    /// Returns the member's configuration.
    fn record_report(&self, name: &str, facts: &NodeFacts, now_ms: i64) -> Result<MemberRecord, StoreError>;
    /// Moves last-seen times forward (never backward) for many nodes in one transaction.
    fn touch_nodes(&self, seen: &[(String, i64)]) -> Result<(), StoreError>;
    /// All nodes, or those of one member, ordered by member then name.
    fn list_nodes(&self, member: Option<&str>) -> Result<Vec<NodeRecord>, StoreError>;
    /// One node.
    fn get_node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError>;
    /// Removes a node; true if it existed.
    fn forget_node(&self, name: &str) -> Result<bool, StoreError>;
    /// All members, by name.
    fn list_members(&self) -> Result<Vec<MemberRecord>, StoreError>;
    /// One member.
    fn get_member(&self, name: &str) -> Result<Option<MemberRecord>, StoreError>;
    /// Sets the node OS channel (the caller has checked the rules); bumps the generation.
    fn set_node_os_channel(&self, member: &str, channel: NodeOsChannel) -> Result<MemberRecord, StoreError>;
    /// Sets the cluster auto-upgrade channel; bumps the generation.
    fn set_auto_upgrade_channel(&self, member: &str, channel: AutoUpgradeChannel) -> Result<MemberRecord, StoreError>;
}
