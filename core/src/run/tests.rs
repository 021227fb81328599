//! Tests of the update-run model and planner, one per SPEC §5 clause (the clause is in the test's name), plus a
//! property-style test driving random operation sequences. Every operation goes through a harness that applies
//! the plan, checks each transition against the SPEC's table, checks that no member is started while already
//! running, and checks that planning again with the same inputs changes nothing.

use super::*;
use crate::concurrency::Limit;
use crate::schedule::{DayOfWeek, Frequency, MaintenanceSchedule, UtcOffset};
use crate::version::{ImageVersion, KubernetesVersion};
use chrono::{DateTime, NaiveTime, TimeDelta, Utc};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

const FAM: &str = "Ubuntu-2204gen2";
const T0: &str = "2024-01-01T12:00:00Z"; // a Monday

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).expect("valid RFC 3339").with_timezone(&Utc)
}

fn iv(s: &str) -> ImageVersion {
    s.parse().expect("valid image version")
}

fn kv(s: &str) -> KubernetesVersion {
    s.parse().expect("valid Kubernetes version")
}

fn pool(name: &str, family: &str, version: &str) -> NodePoolView {
    NodePoolView { name: name.into(), family: family.into(), image_version: Some(iv(version)), region: None }
}

fn member_view(region: &str) -> MemberView {
    MemberView {
        region: region.into(),
        kubernetes_version: Some(kv("1.29.0")),
        node_pools: vec![pool("np1", FAM, "202401.01.0")],
        node_os_schedule: None,
        cluster_schedule: None,
        nodes: Vec::new(),
        max_unavailable: upkeep_limit_one(),
    }
}

fn upkeep_limit_one() -> crate::concurrency::Limit {
    crate::concurrency::Limit::Count(1)
}

fn fleet(names: &[&str]) -> Fleet {
    Fleet { members: names.iter().map(|n| (n.to_string(), Arc::new(member_view("eastus")))).collect() }
}

/// Weekly Monday window at `start` UTC for 4 hours.
fn monday(start: &str) -> MaintenanceSchedule {
    weekly(DayOfWeek::Monday, start)
}

fn weekly(day: DayOfWeek, start: &str) -> MaintenanceSchedule {
    MaintenanceSchedule {
        frequency: Frequency::Weekly { interval_weeks: 1, day_of_week: day },
        start_time: NaiveTime::parse_from_str(start, "%H:%M").expect("valid time"),
        duration_hours: 4,
        duration_minutes: 0,
        utc_offset: UtcOffset::default(),
        start_date: None,
        not_allowed: vec![],
    }
}

fn catalog() -> Catalog {
    let mut c = Catalog::default();
    let long_ago = t("2023-12-01T00:00:00Z");
    let mut add = |fam: &str, v: &str, region: &str, at: DateTime<Utc>| {
        c.images.entry(fam.into()).or_default().entry(iv(v)).or_default().insert(region.into(), at);
    };
    for r in ["eastus", "westus"] {
        add(FAM, "202401.01.0", r, long_ago);
        add(FAM, "202402.01.0", r, long_ago);
    }
    for r in ["eastus", "westus"] {
        c.kubernetes.entry(kv("1.30.0")).or_default().insert(r.into(), long_ago);
    }
    c
}

fn group(name: &str, members: &[&str]) -> GroupSpec {
    GroupSpec { name: name.into(), members: members.iter().map(|m| m.to_string()).collect(), max_concurrency: None }
}

fn stage(name: &str, groups: Vec<GroupSpec>) -> StageSpec {
    StageSpec { name: name.into(), groups, after_stage_wait_seconds: None, max_concurrency: None }
}

fn spec(upgrade_type: UpgradeType, stages: Vec<StageSpec>) -> UpdateRunSpec {
    UpdateRunSpec {
        name: "run1".into(),
        strategy: if stages.is_empty() { None } else { Some(StrategySpec { stages }) },
        upgrade_type,
        kubernetes_version: upgrade_type.needs_kubernetes_version().then(|| kv("1.30.0")),
        node_image_selection: NodeImageSelection::Latest,
    }
}

fn node_image_run(stages: Vec<StageSpec>) -> UpdateRunSpec {
    spec(UpgradeType::NodeImageOnly, stages)
}

fn started(p: &Plan) -> Vec<String> {
    p.actions
        .iter()
        .map(|a| match a {
            Action::StartMember { member, .. } => member.clone(),
        })
        .collect()
}

/// Drives a run through the public API and checks the invariants after every step.
struct H {
    st: RunState,
    fleet: Fleet,
    cat: Catalog,
    now: DateTime<Utc>,
    log: Vec<Transition>,
}

impl H {
    fn new(spec: UpdateRunSpec, fleet: Fleet) -> H {
        let names: Vec<String> = fleet.members.keys().cloned().collect();
        let st = RunState::new(&spec, &names).expect("valid spec");
        H { st, fleet, cat: catalog(), now: t(T0), log: vec![] }
    }

    fn take(&mut self, p: Plan) -> Plan {
        for tr in &p.transitions {
            assert!(
                tr.from == tr.to || can_transition(tr.from, tr.to),
                "illegal transition {}: {} -> {}",
                tr.level,
                tr.from,
                tr.to
            );
        }
        for m in started(&p) {
            let before = self.st.member(&m).expect("started member is in the run").level.status;
            assert_ne!(before, Status::Running, "member {m} started twice");
        }
        self.st = apply(&self.st, &p).expect("plan applies to the state it was made from");
        let again = plan(&self.st, &self.fleet, &self.cat, self.now);
        assert!(again.is_empty(), "planning again changed something: {again:#?}");
        self.check_concurrency();
        self.log.extend(p.transitions.iter().cloned());
        p
    }

    fn check_concurrency(&self) {
        for s in &self.st.stages {
            let mut stage_running = 0;
            for g in &s.groups {
                let n = g.members.iter().filter(|m| m.level.status == Status::Running).count() as u32;
                let cap = g.max_concurrency.map_or(1, |l| l.resolve(g.members.len() as u32));
                assert!(n <= cap, "group {} runs {n} > {cap}", g.name);
                stage_running += n;
            }
            let cap = s.max_concurrency.map_or(u32::MAX, |l| l.resolve(s.member_count() as u32));
            assert!(stage_running <= cap, "stage {} runs {stage_running} > {cap}", s.name);
        }
    }

    fn start(&mut self) -> Plan {
        let p = start(&self.st, &self.fleet, &self.cat, self.now).expect("start accepted");
        self.take(p)
    }

    fn plan(&mut self) -> Plan {
        let (p, state) = plan_and_apply(&self.st, &self.fleet, &self.cat, self.now);
        assert_eq!(p, plan(&self.st, &self.fleet, &self.cat, self.now));
        let p = self.take(p);
        assert_eq!(self.st, state, "the planner's own state is the applied plan's");
        p
    }

    fn finish(&mut self, m: &str, ok: bool) -> Plan {
        let outcome = if ok { Ok(()) } else { Err(format!("{m}: node n1 failed its health check")) };
        let (p, state) = member_finished_and_apply(&self.st, m, outcome.clone(), &self.fleet, &self.cat, self.now)
            .expect("result accepted");
        assert_eq!(Ok(&p), member_finished(&self.st, m, outcome, &self.fleet, &self.cat, self.now).as_ref());
        let p = self.take(p);
        assert_eq!(self.st, state, "the planner's own state is the applied plan's");
        p
    }

    fn stop(&mut self) -> Plan {
        let p = stop(&self.st, self.now).expect("stop accepted");
        self.take(p)
    }

    fn skip(&mut self, target: SkipTarget) -> Plan {
        let p = skip(&self.st, &target, &self.fleet, &self.cat, self.now).expect("skip accepted");
        self.take(p)
    }

    fn at(&mut self, s: &str) {
        self.now = t(s);
    }

    fn m(&self, name: &str) -> Status {
        self.st.member(name).expect("member").level.status
    }

    fn msg(&self, name: &str) -> String {
        self.st.member(name).expect("member").level.message.clone()
    }

    fn g(&self, s: &str, g: &str) -> Status {
        self.st.level(&LevelRef::Group { stage: s.into(), group: g.into() }).expect("group").status
    }

    fn s(&self, s: &str) -> Status {
        self.st.level(&LevelRef::Stage { stage: s.into() }).expect("stage").status
    }

    fn wait(&self, s: &str) -> Status {
        self.st.level(&LevelRef::AfterStageWait { stage: s.into() }).expect("wait").status
    }

    fn run(&self) -> Status {
        self.st.run.status
    }
}

// ----- states and transitions ------------------------------------------------------------------------------------

