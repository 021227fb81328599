//! Node work: how a member's nodes are taken out of service and changed (SPEC §4, §5 "Inside a member").
//!
//! Every disruption the hub causes goes through here, whoever asks for it: an update run's member upgrade, a
//! NodeImage or SecurityPatch channel rollout, the rolling reimage after a channel switch, a reboot a node asks
//! for, an operator's reboot. [`plan_work`] turns an [`Operation`] and the member's nodes into a [`WorkPlan`]:
//! which nodes, in what order (control-plane pools first, then pools by name, nodes by name), in what batches
//! (at most the member's `max_unavailable` at once, a batch never spans two pools), the steps of each node, and
//! which node is the member's *first control plane* (the one node that runs `upgrade apply`; it is alone in the
//! first batch so that every other Kubernetes upgrade runs after it).
//!
//! Two policies live here too, so that the executor makes no choices:
//! - [`on_step_failure`]: what happens to a node's cordon and its lease when one of its steps fails.
//! - [`on_undrainable`]: what a drain that cannot finish leads to, per the member's [`DrainPolicy`].
//!
//! Pure: no I/O, no clock.

use crate::concurrency::Limit;
use crate::maintenance::NodeTask;
use crate::run::UpgradeType;
use crate::version::{ImageVersion, KubernetesVersion, NodeImageVersion};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// What the planner needs to know about one node of the member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkNode {
    /// Node name.
    pub name: String,
    /// Its node pool.
    pub pool: String,
    /// Whether it runs the member's control plane.
    #[serde(default)]
    pub control_plane: bool,
    /// The booted node image (not folded with a security patch); None when the node has no image metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<NodeImageVersion>,
    /// Its Kubernetes version; None when unknown or not a Kubernetes node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesVersion>,
}

/// What is to be done to the member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// An update run's member upgrade (SPEC §5).
    RunUpgrade {
        /// The run's upgrade type.
        upgrade_type: UpgradeType,
        /// Target Kubernetes version (`Full`, `ControlPlaneOnly`).
        kubernetes: Option<KubernetesVersion>,
        /// Target image per node pool (pools without one are left as they are).
        images: BTreeMap<String, NodeImageVersion>,
    },
    /// A channel rollout (NodeImage, SecurityPatch, channel-switch reimage): the task of every node it changes.
    Rollout {
        /// node -> task.
        tasks: BTreeMap<String, NodeTask>,
    },
    /// Reboot these nodes (a node asked for it, or an operator did).
    Reboot {
        /// The nodes.
        nodes: Vec<String>,
    },
    /// Put a node back in service (an operator clears a node a failed step left cordoned).
    Uncordon {
        /// The node.
        node: String,
    },
}

/// One step on one node. Each becomes one command with its own operation id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Step {
    /// Mark the node unschedulable.
    Cordon,
    /// Evict its workloads (with the member's drain timeout and undrainable policy).
    Drain,
    /// Upgrade Kubernetes on the node (`upgrade apply` on the first control plane, `upgrade node` elsewhere).
    UpgradeKubernetes {
        /// Target version.
        version: KubernetesVersion,
        /// This node is the member's first control plane.
        first_control_plane: bool,
    },
    /// Reimage to this image.
    Reimage {
        /// Target image.
        image: NodeImageVersion,
        /// Write it even when the node runs this version (channel switch).
        #[serde(default)]
        reinstall: bool,
    },
    /// Install a security patch.
    Patch {
        /// Image family.
        family: String,
        /// Patch version.
        version: ImageVersion,
        /// Exact `name=version` pins.
        packages: Vec<String>,
    },
    /// Reboot when the node reports, after the previous step, that its OS wants one.
    RebootIfRequired,
    /// Reboot.
    Reboot,
    /// Put the node back in service.
    Uncordon,
}

impl Step {
    /// The step's short name: part of its operation id and of every message about it.
    pub fn name(&self) -> &'static str {
        match self {
            Step::Cordon => "cordon",
            Step::Drain => "drain",
            Step::UpgradeKubernetes { .. } => "upgrade-kubernetes",
            Step::Reimage { .. } => "reimage",
            Step::Patch { .. } => "patch",
            Step::RebootIfRequired | Step::Reboot => "reboot",
            Step::Uncordon => "uncordon",
        }
    }

    /// Whether the step may take the node away for a boot (the hub then waits a boot's grace before it calls
    /// the node silent).
    pub fn reboots(&self) -> bool {
        matches!(
            self,
            Step::UpgradeKubernetes { .. }
                | Step::Reimage { .. }
                | Step::Patch { .. }
                | Step::RebootIfRequired
                | Step::Reboot
        )
    }
}

