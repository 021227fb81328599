//! The hub under abuse (issue "Robust under abuse"): a real `upkeep-hub` process, idle sockets that never finish a
//! TLS handshake and a node certificate opening image downloads it never reads, while an operator lists nodes
//! and another node downloads its image. Figures (hub RSS, descriptors, `node list` latency) are printed.

use std::path::Path;
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use upkeep_hub::pki::files;
use upkeep_proto::v1;
use upkeep_tests::*;

const IDLE_SOCKETS: usize = 1000;
const UNREAD_FETCHES: usize = 200;
const IMAGE_BYTES: usize = 8 * 1024 * 1024;

/// An mTLS channel to the hub with `name`'s node certificate.
async fn node_channel(pki: &TestPki, url: &str, name: &str) -> Channel {
    let ca = std::fs::read(pki.file(files::CA_CERT)).expect("ca");
    let (cert, key) = pki.node(name);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(std::fs::read(&cert).expect("cert"), std::fs::read(&key).expect("key")))
        .domain_name("127.0.0.1");
    Endpoint::from_shared(url.to_string()).expect("url").tls_config(tls).expect("tls").connect().await.expect("connect")
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count()).unwrap_or(0)
}

/// Publishes a signed image of `IMAGE_BYTES` and returns its sha256.
async fn publish_big_image(pki: &TestPki, url: &str, work: &Path) -> (String, u64) {
    let keys = work.join("keys");
    upkeep_hub::image_tools::keygen(&keys).expect("keygen");
    let img = work.join("big.tar");
    let payload = vec![0x5a_u8; IMAGE_BYTES];
    let (sha, size) =
        upkeep_hub::image_tools::build_test_image(&img, "Debian-12", "202312.01.0", &[("var/big", &payload)])
            .expect("image");
    upkeep_hub::image_tools::sign(&keys.join("upkeep-image.key"), &img).expect("sign");
    let img = img.to_string_lossy().into_owned();
    upkeepctl_ok(
        pki,
        url,
        &["image", "publish", "--family", "Debian-12", "--version", "202312.01.0", "--regions", "eu", "--file", &img],
    )
    .await;
    (sha, size)
}

