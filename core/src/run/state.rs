//! The states of an update run (SPEC §5 "States"): the [`Status`] of every level, the SPEC's transition table
//! ([`can_transition`]), the per-level record ([`LevelState`]), the whole persisted tree ([`RunState`]), and the
//! one function that changes it ([`apply`]), which refuses any transition the table does not allow.

use super::model::{NodeImageSelection, UpdateRunSpec, UpgradeType, default_strategy};
use super::validate::{FieldError, validate_run_spec};
use crate::concurrency::Limit;
use crate::version::{ImageVersion, KubernetesVersion, NodeImageVersion};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

/// The state of one level: the run, a stage, the wait after a stage, a group, or a member (SPEC §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub enum Status {
    /// Nothing under it has been considered yet.
    #[default]
    NotStarted,
    /// At least one member under it is being upgraded (for a wait: the wait is counting down).
    Running,
    /// It cannot proceed now, and its message says why (window closed, version not yet in the region, waiting for
    /// a concurrency slot). Not terminal: the run re-checks it on every plan.
    Pending,
    /// Skipped by the operator or by the system (already at target, no common image, ...). Final.
    Skipped,
    /// The operator stopped the run (or a failure did) while members under it are still being upgraded; it
    /// becomes `Stopped` (or `Failed`) when they finish.
    Stopping,
    /// Stopped: nothing under it runs; starting the run again resumes it.
    Stopped,
    /// A member under it failed; the error is kept. Starting the run again retries the failed members.
    Failed,
    /// Every child is Completed or Skipped (and not all Skipped). Final.
    Completed,
}

impl Status {
    /// Every status, in declaration order.
    pub const ALL: [Status; 8] = [
        Status::NotStarted,
        Status::Running,
        Status::Pending,
        Status::Skipped,
        Status::Stopping,
        Status::Stopped,
        Status::Failed,
        Status::Completed,
    ];

    /// Completed or Skipped: nothing will ever change it again.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Completed | Status::Skipped)
    }

    /// Settled: no work is going on or waiting under it in the current attempt (Completed, Skipped, Failed,
    /// Stopped). A stage moves on only when every group in it is settled.
    pub fn is_settled(self) -> bool {
        matches!(self, Status::Completed | Status::Skipped | Status::Failed | Status::Stopped)
    }

    /// The SPEC's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::NotStarted => "NotStarted",
            Status::Running => "Running",
            Status::Pending => "Pending",
            Status::Skipped => "Skipped",
            Status::Stopping => "Stopping",
            Status::Stopped => "Stopped",
            Status::Failed => "Failed",
            Status::Completed => "Completed",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a level may go from `from` to `to`: exactly the SPEC §5 table, plus one documented interpretation.
///
/// SPEC table: NotStarted -> Running | Pending; Running -> Pending | Stopping | Stopped | Failed | Completed;
/// Pending -> Running | Stopping | Stopped | Failed; Stopping -> Stopped | Failed; Stopped -> Running | Pending;
/// Failed -> Running | Pending; Skipped and Completed are final.
///
/// Interpretation: the SPEC lists Skipped as a state reached by an operator or system skip of a level that has
/// not run yet ("the operator skipped it or one of its parents", "already at the target version"), but its table
/// has no edge into Skipped. We allow **NotStarted -> Skipped** and **Pending -> Skipped** and nothing else into
/// Skipped: a level that is running, stopped or failed first goes back to Pending (an allowed edge) before it
/// is skipped, so the recorded history shows it. NotStarted -> Completed stays forbidden.
pub fn can_transition(from: Status, to: Status) -> bool {
    use Status::*;
    matches!(
        (from, to),
        (NotStarted, Running | Pending | Skipped)
            | (Running, Pending | Stopping | Stopped | Failed | Completed)
            | (Pending, Running | Stopping | Stopped | Failed | Skipped)
            | (Stopping, Stopped | Failed)
            | (Stopped, Running | Pending)
            | (Failed, Running | Pending)
    )
}