/// What one node gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeWork {
    /// Node name.
    pub node: String,
    /// Its pool.
    pub pool: String,
    /// Its steps, in order.
    pub steps: Vec<Step>,
}

impl NodeWork {
    /// Short description for events and status: the steps that change the node.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::UpgradeKubernetes { version, first_control_plane: true } => {
                    Some(format!("Kubernetes {version} (upgrade apply)"))
                }
                Step::UpgradeKubernetes { version, .. } => Some(format!("Kubernetes {version}")),
                Step::Reimage { image, reinstall: false } => Some(format!("image {image}")),
                Step::Reimage { image, reinstall: true } => Some(format!("image {image} (reinstall)")),
                Step::Patch { family, version, .. } => Some(format!("security patch {family}-{version}")),
                Step::Reboot => Some("reboot".to_string()),
                Step::Uncordon if self.steps.len() == 1 => Some("uncordon".to_string()),
                _ => None,
            })
            .collect();
        parts.join(", ")
    }
}

/// The decision for a member: batches in order, each finished before the next starts.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WorkPlan {
    /// Batches in order; a batch has at most `slots` nodes and never spans two pools.
    pub batches: Vec<Vec<NodeWork>>,
    /// The node that runs `upgrade apply` (alone in the first batch), if the operation upgrades Kubernetes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_control_plane: Option<String>,
    /// How many nodes of the member may be out of service at once (`max_unavailable` resolved).
    pub slots: u32,
}

impl WorkPlan {
    /// Every node's work, in order.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeWork> {
        self.batches.iter().flatten()
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.batches.iter().all(Vec::is_empty)
    }
}

/// The steps a node needs for `op`, or None when it needs nothing.
fn node_steps(op: &Operation, n: &WorkNode, first_cp: Option<&str>) -> Option<Vec<Step>> {
    let changes: Vec<Step> = match op {
        Operation::RunUpgrade { upgrade_type, kubernetes, images } => {
            let mut s = Vec::new();
            if let Some(k) = kubernetes.filter(|k| kubernetes_due(*upgrade_type, *k, n)) {
                s.push(Step::UpgradeKubernetes { version: k, first_control_plane: first_cp == Some(n.name.as_str()) });
            }
            if upgrade_type.changes_node_images()
                && let Some(target) = images.get(&n.pool)
                && n.image.as_ref() != Some(target)
            {
                s.push(Step::Reimage { image: target.clone(), reinstall: false });
            }
            s
        }
        Operation::Rollout { tasks } => match tasks.get(&n.name)? {
            NodeTask::Reimage { image, reinstall } => {
                vec![Step::Reimage { image: image.clone(), reinstall: *reinstall }]
            }
            NodeTask::Patch { family, version, packages } => vec![
                Step::Patch { family: family.clone(), version: *version, packages: packages.clone() },
                Step::RebootIfRequired,
            ],
        },
        Operation::Reboot { nodes } => {
            if !nodes.contains(&n.name) {
                return None;
            }
            vec![Step::Reboot]
        }
        Operation::Uncordon { node } => {
            return (node == &n.name).then(|| vec![Step::Uncordon]);
        }
    };
    if changes.is_empty() {
        return None;
    }
    let mut steps = vec![Step::Cordon, Step::Drain];
    steps.extend(changes);
    steps.push(Step::Uncordon);
    Some(steps)
}

/// Whether `n` needs the Kubernetes upgrade to `k` (every node for `Full`, control-plane nodes only for
/// `ControlPlaneOnly`; a node whose version is unknown is upgraded).
fn kubernetes_due(t: UpgradeType, k: KubernetesVersion, n: &WorkNode) -> bool {
    let type_wants = match t {
        UpgradeType::Full => true,
        UpgradeType::ControlPlaneOnly => n.control_plane,
        UpgradeType::NodeImageOnly => false,
    };
    type_wants && n.kubernetes.is_none_or(|cur| cur < k)
}

