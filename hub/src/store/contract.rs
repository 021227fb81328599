//! The store contract: the same checks against every `Store` implementation (SQLite in a temporary file,
//! PostgreSQL in a fresh database on the test cluster: `UPKEEP_TEST_PG`, or one `scripts/pg-cluster` starts).
//! A machine without PostgreSQL fails the PostgreSQL half with a line saying so; it never passes silently.

use super::postgres::{PostgresStore, testing};
use super::runparts::RunWrite;
use super::sqlite::SqliteStore;
use super::*;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Keeps what a store lives on (a temporary directory, a test database) until the test ends.
enum Home {
    Dir(#[allow(dead_code)] tempfile::TempDir),
    Database(Box<super::postgres::PostgresSettings>),
}

impl Drop for Home {
    fn drop(&mut self) {
        if let Home::Database(s) = self {
            let _ = testing::drop_database(s);
        }
    }
}

fn sqlite() -> (Arc<dyn Store>, Home) {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = SqliteStore::open(&dir.path().join("hub.db")).expect("open sqlite");
    (Arc::new(s), Home::Dir(dir))
}

fn postgres() -> (Arc<dyn Store>, Home) {
    let (_, settings) = testing::fresh_database().unwrap_or_else(|e| panic!("PostgreSQL store tests: {e}"));
    let s = PostgresStore::open(&settings).expect("open postgres");
    (Arc::new(s), Home::Database(Box::new(settings)))
}

/// Every check, once per store.
macro_rules! contract {
    ($($check:ident),* $(,)?) => {
        mod sqlite {
            $(#[test] fn $check() { let (s, _home) = super::sqlite(); super::$check(s); })*
        }
        mod postgres {
            $(#[test] fn $check() { let (s, _home) = super::postgres(); super::$check(s); })*
        }
    };
}

contract!(
    reports_build_the_inventory_and_members,
    a_batch_of_reports_is_written_as_each_alone,
    member_settings_default_and_update,
    commit_run_is_a_compare_and_swap,
    events_come_in_sequence_order,
    concurrent_appends_are_never_seen_out_of_order,
    leases_are_put_released_extended_and_expired,
    jobs_are_upserted_and_listed_by_status,
    a_published_image_never_changes_its_artifact,
    catalog_strategies_rollouts_and_switches,
    certificates_are_revoked_once_and_noted_per_node,
    a_join_token_use_is_taken_once,
    the_epoch_only_moves_forward,
    the_outbox_keeps_matching_events_delivers_oldest_per_subject_first_and_prunes_what_was_delivered,
);

fn facts(member: &str, pool: &str, region: &str) -> NodeFacts {
    NodeFacts {
        member: member.into(),
        node_pool: pool.into(),
        region: region.into(),
        node_image_version: "Ubuntu-2204-202311.07.0".into(),
        ..Default::default()
    }
}

fn reports_build_the_inventory_and_members(s: Arc<dyn Store>) {
    let m = s.record_report("n2", &facts("m1", "p1", "eu"), 1000).expect("record");
    assert_eq!((m.name.as_str(), m.generation, m.node_count), ("m1", 1, 1));
    assert_eq!(m.node_os_channel, NodeOsChannel::NodeImage);
    s.record_report("n1", &facts("m1", "p2", "us"), 1500).expect("record");
    s.record_report("a0", &facts("m0", "p1", "eu"), 1600).expect("record");
    let all: Vec<String> = s.list_nodes(None).expect("list").into_iter().map(|n| n.name).collect();
    assert_eq!(all, vec!["a0", "n1", "n2"], "by member, then name");
    let m1: Vec<String> = s.list_nodes(Some("m1")).expect("list").into_iter().map(|n| n.name).collect();
    assert_eq!(m1, vec!["n1", "n2"]);
    s.touch_nodes(&[("n1".into(), 5000), ("n2".into(), 100), ("n1".into(), 4000)]).expect("touch");
    let n1 = s.get_node("n1").expect("get").expect("exists");
    assert_eq!((n1.first_seen_ms, n1.last_seen_ms, n1.last_report_ms), (1500, 5000, 1500));
    assert_eq!(n1.facts, facts("m1", "p2", "us"));
    assert_eq!(s.get_node("n2").expect("get").expect("exists").last_seen_ms, 1000, "never backwards");
    // A report moves last-seen forward only, and replaces the facts.
    s.record_report("n1", &facts("m1", "p3", "us"), 3000).expect("again");
    let n1 = s.get_node("n1").expect("get").expect("exists");
    assert_eq!((n1.last_seen_ms, n1.last_report_ms, n1.facts.node_pool.as_str()), (5000, 3000, "p3"));
    assert_eq!(s.get_node("nope").expect("get"), None);
    let m = s.set_node_os_channel("m1", NodeOsChannel::SecurityPatch).expect("set");
    assert_eq!((m.generation, m.node_os_channel), (2, NodeOsChannel::SecurityPatch));
    let m = s.set_auto_upgrade_channel("m1", AutoUpgradeChannel::default()).expect("set");
    assert_eq!(m.generation, 3);
    assert_eq!(m.regions, vec!["eu".to_string(), "us".to_string()]);
    assert_eq!(m.node_pools, vec!["p1".to_string(), "p3".to_string()]);
    assert!(matches!(s.set_node_os_channel("nope", NodeOsChannel::None), Err(StoreError::NotFound { .. })));
    let members: Vec<String> = s.list_members().expect("members").into_iter().map(|m| m.name).collect();
    assert_eq!(members, vec!["m0", "m1"]);
    assert_eq!(s.get_member("m1").expect("get").expect("exists").node_count, 2);
    assert!(s.forget_node("n1").expect("forget"));
    assert!(!s.forget_node("n1").expect("forget again"));
    assert_eq!(s.get_member("m1").expect("get").expect("exists").node_count, 1);
    assert_eq!(s.get_member("zz").expect("get"), None);
}

fn a_batch_of_reports_is_written_as_each_alone(s: Arc<dyn Store>) {
    let w = |node: &str, f: NodeFacts, now_ms: i64| ReportWrite { node: node.into(), facts: f, now_ms };
    s.record_report("n1", &facts("m1", "p1", "eu"), 1000).expect("record");
    s.set_node_os_channel("m1", NodeOsChannel::SecurityPatch).expect("channel");
    // A new member, a new node of a known member, the same node twice (the later wins), a known node moving.
    let batch = [
        w("n2", facts("m1", "p2", "us"), 2000),
        w("a0", facts("m0", "p1", "eu"), 2000),
        w("n3", facts("m1", "p1", "eu"), 2000),
        w("n3", facts("m1", "p3", "eu"), 2100),
        w("n1", facts("m0", "p1", "eu"), 2200),
    ];
    let answers: Vec<MemberRecord> =
        s.record_reports(&batch).into_iter().map(|r| r.expect("each report written")).collect();
    let seen: Vec<(&str, u32, NodeOsChannel)> =
        answers.iter().map(|m| (m.name.as_str(), m.node_count, m.node_os_channel)).collect();
    assert_eq!(
        seen,
        vec![
            ("m1", 2, NodeOsChannel::SecurityPatch),
            ("m0", 1, NodeOsChannel::NodeImage),
            ("m1", 3, NodeOsChannel::SecurityPatch),
            ("m1", 3, NodeOsChannel::SecurityPatch),
            ("m0", 2, NodeOsChannel::NodeImage),
        ],
        "each answer is its member as of that report, in the batch's order"
    );
    let n3 = s.get_node("n3").expect("get").expect("n3");
    assert_eq!((n3.facts.node_pool.as_str(), n3.first_seen_ms, n3.last_report_ms), ("p3", 2000, 2100));
    let n1 = s.get_node("n1").expect("get").expect("n1");
    assert_eq!((n1.facts.member.as_str(), n1.first_seen_ms, n1.last_report_ms), ("m0", 1000, 2200));
    let names: Vec<String> = s.list_nodes(None).expect("list").into_iter().map(|n| n.name).collect();
    assert_eq!(names, vec!["a0", "n1", "n2", "n3"], "by member, then name");
    assert!(s.record_reports(&[]).is_empty());
}

fn member_settings_default_and_update(s: Arc<dyn Store>) {
    assert!(matches!(s.member_settings("m1"), Err(StoreError::NotFound { kind: "member", .. })));
    assert!(matches!(s.set_member_disruption("m1", "2"), Err(StoreError::NotFound { .. })), "no member, no row");
    s.record_report("n1", &facts("m1", "p", "eu"), 1).expect("record");
    s.record_report("n2", &facts("m2", "p", "eu"), 1).expect("record");
    assert_eq!(s.member_settings("m1").expect("defaults"), MemberSettings::defaults("m1"));
    assert!(s.all_member_settings().expect("all").is_empty());
    let w = r#"{"weekly":{"day":"Sat","start":"01:00","hours":4}}"#;
    let got = s.set_member_window("m1", WindowKind::NodeOs, Some(w)).expect("window");
    assert_eq!((got.node_os_schedule.as_deref(), got.max_unavailable.as_str()), (Some(w), "1"));
    let got = s.set_member_disruption("m1", "25%").expect("disruption");
    assert_eq!((got.node_os_schedule.as_deref(), got.max_unavailable.as_str()), (Some(w), "25%"));
    let got = s.set_member_drain("m1", r#"{"timeout_seconds":60}"#).expect("drain");
    assert_eq!(got.drain_policy.as_deref(), Some(r#"{"timeout_seconds":60}"#));
    s.set_member_window("m2", WindowKind::Cluster, Some(w)).expect("window");
    let got = s.set_member_window("m1", WindowKind::NodeOs, None).expect("clear");
    assert_eq!(got.node_os_schedule, None);
    let mut all = s.all_member_settings().expect("all");
    all.sort_by(|a, b| a.member.cmp(&b.member));
    assert_eq!(all.len(), 2);
    assert_eq!(all[0], s.member_settings("m1").expect("m1"));
    assert_eq!(all[1].cluster_schedule.as_deref(), Some(w));
}

fn event(n: i64, run_status: &str) -> NewEvent {
    NewEvent {
        at_ms: n,
        kind: "member".into(),
        level: format!("m{n}"),
        from: "Pending".into(),
        to: "Running".into(),
        message: format!("event {n}"),
        error: String::new(),
        run_status: run_status.into(),
    }
}

fn run_record(name: &str, created_ms: i64) -> RunRecord {
    RunRecord {
        name: name.into(),
        parts: vec![("frame".into(), "{\"f\":1}".into()), ("run".into(), "{\"r\":1}".into())],
        version: 1,
        status: "NotStarted".into(),
        strategy_name: Some("s".into()),
        created_ms,
    }
}

fn sorted(mut parts: Vec<(String, String)>) -> Vec<(String, String)> {
    parts.sort();
    parts
}

fn commit_run_is_a_compare_and_swap(s: Arc<dyn Store>) {
    s.create_run(&run_record("b", 20)).expect("create b");
    s.create_run(&run_record("a", 30)).expect("create a");
    let err = s.create_run(&run_record("b", 40)).expect_err("a name is taken once");
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    assert_eq!(s.get_run("b").expect("get").expect("run").created_ms, 20, "the refused create changed nothing");
    let update = RunWrite::Update(vec![("member/x".into(), "{\"x\":1}".into()), ("run".into(), "{\"r\":2}".into())]);
    let evs = s.commit_run("b", 1, "Running", &update, &[event(1, "Running")]).expect("commit");
    assert_eq!(evs.len(), 1);
    let b = s.get_run("b").expect("get").expect("run");
    assert_eq!((b.version, b.status.as_str()), (2, "Running"));
    assert_eq!(
        sorted(b.parts.clone()),
        vec![
            ("frame".to_string(), "{\"f\":1}".to_string()),
            ("member/x".to_string(), "{\"x\":1}".to_string()),
            ("run".to_string(), "{\"r\":2}".to_string()),
        ]
    );
    // A commit planned on version 1 is refused and changes nothing: no part, no status, no event.
    let stale = RunWrite::Update(vec![("run".into(), "{\"r\":9}".into())]);
    let err = s.commit_run("b", 1, "Failed", &stale, &[event(2, "Failed")]).expect_err("stale");
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    assert_eq!(s.get_run("b").expect("get").expect("run"), b);
    assert_eq!(s.events_since("b", 0).expect("events").len(), 1);
    assert!(matches!(s.commit_run("zz", 1, "Running", &stale, &[]), Err(StoreError::Conflict(_))));
    // A replace removes the parts it does not name.
    let replace = RunWrite::Replace(vec![("frame".into(), "{\"f\":2}".into())]);
    s.commit_run("b", 2, "Succeeded", &replace, &[]).expect("replace");
    let b = s.get_run("b").expect("get").expect("run");
    assert_eq!((b.version, b.parts.clone()), (3, vec![("frame".to_string(), "{\"f\":2}".to_string())]));
    assert_eq!(s.run_version("b").expect("version"), Some(3));
    assert_eq!(s.run_version("zz").expect("version"), None);
    assert_eq!(
        s.run_versions().expect("versions"),
        vec![("b".to_string(), 3, "Succeeded".to_string()), ("a".to_string(), 1, "NotStarted".to_string())],
        "oldest first"
    );
    assert_eq!(s.list_runs().expect("runs").iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), vec!["b", "a"]);
    assert!(s.delete_run("b").expect("delete"));
    assert!(!s.delete_run("b").expect("delete again"));
    assert_eq!(s.get_run("b").expect("get"), None);
    assert!(s.events_since("b", 0).expect("events").is_empty(), "its events went with it");
    // The name is free again, with no parts left over.
    s.create_run(&run_record("b", 50)).expect("create again");
    assert_eq!(sorted(s.get_run("b").expect("get").expect("run").parts), sorted(run_record("b", 50).parts));
}

fn events_come_in_sequence_order(s: Arc<dyn Store>) {
    s.create_run(&run_record("r1", 1)).expect("create");
    s.create_run(&run_record("r2", 2)).expect("create");
    let a = s.append_events("r1", &[event(1, "Running"), event(2, "Running")]).expect("append");
    let b = s.append_events("r2", &[event(3, "Running")]).expect("append");
    let c = s.commit_run("r1", 1, "Running", &RunWrite::Update(vec![]), &[event(4, "Running")]).expect("commit");
    let seqs: Vec<u64> = a.iter().chain(&b).chain(&c).map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "increasing across the hub: {seqs:?}");
    let r1 = s.events_since("r1", 0).expect("events");
    assert_eq!(r1.iter().map(|e| e.event.at_ms).collect::<Vec<_>>(), vec![1, 2, 4]);
    assert_eq!(r1, a.iter().chain(&c).cloned().collect::<Vec<_>>(), "what was returned is what is stored");
    let after = s.events_since("r1", a[1].seq).expect("events");
    assert_eq!(after.iter().map(|e| e.event.at_ms).collect::<Vec<_>>(), vec![4]);
    assert!(s.events_since("r1", c[0].seq).expect("events").is_empty());
    assert!(s.append_events("r1", &[]).expect("nothing").is_empty());
}

/// Writers append to one run from several threads while a reader follows with `events_since(last seen)`: the
/// reader must end up with every event, which it does only if no sequence number becomes visible after a larger
/// one of the same run.
fn concurrent_appends_are_never_seen_out_of_order(s: Arc<dyn Store>) {
    s.create_run(&run_record("r", 1)).expect("create");
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let s = s.clone();
            std::thread::spawn(move || {
                for i in 0..40 {
                    s.append_events("r", &[event(w * 1000 + i, "Running")]).expect("append");
                }
            })
        })
        .collect();
    let mut seen = Vec::new();
    let mut last = 0;
    loop {
        let done = writers.iter().all(|w| w.is_finished());
        for e in s.events_since("r", last).expect("follow") {
            last = e.seq;
            seen.push(e.seq);
        }
        if done {
            break;
        }
    }
    for w in writers {
        w.join().expect("writer");
    }
    for e in s.events_since("r", last).expect("follow") {
        seen.push(e.seq);
    }
    let all: Vec<u64> = s.events_since("r", 0).expect("all").into_iter().map(|e| e.seq).collect();
    assert_eq!(all.len(), 160);
    assert_eq!(seen, all, "the follower missed events");
}

fn lease(node: &str, id: &str, member: &str, granted: i64, expires: i64) -> LeaseRecord {
    LeaseRecord {
        node: node.into(),
        lease_id: id.into(),
        member: member.into(),
        holder: "node".into(),
        purpose: "reboot".into(),
        granted_ms: granted,
        expires_ms: expires,
        forced: id.ends_with('f'),
    }
}

fn leases_are_put_released_extended_and_expired(s: Arc<dyn Store>) {
    s.put_lease(&lease("n2", "l1", "m1", 10, 100)).expect("put");
    s.put_lease(&lease("n1", "l2f", "m1", 20, 200)).expect("put");
    s.put_lease(&lease("n1", "l3", "m1", 15, 300)).expect("put");
    s.put_lease(&lease("n0", "l4", "m2", 5, 400)).expect("put");
    let order: Vec<(String, String)> =
        s.list_leases().expect("list").into_iter().map(|l| (l.node, l.lease_id)).collect();
    let pair = |n: &str, l: &str| (n.to_string(), l.to_string());
    assert_eq!(order, vec![pair("n1", "l3"), pair("n1", "l2f"), pair("n2", "l1"), pair("n0", "l4")]);
    assert!(s.list_leases().expect("list").iter().any(|l| l.forced), "forced kept");
    // One member's or one node's leases: the same rows, in the same order, as the whole list filtered.
    let ids = |ls: Vec<LeaseRecord>| ls.into_iter().map(|l| l.lease_id).collect::<Vec<_>>();
    for of in [
        LeasesOf::Member("m1"),
        LeasesOf::Member("m2"),
        LeasesOf::Member("m3"),
        LeasesOf::Node("n1"),
        LeasesOf::Node("n0"),
        LeasesOf::Node("n9"),
    ] {
        let all: Vec<LeaseRecord> = s.list_leases().expect("list").into_iter().filter(|l| of.holds(l)).collect();
        assert_eq!(ids(s.leases_of(of).expect("leases of")), ids(all), "{of:?}");
    }
    assert_eq!(ids(s.leases_of(LeasesOf::Member("m1")).expect("m1")), vec!["l3", "l2f", "l1"]);
    assert_eq!(ids(s.leases_of(LeasesOf::Node("n1")).expect("n1")), vec!["l3", "l2f"]);
    // Put again: only the expiry moves.
    let mut again = lease("n2", "l1", "m9", 99, 150);
    again.holder = "operator".into();
    s.put_lease(&again).expect("put again");
    let l1 = s.list_leases().expect("list").into_iter().find(|l| l.lease_id == "l1").expect("l1");
    assert_eq!((l1.member.as_str(), l1.holder.as_str(), l1.granted_ms, l1.expires_ms), ("m1", "node", 10, 150));
    // Extend never shortens.
    s.extend_leases("n1", 250).expect("extend");
    let n1: Vec<i64> =
        s.list_leases().expect("list").into_iter().filter(|l| l.node == "n1").map(|l| l.expires_ms).collect();
    assert_eq!(n1, vec![300, 250]);
    // Release by id, and all but some.
    let released = s.release_leases("n1", &["l3".into(), "nope".into()], false).expect("release");
    assert_eq!(released.iter().map(|l| l.lease_id.as_str()).collect::<Vec<_>>(), vec!["l3"]);
    assert!(s.release_leases("n1", &["l3".into()], false).expect("again").is_empty(), "released once");
    s.put_lease(&lease("n1", "l5", "m1", 30, 500)).expect("put");
    let released = s.release_leases("n1", &["l5".into()], true).expect("all except");
    assert_eq!(released.iter().map(|l| l.lease_id.as_str()).collect::<Vec<_>>(), vec!["l2f"]);
    // Expiry at or before now.
    let mut expired = s.expire_leases(400).expect("expire");
    expired.sort_by(|a, b| a.lease_id.cmp(&b.lease_id));
    assert_eq!(expired.iter().map(|l| l.lease_id.as_str()).collect::<Vec<_>>(), vec!["l1", "l4"]);
    assert_eq!(s.list_leases().expect("list").into_iter().map(|l| l.lease_id).collect::<Vec<_>>(), vec!["l5"]);
    assert!(s.expire_leases(400).expect("expire again").is_empty());
}

fn job(id: &str, status: &str, ms: i64) -> JobRecord {
    JobRecord {
        id: id.into(),
        member: "m1".into(),
        status: status.into(),
        state: format!("{{\"{id}\":1}}"),
        updated_ms: ms,
    }
}

fn jobs_are_upserted_and_listed_by_status(s: Arc<dyn Store>) {
    s.put_job(&job("w2", "Running", 1)).expect("put");
    s.put_job(&job("w1", "Running", 2)).expect("put");
    s.put_job(&job("w3", "Failed", 3)).expect("put");
    assert_eq!(s.get_job("w1").expect("get"), Some(job("w1", "Running", 2)));
    assert_eq!(s.get_job("zz").expect("get"), None);
    let ids = |v: Vec<JobRecord>| v.into_iter().map(|j| j.id).collect::<Vec<_>>();
    assert_eq!(ids(s.list_jobs(None).expect("all")), vec!["w1", "w2", "w3"]);
    assert_eq!(ids(s.list_jobs(Some("Running")).expect("running")), vec!["w1", "w2"]);
    s.put_job(&job("w1", "Completed", 9)).expect("replace");
    assert_eq!(s.get_job("w1").expect("get"), Some(job("w1", "Completed", 9)));
    assert_eq!(ids(s.list_jobs(Some("Running")).expect("running")), vec!["w2"]);
}

fn image(version: &str, regions: &[(&str, i64)], published: i64) -> ImageRecord {
    ImageRecord {
        family: "Debian-12".into(),
        version: version.into(),
        regions: regions.iter().map(|(r, at)| (r.to_string(), *at)).collect(),
        sha256: "ab".repeat(32),
        signature: "untrusted comment: x\nRWQ=\n".into(),
        url: String::new(),
        size_bytes: 7,
        published_ms: published,
    }
}

fn a_published_image_never_changes_its_artifact(s: Arc<dyn Store>) {
    s.put_image(&image("202312.01.0", &[("eu", 1000), ("us", 1000)], 100)).expect("publish");
    let mut later = image("202312.01.0", &[("us", 2000), ("ap", 2000)], 900);
    later.url = "https://example.invalid/x".into();
    let stored = s.put_image(&later).expect("republish");
    let want: BTreeMap<String, i64> = [("ap", 2000), ("eu", 1000), ("us", 2000)].map(|(r, t)| (r.into(), t)).into();
    assert_eq!(
        (stored.regions.clone(), stored.published_ms, stored.url.as_str()),
        (want.clone(), 100, later.url.as_str())
    );
    let mut other = image("202312.01.0", &[("sa", 3000)], 100);
    other.sha256 = "cd".repeat(32);
    let err = s.put_image(&other).expect_err("other bytes").to_string();
    assert!(err.starts_with("sha256: ") && err.contains("new version"), "{err}");
    let mut other = image("202312.01.0", &[("sa", 3000)], 100);
    other.size_bytes = 8;
    assert!(s.put_image(&other).expect_err("size").to_string().starts_with("size_bytes: "));
    assert_eq!(s.list_images(Some("Debian-12")).expect("list"), vec![stored.clone()], "refusals changed nothing");
    s.put_image(&image("202311.01.0", &[("eu", 1)], 50)).expect("older");
    let versions: Vec<String> = s.list_images(None).expect("list").into_iter().map(|i| i.version).collect();
    assert_eq!(versions, vec!["202311.01.0", "202312.01.0"], "by family, then publication");
    assert!(s.list_images(Some("Ubuntu")).expect("none").is_empty());
    let err = s.withdraw_image_region("Debian-12", "202312.01.0", "sa").expect_err("not there").to_string();
    assert!(err.contains("not published in region \"sa\""), "{err}");
    assert!(matches!(s.withdraw_image_region("Debian-12", "1.0", "eu"), Err(StoreError::NotFound { .. })));
    let left = s.withdraw_image_region("Debian-12", "202311.01.0", "eu").expect_err("last").to_string();
    assert!(left.contains("only region"), "{left}");
    let left = s.withdraw_image_region("Debian-12", "202312.01.0", "eu").expect("withdraw");
    assert_eq!(left.regions.keys().collect::<Vec<_>>(), vec!["ap", "us"]);
}

fn catalog_strategies_rollouts_and_switches(s: Arc<dyn Store>) {
    let r = |v: &[(&str, i64)]| v.iter().map(|(k, t)| (k.to_string(), *t)).collect::<BTreeMap<_, _>>();
    s.put_kubernetes("1.29.1", &r(&[("eu", 1)])).expect("k8s");
    s.put_kubernetes("1.29.1", &r(&[("us", 2), ("eu", 3)])).expect("k8s merge");
    s.put_kubernetes("1.28.0", &r(&[("eu", 1)])).expect("k8s");
    let mut k = s.list_kubernetes().expect("list");
    k.sort();
    assert_eq!(k, vec![("1.28.0".to_string(), r(&[("eu", 1)])), ("1.29.1".to_string(), r(&[("eu", 3), ("us", 2)]))]);

    let patch = SecurityPatchRecord {
        family: "Debian-12".into(),
        version: "202312.02.1".into(),
        packages: vec!["openssl=3.0.11".into()],
        published_ms: 5,
    };
    s.put_security_patch(&patch).expect("patch");
    s.put_security_patch(&patch).expect("the same again is a no-op");
    let mut other = patch.clone();
    other.packages.push("curl=1".into());
    assert!(matches!(s.put_security_patch(&other), Err(StoreError::Conflict(_))));
    assert_eq!(s.list_security_patches(Some("Debian-12")).expect("list"), vec![patch]);
    assert!(s.list_security_patches(Some("Other")).expect("list").is_empty());

    s.put_strategy("b", "{}").expect("put");
    s.put_strategy("a", "{\"x\":1}").expect("put");
    s.put_strategy("b", "{\"y\":2}").expect("replace");
    assert_eq!(s.get_strategy("b").expect("get").as_deref(), Some("{\"y\":2}"));
    assert_eq!(s.get_strategy("c").expect("get"), None);
    assert_eq!(
        s.list_strategies().expect("list"),
        vec![("a".to_string(), "{\"x\":1}".to_string()), ("b".to_string(), "{\"y\":2}".to_string())]
    );
    assert!(s.delete_strategy("a").expect("delete"));
    assert!(!s.delete_strategy("a").expect("delete again"));

    s.put_rollout("m2", "{\"r\":1}").expect("rollout");
    s.put_rollout("m1", "{\"r\":2}").expect("rollout");
    s.put_rollout("m2", "{\"r\":3}").expect("replace");
    assert_eq!(
        s.list_rollouts().expect("list"),
        vec![("m1".to_string(), "{\"r\":2}".to_string()), ("m2".to_string(), "{\"r\":3}".to_string())]
    );
    s.put_channel_switch("m1", 4, 100).expect("switch");
    s.put_channel_switch("m1", 5, 200).expect("switch again");
    s.clear_channel_switch("m1", 4).expect("an older generation clears nothing");
    assert_eq!(s.list_channel_switches().expect("list"), vec![("m1".to_string(), 5, 200)]);
    s.clear_channel_switch("m1", 5).expect("clear");
    assert!(s.list_channel_switches().expect("list").is_empty());
}

fn certificates_are_revoked_once_and_noted_per_node(s: Arc<dyn Store>) {
    let cert = |serial: &str, reason: &str, ms: i64| RevokedCert {
        serial: serial.into(),
        subject: "node n1".into(),
        reason: reason.into(),
        revoked_by: "upkeep://operator/admin".into(),
        revoked_ms: ms,
    };
    s.revoke_certs(&[cert("0b", "lost", 20), cert("0a", "lost", 10)]).expect("revoke");
    s.revoke_certs(&[cert("0a", "again", 30), cert("0c", "new", 5)]).expect("revoke again");
    let got: Vec<(String, String)> =
        s.list_revoked_certs().expect("list").into_iter().map(|c| (c.serial, c.reason)).collect();
    let p = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(got, vec![p("0c", "new"), p("0a", "lost"), p("0b", "lost")], "first record kept; by time");
    s.note_node_cert("n2", "ff", 1).expect("note");
    s.note_node_cert("n1", "ee", 2).expect("note");
    s.note_node_cert("n1", "dd", 3).expect("note");
    s.note_node_cert("n1", "dd", 4).expect("noted twice");
    assert_eq!(s.node_cert_serials("n1").expect("serials"), vec!["dd", "ee"]);
    assert_eq!(s.node_certs().expect("all"), vec![p("n1", "dd"), p("n1", "ee"), p("n2", "ff")]);
    assert_eq!(s.node_of_cert("ff").expect("of").as_deref(), Some("n2"));
    assert_eq!(s.node_of_cert("00").expect("of"), None);
}

fn a_join_token_use_is_taken_once(s: Arc<dyn Store>) {
    let t = JoinTokenRecord {
        id: "abc".into(),
        secret_sha256: "h1".into(),
        member: "m1".into(),
        node_pool: "p".into(),
        expires_ms: 1_000,
        uses_left: 2,
        created_by: "upkeep://operator/admin".into(),
        created_ms: 10,
    };
    s.create_join_token(&t).expect("create");
    assert!(s.create_join_token(&t).is_err(), "an id is used once");
    assert_eq!(s.check_join_token("abc", "h1", 500).expect("check"), Ok(t.clone()));
    assert_eq!(s.check_join_token("abc", "wrong", 500).expect("check"), Err(TokenRefusal::Unknown));
    assert_eq!(s.use_join_token("abc", "h1", "n0", 1_000).expect("use"), Err(TokenRefusal::Expired));
    assert_eq!(s.use_join_token("abc", "h1", "n1", 500).expect("use").expect("ok").uses_left, 1);
    assert_eq!(s.list_join_tokens().expect("list")[0].uses_left, 1);
    // Eight joins race for the last use: exactly one gets it.
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let s = s.clone();
            std::thread::spawn(move || s.use_join_token("abc", "h1", &format!("r{i}"), 500).expect("use"))
        })
        .collect();
    let won = racers.into_iter().map(|r| r.join().expect("racer")).filter(|r| r.is_ok()).count();
    assert_eq!(won, 1, "the last use is taken once");
    assert_eq!(s.use_join_token("abc", "h1", "n3", 500).expect("use"), Err(TokenRefusal::UsedUp));
    let mut t2 = t.clone();
    t2.id = "abd".into();
    t2.created_ms = 5;
    s.create_join_token(&t2).expect("create");
    let ids: Vec<String> = s.list_join_tokens().expect("list").into_iter().map(|t| t.id).collect();
    assert_eq!(ids, vec!["abd", "abc"], "oldest first");
    assert!(s.revoke_join_token("abc").expect("revoke"));
    assert!(!s.revoke_join_token("abc").expect("revoke again"));
    assert_eq!(s.check_join_token("abc", "h1", 500).expect("check"), Err(TokenRefusal::Unknown));
}

