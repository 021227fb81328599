//! Advance notice (`upkeepctl schedule`, `GetSchedule`): what will happen in the fleet and when, at the earliest.
//!
//! Three sources, each predicted by the rules that will later carry it out, never by a second copy of them:
//! - **Update runs** that are running: `core::run::preview` simulates the run's planner forward (stage order,
//!   group concurrency, member windows), each member assumed to take `assumed_member_seconds`.
//! - **Channel rollouts**: the maintenance loop's own inputs and decisions (`Maintenance::inputs`,
//!   `desired_rollout`, the failed-target rule, the catch-up rule), run forward by `core::forecast`: the start
//!   at the first instant `may_start` allows (window, freeze dates, cadence), then batch after batch as the
//!   member's budget cuts them, each batch inside a window.
//! - **Reboots** the OS asks for: at once when the window is open, else at its next opening.
//!
//! [`notices`] sends each predicted operation once as a webhook event, `upkeep.maintenance.upcoming`, when its
//! earliest time comes within `[webhooks] upcoming_notice_minutes`.

use crate::engine::{Engine, work_node};
use crate::fleet::now_ms;
use crate::maintenance::{Maintenance, cadence_from, owed};
use crate::store::{OutboxEvent, Store, StoreError};
use chrono::{DateTime, TimeDelta, Utc};
use std::sync::Arc;
use std::time::Duration;
use upkeep_core::forecast::{RolloutOutlook, rollout_forecast};
use upkeep_core::maintenance::window_allows;
use upkeep_core::run;
use upkeep_core::work::{Operation, plan_work};
use upkeep_proto::v1;

/// Longest look ahead, days.
pub const MAX_DAYS: u32 = 90;
/// Default look ahead, days.
pub const DEFAULT_DAYS: u32 = 7;
/// Default time one node's (or one run member's) work is assumed to take, seconds.
pub const DEFAULT_ASSUMED_SECONDS: u32 = 600;

/// What to forecast.
#[derive(Debug, Clone)]
pub struct Ask {
    /// From.
    pub now: DateTime<Utc>,
    /// Until.
    pub horizon: DateTime<Utc>,
    /// Only this member.
    pub member: Option<String>,
    /// One node's operation.
    pub assumed_node: TimeDelta,
    /// One run member's upgrade.
    pub assumed_member: TimeDelta,
}

impl Ask {
    /// From the request, with its bounds checked (the message names the field and the fix).
    pub fn from_request(r: &v1::GetScheduleRequest, now: DateTime<Utc>) -> Result<Ask, String> {
        let days = if r.days == 0 { DEFAULT_DAYS } else { r.days };
        if days > MAX_DAYS {
            return Err(format!("days: {days} is more than {MAX_DAYS}; ask for a shorter look ahead"));
        }
        let secs = |v: u32, field: &str| -> Result<TimeDelta, String> {
            let v = if v == 0 { DEFAULT_ASSUMED_SECONDS } else { v };
            if i64::from(v) > run::MAX_WAIT_SECONDS {
                return Err(format!("{field}: {v} is more than {} (30 days)", run::MAX_WAIT_SECONDS));
            }
            Ok(TimeDelta::seconds(i64::from(v)))
        };
        Ok(Ask {
            now,
            horizon: now + TimeDelta::days(i64::from(days)),
            member: (!r.member.is_empty()).then(|| r.member.clone()),
            assumed_node: secs(r.assumed_node_seconds, "assumed_node_seconds")?,
            assumed_member: secs(r.assumed_member_seconds, "assumed_member_seconds")?,
        })
    }

    fn wants(&self, member: &str) -> bool {
        self.member.as_deref().is_none_or(|m| m == member)
    }
}

fn ms(t: Option<DateTime<Utc>>) -> i64 {
    t.map_or(0, |t| t.timestamp_millis())
}