#[test]
fn sec5_transition_table_is_exactly_the_spec() {
    use Status::*;
    let spec_table: &[(Status, &[Status])] = &[
        (NotStarted, &[Running, Pending]),
        (Running, &[Pending, Stopping, Stopped, Failed, Completed]),
        (Pending, &[Running, Stopping, Stopped, Failed]),
        (Stopping, &[Stopped, Failed]),
        (Stopped, &[Running, Pending]),
        (Failed, &[Running, Pending]),
        (Skipped, &[]),
        (Completed, &[]),
    ];
    // The one documented interpretation: skips of levels that have not run.
    let interpretation = [(NotStarted, Skipped), (Pending, Skipped)];
    for from in Status::ALL {
        for to in Status::ALL {
            let in_spec = spec_table.iter().any(|(f, tos)| *f == from && tos.contains(&to));
            let want = in_spec || interpretation.contains(&(from, to));
            assert_eq!(can_transition(from, to), want, "{from} -> {to}");
        }
    }
    assert!(!can_transition(NotStarted, Completed));
    assert_eq!(transition_path(Running, Skipped), Some(vec![Pending, Skipped]));
    assert_eq!(transition_path(Pending, Completed), Some(vec![Running, Completed]));
    assert_eq!(transition_path(Completed, Running), None);
    assert_eq!(transition_path(Skipped, Pending), None);
}

#[test]
fn sec5_every_level_carries_start_end_message_error() {
    let mut h = H::new(node_image_run(vec![stage("s1", vec![group("g1", &["a"])])]), fleet(&["a"]));
    h.start();
    let a = h.st.member("a").expect("member").clone();
    assert_eq!(a.level.started_at, Some(t(T0)));
    assert_eq!(a.level.ended_at, None);
    assert!(a.level.message.contains("upgrading: pool np1 -> Ubuntu-2204gen2-202402.01.0"), "{}", a.level.message);
    assert_eq!(h.st.run.started_at, Some(t(T0)));
    h.at("2024-01-01T13:00:00Z");
    h.finish("a", false);
    let a = h.st.member("a").expect("member");
    assert_eq!(a.level.ended_at, Some(t("2024-01-01T13:00:00Z")));
    assert_eq!(a.level.error.as_deref(), Some("a: node n1 failed its health check"));
    for l in [&h.st.run, &h.st.stages[0].level, &h.st.stages[0].groups[0].level] {
        assert_eq!(l.status, Status::Failed);
        assert!(l.error.as_deref().unwrap_or("").contains("member \"a\" failed: a: node n1"), "{l:?}");
        assert!(l.started_at.is_some() && l.ended_at.is_some() && !l.message.is_empty());
    }
}

// ----- order -----------------------------------------------------------------------------------------------------

#[test]
fn sec5_stages_run_one_after_another() {
    let mut h = H::new(
        node_image_run(vec![stage("s1", vec![group("g1", &["a"])]), stage("s2", vec![group("g1", &["b"])])]),
        fleet(&["a", "b"]),
    );
    assert_eq!(started(&h.start()), vec!["a"]);
    assert_eq!((h.s("s1"), h.s("s2"), h.m("b")), (Status::Running, Status::NotStarted, Status::NotStarted));
    assert_eq!(started(&h.finish("a", true)), vec!["b"]);
    assert_eq!((h.s("s1"), h.s("s2")), (Status::Completed, Status::Running));
    h.finish("b", true);
    assert_eq!(h.run(), Status::Completed);
}

#[test]
fn sec5_groups_of_a_stage_run_in_parallel() {
    let mut h = H::new(
        node_image_run(vec![stage("s1", vec![group("g1", &["a", "b"]), group("g2", &["c", "d"])])]),
        fleet(&["a", "b", "c", "d"]),
    );
    assert_eq!(started(&h.start()), vec!["a", "c"]);
    assert_eq!((h.g("s1", "g1"), h.g("s1", "g2")), (Status::Running, Status::Running));
}

#[test]
fn sec5_members_of_a_group_one_after_another() {
    let mut h = H::new(node_image_run(vec![stage("s1", vec![group("g1", &["a", "b", "c"])])]), fleet(&["a", "b", "c"]));
    assert_eq!(started(&h.start()), vec!["a"]);
    assert_eq!(h.m("b"), Status::NotStarted);
    assert_eq!(started(&h.finish("a", true)), vec!["b"]);
    assert_eq!(started(&h.finish("b", true)), vec!["c"]);
}

#[test]
fn sec5_no_order_means_all_members_one_after_another() {
    let mut h = H::new(node_image_run(vec![]), fleet(&["a", "b"]));
    assert_eq!(h.st.stages.len(), 1);
    assert_eq!(h.st.stages[0].groups[0].members.len(), 2);
    assert_eq!(started(&h.start()), vec!["a"]);
    assert_eq!(started(&h.finish("a", true)), vec!["b"]);
    h.finish("b", true);
    assert_eq!(h.run(), Status::Completed);
}

#[test]
fn sec5_group_max_concurrency_count_and_percent_rounds_up() {
    for (limit, want) in
        [(Limit::Count(3), 3), (Limit::Percent(50), 2), (Limit::Percent(10), 1), (Limit::Percent(26), 2)]
    {
        let mut g = group("g1", &["a", "b", "c", "d"]);
        g.max_concurrency = Some(limit);
        let mut h = H::new(node_image_run(vec![stage("s1", vec![g])]), fleet(&["a", "b", "c", "d"]));
        assert_eq!(started(&h.start()).len(), want, "{limit}");
    }
}

#[test]
fn sec5_stage_max_concurrency_caps_the_sum_of_groups() {
    let mut g1 = group("g1", &["a", "b"]);
    g1.max_concurrency = Some(Limit::Count(2));
    let mut g2 = group("g2", &["c", "d"]);
    g2.max_concurrency = Some(Limit::Count(2));
    let mut s = stage("s1", vec![g1, g2]);
    s.max_concurrency = Some(Limit::Percent(50)); // of 4 members = 2
    let mut h = H::new(node_image_run(vec![s]), fleet(&["a", "b", "c", "d"]));
    // Round robin across groups: one from each, not both from the first group.
    assert_eq!(started(&h.start()), vec!["a", "c"]);
    assert_eq!(started(&h.finish("c", true)), vec!["d"]);
    assert_eq!(h.m("b"), Status::NotStarted);
}

#[test]
fn sec5_stage_cap_leaves_a_started_group_pending_for_a_slot() {
    let mut s = stage("s1", vec![group("g1", &["a", "b"]), group("g2", &["c"])]);
    s.max_concurrency = Some(Limit::Count(1));
    let mut h = H::new(node_image_run(vec![s]), fleet(&["a", "b", "c"]));
    assert_eq!(started(&h.start()), vec!["a"]);
    assert_eq!(h.g("s1", "g2"), Status::NotStarted);
    assert_eq!(started(&h.finish("a", true)), vec!["b"]);
    assert_eq!(started(&h.finish("b", true)), vec!["c"]);
    assert_eq!(h.g("s1", "g1"), Status::Completed);
}

// ----- windows and Pending -----------------------------------------------------------------------------------------

fn windowed_fleet() -> Fleet {
    // At T0 (Monday 12:00 UTC): "open" is inside its window, "soon" opens at 14:00, "closed" on Tuesday.
    let mut f = fleet(&["closed", "none", "soon", "open"]);
    let set = |f: &mut Fleet, m: &str, s: MaintenanceSchedule| {
        f.member_mut(m).expect("member").node_os_schedule = Some(s);
    };
    set(&mut f, "open", monday("10:00"));
    set(&mut f, "soon", monday("14:00"));
    set(&mut f, "closed", weekly(DayOfWeek::Tuesday, "10:00"));
    f
}

#[test]
fn sec5_member_choice_order_by_window_priority_then_declared_order() {
    let mut h = H::new(
        node_image_run(vec![stage("s1", vec![group("g1", &["closed", "none", "soon", "open"])])]),
        windowed_fleet(),
    );
    // (1) window open now.
    assert_eq!(started(&h.start()), vec!["open"]);
    // (2) opens within 4 hours is tried next: it goes Pending and (3) no window starts.
    assert_eq!(started(&h.finish("open", true)), vec!["none"]);
    assert_eq!(h.m("soon"), Status::Pending);
    // (4) closed is tried last.
    assert_eq!(h.m("closed"), Status::NotStarted);
    assert_eq!(started(&h.finish("none", true)), Vec::<String>::new());
    assert_eq!(h.m("closed"), Status::Pending);
}

#[test]
fn sec5_pending_member_window_closed_message_gives_next_opening() {
    let mut h = H::new(node_image_run(vec![stage("s1", vec![group("g1", &["soon"])])]), windowed_fleet());
    let p = h.start();
    assert_eq!(h.m("soon"), Status::Pending);
    assert_eq!(h.msg("soon"), "maintenance window not open; next opening 2024-01-01T14:00:00Z");
    assert_eq!(p.next_wakeup, Some(t("2024-01-01T14:00:00Z")));
}

