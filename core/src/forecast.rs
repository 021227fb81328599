//! Advance notice: what a member's channel will do to its nodes, and the earliest each node can be touched.
//!
//! The hub already decides *whether* a rollout may start now ([`may_start`]) and *in which order* nodes go
//! ([`WorkPlan`] batches). A forecast runs the same rules forward in time instead of at one instant:
//! - the rollout starts at the first instant [`may_start`] allows (the window's next opening, the end of the
//!   weekly cadence, whichever binds), searched up to a horizon;
//! - batch after batch follows, each assumed to take `assumed_node` (a forecast cannot know how long a reimage
//!   takes); a batch that would begin while the window is shut begins at the next opening instead, because the
//!   lease desk grants no lease outside the window (SPEC §4);
//! - the member's budget (`max_unavailable`) is already in the plan: it is how many nodes a batch holds.
//!
//! Everything is pure; the hub gathers the inputs (`hub/src/schedule.rs`).

use crate::maintenance::{Rollout, may_start, window_allows};
use crate::schedule::MaintenanceSchedule;
use crate::work::WorkPlan;
use chrono::{DateTime, TimeDelta, Utc};

/// Most turns of the search for a start (window and cadence alternate at most a few times; a bound all the same).
const MAX_SEARCH_TURNS: usize = 16;

/// One member's channel rollout as the forecast sees it.
#[derive(Debug, Clone)]
pub struct RolloutOutlook<'a> {
    /// The rollout the channel wants (targets a node failed before already removed).
    pub rollout: &'a Rollout,
    /// Its nodes in the executor's order and batches.
    pub plan: &'a WorkPlan,
    /// The member's node OS window.
    pub window: Option<&'a MaintenanceSchedule>,
    /// When the last rollout of a new release started (None when this one only catches nodes up).
    pub last_release_start: Option<DateTime<Utc>>,
    /// The weekly cadence (used only without a window).
    pub cadence: TimeDelta,
    /// An update run upgrading the member now: nothing starts before it finishes.
    pub blocked_by_run: Option<&'a str>,
    /// The rollout is already under way: its remaining nodes go now.
    pub under_way: bool,
}

/// One node's predicted operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeForecast {
    /// Node name.
    pub node: String,
    /// What will be done (`reimage to F-V`, `security patch F-V`).
    pub operation: String,
    /// 1-based batch of the node, and how many batches the rollout has.
    pub batch: u32,
    /// Number of batches.
    pub batches: u32,
    /// Earliest instant the node can be taken out of service; None when not known within the horizon.
    pub earliest: Option<DateTime<Utc>>,
    /// What sets that time (window, cadence, budget, a run, or under way).
    pub why: String,
}

/// The first instant in `[now, horizon]` at which a rollout of `kind` may start, or why none is known.
pub fn earliest_start(
    o: &RolloutOutlook<'_>,
    now: DateTime<Utc>,
    horizon: DateTime<Utc>,
) -> Result<(DateTime<Utc>, String), String> {
    if let Some(run) = o.blocked_by_run {
        return Err(format!("after update run {run:?} finishes upgrading the member"));
    }
    if o.under_way {
        return Ok((now, "under way".to_string()));
    }
    let mut t = now;
    let mut why = "may start now".to_string();
    for _ in 0..MAX_SEARCH_TURNS {
        match may_start(o.rollout.kind, o.window, o.last_release_start, o.cadence, t) {
            Ok(()) => return Ok((t, why)),
            Err(w) => match w.until {
                Some(next) if next > t && next <= horizon => {
                    why = w.why;
                    t = next;
                }
                Some(_) => return Err(format!("{} (past the horizon)", w.why)),
                None => return Err(w.why),
            },
        }
    }
    Err("no start found".to_string())
}

