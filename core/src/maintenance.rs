//! Channel auto-upgrades and reboot leases (SPEC §2, §4): what the hub may do to a member's nodes on its own.
//!
//! Two decisions live here, both pure:
//! - [`decide_lease`]: may this node take itself (or be taken) out of service now? At most the member's
//!   `max_unavailable` nodes hold leases at once, only inside the node OS window (unless forced), never while an
//!   update run is upgrading the member, one disruption per node at a time.
//! - [`desired_rollout`] and [`may_start`]: which nodes of a member the member's channel wants changed (the newest
//!   image of each node's family for `NodeImage`, the newest security patch for `SecurityPatch`, a reimage to the
//!   current image after a channel switch), and whether a rollout may start now (window open, or without a window
//!   the weekly cadence).
//!
//! The hub shell (`hub/src/maintenance.rs`) gathers the inputs, calls these and carries out the result.

use crate::channel::{NodeOsChannel, security_patch_refusal};
use crate::concurrency::Limit;
use crate::schedule::{MaintenanceSchedule, rfc3339};
use crate::version::{ImageVersion, NodeImageVersion};
use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A lease someone holds now (expired leases are not passed in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldLease {
    /// The node out of service under it.
    pub node: String,
    /// Lease id.
    pub lease_id: String,
    /// What it is for (shown in denials).
    pub purpose: String,
}

/// A member's disruption picture at one instant.
#[derive(Debug, Clone)]
pub struct MemberBudget<'a> {
    /// Member name.
    pub member: &'a str,
    /// Nodes in the member.
    pub node_count: u32,
    /// The member's `max_unavailable`.
    pub max_unavailable: Limit,
    /// The member's node OS window (`None`: no window, any time).
    pub window: Option<&'a MaintenanceSchedule>,
    /// An update run upgrading the member now, if any.
    pub upgrading_run: Option<&'a str>,
    /// Unexpired leases held on the member's nodes.
    pub held: &'a [HeldLease],
}

impl MemberBudget<'_> {
    /// How many nodes may be out of service at once.
    pub fn slots(&self) -> u32 {
        self.max_unavailable.resolve(self.node_count)
    }

    /// Distinct nodes holding leases.
    pub fn nodes_out(&self) -> BTreeSet<&str> {
        self.held.iter().map(|l| l.node.as_str()).collect()
    }
}

/// The answer to a lease request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseDecision {
    /// Grant a new lease.
    Grant,
    /// The node already holds this lease: answer granted again.
    AlreadyHeld,
    /// Not now.
    Deny {
        /// Why, in a word (a bounded set: metrics count denials by it).
        cause: DenyCause,
        /// Why, for the node's report and the operator.
        reason: String,
        /// When to ask again, seconds.
        retry_after_seconds: u32,
    },
}

/// Why a lease was denied, in a word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyCause {
    /// An update run is upgrading the member.
    RunUpgrading,
    /// The node is already out of service under another lease.
    NodeOut,
    /// The node OS window is closed.
    WindowClosed,
    /// The member's disruption budget is in use.
    Budget,
}

impl DenyCause {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyCause::RunUpgrading => "run_upgrading",
            DenyCause::NodeOut => "node_out_of_service",
            DenyCause::WindowClosed => "window_closed",
            DenyCause::Budget => "budget",
        }
    }
}

/// Longest pause a denied node is told to wait before asking again.
pub const MAX_RETRY_SECONDS: u32 = 900;

/// Whether the window allows a disruption at `now`: `Ok` when open (or no window), else when it next opens.
pub fn window_allows(window: Option<&MaintenanceSchedule>, now: DateTime<Utc>) -> Result<(), Option<DateTime<Utc>>> {
    match window {
        None => Ok(()),
        Some(w) if w.is_open(now).is_some() => Ok(()),
        Some(w) => Err(w.next_opening(now)),
    }
}