/// The shortest legal way from `from` to `to`: the direct edge, or one step through `Pending` or `Running`
/// (e.g. Running -> Pending -> Skipped when the operator skips a running wait). `None` if there is none, or if
/// `from == to`.
pub fn transition_path(from: Status, to: Status) -> Option<Vec<Status>> {
    if from == to {
        return None;
    }
    if can_transition(from, to) {
        return Some(vec![to]);
    }
    [Status::Pending, Status::Running]
        .into_iter()
        .find(|mid| can_transition(from, *mid) && can_transition(*mid, to))
        .map(|mid| vec![mid, to])
}

/// What every level records (SPEC §5: start time, end time, a human message, and the error of a failed level).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LevelState {
    /// Current status.
    pub status: Status,
    /// When it started: for a member, when its current attempt started; for a wait, when it began counting;
    /// otherwise when it first left NotStarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// When it settled (Completed, Skipped, Failed, Stopped); cleared when it becomes active again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<DateTime<Utc>>,
    /// A human message saying what it is doing or why it waits.
    #[serde(default)]
    pub message: String,
    /// The error, for a failed level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `pool -> node-image-version` serialized as label strings.
mod image_map {
    use crate::version::NodeImageVersion;
    use serde::{Deserialize, Deserializer, Serializer};
    use std::collections::BTreeMap;

    pub fn serialize<S: Serializer>(m: &BTreeMap<String, NodeImageVersion>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(m.iter().map(|(k, v)| (k, v.to_string())))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, NodeImageVersion>, D::Error> {
        let raw = BTreeMap::<String, String>::deserialize(d)?;
        raw.into_iter().map(|(k, v)| v.parse().map(|n| (k, n)).map_err(serde::de::Error::custom)).collect()
    }
}

/// What a member is upgraded to, decided when its upgrade starts.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MemberTarget {
    /// Target Kubernetes version (`Full`, `ControlPlaneOnly`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes_version: Option<KubernetesVersion>,
    /// Target image per node pool, for the pools that change; pools not listed are left as they are.
    #[serde(default, with = "image_map")]
    pub images: BTreeMap<String, NodeImageVersion>,
}

impl fmt::Display for MemberTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(k) = self.kubernetes_version {
            parts.push(format!("Kubernetes {k}"));
        }
        for (pool, img) in &self.images {
            parts.push(format!("pool {pool} -> {img}"));
        }
        if parts.is_empty() { f.write_str("no change") } else { f.write_str(&parts.join(", ")) }
    }
}

/// One member of the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberState {
    /// Member name.
    pub name: String,
    /// Its state.
    pub level: LevelState,
    /// The target chosen when its (latest) upgrade attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<MemberTarget>,
    /// How many upgrade attempts were started (retries after a restart count).
    #[serde(default)]
    pub attempts: u32,
    /// Not written any more: the work list travels in `Action::StartMember` and is stored with the executor's job
    /// before its first command (a run state with every member's list grew to megabytes at fleet scale). Read from
    /// states written while it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work: Option<crate::work::WorkPlan>,
}

/// One group of a stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupState {
    /// Group name (unique within its stage).
    pub name: String,
    /// Its state.
    pub level: LevelState,
    /// Its concurrency limit (`None` = 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<Limit>,
    /// Its members in the declared order, shared between a state and the states made from it (a member's
    /// transition copies that member only; `Arc::make_mut`).
    pub members: Vec<Arc<MemberState>>,
}

/// One stage of the run, with the wait after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageState {
    /// Stage name (unique within the run).
    pub name: String,
    /// Its state.
    pub level: LevelState,
    /// Cap on members upgraded at once across its groups (`None` = no cap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<Limit>,
    /// Seconds of the wait after the stage (0 = no wait).
    #[serde(default)]
    pub wait_seconds: i64,
    /// The wait after the stage, present when `wait_seconds > 0`; its `started_at` is when the wait began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<LevelState>,
    /// Its groups in the declared order.
    pub groups: Vec<GroupState>,
}

