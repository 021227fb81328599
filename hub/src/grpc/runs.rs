//! Operator handlers for member settings, the image catalog, strategies and update runs. Each checks and
//! converts its request (naming the bad field), then hands decisions to the engine (which asks upkeep-core).

use super::ApiError;
use crate::artifacts::{ArtifactError, Artifacts, check_digest};
use crate::engine::{Engine, EngineError, parse_state};
use crate::fleet::now_ms;
use crate::store::runparts::{self, RunWrite};
use crate::store::{ImageRecord, MemberSettings, RunRecord, Store, StoreError, WindowKind};
use chrono::TimeDelta;
use std::collections::BTreeSet;
use upkeep_core::concurrency::Limit;
use upkeep_core::ids::validate_name;
use upkeep_core::limits::{cap_list, check_document, check_timestamp_ms, cut_message};
use upkeep_core::run::{
    self, ImagePin, NodeImageSelection, OrderSource, RunOpError, RunState, SkipTarget, StrategySpec, UpdateRunSpec,
    UpgradeType,
};
use upkeep_core::schedule::MaintenanceSchedule;
use upkeep_core::signature::{Prehasher, PublicKey, Signature, Signed};
use upkeep_core::version::{ImageVersion, KubernetesVersion, validate_family};
use upkeep_proto::v1;

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        match e {
            EngineError::Run(RunOpError::Invalid(errs)) => ApiError::InvalidArgument(cap_list(&errs, "; ")),
            EngineError::Run(RunOpError::UnknownLevel(l)) => {
                ApiError::NotFound(RunOpError::UnknownLevel(l).to_string())
            }
            EngineError::Run(RunOpError::Refused(m)) => ApiError::FailedPrecondition(m),
            EngineError::Run(other) => ApiError::Internal(other.to_string()),
            EngineError::Store(s) => s.into(),
            EngineError::NoSuchRun(_) => ApiError::NotFound(e.to_string()),
            EngineError::Corrupt { .. } | EngineError::Unexpected { .. } => ApiError::Internal(e.to_string()),
        }
    }
}

fn conflict_to_precondition(e: StoreError) -> ApiError {
    match e {
        StoreError::Conflict(m) => ApiError::FailedPrecondition(m),
        other => other.into(),
    }
}

/// Wire form of member settings.
pub fn settings_to_wire(s: &MemberSettings, warnings: Vec<String>) -> v1::MemberSettings {
    v1::MemberSettings {
        member: s.member.clone(),
        node_os_schedule_json: s.node_os_schedule.clone().unwrap_or_default(),
        cluster_schedule_json: s.cluster_schedule.clone().unwrap_or_default(),
        max_unavailable: s.max_unavailable.clone(),
        warnings,
        drain_timeout_seconds: s.drain().timeout_seconds,
        undrainable: s.drain().undrainable.to_string(),
        max_undrainable: s.drain().max_undrainable,
    }
}

/// `SetMemberWindow`.
pub fn set_window(store: &dyn Store, r: &v1::SetMemberWindowRequest) -> Result<v1::MemberSettings, ApiError> {
    let kind = match r.kind.as_str() {
        "node-os" => WindowKind::NodeOs,
        "cluster" => WindowKind::Cluster,
        other => {
            return Err(ApiError::InvalidArgument(format!(
                "kind: {other:?} is not a window kind; use node-os or cluster"
            )));
        }
    };
    let (schedule, warnings) = if r.schedule_json.trim().is_empty() {
        (None, Vec::new())
    } else {
        let s: MaintenanceSchedule = parse_document("schedule", &r.schedule_json)?;
        let warnings = s.validate().map_err(|errs| ApiError::InvalidArgument(cap_list(&errs, "; ")))?;
        let canonical =
            serde_json::to_string(&s).map_err(|e| ApiError::Internal(format!("serialising schedule: {e}")))?;
        (Some(canonical), warnings)
    };
    let out = store.set_member_window(&r.member, kind, schedule.as_deref())?;
    Ok(settings_to_wire(&out, warnings))
}

