//! Reboot leases and channel rollouts through the real hub, real agents and the real upkeepctl (SPEC §2, §4).
//!
//! Every node's cordon and uncordon hooks append `cordon <node>` / `uncordon <node>` to one shared log, so a
//! test can check from the order of those lines that no two nodes of a member were out of service at once.

use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;
use upkeep_tests::*;

const WAIT: Duration = Duration::from_secs(90);

struct Fleet {
    pki: TestPki,
    work: tempfile::TempDir,
    hub: TestHub,
    agents: Vec<(String, TestAgent)>,
    nodes: Vec<TestNode>,
}

/// A hub (with `hub_extra` appended to its hub.toml) and one agent per node of member m1, all registered, with
/// cordon/uncordon hooks logging to `<work>/cordon.log`.
async fn fleet(names: &[&str], hub_extra: &str) -> Fleet {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let hub =
        TestHub::start_with(&pki, &work.path().join("hub"), "127.0.0.1:0".parse().expect("addr"), hub_extra).await;
    let log = work.path().join("cordon.log");
    let mut agents = Vec::new();
    let mut nodes = Vec::new();
    for name in names {
        let node = make_node(&pki, work.path(), &hub.url(), name, "m1", "pool1", "eu", "Debian-12-202311.07.0");
        let hook = |verb: &str| format!("[\"sh\", \"-c\", \"echo {verb} {name} >> {}\"]", log.display());
        let mut cfg = std::fs::read_to_string(&node.config).expect("agent.toml");
        cfg.push_str(&format!("[cordon]\ncordon = {}\nuncordon = {}\n", hook("cordon"), hook("uncordon")));
        std::fs::write(&node.config, cfg).expect("agent.toml");
        agents.push((name.to_string(), TestAgent::start(&node)));
        nodes.push(node);
    }
    let f = Fleet { pki, work, hub, agents, nodes };
    let want = names.len();
    wait_for("every node registered", WAIT, || async {
        let list = upkeepctl_json(&f.pki, &f.hub.url(), &["node", "list"]).await.ok()?;
        (list["nodes"].as_array()?.iter().filter(|n| n["status"] == "Ready").count() == want).then_some(())
    })
    .await;
    f
}

impl Fleet {
    async fn ok(&self, args: &[&str]) -> String {
        upkeepctl_ok(&self.pki, &self.hub.url(), args).await
    }

    async fn refused(&self, args: &[&str]) -> String {
        upkeepctl_refused(&self.pki, &self.hub.url(), args).await
    }

    async fn json(&self, args: &[&str]) -> Value {
        upkeepctl_json(&self.pki, &self.hub.url(), args).await.expect("json")
    }

    fn node(&self, name: &str) -> &TestNode {
        self.nodes.iter().find(|n| n.name == name).expect("node")
    }

    fn flag_reboot_required(&self, name: &str) {
        let p = self.node(name).root.join("run/reboot-required");
        std::fs::create_dir_all(p.parent().expect("dir")).expect("mkdir");
        std::fs::write(p, "*** System restart required ***\n").expect("flag");
    }