/// Every predicted operation, ordered by earliest time (unknown last), then member and node.
pub fn forecast(
    engine: &Engine,
    maintenance: &Maintenance,
    store: &dyn Store,
    ask: &Ask,
) -> Result<v1::Schedule, StoreError> {
    let mut ops = runs(engine, store, ask)?;
    ops.extend(channels(maintenance, ask)?);
    ops.sort_by(|a, b| {
        let key = |o: &v1::UpcomingOperation| if o.earliest_unix_ms == 0 { i64::MAX } else { o.earliest_unix_ms };
        (key(a), &a.member, &a.node, &a.source).cmp(&(key(b), &b.member, &b.node, &b.source))
    });
    Ok(v1::Schedule {
        operations: ops,
        generated_unix_ms: ask.now.timestamp_millis(),
        horizon_unix_ms: ask.horizon.timestamp_millis(),
    })
}

/// Members of running update runs, by the run planner's own simulation.
fn runs(engine: &Engine, store: &dyn Store, ask: &Ask) -> Result<Vec<v1::UpcomingOperation>, StoreError> {
    let (fleet, catalog) = match engine.views() {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "schedule: no fleet view; update runs left out");
            return Ok(Vec::new());
        }
    };
    let mut out = Vec::new();
    for rec in store.list_runs()? {
        // An unreadable run is reported by the engine; it predicts nothing here.
        let Ok(state) = rec.state() else { continue };
        if state.run.status != run::Status::Running {
            continue;
        }
        let upgrade = state.spec.upgrade_type.as_str();
        for p in run::preview(&state, &fleet, &catalog, ask.now, ask.assumed_member) {
            if p.at > ask.horizon || !ask.wants(&p.member) {
                continue;
            }
            let place = state
                .stages
                .iter()
                .flat_map(|st| st.groups.iter().map(move |g| (st, g)))
                .find(|(_, g)| g.members.iter().any(|m| m.name == p.member))
                .map(|(st, g)| format!(" (stage {}, group {})", st.name, g.name))
                .unwrap_or_default();
            let running = state.members().any(|m| m.name == p.member && m.level.status == run::Status::Running);
            out.push(v1::UpcomingOperation {
                member: p.member.clone(),
                node: String::new(),
                source: "run".into(),
                operation: format!("update run {}: {upgrade}{place}", rec.name),
                earliest_unix_ms: p.at.timestamp_millis(),
                why: if running { "under way".into() } else { "the run's stage order, windows and concurrency".into() },
                reference: rec.name.clone(),
                batch: 0,
                batches: 0,
            });
        }
    }
    Ok(out)
}