#[test]
fn sec5_pending_member_next_member_tried() {
    let mut h = H::new(node_image_run(vec![stage("s1", vec![group("g1", &["soon", "none"])])]), windowed_fleet());
    assert_eq!(started(&h.start()), vec!["none"]);
    assert_eq!(h.m("soon"), Status::Pending);
    assert_eq!(h.g("s1", "g1"), Status::Running);
}

#[test]
fn sec5_group_all_pending_is_pending_and_so_are_stage_and_run() {
    let mut h = H::new(node_image_run(vec![stage("s1", vec![group("g1", &["soon", "closed"])])]), windowed_fleet());
    h.start();
    assert_eq!((h.m("soon"), h.m("closed")), (Status::Pending, Status::Pending));
    assert_eq!((h.g("s1", "g1"), h.s("s1"), h.run()), (Status::Pending, Status::Pending, Status::Pending));
    assert!(h.st.run.message.contains("next opening 2024-01-01T14:00:00Z"), "{}", h.st.run.message);
}

#[test]
fn sec5_pending_is_not_terminal_and_the_member_starts_when_it_can() {
    let mut h = H::new(
        node_image_run(vec![stage("s1", vec![group("g1", &["soon"])]), stage("s2", vec![group("g1", &["none"])])]),
        windowed_fleet(),
    );
    let p = h.start();
    assert_eq!(h.s("s2"), Status::NotStarted, "a stage with a Pending group does not move on");
    assert!(p.actions.is_empty());
    h.at("2024-01-01T13:59:00Z");
    assert!(h.plan().is_empty());
    h.at("2024-01-01T14:00:00Z");
    assert_eq!(started(&h.plan()), vec!["soon"]);
    assert_eq!(h.run(), Status::Running);
    assert_eq!(started(&h.finish("soon", true)), vec!["none"]);
}

#[test]
fn sec5_pending_kubernetes_version_not_yet_available_in_region() {
    let mut sp = spec(UpgradeType::ControlPlaneOnly, vec![stage("s1", vec![group("g1", &["a"])])]);
    sp.kubernetes_version = Some(kv("1.31.0"));
    let mut h = H::new(sp, fleet(&["a"]));
    h.cat.kubernetes.entry(kv("1.31.0")).or_default().insert("eastus".into(), t("2024-01-02T12:00:00Z"));
    let p = h.start();
    assert_eq!(h.m("a"), Status::Pending);
    assert_eq!(
        h.msg("a"),
        "target Kubernetes version 1.31.0 is not yet available in region eastus (available from 2024-01-02T12:00:00Z)"
    );
    assert_eq!(p.next_wakeup, Some(t("2024-01-02T12:00:00Z")));
    h.at("2024-01-02T12:00:00Z");
    assert_eq!(started(&h.plan()), vec!["a"]);
}

#[test]
fn sec5_pending_node_image_not_yet_available_in_region() {
    let mut sp = node_image_run(vec![stage("s1", vec![group("g1", &["a"])])]);
    sp.node_image_selection =
        NodeImageSelection::Custom { pins: vec![ImagePin { family: FAM.into(), version: iv("202403.01.0") }] };
    let mut h = H::new(sp, fleet(&["a"]));
    h.cat.images.entry(FAM.into()).or_default().entry(iv("202403.01.0")).or_default().insert("westus".into(), t(T0));
    h.start();
    assert_eq!(h.m("a"), Status::Pending);
    assert_eq!(
        h.msg("a"),
        "target node image Ubuntu-2204gen2-202403.01.0 is not yet available in region eastus (not in the catalog)"
    );
}

// ----- image selection ---------------------------------------------------------------------------------------------

fn two_region_fleet() -> Fleet {
    let mut f = fleet(&["east", "west"]);
    f.member_mut("west").expect("member").region = "westus".into();
    f
}

fn with_new_image_east_only(c: &mut Catalog) {
    let v = c.images.entry(FAM.into()).or_default().entry(iv("202403.01.0")).or_default();
    v.insert("eastus".into(), t("2023-12-31T00:00:00Z"));
    v.insert("westus".into(), t("2024-01-02T00:00:00Z"));
}

fn target_of(h: &H, m: &str) -> String {
    h.st.member(m).and_then(|m| m.target.as_ref()).map(|t| t.to_string()).unwrap_or_default()
}

#[test]
fn sec5_latest_picks_newest_in_member_region_at_member_start() {
    let mut h = H::new(
        node_image_run(vec![stage("s1", vec![group("g1", &["east"]), group("g2", &["west"])])]),
        two_region_fleet(),
    );
    with_new_image_east_only(&mut h.cat);
    h.start();
    assert_eq!(target_of(&h, "east"), "pool np1 -> Ubuntu-2204gen2-202403.01.0");
    assert_eq!(target_of(&h, "west"), "pool np1 -> Ubuntu-2204gen2-202402.01.0");
    assert_eq!(h.st.image_selection, None);
}

#[test]
fn sec5_consistent_picks_newest_in_every_region_and_records_it_at_start() {
    let mut sp = node_image_run(vec![stage("s1", vec![group("g1", &["east", "west"])])]);
    sp.node_image_selection = NodeImageSelection::Consistent;
    let mut h = H::new(sp, two_region_fleet());
    with_new_image_east_only(&mut h.cat);
    let p = h.start();
    let want: BTreeMap<String, ImageVersion> = [(FAM.to_string(), iv("202402.01.0"))].into();
    assert_eq!(p.image_selection.as_ref(), Some(&want));
    assert_eq!(h.st.image_selection.as_ref(), Some(&want));
    assert_eq!(target_of(&h, "east"), "pool np1 -> Ubuntu-2204gen2-202402.01.0");
    // Later the newer image lands everywhere; the run keeps its selection.
    h.at("2024-01-03T00:00:00Z");
    h.finish("east", true);
    assert_eq!(target_of(&h, "west"), "pool np1 -> Ubuntu-2204gen2-202402.01.0");
}

#[test]
fn sec5_consistent_skips_member_with_no_common_image() {
    let mut sp = node_image_run(vec![stage("s1", vec![group("g1", &["east", "west"])])]);
    sp.node_image_selection = NodeImageSelection::Consistent;
    let mut f = two_region_fleet();
    // east lives in eastus, but its gpu pool runs in westus, where GpuLinux was never published.
    let mut gpu = pool("gpu", GPU, "202401.01.0");
    gpu.region = Some("westus".into());
    f.member_mut("east").expect("member").node_pools.push(gpu);
    let mut h = H::new(sp, f);
    publish(&mut h.cat, GPU, "202402.01.0", &["eastus"]);
    assert_eq!(started(&h.start()), vec!["west"]);
    assert_eq!(h.m("east"), Status::Skipped);
    assert!(h.msg("east").contains("Consistent selection found no version of family GpuLinux"), "{}", h.msg("east"));
    assert!(h.msg("east").contains("node pool gpu"), "{}", h.msg("east"));
}

const GPU: &str = "GpuLinux";

/// Makes `version` of `family` available in `regions` since long before T0.
fn publish(c: &mut Catalog, family: &str, version: &str, regions: &[&str]) {
    let v = c.images.entry(family.into()).or_default().entry(iv(version)).or_default();
    for r in regions {
        v.insert(r.to_string(), t("2023-12-01T00:00:00Z"));
    }
}

/// What the selection was before it was counted per family: every region of every member for every family.
fn selection_over_all_regions(h: &H) -> BTreeMap<String, ImageVersion> {
    let all: BTreeSet<String> =
        h.fleet.members.values().flat_map(|m| m.regions().into_iter().map(str::to_string)).collect();
    let families: BTreeMap<String, BTreeSet<String>> =
        h.fleet.members.values().flat_map(|m| m.node_pools.iter().map(|p| (p.family.clone(), all.clone()))).collect();
    h.cat.consistent_selection(&families, h.now)
}