/// `SetMemberDisruption`.
/// Every field is checked before anything is written, so a bad field changes nothing.
pub fn set_disruption(store: &dyn Store, r: &v1::SetMemberDisruptionRequest) -> Result<v1::MemberSettings, ApiError> {
    let drain_given = r.drain_timeout_seconds.is_some() || !r.undrainable.is_empty() || r.max_undrainable.is_some();
    if r.max_unavailable.is_empty() && !drain_given {
        return Err(ApiError::InvalidArgument(
            "nothing to set: give max_unavailable, drain_timeout_seconds, undrainable or max_undrainable".into(),
        ));
    }
    if !r.max_unavailable.is_empty() {
        let limit: Limit =
            r.max_unavailable.parse().map_err(|e| ApiError::InvalidArgument(format!("max_unavailable: {e}")))?;
        if let Some(p) = limit.problem() {
            return Err(ApiError::InvalidArgument(format!("max_unavailable: {p}")));
        }
    }
    let current = store.member_settings(&r.member)?;
    let mut drain = current.drain();
    if let Some(t) = r.drain_timeout_seconds {
        drain.timeout_seconds = t;
    }
    if !r.undrainable.is_empty() {
        drain.undrainable =
            r.undrainable.parse().map_err(|e| ApiError::InvalidArgument(format!("undrainable: {e}")))?;
    }
    if let Some(m) = r.max_undrainable {
        if m > MAX_UNDRAINABLE_CAP {
            return Err(ApiError::InvalidArgument(format!(
                "max_undrainable: {m} is out of range; give 0 to {MAX_UNDRAINABLE_CAP}"
            )));
        }
        drain.max_undrainable = m;
    }
    if let Some(p) = drain.problem() {
        return Err(ApiError::InvalidArgument(p));
    }
    let mut out = current;
    if !r.max_unavailable.is_empty() {
        out = store.set_member_disruption(&r.member, &r.max_unavailable)?;
    }
    if drain_given {
        let json = serde_json::to_string(&drain).map_err(|e| ApiError::Internal(e.to_string()))?;
        out = store.set_member_drain(&r.member, &json)?;
    }
    Ok(settings_to_wire(&out, Vec::new()))
}

/// Largest `max_undrainable` accepted.
pub const MAX_UNDRAINABLE_CAP: u32 = 10_000;

/// Receives an uploaded artifact into the content-addressed store.
pub async fn upload(
    artifacts: &Artifacts,
    mut stream: tonic::Streaming<v1::ArtifactChunk>,
) -> Result<v1::UploadArtifactResponse, ApiError> {
    let mut incoming = artifacts.begin().map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut declared: Option<String> = None;
    while let Some(chunk) =
        stream.message().await.map_err(|s| ApiError::InvalidArgument(format!("upload: {}", s.message())))?
    {
        if !chunk.declared_sha256.is_empty() {
            check_digest(&chunk.declared_sha256).map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
            declared = Some(chunk.declared_sha256);
        }
        incoming.write(&chunk.data).map_err(|e| ApiError::Internal(e.to_string()))?;
    }
    let (sha256, size) = incoming.finish(artifacts, declared.as_deref()).map_err(|e| match e {
        ArtifactError::DigestMismatch { .. } => ApiError::InvalidArgument(e.to_string()),
        other => ApiError::Internal(other.to_string()),
    })?;
    Ok(v1::UploadArtifactResponse { sha256, size_bytes: size })
}

fn image_to_wire(i: &ImageRecord) -> v1::Image {
    v1::Image {
        family: i.family.clone(),
        version: i.version.clone(),
        regions: i
            .regions
            .iter()
            .map(|(r, ms)| v1::RegionAvailability { region: r.clone(), available_at_unix_ms: *ms })
            .collect(),
        sha256: i.sha256.clone(),
        signature: i.signature.clone(),
        url: i.url.clone(),
        size_bytes: i.size_bytes,
        published_at_unix_ms: i.published_ms,
    }
}