impl StageState {
    /// Number of members in the stage (what a stage percentage resolves against).
    pub fn member_count(&self) -> usize {
        self.groups.iter().map(|g| g.members.len()).sum()
    }
}

/// The whole persisted state of one update run: the spec it was created from and every level's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunState {
    /// The run's specification as created (its `strategy` is the copied one; `None` = all members one by one).
    /// Shared between a state and the states made from it: a strategy of 10,000 members names each of them, and a
    /// transition copies no name (a run's edit makes a new spec).
    pub spec: Arc<UpdateRunSpec>,
    /// The run level.
    pub run: LevelState,
    /// The stages, in order (with no strategy: one stage with one group of every member).
    pub stages: Vec<StageState>,
    /// `Consistent` selection: the version chosen per family when the run started (shown in the run's status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_selection: Option<BTreeMap<String, ImageVersion>>,
    /// Where each member sits in `stages` (not stored; see [`MemberIndex`]).
    #[serde(skip)]
    member_index: MemberIndex,
}

/// Where each member sits in a run's tree, by name: built on the first lookup and shared by every state cloned
/// from that one (a transition changes levels, never the tree's shape). At 10,000 members, finding one by
/// comparing names was a search through the whole tree on every result, start and transition.
///
/// A lookup checks the name at the position the index gives and searches the tree when the index is stale or
/// does not know the name, so a tree changed in place costs a search, never a wrong answer.
#[derive(Clone, Default)]
struct MemberIndex(Arc<std::sync::OnceLock<std::collections::HashMap<String, MemberAt>>>);

/// A member's stage, group and place in its group.
type MemberAt = (usize, usize, usize);

impl PartialEq for MemberIndex {
    /// A cache: two states are equal whatever either has looked up.
    fn eq(&self, _: &MemberIndex) -> bool {
        true
    }
}

impl Eq for MemberIndex {}

impl fmt::Debug for MemberIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MemberIndex({} names)", self.0.get().map_or(0, |m| m.len()))
    }
}

/// Names one level of a run, as used in transitions and events.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "level")]
pub enum LevelRef {
    /// The run itself.
    Run,
    /// A stage.
    Stage {
        /// Stage name.
        stage: String,
    },
    /// The wait after a stage.
    AfterStageWait {
        /// Stage name.
        stage: String,
    },
    /// A group of a stage.
    Group {
        /// Stage name.
        stage: String,
        /// Group name.
        group: String,
    },
    /// A member (member names are unique within a run).
    Member {
        /// Member name.
        member: String,
    },
}

impl fmt::Display for LevelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LevelRef::Run => f.write_str("run"),
            LevelRef::Stage { stage } => write!(f, "stage {stage:?}"),
            LevelRef::AfterStageWait { stage } => write!(f, "wait after stage {stage:?}"),
            LevelRef::Group { stage, group } => write!(f, "group {group:?} of stage {stage:?}"),
            LevelRef::Member { member } => write!(f, "member {member:?}"),
        }
    }
}

/// Position of a level in the tree (internal; [`LevelRef`] is the public, name-based form).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Idx {
    Run,
    Stage(usize),
    Wait(usize),
    Group(usize, usize),
    Member(usize, usize, usize),
}

