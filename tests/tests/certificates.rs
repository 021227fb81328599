//! Certificates the hub refuses, over real mutual TLS with a CA generated per test: revocation by serial and by
//! forgetting a node (kept across a hub restart), and one clear line for a client whose certificate is revoked,
//! expired, or from another CA.

use std::time::Duration;
use upkeep_hub::pki::files;
use upkeep_tests::*;

const WAIT: Duration = Duration::from_secs(30);

async fn start_hub(pki: &TestPki, dir: &std::path::Path) -> TestHub {
    TestHub::start(pki, &dir.join("hub"), "127.0.0.1:0".parse().expect("addr")).await
}

/// Runs `upkeepctl whoami` as `stem` and returns its one-line error (asserting that it failed).
async fn refused_line(pki: &TestPki, hub: &str, stem: &str) -> String {
    let out = upkeepctl(pki, hub, stem, &["whoami"]).await;
    assert!(!out.status.success(), "{stem} should be refused: {}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_operator_certificate_is_refused_with_one_line_and_stays_refused_after_a_restart() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("tmp");
    let mut hub = start_hub(&pki, dir.path()).await;
    let url = hub.url();
    upkeep_hub::pki::issue(pki.path(), upkeep_core::ids::Role::Operator, "laptop").expect("issue");
    let stem = "operator-laptop";
    let ok = upkeepctl(&pki, &url, stem, &["whoami"]).await;
    assert!(ok.status.success(), "before revocation: {}", String::from_utf8_lossy(&ok.stderr));
    let serial = cert_serial(&pki.file(&format!("{stem}.pem")));

    // Bad input: named, nothing changed.
    let err = upkeepctl_refused(&pki, &url, &["pki", "revoke", "not-a-serial"]).await;
    assert!(err.contains("serial: ") && err.contains("openssl x509 -serial"), "{err}");
    assert!(upkeepctl_json(&pki, &url, &["pki", "revoked"]).await.expect("list").as_array().expect("array").is_empty());

    // Revoked in the form openssl prints (upper case, `serial=` prefix).
    let said =
        upkeepctl_ok(&pki, &url, &["pki", "revoke", &format!("serial={}", serial.to_uppercase()), "--reason", "lost"])
            .await;
    assert_eq!(said.trim(), format!("certificate {serial} revoked"));
    let err = refused_line(&pki, &url, stem).await;
    assert!(err.contains("--cert") && err.contains("revoked"), "{err}");
    // The operator's own certificate still works: one serial was revoked, not the CA.
    upkeepctl_ok(&pki, &url, &["whoami"]).await;

    hub.restart().await;
    let url = hub.url();
    let err = refused_line(&pki, &url, stem).await;
    assert!(err.contains("revoked"), "after a restart: {err}");
    let list = upkeepctl_json(&pki, &url, &["pki", "revoked"]).await.expect("list");
    let list = list.as_array().expect("array");
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["serial"], serial.as_str());
    assert_eq!(list[0]["reason"], "lost");
    assert_eq!(list[0]["revoked_by"], "upkeep://operator/admin");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_foreign_certificates_get_one_line_saying_which() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("tmp");
    let mut hub = start_hub(&pki, dir.path()).await;
    let url = hub.url();

    pki.expired_cert("operator-old", "upkeep://operator/old");
    let err = refused_line(&pki, &url, "operator-old").await;
    assert!(err.contains("--cert") && err.contains("expired"), "{err}");

    // A certificate from another fleet's CA, presented with this fleet's CA file.
    let other = TestPki::new();
    for ext in ["pem", "key"] {
        std::fs::copy(other.file(&format!("operator.{ext}")), pki.file(&format!("operator-foreign.{ext}")))
            .expect("cp");
    }
    let err = refused_line(&pki, &url, "operator-foreign").await;
    assert!(err.contains("--cert") && err.contains("not issued by the fleet CA"), "{err}");

    // The other way round: this client trusts another CA, so the hub's certificate is the one refused.
    let out = tokio::process::Command::new(bin("upkeepctl"))
        .args(["whoami"])
        .env("UPKEEP_HUB", &url)
        .env("UPKEEP_CA", other.file(files::CA_CERT))
        .env("UPKEEP_CERT", pki.file("operator.pem"))
        .env("UPKEEP_KEY", pki.file("operator.key"))
        .output()
        .await
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("hub's certificate") && err.contains("--ca"), "{err}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgetting_a_node_revokes_the_certificate_it_used_and_ends_its_session() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("tmp");
    let mut hub = start_hub(&pki, dir.path()).await;
    let url = hub.url();
    let node = make_node(&pki, dir.path(), &url, "n1", "m1", "pool", "eu", "Ubuntu-202401.01.0");
    let agent = TestAgent::start(&node);
    wait_for("n1 connected", WAIT, || {
        let fleet = hub.fleet();
        async move { fleet.is_connected("n1").then_some(()) }
    })
    .await;
    let serial = cert_serial(&pki.file("node-n1.pem"));

    let said = upkeepctl_ok(&pki, &url, &["node", "forget", "n1"]).await;
    assert!(said.contains("node n1 forgotten") && said.contains(&format!("certificate {serial} revoked")), "{said}");
    let list = upkeepctl_json(&pki, &url, &["pki", "revoked"]).await.expect("list");
    assert_eq!(list[0]["serial"], serial.as_str());
    assert_eq!(list[0]["subject"], "node n1");
    assert!(!hub.fleet().is_connected("n1"), "the session ended");

    // A new connection with the node's certificate is refused at the handshake (the agent's retries too), so
    // the node cannot report itself back.
    // (The probe the agent runs when a session fails before the hub's welcome.)
    let files = upkeep_proto::tls::ClientFiles {
        ca: pki.file(files::CA_CERT),
        cert: pki.file("node-n1.pem"),
        key: pki.file("node-n1.key"),
        settings: ["tls.ca".into(), "tls.cert".into(), "tls.key".into()],
    };
    let refusal = upkeep_proto::tls::probe_refusal(&url, &files).await;
    let refusal = refusal.expect("a certificate refusal");
    assert!(refusal.contains("tls.cert") && refusal.contains("revoked"), "{refusal}");
    let nodes = upkeepctl_json(&pki, &url, &["node", "list"]).await.expect("nodes");
    assert!(nodes["nodes"].as_array().expect("array").iter().all(|n| n["name"] != "n1"), "{nodes}");

    // Revocation survives a restart: after it, the agent (still retrying) is refused all the same.
    hub.restart().await;
    let list = upkeepctl_json(&pki, &hub.url(), &["pki", "revoked"]).await.expect("list");
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    agent.stop().await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pki_status_marks_an_expired_certificate_and_warns_about_it() {
    let pki = TestPki::new();
    pki.expired_cert("operator-old", "upkeep://operator/old");
    let dir = pki.path().to_string_lossy().to_string();
    // No hub needed: the files are read locally.
    let out = upkeepctl(&pki, "https://127.0.0.1:1", "operator", &["pki", "status", "--dir", &dir, "-o", "json"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let all = all.as_array().expect("array");
    let by_file = |name: &str| all.iter().find(|s| s["file"].as_str().is_some_and(|f| f.ends_with(name))).cloned();
    let old = by_file("operator-old.pem").expect("operator-old");
    assert_eq!(old["state"], "expired");
    assert_eq!(old["subject"], "upkeep://operator/old");
    assert_eq!(by_file("operator.pem").expect("operator")["state"], "ok");
    assert_eq!(by_file("ca.pem").expect("ca")["state"], "ok");
    let warnings = String::from_utf8_lossy(&out.stderr);
    assert_eq!(warnings.lines().count(), 1, "{warnings}");
    assert!(warnings.contains("operator-old.pem") && warnings.contains("expired"), "{warnings}");

    // Without --dir: this client's own files.
    let out = upkeepctl(&pki, "https://127.0.0.1:1", "operator-old", &["pki", "status"]).await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("upkeep://operator/old") && table.contains("expired"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_renews_its_certificate_at_two_thirds_of_its_life_without_dropping_its_session() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("tmp");
    let mut hub = start_hub(&pki, dir.path()).await;
    let url = hub.url();
    let node = make_node(&pki, dir.path(), &url, "n1", "m1", "pool", "eu", "Ubuntu-202401.01.0");
    // Its certificate: 30 days long, 25 of them gone (past 2/3), signed by the fleet CA.
    let now = time::OffsetDateTime::now_utc();
    pki.client_cert("node-n1", "upkeep://node/n1", now - time::Duration::days(25), now + time::Duration::days(5));
    let (cert, key) = (pki.file("node-n1.pem"), pki.file("node-n1.key"));
    let old_serial = cert_serial(&cert);
    let old_key = std::fs::read(&key).expect("key");
    let agent = TestAgent::start(&node);
    wait_for("n1 connected", WAIT, || {
        let fleet = hub.fleet();
        async move { fleet.is_connected("n1").then_some(()) }
    })
    .await;
    let new_serial = wait_for("the certificate renewed on disk", WAIT, || {
        let (cert, old) = (cert.clone(), old_serial.clone());
        async move { Some(cert_serial(&cert)).filter(|s| *s != old) }
    })
    .await;
    assert_ne!(std::fs::read(&key).expect("key"), old_key, "a fresh key");
    let pem = std::fs::read(&cert).expect("cert");
    let status =
        upkeep_hub::certstatus::status_of_pem(&cert, &pem, chrono::Utc::now().timestamp(), 14).expect("status");
    assert_eq!(status.subject, "upkeep://node/n1");
    assert!(status.days_left >= 29, "a new 30-day certificate: {status:?}");
    assert!(hub.fleet().is_connected("n1"), "the session went on while renewing");

    // The old certificate revoked and the hub restarted: the agent comes back with the new one.
    upkeepctl_ok(&pki, &url, &["pki", "revoke", &old_serial]).await;
    hub.restart().await;
    wait_for("n1 back with its renewed certificate", WAIT, || {
        let fleet = hub.fleet();
        async move { fleet.is_connected("n1").then_some(()) }
    })
    .await;
    // The hub noted the new serial when it signed it: forgetting the node revokes it too.
    let said = upkeepctl_ok(&pki, &hub.url(), &["node", "forget", "n1"]).await;
    assert!(said.contains(&format!("certificate {new_serial} revoked")), "{said}");
    agent.stop().await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_open_when_its_certificate_is_revoked_is_closed_before_its_next_call_is_served() {
    use upkeep_proto::v1;
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("tmp");
    let mut hub = start_hub(&pki, dir.path()).await;
    let url = hub.url();
    upkeep_hub::pki::issue(pki.path(), upkeep_core::ids::Role::Operator, "laptop").expect("issue");
    let ch = mtls_channel(&pki, &url, &pki.file("operator-laptop.pem"), &pki.file("operator-laptop.key")).await;
    let mut laptop = v1::operator_service_client::OperatorServiceClient::new(ch);
    let me = laptop.who_am_i(v1::WhoAmIRequest {}).await.expect("served before the revocation").into_inner();
    assert!(format!("{me:?}").contains("laptop"), "{me:?}");

    let serial = cert_serial(&pki.file("operator-laptop.pem"));
    upkeepctl_ok(&pki, &url, &["pki", "revoke", &serial]).await;
    // The same open connection: the next call is not served.
    let err = laptop.who_am_i(v1::WhoAmIRequest {}).await.expect_err("not served after the revocation");
    assert_ne!(err.code(), tonic::Code::Ok, "{err:?}");
    // Every other operator is unaffected.
    upkeepctl_ok(&pki, &url, &["whoami"]).await;
    hub.stop().await;
}
