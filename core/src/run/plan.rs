//! The planner: given the persisted [`RunState`], a view of the fleet and of the catalog, and `now`, decide what
//! changes and what the hub must do. The operator's operations (start, stop, skip) and the recording of a
//! member's result are planned the same way and return a [`Plan`] too. Nothing here performs anything.

use super::model::{MAX_WAIT_SECONDS, NodeImageSelection, UpgradeType};
use super::state::{
    Idx, LevelRef, MemberTarget, RunOpError, RunState, Status, Transition, apply_transition, transition_path,
};
use crate::concurrency::Limit;
use crate::schedule::{MaintenanceSchedule, SEARCH_HORIZON_DAYS, WindowState, priority, rfc3339};
use crate::version::{ImageVersion, KubernetesVersion, NodeImageVersion};
use crate::work::{Operation, WorkNode, WorkPlan, plan_work};
use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// What the planner needs to know about one node pool of a member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePoolView {
    /// Pool name, unique within the member.
    pub name: String,
    /// Image family of its nodes.
    pub family: String,
    /// The oldest image version any node of the pool reports; `None` when unknown (never counts as at target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_version: Option<ImageVersion>,
    /// Region of the pool's nodes when it differs from the member's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

/// What the planner needs to know about one member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    /// Where the member lives.
    pub region: String,
    /// Its Kubernetes version; `None` when unknown or not a Kubernetes cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes_version: Option<KubernetesVersion>,
    /// Its node pools.
    #[serde(default)]
    pub node_pools: Vec<NodePoolView>,
    /// Node OS maintenance schedule, honoured by `NodeImageOnly` runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_os_schedule: Option<MaintenanceSchedule>,
    /// Cluster (auto-upgrade) maintenance schedule, honoured by `Full` and `ControlPlaneOnly` runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_schedule: Option<MaintenanceSchedule>,
    /// Its nodes, from which a starting member's work list is planned ([`crate::work::plan_work`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<WorkNode>,
    /// Its disruption budget (`max_unavailable`).
    #[serde(default = "one_node")]
    pub max_unavailable: Limit,
}

fn one_node() -> Limit {
    Limit::Count(1)
}

impl MemberView {
    /// The region a pool's nodes are in.
    pub fn pool_region<'a>(&'a self, pool: &'a NodePoolView) -> &'a str {
        pool.region.as_deref().unwrap_or(&self.region)
    }

    /// Every region the member has nodes in (its own and its pools').
    pub fn regions(&self) -> BTreeSet<&str> {
        let mut r: BTreeSet<&str> = self.node_pools.iter().map(|p| self.pool_region(p)).collect();
        r.insert(&self.region);
        r
    }

    /// The window an update run of this type honours: node OS window for `NodeImageOnly`, cluster window else.
    pub fn window_for(&self, upgrade_type: UpgradeType) -> Option<&MaintenanceSchedule> {
        match upgrade_type {
            UpgradeType::NodeImageOnly => self.node_os_schedule.as_ref(),
            UpgradeType::Full | UpgradeType::ControlPlaneOnly => self.cluster_schedule.as_ref(),
        }
    }
}

/// The hub's view of the members, by name. Views are shared (`Arc`): the hub keeps them up to date as reports
/// arrive and hands the planner a snapshot without copying a member's nodes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Fleet {
    /// Members by name.
    pub members: BTreeMap<String, Arc<MemberView>>,
}

impl Fleet {
    /// Adds or replaces a member's view.
    pub fn insert(&mut self, name: impl Into<String>, view: MemberView) {
        self.members.insert(name.into(), Arc::new(view));
    }

    /// A member's view to change in place (copied first if a snapshot still shares it).
    pub fn member_mut(&mut self, name: &str) -> Option<&mut MemberView> {
        self.members.get_mut(name).map(Arc::make_mut)
    }
}

/// When each version becomes available in each region.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Catalog {
    /// family -> version -> region -> available from.
    #[serde(default)]
    pub images: BTreeMap<String, BTreeMap<ImageVersion, BTreeMap<String, DateTime<Utc>>>>,
    /// Kubernetes version -> region -> available from.
    #[serde(default)]
    pub kubernetes: BTreeMap<KubernetesVersion, BTreeMap<String, DateTime<Utc>>>,
}

impl Catalog {
    /// When an image version becomes available in a region (`None`: not announced there).
    pub fn image_available_at(&self, family: &str, version: ImageVersion, region: &str) -> Option<DateTime<Utc>> {
        self.images.get(family)?.get(&version)?.get(region).copied()
    }

    /// The newest version of a family available in a region at `now`.
    pub fn newest_image(&self, family: &str, region: &str, now: DateTime<Utc>) -> Option<ImageVersion> {
        let versions = self.images.get(family)?;
        versions.iter().rev().find(|(_, regions)| regions.get(region).is_some_and(|t| *t <= now)).map(|(v, _)| *v)
    }

    /// The next instant after `now` at which some version of a family becomes available in a region.
    pub fn next_image_arrival(&self, family: &str, region: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.images.get(family)?.values().filter_map(|r| r.get(region).copied()).filter(|t| *t > now).min()
    }

    /// When a Kubernetes version becomes available in a region (`None`: not announced there).
    pub fn kubernetes_available_at(&self, version: KubernetesVersion, region: &str) -> Option<DateTime<Utc>> {
        self.kubernetes.get(&version)?.get(region).copied()
    }

    /// `Consistent` selection: per family, the newest version available at `now` in **every** region listed for
    /// that family. Families with no such version, or with no region at all, are absent.
    pub fn consistent_selection(
        &self,
        regions_by_family: &BTreeMap<String, BTreeSet<String>>,
        now: DateTime<Utc>,
    ) -> BTreeMap<String, ImageVersion> {
        let mut out = BTreeMap::new();
        for (family, regions) in regions_by_family {
            // With no region to check, "available everywhere" would hold for any version, published or not.
            if regions.is_empty() {
                continue;
            }
            let Some(versions) = self.images.get(family) else { continue };
            let everywhere = versions
                .iter()
                .rev()
                .find(|(_, avail)| regions.iter().all(|r| avail.get(r).is_some_and(|t| *t <= now)));
            if let Some((v, _)) = everywhere {
                out.insert(family.clone(), *v);
            }
        }
        out
    }
}

