//! The typed run tree of the operator API (`v1::Run` and its levels) made from core's `RunState`, and the names
//! of a run event's level. Everything that shows a run (upkeepctl, its dashboard) reads these messages.

use crate::executor::{JobState, NodeOutcome};
use crate::store::{EventRecord, RunRecord};
use chrono::{DateTime, Utc};
use upkeep_core::run::{LevelState, MemberState, NodeImageSelection, RunState, Status};
use upkeep_proto::v1;

fn ms(t: Option<DateTime<Utc>>) -> i64 {
    t.map(|t| t.timestamp_millis()).unwrap_or(0)
}

/// The wire form of one level's record.
pub fn level(l: &LevelState) -> v1::RunLevel {
    v1::RunLevel {
        status: l.status.as_str().to_string(),
        started_unix_ms: ms(l.started_at),
        ended_unix_ms: ms(l.ended_at),
        message: l.message.clone(),
        error: l.error.clone(),
    }
}

fn count<'a>(members: impl Iterator<Item = &'a MemberState>) -> v1::RunMemberCounts {
    let mut c = v1::RunMemberCounts::default();
    for m in members {
        c.total += 1;
        let slot = match m.level.status {
            Status::NotStarted => &mut c.not_started,
            Status::Running => &mut c.running,
            Status::Pending => &mut c.pending,
            Status::Stopping => &mut c.stopping,
            Status::Stopped => &mut c.stopped,
            Status::Skipped => &mut c.skipped,
            Status::Failed => &mut c.failed,
            Status::Completed => &mut c.completed,
        };
        *slot += 1;
    }
    c
}

/// The work id of a member's attempt (the executor's job and lease id), as the engine names it.
pub fn member_work_id(run: &str, member: &str, attempt: u32) -> String {
    format!("run/{run}/{member}/{attempt}")
}

/// Node progress of a member's work as the executor stored it.
pub fn node_progress(job: &JobState) -> v1::RunNodeProgress {
    let mut p = v1::RunNodeProgress {
        work: job.spec.id.clone(),
        work_status: job.status.as_str().to_string(),
        total: u32::try_from(job.spec.plan.nodes().count()).unwrap_or(u32::MAX),
        ..Default::default()
    };
    for o in job.nodes.values() {
        match o {
            NodeOutcome::Done => p.done += 1,
            NodeOutcome::Skipped(_) => p.skipped += 1,
            NodeOutcome::Failed(_) => p.failed += 1,
        }
    }
    p
}

/// Finds a member's stored work by its id.
pub type WorkLookup<'a> = dyn Fn(&str) -> Option<JobState> + 'a;

/// The typed run. `work` looks up a member's work by id (GetRun passes the executor's store; ListRuns passes
/// nothing, leaving `nodes` unset). Completed and Skipped members are not looked up: at fleet scale a run's
/// finished members would cost one store read each.
pub fn run_tree(rec: &RunRecord, s: &RunState, work: Option<&WorkLookup<'_>>) -> v1::Run {
    let selection = match &s.spec.node_image_selection {
        NodeImageSelection::Latest => v1::RunImageSelection { mode: "Latest".into(), pins: Vec::new() },
        NodeImageSelection::Consistent => v1::RunImageSelection { mode: "Consistent".into(), pins: Vec::new() },
        NodeImageSelection::Custom { pins } => v1::RunImageSelection {
            mode: "Custom".into(),
            pins: pins
                .iter()
                .map(|p| v1::RunImagePin { family: p.family.clone(), version: p.version.to_string() })
                .collect(),
        },
    };
    let member = |m: &MemberState| v1::RunMember {
        name: m.name.clone(),
        level: Some(level(&m.level)),
        attempts: m.attempts,
        target: m.target.as_ref().map(|t| v1::RunMemberTarget {
            kubernetes_version: t.kubernetes_version.map(|k| k.to_string()).unwrap_or_default(),
            images: t.images.iter().map(|(p, i)| (p.clone(), i.to_string())).collect(),
        }),
        nodes: work
            .filter(|_| m.attempts > 0 && !matches!(m.level.status, Status::Completed | Status::Skipped))
            .and_then(|f| f(&member_work_id(&rec.name, &m.name, m.attempts)))
            .map(|j| node_progress(&j)),
    };
    let stages = s
        .stages
        .iter()
        .map(|st| v1::RunStage {
            name: st.name.clone(),
            level: Some(level(&st.level)),
            max_concurrency: st.max_concurrency.map(|l| l.to_string()).unwrap_or_default(),
            after_stage_wait_seconds: st.wait_seconds,
            after_stage_wait: st.wait.as_ref().map(level),
            counts: Some(count(st.groups.iter().flat_map(|g| g.members.iter().map(|m| &**m)))),
            groups: st
                .groups
                .iter()
                .map(|g| v1::RunGroup {
                    name: g.name.clone(),
                    level: Some(level(&g.level)),
                    max_concurrency: g.max_concurrency.map(|l| l.to_string()).unwrap_or_default(),
                    counts: Some(count(g.members.iter().map(|m| &**m))),
                    members: g.members.iter().map(|m| member(m)).collect(),
                })
                .collect(),
        })
        .collect();
    #[allow(deprecated)]
    v1::Run {
        name: rec.name.clone(),
        // Deprecated; kept one release for older upkeepctl builds. Nothing of ours reads it.
        state_json: crate::engine::state_json(s),
        created_at_unix_ms: rec.created_ms,
        strategy_name: rec.strategy_name.clone().unwrap_or_default(),
        level: Some(level(&s.run)),
        upgrade_type: s.spec.upgrade_type.as_str().to_string(),
        kubernetes_version: s.spec.kubernetes_version.map(|k| k.to_string()).unwrap_or_default(),
        node_image_selection: Some(selection),
        selected_images: s.image_selection.iter().flatten().map(|(f, v)| (f.clone(), v.to_string())).collect(),
        counts: Some(count(s.members())),
        stages,
    }
}

