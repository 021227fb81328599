//! The run engine: load -> core::run::plan -> persist -> act -> publish.
//!
//! Every decision comes out of `upkeep_core::run` (plan, start, stop, skip, member_finished). The engine only
//! builds the planner's inputs from the store (fleet view, catalog), commits the new state and its events in
//! one transaction, and then carries out the plan's actions: a starting member carries the work list the planner
//! decided for it (`upkeep_core::work`), which the one node-work executor (`crate::executor`) carries out under
//! the member's leases; the outcome goes back through `member_finished`.
//!
//! Crash safety: state is committed before anything is sent, a member's work list with its job before its first
//! command. After a restart the engine
//! finds members that are Running without a task and hands the same work (same id) to the executor again, which
//! resumes it from its stored progress; operation ids derive from (run, member, attempt, node, step), so a step the
//! agent already did is answered with its first result and never done twice.

use crate::executor::{Executor, JobSpec, NodeEvent};
use crate::fleet::{Fleet, now_ms};
use crate::ledger::run_holder;
use crate::store::runparts::{self, RunWrite};
use crate::store::{EventRecord, NewEvent, NodeRecord, RunRecord, Store, StoreError};
use chrono::{DateTime, Utc};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, broadcast};
use upkeep_core::run::{
    self, Action, Catalog, LevelRef, MemberTarget, Plan, RunOpError, RunState, Status, UpgradeType,
};
use upkeep_core::work::{Operation, WorkNode, WorkPlan, plan_work};

/// Longest time between two planning passes even when nothing happens.
pub const MAX_IDLE: Duration = Duration::from_secs(30);

/// Engine failures, mapped to gRPC statuses by the operator API.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The core refused the operation (wrong state, unknown level, invalid spec).
    #[error(transparent)]
    Run(#[from] RunOpError),
    /// The store failed or conflicted.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No such run.
    #[error("run {0:?} not found; see `upkeepctl run list`")]
    NoSuchRun(String),
    /// Planning panicked (a bug, or stored data nothing should hold); the state is unchanged.
    #[error("run {run:?}: planning failed unexpectedly: {reason}")]
    Unexpected {
        /// Run name.
        run: String,
        /// The panic's message.
        reason: String,
    },
    /// The stored state could not be read.
    #[error("run {run:?}: stored state unreadable: {reason}")]
    Corrupt {
        /// Run name.
        run: String,
        /// Why.
        reason: String,
    },
}

/// The engine.
pub struct Engine {
    fleet: Arc<Fleet>,
    wake: Notify,
    events: broadcast::Sender<EventRecord>,
    commit_lock: tokio::sync::Mutex<()>,
    executing: Mutex<HashSet<(String, String)>>,
    /// The last committed status of each run (node events carry it without re-reading the run).
    statuses: Mutex<std::collections::HashMap<String, String>>,
    /// Each run's state as last committed or read: planning starts from it, not from the store.
    runs: Mutex<HashMap<String, CachedRun>>,
    /// Member outcomes not recorded yet, by run: whoever takes the commit lock next records them all at once.
    /// With each batch, when its first outcome arrived (the start of the run's handoff, for the metrics).
    completions: Mutex<HashMap<String, (std::time::Instant, Vec<Completion>)>>,
    /// Runs whose stored version was planned in full (a plan or a member's result, which plans the rest) and
    /// when that plan asked to be woken: a pass skips them until one of the two moves, or something outside the
    /// run changed (`poke`).
    settled: Mutex<HashMap<String, Settled>>,
    /// Something outside the runs changed (operator request, catalog, the periodic pass): plan every run again.
    replan: std::sync::atomic::AtomicBool,
    executor: Arc<Executor>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The message of a caught panic.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

fn level_kind(l: &LevelRef) -> &'static str {
    match l {
        LevelRef::Run => "run",
        LevelRef::Stage { .. } => "stage",
        LevelRef::AfterStageWait { .. } => "wait",
        LevelRef::Group { .. } => "group",
        LevelRef::Member { .. } => "member",
    }
}

/// A stored run's state.
pub fn parse_state(rec: &RunRecord) -> Result<RunState, EngineError> {
    rec.state().map_err(|e| EngineError::Corrupt { run: rec.name.clone(), reason: e.to_string() })
}