/// Something the hub must do after persisting the plan's new state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action")]
pub enum Action {
    /// Begin upgrading a member to the target (pool by pool with its disruption settings), then report the
    /// result with [`member_finished`].
    StartMember {
        /// The member.
        member: String,
        /// What to upgrade it to.
        target: MemberTarget,
        /// Its nodes' work (order, batches, steps, first control plane), decided when it started.
        work: WorkPlan,
    },
}

/// The outcome of planning: record these transitions (with [`super::apply`]), then perform the actions, and call
/// [`plan`] again at `next_wakeup` (or earlier, whenever a result or an operator request arrives).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Plan {
    /// Level changes, in order. Each is an edge of the SPEC's table, or a message update (`from == to`).
    pub transitions: Vec<Transition>,
    /// What to do, after the new state is persisted.
    pub actions: Vec<Action>,
    /// When planning again may change something even if nothing is reported (a window opens, a version lands,
    /// a wait ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_wakeup: Option<DateTime<Utc>>,
    /// `Consistent` selection chosen by this plan (when the run starts), to be recorded in the state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_selection: Option<BTreeMap<String, ImageVersion>>,
}

impl Plan {
    /// Whether the plan changes nothing and asks for nothing.
    pub fn is_empty(&self) -> bool {
        self.transitions.is_empty() && self.actions.is_empty() && self.image_selection.is_none()
    }
}

/// What the operator asks to skip (SPEC §5 operations).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "target")]
pub enum SkipTarget {
    /// One member.
    Member {
        /// Member name.
        member: String,
    },
    /// A group and every member in it not yet done.
    Group {
        /// Stage name.
        stage: String,
        /// Group name.
        group: String,
    },
    /// A stage, its groups, and the wait after it.
    Stage {
        /// Stage name.
        stage: String,
    },
    /// Only the wait after a stage.
    AfterStageWait {
        /// Stage name.
        stage: String,
    },
}

impl SkipTarget {
    fn level(&self) -> LevelRef {
        match self {
            SkipTarget::Member { member } => LevelRef::Member { member: member.clone() },
            SkipTarget::Group { stage, group } => LevelRef::Group { stage: stage.clone(), group: group.clone() },
            SkipTarget::Stage { stage } => LevelRef::Stage { stage: stage.clone() },
            SkipTarget::AfterStageWait { stage } => LevelRef::AfterStageWait { stage: stage.clone() },
        }
    }
}

/// Plans the next step of a run: starts the members that can start, marks the ones that cannot Pending (saying
/// why) or Skipped, rolls states up, and runs the waits between stages. A run that is not Running or Pending
/// only has its Stopping levels settled. Same inputs, same plan; planning again right after applying a plan
/// with the same inputs yields an empty plan.
pub fn plan(state: &RunState, fleet: &Fleet, catalog: &Catalog, now: DateTime<Utc>) -> Plan {
    plan_and_apply(state, fleet, catalog, now).0
}

/// [`plan`] together with the state it leads to: what [`super::apply`] returns for that plan, without copying a
/// large run's state a second time.
pub fn plan_and_apply(state: &RunState, fleet: &Fleet, catalog: &Catalog, now: DateTime<Utc>) -> (Plan, RunState) {
    let mut p = Planner::new(state, fleet, catalog, now);
    p.settle();
    (p.plan, p.st)
}

/// Starts a run that has not started, or starts again a Stopped or Failed run: it resumes with the members it
/// has not processed and retries the failed ones (SPEC §5). Refused while the run is active or finished, and
/// while members of a stopped run are still being upgraded.
pub fn start(state: &RunState, fleet: &Fleet, catalog: &Catalog, now: DateTime<Utc>) -> Result<Plan, RunOpError> {
    let mut p = Planner::new(state, fleet, catalog, now);
    match state.run.status {
        Status::NotStarted => {}
        Status::Stopped | Status::Failed => {
            let running = state.running_members();
            if !running.is_empty() {
                return Err(RunOpError::Refused(format!(
                    "run is {} but members are still being upgraded ({}); start it again when they have finished",
                    state.run.status,
                    running.join(", ")
                )));
            }
            p.reset_for_restart();
        }
        s @ (Status::Running | Status::Pending | Status::Stopping) => {
            return Err(RunOpError::Refused(format!("run is already {s}; nothing to start")));
        }
        s @ (Status::Completed | Status::Skipped) => {
            return Err(RunOpError::Refused(format!("run is {s}; it cannot start again, create a new run")));
        }
    }
    p.starting = true;
    p.settle();
    Ok(p.plan)
}

/// Stops a run: nothing new starts; upgrades already started are not aborted, so the run (and the stages and
/// groups with members still upgrading) is Stopping until they finish, then Stopped (SPEC §5).
pub fn stop(state: &RunState, now: DateTime<Utc>) -> Result<Plan, RunOpError> {
    match state.run.status {
        Status::Running | Status::Pending => {}
        Status::NotStarted => {
            return Err(RunOpError::Refused("run has not started; nothing to stop (delete it instead)".to_string()));
        }
        Status::Stopping => {
            return Err(RunOpError::Refused(format!(
                "run is already Stopping; it becomes Stopped when {} finish",
                state.running_members().join(", ")
            )));
        }
        s => return Err(RunOpError::Refused(format!("run is {s}; nothing to stop"))),
    }
    let fleet = Fleet::default();
    let catalog = Catalog::default();
    let mut p = Planner::new(state, &fleet, &catalog, now);
    p.halt("stopped by operator");
    p.settle();
    Ok(p.plan)
}