/// Plans `op` over the member's nodes with its `max_unavailable` (SPEC §5 "Inside a member", §4).
///
/// Order: control-plane pools first, then the other pools by name; nodes by name inside a pool. When the
/// operation upgrades Kubernetes on a control-plane node, the first such node (in that order) is the member's
/// first control plane: it runs `upgrade apply`, alone in the first batch, and every other node runs
/// `upgrade node` in later batches. Batches hold at most `max_unavailable` (resolved over the member's node
/// count) nodes of one pool.
pub fn plan_work(op: &Operation, nodes: &[WorkNode], max_unavailable: Limit) -> WorkPlan {
    let slots = max_unavailable.resolve(u32::try_from(nodes.len()).unwrap_or(u32::MAX)).max(1);
    let mut pools: BTreeMap<&str, Vec<&WorkNode>> = BTreeMap::new();
    for n in nodes {
        pools.entry(n.pool.as_str()).or_default().push(n);
    }
    let mut order: Vec<(&str, Vec<&WorkNode>)> = pools.into_iter().collect();
    order.sort_by_key(|(name, ns)| (!ns.iter().any(|n| n.control_plane), name.to_string()));
    for (_, ns) in order.iter_mut() {
        ns.sort_by(|a, b| a.name.cmp(&b.name));
    }
    let first_cp = match op {
        Operation::RunUpgrade { upgrade_type, kubernetes: Some(k), .. } => order
            .iter()
            .flat_map(|(_, ns)| ns.iter())
            .find(|n| n.control_plane && kubernetes_due(*upgrade_type, *k, n))
            .map(|n| n.name.clone()),
        _ => None,
    };
    let mut batches: Vec<Vec<NodeWork>> = Vec::new();
    if let Some(first) = &first_cp
        && let Some(n) = nodes.iter().find(|n| &n.name == first)
        && let Some(steps) = node_steps(op, n, Some(first))
    {
        batches.push(vec![NodeWork { node: n.name.clone(), pool: n.pool.clone(), steps }]);
    }
    for (pool, ns) in &order {
        let work: Vec<NodeWork> = ns
            .iter()
            .filter(|n| first_cp.as_deref() != Some(n.name.as_str()))
            .filter_map(|n| {
                node_steps(op, n, first_cp.as_deref()).map(|steps| NodeWork {
                    node: n.name.clone(),
                    pool: pool.to_string(),
                    steps,
                })
            })
            .collect();
        for chunk in work.chunks(slots as usize) {
            batches.push(chunk.to_vec());
        }
    }
    WorkPlan { batches, first_control_plane: first_cp, slots }
}

// ----- failure policy ----------------------------------------------------------------------------------------------

/// What becomes of a node, its cordon and its lease, after one of its steps failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailureEffect {
    /// Send an uncordon (the node is unchanged and can take workloads again).
    pub uncordon: bool,
    /// Keep the node's lease: it stays out of service and counts against the member's budget until an operator
    /// clears it (`upkeepctl node uncordon`).
    pub keep_lease: bool,
}

/// The one failure policy for every kind of work (SPEC §5: a node that fails its upgrade fails the member).
///
/// - `cordon` failed: the node may be half-cordoned; it is uncordoned and its lease given back.
/// - `drain` failed (and the undrainable policy did not skip or force it): workloads still run there, nothing was
///   changed; it is uncordoned and its lease given back.
/// - a changing step failed (Kubernetes upgrade, reimage, patch, reboot): the node is in a state nobody checked;
///   it stays cordoned and keeps its lease, so it still counts against the budget and nothing else in the member
///   is taken out in its place.
/// - `uncordon` failed: the node is still cordoned, so it keeps its lease.
///
/// In every case the work stops starting new nodes; nodes already under way finish.
pub fn on_step_failure(step: &Step) -> FailureEffect {
    match step {
        Step::Cordon | Step::Drain => FailureEffect { uncordon: true, keep_lease: false },
        _ => FailureEffect { uncordon: false, keep_lease: true },
    }
}

// ----- undrainable nodes -------------------------------------------------------------------------------------------

/// What to do with a node whose drain cannot finish (a PodDisruptionBudget, a pod without a controller, a hook
/// that fails).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Undrainable {
    /// Fail the node (and with it the work): the default, nothing is forced.
    #[default]
    Fail,
    /// Leave the node as it is (uncordoned, unchanged) and go on with the others.
    SkipNode,
    /// Drain again ignoring disruption budgets (delete instead of evict), then go on.
    Force,
}

