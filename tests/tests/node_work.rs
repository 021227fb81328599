//! One way to touch a node: update runs, channel rollouts and reboots meet on the same nodes through the one
//! executor and the one ledger (real hub, real agents, real upkeepctl, real SQLite, real mTLS).
//!
//! Every node's cordon and uncordon hooks append `<unix ms> cordon <node>` / `<unix ms> uncordon <node>` to one
//! shared log, so a test can check from the cordon intervals that no two nodes of a member were out at once.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;
use upkeep_proto::v1;
use upkeep_tests::*;

const WAIT: Duration = Duration::from_secs(120);

struct Fleet {
    pki: TestPki,
    work: tempfile::TempDir,
    hub: TestHub,
    agents: Vec<(String, TestAgent)>,
    nodes: Vec<TestNode>,
}

/// Hook lines for a node: cordon/uncordon append to the shared log; `drain` is the drain hook's shell script.
fn hooks(log: &Path, name: &str, drain: &str) -> String {
    let line = |verb: &str| format!("[\"sh\", \"-c\", \"echo $(date +%s%3N) {verb} {name} >> {}\"]", log.display());
    let mut s = format!("[cordon]\ncordon = {}\nuncordon = {}\n", line("cordon"), line("uncordon"));
    if !drain.is_empty() {
        s.push_str(&format!("drain = [\"sh\", \"-c\", {drain:?}]\n"));
    }
    s
}

impl Fleet {
    /// A hub (with `hub_extra` in hub.toml) and no nodes yet.
    async fn new(hub_extra: &str) -> Fleet {
        let pki = TestPki::new();
        let work = tempfile::tempdir().expect("tempdir");
        let hub =
            TestHub::start_with(&pki, &work.path().join("hub"), "127.0.0.1:0".parse().expect("addr"), hub_extra).await;
        Fleet { pki, work, hub, agents: Vec::new(), nodes: Vec::new() }
    }

    /// Adds a node of member m1 (image `image`) with the logging hooks and `drain` as its drain hook; starts its
    /// agent and waits until it is Ready.
    async fn join(&mut self, name: &str, image: &str, drain: &str) {
        let node = make_node(&self.pki, self.work.path(), &self.hub.url(), name, "m1", "pool1", "eu", image);
        let mut cfg = std::fs::read_to_string(&node.config).expect("agent.toml");
        cfg.push_str(&hooks(&self.log_path(), name, drain));
        std::fs::write(&node.config, cfg).expect("agent.toml");
        if let Some(keys) = self.keys().filter(|k| k.exists()) {
            trust(&node, &keys);
        }
        self.agents.push((name.to_string(), TestAgent::start(&node)));
        self.nodes.push(node);
        let want = name.to_string();
        wait_for("the node registered", WAIT, || async {
            let list = upkeepctl_json(&self.pki, &self.hub.url(), &["node", "list"]).await.ok()?;
            list["nodes"].as_array()?.iter().any(|n| n["name"] == want.as_str() && n["status"] == "Ready").then_some(())
        })
        .await;
    }

    fn log_path(&self) -> PathBuf {
        self.work.path().join("cordon.log")
    }

    fn keys(&self) -> Option<PathBuf> {
        Some(self.work.path().join("keys"))
    }

    async fn ok(&self, args: &[&str]) -> String {
        upkeepctl_ok(&self.pki, &self.hub.url(), args).await
    }

    async fn json(&self, args: &[&str]) -> Value {
        upkeepctl_json(&self.pki, &self.hub.url(), args).await.expect("json")
    }

    fn node(&self, name: &str) -> &TestNode {
        self.nodes.iter().find(|n| n.name == name).expect("node")
    }

