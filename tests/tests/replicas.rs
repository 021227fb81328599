//! Several hub replicas on one PostgreSQL database (issue 16 item 2): exactly one leader, elected through the
//! database; a leader killed is replaced and its run carries on; a deposed leader's writes are refused (fencing).
//!
//! These tests always use PostgreSQL (the test cluster: `UPKEEP_TEST_PG`, or one `scripts/pg-cluster` starts),
//! whatever `UPKEEP_TEST_STORE` says: replicas need a database they can share.

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};
use upkeep_hub::store::postgres::{PostgresSettings, PostgresStore, testing};
use upkeep_hub::store::{JobRecord, LeaseRecord, Store, StoreError, fence};
use upkeep_tests::*;

const WAIT: Duration = Duration::from_secs(90);
/// The leader lease of the replicas in these tests (the default).
const LEASE_SECONDS: u64 = 3;
const NO_CHANNELS: &str = "[auto_upgrade]\nenabled = false\n";

/// A database of its own on the test cluster, migrated.
fn database() -> (String, PostgresSettings) {
    testing::fresh_database().unwrap_or_else(|e| panic!("replicas need PostgreSQL: {e}"))
}

fn job(id: &str, status: &str) -> JobRecord {
    JobRecord { id: id.into(), member: "m1".into(), status: status.into(), state: "{}".into(), updated_ms: 1 }
}

/// Polls `f` every 50 ms until it gives Some (within 10 s).
fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_deposed_leaders_writes_are_refused_by_the_database_and_the_new_leaders_go_through() {
    let (_, settings) = database();
    let a = PostgresStore::open(&settings).expect("replica a's store");
    let b = PostgresStore::open(&settings).expect("replica b's store");
    let lease_ms = 400;
    let t1 = a.lead("a", lease_ms, None).expect("lead").expect("the first replica to ask leads");
    assert_eq!(b.lead("b", lease_ms, None).expect("lead"), None, "b waits while a's lease runs");
    assert_eq!(a.lead("a", lease_ms, Some(t1)).expect("renew"), Some(t1), "a renewal keeps the term");
    // a writes as the leader at its term.
    fence::set_for_this_thread(Some(t1));
    a.put_job(&job("j1", "Running")).expect("the leader writes");
    fence::set_for_this_thread(None);
    // a stops renewing; its lease lapses and b takes over at the next term.
    let t2 = poll("b to take the lapsed lease", || b.lead("b", 60_000, None).expect("lead"));
    assert_eq!(t2, t1 + 1, "the term grows with the change of holder");
    assert_eq!(a.lead("a", lease_ms, Some(t1)).expect("lead"), None, "a cannot renew a lease b holds");
    let lease = LeaseRecord {
        node: "n1".into(),
        lease_id: "run/r1/m1".into(),
        member: "m1".into(),
        holder: "run/r1/m1".into(),
        purpose: "test".into(),
        granted_ms: 1,
        expires_ms: i64::MAX / 2,
        forced: false,
    };
    // a, late, still believes it leads at t1: every fenced write is refused and changes nothing.
    fence::set_for_this_thread(Some(t1));
    let _ = fence::take_refused();
    let refused = a.put_job(&job("j1", "Completed")).expect_err("a deposed leader's write");
    assert!(matches!(refused, StoreError::Fenced(_)), "{refused}");
    assert!(refused.to_string().contains("\"b\"") && refused.to_string().contains(&t2.to_string()), "{refused}");
    assert!(fence::take_refused(), "the refusal is noted for the leadership loop");
    assert!(matches!(a.put_lease(&lease), Err(StoreError::Fenced(_))));
    assert!(matches!(a.put_rollout("m1", "{}"), Err(StoreError::Fenced(_))));
    assert!(matches!(a.expire_leases(i64::MAX), Err(StoreError::Fenced(_))));
    assert!(matches!(a.release_leases("n1", &[], true), Err(StoreError::Fenced(_))));
    assert!(matches!(a.check_fence(), Err(StoreError::Fenced(_))), "nor may it send a command");
    fence::set_for_this_thread(None);
    assert_eq!(a.get_job("j1").expect("read").expect("j1").status, "Running", "the refused write changed nothing");
    assert!(a.list_leases().expect("leases").is_empty() && a.list_rollouts().expect("rollouts").is_empty());
    // The new leader's writes go through, recorded with its term.
    fence::set_for_this_thread(Some(t2));
    b.put_job(&job("j1", "Completed")).expect("the leader writes");
    b.put_lease(&lease).expect("the leader grants");
    b.check_fence().expect("the leader may send commands");
    fence::set_for_this_thread(None);
    let terms = b.written_terms().expect("terms");
    assert!(
        terms.iter().any(|(what, key, t)| what == "job" && key.starts_with("j1 Completed") && *t == t2),
        "{terms:?}"
    );
    assert!(terms.iter().all(|(_, _, t)| *t == t2), "nothing carries t1 any more: {terms:?}");
    // Writes without a term (agent and operator sessions on any replica) are not fenced.
    a.release_leases("n1", &[], true).expect("a node gives its leases back through any replica");
    // b resigns (a clean shutdown): a takes over at once, at the next term.
    b.resign("b", t2).expect("resign");
    assert_eq!(a.lead("a", lease_ms, None).expect("lead"), Some(t2 + 1));
    let (holder, term, left) = a.leadership().expect("leadership");
    assert_eq!((holder.as_str(), term), ("a", t2 + 1));
    assert!(left > 0 && left <= lease_ms, "{left}");
}

