//! The disruption ledger: every node out of service is one row in the `leases` table, whoever took it.
//!
//! An update run's batch, a channel rollout, a reboot a node asked for, an operator's reboot: each takes a lease
//! here for every node before the node is cordoned, and gives it back after the node is uncordoned (or keeps it
//! when a failed step left the node out of service, see `upkeep_core::work::on_step_failure`). So the member's
//! budget (`max_unavailable`) counts every node that is out, and `upkeepctl lease list` shows all of them with
//! their holder and since when.
//!
//! Every grant is decided by `core::maintenance::decide_lease` from the member's budget, its node OS window, the
//! run upgrading it (whose own work is exempt) and the leases already held; decisions and grants are serialised by
//! one desk, so two callers can never both take the member's last slot. A lease lapses at its expiry unless its
//! node keeps talking to the hub, so a dead node does not hold a slot forever.
//!
//! The *holder* of a lease is an owner key (`run/<run>/<member>`, `rollout/<member>`, `reboot/<node>`,
//! `operator/<name>`); the lease id is the id of the work that holds it. A later piece of work of the same owner
//! (the next attempt of a run member, the member's next rollout) adopts a node its predecessor left out of service
//! instead of being blocked by it.

use crate::fleet::{Fleet, now_ms};
use crate::store::{LeaseRecord, LeasesOf, Store, StoreError};
use chrono::Utc;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use upkeep_core::maintenance::{HeldLease, LeaseDecision, MemberBudget, decide_lease};
use upkeep_core::run::Status;
use upkeep_core::schedule::MaintenanceSchedule;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Member -> the run upgrading it now.
pub fn upgrading_runs(store: &dyn Store) -> Result<HashMap<String, String>, StoreError> {
    let mut out = HashMap::new();
    for rec in store.list_runs()? {
        // An unreadable run is reported by the engine; here it upgrades nothing.
        let Ok(state) = rec.state() else { continue };
        for m in state.members() {
            if m.level.status == Status::Running {
                out.insert(m.name.clone(), rec.name.clone());
            }
        }
    }
    Ok(out)
}

/// A Unix-ms time as RFC 3339 (UTC), for messages.
pub fn time_of(ms: i64) -> String {
    use chrono::TimeZone;
    Utc.timestamp_millis_opt(ms).single().map_or_else(|| format!("{ms} ms"), upkeep_core::schedule::rfc3339)
}

/// The owner key of an update run's work on a member.
pub fn run_holder(run: &str, member: &str) -> String {
    format!("run/{run}/{member}")
}

/// What a caller wants a lease for.
#[derive(Debug, Clone)]
pub struct LeaseAsk<'a> {
    /// Lease id (the work's id).
    pub lease_id: &'a str,
    /// Owner key (see the module doc).
    pub holder: &'a str,
    /// What for, shown in `lease list` and in denials.
    pub purpose: &'a str,
    /// Ignore the node OS window (an operator forced it, or an update run that already honoured its own window).
    pub outside_window: bool,
    /// Granted by an operator's force (shown in `lease list`).
    pub forced: bool,
}

/// The ledger.
pub struct Ledger {
    fleet: Arc<Fleet>,
    lease_ttl: Duration,
    /// Serialises decisions with their grants.
    desk: Mutex<()>,
    /// Nodes holding leases -> when their expiry was last moved (Unix ms).
    holders: Mutex<HashMap<String, i64>>,
    /// Wakes work waiting for a slot when one is given back.
    freed: Notify,
    /// Run -> the members it upgrades now: read from the store once, then kept current by the run engine after
    /// each commit (`note_run`), so a lease decision does not parse every run state.
    upgrading: Mutex<HashMap<String, std::collections::BTreeSet<String>>>,
}

impl Ledger {
    /// Over `fleet`'s store; leases lapse `lease_ttl` after their node was last heard from.
    pub fn new(fleet: Arc<Fleet>, lease_ttl: Duration) -> Arc<Ledger> {
        let holders =
            fleet.store().list_leases().map(|ls| ls.into_iter().map(|l| (l.node, 0)).collect()).unwrap_or_default();
        let mut upgrading: HashMap<String, std::collections::BTreeSet<String>> = HashMap::new();
        match upgrading_runs(fleet.store()) {
            Ok(runs) => {
                for (member, run) in runs {
                    upgrading.entry(run).or_default().insert(member);
                }
            }
            Err(e) => tracing::error!(error = %e, "reading the runs upgrading members"),
        }
        Arc::new(Ledger {
            fleet,
            lease_ttl,
            desk: Mutex::new(()),
            holders: Mutex::new(holders),
            freed: Notify::new(),
            upgrading: Mutex::new(upgrading),
        })
    }

