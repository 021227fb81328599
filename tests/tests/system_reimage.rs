//! System tests for reimage with A/B slots (issue 5, SPEC §4 "reimage", §5 `NodeImageOnly`) on machines that
//! really reboot: Debian containers booted by systemd-nspawn (systemd is PID 1) with the upkeep-agent .deb
//! installed and running as a systemd service, talking over mutual TLS to a real `upkeep-hub` process on the
//! host loopback (fleet CA from `upkeepctl pki`'s code, images built and signed with `upkeepctl image`, SQLite).
//!
//! How a container boots "from a slot". The agent's `dir` backend cannot be used for this: it simulates the
//! boot in-process (`DirSlots::reboot` activates the slot's metadata and returns `Rebooted::Done`; it never runs
//! a reboot command), so a node using it never reboots. These nodes use the `grub` backend, the one real nodes
//! use: the agent writes the slots (image files standing in for partitions under /var/lib/upkeep/slots), marks
//! and commits through the real `grub-editenv` on a real GRUB environment block (/boot/grub/grubenv), reboots
//! with `systemctl reboot`, and reads the booted slot from `upkeep.slot=a|b` on its kernel command line. A
//! container has no kernel or bootloader of its own, so the harness plays firmware and GRUB
//! (`upkeep_tests::system::{Machine, GrubFirmware}`): when the container's systemd reboots, systemd-nspawn
//! (`--keep-unit`) exits with 133 and the harness, before booting the same root again, makes the boot
//! decision of the packaged grub.cfg snippet (packaging/grub/09_upkeep, run over the node's environment block,
//! so the counter really counts down), checks that the chosen slot holds a bootable image (else GRUB's
//! fallback entry, else the test fails: nothing bootable), and binds the chosen entry's kernel command line
//! read-only over /run/upkeep-boot/cmdline (agent.toml `grub_cmdline`) and the slot's image metadata over
//! /etc/upkeep/node-image, which is what the node then reports. Every boot gets a fresh boot id.
//!
//! Power cuts SIGKILL the container's init (no shutdown at all). Deterministic pause points: the agent's own
//! journal (state dir `journal/*.json`, `step`) says where the operation stands, and the node's tools stop
//! there: the inactive slot's "disk" is a FIFO that nobody reads (the write blocks), `grub-editenv` on the node
//! is wrapped to stop right after writing the boot-once mark or right before writing the committed slot, and
//! the configured reboot command stops before `systemctl reboot`. Nothing in the agent is test-only.
//!
//! They need root and the tools `scripts/deps` installs, plus grub-common; a missing one fails with the fix.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use upkeep_agent::journal::{Entry, Journal, Op};
use upkeep_agent::os::Slot;
use upkeep_agent::os::slots::{Backend, GRUB_ENTRY_PREFIX, GrubEnv, parse_grub_env};
use upkeep_hub::pki::files;
use upkeep_tests::system::{
    BootLock, GrubFirmware, GrubLayout, Machine, build_packages, grub_boot_decision, grub_cfg, grub_decision_block,
    grub_entry_cmdline, grub_script, pick, poll, require_prerequisites, require_tools, run_ok, spawn_hub_logged,
};
use upkeep_tests::{TestPki, upkeepctl};

const AGENT: &str = "upkeep-agent.service";
const FAMILY: &str = "Debian-12-gen2";
const REGION: &str = "eu-west";
/// Inside a node's root.
const GRUBENV: &str = "boot/grub/grubenv";
const SLOT_FILES: [&str; 2] = ["var/lib/upkeep/slots/slot-a.img", "var/lib/upkeep/slots/slot-b.img"];
const CMDLINE_AT: &str = "/run/upkeep-boot/cmdline";
const STATE_DIR: &str = "/var/lib/upkeep/agent";
const TEST_TOOLS: &str = "/usr/local/lib/upkeep-test";
const ARM_DIR: &str = "/var/lib/upkeep-test/arm";
/// /etc/default/upkeep-grub on the nodes.
const GRUB_DEFAULTS: &str = "UPKEEP_GRUB_ENABLE=true\n";
const RUN_WAIT: Duration = Duration::from_secs(120);

fn grub_tools() -> [(&'static str, &'static str); 3] {
    [
        ("grub-editenv", "apt-get install grub-common"),
        ("grub-script-check", "apt-get install grub-common"),
        ("bash", "apt-get install bash"),
    ]
}

