//! The run engine: load -> core::run::plan -> persist -> act -> publish.
//!
//! Every decision comes out of `upkeep_core::run` (plan, start, stop, skip, member_finished). The engine only
//! builds the planner's inputs from the store (fleet view, catalog), commits the new state and its events in
//! one transaction, and then carries out the plan's actions: a member upgrade walks the member's nodes pool by
//! pool within `max_unavailable` through the agent sessions (cordon, drain, upgrade, uncordon) and reports the
//! outcome back through `member_finished`.
//!
//! Crash safety: state is committed before anything is sent. After a restart the engine finds members that
//! are Running without an executor and starts their executors again; every node step carries an operation id
//! derived from (run, member, attempt, node, step), so a step the agent already did is answered with its
//! first result and never done twice.

use crate::fleet::{CommandError, Fleet, now_ms};
use crate::store::{EventRecord, ImageRecord, NewEvent, NodeRecord, Store, StoreError};
use chrono::{DateTime, TimeZone, Utc};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, broadcast};
use upkeep_core::concurrency::Limit;
use upkeep_core::run::{
    self, Action, Catalog, LevelRef, MemberTarget, MemberView, NodePoolView, Plan, RunOpError, RunState, Status,
    UpgradeType,
};
use upkeep_core::schedule::MaintenanceSchedule;
use upkeep_core::version::{ImageVersion, KubernetesVersion, NodeImageVersion};
use upkeep_proto::v1;

/// How often a member executor looks again at leases held in its member.
const LEASE_RECHECK: Duration = Duration::from_secs(2);

/// Longest time between two planning passes even when nothing happens.
pub const MAX_IDLE: Duration = Duration::from_secs(30);

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
    limits: StepLimits,
}