/// Decides a lease request from `node` for `lease_id` (SPEC §4 "reboot: coordinated"). `forced` (an operator
/// override) skips the window, nothing else: the budget still holds.
pub fn decide_lease(
    b: &MemberBudget<'_>,
    node: &str,
    lease_id: &str,
    forced: bool,
    now: DateTime<Utc>,
) -> LeaseDecision {
    if b.held.iter().any(|l| l.node == node && l.lease_id == lease_id) {
        return LeaseDecision::AlreadyHeld;
    }
    if let Some(run) = b.upgrading_run {
        return LeaseDecision::Deny {
            cause: DenyCause::RunUpgrading,
            reason: format!("update run {run:?} is upgrading member {:?}; reboots wait until it is done", b.member),
            retry_after_seconds: 15,
        };
    }
    if let Some(other) = b.held.iter().find(|l| l.node == node) {
        return LeaseDecision::Deny {
            cause: DenyCause::NodeOut,
            reason: format!(
                "node {node:?} is already out of service under lease {:?} ({})",
                other.lease_id, other.purpose
            ),
            retry_after_seconds: 30,
        };
    }
    if !forced && let Err(next) = window_allows(b.window, now) {
        return match next {
            Some(t) => LeaseDecision::Deny {
                cause: DenyCause::WindowClosed,
                reason: format!("the node OS window of member {:?} is closed; it opens {}", b.member, rfc3339(t)),
                retry_after_seconds: u32::try_from((t - now).num_seconds().max(5))
                    .unwrap_or(MAX_RETRY_SECONDS)
                    .min(MAX_RETRY_SECONDS),
            },
            None => LeaseDecision::Deny {
                cause: DenyCause::WindowClosed,
                reason: format!(
                    "the node OS window of member {:?} has no opening in the next year; fix the schedule or force the reboot",
                    b.member
                ),
                retry_after_seconds: MAX_RETRY_SECONDS,
            },
        };
    }
    let out = b.nodes_out();
    let slots = b.slots();
    if out.len() as u64 >= u64::from(slots) {
        return LeaseDecision::Deny {
            cause: DenyCause::Budget,
            reason: format!(
                "the disruption budget of member {:?} is in use: max_unavailable {} allows {slots} of {} nodes out of \
                 service and {} {} out",
                b.member,
                b.max_unavailable,
                b.node_count,
                out.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", "),
                if out.len() == 1 { "is" } else { "are" }
            ),
            retry_after_seconds: 10,
        };
    }
    LeaseDecision::Grant
}

/// What the hub knows about one node, for channel rollouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// Node name.
    pub name: String,
    /// Node pool.
    pub pool: String,
    /// Region.
    pub region: String,
    /// Reported node image (None: no image metadata; such a node is left alone).
    pub image: Option<NodeImageVersion>,
    /// Reported security patch version (None: none applied).
    pub security_patch: Option<ImageVersion>,
    /// os-release ID.
    pub os_family: String,
    /// Hardware class of its pool.
    pub hardware_class: String,
}

/// A published security patch: the exact packages (`name=version`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchRelease {
    /// Pins.
    pub packages: Vec<String>,
}

/// The catalog as channel rollouts see it.
#[derive(Debug, Clone, Default)]
pub struct ChannelCatalog {
    /// family -> version -> region -> available from.
    pub images: BTreeMap<String, BTreeMap<ImageVersion, BTreeMap<String, DateTime<Utc>>>>,
    /// family -> version -> patch.
    pub patches: BTreeMap<String, BTreeMap<ImageVersion, PatchRelease>>,
}

impl ChannelCatalog {
    /// The newest image of `family` available in `region` at `now`.
    pub fn newest_image(&self, family: &str, region: &str, now: DateTime<Utc>) -> Option<ImageVersion> {
        self.images
            .get(family)?
            .iter()
            .rev()
            .find(|(_, regions)| regions.get(region).is_some_and(|from| *from <= now))
            .map(|(v, _)| *v)
    }

    /// The newest security patch of `family`.
    pub fn newest_patch(&self, family: &str) -> Option<(ImageVersion, &PatchRelease)> {
        self.patches.get(family)?.iter().next_back().map(|(v, p)| (*v, p))
    }
}

/// What a rollout does to one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum NodeTask {
    /// Reimage to this image (`reinstall`: even if the node already runs it).
    Reimage {
        /// Target image.
        image: NodeImageVersion,
        /// Write it even when the node runs this version (a channel switch).
        reinstall: bool,
    },
    /// Install this security patch.
    Patch {
        /// Image family.
        family: String,
        /// Patch version.
        version: ImageVersion,
        /// `name=version` pins.
        packages: Vec<String>,
    },
}

impl NodeTask {
    /// Short description for events and `member show`.
    pub fn describe(&self) -> String {
        match self {
            NodeTask::Reimage { image, reinstall: false } => format!("reimage to {image}"),
            NodeTask::Reimage { image, reinstall: true } => format!("reimage to {image} (channel switch)"),
            NodeTask::Patch { family, version, .. } => format!("security patch {family}-{version}"),
        }
    }
}