fn the_epoch_only_moves_forward(s: Arc<dyn Store>) {
    let a = s.next_epoch().expect("epoch");
    let b = s.next_epoch().expect("epoch");
    let c = s.next_epoch().expect("epoch");
    assert!(a >= 1 && a < b && b < c, "{a} {b} {c}");
    let racers: Vec<_> = (0..4)
        .map(|_| {
            let s = s.clone();
            std::thread::spawn(move || s.next_epoch().expect("epoch"))
        })
        .collect();
    let mut got: Vec<u64> = racers.into_iter().map(|r| r.join().expect("racer")).collect();
    got.sort();
    got.dedup();
    assert_eq!(got.len(), 4, "each start gets its own epoch: {got:?}");
    assert!(got[0] > c);
}

/// PostgreSQL only: a database restart (here: every session of the database ended, which is what a restart does
/// to the hub's connections, without disturbing other tests on the shared cluster) costs at most the call that
/// finds a connection broken; every call after it works.
fn the_outbox_keeps_matching_events_delivers_oldest_per_subject_first_and_prunes_what_was_delivered(s: Arc<dyn Store>) {
    let ev = |t: &str, subject: &str| OutboxEvent {
        event_type: t.into(),
        subject: subject.into(),
        time_ms: 1,
        data: "{}".into(),
    };
    s.enqueue_events(&[ev("upkeep.node.ready", "nodes/a")]).expect("no webhook: nothing kept");
    let hook = |name: &str, events: &[&str]| WebhookRecord {
        name: name.into(),
        url: "http://127.0.0.1:1/".into(),
        events: events.iter().map(|e| e.to_string()).collect(),
        secret: "s".into(),
        created_ms: 1,
    };
    s.create_webhook(&hook("runs", &["run.*"])).expect("create");
    s.create_webhook(&hook("nodes", &["node.*"])).expect("create");
    assert!(matches!(s.create_webhook(&hook("runs", &["*"])), Err(StoreError::Conflict(_))), "name taken");
    s.enqueue_events(&[ev("upkeep.node.ready", "nodes/a"), ev("upkeep.node.unknown", "nodes/a")]).expect("nodes");
    s.enqueue_events(&[ev("upkeep.node.ready", "nodes/b"), ev("upkeep.lease.granted", "nodes/a")]).expect("more");
    // Run events enter the outbox with the run commit.
    s.create_run(&RunRecord {
        name: "r1".into(),
        parts: vec![],
        version: 1,
        status: "NotStarted".into(),
        strategy_name: None,
        created_ms: 1,
    })
    .expect("run");
    let e = NewEvent {
        at_ms: 5,
        kind: "run".into(),
        level: "run".into(),
        from: "NotStarted".into(),
        to: "Running".into(),
        message: String::new(),
        error: String::new(),
        run_status: "Running".into(),
    };
    s.commit_run("r1", 1, "Running", &RunWrite::Update(vec![]), std::slice::from_ref(&e)).expect("commit");
    let runs = s.due_deliveries("runs", 10, 10).expect("due");
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].event.event_type, "upkeep.run.run.running");
    let due = s.due_deliveries("nodes", 10, 10).expect("due");
    let seen: Vec<(&str, &str)> = due.iter().map(|d| (d.event.subject.as_str(), d.event.event_type.as_str())).collect();
    assert_eq!(seen, [("nodes/a", "upkeep.node.ready"), ("nodes/b", "upkeep.node.ready")], "heads per subject");
    // The head of nodes/a fails: its next event waits behind it, and it is not due before its retry time.
    s.record_delivery("nodes", due[0].seq, 10, Some("HTTP 500"), 1_000).expect("failed");
    s.record_delivery("nodes", due[1].seq, 10, None, 0).expect("ok");
    assert!(s.due_deliveries("nodes", 500, 10).expect("due").is_empty(), "nodes/a waits, nodes/b is done");
    let again = s.due_deliveries("nodes", 1_000, 10).expect("due");
    assert_eq!((again.len(), again[0].seq, again[0].attempts), (1, due[0].seq, 1), "the same event, same id");
    s.record_delivery("nodes", again[0].seq, 1_001, None, 0).expect("ok");
    let next = s.due_deliveries("nodes", 1_001, 10).expect("due");
    assert_eq!(next[0].event.event_type, "upkeep.node.unknown", "then the next of the subject");
    let st = s.list_webhooks().expect("list");
    let nodes = st.iter().find(|w| w.hook.name == "nodes").expect("nodes");
    assert_eq!((nodes.pending, nodes.failures, nodes.last_error.as_str()), (1, 1, ""));
    assert_eq!(nodes.hook.events, ["node.*"]);
    // Pruning drops delivered rows before the cut, and outbox rows nobody is owed any more.
    assert_eq!(s.prune_outbox(2_000).expect("prune"), 2, "the two node.ready events");
    assert!(s.delete_webhook("runs").expect("delete"));
    assert_eq!(s.prune_outbox(2_000).expect("prune"), 1, "the run event, owed to nobody now");
    assert_eq!(s.due_deliveries("nodes", 2_000, 10).expect("due").len(), 1, "the pending one stays");
    // A notice goes out once per key, across calls; none is recorded while no webhook wants it.
    let notice = ev("upkeep.maintenance.upcoming", "nodes/a");
    assert!(!s.enqueue_once("upcoming/a", 3_000, std::slice::from_ref(&notice)).expect("nobody wants it"));
    s.create_webhook(&hook("notices", &["maintenance.*"])).expect("create");
    assert!(s.enqueue_once("upcoming/a", 3_000, std::slice::from_ref(&notice)).expect("first"));
    assert!(!s.enqueue_once("upcoming/a", 3_001, std::slice::from_ref(&notice)).expect("again"));
    assert_eq!(s.due_deliveries("notices", 3_001, 10).expect("due").len(), 1, "one notice owed");
    // Pruning forgets keys recorded before the cut: the key may be sent again after that.
    s.prune_outbox(3_500).expect("prune");
    assert!(s.enqueue_once("upcoming/a", 4_000, std::slice::from_ref(&notice)).expect("forgotten"));
    // Every webhook gone: events are owed to nobody; a webhook created again gets the events after it.
    assert!(s.delete_webhook("nodes").expect("delete"));
    assert!(s.delete_webhook("notices").expect("delete"));
    s.enqueue_events(&[ev("upkeep.node.ready", "nodes/c")]).expect("owed to nobody");
    s.create_webhook(&hook("again", &["node.*"])).expect("create");
    assert!(s.due_deliveries("again", 5_000, 10).expect("due").is_empty(), "nothing from before it");
    s.enqueue_events(&[ev("upkeep.node.ready", "nodes/d")]).expect("wanted");
    let due = s.due_deliveries("again", 5_000, 10).expect("due");
    assert_eq!(due.iter().map(|d| d.event.subject.as_str()).collect::<Vec<_>>(), ["nodes/d"]);
}