/// Channel rollouts and reboots, from the maintenance loop's own inputs.
fn channels(maintenance: &Maintenance, ask: &Ask) -> Result<Vec<v1::UpcomingOperation>, StoreError> {
    let mut out = Vec::new();
    let inp = maintenance.inputs()?;
    let by_member = inp.by_member();
    let settings = maintenance.settings();
    let reboot_whys = maintenance.reboot_whys();
    for member in inp.members.iter().filter(|m| ask.wants(&m.name)) {
        let nodes = by_member.get(member.name.as_str()).cloned().unwrap_or_default();
        let window = inp.window(&member.name);
        let existing = inp.rollouts.get(&member.name);
        let member_settings = inp.settings.get(&member.name);
        // Reboots the OS asks for: taken by the hub inside the window, within the budget.
        for n in nodes.iter().filter(|n| n.facts.reboot_required) {
            let known = reboot_whys.get(&n.name);
            let (earliest, why) = match window_allows(window.as_ref(), ask.now) {
                Ok(()) => match known.filter(|w| w.next_eligible_ms > 0) {
                    Some(w) => (upkeep_core::limits::time_from_ms(w.next_eligible_ms), w.waiting.clone()),
                    None => (Some(ask.now), "the OS asks for a reboot; the window is open".to_string()),
                },
                Err(next) => (next, "the OS asks for a reboot; it waits for the node OS window".to_string()),
            };
            let earliest = earliest.filter(|t| *t <= ask.horizon);
            out.push(v1::UpcomingOperation {
                member: member.name.clone(),
                node: n.name.clone(),
                source: "reboot".into(),
                operation: "reboot".into(),
                earliest_unix_ms: ms(earliest),
                why,
                reference: format!("reboot/{}", n.name),
                batch: 0,
                batches: 0,
            });
        }
        if !settings.enabled {
            continue;
        }
        let running = existing.filter(|r| r.status == "Running");
        let rollout = match running {
            // Under way: the nodes it has not done yet.
            Some(r) => {
                let mut left = r.rollout.clone();
                left.tasks.retain(|node, _| !r.done.contains(node) && !r.failed.contains_key(node));
                (!left.tasks.is_empty()).then_some(left)
            }
            None => inp.desired(member, &nodes, ask.now).and_then(|d| owed(d, existing)),
        };
        let Some(rollout) = rollout else { continue };
        let work_nodes: Vec<_> = nodes.iter().map(|n| work_node(n)).collect();
        let budget = member_settings.map(|s| s.budget()).unwrap_or(upkeep_core::concurrency::Limit::Count(1));
        let plan = plan_work(&Operation::Rollout { tasks: rollout.tasks.clone() }, &work_nodes, budget);
        let outlook = RolloutOutlook {
            rollout: &rollout,
            plan: &plan,
            window: window.as_ref(),
            last_release_start: cadence_from(&rollout, existing),
            cadence: settings.cadence,
            blocked_by_run: inp.runs.get(&member.name).map(String::as_str),
            under_way: running.is_some(),
        };
        // The rollout's id, not its work id: it names the same rollout before and after it starts (notices are
        // keyed by it).
        let reference = rollout.id.clone();
        for f in rollout_forecast(&outlook, ask.now, ask.horizon, ask.assumed_node) {
            out.push(v1::UpcomingOperation {
                member: member.name.clone(),
                node: f.node,
                source: "rollout".into(),
                operation: f.operation,
                earliest_unix_ms: ms(f.earliest),
                why: f.why,
                reference: reference.clone(),
                batch: f.batch,
                batches: f.batches,
            });
        }
    }
    Ok(out)
}

/// The CloudEvents type of an advance notice.
pub const UPCOMING_TYPE: &str = "upkeep.maintenance.upcoming";

/// The once-ever key of an operation's notice, None for what is not a notice (under way, or no time known).
/// Run members and rollout nodes are keyed by what they are (the run or rollout and the member or node, which
/// never repeat: a rollout's id names its target release), so a prediction that moves does not send a second
/// notice; a reboot, which a node may need again, is keyed by its time too.
fn notice_key(o: &v1::UpcomingOperation, now_ms: i64) -> Option<String> {
    if o.earliest_unix_ms == 0 || o.why == "under way" {
        return None;
    }
    match o.source.as_str() {
        "reboot" if o.earliest_unix_ms > now_ms => Some(format!("upcoming/reboot/{}/{}", o.node, o.earliest_unix_ms)),
        "reboot" => None,
        _ => Some(format!("upcoming/{}/{}/{}/{}", o.source, o.reference, o.member, o.node)),
    }
}

/// The notice event of one predicted operation.
fn notice_event(o: &v1::UpcomingOperation, now_ms: i64) -> OutboxEvent {
    let subject = if o.node.is_empty() { format!("members/{}", o.member) } else { format!("nodes/{}", o.node) };
    let earliest = upkeep_core::limits::time_from_ms(o.earliest_unix_ms).map(upkeep_core::schedule::rfc3339);
    let data = serde_json::json!({
        "member": o.member,
        "node": o.node,
        "source": o.source,
        "operation": o.operation,
        "earliest": earliest,
        "why": o.why,
        "reference": o.reference,
        "batch": o.batch,
        "batches": o.batches,
    });
    OutboxEvent { event_type: UPCOMING_TYPE.into(), subject, time_ms: now_ms, data: data.to_string() }
}