    /// The run engine committed `state` of run `run`: remember which members it upgrades now.
    pub fn note_run(&self, run: &str, state: &upkeep_core::run::RunState) {
        let members: std::collections::BTreeSet<String> =
            state.members().filter(|m| m.level.status == Status::Running).map(|m| m.name.clone()).collect();
        let mut upgrading = lock(&self.upgrading);
        if members.is_empty() {
            upgrading.remove(run);
        } else {
            upgrading.insert(run.to_string(), members);
        }
    }

    /// Member -> the run upgrading it now.
    pub fn upgrading(&self) -> HashMap<String, String> {
        lock(&self.upgrading).iter().flat_map(|(run, ms)| ms.iter().map(move |m| (m.clone(), run.clone()))).collect()
    }

    /// The run upgrading `member` now, if any.
    pub fn upgrading_run(&self, member: &str) -> Option<String> {
        lock(&self.upgrading).iter().find(|(_, ms)| ms.contains(member)).map(|(run, _)| run.clone())
    }

    fn store(&self) -> &dyn Store {
        self.fleet.store()
    }

    /// Waits until a lease is given back (or a caller pokes).
    pub async fn freed(&self) {
        self.freed.notified().await
    }

    /// Wakes everything waiting for a slot (a setting or a run changed).
    pub fn poke(&self) {
        self.freed.notify_waiters();
    }

    /// Drops leases past their expiry.
    pub fn expire(&self) -> Result<(), StoreError> {
        let now = now_ms();
        let expired = self.store().expire_leases(now)?;
        let events: Vec<_> = expired.iter().map(|l| crate::outbox::lease_event("expired", l, now)).collect();
        crate::outbox::emit(self.store(), &events);
        for l in &expired {
            tracing::warn!(node = %l.node, lease = %l.lease_id, holder = %l.holder, "lease expired (holder silent)");
            lock(&self.holders).remove(&l.node);
        }
        if !expired.is_empty() {
            self.poke();
        }
        Ok(())
    }

    /// Unexpired leases of a member (every member when None).
    pub fn held(&self, member: Option<&str>) -> Result<Vec<LeaseRecord>, StoreError> {
        self.expire()?;
        match member {
            Some(m) => self.store().leases_of(LeasesOf::Member(m)),
            None => self.store().list_leases(),
        }
    }

    /// Decides and, when granted, records a lease for `node`, a node of `member`.
    pub fn take(&self, node: &str, member: &str, ask: &LeaseAsk<'_>) -> Result<LeaseDecision, StoreError> {
        let _desk = lock(&self.desk);
        // Only the member's leases weigh in the decision. Expired ones are dropped first, with a write only when
        // there are some (at 100k nodes a DELETE per grant was a write transaction per node); other members'
        // expired leases are dropped by the maintenance pass.
        let mut leases = self.store().leases_of(LeasesOf::Member(member))?;
        let now = now_ms();
        if leases.iter().any(|l| l.expires_ms <= now) {
            self.expire()?;
            leases = self.store().leases_of(LeasesOf::Member(member))?;
        }
        // Adoption: the same owner's earlier work left this node out of service; the new work takes it over.
        if let Some(prev) =
            leases.iter().find(|l| l.node == node && l.holder == ask.holder && l.lease_id != ask.lease_id)
        {
            self.store().release_leases(node, std::slice::from_ref(&prev.lease_id), false)?;
            tracing::info!(node = %node, from = %prev.lease_id, to = ask.lease_id, "lease adopted by the owner's next work");
            self.record(node, member, ask, None)?;
            self.fleet.counters().lease_decision("already_held", "");
            return Ok(LeaseDecision::AlreadyHeld);
        }
        let node_count = self.fleet.view().member_node_count(member) as u32;
        let settings = self.store().member_settings(member)?;
        let window: Option<MaintenanceSchedule> =
            settings.node_os_schedule.as_deref().and_then(|s| serde_json::from_str(s).ok());
        // The run upgrading the member blocks every other holder; its own work is what it is waiting for.
        let run = self.upgrading_run(member).filter(|r| ask.holder != run_holder(r, member));
        let held: Vec<HeldLease> = leases
            .iter()
            .map(|l| HeldLease {
                node: l.node.clone(),
                lease_id: l.lease_id.clone(),
                purpose: format!("{}, held by {} since {}", l.purpose, l.holder, time_of(l.granted_ms)),
            })
            .collect();
        let budget = MemberBudget {
            member,
            node_count,
            max_unavailable: settings.budget(),
            window: window.as_ref(),
            upgrading_run: run.as_deref(),
            held: &held,
        };
        let decision = decide_lease(&budget, node, ask.lease_id, ask.outside_window, Utc::now());
        match &decision {
            LeaseDecision::Grant => self.fleet.counters().lease_decision("granted", ""),
            LeaseDecision::AlreadyHeld => self.fleet.counters().lease_decision("already_held", ""),
            LeaseDecision::Deny { cause, .. } => self.fleet.counters().lease_decision("denied", cause.as_str()),
        }
        if matches!(decision, LeaseDecision::Grant | LeaseDecision::AlreadyHeld) {
            let granted = leases.iter().find(|l| l.node == node && l.lease_id == ask.lease_id);
            let lease = self.record(node, member, ask, granted.map(|l| l.granted_ms))?;
            if decision == LeaseDecision::Grant {
                crate::outbox::emit(self.store(), &[crate::outbox::lease_event("granted", &lease, now_ms())]);
                tracing::info!(
                    node = %node,
                    member,
                    lease = ask.lease_id,
                    holder = ask.holder,
                    forced = ask.forced,
                    purpose = ask.purpose,
                    "lease granted"
                );
            }
        }
        Ok(decision)
    }