/// Skips a member, a group, a stage (and its wait) or only the wait after a stage. Levels already being
/// upgraded, or already Completed or Skipped, cannot be skipped; the error says which.
pub fn skip(
    state: &RunState,
    target: &SkipTarget,
    fleet: &Fleet,
    catalog: &Catalog,
    now: DateTime<Utc>,
) -> Result<Plan, RunOpError> {
    let lref = target.level();
    if let SkipTarget::AfterStageWait { stage } = target
        && state.stages.iter().any(|s| &s.name == stage && s.wait.is_none())
    {
        return Err(RunOpError::Refused(format!("stage {stage:?} has no wait after it; nothing to skip")));
    }
    let idx = state.find(&lref).ok_or_else(|| RunOpError::UnknownLevel(lref.clone()))?;
    if matches!(state.run.status, Status::Completed | Status::Skipped) {
        return Err(RunOpError::Refused(format!("run is {}; nothing left to skip", state.run.status)));
    }
    let mut p = Planner::new(state, fleet, catalog, now);
    match idx {
        Idx::Member(..) => p.skip_member(idx, "skipped by operator")?,
        Idx::Group(si, gi) => {
            p.skip_group(si, gi, &format!("group {:?} skipped by operator", state.stages[si].groups[gi].name))?
        }
        Idx::Stage(si) => p.skip_stage(si)?,
        Idx::Wait(si) => p.skip_wait(si, "skipped by operator")?,
        Idx::Run => return Err(RunOpError::Refused("a run cannot be skipped; stop or delete it".to_string())),
    }
    p.settle();
    Ok(p.plan)
}

/// Records the result of a member's upgrade. `Err(reason)` fails the member and, with a summary of the error, its
/// group, stage and run; nothing further is started, and members still upgrading finish and are recorded
/// (SPEC §5 Failed). On success the run continues (the returned plan may start the next members).
pub fn member_finished(
    state: &RunState,
    member: &str,
    outcome: Result<(), String>,
    fleet: &Fleet,
    catalog: &Catalog,
    now: DateTime<Utc>,
) -> Result<Plan, RunOpError> {
    member_finished_and_apply(state, member, outcome, fleet, catalog, now).map(|(plan, _)| plan)
}

/// [`member_finished`] together with the state it leads to: what [`super::apply`] returns for that plan, without
/// copying a large run's state a second time.
pub fn member_finished_and_apply(
    state: &RunState,
    member: &str,
    outcome: Result<(), String>,
    fleet: &Fleet,
    catalog: &Catalog,
    now: DateTime<Utc>,
) -> Result<(Plan, RunState), RunOpError> {
    let (plan, next, mut refused) =
        members_finished_and_apply(state, &[(member.to_string(), outcome)], fleet, catalog, now);
    refused.pop().unwrap_or(Ok(()))?;
    Ok((plan, next))
}

/// Records the results of several members that finished together, then plans the rest of the run once (what
/// [`member_finished`] for each in turn would record, with one planning pass instead of one per result). Each
/// result's own refusal (unknown member, member not being upgraded) is returned in its place and changes nothing;
/// the others are recorded.
pub fn members_finished_and_apply(
    state: &RunState,
    results: &[(String, Result<(), String>)],
    fleet: &Fleet,
    catalog: &Catalog,
    now: DateTime<Utc>,
) -> (Plan, RunState, Vec<Result<(), RunOpError>>) {
    let mut p = Planner::new(state, fleet, catalog, now);
    let mut refused = Vec::with_capacity(results.len());
    for (member, outcome) in results {
        let lref = LevelRef::Member { member: member.clone() };
        let Some(idx) = p.st.find(&lref) else {
            refused.push(Err(RunOpError::UnknownLevel(lref)));
            continue;
        };
        let status = p.st.level_at(idx).status;
        if status != Status::Running {
            refused.push(Err(RunOpError::Refused(format!(
                "member {member:?} is {status}, not being upgraded; its result is not recorded"
            ))));
            continue;
        }
        match outcome {
            Ok(()) => {
                let target = p.st.member(member).and_then(|m| m.target.clone()).unwrap_or_default();
                p.set(idx, Status::Completed, format!("upgraded: {target}"), None);
            }
            Err(reason) => p.fail_member(idx, reason),
        }
        refused.push(Ok(()));
    }
    p.settle();
    (p.plan, p.st, refused)
}

/// The last resort when recording a member's result failed unexpectedly: the member fails with `reason`, and its
/// group, stage and run as for any failed member (SPEC §5 Failed), without the rest of planning (which is what
/// failed), so it never stays Running with nothing upgrading it.
pub fn fail_member_only(state: &RunState, member: &str, reason: &str, now: DateTime<Utc>) -> Result<Plan, RunOpError> {
    let lref = LevelRef::Member { member: member.to_string() };
    let idx = state.find(&lref).ok_or_else(|| RunOpError::UnknownLevel(lref.clone()))?;
    let status = state.level_at(idx).status;
    if status != Status::Running {
        return Err(RunOpError::Refused(format!("member {member:?} is {status}, not being upgraded")));
    }
    let (fleet, catalog) = (Fleet::default(), Catalog::default());
    let mut p = Planner::new(state, &fleet, &catalog, now);
    p.fail_member(idx, reason);
    Ok(p.plan)
}

/// A member's predicted start, from [`preview`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PredictedStart {
    /// Member name.
    pub member: String,
    /// When it is predicted to start.
    pub at: DateTime<Utc>,
}

/// Predicts the order and start time of every member (SPEC §8 plan preview) by simulating the planner with each
/// upgrade assumed to take `assumed_member_duration` and to succeed. Members that would be skipped, or that could
/// not start within the simulation horizon (the schedule search horizon), are absent. A run that has not started
/// is simulated as if started at `now`.
pub fn preview(
    state: &RunState,
    fleet: &Fleet,
    catalog: &Catalog,
    now: DateTime<Utc>,
    assumed_member_duration: TimeDelta,
) -> Vec<PredictedStart> {
    let duration = assumed_member_duration.max(TimeDelta::seconds(1));
    let horizon = later(now, TimeDelta::days(SEARCH_HORIZON_DAYS as i64));
    let mut out = Vec::new();
    let mut st = state.clone();
    let mut t = now;
    let mut finishing: BTreeMap<String, DateTime<Utc>> =
        st.running_members().into_iter().map(|m| (m, later(now, duration))).collect();
    let mut record = |p: &Plan, t: DateTime<Utc>, finishing: &mut BTreeMap<String, DateTime<Utc>>| {
        for a in &p.actions {
            let Action::StartMember { member, .. } = a;
            out.push(PredictedStart { member: member.clone(), at: t });
            finishing.insert(member.clone(), later(t, duration));
        }
    };
    let first = match st.run.status {
        Status::NotStarted => start(&st, fleet, catalog, t),
        _ => Ok(plan(&st, fleet, catalog, t)),
    };
    let Ok(mut p) = first else { return out };
    // Every turn either finishes a member or moves the clock forward; the bound is only a safety net.
    for _ in 0..100_000 {
        let Ok(next) = super::apply(&st, &p) else { break };
        st = next;
        record(&p, t, &mut finishing);
        if st.run.status.is_settled() && finishing.is_empty() {
            break;
        }
        let next_t = match (finishing.values().min().copied(), p.next_wakeup) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) => a,
            (None, Some(b)) => b,
            (None, None) => break,
        };
        if next_t > horizon {
            break;
        }
        t = next_t.max(t);
        let due: Vec<String> = finishing.iter().filter(|(_, f)| **f <= t).map(|(m, _)| m.clone()).collect();
        for m in due {
            finishing.remove(&m);
            let Ok(fp) = member_finished(&st, &m, Ok(()), fleet, catalog, t) else { continue };
            let Ok(next) = super::apply(&st, &fp) else { continue };
            st = next;
            record(&fp, t, &mut finishing);
        }
        p = plan(&st, fleet, catalog, t);
    }
    out
}

