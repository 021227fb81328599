//! Update-run scenarios through the real hub, real agents and the real upkeepctl (SPEC §5, §7).

use serde_json::Value;
use std::time::Duration;
use upkeep_tests::*;

const WAIT: Duration = Duration::from_secs(60);

struct Fleet {
    pki: TestPki,
    work: tempfile::TempDir,
    hub: TestHub,
    agents: Vec<TestAgent>,
}

/// A hub and one agent per (node, member, region), all registered.
async fn fleet(nodes: &[(&str, &str, &str)], image: &str) -> Fleet {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let hub = TestHub::start(&pki, &work.path().join("hub"), "127.0.0.1:0".parse().expect("addr")).await;
    let mut agents = Vec::new();
    for (name, member, region) in nodes {
        let node = make_node(&pki, work.path(), &hub.url(), name, member, "pool1", region, image);
        agents.push(TestAgent::start(&node));
    }
    let want = nodes.len();
    wait_for("every node registered", WAIT, || async {
        let list = upkeepctl_json(&pki, &hub.url(), &["node", "list"]).await.ok()?;
        (list["nodes"].as_array()?.iter().filter(|n| n["status"] == "Ready").count() == want).then_some(())
    })
    .await;
    Fleet { pki, work, hub, agents }
}

impl Fleet {
    async fn ctl(&self, args: &[&str]) -> std::process::Output {
        upkeepctl(&self.pki, &self.hub.url(), "operator", args).await
    }

    async fn ok(&self, args: &[&str]) -> String {
        upkeepctl_ok(&self.pki, &self.hub.url(), args).await
    }

    /// Fails with one readable line; returns it.
    async fn refused(&self, args: &[&str]) -> String {
        upkeepctl_refused(&self.pki, &self.hub.url(), args).await
    }

    async fn json(&self, args: &[&str]) -> Value {
        upkeepctl_json(&self.pki, &self.hub.url(), args).await.expect("json")
    }

    fn file(&self, name: &str, text: &str) -> String {
        let p = self.work.path().join(name);
        std::fs::write(&p, text).expect("write");
        p.to_string_lossy().into_owned()
    }

    /// Publishes an artifact with the given (possibly untrusted) signature text, as a raw disk image (the hub
    /// does not look into raw images; these tests are about runs, not archives).
    async fn publish(&self, family: &str, version: &str, regions: &str, bytes: &[u8], signature: &str) {
        let art = self.work.path().join(format!("{family}-{version}.img"));
        std::fs::write(&art, bytes).expect("write");
        std::fs::write(art.with_extension("img.minisig"), signature).expect("write");
        let art = art.to_string_lossy().into_owned();
        let args = ["image", "publish", "--family", family, "--version", version, "--regions", regions, "--file", &art];
        self.ok(&[&args[..], &["--format", "raw"]].concat()).await;
    }

    async fn run_state(&self, name: &str) -> Value {
        self.json(&["run", "show", name]).await
    }

    async fn wait_run(&self, name: &str, statuses: &[&str]) -> Value {
        wait_for(&format!("run {name} to reach {statuses:?}"), WAIT, || async {
            let v = upkeepctl_json(&self.pki, &self.hub.url(), &["run", "show", name]).await.ok()?;
            statuses.contains(&v["status"].as_str()?).then_some(v)
        })
        .await
    }

