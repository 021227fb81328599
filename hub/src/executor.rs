//! The one node-work executor: carries out every disruption the hub causes, whoever asked for it.
//!
//! An update run's member upgrade, a NodeImage or SecurityPatch rollout, a channel-switch reimage, a reboot a node
//! asked for and an operator's reboot or uncordon all arrive here as a [`JobSpec`]: an id, an owner, and a
//! [`WorkPlan`] that `upkeep_core::work::plan_work` decided (which nodes, in what batches, with what steps). The
//! executor makes no choices of its own; it walks the plan:
//!
//! - batch by batch; for each node it takes a lease in the [`Ledger`] (waiting while the member's budget is in
//!   use), then sends the node's steps one by one, each as a command with the operation id
//!   `<job id>/<node>/<step>`, and gives the lease back after the uncordon;
//! - when a step fails it applies the one failure policy (`upkeep_core::work::on_step_failure`): after a failed
//!   cordon or drain the node is uncordoned and its lease given back; after a failed change (Kubernetes upgrade,
//!   reimage, patch, reboot) or uncordon the node stays cordoned and keeps its lease, so it keeps counting against
//!   the budget until an operator puts it back (`upkeepctl node uncordon`). A failed node stops the job from
//!   starting new nodes; nodes already under way finish;
//! - a drain that fails goes through the member's undrainable policy first (`on_undrainable`: Fail, SkipNode or
//!   Force, with a cap);
//! - a node that goes silent during a step (no session, or a session that sends nothing: a frozen agent) is
//!   shown as such in the member's status, and the step fails once it has been silent for twice its silence
//!   deadline (a boot's grace for steps that reboot it).
//!
//! Crash safety: a job is stored before its first command and after every node it finishes; a restarted hub
//! resumes it from the first unfinished node. Operation ids are deterministic, so a step the agent already did
//! is answered with its first result; a node already changed still gets its remaining steps (its uncordon).
//! Fencing: every command carries a fresh generation from [`Fleet::next_generation`].

use crate::fleet::{CommandError, Fleet, now_ms};
use crate::ledger::{LeaseAsk, Ledger, time_of};
use crate::store::{JobRecord, Store, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use upkeep_core::maintenance::LeaseDecision;
use upkeep_core::work::{DrainPolicy, NodeWork, Step, UndrainableAction, WorkPlan, on_step_failure, on_undrainable};
use upkeep_proto::v1;

/// Per-step time limits for node operations.
#[derive(Debug, Clone, Copy)]
pub struct StepLimits {
    /// Cordon, uncordon.
    pub quick: Duration,
    /// Drain.
    pub drain: Duration,
    /// Reimage or Kubernetes upgrade (download, write, reboot, health).
    pub upgrade: Duration,
}

impl Default for StepLimits {
    fn default() -> Self {
        StepLimits {
            quick: Duration::from_secs(120),
            drain: Duration::from_secs(900),
            upgrade: Duration::from_secs(3600),
        }
    }
}

/// How often a node waiting for a lease looks again when nothing wakes it.
const LEASE_RECHECK: Duration = Duration::from_secs(5);
/// How long to wait before sending again a command a busy node refused.
const BUSY_RETRY: Duration = Duration::from_secs(1);
/// How long the hub waits for the node's report after a security patch before deciding on a reboot.
const REPORT_AFTER_PATCH: Duration = Duration::from_secs(60);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How one node of a job ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", content = "message", rename_all = "kebab-case")]
pub enum NodeOutcome {
    /// Every step done.
    Done,
    /// Left as it was (undrainable policy SkipNode).
    Skipped(String),
    /// A step failed.
    Failed(String),
}

/// One piece of work that included a node, for its history (`node show`, the dashboard's node page).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeHistory {
    /// Work id.
    pub work_id: String,
    /// What it was for.
    pub purpose: String,
    /// Done, Skipped, Failed, or Running.
    pub outcome: String,
    /// Why skipped or failed.
    pub detail: String,
    /// Started (Unix ms).
    pub started_ms: i64,
    /// Finished (Unix ms), if the job has.
    pub finished_ms: Option<i64>,
}

