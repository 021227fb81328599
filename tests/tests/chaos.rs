//! Chaos scenarios over real processes: a hub SIGKILLed again and again while a staged run reimages the fleet,
//! and an agent frozen with SIGSTOP in the middle of a drain (SPEC §4, §5, §8 "trustworthy status").
//!
//! Every node's cordon and uncordon hooks append `cordon <node>` / `uncordon <node>` to one shared log and keep
//! the marker file the hook-less backend would keep (`<root>/var/lib/upkeep/cordoned`), so a test can check from
//! the log's order that no two nodes of a member were out of service at once, and from the marker that every node
//! ended in service.
//!
//! The hub runs as an `upkeep-hub` process (`HubProcess::start_logged`) with its output appended to
//! `<work>/hub/hub.log` across restarts; the failure messages that need the hub's side of the story carry its tail.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};
use upkeep_tests::*;

const WAIT: Duration = Duration::from_secs(90);
/// Default seed of the hub-kill schedule; `UPKEEP_CHAOS_SEED=<u64>` (decimal or 0x-hex) replays another one.
const DEFAULT_CHAOS_SEED: u64 = 0x5eed_c4a0_5eed_0001;
/// The hub is SIGKILLed at least this many times while the run is under way...
const MIN_HUB_KILLS: usize = 20;
/// ...and at most this many (then the run is left to finish).
const MAX_HUB_KILLS: usize = 40;
/// How long each hub lives before its SIGKILL, drawn in this range (ms).
const UPTIME_MS: (u64, u64) = (100, 1200);
/// The run's members, one stage each, and the nodes of each member.
const MEMBERS: [&str; 3] = ["m1", "m2", "m3"];
const NODES_PER_MEMBER: [&str; 3] = ["a", "b", "c"];
/// Each node's drain hook: the slow step the chaos lands in most often.
const DRAIN: &str = "sleep 2";
const IMAGE_FROM: &str = "Debian-12-202311.07.0";
const IMAGE_TO: &str = "202312.01.0";

/// xorshift64: a tiny deterministic generator, so a seed replays the same kill schedule.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        // 0 is xorshift's fixed point.
        XorShift(if seed == 0 { DEFAULT_CHAOS_SEED } else { seed })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform-ish in `lo..hi` milliseconds.
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo))
    }
}

fn chaos_seed() -> u64 {
    match std::env::var("UPKEEP_CHAOS_SEED") {
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("UPKEEP_CHAOS_SEED={s:?} is not a u64: {e}"))
        }
        Err(_) => DEFAULT_CHAOS_SEED,
    }
}

/// A TOML array of strings.
fn toml_argv(argv: &[&str]) -> String {
    format!("[{}]", argv.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", "))
}

/// Lays out `name` in `member` and gives it cordon/uncordon hooks that log to `log` and keep the cordon marker,
/// and `drain` as its drain hook (a shell script).
fn hooked_node(pki: &TestPki, work: &Path, url: &str, name: &str, member: &str, log: &Path, drain: &str) -> TestNode {
    let node = make_node(pki, work, url, name, member, "pool1", "eu", IMAGE_FROM);
    let marker = node.root.join("var/lib/upkeep/cordoned");
    let dir = marker.parent().expect("marker dir").display().to_string();
    let (log, marker) = (log.display(), marker.display());
    let cordon = format!("echo cordon {name} >> {log} && mkdir -p {dir} && echo cordoned-by-hook > {marker}");
    let uncordon = format!("echo uncordon {name} >> {log} && rm -f {marker}");
    let mut cfg = std::fs::read_to_string(&node.config).expect("agent.toml");
    cfg.push_str(&format!(
        "[cordon]\ncordon = {}\nuncordon = {}\ndrain = {}\n",
        toml_argv(&["sh", "-c", &cordon]),
        toml_argv(&["sh", "-c", &uncordon]),
        toml_argv(&["sh", "-c", drain]),
    ));
    std::fs::write(&node.config, cfg).expect("agent.toml");
    node
}

fn read_log(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log).unwrap_or_default().lines().map(str::to_string).collect()
}

