//! CloudEvents webhooks (docs/webhooks.md) through a real `upkeep-hub` process, real agents and the real
//! upkeepctl: a receiver on the loopback that refuses the first deliveries, a run, the hub SIGKILLed mid-run, and
//! afterwards every event of the run arrived (no gaps, in order per subject, the same ids again, signatures good).

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use upkeep_tests::*;

const WAIT: Duration = Duration::from_secs(90);
/// The receiver answers 500 to this many deliveries first.
const REFUSED: usize = 6;
const SECRET: &str = "a shared secret for the test";

/// One POST the receiver got: its signature header, its body, and whether it was accepted (2xx).
#[derive(Debug, Clone)]
struct Got {
    signature: String,
    content_type: String,
    body: String,
    accepted: bool,
}

/// A small HTTP/1.1 receiver on 127.0.0.1: answers 500 to the first `refuse` requests, then 204.
async fn receiver(refuse: usize) -> (u16, Arc<Mutex<Vec<Got>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the receiver");
    let port = listener.local_addr().expect("addr").port();
    let got: Arc<Mutex<Vec<Got>>> = Arc::default();
    let log = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // The head, then as many body bytes as Content-Length says.
                let (head, mut body) = loop {
                    let Ok(n) = sock.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break (String::from_utf8_lossy(&buf[..i]).to_string(), buf[i + 4..].to_vec());
                    }
                };
                let header = |name: &str| {
                    head.lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                        })
                        .unwrap_or_default()
                };
                let len: usize = header("content-length").parse().unwrap_or(0);
                while body.len() < len {
                    let Ok(n) = sock.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    body.extend_from_slice(&chunk[..n]);
                }
                let accepted = {
                    let mut l = log.lock().expect("log");
                    let accepted = l.len() >= refuse;
                    l.push(Got {
                        signature: header("upkeep-signature"),
                        content_type: header("content-type"),
                        body: String::from_utf8_lossy(&body).to_string(),
                        accepted,
                    });
                    accepted
                };
                let status = if accepted { "204 No Content" } else { "500 Internal Server Error" };
                let _ = sock
                    .write_all(
                        format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
                    )
                    .await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (port, got)
}