/// Every node of the rollout with its earliest time, in the executor's order.
pub fn rollout_forecast(
    o: &RolloutOutlook<'_>,
    now: DateTime<Utc>,
    horizon: DateTime<Utc>,
    assumed_node: TimeDelta,
) -> Vec<NodeForecast> {
    let step = assumed_node.max(TimeDelta::seconds(1));
    let batches = u32::try_from(o.plan.batches.len()).unwrap_or(u32::MAX);
    let start = earliest_start(o, now, horizon);
    let mut t = start.as_ref().ok().map(|(t, _)| *t);
    let mut out = Vec::new();
    for (i, batch) in o.plan.batches.iter().enumerate() {
        let mut why = match &start {
            Ok((_, why)) => why.clone(),
            Err(why) => why.clone(),
        };
        if i > 0 {
            t = t.and_then(|prev| prev.checked_add_signed(step)).filter(|n| *n <= horizon);
            why =
                format!("after batch {i} (max_unavailable {}, {}s a batch assumed)", o.plan.slots, step.num_seconds());
            // The lease desk grants nothing while the window is shut: a batch due then waits for its opening.
            if let Some(due) = t
                && let Err(next) = window_allows(o.window, due)
            {
                t = next.filter(|n| *n <= horizon);
                why = format!("after batch {i}, in the next window opening");
            }
            if t.is_none() {
                why = format!("{why}: past the horizon");
            }
        }
        for n in batch {
            let operation =
                o.rollout.tasks.get(&n.node).map(|task| task.describe()).unwrap_or_else(|| o.rollout.id.clone());
            out.push(NodeForecast {
                node: n.node.clone(),
                operation,
                batch: u32::try_from(i + 1).unwrap_or(u32::MAX),
                batches,
                earliest: t,
                why: why.clone(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::concurrency::Limit;
    use crate::maintenance::{NodeTask, RolloutKind};
    use crate::version::NodeImageVersion;
    use crate::work::{Operation, WorkNode, plan_work};
    use std::collections::BTreeMap;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).expect("rfc3339").with_timezone(&Utc)
    }

    fn rollout(nodes: &[&str]) -> Rollout {
        let image: NodeImageVersion = "Debian-12-202312.01.0".parse().expect("image");
        let tasks: BTreeMap<String, NodeTask> = nodes
            .iter()
            .map(|n| (n.to_string(), NodeTask::Reimage { image: image.clone(), reinstall: false }))
            .collect();
        Rollout { id: "node-image:Debian-12-202312.01.0".into(), kind: RolloutKind::NodeImage, tasks }
    }

    fn plan(r: &Rollout, budget: Limit) -> WorkPlan {
        let nodes: Vec<WorkNode> = r
            .tasks
            .keys()
            .map(|n| WorkNode {
                name: n.clone(),
                pool: "p".into(),
                control_plane: false,
                image: None,
                kubernetes: None,
            })
            .collect();
        plan_work(&Operation::Rollout { tasks: r.tasks.clone() }, &nodes, budget)
    }

    /// Daily 10:00-11:00 UTC.
    fn daily_hour() -> MaintenanceSchedule {
        serde_json::from_str(
            r#"{"frequency":{"type":"Daily","interval_days":1},"start_time":"10:00","duration_hours":1}"#,
        )
        .expect("schedule")
    }

    fn outlook<'a>(r: &'a Rollout, p: &'a WorkPlan, w: Option<&'a MaintenanceSchedule>) -> RolloutOutlook<'a> {
        RolloutOutlook {
            rollout: r,
            plan: p,
            window: w,
            last_release_start: None,
            cadence: TimeDelta::days(7),
            blocked_by_run: None,
            under_way: false,
        }
    }

    #[test]
    fn batches_follow_the_budget_and_a_batch_that_would_fall_outside_the_window_waits_for_the_next_opening() {
        let r = rollout(&["a", "b", "c"]);
        let p = plan(&r, Limit::Count(1));
        let w = daily_hour();
        let now = at("2026-11-23T08:00:00Z");
        let f = rollout_forecast(&outlook(&r, &p, Some(&w)), now, at("2026-11-30T00:00:00Z"), TimeDelta::minutes(40));
        let times: Vec<_> = f.iter().map(|n| (n.node.as_str(), n.batch, n.earliest)).collect();
        assert_eq!(
            times,
            [
                ("a", 1, Some(at("2026-11-23T10:00:00Z"))),
                ("b", 2, Some(at("2026-11-23T10:40:00Z"))),
                // 11:20 is past the window's close at 11:00: the next day's opening.
                ("c", 3, Some(at("2026-11-24T10:00:00Z"))),
            ]
        );
        assert!(f[0].why.contains("window"), "{}", f[0].why);
        assert!(f[2].why.contains("next window opening"), "{}", f[2].why);
        assert!(f.iter().all(|n| n.batches == 3 && n.operation == "reimage to Debian-12-202312.01.0"));

        // A budget of two puts two nodes in the first batch.
        let p2 = plan(&r, Limit::Count(2));
        let f2 = rollout_forecast(&outlook(&r, &p2, Some(&w)), now, at("2026-11-30T00:00:00Z"), TimeDelta::minutes(40));
        assert_eq!(f2.iter().map(|n| n.batch).collect::<Vec<_>>(), [1, 1, 2]);
        assert_eq!(f2[2].earliest, Some(at("2026-11-23T10:40:00Z")));
    }

    #[test]
    fn without_a_window_the_cadence_sets_the_start_and_a_catch_up_or_running_rollout_goes_now() {
        let r = rollout(&["a"]);
        let p = plan(&r, Limit::Count(1));
        let now = at("2026-11-23T08:00:00Z");
        let horizon = at("2026-12-31T00:00:00Z");
        let mut o = outlook(&r, &p, None);
        o.last_release_start = Some(at("2026-11-20T09:00:00Z"));
        let f = rollout_forecast(&o, now, horizon, TimeDelta::minutes(10));
        assert_eq!(f[0].earliest, Some(at("2026-11-27T09:00:00Z")), "{f:?}");
        assert!(f[0].why.contains("cadence"), "{}", f[0].why);
        // Past the horizon: unknown, and said so.
        let f = rollout_forecast(&o, now, at("2026-11-25T00:00:00Z"), TimeDelta::minutes(10));
        assert_eq!(f[0].earliest, None);
        assert!(f[0].why.contains("horizon"), "{}", f[0].why);
        o.last_release_start = None;
        assert_eq!(rollout_forecast(&o, now, horizon, TimeDelta::minutes(10))[0].earliest, Some(now));
        o.under_way = true;
        o.window = None;
        assert_eq!(rollout_forecast(&o, now, horizon, TimeDelta::minutes(10))[0].why, "under way");
    }

    #[test]
    fn a_run_upgrading_the_member_and_a_frozen_window_leave_the_time_unknown_with_the_reason() {
        let r = rollout(&["a"]);
        let p = plan(&r, Limit::Count(1));
        let now = at("2026-11-23T08:00:00Z");
        let mut o = outlook(&r, &p, None);
        o.blocked_by_run = Some("r1");
        let f = rollout_forecast(&o, now, at("2026-12-31T00:00:00Z"), TimeDelta::minutes(10));
        assert_eq!(f[0].earliest, None);
        assert!(f[0].why.contains("\"r1\""), "{}", f[0].why);
        // A freeze over the next days moves the start past it.
        let frozen: MaintenanceSchedule = serde_json::from_str(
            r#"{"frequency":{"type":"Daily","interval_days":1},"start_time":"10:00","duration_hours":1,
                "not_allowed":[{"start":"2026-11-23","end":"2026-11-25"}]}"#,
        )
        .expect("schedule");
        let o = outlook(&r, &p, Some(&frozen));
        let f = rollout_forecast(&o, now, at("2026-12-31T00:00:00Z"), TimeDelta::minutes(10));
        assert_eq!(f[0].earliest, Some(at("2026-11-26T10:00:00Z")));
    }
}
