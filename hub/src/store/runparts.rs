//! A run's state stored in parts, so that one member's transition writes that member's row, not the whole run.
//!
//! A run of 1,000 members is ~270 KiB as one JSON document; rewriting (and re-reading, re-parsing) all of it for
//! every member that starts or finishes made the store the engine's bottleneck. The state is cut along its levels:
//!
//! | key | holds | written when |
//! |---|---|---|
//! | `frame` | the spec, the tree's shape (stage, group and member names, limits, waits) and the image selection | the run is created or edited, or the selection is made |
//! | `run` | the run level | it changes |
//! | `stage/<i>` | stage `i`'s level and its wait | either changes |
//! | `group/<i>/<j>` | group `j` of stage `i` | it changes |
//! | `member/<name>` | one member (level, target, attempts) | it changes |
//!
//! [`split`] cuts a whole state, [`changes`] only what differs between two states of the same shape, and [`join`]
//! puts the parts back together, naming a missing or unreadable part. A single `state` part holding a whole state
//! is also read (what stores written before parts hold, and what a hand repair writes); a whole-state write
//! ([`RunWrite::Replace`]) removes it.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use upkeep_core::concurrency::Limit;
use upkeep_core::run::{GroupState, LevelState, MemberState, RunState, StageState, UpdateRunSpec};
use upkeep_core::version::ImageVersion;

/// The key of a part holding a whole state.
pub const WHOLE: &str = "state";

/// A write of a run's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunWrite {
    /// These parts replace the stored ones with the same keys; the others stay.
    Update(Vec<(String, String)>),
    /// These parts are the whole state; every other stored part is removed.
    Replace(Vec<(String, String)>),
}

