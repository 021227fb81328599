//! Channel auto-upgrades and disruption leases: what the hub does to members on its own (SPEC §2, §4).
//!
//! One budget, one mechanism. A node is out of service only under a *lease* in the `leases` table: nodes ask for
//! one before a reboot (`LeaseRequest` on the agent session), operators grant one with `upkeepctl node reboot`, and
//! the hub takes one for every node a channel rollout changes. `core::maintenance::decide_lease` decides every
//! grant from the member's `max_unavailable`, its node OS window, the runs upgrading it and the leases already held.
//! Leases lapse at their expiry unless their node keeps talking to the hub, so a dead node does not hold a slot.
//!
//! Channel rollouts: on every pass (a catalog or channel change pokes it; otherwise every [`MAX_IDLE`]) the loop
//! asks `core::maintenance::desired_rollout` what each member's channel wants (newest image for `NodeImage`,
//! newest security patch for `SecurityPatch`, a reimage to the current image after a channel switch) and
//! `may_start` whether it may begin (window, weekly cadence, no run upgrading the member). A started rollout is
//! stored (`rollouts` table, state JSON) and executed node by node under leases: cordon, drain, reimage or patch
//! (+ reboot when the node then says one is required), uncordon, release. Operation ids derive from
//! (member, rollout, node, step), so after a hub restart the executor resumes and no node step is done twice.
//! The same release gives the same rollout id, so it is never rolled twice; a failed node stops the rollout.

use crate::engine::{StepLimits, parse_state};
use crate::fleet::{CommandError, Fleet, now_ms};
use crate::store::{LeaseRecord, NodeRecord, Store, StoreError};
use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use upkeep_core::channel::NodeOsChannel;
use upkeep_core::concurrency::Limit;
use upkeep_core::maintenance::{
    ChannelCatalog, HeldLease, LeaseDecision, MemberBudget, NodeTask, NodeView, PatchRelease, Rollout, decide_lease,
    desired_rollout, may_start,
};
use upkeep_core::run::Status;
use upkeep_core::schedule::MaintenanceSchedule;
use upkeep_core::version::ImageVersion;
use upkeep_proto::v1;

/// Longest pause between two passes.
pub const MAX_IDLE: Duration = Duration::from_secs(30);
/// How often a waiting rollout executor looks again (budget, window, runs) when nothing pokes it.
const EXECUTOR_RECHECK: Duration = Duration::from_secs(5);
/// How long the hub waits for a node's report after a security patch before deciding on a reboot.
const REPORT_AFTER_PATCH: Duration = Duration::from_secs(60);

/// `[auto_upgrade]` in hub.toml.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoUpgradeSettings {
    /// Channel rollouts on (leases are always served).
    pub enabled: bool,
    /// Without a node OS window: at most one rollout start per member per this long.
    pub cadence: TimeDelta,
    /// A lease lapses this long after its holder was last heard from.
    pub lease_ttl: Duration,
}

impl Default for AutoUpgradeSettings {
    fn default() -> Self {
        AutoUpgradeSettings { enabled: true, cadence: TimeDelta::days(7), lease_ttl: Duration::from_secs(1800) }
    }
}

/// A member's rollout as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutState {
    /// What and why.
    pub rollout: Rollout,
    /// Running, Completed or Failed.
    pub status: String,
    /// Nodes finished.
    pub done: BTreeSet<String>,
    /// Nodes failed, with the reason.
    pub failed: BTreeMap<String, String>,
    /// Started (Unix ms).
    pub started_ms: i64,
    /// Finished (Unix ms).
    #[serde(default)]
    pub finished_ms: Option<i64>,
    /// The channel-switch generation it settles, if it is a switch reimage.
    #[serde(default)]
    pub switch_generation: Option<u64>,
}