/// Downloads the whole image over `channel`; returns the bytes received.
async fn download(channel: Channel, sha256: &str) -> Result<u64, tonic::Status> {
    let mut c = v1::agent_service_client::AgentServiceClient::new(channel);
    let mut s = c.fetch_image(v1::FetchImageRequest { sha256: sha256.to_string(), offset: 0 }).await?.into_inner();
    let mut got = 0u64;
    while let Some(chunk) = s.message().await? {
        got += chunk.data.len() as u64;
    }
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_handshakes_and_unread_downloads_do_not_starve_operators_or_other_nodes() {
    // This process holds ~1,200 sockets of its own.
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    assert!(hard >= 4096, "the test needs RLIMIT_NOFILE >= 4096 (hard limit {hard})");

    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let hub = HubProcess::start_logged(
        &pki,
        &work.path().join("hub"),
        3,
        "[auto_upgrade]\nenabled = false\n[limits]\nhandshake_timeout_seconds = 3\n",
    )
    .await;
    let url = hub.url();
    let pid = hub.pid().expect("hub pid");
    let (sha, size) = publish_big_image(&pki, &url, work.path()).await;
    let (rss0, fds0, threads0) = (rss_kib(pid), open_fds(pid), threads(pid));

    // 1,000 sockets that never say a word.
    let mut idle = Vec::new();
    for _ in 0..IDLE_SOCKETS {
        idle.push(tokio::net::TcpStream::connect(hub.addr).await.expect("connect"));
    }
    // One node certificate opens 200 downloads and reads none of them.
    let greedy = node_channel(&pki, &url, "greedy").await;
    let mut held = Vec::new();
    let mut exhausted = 0;
    for _ in 0..UNREAD_FETCHES {
        let mut c = v1::agent_service_client::AgentServiceClient::new(greedy.clone());
        match c.fetch_image(v1::FetchImageRequest { sha256: sha.clone(), offset: 0 }).await {
            Ok(stream) => held.push(stream.into_inner()),
            Err(s) if s.code() == tonic::Code::ResourceExhausted => exhausted += 1,
            Err(s) => panic!("unexpected refusal: {s:?}"),
        }
    }
    assert_eq!(held.len(), 2, "a node may hold 2 downloads (limits.fetches_per_node)");
    assert_eq!(exhausted, UNREAD_FETCHES - 2);
    let refusal = {
        let mut c = v1::agent_service_client::AgentServiceClient::new(greedy.clone());
        c.fetch_image(v1::FetchImageRequest { sha256: sha.clone(), offset: 0 }).await.expect_err("over the limit")
    };
    assert!(refusal.message().contains("already has 2 image downloads open"), "{}", refusal.message());

    // Meanwhile an operator lists nodes quickly and another node gets its whole image.
    let mut latencies = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        upkeepctl_ok(&pki, &url, &["node", "list"]).await;
        latencies.push(t.elapsed());
    }
    latencies.sort();
    let t = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(15), download(node_channel(&pki, &url, "other").await, &sha))
        .await
        .expect("the other node's download finishes within 15 s")
        .expect("download");
    let download_time = t.elapsed();
    assert_eq!(got, size, "the other node got the whole image");
    let (rss1, fds1, threads1) = (rss_kib(pid), open_fds(pid), threads(pid));
    eprintln!(
        "under abuse ({IDLE_SOCKETS} idle sockets, {} unread downloads held, {exhausted} refused): node list median \
         {:?} max {:?}; another node's {size}-byte download {download_time:?}; hub RSS {rss0} -> {rss1} KiB, fds {fds0} \
         -> {fds1}, threads {threads0} -> {threads1}",
        held.len(),
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1],
    );
    assert!(latencies[latencies.len() - 1] < Duration::from_secs(1), "node list took {latencies:?}");
    assert!(threads1 <= threads0 + 8, "no thread per stream: {threads0} -> {threads1} threads");
    assert!(rss1 < rss0 + 64 * 1024, "hub RSS grew from {rss0} to {rss1} KiB");

    // Handshakes that never finish are closed at their deadline (3 s): the hub's descriptors come back.
    let closed = wait_for("the idle sockets closed by the hub", Duration::from_secs(20), || async {
        let fds = open_fds(pid);
        (fds < fds0 + 100).then_some(fds)
    })
    .await;
    eprintln!("after the handshake deadline: hub fds {closed} (were {fds1} with the idle sockets)");
    drop(idle);
    drop(held);
    // And the greedy node can download again once it let go of its streams.
    let again = wait_for("the greedy node downloads once it let go", Duration::from_secs(20), || async {
        download(greedy.clone(), &sha).await.ok()
    })
    .await;
    assert_eq!(again, size);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_its_descriptor_limit_the_hub_refuses_new_node_connections_and_keeps_serving_operators() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    // The hub under a 400-descriptor limit: 144 connections, 36 of them kept for operators (hub/src/door.rs).
    let dir = work.path().join("hub");
    let config = write_hub_config_with(&pki, &dir, "[auto_upgrade]\nenabled = false\n");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let url = format!("https://127.0.0.1:{port}");
    let mut hub = tokio::process::Command::new("prlimit")
        .arg("--nofile=400:400")
        .arg(bin("upkeep-hub"))
        .arg("--config")
        .arg(&config)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn upkeep-hub under prlimit");
    wait_for("upkeep-hub answers", Duration::from_secs(30), || async {
        upkeepctl(&pki, &url, "viewer", &["whoami"]).await.status.success().then_some(())
    })
    .await;
    // Node certificates fill every connection they may have, and more.
    let mut nodes = Vec::new();
    let mut refused = 0;
    for i in 0..160 {
        let ca = std::fs::read(pki.file(files::CA_CERT)).expect("ca");
        let (cert, key) = pki.node(&format!("n{i}"));
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(std::fs::read(&cert).expect("cert"), std::fs::read(&key).expect("key")))
            .domain_name("127.0.0.1");
        let ch = Endpoint::from_shared(url.clone()).expect("url").tls_config(tls).expect("tls").connect_lazy();
        let mut c = v1::operator_service_client::OperatorServiceClient::new(ch.clone());
        // Any call makes the connection; a node certificate is refused by the operator service, which is fine:
        // the connection is what counts. A connection over the node cap is closed by the door.
        match c.who_am_i(v1::WhoAmIRequest {}).await {
            Err(s) if s.code() == tonic::Code::PermissionDenied => nodes.push(ch),
            Err(_) => refused += 1,
            Ok(_) => nodes.push(ch),
        }
    }
    eprintln!("node connections held {}, refused {refused}", nodes.len());
    assert!(refused > 0, "the door refused node connections past its cap");
    assert!(nodes.len() <= 144 - 36, "at most the node share was held: {}", nodes.len());
    // The operator still gets in, quickly.
    let t = Instant::now();
    upkeepctl_ok(&pki, &url, &["node", "list"]).await;
    assert!(t.elapsed() < Duration::from_secs(1), "node list took {:?}", t.elapsed());
    drop(nodes);
    hub.kill().await.expect("kill hub");
}

