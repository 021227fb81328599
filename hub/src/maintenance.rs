//! Channel auto-upgrades and reboots: what the hub does to members on its own (SPEC §2, §4).
//!
//! Nothing here touches a node. Every disruption is a piece of work handed to the one executor
//! (`crate::executor`), planned by `upkeep_core::work::plan_work`, under leases of the one ledger
//! (`crate::ledger`):
//!
//! - **Channel rollouts.** On every pass (a catalog, channel or window change pokes it; otherwise every
//!   [`MAX_IDLE`]) the loop asks `core::maintenance::desired_rollout` what each member's channel wants *per node*
//!   (the newest image of its family in its region for `NodeImage`, the newest security patch for
//!   `SecurityPatch`, a reimage to the current image after a channel switch). Every node behind its channel is
//!   shown as such (`node list`, `node show`, `member show`). A rollout starts inside the node OS window (without
//!   one: a *new* release at most once per cadence; nodes catching up to a release the member already rolled,
//!   such as nodes that joined later, may start any time), never while an update run upgrades the member. A node
//!   that failed a target is not given the same target again until a newer release.
//! - **Reboots a node asks for** (Unmanaged, SecurityPatch: the OS wants a reboot). The hub answers the node's
//!   lease request by taking the lease itself and rebooting the node through the executor (cordon, drain, reboot,
//!   uncordon); the node is told so and that no lease is handed to it.
//! - **Operator reboots and uncordons** (`upkeepctl node reboot [--force]`, `upkeepctl node uncordon`).
//!
//! Per node, the loop also keeps *why not now*: what a node behind its channel waits for (window closed: next
//! opening; budget in use: the holders; a run upgrading the member; the cadence) and when it is next eligible.

use crate::engine::work_node;
use crate::executor::{Executor, JobSpec, JobState, JobStatus};
use crate::fleet::{Fleet, now_ms};
use crate::ledger::{LeaseAsk, Ledger, time_of};
use crate::store::{NodeRecord, Store, StoreError};
use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use upkeep_core::channel::NodeOsChannel;
use upkeep_core::maintenance::{
    ChannelCatalog, LeaseDecision, NodeTask, NodeView, PatchRelease, Rollout, RolloutKind, desired_rollout, may_start,
};
use upkeep_core::schedule::MaintenanceSchedule;
use upkeep_core::version::ImageVersion;
use upkeep_core::work::{Operation, plan_work};
use upkeep_proto::v1;

/// Longest pause between two passes.
pub const MAX_IDLE: Duration = Duration::from_secs(30);

/// `[auto_upgrade]` in hub.toml.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoUpgradeSettings {
    /// Channel rollouts on (reboots are always served).
    pub enabled: bool,
    /// Without a node OS window: at most one start of a new release per member per this long.
    pub cadence: TimeDelta,
    /// A lease lapses this long after its holder was last heard from.
    pub lease_ttl: Duration,
}

impl Default for AutoUpgradeSettings {
    fn default() -> Self {
        AutoUpgradeSettings { enabled: true, cadence: TimeDelta::days(7), lease_ttl: Duration::from_secs(1800) }
    }
}

/// A member's channel rollouts as stored: the one under way (or the last), and what earlier ones did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutState {
    /// What and why.
    pub rollout: Rollout,
    /// Running, Completed or Failed.
    pub status: String,
    /// Nodes finished by this rollout.
    pub done: BTreeSet<String>,
    /// Node -> "<target>: <why>" for every node that failed a target (kept across rollouts: the same target is
    /// not given to that node again).
    pub failed: BTreeMap<String, String>,
    /// Started (Unix ms).
    pub started_ms: i64,
    /// Finished (Unix ms).
    #[serde(default)]
    pub finished_ms: Option<i64>,
    /// The channel-switch generation it settles, if it is a switch reimage.
    #[serde(default)]
    pub switch_generation: Option<u64>,
    /// The executor's work id of this rollout.
    #[serde(default)]
    pub job: String,
    /// How many rollouts the member has started (the next work id's number).
    #[serde(default)]
    pub seq: u64,
    /// Targets (`<family>-<version>`) earlier rollouts of the member rolled: nodes behind one of them catch up
    /// without waiting for the cadence.
    #[serde(default)]
    pub rolled: BTreeSet<String>,
    /// When the last rollout of a *new* release started (Unix ms): the cadence counts from it.
    #[serde(default)]
    pub release_started_ms: Option<i64>,
}