/// Why a rollout exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RolloutKind {
    /// NodeImage channel: a newer image landed.
    NodeImage,
    /// SecurityPatch channel: a newer patch landed.
    SecurityPatch,
    /// The member's channel changed: rolling reimage to the current image.
    ChannelSwitch,
}

impl RolloutKind {
    /// Display form.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutKind::NodeImage => "node-image",
            RolloutKind::SecurityPatch => "security-patch",
            RolloutKind::ChannelSwitch => "channel-switch",
        }
    }
}

/// A rollout the channel wants: a deterministic id (the same release gives the same id) and the task of every
/// node that needs one, in node order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// Deterministic id: kind plus the targets.
    pub id: String,
    /// Why.
    pub kind: RolloutKind,
    /// node -> task.
    pub tasks: BTreeMap<String, NodeTask>,
}

/// The rollout `channel` wants for these nodes now, if any. `switched` is the member generation of a channel
/// switch that has not been rolled out yet: it takes precedence (every node reimaged to the current image).
pub fn desired_rollout(
    channel: NodeOsChannel,
    switched: Option<u64>,
    nodes: &[NodeView],
    catalog: &ChannelCatalog,
    now: DateTime<Utc>,
) -> Option<Rollout> {
    let mut tasks = BTreeMap::new();
    let mut targets = BTreeSet::new();
    let kind = match (switched, channel) {
        (Some(_), _) => RolloutKind::ChannelSwitch,
        (None, NodeOsChannel::NodeImage) => RolloutKind::NodeImage,
        (None, NodeOsChannel::SecurityPatch) => RolloutKind::SecurityPatch,
        (None, NodeOsChannel::None | NodeOsChannel::Unmanaged) => return None,
    };
    for n in nodes {
        let Some(current) = &n.image else { continue };
        match kind {
            RolloutKind::NodeImage | RolloutKind::ChannelSwitch => {
                let Some(newest) = catalog.newest_image(&current.family, &n.region, now) else { continue };
                let reinstall = kind == RolloutKind::ChannelSwitch && newest == current.version;
                if newest > current.version || reinstall {
                    let image = NodeImageVersion { family: current.family.clone(), version: newest };
                    targets.insert(image.label());
                    tasks.insert(n.name.clone(), NodeTask::Reimage { image, reinstall });
                }
            }
            RolloutKind::SecurityPatch => {
                if security_patch_refusal(&n.os_family, &n.hardware_class, &n.pool).is_some() {
                    continue;
                }
                let Some((version, patch)) = catalog.newest_patch(&current.family) else { continue };
                if n.security_patch.is_none_or(|have| have < version) {
                    targets.insert(format!("{}-{version}", current.family));
                    tasks.insert(
                        n.name.clone(),
                        NodeTask::Patch { family: current.family.clone(), version, packages: patch.packages.clone() },
                    );
                }
            }
        }
    }
    if tasks.is_empty() {
        return None;
    }
    let targets = targets.into_iter().collect::<Vec<_>>().join("+");
    let id = match (kind, switched) {
        (RolloutKind::ChannelSwitch, Some(g)) => format!("channel-switch@{g}:{targets}"),
        _ => format!("{}:{targets}", kind.as_str()),
    };
    Some(Rollout { id, kind, tasks })
}

/// Why a rollout may not start now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// For `member show`.
    pub why: String,
    /// When to look again (None: nothing known; the next catalog or settings change).
    pub until: Option<DateTime<Utc>>,
}