    fn log(&self) -> Vec<String> {
        std::fs::read_to_string(self.work.path().join("cordon.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Waits until the hooks logged `uncordons` uncordons, every node reports no reboot required and no lease
    /// is held.
    async fn wait_rebooted(&self, uncordons: usize) {
        wait_for("every node rebooted and every lease given back", WAIT, || async {
            if self.log().iter().filter(|l| l.starts_with("uncordon ")).count() < uncordons {
                return None;
            }
            let nodes = upkeepctl_json(&self.pki, &self.hub.url(), &["node", "list"]).await.ok()?;
            let leases = upkeepctl_json(&self.pki, &self.hub.url(), &["lease", "list"]).await.ok()?;
            let all_done = nodes["nodes"].as_array()?.iter().all(|n| n["reboot_required"] == false);
            (all_done && leases.as_array()?.is_empty()).then_some(())
        })
        .await;
    }

    async fn stop(self) {
        for (_, a) in self.agents {
            a.stop().await;
        }
        let mut hub = self.hub;
        hub.stop().await;
    }
}

/// Checks that cordon/uncordon lines never overlap (at most one node out at a time) and returns, per node, how
/// many times it was taken out.
fn one_at_a_time(log: &[String]) -> std::collections::BTreeMap<String, usize> {
    let mut out_now: Option<String> = None;
    let mut count = std::collections::BTreeMap::new();
    for line in log {
        let (verb, node) = line.split_once(' ').expect("verb node");
        match (verb, &out_now) {
            ("cordon", None) => {
                out_now = Some(node.to_string());
                *count.entry(node.to_string()).or_insert(0) += 1;
            }
            ("uncordon", Some(n)) if n == node => out_now = None,
            _ => panic!("two nodes out of service at once (max_unavailable 1): {log:?}"),
        }
    }
    assert_eq!(out_now, None, "a node was left cordoned: {log:?}");
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sec4_reboots_take_leases_and_never_exceed_max_unavailable() {
    let mut f = fleet(&["n1", "n2", "n3"], "").await;
    // A lease left behind by a crash is given back when the agent starts again.
    f.hub
        .fleet()
        .store()
        .put_lease(&upkeep_hub::store::LeaseRecord {
            node: "n1".into(),
            lease_id: "reboot/left-behind".into(),
            member: "m1".into(),
            holder: "node".into(),
            purpose: "reboot".into(),
            granted_ms: 0,
            expires_ms: i64::MAX,
            forced: false,
        })
        .expect("stale lease");
    let i = f.agents.iter().position(|(n, _)| n == "n1").expect("agent");
    let (name, agent) = f.agents.remove(i);
    agent.stop().await;
    let restarted = TestAgent::start(f.node(&name));
    f.agents.push((name, restarted));
    wait_for("the left-behind lease released", WAIT, || async {
        let leases = upkeepctl_json(&f.pki, &f.hub.url(), &["lease", "list"]).await.ok()?;
        leases.as_array()?.is_empty().then_some(())
    })
    .await;

    f.ok(&["member", "set-max-unavailable", "m1", "1"]).await;
    f.ok(&["member", "set-channel", "m1", "Unmanaged"]).await;
    for n in ["n1", "n2", "n3"] {
        f.flag_reboot_required(n);
    }
    f.wait_rebooted(3).await;
    let taken = one_at_a_time(&f.log());
    assert_eq!(taken.values().copied().collect::<Vec<_>>(), [1, 1, 1], "each node rebooted exactly once: {taken:?}");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sec4_a_reboot_waits_for_the_window_unless_an_operator_forces_it() {
    let f = fleet(&["n1"], "").await;
    // A daily window that opens six hours from now: closed now.
    let opens = chrono::Utc::now() + chrono::TimeDelta::hours(6);
    let window = f.work.path().join("window.json");
    std::fs::write(
        &window,
        format!(
            r#"{{"frequency":{{"type":"Daily","interval_days":1}},"start_time":"{}","duration_hours":4}}"#,
            opens.format("%H:%M")
        ),
    )
    .expect("window");
    f.ok(&["member", "set-window", "m1", "--kind", "node-os", "-f", &window.to_string_lossy()]).await;
    f.ok(&["member", "set-channel", "m1", "Unmanaged"]).await;
    f.flag_reboot_required("n1");
    let note = wait_for("the node says it waits for the window", WAIT, || async {
        let n = upkeepctl_json(&f.pki, &f.hub.url(), &["node", "show", "n1"]).await.ok()?;
        let note = n["channel_note"].as_str()?.to_string();
        note.contains("waiting for a reboot lease").then_some(note)
    })
    .await;
    assert!(note.contains("window") && note.contains("closed"), "{note}");
    assert!(f.log().is_empty(), "nothing cordoned outside the window: {:?}", f.log());
    let err = f.refused(&["node", "reboot", "n1"]).await;
    assert!(err.contains("window") && err.contains("--force"), "{err}");
    let out = f.ok(&["node", "reboot", "n1", "--force"]).await;
    assert!(out.contains("forced"), "{out}");
    f.wait_rebooted(1).await;
    assert_eq!(f.log(), ["cordon n1", "uncordon n1"]);
    f.stop().await;
}

/// Signs and publishes image `version` of Debian-12, trusted by every node.
async fn publish_trusted(f: &Fleet, version: &str) {
    let keys = f.work.path().join("keys");
    if !keys.join("upkeep-image.pub").exists() {
        f.ok(&["image", "keygen", "--dir", &keys.to_string_lossy()]).await;
    }
    for n in &f.nodes {
        let dir = n.root.join("etc/upkeep/trusted-keys");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::copy(keys.join("upkeep-image.pub"), dir.join("upkeep-image.pub")).expect("trust key");
    }
    let img: PathBuf = f.work.path().join(format!("debian-{version}.tar"));
    let img = img.to_string_lossy().into_owned();
    f.ok(&["image", "build", "--out", &img, "--family", "Debian-12", "--version", version]).await;
    f.ok(&["image", "sign", "--key", &keys.join("upkeep-image.key").to_string_lossy(), &img]).await;
    f.ok(&["image", "publish", "--family", "Debian-12", "--version", version, "--regions", "eu", "--file", &img]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sec2_node_image_channel_rolls_new_images_and_a_channel_switch_reimages_every_node() {
    let f = fleet(&["n1", "n2"], "[auto_upgrade]\nenabled = true\n").await;
    publish_trusted(&f, "202312.01.0").await;
    let status = wait_for("the NodeImage rollout completed", WAIT, || async {
        let m = upkeepctl_json(&f.pki, &f.hub.url(), &["member", "show", "m1"]).await.ok()?;
        let s = m["auto_upgrade_status"].as_str()?.to_string();
        s.contains("node-image:Debian-12-202312.01.0 Completed").then_some(s)
    })
    .await;
    assert!(status.contains("2 of 2 nodes done"), "{status}");
    let list = f.json(&["node", "list"]).await;
    for n in list["nodes"].as_array().expect("nodes") {
        assert_eq!(n["labels"]["upkeep.io/node-image-version"], "Debian-12-202312.01.0", "{n}");
    }
    assert_eq!(one_at_a_time(&f.log()).values().sum::<usize>(), 2, "{:?}", f.log());

    // Switching the channel reimages every node to the current image, although they already run it.
    f.ok(&["member", "set-channel", "m1", "None"]).await;
    wait_for("the channel-switch reimage completed", WAIT, || async {
        let m = upkeepctl_json(&f.pki, &f.hub.url(), &["member", "show", "m1"]).await.ok()?;
        let s = m["auto_upgrade_status"].as_str()?.to_string();
        (s.contains("channel-switch@") && s.contains("Completed")).then_some(())
    })
    .await;
    let taken = one_at_a_time(&f.log());
    assert_eq!(taken.values().copied().collect::<Vec<_>>(), [2, 2], "{taken:?}");
    for n in &f.nodes {
        assert_eq!(
            reimages_journalled(n.root.parent().expect("node dir")),
            2,
            "{}: one image reimage and one switch reimage",
            n.name
        );
    }
    // Nothing more happens: the None channel rolls nothing and the switch is settled.
    assert!(f.hub.fleet().store().list_channel_switches().expect("switches").is_empty());
    f.stop().await;
}

/// `upkeepctl schedule -o json`'s operations.
async fn schedule(f: &Fleet, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["schedule"];
    all.extend_from_slice(args);
    f.json(&all).await["operations"].as_array().expect("operations").clone()
}

fn at(v: &Value) -> Option<chrono::DateTime<chrono::Utc>> {
    v["earliest"].as_str().map(|s| chrono::DateTime::parse_from_rfc3339(s).expect("rfc3339").to_utc())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedule_predicts_a_windowed_rollout_and_the_rollout_then_keeps_to_it() {
    let f = fleet(&["n1", "n2", "n3"], "[auto_upgrade]\nenabled = true\n").await;
    // A daily one-hour window opening at the next whole minute at least 20 s away (windows start on a minute).
    let now = chrono::Utc::now();
    let next_minute = |t: chrono::DateTime<chrono::Utc>| {
        use chrono::{SubsecRound, Timelike};
        t.trunc_subsecs(0) - chrono::TimeDelta::seconds(i64::from(t.second())) + chrono::TimeDelta::minutes(1)
    };
    let mut opens = next_minute(now);
    if opens - now < chrono::TimeDelta::seconds(20) {
        opens += chrono::TimeDelta::minutes(1);
    }
    let window = f.work.path().join("window.json");
    std::fs::write(
        &window,
        format!(
            r#"{{"frequency":{{"type":"Daily","interval_days":1}},"start_time":"{}","duration_hours":1}}"#,
            opens.format("%H:%M")
        ),
    )
    .expect("window");
    f.ok(&["member", "set-window", "m1", "--kind", "node-os", "-f", &window.to_string_lossy()]).await;
    f.ok(&["member", "set-max-unavailable", "m1", "1"]).await;
    publish_trusted(&f, "202312.01.0").await;

    // Before the window: every node is predicted, one per batch (max_unavailable 1), the first at the opening.
    let ops = wait_for("the rollout appears in the schedule", WAIT, || async {
        let ops = schedule(&f, &["--node-seconds", "5"]).await;
        (ops.iter().filter(|o| o["source"] == "rollout").count() == 3).then_some(ops)
    })
    .await;
    let predicted: Vec<(String, u64, Option<chrono::DateTime<chrono::Utc>>)> = ops
        .iter()
        .map(|o| (o["node"].as_str().expect("node").to_string(), o["batch"].as_u64().expect("batch"), at(o)))
        .collect();
    let s = |k: i64| Some(opens + chrono::TimeDelta::seconds(k));
    assert_eq!(
        predicted,
        [("n1".to_string(), 1, s(0)), ("n2".to_string(), 2, s(5)), ("n3".to_string(), 3, s(10))],
        "{ops:?}"
    );
    for o in &ops {
        assert_eq!(o["member"], "m1");
        assert_eq!(o["operation"], "reimage to Debian-12-202312.01.0", "{o}");
        assert_eq!(o["batches"], 3, "{o}");
    }
    assert!(ops[0]["why"].as_str().expect("why").contains("window"), "{:?}", ops[0]);
    // --member filters; the table form says the same.
    assert!(schedule(&f, &["--member", "other"]).await.is_empty());
    let table = f.ok(&["schedule"]).await;
    assert!(table.contains("reimage to Debian-12-202312.01.0") && table.contains("1/3"), "{table}");

    // Then it happens as predicted: nothing before the opening, the nodes in the predicted order.
    let touched_early = std::sync::Mutex::new(Vec::new());
    wait_for("the rollout completed", WAIT + Duration::from_secs(120), || async {
        let log = f.log();
        if chrono::Utc::now() < opens && !log.is_empty() {
            touched_early.lock().expect("lock").push(log.clone());
        }
        let m = upkeepctl_json(&f.pki, &f.hub.url(), &["member", "show", "m1"]).await.ok()?;
        m["auto_upgrade_status"].as_str()?.contains("node-image:Debian-12-202312.01.0 Completed").then_some(())
    })
    .await;
    let touched_early = touched_early.into_inner().expect("lock");
    assert!(touched_early.is_empty(), "nodes were touched before the predicted start {opens}: {touched_early:?}");
    let order: Vec<String> = f.log().iter().filter_map(|l| l.strip_prefix("cordon ").map(str::to_string)).collect();
    assert_eq!(order, ["n1", "n2", "n3"], "the predicted batch order");
    one_at_a_time(&f.log());
    // Each node's history shows the rollout that reimaged it.
    for n in ["n1", "n2", "n3"] {
        let node = f.json(&["node", "show", n]).await;
        let history = node["history"].as_array().expect("history");
        assert_eq!(history.len(), 1, "{n}: {history:?}");
        assert_eq!(history[0]["outcome"], "Done", "{n}: {history:?}");
        assert!(history[0]["work_id"].as_str().expect("id").starts_with("rollout/m1/"), "{n}: {history:?}");
        assert!(history[0]["purpose"].as_str().expect("purpose").contains("node-image:Debian-12-202312.01.0"));
        assert!(history[0]["finished"].is_string(), "{n}: {history:?}");
    }
    let list = f.json(&["node", "list"]).await;
    assert!(list["nodes"][0].get("history").is_none(), "node list stays as it was");
    // Nothing is owed any more.
    assert!(schedule(&f, &[]).await.is_empty());
    // Bad input names the flag.
    let err = f.refused(&["schedule", "--days", "0"]).await;
    assert!(err.contains("--days"), "{err}");
    let err = f.refused(&["schedule", "--days", "91"]).await;
    assert!(err.contains("days") && err.contains("90"), "{err}");
    f.stop().await;
}