impl RolloutState {
    /// One line for `member show`.
    pub fn summary(&self) -> String {
        let total = self.rollout.tasks.len();
        let mut s = format!("{} {} ({} of {total} nodes done", self.rollout.id, self.status, self.done.len());
        let failed: Vec<String> = self
            .failed
            .iter()
            .filter(|(n, _)| self.rollout.tasks.contains_key(*n))
            .map(|(n, why)| format!("{n}: {why}"))
            .collect();
        if !failed.is_empty() {
            s.push_str(&format!("; failed: {}", failed.join("; ")));
        }
        s.push(')');
        s
    }
}

/// The target label of a node task (what "the same target" means).
fn target_of(t: &NodeTask) -> String {
    match t {
        NodeTask::Reimage { image, .. } => image.label(),
        NodeTask::Patch { family, version, .. } => format!("{family}-{version}"),
    }
}

/// Errors of the reboot and uncordon API, mapped to statuses by the gRPC layer.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No such node.
    #[error("node {0:?} not found; see `upkeepctl node list`")]
    NoSuchNode(String),
    /// The node is not connected, so it cannot be told.
    #[error("node {0:?} is not connected; it cannot reboot before it is back")]
    NotConnected(String),
    /// Not granted.
    #[error("{0}")]
    Denied(String),
}

impl From<LeaseError> for crate::peers::AskRefused {
    fn from(e: LeaseError) -> crate::peers::AskRefused {
        use crate::peers::AskRefused;
        match e {
            LeaseError::NoSuchNode(n) => AskRefused::NoSuchNode(n),
            LeaseError::NotConnected(n) => AskRefused::NotConnected(n),
            LeaseError::Denied(why) => AskRefused::Denied(why),
            LeaseError::Store(e) => AskRefused::Denied(format!("the leader's store failed: {e}")),
        }
    }
}

impl From<crate::peers::AskRefused> for LeaseError {
    fn from(e: crate::peers::AskRefused) -> LeaseError {
        use crate::peers::AskRefused;
        match e {
            AskRefused::NoSuchNode(n) => LeaseError::NoSuchNode(n),
            AskRefused::NotConnected(n) => LeaseError::NotConnected(n),
            AskRefused::Denied(why) => LeaseError::Denied(why),
        }
    }
}

/// Why a hub replica that does not lead refuses to start node work (`crate::cluster`): the leader does it.
const NOT_LEADER: &str = "this hub replica is not the leader, which carries out node work; send it to the replica \
                          that leads (its log says `became the leader`)";

/// Why a node is not being changed now although its channel wants it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeWhy {
    /// What its channel wants that it does not have.
    pub behind: String,
    /// What it waits for.
    pub waiting: String,
    /// When it is next eligible (Unix ms; 0 unknown or now).
    pub next_eligible_ms: i64,
}

/// The maintenance loop and reboot desk.
pub struct Maintenance {
    fleet: Arc<Fleet>,
    settings: AutoUpgradeSettings,
    executor: Arc<Executor>,
    wake: Notify,
    /// Told on every poke: what the schedule predicts may have changed (`crate::schedule::notices`).
    changed: Notify,
    /// Members whose rollout has a task in this process.
    executing: Mutex<HashSet<String>>,
    /// Why a member's channel waits (shown by `member show`), refreshed every pass.
    notes: Mutex<HashMap<String, String>>,
    /// Per node: behind its channel, and why not now (refreshed every pass).
    whys: Mutex<HashMap<String, NodeWhy>>,
    /// Per node: why the reboot it asked for waits (until it is granted).
    reboot_whys: Mutex<HashMap<String, NodeWhy>>,
}