/// The stored jobs that included `node`, newest first, at most `limit`. A job whose state cannot be read is left
/// out (the executor reports it where it resumes jobs).
pub fn node_history(store: &dyn Store, node: &str, limit: usize) -> Result<Vec<NodeHistory>, StoreError> {
    let mut out: Vec<NodeHistory> = store
        .list_jobs(None)?
        .into_iter()
        .filter_map(|j| serde_json::from_str::<JobState>(&j.state).ok().map(|s| (j, s)))
        .filter(|(_, s)| s.spec.plan.nodes().any(|w| w.node == node))
        .map(|(j, s)| {
            let (outcome, detail) = match s.nodes.get(node) {
                Some(NodeOutcome::Done) => ("Done", String::new()),
                Some(NodeOutcome::Skipped(why)) => ("Skipped", why.clone()),
                Some(NodeOutcome::Failed(why)) => ("Failed", why.clone()),
                None if s.status == JobStatus::Running => ("Running", String::new()),
                None => ("NotReached", format!("the work ended {}", j.status)),
            };
            NodeHistory {
                work_id: j.id,
                purpose: s.spec.purpose.clone(),
                outcome: outcome.to_string(),
                detail,
                started_ms: s.started_ms,
                finished_ms: s.finished_ms,
            }
        })
        .collect();
    out.sort_by(|a, b| (b.started_ms, &b.work_id).cmp(&(a.started_ms, &a.work_id)));
    out.truncate(limit);
    Ok(out)
}

/// A job's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobStatus {
    /// Under way (or to be resumed after a restart).
    Running,
    /// Every node done or skipped.
    Completed,
    /// A node failed.
    Failed,
}

impl JobStatus {
    /// Display form (also the store's status column).
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Running => "Running",
            JobStatus::Completed => "Completed",
            JobStatus::Failed => "Failed",
        }
    }
}

/// What a caller hands the executor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Work id: the lease id of its nodes and the prefix of its operation ids. The same id is the same work.
    pub id: String,
    /// The member it works on.
    pub member: String,
    /// Owner key (see `ledger`): `run/<run>/<member>`, `rollout/<member>`, `reboot/<node>`, `operator/<name>`.
    pub holder: String,
    /// What it does, for `lease list`, events and status.
    pub purpose: String,
    /// The plan.
    pub plan: WorkPlan,
    /// Take leases outside the node OS window (an operator's force; a run that honoured its own window).
    pub outside_window: bool,
    /// Granted by an operator's force (shown on its leases).
    pub forced: bool,
    /// The member's drain settings when the work started.
    pub drain: DrainPolicy,
    /// The run it belongs to, if any (node events go to that run's event log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobState {
    /// What was asked.
    pub spec: JobSpec,
    /// Where it stands.
    pub status: JobStatus,
    /// Nodes finished, with how.
    #[serde(default)]
    pub nodes: BTreeMap<String, NodeOutcome>,
    /// Nodes the undrainable policy skipped or forced, with what blocked them (counted against the cap).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub undrainable: BTreeMap<String, String>,
    /// Started (Unix ms).
    pub started_ms: i64,
    /// Finished (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<i64>,
}

impl JobState {
    /// The job's outcome as its caller sees it: Ok, or the errors of its failed nodes.
    pub fn result(&self) -> Result<(), String> {
        let failed: Vec<&str> = self
            .nodes
            .values()
            .filter_map(|o| match o {
                NodeOutcome::Failed(m) => Some(m.as_str()),
                _ => None,
            })
            .collect();
        if failed.is_empty() { Ok(()) } else { Err(failed.join("; ")) }
    }

    /// One line for status: what is done and what failed.
    pub fn summary(&self) -> String {
        let total = self.spec.plan.nodes().count();
        let done = self.nodes.values().filter(|o| matches!(o, NodeOutcome::Done)).count();
        let mut s = format!("{} {} ({done} of {total} nodes done", self.spec.id, self.status.as_str());
        for (n, o) in &self.nodes {
            match o {
                NodeOutcome::Skipped(why) => s.push_str(&format!("; {n} skipped: {why}")),
                NodeOutcome::Failed(why) => s.push_str(&format!("; {n} failed: {why}")),
                NodeOutcome::Done => {}
            }
        }
        for (n, why) in self.undrainable.iter().filter(|(n, _)| self.nodes.get(*n) == Some(&NodeOutcome::Done)) {
            s.push_str(&format!("; {n}: {why}"));
        }
        s.push(')');
        s
    }
}