/// When a wait of `secs` seconds that began at `start` ends, and a note for the message when the stored length
/// was out of bounds. Never panics: a length from a damaged or older state is held to [`MAX_WAIT_SECONDS`]
/// (negative to 0), and an end past the calendar is the calendar's end.
fn wait_end(start: DateTime<Utc>, secs: i64) -> (DateTime<Utc>, String) {
    let held = secs.clamp(0, MAX_WAIT_SECONDS);
    let note = if held == secs {
        String::new()
    } else {
        format!(" (the stored wait of {secs}s is outside 0..={MAX_WAIT_SECONDS}; {held}s is used)")
    };
    let end =
        TimeDelta::try_seconds(held).and_then(|d| start.checked_add_signed(d)).unwrap_or(DateTime::<Utc>::MAX_UTC);
    (end, note)
}

/// `t + d`, or the calendar's end when that is past it.
fn later(t: DateTime<Utc>, d: TimeDelta) -> DateTime<Utc> {
    t.checked_add_signed(d).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// How a candidate member is dealt with right now.
enum Decision {
    /// Start it with this target.
    Start(MemberTarget),
    /// Skip it (system skip), with the reason.
    Skip(String),
    /// It cannot start now: the reasons, and when that may change.
    Wait(String, Option<DateTime<Utc>>),
}

/// A working copy of the state plus the plan being built. Every change goes through [`Planner::set`] (or
/// [`Planner::start_member`]), which records it in the plan and applies it to the working copy with the same
/// function [`super::apply`] uses, so applying the plan to the original state gives the working copy.
struct Planner<'a> {
    st: RunState,
    fleet: &'a Fleet,
    catalog: &'a Catalog,
    now: DateTime<Utc>,
    plan: Plan,
    /// The run is being started by this call (it counts as active although its status is not yet).
    starting: bool,
}

fn preview_list(items: &[String]) -> String {
    const SHOWN: usize = 3;
    if items.len() <= SHOWN {
        items.join(", ")
    } else {
        format!("{}, and {} more", items[..SHOWN].join(", "), items.len() - SHOWN)
    }
}

impl<'a> Planner<'a> {
    fn new(state: &RunState, fleet: &'a Fleet, catalog: &'a Catalog, now: DateTime<Utc>) -> Self {
        Planner { st: state.clone(), fleet, catalog, now, plan: Plan::default(), starting: false }
    }

    fn status(&self, i: Idx) -> Status {
        self.st.level_at(i).status
    }

    fn wake(&mut self, t: DateTime<Utc>) {
        if t > self.now {
            self.plan.next_wakeup = Some(self.plan.next_wakeup.map_or(t, |w| w.min(t)));
        }
    }

    /// Moves a level to `to` with a message, through one intermediate status when the SPEC's table has no direct
    /// edge (see [`transition_path`]); a same-status call only refreshes the message.
    fn set(&mut self, i: Idx, to: Status, message: impl Into<String>, error: Option<String>) {
        let message = message.into();
        let cur = self.st.level_at(i).clone();
        let level = self.st.reference(i);
        let steps = if cur.status == to {
            if cur.message == message && cur.error == error {
                return;
            }
            vec![to]
        } else {
            match transition_path(cur.status, to) {
                Some(p) => p,
                None => {
                    debug_assert!(false, "no legal path for {level}: {} -> {to}", cur.status);
                    return;
                }
            }
        };
        let mut from = cur.status;
        for s in steps {
            let t = Transition {
                level: level.clone(),
                from,
                to: s,
                at: self.now,
                message: message.clone(),
                error: if s == to { error.clone() } else { None },
            };
            let applied = apply_transition(&mut self.st, &t);
            debug_assert!(applied.is_ok(), "planner made an unappliable transition: {applied:?}");
            if applied.is_err() {
                return;
            }
            self.plan.transitions.push(t);
            from = s;
        }
    }

    fn active(&self) -> bool {
        self.starting || matches!(self.st.run.status, Status::Running | Status::Pending)
    }

    fn settle(&mut self) {
        if self.active() {
            self.ensure_selection();
            self.advance();
            self.rollup_run();
        } else {
            self.finalize_stopping();
        }
    }

    fn member_idxs(&self) -> Vec<Idx> {
        let mut v = Vec::new();
        for (si, s) in self.st.stages.iter().enumerate() {
            for (gi, g) in s.groups.iter().enumerate() {
                v.extend((0..g.members.len()).map(|mi| Idx::Member(si, gi, mi)));
            }
        }
        v
    }

    fn group_idxs(&self) -> Vec<(usize, usize)> {
        self.st.stages.iter().enumerate().flat_map(|(si, s)| (0..s.groups.len()).map(move |gi| (si, gi))).collect()
    }

    fn running_in_group(&self, si: usize, gi: usize) -> Vec<String> {
        self.st.stages[si].groups[gi]
            .members
            .iter()
            .filter(|m| m.level.status == Status::Running)
            .map(|m| m.name.clone())
            .collect()
    }

    fn running_in_stage(&self, si: usize) -> Vec<String> {
        (0..self.st.stages[si].groups.len()).flat_map(|gi| self.running_in_group(si, gi)).collect()
    }