    /// (ms, verb, node) lines of the cordon log.
    fn log(&self) -> Vec<(i64, String, String)> {
        std::fs::read_to_string(self.log_path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut it = l.split(' ');
                Some((it.next()?.parse().ok()?, it.next()?.to_string(), it.next()?.to_string()))
            })
            .collect()
    }

    fn flag_reboot_required(&self, name: &str) {
        let p = self.node(name).root.join("run/reboot-required");
        std::fs::create_dir_all(p.parent().expect("dir")).expect("mkdir");
        std::fs::write(p, "*** System restart required ***\n").expect("flag");
    }

    /// Signs and publishes image `version` of Debian-12 in eu, trusted by every node (present and future).
    async fn publish(&self, version: &str) {
        let keys = self.keys().expect("keys");
        if !keys.join("upkeep-image.pub").exists() {
            self.ok(&["image", "keygen", "--dir", &keys.to_string_lossy()]).await;
        }
        for n in &self.nodes {
            trust(n, &keys);
        }
        let img = self.work.path().join(format!("debian-{version}.tar")).to_string_lossy().into_owned();
        self.ok(&["image", "build", "--out", &img, "--family", "Debian-12", "--version", version]).await;
        self.ok(&["image", "sign", "--key", &keys.join("upkeep-image.key").to_string_lossy(), &img]).await;
        self.ok(&[
            "image",
            "publish",
            "--family",
            "Debian-12",
            "--version",
            version,
            "--regions",
            "eu",
            "--file",
            &img,
        ])
        .await;
    }

    /// Creates and starts a NodeImageOnly run of m1 (Latest) and waits for one of `ends`.
    async fn run(&self, name: &str, ends: &[&str]) -> Value {
        self.ok(&["run", "create", name, "--upgrade-type", "NodeImageOnly"]).await;
        self.ok(&["run", "start", name]).await;
        self.wait_run(name, ends).await
    }

    async fn wait_run(&self, name: &str, ends: &[&str]) -> Value {
        wait_for(&format!("run {name} ends {ends:?}"), WAIT, || async {
            let r = upkeepctl_json(&self.pki, &self.hub.url(), &["run", "show", name]).await.ok()?;
            ends.iter().any(|e| r["status"] == *e).then_some(r)
        })
        .await
    }

    async fn image_of(&self, node: &str) -> String {
        let n = self.json(&["node", "show", node]).await;
        n["node_image_version"].as_str().unwrap_or_default().to_string()
    }

    async fn stop(self) {
        for (_, a) in self.agents {
            a.stop().await;
        }
        let mut hub = self.hub;
        hub.stop().await;
    }
}

fn trust(n: &TestNode, keys: &Path) {
    let dir = n.root.join("etc/upkeep/trusted-keys");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::copy(keys.join("upkeep-image.pub"), dir.join("upkeep-image.pub")).expect("trust key");
}