/// One change of a level's record. `from == to` means only the message (or error) changed; otherwise the pair
/// is an edge allowed by [`can_transition`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// Which level.
    pub level: LevelRef,
    /// Its status before.
    pub from: Status,
    /// Its status after.
    pub to: Status,
    /// When.
    pub at: DateTime<Utc>,
    /// The new message.
    pub message: String,
    /// The error (set for Failed levels, `None` otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Why an operation or a plan could not be applied. Nothing is changed when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunOpError {
    /// The run's specification is invalid.
    #[error("invalid update run:\n{}", super::validate::describe(.0))]
    Invalid(Vec<FieldError>),
    /// The request names a stage, group or member the run does not have.
    #[error("{0} is not part of this run; check the name with `upkeepctl run show`")]
    UnknownLevel(LevelRef),
    /// The request is not possible in the current state; the message says why and what to do.
    #[error("{0}")]
    Refused(String),
    /// A plan was applied to a state other than the one it was made from.
    #[error("stale plan: {level} is {found}, the plan expected {expected}; plan again from the current state")]
    StalePlan {
        /// Which level.
        level: LevelRef,
        /// The status the plan expected.
        expected: Status,
        /// The status found.
        found: Status,
    },
    /// A transition the SPEC's table does not allow (a bug in whoever made the plan).
    #[error("illegal transition of {level}: {from} -> {to}")]
    IllegalTransition {
        /// Which level.
        level: LevelRef,
        /// From.
        from: Status,
        /// To.
        to: Status,
    },
}

impl RunState {
    /// Builds the state of a new run from its specification. `all_members_in_order` is every member the hub
    /// knows, in the order used when the run has no strategy (all members one after another); it is also the set
    /// the strategy's members are checked against.
    pub fn new(spec: &UpdateRunSpec, all_members_in_order: &[String]) -> Result<RunState, RunOpError> {
        let known: BTreeSet<String> = all_members_in_order.iter().cloned().collect();
        validate_run_spec(spec, &known).map_err(RunOpError::Invalid)?;
        let strategy = match &spec.strategy {
            Some(s) => s.clone(),
            None if all_members_in_order.is_empty() => {
                return Err(RunOpError::Invalid(vec![FieldError::new(
                    "strategy",
                    "no strategy given and no members are registered; register members first or give stages",
                )]));
            }
            None => default_strategy(all_members_in_order),
        };
        let stages = strategy
            .stages
            .iter()
            .map(|s| {
                let wait_seconds = s.after_stage_wait_seconds.unwrap_or(0).max(0);
                StageState {
                    name: s.name.clone(),
                    level: LevelState::default(),
                    max_concurrency: s.max_concurrency,
                    wait_seconds,
                    wait: (wait_seconds > 0).then(LevelState::default),
                    groups: s
                        .groups
                        .iter()
                        .map(|g| GroupState {
                            name: g.name.clone(),
                            level: LevelState::default(),
                            max_concurrency: g.max_concurrency,
                            members: g
                                .members
                                .iter()
                                .map(|m| {
                                    Arc::new(MemberState {
                                        name: m.clone(),
                                        level: LevelState::default(),
                                        target: None,
                                        attempts: 0,
                                        work: None,
                                    })
                                })
                                .collect(),
                        })
                        .collect(),
                }
            })
            .collect();
        Ok(RunState::from_parts(Arc::new(spec.clone()), LevelState::default(), stages, None))
    }

    /// A state from its parts (as read back from the store).
    pub fn from_parts(
        spec: Arc<UpdateRunSpec>,
        run: LevelState,
        stages: Vec<StageState>,
        image_selection: Option<BTreeMap<String, ImageVersion>>,
    ) -> RunState {
        RunState { spec, run, stages, image_selection, member_index: MemberIndex::default() }
    }

    /// The run's status.
    pub fn status(&self) -> Status {
        self.run.status
    }

    /// The run's upgrade type.
    pub fn upgrade_type(&self) -> UpgradeType {
        self.spec.upgrade_type
    }

    /// The run's node image selection.
    pub fn selection(&self) -> &NodeImageSelection {
        &self.spec.node_image_selection
    }

    /// The strategy and target may be edited only until the run starts (SPEC §5).
    pub fn can_edit(&self) -> bool {
        self.run.status == Status::NotStarted
    }