impl RolloutState {
    /// One line for `member show`.
    pub fn summary(&self) -> String {
        let total = self.rollout.tasks.len();
        let mut s = format!("{} {} ({} of {total} nodes done", self.rollout.id, self.status, self.done.len());
        if !self.failed.is_empty() {
            let f: Vec<String> = self.failed.iter().map(|(n, why)| format!("{n}: {why}")).collect();
            s.push_str(&format!("; failed: {}", f.join("; ")));
        }
        s.push(')');
        s
    }
}

/// Errors of the lease API, mapped to statuses by the gRPC layer.
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

/// The maintenance loop and lease desk.
pub struct Maintenance {
    fleet: Arc<Fleet>,
    settings: AutoUpgradeSettings,
    limits: StepLimits,
    wake: Notify,
    /// Serialises lease decisions with their grants.
    desk: Mutex<()>,
    executing: Mutex<HashSet<String>>,
    /// Why a member's channel waits (shown by `member show`), refreshed every pass.
    notes: Mutex<HashMap<String, String>>,
    /// Nodes holding leases -> when their expiry was last moved (Unix ms).
    holders: Mutex<HashMap<String, i64>>,
}

fn ms_to_time(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or(DateTime::<Utc>::MIN_UTC)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Member -> the run upgrading it now.
fn upgrading_runs(store: &dyn Store) -> Result<HashMap<String, String>, StoreError> {
    let mut out = HashMap::new();
    for rec in store.list_runs()? {
        let Ok(state) = parse_state(&rec.name, &rec.state) else { continue };
        for m in state.members() {
            if m.level.status == Status::Running {
                out.insert(m.name.clone(), rec.name.clone());
            }
        }
    }
    Ok(out)
}

fn schedule_of(json: &Option<String>) -> Option<MaintenanceSchedule> {
    json.as_deref().and_then(|s| serde_json::from_str(s).ok())
}

impl Maintenance {
    /// Over `fleet`.
    pub fn new(fleet: Arc<Fleet>, settings: AutoUpgradeSettings, limits: StepLimits) -> Arc<Maintenance> {
        let holders =
            fleet.store().list_leases().map(|ls| ls.into_iter().map(|l| (l.node, 0)).collect()).unwrap_or_default();
        Arc::new(Maintenance {
            fleet,
            settings,
            limits,
            wake: Notify::new(),
            desk: Mutex::new(()),
            executing: Mutex::new(HashSet::new()),
            notes: Mutex::new(HashMap::new()),
            holders: Mutex::new(holders),
        })
    }

    fn store(&self) -> &dyn Store {
        self.fleet.store()
    }

    /// Asks for a pass now (catalog or channel changed, a lease was released).
    pub fn poke(&self) {
        self.wake.notify_waiters();
        self.wake.notify_one();
    }

    /// Runs the loop until the task is dropped.
    pub async fn run(self: Arc<Self>) {
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

    // ---- leases ----

    fn budget_inputs(&self, member: &str) -> Result<BudgetInputs, StoreError> {
        let now = now_ms();
        for l in self.store().expire_leases(now)? {
            tracing::warn!(node = %l.node, lease = %l.lease_id, holder = %l.holder, "lease expired (holder silent)");
            lock(&self.holders).remove(&l.node);
        }
        let node_count = self.store().list_nodes(Some(member))?.len() as u32;
        let settings = self.store().member_settings(member)?;
        let limit: Limit = settings.max_unavailable.parse().unwrap_or(Limit::Count(1));
        let window = schedule_of(&settings.node_os_schedule);
        let run = upgrading_runs(self.store())?.remove(member);
        let held = self
            .store()
            .list_leases()?
            .into_iter()
            .filter(|l| l.member == member)
            .map(|l| HeldLease { node: l.node, lease_id: l.lease_id, purpose: l.purpose })
            .collect();
        Ok(BudgetInputs { node_count, limit, window, run, held })
    }

    /// Decides and, when granted, records a lease. `holder`: node, operator or hub.
    fn try_grant(
        &self,
        node: &NodeRecord,
        lease_id: &str,
        holder: &str,
        purpose: &str,
        forced: bool,
    ) -> Result<LeaseDecision, StoreError> {
        let _desk = lock(&self.desk);
        let member = node.facts.member.as_str();
        let BudgetInputs { node_count, limit: max_unavailable, window, run, held } = self.budget_inputs(member)?;
        let budget = MemberBudget {
            member,
            node_count,
            max_unavailable,
            window: window.as_ref(),
            upgrading_run: run.as_deref(),
            held: &held,
        };
        let decision = decide_lease(&budget, &node.name, lease_id, forced, Utc::now());
        if matches!(decision, LeaseDecision::Grant | LeaseDecision::AlreadyHeld) {
            let now = now_ms();
            self.store().put_lease(&LeaseRecord {
                node: node.name.clone(),
                lease_id: lease_id.to_string(),
                member: member.to_string(),
                holder: holder.to_string(),
                purpose: purpose.to_string(),
                granted_ms: now,
                expires_ms: now + self.settings.lease_ttl.as_millis() as i64,
                forced,
            })?;
            lock(&self.holders).insert(node.name.clone(), now);
            if decision == LeaseDecision::Grant {
                tracing::info!(node = %node.name, member, lease = lease_id, holder, forced, purpose, "lease granted");
            }
        }
        Ok(decision)
    }

    fn answer(&self, lease_id: &str, decision: &LeaseDecision, forced: bool) -> v1::LeaseAnswer {
        match decision {
            LeaseDecision::Grant | LeaseDecision::AlreadyHeld => v1::LeaseAnswer {
                lease_id: lease_id.to_string(),
                granted: true,
                reason: String::new(),
                expires_at_unix_ms: now_ms() + self.settings.lease_ttl.as_millis() as i64,
                retry_after_seconds: 0,
                forced,
            },
            LeaseDecision::Deny { reason, retry_after_seconds } => v1::LeaseAnswer {
                lease_id: lease_id.to_string(),
                granted: false,
                reason: reason.clone(),
                expires_at_unix_ms: 0,
                retry_after_seconds: *retry_after_seconds,
                forced,
            },
        }
    }

    /// A node asks for a reboot lease.
    pub fn request_lease(&self, node: &str, req: &v1::LeaseRequest) -> Result<v1::LeaseAnswer, LeaseError> {
        if req.lease_id.trim().is_empty() || req.lease_id.len() > 200 {
            return Ok(v1::LeaseAnswer {
                lease_id: req.lease_id.clone(),
                granted: false,
                reason: "lease_request.lease_id: empty or longer than 200 characters; send a stable id such as \
                         reboot/<boot id>"
                    .into(),
                expires_at_unix_ms: 0,
                retry_after_seconds: 60,
                forced: false,
            });
        }
        let rec = self.store().get_node(node)?.ok_or_else(|| LeaseError::NoSuchNode(node.to_string()))?;
        let purpose = if req.reason.is_empty() { "reboot".to_string() } else { req.reason.clone() };
        let decision = self.try_grant(&rec, &req.lease_id, "node", &purpose, false)?;
        if let LeaseDecision::Deny { reason, .. } = &decision {
            tracing::info!(node, lease = %req.lease_id, %reason, "lease not granted");
        }
        Ok(self.answer(&req.lease_id, &decision, false))
    }

    /// A node gives leases back.
    pub fn release(&self, node: &str, rel: &v1::LeaseRelease) -> Result<(), StoreError> {
        let released = self.store().release_leases(node, &rel.lease_ids, rel.all_except)?;
        for l in &released {
            tracing::info!(node, lease = %l.lease_id, holder = %l.holder, "lease released");
        }
        if !self.store().list_leases()?.iter().any(|l| l.node == node) {
            lock(&self.holders).remove(node);
        }
        if !released.is_empty() {
            self.poke();
        }
        Ok(())
    }

    /// The node was heard from: a lease holder's leases stay alive (extended at most every ttl/10).
    pub fn alive(&self, node: &str) {
        let now = now_ms();
        let step = (self.settings.lease_ttl.as_millis() / 10) as i64;
        let due = {
            let mut h = lock(&self.holders);
            match h.get_mut(node) {
                Some(last) if now - *last >= step => {
                    *last = now;
                    true
                }
                _ => false,
            }
        };
        if due && let Err(e) = self.store().extend_leases(node, now + self.settings.lease_ttl.as_millis() as i64) {
            tracing::error!(node, error = %e, "extending leases");
        }
    }

    /// `upkeepctl node reboot`: grants a lease to the node (outside the window when forced) and tells it.
    pub fn operator_reboot(&self, node: &str, force: bool, operator: &str) -> Result<v1::LeaseAnswer, LeaseError> {
        let rec = self.store().get_node(node)?.ok_or_else(|| LeaseError::NoSuchNode(node.to_string()))?;
        if !self.fleet.is_connected(node) {
            return Err(LeaseError::NotConnected(node.to_string()));
        }
        let lease_id = format!("operator-reboot/{}", now_ms());
        let purpose = format!("reboot ordered by {operator}");
        match self.try_grant(&rec, &lease_id, "operator", &purpose, force)? {
            LeaseDecision::Deny { reason, .. } => Err(LeaseError::Denied(format!(
                "{reason}{}",
                if force { "" } else { "; --force reboots outside the window (the budget still holds)" }
            ))),
            d => {
                let answer = self.answer(&lease_id, &d, force);
                if !self.fleet.send(node, v1::hub_message::Body::Lease(answer.clone())) {
                    let _ = self.store().release_leases(node, std::slice::from_ref(&lease_id), false);
                    return Err(LeaseError::NotConnected(node.to_string()));
                }
                Ok(answer)
            }
        }
    }

    /// What a member's channel is doing or waiting for.
    pub fn member_status(&self, member: &str) -> String {
        let rollout = self
            .store()
            .list_rollouts()
            .ok()
            .and_then(|rs| rs.into_iter().find(|(m, _)| m == member))
            .and_then(|(_, j)| serde_json::from_str::<RolloutState>(&j).ok());
        let note = lock(&self.notes).get(member).cloned();
        match (rollout, note) {
            (Some(r), Some(n)) if r.status == "Running" => format!("{}; {n}", r.summary()),
            (Some(r), _) if r.status == "Running" => r.summary(),
            (r, Some(n)) => match r {
                Some(r) => format!("{n} (last rollout: {})", r.summary()),
                None => n,
            },
            (Some(r), None) => format!("idle (last rollout: {})", r.summary()),
            (None, None) => "idle".to_string(),
        }
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
        for l in self.store().expire_leases(now_ms())? {
            tracing::warn!(node = %l.node, lease = %l.lease_id, holder = %l.holder, "lease expired (holder silent)");
            lock(&self.holders).remove(&l.node);
        }
        if !self.settings.enabled {
            return Ok(None);
        }
        let now = Utc::now();
        let nodes = self.store().list_nodes(None)?;
        let mut by_member: BTreeMap<&str, Vec<&NodeRecord>> = BTreeMap::new();
        for n in &nodes {
            by_member.entry(n.facts.member.as_str()).or_default().push(n);
        }
        let settings: HashMap<String, crate::store::MemberSettings> =
            self.store().all_member_settings()?.into_iter().map(|s| (s.member.clone(), s)).collect();
        let catalog = self.catalog()?;
        let switches: HashMap<String, u64> =
            self.store().list_channel_switches()?.into_iter().map(|(m, g, _)| (m, g)).collect();
        let rollouts: HashMap<String, RolloutState> = self
            .store()
            .list_rollouts()?
            .into_iter()
            .filter_map(|(m, j)| serde_json::from_str(&j).ok().map(|s| (m, s)))
            .collect();
        let runs = upgrading_runs(self.store())?;
        let mut next: Option<DateTime<Utc>> = None;
        let mut notes = HashMap::new();
        for member in self.store().list_members()? {
            let name = member.name.clone();
            if lock(&self.executing).contains(&name) {
                continue;
            }
            let existing = rollouts.get(&name);
            if let Some(r) = existing.filter(|r| r.status == "Running") {
                self.spawn_executor(&name, r.clone());
                continue;
            }
            let views: Vec<NodeView> =
                by_member.get(name.as_str()).map(|ns| ns.iter().map(|n| node_view(n)).collect()).unwrap_or_default();
            let switched = switches.get(&name).copied();
            let Some(rollout) = desired_rollout(member.node_os_channel, switched, &views, &catalog, now) else {
                if let Some(g) = switched {
                    // Nothing to reimage (no node has an image in the catalog): the switch is settled.
                    self.store().clear_channel_switch(&name, g)?;
                }
                continue;
            };
            if let Some(prev) = existing.filter(|r| r.rollout.id == rollout.id) {
                if prev.status == "Failed" {
                    notes.insert(
                        name.clone(),
                        format!("{} failed; it is not retried until a newer release", prev.rollout.id),
                    );
                }
                continue;
            }
            if let Some(run) = runs.get(&name) {
                notes.insert(name.clone(), format!("waiting: update run {run:?} is upgrading the member"));
                continue;
            }
            let window = settings.get(&name).and_then(|s| schedule_of(&s.node_os_schedule));
            let last = existing.map(|r| ms_to_time(r.started_ms));
            if let Err(w) = may_start(rollout.kind, window.as_ref(), last, self.settings.cadence, now) {
                notes.insert(name.clone(), format!("{} {}", rollout.id, w.why));
                if let Some(t) = w.until {
                    next = Some(next.map_or(t, |n| n.min(t)));
                }
                continue;
            }
            let state = RolloutState {
                rollout,
                status: "Running".into(),
                done: BTreeSet::new(),
                failed: BTreeMap::new(),
                started_ms: now_ms(),
                finished_ms: None,
                switch_generation: switched,
            };
            self.save(&name, &state)?;
            tracing::info!(member = %name, rollout = %state.rollout.id, nodes = state.rollout.tasks.len(), "channel rollout started");
            self.spawn_executor(&name, state);
        }
        *lock(&self.notes) = notes;
        Ok(next)
    }

    fn save(&self, member: &str, state: &RolloutState) -> Result<(), StoreError> {
        let json = serde_json::to_string(state)
            .map_err(|e| StoreError::Corrupt { context: format!("rollout of {member}"), reason: e.to_string() })?;
        self.store().put_rollout(member, &json)
    }

    fn spawn_executor(self: &Arc<Self>, member: &str, state: RolloutState) {
        if !lock(&self.executing).insert(member.to_string()) {
            return;
        }
        let me = self.clone();
        let member = member.to_string();
        tokio::spawn(async move {
            if let Err(e) = me.execute(&member, state).await {
                tracing::error!(member = %member, error = %e, "channel rollout executor");
            }
            lock(&me.executing).remove(&member);
            me.poke();
        });
    }

    async fn execute(self: &Arc<Self>, member: &str, mut state: RolloutState) -> Result<(), StoreError> {
        let lease_id = format!("rollout/{}", state.rollout.id);
        loop {
            let pending: Vec<(String, NodeTask)> = state
                .rollout
                .tasks
                .iter()
                .filter(|(n, _)| !state.done.contains(*n) && !state.failed.contains_key(*n))
                .map(|(n, t)| (n.clone(), t.clone()))
                .collect();
            if pending.is_empty() || !state.failed.is_empty() {
                state.status = if state.failed.is_empty() { "Completed" } else { "Failed" }.into();
                state.finished_ms = Some(now_ms());
                self.save(member, &state)?;
                if let (Some(g), true) = (state.switch_generation, state.failed.is_empty()) {
                    self.store().clear_channel_switch(member, g)?;
                }
                tracing::info!(member, rollout = %state.rollout.id, status = %state.status, "channel rollout finished");
                return Ok(());
            }
            // Take leases for as many pending nodes as the budget allows (a node already holding this rollout's
            // lease after a restart is answered AlreadyHeld and resumes).
            let mut granted = Vec::new();
            let mut waiting_why = String::new();
            for (node, task) in &pending {
                let Some(rec) = self.store().get_node(node)? else {
                    state.failed.insert(node.clone(), "node was forgotten".into());
                    continue;
                };
                if rec.facts.member != member {
                    state.failed.insert(node.clone(), format!("node moved to member {}", rec.facts.member));
                    continue;
                }
                match self.try_grant(&rec, &lease_id, "hub", &task.describe(), false)? {
                    LeaseDecision::Grant | LeaseDecision::AlreadyHeld => granted.push((node.clone(), task.clone())),
                    LeaseDecision::Deny { reason, .. } => {
                        waiting_why = reason;
                        break;
                    }
                }
            }
            if granted.is_empty() {
                if !waiting_why.is_empty() {
                    lock(&self.notes).insert(member.to_string(), format!("waiting: {waiting_why}"));
                }
                self.save(member, &state)?;
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(EXECUTOR_RECHECK) => {}
                }
                continue;
            }
            lock(&self.notes).remove(member);
            let results = futures::future::join_all(
                granted.iter().map(|(node, task)| self.change_node(member, &state.rollout.id, node, task)),
            )
            .await;
            for ((node, _), result) in granted.iter().zip(results) {
                match result {
                    Ok(()) => {
                        state.done.insert(node.clone());
                    }
                    Err(why) => {
                        tracing::warn!(member, node = %node, error = %why, "channel rollout: node failed");
                        state.failed.insert(node.clone(), why);
                    }
                }
                self.store().release_leases(node, std::slice::from_ref(&lease_id), false)?;
            }
            self.save(member, &state)?;
        }
    }

    /// Cordon, drain, change, [reboot], uncordon one node.
    async fn change_node(&self, member: &str, rollout: &str, node: &str, task: &NodeTask) -> Result<(), String> {
        use v1::command::Kind;
        let generation = 1;
        let op = |step: &str| format!("rollout/{member}/{rollout}/{node}/{step}");
        let run = |step: &'static str, kind: Kind, within: Duration| {
            let id = op(step);
            async move {
                match self.fleet.command(node, &id, generation, kind, within).await {
                    Ok(r) if r.ok => Ok(r),
                    Ok(r) => Err(format!("{step} failed: {}", r.error)),
                    Err(CommandError::Silent { for_ms, .. }) => {
                        Err(format!("node is Unknown: silent for {} s during {step}", for_ms / 1000))
                    }
                    Err(e) => Err(format!("{step}: {e}")),
                }
            }
        };
        run("cordon", Kind::Cordon(v1::Cordon {}), self.limits.quick).await?;
        let drain = Kind::Drain(v1::Drain { timeout_seconds: self.limits.drain.as_secs() as u32 });
        if let Err(e) = run("drain", drain, self.limits.drain).await {
            let _ = run("uncordon", Kind::Uncordon(v1::Uncordon {}), self.limits.quick).await;
            return Err(e);
        }
        match task {
            NodeTask::Reimage { image, reinstall } => {
                let rec = self
                    .store()
                    .list_images(Some(&image.family))
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .find(|i| i.version == image.version.to_string())
                    .ok_or_else(|| format!("image {image} is no longer in the catalog"))?;
                let kind = Kind::Reimage(v1::Reimage {
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
                });
                run("reimage", kind, self.limits.upgrade).await?;
            }
            NodeTask::Patch { family, version, packages } => {
                let kind = Kind::ApplySecurityPatch(v1::ApplySecurityPatch {
                    family: family.clone(),
                    version: version.to_string(),
                    packages: packages.clone(),
                });
                let id = op("patch");
                let mark = match self.fleet.command_marked(node, &id, generation, kind, self.limits.upgrade).await {
                    Ok((r, mark)) if r.ok => mark,
                    Ok((r, _)) => return Err(format!("patch failed: {}", r.error)),
                    Err(e) => return Err(format!("patch: {e}")),
                };
                // The agent reports right after the result; that report says whether the OS wants a reboot.
                let fresh = self.fleet.report_after(node, mark, REPORT_AFTER_PATCH).await;
                if fresh.is_some_and(|n| n.facts.reboot_required) {
                    run("reboot", Kind::Reboot(v1::Reboot { force: true }), self.limits.upgrade).await?;
                }
            }
        }
        run("uncordon", Kind::Uncordon(v1::Uncordon {}), self.limits.quick).await?;
        Ok(())
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

/// What a lease decision for one member reads from the store.
struct BudgetInputs {
    node_count: u32,
    limit: Limit,
    window: Option<MaintenanceSchedule>,
    run: Option<String>,
    held: Vec<HeldLease>,
}

fn node_view(n: &NodeRecord) -> NodeView {
    NodeView {
        name: n.name.clone(),
        pool: n.facts.node_pool.clone(),
        region: n.facts.region.clone(),
        image: n.facts.node_image_version.parse().ok(),
        security_patch: n.facts.security_patch_version.parse().ok(),
        os_family: n.facts.os_family.clone(),
        hardware_class: n.facts.hardware_class.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::Timing;
    use crate::store::NodeFacts;
    use crate::store::sqlite::SqliteStore;

    fn desk(dir: &std::path::Path) -> Arc<Maintenance> {
        let store = SqliteStore::open(&dir.join("hub.db")).expect("store");
        let fleet =
            Arc::new(Fleet::new(Arc::new(store), Timing { heartbeat_interval_seconds: 1, silent_after_heartbeats: 3 }));
        for n in ["a", "b"] {
            let facts = NodeFacts { member: "m1".into(), node_pool: "p".into(), ..Default::default() };
            fleet.store().record_report(n, &facts, now_ms()).expect("node");
        }
        Maintenance::new(fleet, AutoUpgradeSettings::default(), StepLimits::default())
    }

    fn ask(m: &Maintenance, node: &str, id: &str) -> v1::LeaseAnswer {
        m.request_lease(node, &v1::LeaseRequest { lease_id: id.into(), reason: "reboot".into() }).expect("answer")
    }

    #[test]
    fn sec4_a_held_lease_blocks_the_next_node_until_released_or_expired() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = desk(dir.path());
        assert!(ask(&m, "a", "reboot/1").granted);
        assert!(ask(&m, "a", "reboot/1").granted, "asking again for a held lease is answered granted");
        let denied = ask(&m, "b", "reboot/2");
        assert!(!denied.granted && denied.reason.contains("\"a\""), "{denied:?}");
        assert!(denied.retry_after_seconds > 0);
        // Released: the next node gets it.
        m.release("a", &v1::LeaseRelease { lease_ids: vec!["reboot/1".into()], all_except: false }).expect("release");
        assert!(ask(&m, "b", "reboot/2").granted);
        // A lease whose holder went silent lapses at its expiry: the slot is free again.
        let store = m.fleet.store();
        let mut held = store.list_leases().expect("leases");
        assert_eq!(held.len(), 1);
        held[0].expires_ms = now_ms() - 1;
        store.put_lease(&held[0]).expect("backdate");
        assert!(ask(&m, "a", "reboot/3").granted, "b's expired lease no longer counts");
        assert_eq!(store.list_leases().expect("leases").iter().map(|l| l.node.as_str()).collect::<Vec<_>>(), ["a"]);
        // At start an agent gives back every lease but those of reboots still under way.
        m.release("a", &v1::LeaseRelease { lease_ids: vec![], all_except: true }).expect("release all");
        assert!(store.list_leases().expect("leases").is_empty());
    }

    #[test]
    fn sec4_an_empty_lease_id_is_refused_naming_the_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = desk(dir.path());
        let a = ask(&m, "a", "");
        assert!(!a.granted && a.reason.contains("lease_request.lease_id"), "{a:?}");
        assert!(m.fleet.store().list_leases().expect("leases").is_empty());
    }
}