/// One replica process.
struct Replica {
    name: String,
    hub: HubProcess,
}

/// What the tests here start from: a test CA, a work directory, a fresh database's address and a store on it.
fn setup() -> (TestPki, tempfile::TempDir, String, PostgresStore) {
    let (url, settings) = database();
    let store = PostgresStore::open(&settings).expect("store");
    (TestPki::new(), tempfile::tempdir().expect("tempdir"), url, store)
}

/// Starts the replicas `names` of the database `url`, one after the other (see `replica`).
async fn replicas(pki: &TestPki, work: &Path, url: &str, names: &[&str]) -> Vec<Replica> {
    let mut out = Vec::new();
    for name in names {
        out.push(replica(pki, work, url, name).await);
    }
    out
}

/// Starts replica `name` of the database `url`, its state, log and hub.toml under `work/<name>`, image files in
/// `work/artifacts` (shared).
async fn replica(pki: &TestPki, work: &Path, url: &str, name: &str) -> Replica {
    let dir = work.join(name);
    let config = write_replica_config(pki, &dir, &work.join("artifacts"), url, name, LEASE_SECONDS, NO_CHANNELS);
    let hub = HubProcess::start_config_logged(pki, config, dir.join("hub.log")).await;
    Replica { name: name.to_string(), hub }
}

/// The replica holding an unexpired lease, and its term.
async fn leader(store: &PostgresStore) -> Option<(String, u64)> {
    let (holder, term, left) = store.leadership().ok()?;
    (!holder.is_empty() && left > 0).then_some((holder, term))
}

