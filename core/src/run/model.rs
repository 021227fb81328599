//! The update-run specification as the operator writes it (SPEC §5): upgrade type, target, node image
//! selection and the order (stages, groups, waits, concurrency). Stored as JSON by the hub and read from YAML or
//! JSON files by the CLI, so every name here is part of a stable format. Unknown keys are refused (a misspelt
//! `after_stage_wait_secs` is an error naming it, never a stage stored without its wait); the hub writes these
//! back only from the typed values, so a stored copy never holds a key the types do not know.

use crate::concurrency::Limit;
use crate::version::{ImageVersion, KubernetesVersion};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What an update run changes (SPEC §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum UpgradeType {
    /// Kubernetes version on control plane and nodes, node image included.
    Full,
    /// Kubernetes version of the control plane only.
    ControlPlaneOnly,
    /// Node image only.
    NodeImageOnly,
}

impl UpgradeType {
    /// Whether this type needs a target Kubernetes version.
    pub fn needs_kubernetes_version(self) -> bool {
        matches!(self, UpgradeType::Full | UpgradeType::ControlPlaneOnly)
    }

    /// Whether this type changes node images.
    pub fn changes_node_images(self) -> bool {
        matches!(self, UpgradeType::Full | UpgradeType::NodeImageOnly)
    }
}

impl UpgradeType {
    /// Every type, in the SPEC's order.
    pub const ALL: [UpgradeType; 3] = [UpgradeType::Full, UpgradeType::ControlPlaneOnly, UpgradeType::NodeImageOnly];

    /// The SPEC's spelling, as in files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            UpgradeType::Full => "Full",
            UpgradeType::ControlPlaneOnly => "ControlPlaneOnly",
            UpgradeType::NodeImageOnly => "NodeImageOnly",
        }
    }
}

impl std::fmt::Display for UpgradeType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An upgrade type that is not one of the three.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown upgrade_type {}: expected Full, ControlPlaneOnly or NodeImageOnly", crate::limits::quoted(.0))]
pub struct UnknownUpgradeType(pub String);

impl std::str::FromStr for UpgradeType {
    type Err = UnknownUpgradeType;
    /// Case-insensitive; `-` and `_` are ignored, so `node-image-only` and `NodeImageOnly` both parse.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm: String = s.chars().filter(|c| *c != '-' && *c != '_').collect();
        UpgradeType::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(&norm))
            .ok_or_else(|| UnknownUpgradeType(s.to_string()))
    }
}

/// One pinned image version for a family (`Custom` selection).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagePin {
    /// Image family, e.g. `AKSUbuntu-2204gen2containerd`.
    pub family: String,
    /// The version every node pool of that family gets.
    pub version: ImageVersion,
}

/// How the node image version is chosen (SPEC §5); it is never given exactly for a member.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(tag = "mode", from = "SelectionInput")]
pub enum NodeImageSelection {
    /// Each member gets the newest image of each pool's family available in its region when its upgrade starts.
    #[default]
    Latest,
    /// At run start, per family, the newest version available in every region of the run's members.
    Consistent,
    /// Operator-pinned versions, at most one per family; pools of other families are left as they are.
    Custom {
        /// The pins.
        pins: Vec<ImagePin>,
    },
}

/// How a [`NodeImageSelection`] is read: the same format, with every variant a struct so that a key that does not
/// belong to the mode (say `pins` with `Latest`) is refused instead of ignored.
#[derive(Deserialize)]
#[serde(tag = "mode", deny_unknown_fields)]
enum SelectionInput {
    Latest {},
    Consistent {},
    Custom { pins: Vec<ImagePin> },
}

impl From<SelectionInput> for NodeImageSelection {
    fn from(s: SelectionInput) -> Self {
        match s {
            SelectionInput::Latest {} => NodeImageSelection::Latest,
            SelectionInput::Consistent {} => NodeImageSelection::Consistent,
            SelectionInput::Custom { pins } => NodeImageSelection::Custom { pins },
        }
    }
}

impl NodeImageSelection {
    /// The pins of a `Custom` selection as a map (the last pin wins if validation was bypassed); empty otherwise.
    pub fn pins(&self) -> BTreeMap<String, ImageVersion> {
        match self {
            NodeImageSelection::Custom { pins } => pins.iter().map(|p| (p.family.clone(), p.version)).collect(),
            _ => BTreeMap::new(),
        }
    }
}

/// A group: members upgraded one after another (or up to `max_concurrency` at once).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    /// Unique within its stage.
    pub name: String,
    /// Member names, in the declared order.
    pub members: Vec<String>,
    /// How many of its members may be upgraded at once (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<Limit>,
}

/// A stage: its groups are upgraded in parallel; the next stage starts after it (and its wait).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    /// Unique within the run.
    pub name: String,
    /// One or more groups.
    pub groups: Vec<GroupSpec>,
    /// Seconds to wait after this stage before the next one starts (0 ..= [`MAX_WAIT_SECONDS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_stage_wait_seconds: Option<i64>,
    /// Caps the number of members being upgraded at once across all groups of the stage (default: no cap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<Limit>,
}

/// An order of stages, either a named reusable strategy (copied into the run) or given inline.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StrategySpec {
    /// The stages, applied one after another.
    pub stages: Vec<StageSpec>,
}

/// An update run as created (SPEC §5).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateRunSpec {
    /// The run's name.
    pub name: String,
    /// The copied order; `None` means all members one after another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<StrategySpec>,
    /// What the run changes.
    pub upgrade_type: UpgradeType,
    /// Target Kubernetes version: required for `Full` and `ControlPlaneOnly`, refused for `NodeImageOnly`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes_version: Option<KubernetesVersion>,
    /// How node images are chosen.
    #[serde(default)]
    pub node_image_selection: NodeImageSelection,
}

/// Where a run's order comes from (SPEC §5: "a run either names a strategy or carries its own stages, never
/// both").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderSource {
    /// A named strategy, to be copied into the run when it is created.
    Named(String),
    /// Stages given inline.
    Inline(StrategySpec),
    /// Neither: all members one after another.
    AllMembersOneByOne,
}

/// The longest wait after a stage: 30 days. A longer soak is a stopped run, not a wait; the bound keeps every
/// time computed from a wait far inside the calendar (SPEC §7, "every duration has bounds").
pub const MAX_WAIT_SECONDS: i64 = 30 * 24 * 60 * 60;

/// The most stages a run may have.
pub const MAX_STAGES: usize = 1_000;

/// The most groups a stage may have.
pub const MAX_GROUPS_PER_STAGE: usize = 1_000;

/// The most members a run's order may name.
pub const MAX_MEMBERS_PER_RUN: usize = 100_000;

/// Name of the single stage and group made when a run has no order.
pub const DEFAULT_STAGE_NAME: &str = "all-members";

/// The order a run with no strategy follows: one stage with one group holding every member in the given order.
pub fn default_strategy(all_members_in_order: &[String]) -> StrategySpec {
    StrategySpec {
        stages: vec![StageSpec {
            name: DEFAULT_STAGE_NAME.to_string(),
            groups: vec![GroupSpec {
                name: DEFAULT_STAGE_NAME.to_string(),
                members: all_members_in_order.to_vec(),
                max_concurrency: Some(Limit::Count(1)),
            }],
            after_stage_wait_seconds: None,
            max_concurrency: None,
        }],
    }
}