/// `PublishImage`.
/// With `trusted` keys (`[images] trusted_keys`), an artifact stored on the hub must carry a signature by one of
/// them over its bytes; an artifact at a URL is the nodes' to verify.
pub fn publish(
    store: &dyn Store,
    artifacts: &Artifacts,
    trusted: &[PublicKey],
    r: &v1::PublishImageRequest,
) -> Result<v1::Image, ApiError> {
    let bad = |field: &str, e: &dyn std::fmt::Display| ApiError::InvalidArgument(format!("{field}: {e}"));
    validate_family(&r.family).map_err(|e| bad("family", &e))?;
    let version: ImageVersion = r.version.parse().map_err(|e| bad("version", &e))?;
    if r.regions.is_empty() {
        return Err(bad("regions", &"at least one region is required (e.g. --regions eu-west,us-east)"));
    }
    let mut regions = std::collections::BTreeMap::new();
    for (i, ra) in r.regions.iter().enumerate() {
        validate_name("region", &ra.region).map_err(|e| bad(&format!("regions[{i}]"), &e))?;
        let at = available_at(&format!("regions[{i}].available_at_unix_ms"), ra.available_at_unix_ms)?;
        regions.insert(ra.region.clone(), at);
    }
    check_digest(&r.sha256).map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
    if r.signature.trim().is_empty() {
        return Err(bad("signature", &"missing: sign the image (upkeepctl image sign) and pass --signature FILE"));
    }
    // Nodes verify the signature against their own keys; the hub refuses one that could never verify anywhere.
    let signature = Signature::parse(&r.signature).map_err(|e| {
        bad("signature", &format!("{e}; give the .minisig file `upkeepctl image sign` (or minisign) wrote"))
    })?;
    let size = if r.url.is_empty() {
        let size = artifacts.size(&r.sha256).map_err(|e| match e {
            ArtifactError::Missing(_) => ApiError::FailedPrecondition(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        })?;
        if !trusted.is_empty() {
            verify_artifact(artifacts, &r.sha256, &signature, trusted)?;
        }
        match r.format.as_str() {
            "" | "tar" => {
                check_archive(&artifacts.path(&r.sha256).map_err(|e| bad("sha256", &e))?, &r.family, version)?
            }
            "raw" => {}
            other => return Err(bad("format", &format!("{other:?} is not a format; give tar or raw"))),
        }
        size
    } else {
        if !r.url.starts_with("https://") {
            return Err(bad("url", &"only https:// URLs are accepted"));
        }
        r.size_bytes
    };
    let rec = ImageRecord {
        family: r.family.clone(),
        version: version.to_string(),
        regions,
        sha256: r.sha256.clone(),
        signature: r.signature.clone(),
        url: r.url.clone(),
        size_bytes: size,
        published_ms: now_ms(),
    };
    let stored = store.put_image(&rec).map_err(conflict_to_precondition)?;
    Ok(image_to_wire(&stored))
}

/// Checks an artifact on the hub against the hub's trusted keys, the way a node does.
fn verify_artifact(
    artifacts: &Artifacts,
    sha256: &str,
    signature: &Signature,
    trusted: &[PublicKey],
) -> Result<(), ApiError> {
    let path = artifacts.path(sha256).map_err(|e| ApiError::Internal(e.to_string()))?;
    let internal = |e: std::io::Error| ApiError::Internal(format!("reading artifact {sha256}: {e}"));
    let refused = |e: upkeep_core::signature::SignatureError| {
        ApiError::InvalidArgument(format!(
            "signature: {e} (checked against the hub's [images] trusted_keys); sign the image with a trusted key"
        ))
    };
    if signature.needs_whole_message() {
        let bytes = std::fs::read(&path).map_err(internal)?;
        signature.verify(trusted, Signed::Message(&bytes)).map_err(refused)?;
    } else {
        let mut f = std::fs::File::open(&path).map_err(internal)?;
        let mut h = Prehasher::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = std::io::Read::read(&mut f, &mut buf).map_err(internal)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        signature.verify(trusted, Signed::Prehash(&h.finish())).map_err(refused)?;
    }
    Ok(())
}

/// `WithdrawImage`: one region less for a published version; refusals change nothing.
pub fn withdraw(store: &dyn Store, r: &v1::WithdrawImageRequest) -> Result<v1::Image, ApiError> {
    let bad = |field: &str, e: &dyn std::fmt::Display| ApiError::InvalidArgument(format!("{field}: {e}"));
    validate_family(&r.family).map_err(|e| bad("family", &e))?;
    let version: ImageVersion = r.version.parse().map_err(|e| bad("version", &e))?;
    validate_name("region", &r.region).map_err(|e| bad("region", &e))?;
    let left =
        store.withdraw_image_region(&r.family, &version.to_string(), &r.region).map_err(conflict_to_precondition)?;
    Ok(image_to_wire(&left))
}

/// `ListImages`.
pub fn list_images(store: &dyn Store, family: &str) -> Result<v1::ListImagesResponse, ApiError> {
    let mut images = store.list_images((!family.is_empty()).then_some(family))?;
    images.sort_by(|a, b| {
        (a.family.as_str(), a.version.parse::<ImageVersion>().ok()).cmp(&(b.family.as_str(), b.version.parse().ok()))
    });
    Ok(v1::ListImagesResponse { images: images.iter().map(image_to_wire).collect() })
}

fn known_members(store: &dyn Store) -> Result<Vec<String>, ApiError> {
    Ok(store.list_members()?.into_iter().map(|m| m.name).collect())
}

/// Parses a JSON document from a request: size and depth first, then the typed parse (unknown keys refused); the
/// error names the field and repeats at most a cut of the offending text.
fn parse_document<T: serde::de::DeserializeOwned>(field: &str, json: &str) -> Result<T, ApiError> {
    check_document(json).map_err(|e| ApiError::InvalidArgument(format!("{field}: {e}")))?;
    serde_json::from_str(json)
        .map_err(|e| ApiError::InvalidArgument(format!("{field}: {}", cut_message(&e.to_string()))))
}

fn parse_strategy(field: &str, json: &str) -> Result<StrategySpec, ApiError> {
    parse_document(field, json)
}

fn invalid(errs: Vec<run::FieldError>) -> ApiError {
    ApiError::InvalidArgument(cap_list(&errs, "; "))
}

/// A time from a request: 0 means now; otherwise it must lie within the bounds of [`upkeep_core::limits`].
fn available_at(field: &str, ms: i64) -> Result<i64, ApiError> {
    if ms == 0 {
        return Ok(now_ms());
    }
    check_timestamp_ms(ms).map(|_| ms).map_err(|e| ApiError::InvalidArgument(format!("{field}: {e}")))
}

/// `PutStrategy`: checked against the SPEC's rules and the known members before it is stored.
pub fn put_strategy(store: &dyn Store, r: &v1::PutStrategyRequest) -> Result<v1::Strategy, ApiError> {
    validate_name("strategy name", &r.name).map_err(|e| ApiError::InvalidArgument(format!("name: {e}")))?;
    let spec = parse_strategy("spec", &r.spec_json)?;
    let probe = UpdateRunSpec {
        name: r.name.clone(),
        strategy: Some(spec.clone()),
        upgrade_type: UpgradeType::NodeImageOnly,
        kubernetes_version: None,
        node_image_selection: NodeImageSelection::Latest,
    };
    let members: BTreeSet<String> = known_members(store)?.into_iter().collect();
    run::validate_run_spec(&probe, &members).map_err(invalid)?;
    let json = serde_json::to_string(&spec).map_err(|e| ApiError::Internal(e.to_string()))?;
    store.put_strategy(&r.name, &json)?;
    Ok(v1::Strategy { name: r.name.clone(), spec_json: json })
}

/// Wire form of a run, without its members' node progress (`run_with_progress` adds it).
pub fn run_to_wire(rec: &RunRecord) -> Result<v1::Run, ApiError> {
    Ok(super::runview::run_tree(rec, &parse_state(rec)?, None))
}

/// Wire form of a run with each member's node progress, read from its latest attempt's stored work.
pub fn run_with_progress(rec: &RunRecord, executor: &crate::executor::Executor) -> Result<v1::Run, ApiError> {
    let work = |id: &str| executor.stored(id).ok().flatten();
    Ok(super::runview::run_tree(rec, &parse_state(rec)?, Some(&work)))
}

/// `CreateRun`: the strategy is copied into the run, so later edits of the strategy never reach it.
pub fn create_run(store: &dyn Store, r: &v1::CreateRunRequest) -> Result<v1::Run, ApiError> {
    let (state, strategy_name) = build_run(store, r)?;
    let rec = RunRecord {
        name: r.name.clone(),
        parts: runparts::split(&state),
        version: 1,
        status: state.run.status.as_str().to_string(),
        strategy_name: strategy_name.map(str::to_string),
        created_ms: now_ms(),
    };
    store.create_run(&rec).map_err(conflict_to_precondition)?;
    run_to_wire(&rec)
}

/// `UpdateRun`: a run's order and target may be replaced until it starts (SPEC §5).
pub fn update_run(store: &dyn Store, r: &v1::CreateRunRequest) -> Result<v1::Run, ApiError> {
    let old = get_run(store, &r.name)?;
    let old_state = parse_state(&old)?;
    if !old_state.can_edit() {
        return Err(ApiError::FailedPrecondition(format!(
            "run {:?} is {}; a run can be edited only before it starts (create a new run instead)",
            r.name, old_state.run.status
        )));
    }
    let (state, _) = build_run(store, r)?;
    let event = crate::store::NewEvent {
        at_ms: now_ms(),
        kind: "run".into(),
        level: "run".into(),
        from: old_state.run.status.as_str().into(),
        to: state.run.status.as_str().into(),
        message: "order and target edited before start".into(),
        error: String::new(),
        run_status: state.run.status.as_str().into(),
    };
    let write = RunWrite::Replace(runparts::split(&state));
    store
        .commit_run(&r.name, old.version, state.run.status.as_str(), &write, &[event])
        .map_err(conflict_to_precondition)?;
    run_to_wire(&get_run(store, &r.name)?)
}

fn build_run<'a>(store: &dyn Store, r: &'a v1::CreateRunRequest) -> Result<(RunState, Option<&'a str>), ApiError> {
    let bad = |field: &str, e: &dyn std::fmt::Display| ApiError::InvalidArgument(format!("{field}: {e}"));
    validate_name("run name", &r.name).map_err(|e| bad("name", &e))?;
    let inline = if r.stages_json.trim().is_empty() { None } else { Some(parse_strategy("stages", &r.stages_json)?) };
    let strategy_name = (!r.strategy_name.is_empty()).then_some(r.strategy_name.as_str());
    let strategy =
        match run::order_source(strategy_name, inline).map_err(|e| ApiError::InvalidArgument(e.to_string()))? {
            OrderSource::Named(n) => {
                let json = store.get_strategy(&n)?.ok_or_else(|| {
                    ApiError::NotFound(format!("strategy: {n:?} not found; see `upkeepctl strategy list`"))
                })?;
                Some(parse_strategy("strategy", &json)?)
            }
            OrderSource::Inline(s) => Some(s),
            OrderSource::AllMembersOneByOne => None,
        };
    let upgrade_type: UpgradeType = r.upgrade_type.parse().map_err(|e| bad("upgrade_type", &e))?;
    let kubernetes_version = if r.kubernetes_version.is_empty() {
        None
    } else {
        Some(r.kubernetes_version.parse::<KubernetesVersion>().map_err(|e| bad("kubernetes_version", &e))?)
    };
    let mut pins = Vec::new();
    for (i, cv) in r.custom_versions.iter().enumerate() {
        let field = format!("custom_versions[{i}]");
        let (family, version) =
            cv.split_once('=').ok_or_else(|| bad(&field, &format!("{cv:?}: expected FAMILY=VERSION")))?;
        validate_family(family).map_err(|e| bad(&field, &e))?;
        pins.push(ImagePin { family: family.to_string(), version: version.parse().map_err(|e| bad(&field, &e))? });
    }
    let selection = match r.node_image_selection.as_str() {
        "" | "Latest" | "latest" => NodeImageSelection::Latest,
        "Consistent" | "consistent" => NodeImageSelection::Consistent,
        "Custom" | "custom" => NodeImageSelection::Custom { pins: pins.clone() },
        other => return Err(bad("node_image_selection", &format!("{other:?}: expected Latest, Consistent or Custom"))),
    };
    if !pins.is_empty() && !matches!(selection, NodeImageSelection::Custom { .. }) {
        return Err(bad("custom_versions", &"only with --node-image-selection Custom"));
    }
    let spec = UpdateRunSpec {
        name: r.name.clone(),
        strategy,
        upgrade_type,
        kubernetes_version,
        node_image_selection: selection,
    };
    let members = known_members(store)?;
    let state = RunState::new(&spec, &members).map_err(|e| match e {
        RunOpError::Invalid(errs) => invalid(errs),
        other => ApiError::InvalidArgument(other.to_string()),
    })?;
    Ok((state, strategy_name))
}