#[test]
fn sec5_consistent_counts_per_family_only_the_regions_where_it_is_used() {
    // Three regions, two families: Ubuntu runs in eastus and westus, GpuLinux in westus and northeu. Neither is
    // ever published in the region where only the other one runs.
    let mut f = fleet(&["east", "west", "north"]);
    let west = f.member_mut("west").expect("member");
    west.region = "westus".into();
    west.node_pools.push(pool("gpu", GPU, "202401.01.0"));
    let north = f.member_mut("north").expect("member");
    north.region = "northeu".into();
    north.node_pools = vec![pool("gpu", GPU, "202401.01.0")];
    let mut sp = node_image_run(vec![stage("s1", vec![group("g1", &["east", "west", "north"])])]);
    sp.node_image_selection = NodeImageSelection::Consistent;
    let mut h = H::new(sp, f);
    // The default catalog has Ubuntu 202401.01.0 and 202402.01.0 in eastus and westus; 202403.01.0 is only out
    // in eastus, so it is not common.
    publish(&mut h.cat, FAM, "202403.01.0", &["eastus"]);
    publish(&mut h.cat, GPU, "202401.05.0", &["westus", "northeu"]);
    publish(&mut h.cat, GPU, "202402.05.0", &["westus", "northeu"]);
    publish(&mut h.cat, GPU, "202403.05.0", &["northeu"]);

    // Counting every member's region for every family found nothing, and every member would be skipped.
    assert_eq!(selection_over_all_regions(&h), BTreeMap::new());

    let p = h.start();
    let want: BTreeMap<String, ImageVersion> =
        [(FAM.to_string(), iv("202402.01.0")), (GPU.to_string(), iv("202402.05.0"))].into();
    assert_eq!(p.image_selection.as_ref(), Some(&want));
    assert_eq!(h.st.image_selection.as_ref(), Some(&want));
    assert_eq!(started(&p), vec!["east"]);
    assert_eq!(target_of(&h, "east"), "pool np1 -> Ubuntu-2204gen2-202402.01.0");
    h.finish("east", true);
    assert_eq!(h.m("west"), Status::Running);
    assert_eq!(target_of(&h, "west"), "pool gpu -> GpuLinux-202402.05.0, pool np1 -> Ubuntu-2204gen2-202402.01.0");
    h.finish("west", true);
    assert_eq!(h.m("north"), Status::Running);
    assert_eq!(target_of(&h, "north"), "pool gpu -> GpuLinux-202402.05.0");
    h.finish("north", true);
    assert_eq!(h.run(), Status::Completed);
}

#[test]
fn sec5_consistent_counts_a_pool_in_its_own_region_not_its_members() {
    // east lives in eastus; its gpu pool runs in northeu, the only region GpuLinux is published in.
    let mut f = fleet(&["east"]);
    let mut gpu = pool("gpu", GPU, "202401.01.0");
    gpu.region = Some("northeu".into());
    f.member_mut("east").expect("member").node_pools.push(gpu);
    let mut sp = node_image_run(vec![stage("s1", vec![group("g1", &["east"])])]);
    sp.node_image_selection = NodeImageSelection::Consistent;
    let mut h = H::new(sp, f);
    publish(&mut h.cat, GPU, "202402.05.0", &["northeu"]);

    // Both of east's regions for both families: Ubuntu is not in northeu, GpuLinux not in eastus.
    assert_eq!(selection_over_all_regions(&h), BTreeMap::new());

    let p = h.start();
    let want: BTreeMap<String, ImageVersion> =
        [(FAM.to_string(), iv("202402.01.0")), (GPU.to_string(), iv("202402.05.0"))].into();
    assert_eq!(p.image_selection.as_ref(), Some(&want));
    assert_eq!(started(&p), vec!["east"]);
    assert_eq!(target_of(&h, "east"), "pool gpu -> GpuLinux-202402.05.0, pool np1 -> Ubuntu-2204gen2-202402.01.0");
}

#[test]
fn sec5_custom_pins_leave_unpinned_families_alone() {
    let mut sp = node_image_run(vec![stage("s1", vec![group("g1", &["a"])])]);
    sp.node_image_selection =
        NodeImageSelection::Custom { pins: vec![ImagePin { family: FAM.into(), version: iv("202402.01.0") }] };
    let mut f = fleet(&["a"]);
    f.member_mut("a").expect("member").node_pools.push(pool("other", "Mariner", "202301.01.0"));
    let mut h = H::new(sp, f);
    h.start();
    let target = h.st.member("a").and_then(|m| m.target.clone()).expect("target");
    assert_eq!(target.images.keys().collect::<Vec<_>>(), vec!["np1"]);
    assert_eq!(target.kubernetes_version, None);
}

// ----- system skips and completion ---------------------------------------------------------------------------------

#[test]
fn sec5_skip_member_already_at_target_kubernetes() {
    let mut f = fleet(&["a", "b"]);
    f.member_mut("a").expect("member").kubernetes_version = Some(kv("1.30.0"));
    let mut h = H::new(spec(UpgradeType::ControlPlaneOnly, vec![stage("s1", vec![group("g1", &["a", "b"])])]), f);
    assert_eq!(started(&h.start()), vec!["b"]);
    assert_eq!(h.m("a"), Status::Skipped);
    assert_eq!(h.msg("a"), "already at Kubernetes 1.30.0 (target 1.30.0)");
    assert_eq!(h.st.member("b").and_then(|m| m.target.clone()).expect("target").to_string(), "Kubernetes 1.30.0");
}

#[test]
fn sec5_skip_node_image_only_member_with_every_pool_at_target() {
    let mut f = fleet(&["a", "b"]);
    f.member_mut("a").expect("member").node_pools = vec![pool("np1", FAM, "202402.01.0")];
    let mut h = H::new(node_image_run(vec![stage("s1", vec![group("g1", &["a", "b"])])]), f);
    assert_eq!(started(&h.start()), vec!["b"]);
    assert_eq!(h.m("a"), Status::Skipped);
    assert_eq!(h.msg("a"), "every node pool is already at its target image");
}

#[test]
fn sec5_skip_full_only_when_kubernetes_and_every_pool_at_target() {
    let mut f = fleet(&["both", "k8s_only"]);
    for m in ["both", "k8s_only"] {
        f.member_mut(m).expect("member").kubernetes_version = Some(kv("1.30.0"));
    }
    f.member_mut("both").expect("member").node_pools = vec![pool("np1", FAM, "202402.01.0")];
    let mut h = H::new(spec(UpgradeType::Full, vec![stage("s1", vec![group("g1", &["both", "k8s_only"])])]), f);
    assert_eq!(started(&h.start()), vec!["k8s_only"]);
    assert_eq!(h.m("both"), Status::Skipped);
    assert!(h.msg("both").contains("every node pool is at its target image"));
}

#[test]
fn sec5_all_members_skipped_rolls_up_to_skipped_group_stage_run() {
    let mut f = fleet(&["a", "b"]);
    for m in ["a", "b"] {
        f.member_mut(m).expect("member").kubernetes_version = Some(kv("1.30.0"));
    }
    let mut h = H::new(
        spec(
            UpgradeType::ControlPlaneOnly,
            vec![stage("s1", vec![group("g1", &["a"])]), stage("s2", vec![group("g1", &["b"])])],
        ),
        f,
    );
    h.start();
    assert_eq!(
        (h.g("s1", "g1"), h.s("s1"), h.s("s2"), h.run()),
        (Status::Skipped, Status::Skipped, Status::Skipped, Status::Skipped)
    );
}

#[test]
fn sec5_completed_when_every_child_completed_or_skipped() {
    let mut f = fleet(&["a", "b"]);
    f.member_mut("a").expect("member").node_pools = vec![pool("np1", FAM, "202402.01.0")];
    let mut h = H::new(node_image_run(vec![stage("s1", vec![group("g1", &["a", "b"])])]), f);
    h.start();
    h.finish("b", true);
    assert_eq!((h.g("s1", "g1"), h.s("s1"), h.run()), (Status::Completed, Status::Completed, Status::Completed));
    assert_eq!(h.st.stages[0].groups[0].level.message, "1 member(s) completed, 1 skipped");
}

#[test]
fn sec5_member_no_longer_in_inventory_is_skipped() {
    let mut h = H::new(node_image_run(vec![stage("s1", vec![group("g1", &["a", "b"])])]), fleet(&["a", "b"]));
    h.fleet.members.remove("a");
    assert_eq!(started(&h.start()), vec!["b"]);
    assert!(h.msg("a").contains("no longer in the inventory"));
}

// ----- waits -------------------------------------------------------------------------------------------------------

fn waited_run() -> UpdateRunSpec {
    let mut s1 = stage("s1", vec![group("g1", &["a"])]);
    s1.after_stage_wait_seconds = Some(600);
    node_image_run(vec![s1, stage("s2", vec![group("g1", &["b"])])])
}

#[test]
fn sec5_after_stage_wait_runs_then_next_stage_starts() {
    let mut h = H::new(waited_run(), fleet(&["a", "b"]));
    h.start();
    let p = h.finish("a", true);
    assert!(p.actions.is_empty());
    assert_eq!((h.s("s1"), h.wait("s1"), h.run()), (Status::Completed, Status::Running, Status::Running));
    assert_eq!(p.next_wakeup, Some(t("2024-01-01T12:10:00Z")));
    h.at("2024-01-01T12:09:59Z");
    assert!(h.plan().is_empty());
    h.at("2024-01-01T12:10:00Z");
    assert_eq!(started(&h.plan()), vec!["b"]);
    assert_eq!(h.wait("s1"), Status::Completed);
}