fn accepted_events(got: &[Got]) -> Vec<Value> {
    got.iter().filter(|g| g.accepted).filter_map(|g| serde_json::from_str(&g.body).ok()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_run_event_arrives_in_order_per_subject_signed_with_stable_ids_across_refusals_and_a_hub_sigkill() {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let (port, got) = receiver(REFUSED).await;
    let metrics = upkeep_tests::system::free_port();
    let extra = format!("[auto_upgrade]\nenabled = false\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n");
    let mut hub = HubProcess::start_logged(&pki, &work.path().join("hub"), 5, &extra).await;
    let url = hub.url();
    let secret = work.path().join("secret");
    std::fs::write(&secret, format!("{SECRET}\n")).expect("secret file");
    let receiver_url = format!("http://127.0.0.1:{port}/events");
    let created = upkeepctl_ok(
        &pki,
        &url,
        &[
            "webhook",
            "create",
            "pager",
            "--url",
            &receiver_url,
            "--events",
            "run.*,node.*,lease.*",
            "--secret-file",
            &secret.to_string_lossy(),
        ],
    )
    .await;
    assert!(created.contains("pager") && !created.contains(SECRET), "the secret is never echoed: {created}");

    let names = ["n1", "n2", "n3"];
    let mut nodes = Vec::new();
    let mut agents = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let node =
            make_node(&pki, work.path(), &url, n, &format!("m{}", i + 1), "pool1", "eu", "Debian-12-202311.07.0");
        agents.push(TestAgent::start(&node));
        nodes.push(node);
    }
    wait_for("three nodes Ready", WAIT, || async {
        let l = upkeepctl_json(&pki, &url, &["node", "list"]).await.ok()?;
        (l["nodes"].as_array()?.iter().filter(|n| n["status"] == "Ready").count() == 3).then_some(())
    })
    .await;
    let roots: Vec<_> = nodes.iter().map(|n| n.root.clone()).collect();
    publish_trusted_debian(&pki, &url, work.path(), &roots, "202312.01.0").await;
    upkeepctl_ok(&pki, &url, &["run", "create", "r1", "--upgrade-type", "NodeImageOnly"]).await;
    upkeepctl_ok(&pki, &url, &["run", "start", "r1"]).await;
    // SIGKILL while the second member is being upgraded (deliveries still owed and being retried).
    wait_for("m2 Running or later", WAIT, || async {
        let v = upkeepctl_json(&pki, &url, &["run", "show", "r1"]).await.ok()?;
        (run_member(&v, "m2")["status"] != "NotStarted").then_some(())
    })
    .await;
    let before_kill = got.lock().expect("log").len();
    hub.restart(&pki).await;
    let run = wait_for("run r1 ends", WAIT, || async {
        let v = upkeepctl_json(&pki, &url, &["run", "show", "r1"]).await.ok()?;
        ["Completed", "Failed"].contains(&v["status"].as_str()?).then_some(v)
    })
    .await;
    assert_eq!(run["status"], "Completed", "{run}\n{}", hub.tail(40));

    // Every event the store has for the run (what `run watch` shows), by its store sequence number.
    let watch = upkeepctl(&pki, &url, "viewer", &["run", "watch", "r1", "-o", "json"]).await;
    assert!(watch.status.success(), "{}", String::from_utf8_lossy(&watch.stderr));
    let stored: BTreeMap<u64, Value> = String::from_utf8_lossy(&watch.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|e| Some((e["seq"].as_u64()?, e)))
        .collect();
    assert!(stored.len() >= 10, "a three-member run has many events: {stored:?}");
    let arrived = |got: &[Got]| -> BTreeSet<u64> {
        accepted_events(got)
            .iter()
            .filter(|e| e["subject"] == "runs/r1")
            .filter_map(|e| e["data"]["seq"].as_u64())
            .collect()
    };
    wait_for("every run event delivered", WAIT, || async {
        let have = arrived(&got.lock().expect("log"));
        stored.keys().all(|s| have.contains(s)).then_some(())
    })
    .await;
    // Then nothing is owed any more (the events refused first included); `webhook list` shows the progress.
    let list = wait_for("nothing pending", WAIT, || async {
        let l = upkeepctl_json(&pki, &url, &["webhook", "list"]).await.ok()?;
        (l["webhooks"][0]["pending"] == 0).then_some(l)
    })
    .await;
    let got: Vec<Got> = got.lock().expect("log").clone();
    assert!(got.len() > before_kill, "deliveries went on after the restart");
    assert_eq!(got.iter().filter(|g| !g.accepted).count(), REFUSED);

    // Each stored run event arrived as the CloudEvent of its level and status.
    let events = accepted_events(&got);
    for (seq, e) in &stored {
        let ce = events
            .iter()
            .find(|c| c["subject"] == "runs/r1" && c["data"]["seq"].as_u64() == Some(*seq))
            .unwrap_or_else(|| panic!("run event {seq} never arrived"));
        assert_eq!(ce["data"]["level"], e["level"], "{ce}");
        assert_eq!(ce["data"]["to"], e["to"], "{ce}");
        assert!(ce["type"].as_str().is_some_and(|t| t.starts_with("upkeep.run.")), "{ce}");
    }
    // Every POST: a structured-mode CloudEvent 1.0, signed with the secret.
    let mut body_of_id: BTreeMap<String, String> = BTreeMap::new();
    for g in &got {
        assert!(g.content_type.starts_with("application/cloudevents+json"), "{}", g.content_type);
        assert!(upkeep_hub::webhooks::verify(SECRET, g.body.as_bytes(), &g.signature), "signature of {}", g.body);
        assert!(!upkeep_hub::webhooks::verify("another secret", g.body.as_bytes(), &g.signature));
        let ce: Value = serde_json::from_str(&g.body).expect("JSON body");
        for attr in ["specversion", "id", "source", "type", "subject", "time", "datacontenttype", "data"] {
            assert!(!ce[attr].is_null(), "{attr} missing: {ce}");
        }
        assert_eq!(ce["specversion"], "1.0");
        // A redelivery (after a refusal or the kill) is the same event: same id, same bytes.
        let id = ce["id"].as_str().expect("id").to_string();
        let first = body_of_id.entry(id.clone()).or_insert_with(|| g.body.clone());
        assert_eq!(first, &g.body, "event {id} changed between deliveries");
    }
    let refused_ids: BTreeSet<String> = got
        .iter()
        .filter(|g| !g.accepted)
        .filter_map(|g| serde_json::from_str::<Value>(&g.body).ok()?["id"].as_str().map(String::from))
        .collect();
    let accepted_ids: BTreeSet<String> = events.iter().filter_map(|e| e["id"].as_str().map(String::from)).collect();
    assert!(refused_ids.is_subset(&accepted_ids), "every refused event came again with its id");
    // In order per subject: the first acceptance of each event comes after those of the earlier events of its
    // subject (ids grow with the outbox), and for the run its store sequence grows too.
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut last_of: BTreeMap<String, u64> = BTreeMap::new();
    let mut run_seqs = Vec::new();
    for e in &events {
        let id = e["id"].as_str().expect("id");
        if !seen.insert(id.to_string()) {
            continue;
        }
        let n: u64 = id.parse().expect("numeric id");
        let subject = e["subject"].as_str().expect("subject").to_string();
        if let Some(prev) = last_of.insert(subject.clone(), n) {
            assert!(prev < n, "{subject}: event {n} accepted after {prev}");
        }
        if subject == "runs/r1" {
            run_seqs.push(e["data"]["seq"].as_u64().expect("seq"));
        }
    }
    assert!(run_seqs.windows(2).all(|w| w[0] < w[1]), "run events in store order: {run_seqs:?}");
    // No gaps per subject: the run's events, every node's registration, and the leases the run took and gave back.
    let types = |subject: &str| -> Vec<String> {
        events.iter().filter(|e| e["subject"] == subject).filter_map(|e| e["type"].as_str().map(String::from)).collect()
    };
    for n in names {
        let t = types(&format!("nodes/{n}"));
        assert!(t.contains(&"upkeep.node.registered".to_string()), "{n}: {t:?}");
        assert!(t.contains(&"upkeep.lease.granted".to_string()), "{n}: {t:?}");
        assert!(t.contains(&"upkeep.lease.released".to_string()), "{n}: {t:?}");
        assert!(t.contains(&"upkeep.node.image_changed".to_string()), "{n}: {t:?}");
    }
    let sources: BTreeSet<&str> = events.iter().filter_map(|e| e["source"].as_str()).collect();
    assert_eq!(sources.len(), 1, "one source: {sources:?}");

    let w = &list["webhooks"][0];
    assert_eq!(w["name"], "pager", "{list}");
    assert_eq!(w["signed"], true, "{list}");
    assert_eq!(w["last_result"], "ok", "{list}");
    assert!(w["failures"].as_u64().is_some_and(|f| f >= REFUSED as u64), "{list}");
    assert!(w["last_delivered"].is_string(), "{list}");
    assert!(!list.to_string().contains(SECRET), "{list}");
    let table = upkeepctl_ok(&pki, &url, &["webhook", "list"]).await;
    assert!(table.contains("pager") && !table.contains(SECRET), "{table}");
    // The restarted hub counted its deliveries.
    let scrape = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", metrics)).expect("metrics listener");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        write!(s, "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").expect("request");
        let mut raw = String::new();
        s.read_to_string(&mut raw).expect("response");
        raw
    };
    let ok = scrape.lines().find_map(|l| {
        l.strip_prefix("upkeep_webhook_deliveries_total{webhook=\"pager\",result=\"ok\"} ")?.trim().parse::<u64>().ok()
    });
    assert!(ok.is_some_and(|n| n >= 1), "{scrape}");
    upkeepctl_ok(&pki, &url, &["webhook", "delete", "pager"]).await;
    let list = upkeepctl_json(&pki, &url, &["webhook", "list"]).await.expect("list");
    assert_eq!(list["webhooks"].as_array().map(Vec::len), Some(0), "{list}");
    for a in agents {
        a.stop().await;
    }
    hub.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_webhook_flags_are_one_clear_line_naming_the_flag_and_create_nothing() {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let mut hub = TestHub::start(&pki, &work.path().join("hub"), "127.0.0.1:0".parse().expect("addr")).await;
    let url = hub.url();
    let missing = work.path().join("no-such-secret");
    let empty = work.path().join("empty-secret");
    std::fs::write(&empty, "\n").expect("write");
    let good_url = "http://127.0.0.1:9/in";
    let create = |name: &'static str, to: &'static str, events: &'static str, secret: Option<String>| {
        let mut args = vec!["webhook".to_string(), "create".into(), name.into(), "--url".into(), to.into()];
        args.extend(["--events".into(), events.into()]);
        if let Some(s) = secret {
            args.extend(["--secret-file".into(), s]);
        }
        args
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (create("a", good_url, "run.*", Some(missing.to_string_lossy().into_owned())), "--secret-file"),
        (create("a", good_url, "run.*", Some(empty.to_string_lossy().into_owned())), "--secret-file"),
        (create("a", "http://192.0.2.1/in", "run.*", None), "--url"),
        (create("a", "http://hooks.example/in", "run.*", None), "--url"),
        (create("a", "ftp://hooks.example/in", "run.*", None), "--url"),
        (create("a", good_url, "run.,node.*", None), "--events"),
        (create("Bad Name", good_url, "run.*", None), "NAME"),
    ];
    for (args, flag) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = upkeepctl_refused(&pki, &url, &args).await;
        assert!(err.contains(flag), "{args:?}: names {flag}: {err}");
    }
    let list = upkeepctl_json(&pki, &url, &["webhook", "list"]).await.expect("list");
    assert_eq!(list["webhooks"].as_array().map(Vec::len), Some(0), "nothing was created: {list}");

    // The hub refuses plain http to a non-loopback host itself (a client other than upkeepctl).
    let channel = mtls_channel(&pki, &url, &pki.file("operator.pem"), &pki.file("operator.key")).await;
    let mut client = upkeep_proto::v1::operator_service_client::OperatorServiceClient::new(channel);
    let refused = client
        .create_webhook(upkeep_proto::v1::CreateWebhookRequest {
            name: "direct".into(),
            url: "http://10.1.2.3/in".into(),
            events: vec!["run.*".into()],
            secret: String::new(),
        })
        .await
        .expect_err("plain http to 10.1.2.3");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().starts_with("url:"), "{}", refused.message());

    // A good one, then the same name again: refused naming it; a viewer may list but not create.
    upkeepctl_ok(&pki, &url, &create("a", good_url, "run.*", None).iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    let args = create("a", good_url, "node.*", None);
    let err = upkeepctl_refused(&pki, &url, &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert!(err.contains("\"a\" exists"), "{err}");
    let out = upkeepctl(&pki, &url, "viewer", &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("create webhooks"));
    let list = upkeepctl_json(&pki, &url, &["webhook", "list"]).await.expect("list");
    assert_eq!(list["webhooks"][0]["events"], serde_json::json!(["run.*"]), "{list}");
    assert_eq!(list["webhooks"][0]["signed"], false, "{list}");
    let err = upkeepctl_refused(&pki, &url, &["webhook", "delete", "nope"]).await;
    assert!(err.contains("not found"), "{err}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advance_notices_announce_each_node_once_with_the_schedules_time_and_survive_a_hub_sigkill() {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let (port, got) = receiver(0).await;
    let extra = "[auto_upgrade]\nenabled = true\n[webhooks]\nupcoming_notice_minutes = 120\n";
    let mut hub = HubProcess::start_logged(&pki, &work.path().join("hub"), 5, extra).await;
    let url = hub.url();
    let receiver_url = format!("http://127.0.0.1:{port}/events");
    upkeepctl_ok(&pki, &url, &["webhook", "create", "notices", "--url", &receiver_url, "--events", "maintenance.*"])
        .await;
    let mut nodes = Vec::new();
    let mut agents = Vec::new();
    for n in ["n1", "n2"] {
        let node = make_node(&pki, work.path(), &url, n, "m1", "pool1", "eu", "Debian-12-202311.07.0");
        agents.push(TestAgent::start(&node));
        nodes.push(node);
    }
    wait_for("two nodes Ready", WAIT, || async {
        let l = upkeepctl_json(&pki, &url, &["node", "list"]).await.ok()?;
        (l["nodes"].as_array()?.iter().filter(|n| n["status"] == "Ready").count() == 2).then_some(())
    })
    .await;
    // A daily one-hour window opening at a whole minute at least 40 s away: time to publish and to restart the
    // hub before it opens.
    let now = chrono::Utc::now();
    let mut opens = {
        use chrono::{SubsecRound, Timelike};
        now.trunc_subsecs(0) - chrono::TimeDelta::seconds(i64::from(now.second())) + chrono::TimeDelta::minutes(1)
    };
    if opens - now < chrono::TimeDelta::seconds(40) {
        opens += chrono::TimeDelta::minutes(1);
    }
    let window = work.path().join("window.json");
    std::fs::write(
        &window,
        format!(
            r#"{{"frequency":{{"type":"Daily","interval_days":1}},"start_time":"{}","duration_hours":1}}"#,
            opens.format("%H:%M")
        ),
    )
    .expect("window");
    upkeepctl_ok(&pki, &url, &["member", "set-window", "m1", "--kind", "node-os", "-f", &window.to_string_lossy()])
        .await;
    let roots: Vec<_> = nodes.iter().map(|n| n.root.clone()).collect();
    publish_trusted_debian(&pki, &url, work.path(), &roots, "202312.01.0").await;

    // A notice per node arrives before anything happens, with the time `schedule` predicts.
    let notices = |got: &[Got]| -> Vec<Value> {
        accepted_events(got).into_iter().filter(|e| e["type"] == "upkeep.maintenance.upcoming").collect()
    };
    let first = wait_for("a notice for each node", WAIT, || async {
        let n = notices(&got.lock().expect("log"));
        (n.len() >= 2).then_some(n)
    })
    .await;
    assert!(chrono::Utc::now() < opens, "the notices came before the window opened");
    let schedule = upkeepctl_json(&pki, &url, &["schedule"]).await.expect("schedule");
    for node in ["n1", "n2"] {
        let notice = first.iter().find(|e| e["data"]["node"] == node).unwrap_or_else(|| panic!("{node}: {first:?}"));
        assert_eq!(notice["subject"], format!("nodes/{node}"));
        assert_eq!(notice["data"]["operation"], "reimage to Debian-12-202312.01.0", "{notice}");
        let predicted = schedule["operations"]
            .as_array()
            .expect("operations")
            .iter()
            .find(|o| o["node"] == node)
            .unwrap_or_else(|| panic!("{node} in {schedule}"));
        assert_eq!(notice["data"]["earliest"], predicted["earliest"], "{notice} vs {predicted}");
    }
    let n1 = first.iter().find(|e| e["data"]["node"] == "n1").expect("n1");
    assert_eq!(n1["data"]["earliest"], opens.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));

    // A hub killed and started again before the window does not announce the same operations again.
    hub.restart(&pki).await;
    wait_for("the rollout completed", WAIT + Duration::from_secs(120), || async {
        let m = upkeepctl_json(&pki, &url, &["member", "show", "m1"]).await.ok()?;
        m["auto_upgrade_status"].as_str()?.contains("node-image:Debian-12-202312.01.0 Completed").then_some(())
    })
    .await;
    let all = notices(&got.lock().expect("log"));
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for e in &all {
        *per_node.entry(e["data"]["node"].as_str().unwrap_or_default().to_string()).or_default() += 1;
    }
    assert_eq!(per_node, BTreeMap::from([("n1".to_string(), 1), ("n2".to_string(), 1)]), "{all:?}\n{}", hub.tail(30));
    for a in agents {
        a.stop().await;
    }
    hub.kill().await;
}