    /// Records the lease `ask` for `node`: granted now, or at `granted_ms` when it is held already (its expiry moves).
    fn record(
        &self,
        node: &str,
        member: &str,
        ask: &LeaseAsk<'_>,
        granted_ms: Option<i64>,
    ) -> Result<LeaseRecord, StoreError> {
        let now = now_ms();
        let granted_ms = granted_ms.unwrap_or(now);
        let lease = LeaseRecord {
            node: node.to_string(),
            lease_id: ask.lease_id.to_string(),
            member: member.to_string(),
            holder: ask.holder.to_string(),
            purpose: ask.purpose.to_string(),
            granted_ms,
            expires_ms: now + self.lease_ttl.as_millis() as i64,
            forced: ask.forced,
        };
        self.store().put_lease(&lease)?;
        lock(&self.holders).insert(node.to_string(), now);
        Ok(lease)
    }

    /// Gives a lease back.
    pub fn release(&self, node: &str, lease_id: &str) -> Result<(), StoreError> {
        let released = self.store().release_leases(node, &[lease_id.to_string()], false)?;
        self.after_release(node, &released)
    }

    /// Gives back every lease of a node (it is back in service: an operator uncordoned it).
    pub fn release_node(&self, node: &str) -> Result<Vec<LeaseRecord>, StoreError> {
        let released = self.store().release_leases(node, &[], true)?;
        self.after_release(node, &released)?;
        Ok(released)
    }

    /// A node gives back leases it holds itself (holder `node`: leases granted to agents by hubs before the
    /// executor carried out every reboot). Work the hub carries out on the node is not the node's to give back.
    pub fn node_release(&self, node: &str, ids: &[String], all_except: bool) -> Result<(), StoreError> {
        let own: Vec<String> = self
            .store()
            .leases_of(LeasesOf::Node(node))?
            .into_iter()
            .filter(|l| l.holder == "node" && (ids.contains(&l.lease_id) != all_except))
            .map(|l| l.lease_id)
            .collect();
        if own.is_empty() {
            return Ok(());
        }
        let released = self.store().release_leases(node, &own, false)?;
        self.after_release(node, &released)
    }

    fn after_release(&self, node: &str, released: &[LeaseRecord]) -> Result<(), StoreError> {
        let now = now_ms();
        let events: Vec<_> = released.iter().map(|l| crate::outbox::lease_event("released", l, now)).collect();
        crate::outbox::emit(self.store(), &events);
        for l in released {
            tracing::info!(node, lease = %l.lease_id, holder = %l.holder, "lease released");
        }
        if self.store().leases_of(LeasesOf::Node(node))?.is_empty() {
            lock(&self.holders).remove(node);
        }
        if !released.is_empty() {
            self.poke();
        }
        Ok(())
    }