#[test]
fn sec5_skip_the_wait_after_a_stage() {
    let mut h = H::new(waited_run(), fleet(&["a", "b"]));
    h.start();
    h.finish("a", true);
    let p = h.skip(SkipTarget::AfterStageWait { stage: "s1".into() });
    assert_eq!(started(&p), vec!["b"]);
    assert_eq!(h.wait("s1"), Status::Skipped);
    let path: Vec<(Status, Status)> = p
        .transitions
        .iter()
        .filter(|t| t.level == LevelRef::AfterStageWait { stage: "s1".into() })
        .map(|t| (t.from, t.to))
        .collect();
    assert_eq!(path, vec![(Status::Running, Status::Pending), (Status::Pending, Status::Skipped)]);
}

#[test]
fn sec5_skipping_a_stage_skips_its_wait_too() {
    let mut h = H::new(waited_run(), fleet(&["a", "b"]));
    h.skip(SkipTarget::Stage { stage: "s1".into() });
    assert_eq!((h.s("s1"), h.wait("s1"), h.m("a")), (Status::Skipped, Status::Skipped, Status::Skipped));
    assert_eq!(started(&h.start()), vec!["b"]);
}

#[test]
fn sec7_a_stored_wait_out_of_bounds_never_panics_the_planner() {
    // A state written before waits had bounds (or damaged) holds the largest i64: planning, recording the member's
    // result and previewing must go on, holding the wait to its bound and saying so.
    let mut h = H::new(waited_run(), fleet(&["a", "b"]));
    h.st.stages[0].wait_seconds = i64::MAX;
    let preview = preview(&h.st, &h.fleet, &h.cat, h.now, TimeDelta::seconds(600));
    assert_eq!(preview.first().map(|p| p.member.as_str()), Some("a"));
    h.start();
    let p = h.finish("a", true);
    assert_eq!(h.wait("s1"), Status::Running);
    assert_eq!(p.next_wakeup, Some(t(T0) + TimeDelta::seconds(MAX_WAIT_SECONDS)));
    let msg = h.st.stages[0].wait.as_ref().map(|w| w.message.clone()).unwrap_or_default();
    assert!(msg.contains("outside 0..=2592000"), "{msg}");
    h.at("2024-01-31T12:00:00Z");
    assert_eq!(started(&h.plan()), vec!["b"]);
    // A wait that began at the calendar's end ends there, without a panic.
    let mut h = H::new(waited_run(), fleet(&["a", "b"]));
    h.st.stages[0].wait_seconds = i64::MAX;
    h.start();
    h.finish("a", true);
    if let Some(w) = h.st.stages[0].wait.as_mut() {
        w.started_at = Some(DateTime::<Utc>::MAX_UTC);
    }
    assert!(h.plan().actions.is_empty());
}

#[test]
fn sec7_a_member_whose_result_cannot_be_recorded_fails_alone_with_the_reason() {
    let mut h = H::new(waited_run(), fleet(&["a", "b"]));
    h.start();
    let p = fail_member_only(&h.st, "a", "recording panicked", h.now).expect("a is running");
    assert!(p.actions.is_empty());
    h.st = apply(&h.st, &p).expect("applies");
    assert_eq!((h.m("a"), h.run()), (Status::Failed, Status::Failed));
    let error = h.st.member("a").and_then(|m| m.level.error.clone()).unwrap_or_default();
    assert!(error.contains("recording panicked"), "{error}");
    // Planning afterwards starts nothing more.
    assert!(h.plan().actions.is_empty());
    assert!(fail_member_only(&h.st, "a", "again", h.now).is_err(), "only a Running member");
}

// ----- operator skips ----------------------------------------------------------------------------------------------

#[test]
fn sec5_operator_skips_a_member_and_a_group() {
    let mut h = H::new(
        node_image_run(vec![stage("s1", vec![group("g1", &["a", "b"]), group("g2", &["c", "d"])])]),
        fleet(&["a", "b", "c", "d"]),
    );
    h.start();
    h.skip(SkipTarget::Member { member: "b".into() });
    assert_eq!(h.m("b"), Status::Skipped);
    assert_eq!(h.msg("b"), "skipped by operator");
    h.finish("a", true);
    assert_eq!(h.g("s1", "g1"), Status::Completed);
    // g2 has c running: skipping the whole group is refused, naming the running member.
    let err = skip(&h.st, &SkipTarget::Group { stage: "s1".into(), group: "g2".into() }, &h.fleet, &h.cat, h.now)
        .expect_err("running group");
    assert!(err.to_string().contains("(c)"), "{err}");
    h.finish("c", true);
    assert_eq!(h.m("d"), Status::Running);
    h.finish("d", true);
    assert_eq!(h.run(), Status::Completed);
}

#[test]
fn sec5_operator_skip_of_a_pending_group_moves_the_stage_on() {
    let mut h = H::new(
        node_image_run(vec![stage("s1", vec![group("g1", &["soon"])]), stage("s2", vec![group("g1", &["none"])])]),
        windowed_fleet(),
    );
    h.start();
    assert_eq!(h.g("s1", "g1"), Status::Pending);
    assert_eq!(started(&h.skip(SkipTarget::Group { stage: "s1".into(), group: "g1".into() })), vec!["none"]);
    assert_eq!((h.m("soon"), h.s("s1")), (Status::Skipped, Status::Skipped));
}

#[test]
fn sec5_skip_refused_for_running_or_finished_levels_and_unknown_names() {
    let mut h = H::new(node_image_run(vec![stage("s1", vec![group("g1", &["a", "b"])])]), fleet(&["a", "b"]));
    h.start();
    let try_skip = |h: &H, target: SkipTarget| skip(&h.st, &target, &h.fleet, &h.cat, h.now).expect_err("refused");
    let e = try_skip(&h, SkipTarget::Member { member: "a".into() });
    assert!(e.to_string().contains("not aborted"), "{e}");
    h.finish("a", true);
    let e = try_skip(&h, SkipTarget::Member { member: "a".into() });
    assert!(e.to_string().contains("already Completed"), "{e}");
    let e = try_skip(&h, SkipTarget::Member { member: "zz".into() });
    assert!(matches!(e, RunOpError::UnknownLevel(_)), "{e}");
    let e = try_skip(&h, SkipTarget::AfterStageWait { stage: "s1".into() });
    assert!(e.to_string().contains("has no wait"), "{e}");
}

// ----- stop, failure, restart --------------------------------------------------------------------------------------

fn parallel_run() -> (UpdateRunSpec, Fleet) {
    (
        node_image_run(vec![stage("s1", vec![group("g1", &["a", "b"]), group("g2", &["c", "d"])])]),
        fleet(&["a", "b", "c", "d"]),
    )
}

#[test]
fn sec5_stop_lets_running_members_finish_stopping_then_stopped() {
    let (sp, f) = parallel_run();
    let mut h = H::new(sp, f);
    h.start();
    h.stop();
    assert_eq!((h.run(), h.s("s1"), h.g("s1", "g1")), (Status::Stopping, Status::Stopping, Status::Stopping));
    assert_eq!((h.m("a"), h.m("c")), (Status::Running, Status::Running), "upgrades already started are not aborted");
    assert!(h.finish("a", true).actions.is_empty(), "nothing new starts");
    assert_eq!((h.m("a"), h.g("s1", "g1"), h.run()), (Status::Completed, Status::Stopped, Status::Stopping));
    h.finish("c", true);
    assert_eq!((h.s("s1"), h.run(), h.m("b")), (Status::Stopped, Status::Stopped, Status::NotStarted));
    assert!(stop(&h.st, h.now).is_err(), "already stopped");
}

#[test]
fn sec5_stop_of_a_pending_run_is_immediate() {
    let mut h = H::new(node_image_run(vec![stage("s1", vec![group("g1", &["soon", "closed"])])]), windowed_fleet());
    h.start();
    h.stop();
    assert_eq!((h.run(), h.m("soon"), h.g("s1", "g1")), (Status::Stopped, Status::Stopped, Status::Stopped));
    // Started again, it resumes: the members are evaluated again.
    h.at("2024-01-01T14:00:00Z");
    assert_eq!(started(&h.start()), vec!["soon"]);
}