/// Reads a run for the API.
pub fn get_run(store: &dyn Store, name: &str) -> Result<RunRecord, ApiError> {
    store.get_run(name)?.ok_or_else(|| ApiError::NotFound(format!("run {name:?} not found; see `upkeepctl run list`")))
}

/// `SkipRun` target from the request: exactly one of the fields.
pub fn skip_target(r: &v1::SkipRunRequest) -> Result<SkipTarget, ApiError> {
    let given = [!r.member.is_empty(), !r.group.is_empty(), !r.stage.is_empty(), !r.after_stage_wait.is_empty()];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err(ApiError::InvalidArgument(
            "skip: give exactly one of --member, --group STAGE/GROUP, --stage, --after-stage-wait".into(),
        ));
    }
    Ok(if !r.member.is_empty() {
        SkipTarget::Member { member: r.member.clone() }
    } else if !r.group.is_empty() {
        let (stage, group) = r
            .group
            .split_once('/')
            .ok_or_else(|| ApiError::InvalidArgument(format!("group: {:?}: expected STAGE/GROUP", r.group)))?;
        SkipTarget::Group { stage: stage.to_string(), group: group.to_string() }
    } else if !r.stage.is_empty() {
        SkipTarget::Stage { stage: r.stage.clone() }
    } else {
        SkipTarget::AfterStageWait { stage: r.after_stage_wait.clone() }
    })
}