fn ms_to_time(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or(DateTime::<Utc>::MIN_UTC)
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

/// Parses a stored run state.
pub fn parse_state(run: &str, json: &str) -> Result<RunState, EngineError> {
    serde_json::from_str(json).map_err(|e| EngineError::Corrupt { run: run.to_string(), reason: e.to_string() })
}

/// Serialises a run state for the store.
pub fn state_json(state: &RunState) -> String {
    serde_json::to_string(state).unwrap_or_else(|e| format!("{{\"unserialisable\": {:?}}}", e.to_string()))
}

impl Engine {
    /// A new engine over `fleet`.
    pub fn new(fleet: Arc<Fleet>, limits: StepLimits) -> Arc<Engine> {
        Arc::new(Engine {
            fleet,
            wake: Notify::new(),
            events: broadcast::channel(4096).0,
            commit_lock: tokio::sync::Mutex::new(()),
            executing: Mutex::new(HashSet::new()),
            statuses: Mutex::new(std::collections::HashMap::new()),
            limits,
        })
    }

    fn store(&self) -> &dyn Store {
        self.fleet.store()
    }

    /// Live events (after they are committed).
    pub fn subscribe(&self) -> broadcast::Receiver<EventRecord> {
        self.events.subscribe()
    }

    /// Asks for a planning pass now.
    pub fn poke(&self) {
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
                _ = tokio::time::sleep(idle) => {}
            }
        }
    }

    /// One planning pass over every active run; returns the earliest wakeup any plan asked for.
    pub async fn tick(self: &Arc<Self>) -> Option<DateTime<Utc>> {
        let runs = match self.store().list_runs() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "listing runs");
                return None;
            }
        };
        let mut next: Option<DateTime<Utc>> = None;
        for rec in runs {
            let Ok(state) = parse_state(&rec.name, &rec.state) else { continue };
            if !matches!(state.run.status, Status::Running | Status::Pending | Status::Stopping) {
                continue;
            }
            match self.transact(&rec.name, |s, f, c, now| Ok(run::plan(s, f, c, now))).await {
                Ok((_, plan)) => {
                    if let Some(w) = plan.next_wakeup {
                        next = Some(next.map_or(w, |n| n.min(w)));
                    }
                }
                Err(e) => tracing::error!(run = %rec.name, error = %e, "planning"),
            }
            self.resume_orphans(&rec.name);
        }
        next
    }

    /// Members that are Running in the store but have no executor (after a hub restart) get one again.
    fn resume_orphans(self: &Arc<Self>, run_name: &str) {
        let Ok(Some(rec)) = self.store().get_run(run_name) else { return };
        let Ok(state) = parse_state(run_name, &rec.state) else { return };
        for m in state.members() {
            if m.level.status == Status::Running
                && let Some(target) = &m.target
            {
                self.spawn_member(run_name, &state, &m.name, target.clone());
            }
        }
    }

    /// Plans with `f` under the commit lock, applies, commits state and events, publishes them, then acts.
    pub async fn transact<F>(self: &Arc<Self>, name: &str, f: F) -> Result<(RunState, Plan), EngineError>
    where
        F: FnOnce(&RunState, &run::Fleet, &Catalog, DateTime<Utc>) -> Result<Plan, RunOpError>,
    {
        let _guard = self.commit_lock.lock().await;
        let rec = self.store().get_run(name)?.ok_or_else(|| EngineError::NoSuchRun(name.to_string()))?;
        let state = parse_state(name, &rec.state)?;
        let (fleet, catalog) = self.views()?;
        let now = Utc::now();
        let plan = f(&state, &fleet, &catalog, now)?;
        if plan.is_empty() {
            return Ok((state, plan));
        }
        let new_state = run::apply(&state, &plan)?;
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
        // Persist, then act.
        let stored = self.store().commit_run(name, &rec.state, &state_json(&new_state), &events)?;
        self.statuses.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), run_status.clone());
        for e in stored {
            let _ = self.events.send(e);
        }
        for action in &plan.actions {
            match action {
                Action::StartMember { member, target } => self.spawn_member(name, &new_state, member, target.clone()),
            }
        }
        Ok((new_state, plan))
    }

    fn spawn_member(self: &Arc<Self>, run_name: &str, state: &RunState, member: &str, target: MemberTarget) {
        let key = (run_name.to_string(), member.to_string());
        if !self.executing.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone()) {
            return;
        }
        let Some(ms) = state.member(member) else { return };
        let job = MemberJob {
            run: run_name.to_string(),
            member: member.to_string(),
            upgrade_type: state.upgrade_type(),
            target,
            attempt: ms.attempts,
            generation: ms.level.started_at.map(|t| t.timestamp_millis() as u64).unwrap_or(1),
        };
        let engine = self.clone();
        tokio::spawn(async move {
            tracing::info!(run = %job.run, member = %job.member, target = %job.target, "member upgrade started");
            let outcome = engine.upgrade_member(&job).await;
            match &outcome {
                Ok(()) => tracing::info!(run = %job.run, member = %job.member, "member upgrade done"),
                Err(e) => tracing::warn!(run = %job.run, member = %job.member, error = %e, "member upgrade failed"),
            }
            let result = engine
                .transact(&job.run, |s, f, c, now| run::member_finished(s, &job.member, outcome.clone(), f, c, now))
                .await;
            if let Err(e) = result {
                tracing::error!(run = %job.run, member = %job.member, error = %e, "recording member result");
            }
            engine.executing.lock().unwrap_or_else(|e| e.into_inner()).remove(&(job.run.clone(), job.member.clone()));
            engine.poke();
        });
    }

    /// The planner's inputs, built from the inventory, member settings and the catalog.
    pub fn views(&self) -> Result<(run::Fleet, Catalog), EngineError> {
        let nodes = self.store().list_nodes(None)?;
        let mut by_member: BTreeMap<String, Vec<&NodeRecord>> = BTreeMap::new();
        for n in &nodes {
            by_member.entry(n.facts.member.clone()).or_default().push(n);
        }
        let mut fleet = run::Fleet::default();
        let all_settings: std::collections::HashMap<String, crate::store::MemberSettings> =
            self.store().all_member_settings()?.into_iter().map(|s| (s.member.clone(), s)).collect();
        let defaults = crate::store::MemberSettings {
            member: String::new(),
            node_os_schedule: None,
            cluster_schedule: None,
            max_unavailable: "1".into(),
        };
        for (member, nodes) in by_member {
            let settings = all_settings.get(&member).unwrap_or(&defaults);
            let schedule = |j: &Option<String>| -> Option<MaintenanceSchedule> {
                j.as_deref().and_then(|s| serde_json::from_str(s).ok())
            };
            fleet.members.insert(
                member.clone(),
                member_view(&nodes, schedule(&settings.node_os_schedule), schedule(&settings.cluster_schedule)),
            );
        }
        let mut catalog = Catalog::default();
        for img in self.store().list_images(None)? {
            let Ok(version) = img.version.parse::<ImageVersion>() else { continue };
            let regions = img.regions.iter().map(|(r, ms)| (r.clone(), ms_to_time(*ms))).collect();
            catalog.images.entry(img.family.clone()).or_default().insert(version, regions);
        }
        for (version, regions) in self.store().list_kubernetes()? {
            let Ok(v) = version.parse::<KubernetesVersion>() else { continue };
            catalog.kubernetes.insert(v, regions.iter().map(|(r, ms)| (r.clone(), ms_to_time(*ms))).collect());
        }
        Ok((fleet, catalog))
    }

    async fn upgrade_member(&self, job: &MemberJob) -> Result<(), String> {
        let nodes = self.store().list_nodes(Some(&job.member)).map_err(|e| e.to_string())?;
        let settings = self.store().member_settings(&job.member).map_err(|e| e.to_string())?;
        let limit: Limit = settings.max_unavailable.parse().unwrap_or(Limit::Count(1));
        let images = self.store().list_images(None).map_err(|e| e.to_string())?;
        let mut pools: BTreeMap<String, Vec<&NodeRecord>> = BTreeMap::new();
        for n in &nodes {
            pools.entry(n.facts.node_pool.clone()).or_default().push(n);
        }
        // Control-plane pools first (Full upgrades the control plane before the other pools).
        let mut order: Vec<(&String, &Vec<&NodeRecord>)> = pools.iter().collect();
        order.sort_by_key(|(name, ns)| (!ns.iter().any(|n| n.facts.control_plane), (*name).clone()));
        for (pool, pool_nodes) in order {
            let work: Vec<NodeWork> = pool_nodes
                .iter()
                .filter_map(|n| node_work(job, pool, n, &images))
                .collect::<Result<Vec<_>, String>>()?
                .into_iter()
                .flatten()
                .collect();
            if work.is_empty() {
                continue;
            }
            let batch = limit.resolve(pool_nodes.len() as u32).max(1) as usize;
            for chunk in work.chunks(batch) {
                self.wait_for_leases(job).await?;
                let results = futures::future::join_all(chunk.iter().map(|w| self.upgrade_node(job, w))).await;
                let failures: Vec<String> = results.into_iter().filter_map(Result::err).collect();
                if !failures.is_empty() {
                    return Err(failures.join("; "));
                }
            }
        }
        Ok(())
    }

    /// Waits until no node of the member is out of service under a lease (a node rebooting on its own, or a
    /// channel rollout finishing the node it had started): the run and the leases share the member's budget.
    /// New leases are not granted while the member is Running in a run, so this wait ends; leases of silent
    /// holders expire.
    async fn wait_for_leases(&self, job: &MemberJob) -> Result<(), String> {
        let mut logged = false;
        loop {
            let now = now_ms();
            let held: Vec<String> = self
                .store()
                .list_leases()
                .map_err(|e| e.to_string())?
                .into_iter()
                .filter(|l| l.member == job.member && l.expires_ms > now)
                .map(|l| format!("{} ({})", l.node, l.purpose))
                .collect();
            if held.is_empty() {
                return Ok(());
            }
            if !logged {
                tracing::info!(run = %job.run, member = %job.member, held = ?held, "waiting for leased nodes to come back");
                logged = true;
            }
            tokio::time::sleep(LEASE_RECHECK).await;
        }
    }

    async fn upgrade_node(&self, job: &MemberJob, w: &NodeWork) -> Result<(), String> {
        self.node_event(job, &w.node, "NotStarted", "Running", &format!("upgrading: {}", w.describe()), "");
        for (step, kind, limit) in w.steps(&self.limits) {
            let op_id = format!("{}/{}/{}/{}/{}", job.run, job.member, job.attempt, w.node, step);
            let r = self.fleet.command(&w.node, &op_id, job.generation, kind, limit).await;
            let err = match r {
                Ok(res) if res.ok => continue,
                Ok(res) => format!("node {}: {step} failed: {}", w.node, res.error),
                Err(CommandError::Silent { node, for_ms }) => {
                    format!("node {node} is Unknown: silent for {} s during {step}", for_ms / 1000)
                }
                Err(e) => format!("node {}: {step}: {e}", w.node),
            };
            self.node_event(job, &w.node, "Running", "Failed", &format!("{step} failed"), &err);
            return Err(err);
        }
        self.node_event(job, &w.node, "Running", "Completed", &format!("upgraded: {}", w.describe()), "");
        Ok(())
    }

    fn node_event(&self, job: &MemberJob, node: &str, from: &str, to: &str, message: &str, error: &str) {
        let status = self.statuses.lock().unwrap_or_else(|e| e.into_inner()).get(&job.run).cloned().unwrap_or_default();
        let e = NewEvent {
            at_ms: now_ms(),
            kind: "node".into(),
            level: format!("node {node:?} of member {:?}", job.member),
            from: from.into(),
            to: to.into(),
            message: message.into(),
            error: error.into(),
            run_status: status,
        };
        match self.store().append_events(&job.run, &[e]) {
            Ok(stored) => {
                for e in stored {
                    let _ = self.events.send(e);
                }
            }
            Err(err) => tracing::error!(run = %job.run, node, error = %err, "recording node event"),
        }
    }
}