/// A run as the engine last committed or read it.
#[derive(Clone)]
struct CachedRun {
    /// The store's version of it.
    version: u64,
    state: Arc<RunState>,
    /// Stored as one whole document (before parts): the next commit writes every part.
    whole: bool,
}

/// A run planned in full: the version planned and when its plan asked to be woken.
type Settled = (u64, Option<DateTime<Utc>>);

/// A member's upgrade outcome waiting to be recorded (several are recorded in one commit).
type Completion = (String, Result<(), String>);

/// What a commit made: the new state and the plan.
type Committed = (Arc<RunState>, Plan);

/// What a commit plans: the plan and the state it leads to (`None`: the plan changes nothing).
type Step = Result<(Plan, Option<RunState>), RunOpError>;

/// A plan made by an operation that returns only the plan, with the state it leads to.
fn applied(current: &RunState, plan: Result<Plan, RunOpError>) -> Step {
    let p = plan?;
    let next = if p.is_empty() { None } else { Some(run::apply(current, &p)?) };
    Ok((p, next))
}

/// How often a commit that lost a compare-and-swap is planned again from the stored state.
const COMMIT_ATTEMPTS: usize = 3;

/// Serialises a run state for the store.
pub fn state_json(state: &RunState) -> String {
    serde_json::to_string(state).unwrap_or_else(|e| format!("{{\"unserialisable\": {:?}}}", e.to_string()))
}

impl Engine {
    /// A new engine over `fleet`; member upgrades go to `executor`, whose node events land in the runs' logs.
    pub fn new(fleet: Arc<Fleet>, executor: Arc<Executor>) -> Arc<Engine> {
        let engine = Arc::new(Engine {
            fleet,
            wake: Notify::new(),
            events: broadcast::channel(4096).0,
            commit_lock: tokio::sync::Mutex::new(()),
            executing: Mutex::new(HashSet::new()),
            statuses: Mutex::new(std::collections::HashMap::new()),
            runs: Mutex::new(HashMap::new()),
            completions: Mutex::new(HashMap::new()),
            settled: Mutex::new(HashMap::new()),
            replan: std::sync::atomic::AtomicBool::new(true),
            executor: executor.clone(),
        });
        let weak = Arc::downgrade(&engine);
        executor.set_event_sink(Arc::new(move |e: NodeEvent| {
            if let Some(engine) = weak.upgrade() {
                engine.node_event(&e);
            }
        }));
        engine
    }

    fn store(&self) -> &dyn Store {
        self.fleet.store()
    }

    /// Live events (after they are committed).
    pub fn subscribe(&self) -> broadcast::Receiver<EventRecord> {
        self.events.subscribe()
    }

    /// Publishes events just committed: to this hub's watchers, and (hub replicas) to the other replicas'.
    fn publish(&self, run: &str, stored: Vec<EventRecord>) {
        if let (Some(relay), Some(first)) = (self.fleet.relay(), stored.iter().map(|e| e.seq).min()) {
            relay.run_events(run, first.saturating_sub(1));
        }
        for e in stored {
            let _ = self.events.send(e);
        }
    }

    /// Publishes to this hub's watchers the events of `run` after `after` that another replica committed.
    pub fn publish_stored(&self, run: &str, after: u64) {
        match self.store().events_since(run, after) {
            Ok(events) => {
                for e in events {
                    let _ = self.events.send(e);
                }
            }
            Err(e) => tracing::warn!(run, error = %e, "reading events another replica committed"),
        }
    }