    // ----- Consistent selection -------------------------------------------------------------------------------

    /// `Consistent`: when the run starts, choose per family the newest version available in every region of the
    /// run where that family is used, and record it (SPEC §5). A restarted run keeps its first selection.
    ///
    /// The regions are counted per family, from the node pools of that family only (a pool's own region when it
    /// has one, else its member's). A member in a region where family F never runs says nothing about F: taking
    /// every member's regions for every family would make F's selection wait for a release F never gets there,
    /// and every pool of F would be skipped.
    fn ensure_selection(&mut self) {
        if self.st.image_selection.is_some()
            || !matches!(self.st.spec.node_image_selection, NodeImageSelection::Consistent)
            || !self.st.spec.upgrade_type.changes_node_images()
        {
            return;
        }
        let mut regions_by_family: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for m in self.st.members() {
            if let Some(v) = self.fleet.members.get(&m.name) {
                for pool in &v.node_pools {
                    regions_by_family.entry(pool.family.clone()).or_default().insert(v.pool_region(pool).to_string());
                }
            }
        }
        let sel = self.catalog.consistent_selection(&regions_by_family, self.now);
        self.st.image_selection = Some(sel.clone());
        self.plan.image_selection = Some(sel);
    }

    // ----- moving through the stages -------------------------------------------------------------------------

    /// Works on the current stage (the first one not done) and moves past stages that are done and their waits.
    fn advance(&mut self) {
        let mut si = 0;
        while si < self.st.stages.len() {
            if self.status(Idx::Stage(si)).is_settled() {
                if !self.handle_wait(si) {
                    return;
                }
                si += 1;
                continue;
            }
            self.schedule_stage(si);
            for gi in 0..self.st.stages[si].groups.len() {
                self.rollup_group(si, gi);
            }
            self.rollup_stage(si);
            if !self.status(Idx::Stage(si)).is_settled() {
                return;
            }
        }
    }

    /// The wait after a settled stage. Returns whether it is done (or absent), so the next stage may start.
    fn handle_wait(&mut self, si: usize) -> bool {
        let stage_status = self.status(Idx::Stage(si));
        let Some(wait) = self.st.stages[si].wait.clone() else { return stage_status.is_final() };
        let secs = self.st.stages[si].wait_seconds;
        let name = self.st.stages[si].name.clone();
        match stage_status {
            Status::Skipped => {
                if !wait.status.is_final() {
                    self.set(Idx::Wait(si), Status::Skipped, format!("stage {name:?} was skipped"), None);
                }
                true
            }
            Status::Completed => match wait.status {
                Status::Completed | Status::Skipped => true,
                Status::Running => {
                    let (end, capped) = wait_end(wait.started_at.unwrap_or(self.now), secs);
                    if self.now >= end {
                        self.set(
                            Idx::Wait(si),
                            Status::Completed,
                            format!("waited {}s after stage {name:?}{capped}", secs.clamp(0, MAX_WAIT_SECONDS)),
                            None,
                        );
                        true
                    } else {
                        self.wake(end);
                        false
                    }
                }
                Status::Stopping => false,
                Status::NotStarted | Status::Pending | Status::Stopped | Status::Failed => {
                    let (end, capped) = wait_end(self.now, secs);
                    self.set(
                        Idx::Wait(si),
                        Status::Running,
                        format!(
                            "waiting {}s after stage {name:?}; the next stage starts at {}{capped}",
                            secs.clamp(0, MAX_WAIT_SECONDS),
                            rfc3339(end)
                        ),
                        None,
                    );
                    self.wake(end);
                    false
                }
            },
            // Failed or Stopped stages are reset when the run starts again; nothing moves past them.
            _ => false,
        }
    }

    /// Starts what can start in a stage: groups in parallel (round robin, one start per group per turn, groups with
    /// fewer members upgrading first), members
    /// of a group by window priority then declared order, within the group's and the stage's concurrency.
    fn schedule_stage(&mut self, si: usize) {
        let stage = &self.st.stages[si];
        let stage_cap = stage.max_concurrency.map_or(u32::MAX, |l| l.resolve(count_u32(stage.member_count())));
        let mut stage_running = count_u32(self.running_in_stage(si).len());
        let mut caps = Vec::new();
        let mut running = Vec::new();
        for (gi, g) in stage.groups.iter().enumerate() {
            caps.push(g.max_concurrency.map_or(1, |l| l.resolve(count_u32(g.members.len()))));
            running.push(count_u32(self.running_in_group(si, gi).len()));
        }
        // A group's candidates, best last, ordered when the group first has room: most passes come after one
        // member finished, and every other group is still at its cap.
        let mut queues: Vec<Option<Vec<usize>>> = vec![None; stage.groups.len()];
        loop {
            let mut progressed = false;
            // Each turn, groups with fewer members upgrading go first, so a stage cap is shared fairly.
            let mut turn: Vec<usize> = (0..queues.len()).collect();
            turn.sort_by_key(|gi| (running[*gi], *gi));
            for gi in turn {
                if stage_running >= stage_cap {
                    return;
                }
                if running[gi] >= caps[gi] {
                    continue;
                }
                let queue = queues[gi].get_or_insert_with(|| self.candidates(si, gi));
                while let Some(mi) = queue.pop() {
                    let idx = Idx::Member(si, gi, mi);
                    match self.evaluate(&self.st.stages[si].groups[gi].members[mi].name) {
                        Decision::Start(target) => {
                            self.start_member(idx, target);
                            running[gi] += 1;
                            stage_running += 1;
                            progressed = true;
                            break;
                        }
                        Decision::Skip(why) => self.set(idx, Status::Skipped, why, None),
                        Decision::Wait(why, when) => {
                            self.set(idx, Status::Pending, why, None);
                            if let Some(t) = when {
                                self.wake(t);
                            }
                        }
                    }
                }
            }
            if !progressed {
                return;
            }
        }
    }