impl RunWrite {
    /// The parts written.
    pub fn parts(&self) -> &[(String, String)] {
        match self {
            RunWrite::Update(p) | RunWrite::Replace(p) => p,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Frame {
    spec: Arc<UpdateRunSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image_selection: Option<BTreeMap<String, ImageVersion>>,
    stages: Vec<FrameStage>,
}

#[derive(Serialize, Deserialize, PartialEq)]
struct FrameStage {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_concurrency: Option<Limit>,
    #[serde(default)]
    wait_seconds: i64,
    groups: Vec<FrameGroup>,
}

#[derive(Serialize, Deserialize, PartialEq)]
struct FrameGroup {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_concurrency: Option<Limit>,
    members: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct StagePart {
    level: LevelState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    wait: Option<LevelState>,
}

fn shape(state: &RunState) -> Vec<FrameStage> {
    state
        .stages
        .iter()
        .map(|s| FrameStage {
            name: s.name.clone(),
            max_concurrency: s.max_concurrency,
            wait_seconds: s.wait_seconds,
            groups: s
                .groups
                .iter()
                .map(|g| FrameGroup {
                    name: g.name.clone(),
                    max_concurrency: g.max_concurrency,
                    members: g.members.iter().map(|m| m.name.clone()).collect(),
                })
                .collect(),
        })
        .collect()
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| format!("{{\"unserialisable\": {:?}}}", e.to_string()))
}

fn frame(state: &RunState) -> String {
    json(&Frame { spec: state.spec.clone(), image_selection: state.image_selection.clone(), stages: shape(state) })
}

fn stage_part(s: &StageState) -> String {
    json(&StagePart { level: s.level.clone(), wait: s.wait.clone() })
}

fn member_key(name: &str) -> String {
    format!("member/{name}")
}

/// Every part of a state.
pub fn split(state: &RunState) -> Vec<(String, String)> {
    let mut out = vec![("frame".to_string(), frame(state)), ("run".to_string(), json(&state.run))];
    for (si, s) in state.stages.iter().enumerate() {
        out.push((format!("stage/{si}"), stage_part(s)));
        for (gi, g) in s.groups.iter().enumerate() {
            out.push((format!("group/{si}/{gi}"), json(&g.level)));
            for m in &g.members {
                out.push((member_key(&m.name), json(m)));
            }
        }
    }
    out
}

/// Whether two states have the same tree: stage, group and member names, limits and waits (what `shape` stores).
/// Compared in place: this runs at every transition, and a 10,000-member run's shape is 10,000 names.
fn same_shape(old: &RunState, new: &RunState) -> bool {
    old.stages.len() == new.stages.len()
        && old.stages.iter().zip(&new.stages).all(|(os, ns)| {
            os.name == ns.name
                && os.max_concurrency == ns.max_concurrency
                && os.wait_seconds == ns.wait_seconds
                && os.groups.len() == ns.groups.len()
                && os.groups.iter().zip(&ns.groups).all(|(og, ng)| {
                    og.name == ng.name
                        && og.max_concurrency == ng.max_concurrency
                        && og.members.len() == ng.members.len()
                        && og.members.iter().zip(&ng.members).all(|(om, nm)| Arc::ptr_eq(om, nm) || om.name == nm.name)
                })
        })
}

/// The write that turns `old` into `new`: only the parts that differ, or every part when the shape changed.
/// States made from one another share their spec and unchanged members (`Arc`), which are not compared again.
pub fn changes(old: &RunState, new: &RunState) -> RunWrite {
    if !(Arc::ptr_eq(&old.spec, &new.spec) || old.spec == new.spec) || !same_shape(old, new) {
        return RunWrite::Replace(split(new));
    }
    let mut out = Vec::new();
    if old.image_selection != new.image_selection {
        out.push(("frame".to_string(), frame(new)));
    }
    if old.run != new.run {
        out.push(("run".to_string(), json(&new.run)));
    }
    for (si, (os, ns)) in old.stages.iter().zip(&new.stages).enumerate() {
        if os.level != ns.level || os.wait != ns.wait {
            out.push((format!("stage/{si}"), stage_part(ns)));
        }
        for (gi, (og, ng)) in os.groups.iter().zip(&ns.groups).enumerate() {
            if og.level != ng.level {
                out.push((format!("group/{si}/{gi}"), json(&ng.level)));
            }
            for (om, nm) in og.members.iter().zip(&ng.members) {
                if !Arc::ptr_eq(om, nm) && om != nm {
                    out.push((member_key(&nm.name), json(nm)));
                }
            }
        }
    }
    RunWrite::Update(out)
}

/// Why stored parts do not make a state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("part {part:?}: {reason}")]
pub struct PartError {
    /// The part's key.
    pub part: String,
    /// What is wrong with it.
    pub reason: String,
}

fn parse<T: for<'de> Deserialize<'de>>(parts: &HashMap<&str, &str>, key: &str) -> Result<T, PartError> {
    let text = parts.get(key).ok_or_else(|| PartError { part: key.to_string(), reason: "missing".into() })?;
    serde_json::from_str(text).map_err(|e| PartError { part: key.to_string(), reason: e.to_string() })
}

/// The state the parts make. A `state` part is read as the whole state.
pub fn join(parts: &[(String, String)]) -> Result<RunState, PartError> {
    let by_key: HashMap<&str, &str> = parts.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    if by_key.contains_key(WHOLE) {
        return parse(&by_key, WHOLE);
    }
    let frame: Frame = parse(&by_key, "frame")?;
    let mut stages = Vec::with_capacity(frame.stages.len());
    for (si, fs) in frame.stages.into_iter().enumerate() {
        let sp: StagePart = parse(&by_key, &format!("stage/{si}"))?;
        let mut groups = Vec::with_capacity(fs.groups.len());
        for (gi, fg) in fs.groups.into_iter().enumerate() {
            let level: LevelState = parse(&by_key, &format!("group/{si}/{gi}"))?;
            let mut members = Vec::with_capacity(fg.members.len());
            for name in &fg.members {
                let key = member_key(name);
                let m: MemberState = parse(&by_key, &key)?;
                if &m.name != name {
                    return Err(PartError { part: key, reason: format!("holds member {:?}", m.name) });
                }
                members.push(Arc::new(m));
            }
            groups.push(GroupState { name: fg.name, level, max_concurrency: fg.max_concurrency, members });
        }
        stages.push(StageState {
            name: fs.name,
            level: sp.level,
            max_concurrency: fs.max_concurrency,
            wait_seconds: fs.wait_seconds,
            wait: sp.wait,
            groups,
        });
    }
    Ok(RunState::from_parts(frame.spec, parse(&by_key, "run")?, stages, frame.image_selection))
}

#[cfg(test)]
mod tests {
    use super::*;
    use upkeep_core::run::{Status, StrategySpec, UpgradeType};

    fn state() -> RunState {
        let strategy: StrategySpec = serde_json::from_value(serde_json::json!({"stages": [
            {"name": "s1", "groups": [{"name": "g1", "members": ["a", "b"]}, {"name": "g2", "members": ["c"]}]},
            {"name": "s2", "groups": [{"name": "g1", "members": ["d"]}], "after_stage_wait_seconds": 60},
        ]}))
        .expect("strategy");
        let spec = UpdateRunSpec {
            name: "r".into(),
            strategy: Some(strategy),
            upgrade_type: UpgradeType::NodeImageOnly,
            kubernetes_version: None,
            node_image_selection: Default::default(),
        };
        let members: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        RunState::new(&spec, &members).expect("state")
    }

    fn member_mut<'a>(s: &'a mut RunState, name: &str) -> &'a mut MemberState {
        s.stages
            .iter_mut()
            .flat_map(|st| st.groups.iter_mut())
            .flat_map(|g| g.members.iter_mut())
            .map(std::sync::Arc::make_mut)
            .find(|m| m.name == name)
            .expect("member")
    }

    #[test]
    fn split_then_join_gives_the_same_state() {
        let mut s = state();
        member_mut(&mut s, "c").attempts = 2;
        s.stages[1].level.message = "waiting".into();
        assert_eq!(join(&split(&s)).expect("join"), s);
    }

    #[test]
    fn one_member_changing_writes_only_that_member() {
        let old = state();
        let mut new = old.clone();
        let m = member_mut(&mut new, "b");
        m.level.status = Status::Running;
        m.attempts = 1;
        let RunWrite::Update(parts) = changes(&old, &new) else { panic!("an update, not a replacement") };
        assert_eq!(parts.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), vec!["member/b"]);
        // Written over the old parts, they make the new state.
        let mut stored: BTreeMap<String, String> = split(&old).into_iter().collect();
        stored.extend(parts);
        assert_eq!(join(&stored.into_iter().collect::<Vec<_>>()).expect("join"), new);
        assert_eq!(changes(&old, &old), RunWrite::Update(Vec::new()));
    }

