//! Enrollment without copying keys, over real mutual TLS with a CA generated per test and a real SQLite store:
//! `upkeepctl pki token create` on the operator's side, `upkeep-agent join` (the binary) on the node's, then an
//! agent running with what join wrote. Tokens are single-use, expire, and are stored hashed; a wrong CA
//! fingerprint stops the join before the token is sent.

use std::path::Path;
use std::process::Output;
use std::time::Duration;
use upkeep_hub::pki::{self, files};
use upkeep_tests::*;

const WAIT: Duration = Duration::from_secs(30);

fn fingerprint(pki: &TestPki) -> String {
    pki::fingerprint_pem(&std::fs::read_to_string(pki.file(files::CA_CERT)).expect("ca")).expect("fingerprint")
}

/// Creates a token for member m1 and returns its text (the first line upkeepctl prints).
async fn token(pki: &TestPki, hub: &str, extra: &[&str]) -> String {
    let mut args = vec!["pki", "token", "create", "--member", "m1", "--pool", "web"];
    args.extend_from_slice(extra);
    let out = upkeepctl_ok(pki, hub, &args).await;
    out.lines().next().expect("token line").to_string()
}

async fn join(dir: &Path, hub: &str, token: &str, fp: &str, name: &str) -> Output {
    tokio::process::Command::new(bin("upkeep-agent"))
        .arg("--config")
        .arg(dir.join("agent.toml"))
        .args(["join", "--hub", hub, "--token", token, "--ca-fingerprint", fp, "--name", name, "--pki-dir"])
        .arg(dir.join("pki"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .output()
        .await
        .expect("run upkeep-agent join")
}

fn one_line_error(out: &Output) -> String {
    assert!(!out.status.success(), "join should fail: {}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    err
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_with_a_token_and_runs_with_what_join_wrote() {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tmp");
    let mut hub = TestHub::start(&pki, &work.path().join("hub"), "127.0.0.1:0".parse().expect("addr")).await;
    let url = hub.url();
    let fp = fingerprint(&pki);
    // upkeepctl prints the same fingerprint.
    let printed = upkeepctl_ok(&pki, &url, &["pki", "fingerprint", "--dir", &pki.path().display().to_string()]).await;
    assert_eq!(printed.trim(), fp);

    let t = token(&pki, &url, &[]).await;
    assert!(t.starts_with("upkeep-join-"), "{t}");
    let node = work.path().join("node");
    // The fingerprint as people copy it: upper case, no colons.
    let out = join(&node, &url, &t, &fp.replace(':', "").to_uppercase(), "n-join").await;
    assert!(out.status.success(), "join: {}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("joined as node n-join of member m1 pool web"), "{said}");
    assert_eq!(listing(&node.join("pki")), vec!["ca.pem", "node.key", "node.pem"]);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(node.join("pki/node.key")).expect("key").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the key is private");
    assert_eq!(
        std::fs::read(node.join("pki/ca.pem")).expect("ca"),
        std::fs::read(pki.file(files::CA_CERT)).expect("ca")
    );
    let chain = std::fs::read_to_string(node.join("pki/node.pem")).expect("chain");
    assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2, "leaf and intermediate");
    let p = upkeep_proto::tls::principal_from_pem_file("node.pem", &node.join("pki/node.pem")).expect("identity");
    assert_eq!(p.uri(), "upkeep://node/n-join");

    // The configuration join wrote works: give the agent a root tree of its own and run it.
    let config_path = node.join("agent.toml");
    let mut config: toml::Table =
        toml::from_str(&std::fs::read_to_string(&config_path).expect("config")).expect("toml");
    assert_eq!(config["member"].as_str(), Some("m1"));
    assert_eq!(config["node_pool"].as_str(), Some("web"));
    let root = node.join("root");
    std::fs::create_dir_all(root.join("etc/upkeep")).expect("mkdir");
    std::fs::write(root.join("etc/os-release"), "ID=debian\nVERSION_ID=\"12\"\n").expect("os-release");
    std::fs::write(root.join("etc/upkeep/node-image"), "FAMILY=debian12\nVERSION=202601.01.0\n").expect("meta");
    config.insert("root".into(), root.display().to_string().into());
    std::fs::write(&config_path, toml::to_string(&config).expect("toml")).expect("write");
    let agent = TestAgent::start(&TestNode { name: "n-join".into(), root: root.clone(), config: config_path.clone() });
    wait_for("the joined node registers in member m1", WAIT, || async {
        let n = upkeepctl_json(&pki, &url, &["node", "show", "n-join"]).await.ok()?;
        (n["member"] == "m1").then_some(())
    })
    .await;
    agent.stop().await;

    // A token for another member cannot take over a known node's name, and is not used up by trying.
    let out = upkeepctl_ok(&pki, &url, &["pki", "token", "create", "--member", "m2"]).await;
    let m2 = out.lines().next().expect("token line").to_string();
    let taken = work.path().join("taken");
    let err = one_line_error(&join(&taken, &url, &m2, &fp, "n-join").await);
    assert!(err.contains("exists in member m1") && err.contains("node forget"), "{err}");
    assert!(!taken.join("pki/node.pem").exists());
    let ok = join(&work.path().join("m2-node"), &url, &m2, &fp, "n-m2").await;
    assert!(ok.status.success(), "the refused attempt took no use: {}", String::from_utf8_lossy(&ok.stderr));

    // The same token again: used up, one line, nothing written.
    let again = work.path().join("again");
    let err = one_line_error(&join(&again, &url, &t, &fp, "n-two").await);
    assert!(err.contains("used as many times as it allows"), "{err}");
    assert!(!again.join("agent.toml").exists());
    assert!(!again.join("pki/node.pem").exists());

    // An expired token: refused, and the refusal took nothing.
    let short = token(&pki, &url, &["--ttl", "1s"]).await;
    let list = upkeepctl_json(&pki, &url, &["pki", "token", "list"]).await.expect("list");
    let id = short.trim_start_matches("upkeep-join-").split('.').next().expect("id").to_string();
    let row = list.as_array().expect("array").iter().find(|r| r["id"] == id.as_str()).expect("listed").clone();
    let expires = chrono::DateTime::parse_from_rfc3339(row["expires_at"].as_str().expect("expires")).expect("time");
    wait_for("the short token's expiry passes", WAIT, || async {
        // expires_at is shown to the second: past it by a second more is past the expiry in ms.
        (chrono::Utc::now() > expires + chrono::TimeDelta::milliseconds(1100)).then_some(())
    })
    .await;
    let late = work.path().join("late");
    let err = one_line_error(&join(&late, &url, &short, &fp, "n-late").await);
    assert!(err.contains("has expired"), "{err}");
    assert!(!late.join("pki/node.pem").exists());

    // A wrong fingerprint: the join stops before the token is sent; at most the key was written.
    let other = TestPki::new();
    let fresh = token(&pki, &url, &[]).await;
    let wrong = work.path().join("wrong");
    let err = one_line_error(&join(&wrong, &url, &fresh, &fingerprint(&other), "n-wrong").await);
    assert!(err.contains("--ca-fingerprint") && err.contains("nothing was sent"), "{err}");
    assert_eq!(listing(&wrong.join("pki")), vec!["node.key"]);
    assert!(!wrong.join("agent.toml").exists());
    // ... and the token it did not send is still good.
    let ok = join(&work.path().join("right"), &url, &fresh, &fp, "n-right").await;
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));

    // Tokens are stored hashed: no secret in the database, and `token list` shows none.
    hub.stop().await;
    let rows: Vec<String> = hub
        .open_store()
        .list_join_tokens()
        .expect("tokens")
        .into_iter()
        .map(|t| format!("{} {} {}", t.id, t.secret_sha256, t.member))
        .collect();
    assert_eq!(rows.len(), 4, "{rows:?}");
    // With SQLite, not even the file's bytes hold a secret (PostgreSQL keeps its files elsewhere).
    let db = hub.state_dir.join("db").join("hub.db");
    let bytes = if upkeep_tests::postgres_store() { Vec::new() } else { std::fs::read(&db).expect("db bytes") };
    for t in [&t, &m2, &short, &fresh] {
        let secret = t.rsplit('.').next().expect("secret");
        assert!(rows.iter().all(|r| !r.contains(secret)), "a secret is stored in clear: {rows:?}");
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "the secret is in hub.db");
    }
    let listed = serde_json::to_string(&list).expect("json");
    assert!(!listed.contains(short.rsplit('.').next().expect("secret")), "token list shows no secret");
}