/// Replays the cordon log: panics if two nodes of one member were ever cordoned at once; returns per node how
/// many times it was cordoned and uncordoned, and its last verb.
fn replay_cordon_log(log: &[String], member_of: &BTreeMap<String, String>) -> BTreeMap<String, (usize, usize, String)> {
    let mut out_now: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let mut per_node: BTreeMap<String, (usize, usize, String)> = BTreeMap::new();
    for (i, line) in log.iter().enumerate() {
        let (verb, node) = line.split_once(' ').unwrap_or_else(|| panic!("log line {i} {line:?}: verb node"));
        let member = member_of.get(node).unwrap_or_else(|| panic!("log line {i}: unknown node {node:?}"));
        let out = out_now.entry(member.as_str()).or_default();
        let counts = per_node.entry(node.to_string()).or_default();
        match verb {
            "cordon" => {
                assert!(
                    out.iter().all(|n| *n == node),
                    "line {i}: {node} cordoned while {out:?} of member {member} was still cordoned \
                     (max_unavailable 1): {log:#?}"
                );
                out.insert(node);
                counts.0 += 1;
            }
            "uncordon" => {
                out.remove(node);
                counts.1 += 1;
            }
            _ => panic!("log line {i} {line:?}: unknown verb"),
        }
        counts.2 = verb.to_string();
    }
    per_node
}

fn node_in<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list["nodes"].as_array()?.iter().find(|n| n["name"] == name)
}

