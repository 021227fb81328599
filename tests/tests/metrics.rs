//! The hub's Prometheus endpoint (`[metrics] listen`), scraped over plain HTTP while real agents hold mTLS
//! sessions: the values match the fleet (nodes, their images, a reboot's steps and lease) and the hub's
//! certificates; only `GET /metrics` is served.

use std::io::{Read, Write};
use std::time::Duration;
use upkeep_hub::pki::files;
use upkeep_tests::system::free_port;
use upkeep_tests::*;

/// `METHOD path` against the metrics listener: (status line, body).
fn http(port: u16, method: &str, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics listener");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").expect("request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response with a body");
    (head.lines().next().unwrap_or_default().to_string(), body.to_string())
}

/// The value of the series `name` (with its labels, as printed) in a scrape.
fn value(body: &str, series: &str) -> Option<i64> {
    body.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The `upkeep_*` metric names a rules or dashboard file refers to.
fn series_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("upkeep_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_lowercase() || c == '_')).unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_reports_the_fleet_a_reboots_steps_revocations_and_certificate_expiry() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let extra = format!("[auto_upgrade]\nenabled = false\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let mut hub =
        TestHub::start_with(&pki, &dir.path().join("hub"), "127.0.0.1:0".parse().expect("addr"), &extra).await;
    // The hub binds the metrics listener as it starts serving, in its own task.
    wait_for("the metrics listener", Duration::from_secs(20), || async {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(drop)
    })
    .await;
    let (_, body) = http(port, "GET", "/metrics");
    assert_eq!(value(&body, "upkeep_agents_connected"), Some(0), "{body}");

    let nodes: Vec<TestNode> = (1..=2)
        .map(|i| make_node(&pki, dir.path(), &hub.url(), &format!("n{i}"), "m1", "p1", "r1", "Test-1-202301.01.0"))
        .collect();
    let agents: Vec<TestAgent> = nodes.iter().map(TestAgent::start).collect();
    let fleet = hub.fleet();
    wait_for("both agents connected", Duration::from_secs(20), || async {
        (fleet.connected_count() == 2).then_some(())
    })
    .await;
    let (status, body) = http(port, "GET", "/metrics");
    assert!(status.contains("200"), "{status}");
    assert_eq!(value(&body, "upkeep_agents_connected"), Some(2), "{body}");
    assert_eq!(value(&body, "upkeep_certificates_revoked"), Some(0), "{body}");
    for (setting, file) in [("tls.cert", files::HUB_CERT), ("tls.ca", files::CA_CERT)] {
        let pem = std::fs::read(pki.file(file)).expect("pem");
        let want = upkeep_hub::certstatus::status_of_pem(&pki.file(file), &pem, 0, 14).expect("cert").not_after_unix;
        let series = format!("upkeep_certificate_expiry_timestamp_seconds{{certificate=\"{setting}\"}}");
        assert_eq!(value(&body, &series), Some(want), "{setting}: {body}");
    }
    assert!(body.trim_end().ends_with("# EOF"), "OpenMetrics text: {body}");

    // The fleet as `node list` has it: both Ready in m1, each with its node-image-version.
    let ready: i64 = body
        .lines()
        .filter(|l| l.starts_with("upkeep_nodes{member=\"m1\",status=\"Ready\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
        .sum();
    assert_eq!(ready, 2, "{body}");
    for n in ["n1", "n2"] {
        let info = format!("upkeep_node_image{{node=\"{n}\",member=\"m1\",node_image_version=\"Test-1-202301.01.0\"");
        assert!(body.lines().any(|l| l.starts_with(&info) && l.ends_with(" 1")), "{n}: {body}");
    }

    // A reboot the operator orders: one lease granted, four steps, each counted with its duration.
    upkeepctl_ok(&pki, &hub.url(), &["node", "reboot", "n1"]).await;
    let body = wait_for("the reboot's steps counted", Duration::from_secs(60), || async {
        let (_, body) = http(port, "GET", "/metrics");
        (value(&body, "upkeep_node_steps_total{step=\"uncordon\",result=\"ok\"}") == Some(1)).then_some(body)
    })
    .await;
    for step in ["cordon", "drain", "reboot"] {
        assert_eq!(
            value(&body, &format!("upkeep_node_steps_total{{step=\"{step}\",result=\"ok\"}}")),
            Some(1),
            "{body}"
        );
        let count = format!("upkeep_node_step_duration_seconds_count{{step=\"{step}\"}}");
        assert_eq!(value(&body, &count), Some(1), "{body}");
    }
    assert!(!body.contains("result=\"failed\""), "{body}");
    assert_eq!(value(&body, "upkeep_lease_decisions_total{decision=\"granted\",reason=\"\"}"), Some(1), "{body}");
    // A reboot the window refuses: counted as denied, by its reason.
    let window = dir.path().join("window.json");
    let opens = chrono::Utc::now() + chrono::TimeDelta::hours(12);
    std::fs::write(
        &window,
        format!(
            r#"{{"frequency":{{"type":"Daily","interval_days":1}},"start_time":"{}","duration_hours":4}}"#,
            opens.format("%H:%M")
        ),
    )
    .expect("window");
    upkeepctl_ok(&pki, &hub.url(), &["member", "set-window", "m1", "-f", &window.to_string_lossy()]).await;
    upkeepctl_refused(&pki, &hub.url(), &["node", "reboot", "n2"]).await;
    let (_, body) = http(port, "GET", "/metrics");
    let denied = "upkeep_lease_decisions_total{decision=\"denied\",reason=\"window_closed\"}";
    assert_eq!(value(&body, denied), Some(1), "{body}");

    // A release in the catalog, counted by family.
    let work = dir.path().join("work");
    let (keys, img) = (work.join("keys"), work.join("test-1.tar").to_string_lossy().into_owned());
    let url = hub.url();
    upkeepctl_ok(&pki, &url, &["image", "keygen", "--dir", &keys.to_string_lossy()]).await;
    upkeepctl_ok(&pki, &url, &["image", "build", "--out", &img, "--family", "Test-1", "--version", "202302.01.0"])
        .await;
    upkeepctl_ok(&pki, &url, &["image", "sign", "--key", &keys.join("upkeep-image.key").to_string_lossy(), &img]).await;
    let publish =
        ["image", "publish", "--family", "Test-1", "--version", "202302.01.0", "--regions", "r1", "--file", &img];
    upkeepctl_ok(&pki, &url, &publish).await;
    let (_, body) = http(port, "GET", "/metrics");
    assert_eq!(value(&body, "upkeep_catalog_releases{family=\"Test-1\"}"), Some(1), "{body}");

    // Every series the shipped alert rules and dashboard use is one this hub serves.
    for file in ["packaging/hub/upkeep-alerts.yml", "packaging/hub/upkeep-grafana.json"] {
        let text = std::fs::read_to_string(upkeep_tests::system::workspace().join(file)).expect(file);
        let names = series_names(&text);
        assert!(names.len() >= 5, "{file}: {names:?}");
        for name in names {
            let served = body.lines().any(|l| {
                l.starts_with(&format!("{name}{{"))
                    || l.starts_with(&format!("{name} "))
                    || l.contains(&format!(" {name} "))
            });
            assert!(served, "{file} uses {name}, which the hub does not serve:\n{body}");
        }
    }

    let serial = cert_serial(&pki.file("node-n1.pem"));
    upkeepctl_ok(&pki, &hub.url(), &["pki", "revoke", &serial]).await;
    let (_, body) = http(port, "GET", "/metrics");
    assert_eq!(value(&body, "upkeep_certificates_revoked"), Some(1), "{body}");

    assert!(http(port, "GET", "/").0.contains("404"));
    assert!(http(port, "POST", "/metrics").0.contains("405"));
    for a in agents {
        a.stop().await;
    }
    hub.stop().await;
}
