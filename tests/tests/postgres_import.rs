//! Moving a SQLite hub into PostgreSQL (`upkeep-hub migrate --from sqlite:...`, docs/postgres.md "Moving from
//! SQLite"): a real hub on SQLite with real agents, an image, a completed run, a lease, a join token and a
//! webhook; the hub stopped, its state moved into a fresh database on the test cluster (`UPKEEP_TEST_PG`), a hub
//! started on PostgreSQL with another state directory and a shared artifacts directory: the operator sees the
//! same fleet, and an agent downloads the moved image.
//!
//! Every hub here writes its own hub.toml with an explicit store (the move is always SQLite to PostgreSQL, so
//! these tests do not follow `UPKEEP_TEST_STORE`).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;
use upkeep_hub::pki;
use upkeep_hub::store::postgres::{PostgresSettings, testing};
use upkeep_tests::*;

const WAIT: Duration = Duration::from_secs(60);

/// A hub.toml under `state_dir` with `store` as its `[store]` section (empty: SQLite).
fn hub_toml(pki: &TestPki, state_dir: &Path, store: &str) -> PathBuf {
    std::fs::create_dir_all(state_dir).expect("mkdir");
    let path = state_dir.join("hub.toml");
    let text = format!(
        "state_dir = {:?}\n{store}[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\nissuer_cert = {:?}\nissuer_key = {:?}\n\
         [agents]\nheartbeat_interval_seconds = 1\nsilent_after_heartbeats = 5\n[auto_upgrade]\nenabled = false\n",
        state_dir.join("db"),
        pki.file(pki::files::CA_CERT),
        pki.file(pki::files::HUB_CERT),
        pki.file(pki::files::HUB_KEY),
        pki.file(pki::files::ISSUER_CERT),
        pki.file(pki::files::ISSUER_KEY),
    );
    std::fs::write(&path, text).expect("write hub.toml");
    path
}

/// A fresh, empty database on the test cluster, dropped when the test ends.
struct Database {
    url: String,
    settings: PostgresSettings,
}

impl Database {
    fn new() -> Database {
        let (url, settings) = testing::empty_database().unwrap_or_else(|e| panic!("PostgreSQL for the move: {e}"));
        Database { url, settings }
    }

    fn store_section(&self, artifacts: &Path) -> String {
        format!("[store]\nurl = {:?}\nartifacts_dir = {artifacts:?}\n", self.url)
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let _ = testing::drop_database(&self.settings);
    }
}