/// `DeleteRun`: only when nothing is being upgraded.
pub fn delete_run(store: &dyn Store, name: &str) -> Result<v1::DeleteResponse, ApiError> {
    let rec = get_run(store, name)?;
    let state = parse_state(&rec)?;
    if !state.can_delete() {
        return Err(ApiError::FailedPrecondition(format!(
            "run {name:?} is {}; stop it and let its members finish before deleting it",
            state.run.status
        )));
    }
    Ok(v1::DeleteResponse { existed: store.delete_run(name)? })
}

/// `PlanRun`: predicted start of every member.
pub fn plan_run(engine: &Engine, store: &dyn Store, r: &v1::PlanRunRequest) -> Result<v1::RunPlan, ApiError> {
    if i64::from(r.assumed_member_seconds) > run::MAX_WAIT_SECONDS {
        return Err(ApiError::InvalidArgument(format!(
            "assumed_member_seconds: {} is more than {} (30 days); give the time one member's upgrade takes",
            r.assumed_member_seconds,
            run::MAX_WAIT_SECONDS
        )));
    }
    let rec = get_run(store, &r.name)?;
    let state = parse_state(&rec)?;
    let (fleet, catalog) = engine.views()?;
    let secs = if r.assumed_member_seconds == 0 { 600 } else { i64::from(r.assumed_member_seconds) };
    let predicted = run::preview(&state, &fleet, &catalog, chrono::Utc::now(), TimeDelta::seconds(secs));
    let place = |m: &str| -> (String, String) {
        for st in &state.stages {
            for g in &st.groups {
                if g.members.iter().any(|x| x.name == m) {
                    return (st.name.clone(), g.name.clone());
                }
            }
        }
        (String::new(), String::new())
    };
    Ok(v1::RunPlan {
        members: predicted
            .into_iter()
            .map(|p| {
                let (stage, group) = place(&p.member);
                v1::PredictedStart { at_unix_ms: p.at.timestamp_millis(), member: p.member, stage, group }
            })
            .collect(),
    })
}