/// One member's upgrade as handed to its executor.
#[derive(Debug, Clone)]
struct MemberJob {
    run: String,
    member: String,
    upgrade_type: UpgradeType,
    target: MemberTarget,
    attempt: u32,
    generation: u64,
}

/// What one node needs.
#[derive(Debug, Clone)]
struct NodeWork {
    node: String,
    kubernetes: Option<KubernetesVersion>,
    image: Option<(NodeImageVersion, v1::ImageRef)>,
}

impl NodeWork {
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(k) = self.kubernetes {
            parts.push(format!("Kubernetes {k}"));
        }
        if let Some((img, _)) = &self.image {
            parts.push(format!("image {img}"));
        }
        parts.join(", ")
    }

    fn steps(&self, limits: &StepLimits) -> Vec<(&'static str, v1::command::Kind, Duration)> {
        use v1::command::Kind;
        let mut steps = vec![
            ("cordon", Kind::Cordon(v1::Cordon {}), limits.quick),
            ("drain", Kind::Drain(v1::Drain { timeout_seconds: limits.drain.as_secs() as u32 }), limits.drain),
        ];
        if let Some(k) = self.kubernetes {
            steps.push((
                "upgrade-kubernetes",
                Kind::UpgradeKubernetes(v1::UpgradeKubernetes { version: k.to_string(), first_control_plane: false }),
                limits.upgrade,
            ));
        }
        if let Some((_, image)) = &self.image {
            steps.push((
                "reimage",
                Kind::Reimage(v1::Reimage { image: Some(image.clone()), allow_downgrade: false, reinstall: false }),
                limits.upgrade,
            ));
        }
        steps.push(("uncordon", Kind::Uncordon(v1::Uncordon {}), limits.quick));
        steps
    }
}

