//! System test of a `Full` update run's Kubernetes upgrade across one member (SPEC §5 "Inside a member"): a real
//! hub (in-process), three real agents (in-process, each over its own real Debian bookworm root, the cached root of
//! `scripts/system-rootfs`), real apt in those roots as chroots, and the real upkeepctl.
//!
//! The member has two control-plane nodes in pool `cp` (`cp-1`, `cp-2`) and a worker in pool `workers` (`w-1`),
//! with `max_unavailable` 3, so nothing but the first-control-plane rule keeps the nodes of a pool apart. No
//! Kubernetes packages can be fetched here, so the repository holds STAND-INS (`upkeep-standin-kubeadm`,
//! `upkeep-standin-kubelet` at 1.29.1, 1.29.3 and a decoy 1.29.30) and the upgrade hook of every node is ONE
//! STAND-IN script that records, in one shared log, when it began and ended, the node it ran for (written into
//! each node's argv), its argv, the version the agent exports, the stand-in kubeadm version installed at that
//! moment, and whether the node was cordoned. The run must run `upgrade apply` exactly once, on `cp-1` (the first
//! control-plane node by pool then name), and finish it before any node runs `upgrade node`; every other node runs
//! `upgrade node` once; every node ends at 1.29.3 with its holds kept.
//!
//! Missing prerequisites fail the test, naming what installs them (scripts/deps).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use upkeep_hub::pki;
use upkeep_tests::debs::{build_deb, chroot, installed, require_root_and, sh};
use upkeep_tests::system::{rootfs_tarball, run_ok};
use upkeep_tests::{TestAgent, TestHub, TestPki, upkeepctl, upkeepctl_json, upkeepctl_ok, wait_for};

const KUBEADM: &str = "upkeep-standin-kubeadm";
const KUBELET: &str = "upkeep-standin-kubelet";
const MEMBER: &str = "m1";
const REGION: &str = "eu";
const RUN: &str = "k8s-1-29-3";
/// (node, pool, control plane), in the order the run must take them.
const NODES: [(&str, &str, bool); 3] = [("cp-1", "cp", true), ("cp-2", "cp", true), ("w-1", "workers", false)];
/// Registration, reports and the whole run (three chroot apt installs on 2 cores) fit well inside this.
const WAIT: Duration = Duration::from_secs(180);

/// One line of the stand-in hook's log.
#[derive(Debug, Clone)]
struct HookLine {
    /// Position in the log (appends from every node, in the order they happened).
    seq: usize,
    /// `begin` or `end`.
    phase: String,
    /// The node whose argv it was.
    node: String,
    /// The rest of the argv after the node name, e.g. `upgrade apply -y 1.29.3`.
    args: String,
    /// `UPKEEP_KUBERNETES_VERSION` as the agent exported it.
    exported: String,
    /// The stand-in kubeadm version installed in the node's root when the hook ran.
    kubeadm: String,
    /// Whether the node's cordon marker was present when the hook ran.
    cordoned: String,
}

fn hook_lines(log: &Path) -> Vec<HookLine> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .enumerate()
        .map(|(seq, l)| {
            // `<epoch.ns> <phase> <node> | <args> | version=<v> kubeadm=<v> cordoned=<yes|no>`
            let parts: Vec<&str> = l.split(" | ").collect();
            assert_eq!(parts.len(), 3, "hook log line {seq} is malformed: {l:?}");
            let head: Vec<&str> = parts[0].split_whitespace().collect();
            assert_eq!(head.len(), 3, "hook log line {seq} is malformed: {l:?}");
            let field = |k: &str| {
                parts[2]
                    .split_whitespace()
                    .find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
                    .unwrap_or_default()
                    .to_string()
            };
            HookLine {
                seq,
                phase: head[1].to_string(),
                node: head[2].to_string(),
                args: parts[1].to_string(),
                exported: field("version"),
                kubeadm: field("kubeadm"),
                cordoned: field("cordoned"),
            }
        })
        .collect()
}

