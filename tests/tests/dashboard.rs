//! `upkeepctl dashboard` in a real headless Chromium (driven over WebDriver by chromedriver), against a real hub
//! and real agents: the fleet page shows every node with its node-image-version label, a run page follows a run
//! live without a reload, and with JavaScript off every page still carries its data (server-side rendering).
//! Chromium and chromedriver come from the distribution's packages (scripts/deps via scripts/test).

use base64::Engine as _;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncBufReadExt;
use upkeep_tests::*;

const WAIT: Duration = Duration::from_secs(60);
const RUN_WAIT: Duration = Duration::from_secs(180);
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const OLD: &str = "Debian-12-202311.07.0";
const NEW: &str = "Debian-12-202312.01.0";

/// One HTTP/1.1 exchange on its own connection (`Connection: close`): the status code and the body. Both servers
/// asked here answer with a Content-Length.
fn http(port: u16, method: &str, path: &str, host: &str, body: Option<&str>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("send");
    // Read by Content-Length: chromedriver says `Connection: close` but keeps the socket open.
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let text = String::from_utf8_lossy(&raw).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<usize>().ok()).flatten()
            });
            if length.is_some_and(|n| body.len() >= n) {
                let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
                return (code, body.to_string());
            }
        }
        let n = s.read(&mut buf).expect("read");
        if n == 0 {
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
            return (code, body.to_string());
        }
        raw.extend_from_slice(&buf[..n]);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

fn need_browser() {
    for p in [CHROMIUM, CHROMEDRIVER] {
        assert!(Path::new(p).exists(), "{p} missing: install it with scripts/deps chromium chromium-driver");
    }
}

/// Where this test's screenshots go: beside the test binaries, so they outlive the temporary directories.
fn output_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir").join("dashboard-test-output");
    std::fs::create_dir_all(&dir).expect("mkdir output");
    dir
}

struct Fleet {
    pki: TestPki,
    work: tempfile::TempDir,
    hub: TestHub,
    agents: Vec<TestAgent>,
}

async fn fleet(nodes: &[(&str, &str)]) -> Fleet {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let hub = TestHub::start(&pki, &work.path().join("hub"), "127.0.0.1:0".parse().expect("addr")).await;
    let mut agents = Vec::new();
    for (name, member) in nodes {
        let node = make_node(&pki, work.path(), &hub.url(), name, member, "pool1", "eu", OLD);
        agents.push(TestAgent::start(&node));
    }
    wait_for("every node registered", WAIT, || async {
        let list = upkeepctl_json(&pki, &hub.url(), &["node", "list"]).await.ok()?;
        (list["nodes"].as_array()?.iter().filter(|n| n["status"] == "Ready").count() == nodes.len()).then_some(())
    })
    .await;
    Fleet { pki, work, hub, agents }
}

impl Fleet {
    async fn ok(&self, args: &[&str]) -> String {
        upkeepctl_ok(&self.pki, &self.hub.url(), args).await
    }

    /// Signs and publishes NEW, trusted by every node.
    async fn publish_new(&self, nodes: &[&str]) {
        let keys = self.work.path().join("keys");
        self.ok(&["image", "keygen", "--dir", &keys.to_string_lossy()]).await;
        for n in nodes {
            let dir = self.work.path().join(n).join("root/etc/upkeep/trusted-keys");
            std::fs::create_dir_all(&dir).expect("mkdir");
            std::fs::copy(keys.join("upkeep-image.pub"), dir.join("upkeep-image.pub")).expect("trust key");
        }
        let img = self.work.path().join("new.tar").to_string_lossy().into_owned();
        let (family, version) = NEW.rsplit_once('-').expect("family-version");
        self.ok(&["image", "build", "--out", &img, "--family", family, "--version", version]).await;
        self.ok(&["image", "sign", "--key", &keys.join("upkeep-image.key").to_string_lossy(), &img]).await;
        self.ok(&["image", "publish", "--family", family, "--version", version, "--regions", "eu", "--file", &img])
            .await;
    }

    /// `upkeepctl dashboard --listen 127.0.0.1:0` as `role`; returns the process and the port it printed.
    async fn dashboard(&self, role: &str) -> (tokio::process::Child, u16) {
        let mut child = tokio::process::Command::new(bin("upkeepctl"))
            .args(["dashboard", "--listen", "127.0.0.1:0"])
            .env("UPKEEP_HUB", self.hub.url())
            .env("UPKEEP_CA", self.pki.file(upkeep_hub::pki::files::CA_CERT))
            .env("UPKEEP_CERT", self.pki.file(&format!("{role}.pem")))
            .env("UPKEEP_KEY", self.pki.file(&format!("{role}.key")))
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn upkeepctl dashboard");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("dashboard prints its address")
            .expect("read")
            .expect("a line");
        let port = line
            .split("http://127.0.0.1:")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        assert!(line.contains(&format!("{role} ")), "names whom the hub sees: {line}");
        (child, port)
    }

