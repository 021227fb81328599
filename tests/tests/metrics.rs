//! The hub's Prometheus endpoint (`[metrics] listen`), scraped over plain HTTP while real agents hold mTLS
//! sessions: the values match the fleet and the hub's certificates; only `GET /metrics` is served.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_reports_the_connected_agents_revocations_and_certificate_expiry() {
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
        let want = upkeep_hub::metrics::not_after_unix(&std::fs::read(pki.file(file)).expect("pem")).expect("cert");
        let series = format!("upkeep_certificate_expiry_timestamp_seconds{{certificate=\"{setting}\"}}");
        assert_eq!(value(&body, &series), Some(want), "{setting}: {body}");
    }
    assert!(body.trim_end().ends_with("# EOF"), "OpenMetrics text: {body}");

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