    /// The members of group `gi` of stage `si` that may start, by window priority then declared order, best last.
    fn candidates(&self, si: usize, gi: usize) -> Vec<usize> {
        let g = &self.st.stages[si].groups[gi];
        if g.level.status.is_final() {
            return Vec::new();
        }
        let ut = self.st.spec.upgrade_type;
        let mut cands: Vec<(crate::schedule::WindowPriority, usize)> = g
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| matches!(m.level.status, Status::NotStarted | Status::Pending))
            .map(|(mi, m)| {
                let window = self.fleet.members.get(&m.name).and_then(|v| v.window_for(ut));
                (priority(window, self.now), mi)
            })
            .collect();
        cands.sort();
        cands.into_iter().map(|(_, mi)| mi).rev().collect()
    }

    fn start_member(&mut self, idx: Idx, target: MemberTarget) {
        let Idx::Member(si, gi, mi) = idx else { return };
        self.set(idx, Status::Running, format!("upgrading: {target}"), None);
        let work = match self.fleet.members.get(&self.st.stages[si].groups[gi].members[mi].name) {
            Some(mv) => plan_work(
                &Operation::RunUpgrade {
                    upgrade_type: self.st.spec.upgrade_type,
                    kubernetes: target.kubernetes_version,
                    images: target.images.clone(),
                },
                &mv.nodes,
                mv.max_unavailable,
            ),
            None => WorkPlan::default(),
        };
        let m = Arc::make_mut(&mut self.st.stages[si].groups[gi].members[mi]);
        m.target = Some(target.clone());
        m.attempts += 1;
        self.plan.actions.push(super::Action::StartMember { member: m.name.clone(), target, work });
    }

    /// Decides what to do with a member whose turn has come: system skip, Pending (with every reason), or start.
    fn evaluate(&self, name: &str) -> Decision {
        let Some(mv) = self.fleet.members.get(name) else {
            return Decision::Skip(format!("member {name:?} is no longer in the inventory"));
        };
        let spec = &self.st.spec;
        let ut = spec.upgrade_type;
        let now = self.now;
        let mut target = MemberTarget::default();
        let mut reasons: Vec<String> = Vec::new();
        let mut wake: Option<DateTime<Utc>> = None;
        let mut wake_at = |t: DateTime<Utc>| {
            if t > now {
                wake = Some(wake.map_or(t, |w: DateTime<Utc>| w.min(t)));
            }
        };

        let k8s_target = if ut.needs_kubernetes_version() { spec.kubernetes_version } else { None };
        target.kubernetes_version = k8s_target;
        let k8s_done = match k8s_target {
            Some(t) => mv.kubernetes_version.is_some_and(|c| c >= t),
            None => true,
        };
        if ut == UpgradeType::ControlPlaneOnly && k8s_done {
            return Decision::Skip(format!(
                "already at Kubernetes {} (target {})",
                mv.kubernetes_version.map(|v| v.to_string()).unwrap_or_default(),
                k8s_target.map(|v| v.to_string()).unwrap_or_default()
            ));
        }

        if ut.changes_node_images() {
            let pins = spec.node_image_selection.pins();
            for pool in &mv.node_pools {
                let region = mv.pool_region(pool);
                // (version, whether the pool must be at exactly this version)
                let want = match &spec.node_image_selection {
                    NodeImageSelection::Latest => match self.catalog.newest_image(&pool.family, region, now) {
                        Some(v) => Some((v, false)),
                        None => {
                            reasons.push(format!(
                                "no node image of family {} is available in region {region} yet (node pool {})",
                                pool.family, pool.name
                            ));
                            if let Some(t) = self.catalog.next_image_arrival(&pool.family, region, now) {
                                wake_at(t);
                            }
                            continue;
                        }
                    },
                    NodeImageSelection::Consistent => {
                        match self.st.image_selection.as_ref().and_then(|s| s.get(&pool.family)) {
                            Some(v) => Some((*v, false)),
                            None => {
                                return Decision::Skip(format!(
                                    "Consistent selection found no version of family {} available in every region \
                                     where the run's node pools of that family were when it started; node pool {} \
                                     has no target image",
                                    pool.family, pool.name
                                ));
                            }
                        }
                    }
                    NodeImageSelection::Custom { .. } => pins.get(&pool.family).map(|v| (*v, true)),
                };
                let Some((version, exact)) = want else { continue };
                let at_target = pool.image_version.is_some_and(|c| if exact { c == version } else { c >= version });
                if at_target {
                    continue;
                }
                let image = NodeImageVersion { family: pool.family.clone(), version };
                match self.catalog.image_available_at(&pool.family, version, region) {
                    Some(t) if t <= now => {}
                    Some(t) => {
                        reasons.push(format!(
                            "target node image {image} is not yet available in region {region} (available from {})",
                            rfc3339(t)
                        ));
                        wake_at(t);
                    }
                    None => reasons.push(format!(
                        "target node image {image} is not yet available in region {region} (not in the catalog)"
                    )),
                }
                target.images.insert(pool.name.clone(), image);
            }
            if reasons.is_empty() && target.images.is_empty() && k8s_done {
                return Decision::Skip(match k8s_target {
                    Some(t) => format!("already at Kubernetes {t} and every node pool is at its target image"),
                    None => "every node pool is already at its target image".to_string(),
                });
            }
        }

        if let (Some(t), false) = (k8s_target, k8s_done) {
            for region in mv.regions() {
                match self.catalog.kubernetes_available_at(t, region) {
                    Some(at) if at <= now => {}
                    Some(at) => {
                        reasons.push(format!(
                            "target Kubernetes version {t} is not yet available in region {region} (available from {})",
                            rfc3339(at)
                        ));
                        wake_at(at);
                    }
                    None => reasons.push(format!(
                        "target Kubernetes version {t} is not yet available in region {region} (not in the catalog)"
                    )),
                }
            }
        }

        if let Some(schedule) = mv.window_for(ut) {
            match schedule.window_at(now) {
                WindowState::Open { .. } => {}
                WindowState::Closed { next_opening: Some(t) } => {
                    reasons.push(format!("maintenance window not open; next opening {}", rfc3339(t)));
                    wake_at(t);
                }
                WindowState::Closed { next_opening: None } => reasons
                    .push(format!("maintenance window not open; no opening in the next {SEARCH_HORIZON_DAYS} days")),
            }
        }

        if reasons.is_empty() { Decision::Start(target) } else { Decision::Wait(reasons.join("; "), wake) }
    }

    // ----- rolling states up ---------------------------------------------------------------------------------

    fn rollup_group(&mut self, si: usize, gi: usize) {
        let g = &self.st.stages[si].groups[gi];
        if g.level.status.is_settled() {
            return;
        }
        let statuses: Vec<Status> = g.members.iter().map(|m| m.level.status).collect();
        let running = self.running_in_group(si, gi);
        let idx = Idx::Group(si, gi);
        if !running.is_empty() {
            let msg = format!("upgrading {}", preview_list(&running));
            self.set(idx, Status::Running, msg, None);
        } else if statuses.iter().all(|s| s.is_settled()) {
            self.settle_level(idx, &statuses, "member");
        } else if g.level.status == Status::NotStarted && statuses.iter().all(|s| *s == Status::NotStarted) {
            // Not reached yet (the stage's concurrency is taken by other groups).
        } else {
            let pending: Vec<String> = g
                .members
                .iter()
                .filter(|m| m.level.status == Status::Pending)
                .map(|m| format!("{} ({})", m.name, m.level.message))
                .collect();
            let msg = if pending.is_empty() {
                format!("waiting for a free slot of stage {:?} (stage max_concurrency)", self.st.stages[si].name)
            } else {
                format!("{} member(s) pending: {}", pending.len(), preview_list(&pending))
            };
            self.set(idx, Status::Pending, msg, None);
        }
    }

    fn rollup_stage(&mut self, si: usize) {
        let s = &self.st.stages[si];
        if s.level.status.is_settled() {
            return;
        }
        let statuses: Vec<Status> = s.groups.iter().map(|g| g.level.status).collect();
        let idx = Idx::Stage(si);
        if statuses.contains(&Status::Running) {
            let msg = format!("upgrading {}", preview_list(&self.running_in_stage(si)));
            self.set(idx, Status::Running, msg, None);
        } else if statuses.iter().all(|s| s.is_settled()) {
            self.settle_level(idx, &statuses, "group");
        } else if s.level.status == Status::NotStarted && statuses.iter().all(|s| *s == Status::NotStarted) {
        } else {
            let pending: Vec<String> = s
                .groups
                .iter()
                .filter(|g| g.level.status == Status::Pending)
                .map(|g| format!("{}: {}", g.name, g.level.message))
                .collect();
            self.set(idx, Status::Pending, format!("pending: {}", preview_list(&pending)), None);
        }
    }

    /// Settles a level whose children are all settled (SPEC §5: Completed when every child is Completed or
    /// Skipped; Skipped when all are Skipped; Failed when one failed).
    fn settle_level(&mut self, idx: Idx, children: &[Status], kind: &str) {
        let n = |s: Status| children.iter().filter(|c| **c == s).count();
        if n(Status::Failed) > 0 {
            self.set(idx, Status::Failed, format!("{} {kind}(s) failed", n(Status::Failed)), None);
        } else if n(Status::Stopped) > 0 {
            self.set(idx, Status::Stopped, format!("{} {kind}(s) stopped", n(Status::Stopped)), None);
        } else if n(Status::Skipped) == children.len() {
            self.set(idx, Status::Skipped, format!("all {} {kind}(s) skipped", children.len()), None);
        } else {
            self.set(
                idx,
                Status::Completed,
                format!("{} {kind}(s) completed, {} skipped", n(Status::Completed), n(Status::Skipped)),
                None,
            );
        }
    }

    fn rollup_run(&mut self) {
        let current = (0..self.st.stages.len()).find(|si| {
            let s = &self.st.stages[*si];
            !(s.level.status.is_final() && s.wait.as_ref().is_none_or(|w| w.status.is_final()))
        });
        let Some(si) = current else {
            let statuses: Vec<Status> = self.st.stages.iter().map(|s| s.level.status).collect();
            self.settle_level(Idx::Run, &statuses, "stage");
            return;
        };
        let s = &self.st.stages[si];
        let name = s.name.clone();
        if let Some(w) = s.wait.as_ref().filter(|w| w.status == Status::Running) {
            let msg = w.message.clone();
            self.set(Idx::Run, Status::Running, msg, None);
            return;
        }
        let (status, msg) = (s.level.status, s.level.message.clone());
        match status {
            Status::Running => self.set(Idx::Run, Status::Running, format!("stage {name:?}: {msg}"), None),
            _ => self.set(Idx::Run, Status::Pending, format!("stage {name:?}: {msg}"), None),
        }
    }

    /// Stopping levels whose members have all finished become Stopped.
    fn finalize_stopping(&mut self) {
        for (si, gi) in self.group_idxs() {
            if self.status(Idx::Group(si, gi)) == Status::Stopping && self.running_in_group(si, gi).is_empty() {
                let msg = self.st.stages[si].groups[gi].level.message.clone();
                self.set(Idx::Group(si, gi), Status::Stopped, stopped_message(&msg), None);
            }
        }
        for si in 0..self.st.stages.len() {
            if self.status(Idx::Stage(si)) == Status::Stopping && self.running_in_stage(si).is_empty() {
                let msg = self.st.stages[si].level.message.clone();
                self.set(Idx::Stage(si), Status::Stopped, stopped_message(&msg), None);
            }
        }
        if self.st.run.status == Status::Stopping && self.st.running_members().is_empty() {
            let msg = self.st.run.message.clone();
            self.set(Idx::Run, Status::Stopped, stopped_message(&msg), None);
        }
    }

    // ----- stop, failure, restart ----------------------------------------------------------------------------

    /// Nothing new starts: Pending members and running waits stop; levels with members still upgrading become
    /// Stopping, the others Stopped. Failed levels keep their status.
    fn halt(&mut self, why: &str) {
        for idx in self.member_idxs() {
            if self.status(idx) == Status::Pending {
                self.set(idx, Status::Stopped, format!("{why} before this member started"), None);
            }
        }
        for si in 0..self.st.stages.len() {
            if self.st.stages[si].wait.as_ref().is_some_and(|w| matches!(w.status, Status::Running | Status::Pending)) {
                self.set(Idx::Wait(si), Status::Stopped, why.to_string(), None);
            }
        }
        for (si, gi) in self.group_idxs() {
            let running = self.running_in_group(si, gi);
            self.halt_level(Idx::Group(si, gi), &running, why);
        }
        for si in 0..self.st.stages.len() {
            let running = self.running_in_stage(si);
            self.halt_level(Idx::Stage(si), &running, why);
        }
        let running = self.st.running_members();
        self.halt_level(Idx::Run, &running, why);
    }

    fn halt_level(&mut self, idx: Idx, running: &[String], why: &str) {
        if !matches!(self.status(idx), Status::Running | Status::Pending) {
            return;
        }
        if running.is_empty() {
            self.set(idx, Status::Stopped, why.to_string(), None);
        } else {
            let msg = format!(
                "{why}; stopping: waiting for {} to finish (upgrades already started are not aborted)",
                preview_list(running)
            );
            self.set(idx, Status::Stopping, msg, None);
        }
    }

    /// A member failed: it, its group, its stage and the run are Failed with a summary; nothing further starts.
    fn fail_member(&mut self, idx: Idx, reason: &str) {
        let Idx::Member(si, gi, _) = idx else { return };
        let name = self.st.reference(idx);
        self.set(idx, Status::Failed, "upgrade failed", Some(reason.to_string()));
        let summary = format!("{name} failed: {reason}");
        for up in [Idx::Group(si, gi), Idx::Stage(si), Idx::Run] {
            let cur = self.st.level_at(up).clone();
            let error = match (cur.status, cur.error) {
                (Status::Failed, Some(prev)) if !prev.contains(&summary) => format!("{prev}; {summary}"),
                (Status::Failed, Some(prev)) => prev,
                _ => summary.clone(),
            };
            self.set(up, Status::Failed, "failed; nothing further is started", Some(error));
        }
        self.halt("run failed");
    }

    /// Before a Stopped or Failed run starts again: its stopped and failed levels go back to Pending, so failed
    /// members are retried and the members not yet processed are taken up again.
    fn reset_for_restart(&mut self) {
        for idx in self.member_idxs() {
            let lvl = self.st.level_at(idx).clone();
            match lvl.status {
                Status::Failed => self.set(
                    idx,
                    Status::Pending,
                    format!("to be retried (previous attempt failed: {})", lvl.error.unwrap_or_default()),
                    None,
                ),
                Status::Stopped => self.set(idx, Status::Pending, "to be resumed", None),
                _ => {}
            }
        }
        let mut levels: Vec<Idx> = self.group_idxs().into_iter().map(|(si, gi)| Idx::Group(si, gi)).collect();
        for si in 0..self.st.stages.len() {
            levels.push(Idx::Stage(si));
            if self.st.stages[si].wait.is_some() {
                levels.push(Idx::Wait(si));
            }
        }
        for idx in levels {
            if matches!(self.status(idx), Status::Stopped | Status::Failed) {
                self.set(idx, Status::Pending, "resuming", None);
            }
        }
    }

    // ----- operator skips ------------------------------------------------------------------------------------

    fn skip_member(&mut self, idx: Idx, why: &str) -> Result<(), RunOpError> {
        match self.status(idx) {
            Status::Running | Status::Stopping => Err(RunOpError::Refused(format!(
                "{} is being upgraded; an upgrade already started is not aborted",
                self.st.reference(idx)
            ))),
            s @ (Status::Completed | Status::Skipped) => {
                Err(RunOpError::Refused(format!("{} is already {s}", self.st.reference(idx))))
            }
            _ => {
                self.set(idx, Status::Skipped, why, None);
                Ok(())
            }
        }
    }

    fn skip_group(&mut self, si: usize, gi: usize, why: &str) -> Result<(), RunOpError> {
        let gidx = Idx::Group(si, gi);
        let running = self.running_in_group(si, gi);
        if !running.is_empty() {
            return Err(RunOpError::Refused(format!(
                "{} has members being upgraded ({}); upgrades already started are not aborted, skip the remaining \
                 members one by one",
                self.st.reference(gidx),
                running.join(", ")
            )));
        }
        let status = self.status(gidx);
        if status.is_final() {
            return Err(RunOpError::Refused(format!("{} is already {status}", self.st.reference(gidx))));
        }
        for mi in 0..self.st.stages[si].groups[gi].members.len() {
            let idx = Idx::Member(si, gi, mi);
            if !self.status(idx).is_final() {
                self.skip_member(idx, why)?;
            }
        }
        self.set(gidx, Status::Skipped, why, None);
        Ok(())
    }

    fn skip_stage(&mut self, si: usize) -> Result<(), RunOpError> {
        let sidx = Idx::Stage(si);
        let name = self.st.stages[si].name.clone();
        let status = self.status(sidx);
        if status.is_final() {
            // "Skipping a stage skips its wait too": a finished stage still waiting has only its wait left.
            if self.st.stages[si].wait.as_ref().is_some_and(|w| !w.status.is_final()) {
                return self.skip_wait(si, &format!("stage {name:?} skipped by operator"));
            }
            return Err(RunOpError::Refused(format!("stage {name:?} is already {status}")));
        }
        let running = self.running_in_stage(si);
        if !running.is_empty() {
            return Err(RunOpError::Refused(format!(
                "stage {name:?} has members being upgraded ({}); upgrades already started are not aborted",
                running.join(", ")
            )));
        }
        let why = format!("stage {name:?} skipped by operator");
        for gi in 0..self.st.stages[si].groups.len() {
            if !self.status(Idx::Group(si, gi)).is_final() {
                self.skip_group(si, gi, &why)?;
            }
        }
        self.set(sidx, Status::Skipped, why.clone(), None);
        if self.st.stages[si].wait.as_ref().is_some_and(|w| !w.status.is_final()) {
            self.set(Idx::Wait(si), Status::Skipped, why, None);
        }
        Ok(())
    }

    fn skip_wait(&mut self, si: usize, why: &str) -> Result<(), RunOpError> {
        let idx = Idx::Wait(si);
        let status = self.status(idx);
        if status.is_final() {
            return Err(RunOpError::Refused(format!("{} is already {status}", self.st.reference(idx))));
        }
        self.set(idx, Status::Skipped, why, None);
        Ok(())
    }
}

fn stopped_message(msg: &str) -> String {
    match msg.split_once("; stopping:") {
        Some((why, _)) => why.to_string(),
        None => msg.to_string(),
    }
}

fn count_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