#[test]
fn sec5_failure_fails_group_stage_run_and_starts_nothing_more() {
    let (sp, f) = parallel_run();
    let mut h = H::new(sp, f);
    h.start();
    let p = h.finish("a", false);
    assert!(p.actions.is_empty());
    assert_eq!(
        (h.m("a"), h.g("s1", "g1"), h.s("s1"), h.run()),
        (Status::Failed, Status::Failed, Status::Failed, Status::Failed)
    );
    assert!(h.st.run.error.as_deref().unwrap_or("").contains("node n1 failed its health check"));
    assert_eq!((h.m("c"), h.g("s1", "g2")), (Status::Running, Status::Stopping));
    // The result of a member already running is still recorded; still nothing new starts.
    assert!(h.finish("c", true).actions.is_empty());
    assert_eq!(
        (h.m("c"), h.g("s1", "g2"), h.m("d"), h.m("b")),
        (Status::Completed, Status::Stopped, Status::NotStarted, Status::NotStarted)
    );
}

#[test]
fn sec5_failure_of_a_second_member_is_added_to_the_summary() {
    let (sp, f) = parallel_run();
    let mut h = H::new(sp, f);
    h.start();
    h.finish("a", false);
    h.finish("c", false);
    let err = h.st.run.error.clone().unwrap_or_default();
    assert!(err.contains("member \"a\" failed") && err.contains("member \"c\" failed"), "{err}");
    assert_eq!(h.g("s1", "g2"), Status::Failed);
}

#[test]
fn sec5_restart_resumes_first_unprocessed_and_retries_failed() {
    let (sp, f) = parallel_run();
    let mut h = H::new(sp, f);
    h.start();
    h.finish("a", false);
    assert!(start(&h.st, &h.fleet, &h.cat, h.now).is_err(), "c is still upgrading");
    h.finish("c", true);
    h.at("2024-01-01T13:00:00Z");
    let p = h.start();
    assert_eq!(started(&p), vec!["a", "d"]);
    assert_eq!(h.st.member("a").map(|m| m.attempts), Some(2));
    assert_eq!(h.st.member("a").and_then(|m| m.level.started_at), Some(t("2024-01-01T13:00:00Z")));
    assert_eq!(h.st.member("a").and_then(|m| m.level.error.clone()), None);
    assert_eq!((h.run(), h.g("s1", "g1"), h.g("s1", "g2")), (Status::Running, Status::Running, Status::Running));
    h.finish("a", true);
    h.finish("b", true);
    h.finish("d", true);
    assert_eq!(h.run(), Status::Completed);
}

#[test]
fn sec5_restart_after_stop_resumes_with_the_next_member() {
    let mut h = H::new(node_image_run(vec![stage("s1", vec![group("g1", &["a", "b", "c"])])]), fleet(&["a", "b", "c"]));
    h.start();
    h.stop();
    h.finish("a", true);
    assert_eq!(h.run(), Status::Stopped);
    assert_eq!(started(&h.start()), vec!["b"]);
}

#[test]
fn sec5_operator_can_skip_a_failed_member_so_restart_does_not_retry_it() {
    let mut h = H::new(node_image_run(vec![stage("s1", vec![group("g1", &["a", "b"])])]), fleet(&["a", "b"]));
    h.start();
    h.finish("a", false);
    h.skip(SkipTarget::Member { member: "a".into() });
    assert_eq!(h.m("a"), Status::Skipped);
    assert_eq!(started(&h.start()), vec!["b"]);
    h.finish("b", true);
    assert_eq!(h.run(), Status::Completed);
}

#[test]
fn sec5_operations_refused_in_the_wrong_state() {
    let mut h = H::new(node_image_run(vec![stage("s1", vec![group("g1", &["a"])])]), fleet(&["a"]));
    assert!(stop(&h.st, h.now).expect_err("not started").to_string().contains("has not started"));
    assert!(member_finished(&h.st, "a", Ok(()), &h.fleet, &h.cat, h.now).is_err());
    assert!(h.st.can_edit() && h.st.can_delete());
    h.start();
    assert!(!h.st.can_edit() && !h.st.can_delete());
    assert!(start(&h.st, &h.fleet, &h.cat, h.now).expect_err("running").to_string().contains("already Running"));
    h.finish("a", true);
    assert!(start(&h.st, &h.fleet, &h.cat, h.now).expect_err("completed").to_string().contains("create a new run"));
    assert!(h.st.can_delete());
}

#[test]
fn apply_refuses_a_stale_plan() {
    let h = H::new(node_image_run(vec![stage("s1", vec![group("g1", &["a"])])]), fleet(&["a"]));
    let p = start(&h.st, &h.fleet, &h.cat, h.now).expect("start");
    let next = apply(&h.st, &p).expect("applies once");
    assert!(matches!(apply(&next, &p), Err(RunOpError::StalePlan { .. })));
}

#[test]
fn plans_are_deterministic() {
    let (sp, f) = parallel_run();
    let h = H::new(sp, f);
    let a = start(&h.st, &h.fleet, &h.cat, h.now).expect("start");
    let b = start(&h.st, &h.fleet, &h.cat, h.now).expect("start");
    assert_eq!(a, b);
}

// ----- preview -----------------------------------------------------------------------------------------------------

#[test]
fn sec8_preview_predicts_order_and_start_times() {
    let mut s1 = stage("s1", vec![group("g1", &["a", "b"])]);
    s1.after_stage_wait_seconds = Some(1800);
    let sp = node_image_run(vec![s1, stage("s2", vec![group("g1", &["soon"])])]);
    let mut f = windowed_fleet();
    f.insert("a", member_view("eastus"));
    f.insert("b", member_view("eastus"));
    let st = RunState::new(&sp, &f.members.keys().cloned().collect::<Vec<_>>()).expect("valid");
    let got = preview(&st, &f, &catalog(), t(T0), TimeDelta::minutes(30));
    let want = vec![
        PredictedStart { member: "a".into(), at: t("2024-01-01T12:00:00Z") },
        PredictedStart { member: "b".into(), at: t("2024-01-01T12:30:00Z") },
        // s1 ends 13:00, wait until 13:30, "soon"'s window opens at 14:00.
        PredictedStart { member: "soon".into(), at: t("2024-01-01T14:00:00Z") },
    ];
    assert_eq!(got, want);
}

// ----- validation --------------------------------------------------------------------------------------------------

