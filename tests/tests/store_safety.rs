//! The hub's state is never served as empty (issue 13): a lost, emptied or damaged hub.db stops the real
//! `upkeep-hub` binary with one line saying what to do; `upkeep-hub backup` of a live hub and `restore` bring a
//! fleet back intact; `upkeepctl pki init` writes all of its files or none and never overwrites any.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;
use upkeep_hub::pki::files;

use upkeep_tests::*;

/// The hub's database and its marker, spelled out (not imported) so this file also runs against older hubs.
const DB_FILE: &str = "hub.db";
const MARKER_FILE: &str = "hub.db.marker";
const WAIT: Duration = Duration::from_secs(30);
/// A refusing hub exits at once; one still running after this has started on the bad state.
const REFUSAL_WITHIN: Duration = Duration::from_secs(15);
const NO_AUTO: &str = "[auto_upgrade]\nenabled = false\n";
const IMAGE: &str = "Debian-12-202311.07.0";

/// The layout `HubProcess::start_logged(pki, <work>/hub, ..)` uses: hub.toml in `<work>/hub`, state in `db/`.
struct Layout {
    config: PathBuf,
    state: PathBuf,
}

fn layout(work: &Path) -> Layout {
    Layout { config: work.join("hub/hub.toml"), state: work.join("hub/db") }
}

async fn start_hub(pki: &TestPki, work: &Path) -> HubProcess {
    HubProcess::start_logged(pki, &work.join("hub"), 5, NO_AUTO).await
}

/// Runs `upkeep-hub --config CONFIG ARGS` to its end (killing it after `REFUSAL_WITHIN`): (success, stdout, stderr).
async fn hub_cli(config: &Path, args: &[&str]) -> (bool, String, String) {
    let mut cmd = tokio::process::Command::new(bin("upkeep-hub"));
    cmd.arg("--config").arg(config).args(args).kill_on_drop(true);
    let out = tokio::time::timeout(REFUSAL_WITHIN, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("upkeep-hub {args:?} still running after {REFUSAL_WITHIN:?}: it did not refuse"))
        .expect("spawn upkeep-hub");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts the hub binary on `config` and asserts it refuses to serve with exactly one line; returns the line.
async fn refused_start(config: &Path) -> String {
    let (ok, _, err) = hub_cli(config, &["--listen", "127.0.0.1:0"]).await;
    assert!(!ok, "the hub must not start: {err}");
    let err = err.trim_end().to_string();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("upkeep-hub: error:"), "{err}");
    err
}

/// A hub with `nodes` (name, member) registered through real agents; returns the hub and the running agents.
async fn fleet(pki: &TestPki, work: &Path, nodes: &[(&str, &str)]) -> (HubProcess, Vec<TestAgent>) {
    let hub = start_hub(pki, work).await;
    let url = hub.url();
    let mut agents = Vec::new();
    for (name, member) in nodes {
        let node = make_node(pki, &work.join("nodes"), &url, name, member, "pool1", "eu", IMAGE);
        agents.push(TestAgent::start(&node));
    }
    wait_for(&format!("{} nodes registered", nodes.len()), WAIT, || async {
        let list = upkeepctl_json(pki, &url, &["node", "list"]).await.ok()?;
        (list["nodes"].as_array()?.len() == nodes.len()).then_some(())
    })
    .await;
    (hub, agents)
}

async fn stop_agents(agents: Vec<TestAgent>) {
    for a in agents {
        a.stop().await;
    }
}

fn names(v: &Value, key: &str) -> Vec<String> {
    let mut out: Vec<String> = v[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} in {v}"))
        .iter()
        .map(|x| x["name"].as_str().unwrap_or_default().to_string())
        .collect();
    out.sort();
    out
}