fn write(path: &Path, bytes: impl AsRef<[u8]>, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// `grub-editenv FILE list`, with the host's tool.
fn grub_env(file: &Path) -> Vec<(String, String)> {
    parse_grub_env(&String::from_utf8_lossy(&run_ok(Command::new("grub-editenv").arg(file).arg("list")).stdout))
}

fn env_get<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
    env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

// The node's tools around the boot control (shell, installed into each machine's root before its first boot).

/// Blocks at an armed pause point until the power is cut.
const PAUSE_SH: &str = r#"#!/bin/sh
# Pause point of the power-cut tests: when the harness armed POINT (/var/lib/upkeep-test/arm/POINT), record
# that it was reached and block until the power is cut; otherwise return at once. One-shot.
arm="/var/lib/upkeep-test/arm/$1"
[ -e "$arm" ] || exit 0
rm -f "$arm"
hold="/var/lib/upkeep-test/hold-$1"
[ -p "$hold" ] || mkfifo "$hold"
echo "$$" > "/var/lib/upkeep-test/reached-$1"
# Opening a FIFO for reading blocks until a writer opens it: none does, the power goes first.
exec cat "$hold"
"#;

/// grub-editenv on the nodes: the real one, with the "mark" and "commit" pause points.
const GRUB_EDITENV_SH: &str = r#"#!/bin/sh
# grub-editenv on the test nodes: the real one (/usr/bin/grub-editenv) with two pause points for the power-cut
# tests: "mark" right after the boot-once mark is written, "commit" right before the committed slot is.
case " $* " in
  *" set next_entry="*)
    /usr/bin/grub-editenv "$@" || exit
    exec /usr/local/lib/upkeep-test/pause mark
    ;;
  *" set saved_entry="*)
    /usr/local/lib/upkeep-test/pause commit
    ;;
esac
exec /usr/bin/grub-editenv "$@"
"#;

/// agent.toml `[image] reboot_command` on the nodes.
const REBOOT_SH: &str = r#"#!/bin/sh
# The reboot command of the test nodes: systemctl reboot, after the "reboot" pause point.
/usr/local/lib/upkeep-test/pause reboot
exec systemctl reboot
"#;

// The packaged unit runs as it ships (ProtectControlGroups=yes gives it a fresh /proc in which the host's boot
// id shows, the same on every container boot): the agent tells boots apart by its token in /run, which each
// boot of the container starts empty. A regression makes the node reboot until the reboot cap fails the run.

/// The hub process, the fleet PKI, the signing key and the agent package, shared by a test's machines.
struct Lab {
    work: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    pki: TestPki,
    url: String,
    hub: std::process::Child,
    deb: PathBuf,
    key: PathBuf,
    public_key: PathBuf,
    _lock: BootLock,
}

impl Lab {
    fn new() -> Lab {
        require_prerequisites();
        require_tools(&grub_tools());
        let work = tempfile::tempdir().expect("tempdir");
        let deb = pick(&build_packages("upkeep-agent", "deb", &work.path().join("dist"), None), ".deb");
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let pki = TestPki::new();
        // A reboot takes the node away for a few seconds: the hub must not call it Unknown (and fail the
        // member) before it is back, so the silence deadline is 60 heartbeats of 1 s.
        let (hub, url) = spawn_hub_logged(&pki, work.path(), 60, "");
        let waiting = std::time::Instant::now();
        let lock = BootLock::take();
        eprintln!("waited {:.1?} for the boot lock (other system tests' containers)", waiting.elapsed());
        let lab = Lab {
            key: work.path().join("keys/upkeep-image.key"),
            public_key: work.path().join("keys/upkeep-image.pub"),
            work,
            rt,
            pki,
            url,
            hub,
            deb,
            _lock: lock,
        };
        poll("upkeep-hub to answer", Duration::from_secs(30), || {
            lab.rt.block_on(upkeepctl(&lab.pki, &lab.url, "viewer", &["whoami"])).status.success().then_some(())
        });
        let keys = lab.work.path().join("keys");
        lab.ctl(&["image", "keygen", "--dir", &keys.to_string_lossy()]);
        lab
    }