    /// A run may be deleted only when it is not running (not Running, Pending or Stopping, and no member is being
    /// upgraded).
    pub fn can_delete(&self) -> bool {
        !matches!(self.run.status, Status::Running | Status::Pending | Status::Stopping)
            && self.running_members().is_empty()
    }

    /// Names of the members being upgraded now.
    pub fn running_members(&self) -> Vec<String> {
        self.members().filter(|m| m.level.status == Status::Running).map(|m| m.name.clone()).collect()
    }

    /// Every member of the run, in stage, group and declared order.
    pub fn members(&self) -> impl Iterator<Item = &MemberState> {
        self.stages.iter().flat_map(|s| s.groups.iter()).flat_map(|g| g.members.iter()).map(Arc::as_ref)
    }

    /// A member's record.
    pub fn member(&self, name: &str) -> Option<&MemberState> {
        self.member_at(name).map(|(si, gi, mi)| self.stages[si].groups[gi].members[mi].as_ref())
    }

    /// Where member `name` sits: from the index when it is right, else by searching the tree.
    fn member_at(&self, name: &str) -> Option<MemberAt> {
        let at = |&(si, gi, mi): &MemberAt| {
            self.stages.get(si)?.groups.get(gi)?.members.get(mi).filter(|m| m.name == name).map(|_| (si, gi, mi))
        };
        let index = self.member_index.0.get_or_init(|| {
            let mut index = std::collections::HashMap::new();
            for (si, s) in self.stages.iter().enumerate() {
                for (gi, g) in s.groups.iter().enumerate() {
                    for (mi, m) in g.members.iter().enumerate() {
                        index.insert(m.name.clone(), (si, gi, mi));
                    }
                }
            }
            index
        });
        index.get(name).and_then(at).or_else(|| {
            self.stages.iter().enumerate().find_map(|(si, s)| {
                s.groups
                    .iter()
                    .enumerate()
                    .find_map(|(gi, g)| g.members.iter().position(|m| m.name == name).map(|mi| (si, gi, mi)))
            })
        })
    }

    /// The record of any level.
    pub fn level(&self, r: &LevelRef) -> Option<&LevelState> {
        self.find(r).map(|i| self.level_at(i))
    }

    pub(crate) fn find(&self, r: &LevelRef) -> Option<Idx> {
        let stage = |name: &str| self.stages.iter().position(|s| s.name == name);
        match r {
            LevelRef::Run => Some(Idx::Run),
            LevelRef::Stage { stage: s } => stage(s).map(Idx::Stage),
            LevelRef::AfterStageWait { stage: s } => {
                stage(s).filter(|si| self.stages[*si].wait.is_some()).map(Idx::Wait)
            }
            LevelRef::Group { stage: s, group } => {
                let si = stage(s)?;
                self.stages[si].groups.iter().position(|g| &g.name == group).map(|gi| Idx::Group(si, gi))
            }
            LevelRef::Member { member } => self.member_at(member).map(|(si, gi, mi)| Idx::Member(si, gi, mi)),
        }
    }

    pub(crate) fn reference(&self, i: Idx) -> LevelRef {
        match i {
            Idx::Run => LevelRef::Run,
            Idx::Stage(si) => LevelRef::Stage { stage: self.stages[si].name.clone() },
            Idx::Wait(si) => LevelRef::AfterStageWait { stage: self.stages[si].name.clone() },
            Idx::Group(si, gi) => {
                LevelRef::Group { stage: self.stages[si].name.clone(), group: self.stages[si].groups[gi].name.clone() }
            }
            Idx::Member(si, gi, mi) => LevelRef::Member { member: self.stages[si].groups[gi].members[mi].name.clone() },
        }
    }

    /// The record at a position. Positions come from [`RunState::find`] or from iterating this state's tree.
    pub(crate) fn level_at(&self, i: Idx) -> &LevelState {
        match i {
            Idx::Run => &self.run,
            Idx::Stage(si) => &self.stages[si].level,
            Idx::Wait(si) => self.stages[si].wait.as_ref().unwrap_or(&self.stages[si].level),
            Idx::Group(si, gi) => &self.stages[si].groups[gi].level,
            Idx::Member(si, gi, mi) => &self.stages[si].groups[gi].members[mi].level,
        }
    }