impl Undrainable {
    /// Display form.
    pub fn as_str(self) -> &'static str {
        match self {
            Undrainable::Fail => "Fail",
            Undrainable::SkipNode => "SkipNode",
            Undrainable::Force => "Force",
        }
    }
}

impl fmt::Display for Undrainable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Undrainable {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "Fail" => Ok(Undrainable::Fail),
            "SkipNode" => Ok(Undrainable::SkipNode),
            "Force" => Ok(Undrainable::Force),
            other => Err(format!("{other:?} is not an undrainable policy; give Fail, SkipNode or Force")),
        }
    }
}

/// Default drain timeout, seconds.
pub const DEFAULT_DRAIN_TIMEOUT_SECONDS: u32 = 900;
/// Longest drain timeout accepted, seconds (a day).
pub const MAX_DRAIN_TIMEOUT_SECONDS: u32 = 86_400;

/// A member's drain settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainPolicy {
    /// How long one drain may take, seconds.
    pub timeout_seconds: u32,
    /// What an undrainable node leads to.
    pub undrainable: Undrainable,
    /// How many nodes one piece of work may skip or force before an undrainable node fails it.
    pub max_undrainable: u32,
}

impl Default for DrainPolicy {
    fn default() -> Self {
        DrainPolicy {
            timeout_seconds: DEFAULT_DRAIN_TIMEOUT_SECONDS,
            undrainable: Undrainable::Fail,
            max_undrainable: 1,
        }
    }
}

impl DrainPolicy {
    /// Why these settings are not acceptable, naming the field and the fix.
    pub fn problem(&self) -> Option<String> {
        if self.timeout_seconds == 0 || self.timeout_seconds > MAX_DRAIN_TIMEOUT_SECONDS {
            return Some(format!(
                "drain_timeout: {} s is out of range; give 1 to {MAX_DRAIN_TIMEOUT_SECONDS} seconds",
                self.timeout_seconds
            ));
        }
        None
    }
}

/// What the executor does after a drain failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UndrainableAction {
    /// Fail the node with this error (the failure policy for `drain` applies).
    Fail(String),
    /// Uncordon the node, give its lease back, record it as skipped with this reason, go on.
    Skip(String),
    /// Drain again with force, then go on.
    Force(String),
}