/// The work a node needs for `job`, or None when it is already at target. Err when the catalog lacks the image.
fn node_work(
    job: &MemberJob,
    pool: &str,
    n: &NodeRecord,
    images: &[ImageRecord],
) -> Option<Result<Option<NodeWork>, String>> {
    let kubernetes = match job.upgrade_type {
        UpgradeType::Full | UpgradeType::ControlPlaneOnly => job.target.kubernetes_version.filter(|k| {
            (job.upgrade_type == UpgradeType::Full || n.facts.control_plane)
                && n.facts.kubernetes_version.parse::<KubernetesVersion>().ok().is_none_or(|cur| cur < *k)
        }),
        UpgradeType::NodeImageOnly => None,
    };
    let image = if job.upgrade_type.changes_node_images() {
        match job.target.images.get(pool) {
            Some(target) if n.facts.node_image_version != target.label() => {
                let rec = images.iter().find(|i| i.family == target.family && i.version == target.version.to_string());
                let Some(rec) = rec else {
                    return Some(Err(format!("image {target} is not in the catalog")));
                };
                Some((
                    target.clone(),
                    v1::ImageRef {
                        family: rec.family.clone(),
                        version: rec.version.clone(),
                        url: rec.url.clone(),
                        sha256: rec.sha256.clone(),
                        signature: rec.signature.clone(),
                        size_bytes: rec.size_bytes,
                    },
                ))
            }
            _ => None,
        }
    } else {
        None
    };
    if kubernetes.is_none() && image.is_none() {
        return Some(Ok(None));
    }
    Some(Ok(Some(NodeWork { node: n.name.clone(), kubernetes, image })))
}