    #[test]
    fn group_and_stage_levels_are_their_own_parts_and_a_new_shape_replaces_all() {
        let old = state();
        let mut new = old.clone();
        new.stages[0].groups[1].level.message = "one left".into();
        new.stages[1].level.status = Status::Running;
        let RunWrite::Update(parts) = changes(&old, &new) else { panic!("an update") };
        assert_eq!(parts.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), vec!["group/0/1", "stage/1"]);
        let mut edited = old.clone();
        edited.stages[0].groups[0].members.pop();
        assert!(matches!(changes(&old, &edited), RunWrite::Replace(_)));
    }

    #[test]
    fn every_change_of_the_tree_or_the_spec_replaces_the_whole_state() {
        let old = state();
        type Edit = Box<dyn Fn(&mut RunState)>;
        let edits: Vec<(&str, Edit)> = vec![
            (
                "member renamed",
                Box::new(|s| std::sync::Arc::make_mut(&mut s.stages[1].groups[0].members[0]).name = "e".into()),
            ),
            ("members reordered", Box::new(|s| s.stages[0].groups[0].members.swap(0, 1))),
            (
                "member added",
                Box::new(|s| {
                    let m = s.stages[1].groups[0].members[0].clone();
                    s.stages[0].groups[1].members.push(m)
                }),
            ),
            ("group renamed", Box::new(|s| s.stages[0].groups[1].name = "g9".into())),
            ("group limit", Box::new(|s| s.stages[0].groups[0].max_concurrency = Some("2".parse().expect("limit")))),
            ("group removed", Box::new(|s| drop(s.stages[0].groups.pop()))),
            ("stage renamed", Box::new(|s| s.stages[1].name = "s9".into())),
            ("stage limit", Box::new(|s| s.stages[1].max_concurrency = Some("50%".parse().expect("limit")))),
            ("stage wait", Box::new(|s| s.stages[1].wait_seconds = 61)),
            ("stage removed", Box::new(|s| drop(s.stages.pop()))),
            ("spec", Box::new(|s| std::sync::Arc::make_mut(&mut s.spec).name = "r2".into())),
        ];
        for (what, edit) in edits {
            let mut new = old.clone();
            edit(&mut new);
            assert!(matches!(changes(&old, &new), RunWrite::Replace(_)), "{what}: the whole state is written");
            assert_eq!(same_shape(&old, &new), what == "spec" || shape(&old) == shape(&new), "{what}");
        }
        // The same tree built apart (nothing shared) is the same shape: an update, of nothing.
        assert_eq!(changes(&old, &state()), RunWrite::Update(Vec::new()));
    }

    #[test]
    fn a_missing_or_unreadable_part_is_named_and_a_whole_state_part_is_read() {
        let s = state();
        let mut parts = split(&s);
        parts.retain(|(k, _)| k != "member/c");
        assert_eq!(join(&parts).expect_err("missing").part, "member/c");
        let mut parts = split(&s);
        parts.iter_mut().find(|(k, _)| k == "group/1/0").expect("group").1 = "{".into();
        let e = join(&parts).expect_err("unreadable");
        assert_eq!(e.part, "group/1/0");
        let whole = vec![(WHOLE.to_string(), serde_json::to_string(&s).expect("json"))];
        assert_eq!(join(&whole).expect("whole"), s);
    }
}