    /// upkeepctl as the operator; fails the test unless it exits 0. Returns stdout.
    fn ctl(&self, args: &[&str]) -> String {
        let out = self.rt.block_on(upkeepctl(&self.pki, &self.url, "operator", args));
        assert!(out.status.success(), "upkeepctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> Option<Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.rt.block_on(upkeepctl(&self.pki, &self.url, "operator", &all));
        out.status.success().then(|| serde_json::from_slice(&out.stdout).ok()).flatten()
    }

    /// Builds and signs image `FAMILY` `version` (a tar of a root tree with etc/upkeep/node-image).
    fn image(&self, version: &str) -> PathBuf {
        let file = self.work.path().join(format!("{FAMILY}-{version}.tar"));
        let f = file.to_string_lossy().into_owned();
        self.ctl(&["image", "build", "--out", &f, "--family", FAMILY, "--version", version]);
        self.ctl(&["image", "sign", "--key", &self.key.to_string_lossy(), &f]);
        file
    }

    /// Publishes `image` as `version`. The GRUB backend writes images to raw slots byte for byte, so the lab
    /// publishes them as `raw`: the hub does not look into them and the node alone judges what boots (a mislabelled
    /// release must reach the node for the fallback case).
    fn publish(&self, image: &Path, version: &str) {
        let f = image.to_string_lossy();
        let args = ["image", "publish", "--family", FAMILY, "--version", version, "--regions", REGION, "--file", &f];
        self.ctl(&[&args[..], &["--format", "raw"]].concat());
    }

    fn node(&self, name: &str) -> Option<Value> {
        self.json(&["node", "list"])?["nodes"].as_array()?.iter().find(|n| n["name"] == name).cloned()
    }

    fn wait_run_end(&self, name: &str, machines: &[&Machine]) -> Value {
        wait(
            &format!("run {name} to end"),
            RUN_WAIT,
            || diagnose(self, machines, name),
            || {
                for m in machines {
                    m.check(); // a machine that cannot boot fails here rather than at the deadline
                }
                let v = self.json(&["run", "show", name])?;
                matches!(v["status"].as_str()?, "Completed" | "Failed" | "Stopped").then_some(v)
            },
        )
    }

    fn wait_run(&self, name: &str, machines: &[&Machine]) -> Value {
        let run = self.wait_run_end(name, machines);
        assert_eq!(run["status"], "Completed", "{}", diagnose(self, machines, name));
        run
    }

    /// A machine laid out as a node of `member` running image `installed` from slot A, booted, with the agent
    /// .deb installed and its service registered with the hub.
    fn machine(&self, name: &str, member: &str, installed: &Path) -> Machine {
        let mut m = Machine::new(name);
        let (cert, key) = self.pki.node(name);
        let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        write(&m.path("/etc/upkeep/pki/ca.pem"), read(&self.pki.file(files::CA_CERT)), 0o644);
        write(&m.path("/etc/upkeep/pki/node.pem"), read(&cert), 0o644);
        write(&m.path("/etc/upkeep/pki/node.key"), read(&key), 0o600);
        write(&m.path("/etc/upkeep/trusted-keys/upkeep-image.pub"), read(&self.public_key), 0o644);
        write(&m.path("/etc/default/upkeep-grub"), GRUB_DEFAULTS, 0o644);
        let config = format!(
            "hub = \"{url}\"\nmember = \"{member}\"\nnode_pool = \"pool1\"\nregion = \"{REGION}\"\n\
             state_dir = \"{STATE_DIR}\"\n\
             [tls]\nca = \"/etc/upkeep/pki/ca.pem\"\ncert = \"/etc/upkeep/pki/node.pem\"\nkey = \"/etc/upkeep/pki/node.key\"\n\
             [image]\nbackend = \"grub\"\ngrub_env = \"/{GRUBENV}\"\ngrub_cmdline = \"{CMDLINE_AT}\"\n\
             slot_a = \"/{a}\"\nslot_b = \"/{b}\"\ntrusted_keys = \"/etc/upkeep/trusted-keys\"\n\
             boot_tries = 3\nhealth_timeout_seconds = 120\nreboot_command = [\"{TEST_TOOLS}/reboot\"]\n",
            url = self.url,
            a = SLOT_FILES[0],
            b = SLOT_FILES[1],
        );
        write(&m.path("/etc/upkeep/agent.toml"), &config, 0o644);
        // The installed image in slot A, committed; the mount point of the booted slot's metadata.
        write(&m.path(SLOT_FILES[0]), read(installed), 0o600);
        write(&m.path("/etc/upkeep/node-image"), "", 0o644);
        std::fs::create_dir_all(m.path("/boot/grub")).expect("mkdir /boot/grub");
        let env = m.path(GRUBENV);
        run_ok(Command::new("grub-editenv").arg(&env).arg("create"));
        run_ok(Command::new("grub-editenv").arg(&env).args(["set", "saved_entry=upkeep-a"]));
        // GRUB's user-space tool, as grub-common installs it (the cached root has no grub-common; Debian 12
        // on both sides, and its libraries are in the root), then the wrappers with the pause points.
        write(&m.path("/usr/bin/grub-editenv"), read(Path::new("/usr/bin/grub-editenv")), 0o755);
        write(&m.path("/usr/local/sbin/grub-editenv"), GRUB_EDITENV_SH, 0o755);
        write(&m.path(&format!("{TEST_TOOLS}/pause")), PAUSE_SH, 0o755);
        write(&m.path(&format!("{TEST_TOOLS}/reboot")), REBOOT_SH, 0o755);
        std::fs::create_dir_all(m.path(ARM_DIR)).expect("mkdir arm");

        m.start(firmware());
        assert_eq!(m.boots(), ["a"]);
        m.ok(&["grub-editenv", "--version"]);
        let deb = m.push_package(&self.deb);
        m.ok(&["dpkg", "-i", &deb]);
        m.wait_active(AGENT);
        // Channel None: the member takes new images from update runs only. (NodeImage, a new member's default,
        // would start reimaging on its own the moment an image is published.)
        poll(&format!("member {member} to exist"), Duration::from_secs(30), || {
            let out = self.rt.block_on(upkeepctl(
                &self.pki,
                &self.url,
                "operator",
                &["member", "set-channel", member, "None"],
            ));
            out.status.success().then_some(())
        });
        let want = format!("{FAMILY}-{}", image_version(installed));
        poll(&format!("the hub to list {name} on {want}"), Duration::from_secs(60), || {
            let n = self.node(name)?;
            (n["node_image_version"] == want.as_str() && n["status"] == "Ready" && n["channel"] == "None").then_some(())
        });
        m
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.hub.kill();
        let _ = self.hub.wait();
    }
}

fn hub_log_tail(work: &Path) -> String {
    let text = std::fs::read_to_string(work.join("hub.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn firmware() -> GrubFirmware {
    GrubFirmware::new(
        GrubLayout { env_file: GRUBENV.into(), slots: SLOT_FILES.map(String::from), cmdline_at: CMDLINE_AT.into() },
        GRUB_DEFAULTS,
    )
}

/// The version in an image file's name (`<FAMILY>-<version>.tar`).
fn image_version(image: &Path) -> String {
    let stem = image.file_stem().expect("image file name").to_string_lossy().into_owned();
    stem.strip_prefix(&format!("{FAMILY}-")).expect("image named by Lab::image").to_string()
}

/// The agent's journal, read from the host; None while a file is being replaced under us.
fn journal(m: &Machine) -> Option<Vec<Entry>> {
    Journal::open(&m.path(STATE_DIR)).ok().map(|j| j.entries().cloned().collect())
}

/// The reimage operation to `version` in the node's journal (each version is ordered once per test).
fn reimage_entry(m: &Machine, version: &str) -> Option<Entry> {
    journal(m)?.into_iter().find(|e| matches!(&e.op, Op::Reimage { version: v, .. } if v == version))
}

/// After a run: the node booted `slot` with `version`, committed it, holds no boot-once mark, the agent's
/// operation succeeded, and the hub shows the version.
fn assert_on(lab: &Lab, m: &Machine, run: &str, slot: Slot, version: &str) {
    let env = grub_env(&m.path(GRUBENV));
    let entry = format!("{GRUB_ENTRY_PREFIX}{}", slot.as_str());
    assert_eq!(env_get(&env, "saved_entry"), Some(entry.as_str()), "{}: committed slot: {env:?}", m.name);
    assert_eq!(env_get(&env, "next_entry").unwrap_or(""), "", "{}: boot-once mark left: {env:?}", m.name);
    assert!(env_get(&env, "upkeep_tries").is_none(), "{}: boot counter left: {env:?}", m.name);
    let cmdline = m.ok(&["cat", CMDLINE_AT]);
    assert!(cmdline.contains(&format!("upkeep.slot={}", slot.as_str())), "{}: {cmdline}", m.name);
    let meta = m.ok(&["cat", "/etc/upkeep/node-image"]);
    assert!(meta.contains(&format!("VERSION={version}")), "{}: booted image metadata: {meta}", m.name);
    let e = reimage_entry(m, version).unwrap_or_else(|| panic!("{}: {run}: no reimage to {version}", m.name));
    let result = e.result.as_ref().unwrap_or_else(|| panic!("{}: reimage unfinished: {e:?}", m.name));
    assert!(result.ok, "{}: reimage failed: {}", m.name, result.error);
    assert_eq!((e.target, e.previous), (Some(slot), Some(slot.other())), "{}: {e:?}", m.name);
    let want = format!("{FAMILY}-{version}");
    poll(&format!("the hub to show {} on {want}", m.name), Duration::from_secs(30), || {
        let n = lab.node(&m.name)?;
        (n["node_image_version"] == want.as_str()).then_some(())
    });
}

/// What to look at when a wait fails: the run, the nodes' journals, boots and agent logs, the hub's log.
fn diagnose(lab: &Lab, machines: &[&Machine], run: &str) -> String {
    let mut out = format!("run {run}: {:#}\n", lab.json(&["run", "show", run]).unwrap_or_default());
    for m in machines {
        out += &format!(
            "{}: boots {:?}, exits {:?}\njournal: {:#?}\nagent log:\n{}\n",
            m.name,
            m.boots(),
            m.exits(),
            journal(m),
            agent_log(m)
        );
    }
    out + &format!("hub log:\n{}", hub_log_tail(lab.work.path()))
}

/// The agent's log over every boot, one line per entry with its operation fields.
fn agent_log(m: &Machine) -> String {
    let out = m.exec(&["journalctl", "-u", AGENT, "-o", "json", "--no-pager"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|e| {
            let f = |k: &str| e[k].as_str().unwrap_or("").to_string();
            format!(
                "{} {} op={} step={} error={}",
                f("_BOOT_ID").get(..8).unwrap_or(""),
                f("MESSAGE"),
                f("OP"),
                f("STEP"),
                f("ERROR")
            )
        })
        .collect();
    lines[lines.len().saturating_sub(80)..].join("\n")
}

/// Polls `check` like `poll`, failing with `diagnose`'s report at the deadline.
fn wait<T>(what: &str, within: Duration, diag: impl Fn() -> String, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out after {within:?} waiting for {what}\n{}", diag());
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn boot_id(m: &Machine) -> String {
    m.ok(&["cat", "/proc/sys/kernel/random/boot_id"]).trim().to_string()
}

#[test]
fn node_image_run_reboots_both_nodes_into_the_new_slot() {
    let lab = Lab::new();
    let (a, b) = ("202401.01.0", "202402.01.0");
    let image_a = lab.image(a);
    let n1 = lab.machine("node-1", "m1", &image_a);
    let n2 = lab.machine("node-2", "m2", &image_a);
    // The .deb shipped the GRUB snippet these nodes' boot decisions come from.
    let shipped = std::fs::read(n1.path("/etc/grub.d/09_upkeep")).expect("/etc/grub.d/09_upkeep installed");
    assert_eq!(shipped, std::fs::read(grub_script()).expect("packaging/grub/09_upkeep"));
    n1.ok(&["test", "-x", "/etc/grub.d/09_upkeep"]);
    let ids_before = [boot_id(&n1), boot_id(&n2)];

    let image_b = lab.image(b);
    lab.publish(&image_b, b);
    let strategy = lab.work.path().join("strategy.yaml");
    std::fs::write(
        &strategy,
        "stages:\n  - name: canary\n    groups:\n      - name: first\n        members: [m1]\n\
         \x20 - name: rest\n    groups:\n      - name: second\n        members: [m2]\n",
    )
    .expect("strategy");
    lab.ctl(&["strategy", "create", "two-stages", "-f", &strategy.to_string_lossy()]);
    lab.ctl(&["run", "create", "to-b", "--strategy", "two-stages", "--upgrade-type", "NodeImageOnly"]);
    lab.ctl(&["run", "start", "to-b"]);
    let run = lab.wait_run("to-b", &[&n1, &n2]);

    for (m, before) in [(&n1, &ids_before[0]), (&n2, &ids_before[1])] {
        eprintln!("{}: boots {:?}, exits {:?}", m.name, m.boots(), m.exits());
        // One real reboot each (the container's systemd rebooted, nspawn exited 133), and GRUB chose slot b.
        assert_eq!(m.boots(), ["a", "b"], "{}:\n{}", m.name, m.consoles());
        assert_eq!(m.exits(), ["exit status: 133"], "{}", m.name);
        assert_ne!(&boot_id(m), before, "{}: same boot id after the reboot", m.name);
        m.wait_active(AGENT);
        assert_on(&lab, m, "to-b", Slot::B, b);
    }
    // Latest chose B for each member's pool, and the members went one stage after the other.
    let members: Vec<&Value> = run["stages"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["groups"].as_array().into_iter().flatten())
        .flat_map(|g| g["members"].as_array().into_iter().flatten())
        .collect();
    assert_eq!(members.len(), 2, "{run:#}");
    for mem in &members {
        assert_eq!(mem["target"]["images"]["pool1"], format!("{FAMILY}-{b}").as_str(), "{run:#}");
        assert_eq!(mem["status"], "Completed", "{run:#}");
    }
    let (first_end, second_start) = (members[0]["ended_at"].as_str(), members[1]["started_at"].as_str());
    assert!(first_end.is_some() && first_end <= second_start, "m1 finished before m2 started: {run:#}");
}

/// Where a power cut hits a reimage, and how the armed pause point is set up on the node.
#[derive(Debug, Clone, Copy, PartialEq)]
enum CutAt {
    /// The new slot is being written (its "disk" hangs: a FIFO nobody reads).
    Write,
    /// The boot-once mark is on disk; the journal does not know yet.
    Mark,
    /// The reboot command was about to run.
    Reboot,
    /// The new slot booted and is healthy; the commit was about to be written.
    Commit,
    /// The new slot booted but carries another image than the one ordered: the agent falls back, and the
    /// commit of the previous slot was about to be written.
    FallBack,
}

impl CutAt {
    fn step(self) -> &'static str {
        match self {
            CutAt::Write => "write",
            CutAt::Mark => "mark",
            CutAt::Reboot => "reboot",
            CutAt::Commit => "commit",
            CutAt::FallBack => "fall-back",
        }
    }

    /// The node's pause point that stops the operation at this step (None: the slot's FIFO does).
    fn pause(self) -> Option<&'static str> {
        match self {
            CutAt::Write => None,
            CutAt::Mark => Some("mark"),
            CutAt::Reboot => Some("reboot"),
            CutAt::Commit | CutAt::FallBack => Some("commit"),
        }
    }

    /// The boots after the power comes back, for a reimage from `old` to `new`.
    fn boots_after(self, old: Slot, new: Slot) -> Vec<String> {
        let (o, n) = (old.as_str().to_string(), new.as_str().to_string());
        match self {
            // Never marked: the committed slot; then the agent writes, marks and reboots into the new one.
            CutAt::Write => vec![o, n.clone()],
            // Marked: GRUB tries the new slot (a try used); the agent, still at its mark step, marks again and
            // reboots: the new slot again.
            CutAt::Mark => vec![n.clone(), n],
            // Marked: GRUB boots the new slot; the agent sees a new boot id and goes on with health and commit.
            CutAt::Reboot => vec![n],
            // Not committed, still armed with tries left: GRUB boots the new slot again; the agent commits.
            CutAt::Commit => vec![n],
            // Still armed: GRUB boots the new (wrong) slot again; the agent, still at its fall-back step,
            // commits the previous slot and reboots into it.
            CutAt::FallBack => vec![n, o],
        }
    }
}

#[test]
fn power_cut_at_each_reimage_step_ends_on_a_good_slot_with_a_definite_result() {
    let lab = Lab::new();
    let first = lab.image("202401.01.0");
    let m = lab.machine("node-pc", "m-pc", &first);
    let mut booted = (Slot::A, "202401.01.0");
    // (where the power goes, the image's own version, the version it is published and ordered as)
    let cases = [
        (CutAt::Write, "202402.01.0", "202402.01.0"),
        (CutAt::Mark, "202403.01.0", "202403.01.0"),
        (CutAt::Reboot, "202404.01.0", "202404.01.0"),
        (CutAt::Commit, "202405.01.0", "202405.01.0"),
        // A mislabelled release: the slot boots, but reports 202406.01.0 where 202407.01.0 was ordered.
        (CutAt::FallBack, "202406.01.0", "202407.01.0"),
    ];
    for (cut, content, version) in cases {
        let started = std::time::Instant::now();
        let (old, new) = (booted.0, booted.0.other());
        let new_file = m.path(SLOT_FILES[if new == Slot::A { 0 } else { 1 }]);
        let image = lab.image(content);
        lab.publish(&image, version);
        let reached = cut.pause().map(|p| m.path(&format!("/var/lib/upkeep-test/reached-{p}")));
        match (cut.pause(), &reached) {
            (Some(point), Some(reached)) => {
                let _ = std::fs::remove_file(reached);
                write(&m.path(&format!("{ARM_DIR}/{point}")), "", 0o644);
            }
            _ => {
                let _ = std::fs::remove_file(&new_file);
                run_ok(Command::new("mkfifo").arg(&new_file));
            }
        }
        let run = format!("cut-at-{}", cut.step());
        lab.ctl(&["run", "create", &run, "--upgrade-type", "NodeImageOnly"]);
        lab.ctl(&["run", "start", &run]);

        // The agent journalled the step, and the node's tool stopped there.
        let what = format!("{run}: the agent at step {}", cut.step());
        wait(
            &what,
            RUN_WAIT,
            || diagnose(&lab, &[&m], &run),
            || {
                let e = reimage_entry(&m, version)?;
                assert!(e.result.is_none(), "{run}: the reimage ended before the power cut: {e:?}");
                (e.step.as_str() == cut.step() && reached.as_ref().is_none_or(|r| r.exists())).then_some(())
            },
        );
        let (boots_before, exits_before) = (m.boots().len(), m.exits().len());
        let env = grub_env(&m.path(GRUBENV));
        let marked = env_get(&env, "next_entry") == Some(format!("{GRUB_ENTRY_PREFIX}{}", new.as_str()).as_str());
        assert_eq!(marked, cut != CutAt::Write, "{run}: boot-once mark before the cut: {env:?}");
        m.power_cut();
        if cut == CutAt::Write {
            // The disk comes back with what a cut mid-write leaves: the first bytes of the new image.
            let bytes = std::fs::read(&image).expect("image");
            std::fs::remove_file(&new_file).expect("remove the FIFO");
            write(&new_file, &bytes[..700], 0o600);
        }
        m.power_on();
        let result = lab.wait_run_end(&run, &[&m]);

        assert_eq!(
            m.boots()[boots_before..],
            cut.boots_after(old, new),
            "{run}: boots after the power came back (all: {:?}):\n{}",
            m.boots(),
            m.consoles()
        );
        // The cut ended one boot; every later boot but the current one ended in the node's own reboot.
        let exits = m.exits()[exits_before..].to_vec();
        assert_eq!(exits.len(), cut.boots_after(old, new).len(), "{run}: {exits:?}");
        assert_ne!(exits[0], "exit status: 133", "{run}: the power cut looked like a reboot");
        assert!(exits[1..].iter().all(|e| e == "exit status: 133"), "{run}: {exits:?}");
        eprintln!(
            "{run}: slot {old} -> {new}, boots after the cut {:?}, exits {exits:?}, {:.1?}",
            &m.boots()[boots_before..],
            started.elapsed()
        );
        if cut != CutAt::FallBack {
            assert_eq!(result["status"], "Completed", "{}", diagnose(&lab, &[&m], &run));
            assert_on(&lab, &m, &run, new, version);
            booted = (new, version);
            continue;
        }
        // Rolled back: a definite failure, on the previous slot, committed again, and the image remembered.
        assert_eq!(result["status"], "Failed", "{result:#}");
        let e = reimage_entry(&m, version).expect("the reimage is journalled");
        let r = e.result.as_ref().unwrap_or_else(|| panic!("{run}: unfinished: {e:?}"));
        assert!(!r.ok && r.error.contains(&format!("rolled back to slot {old}")), "{run}: {r:?}");
        assert!(r.error.contains(content) && r.error.contains(version), "{run}: names both images: {r:?}");
        assert!(result.to_string().contains("rolled back"), "the run carries the node's reason: {result:#}");
        let marker = m.path(&format!("{STATE_DIR}/rolled-back/{FAMILY}-{version}"));
        assert!(marker.is_file(), "{run}: {} missing", marker.display());
        let env = grub_env(&m.path(GRUBENV));
        let entry = format!("{GRUB_ENTRY_PREFIX}{}", old.as_str());
        assert_eq!(env_get(&env, "saved_entry"), Some(entry.as_str()), "{run}: {env:?}");
        assert_eq!(env_get(&env, "next_entry").unwrap_or(""), "", "{run}: {env:?}");
        assert!(m.ok(&["cat", CMDLINE_AT]).contains(&format!("upkeep.slot={}", old.as_str())));
        assert!(m.ok(&["cat", "/etc/upkeep/node-image"]).contains(&format!("VERSION={}", booted.1)));
        let want = format!("{FAMILY}-{}", booted.1);
        poll(&format!("the hub to show {} back on {want}", m.name), Duration::from_secs(30), || {
            (lab.node(&m.name)?["node_image_version"] == want.as_str()).then_some(())
        });
    }
}

/// The GRUB snippet: valid GRUB script, off until configured, and in step with what the agent's grub backend
/// writes and reads (a test that fails when either side renames a variable, an entry or the command-line key).
#[test]
fn grub_snippet_checks_and_matches_the_variables_the_agent_writes() {
    require_tools(&grub_tools());
    let work = tempfile::tempdir().expect("tempdir");

    // Off unless switched on.
    assert_eq!(grub_cfg(""), "", "no /etc/default/upkeep-grub settings: no output");
    assert_eq!(grub_cfg("UPKEEP_GRUB_ENABLE=false\n"), "");
    let missing = Command::new("sh").arg(grub_script()).env("UPKEEP_GRUB_DEFAULTS", work.path().join("nope")).output();
    let missing = missing.expect("run 09_upkeep");
    assert!(missing.status.success() && missing.stdout.is_empty(), "{missing:?}");

    // grub-script-check accepts what it generates, with the defaults and with site settings; and it can fail.
    let check = |name: &str, cfg: &str| {
        let f = work.path().join(name);
        std::fs::write(&f, cfg).expect("write cfg");
        Command::new("grub-script-check").arg(&f).output().expect("run grub-script-check")
    };
    let cfg = grub_cfg(GRUB_DEFAULTS);
    let out = check("default.cfg", &cfg);
    assert!(out.status.success(), "grub-script-check: {}\n{cfg}", String::from_utf8_lossy(&out.stderr));
    let site = grub_cfg(
        "UPKEEP_GRUB_ENABLE=true\nUPKEEP_SLOT_A_LABEL=root-a\nUPKEEP_SLOT_B_LABEL=root-b\nUPKEEP_INITRD=\n\
         UPKEEP_CMDLINE=\"ro console=ttyS0,115200\"\n",
    );
    assert!(check("site.cfg", &site).status.success(), "{site}");
    assert_eq!(
        grub_entry_cmdline(&site, "upkeep-b").as_deref(),
        Some("BOOT_IMAGE=/vmlinuz root=LABEL=root-b upkeep.slot=b ro console=ttyS0,115200")
    );
    assert!(!site.contains("initrd"), "an empty UPKEEP_INITRD means no initrd line:\n{site}");
    let torn = cfg.replacen("fi\n", "\n", 1);
    assert!(!check("torn.cfg", &torn).status.success(), "grub-script-check accepted a cfg missing a `fi`");
    let bad = Command::new("sh")
        .arg(grub_script())
        .env("UPKEEP_GRUB_DEFAULTS", {
            let f = work.path().join("bad");
            std::fs::write(&f, "UPKEEP_GRUB_ENABLE=true\nUPKEEP_SLOT_A_LABEL='a b;reboot'\n").expect("write");
            f
        })
        .output()
        .expect("run 09_upkeep");
    assert!(!bad.status.success(), "a label GRUB would split or run was accepted");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("only letters"), "{bad:?}");

    // The agent's side, with its own code: every variable its grub backend ever writes.
    let cmdline = work.path().join("cmdline");
    let grub = |tries: u32, env: &Path| GrubEnv {
        env_file: env.to_path_buf(),
        slots: [work.path().join("a.img"), work.path().join("b.img")],
        cmdline: cmdline.clone(),
        boot_id: work.path().join("boot_id"),
        boot_token: work.path().join("boot-token"),
        boot_tries: tries,
        reboot_command: vec!["true".into()],
    };
    let set_cmdline = |entry: &str| {
        let line = grub_entry_cmdline(&cfg, entry).unwrap_or_else(|| panic!("no entry --id {entry}:\n{cfg}"));
        std::fs::write(&cmdline, format!("{line}\n")).expect("write cmdline");
    };
    set_cmdline("upkeep-a");
    let probe = grub(3, &work.path().join("probe.env"));
    let mut written = std::collections::BTreeSet::new();
    let mut note = |g: &GrubEnv| written.extend(g.list().expect("list").into_iter().map(|(k, _)| k));
    probe.mark_boot_once(Slot::B).expect("mark");
    note(&probe);
    probe.commit(Slot::B).expect("commit");
    note(&probe);
    probe.mark_boot_once(Slot::A).expect("mark");
    note(&probe);
    probe.fall_back(Slot::A).expect("fall back");
    note(&probe);

    // The snippet's side: the variables its decision block uses, less GRUB's own and its locals.
    let decision = grub_decision_block(&cfg);
    let mut used = std::collections::BTreeSet::new();
    for piece in decision.split("${").skip(1) {
        used.insert(piece.split('}').next().expect("split").to_string());
    }
    for line in decision.lines() {
        if let Some(names) = line.trim().strip_prefix("save_env ") {
            used.extend(names.split_whitespace().map(String::from));
        }
    }
    for grub_own in ["default", "fallback", "boot_once", "upkeep_once", "upkeep_committed"] {
        used.remove(grub_own);
    }
    assert_eq!(used, written, "the environment variables 09_upkeep reads and slots.rs writes differ");

    // Entry ids are the agent's prefix plus the slot, and each entry's kernel command line tells the agent's
    // grub backend which slot is running.
    for slot in [Slot::A, Slot::B] {
        let entry = format!("{GRUB_ENTRY_PREFIX}{}", slot.as_str());
        set_cmdline(&entry);
        assert_eq!(probe.boot_state().expect("boot state").booted, slot, "entry {entry}");
    }

    // The decision, run as GRUB runs it over a block the agent's grub backend wrote.
    let env = work.path().join("grubenv");
    let g = grub(2, &env);
    let boot = || grub_boot_decision(&decision, &env).expect("boot decision");
    let choice = |default: &str, fallback: &str| upkeep_tests::system::GrubChoice {
        default: default.into(),
        fallback: fallback.into(),
    };
    g.list().expect("create the block");
    assert_eq!(boot(), choice("upkeep-a", ""), "nothing committed yet: slot A, as the agent assumes");
    g.mark_boot_once(Slot::B).expect("mark");
    assert_eq!(boot(), choice("upkeep-b", "upkeep-a"), "first try of the marked slot");
    let st = g.boot_state().expect("state");
    assert_eq!((st.next_once, st.tries_left), (Some(Slot::B), Some(1)), "still armed, one try left");
    assert_eq!(boot(), choice("upkeep-b", "upkeep-a"), "second and last try");
    let st = g.boot_state().expect("state");
    assert_eq!((st.next_once, st.tries_left), (None, Some(0)), "tries used up: no boot-once slot pending");
    assert_eq!(boot(), choice("upkeep-a", ""), "counter exhausted: the committed slot");
    assert_eq!(boot(), choice("upkeep-a", ""));
    g.mark_boot_once(Slot::B).expect("mark");
    assert_eq!(boot().default, "upkeep-b");
    set_cmdline("upkeep-b");
    g.commit(Slot::B).expect("commit");
    assert_eq!(boot(), choice("upkeep-b", ""), "committed");
    assert!(!g.list().expect("list").iter().any(|(k, _)| k == "next_entry" || k == "upkeep_tries"));
    // The top of the counter's range (agent.toml boot_tries is 1..=10).
    grub(10, &env).mark_boot_once(Slot::A).expect("mark");
    assert_eq!(boot(), choice("upkeep-a", "upkeep-b"));
    assert_eq!(env_get(&grub_env(&env), "upkeep_tries"), Some("9"));
    g.fall_back(Slot::B).expect("fall back");
    assert_eq!(boot(), choice("upkeep-b", ""));
    // A plain `grub-reboot upkeep-a` (no counter) boots it once; a saved_entry naming another entry (a rescue
    // system the operator chose) is left alone.
    run_ok(Command::new("grub-editenv").arg(&env).args(["set", "next_entry=upkeep-a"]));
    assert_eq!(boot().default, "upkeep-a");
    assert_eq!(boot().default, "upkeep-b");
    run_ok(Command::new("grub-editenv").arg(&env).args(["set", "saved_entry=rescue"]));
    assert_eq!(boot().default, "0", "GRUB_DEFAULT stays in force");

    // Both packages install it as /etc/grub.d/09_upkeep, executable. The .deb marks it a conffile (Debian policy:
    // everything under /etc); the .rpm does not mark it %config (rpmlint: an executable is program code, and its
    // settings live in /etc/default/upkeep-grub), so an upgrade replaces it.
    let dist = work.path().join("dist");
    let deb = pick(&build_packages("upkeep-agent", "deb", &dist, None), ".deb");
    let listing = String::from_utf8_lossy(&run_ok(Command::new("dpkg-deb").arg("-c").arg(&deb)).stdout).into_owned();
    assert!(listing.lines().any(|l| l.starts_with("-rwxr-xr-x") && l.ends_with("./etc/grub.d/09_upkeep")), "{listing}");
    let conffiles = run_ok(Command::new("dpkg-deb").arg("-I").arg(&deb).arg("conffiles"));
    assert!(String::from_utf8_lossy(&conffiles.stdout).lines().any(|l| l == "/etc/grub.d/09_upkeep"));
    let rpm = pick(&build_packages("upkeep-agent", "rpm", &dist, None), ".rpm");
    let dump =
        String::from_utf8_lossy(&run_ok(Command::new("rpm").args(["-qp", "--dump"]).arg(&rpm)).stdout).into_owned();
    let line = dump.lines().find(|l| l.starts_with("/etc/grub.d/09_upkeep ")).unwrap_or_else(|| panic!("{dump}"));
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!((fields[4], fields[7]), ("0100755", "0"), "mode and config flag: {line}");
}