/// How often replica's log says it became the leader at `term`.
fn elected_in_log(log: &str, term: u64) -> usize {
    log.lines().filter(|l| l.contains("became the leader") && l.contains(&format!("term={term}"))).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_elect_exactly_one_leader_and_another_when_it_is_killed() {
    let (pki, work, url, store) = setup();
    let mut replicas = replicas(&pki, work.path(), &url, &["a", "b", "c"]).await;
    let (first, t1) = wait_for("a leader", WAIT, || leader(&store)).await;
    // Exactly one of the three says it leads at that term; it keeps the lease while it lives (renewals).
    let logs: Vec<String> = replicas.iter().map(|r| r.hub.log_text()).collect();
    let elected: Vec<&str> =
        replicas.iter().zip(&logs).filter(|(_, l)| elected_in_log(l, t1) > 0).map(|(r, _)| r.name.as_str()).collect();
    assert_eq!(elected, [first.as_str()], "one leader at term {t1}");
    wait_for("two lease renewals", WAIT, || async {
        let (holder, term, left) = store.leadership().ok()?;
        (holder == first && term == t1 && left > 0).then_some(())
    })
    .await;

    // SIGKILL the leader: another replica takes over once the lease lapses, at the next term.
    let killed = Instant::now();
    let i = replicas.iter().position(|r| r.name == first).expect("leader is a replica");
    replicas[i].hub.kill().await;
    let (second, t2) =
        wait_for("a new leader", WAIT, || async { leader(&store).await.filter(|(h, _)| *h != first) }).await;
    let elected_after = killed.elapsed();
    assert_eq!(t2, t1 + 1, "the term grows with the change of holder");
    let j = replicas.iter().position(|r| r.name == second).expect("a replica");
    wait_for("the new leader's log", WAIT, || async {
        (elected_in_log(&replicas[j].hub.log_text(), t2) == 1).then_some(())
    })
    .await;
    for r in &replicas {
        if r.name != second {
            assert_eq!(elected_in_log(&r.hub.log_text(), t2), 0, "{} did not also lead at term {t2}", r.name);
        }
    }
    // The lease lapses at most LEASE_SECONDS after the leader's last renewal; the others look twice a second.
    assert!(elected_after < Duration::from_secs(LEASE_SECONDS + 3), "took {elected_after:?}");
    println!("replicas: leader {first:?} killed -> {second:?} elected at term {t2} in {elected_after:?}");
    for mut r in replicas {
        r.hub.kill().await;
    }
}

/// Rewrites a node's agent.toml to list every replica in `hubs` (in order).
fn agent_hubs(config: &Path, first: &str, hubs: &[String]) {
    let text = std::fs::read_to_string(config).expect("agent.toml");
    let list = hubs.iter().map(|h| format!("{h:?}")).collect::<Vec<_>>().join(", ");
    let text = text.replacen(&format!("hub = {first:?}"), &format!("hub = [{list}]"), 1);
    assert!(text.contains(&list), "{text}");
    std::fs::write(config, text).expect("agent.toml");
}

/// Two replicas (a starts first and leads), `names` agents on a (the leader; with `both`, listing b after it), a
/// staged run of one member per node published, created and started through b. Returns the replicas and agents.
async fn run_on_two_replicas(
    pki: &TestPki,
    work: &Path,
    url: &str,
    store: &PostgresStore,
    names: &[&str],
    both: bool,
) -> (Replica, Replica, Vec<TestAgent>) {
    let a = replica(pki, work, url, "a").await;
    wait_for("a leads", WAIT, || async { leader(store).await.filter(|(h, _)| h == "a") }).await;
    let b = replica(pki, work, url, "b").await;
    let hubs = [a.hub.url(), b.hub.url()];
    let mut agents = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let node = make_node(pki, work, &hubs[0], n, &format!("m{}", i + 1), "pool1", "eu", "Debian-12-202311.07.0");
        if both {
            agent_hubs(&node.config, &hubs[0], &hubs);
        }
        agents.push(TestAgent::start(&node));
    }
    let want = names.len();
    wait_for("every node Ready on the leader", WAIT, || async {
        let l = upkeepctl_json(pki, &hubs[0], &["node", "list"]).await.ok()?;
        (l["nodes"].as_array()?.iter().filter(|n| n["status"] == "Ready" && n["connected"] == true).count() == want)
            .then_some(())
    })
    .await;
    // Every operator request goes to b, which does not lead: they reach the leader through the database.
    let roots: Vec<_> = names.iter().map(|n| work.join(n).join("root")).collect();
    publish_trusted_debian(pki, &hubs[1], work, &roots, "202312.01.0").await;
    // Two stages: m1 first, then the others one by one.
    let rest: Vec<String> = (2..=names.len()).map(|i| format!("\"m{i}\"")).collect();
    let order = work.join("order.json");
    std::fs::write(
        &order,
        format!(
            r#"{{"stages":[{{"name":"canary","groups":[{{"name":"first","members":["m1"]}}]}},
                {{"name":"prod","groups":[{{"name":"rest","members":[{}]}}]}}]}}"#,
            rest.join(",")
        ),
    )
    .expect("order.json");
    let order = order.to_string_lossy().into_owned();
    upkeepctl_ok(pki, &hubs[1], &["strategy", "create", "staged", "-f", &order]).await;
    upkeepctl_ok(pki, &hubs[1], &["run", "create", "r1", "--strategy", "staged", "--upgrade-type", "NodeImageOnly"])
        .await;
    upkeepctl_ok(pki, &hubs[1], &["run", "start", "r1"]).await;
    (a, b, agents)
}

/// Waits until r1's m1 runs (read through `hub`) and the leader's node work for it is written at its term (operator
/// requests commit unfenced, on any replica); returns that term.
async fn m1_under_way(pki: &TestPki, hub: &str, store: &PostgresStore) -> u64 {
    wait_for("m1 Running", WAIT, || async {
        (member_status(pki, hub, "m1").await.as_deref() == Some("Running")).then_some(())
    })
    .await;
    let (_, term) = leader(store).await.expect("a leads");
    wait_for("m1's node work written at the leader's term", WAIT, || async {
        store
            .written_terms()
            .ok()?
            .iter()
            .any(|(w, k, t)| w == "job" && k.starts_with("run/r1/m1/") && *t == term)
            .then_some(())
    })
    .await;
    term
}