/// Checks from the cordon log that at most one node was out of service at any moment and returns the nodes in
/// the order they were taken out.
fn one_at_a_time(log: &[(i64, String, String)]) -> Vec<String> {
    let mut out_now: Option<&str> = None;
    let mut order = Vec::new();
    for (_, verb, node) in log {
        match (verb.as_str(), out_now) {
            ("cordon", None) => {
                out_now = Some(node);
                order.push(node.clone());
            }
            // A repeated cordon of the node already out (idempotent hooks) changes nothing.
            ("cordon", Some(n)) if n == node => {}
            ("uncordon", Some(n)) if n == node => out_now = None,
            ("uncordon", None) => {}
            _ => panic!("two nodes out of service at once (max_unavailable 1): {log:?}"),
        }
    }
    order
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_a_rollout_another_run_and_a_reboot_all_succeed_on_one_node_and_an_old_generation_is_refused() {
    // A long cadence: the second release waits for it, so the second run (not the channel) takes the node there.
    let mut f = Fleet::new("[auto_upgrade]\nenabled = true\ncadence_days = 7\n").await;
    f.join("n1", "Debian-12-202311.01.0", "").await;
    f.ok(&["member", "set-channel", "m1", "None"]).await;

    // 1. An update run takes the node to 202312.01.0.
    f.publish("202312.01.0").await;
    let r = f.run("r1", &["Completed", "Failed"]).await;
    assert_eq!(r["status"], "Completed", "{r}");
    assert_eq!(f.image_of("n1").await, "Debian-12-202312.01.0");

    // 2. The NodeImage channel rolls the next release to it (the run's commands were newer than anything a
    //    channel rollout sent before; both now draw from the same fenced sequence).
    f.ok(&["member", "set-channel", "m1", "NodeImage"]).await;
    f.publish("202401.01.0").await;
    wait_for("the channel rolled 202401.01.0", WAIT, || async {
        (f.image_of("n1").await == "Debian-12-202401.01.0").then_some(())
    })
    .await;
    let status = wait_for("the rollout completed", WAIT, || async {
        let m = upkeepctl_json(&f.pki, &f.hub.url(), &["member", "show", "m1"]).await.ok()?;
        let s = m["auto_upgrade_status"].as_str()?.to_string();
        s.contains("Completed").then_some(s)
    })
    .await;
    assert!(!status.contains("failed"), "{status}");

    // 3. Another release inside the cadence: the channel waits, a second run takes the node there.
    f.publish("202402.01.0").await;
    let r = f.run("r2", &["Completed", "Failed"]).await;
    assert_eq!(r["status"], "Completed", "{r}");
    assert_eq!(f.image_of("n1").await, "Debian-12-202402.01.0");

    // 4. An operator's reboot of the same node.
    let before = f.log().len();
    f.ok(&["node", "reboot", "n1", "--force"]).await;
    wait_for("the reboot finished", WAIT, || async {
        let leases = upkeepctl_json(&f.pki, &f.hub.url(), &["lease", "list"]).await.ok()?;
        (f.log().len() >= before + 2 && leases.as_array()?.is_empty()).then_some(())
    })
    .await;
    let order = one_at_a_time(&f.log());
    // run r1, the channel-switch reimage (None -> NodeImage, SPEC §2), the 202401 rollout, run r2, the reboot.
    assert_eq!(order.len(), 5, "each piece of work took n1 out exactly once: {:?}", f.log());

    // A command with an old generation (what a stale issuer would send) is refused by the node.
    let stale = f
        .hub
        .fleet()
        .command_at_generation("n1", "stale/cordon", 1, v1::command::Kind::Cordon(v1::Cordon {}), WAIT)
        .await
        .expect("a result");
    assert!(!stale.ok && stale.error.contains("older than the newest seen"), "{stale:?}");
    assert_eq!(f.log().len(), before + 2, "the refused command did nothing");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_answering_another_nodes_command_is_refused_and_the_run_does_not_advance() {
    let mut f = Fleet::new("[auto_upgrade]\nenabled = false\n").await;
    // n1's drain takes long enough for an impostor to answer it first.
    let gate = f.work.path().join("drain-gate");
    f.join("n1", "Debian-12-202311.01.0", &format!("while [ ! -e {} ]; do sleep 0.2; done", gate.display())).await;
    f.publish("202312.01.0").await;
    f.ok(&["run", "create", "r1", "--upgrade-type", "NodeImageOnly"]).await;
    f.ok(&["run", "start", "r1"]).await;
    wait_for("n1 is draining", WAIT, || async {
        let n = upkeepctl_json(&f.pki, &f.hub.url(), &["node", "show", "n1"]).await.ok()?;
        n["waiting"].as_str()?.ends_with(": drain").then_some(())
    })
    .await;

    // node-x holds a valid node certificate and answers n1's drain with ok.
    let (cert, key) = f.pki.node("node-x");
    let ch = mtls_channel(&f.pki, &f.hub.url(), &cert, &key).await;
    let mut impostor = v1::agent_service_client::AgentServiceClient::new(ch);
    let register = v1::NodeReport {
        node_name: "node-x".into(),
        member: "m2".into(),
        node_pool: "p".into(),
        region: "eu".into(),
        ..Default::default()
    };
    let forged = v1::OperationResult {
        operation_id: "run/r1/m1/1/n1/drain".into(),
        generation: 0,
        ok: true,
        error: String::new(),
        ..Default::default()
    };
    let msgs = tokio_stream::iter(vec![
        v1::AgentMessage { body: Some(v1::agent_message::Body::Register(register)) },
        v1::AgentMessage { body: Some(v1::agent_message::Body::Result(forged)) },
    ]);
    let mut inbound = impostor.session(msgs).await.expect("session opens").into_inner();
    let err = loop {
        match inbound.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the session ended without refusing the forged result"),
            Err(s) => break s,
        }
    };
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("node-x") && err.message().contains("n1"), "{}", err.message());

    // The drain is still pending on n1 and the run has not moved: nothing was uncordoned or reimaged.
    let r = f.json(&["run", "show", "r1"]).await;
    assert_eq!(run_member(&r, "m1")["status"], "Running", "{r}");
    let n = f.json(&["node", "show", "n1"]).await;
    assert!(n["waiting"].as_str().is_some_and(|w| w.ends_with(": drain")), "{n}");
    assert!(f.log().iter().all(|(_, v, _)| v == "cordon"), "{:?}", f.log());
    assert_eq!(f.image_of("n1").await, "Debian-12-202311.01.0");

    // The real drain finishes: the run goes on and completes.
    std::fs::write(&gate, "").expect("open the gate");
    let r = f.wait_run("r1", &["Completed", "Failed"]).await;
    assert_eq!(r["status"], "Completed", "{r}");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_batch_and_a_reboot_asked_at_once_never_take_two_nodes_out() {
    let mut f = Fleet::new("[auto_upgrade]\nenabled = false\n").await;
    // Real (not instant) steps: every drain takes two seconds. n3 is already at the run's target, so the run
    // leaves it alone: its reboot and the run's batches compete for the one slot.
    for (n, image) in
        [("n1", "Debian-12-202311.01.0"), ("n2", "Debian-12-202311.01.0"), ("n3", "Debian-12-202312.01.0")]
    {
        f.join(n, image, "sleep 2").await;
    }
    f.ok(&["member", "set-channel", "m1", "Unmanaged"]).await;
    f.ok(&["member", "set-max-unavailable", "m1", "1"]).await;
    f.publish("202312.01.0").await;
    // The same moment: n3 needs a reboot and a run starts upgrading n1 and n2.
    f.flag_reboot_required("n3");
    let r = f.run("r1", &["Completed", "Failed"]).await;
    assert_eq!(r["status"], "Completed", "{r}");
    wait_for("n2 rebooted and every lease given back", WAIT, || async {
        let nodes = upkeepctl_json(&f.pki, &f.hub.url(), &["node", "list"]).await.ok()?;
        let leases = upkeepctl_json(&f.pki, &f.hub.url(), &["lease", "list"]).await.ok()?;
        let done = nodes["nodes"].as_array()?.iter().all(|n| n["reboot_required"] == false);
        (done && leases.as_array()?.is_empty()).then_some(())
    })
    .await;
    let mut order = one_at_a_time(&f.log());
    order.sort();
    assert_eq!(order, ["n1", "n2", "n3"], "two run nodes and one reboot, one at a time: {:?}", f.log());
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_step_keeps_its_node_out_and_a_reboot_elsewhere_waits_until_an_operator_uncordons_it() {
    let mut f = Fleet::new("[auto_upgrade]\nenabled = false\n").await;
    for n in ["n1", "n2"] {
        f.join(n, "Debian-12-202311.01.0", "").await;
    }
    f.ok(&["member", "set-channel", "m1", "Unmanaged"]).await;
    f.publish("202312.01.0").await;
    // n1 does not trust the image's key any more: its reimage fails (a changing step).
    std::fs::remove_file(f.node("n1").root.join("etc/upkeep/trusted-keys/upkeep-image.pub")).expect("untrust");
    let r = f.run("r1", &["Failed", "Completed"]).await;
    assert_eq!(r["status"], "Failed", "{r}");
    let err = run_member(&r, "m1")["error"].as_str().unwrap_or_default().to_string();
    assert!(err.contains("n1") && err.contains("reimage") && err.contains("stays cordoned"), "{err}");
    // The policy: n1 stays cordoned and keeps its lease, held by the run.
    let leases = f.json(&["lease", "list"]).await;
    let held: Vec<(&str, &str)> = leases
        .as_array()
        .expect("leases")
        .iter()
        .map(|l| {
            (l.get("node").and_then(Value::as_str).unwrap_or(""), l.get("holder").and_then(Value::as_str).unwrap_or(""))
        })
        .collect();
    assert_eq!(held, [("n1", "run/r1/m1")], "{leases}");
    assert_eq!(f.log().last().map(|(_, v, n)| (v.as_str(), n.as_str())), Some(("cordon", "n1")));
    let n1 = f.json(&["node", "show", "n1"]).await;
    assert!(n1["out_of_service"].as_str().is_some_and(|s| s.contains("run/r1/m1")), "{n1}");

    // n2 needs a reboot: the budget is in use by n1, so n2 waits and is never taken out alongside it.
    f.flag_reboot_required("n2");
    let note = wait_for("n2 says what it waits for", WAIT, || async {
        let n = upkeepctl_json(&f.pki, &f.hub.url(), &["node", "show", "n2"]).await.ok()?;
        let note = n["channel_note"].as_str()?.to_string();
        note.contains("waiting for a reboot lease").then_some(note)
    })
    .await;
    assert!(note.contains("\"n1\"") && note.contains("max_unavailable 1"), "{note}");
    let n2 = f.json(&["node", "show", "n2"]).await;
    assert!(n2["waiting"].as_str().is_some_and(|w| w.contains("its reboot waits") && w.contains("\"n1\"")), "{n2}");
    assert!(n2["next_eligible"].as_str().is_some(), "{n2}");
    assert!(f.log().iter().all(|(_, _, n)| n == "n1"), "n2 was never taken out: {:?}", f.log());

    // The operator puts n1 back: its lease is given back, then n2 reboots.
    let out = f.ok(&["node", "uncordon", "n1"]).await;
    assert!(out.contains("run/r1/m1"), "{out}");
    wait_for("n2 rebooted and every lease given back", WAIT, || async {
        let n = upkeepctl_json(&f.pki, &f.hub.url(), &["node", "show", "n2"]).await.ok()?;
        let leases = upkeepctl_json(&f.pki, &f.hub.url(), &["lease", "list"]).await.ok()?;
        (n["reboot_required"] == false && leases.as_array()?.is_empty()).then_some(())
    })
    .await;
    let order = one_at_a_time(&f.log());
    assert_eq!(order, ["n1", "n2"], "{:?}", f.log());
    f.stop().await;
}

/// A drain hook that fails naming the pod and the budget that block it, unless forced.
const BLOCKED_DRAIN: &str = "if [ \"$UPKEEP_DRAIN_FORCE\" = 1 ]; then exit 0; fi; \
    echo 'pod shop/web-1 blocked by PodDisruptionBudget shop/web-pdb' >&2; exit 1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undrainable_nodes_fail_skip_or_force_as_the_member_says_and_the_blocker_is_named() {
    let mut f = Fleet::new("[auto_upgrade]\nenabled = false\n").await;
    f.join("n1", "Debian-12-202311.01.0", BLOCKED_DRAIN).await;
    f.join("n2", "Debian-12-202311.01.0", "").await;
    f.ok(&["member", "set-channel", "m1", "None"]).await;
    f.publish("202312.01.0").await;

    // Fail (the default): the run fails naming the budget; n1 is uncordoned, unchanged, its lease given back.
    let r = f.run("fail", &["Failed", "Completed"]).await;
    assert_eq!(r["status"], "Failed", "{r}");
    let err = run_member(&r, "m1")["error"].as_str().unwrap_or_default().to_string();
    assert!(err.contains("PodDisruptionBudget shop/web-pdb") && err.contains("undrainable policy Fail"), "{err}");
    assert!(err.contains("uncordoned"), "{err}");
    assert!(f.json(&["lease", "list"]).await.as_array().expect("leases").is_empty());
    assert_eq!(f.image_of("n1").await, "Debian-12-202311.01.0");

    // SkipNode: n1 is left as it is, the run goes on with n2 and completes; the skip names the blocker.
    let out = f.ok(&["member", "set-drain", "m1", "--undrainable", "SkipNode", "--timeout", "30"]).await;
    assert!(out.contains("undrainable SkipNode") && out.contains("drain timeout 30 s"), "{out}");
    let r = f.run("skip", &["Completed", "Failed"]).await;
    assert_eq!(r["status"], "Completed", "{r}");
    assert_eq!(f.image_of("n1").await, "Debian-12-202311.01.0");
    assert_eq!(f.image_of("n2").await, "Debian-12-202312.01.0");
    let text = f.ok(&["run", "watch", "skip"]).await;
    assert!(text.contains("Skipped") && text.contains("PodDisruptionBudget shop/web-pdb"), "{text}");

    // Force: n1 is drained again ignoring budgets and reimaged.
    f.ok(&["member", "set-drain", "m1", "--undrainable", "Force"]).await;
    let r = f.run("force", &["Completed", "Failed"]).await;
    assert_eq!(r["status"], "Completed", "{r}");
    assert_eq!(f.image_of("n1").await, "Debian-12-202312.01.0");
    let text = f.ok(&["run", "watch", "force"]).await;
    assert!(text.contains("forced") && text.contains("PodDisruptionBudget shop/web-pdb"), "{text}");

    // Bad input changes nothing and names the field.
    let err = upkeepctl_refused(&f.pki, &f.hub.url(), &["member", "set-drain", "m1", "--undrainable", "skip"]).await;
    assert!(err.contains("undrainable") && err.contains("Fail, SkipNode or Force"), "{err}");
    let err = upkeepctl_refused(&f.pki, &f.hub.url(), &["member", "set-drain", "m1", "--timeout", "0"]).await;
    assert!(err.contains("drain_timeout"), "{err}");
    let s = f.ok(&["member", "set-drain", "m1", "--max-undrainable", "1"]).await;
    assert!(s.contains("undrainable Force"), "{s}");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_joining_a_node_image_member_later_catch_up_inside_the_window_and_show_they_are_behind() {
    let mut f = Fleet::new("[auto_upgrade]\nenabled = true\ncadence_days = 7\n").await;
    f.join("n1", "Debian-12-202311.01.0", "").await;
    f.publish("202312.01.0").await;
    wait_for("n1 rolled", WAIT, || async { (f.image_of("n1").await == "Debian-12-202312.01.0").then_some(()) }).await;

    // A window that is closed now: a node joining now shows it is behind and when it is next eligible.
    let dir = f.work.path().to_path_buf();
    let window = |start: chrono::DateTime<chrono::Utc>| {
        let p = dir.join(format!("window-{}.json", start.timestamp()));
        std::fs::write(
            &p,
            format!(
                r#"{{"frequency":{{"type":"Daily","interval_days":1}},"start_time":"{}","duration_hours":4}}"#,
                start.format("%H:%M")
            ),
        )
        .expect("window");
        p
    };
    let closed = window(chrono::Utc::now() + chrono::TimeDelta::hours(6));
    f.ok(&["member", "set-window", "m1", "--kind", "node-os", "-f", &closed.to_string_lossy()]).await;
    f.join("n2", "Debian-12-202311.01.0", "").await;
    // What it lacks is known from its report at once; what it waits for once the channel loop has looked at it.
    let n2 = wait_for("n2 shows it is behind and waits for the window", WAIT, || async {
        let n = upkeepctl_json(&f.pki, &f.hub.url(), &["node", "show", "n2"]).await.ok()?;
        let behind = n["behind"].as_str().is_some_and(|b| b.contains("Debian-12-202312.01.0"));
        (behind && n["waiting"].as_str().is_some_and(|w| !w.is_empty())).then_some(n)
    })
    .await;
    assert!(n2["waiting"].as_str().is_some_and(|w| w.contains("window")), "{n2}");
    assert!(n2["next_eligible"].as_str().is_some(), "{n2}");
    let table = f.ok(&["node", "list"]).await;
    assert!(table.lines().any(|l| l.starts_with("n2") && l.contains("behind: wants Debian-12-202312.01.0")), "{table}");
    let m = f.json(&["member", "show", "m1"]).await;
    assert!(m["auto_upgrade_status"].as_str().is_some_and(|s| s.contains("behind") && s.contains("n2")), "{m}");

    // The window opens: n2 catches up (the release was rolled already, so no cadence wait), then n3 joins and
    // catches up too, one after another.
    let open = window(chrono::Utc::now() - chrono::TimeDelta::minutes(30));
    f.ok(&["member", "set-window", "m1", "--kind", "node-os", "-f", &open.to_string_lossy()]).await;
    wait_for("n2 caught up", WAIT, || async { (f.image_of("n2").await == "Debian-12-202312.01.0").then_some(()) })
        .await;
    f.join("n3", "Debian-12-202311.01.0", "").await;
    wait_for("n3 caught up", WAIT, || async { (f.image_of("n3").await == "Debian-12-202312.01.0").then_some(()) })
        .await;
    wait_for("nothing behind any more", WAIT, || async {
        let list = upkeepctl_json(&f.pki, &f.hub.url(), &["node", "list"]).await.ok()?;
        list["nodes"].as_array()?.iter().all(|n| n["behind"] == "").then_some(())
    })
    .await;
    assert_eq!(one_at_a_time(&f.log()), ["n1", "n2", "n3"]);
    f.stop().await;
}