/// Opens a session for node `name` on its own connection, registers and waits for the Welcome. The sender is
/// returned so that the request stream stays open (dropping it would end the session from the node's side).
async fn registered_session(
    pki: &TestPki,
    url: &str,
    name: &str,
) -> (tokio::sync::mpsc::Sender<v1::AgentMessage>, tonic::Streaming<v1::HubMessage>) {
    let mut client = v1::agent_service_client::AgentServiceClient::new(node_channel(pki, url, name).await);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let register = v1::NodeReport {
        node_name: name.into(),
        member: "m1".into(),
        node_pool: "p1".into(),
        region: "eu".into(),
        ..Default::default()
    };
    tx.send(v1::AgentMessage { body: Some(v1::agent_message::Body::Register(register)) }).await.expect("queue");
    let mut inbound =
        client.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("session opens").into_inner();
    let first = inbound.message().await.expect("first message").expect("a message");
    assert!(matches!(first.body, Some(v1::hub_message::Body::Welcome(_))), "{first:?}");
    (tx, inbound)
}

/// Reads a session until it ends; returns how it ended (None: the hub closed the stream cleanly).
async fn until_ended(mut inbound: tonic::Streaming<v1::HubMessage>) -> Option<tonic::Status> {
    loop {
        match inbound.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => return None,
            Err(s) => return Some(s),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_connection_is_closed_and_its_descriptor_freed() {
    // The hub sends no HTTP/2 pings; a node connection that says nothing past the node's silence deadline plus
    // slack (here 2 s + 10 s) is closed by the door, and one that heartbeats is left alone.
    const MUTE: usize = 10;
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let hub = HubProcess::start_logged(&pki, &work.path().join("hub"), 2, "[auto_upgrade]\nenabled = false\n").await;
    let url = hub.url();
    let pid = hub.pid().expect("hub pid");
    let fds0 = open_fds(pid);

    let (talker_tx, talker_in) = registered_session(&pki, &url, "talker").await;
    let talker = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut seq = 0;
        let ended = tokio::spawn(until_ended(talker_in));
        loop {
            tick.tick().await;
            seq += 1;
            let hb = v1::AgentMessage { body: Some(v1::agent_message::Body::Heartbeat(v1::Heartbeat { seq })) };
            if talker_tx.send(hb).await.is_err() || ended.is_finished() {
                return ended.await.expect("reader");
            }
        }
    });
    let mut mutes = Vec::new();
    for i in 0..MUTE {
        let (tx, inbound) = registered_session(&pki, &url, &format!("mute-{i}")).await;
        let registered = Instant::now();
        mutes.push((tx, registered, tokio::spawn(until_ended(inbound))));
    }
    let fds1 = open_fds(pid);
    assert!(fds1 > fds0 + MUTE, "every session holds a descriptor: {fds0} -> {fds1}");

    for (i, (_tx, registered, ended)) in mutes.into_iter().enumerate() {
        let how = tokio::time::timeout(Duration::from_secs(40), ended)
            .await
            .unwrap_or_else(|_| panic!("mute-{i}'s connection still open 40 s after it fell silent"))
            .expect("reader");
        let after = registered.elapsed();
        eprintln!("mute-{i}: session ended after {after:?} of silence: {how:?}");
        assert!(after >= Duration::from_secs(2), "closed before the silence deadline: {after:?}");
    }
    let fds2 = wait_for("the silent connections' descriptors back", Duration::from_secs(10), || async {
        let fds = open_fds(pid);
        (fds + MUTE <= fds1).then_some(fds)
    })
    .await;
    eprintln!("hub descriptors: {fds0} idle, {fds1} with {} sessions, {fds2} after the silent ones closed", MUTE + 1);
    assert!(!talker.is_finished(), "the heartbeating node's session is still open: {:?}", talker.await);
    talker.abort();
}