/// Whether a node's work takes it out of service (an uncordon alone puts it back and takes no lease).
fn takes_lease(w: &NodeWork) -> bool {
    !matches!(w.steps.as_slice(), [Step::Uncordon])
}

/// A node event the executor emits (the run engine writes those of run work into the run's event log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEvent {
    /// The job.
    pub job: String,
    /// Its run, if any.
    pub run: Option<String>,
    /// Its member.
    pub member: String,
    /// The node.
    pub node: String,
    /// Old state.
    pub from: &'static str,
    /// New state.
    pub to: &'static str,
    /// What happened.
    pub message: String,
    /// The error, if any.
    pub error: String,
}

/// Where node events go.
pub type EventSink = Arc<dyn Fn(NodeEvent) + Send + Sync>;

/// The executor.
pub struct Executor {
    fleet: Arc<Fleet>,
    ledger: Arc<Ledger>,
    limits: StepLimits,
    /// Jobs under way in this process -> their outcome once known.
    running: Mutex<HashMap<String, watch::Receiver<Option<JobState>>>>,
    /// Member -> job -> what it is doing or waiting for now.
    notes: Mutex<HashMap<String, BTreeMap<String, String>>>,
    /// Node -> what the work on it is doing or waiting for now.
    node_notes: Mutex<HashMap<String, String>>,
    /// Where node events go.
    events: Mutex<Option<EventSink>>,
}

impl Executor {
    /// Over `fleet` and its ledger.
    pub fn new(fleet: Arc<Fleet>, ledger: Arc<Ledger>, limits: StepLimits) -> Arc<Executor> {
        Arc::new(Executor {
            fleet,
            ledger,
            limits,
            running: Mutex::new(HashMap::new()),
            notes: Mutex::new(HashMap::new()),
            node_notes: Mutex::new(HashMap::new()),
            events: Mutex::new(None),
        })
    }

    /// Sends node events to `sink` from now on.
    pub fn set_event_sink(&self, sink: EventSink) {
        *lock(&self.events) = Some(sink);
    }

    /// The ledger.
    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    fn store(&self) -> &dyn Store {
        self.fleet.store()
    }

    /// What the work on a member is doing or waiting for now (one line per job), if any.
    pub fn member_note(&self, member: &str) -> Option<String> {
        let notes = lock(&self.notes);
        let m = notes.get(member).filter(|m| !m.is_empty())?;
        Some(m.iter().map(|(job, what)| format!("{job}: {what}")).collect::<Vec<_>>().join("; "))
    }

    /// What the work on a node is doing or waiting for now, if any.
    pub fn node_note(&self, node: &str) -> Option<String> {
        lock(&self.node_notes).get(node).cloned()
    }

    fn note(&self, spec: &JobSpec, what: Option<String>) {
        let mut notes = lock(&self.notes);
        let m = notes.entry(spec.member.clone()).or_default();
        match what {
            Some(w) => m.insert(spec.id.clone(), w),
            None => m.remove(&spec.id),
        };
    }

    fn note_node(&self, node: &str, what: Option<String>) {
        match what {
            Some(w) => lock(&self.node_notes).insert(node.to_string(), w),
            None => lock(&self.node_notes).remove(node),
        };
    }

    fn event(&self, spec: &JobSpec, node: &str, from: &'static str, to: &'static str, message: String, error: String) {
        let sink = lock(&self.events).clone();
        if let Some(sink) = sink {
            sink(NodeEvent {
                job: spec.id.clone(),
                run: spec.run.clone(),
                member: spec.member.clone(),
                node: node.to_string(),
                from,
                to,
                message,
                error,
            });
        }
    }

    /// The stored state of a job, if any.
    pub fn stored(&self, id: &str) -> Result<Option<JobState>, StoreError> {
        let Some(rec) = self.store().get_job(id)? else { return Ok(None) };
        serde_json::from_str(&rec.state)
            .map(Some)
            .map_err(|e| StoreError::Corrupt { context: format!("work {id}"), reason: e.to_string() })
    }