/// Decides what an undrainable node leads to. `used` is how many nodes this work already skipped or forced;
/// `blocker` is what the node said blocks its drain (pods and their PodDisruptionBudgets, or the hook's output).
pub fn on_undrainable(policy: &DrainPolicy, used: u32, node: &str, blocker: &str) -> UndrainableAction {
    let why = format!("node {node:?} could not be drained: {blocker}");
    match policy.undrainable {
        Undrainable::Fail => UndrainableAction::Fail(format!("{why} (undrainable policy Fail)")),
        p if used >= policy.max_undrainable => UndrainableAction::Fail(format!(
            "{why}; undrainable policy {p} already used on {used} node(s), the cap max_undrainable is {}",
            policy.max_undrainable
        )),
        Undrainable::SkipNode => UndrainableAction::Skip(format!("{why}; skipped (undrainable policy SkipNode)")),
        Undrainable::Force => UndrainableAction::Force(format!("{why}; forced (undrainable policy Force)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;

    fn node(name: &str, pool: &str, cp: bool, image: &str, k: Option<&str>) -> WorkNode {
        WorkNode {
            name: name.into(),
            pool: pool.into(),
            control_plane: cp,
            image: image.parse().ok(),
            kubernetes: k.map(|k| k.parse().expect("kubernetes version")),
        }
    }

    fn img(s: &str) -> NodeImageVersion {
        s.parse().expect("image")
    }

    fn full(k: &str, pools: &[(&str, &str)]) -> Operation {
        Operation::RunUpgrade {
            upgrade_type: UpgradeType::Full,
            kubernetes: Some(k.parse().expect("k")),
            images: pools.iter().map(|(p, i)| (p.to_string(), img(i))).collect(),
        }
    }

    fn names(batch: &[NodeWork]) -> Vec<&str> {
        batch.iter().map(|w| w.node.as_str()).collect()
    }

    #[test]
    fn sec5_control_plane_first_and_exactly_one_upgrade_apply_before_every_upgrade_node() {
        let nodes = [
            node("w2", "workers", false, "F-202401.01.0", Some("1.29.0")),
            node("w1", "workers", false, "F-202401.01.0", Some("1.29.0")),
            node("cp2", "cp", true, "F-202401.01.0", Some("1.29.0")),
            node("cp1", "cp", true, "F-202401.01.0", Some("1.29.0")),
        ];
        let op = full("1.30.0", &[("workers", "F-202402.01.0"), ("cp", "F-202402.01.0")]);
        let p = plan_work(&op, &nodes, Limit::Count(2));
        assert_eq!(p.first_control_plane.as_deref(), Some("cp1"));
        let order: Vec<Vec<&str>> = p.batches.iter().map(|b| names(b)).collect();
        assert_eq!(order, [vec!["cp1"], vec!["cp2"], vec!["w1", "w2"]]);
        let applies: Vec<&str> = p
            .nodes()
            .filter(|w| w.steps.iter().any(|s| matches!(s, Step::UpgradeKubernetes { first_control_plane: true, .. })))
            .map(|w| w.node.as_str())
            .collect();
        assert_eq!(applies, ["cp1"]);
        assert_eq!(
            p.batches[0][0].steps.iter().map(Step::name).collect::<Vec<_>>(),
            ["cordon", "drain", "upgrade-kubernetes", "reimage", "uncordon"]
        );
    }

    #[test]
    fn sec5_control_plane_only_upgrades_only_control_plane_nodes_and_nodes_at_target_are_left_alone() {
        let nodes = [
            node("cp1", "cp", true, "F-202401.01.0", Some("1.30.0")),
            node("cp2", "cp", true, "F-202401.01.0", Some("1.29.0")),
            node("w1", "workers", false, "F-202401.01.0", Some("1.29.0")),
        ];
        let op = Operation::RunUpgrade {
            upgrade_type: UpgradeType::ControlPlaneOnly,
            kubernetes: Some("1.30.0".parse().expect("k")),
            images: BTreeMap::new(),
        };
        let p = plan_work(&op, &nodes, Limit::Count(1));
        // cp1 is already at 1.30: the first control plane still to upgrade is cp2, and it runs `upgrade apply`.
        assert_eq!(p.first_control_plane.as_deref(), Some("cp2"));
        assert_eq!(p.nodes().map(|w| w.node.as_str()).collect::<Vec<_>>(), ["cp2"]);
    }

    #[test]
    fn sec2_rollout_tasks_become_cordon_drain_change_uncordon_and_patches_reboot_if_required() {
        let nodes = [node("a", "p", false, "F-202401.01.0", None), node("b", "p", false, "F-202401.01.0", None)];
        let mut tasks = BTreeMap::new();
        tasks.insert(
            "b".to_string(),
            NodeTask::Patch { family: "F".into(), version: "202402.01.0".parse().expect("v"), packages: vec![] },
        );
        let p = plan_work(&Operation::Rollout { tasks }, &nodes, Limit::Count(1));
        assert_eq!(p.batches.len(), 1);
        assert_eq!(
            p.batches[0][0].steps.iter().map(Step::name).collect::<Vec<_>>(),
            ["cordon", "drain", "patch", "reboot", "uncordon"]
        );
        let reboot = plan_work(&Operation::Reboot { nodes: vec!["a".into()] }, &nodes, Limit::Count(1));
        assert_eq!(names(&reboot.batches[0]), ["a"]);
        assert_eq!(reboot.batches[0][0].steps[2], Step::Reboot);
    }

    #[test]
    fn sec4_failure_policy_uncordons_only_nodes_left_unchanged() {
        assert_eq!(on_step_failure(&Step::Drain), FailureEffect { uncordon: true, keep_lease: false });
        assert_eq!(on_step_failure(&Step::Cordon), FailureEffect { uncordon: true, keep_lease: false });
        for s in [Step::Reboot, Step::Uncordon, Step::RebootIfRequired] {
            assert_eq!(on_step_failure(&s), FailureEffect { uncordon: false, keep_lease: true }, "{s:?}");
        }
    }

    #[test]
    fn undrainable_policies_and_their_cap() {
        let mut p = DrainPolicy::default();
        assert!(matches!(on_undrainable(&p, 0, "n1", "pod a/b blocked by PodDisruptionBudget a/pdb"),
            UndrainableAction::Fail(m) if m.contains("PodDisruptionBudget a/pdb") && m.contains("\"n1\"")));
        p.undrainable = Undrainable::SkipNode;
        assert!(matches!(on_undrainable(&p, 0, "n1", "x"), UndrainableAction::Skip(_)));
        assert!(
            matches!(on_undrainable(&p, 1, "n1", "x"), UndrainableAction::Fail(m) if m.contains("max_undrainable is 1"))
        );
        p.undrainable = Undrainable::Force;
        p.max_undrainable = 2;
        assert!(matches!(on_undrainable(&p, 1, "n1", "x"), UndrainableAction::Force(_)));
        assert_eq!("SkipNode".parse::<Undrainable>(), Ok(Undrainable::SkipNode));
        assert!("skip".parse::<Undrainable>().expect_err("bad").contains("Fail, SkipNode or Force"));
        assert!(DrainPolicy { timeout_seconds: 0, ..DrainPolicy::default() }.problem().is_some());
    }

    #[test]
    fn property_no_plan_exceeds_the_budget_and_apply_runs_once_and_first() {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        for _ in 0..2000 {
            let count = 1 + rng.below(12);
            let pools = 1 + rng.below(3);
            let nodes: Vec<WorkNode> = (0..count)
                .map(|i| {
                    let pool = rng.below(pools);
                    node(
                        &format!("n{i:02}"),
                        &format!("p{pool}"),
                        pool == 0 && rng.below(2) == 0,
                        ["F-202401.01.0", "F-202402.01.0"][rng.below(2)],
                        Some(["1.29.0", "1.30.0"][rng.below(2)]),
                    )
                })
                .collect();
            let limit = if rng.below(2) == 0 {
                Limit::Count(1 + rng.below(4) as u32)
            } else {
                Limit::Percent(1 + rng.below(100) as u32)
            };
            let op = match rng.below(3) {
                0 => full("1.30.0", &[("p0", "F-202402.01.0"), ("p1", "F-202402.01.0"), ("p2", "F-202402.01.0")]),
                1 => Operation::RunUpgrade {
                    upgrade_type: UpgradeType::NodeImageOnly,
                    kubernetes: None,
                    images: [("p1".to_string(), img("F-202402.01.0"))].into_iter().collect(),
                },
                _ => Operation::Reboot { nodes: nodes.iter().map(|n| n.name.clone()).collect() },
            };
            let p = plan_work(&op, &nodes, limit);
            let slots = limit.resolve(count as u32);
            assert_eq!(p.slots, slots);
            let mut seen = std::collections::BTreeSet::new();
            for b in &p.batches {
                assert!(!b.is_empty() && b.len() as u32 <= slots, "batch over budget {slots}: {p:?}");
                assert!(b.iter().all(|w| w.pool == b[0].pool), "a batch spans two pools: {p:?}");
                for w in b {
                    assert!(seen.insert(w.node.clone()), "node planned twice: {p:?}");
                    assert_eq!(w.steps.first(), Some(&Step::Cordon));
                    assert_eq!(w.steps.last(), Some(&Step::Uncordon));
                }
            }
            let applies: Vec<(usize, &str)> = p
                .batches
                .iter()
                .enumerate()
                .flat_map(|(i, b)| b.iter().map(move |w| (i, w)))
                .filter(|(_, w)| {
                    w.steps.iter().any(|s| matches!(s, Step::UpgradeKubernetes { first_control_plane: true, .. }))
                })
                .map(|(i, w)| (i, w.node.as_str()))
                .collect();
            assert!(applies.len() <= 1, "two upgrade apply: {p:?}");
            if let Some((i, n)) = applies.first() {
                assert_eq!((*i, Some(*n)), (0, p.first_control_plane.as_deref()));
                assert_eq!(p.batches[0].len(), 1, "upgrade apply is alone in its batch: {p:?}");
            }
            let any_k8s = p.nodes().any(|w| w.steps.iter().any(|s| matches!(s, Step::UpgradeKubernetes { .. })));
            let cp_due = nodes.iter().any(|n| n.control_plane && n.kubernetes < Some("1.30.0".parse().expect("k")));
            if matches!(op, Operation::RunUpgrade { upgrade_type: UpgradeType::Full, .. }) && any_k8s && cp_due {
                assert_eq!(
                    applies.len(),
                    1,
                    "a Kubernetes upgrade with a control plane to upgrade has one apply: {p:?}"
                );
            }
        }
    }
}