/// Unpacks the cached Debian root into `root`, gives it the stand-in repository `repo` as its only apt source,
/// installs the stand-ins at 1.29.1 and holds them, as a kubeadm installation is set up.
fn prepare_root(tarball: &Path, repo: &Path, root: &Path) {
    std::fs::create_dir_all(root).expect("mkdir root");
    run_ok(Command::new("tar").arg("--zstd").arg("-xf").arg(tarball).arg("-C").arg(root));
    run_ok(Command::new("cp").arg("-a").arg(repo).arg(root.join("srv/k8s")));
    // No Debian mirror (offline): the stand-in repository is the only source.
    let _ = std::fs::remove_file(root.join("etc/apt/sources.list"));
    std::fs::write(root.join("etc/apt/sources.list.d/upkeep-k8s.list"), "deb [trusted=yes] file:/srv/k8s ./\n")
        .expect("sources");
    chroot(root, &["apt-get", "-q", "update"]);
    let pins = [format!("{KUBEADM}=1.29.1-1.1"), format!("{KUBELET}=1.29.1-1.1")];
    chroot(root, &["apt-get", "install", "-y", "-q", "--no-install-recommends", &pins[0], &pins[1]]);
    chroot(root, &["apt-mark", "hold", KUBEADM, KUBELET]);
}

/// Writes `name`'s agent.toml: its own root, its pool and role, and `[kubernetes]` with the stand-in packages and
/// the shared stand-in hook, the node's name written into both hook argvs.
fn agent_toml(pki: &TestPki, dir: &Path, hub: &str, hook: &Path, (name, pool, cp): (&str, &str, bool)) -> PathBuf {
    let (cert, key) = pki.node(name);
    let hook = hook.display().to_string();
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "hub = {hub:?}\nmember = {MEMBER:?}\nnode_pool = {pool:?}\nregion = {REGION:?}\ncontrol_plane = {cp}\n\
             state_dir = {:?}\nroot = {:?}\n\
             [tls]\nca = {:?}\ncert = {cert:?}\nkey = {key:?}\n\
             [kubernetes]\npackages = [{KUBEADM:?}, {KUBELET:?}]\n\
             upgrade_first_control_plane = [{hook:?}, {name:?}, \"upgrade\", \"apply\", \"-y\", \"{{version}}\"]\n\
             upgrade_other = [{hook:?}, {name:?}, \"upgrade\", \"node\"]\n",
            dir.join("state"),
            dir.join("root"),
            pki.file(pki::files::CA_CERT),
        ),
    )
    .expect("agent.toml");
    config
}