/// Whether a new rollout of `kind` may start at `now` (SPEC §2): inside the node OS window when the member has one;
/// without one, channel upgrades follow the weekly cadence (at most one rollout start per `cadence` after the
/// previous start), and a channel switch may start at once.
pub fn may_start(
    kind: RolloutKind,
    window: Option<&MaintenanceSchedule>,
    last_started: Option<DateTime<Utc>>,
    cadence: TimeDelta,
    now: DateTime<Utc>,
) -> Result<(), Waiting> {
    if let Err(next) = window_allows(window, now) {
        return Err(Waiting {
            why: match next {
                Some(t) => format!("waiting for the node OS window (opens {})", rfc3339(t)),
                None => "the node OS window has no opening in the next year".to_string(),
            },
            until: next,
        });
    }
    if window.is_none()
        && kind != RolloutKind::ChannelSwitch
        && let Some(last) = last_started
        && let at = last.checked_add_signed(cadence).unwrap_or(DateTime::<Utc>::MAX_UTC)
        && now < at
    {
        return Err(Waiting {
            why: format!("weekly cadence: the next rollout may start {}", rfc3339(at)),
            until: Some(at),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::MaintenanceSchedule;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).expect("rfc3339").with_timezone(&Utc)
    }

    fn lease(node: &str, id: &str) -> HeldLease {
        HeldLease { node: node.into(), lease_id: id.into(), purpose: "reboot".into() }
    }

    fn weekly_monday_10_utc() -> MaintenanceSchedule {
        serde_json::from_str(r#"{"frequency":{"type":"Weekly","interval_weeks":1,"day_of_week":"Monday"},"start_time":"10:00","duration_hours":4}"#)
            .expect("schedule")
    }

    fn budget<'a>(held: &'a [HeldLease], window: Option<&'a MaintenanceSchedule>) -> MemberBudget<'a> {
        MemberBudget {
            member: "m1",
            node_count: 4,
            max_unavailable: Limit::Count(1),
            window,
            upgrading_run: None,
            held,
        }
    }

    #[test]
    fn sec4_lease_granted_within_budget_and_denied_naming_the_holder() {
        let now = at("2026-11-23T10:30:00Z");
        assert_eq!(decide_lease(&budget(&[], None), "n1", "reboot/a", false, now), LeaseDecision::Grant);
        let held = [lease("n1", "reboot/a")];
        assert_eq!(decide_lease(&budget(&held, None), "n1", "reboot/a", false, now), LeaseDecision::AlreadyHeld);
        match decide_lease(&budget(&held, None), "n2", "reboot/b", false, now) {
            LeaseDecision::Deny { cause, reason, .. } => {
                assert_eq!(cause, DenyCause::Budget);
                assert!(reason.contains("\"n1\""), "{reason}");
                assert!(reason.contains("max_unavailable 1"), "{reason}");
            }
            d => panic!("expected a denial, got {d:?}"),
        }
        // A percentage budget of 50% over 4 nodes allows two.
        let mut b = budget(&held, None);
        b.max_unavailable = Limit::Percent(50);
        assert_eq!(decide_lease(&b, "n2", "reboot/b", false, now), LeaseDecision::Grant);
        // Forcing skips the window, not the budget.
        assert!(matches!(decide_lease(&budget(&held, None), "n2", "x", true, now), LeaseDecision::Deny { .. }));
    }

    #[test]
    fn sec4_reboot_only_inside_the_window_unless_forced() {
        let w = weekly_monday_10_utc();
        let closed = at("2026-11-24T09:00:00Z");
        match decide_lease(&budget(&[], Some(&w)), "n1", "r", false, closed) {
            LeaseDecision::Deny { cause, reason, retry_after_seconds } => {
                assert_eq!(cause, DenyCause::WindowClosed);
                assert!(reason.contains("opens 2026-11-30T10:00:00Z"), "{reason}");
                assert_eq!(retry_after_seconds, MAX_RETRY_SECONDS);
            }
            d => panic!("expected a denial, got {d:?}"),
        }
        assert_eq!(decide_lease(&budget(&[], Some(&w)), "n1", "r", true, closed), LeaseDecision::Grant);
        assert_eq!(
            decide_lease(&budget(&[], Some(&w)), "n1", "r", false, at("2026-11-23T11:00:00Z")),
            LeaseDecision::Grant
        );
    }

    #[test]
    fn sec2_no_lease_while_a_run_upgrades_the_member_or_the_node_is_already_out() {
        let now = at("2026-11-23T10:30:00Z");
        let mut b = budget(&[], None);
        b.upgrading_run = Some("r1");
        assert!(
            matches!(decide_lease(&b, "n1", "r", true, now), LeaseDecision::Deny { reason, .. } if reason.contains("\"r1\""))
        );
        let held = [lease("n1", "auto/x/n1")];
        let mut b = budget(&held, None);
        b.max_unavailable = Limit::Count(3);
        assert!(
            matches!(decide_lease(&b, "n1", "reboot/a", false, now), LeaseDecision::Deny { reason, .. } if reason.contains("auto/x/n1"))
        );
    }

    fn node(name: &str, image: &str, patch: Option<&str>) -> NodeView {
        NodeView {
            name: name.into(),
            pool: "p1".into(),
            region: "west".into(),
            image: image.parse().ok(),
            security_patch: patch.map(|p| p.parse().expect("patch version")),
            os_family: "debian".into(),
            hardware_class: String::new(),
        }
    }

    fn catalog(now: DateTime<Utc>) -> ChannelCatalog {
        let mut c = ChannelCatalog::default();
        let mut west = BTreeMap::new();
        west.insert("west".to_string(), now - TimeDelta::hours(1));
        let mut later = BTreeMap::new();
        later.insert("west".to_string(), now + TimeDelta::hours(1));
        let versions = c.images.entry("Fam".into()).or_default();
        versions.insert("202401.01.0".parse().expect("v"), west.clone());
        versions.insert("202402.01.0".parse().expect("v"), west);
        versions.insert("202403.01.0".parse().expect("v"), later);
        c.patches
            .entry("Fam".into())
            .or_default()
            .insert("202402.10.0".parse().expect("v"), PatchRelease { packages: vec!["openssl=3.0.2".into()] });
        c
    }

    #[test]
    fn sec2_node_image_channel_targets_the_newest_image_available_in_the_region() {
        let now = at("2026-11-23T10:30:00Z");
        let nodes = [node("a", "Fam-202401.01.0", None), node("b", "Fam-202402.01.0", None), node("c", "", None)];
        let r = desired_rollout(NodeOsChannel::NodeImage, None, &nodes, &catalog(now), now).expect("rollout");
        assert_eq!(r.id, "node-image:Fam-202402.01.0");
        assert_eq!(r.tasks.len(), 1, "b is at the newest available, c has no image: {r:?}");
        assert!(
            matches!(&r.tasks["a"], NodeTask::Reimage { image, reinstall: false } if image.label() == "Fam-202402.01.0")
        );
        assert_eq!(desired_rollout(NodeOsChannel::None, None, &nodes, &catalog(now), now), None);
        assert_eq!(desired_rollout(NodeOsChannel::Unmanaged, None, &nodes, &catalog(now), now), None);
    }

    #[test]
    fn sec2_channel_switch_reimages_every_node_to_the_current_image() {
        let now = at("2026-11-23T10:30:00Z");
        let nodes = [node("a", "Fam-202401.01.0", None), node("b", "Fam-202402.01.0", None)];
        let r = desired_rollout(NodeOsChannel::None, Some(7), &nodes, &catalog(now), now).expect("rollout");
        assert_eq!(r.kind, RolloutKind::ChannelSwitch);
        assert_eq!(r.id, "channel-switch@7:Fam-202402.01.0");
        assert!(matches!(&r.tasks["b"], NodeTask::Reimage { reinstall: true, .. }));
        assert!(matches!(&r.tasks["a"], NodeTask::Reimage { reinstall: false, .. }));
    }

    #[test]
    fn sec2_security_patch_channel_targets_nodes_below_the_newest_patch_and_skips_refused_pools() {
        let now = at("2026-11-23T10:30:00Z");
        let mut gpu = node("g", "Fam-202401.01.0", None);
        gpu.os_family = "azurelinux".into();
        gpu.hardware_class = "gpu".into();
        let nodes = [node("a", "Fam-202401.01.0", None), node("b", "Fam-202401.01.0", Some("202402.10.0")), gpu];
        let r = desired_rollout(NodeOsChannel::SecurityPatch, None, &nodes, &catalog(now), now).expect("rollout");
        assert_eq!(r.id, "security-patch:Fam-202402.10.0");
        assert_eq!(r.tasks.keys().collect::<Vec<_>>(), ["a"]);
        assert!(matches!(&r.tasks["a"], NodeTask::Patch { packages, .. } if packages == &["openssl=3.0.2"]));
    }

    #[test]
    fn sec2_rollouts_start_inside_the_window_or_on_the_weekly_cadence() {
        let week = TimeDelta::days(7);
        let w = weekly_monday_10_utc();
        let open = at("2026-11-23T11:00:00Z");
        let closed = at("2026-11-23T15:00:00Z");
        assert_eq!(may_start(RolloutKind::NodeImage, Some(&w), None, week, open), Ok(()));
        let wait = may_start(RolloutKind::NodeImage, Some(&w), None, week, closed).expect_err("closed");
        assert_eq!(wait.until, Some(at("2026-11-30T10:00:00Z")));
        assert_eq!(may_start(RolloutKind::SecurityPatch, None, None, week, closed), Ok(()));
        let last = closed - TimeDelta::days(2);
        let wait = may_start(RolloutKind::SecurityPatch, None, Some(last), week, closed).expect_err("cadence");
        assert_eq!(wait.until, Some(last + week));
        assert_eq!(may_start(RolloutKind::ChannelSwitch, None, Some(last), week, closed), Ok(()));
    }
}