/// `PublishKubernetes`: a Kubernetes release becomes available in regions (default now).
pub fn publish_kubernetes(
    store: &dyn Store,
    r: &v1::PublishKubernetesRequest,
) -> Result<v1::KubernetesRelease, ApiError> {
    let bad = |field: &str, e: &dyn std::fmt::Display| ApiError::InvalidArgument(format!("{field}: {e}"));
    let version: KubernetesVersion = r.version.parse().map_err(|e| bad("version", &e))?;
    if r.regions.is_empty() {
        return Err(bad("regions", &"at least one region is required (e.g. --regions eu-west,us-east)"));
    }
    let mut regions = std::collections::BTreeMap::new();
    for (i, ra) in r.regions.iter().enumerate() {
        validate_name("region", &ra.region).map_err(|e| bad(&format!("regions[{i}]"), &e))?;
        let at = available_at(&format!("regions[{i}].available_at_unix_ms"), ra.available_at_unix_ms)?;
        regions.insert(ra.region.clone(), at);
    }
    store.put_kubernetes(&version.to_string(), &regions)?;
    Ok(v1::KubernetesRelease {
        version: version.to_string(),
        regions: regions
            .into_iter()
            .map(|(region, available_at_unix_ms)| v1::RegionAvailability { region, available_at_unix_ms })
            .collect(),
    })
}