/// The run's events, in order (`upkeepctl run watch -o json` replays them and ends once the run has ended).
async fn run_events(pki: &TestPki, hub: &str) -> Vec<Value> {
    let out = upkeepctl(pki, hub, "operator", &["run", "watch", RUN, "-o", "json"]).await;
    assert!(out.status.success(), "run watch: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("run watch printed a non-JSON line {l:?}: {e}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_run_runs_upgrade_apply_once_on_the_first_control_plane_before_any_upgrade_node() {
    require_root_and(&[
        ("chroot", "coreutils"),
        ("cp", "coreutils"),
        ("tar", "tar"),
        ("zstd", "zstd"),
        ("debootstrap", "debootstrap"),
        ("dpkg-deb", "dpkg"),
        ("dpkg-scanpackages", "dpkg-dev"),
    ]);
    let started = Instant::now();
    let tarball = rootfs_tarball();
    // Not /tmp: that may be a small tmpfs, and each root is ~150 MB unpacked.
    std::fs::create_dir_all("/var/tmp/upkeep-system").expect("mkdir /var/tmp/upkeep-system");
    let tmp = tempfile::Builder::new().prefix("full-run-").tempdir_in("/var/tmp/upkeep-system").expect("tempdir");

    // The stand-in repository, built once and copied into every root.
    let repo = tmp.path().join("repo");
    std::fs::create_dir_all(&repo).expect("mkdir");
    for v in ["1.29.1-1.1", "1.29.3-1.1", "1.29.30-1.1"] {
        for p in [KUBEADM, KUBELET] {
            build_deb(&repo, p, v, "upkeep system-test stand-in for a Kubernetes package (contains nothing)", false);
        }
    }
    sh(&format!("cd {}; dpkg-scanpackages -m . > Packages 2>/dev/null", repo.display()));

    // The one stand-in upgrade hook: `hook NODE ARGS...`. It sleeps between its begin and end lines so that a
    // node upgraded while another's hook still runs shows up as overlapping lines.
    let log = tmp.path().join("hook.log");
    let hook = tmp.path().join("standin-kubeadm-upgrade");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\n\
             # STAND-IN for kubeadm upgrade (upkeep system test): records itself, runs nothing.\n\
             set -e\n\
             node=\"$1\"; shift\n\
             rec() {{\n\
             \tk=$(dpkg-query --admindir=\"$UPKEEP_ROOT/var/lib/dpkg\" -W -f='${{Version}}' {KUBEADM})\n\
             \tif [ -e \"$UPKEEP_ROOT/var/lib/upkeep/cordoned\" ]; then c=yes; else c=no; fi\n\
             \techo \"$(date +%s.%N) $1 $node | $ARGS | version=$UPKEEP_KUBERNETES_VERSION kubeadm=$k cordoned=$c\" >> {log}\n\
             }}\n\
             ARGS=\"$*\"\n\
             rec begin\n\
             sleep 1\n\
             rec end\n",
            log = log.display()
        ),
    )
    .expect("hook");
    run_ok(Command::new("chmod").arg("755").arg(&hook));

    // One root prepared with apt (stand-ins at 1.29.1, held), copied for the other two nodes.
    let first_root = tmp.path().join(NODES[0].0).join("root");
    prepare_root(&tarball, &repo, &first_root);
    for (name, _, _) in &NODES[1..] {
        std::fs::create_dir_all(tmp.path().join(name)).expect("mkdir");
        run_ok(Command::new("cp").args(["-a", "--reflink=auto"]).arg(&first_root).arg(tmp.path().join(name)));
    }
    let prepared = started.elapsed();

    let pki = TestPki::new();
    let mut hub = TestHub::start(&pki, &tmp.path().join("hub"), "127.0.0.1:0".parse().expect("addr")).await;
    let url = hub.url();
    let mut agents = Vec::new();
    for n in NODES {
        let dir = tmp.path().join(n.0);
        let config = agent_toml(&pki, &dir, &url, &hook, n);
        agents.push(TestAgent::start(&upkeep_tests::TestNode {
            name: n.0.to_string(),
            root: dir.join("root"),
            config,
        }));
    }

    // Every node reports itself Ready, in its pool and role, at Kubernetes 1.29.1 (read from dpkg in its root).
    let node_list = || async {
        let list = upkeepctl_json(&pki, &url, &["node", "list"]).await.ok()?;
        list["nodes"].as_array().cloned()
    };
    wait_for("every node Ready at Kubernetes 1.29.1", WAIT, || async {
        let nodes = node_list().await?;
        NODES
            .iter()
            .all(|(name, pool, cp)| {
                nodes.iter().any(|n| {
                    n["name"] == *name
                        && n["status"] == "Ready"
                        && n["member"] == MEMBER
                        && n["node_pool"] == *pool
                        && n["control_plane"] == *cp
                        && n["kubernetes_version"] == "1.29.1"
                })
            })
            .then_some(())
    })
    .await;

    upkeepctl_ok(&pki, &url, &["member", "set-max-unavailable", MEMBER, "3"]).await;
    upkeepctl_ok(&pki, &url, &["kubernetes", "publish", "--version", "1.29.3", "--regions", REGION]).await;
    upkeepctl_ok(&pki, &url, &["run", "create", RUN, "--upgrade-type", "Full", "--kubernetes-version", "1.29.3"]).await;
    upkeepctl_ok(&pki, &url, &["run", "start", RUN]).await;
    let run = wait_for("the run to end", WAIT, || async {
        let v = upkeepctl_json(&pki, &url, &["run", "show", RUN]).await.ok()?;
        ["Completed", "Failed", "Stopped", "Skipped"].contains(&v["status"].as_str()?).then_some(v)
    })
    .await;
    let member = &run["stages"][0]["groups"][0]["members"][0];
    let lines = hook_lines(&log);
    assert_eq!(run["status"], "Completed", "run: {run}\nhook log: {lines:#?}");
    assert_eq!(member["name"], MEMBER, "{run}");
    assert_eq!(member["status"], "Completed", "{run}");
    assert_eq!(member["target"]["kubernetes_version"], "1.29.3", "{run}");
    assert_eq!(member["target"]["images"], serde_json::json!({}), "no node image target: nothing reimaged: {run}");

    // Exactly one `upgrade apply`, on cp-1, with the version; the packages were installed before it and the node
    // was cordoned while it ran.
    let begins: Vec<&HookLine> = lines.iter().filter(|l| l.phase == "begin").collect();
    let ends: Vec<&HookLine> = lines.iter().filter(|l| l.phase == "end").collect();
    let applies: Vec<&&HookLine> = begins.iter().filter(|l| l.args.starts_with("upgrade apply")).collect();
    assert_eq!(applies.len(), 1, "exactly one upgrade apply in the member: {lines:#?}");
    let apply = applies[0];
    assert_eq!(apply.node, "cp-1", "upgrade apply on the first control-plane node by pool then name: {lines:#?}");
    assert_eq!(apply.args, "upgrade apply -y 1.29.3", "{apply:?}");
    let apply_end = ends
        .iter()
        .find(|l| l.node == "cp-1" && l.args == apply.args)
        .unwrap_or_else(|| panic!("the upgrade apply hook never finished: {lines:#?}"));
    // Every other node: exactly one `upgrade node`, begun after the apply had finished.
    for (name, _, _) in &NODES[1..] {
        let mine: Vec<&&HookLine> = begins.iter().filter(|l| l.node == *name).collect();
        assert_eq!(mine.len(), 1, "{name} runs its hook exactly once: {lines:#?}");
        assert_eq!(mine[0].args, "upgrade node", "{name} runs upgrade node: {lines:#?}");
    }
    assert_eq!(begins.iter().filter(|l| l.node == "cp-1").count(), 1, "cp-1 runs its hook once: {lines:#?}");
    for l in begins.iter().filter(|l| l.args.starts_with("upgrade node")) {
        assert!(
            l.seq > apply_end.seq,
            "{} began upgrade node (log line {}) before cp-1's upgrade apply ended (log line {}): {lines:#?}",
            l.node,
            l.seq,
            apply_end.seq
        );
    }
    for l in &lines {
        assert_eq!(l.exported, "1.29.3", "the agent exports the target version to the hook: {l:?}");
        assert_eq!(l.kubeadm, "1.29.3-1.1", "packages installed (1.29.3, not 1.29.30) before the hook: {l:?}");
        assert_eq!(l.cordoned, "yes", "the node is cordoned while it is upgraded: {l:?}");
    }
    // The log in node order: cp-1, cp-2, w-1, each hook finished before the next began (pools one after another).
    let order: Vec<(String, String)> = lines.iter().map(|l| (l.node.clone(), l.phase.clone())).collect();
    let want: Vec<(String, String)> = NODES
        .iter()
        .flat_map(|(n, _, _)| [(n.to_string(), "begin".to_string()), (n.to_string(), "end".to_string())])
        .collect();
    assert_eq!(order, want, "hooks in node order, never overlapping: {lines:#?}");

    // Every node: packages at 1.29.3 (not the decoy 1.29.30), holds kept, back in service, reporting 1.29.3.
    for (name, _, _) in NODES {
        let root = tmp.path().join(name).join("root");
        assert_eq!(
            (installed(&root, KUBEADM), installed(&root, KUBELET)),
            ("1.29.3-1.1".to_string(), "1.29.3-1.1".to_string()),
            "{name}'s packages"
        );
        let holds = chroot(&root, &["apt-mark", "showhold"]);
        assert_eq!(holds.lines().collect::<Vec<_>>(), [KUBEADM, KUBELET], "{name} keeps its holds");
        assert!(!root.join("var/lib/upkeep/cordoned").exists(), "{name} is uncordoned at the end");
    }
    wait_for("every node reports Kubernetes 1.29.3", WAIT, || async {
        let nodes = node_list().await?;
        NODES
            .iter()
            .all(|(name, _, _)| nodes.iter().any(|n| n["name"] == *name && n["kubernetes_version"] == "1.29.3"))
            .then_some(())
    })
    .await;

    // The run's events show the nodes in the same order: each node's work started after the previous one's
    // completed, and only cp-1's says `upgrade apply`.
    let events = run_events(&pki, &url).await;
    let node_event = |node: &str, to: &str| -> &Value {
        let level = format!("node {node:?} of member {MEMBER:?}");
        let hits: Vec<&Value> =
            events.iter().filter(|e| e["kind"] == "node" && e["level"] == level && e["to"] == to).collect();
        assert_eq!(hits.len(), 1, "one event {level} -> {to}: {events:#?}");
        hits[0]
    };
    let seq = |e: &Value| e["seq"].as_u64().expect("seq");
    let mut previous_done = 0;
    for (name, _, _) in NODES {
        let running = node_event(name, "Running");
        let done = node_event(name, "Completed");
        assert!(seq(running) > previous_done && seq(done) > seq(running), "{name} out of order: {events:#?}");
        previous_done = seq(done);
        let apply = running["message"].as_str().unwrap_or_default().contains("upgrade apply");
        assert_eq!(apply, name == "cp-1", "only cp-1's work is the upgrade apply: {running}");
    }

    for a in agents {
        a.stop().await;
    }
    hub.stop().await;
    eprintln!("hook log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    eprintln!("roots prepared in {prepared:?}; whole test {:?}", started.elapsed());
}