/// A stored time. One out of bounds (2000..2200, refused at the door since; only a damaged or older store holds
/// one) reads as the calendar's end, "never": a release with a garbage time is never taken as already out.
fn ms_to_time(ms: i64) -> DateTime<Utc> {
    upkeep_core::limits::time_from_ms(ms).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn schedule_of(json: &Option<String>) -> Option<MaintenanceSchedule> {
    json.as_deref().and_then(|s| serde_json::from_str(s).ok())
}

/// A refusal that asks the node to ask again soon (the hub could not decide now).
pub fn lease_retry(req: &v1::LeaseRequest, why: &str) -> v1::LeaseAnswer {
    v1::LeaseAnswer {
        lease_id: req.lease_id.clone(),
        granted: false,
        reason: why.to_string(),
        retry_after_seconds: 10,
        ..Default::default()
    }
}

impl Maintenance {
    /// Over `fleet`, handing work to `executor`.
    pub fn new(fleet: Arc<Fleet>, settings: AutoUpgradeSettings, executor: Arc<Executor>) -> Arc<Maintenance> {
        Arc::new(Maintenance {
            fleet,
            settings,
            executor,
            wake: Notify::new(),
            changed: Notify::new(),
            executing: Mutex::new(HashSet::new()),
            notes: Mutex::new(HashMap::new()),
            whys: Mutex::new(HashMap::new()),
            reboot_whys: Mutex::new(HashMap::new()),
        })
    }

    pub(crate) fn store(&self) -> &dyn Store {
        self.fleet.store()
    }

    fn ledger(&self) -> &Arc<Ledger> {
        self.executor.ledger()
    }

    /// Asks for a pass now (catalog, channel or window changed, a lease was released).
    pub fn poke(&self) {
        self.wake.notify_one();
        self.changed.notify_one();
        self.ledger().poke();
    }

    /// Forgets the rollouts this process had under way (a replica that becomes the leader: they were stopped with
    /// its previous term; their state is in the store).
    pub fn forget_tasks(&self) {
        lock(&self.executing).clear();
    }

    /// Runs the loop until the task is dropped.
    pub async fn run(self: Arc<Self>) {
        self.resume_work();
        loop {
            let next = self.tick().await;
            let idle = next
                .map(|t| (t - Utc::now()).to_std().unwrap_or(Duration::from_millis(50)))
                .unwrap_or(MAX_IDLE)
                .clamp(Duration::from_millis(50), MAX_IDLE);
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(idle) => {}
            }
        }
    }

    /// After a restart: reboots and uncordons that were under way carry on (rollouts resume from their own
    /// state on the first pass, run members from the run engine).
    fn resume_work(self: &Arc<Self>) {
        let jobs = match self.executor.unfinished() {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(error = %e, "listing unfinished node work");
                return;
            }
        };
        for job in jobs {
            let id = &job.spec.id;
            if id.starts_with("reboot/") || id.starts_with("operator-") {
                self.spawn_job(job.spec);
            }
        }
    }

    fn spawn_job(self: &Arc<Self>, spec: JobSpec) {
        let executor = self.executor.clone();
        let me = self.clone();
        tokio::spawn(async move {
            match executor.execute(spec).await {
                Ok(end) => tracing::info!(job = %end.spec.id, status = end.status.as_str(), "{}", end.summary()),
                Err(e) => tracing::error!(error = %e, "node work"),
            }
            me.poke();
        });
    }

    /// The answer to a node's lease request: a refusal the node can act on (with its retry time) when the request
    /// is refused, `Err` only when the store failed.
    pub fn lease_answer(self: &Arc<Self>, node: &str, req: &v1::LeaseRequest) -> Result<v1::LeaseAnswer, StoreError> {
        match self.request_lease(node, req) {
            Ok(a) => Ok(a),
            Err(LeaseError::Store(e)) => Err(e),
            Err(e) => Ok(v1::LeaseAnswer {
                lease_id: req.lease_id.clone(),
                granted: false,
                reason: e.to_string(),
                retry_after_seconds: 60,
                ..Default::default()
            }),
        }
    }

    /// Nodes that hold a lease this hub granted (their leases stay alive while they are heard from).
    pub fn lease_holders(&self) -> Vec<String> {
        self.ledger().holders()
    }

    // ---- reboots and uncordons ----

    /// A node asks for a reboot lease: the hub takes the lease and reboots the node itself (cordon, drain,
    /// reboot, uncordon). The answer never grants the lease to the node; it says what the hub does or why not now.
    pub fn request_lease(self: &Arc<Self>, node: &str, req: &v1::LeaseRequest) -> Result<v1::LeaseAnswer, LeaseError> {
        let answer = |reason: String, retry: u32| v1::LeaseAnswer {
            lease_id: req.lease_id.clone(),
            granted: false,
            reason,
            expires_at_unix_ms: 0,
            retry_after_seconds: retry,
            forced: false,
        };
        if req.lease_id.trim().is_empty() || req.lease_id.len() > 200 {
            return Ok(answer(
                "lease_request.lease_id: empty or longer than 200 characters; send a stable id such as reboot/<boot id>"
                    .into(),
                60,
            ));
        }
        let rec = self.store().get_node(node)?.ok_or_else(|| LeaseError::NoSuchNode(node.to_string()))?;
        let id = format!("reboot/{node}/{}", req.lease_id);
        if let Some(job) = self.executor.stored(&id)? {
            return Ok(match job.status {
                JobStatus::Running => answer(format!("the hub is rebooting this node (work {id})"), 30),
                JobStatus::Completed => answer(format!("the hub rebooted this node (work {id})"), 60),
                JobStatus::Failed => answer(format!("the hub's reboot of this node failed: {}", job.summary()), 300),
            });
        }
        if !self.fleet.leads() {
            return Ok(answer(NOT_LEADER.to_string(), 10));
        }
        let purpose = if req.reason.is_empty() { "reboot".to_string() } else { req.reason.clone() };
        let holder = format!("reboot/{node}");
        let ask = LeaseAsk { lease_id: &id, holder: &holder, purpose: &purpose, outside_window: false, forced: false };
        match self.ledger().take(&rec.name, &rec.facts.member, &ask)? {
            LeaseDecision::Deny { reason, retry_after_seconds, .. } => {
                tracing::info!(node, lease = %req.lease_id, %reason, "reboot not now");
                let why = NodeWhy {
                    behind: String::new(),
                    waiting: format!("its reboot waits: {reason}"),
                    next_eligible_ms: now_ms() + i64::from(retry_after_seconds) * 1000,
                };
                lock(&self.reboot_whys).insert(node.to_string(), why);
                Ok(answer(reason, retry_after_seconds))
            }
            LeaseDecision::Grant | LeaseDecision::AlreadyHeld => {
                lock(&self.reboot_whys).remove(node);
                self.start_reboot(&rec, id.clone(), holder, purpose, false)?;
                Ok(answer(format!("the hub reboots this node as work {id} (cordon, drain, reboot, uncordon)"), 30))
            }
        }
    }

    fn start_reboot(
        self: &Arc<Self>,
        rec: &NodeRecord,
        id: String,
        holder: String,
        purpose: String,
        forced: bool,
    ) -> Result<(), StoreError> {
        let settings = self.store().member_settings(&rec.facts.member)?;
        let plan =
            plan_work(&Operation::Reboot { nodes: vec![rec.name.clone()] }, &[work_node(rec)], settings.budget());
        self.spawn_job(JobSpec {
            id,
            member: rec.facts.member.clone(),
            holder,
            purpose,
            plan,
            outside_window: forced,
            forced,
            drain: settings.drain(),
            run: None,
        });
        Ok(())
    }

    /// A node gives back leases it holds itself (see `Ledger::node_release`).
    pub fn release(&self, node: &str, rel: &v1::LeaseRelease) -> Result<(), StoreError> {
        self.ledger().node_release(node, &rel.lease_ids, rel.all_except)
    }

    /// The node was heard from: its leases stay alive.
    pub fn alive(&self, node: &str) {
        self.ledger().alive(node);
    }

    /// `upkeepctl node reboot`: takes a lease for the node now (outside the window when forced; the budget still
    /// holds) and reboots it through the executor. Returns the lease.
    pub fn operator_reboot(self: &Arc<Self>, node: &str, force: bool, operator: &str) -> Result<String, LeaseError> {
        let rec = self.store().get_node(node)?.ok_or_else(|| LeaseError::NoSuchNode(node.to_string()))?;
        if !self.fleet.is_connected(node) {
            return Err(LeaseError::NotConnected(node.to_string()));
        }
        if !self.fleet.leads() {
            return Err(LeaseError::Denied(NOT_LEADER.to_string()));
        }
        let id = format!("operator-reboot/{node}/{}", now_ms());
        let purpose = format!("reboot ordered by {operator}");
        let holder = format!("operator/{operator}");
        let ask = LeaseAsk { lease_id: &id, holder: &holder, purpose: &purpose, outside_window: force, forced: force };
        match self.ledger().take(&rec.name, &rec.facts.member, &ask)? {
            LeaseDecision::Deny { reason, .. } => Err(LeaseError::Denied(format!(
                "{reason}{}",
                if force { "" } else { "; --force reboots outside the window (the budget still holds)" }
            ))),
            _ => {
                self.start_reboot(&rec, id.clone(), holder, purpose, force)?;
                Ok(id)
            }
        }
    }

    /// `upkeepctl node uncordon`: puts a node a failed step left out of service back (uncordon through the
    /// executor; then every lease of the node is given back). Waits for the uncordon (a node still busy with an
    /// earlier operation is asked again until it is free) and returns the work id, or why it failed.
    pub async fn operator_uncordon(self: &Arc<Self>, node: &str, operator: &str) -> Result<String, LeaseError> {
        let rec = self.store().get_node(node)?.ok_or_else(|| LeaseError::NoSuchNode(node.to_string()))?;
        if !self.fleet.is_connected(node) {
            return Err(LeaseError::NotConnected(node.to_string()));
        }
        if !self.fleet.leads() {
            return Err(LeaseError::Denied(NOT_LEADER.to_string()));
        }
        let settings = self.store().member_settings(&rec.facts.member)?;
        let id = format!("operator-uncordon/{node}/{}", now_ms());
        let plan = plan_work(&Operation::Uncordon { node: node.to_string() }, &[work_node(&rec)], settings.budget());
        let end = self
            .executor
            .execute(JobSpec {
                id: id.clone(),
                member: rec.facts.member.clone(),
                holder: format!("operator/{operator}"),
                purpose: format!("uncordon ordered by {operator}"),
                plan,
                outside_window: true,
                forced: false,
                drain: settings.drain(),
                run: None,
            })
            .await?;
        self.poke();
        match end.result() {
            Ok(()) => Ok(id),
            Err(why) => Err(LeaseError::Denied(format!("work {id}: {why}"))),
        }
    }

    // ---- status ----

    /// What a member's channel is doing or waiting for.
    pub fn member_status(&self, member: &str) -> String {
        let rollout = self
            .store()
            .list_rollouts()
            .ok()
            .and_then(|rs| rs.into_iter().find(|(m, _)| m == member))
            .and_then(|(_, j)| serde_json::from_str::<RolloutState>(&j).ok());
        let mut parts = Vec::new();
        match &rollout {
            Some(r) if r.status == "Running" => parts.push(r.summary()),
            _ => {}
        }
        if let Some(n) = lock(&self.notes).get(member) {
            parts.push(n.clone());
        }
        if let Some(w) = self.executor.member_note(member) {
            parts.push(format!("work: {w}"));
        }
        let behind: Vec<String> = {
            let nodes = self.store().list_nodes(Some(member)).unwrap_or_default();
            let whys = lock(&self.whys);
            nodes
                .iter()
                .filter_map(|n| {
                    whys.get(&n.name).filter(|w| !w.behind.is_empty()).map(|w| format!("{} ({})", n.name, w.behind))
                })
                .collect()
        };
        if !behind.is_empty() {
            parts.push(format!("{} node(s) behind the channel: {}", behind.len(), behind.join(", ")));
        }
        match (&rollout, parts.is_empty()) {
            (Some(r), true) => format!("idle (last rollout: {})", r.summary()),
            (None, true) => "idle".to_string(),
            (Some(r), false) if r.status != "Running" => {
                format!("{} (last rollout: {})", parts.join("; "), r.summary())
            }
            _ => parts.join("; "),
        }
    }

    /// Why not now, for one node: behind its channel, what it waits for and when it is next eligible; plus what
    /// the executor is doing to it and the lease that keeps it out of service.
    pub fn node_why(&self, node: &str) -> NodeWhy {
        let mut why = lock(&self.whys).get(node).cloned().unwrap_or_default();
        if let Some(r) = lock(&self.reboot_whys).get(node).filter(|_| why.waiting.is_empty()) {
            why.waiting = r.waiting.clone();
            why.next_eligible_ms = r.next_eligible_ms;
        }
        if let Some(doing) = self.executor.node_note(node) {
            why.waiting = doing;
            why.next_eligible_ms = 0;
        }
        why
    }

    /// The lease that keeps a node out of service, as "<holder> (<purpose>) since <time>".
    pub fn out_of_service(&self, node: &str) -> String {
        let now = now_ms();
        self.store()
            .list_leases()
            .unwrap_or_default()
            .into_iter()
            .filter(|l| l.node == node && l.expires_ms > now)
            .map(|l| format!("{} ({}, lease {}) since {}", l.holder, l.purpose, l.lease_id, time_of(l.granted_ms)))
            .collect::<Vec<_>>()
            .join("; ")
    }

    // ---- channel rollouts ----

    fn catalog(&self) -> Result<ChannelCatalog, StoreError> {
        let mut c = ChannelCatalog::default();
        for img in self.store().list_images(None)? {
            let Ok(v) = img.version.parse::<ImageVersion>() else { continue };
            let regions = img.regions.iter().map(|(r, ms)| (r.clone(), ms_to_time(*ms))).collect();
            c.images.entry(img.family.clone()).or_default().insert(v, regions);
        }
        for p in self.store().list_security_patches(None)? {
            let Ok(v) = p.version.parse::<ImageVersion>() else { continue };
            c.patches.entry(p.family.clone()).or_default().insert(v, PatchRelease { packages: p.packages });
        }
        Ok(c)
    }

    /// What a pass (and the schedule's forecast) reads: the fleet, settings, catalog and rollouts, once.
    pub(crate) fn inputs(&self) -> Result<Inputs, StoreError> {
        Ok(Inputs {
            nodes: self.store().list_nodes(None)?,
            members: self.store().list_members()?,
            settings: self.store().all_member_settings()?.into_iter().map(|s| (s.member.clone(), s)).collect(),
            catalog: self.catalog()?,
            switches: self.store().list_channel_switches()?.into_iter().map(|(m, g, _)| (m, g)).collect(),
            rollouts: self
                .store()
                .list_rollouts()?
                .into_iter()
                .filter_map(|(m, j)| serde_json::from_str(&j).ok().map(|s| (m, s)))
                .collect(),
            runs: self.ledger().upgrading(),
        })
    }

    /// Completes after the next poke (a catalog, channel, window or lease change), or at once if one came since
    /// the last call.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// The rollout cadence, the auto-upgrade switch and the rest of `[auto_upgrade]`.
    pub fn settings(&self) -> AutoUpgradeSettings {
        self.settings
    }

    /// Why each node's reboot waits (the nodes that asked for one and were not granted it yet).
    pub(crate) fn reboot_whys(&self) -> HashMap<String, NodeWhy> {
        lock(&self.reboot_whys).clone()
    }

    /// One pass: expire leases, then start or resume what each member's channel wants.
    pub async fn tick(self: &Arc<Self>) -> Option<DateTime<Utc>> {
        match self.pass() {
            Ok(next) => next,
            Err(e) => {
                tracing::error!(error = %e, "maintenance pass");
                None
            }
        }
    }

    fn pass(self: &Arc<Self>) -> Result<Option<DateTime<Utc>>, StoreError> {
        self.ledger().expire()?;
        if !self.settings.enabled {
            // Nothing to roll out: only the reboot notes are kept current, node by node (never the whole fleet,
            // which a pass after every registration would read again and again).
            let noted: Vec<String> = lock(&self.reboot_whys).keys().cloned().collect();
            for n in noted {
                if !self.store().get_node(&n)?.is_some_and(|r| r.facts.reboot_required) {
                    lock(&self.reboot_whys).remove(&n);
                }
            }
            return Ok(None);
        }
        let inp = self.inputs()?;
        // A node that no longer needs a reboot no longer waits for one.
        let rebooting: HashSet<&str> =
            inp.nodes.iter().filter(|r| r.facts.reboot_required).map(|r| r.name.as_str()).collect();
        lock(&self.reboot_whys).retain(|n, _| rebooting.contains(n.as_str()));
        let now = Utc::now();
        let by_member = inp.by_member();
        let mut next: Option<DateTime<Utc>> = None;
        let mut notes = HashMap::new();
        let mut whys: HashMap<String, NodeWhy> = HashMap::new();
        for member in &inp.members {
            let name = member.name.clone();
            let existing = inp.rollouts.get(&name);
            let member_nodes = by_member.get(name.as_str()).cloned().unwrap_or_default();
            let switched = inp.switches.get(&name).copied();
            let desired = inp.desired(member, &member_nodes, now);
            // Every node behind its channel says so, whatever happens next.
            if let Some(d) = &desired {
                for (node, task) in &d.tasks {
                    let has = member_nodes
                        .iter()
                        .find(|n| &n.name == node)
                        .map(|n| match task {
                            NodeTask::Reimage { .. } => format!("runs {}", n.facts.image_version()),
                            NodeTask::Patch { .. } if n.facts.security_patch_version.is_empty() => {
                                "no security patch".to_string()
                            }
                            NodeTask::Patch { .. } => format!("has patch {}", n.facts.security_patch_version),
                        })
                        .unwrap_or_default();
                    let mut why = NodeWhy {
                        behind: format!("{} wants {} ({has})", member.node_os_channel, target_of(task)),
                        ..Default::default()
                    };
                    if let Some(f) = existing
                        .and_then(|r| r.failed.get(node))
                        .filter(|f| f.starts_with(&format!("{}:", target_of(task))))
                    {
                        why.waiting = format!("failed this target before ({f}); not retried until a newer release");
                    }
                    whys.insert(node.clone(), why);
                }
            }
            if lock(&self.executing).contains(&name) {
                continue;
            }
            if let Some(r) = existing.filter(|r| r.status == "Running") {
                self.spawn_rollout(&name, r.clone());
                continue;
            }
            let Some(desired) = desired else {
                if let Some(g) = switched {
                    // Nothing to reimage (no node has an image in the catalog): the switch is settled.
                    self.store().clear_channel_switch(&name, g)?;
                }
                continue;
            };
            let Some(rollout) = owed(desired, existing) else { continue };
            let mut wait = |why: String, until: Option<DateTime<Utc>>, whys: &mut HashMap<String, NodeWhy>| {
                for node in rollout.tasks.keys() {
                    if let Some(w) = whys.get_mut(node) {
                        w.waiting = why.clone();
                        w.next_eligible_ms = until.map_or(0, |t| t.timestamp_millis());
                    }
                }
                notes.insert(name.clone(), why);
            };
            if let Some(run) = inp.runs.get(&name) {
                wait(format!("waiting: update run {run:?} is upgrading the member"), None, &mut whys);
                continue;
            }
            let window = inp.window(&name);
            let catch_up = catches_up(&rollout, existing);
            if let Err(w) =
                may_start(rollout.kind, window.as_ref(), cadence_from(&rollout, existing), self.settings.cadence, now)
            {
                wait(format!("{} {}", rollout.id, w.why), w.until, &mut whys);
                if let Some(t) = w.until {
                    next = Some(next.map_or(t, |n| n.min(t)));
                }
                continue;
            }
            let seq = existing.map_or(0, |r| r.seq) + 1;
            let mut rolled = existing.map(|r| r.rolled.clone()).unwrap_or_default();
            rolled.extend(rollout.tasks.values().map(target_of));
            let state = RolloutState {
                status: "Running".into(),
                done: BTreeSet::new(),
                failed: existing.map(|r| r.failed.clone()).unwrap_or_default(),
                started_ms: now_ms(),
                finished_ms: None,
                switch_generation: switched,
                job: format!("rollout/{name}/{seq}"),
                seq,
                rolled,
                // The cadence counts from the last start of a new release; a catch-up or a channel-switch reimage
                // does not move it.
                release_started_ms: if catch_up || rollout.kind == RolloutKind::ChannelSwitch {
                    existing.and_then(|r| r.release_started_ms)
                } else {
                    Some(now_ms())
                },
                rollout,
            };
            self.save(&name, &state)?;
            tracing::info!(member = %name, rollout = %state.rollout.id, job = %state.job, nodes = state.rollout.tasks.len(), "channel rollout started");
            self.spawn_rollout(&name, state);
        }
        *lock(&self.notes) = notes;
        *lock(&self.whys) = whys;
        Ok(next)
    }

    fn save(&self, member: &str, state: &RolloutState) -> Result<(), StoreError> {
        let json = serde_json::to_string(state)
            .map_err(|e| StoreError::Corrupt { context: format!("rollout of {member}"), reason: e.to_string() })?;
        self.store().put_rollout(member, &json)?;
        // Saved when a rollout starts and when it ends: each is a webhook event.
        let failed = state.failed.keys().filter(|n| state.rollout.tasks.contains_key(*n)).cloned().collect();
        let e = crate::outbox::rollout_event(
            member,
            &state.rollout.id,
            &state.status,
            state.rollout.tasks.len(),
            failed,
            now_ms(),
        );
        crate::outbox::emit(self.store(), &[e]);
        Ok(())
    }

    /// Hands a rollout to the executor (or joins/resumes it under its work id) and records how it ended.
    fn spawn_rollout(self: &Arc<Self>, member: &str, mut state: RolloutState) {
        if !lock(&self.executing).insert(member.to_string()) {
            return;
        }
        let me = self.clone();
        let member = member.to_string();
        tokio::spawn(async move {
            let r: Result<(), StoreError> = async {
                let settings = me.store().member_settings(&member)?;
                let nodes: Vec<_> = me.store().list_nodes(Some(&member))?.iter().map(work_node).collect();
                let plan = plan_work(&Operation::Rollout { tasks: state.rollout.tasks.clone() }, &nodes, settings.budget());
                if state.job.is_empty() {
                    // A rollout stored before the executor existed.
                    state.seq += 1;
                    state.job = format!("rollout/{member}/{}", state.seq);
                }
                let spec = JobSpec {
                    id: state.job.clone(),
                    member: member.clone(),
                    holder: format!("rollout/{member}"),
                    purpose: format!("channel rollout {}", state.rollout.id),
                    plan,
                    outside_window: false,
                    forced: false,
                    drain: settings.drain(),
                    run: None,
                };
                let end: JobState = me.executor.execute(spec).await?;
                for (node, outcome) in &end.nodes {
                    let target = state.rollout.tasks.get(node).map(target_of).unwrap_or_default();
                    match outcome {
                        crate::executor::NodeOutcome::Done => {
                            state.done.insert(node.clone());
                            state.failed.remove(node);
                        }
                        crate::executor::NodeOutcome::Skipped(why) | crate::executor::NodeOutcome::Failed(why) => {
                            state.failed.insert(node.clone(), format!("{target}: {why}"));
                        }
                    }
                }
                state.status = if end.status == JobStatus::Completed { "Completed" } else { "Failed" }.into();
                state.finished_ms = Some(now_ms());
                me.save(&member, &state)?;
                if let (Some(g), JobStatus::Completed) = (state.switch_generation, end.status) {
                    me.store().clear_channel_switch(&member, g)?;
                }
                tracing::info!(member = %member, rollout = %state.rollout.id, status = %state.status, "channel rollout finished");
                Ok(())
            }
            .await;
            if let Err(e) = r {
                tracing::error!(member = %member, error = %e, "channel rollout");
            }
            lock(&me.executing).remove(&member);
            me.poke();
        });
    }

    /// Called when a member's channel changed: a rolling reimage to the current image is owed (SPEC §2).
    pub fn channel_switched(&self, member: &str, generation: u64, from: NodeOsChannel, to: NodeOsChannel) {
        if let Err(e) = self.store().put_channel_switch(member, generation, now_ms()) {
            tracing::error!(member, error = %e, "recording a channel switch");
            return;
        }
        tracing::info!(member, %from, %to, generation, "channel switched: rolling reimage to the current image owed");
        self.poke();
    }
}