/// The planner's view of one member from its nodes.
fn member_view(
    nodes: &[&NodeRecord],
    node_os_schedule: Option<MaintenanceSchedule>,
    cluster_schedule: Option<MaintenanceSchedule>,
) -> MemberView {
    // The member's region is the one most of its nodes are in; pools elsewhere carry their own.
    let mut region_count: BTreeMap<&str, usize> = BTreeMap::new();
    for n in nodes {
        *region_count.entry(n.facts.region.as_str()).or_default() += 1;
    }
    let region = region_count
        .iter()
        .max_by_key(|(r, c)| (**c, std::cmp::Reverse(**r)))
        .map(|(r, _)| r.to_string())
        .unwrap_or_default();
    let mut pools: BTreeMap<&str, Vec<&NodeRecord>> = BTreeMap::new();
    for n in nodes {
        pools.entry(n.facts.node_pool.as_str()).or_default().push(n);
    }
    let node_pools = pools
        .into_iter()
        .filter_map(|(name, ns)| {
            let parsed: Vec<Option<NodeImageVersion>> =
                ns.iter().map(|n| n.facts.node_image_version.parse().ok()).collect();
            let family = parsed.iter().flatten().next()?.family.clone();
            let image_version = if parsed.iter().all(|p| p.as_ref().is_some_and(|v| v.family == family)) {
                parsed.iter().flatten().map(|v| v.version).min()
            } else {
                None
            };
            let pool_region = ns[0].facts.region.clone();
            Some(NodePoolView {
                name: name.to_string(),
                family,
                image_version,
                region: (pool_region != region).then_some(pool_region),
            })
        })
        .collect();
    let kubernetes_version = {
        let ks: Vec<Option<KubernetesVersion>> =
            nodes.iter().map(|n| n.facts.kubernetes_version.parse().ok()).collect();
        if ks.iter().all(Option::is_some) { ks.into_iter().flatten().min() } else { None }
    };
    MemberView { region, kubernetes_version, node_pools, node_os_schedule, cluster_schedule }
}