#[test]
fn postgres_survives_its_sessions_ending() {
    let (s, home) = postgres();
    let Home::Database(settings) = &home else { unreachable!("postgres() gives a database") };
    s.record_report("n1", &facts("m1", "p", "eu"), 1).expect("record");
    // Use several pooled connections so that more than one is open when the sessions end.
    let busy: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            std::thread::spawn(move || s.list_nodes(None).expect("list").len())
        })
        .collect();
    for b in busy {
        assert_eq!(b.join().expect("thread"), 1);
    }
    let ended = testing::terminate_sessions(settings).expect("terminate");
    assert!(ended >= 1, "the store had sessions open");
    let mut failures = Vec::new();
    for i in 0..20 {
        match s.touch_nodes(&[("n1".into(), 100 + i)]) {
            Ok(()) => {}
            Err(e) => {
                assert!(failures.is_empty() && i == 0, "call {i} failed after the first: {e}; before: {failures:?}");
                failures.push(e.to_string());
            }
        }
    }
    assert!(failures.len() <= 1, "{failures:?}");
    assert_eq!(s.get_node("n1").expect("get").expect("node").last_seen_ms, 119);
    // And once more, with the connections busy when their sessions end: calls in flight may fail, the next work.
    let _ = testing::terminate_sessions(settings).expect("terminate");
    let _ = s.list_nodes(None);
    for _ in 0..10 {
        s.list_nodes(None).expect("works after the first call");
    }
}