async fn all_ready(pki: &TestPki, url: &str, want: usize) {
    wait_for(&format!("{want} nodes Ready"), WAIT, || async {
        let list = upkeepctl_json(pki, url, &["node", "list"]).await.ok()?;
        (list["nodes"].as_array()?.iter().filter(|n| n["status"] == "Ready").count() == want).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_sigkilled_at_random_moments_during_a_multistage_run_upgrades_every_node_once_and_leaves_nothing_behind() {
    let seed = chaos_seed();
    eprintln!("chaos seed {seed} (replay with UPKEEP_CHAOS_SEED={seed})");
    let mut rng = XorShift::new(seed);
    let began = Instant::now();
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    // Generous silence deadlines (10 s Unknown, 20 s to fail a step): this test is about crashes, not silence, and
    // agents reconnecting with backoff across back-to-back kills may stay away a few seconds.
    let mut hub =
        HubProcess::start_logged(&pki, &work.path().join("hub"), 10, "[auto_upgrade]\nenabled = false\n").await;
    let url = hub.url();
    let log = work.path().join("cordon.log");
    let mut member_of = BTreeMap::new();
    let mut nodes = Vec::new();
    let mut agents = Vec::new();
    for m in MEMBERS {
        for side in NODES_PER_MEMBER {
            let name = format!("{m}{side}");
            let node = hooked_node(&pki, work.path(), &url, &name, m, &log, DRAIN);
            agents.push(TestAgent::start(&node));
            member_of.insert(name, m.to_string());
            nodes.push(node);
        }
    }
    all_ready(&pki, &url, nodes.len()).await;
    let roots: Vec<_> = nodes.iter().map(|n| n.root.clone()).collect();
    publish_trusted_debian(&pki, &url, work.path(), &roots, IMAGE_TO).await;
    let order = work.path().join("order.json");
    std::fs::write(
        &order,
        r#"{"stages":[
            {"name":"one","groups":[{"name":"g","members":["m1"]}]},
            {"name":"two","groups":[{"name":"g","members":["m2"]}]},
            {"name":"three","groups":[{"name":"g","members":["m3"]}]}]}"#,
    )
    .expect("order.json");
    let order = order.to_string_lossy().into_owned();
    upkeepctl_ok(&pki, &url, &["run", "create", "r1", "-f", &order, "--upgrade-type", "NodeImageOnly"]).await;
    upkeepctl_ok(&pki, &url, &["run", "start", "r1"]).await;
    let started = Instant::now();

    // The chaos: each hub lives a pseudo-random time, then is SIGKILLed and started again on the same state, until
    // the run ends (or MAX_HUB_KILLS). The sleep is the random moment itself, not a stand-in for synchronisation.
    // A kill counts when the run was still under way just before it.
    let mut kills = 0;
    while kills < MAX_HUB_KILLS {
        let uptime = rng.millis(UPTIME_MS.0, UPTIME_MS.1);
        tokio::time::sleep(uptime).await;
        let run = upkeepctl_json(&pki, &url, &["run", "show", "r1"]).await.expect("run show");
        let status = run["status"].as_str().unwrap_or_default().to_string();
        if !matches!(status.as_str(), "Running" | "Pending") {
            break;
        }
        let members: Vec<String> =
            MEMBERS.iter().map(|m| format!("{m}={}", run_member(&run, m)["status"].as_str().unwrap_or("?"))).collect();
        let last = read_log(&log).last().cloned().unwrap_or_default();
        kills += 1;
        eprintln!(
            "chaos: kill {kills} at {:.1}s, after {} ms up; run {status} [{}]; last hook: {last:?}",
            started.elapsed().as_secs_f64(),
            uptime.as_millis(),
            members.join(" ")
        );
        hub.restart(&pki).await;
    }
    eprintln!("chaos: {kills} kills in {:?}", started.elapsed());

    let run = wait_for("run r1 to end", WAIT, || async {
        let v = upkeepctl_json(&pki, &url, &["run", "show", "r1"]).await.ok()?;
        matches!(v["status"].as_str()?, "Completed" | "Failed" | "Stopped" | "Skipped").then_some(v)
    })
    .await;
    eprintln!("run ended {} after {:?} ({:?} in all)", run["status"], started.elapsed(), began.elapsed());
    assert_eq!(run["status"], "Completed", "seed {seed}: {run}\n--- hub.log ---\n{}", hub.tail(80));
    for m in MEMBERS {
        assert_eq!(run_member(&run, m)["status"], "Completed", "{run}");
    }
    assert!(
        kills >= MIN_HUB_KILLS,
        "only {kills} hub kills happened while the run was under way (seed {seed}); want {MIN_HUB_KILLS}: the run \
         is too short for the chaos"
    );

    // Every node was reimaged exactly once: one journalled reimage operation, finished ok, and one simulated boot
    // into the other slot (a second reimage would have booted back into slot a).
    for n in &nodes {
        let ops = agent_journal(&work.path().join(&n.name));
        let reimages: Vec<&(String, Option<bool>)> = ops.iter().filter(|(id, _)| id.ends_with("/reimage")).collect();
        assert_eq!(reimages.len(), 1, "{} reimaged exactly once: {ops:?}", n.name);
        assert!(reimages[0].0.starts_with(&format!("run/r1/{}/", member_of[&n.name])), "{ops:?}");
        assert!(ops.iter().all(|(_, ok)| *ok == Some(true)), "{}: every operation finished ok: {ops:?}", n.name);
        let boot: Value = serde_json::from_slice(
            &std::fs::read(n.root.join("var/lib/upkeep/slots/boot.json")).expect("boot.json of a reimaged node"),
        )
        .expect("boot.json");
        assert_eq!(boot["boot_seq"], 1, "{}: booted once: {boot}", n.name);
        assert_eq!((&boot["booted"], &boot["committed"]), (&Value::from("b"), &Value::from("b")), "{}: {boot}", n.name);
    }
    let list = upkeepctl_json(&pki, &url, &["node", "list"]).await.expect("node list");
    for n in &nodes {
        let shown = node_in(&list, &n.name).expect("listed");
        assert_eq!(shown["node_image_version"], format!("Debian-12-{IMAGE_TO}"), "{shown}");
    }

    // Nothing left behind: every node cordoned once and uncordoned once (a replayed step is answered from the
    // journal, its hook does not run again), last verb uncordon, no marker, no lease; never two of a member out.
    let lines = read_log(&log);
    let per_node = replay_cordon_log(&lines, &member_of);
    for n in &nodes {
        let (cordons, uncordons, last) = per_node.get(&n.name).cloned().unwrap_or_default();
        assert_eq!((cordons, uncordons), (1, 1), "{}: cordoned and uncordoned once each: {lines:#?}", n.name);
        assert_eq!(last, "uncordon", "{}: ends uncordoned: {lines:#?}", n.name);
        let marker = n.root.join("var/lib/upkeep/cordoned");
        assert!(!marker.exists(), "{} ends uncordoned, yet {} exists", n.name, marker.display());
    }
    let leases = upkeepctl_json(&pki, &url, &["lease", "list"]).await.expect("lease list");
    assert_eq!(leases.as_array().map(Vec::len), Some(0), "no node is left out of service: {leases}");

    for a in agents {
        a.stop().await;
    }
    hub.kill().await;
    eprintln!("chaos test took {:?}", began.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_agent_is_unknown_the_member_says_it_waits_on_it_then_the_step_fails_at_the_deadline() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    const HEARTBEAT: Duration = Duration::from_secs(1);
    const SILENT_AFTER: u32 = 3;
    const SILENCE: Duration = Duration::from_secs(3); // HEARTBEAT x SILENT_AFTER: Unknown after this
    const STEP_LIMIT: Duration = Duration::from_secs(6); // twice the silence deadline: a non-reboot step fails
    const SLACK: Duration = Duration::from_secs(3);

    let began = Instant::now();
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let mut hub =
        HubProcess::start_logged(&pki, &work.path().join("hub"), SILENT_AFTER, "[auto_upgrade]\nenabled = false\n")
            .await;
    let url = hub.url();
    let log = work.path().join("cordon.log");
    let drain_started = work.path().join("n1-drain-started");
    // n1's drain takes 10 s: long enough for the freeze to land in the middle of it.
    let n1 = hooked_node(
        &pki,
        work.path(),
        &url,
        "n1",
        "m1",
        &log,
        &format!("echo started >> {} && sleep 10", drain_started.display()),
    );
    let n2 = hooked_node(&pki, work.path(), &url, "n2", "m1", &log, "true");
    let agent_log = std::fs::File::create(work.path().join("n1-agent.log")).expect("agent log");
    let mut agent = tokio::process::Command::new(bin("upkeep-agent"))
        .arg("--config")
        .arg(&n1.config)
        .stdout(agent_log.try_clone().expect("dup"))
        .stderr(agent_log)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn upkeep-agent");
    let pid = Pid::from_raw(i32::try_from(agent.id().expect("agent pid")).expect("pid fits"));
    let other = TestAgent::start(&n2);
    all_ready(&pki, &url, 2).await;

    // A newer image (nobody trusts its signature: the run never gets as far as the reimage).
    let art = work.path().join("debian-new.img");
    std::fs::write(&art, b"image B").expect("image");
    std::fs::write(art.with_extension("img.minisig"), untrusted_signature()).expect("sig");
    let art = art.to_string_lossy().into_owned();
    let publish = ["image", "publish", "--family", "Debian-12", "--version", IMAGE_TO, "--regions", "eu", "--file"];
    upkeepctl_ok(&pki, &url, &[&publish[..], &[art.as_str(), "--format", "raw"]].concat()).await;
    upkeepctl_ok(&pki, &url, &["run", "create", "r1", "--upgrade-type", "NodeImageOnly"]).await;
    upkeepctl_ok(&pki, &url, &["run", "start", "r1"]).await;

    // The drain is in flight on both sides: the hub says so and the node's drain hook has started.
    let waiting = wait_for("n1's drain in flight", WAIT, || async {
        let n = upkeepctl_json(&pki, &url, &["node", "show", "n1"]).await.ok()?;
        let w = n["waiting"].as_str()?.to_string();
        (w.ends_with(": drain") && drain_started.exists()).then_some(w)
    })
    .await;
    eprintln!("n1 before the freeze: waiting {waiting:?}");
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP the agent");
    let frozen = Instant::now();

    // Unknown once silent past its deadline: not at once, and not much later.
    let list = wait_for("n1 Unknown", SILENCE + SLACK, || async {
        let l = upkeepctl_json(&pki, &url, &["node", "list"]).await.ok()?;
        (node_in(&l, "n1")?["status"] == "Unknown").then_some(l)
    })
    .await;
    let unknown_after = frozen.elapsed();
    eprintln!("n1 Unknown {unknown_after:?} after SIGSTOP");
    assert!(
        unknown_after >= SILENCE - HEARTBEAT - Duration::from_millis(500),
        "n1 turned Unknown {unknown_after:?} after it froze, before its {SILENCE:?} silence deadline: {list}"
    );
    assert_eq!(node_in(&list, "n1").expect("n1")["connected"], true, "the frozen agent's session is still open");
    assert_eq!(node_in(&list, "n2").expect("n2")["status"], "Ready", "only the frozen node is Unknown: {list}");

    // The member and the node say what the step waits on.
    let status = wait_for("m1 says it waits on the silent node", STEP_LIMIT + SLACK, || async {
        let m = upkeepctl_json(&pki, &url, &["member", "show", "m1"]).await.ok()?;
        let s = m["auto_upgrade_status"].as_str()?.to_string();
        s.contains("waiting on silent node n1").then_some(s)
    })
    .await;
    assert!(status.contains("during drain"), "names the step: {status}");
    let shown = upkeepctl_json(&pki, &url, &["node", "show", "n1"]).await.expect("node show");
    let waiting = shown["waiting"].as_str().unwrap_or_default();
    assert!(waiting.contains("waiting on silent node n1 during drain"), "the node says so too: {shown}");

    // The drain step fails at its deadline (twice the silence deadline after the node was last heard).
    wait_for("the drain step ends", STEP_LIMIT + SLACK, || async {
        let m = upkeepctl_json(&pki, &url, &["member", "show", "m1"]).await.ok()?;
        (!m["auto_upgrade_status"].as_str()?.contains("during drain")).then_some(())
    })
    .await;
    let drain_failed_after = frozen.elapsed();
    eprintln!("n1's drain step ended {drain_failed_after:?} after SIGSTOP");
    assert!(
        drain_failed_after >= STEP_LIMIT - HEARTBEAT - Duration::from_millis(500),
        "the drain step gave up {drain_failed_after:?} after the freeze, before its {STEP_LIMIT:?} limit"
    );
    assert!(
        drain_failed_after <= STEP_LIMIT + SLACK,
        "the drain step gave up {drain_failed_after:?} after the freeze, well past its {STEP_LIMIT:?} limit"
    );

    // Then the member and the run fail, naming the node and its silence.
    let run = wait_for("run r1 Failed", WAIT, || async {
        let v = upkeepctl_json(&pki, &url, &["run", "show", "r1"]).await.ok()?;
        matches!(v["status"].as_str()?, "Failed" | "Completed" | "Stopped").then_some(v)
    })
    .await;
    eprintln!("run ended {} {:?} after SIGSTOP", run["status"], frozen.elapsed());
    assert_eq!(run["status"], "Failed", "{run}\n--- hub.log ---\n{}", hub.tail(40));
    let m1 = run_member(&run, "m1");
    assert_eq!(m1["status"], "Failed", "{run}");
    let error = m1["error"].as_str().unwrap_or_default();
    assert!(error.contains("n1") && error.contains("silent"), "the error names the node and its silence: {m1}");
    assert!(run["error"].as_str().unwrap_or_default().contains("m1"), "the run carries a summary: {run}");
    // A failed node stops the work: n2 was never touched.
    let lines = read_log(&log);
    assert!(!lines.iter().any(|l| l == "cordon n2"), "n2 was never cordoned: {lines:?}");
    assert!(
        agent_journal(&work.path().join("n2")).is_empty(),
        "n2 got no operation: {:?}",
        agent_journal(&work.path().join("n2"))
    );
    // The node could not be uncordoned while frozen: it stays out of service under the run's lease.
    let leases = upkeepctl_json(&pki, &url, &["lease", "list"]).await.expect("lease list");
    let held: Vec<&Value> = leases.as_array().into_iter().flatten().collect();
    assert!(
        held.len() == 1 && held[0]["node"] == "n1" && held[0]["holder"] == "run/r1/m1",
        "n1 keeps the run's lease until an operator puts it back: {leases}"
    );

    // Thaw, put the node back, and nothing is left behind.
    kill(pid, Signal::SIGCONT).expect("SIGCONT the agent");
    wait_for("n1 Ready again", WAIT, || async {
        let l = upkeepctl_json(&pki, &url, &["node", "list"]).await.ok()?;
        (node_in(&l, "n1")?["status"] == "Ready").then_some(())
    })
    .await;
    // The operator puts it back as the failure message says: the node is uncordoned and its lease given back.
    let said = upkeepctl_ok(&pki, &url, &["node", "uncordon", "n1"]).await;
    let back = tokio::time::timeout(
        Duration::from_secs(20),
        wait_for("n1 back in service", WAIT, || async {
            let leases = upkeepctl_json(&pki, &url, &["lease", "list"]).await.ok()?;
            let uncordoned = read_log(&log).last().is_some_and(|l| l == "uncordon n1");
            (leases.as_array()?.is_empty() && uncordoned).then_some(())
        }),
    )
    .await;
    if back.is_err() {
        let leases = upkeepctl_json(&pki, &url, &["lease", "list"]).await.expect("lease list");
        panic!(
            "`upkeepctl node uncordon n1` said {said:?}, yet 20 s later n1 is not back in service: cordon log {:?}, \
             leases {leases}\n--- hub.log ---\n{}",
            read_log(&log),
            hub.tail(12)
        );
    }
    assert!(!n1.root.join("var/lib/upkeep/cordoned").exists(), "n1 ends uncordoned");

    other.stop().await;
    agent.kill().await.expect("kill the agent");
    hub.kill().await;
    eprintln!("frozen-agent test took {:?}", began.elapsed());
}