/// Everything one maintenance pass decides from, read once.
pub(crate) struct Inputs {
    /// Every node.
    pub nodes: Vec<NodeRecord>,
    /// Every member.
    pub members: Vec<crate::store::MemberRecord>,
    /// Member -> settings (windows, budget, drain).
    pub settings: HashMap<String, crate::store::MemberSettings>,
    /// Images and patches.
    pub catalog: ChannelCatalog,
    /// Member -> generation of a channel switch not rolled out yet.
    pub switches: HashMap<String, u64>,
    /// Member -> its last or current rollout.
    pub rollouts: HashMap<String, RolloutState>,
    /// Member -> the update run upgrading it now.
    pub runs: HashMap<String, String>,
}

impl Inputs {
    /// Nodes grouped by member.
    pub fn by_member(&self) -> BTreeMap<&str, Vec<&NodeRecord>> {
        let mut by_member: BTreeMap<&str, Vec<&NodeRecord>> = BTreeMap::new();
        for n in &self.nodes {
            by_member.entry(n.facts.member.as_str()).or_default().push(n);
        }
        by_member
    }

    /// What the member's channel wants of these nodes at `now` (before failed targets are taken out).
    pub fn desired(
        &self,
        member: &crate::store::MemberRecord,
        nodes: &[&NodeRecord],
        now: DateTime<Utc>,
    ) -> Option<Rollout> {
        let views: Vec<NodeView> = nodes.iter().map(|n| node_view(n)).collect();
        desired_rollout(member.node_os_channel, self.switches.get(&member.name).copied(), &views, &self.catalog, now)
    }