/// PostgreSQL only: a hub refuses a database behind its schema with a line naming `upkeep-hub migrate`, and
/// migrating twice applies nothing the second time.
#[test]
fn postgres_schema_is_migrated_by_the_migrate_command_only() {
    let (_, settings) = testing::fresh_database().unwrap_or_else(|e| panic!("PostgreSQL store tests: {e}"));
    let home = Home::Database(Box::new(settings.clone()));
    assert!(super::postgres::migrate(&settings).expect("again").is_empty(), "idempotent");
    let mut bare = settings.clone();
    let name = format!("{}_bare", settings.config.get_dbname().expect("dbname"));
    {
        let mut admin = settings.clone();
        admin.config.dbname("postgres");
        // A plain test thread: the synchronous client may run here.
        let mut client = admin.config.connect(::postgres::NoTls).expect("admin connection");
        client.batch_execute(&format!("CREATE DATABASE {name}")).expect("create");
    }
    bare.config.dbname(&name);
    let bare_home = Home::Database(Box::new(bare.clone()));
    let err = PostgresStore::open(&bare).err().expect("refused").to_string();
    assert!(err.contains("upkeep-hub migrate") && err.contains("version 0"), "{err}");
    assert!(!err.contains('\n'), "one line: {err}");
    let applied = super::postgres::migrate(&bare).expect("migrate");
    assert_eq!(applied.len() as u32, super::postgres::SCHEMA_VERSION);
    assert!(super::postgres::migrate(&bare).expect("again").is_empty());
    PostgresStore::open(&bare).expect("opens once migrated");
    drop((home, bare_home));
}

