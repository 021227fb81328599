//! Foundation scenarios over real mutual TLS with a CA generated per test: registration and reporting,
//! refused identities, hub restarts, and bad configuration.

use serde_json::Value;
use std::time::Duration;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use upkeep_hub::pki::files;
use upkeep_proto::v1;
use upkeep_tests::*;

const WAIT: Duration = Duration::from_secs(30);

fn node_named<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list["nodes"].as_array()?.iter().find(|n| n["name"] == name)
}

async fn start_hub(pki: &TestPki, dir: &std::path::Path) -> TestHub {
    TestHub::start(pki, &dir.join("hub"), "127.0.0.1:0".parse().expect("addr")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sec1_a_patched_node_reports_the_patch_folded_in_and_its_booted_image_apart() {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let hub = start_hub(&pki, work.path()).await;
    let node =
        make_node(&pki, work.path(), &hub.url(), "node-p", "m1", "pool1", "eu-west", "Ubuntu-2204gen2-202311.07.0");
    let agent = TestAgent::start(&node);
    wait_for("node-p Ready", WAIT, || async {
        let n = upkeepctl_json(&pki, &hub.url(), &["node", "show", "node-p"]).await.ok()?;
        (n["status"] == "Ready").then_some(())
    })
    .await;

    // A security patch newer than the image is applied on the node (as the agent records one).
    std::fs::write(node.root.join("etc/upkeep/security-patch"), "202312.05.1\n").expect("write");
    let n = wait_for("the patch reported", WAIT, || async {
        let n = upkeepctl_json(&pki, &hub.url(), &["node", "show", "node-p"]).await.ok()?;
        (n["security_patch_version"] == "202312.05.1").then_some(n)
    })
    .await;
    assert_eq!(n["node_image_version"], "Ubuntu-2204gen2-202312.05.1", "{n}");
    assert_eq!(n["labels"]["upkeep.io/node-image-version"], "Ubuntu-2204gen2-202312.05.1", "{n}");
    assert_eq!(n["booted_image_version"], "Ubuntu-2204gen2-202311.07.0", "{n}");
    // What the hub's decisions read: the booted image, not the folded string.
    let stored = hub.fleet().store().get_node("node-p").expect("store").expect("node");
    assert_eq!(stored.facts.image_version(), "Ubuntu-2204gen2-202311.07.0");
    assert_eq!(stored.facts.node_image_version, "Ubuntu-2204gen2-202312.05.1");

    let out = upkeepctl(&pki, &hub.url(), "viewer", &["node", "show", "node-p"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Ubuntu-2204gen2-202312.05.1") && text.contains("Booted image:"), "{text}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_registers_reports_and_heartbeats_and_node_list_shows_its_image_version() {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let hub = start_hub(&pki, work.path()).await;
    let node =
        make_node(&pki, work.path(), &hub.url(), "node-a", "m1", "pool1", "eu-west", "Ubuntu-2204gen2-202311.07.0");
    let agent = TestAgent::start(&node);

    // Registered, with its image label and the member's default channel adopted and reported back.
    let first = wait_for("node-a Ready with channel NodeImage", WAIT, || async {
        let list = upkeepctl_json(&pki, &hub.url(), &["node", "list"]).await.ok()?;
        let n = node_named(&list, "node-a")?.clone();
        (n["status"] == "Ready" && n["channel"] == "NodeImage").then_some(n)
    })
    .await;
    assert_eq!(first["labels"]["upkeep.io/node-image-version"], "Ubuntu-2204gen2-202311.07.0");
    assert_eq!(first["node_image_version"], "Ubuntu-2204gen2-202311.07.0");
    assert_eq!((first["member"].as_str(), first["node_pool"].as_str()), (Some("m1"), Some("pool1")));
    assert_eq!(first["region"], "eu-west");
    assert_eq!(first["os_family"], "debian");
    assert_eq!(first["agent_version"], upkeep_proto::VERSION);

    // Heartbeats move last_seen forward (1 s interval in tests).
    let t0 = first["last_seen"].as_str().expect("last_seen").to_string();
    wait_for("last_seen to advance", WAIT, || async {
        let list = upkeepctl_json(&pki, &hub.url(), &["node", "list"]).await.ok()?;
        let t = node_named(&list, "node-a")?["last_seen"].as_str()?.to_string();
        (t > t0).then_some(())
    })
    .await;

    // A change on the node is reported without a restart.
    std::fs::write(node.root.join("etc/upkeep/node-image"), "FAMILY=Ubuntu-2204gen2\nVERSION=202312.01.3\n")
        .expect("write");
    wait_for("new image version reported", WAIT, || async {
        let n = upkeepctl_json(&pki, &hub.url(), &["node", "show", "node-a"]).await.ok()?;
        (n["node_image_version"] == "Ubuntu-2204gen2-202312.01.3").then_some(())
    })
    .await;

    // The table carries the label form.
    let out = upkeepctl(&pki, &hub.url(), "viewer", &["node", "list"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("upkeep.io/node-image-version=Ubuntu-2204gen2-202312.01.3"), "{table}");

    // The member exists with the default channel; an operator's channel change reaches the agent.
    let members = upkeepctl_json(&pki, &hub.url(), &["member", "list"]).await.expect("member list");
    assert_eq!(members["members"][0]["name"], "m1");
    assert_eq!(members["members"][0]["node_os_channel"], "NodeImage");
    let out = upkeepctl(&pki, &hub.url(), "operator", &["member", "set-channel", "m1", "SecurityPatch"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("agent adopts SecurityPatch", WAIT, || async {
        let n = upkeepctl_json(&pki, &hub.url(), &["node", "show", "node-a"]).await.ok()?;
        (n["channel"] == "SecurityPatch").then_some(())
    })
    .await;
    agent.stop().await;
}

/// A raw operator-service client with the given identity (or none).
async fn raw_client(
    pki: &TestPki,
    hub: &TestHub,
    ca_pem: Vec<u8>,
    identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
) -> Result<v1::operator_service_client::OperatorServiceClient<tonic::transport::Channel>, tonic::transport::Error> {
    let _ = pki;
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)).domain_name("127.0.0.1");
    if let Some((c, k)) = identity {
        tls = tls.identity(Identity::from_pem(std::fs::read(c).expect("cert"), std::fs::read(k).expect("key")));
    }
    let ch = Endpoint::from_shared(hub.url()).expect("url").tls_config(tls).expect("tls").connect().await?;
    Ok(v1::operator_service_client::OperatorServiceClient::new(ch))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_identities() {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let hub = start_hub(&pki, work.path()).await;
    let ca = std::fs::read(pki.file(files::CA_CERT)).expect("ca");

    // No client certificate: the TLS handshake or the first call fails; nothing is served.
    let no_cert = match raw_client(&pki, &hub, ca.clone(), None).await {
        Ok(mut c) => c.list_nodes(v1::ListNodesRequest::default()).await.is_err(),
        Err(_) => true,
    };
    assert!(no_cert, "a client without a certificate must be refused");

    // A certificate from another CA.
    let other = TestPki::new();
    let foreign = match raw_client(
        &pki,
        &hub,
        ca.clone(),
        Some((other.file("operator.pem"), other.file("operator.key"))),
    )
    .await
    {
        Ok(mut c) => c.list_nodes(v1::ListNodesRequest::default()).await.is_err(),
        Err(_) => true,
    };
    assert!(foreign, "a certificate from another CA must be refused");

    // A good operator certificate works over the same path (so the two refusals above are meaningful).
    let mut op = raw_client(&pki, &hub, ca.clone(), Some((pki.file("operator.pem"), pki.file("operator.key"))))
        .await
        .expect("operator connects");
    let me = op.who_am_i(v1::WhoAmIRequest {}).await.expect("whoami").into_inner();
    assert_eq!((me.role.as_str(), me.name.as_str()), ("operator", "admin"));

    // A node certificate reporting as another node.
    let (cert, key) = pki.node("node-a");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.clone()))
        .identity(Identity::from_pem(std::fs::read(&cert).expect("c"), std::fs::read(&key).expect("k")))
        .domain_name("127.0.0.1");
    let ch =
        Endpoint::from_shared(hub.url()).expect("url").tls_config(tls).expect("tls").connect().await.expect("connect");
    let mut agent = v1::agent_service_client::AgentServiceClient::new(ch.clone());
    let report = v1::NodeReport {
        node_name: "node-b".into(),
        member: "m1".into(),
        node_pool: "p1".into(),
        region: "eu".into(),
        ..Default::default()
    };
    let msgs = tokio_stream::iter(vec![v1::AgentMessage { body: Some(v1::agent_message::Body::Register(report)) }]);
    let err = match agent.session(msgs).await {
        Err(s) => s,
        Ok(resp) => resp.into_inner().message().await.expect_err("refused"),
    };
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("may report only for itself"), "{}", err.message());

    // A node certificate on the operator service.
    let mut as_operator = v1::operator_service_client::OperatorServiceClient::new(ch);
    let err = as_operator.list_nodes(v1::ListNodesRequest::default()).await.expect_err("refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    // A viewer may read but not write: one readable line, non-zero exit, nothing changed.
    let node = make_node(&pki, work.path(), &hub.url(), "node-c", "m1", "p1", "eu", "Debian-12-202311.07.0");
    let a = TestAgent::start(&node);
    wait_for("node-c registered", WAIT, || async {
        let list = upkeepctl_json(&pki, &hub.url(), &["node", "list"]).await.ok()?;
        node_named(&list, "node-c").map(|_| ())
    })
    .await;
    let read = upkeepctl(&pki, &hub.url(), "viewer", &["member", "list"]).await;
    assert!(read.status.success(), "viewer reads: {}", String::from_utf8_lossy(&read.stderr));
    let write = upkeepctl(&pki, &hub.url(), "viewer", &["member", "set-channel", "m1", "None"]).await;
    assert!(!write.status.success());
    let stderr = String::from_utf8_lossy(&write.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("PermissionDenied") && stderr.contains("upkeep://viewer/viewer"), "{stderr}");
    let m = upkeepctl_json(&pki, &hub.url(), &["member", "show", "m1"]).await.expect("show");
    assert_eq!(m["node_os_channel"], "NodeImage", "the refused write changed nothing");

    // A certificate with an unknown role is refused by the hub too.
    let (c, k) = pki.raw_uri_cert("admin-x", "upkeep://admin/x");
    let mut bad = raw_client(&pki, &hub, ca, Some((c, k))).await.expect("tls accepts the chain");
    let err = bad.list_nodes(v1::ListNodesRequest::default()).await.expect_err("refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("unknown role"), "{}", err.message());
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_restart_agents_reconnect_and_inventory_survives() {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let mut hub = start_hub(&pki, work.path()).await;
    let names = ["n1", "n2", "n3"];
    let agents: Vec<TestAgent> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let node = make_node(
                &pki,
                work.path(),
                &hub.url(),
                n,
                &format!("m{}", i % 2),
                "p1",
                "eu",
                "Debian-12-202311.07.0",
            );
            TestAgent::start(&node)
        })
        .collect();
    let url = hub.url();
    wait_for("three nodes Ready", WAIT, || async {
        let list = upkeepctl_json(&pki, &url, &["node", "list"]).await.ok()?;
        (names.iter().all(|n| node_named(&list, n).is_some_and(|v| v["status"] == "Ready"))).then_some(())
    })
    .await;

    hub.stop().await;
    // While the hub is down, the inventory is still stored: reopen the store directly.
    let store = hub.open_store();
    assert_eq!(store.list_nodes(None).expect("nodes").len(), 3);
    drop(store);

    hub.restart().await;
    assert_eq!(hub.url(), url, "same address after restart");
    let list = upkeepctl_json(&pki, &url, &["node", "list"]).await.expect("list right after restart");
    assert_eq!(list["nodes"].as_array().map(Vec::len), Some(3), "inventory survived the restart");
    wait_for("every agent reconnected on its own", WAIT, || async {
        let list = upkeepctl_json(&pki, &url, &["node", "list"]).await.ok()?;
        (names.iter().all(|n| node_named(&list, n).is_some_and(|v| v["status"] == "Ready" && v["connected"] == true)))
            .then_some(())
    })
    .await;
    for a in agents {
        a.stop().await;
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_node_becomes_unknown() {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let hub = start_hub(&pki, work.path()).await;
    let node = make_node(&pki, work.path(), &hub.url(), "quiet", "m1", "p1", "eu", "Debian-12-202311.07.0");
    let agent = TestAgent::start(&node);
    wait_for("quiet Ready", WAIT, || async {
        let n = upkeepctl_json(&pki, &hub.url(), &["node", "show", "quiet"]).await.ok()?;
        (n["status"] == "Ready").then_some(())
    })
    .await;
    agent.stop().await;
    let n = wait_for("quiet Unknown once its session is gone", WAIT, || async {
        let n = upkeepctl_json(&pki, &hub.url(), &["node", "show", "quiet"]).await.ok()?;
        (n["status"] == "Unknown").then_some(n)
    })
    .await;
    assert_eq!(n["connected"], false);
    assert!(n["last_seen"].is_string(), "the last time it was heard from is still shown");
}

fn run(bin_name: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin(bin_name)).args(args).output().expect("spawn")
}

fn one_line_error(out: &std::process::Output) -> String {
    assert!(!out.status.success(), "expected failure, got success: {}", String::from_utf8_lossy(&out.stdout));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    stderr
}

#[test]
fn bad_agent_config_gives_one_line_naming_file_and_key() {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let node = make_node(&pki, work.path(), "https://127.0.0.1:1", "n1", "m1", "p1", "eu", "Debian-12-202311.07.0");
    let good = std::fs::read_to_string(&node.config).expect("read");
    let cfg = node.config.to_str().expect("utf8");
    let ok = run("upkeep-agent", &["--config", cfg, "check-config"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));

    let cases: Vec<(String, &str)> = vec![
        (good.replace("node-n1.pem", "node-missing.pem"), "tls.cert: "),
        (format!("colour = \"blue\"\n{good}"), "colour: unknown field"),
        (good.replace("https://127.0.0.1:1", "https://127.0.0.1:notaport"), "hub: malformed address"),
        (good.replace("member = \"m1\"", "member = \"M 1\""), "member: invalid member"),
    ];
    for (text, expect) in cases {
        std::fs::write(&node.config, &text).expect("write");
        let err = one_line_error(&run("upkeep-agent", &["--config", cfg, "check-config"]));
        assert!(err.contains("agent.toml: ") && err.contains(expect), "expected {expect:?} in {err}");
    }

    // A certificate whose identity has an unknown role, and a viewer certificate in an agent.
    let (c, _k) = pki.raw_uri_cert("weird", "upkeep://admin/n1");
    std::fs::write(&node.config, good.replace(&*pki.file("node-n1.pem").to_string_lossy(), &c.to_string_lossy()))
        .expect("write");
    let err = one_line_error(&run("upkeep-agent", &["--config", cfg, "check-config"]));
    assert!(err.contains("tls.cert: ") && err.contains("unknown role"), "{err}");
    let viewer = pki.file("viewer.pem");
    std::fs::write(&node.config, good.replace(&*pki.file("node-n1.pem").to_string_lossy(), &viewer.to_string_lossy()))
        .expect("write");
    let err = one_line_error(&run("upkeep-agent", &["--config", cfg, "check-config"]));
    assert!(err.contains("tls.cert: ") && err.contains("needs a node certificate"), "{err}");
}

#[test]
fn bad_hub_config_and_cli_input_give_one_line() {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let path = write_hub_config(&pki, work.path());
    let p = path.to_str().expect("utf8");
    let ok = run("upkeep-hub", &["--config", p, "check-config"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let good = std::fs::read_to_string(&path).expect("read");
    std::fs::write(&path, format!("plaintext_port = 80\n{good}")).expect("write");
    let err = one_line_error(&run("upkeep-hub", &["--config", p, "check-config"]));
    assert!(err.contains("hub.toml: plaintext_port: unknown field"), "{err}");
    std::fs::write(&path, good.replace("hub.key", "nope.key")).expect("write");
    let err = one_line_error(&run("upkeep-hub", &["--config", p, "check-config"]));
    assert!(err.contains("hub.toml: tls.key: "), "{err}");

    // upkeepctl: a missing certificate file names the flag; pki init refuses to overwrite a CA.
    let err = one_line_error(&run(
        "upkeepctl",
        &["--hub", "https://127.0.0.1:1", "--ca", "/nonexistent/ca.pem", "--cert", "x", "--key", "y", "node", "list"],
    ));
    assert!(err.contains("--ca = /nonexistent/ca.pem"), "{err}");
    let err = one_line_error(&run("upkeepctl", &["pki", "init", "--dir", pki.path().to_str().expect("utf8")]));
    assert!(err.contains("already exists"), "{err}");
    let err = one_line_error(&run(
        "upkeepctl",
        &["pki", "issue-node", "--dir", pki.path().to_str().expect("utf8"), "--name", "Bad Name"],
    ));
    assert!(err.contains("invalid certificate name"), "{err}");
}

#[test]
fn completions_man_pages_and_yaml_come_from_the_cli_definition() {
    let out = run("upkeepctl", &["completions", "bash"]);
    assert!(out.status.success());
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(script.contains("upkeepctl") && script.contains("set-window"), "bash completion covers subcommands");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run("upkeepctl", &["man", "--dir", dir.path().to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let page = std::fs::read_to_string(dir.path().join("upkeepctl-run-watch.1")).expect("a page per subcommand");
    assert!(page.contains(".TH"), "roff man page");
    let pki = dir.path().join("pki");
    let out = run("upkeepctl", &["pki", "init", "--dir", pki.to_str().expect("utf8"), "-o", "yaml"]);
    assert!(out.status.success());
    let yaml = String::from_utf8_lossy(&out.stdout);
    assert!(yaml.starts_with("files:\n- "), "{yaml}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_os_behaves_as_none_and_the_hub_shows_why() {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let hub = start_hub(&pki, work.path()).await;
    let node = make_node(&pki, work.path(), &hub.url(), "odd", "m1", "p1", "eu", "Debian-12-202311.07.0");
    std::fs::remove_file(node.root.join("etc/os-release")).expect("no os-release");
    let agent = TestAgent::start(&node);
    let n = wait_for("the channel note reaches the hub", WAIT, || async {
        let n = upkeepctl_json(&pki, &hub.url(), &["node", "show", "odd"]).await.ok()?;
        n["channel_note"].as_str().is_some_and(|s| s.contains("unknown OS")).then_some(n)
    })
    .await;
    assert_eq!(n["os_family"], "unknown", "{n}");
    assert!(n["channel_note"].as_str().unwrap_or_default().contains("None"), "says it behaves as None: {n}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_patch_is_refused_for_an_azure_linux_gpu_pool_naming_the_pool() {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let hub = start_hub(&pki, work.path()).await;
    let node = make_node(&pki, work.path(), &hub.url(), "g1", "m1", "gpu-pool", "eu", "AzureLinux-3-202311.07.0");
    std::fs::write(node.root.join("etc/os-release"), "ID=azurelinux\nVERSION_ID=\"3.0\"\n").expect("os-release");
    let cfg = std::fs::read_to_string(&node.config).expect("read");
    std::fs::write(&node.config, format!("hardware_class = \"gpu\"\n{cfg}")).expect("write");
    let agent = TestAgent::start(&node);
    wait_for("g1 registered as azurelinux", WAIT, || async {
        let n = upkeepctl_json(&pki, &hub.url(), &["node", "show", "g1"]).await.ok()?;
        (n["os_family"] == "azurelinux" && n["hardware_class"] == "gpu").then_some(())
    })
    .await;
    let out = upkeepctl(&pki, &hub.url(), "operator", &["member", "set-channel", "m1", "SecurityPatch"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("FailedPrecondition") && err.contains("\"gpu-pool\""), "names the pool: {err}");
    let m = upkeepctl_json(&pki, &hub.url(), &["member", "show", "m1"]).await.expect("show");
    assert_eq!(m["node_os_channel"], "NodeImage", "nothing changed");
    let ok = upkeepctl(&pki, &hub.url(), "operator", &["member", "set-channel", "m1", "None"]).await;
    assert!(ok.status.success(), "other channels are fine: {}", String::from_utf8_lossy(&ok.stderr));
    agent.stop().await;
}