fn known(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn errors_of(sp: &UpdateRunSpec) -> Vec<String> {
    validate_run_spec(sp, &known(&["a", "b", "c"])).err().unwrap_or_default().iter().map(|e| e.to_string()).collect()
}

fn assert_error(sp: &UpdateRunSpec, want: &str) {
    let errs = errors_of(sp);
    assert!(errs.iter().any(|e| e.contains(want)), "want {want:?} in {errs:#?}");
}

#[test]
fn sec7_valid_spec_passes() {
    let sp = node_image_run(vec![
        stage("s1", vec![group("g1", &["a"]), group("g2", &["b"])]),
        stage("s2", vec![group("g1", &["c"])]),
    ]);
    assert_eq!(validate_run_spec(&sp, &known(&["a", "b", "c"])), Ok(()));
}

#[test]
fn sec7_duplicate_stage_and_group_names() {
    let sp = node_image_run(vec![
        stage("prod", vec![group("g1", &["a"])]),
        stage("prod", vec![group("g1", &["b"]), group("g1", &["c"])]),
    ]);
    assert_error(&sp, "strategy.stages[1].name: duplicate stage name \"prod\"");
    assert_error(&sp, "stage names must be unique");
    assert_error(&sp, "strategy.stages[1].groups[1].name: duplicate group name \"g1\" in stage \"prod\"");
}

#[test]
fn sec7_member_in_two_groups_names_both() {
    let sp = node_image_run(vec![stage("s1", vec![group("g1", &["a"]), group("g2", &["a"])])]);
    assert_error(
        &sp,
        "strategy.stages[0].groups[1].members[0]: member \"a\" is in both group \"g1\" of stage \"s1\" and group \"g2\" of stage \"s1\"",
    );
}

#[test]
fn sec7_unknown_member_negative_wait_empty_levels() {
    let mut s1 = stage("s1", vec![group("g1", &["zz"]), group("g2", &[])]);
    s1.after_stage_wait_seconds = Some(-5);
    let sp = node_image_run(vec![s1, stage("s2", vec![])]);
    assert_error(&sp, "strategy.stages[0].groups[0].members[0]: unknown member \"zz\"");
    assert_error(&sp, "strategy.stages[0].after_stage_wait_seconds: -5 is negative");
    assert_error(&sp, "strategy.stages[0].groups[1].members: no members");
    assert_error(&sp, "strategy.stages[1].groups: no groups");
    let mut empty = node_image_run(vec![]);
    empty.strategy = Some(StrategySpec { stages: vec![] });
    assert_error(&empty, "strategy.stages: no stages");
}

#[test]
fn sec7_waits_counts_and_sizes_have_upper_bounds() {
    let mut s1 = stage("s1", vec![group("g1", &["a"])]);
    s1.after_stage_wait_seconds = Some(i64::MAX);
    s1.max_concurrency = Some(Limit::Count(u32::MAX));
    let sp = node_image_run(vec![s1]);
    assert_error(
        &sp,
        "strategy.stages[0].after_stage_wait_seconds: 9223372036854775807 is more than 2592000 (30 days)",
    );
    assert_error(&sp, "strategy.stages[0].max_concurrency: 4294967295 is more than 100000");
    let mut ok = stage("s1", vec![group("g1", &["a"])]);
    ok.after_stage_wait_seconds = Some(MAX_WAIT_SECONDS);
    assert_eq!(validate_run_spec(&node_image_run(vec![ok]), &known(&["a"])), Ok(()));
    let many: Vec<StageSpec> = (0..=MAX_STAGES).map(|i| stage(&format!("s{i}"), vec![group("g", &["a"])])).collect();
    assert_error(&node_image_run(many), "strategy.stages: 1001 stages is more than 1000");
}

#[test]
fn sec7_unknown_keys_are_refused_naming_them() {
    let misspelt = r#"{"stages":[{"name":"s1","after_stage_wait_secs":600,"groups":[{"name":"g","members":["a"]}]}]}"#;
    let e = serde_json::from_str::<StrategySpec>(misspelt).expect_err("unknown key").to_string();
    assert!(e.contains("unknown field `after_stage_wait_secs`") && e.contains("after_stage_wait_seconds"), "{e}");
    let in_group = r#"{"stages":[{"name":"s1","groups":[{"name":"g","members":["a"],"max_concurency":2}]}]}"#;
    let e = serde_json::from_str::<StrategySpec>(in_group).expect_err("unknown key").to_string();
    assert!(e.contains("unknown field `max_concurency`"), "{e}");
    let e = serde_json::from_str::<StrategySpec>(r#"{"stages":[],"stagse":[]}"#).expect_err("unknown").to_string();
    assert!(e.contains("unknown field `stagse`"), "{e}");
    let run = r#"{"name":"r","upgrade_type":"NodeImageOnly","node_image_selection":{"mode":"Latest","pins":[]}}"#;
    let e = serde_json::from_str::<UpdateRunSpec>(run).expect_err("unknown").to_string();
    assert!(e.contains("unknown field `pins`"), "{e}");
    let pin = r#"{"mode":"Custom","pins":[{"family":"f","version":"202401.01.0","vesion":"x"}]}"#;
    let e = serde_json::from_str::<NodeImageSelection>(pin).expect_err("unknown").to_string();
    assert!(e.contains("unknown field `vesion`"), "{e}");
    // What the hub stores reads back.
    let mut s1 = stage("s1", vec![group("g1", &["a"])]);
    s1.after_stage_wait_seconds = Some(600);
    let sp = node_image_run(vec![s1]);
    let json = serde_json::to_string(&sp).expect("serializes");
    assert_eq!(serde_json::from_str::<UpdateRunSpec>(&json).expect("reads back"), sp);
}

#[test]
fn sec7_kubernetes_version_required_or_refused_by_upgrade_type() {
    let mut sp = spec(UpgradeType::Full, vec![]);
    sp.kubernetes_version = None;
    assert_error(&sp, "kubernetes_version: required for upgrade_type Full");
    let mut sp = node_image_run(vec![]);
    sp.kubernetes_version = Some(kv("1.30.0"));
    assert_error(&sp, "kubernetes_version: 1.30.0 given but upgrade_type NodeImageOnly");
}

#[test]
fn sec7_custom_pins_one_per_family_and_well_formed() {
    let mut sp = node_image_run(vec![]);
    sp.node_image_selection = NodeImageSelection::Custom {
        pins: vec![
            ImagePin { family: FAM.into(), version: iv("202401.01.0") },
            ImagePin { family: FAM.into(), version: iv("202402.01.0") },
            ImagePin { family: "bad family".into(), version: iv("202402.01.0") },
        ],
    };
    assert_error(&sp, "node_image_selection.pins[1].family: family \"Ubuntu-2204gen2\" is already pinned by pins[0]");
    assert_error(&sp, "node_image_selection.pins[2].family: malformed image family");
    let json = r#"{"name":"r","upgrade_type":"NodeImageOnly","node_image_selection":{"mode":"Custom","pins":[{"family":"X","version":"2024.1"}]}}"#;
    let e = serde_json::from_str::<UpdateRunSpec>(json).expect_err("malformed version");
    assert!(e.to_string().contains("expected YYYYMM.DD.N"), "{e}");
}

#[test]
fn sec7_limits_zero_or_over_100_percent_refused() {
    let mut g = group("g1", &["a"]);
    g.max_concurrency = Some(Limit::Percent(0));
    let mut s = stage("s1", vec![g]);
    s.max_concurrency = Some(Limit::Percent(150));
    let mut g2 = group("g2", &["b"]);
    g2.max_concurrency = Some(Limit::Count(0));
    s.groups.push(g2);
    let sp = node_image_run(vec![s]);
    assert_error(&sp, "strategy.stages[0].groups[0].max_concurrency: 0%");
    assert_error(&sp, "strategy.stages[0].max_concurrency: 150% is more than 100%");
    assert_error(&sp, "strategy.stages[0].groups[1].max_concurrency: a count of 0");
}

#[test]
fn sec5_strategy_and_inline_stages_never_both() {
    let inline = StrategySpec { stages: vec![stage("s1", vec![group("g1", &["a"])])] };
    let e = order_source(Some("canary-first"), Some(inline.clone())).expect_err("both");
    assert!(e.to_string().starts_with("strategy: both strategy \"canary-first\" and inline stages"), "{e}");
    assert_eq!(order_source(None, Some(inline.clone())), Ok(OrderSource::Inline(inline)));
    assert_eq!(order_source(Some("x"), None), Ok(OrderSource::Named("x".into())));
    assert_eq!(order_source(None, None), Ok(OrderSource::AllMembersOneByOne));
}

#[test]
fn upgrade_types_parse_leniently_and_print_the_spec_spelling() {
    for (s, want) in [
        ("Full", UpgradeType::Full),
        ("control-plane-only", UpgradeType::ControlPlaneOnly),
        ("node_image_only", UpgradeType::NodeImageOnly),
    ] {
        let got: UpgradeType = s.parse().expect(s);
        assert_eq!(got, want);
    }
    assert_eq!(UpgradeType::NodeImageOnly.to_string(), "NodeImageOnly");
    assert!("partial".parse::<UpgradeType>().expect_err("unknown").to_string().contains("expected Full"));
}

#[test]
fn run_new_refuses_invalid_specs() {
    let sp = node_image_run(vec![stage("s1", vec![group("g1", &["zz"])])]);
    let e = RunState::new(&sp, &["a".to_string()]).expect_err("unknown member");
    assert!(e.to_string().contains("unknown member \"zz\""), "{e}");
    assert!(RunState::new(&node_image_run(vec![]), &[]).is_err());
}

#[test]
fn specs_and_states_round_trip_through_json() {
    let yamlish = r#"{
        "name": "patch-tuesday",
        "upgrade_type": "Full",
        "kubernetes_version": "1.30.0",
        "node_image_selection": {"mode": "Consistent"},
        "strategy": {"stages": [
            {"name": "canary", "groups": [{"name": "g1", "members": ["a"], "max_concurrency": "50%"}],
             "after_stage_wait_seconds": 3600, "max_concurrency": 2}
        ]}
    }"#;
    let sp: UpdateRunSpec = serde_json::from_str(yamlish).expect("valid spec");
    assert_eq!(sp.strategy.as_ref().map(|s| s.stages[0].groups[0].max_concurrency), Some(Some(Limit::Percent(50))));
    let back: UpdateRunSpec = serde_json::from_str(&serde_json::to_string(&sp).expect("serializes")).expect("parses");
    assert_eq!(back, sp);
    let mut h = H::new(sp, fleet(&["a"]));
    h.start();
    let json = serde_json::to_string(&h.st).expect("serializes");
    assert!(json.contains("\"status\":\"Running\""), "{json}");
    let st: RunState = serde_json::from_str(&json).expect("parses");
    assert_eq!(st, h.st);
}

// ----- property-style: random operation sequences ------------------------------------------------------------------

use crate::testing::Rng;

#[test]
fn property_random_operations_keep_every_transition_legal() {
    let names = ["m0", "m1", "m2", "m3", "m4", "m5", "m6", "m7"];
    // What the random walks reached, so the test cannot silently stop exercising the interesting paths.
    let mut seen: BTreeMap<(Status, Status), usize> = BTreeMap::new();
    let mut starts = 0;
    for seed in 1..=150u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        // A random fleet: some members already at target, some with windows, one missing from the inventory.
        let mut f = fleet(&names);
        for n in names {
            let m = f.member_mut(n).expect("member");
            match rng.below(5) {
                0 => m.node_os_schedule = Some(monday("14:00")),
                1 => m.node_os_schedule = Some(weekly(DayOfWeek::Tuesday, "00:00")),
                2 => m.node_pools = vec![pool("np1", FAM, "202402.01.0")],
                _ => {}
            }
        }
        // A random strategy over a random permutation of the members.
        let mut order: Vec<&str> = names.to_vec();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let mut stages = Vec::new();
        let mut rest = &order[..];
        let mut si = 0;
        while !rest.is_empty() {
            let take = 1 + rng.below(rest.len().min(4));
            let (chunk, tail) = rest.split_at(take);
            rest = tail;
            let groups: Vec<GroupSpec> = chunk
                .chunks(1 + rng.below(2))
                .enumerate()
                .map(|(gi, ms)| {
                    let mut g = group(&format!("g{gi}"), ms);
                    g.max_concurrency = [None, Some(Limit::Count(2)), Some(Limit::Percent(50))][rng.below(3)];
                    g
                })
                .collect();
            let mut s = stage(&format!("s{si}"), groups);
            s.after_stage_wait_seconds = [None, Some(0), Some(900)][rng.below(3)];
            s.max_concurrency = [None, Some(Limit::Count(1))][rng.below(2)];
            stages.push(s);
            si += 1;
        }
        let mut h = H::new(node_image_run(stages), f);
        if rng.below(4) == 0 {
            h.fleet.members.remove("m3");
        }
        for _ in 0..60 {
            let running = h.st.running_members();
            match rng.below(10) {
                0 => {
                    if let Ok(p) = start(&h.st, &h.fleet, &h.cat, h.now) {
                        h.take(p);
                    }
                }
                1 => {
                    if let Ok(p) = stop(&h.st, h.now) {
                        h.take(p);
                    }
                }
                2 => {
                    let target = match rng.below(4) {
                        0 => SkipTarget::Member { member: names[rng.below(names.len())].into() },
                        1 => {
                            let s = &h.st.stages[rng.below(h.st.stages.len())];
                            SkipTarget::Group {
                                stage: s.name.clone(),
                                group: s.groups[rng.below(s.groups.len())].name.clone(),
                            }
                        }
                        2 => SkipTarget::Stage { stage: h.st.stages[rng.below(h.st.stages.len())].name.clone() },
                        _ => {
                            SkipTarget::AfterStageWait { stage: h.st.stages[rng.below(h.st.stages.len())].name.clone() }
                        }
                    };
                    if let Ok(p) = skip(&h.st, &target, &h.fleet, &h.cat, h.now) {
                        h.take(p);
                    }
                }
                3..=6 if !running.is_empty() => {
                    let m = running[rng.below(running.len())].clone();
                    h.finish(&m, rng.below(6) != 0);
                }
                _ => {
                    h.now += TimeDelta::minutes([5, 30, 120, 600][rng.below(4)]);
                    h.plan();
                }
            }
        }
        // A finished run leaves nothing behind.
        if h.run() == Status::Completed || h.run() == Status::Skipped {
            for m in h.st.members() {
                assert!(
                    m.level.status.is_final(),
                    "seed {seed}: {} is {} in a {} run",
                    m.name,
                    m.level.status,
                    h.run()
                );
            }
        }
        // The whole history of every level is a walk through the table from NotStarted.
        let mut last: BTreeMap<LevelRef, Status> = BTreeMap::new();
        for tr in &h.log {
            let prev = last.get(&tr.level).copied().unwrap_or(Status::NotStarted);
            assert_eq!(prev, tr.from, "seed {seed}: {} history broken", tr.level);
            last.insert(tr.level.clone(), tr.to);
            if tr.level == LevelRef::Run {
                *seen.entry((tr.from, tr.to)).or_default() += 1;
            }
        }
        starts += h.st.members().map(|m| m.attempts).sum::<u32>();
    }
    use Status::*;
    for edge in [
        (Running, Completed),
        (Running, Failed),
        (Running, Stopping),
        (Stopping, Stopped),
        (Failed, Running),
        (Stopped, Running),
        (Pending, Running),
        (Running, Pending),
    ] {
        assert!(seen.contains_key(&edge), "no random run took {edge:?}; seen {seen:?}");
    }
    assert!(starts > 200, "only {starts} member starts");
}