    async fn stop(self) {
        for a in self.agents {
            a.stop().await;
        }
        let mut hub = self.hub;
        hub.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sec7_bad_strategies_and_runs_are_refused_naming_the_field() {
    let f = fleet(&[("n1", "m1", "eu"), ("n2", "m2", "eu")], "Debian-12-202311.07.0").await;
    let dup = f.file("dup.json", r#"{"stages":[{"name":"s","groups":[{"name":"g","members":["m1"]}]},{"name":"s","groups":[{"name":"h","members":["m2"]}]}]}"#);
    let err = f.refused(&["strategy", "create", "dup", "-f", &dup]).await;
    assert!(err.contains("stages[1].name") && err.contains("duplicate"), "{err}");
    let twice = f.file(
        "twice.json",
        r#"{"stages":[{"name":"s","groups":[{"name":"a","members":["m1"]},{"name":"b","members":["m1"]}]}]}"#,
    );
    let err = f.refused(&["strategy", "create", "twice", "-f", &twice]).await;
    assert!(err.contains("m1") && err.contains("\"a\"") && err.contains("\"b\""), "names both groups: {err}");
    let unknown = f.file("unknown.json", r#"{"stages":[{"name":"s","groups":[{"name":"a","members":["nope"]}]}]}"#);
    let err = f.refused(&["strategy", "create", "unknown", "-f", &unknown]).await;
    assert!(err.contains("nope"), "{err}");
    let wait = f.file(
        "wait.json",
        r#"{"stages":[{"name":"s","groups":[{"name":"a","members":["m1"]}],"after_stage_wait_seconds":-5}]}"#,
    );
    let err = f.refused(&["strategy", "create", "wait", "-f", &wait]).await;
    assert!(err.contains("after_stage_wait_seconds"), "{err}");
    let list = f.json(&["strategy", "list"]).await;
    assert_eq!(list["strategies"].as_array().map(Vec::len), Some(0), "nothing was stored");

    let good = f.file("good.json", r#"{"stages":[{"name":"s","groups":[{"name":"a","members":["m1","m2"]}]}]}"#);
    f.ok(&["strategy", "create", "good", "-f", &good]).await;
    let err =
        f.refused(&["run", "create", "r", "--strategy", "good", "-f", &good, "--upgrade-type", "NodeImageOnly"]).await;
    assert!(err.contains("cannot be used with"), "{err}");
    let err = f.refused(&["run", "create", "r", "--upgrade-type", "Full"]).await;
    assert!(err.contains("kubernetes_version"), "Full needs a Kubernetes version: {err}");
    let err =
        f.refused(&["run", "create", "r", "--upgrade-type", "NodeImageOnly", "--kubernetes-version", "1.30"]).await;
    assert!(err.contains("kubernetes_version"), "{err}");
    let err = f.refused(&["run", "create", "r", "--upgrade-type", "Sideways"]).await;
    assert!(err.contains("upgrade_type"), "{err}");
    let err = f
        .refused(&[
            "run",
            "create",
            "r",
            "--upgrade-type",
            "NodeImageOnly",
            "--node-image-selection",
            "Custom",
            "--custom-version",
            "Debian-12=2023.1",
        ])
        .await;
    assert!(err.contains("custom_versions[0]") && err.contains("YYYYMM.DD.N"), "{err}");
    let runs = f.json(&["run", "list"]).await;
    assert_eq!(runs["runs"].as_array().map(Vec::len), Some(0), "no run was created by bad input");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sec5_members_already_at_target_are_skipped_and_the_run_is_skipped() {
    let f = fleet(&[("n1", "m1", "eu"), ("n2", "m2", "us")], "Debian-12-202311.07.0").await;
    f.publish("Debian-12", "202311.07.0", "eu,us", b"image A", &untrusted_signature()).await;
    f.ok(&["run", "create", "r1", "--upgrade-type", "NodeImageOnly"]).await;
    let before = f.run_state("r1").await;
    assert_eq!(before["status"], "NotStarted");
    f.ok(&["run", "start", "r1"]).await;
    let run = f.wait_run("r1", &["Skipped"]).await;
    for m in ["m1", "m2"] {
        assert_eq!(run_member(&run, m)["status"], "Skipped", "{run}");
    }
    assert!(run_member(&run, "m1")["message"].as_str().unwrap_or("").contains("target"), "says why: {run}");
    let err = f.refused(&["run", "start", "r1"]).await;
    assert!(err.contains("FailedPrecondition"), "{err}");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sec5_a_failing_node_fails_member_group_stage_and_run_and_nothing_more_starts() {
    let f = fleet(&[("n1", "m1", "eu"), ("n2", "m2", "eu")], "Debian-12-202311.07.0").await;
    // A newer image whose signature no node trusts: the node refuses it, so the member's upgrade fails.
    f.publish("Debian-12", "202312.01.0", "eu", b"image B", &untrusted_signature()).await;
    let order = f.file("order.json", r#"{"stages":[{"name":"only","groups":[{"name":"g","members":["m1","m2"]}]}]}"#);
    f.ok(&["run", "create", "r1", "-f", &order, "--upgrade-type", "NodeImageOnly"]).await;
    f.ok(&["run", "start", "r1"]).await;
    let watch = upkeepctl(&f.pki, &f.hub.url(), "viewer", &["run", "watch", "r1"]).await;
    assert!(!watch.status.success(), "watch exits non-zero when the run Failed");
    let lines = String::from_utf8_lossy(&watch.stdout);
    assert!(lines.contains("member \"m1\""), "{lines}");
    let run = f.wait_run("r1", &["Failed"]).await;
    let m1 = run_member(&run, "m1");
    assert_eq!(m1["status"], "Failed", "{run}");
    assert!(m1["error"].as_str().unwrap_or("").contains("n1"), "the error names the node: {m1}");
    assert_eq!(run_member(&run, "m2")["status"], "NotStarted", "nothing further started: {run}");
    let stage = &run["stages"][0];
    assert_eq!(stage["status"], "Failed");
    assert_eq!(stage["groups"][0]["status"], "Failed");
    assert!(run["error"].as_str().unwrap_or("").contains("m1"), "the run carries a summary: {run}");
    // Every event was kept, in order, with increasing sequence numbers.
    let out = f.ctl(&["run", "watch", "r1", "-o", "json"]).await;
    let seqs: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["seq"].as_u64())
        .collect();
    assert!(seqs.len() >= 6 && seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sec5_member_with_closed_window_is_pending_with_next_opening_and_stop_is_immediate() {
    let f = fleet(&[("n1", "m1", "eu")], "Debian-12-202311.07.0").await;
    f.publish("Debian-12", "202312.01.0", "eu", b"image B", &untrusted_signature()).await;
    // A daily window that opens six hours from now: closed now, and not within the 4-hour "opens soon" class.
    let opens = chrono::Utc::now() + chrono::TimeDelta::hours(6);
    let window = f.file(
        "window.json",
        &format!(
            r#"{{"frequency":{{"type":"Daily","interval_days":1}},"start_time":"{}","duration_hours":3}}"#,
            opens.format("%H:%M")
        ),
    );
    let out = f.ok(&["member", "set-window", "m1", "--kind", "node-os", "-f", &window]).await;
    assert!(
        out.contains("warning:") && out.contains("4 hours"),
        "a window under 4 hours is accepted with a warning: {out}"
    );
    let shown = f.json(&["member", "show", "m1"]).await;
    assert_eq!(shown["node_os_schedule"]["frequency"]["type"], "Daily", "{shown}");
    let bad = f.file(
        "bad.json",
        r#"{"frequency":{"type":"Daily","interval_days":0},"start_time":"25:00","duration_hours":1}"#,
    );
    let err = f.refused(&["member", "set-window", "m1", "-f", &bad]).await;
    assert!(err.contains("InvalidArgument"), "{err}");

    f.ok(&["run", "create", "r1", "--upgrade-type", "NodeImageOnly"]).await;
    f.ok(&["run", "start", "r1"]).await;
    let run = f.wait_run("r1", &["Pending"]).await;
    let m1 = run_member(&run, "m1");
    assert_eq!(m1["status"], "Pending", "{run}");
    let msg = m1["message"].as_str().unwrap_or_default();
    let expected_opening = opens.format("%Y-%m-%dT%H:%M").to_string();
    assert!(msg.contains(&expected_opening), "the message gives the next opening ({expected_opening}): {msg}");
    assert_eq!(run["stages"][0]["groups"][0]["status"], "Pending");
    assert_eq!(run["stages"][0]["status"], "Pending");
    // The plan preview puts m1 at its window.
    let plan = f.json(&["run", "plan", "r1"]).await;
    let at = plan["members"][0]["predicted_start"].as_str().unwrap_or_default().to_string();
    assert!(at.starts_with(&expected_opening), "predicted start {at} at the window opening {expected_opening}");
    // Nothing is being upgraded, so stopping a Pending run is immediate.
    f.ok(&["run", "stop", "r1"]).await;
    let run = f.run_state("r1").await;
    assert_eq!(run["status"], "Stopped", "{run}");
    f.ok(&["run", "delete", "r1"]).await;
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sec5_runs_copy_their_strategy_and_may_be_edited_until_they_start() {
    let f = fleet(&[("n1", "m1", "eu"), ("n2", "m2", "eu")], "Debian-12-202311.07.0").await;
    let one = f.file("one.json", r#"{"stages":[{"name":"s","groups":[{"name":"g","members":["m1"]}]}]}"#);
    let two = f.file("two.json", r#"{"stages":[{"name":"s","groups":[{"name":"g","members":["m1","m2"]}]}]}"#);
    f.ok(&["strategy", "create", "canary", "-f", &one]).await;
    f.ok(&["run", "create", "r1", "--strategy", "canary", "--upgrade-type", "NodeImageOnly"]).await;
    f.ok(&["strategy", "create", "canary", "-f", &two]).await;
    let run = f.run_state("r1").await;
    let members = run["stages"][0]["groups"][0]["members"].as_array().map(Vec::len);
    assert_eq!(members, Some(1), "a later edit of the strategy does not reach the run: {run}");
    f.ok(&["run", "update", "r1", "--strategy", "canary", "--upgrade-type", "NodeImageOnly"]).await;
    let run = f.run_state("r1").await;
    assert_eq!(run["stages"][0]["groups"][0]["members"].as_array().map(Vec::len), Some(2), "{run}");
    f.publish("Debian-12", "202311.07.0", "eu", b"image A", &untrusted_signature()).await;
    f.ok(&["run", "start", "r1"]).await;
    f.wait_run("r1", &["Skipped"]).await;
    let err = f.refused(&["run", "update", "r1", "-f", &one, "--upgrade-type", "NodeImageOnly"]).await;
    assert!(err.contains("only before it starts"), "{err}");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sec5_full_run_is_pending_until_the_kubernetes_version_reaches_the_members_region() {
    let f = fleet(&[("n1", "m1", "eu")], "Debian-12-202311.07.0").await;
    f.publish("Debian-12", "202311.07.0", "eu", b"image A", &untrusted_signature()).await;
    f.ok(&["kubernetes", "publish", "--version", "1.30.2", "--regions", "us"]).await;
    f.ok(&["run", "create", "k1", "--upgrade-type", "Full", "--kubernetes-version", "1.30.2"]).await;
    f.ok(&["run", "start", "k1"]).await;
    let run = f.wait_run("k1", &["Pending"]).await;
    let msg = run_member(&run, "m1")["message"].as_str().unwrap_or_default().to_string();
    assert!(msg.contains("1.30.2") && msg.contains("eu"), "says which version is missing where: {msg}");
    let listed = f.json(&["kubernetes", "list"]).await;
    assert_eq!(listed["releases"][0]["version"], "1.30.2");
    f.ok(&["kubernetes", "publish", "--version", "1.30.2", "--regions", "eu"]).await;
    let run = wait_for("m1 leaves Pending once 1.30.2 is in eu", WAIT, || async {
        let v = upkeepctl_json(&f.pki, &f.hub.url(), &["run", "show", "k1"]).await.ok()?;
        (run_member(&v, "m1")["status"] != "Pending").then_some(v)
    })
    .await;
    assert!(run_member(&run, "m1")["started_at"].is_string(), "{run}");
    f.stop().await;
}

/// The regions an image version of `image list -o json` (or of `image publish|withdraw -o json`) is published in.
fn regions_of(image: &Value) -> Vec<String> {
    image["regions"].as_object().map(|r| r.keys().cloned().collect()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_publish_adds_regions_and_withdraw_takes_one_back() {
    let f = fleet(&[("n1", "m1", "eu")], "Debian-12-202311.07.0").await;
    // Keep the member's channel out of the way: this is about the catalog only.
    f.ok(&["member", "set-channel", "m1", "None"]).await;
    let sig = &untrusted_signature();
    let listed = || async { f.json(&["image", "list", "--family", "Debian-12"]).await["images"][0].clone() };

    // A release spreads region by region: publishing the same artifact again adds regions.
    f.publish("Debian-12", "202312.01.0", "eu", b"image B", sig).await;
    let first = listed().await;
    f.publish("Debian-12", "202312.01.0", "us,ap", b"image B", sig).await;
    let img = listed().await;
    assert_eq!(regions_of(&img), ["ap", "eu", "us"], "{img}");
    assert_eq!(img["regions"]["eu"], first["regions"]["eu"], "eu keeps its availability time: {img}");
    assert_eq!(img["published_at"], first["published_at"], "{img}");
    // A region published again takes the new availability time.
    let art = f.work.path().join("Debian-12-202312.01.0.img").to_string_lossy().into_owned();
    let again = f
        .json(&[
            "image",
            "publish",
            "--family",
            "Debian-12",
            "--version",
            "202312.01.0",
            "--regions",
            "eu",
            "--available-at",
            "2030-01-01T00:00:00Z",
            "--file",
            &art,
            "--format",
            "raw",
        ])
        .await;
    assert_eq!(again["regions"]["eu"], "2030-01-01T00:00:00Z", "{again}");
    assert_eq!(regions_of(&again), ["ap", "eu", "us"], "{again}");

    // Other bytes under the same version are refused, naming the field and the fix, and change nothing.
    let other = f.work.path().join("other.img");
    std::fs::write(&other, b"image C").expect("write");
    std::fs::write(other.with_extension("img.minisig"), sig).expect("write");
    let other = other.to_string_lossy().into_owned();
    let err = f
        .refused(&[
            "image",
            "publish",
            "--family",
            "Debian-12",
            "--version",
            "202312.01.0",
            "--regions",
            "sa",
            "--file",
            &other,
            "--format",
            "raw",
        ])
        .await;
    assert!(err.contains("sha256:") && err.contains("new version"), "{err}");
    assert_eq!(regions_of(&listed().await), ["ap", "eu", "us"]);

    // Withdraw one region; the others stay.
    let out = f.ok(&["image", "withdraw", "Debian-12", "202312.01.0", "--region", "us"]).await;
    assert!(out.contains("withdrew Debian-12-202312.01.0 from us") && out.contains("ap,eu"), "{out}");
    assert_eq!(regions_of(&listed().await), ["ap", "eu"]);

    // Only an operator may withdraw.
    let viewer =
        upkeepctl(&f.pki, &f.hub.url(), "viewer", &["image", "withdraw", "Debian-12", "202312.01.0", "--region", "ap"])
            .await;
    assert!(!viewer.status.success());
    let err = String::from_utf8_lossy(&viewer.stderr);
    assert!(err.contains("PermissionDenied") && err.contains("operator"), "{err}");

    // Refusals that change nothing: a region it is not in, an unknown or malformed version, the last region.
    let err = f.refused(&["image", "withdraw", "Debian-12", "202312.01.0", "--region", "us"]).await;
    assert!(err.contains("not published in region \"us\"") && err.contains("ap, eu"), "{err}");
    let err = f.refused(&["image", "withdraw", "Debian-12", "202401.01.0", "--region", "eu"]).await;
    assert!(err.contains("NotFound") && err.contains("Debian-12-202401.01.0"), "{err}");
    let err = f.refused(&["image", "withdraw", "Debian-12", "2023.1", "--region", "eu"]).await;
    assert!(err.contains("version:") && err.contains("YYYYMM.DD.N"), "{err}");
    let err = f.refused(&["image", "withdraw", "Debian-12", "202312.01.0", "--region", "bad region"]).await;
    assert!(err.contains("region:"), "{err}");
    assert_eq!(regions_of(&listed().await), ["ap", "eu"]);
    let left = f.json(&["image", "withdraw", "Debian-12", "202312.01.0", "--region", "ap"]).await;
    assert_eq!(regions_of(&left), ["eu"], "{left}");
    let err = f.refused(&["image", "withdraw", "Debian-12", "202312.01.0", "--region", "eu"]).await;
    assert!(err.contains("only region") && err.contains("publish it in another region first"), "{err}");
    assert_eq!(regions_of(&listed().await), ["eu"]);
    f.stop().await;
}

/// Signs and publishes image `version` of Debian-12 through the CLI, trusted by every node of `nodes`.
async fn publish_trusted(f: &Fleet, nodes: &[&str], version: &str) {
    let keys = f.work.path().join("keys");
    if !keys.join("upkeep-image.pub").exists() {
        f.ok(&["image", "keygen", "--dir", &keys.to_string_lossy()]).await;
    }
    for n in nodes {
        let dir = f.work.path().join(n).join("root/etc/upkeep/trusted-keys");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::copy(keys.join("upkeep-image.pub"), dir.join("upkeep-image.pub")).expect("trust key");
    }
    let img = f.work.path().join(format!("debian-{version}.tar"));
    let img = img.to_string_lossy().into_owned();
    f.ok(&["image", "build", "--out", &img, "--family", "Debian-12", "--version", version]).await;
    f.ok(&["image", "sign", "--key", &keys.join("upkeep-image.key").to_string_lossy(), &img]).await;
    f.ok(&["image", "publish", "--family", "Debian-12", "--version", version, "--regions", "eu,us", "--file", &img])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sec5_staged_node_image_run_reimages_every_member_in_stage_order() {
    let nodes = [("n1", "m1", "eu"), ("n2", "m2", "us"), ("n3", "m3", "eu"), ("n4", "m4", "us")];
    let f = fleet(&nodes, "Debian-12-202311.07.0").await;
    publish_trusted(&f, &["n1", "n2", "n3", "n4"], "202312.01.0").await;
    let order = f.file(
        "order.json",
        r#"{"stages":[
            {"name":"canary","groups":[{"name":"first","members":["m1"]}],"after_stage_wait_seconds":1},
            {"name":"prod","groups":[{"name":"a","members":["m2","m3"]},{"name":"b","members":["m4"]}]}]}"#,
    );
    f.ok(&["strategy", "create", "rollout", "-f", &order]).await;
    f.ok(&["run", "create", "r1", "--strategy", "rollout", "--upgrade-type", "NodeImageOnly"]).await;
    let plan = f.json(&["run", "plan", "r1", "--member-seconds", "60"]).await;
    assert_eq!(plan["members"][0]["member"], "m1", "the canary comes first: {plan}");
    f.ok(&["run", "start", "r1"]).await;
    let watch = f.ctl(&["run", "watch", "r1", "-o", "json"]).await;
    assert!(watch.status.success(), "watch exits 0 when the run Completed: {}", String::from_utf8_lossy(&watch.stderr));
    let run = f.run_state("r1").await;
    assert_eq!(run["status"], "Completed", "{run}");
    for m in ["m1", "m2", "m3", "m4"] {
        assert_eq!(run_member(&run, m)["status"], "Completed", "{run}");
        assert_eq!(run_member(&run, m)["target"]["images"]["pool1"], "Debian-12-202312.01.0");
    }
    assert_eq!(run["stages"][0]["after_stage_wait"]["status"], "Completed", "the wait ran: {run}");
    // Every node now reports the new image from the booted image's own metadata.
    let list = f.json(&["node", "list"]).await;
    for n in list["nodes"].as_array().expect("nodes") {
        assert_eq!(n["labels"]["upkeep.io/node-image-version"], "Debian-12-202312.01.0", "{n}");
    }
    // Stage order: the canary stage completed (and its wait) before anything in prod started.
    let events: Vec<Value> =
        String::from_utf8_lossy(&watch.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let seq_of = |level: &str, to: &str| {
        events
            .iter()
            .find(|e| e["level"] == level && e["to"] == to)
            .and_then(|e| e["seq"].as_u64())
            .unwrap_or_else(|| panic!("no event {level} -> {to}"))
    };
    let wait_done = seq_of("wait after stage \"canary\"", "Completed");
    assert!(seq_of("stage \"canary\"", "Completed") <= wait_done);
    assert!(wait_done < seq_of("stage \"prod\"", "Running"), "prod starts after the canary's wait");
    assert!(seq_of("member \"m2\"", "Completed") < seq_of("member \"m3\"", "Running"), "members of a group one by one");
    assert!(events.iter().any(|e| e["kind"] == "node" && e["to"] == "Completed"), "node events are kept too");
    // The hub's metrics saw it: one handoff from a member's result (m2 -> m3: m1's result starts the canary's
    // wait, and the wait's end, not a result, starts prod), the transitions committed, a reimage step per node.
    let metrics = upkeep_hub::metrics::Source::new(f.hub.fleet(), Vec::new()).render();
    let count = |series: &str| {
        metrics.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse::<u64>().ok()).unwrap_or(0)
    };
    assert_eq!(count("upkeep_run_handoff_seconds_count"), 1, "{metrics}");
    assert!(count("upkeep_store_run_commit_seconds_count") >= 4, "{metrics}");
    assert_eq!(count("upkeep_node_steps_total{step=\"reimage\",result=\"ok\"}"), 4, "{metrics}");
    assert_eq!(count("upkeep_runs{status=\"Completed\"}"), 1, "{metrics}");
    assert_eq!(count("upkeep_catalog_releases{family=\"Debian-12\"}"), 1, "{metrics}");
    // On a terminal, watch draws a live tree and ends with the final tree (run under a pty with script(1)).
    let cmd = format!("{} run watch r1", bin("upkeepctl").display());
    let tty = tokio::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("UPKEEP_HUB", f.hub.url())
        .env("UPKEEP_CA", f.pki.file("ca.pem"))
        .env("UPKEEP_CERT", f.pki.file("viewer.pem"))
        .env("UPKEEP_KEY", f.pki.file("viewer.key"))
        .output()
        .await
        .expect("script(1) from bsdutils");
    let screen = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success(), "{screen}");
    assert!(screen.contains("Run r1 (NodeImageOnly") && screen.contains("member m4"), "final tree: {screen}");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sec5_hub_killed_mid_run_carries_on_without_upgrading_any_member_twice() {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let mut hub = HubProcess::start(&pki, &work.path().join("hub")).await;
    let url = hub.url();
    let names = ["n1", "n2", "n3"];
    let mut agents = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let node =
            make_node(&pki, work.path(), &url, n, &format!("m{}", i + 1), "pool1", "eu", "Debian-12-202311.07.0");
        agents.push(TestAgent::start(&node));
    }
    wait_for("three nodes Ready", WAIT, || async {
        let l = upkeepctl_json(&pki, &url, &["node", "list"]).await.ok()?;
        (l["nodes"].as_array()?.iter().filter(|n| n["status"] == "Ready").count() == 3).then_some(())
    })
    .await;
    let f = Fleet { pki, work, hub: TestHub::detached(&url), agents };
    publish_trusted(&f, &names, "202312.01.0").await;
    f.ok(&["run", "create", "r1", "--upgrade-type", "NodeImageOnly"]).await;
    f.ok(&["run", "start", "r1"]).await;
    // SIGKILL right after the start was committed (m1's upgrade just handed to its executor)...
    hub.restart(&f.pki).await;
    // ...and again while the second member is being upgraded.
    wait_for("m2 Running or later", WAIT, || async {
        let v = upkeepctl_json(&f.pki, &url, &["run", "show", "r1"]).await.ok()?;
        (run_member(&v, "m2")["status"] != "NotStarted").then_some(())
    })
    .await;
    hub.restart(&f.pki).await;
    let run = f.wait_run("r1", &["Completed", "Failed"]).await;
    assert_eq!(run["status"], "Completed", "{run}");
    for (i, n) in names.iter().enumerate() {
        let m = format!("m{}", i + 1);
        assert_eq!(run_member(&run, &m)["status"], "Completed", "none wrongly skipped: {run}");
        assert_eq!(reimages_journalled(&f.work.path().join(n)), 1, "{n} was reimaged exactly once");
    }
    let list = f.json(&["node", "list"]).await;
    assert!(
        list["nodes"].as_array().expect("nodes").iter().all(|n| n["node_image_version"] == "Debian-12-202312.01.0")
    );
    for a in f.agents {
        a.stop().await;
    }
    hub.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strategies_and_windows_are_accepted_as_yaml() {
    let f = fleet(&[("n1", "m1", "eu"), ("n2", "m2", "eu")], "Debian-12-202311.07.0").await;
    let yaml = f.file(
        "rollout.yaml",
        "stages:\n  - name: canary\n    groups:\n      - name: g\n        members: [m1]\n    after_stage_wait_seconds: 60\n  - name: rest\n    max_concurrency: 50%\n    groups:\n      - name: g\n        members: [m2]\n",
    );
    f.ok(&["strategy", "create", "rollout", "-f", &yaml]).await;
    let s = f.json(&["strategy", "show", "rollout"]).await;
    assert_eq!(s["spec"]["stages"][0]["after_stage_wait_seconds"], 60, "{s}");
    assert_eq!(s["spec"]["stages"][1]["max_concurrency"], "50%", "{s}");
    let y = f.ctl(&["strategy", "show", "rollout", "-o", "yaml"]).await;
    assert!(String::from_utf8_lossy(&y.stdout).contains("name: canary"));
    let window = f.file(
        "w.yaml",
        "frequency: {type: Weekly, interval_weeks: 1, day_of_week: Sunday}\nstart_time: \"02:00\"\nduration_hours: 6\n",
    );
    f.ok(&["member", "set-window", "m2", "-f", &window]).await;
    let m = f.json(&["member", "show", "m2"]).await;
    assert_eq!(m["node_os_schedule"]["frequency"]["day_of_week"], "Sunday", "{m}");
    f.stop().await;
}