    /// The member's node OS window.
    pub fn window(&self, member: &str) -> Option<MaintenanceSchedule> {
        self.settings.get(member).and_then(|s| schedule_of(&s.node_os_schedule))
    }
}

/// The part of `desired` still owed: a node that failed a target is not given the same target again (a
/// rolled-back image is not retried). None when nothing is left.
pub(crate) fn owed(mut desired: Rollout, existing: Option<&RolloutState>) -> Option<Rollout> {
    if let Some(prev) = existing {
        desired.tasks.retain(|node, task| {
            prev.failed.get(node).is_none_or(|f| !f.starts_with(&format!("{}:", target_of(task))))
        });
    }
    (!desired.tasks.is_empty()).then_some(desired)
}

/// Whether the rollout only catches nodes up to releases the member already rolled (nodes that joined later, a
/// run that took the member to it): such a rollout waits for the window only, not the cadence.
pub(crate) fn catches_up(rollout: &Rollout, existing: Option<&RolloutState>) -> bool {
    existing.is_some_and(|r| rollout.tasks.values().all(|t| r.rolled.contains(&target_of(t))))
}

/// The start the weekly cadence counts from for this rollout (None: the cadence does not apply).
pub(crate) fn cadence_from(rollout: &Rollout, existing: Option<&RolloutState>) -> Option<DateTime<Utc>> {
    if catches_up(rollout, existing) {
        return None;
    }
    existing.and_then(|r| r.release_started_ms).map(ms_to_time)
}

fn node_view(n: &NodeRecord) -> NodeView {
    NodeView {
        name: n.name.clone(),
        pool: n.facts.node_pool.clone(),
        region: n.facts.region.clone(),
        image: n.facts.image_version().parse().ok(),
        security_patch: n.facts.security_patch_version.parse().ok(),
        os_family: n.facts.os_family.clone(),
        hardware_class: n.facts.hardware_class.clone(),
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NodeFacts;

    #[test]
    fn sec1_decisions_compare_the_booted_image_not_the_label_folded_with_the_patch() {
        let facts = NodeFacts {
            member: "m1".into(),
            node_pool: "p".into(),
            node_image_version: "Fam-202402.10.0".into(),
            booted_image_version: "Fam-202401.01.0".into(),
            security_patch_version: "202402.10.0".into(),
            ..Default::default()
        };
        let n = NodeRecord { name: "n1".into(), facts, first_seen_ms: 0, last_seen_ms: 0, last_report_ms: 0 };
        assert_eq!(node_view(&n).image.map(|i| i.label()).as_deref(), Some("Fam-202401.01.0"));
        assert_eq!(work_node(&n).image.map(|i| i.label()).as_deref(), Some("Fam-202401.01.0"));
    }
}