/// Sends advance notices: every pass, each predicted operation whose earliest time is within `lead` is enqueued
/// once (`Store::enqueue_once`) for the webhooks that subscribe to [`UPCOMING_TYPE`]. Nothing is predicted while
/// no webhook wants notices. A pass runs at start, after every change the maintenance loop is poked for (a
/// release, a channel, a window), and every tenth of the lead (10 s to 5 min).
pub async fn notices(engine: Arc<Engine>, maintenance: Arc<Maintenance>, lead: Duration) {
    let period = (lead / 10).clamp(Duration::from_secs(10), Duration::from_secs(300));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = maintenance.changed() => {}
        }
        if let Err(e) = notice_pass(&engine, &maintenance, lead) {
            tracing::error!(error = %e, "advance notices");
        }
    }
}

/// One pass of [`notices`]; returns how many notices were enqueued.
pub fn notice_pass(engine: &Engine, maintenance: &Maintenance, lead: Duration) -> Result<usize, StoreError> {
    let store = maintenance.store();
    let wanted = store.list_webhooks()?.iter().any(|h| crate::webhooks::type_matches(&h.hook.events, UPCOMING_TYPE));
    if !wanted {
        return Ok(0);
    }
    let now = Utc::now();
    let ask = Ask {
        now,
        horizon: now + TimeDelta::from_std(lead).unwrap_or(TimeDelta::days(1)),
        member: None,
        assumed_node: TimeDelta::seconds(i64::from(DEFAULT_ASSUMED_SECONDS)),
        assumed_member: TimeDelta::seconds(i64::from(DEFAULT_ASSUMED_SECONDS)),
    };
    let now_ms = now_ms();
    let mut sent = 0;
    for o in forecast(engine, maintenance, store, &ask)?.operations {
        let Some(key) = notice_key(&o, now_ms) else { continue };
        if store.enqueue_once(&key, now_ms, &[notice_event(&o, now_ms)])? {
            tracing::info!(member = %o.member, node = %o.node, operation = %o.operation, "advance notice sent");
            sent += 1;
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(source: &str, node: &str, earliest: i64, why: &str) -> v1::UpcomingOperation {
        v1::UpcomingOperation {
            member: "m1".into(),
            node: node.into(),
            source: source.into(),
            operation: "reimage to F-202312.01.0".into(),
            earliest_unix_ms: earliest,
            why: why.into(),
            reference: "node-image:F-202312.01.0".into(),
            batch: 1,
            batches: 2,
        }
    }

    #[test]
    fn a_notice_is_keyed_by_what_will_happen_not_by_a_prediction_that_moves() {
        let now = 1_000_000;
        let a = notice_key(&op("rollout", "n1", now + 60_000, "window"), now).expect("key");
        let moved = notice_key(&op("rollout", "n1", now + 90_000, "after batch 1"), now).expect("key");
        assert_eq!(a, moved, "a moved estimate is the same operation");
        assert_ne!(a, notice_key(&op("rollout", "n2", now + 60_000, "window"), now).expect("key"));
        assert_eq!(notice_key(&op("rollout", "n1", now, "under way"), now), None, "happening, not upcoming");
        assert_eq!(notice_key(&op("rollout", "n1", 0, "after update run"), now), None, "no time known");
        // A reboot may come again: its time is part of the key, and one due now is no notice.
        let r1 = notice_key(&op("reboot", "n1", now + 60_000, "window"), now).expect("key");
        let r2 = notice_key(&op("reboot", "n1", now + 86_400_000, "window"), now).expect("key");
        assert_ne!(r1, r2);
        assert_eq!(notice_key(&op("reboot", "n1", now, "window open"), now), None);
    }

    #[test]
    fn the_notice_event_names_the_node_or_the_member_and_carries_the_prediction() {
        let e = notice_event(&op("rollout", "n1", 1_800_000_000_000, "window"), 5);
        assert_eq!((e.event_type.as_str(), e.subject.as_str(), e.time_ms), (UPCOMING_TYPE, "nodes/n1", 5));
        let d: serde_json::Value = serde_json::from_str(&e.data).expect("json");
        assert_eq!(d["earliest"], "2027-01-15T08:00:00Z");
        assert_eq!(d["operation"], "reimage to F-202312.01.0");
        let e = notice_event(&op("run", "", 1_800_000_000_000, "stage order"), 5);
        assert_eq!(e.subject, "members/m1");
    }
}