/// Runs `upkeep-hub migrate --config CONFIG ARGS` (the form docs/postgres.md gives); (success, stdout, stderr).
async fn migrate(config: &Path, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(bin("upkeep-hub"))
        .arg("migrate")
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .await
        .expect("run upkeep-hub migrate");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Removes the fields that describe the present moment rather than stored state: a node's `status`,
/// `connected`, `last_seen` and `last_report` come from the agent's live session and heartbeats (they change
/// while the agents reconnect to the new hub, and would change the same way across a restart on SQLite).
fn stable(mut v: Value) -> Value {
    if let Some(nodes) = v.get_mut("nodes").and_then(Value::as_array_mut) {
        for n in nodes {
            if let Some(o) = n.as_object_mut() {
                for live in ["status", "connected", "last_seen", "last_report"] {
                    o.remove(live);
                }
            }
        }
    }
    v
}

const VIEWS: &[&[&str]] = &[
    &["run", "show", "r1"],
    &["node", "list"],
    &["image", "list"],
    &["lease", "list"],
    &["webhook", "list"],
    &["pki", "token", "list"],
    &["strategy", "list"],
    &["member", "list"],
];

async fn views(pki: &TestPki, url: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for args in VIEWS {
        let v = upkeepctl_json(pki, url, args).await.unwrap_or_else(|e| panic!("upkeepctl {args:?}: {e}"));
        out.push(stable(v));
    }
    out
}

/// Creates a strategy of one member and a NodeImageOnly run on it, starts it and waits until it Completed.
async fn run_on(pki: &TestPki, url: &str, work: &Path, run: &str, member: &str) -> Value {
    let spec = work.join(format!("{run}.json"));
    std::fs::write(
        &spec,
        format!(r#"{{"stages":[{{"name":"only","groups":[{{"name":"g","members":["{member}"]}}]}}]}}"#),
    )
    .expect("strategy file");
    upkeepctl_ok(pki, url, &["strategy", "create", run, "-f", &spec.to_string_lossy()]).await;
    upkeepctl_ok(pki, url, &["run", "create", run, "--strategy", run, "--upgrade-type", "NodeImageOnly"]).await;
    upkeepctl_ok(pki, url, &["run", "start", run]).await;
    wait_for(&format!("run {run} Completed"), WAIT, || async {
        let v = upkeepctl_json(pki, url, &["run", "show", run]).await.ok()?;
        (v["status"] == "Completed").then_some(v)
    })
    .await
}

fn node_image(list: &Value, node: &str) -> String {
    list["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["name"] == node)
        .and_then(|n| n["labels"]["upkeep.io/node-image-version"].as_str())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_hub_moved_into_postgres_shows_the_same_fleet_and_serves_its_images() {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let old_state = work.path().join("old");
    let old = hub_toml(&pki, &old_state, "");
    let mut hub = TestHub::start_config(old.clone(), &old_state, "127.0.0.1:0".parse().expect("addr")).await;
    let url = hub.url();
    let mut agents = Vec::new();
    for (name, member) in [("n1", "m1"), ("n2", "m2")] {
        let node = make_node(&pki, work.path(), &url, name, member, "pool1", "eu", "Debian-12-202311.07.0");
        agents.push(TestAgent::start(&node));
    }
    wait_for("both nodes Ready", WAIT, || async {
        let list = upkeepctl_json(&pki, &url, &["node", "list"]).await.ok()?;
        (list["nodes"].as_array()?.iter().filter(|n| n["status"] == "Ready").count() == 2).then_some(())
    })
    .await;
    let roots: Vec<_> = ["n1", "n2"].iter().map(|n| work.path().join(n).join("root")).collect();
    publish_trusted_debian(&pki, &url, work.path(), &roots, "202312.01.0").await;
    let r1 = run_on(&pki, &url, work.path(), "r1", "m1").await;
    assert_eq!(run_member(&r1, "m1")["status"], "Completed", "{r1}");
    upkeepctl_ok(&pki, &url, &["pki", "token", "create", "--member", "m3", "--pool", "web"]).await;
    // A webhook for events this test never causes: its delivery progress stays as it is across the move.
    upkeepctl_ok(
        &pki,
        &url,
        &["webhook", "create", "pager", "--url", "http://127.0.0.1:9/hook", "--events", "lease.expired"],
    )
    .await;
    // A lease held for a node that is away (no agent gives it back), as a node crashed mid-reboot leaves one.
    hub.fleet()
        .store()
        .put_lease(&upkeep_hub::store::LeaseRecord {
            node: "n7".into(),
            lease_id: "reboot/left-behind".into(),
            member: "m1".into(),
            holder: "node".into(),
            purpose: "reboot".into(),
            granted_ms: 1_700_000_000_000,
            expires_ms: i64::MAX,
            forced: false,
        })
        .expect("lease");
    let before = views(&pki, &url).await;
    assert_eq!(before[3].as_array().map(Vec::len), Some(1), "the lease is listed: {}", before[3]);
    assert_eq!(node_image(&before[1], "n1"), "Debian-12-202312.01.0");
    assert_eq!(node_image(&before[1], "n2"), "Debian-12-202311.07.0");
    let addr = hub.addr;
    hub.stop().await;

    // The move: a fresh database, another state directory, a shared artifacts directory. The old hub's image
    // files are then removed, so the new hub can serve only what the move brought.
    let db = Database::new();
    let new_state = work.path().join("new");
    let shared = work.path().join("shared-artifacts");
    let new = hub_toml(&pki, &new_state, &db.store_section(&shared));
    let from = format!("sqlite:{}", old_state.join("db/hub.db").display());
    let (ok, out, err) = migrate(&new, &["--from", &from]).await;
    assert!(ok, "migrate --from: {err}");
    eprintln!("upkeep-hub migrate --from {from}:\n{out}");
    for table in ["members", "nodes", "runs", "run_parts", "events", "images", "leases", "join_tokens", "webhooks"] {
        assert!(
            out.lines().any(|l| l.starts_with(&format!("copied {table}: ")) && !l.ends_with(": 0 rows")),
            "{table}: {out}"
        );
    }
    assert!(out.contains("sequence events.seq set to"), "{out}");
    assert!(out.contains("1 hard-linked") || out.contains("1 copied"), "the image file moved: {out}");
    assert!(out.contains("counts verified"), "{out}");
    std::fs::remove_dir_all(old_state.join("db/artifacts")).expect("remove the old image files");
    let mut hub = TestHub::start_config(new.clone(), &new_state, addr).await;
    wait_for("both agents back on the PostgreSQL hub", WAIT, || async {
        let list = upkeepctl_json(&pki, &url, &["node", "list"]).await.ok()?;
        (list["nodes"].as_array()?.iter().filter(|n| n["connected"] == true).count() == 2).then_some(())
    })
    .await;
    let after = views(&pki, &url).await;
    for (i, args) in VIEWS.iter().enumerate() {
        assert_eq!(before[i], after[i], "upkeepctl {args:?} -o json differs after the move");
    }
    // The moved image is served from the shared directory: a run after the move reimages n2 with it.
    let sha = before[2]["images"][0]["sha256"].as_str().expect("image sha256").to_string();
    assert!(shared.join("sha256").join(&sha).is_file(), "the image file is in the shared directory");
    assert!(!new_state.join("db/artifacts").exists(), "the new hub keeps no image files under its state_dir");
    let r2 = run_on(&pki, &url, work.path(), "r2", "m2").await;
    assert_eq!(run_member(&r2, "m2")["status"], "Completed", "{r2}");
    let list = upkeepctl_json(&pki, &url, &["node", "list"]).await.expect("node list");
    assert_eq!(node_image(&list, "n2"), "Debian-12-202312.01.0", "{list}");
    // Event numbers continue after the moved ones.
    let events = upkeepctl(&pki, &url, "operator", &["run", "watch", "r2", "-o", "json"]).await;
    let first_r2: u64 = String::from_utf8_lossy(&events.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|e| e["seq"].as_u64())
        .min()
        .expect("r2 has events");
    let watch_r1 = upkeepctl(&pki, &url, "operator", &["run", "watch", "r1", "-o", "json"]).await;
    let last_r1: u64 = String::from_utf8_lossy(&watch_r1.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|e| e["seq"].as_u64())
        .max()
        .expect("r1's events came along");
    assert!(first_r2 > last_r1, "new events are numbered after the moved ones ({first_r2} > {last_r1})");
    for a in agents {
        a.stop().await;
    }
    hub.stop().await;
}

/// A one-node SQLite hub, stopped: its hub.db.
async fn small_sqlite_hub(pki: &TestPki, work: &Path, dir: &str, node: &str) -> PathBuf {
    let state = work.join(dir);
    let config = hub_toml(pki, &state, "");
    let mut hub = TestHub::start_config(config, &state, "127.0.0.1:0".parse().expect("addr")).await;
    hub.fleet()
        .store()
        .record_report(
            node,
            &upkeep_hub::store::NodeFacts {
                member: format!("m-{node}"),
                node_pool: "p".into(),
                region: "eu".into(),
                ..Default::default()
            },
            1,
        )
        .expect("report");
    hub.stop().await;
    state.join("db/hub.db")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_into_a_database_holding_a_fleet_or_from_another_schema_version_is_refused_and_changes_nothing() {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let a = small_sqlite_hub(&pki, work.path(), "a", "na").await;
    let b = small_sqlite_hub(&pki, work.path(), "b", "nb").await;
    let db = Database::new();
    let config = hub_toml(&pki, &work.path().join("pg"), &db.store_section(&work.path().join("shared")));
    let (ok, _, err) = migrate(&config, &["--from", &format!("sqlite:{}", a.display())]).await;
    assert!(ok, "first move: {err}");
    let nodes = |store: &dyn upkeep_hub::store::Store| -> Vec<String> {
        store.list_nodes(None).expect("nodes").into_iter().map(|n| n.name).collect()
    };
    let open = || upkeep_hub::store::postgres::PostgresStore::open(&db.settings).expect("open");
    assert_eq!(nodes(&open()), ["na"]);

    // Another fleet into the same database: refused in one line, nothing changed.
    let (ok, out, err) = migrate(&config, &["--from", &format!("sqlite:{}", b.display())]).await;
    assert!(!ok, "a second fleet must be refused: {out}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains("already holds hub state") && err.contains("members: 1") && err.contains("createdb"), "{err}");
    assert_eq!(nodes(&open()), ["na"], "the database is as it was");
    // The same fleet again: refused the same way (the move never merges).
    let (ok, _, err) = migrate(&config, &["--from", &format!("sqlite:{}", a.display())]).await;
    assert!(!ok && err.contains("already holds hub state"), "{err}");

    // A SQLite file at another schema version, into an empty database: refused naming the fix, and the database
    // is not even migrated.
    let empty = Database::new();
    let config2 = hub_toml(&pki, &work.path().join("pg2"), &empty.store_section(&work.path().join("shared2")));
    let version = upkeep_hub::store::sqlite::SCHEMA_VERSION;
    for (v, fix) in [
        (version - 1, "start this version of upkeep-hub on it once"),
        (version + 1, "upkeep-hub version that wrote it"),
    ] {
        let old = work.path().join(format!("v{v}.db"));
        std::fs::copy(&b, &old).expect("copy");
        let conn = rusqlite::Connection::open(&old).expect("open");
        conn.pragma_update(None, "user_version", v).expect("set version");
        drop(conn);
        let (ok, _, err) = migrate(&config2, &["--from", &format!("sqlite:{}", old.display())]).await;
        assert!(!ok, "schema version {v} must be refused");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains(&format!("SQLite schema version {v}")) && err.contains(fix), "{err}");
    }
    assert_eq!(upkeep_hub::store::postgres::current_version(&empty.settings).expect("version"), 0, "untouched");
    // A SQLite hub still running (holding its state directory's lock) is not read.
    let lock = upkeep_hub::store::safety::lock_state_dir(b.parent().expect("state dir")).expect("lock");
    let (ok, _, err) = migrate(&config2, &["--from", &format!("sqlite:{}", b.display())]).await;
    assert!(!ok && err.contains("a hub is running") && err.contains("stop it first"), "{err}");
    drop(lock);
    // Bad input names the flag.
    let (ok, _, err) = migrate(&config2, &["--from", "mysql://x"]).await;
    assert!(!ok && err.contains("--from mysql://x: give sqlite:PATH"), "{err}");
    let (ok, _, err) =
        migrate(&config2, &["--from", &format!("sqlite:{}", work.path().join("none.db").display())]).await;
    assert!(!ok && err.contains("--from sqlite:") && err.contains("No such file"), "{err}");
}