    /// Nodes holding a lease this hub granted or read at start.
    pub fn holders(&self) -> Vec<String> {
        lock(&self.holders).keys().cloned().collect()
    }

    /// The node was heard from: its leases stay alive (extended at most every ttl/10).
    pub fn alive(&self, node: &str) {
        let now = now_ms();
        let step = (self.lease_ttl.as_millis() / 10) as i64;
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
        if due && let Err(e) = self.store().extend_leases(node, now + self.lease_ttl.as_millis() as i64) {
            tracing::error!(node, error = %e, "extending leases");
        }
    }

    /// How long a lease lives without news from its node.
    pub fn ttl(&self) -> Duration {
        self.lease_ttl
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::Timing;
    use crate::store::NodeFacts;
    use crate::store::sqlite::SqliteStore;

    fn ledger(dir: &std::path::Path) -> Arc<Ledger> {
        let store = SqliteStore::open(&dir.join("hub.db")).expect("store");
        let fleet = Arc::new(
            Fleet::new(Arc::new(store), Timing { heartbeat_interval_seconds: 1, silent_after_heartbeats: 3 })
                .expect("fleet"),
        );
        for n in ["a", "b"] {
            let facts = NodeFacts { member: "m1".into(), node_pool: "p".into(), ..Default::default() };
            fleet.store().record_report(n, &facts, now_ms()).expect("node");
        }
        Ledger::new(fleet, Duration::from_secs(1800))
    }

    fn take(l: &Ledger, node: &str, id: &str, holder: &str) -> LeaseDecision {
        let rec = l.store().get_node(node).expect("read").expect("node");
        let ask = LeaseAsk { lease_id: id, holder, purpose: "test", outside_window: false, forced: false };
        l.take(&rec.name, &rec.facts.member, &ask).expect("decision")
    }

    #[test]
    fn sec4_one_budget_for_every_holder_until_released_or_expired() {
        let dir = tempfile::tempdir().expect("tempdir");
        let l = ledger(dir.path());
        assert_eq!(take(&l, "a", "run/r1/m1/1", "run/r1/m1"), LeaseDecision::Grant);
        assert_eq!(take(&l, "a", "run/r1/m1/1", "run/r1/m1"), LeaseDecision::AlreadyHeld);
        // A reboot of another node of the member is denied, naming the run batch that holds the slot.
        match take(&l, "b", "reboot/b/x", "reboot/b") {
            LeaseDecision::Deny { reason, .. } => {
                assert!(reason.contains("\"a\"") && reason.contains("max_unavailable 1"), "{reason}")
            }
            d => panic!("expected a denial, got {d:?}"),
        }
        l.release("a", "run/r1/m1/1").expect("release");
        assert_eq!(take(&l, "b", "reboot/b/x", "reboot/b"), LeaseDecision::Grant);
        // A lease whose node went silent lapses at its expiry.
        let mut held = l.store().list_leases().expect("leases");
        held[0].expires_ms = now_ms() - 1;
        l.store().put_lease(&held[0]).expect("backdate");
        assert_eq!(take(&l, "a", "rollout/m1/1", "rollout/m1"), LeaseDecision::Grant);
    }

    #[test]
    fn the_owners_next_work_adopts_a_node_left_out_and_nodes_release_only_their_own_leases() {
        let dir = tempfile::tempdir().expect("tempdir");
        let l = ledger(dir.path());
        assert_eq!(take(&l, "a", "run/r1/m1/1", "run/r1/m1"), LeaseDecision::Grant);
        // The member's next attempt takes the node over instead of waiting for it.
        assert_eq!(take(&l, "a", "run/r1/m1/2", "run/r1/m1"), LeaseDecision::AlreadyHeld);
        let held = l.store().list_leases().expect("leases");
        assert_eq!(held.iter().map(|l| l.lease_id.as_str()).collect::<Vec<_>>(), ["run/r1/m1/2"]);
        // Another owner's work on the same node is refused: one disruption per node.
        assert!(matches!(take(&l, "a", "reboot/a/x", "reboot/a"), LeaseDecision::Deny { .. }));
        // An agent giving back "everything but what I run" cannot release the hub's work on it.
        l.node_release("a", &[], true).expect("release");
        assert_eq!(l.store().list_leases().expect("leases").len(), 1);
        // An operator's uncordon gives back everything.
        assert_eq!(l.release_node("a").expect("release").len(), 1);
        assert!(l.store().list_leases().expect("leases").is_empty());
    }
}