    /// Asks for a planning pass of every active run now (something outside the runs changed).
    pub fn poke(&self) {
        self.replan.store(true, std::sync::atomic::Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// Asks for a pass that plans only the runs that changed since they were last planned in full.
    fn nudge(&self) {
        self.wake.notify_one();
    }

    /// Runs the planning loop until the task is dropped.
    pub async fn run(self: Arc<Self>) {
        loop {
            let next = self.tick().await;
            let idle = next
                .map(|t| (t - Utc::now()).to_std().unwrap_or(Duration::from_millis(10)))
                .unwrap_or(MAX_IDLE)
                .clamp(Duration::from_millis(10), MAX_IDLE);
            tokio::select! {
                _ = self.wake.notified() => {}
                // The periodic pass plans everything again (what nodes reported since is taken into account).
                _ = tokio::time::sleep(idle) => self.replan.store(true, std::sync::atomic::Ordering::Relaxed),
            }
        }
    }

    /// One planning pass over every active run; returns the earliest wakeup any plan asked for.
    pub async fn tick(self: &Arc<Self>) -> Option<DateTime<Utc>> {
        let runs = match self.store().run_versions() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "listing runs");
                return None;
            }
        };
        let mut next: Option<DateTime<Utc>> = None;
        let known: HashSet<&str> = runs.iter().map(|(n, _, _)| n.as_str()).collect();
        lock(&self.runs).retain(|name, _| known.contains(name.as_str()));
        lock(&self.settled).retain(|name, _| known.contains(name.as_str()));
        let everything = self.replan.swap(false, std::sync::atomic::Ordering::Relaxed);
        let now = Utc::now();
        for (name, _, status) in &runs {
            // A status the store does not know (a state stored whole and unreadable) is read to find out.
            if !matches!(status.as_str(), "Running" | "Pending" | "Stopping" | "") {
                continue;
            }
            let Ok(cached) = self.cached(name) else { continue };
            if !matches!(cached.state.run.status, Status::Running | Status::Pending | Status::Stopping) {
                continue;
            }
            let settled = lock(&self.settled).get(name.as_str()).copied();
            if !everything
                && let Some((version, wake)) = settled
                && version == cached.version
                && wake.is_none_or(|w| now < w)
            {
                if let Some(w) = wake {
                    next = Some(next.map_or(w, |n| n.min(w)));
                }
                self.resume_orphans(name);
                continue;
            }
            match self.plan_run(name).await {
                Ok((_, plan)) => {
                    if let Some(w) = plan.next_wakeup {
                        next = Some(next.map_or(w, |n| n.min(w)));
                    }
                }
                Err(e) => tracing::error!(run = %name, error = %e, "planning"),
            }
            self.resume_orphans(name);
        }
        next
    }

    /// The run as last committed, read from the store when the cached copy is missing or older than the store's.
    fn cached(&self, name: &str) -> Result<CachedRun, EngineError> {
        let stored_version = self.store().run_version(name)?.ok_or_else(|| EngineError::NoSuchRun(name.to_string()))?;
        if let Some(c) = lock(&self.runs).get(name)
            && c.version == stored_version
        {
            return Ok(c.clone());
        }
        self.load(name)
    }

    /// Reads a run from the store into the cache.
    fn load(&self, name: &str) -> Result<CachedRun, EngineError> {
        let rec = self.store().get_run(name)?.ok_or_else(|| EngineError::NoSuchRun(name.to_string()))?;
        let state = parse_state(&rec)?;
        let whole = rec.parts.iter().any(|(k, _)| k == runparts::WHOLE);
        let c = CachedRun { version: rec.version, state: Arc::new(state), whole };
        lock(&self.runs).insert(name.to_string(), c.clone());
        Ok(c)
    }

    /// Members that are Running in the store but have no executor (after a hub restart) get one again.
    fn resume_orphans(self: &Arc<Self>, run_name: &str) {
        let Some(c) = lock(&self.runs).get(run_name).cloned() else { return };
        for m in c.state.members() {
            if m.level.status == Status::Running
                && let Some(target) = &m.target
            {
                self.spawn_member(run_name, &c.state, &m.name, target.clone(), m.work.clone());
            }
        }
    }

    /// Plans with `f` under the commit lock, applies, commits state and events, publishes them, then acts.
    pub async fn transact<F>(self: &Arc<Self>, name: &str, f: F) -> Result<(Arc<RunState>, Plan), EngineError>
    where
        F: Fn(&RunState, &run::Fleet, &Catalog, DateTime<Utc>) -> Result<Plan, RunOpError>,
    {
        let _guard = self.commit_lock.lock().await;
        // A hub replica that does not lead (`crate::cluster`) applies other replicas' writes as the relay delivers
        // them; it reads the view again here so that a write another replica committed a moment ago (an image
        // published through it just before this run request) is certainly seen.
        if !self.fleet.leads() {
            self.fleet.view().reload()?;
        }
        self.commit(name, false, |s, fl, c, now| applied(s, f(s, fl, c, now)))
    }

    /// A full planning pass of one run (`run::plan`): the run is then settled at the version it leaves.
    async fn plan_run(self: &Arc<Self>, name: &str) -> Result<(Arc<RunState>, Plan), EngineError> {
        let _guard = self.commit_lock.lock().await;
        self.commit(name, true, |s, fl, c, now| {
            let (p, next) = run::plan_and_apply(s, fl, c, now);
            let next = (!p.is_empty()).then_some(next);
            Ok((p, next))
        })
    }

    /// Records the member outcomes queued for `run`, all in one commit (none if another task took them).
    async fn record_completions(self: &Arc<Self>, run_name: &str) {
        let _guard = self.commit_lock.lock().await;
        let Some((first_at, queued)) = lock(&self.completions).remove(run_name) else { return };
        if queued.is_empty() {
            return;
        }
        // All of them recorded, then the rest of the run planned once (`members_finished_and_apply` settles it).
        let refused: Mutex<Vec<Result<(), RunOpError>>> = Mutex::new(Vec::new());
        let outcome = self.commit(run_name, true, |s, fl, c, now| {
            let (p, next, each) = run::members_finished_and_apply(s, &queued, fl, c, now);
            *lock(&refused) = each;
            let next = (!p.is_empty()).then_some(next);
            Ok((p, next))
        });
        drop(_guard);
        // Handoff: a member's result arrived, and the members it let go started (in this one commit).
        if let Ok((_, plan)) = &outcome
            && plan.actions.iter().any(|a| matches!(a, Action::StartMember { .. }))
        {
            self.fleet.counters().handoff(first_at.elapsed());
        }
        let failures: Vec<(String, EngineError)> = match outcome {
            Ok(_) => queued
                .iter()
                .zip(refused.into_inner().unwrap_or_else(|e| e.into_inner()))
                .filter_map(|((m, _), r)| r.err().map(|e| (m.clone(), EngineError::from(e))))
                .collect(),
            Err(e) => {
                let reason = e.to_string();
                queued
                    .iter()
                    .map(|(m, _)| {
                        (m.clone(), EngineError::Unexpected { run: run_name.to_string(), reason: reason.clone() })
                    })
                    .collect()
            }
        };
        for (member, e) in failures {
            tracing::error!(run = %run_name, member = %member, error = %e, "recording member result");
            self.fail_unrecorded(run_name, &member, &e).await;
        }
    }

    /// Plans with `f` (a plan and the state it leads to), commits the new state's changed parts and the plan's
    /// events in one transaction, publishes the events, then acts. A commit that lost the compare-and-swap (the run
    /// changed underneath) is planned again from the stored state. The caller holds the commit lock. `settles`: `f`
    /// plans the whole run (the run is settled at the version it leaves, and passes skip it until it changes or
    /// its wakeup comes).
    fn commit<F>(self: &Arc<Self>, name: &str, settles: bool, f: F) -> Result<Committed, EngineError>
    where
        F: Fn(&RunState, &run::Fleet, &Catalog, DateTime<Utc>) -> Step,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let cached = self.cached(name)?;
            let (fleet, catalog) = self.views()?;
            let now = Utc::now();
            // Core decides without panicking on anything stored; should it panic anyway, the run is left as it was
            // and the error says why, and the hub keeps serving.
            let planned =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&cached.state, &fleet, &catalog, now)))
                    .map_err(|p| EngineError::Unexpected {
                        run: name.to_string(),
                        reason: panic_message(p.as_ref()),
                    })?;
            // Let go of the snapshot before the store write: a view still shared is copied at the next snapshot.
            drop((fleet, catalog));
            let (plan, new_state) = planned?;
            let Some(new_state) = new_state else {
                if settles {
                    lock(&self.settled).insert(name.to_string(), (cached.version, plan.next_wakeup));
                }
                return Ok((cached.state, plan));
            };
            let run_status = new_state.run.status.as_str().to_string();
            let events: Vec<NewEvent> = plan
                .transitions
                .iter()
                .map(|t| NewEvent {
                    at_ms: t.at.timestamp_millis(),
                    kind: level_kind(&t.level).to_string(),
                    level: t.level.to_string(),
                    from: t.from.as_str().to_string(),
                    to: t.to.as_str().to_string(),
                    message: t.message.clone(),
                    error: t.error.clone().unwrap_or_default(),
                    run_status: run_status.clone(),
                })
                .collect();
            let write = if cached.whole {
                RunWrite::Replace(runparts::split(&new_state))
            } else {
                runparts::changes(&cached.state, &new_state)
            };
            // Persist, then act.
            let writing = std::time::Instant::now();
            let committed = self.store().commit_run(name, cached.version, &run_status, &write, &events);
            self.fleet.counters().run_commit(writing.elapsed());
            let stored = match committed {
                Ok(stored) => stored,
                Err(StoreError::Conflict(_)) if attempt < COMMIT_ATTEMPTS => {
                    lock(&self.runs).remove(name);
                    continue;
                }
                Err(e) => {
                    lock(&self.runs).remove(name);
                    return Err(e.into());
                }
            };
            let new_state = Arc::new(new_state);
            if settles {
                lock(&self.settled).insert(name.to_string(), (cached.version + 1, plan.next_wakeup));
            }
            lock(&self.runs).insert(
                name.to_string(),
                CachedRun { version: cached.version + 1, state: new_state.clone(), whole: false },
            );
            lock(&self.statuses).insert(name.to_string(), run_status.clone());
            self.executor.ledger().note_run(name, &new_state);
            self.publish(name, stored);
            for action in &plan.actions {
                match action {
                    Action::StartMember { member, target, work } => {
                        self.spawn_member(name, &new_state, member, target.clone(), Some(work.clone()))
                    }
                }
            }
            return Ok((new_state, plan));
        }
    }

    /// Hands a member's upgrade to the executor. `work`: the plan from the `StartMember` action (None when a
    /// restarted hub resumes a Running member: its job, stored before its first command, holds the plan; a member
    /// whose job was never stored had nothing done yet and is planned again from its nodes).
    fn spawn_member(
        self: &Arc<Self>,
        run_name: &str,
        state: &RunState,
        member: &str,
        target: MemberTarget,
        work: Option<WorkPlan>,
    ) {
        let key = (run_name.to_string(), member.to_string());
        if !self.executing.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone()) {
            return;
        }
        let Some(ms) = state.member(member) else {
            self.executing.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
            return;
        };
        let engine = self.clone();
        let run = run_name.to_string();
        let member = member.to_string();
        let upgrade_type = state.upgrade_type();
        let attempt = ms.attempts;
        let stored_work = work;
        let key2 = key.clone();
        let started = self.fleet.spawn_work(async move {
            let outcome = engine.upgrade_member(&run, &member, upgrade_type, &target, attempt, stored_work).await;
            match &outcome {
                Ok(()) => tracing::info!(run = %run, member = %member, "member upgrade done"),
                Err(e) => tracing::warn!(run = %run, member = %member, error = %e, "member upgrade failed"),
            }
            lock(&engine.completions)
                .entry(run.clone())
                .or_insert_with(|| (std::time::Instant::now(), Vec::new()))
                .1
                .push((member.clone(), outcome));
            engine.record_completions(&run).await;
            engine.executing.lock().unwrap_or_else(|e| e.into_inner()).remove(&(run.clone(), member.clone()));
            // The result was planned with; a pass resumes a member started again while this task still ran.
            engine.nudge();
        });
        if !started {
            // This replica does not lead: the leader's next pass finds the member Running without a task.
            self.executing.lock().unwrap_or_else(|e| e.into_inner()).remove(&key2);
        }
    }

    /// Forgets every task this process had under way (a replica that becomes the leader: its earlier tasks were
    /// stopped with its previous term), so that the next pass resumes unfinished members from the store.
    pub fn forget_tasks(&self) {
        lock(&self.executing).clear();
        lock(&self.runs).clear();
        lock(&self.settled).clear();
        lock(&self.completions).clear();
        self.replan.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Asks for a pass that plans the runs whose stored version moved (another replica wrote them).
    pub fn check_stored(&self) {
        self.nudge();
    }

    /// Recording a member's result failed for a reason other than the member no longer being Running: the member
    /// fails with that reason (with planning, then, if that fails too, alone), so it never stays Running with
    /// nothing upgrading it, also after a restart.
    async fn fail_unrecorded(self: &Arc<Self>, run_name: &str, member: &str, e: &EngineError) {
        if matches!(
            e,
            EngineError::Run(RunOpError::Refused(_) | RunOpError::UnknownLevel(_)) | EngineError::NoSuchRun(_)
        ) {
            return;
        }
        let reason = format!("the hub could not record the result of this member's upgrade: {e}");
        let planned = self
            .transact(run_name, |s, f, c, now| run::member_finished(s, member, Err(reason.clone()), f, c, now))
            .await;
        let Err(e2) = planned else { return };
        tracing::error!(run = %run_name, member, error = %e2, "recording the member's failure; failing it alone");
        if let Err(e3) = self.transact(run_name, |s, _, _, now| run::fail_member_only(s, member, &reason, now)).await {
            tracing::error!(run = %run_name, member, error = %e3, "failing the member");
        }
    }

    /// Hands a member's upgrade to the executor: the work list the planner decided when the member started (a
    /// state written before work lists existed gets one planned now from the member's nodes).
    async fn upgrade_member(
        &self,
        run_name: &str,
        member: &str,
        upgrade_type: UpgradeType,
        target: &MemberTarget,
        attempt: u32,
        stored: Option<WorkPlan>,
    ) -> Result<(), String> {
        let settings = self.store().member_settings(member).map_err(|e| e.to_string())?;
        let plan = match stored {
            Some(p) => p,
            None => {
                let nodes = self.fleet.view().member_nodes(member);
                plan_work(
                    &Operation::RunUpgrade {
                        upgrade_type,
                        kubernetes: target.kubernetes_version,
                        images: target.images.clone(),
                    },
                    &nodes,
                    settings.budget(),
                )
            }
        };
        let spec = JobSpec {
            id: format!("run/{run_name}/{member}/{attempt}"),
            member: member.to_string(),
            holder: run_holder(run_name, member),
            purpose: format!("update run {run_name:?}: {target}"),
            plan,
            outside_window: true,
            forced: false,
            drain: settings.drain(),
            run: Some(run_name.to_string()),
        };
        tracing::info!(run = %run_name, member, job = %spec.id, "member upgrade started");
        let end = self.executor.execute(spec).await.map_err(|e| e.to_string())?;
        end.result()
    }

    /// The executor member upgrades go to (its stored work shows a member's node progress).
    pub fn executor(&self) -> &Arc<Executor> {
        &self.executor
    }

    /// Writes a node event of run work into its run's event log (the executor's event sink).
    pub fn node_event(&self, e: &NodeEvent) {
        let Some(run) = &e.run else { return };
        let status = self.statuses.lock().unwrap_or_else(|e| e.into_inner()).get(run).cloned().unwrap_or_default();
        let ev = NewEvent {
            at_ms: now_ms(),
            kind: "node".into(),
            level: format!("node {:?} of member {:?}", e.node, e.member),
            from: e.from.into(),
            to: e.to.into(),
            message: e.message.clone(),
            error: e.error.clone(),
            run_status: status,
        };
        match self.store().append_events(run, &[ev]) {
            Ok(stored) => self.publish(run, stored),
            Err(err) => tracing::error!(run = %run, node = %e.node, error = %err, "recording node event"),
        }
    }

    /// The planner's inputs: the hub's in-memory view of members (with their nodes and settings) and the
    /// catalog, current with the store's last write (`crate::store::view`).
    pub fn views(&self) -> Result<(Arc<run::Fleet>, Arc<Catalog>), EngineError> {
        Ok(self.fleet.view().snapshot())
    }
}

/// What the work planner needs to know about a node (`upkeep_core::work::plan_work`).
pub fn work_node(n: &NodeRecord) -> WorkNode {
    crate::store::view::work_node_of(&n.name, &n.facts)
}