async fn member_status(pki: &TestPki, hub: &str, member: &str) -> Option<String> {
    let v = upkeepctl_json(pki, hub, &["run", "show", "r1"]).await.ok()?;
    run_member(&v, member)["status"].as_str().map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_completes_when_its_leader_is_killed_and_no_node_is_upgraded_twice() {
    let (pki, work, url, store) = setup();
    let names = ["n1", "n2", "n3"];
    let (mut a, b, agents) = run_on_two_replicas(&pki, work.path(), &url, &store, &names, true).await;
    let b_url = b.hub.url();
    // The run is read through the follower too (one database).
    m1_under_way(&pki, &b_url, &store).await;

    // SIGKILL the leader mid-run. Its agents move to b; b is elected and carries the run on.
    let killed = Instant::now();
    a.hub.kill().await;
    let (_, t2) = wait_for("b leads", WAIT, || async { leader(&store).await.filter(|(h, _)| h == "b") }).await;
    let elected = killed.elapsed();
    // The new leader's first action: its first write (run commit, node work, lease) at its term.
    let first_write = wait_for("b's first write", WAIT, || async {
        store.written_terms().ok()?.iter().any(|(_, _, t)| *t == t2).then(|| killed.elapsed())
    })
    .await;
    println!("replicas: leader killed -> new leader elected {elected:?}, its first write {first_write:?}");
    let run = wait_for("r1 to end", WAIT, || async {
        let v = upkeepctl_json(&pki, &b_url, &["run", "show", "r1"]).await.ok()?;
        matches!(v["status"].as_str()?, "Completed" | "Failed").then_some(v)
    })
    .await;
    assert_eq!(run["status"], "Completed", "{run}");
    for (i, n) in names.iter().enumerate() {
        assert_eq!(run_member(&run, &format!("m{}", i + 1))["status"], "Completed", "{run}");
        assert_eq!(reimages_journalled(&work.path().join(n)), 1, "{n} was reimaged exactly once (its journal)");
    }
    assert_eq!(run["stages"][0]["status"], "Completed", "{run}");
    let list = upkeepctl_json(&pki, &b_url, &["node", "list"]).await.expect("node list");
    for n in list["nodes"].as_array().expect("nodes") {
        assert_eq!(n["node_image_version"], "Debian-12-202312.01.0", "{n}");
    }
    let leases = upkeepctl_json(&pki, &b_url, &["lease", "list"]).await.expect("lease list");
    assert_eq!(leases.as_array().map(Vec::len), Some(0), "no lease leaked: {leases}");
    for g in agents {
        g.stop().await;
    }
    let mut b = b;
    b.hub.kill().await;
}

/// The rows written at `term`.
fn rows_at(store: &PostgresStore, term: u64) -> BTreeSet<(String, String)> {
    store.written_terms().expect("terms").into_iter().filter(|(_, _, t)| *t == term).map(|(w, k, _)| (w, k)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_is_fenced_and_steps_down_without_acting() {
    let (pki, work, url, store) = setup();
    let names = ["n1", "n2"];
    let (mut a, mut b, agents) = run_on_two_replicas(&pki, work.path(), &url, &store, &names, false).await;
    let a_url = a.hub.url();
    let t1 = m1_under_way(&pki, &a_url, &store).await;
    // Pause the leader past its lease: b is elected.
    a.hub.signal(nix::sys::signal::Signal::SIGSTOP);
    let paused = Instant::now();
    let (_, t2) = wait_for("b leads", WAIT, || async { leader(&store).await.filter(|(h, _)| h == "b") }).await;
    assert_eq!(t2, t1 + 1);
    println!("replicas: leader paused -> b elected in {:?}", paused.elapsed());
    // What a wrote at its term, as it stands now (a is frozen: only b can still change it).
    let before = rows_at(&store, t1);
    assert!(!before.is_empty(), "a wrote at its term before the pause");
    let log_before = a.hub.log_text().len();
    a.hub.signal(nix::sys::signal::Signal::SIGCONT);
    let said = wait_for("a says it stepped down", WAIT, || async {
        let log = a.hub.log_text();
        let new = log.get(log_before..)?.to_string();
        new.lines().any(|l| l.contains("stepped down")).then_some(new)
    })
    .await;
    assert!(said.contains(&format!("term={t1}")), "a names the term it gave up: {said}");
    assert!(
        said.contains("could not be renewed in time") || said.contains("a write was refused"),
        "a says why it stepped down: {said}"
    );
    // a acted no further: nothing was written at its term since the pause, and it did not lead again while b's
    // lease runs.
    let after = rows_at(&store, t1);
    assert!(after.is_subset(&before), "a wrote at term {t1} after b took over: {:?}", after.difference(&before));
    let (holder, term, _) = store.leadership().expect("leadership");
    assert_eq!((holder.as_str(), term), ("b", t2), "b still leads");
    let writes_refused = said.lines().filter(|l| l.contains("refused")).count();
    println!("replicas: the resumed leader stepped down; {writes_refused} of its writes were refused");
    for g in agents {
        g.stop().await;
    }
    a.hub.kill().await;
    b.hub.kill().await;
}

/// The replica (of `replicas`) that leads now, by the lease row.
async fn leading(store: &PostgresStore, replicas: &[Replica]) -> Option<(usize, u64)> {
    let (holder, term) = leader(store).await?;
    replicas.iter().position(|r| r.name == holder).map(|i| (i, term))
}

/// The stage whose first member runs or ran: the highest index with a member that started.
fn stage_started(run: &Value) -> Option<usize> {
    run["stages"].as_array()?.iter().rposition(|s| {
        s["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["members"].as_array().into_iter().flatten())
            .any(|m| m["status"] != "NotStarted")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_agents_over_three_replicas_finish_a_staged_run_through_two_leader_kills_each_node_upgraded_once() {
    let (pki, work, url, store) = setup();
    let mut replicas = replicas(&pki, work.path(), &url, &["a", "b", "c"]).await;
    wait_for("a leader", WAIT, || leading(&store, &replicas)).await;
    let urls: Vec<String> = replicas.iter().map(|r| r.hub.url()).collect();
    // 30 nodes, 3 per member, each agent starting at a different replica (all three listed, rotated): every
    // replica holds sessions, and the leader reaches most nodes only through the database.
    let mut agents = Vec::new();
    let mut member_of = std::collections::BTreeMap::new();
    for i in 0..30 {
        let (node, member) = (format!("n{i:02}"), format!("m{}", i / 3 + 1));
        let first = &urls[i % 3];
        let made = make_node(&pki, work.path(), first, &node, &member, "pool1", "eu", "Debian-12-202311.07.0");
        let rotated: Vec<String> = (0..3).map(|k| urls[(i + k) % 3].clone()).collect();
        agent_hubs(&made.config, first, &rotated);
        agents.push(TestAgent::start(&made));
        member_of.insert(node, member);
    }
    wait_for("30 nodes Ready, seen alike on every replica", WAIT, || async {
        for u in &urls {
            let l = upkeepctl_json(&pki, u, &["node", "list"]).await.ok()?;
            let ready = l["nodes"].as_array()?.iter().filter(|n| n["status"] == "Ready" && n["connected"] == true);
            if ready.count() != 30 {
                return None;
            }
        }
        Some(())
    })
    .await;
    // Sessions really are spread: every replica's log registered some agents.
    for r in &replicas {
        assert!(r.hub.log_text().contains("agent registered"), "replica {} holds sessions", r.name);
    }
    let roots: Vec<_> = member_of.keys().map(|n| work.path().join(n).join("root")).collect();
    publish_trusted_debian(&pki, &urls[1], work.path(), &roots, "202312.01.0").await;
    let stages = [(1..=2), (3..=6), (7..=10)];
    let stage_json: Vec<String> = stages
        .iter()
        .enumerate()
        .map(|(i, ms)| {
            let members: Vec<String> = ms.clone().map(|m| format!("\"m{m}\"")).collect();
            format!(r#"{{"name":"s{i}","groups":[{{"name":"g{i}","members":[{}]}}]}}"#, members.join(","))
        })
        .collect();
    let order = work.path().join("order.json");
    std::fs::write(&order, format!(r#"{{"stages":[{}]}}"#, stage_json.join(","))).expect("order.json");
    let order = order.to_string_lossy().into_owned();
    upkeepctl_ok(&pki, &urls[2], &["strategy", "create", "staged", "-f", &order]).await;
    upkeepctl_ok(&pki, &urls[2], &["run", "create", "r1", "--strategy", "staged", "--upgrade-type", "NodeImageOnly"])
        .await;
    upkeepctl_ok(&pki, &urls[2], &["run", "start", "r1"]).await;

    // SIGKILL the leader when stage s1 starts, then (the killed replica back, as a follower) the new leader when
    // s2 starts. Read through a replica that lives.
    let mut terms = Vec::new();
    for stage in [1, 2] {
        let (i, term) = wait_for("a leader", WAIT, || leading(&store, &replicas)).await;
        // A replica started again listens on a new port: read through the replicas as they are now.
        let reader = replicas[(i + 1) % 3].hub.url();
        wait_for(&format!("stage s{stage} started"), WAIT, || async {
            let v = upkeepctl_json(&pki, &reader, &["run", "show", "r1"]).await.ok()?;
            (stage_started(&v)? >= stage).then_some(())
        })
        .await;
        let killed = Instant::now();
        replicas[i].hub.kill().await;
        // The killed replica's agents are back, on the others, within the agents' backoff cap: every node's
        // session, as the replicas announce them, is on a replica that lives.
        let dead = replicas[i].name.clone();
        wait_for("every node's session on a live replica", WAIT, || async {
            let places = store.session_places().ok()?;
            (places.len() == 30 && places.iter().all(|p| p.replica != dead)).then_some(())
        })
        .await;
        let back = killed.elapsed();
        println!("replicas: stage s{stage}: every agent connected again {back:?} after the kill");
        assert!(back <= Duration::from_secs(30), "agents back within the 30 s backoff cap: {back:?}");
        let (j, next) =
            wait_for("a new leader", WAIT, || async { leading(&store, &replicas).await.filter(|(j, _)| *j != i) })
                .await;
        println!(
            "replicas: stage s{stage}: leader {} killed -> {} at term {next} in {:?}",
            replicas[i].name,
            replicas[j].name,
            killed.elapsed()
        );
        terms.push((term, next));
        if stage == 1 {
            let mut back = replica(&pki, work.path(), &url, &replicas[i].name).await;
            std::mem::swap(&mut replicas[i], &mut back);
            drop(back);
        }
    }
    let (live, _) = wait_for("a leader", WAIT, || leading(&store, &replicas)).await;
    let reader = replicas[live].hub.url();
    let run = wait_for("r1 to end", Duration::from_secs(240), || async {
        let v = upkeepctl_json(&pki, &reader, &["run", "show", "r1"]).await.ok()?;
        matches!(v["status"].as_str()?, "Completed" | "Failed" | "Stopped").then_some(v)
    })
    .await;
    assert_eq!(run["status"], "Completed", "{run}");
    // Stage order kept: each stage started after the one before ended.
    let stage_list = run["stages"].as_array().expect("stages");
    for w in stage_list.windows(2) {
        let (ended, started) =
            (w[0]["ended_at"].as_str().expect("ended"), w[1]["started_at"].as_str().expect("started"));
        assert!(ended <= started, "stage order: {ended} then {started}: {run}");
    }
    // Every node upgraded exactly once, by its agent's own evidence: one journalled reimage of this run, and one
    // boot into the other slot, committed.
    for (node, member) in &member_of {
        let ops = reimages_journalled(&work.path().join(node));
        assert_eq!(ops, 1, "{node} reimaged exactly once (its journal)");
        let boot: Value = serde_json::from_slice(
            &std::fs::read(work.path().join(node).join("root/var/lib/upkeep/slots/boot.json")).expect("boot.json"),
        )
        .expect("boot.json");
        assert_eq!(boot["boot_seq"], 1, "{node}: booted once: {boot}");
        assert_eq!((&boot["booted"], &boot["committed"]), (&Value::from("b"), &Value::from("b")), "{node}: {boot}");
        assert_eq!(run_member(&run, member)["status"], "Completed", "{run}");
    }
    let list = upkeepctl_json(&pki, &reader, &["node", "list"]).await.expect("node list");
    for n in list["nodes"].as_array().expect("nodes") {
        assert_eq!(n["node_image_version"], "Debian-12-202312.01.0", "{n}");
    }
    let leases = upkeepctl_json(&pki, &reader, &["lease", "list"]).await.expect("lease list");
    assert_eq!(leases.as_array().map(Vec::len), Some(0), "no lease leaked: {leases}");
    for (before, after) in terms {
        assert!(after > before, "a new term at each kill");
    }
    for g in agents {
        g.stop().await;
    }
    for mut r in replicas {
        r.hub.kill().await;
    }
}

/// A PostgreSQL cluster of the test's own (one it may restart), stopped and removed when dropped.
struct OwnCluster {
    dir: std::path::PathBuf,
    url: String,
}

impl OwnCluster {
    fn start() -> OwnCluster {
        let dir = std::env::temp_dir().join(format!("upkeep-pg-own-{}", std::process::id()));
        let out = std::process::Command::new(system::workspace().join("scripts/pg-cluster"))
            .arg("start")
            .arg(&dir)
            .output()
            .expect("scripts/pg-cluster");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let url = format!("{} dbname=postgres", String::from_utf8_lossy(&out.stdout).trim());
        OwnCluster { dir, url }
    }

    /// `pg_ctl restart -m fast`: every session is ended, the server is down for a moment, then back on the same
    /// port.
    fn restart(&self) {
        let bindir = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL binaries")
            .filter_map(|e| Some(e.ok()?.path().join("bin")))
            .find(|b| b.join("pg_ctl").exists())
            .expect("pg_ctl");
        // The server's output goes to its log: a pipe it inherited would stay open as long as it runs.
        let cmd = format!(
            "{}/pg_ctl -D {dir} -l {dir}/server.log -m fast -w -t 60 restart",
            bindir.display(),
            dir = self.dir.display()
        );
        let mut command = if nix::unistd::Uid::effective().is_root() {
            let mut c = std::process::Command::new("su");
            c.args(["postgres", "-s", "/bin/sh", "-c", &cmd]);
            c
        } else {
            let mut c = std::process::Command::new("sh");
            c.args(["-c", &cmd]);
            c
        };
        let status = command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("pg_ctl restart");
        assert!(status.success(), "pg_ctl restart failed; see {}/server.log", self.dir.display());
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new(system::workspace().join("scripts/pg-cluster"))
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_restarted_mid_run_the_replicas_reconnect_and_the_run_completes_with_nothing_lost() {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let cluster = OwnCluster::start();
    let settings = PostgresSettings::parse(&cluster.url).expect("url");
    upkeep_hub::store::postgres::migrate(&settings).expect("migrate");
    let store = PostgresStore::open(&settings).expect("store");
    let replicas = replicas(&pki, work.path(), &cluster.url, &["a", "b"]).await;
    wait_for("a leader", WAIT, || leading(&store, &replicas)).await;
    let urls: Vec<String> = replicas.iter().map(|r| r.hub.url()).collect();
    let names: Vec<String> = (1..=6).map(|i| format!("n{i}")).collect();
    let mut agents = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let (first, other) = (&urls[i % 2], &urls[(i + 1) % 2]);
        let made =
            make_node(&pki, work.path(), first, n, &format!("m{}", i + 1), "pool1", "eu", "Debian-12-202311.07.0");
        agent_hubs(&made.config, first, &[first.clone(), other.clone()]);
        agents.push(TestAgent::start(&made));
    }
    wait_for("6 nodes Ready", WAIT, || async {
        let l = upkeepctl_json(&pki, &urls[0], &["node", "list"]).await.ok()?;
        (l["nodes"].as_array()?.iter().filter(|n| n["status"] == "Ready").count() == 6).then_some(())
    })
    .await;
    let roots: Vec<_> = names.iter().map(|n| work.path().join(n).join("root")).collect();
    publish_trusted_debian(&pki, &urls[0], work.path(), &roots, "202312.01.0").await;
    let order = work.path().join("order.json");
    std::fs::write(
        &order,
        r#"{"stages":[{"name":"s0","groups":[{"name":"g0","members":["m1","m2"]}]},
            {"name":"s1","groups":[{"name":"g1","members":["m3","m4","m5","m6"]}]}]}"#,
    )
    .expect("order.json");
    let order = order.to_string_lossy().into_owned();
    upkeepctl_ok(&pki, &urls[1], &["strategy", "create", "staged", "-f", &order]).await;
    upkeepctl_ok(&pki, &urls[1], &["run", "create", "r1", "--strategy", "staged", "--upgrade-type", "NodeImageOnly"])
        .await;
    // Watched through the replica that does not lead: the leader's events reach its watchers through the relay.
    let (leader_now, _) = leading(&store, &replicas).await.expect("a leader");
    let follower = urls[1 - leader_now].clone();
    let watch = tokio::process::Command::new(bin("upkeepctl"))
        .args(["run", "watch", "r1", "-o", "json"])
        .env("UPKEEP_HUB", &follower)
        .env("UPKEEP_CA", pki.file(upkeep_hub::pki::files::CA_CERT))
        .env("UPKEEP_CERT", pki.file("operator.pem"))
        .env("UPKEEP_KEY", pki.file("operator.key"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("upkeepctl run watch");
    upkeepctl_ok(&pki, &urls[1], &["run", "start", "r1"]).await;
    wait_for("the run under way", WAIT, || async {
        let v = upkeepctl_json(&pki, &urls[0], &["run", "show", "r1"]).await.ok()?;
        (v["status"] == "Running").then_some(())
    })
    .await;
    let events_before = store.events_since("r1", 0).expect("events");
    cluster.restart();
    let restarted = Instant::now();
    let run = wait_for("r1 to end", Duration::from_secs(120), || async {
        let v = upkeepctl_json(&pki, &urls[0], &["run", "show", "r1"]).await.ok()?;
        matches!(v["status"].as_str()?, "Completed" | "Failed" | "Stopped").then_some(v)
    })
    .await;
    println!("replicas: database restarted -> run ended {:?} later", restarted.elapsed());
    assert_eq!(run["status"], "Completed", "{run}");
    // Nothing lost: every event written before the restart is still there, in place; each node reimaged once.
    let mut events_after = Err(String::new());
    for _ in 0..2 {
        // The store's first call after the restart may find its connection ended.
        events_after = store.events_since("r1", 0).map_err(|e| e.to_string());
        if events_after.is_ok() {
            break;
        }
    }
    let events_after = events_after.expect("events after the restart");
    assert!(events_after.len() > events_before.len());
    for (b, a) in events_before.iter().zip(&events_after) {
        assert_eq!(b, a, "event {} unchanged", b.seq);
    }
    for n in &names {
        assert_eq!(reimages_journalled(&work.path().join(n)), 1, "{n} reimaged exactly once");
    }
    let watched = tokio::time::timeout(WAIT, watch.wait_with_output())
        .await
        .expect("the follower's watch ends with the run")
        .expect("upkeepctl run watch");
    assert!(watched.status.success(), "{}", String::from_utf8_lossy(&watched.stderr));
    let events: Vec<Value> = String::from_utf8_lossy(&watched.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
        .collect();
    let done = events.iter().filter(|e| e["kind"] == "member" && e["to"] == "Completed").count();
    assert_eq!(done, 6, "the follower's watcher saw every member complete: {events:?}");
    assert!(events.last().is_some_and(|e| e["kind"] == "run" && e["to"] == "Completed"), "{events:?}");
    let list = upkeepctl_json(&pki, &urls[1], &["node", "list"]).await.expect("node list");
    for n in list["nodes"].as_array().expect("nodes") {
        assert_eq!(n["node_image_version"], "Debian-12-202312.01.0", "{n}");
    }
    let leases = upkeepctl_json(&pki, &urls[1], &["lease", "list"]).await.expect("lease list");
    assert_eq!(leases.as_array().map(Vec::len), Some(0), "no lease leaked: {leases}");
    for g in agents {
        g.stop().await;
    }
    for mut r in replicas {
        r.hub.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reboot_and_an_uncordon_ordered_through_a_follower_are_carried_out_by_the_leader() {
    let (pki, work, url, store) = setup();
    let a = replica(&pki, work.path(), &url, "a").await;
    wait_for("a leads", WAIT, || async { leader(&store).await.filter(|(h, _)| h == "a") }).await;
    let b = replica(&pki, work.path(), &url, "b").await;
    // n2's agent knows only b, the follower: the leader reaches it only through the database.
    let node = make_node(&pki, work.path(), &b.hub.url(), "n2", "m2", "pool1", "eu", "Debian-12-202311.07.0");
    let agent = TestAgent::start(&node);
    let b_url = b.hub.url();
    wait_for("n2 Ready through a", WAIT, || async {
        let n = upkeepctl_json(&pki, &a.hub.url(), &["node", "show", "n2"]).await.ok()?;
        (n["status"] == "Ready" && n["connected"] == true).then_some(())
    })
    .await;
    let out = upkeepctl_ok(&pki, &b_url, &["node", "reboot", "n2", "--force"]).await;
    assert!(out.contains("operator-reboot/n2/"), "the lease the leader took: {out}");
    let ops = wait_for("n2 rebooted and uncordoned", WAIT, || async {
        let ops = agent_journal(&work.path().join("n2"));
        let done = |step: &str| {
            ops.iter().any(|(id, ok)| id.starts_with("operator-reboot/n2/") && id.ends_with(step) && *ok == Some(true))
        };
        (done("/reboot") && done("/uncordon")).then_some(ops)
    })
    .await;
    assert_eq!(ops.iter().filter(|(id, _)| id.ends_with("/reboot")).count(), 1, "rebooted once: {ops:?}");
    let out = upkeepctl_ok(&pki, &b_url, &["node", "uncordon", "n2"]).await;
    assert!(out.contains("operator-uncordon/n2/"), "{out}");
    wait_for("no lease left", WAIT, || async {
        let leases = upkeepctl_json(&pki, &b_url, &["lease", "list"]).await.ok()?;
        leases.as_array()?.is_empty().then_some(())
    })
    .await;
    // A node nobody knows is refused as on a single hub, through the follower too.
    let err = upkeepctl_refused(&pki, &b_url, &["node", "reboot", "ghost", "--force"]).await;
    assert!(err.contains("ghost") && err.contains("not found"), "{err}");
    agent.stop().await;
    for mut r in [a, b] {
        r.hub.kill().await;
    }
}