#[test]
fn results_that_arrive_together_are_recorded_as_one_after_the_other_would_be() {
    let names = ["a", "b", "c", "d", "e", "f"];
    let mut g = group("g1", &names);
    g.max_concurrency = Some(Limit::Count(3));
    let mut h = H::new(node_image_run(vec![stage("s1", vec![g])]), fleet(&names));
    assert_eq!(started(&h.start()), vec!["a", "b", "c"]);
    let before = h.st.clone();
    // One after the other.
    h.finish("a", true);
    h.finish("b", true);
    // Together, plus a result for a member not being upgraded, which is refused alone.
    let results = vec![("a".to_string(), Ok(())), ("b".to_string(), Ok(())), ("f".to_string(), Ok(()))];
    let (plan, together, outcomes) = members_finished_and_apply(&before, &results, &h.fleet, &h.cat, h.now);
    assert!(matches!(outcomes.as_slice(), [Ok(()), Ok(()), Err(RunOpError::Refused(_))]), "{outcomes:?}");
    assert_eq!(apply(&before, &plan).expect("the plan applies"), together);
    assert_eq!(together, h.st);
    assert_eq!(started(&plan), vec!["d", "e"]);
}

#[test]
fn a_failure_among_results_that_arrive_together_starts_nothing_more() {
    let names = ["a", "b", "c", "d"];
    let mut g = group("g1", &names);
    g.max_concurrency = Some(Limit::Count(3));
    let mut h = H::new(node_image_run(vec![stage("s1", vec![g])]), fleet(&names));
    h.start();
    let results = vec![("a".to_string(), Ok(())), ("b".to_string(), Err("b: node n1 failed its health check".into()))];
    let (plan, st, outcomes) = members_finished_and_apply(&h.st, &results, &h.fleet, &h.cat, h.now);
    assert!(outcomes.iter().all(Result::is_ok));
    assert!(started(&plan).is_empty(), "the failure is known when the plan is made: nothing further starts");
    assert_eq!(apply(&h.st, &plan).expect("the plan applies"), st);
    let status = |m: &str| st.member(m).expect("member").level.status;
    assert_eq!(
        (status("a"), status("b"), status("c"), status("d")),
        (Status::Completed, Status::Failed, Status::Running, Status::NotStarted)
    );
    assert_eq!(st.run.status, Status::Failed);
}

#[test]
fn a_member_is_found_by_name_in_a_copy_and_after_its_tree_changed_in_place() {
    let sp = node_image_run(vec![
        stage("s1", vec![group("g1", &["a", "b"]), group("g2", &["c"])]),
        stage("s2", vec![group("g3", &["d", "e"])]),
    ]);
    let names: Vec<String> = ["a", "b", "c", "d", "e"].iter().map(|n| n.to_string()).collect();
    let st = RunState::new(&sp, &names).expect("valid");
    let idx = |st: &RunState, m: &str| st.find(&LevelRef::Member { member: m.into() });
    assert_eq!(idx(&st, "e"), Some(state::Idx::Member(1, 0, 1)));
    assert_eq!(idx(&st, "c"), Some(state::Idx::Member(0, 1, 0)));
    assert_eq!(idx(&st, "zz"), None);
    // A copy shares the index built above, and a member changed in the copy is found with its change.
    let mut copy = st.clone();
    Arc::make_mut(&mut copy.stages[1].groups[0].members[1]).attempts = 7;
    assert_eq!(copy.member("e").map(|m| m.attempts), Some(7));
    assert_eq!(st.member("e").map(|m| m.attempts), Some(0));
    // The copy's tree reshaped in place: members swapped and one moved to another group. The stale index
    // never gives a wrong place.
    copy.stages[1].groups[0].members.swap(0, 1);
    let moved = copy.stages[0].groups[0].members.remove(0);
    copy.stages[0].groups[1].members.push(moved);
    for (m, at) in [
        ("a", state::Idx::Member(0, 1, 1)),
        ("b", state::Idx::Member(0, 0, 0)),
        ("d", state::Idx::Member(1, 0, 1)),
        ("e", state::Idx::Member(1, 0, 0)),
    ] {
        assert_eq!(idx(&copy, m), Some(at), "{m}");
        assert_eq!(copy.member(m).map(|r| r.name.as_str()), Some(m));
    }
    assert_eq!(idx(&st, "a"), Some(state::Idx::Member(0, 0, 0)), "the original is unchanged");
}