    async fn stop(self) {
        for a in self.agents {
            a.stop().await;
        }
        let mut hub = self.hub;
        hub.stop().await;
    }
}

/// A Chromium session through chromedriver's WebDriver HTTP API.
struct Browser {
    driver: std::process::Child,
    port: u16,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        need_browser();
        let port = free_port();
        let driver = std::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn chromedriver");
        wait_for("chromedriver ready", WAIT, || async move {
            let (code, body) = tokio::task::spawn_blocking(move || {
                std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
                Some(http(port, "GET", "/status", "127.0.0.1", None))
            })
            .await
            .ok()??;
            (code == 200 && body.contains("\"ready\":true")).then_some(())
        })
        .await;
        let profile = tempfile::tempdir().expect("profile dir");
        let mut b = Browser { driver, port, session: String::new(), _profile: profile };
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,900", format!("--user-data-dir={}", b._profile.path().display())],
        }}}});
        let v = b.call("POST", "/session", caps).await;
        b.session = v["sessionId"].as_str().expect("session id").to_string();
        b
    }

    /// One WebDriver command; panics with the driver's error.
    async fn call(&self, method: &'static str, path: &str, body: Value) -> Value {
        let (port, path, text) = (self.port, path.to_string(), body.to_string());
        let has_body = method == "POST";
        let (code, answer) = tokio::task::spawn_blocking(move || {
            http(port, method, &path, "127.0.0.1", has_body.then_some(text.as_str()))
        })
        .await
        .expect("webdriver call");
        let v: Value = serde_json::from_str(&answer).unwrap_or_else(|_| panic!("webdriver answered {code}: {answer}"));
        assert_eq!(code, 200, "webdriver {method}: {v}");
        v["value"].clone()
    }

    async fn go(&self, url: &str) {
        self.call("POST", &format!("/session/{}/url", self.session), json!({ "url": url })).await;
    }

    async fn js(&self, script: &str) -> Value {
        self.call("POST", &format!("/session/{}/execute/sync", self.session), json!({"script": script, "args": []}))
            .await
    }

    async fn screenshot(&self, file: &Path) {
        let b64 = self.call("GET", &format!("/session/{}/screenshot", self.session), Value::Null).await;
        let png = base64::engine::general_purpose::STANDARD.decode(b64.as_str().expect("base64")).expect("decode");
        assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
        std::fs::write(file, &png).expect("save screenshot");
        println!("screenshot saved: {}", file.display());
    }

    async fn quit(mut self) {
        self.call("DELETE", &format!("/session/{}", self.session), Value::Null).await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// The fleet page's rows as (node, label, status).
const FLEET_ROWS: &str = "return Array.from(document.querySelectorAll('tr[data-node]')).map(function (tr) { \
    return [tr.getAttribute('data-node'), tr.querySelector('td.image').textContent, \
            tr.querySelector('td.status').textContent]; });";

/// The status cells of members m1 and m2 and of the run, joined by spaces.
const STATUSES: &str = "return ['member/m1', 'member/m2', 'run'].map(function (k) { \
    var c = document.querySelector('tr[data-level=\"' + k + '\"] td.status'); return c ? c.textContent : ''; }).join(' ');";

fn member_status_js(member: &str) -> String {
    format!(
        "var c = document.querySelector('tr[data-level=\"member/{member}\"] td.status'); return c ? c.textContent : null;"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_chromium_shows_the_fleet_and_follows_a_run_live_without_a_reload() {
    need_browser();
    let nodes = [("n1", "m1"), ("n2", "m2")];
    let f = fleet(&nodes).await;
    f.publish_new(&["n1", "n2"]).await;
    f.ok(&["run", "create", "r1", "--upgrade-type", "NodeImageOnly"]).await;
    let (mut dash, port) = f.dashboard("viewer").await;
    let base = format!("http://127.0.0.1:{port}");
    let browser = Browser::start().await;

    // Fleet: every node with its node-image-version label and status.
    browser.go(&format!("{base}/")).await;
    let rows = browser.js(FLEET_ROWS).await;
    for (n, _) in nodes {
        let row = rows.as_array().expect("rows").iter().find(|r| r[0] == n).unwrap_or_else(|| panic!("{n}: {rows}"));
        assert_eq!(row[1], OLD, "node-image-version label of {n}: {rows}");
        assert_eq!(row[2], "Ready", "{rows}");
    }

    // The run page before the run starts: its members are NotStarted.
    browser.go(&format!("{base}/runs/r1")).await;
    for m in ["m1", "m2"] {
        assert_eq!(browser.js(&member_status_js(m)).await, "NotStarted");
    }
    // A marker in this page's window: it survives only if the page is never reloaded or left.
    browser.js("window.upkeepMarker = 'same page'; return true;").await;
    wait_for("the live stream connected", WAIT, || async {
        (browser.js("return window.upkeepLive ? window.upkeepLive.updates : 0;").await.as_u64()? >= 1).then_some(())
    })
    .await;

    f.ok(&["run", "start", "r1"]).await;
    // Every status the page shows for the members on the way, read through WebDriver without navigating.
    let shown = browser.js(STATUSES).await;
    assert_eq!(shown, "NotStarted NotStarted NotStarted", "as first shown");
    let seen = std::sync::Mutex::new(vec![shown.as_str().unwrap_or_default().to_string()]);
    wait_for("the run page shows both members Completed", RUN_WAIT, || {
        let (b, seen) = (&browser, &seen);
        async move {
            let s = b.js(STATUSES).await;
            let s = s.as_str()?.to_string();
            let mut seen = seen.lock().expect("lock");
            if seen.last() != Some(&s) {
                seen.push(s.clone());
            }
            (s == "Completed Completed Completed").then_some(())
        }
    })
    .await;
    let seen = seen.into_inner().expect("lock");
    println!("statuses shown (m1 m2 run): {seen:?}");
    assert!(seen.len() >= 2, "the page changed from what it first showed: {seen:?}");
    assert_eq!(browser.js("return window.upkeepMarker || null;").await, "same page", "no reload or navigation");
    let updates = browser.js("return window.upkeepLive.updates;").await.as_u64().expect("count");
    assert!(updates >= 2, "live updates arrived: {updates}");
    let progress = browser.js("return document.querySelector('tr[data-level=\"run\"] td.progress').textContent;").await;
    assert_eq!(progress, "2/2 done", "the run row's progress followed too");
    wait_for("the live stream ended with the run", WAIT, || async {
        (browser.js("return window.upkeepLive.ended;").await == true).then_some(())
    })
    .await;
    browser.screenshot(&output_dir().join("run-page.png")).await;
    let run = upkeepctl_json(&f.pki, &f.hub.url(), &["run", "show", "r1"]).await.expect("run show");
    assert_eq!(run["status"], "Completed", "the page agrees with the hub: {run}");

    // The fleet page now shows the new label of every node (once the agents reported it).
    wait_for("the fleet page shows the new image on every node", WAIT, || async {
        browser.go(&format!("{base}/")).await;
        let rows = browser.js(FLEET_ROWS).await;
        (rows.as_array()?.len() == nodes.len() && rows.as_array()?.iter().all(|r| r[1] == NEW)).then_some(())
    })
    .await;
    browser.screenshot(&output_dir().join("fleet-page.png")).await;
    // A node's page shows the run's work in its history.
    browser.go(&format!("{base}/nodes/n1")).await;
    let history = browser.js("return [...document.querySelectorAll('tr[data-work]')].map(r => r.textContent);").await;
    let history = history.as_array().expect("rows").iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join("\n");
    assert!(history.contains("run/r1/") && history.contains("Done"), "node page history: {history}");
    browser.quit().await;
    let _ = dash.kill().await;
    f.stop().await;
}

/// `chromium --headless --dump-dom` with JavaScript blocked for every site (the profile's content setting, as a
/// user who turned it off has it): the DOM as a browser without JavaScript builds it.
async fn dump_dom_without_js(url: &str) -> String {
    let profile = tempfile::tempdir().expect("profile");
    std::fs::create_dir_all(profile.path().join("Default")).expect("mkdir");
    let prefs = json!({"profile": {"default_content_setting_values": {"javascript": 2}}});
    std::fs::write(profile.path().join("Default/Preferences"), prefs.to_string()).expect("prefs");
    let out = tokio::process::Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            &format!("--user-data-dir={}", profile.path().display()),
            "--dump-dom",
            url,
        ])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WAIT, out).await.expect("chromium finishes").expect("spawn chromium");
    assert!(out.status.success(), "chromium --dump-dom {url}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_pages_render_their_data_without_javascript_and_refuse_writes_and_foreign_hosts() {
    need_browser();
    let f = fleet(&[("n1", "m1"), ("n2", "m2")]).await;
    let order = f.work.path().join("order.json");
    std::fs::write(
        &order,
        r#"{"stages":[{"name":"canary","groups":[{"name":"first","members":["m1"]}],"after_stage_wait_seconds":60},
            {"name":"prod","groups":[{"name":"rest","members":["m2"]}]}]}"#,
    )
    .expect("write");
    f.ok(&["run", "create", "r2", "-f", &order.to_string_lossy(), "--upgrade-type", "NodeImageOnly"]).await;
    let window = f.work.path().join("window.json");
    std::fs::write(
        &window,
        r#"{"frequency":{"type":"Weekly","interval_weeks":1,"day_of_week":"Sunday"},"start_time":"02:00","duration_hours":4}"#,
    )
    .expect("write");
    f.ok(&["member", "set-window", "m1", "-f", &window.to_string_lossy()]).await;
    f.ok(&["member", "set-max-unavailable", "m1", "25%"]).await;
    let (mut dash, port) = f.dashboard("operator").await;
    let base = format!("http://127.0.0.1:{port}");

    let fleet = dump_dom_without_js(&format!("{base}/")).await;
    for want in ["data-node=\"n1\"", "data-node=\"n2\"", OLD, "upkeep.io/node-image-version", "Ready"] {
        assert!(fleet.contains(want), "fleet page without JS shows {want}: {fleet}");
    }
    let run = dump_dom_without_js(&format!("{base}/runs/r2")).await;
    for want in ["data-level=\"stage/canary\"", "data-level=\"member/m1\"", "data-level=\"wait/canary\"", "wait 60s"] {
        assert!(run.contains(want), "run page without JS shows {want}: {run}");
    }
    assert!(run.contains("NotStarted") && run.contains("0/2 done"), "{run}");
    assert!(run.contains("live updates need JavaScript"), "no script ran (the live note is as served): {run}");
    let members = dump_dom_without_js(&format!("{base}/members")).await;
    assert!(members.contains("25%") && members.contains("Sunday"), "budget and window: {members}");
    let node = dump_dom_without_js(&format!("{base}/nodes/n1")).await;
    assert!(node.contains(OLD) && node.contains("Operations in flight") && node.contains("Leases"), "{node}");
    let compliance = dump_dom_without_js(&format!("{base}/compliance")).await;
    assert!(compliance.contains("data-member=\"m1\"") && compliance.contains("data-member=\"m2\""), "{compliance}");
    // The schedule page: n2's OS asks for a reboot, and m2's node OS window (daily, opening 12 h from now) is shut,
    // so the reboot is predicted at that opening.
    let opens = chrono::Utc::now() + chrono::TimeDelta::hours(12);
    let m2_window = f.work.path().join("m2-window.json");
    std::fs::write(
        &m2_window,
        format!(
            r#"{{"frequency":{{"type":"Daily","interval_days":1}},"start_time":"{}","duration_hours":4}}"#,
            opens.format("%H:%M")
        ),
    )
    .expect("write");
    f.ok(&["member", "set-window", "m2", "-f", &m2_window.to_string_lossy()]).await;
    let flag = f.work.path().join("n2/root/run/reboot-required");
    std::fs::create_dir_all(flag.parent().expect("dir")).expect("mkdir");
    std::fs::write(&flag, "*** System restart required ***\n").expect("flag");
    let at = opens.format("%Y-%m-%d %H:%M").to_string();
    let schedule = wait_for("the schedule page predicts n2's reboot", WAIT, || async {
        let page = dump_dom_without_js(&format!("{base}/schedule")).await;
        page.contains("data-node=\"n2\"").then_some(page)
    })
    .await;
    assert!(schedule.contains("reboot") && schedule.contains(&at), "reboot at {at}: {schedule}");

    // Plain HTTP: the same data in the served HTML, read-only, only for its own Host, 404 for what is not there.
    let host = format!("127.0.0.1:{port}");
    let get = |path: &'static str, host: String, method: &'static str| {
        tokio::task::spawn_blocking(move || http(port, method, path, &host, None))
    };
    let (code, body) = get("/runs", host.clone(), "GET").await.expect("get");
    assert_eq!(code, 200);
    assert!(body.contains("href=\"/runs/r2\"") && body.contains("NotStarted"), "{body}");
    assert_eq!(get("/runs/r2", host.clone(), "POST").await.expect("post").0, 405, "read-only");
    assert_eq!(get("/", "evil.example:80".into(), "GET").await.expect("get").0, 421, "foreign Host refused");
    let (code, body) = get("/runs/nope", host.clone(), "GET").await.expect("get");
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("nope") && body.contains("not found"), "{body}");
    let (code, css) = get("/style.css", host.clone(), "GET").await.expect("css");
    assert!(code == 200 && css.contains("td.status"), "embedded style");

    // Only loopback unless asked: one readable line, non-zero exit.
    let out = upkeepctl(&f.pki, &f.hub.url(), "operator", &["dashboard", "--listen", "0.0.0.0:0"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("--listen") && err.contains("--allow-remote"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let _ = dash.kill().await;
    f.stop().await;
}
