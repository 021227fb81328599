//! The PostgreSQL store from the operator's side (docs/postgres.md): `[store] url` in hub.toml, the schema
//! migrated by `upkeep-hub migrate` only, a hub refusing a database behind its schema with one line naming that
//! command, and the configuration refusing a password in the URL or an unreadable password file. Runs on the test
//! cluster (`UPKEEP_TEST_PG`, or one `scripts/pg-cluster` starts) whatever `UPKEEP_TEST_STORE` says.

use std::path::{Path, PathBuf};
use std::time::Duration;
use upkeep_hub::pki::files;
use upkeep_hub::store::postgres::testing;
use upkeep_tests::*;

/// A hub.toml of its own (not the harness's: this test chooses the store), with `store` as its `[store]` body.
fn hub_toml(pki: &TestPki, dir: &Path, store: &str) -> PathBuf {
    let path = dir.join("hub.toml");
    let text = format!(
        "state_dir = {:?}\n[store]\n{store}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n[agents]\nheartbeat_interval_seconds = 1\n[auto_upgrade]\nenabled = false\n",
        dir.join("db"),
        pki.file(files::CA_CERT),
        pki.file(files::HUB_CERT),
        pki.file(files::HUB_KEY),
    );
    std::fs::write(&path, text).expect("write hub.toml");
    path
}

/// `upkeep-hub --config CONFIG ARGS` to its end: (success, stdout, stderr).
async fn hub_cli(config: &Path, args: &[&str]) -> (bool, String, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(bin("upkeep-hub"))
            .arg("--config")
            .arg(config)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("upkeep-hub {args:?} still running after 30 s"))
    .expect("spawn upkeep-hub");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn one_line(err: &str) -> &str {
    let err = err.trim_end();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("upkeep-hub: error:"), "{err}");
    err
}

#[tokio::test]
async fn a_hub_serves_postgres_only_once_migrate_brought_its_schema_up_to_date() {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tmp");
    let (url, settings) = testing::empty_database().unwrap_or_else(|e| panic!("{e}"));
    let config = hub_toml(&pki, work.path(), &format!("url = {url:?}"));

    // Behind the schema: refused at start with one line naming the command, nothing created.
    let (ok, _, err) = hub_cli(&config, &["--listen", "127.0.0.1:0"]).await;
    assert!(!ok, "the hub must not serve an unmigrated database");
    let err = one_line(&err);
    assert!(err.contains("upkeep-hub migrate") && err.contains("schema version 0"), "{err}");
    assert_eq!(
        upkeep_hub::store::postgres::current_version(&settings).expect("version"),
        0,
        "the hub migrated nothing"
    );

    // migrate says what it applied, and the second time that there was nothing to apply.
    let (ok, out, err) = hub_cli(&config, &["migrate"]).await;
    assert!(ok, "migrate: {err}");
    assert!(out.contains("applied schema migration 1:"), "{out}");
    let (ok, again, err) = hub_cli(&config, &["migrate"]).await;
    assert!(ok, "migrate again: {err}");
    assert!(!again.contains("applied") && again.contains("nothing to apply"), "{again}");

    // Now the hub serves from the database: a node registered through it is a row there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let url_hub = format!("https://127.0.0.1:{port}");
    let mut child = tokio::process::Command::new(bin("upkeep-hub"))
        .arg("--config")
        .arg(&config)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn upkeep-hub");
    wait_for("the hub answers", Duration::from_secs(30), || async {
        upkeepctl(&pki, &url_hub, "viewer", &["whoami"]).await.status.success().then_some(())
    })
    .await;
    let node = make_node(&pki, work.path(), &url_hub, "n1", "m1", "pool-a", "eu", "Ubuntu-2204gen2-202311.07.0");
    let agent = TestAgent::start(&node);
    wait_for("n1 registered", Duration::from_secs(30), || async {
        let list = upkeepctl_json(&pki, &url_hub, &["node", "list"]).await.ok()?;
        (list["nodes"].as_array()?.len() == 1).then_some(())
    })
    .await;
    agent.stop().await;
    child.kill().await.expect("kill hub");
    let store = upkeep_hub::store::postgres::PostgresStore::open(&settings).expect("open");
    let nodes = upkeep_hub::store::Store::list_nodes(&store, None).expect("nodes");
    assert_eq!(nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), vec!["n1"]);
    drop(store);

    // backup and restore copy SQLite files only: refused, naming what to use.
    let (ok, _, err) = hub_cli(&config, &["backup", &work.path().join("b.db").display().to_string()]).await;
    assert!(!ok);
    assert!(one_line(&err).contains("pg_dump"), "{err}");
    let _ = testing::drop_database(&settings);
}

#[tokio::test]
async fn the_store_password_never_comes_from_the_url_and_a_bad_store_setting_is_named() {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tmp");
    let config = hub_toml(&pki, work.path(), "url = \"postgres://upkeep:hunter2@127.0.0.1:5432/upkeep\"");
    let (ok, _, err) = hub_cli(&config, &["check-config"]).await;
    assert!(!ok);
    let err = one_line(&err);
    assert!(err.contains("store.url") && err.contains("store.password_file") && err.contains("UPKEEP_STORE_PASSWORD"));
    assert!(!err.contains("hunter2"), "the password is repeated: {err}");

    let config = hub_toml(&pki, work.path(), "url = \"postgres://upkeep@127.0.0.1/upkeep\"\npassword_file = \"nope\"");
    let (ok, _, err) = hub_cli(&config, &["check-config"]).await;
    assert!(!ok);
    assert!(one_line(&err).contains("store.password_file"), "{err}");

    let config = hub_toml(&pki, work.path(), "url = \"https://example.invalid/db\"");
    let (ok, _, err) = hub_cli(&config, &["check-config"]).await;
    assert!(!ok);
    assert!(one_line(&err).contains("store.url: not a PostgreSQL connection string"), "{err}");
}