/// Makes SQLite fold the write-ahead log of a SIGKILLed hub into hub.db (the last connection to close does), so
/// the damage a test does to hub.db is not hidden by newer copies of the page in the log.
fn checkpoint(state: &Path) {
    drop(upkeep_hub::store::sqlite::SqliteStore::open(&state.join(DB_FILE)).expect("open to checkpoint"));
    assert!(!state.join(format!("{DB_FILE}-wal")).exists(), "the log is folded in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_state_dir_starts_a_new_hub_that_records_its_database() {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let l = layout(work.path());
    let mut hub = start_hub(&pki, work.path()).await;
    let list = upkeepctl_json(&pki, &hub.url(), &["node", "list"]).await.expect("node list");
    assert_eq!(list["nodes"].as_array().map(Vec::len), Some(0), "{list}");
    let marker: Value =
        serde_json::from_str(&std::fs::read_to_string(l.state.join(MARKER_FILE)).expect("marker written"))
            .expect("marker is JSON");
    assert!(marker["database_id"].as_str().is_some_and(|s| s.len() == 32), "{marker}");
    // And it starts again on its own state.
    hub.restart(&pki).await;
    hub.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_truncated_to_zero_bytes_is_refused_with_one_line() {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let l = layout(work.path());
    let (mut hub, agents) = fleet(&pki, work.path(), &[("n1", "m1"), ("n2", "m1")]).await;
    stop_agents(agents).await;
    hub.kill().await;
    checkpoint(&l.state);
    std::fs::File::create(l.state.join(DB_FILE)).expect("truncate hub.db");
    let err = refused_start(&l.config).await;
    let db = l.state.join(DB_FILE);
    assert!(err.contains(&format!("{} is empty (0 bytes)", db.display())), "{err}");
    assert!(err.contains(MARKER_FILE) && err.contains("upkeep-hub restore"), "{err}");
    assert_eq!(std::fs::metadata(&db).expect("hub.db").len(), 0, "the refusing hub wrote nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_database_is_refused_by_its_marker_or_by_the_artifacts_an_older_hub_left() {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let l = layout(work.path());
    let (mut hub, agents) = fleet(&pki, work.path(), &[("n1", "m1")]).await;
    stop_agents(agents).await;
    hub.kill().await;
    // An image the hub stored (the artifact store's layout: artifacts/sha256/<digest>).
    let artifacts = l.state.join("artifacts/sha256");
    std::fs::create_dir_all(&artifacts).expect("mkdir");
    std::fs::write(artifacts.join("ab".repeat(32)), b"an image").expect("artifact");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(l.state.join(format!("{DB_FILE}{suffix}")));
    }
    let db = l.state.join(DB_FILE);
    let err = refused_start(&l.config).await;
    assert!(err.contains(&format!("{} is missing", db.display())) && err.contains(MARKER_FILE), "{err}");
    assert!(err.contains("upkeep-hub restore") && err.contains("to start a new fleet"), "{err}");
    // A state directory from a hub that wrote no marker: the images alone say there was a fleet.
    std::fs::remove_file(l.state.join(MARKER_FILE)).expect("rm marker");
    let err = refused_start(&l.config).await;
    assert!(err.contains(&format!("{} is missing", db.display())) && err.contains("holds image files"), "{err}");
    assert!(!db.exists(), "no empty database was created in place of the lost one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_with_a_zeroed_page_is_refused_naming_quick_check() {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let l = layout(work.path());
    let (mut hub, agents) = fleet(&pki, work.path(), &[("n1", "m1"), ("n2", "m1"), ("n3", "m2")]).await;
    upkeepctl_ok(&pki, &hub.url(), &["run", "create", "r1", "--upgrade-type", "NodeImageOnly"]).await;
    stop_agents(agents).await;
    hub.kill().await;
    checkpoint(&l.state);
    let db = l.state.join(DB_FILE);
    let mut bytes = std::fs::read(&db).expect("read hub.db");
    assert!(bytes.len() >= 4 * 4096, "several pages: {} bytes", bytes.len());
    bytes[4096..8192].fill(0);
    std::fs::write(&db, &bytes).expect("zero page 2");
    let err = refused_start(&l.config).await;
    assert!(err.contains(&format!("{} is damaged (PRAGMA quick_check:", db.display())), "{err}");
    assert!(err.contains("upkeep-hub restore"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_of_a_live_hub_restored_into_an_empty_state_dir_brings_the_fleet_back_intact() {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let l = layout(work.path());
    let (mut hub, agents) = fleet(&pki, work.path(), &[("n1", "m1"), ("n2", "m1"), ("n3", "m2")]).await;
    let url = hub.url();
    upkeepctl_ok(&pki, &url, &["run", "create", "r1", "--upgrade-type", "NodeImageOnly"]).await;
    let before = (
        upkeepctl_json(&pki, &url, &["node", "list"]).await.expect("node list"),
        upkeepctl_json(&pki, &url, &["member", "list"]).await.expect("member list"),
        upkeepctl_json(&pki, &url, &["run", "show", "r1"]).await.expect("run show"),
    );

    // Online: the hub serves and agents keep reporting while the backup is taken.
    let backup = work.path().join("fleet.backup");
    let (ok, out, err) = hub_cli(&l.config, &["backup", &backup.to_string_lossy()]).await;
    assert!(ok, "backup: {err}");
    assert!(out.contains("backed up") && out.contains("schema version"), "{out}");
    // While the hub runs, restore refuses to touch its state.
    let (ok, _, err) = hub_cli(&l.config, &["restore", "--force", &backup.to_string_lossy()]).await;
    assert!(!ok && err.contains("a hub is running"), "{err}");
    stop_agents(agents).await;
    hub.kill().await;
    // Over a healthy database, only with --force.
    let (ok, _, err) = hub_cli(&l.config, &["restore", &backup.to_string_lossy()]).await;
    assert!(!ok && err.trim_end().lines().count() == 1 && err.contains("--force"), "{err}");

    std::fs::remove_dir_all(&l.state).expect("lose the state");
    let (ok, out, err) = hub_cli(&l.config, &["restore", &backup.to_string_lossy()]).await;
    assert!(ok, "restore: {err}");
    assert!(out.contains("restored"), "{out}");
    let mut hub = start_hub(&pki, work.path()).await;
    let url = hub.url();
    let nodes = upkeepctl_json(&pki, &url, &["node", "list"]).await.expect("node list");
    assert_eq!(names(&nodes, "nodes"), names(&before.0, "nodes"), "{nodes}");
    assert_eq!(names(&nodes, "nodes"), ["n1", "n2", "n3"]);
    for n in before.0["nodes"].as_array().expect("nodes") {
        let now = nodes["nodes"].as_array().expect("nodes").iter().find(|m| m["name"] == n["name"]).expect("node");
        assert_eq!((&now["member"], &now["node_image_version"]), (&n["member"], &n["node_image_version"]), "{now}");
    }
    let members = upkeepctl_json(&pki, &url, &["member", "list"]).await.expect("member list");
    assert_eq!(names(&members, "members"), names(&before.1, "members"), "{members}");
    assert_eq!(names(&members, "members"), ["m1", "m2"]);
    let run = upkeepctl_json(&pki, &url, &["run", "show", "r1"]).await.expect("the run is back");
    assert_eq!((&run["name"], &run["status"]), (&before.2["name"], &before.2["status"]), "{run}");
    hub.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pki_init_into_a_dir_holding_only_operator_pem_is_refused_and_writes_nothing() {
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path().join("pki");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::write(dir.join(files::OPERATOR_CERT), "an operator's certificate").expect("write");
    let run = |args: Vec<String>| async move {
        let out = tokio::process::Command::new(bin("upkeepctl")).args(&args).output().await.expect("spawn upkeepctl");
        (out.status.success(), String::from_utf8_lossy(&out.stderr).trim_end().to_string())
    };
    let listing = |p: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(p)
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let d = dir.to_string_lossy().into_owned();
    let (ok, err) = run(vec!["pki".into(), "init".into(), "--dir".into(), d.clone()]).await;
    assert!(!ok, "refused");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains(&format!("{} already exists", dir.join(files::OPERATOR_CERT).display())), "{err}");
    assert!(err.contains("nothing was written"), "{err}");
    assert_eq!(listing(&dir), [files::OPERATOR_CERT], "nothing written");
    assert_eq!(listing(work.path()), ["pki"], "no temporary directory left");
    assert_eq!(std::fs::read_to_string(dir.join(files::OPERATOR_CERT)).expect("read"), "an operator's certificate");

    for bad in ["", "bad name", "a..b"] {
        let fresh = work.path().join("fresh").to_string_lossy().into_owned();
        let (ok, err) =
            run(vec!["pki".into(), "init".into(), "--dir".into(), fresh, "--hub-name".into(), bad.into()]).await;
        assert!(!ok, "{bad:?} refused");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.contains("--hub-name") && err.contains("DNS name"), "{bad:?}: {err}");
        assert_eq!(err.matches("invalid hub name").count(), 1, "said once: {err}");
        assert!(!work.path().join("fresh").exists(), "nothing written for {bad:?}");
    }
}