/// `ListKubernetes`.
pub fn list_kubernetes(store: &dyn Store) -> Result<v1::ListKubernetesResponse, ApiError> {
    let mut all = store.list_kubernetes()?;
    all.sort_by_key(|(v, _)| v.parse::<KubernetesVersion>().ok());
    Ok(v1::ListKubernetesResponse {
        releases: all
            .into_iter()
            .map(|(version, regions)| v1::KubernetesRelease {
                version,
                regions: regions
                    .into_iter()
                    .map(|(region, available_at_unix_ms)| v1::RegionAvailability { region, available_at_unix_ms })
                    .collect(),
            })
            .collect(),
    })
}

/// Largest `etc/upkeep/node-image` read from an archive.
const NODE_IMAGE_META_MAX: u64 = 64 * 1024;

/// Checks that an uploaded `tar` image is an archive the agent can unpack and that its `etc/upkeep/node-image`
/// names the family and version it is published as (what the node will report after booting it).
fn check_archive(path: &std::path::Path, family: &str, version: ImageVersion) -> Result<(), ApiError> {
    use std::io::Read;
    let not_an_image = |why: String| {
        ApiError::InvalidArgument(format!(
            "file: not an image archive the agents can read ({why}); build one with `upkeepctl image build`, or \
             publish a disk image for raw slots with --format raw"
        ))
    };
    let f = std::fs::File::open(path).map_err(|e| ApiError::Internal(format!("opening {}: {e}", path.display())))?;
    let mut archive = tar::Archive::new(f);
    let entries = archive.entries().map_err(|e| not_an_image(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| not_an_image(e.to_string()))?;
        let name = entry.path().map_err(|e| not_an_image(e.to_string()))?.to_string_lossy().into_owned();
        if name.trim_start_matches("./") != "etc/upkeep/node-image" {
            continue;
        }
        let mut text = String::new();
        entry
            .by_ref()
            .take(NODE_IMAGE_META_MAX)
            .read_to_string(&mut text)
            .map_err(|e| not_an_image(format!("etc/upkeep/node-image: {e}")))?;
        let value = |key: &str| {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(key).and_then(|v| v.strip_prefix('=')))
                .map(|v| v.trim().trim_matches('"'))
        };
        let (f, v) = (value("FAMILY").unwrap_or_default(), value("VERSION").unwrap_or_default());
        if f != family || v.parse::<ImageVersion>().ok() != Some(version) {
            return Err(ApiError::InvalidArgument(format!(
                "file: the image says it is {f}-{v} (etc/upkeep/node-image) but is published as {family}-{version}; \
                 publish it under the family and version it carries"
            )));
        }
        return Ok(());
    }
    Err(not_an_image("no etc/upkeep/node-image in it".into()))
}