    fn save(&self, state: &JobState) -> Result<(), StoreError> {
        let json = serde_json::to_string(state)
            .map_err(|e| StoreError::Corrupt { context: format!("work {}", state.spec.id), reason: e.to_string() })?;
        self.store().put_job(&JobRecord {
            id: state.spec.id.clone(),
            member: state.spec.member.clone(),
            status: state.status.as_str().to_string(),
            state: json,
            updated_ms: now_ms(),
        })
    }

    /// Carries out `spec` (or joins it, when the same id is already under way; or resumes it from the store after
    /// a restart; or returns its stored end when it already finished) and returns how it ended.
    pub async fn execute(self: &Arc<Self>, spec: JobSpec) -> Result<JobState, StoreError> {
        let mut rx = {
            let mut running = lock(&self.running);
            match running.get(&spec.id) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    running.insert(spec.id.clone(), rx.clone());
                    let me = self.clone();
                    let id = spec.id.clone();
                    let started = self.fleet.spawn_work(async move {
                        let id = spec.id.clone();
                        let end = me.drive(spec).await;
                        match end {
                            Ok(state) => {
                                let _ = tx.send(Some(state));
                            }
                            Err(e) => tracing::error!(job = %id, error = %e, "node work stopped on a store error"),
                        }
                        lock(&me.running).remove(&id);
                    });
                    if !started {
                        running.remove(&id);
                        return Err(StoreError::Fenced(format!(
                            "node work {id}: this hub replica is not the leader; the leader carries out node work"
                        )));
                    }
                    rx
                }
            }
        };
        loop {
            if let Some(state) = rx.borrow().clone() {
                return Ok(state);
            }
            if rx.changed().await.is_err() {
                return Err(StoreError::Corrupt {
                    context: "node work".into(),
                    reason: "the executor task ended without an outcome (see the hub log)".into(),
                });
            }
        }
    }

    /// Forgets the jobs this process had under way (a replica that becomes the leader: they were stopped with its
    /// previous term; the store holds their progress).
    pub fn forget_tasks(&self) {
        lock(&self.running).clear();
    }

    /// Whether a job with this id is under way in this process.
    pub fn is_running(&self, id: &str) -> bool {
        lock(&self.running).contains_key(id)
    }

    async fn drive(self: &Arc<Self>, spec: JobSpec) -> Result<JobState, StoreError> {
        let mut state = match self.stored(&spec.id)? {
            Some(s) if s.status != JobStatus::Running => return Ok(s),
            Some(s) => {
                tracing::info!(job = %s.spec.id, done = s.nodes.len(), "resuming node work");
                s
            }
            None => {
                let s = JobState {
                    spec,
                    status: JobStatus::Running,
                    nodes: BTreeMap::new(),
                    undrainable: BTreeMap::new(),
                    started_ms: now_ms(),
                    finished_ms: None,
                };
                self.save(&s)?;
                tracing::info!(job = %s.spec.id, member = %s.spec.member, purpose = %s.spec.purpose,
                    nodes = s.spec.plan.nodes().count(), "node work started");
                s
            }
        };
        let spec = state.spec.clone();
        let shared = Arc::new(Mutex::new(state.clone()));
        'batches: for batch in &spec.plan.batches {
            let todo: Vec<&NodeWork> = batch.iter().filter(|w| !state.nodes.contains_key(&w.node)).collect();
            if todo.is_empty() {
                continue;
            }
            let results = futures::future::join_all(todo.iter().map(|w| self.node(&spec, w, shared.clone()))).await;
            for r in results {
                r?;
            }
            state = lock(&shared).clone();
            if state.nodes.values().any(|o| matches!(o, NodeOutcome::Failed(_))) {
                break 'batches;
            }
        }
        state.status = if state.result().is_ok() { JobStatus::Completed } else { JobStatus::Failed };
        state.finished_ms = Some(now_ms());
        self.save(&state)?;
        self.note(&spec, None);
        tracing::info!(job = %spec.id, status = state.status.as_str(), "node work finished");
        Ok(state)
    }

    /// One node: lease, steps, release; records its outcome in the job.
    async fn node(&self, spec: &JobSpec, w: &NodeWork, shared: Arc<Mutex<JobState>>) -> Result<(), StoreError> {
        let takes_lease = takes_lease(w);
        if takes_lease {
            self.wait_for_lease(spec, &w.node).await?;
        }
        self.event(
            spec,
            &w.node,
            "NotStarted",
            "Running",
            format!("{}: {}", spec.purpose, w.describe()),
            String::new(),
        );
        let (outcome, keep) = self.steps(spec, w, &shared).await;
        self.note_node(&w.node, None);
        let (to, message, error) = match &outcome {
            NodeOutcome::Done => ("Completed", format!("done: {}", w.describe()), String::new()),
            NodeOutcome::Skipped(why) => ("Skipped", "skipped".to_string(), why.clone()),
            NodeOutcome::Failed(why) => ("Failed", "failed".to_string(), why.clone()),
        };
        self.event(spec, &w.node, "Running", to, message, error);
        if matches!(w.steps.as_slice(), [Step::Uncordon]) && outcome == NodeOutcome::Done {
            // The node is back in service: whatever left it out gives its lease back (this work's own included).
            self.ledger.release_node(&w.node)?;
        } else if takes_lease && !keep {
            self.ledger.release(&w.node, &spec.id)?;
        }
        let snapshot = {
            let mut s = lock(&shared);
            s.nodes.insert(w.node.clone(), outcome);
            s.clone()
        };
        self.save(&snapshot)
    }

    async fn wait_for_lease(&self, spec: &JobSpec, node: &str) -> Result<(), StoreError> {
        let mut logged = false;
        loop {
            // The node's member as last reported, from the hub's view (no store read per node).
            let Some(member) = self.fleet.view().member_of(node) else {
                // Forgotten meanwhile: nothing to take out; the steps fail on it and say so.
                return Ok(());
            };
            let ask = LeaseAsk {
                lease_id: &spec.id,
                holder: &spec.holder,
                purpose: &spec.purpose,
                outside_window: spec.outside_window,
                forced: spec.forced,
            };
            match self.ledger.take(node, &member, &ask)? {
                LeaseDecision::Grant | LeaseDecision::AlreadyHeld => return Ok(()),
                LeaseDecision::Deny { reason, .. } => {
                    if !logged {
                        tracing::info!(job = %spec.id, node, %reason, "waiting for a lease");
                        logged = true;
                    }
                    self.note(spec, Some(format!("node {node} waits: {reason}")));
                    self.note_node(node, Some(format!("waits for a lease for {}: {reason}", spec.purpose)));
                    tokio::select! {
                        _ = self.ledger.freed() => {}
                        _ = tokio::time::sleep(LEASE_RECHECK) => {}
                    }
                }
            }
        }
    }

    /// Runs a node's steps; on failure applies the failure and undrainable policies. Returns how the node ended
    /// and whether it keeps its lease.
    async fn steps(&self, spec: &JobSpec, w: &NodeWork, shared: &Mutex<JobState>) -> (NodeOutcome, bool) {
        let mut mark = None;
        for step in &w.steps {
            let r = match step {
                Step::RebootIfRequired => {
                    // The agent reports right after a result; that report says whether the OS wants a reboot.
                    let fresh = match mark {
                        Some(m) => self.fleet.report_after(&w.node, m, REPORT_AFTER_PATCH).await,
                        None => None,
                    };
                    if fresh.is_some_and(|n| n.facts.reboot_required) {
                        self.send(spec, &w.node, "reboot", v1::command::Kind::Reboot(v1::Reboot { force: true }), true)
                            .await
                            .map(drop)
                    } else {
                        Ok(())
                    }
                }
                _ => match self.kind(spec, step) {
                    Ok(kind) => {
                        self.send(spec, &w.node, step.name(), kind, step.reboots()).await.map(|m| mark = Some(m))
                    }
                    Err(why) => Err(why),
                },
            };
            let Err(why) = r else { continue };
            if *step == Step::Drain {
                let decision = {
                    let mut s = lock(shared);
                    let d = on_undrainable(&spec.drain, s.undrainable.len() as u32, &w.node, &why);
                    if let UndrainableAction::Skip(m) | UndrainableAction::Force(m) = &d {
                        // Counted now, so that nodes drained in parallel cannot overshoot the cap.
                        s.undrainable.insert(w.node.clone(), m.clone());
                    }
                    d
                };
                match decision {
                    UndrainableAction::Force(msg) => {
                        tracing::warn!(job = %spec.id, node = %w.node, "{msg}");
                        self.event(spec, &w.node, "Running", "Running", "drain forced".into(), msg.clone());
                        let force = v1::command::Kind::Drain(v1::Drain {
                            timeout_seconds: spec.drain.timeout_seconds,
                            force: true,
                        });
                        match self.send(spec, &w.node, "drain-force", force, false).await {
                            Ok(_) => continue,
                            Err(e) => {
                                return self
                                    .fail(spec, w, step, format!("{msg}; the forced drain failed too: {e}"))
                                    .await;
                            }
                        }
                    }
                    UndrainableAction::Skip(msg) => {
                        tracing::warn!(job = %spec.id, node = %w.node, "{msg}");
                        if let Err(e) = self.uncordon_after(spec, &w.node).await {
                            return (NodeOutcome::Failed(format!("{msg}; uncordon failed: {e}")), true);
                        }
                        return (NodeOutcome::Skipped(msg), false);
                    }
                    UndrainableAction::Fail(msg) => return self.fail(spec, w, step, msg).await,
                }
            }
            return self.fail(spec, w, step, why).await;
        }
        (NodeOutcome::Done, false)
    }

    /// A step failed: apply the failure policy and say what became of the node (and whether it keeps its lease).
    async fn fail(&self, spec: &JobSpec, w: &NodeWork, step: &Step, why: String) -> (NodeOutcome, bool) {
        let effect = on_step_failure(step);
        tracing::warn!(job = %spec.id, node = %w.node, step = step.name(), error = %why, uncordon = effect.uncordon,
            keep_lease = effect.keep_lease, "node step failed");
        let mut msg = why;
        let mut keep = effect.keep_lease;
        if effect.uncordon {
            match self.uncordon_after(spec, &w.node).await {
                Ok(()) => msg.push_str("; the node was uncordoned and is back in service"),
                Err(e) => {
                    keep = true;
                    msg.push_str(&format!(
                        "; uncordon failed too ({e}): the node stays cordoned and out of service under lease {} until \
                         `upkeepctl node uncordon {}`",
                        spec.id, w.node
                    ));
                }
            }
        } else if takes_lease(w) {
            msg.push_str(&format!(
                "; the node stays cordoned and out of service under lease {} until `upkeepctl node uncordon {}`",
                spec.id, w.node
            ));
        } else {
            msg.push_str("; the node stays cordoned under the leases that keep it out of service");
        }
        (NodeOutcome::Failed(msg), keep)
    }

    async fn uncordon_after(&self, spec: &JobSpec, node: &str) -> Result<(), String> {
        self.send(spec, node, "uncordon-after-failure", v1::command::Kind::Uncordon(v1::Uncordon {}), false)
            .await
            .map(drop)
    }

    /// The command for a step.
    fn kind(&self, spec: &JobSpec, step: &Step) -> Result<v1::command::Kind, String> {
        use v1::command::Kind;
        Ok(match step {
            Step::Cordon => Kind::Cordon(v1::Cordon {}),
            Step::Drain => Kind::Drain(v1::Drain { timeout_seconds: spec.drain.timeout_seconds, force: false }),
            Step::UpgradeKubernetes { version, first_control_plane } => {
                Kind::UpgradeKubernetes(v1::UpgradeKubernetes {
                    version: version.to_string(),
                    first_control_plane: *first_control_plane,
                })
            }
            Step::Reimage { image, reinstall } => {
                let rec = self
                    .store()
                    .list_images(Some(&image.family))
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .find(|i| i.version == image.version.to_string())
                    .ok_or_else(|| format!("reimage failed: image {image} is no longer in the catalog"))?;
                Kind::Reimage(v1::Reimage {
                    image: Some(v1::ImageRef {
                        family: rec.family,
                        version: rec.version,
                        url: rec.url,
                        sha256: rec.sha256,
                        signature: rec.signature,
                        size_bytes: rec.size_bytes,
                    }),
                    allow_downgrade: false,
                    reinstall: *reinstall,
                })
            }
            Step::Patch { family, version, packages } => Kind::ApplySecurityPatch(v1::ApplySecurityPatch {
                family: family.clone(),
                version: version.to_string(),
                packages: packages.clone(),
            }),
            Step::Reboot | Step::RebootIfRequired => Kind::Reboot(v1::Reboot { force: true }),
            Step::Uncordon => Kind::Uncordon(v1::Uncordon {}),
        })
    }

    fn limit(&self, step: &str) -> Duration {
        match step {
            "cordon" | "uncordon" | "uncordon-after-failure" => self.limits.quick,
            "drain" | "drain-force" => self.limits.drain,
            _ => self.limits.upgrade,
        }
    }

    /// Sends one step and waits for its result; the node's report count at the result on success.
    async fn send(
        &self,
        spec: &JobSpec,
        node: &str,
        step: &str,
        kind: v1::command::Kind,
        reboots: bool,
    ) -> Result<u64, String> {
        let op = format!("{}/{node}/{step}", spec.id);
        let mut within = self.limit(step);
        if step.starts_with("drain") {
            within = within.max(Duration::from_secs(u64::from(spec.drain.timeout_seconds) + 60));
        }
        self.note(spec, Some(format!("node {node}: {step}")));
        self.note_node(node, Some(format!("{}: {step}", spec.purpose)));
        let limit_ms = self.fleet.silent_step_limit_ms(reboots);
        let on_silence = |since: Option<i64>| match since {
            Some(t) => {
                let what = format!(
                    "waiting on silent node {node} during {step}: silent since {}; the step fails at {} unless it is heard again",
                    time_of(t),
                    time_of(t + limit_ms)
                );
                tracing::warn!(job = %spec.id, node, step, "node silent during a step");
                self.note(spec, Some(what.clone()));
                self.note_node(node, Some(what));
            }
            None => {
                self.note(spec, Some(format!("node {node}: {step}")));
                self.note_node(node, Some(format!("{}: {step}", spec.purpose)));
            }
        };
        let started = std::time::Instant::now();
        let r = self.send_until(spec, node, step, &op, kind, within, limit_ms, &on_silence).await;
        self.fleet.counters().node_step(step, r.is_ok(), started.elapsed());
        r
    }

    /// `send`'s loop: the command again while the node is busy with an earlier one, until `within`.
    #[allow(clippy::too_many_arguments)] // `send`'s own values, handed down once
    async fn send_until(
        &self,
        spec: &JobSpec,
        node: &str,
        step: &str,
        op: &str,
        kind: v1::command::Kind,
        within: Duration,
        limit_ms: i64,
        on_silence: &(dyn Fn(Option<i64>) + Send + Sync),
    ) -> Result<u64, String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let r = self.fleet.command_marked(node, op, kind.clone(), left, on_silence).await;
            match r {
                // The node is still busy with an earlier operation (one the hub gave up waiting for, say): it
                // recorded nothing, so the same command goes again once that one is done.
                Ok((r, _)) if !r.ok && r.busy && tokio::time::Instant::now() + BUSY_RETRY < deadline => {
                    tracing::info!(job = %spec.id, node, step, reason = %r.error, "node busy; sending again shortly");
                    self.note(spec, Some(format!("node {node}: {step} waits for the node: {}", r.error)));
                    tokio::time::sleep(BUSY_RETRY).await;
                    continue;
                }
                other => return self.outcome(node, step, limit_ms, other),
            }
        }
    }

    fn outcome(
        &self,
        node: &str,
        step: &str,
        limit_ms: i64,
        r: Result<(v1::OperationResult, u64), CommandError>,
    ) -> Result<u64, String> {
        match r {
            Ok((r, mark)) if r.ok => Ok(mark),
            Ok((r, _)) => Err(format!("node {node}: {step} failed: {}", r.error)),
            Err(CommandError::Silent { for_ms, .. }) => Err(format!(
                "node {node} is Unknown: silent for {} s during {step} (limit {} s)",
                for_ms / 1000,
                limit_ms / 1000
            )),
            Err(e) => Err(format!("node {node}: {step} failed: {e}")),
        }
    }

    /// Every job stored as Running (to resume after a restart).
    pub fn unfinished(&self) -> Result<Vec<JobState>, StoreError> {
        self.store()
            .list_jobs(Some(JobStatus::Running.as_str()))?
            .into_iter()
            .map(|r| {
                serde_json::from_str(&r.state)
                    .map_err(|e| StoreError::Corrupt { context: format!("work {}", r.id), reason: e.to_string() })
            })
            .collect()
    }
}