/// The wire form of a stored run event, with its level's names (the engine writes levels as `stage "s"`,
/// `wait after stage "s"`, `group "g" of stage "s"`, `member "m"` and `node "n" of member "m"`).
pub fn event_to_wire(e: &EventRecord) -> v1::RunEvent {
    let quoted: Vec<String> = e.event.level.split('"').skip(1).step_by(2).map(str::to_string).collect();
    let q = |i: usize| quoted.get(i).cloned().unwrap_or_default();
    let mut w = v1::RunEvent {
        seq: e.seq,
        run: e.run.clone(),
        at_unix_ms: e.event.at_ms,
        kind: e.event.kind.clone(),
        level: e.event.level.clone(),
        from: e.event.from.clone(),
        to: e.event.to.clone(),
        message: e.event.message.clone(),
        error: e.event.error.clone(),
        run_status: e.event.run_status.clone(),
        ..Default::default()
    };
    match e.event.kind.as_str() {
        "stage" | "wait" => w.stage = q(0),
        "group" => (w.group, w.stage) = (q(0), q(1)),
        "member" => w.member = q(0),
        "node" => (w.node, w.member) = (q(0), q(1)),
        _ => {}
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewEvent;

    fn event(kind: &str, level: &str) -> v1::RunEvent {
        event_to_wire(&EventRecord {
            seq: 7,
            run: "r1".into(),
            event: NewEvent {
                at_ms: 1,
                kind: kind.into(),
                level: level.into(),
                from: "Running".into(),
                to: "Completed".into(),
                message: String::new(),
                error: String::new(),
                run_status: "Running".into(),
            },
        })
    }

    /// Each level the engine writes gets its names on the wire, so no reader parses the human level text.
    #[test]
    fn events_carry_the_names_of_their_level() {
        let names = |e: v1::RunEvent| (e.stage, e.group, e.member, e.node);
        let s = |x: &str| x.to_string();
        assert_eq!(names(event("run", "run")), (s(""), s(""), s(""), s("")));
        assert_eq!(names(event("stage", "stage \"canary\"")), (s("canary"), s(""), s(""), s("")));
        assert_eq!(names(event("wait", "wait after stage \"canary\"")), (s("canary"), s(""), s(""), s("")));
        assert_eq!(names(event("group", "group \"east\" of stage \"prod\"")), (s("prod"), s("east"), s(""), s("")));
        assert_eq!(names(event("member", "member \"m1\"")), (s(""), s(""), s("m1"), s("")));
        assert_eq!(names(event("node", "node \"n1\" of member \"m1\"")), (s(""), s(""), s("m1"), s("n1")));
        let e = event("member", "member \"m1\"");
        assert_eq!((e.seq, e.run.as_str(), e.to.as_str()), (7, "r1", "Completed"));
    }
}