#[test]
fn postgres_relays_notes_in_order_wakes_listeners_and_keeps_session_places() {
    let (s, home) = postgres();
    let Home::Database(settings) = &home else { unreachable!("postgres() gives a database") };
    let head = s.relay_head().expect("head");
    let mut listener = s.relay_listener().expect("listen");
    // Posts from two writers at once: every note is read once, each writer's in its order, none skipped.
    let writers: Vec<_> = (0..2u8)
        .map(|w| {
            let s = s.clone();
            std::thread::spawn(move || {
                for i in 0..50u8 {
                    s.relay_post(&[vec![w, i]], &[]).expect("post");
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
    assert!(listener.wait(Duration::from_secs(5)).expect("wait"), "a post wakes a listener");
    let read = s.relay_since(head, 1000).expect("read");
    assert_eq!(read.len(), 100);
    assert!(read.windows(2).all(|p| p[0].0 < p[1].0), "in sequence order");
    for w in 0..2u8 {
        let mine: Vec<u8> = read.iter().filter(|(_, b)| b[0] == w).map(|(_, b)| b[1]).collect();
        assert_eq!(mine, (0..50).collect::<Vec<u8>>(), "writer {w} in its order");
    }
    assert_eq!(s.relay_since(read[49].0, 10).expect("rest").len(), 10, "reading on from a note");
    assert_eq!(s.relay_head().expect("head"), read[99].0);
    // Wake-ups of posts already read may still arrive (each post wakes); once they are taken, the wait times out
    // until the next post.
    let mut leftovers = 0;
    while listener.wait(Duration::from_millis(200)).expect("wait") {
        leftovers += 1;
        assert!(leftovers <= 100, "at most one wake-up per post");
    }
    s.relay_post(&[vec![5, 5]], &[]).expect("post");
    assert!(listener.wait(Duration::from_secs(5)).expect("wait"), "the next post wakes it");

    // Session places: a newer session elsewhere is not removed by the end of an older one.
    let place = |replica: &str, session| SessionPlace {
        node: "n1".into(),
        replica: replica.into(),
        instance: 7,
        session,
        silent_since_ms: None,
    };
    s.relay_post(&[], &[SessionChange::Here(place("a", 1))]).expect("here");
    s.relay_post(&[], &[SessionChange::Here(place("b", 4))]).expect("moved");
    let gone = SessionChange::Gone { node: "n1".into(), replica: "a".into(), instance: 7, session: 1 };
    s.relay_post(&[], &[gone]).expect("old one ends");
    assert_eq!(s.session_places().expect("places"), vec![place("b", 4)]);
    s.drop_session_places("b").expect("b starts again");
    assert!(s.session_places().expect("places").is_empty());

    // Replicas alive: itself at once; one not heard from within the window is not.
    assert_eq!(s.replica_alive("a", 1, 5_000).expect("alive"), vec![("a".to_string(), 1)]);
    let mut both = s.replica_alive("b", 2, 5_000).expect("alive");
    both.sort();
    assert_eq!(both, vec![("a".to_string(), 1), ("b".to_string(), 2)]);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(s.replica_alive("b", 2, 20).expect("alive"), vec![("b".to_string(), 2)], "a is too old");
    // Pruning by age: nothing is 10 minutes old; everything is older than 0 ms after a moment.
    assert_eq!(s.relay_prune(600_000).expect("prune"), 0);
    assert_eq!(s.relay_prune(0).expect("prune"), 101);
    // A listener whose connection ends says so, and a new one works.
    let _ = testing::terminate_sessions(settings).expect("terminate");
    assert!(listener.wait(Duration::from_millis(500)).is_err(), "a broken listener is an error");
    let mut again = s.relay_listener().expect("listen again");
    // The pooled connection that finds its session ended fails that one call (the relay's writer posts again).
    if s.relay_post(&[vec![9]], &[]).is_err() {
        s.relay_post(&[vec![9]], &[]).expect("post");
    }
    assert!(again.wait(Duration::from_secs(5)).expect("wait"));
}
