//! Validation of an update run's specification (SPEC §5, §7). Every error names the field path and the fix;
//! all errors are collected, so an operator fixes a file in one go. Validation changes nothing.

use super::model::{
    MAX_GROUPS_PER_STAGE, MAX_MEMBERS_PER_RUN, MAX_STAGES, MAX_WAIT_SECONDS, NodeImageSelection, OrderSource,
    StrategySpec, UpdateRunSpec, UpgradeType,
};
use crate::ids::validate_name;
use crate::limits::quoted as q;
use crate::version::validate_family;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// One problem in a specification: the field path (e.g. `strategy.stages[1].name`) and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct FieldError {
    /// Path of the offending field.
    pub path: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl FieldError {
    /// Builds one.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError { path: path.into(), message: message.into() }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Joins errors one per line, for a CLI or an RPC status message: the first
/// [`crate::limits::MAX_LISTED_ERRORS`], then how many more there are.
pub fn describe(errors: &[FieldError]) -> String {
    crate::limits::cap_list(errors, "\n")
}

/// Checks a run's specification against the members the hub knows. `Ok` means it can be turned into a
/// [`super::RunState`]; otherwise every problem found is returned.
pub fn validate_run_spec(spec: &UpdateRunSpec, known_members: &BTreeSet<String>) -> Result<(), Vec<FieldError>> {
    let mut errs = Vec::new();
    if let Err(e) = validate_name("run name", &spec.name) {
        errs.push(FieldError::new("name", e.to_string()));
    }

    match (spec.upgrade_type, spec.kubernetes_version) {
        (UpgradeType::Full | UpgradeType::ControlPlaneOnly, None) => errs.push(FieldError::new(
            "kubernetes_version",
            format!("required for upgrade_type {:?}; give the target, e.g. 1.30.2", spec.upgrade_type),
        )),
        (UpgradeType::NodeImageOnly, Some(v)) => errs.push(FieldError::new(
            "kubernetes_version",
            format!(
                "{v} given but upgrade_type NodeImageOnly never changes the Kubernetes version; remove it or use Full"
            ),
        )),
        _ => {}
    }

    if let NodeImageSelection::Custom { pins } = &spec.node_image_selection {
        if spec.upgrade_type == UpgradeType::ControlPlaneOnly && !pins.is_empty() {
            errs.push(FieldError::new(
                "node_image_selection.pins",
                "ControlPlaneOnly does not change node images; remove the pins or use Full",
            ));
        }
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, pin) in pins.iter().enumerate() {
            let path = format!("node_image_selection.pins[{i}]");
            if let Err(e) = validate_family(&pin.family) {
                errs.push(FieldError::new(format!("{path}.family"), e.to_string()));
            }
            if let Some(first) = seen.insert(&pin.family, i) {
                errs.push(FieldError::new(
                    format!("{path}.family"),
                    format!(
                        "family {} is already pinned by pins[{first}]; pin at most one version per family",
                        q(&pin.family)
                    ),
                ));
            }
        }
    }

    let Some(strategy) = &spec.strategy else {
        return if errs.is_empty() { Ok(()) } else { Err(errs) };
    };
    if strategy.stages.is_empty() {
        errs.push(FieldError::new("strategy.stages", "no stages; give at least one stage with one group"));
    }
    if strategy.stages.len() > MAX_STAGES {
        errs.push(FieldError::new(
            "strategy.stages",
            format!("{} stages is more than {MAX_STAGES}; give at most {MAX_STAGES} stages", strategy.stages.len()),
        ));
    }
    let member_total: usize = strategy.stages.iter().flat_map(|s| &s.groups).map(|g| g.members.len()).sum();
    if member_total > MAX_MEMBERS_PER_RUN {
        errs.push(FieldError::new(
            "strategy.stages",
            format!(
                "{member_total} members in all groups is more than {MAX_MEMBERS_PER_RUN}; split the fleet into several runs"
            ),
        ));
    }
    let mut stage_names: BTreeMap<&str, usize> = BTreeMap::new();
    // member -> (stage name, group name) where it was first seen
    let mut member_home: BTreeMap<&str, (&str, &str)> = BTreeMap::new();
    for (si, stage) in strategy.stages.iter().enumerate() {
        let sp = format!("strategy.stages[{si}]");
        if let Err(e) = validate_name("stage name", &stage.name) {
            errs.push(FieldError::new(format!("{sp}.name"), e.to_string()));
        }
        if let Some(first) = stage_names.insert(&stage.name, si) {
            errs.push(FieldError::new(
                format!("{sp}.name"),
                format!(
                    "duplicate stage name {} (also stages[{first}]); stage names must be unique in a run",
                    q(&stage.name)
                ),
            ));
        }
        if let Some(w) = stage.after_stage_wait_seconds
            && w < 0
        {
            errs.push(FieldError::new(
                format!("{sp}.after_stage_wait_seconds"),
                format!("{w} is negative; give 0 or more seconds, or leave it out for no wait"),
            ));
        }
        if let Some(w) = stage.after_stage_wait_seconds
            && w > MAX_WAIT_SECONDS
        {
            errs.push(FieldError::new(
                format!("{sp}.after_stage_wait_seconds"),
                format!(
                    "{w} is more than {MAX_WAIT_SECONDS} (30 days); give at most {MAX_WAIT_SECONDS} seconds, or stop the run and start it again later"
                ),
            ));
        }
        if stage.groups.len() > MAX_GROUPS_PER_STAGE {
            errs.push(FieldError::new(
                format!("{sp}.groups"),
                format!(
                    "{} groups is more than {MAX_GROUPS_PER_STAGE}; give at most {MAX_GROUPS_PER_STAGE} groups per stage",
                    stage.groups.len()
                ),
            ));
        }
        if let Some(problem) = stage.max_concurrency.and_then(|l| l.problem()) {
            errs.push(FieldError::new(format!("{sp}.max_concurrency"), problem));
        }
        if stage.groups.is_empty() {
            errs.push(FieldError::new(format!("{sp}.groups"), "no groups; give at least one group with members"));
        }
        let mut group_names: BTreeMap<&str, usize> = BTreeMap::new();
        for (gi, group) in stage.groups.iter().enumerate() {
            let gp = format!("{sp}.groups[{gi}]");
            if let Err(e) = validate_name("group name", &group.name) {
                errs.push(FieldError::new(format!("{gp}.name"), e.to_string()));
            }
            if let Some(first) = group_names.insert(&group.name, gi) {
                errs.push(FieldError::new(
                    format!("{gp}.name"),
                    format!(
                        "duplicate group name {} in stage {} (also groups[{first}]); group names must be unique within a stage",
                        q(&group.name),
                        q(&stage.name)
                    ),
                ));
            }
            if let Some(problem) = group.max_concurrency.and_then(|l| l.problem()) {
                errs.push(FieldError::new(format!("{gp}.max_concurrency"), problem));
            }
            if group.members.is_empty() {
                errs.push(FieldError::new(format!("{gp}.members"), "no members; give at least one member"));
            }
            for (mi, member) in group.members.iter().enumerate() {
                let mp = format!("{gp}.members[{mi}]");
                if !known_members.contains(member) {
                    errs.push(FieldError::new(
                        mp.clone(),
                        format!("unknown member {}; use a member listed by `upkeepctl member list`", q(member)),
                    ));
                }
                if let Some((s, g)) = member_home.get(member.as_str()) {
                    errs.push(FieldError::new(
                        mp,
                        format!(
                            "member {} is in both group {} of stage {} and group {} of stage {}; \
                             a member belongs to at most one group of a run",
                            q(member),
                            q(g),
                            q(s),
                            q(&group.name),
                            q(&stage.name)
                        ),
                    ));
                } else {
                    member_home.insert(member, (&stage.name, &group.name));
                }
            }
        }
    }
    if errs.is_empty() { Ok(()) } else { Err(errs) }
}

/// Decides where a run's order comes from, refusing a request that names a strategy *and* carries stages.
pub fn order_source(strategy_name: Option<&str>, inline: Option<StrategySpec>) -> Result<OrderSource, FieldError> {
    match (strategy_name, inline) {
        (Some(name), Some(_)) => Err(FieldError::new(
            "strategy",
            format!("both strategy {name:?} and inline stages are given; give one or the other, never both"),
        )),
        (Some(name), None) => Ok(OrderSource::Named(name.to_string())),
        (None, Some(s)) => Ok(OrderSource::Inline(s)),
        (None, None) => Ok(OrderSource::AllMembersOneByOne),
    }
}