    pub(crate) fn level_at_mut(&mut self, i: Idx) -> Option<&mut LevelState> {
        match i {
            Idx::Run => Some(&mut self.run),
            Idx::Stage(si) => self.stages.get_mut(si).map(|s| &mut s.level),
            Idx::Wait(si) => self.stages.get_mut(si).and_then(|s| s.wait.as_mut()),
            Idx::Group(si, gi) => self.stages.get_mut(si)?.groups.get_mut(gi).map(|g| &mut g.level),
            Idx::Member(si, gi, mi) => {
                self.stages.get_mut(si)?.groups.get_mut(gi)?.members.get_mut(mi).map(|m| &mut Arc::make_mut(m).level)
            }
        }
    }
}

/// Applies one transition to a level's record, keeping the time stamps coherent.
pub(crate) fn apply_to_level(level: &mut LevelState, is_member_or_wait: bool, t: &Transition) {
    if t.from != t.to {
        match t.to {
            Status::Running => {
                // A member's start time is that of its current attempt; a wait counts from when it (re)starts.
                if is_member_or_wait || level.started_at.is_none() {
                    level.started_at = Some(t.at);
                }
                level.ended_at = None;
            }
            Status::Pending | Status::Stopping => {
                if !is_member_or_wait && level.started_at.is_none() {
                    level.started_at = Some(t.at);
                }
                level.ended_at = None;
            }
            Status::Skipped | Status::Completed | Status::Failed | Status::Stopped => level.ended_at = Some(t.at),
            Status::NotStarted => {}
        }
    }
    level.status = t.to;
    level.message = t.message.clone();
    level.error = t.error.clone();
}

/// Applies one transition to the tree, checking that it starts from the current status and is allowed.
pub(crate) fn apply_transition(state: &mut RunState, t: &Transition) -> Result<(), RunOpError> {
    let i = state.find(&t.level).ok_or_else(|| RunOpError::UnknownLevel(t.level.clone()))?;
    let found = state.level_at(i).status;
    if found != t.from {
        return Err(RunOpError::StalePlan { level: t.level.clone(), expected: t.from, found });
    }
    if t.from != t.to && !can_transition(t.from, t.to) {
        return Err(RunOpError::IllegalTransition { level: t.level.clone(), from: t.from, to: t.to });
    }
    let special = matches!(i, Idx::Member(..) | Idx::Wait(_));
    if let Some(level) = state.level_at_mut(i) {
        apply_to_level(level, special, t);
    }
    Ok(())
}

/// Applies a plan (from [`super::plan`] or any operation) to the state it was made from and returns the new state
/// to persist. Refuses a stale plan or an illegal transition, changing nothing.
pub fn apply(state: &RunState, plan: &super::Plan) -> Result<RunState, RunOpError> {
    let mut next = state.clone();
    if let Some(sel) = &plan.image_selection {
        next.image_selection = Some(sel.clone());
    }
    for t in &plan.transitions {
        apply_transition(&mut next, t)?;
    }
    for a in &plan.actions {
        match a {
            super::Action::StartMember { member, target, .. } => {
                let r = LevelRef::Member { member: member.clone() };
                let Some(Idx::Member(si, gi, mi)) = next.find(&r) else {
                    return Err(RunOpError::UnknownLevel(r));
                };
                let m = Arc::make_mut(&mut next.stages[si].groups[gi].members[mi]);
                if m.level.status != Status::Running {
                    return Err(RunOpError::StalePlan { level: r, expected: Status::Running, found: m.level.status });
                }
                m.target = Some(target.clone());
                m.attempts += 1;
            }
        }
    }
    Ok(next)
}
