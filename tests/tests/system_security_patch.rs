//! System test of the node OS channels on booted nodes (issue 4, SPEC §2 and §4): two Debian 12 containers
//! booted by systemd-nspawn (systemd is PID 1), each with the upkeep-agent .deb installed and running as its
//! systemd service, in member `m1` (`max_unavailable` 1) of a real `upkeep-hub` process on the host loopback
//! (mutual TLS with a fleet CA from `upkeepctl pki`'s code, SQLite). Every node has unattended-upgrades (the root
//! of system_channels.rs, cached as `bookworm-channels.tar.zst`), image metadata Debian-12 202311.07.0, and two
//! local apt repositories: a "security" origin (Origin Debian, Label Debian-Security, Codename
//! bookworm-security) serving the stand-in package `upkeep-test-lib` 1 and 2 (2's postinst touches
//! /var/run/reboot-required, as a kernel or libc update does), and an ordinary origin serving
//! `upkeep-test-other` 1 and 2. Both start at 1.
//!
//! - `Unmanaged`: the agent's apt configuration and timer overrides are in force in the booted system
//!   (`apt-config dump`, `systemctl show ... -p TimersCalendar`); the time from `member set-channel` to that is
//!   measured by polling both nodes and printed. The distribution's own services then run for real
//!   (`apt-daily.service`, then `apt-daily-upgrade.service`, i.e. `unattended-upgrade`): the security origin's
//!   package goes to 2, the other stays at 1. Both nodes now need a reboot at the same moment: each agent asks
//!   the hub for a reboot lease, the hub grants one (the other node is told the budget is in use), and each node
//!   cordons, drains, really reboots (`systemctl reboot`: nspawn exits 133 and the harness boots the same root
//!   again, with a new boot id), uncordons and gives the lease back: never both out of service at once.
//! - `None`: the overrides are gone, the timers disabled and stopped, apt's periodic settings 0; with a newer
//!   security package (3) available and the package lists fresh, a run of `apt-daily-upgrade.service` upgrades
//!   nothing.
//! - `SecurityPatch`: with a node OS window that is closed now, a published patch (`upkeep-test-lib=2`) waits
//!   for the window (`member show`), nothing installed; with a window open now the hub rolls it node by node
//!   under its own lease: cordon, drain, `apt-get install upkeep-test-lib=2` exactly (3 is available; the other
//!   package stays at 1), the node reports the patch version and that a reboot is required, the hub orders the
//!   reboot (a real one), uncordon, release.
//!
//! Pause point: the nodes' drain hook waits while `/var/lib/upkeep-test/hold` exists. It holds the first leased
//! reboot until the test has seen the second node denied (so the budget is really contended) and until the
//! unattended-upgrade runs have finished (a reboot in the middle would kill them). Cordon, drain and uncordon
//! hooks log `<unix time> <action> <boot id>` to /var/log/upkeep-test/cordon.log on the node (persistent): the
//! out-of-service intervals of the two nodes are read from there.
//!
//! The nodes run the packaged defaults for images (the `dir` backend; on a root of `/` its reboots run the
//! default `reboot_command`, `systemctl reboot`), so every reboot here is real. The hub runs as an `upkeep-hub` process with the harness's settings
//! (heartbeat 1 s, silent after 5, `[auto_upgrade] enabled`), started here rather than by `HubProcess` so that
//! its log is kept: the test reads the lease grants from it and shows it when a wait fails. The agent's executor
//! unit (which runs the hooks) gets one drop-in so that they log the container's boot id (see
//! `HOOK_BOOT_ID_DROP_IN`).
//! The agent's own operation journal (read from the host) confirms what the agent did: one leased reboot per
//! node under `Unmanaged`; under `SecurityPatch` the hub's cordon, drain, patch (exactly the published pins),
//! reboot and uncordon steps, in that order, the patch installed while the node was cordoned.
//!
//! Needs root and the tools `scripts/deps` installs; a missing one fails with the fix. The packages come from the
//! debug build (`scripts/package --profile dev --no-build`).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use upkeep_agent::journal::{Entry, Journal, Op};
use upkeep_hub::pki::files;
use upkeep_tests::debs::{build_deb, channels_rootfs, chroot, flat_repo};
use upkeep_tests::system::{
    Boot, BootLock, Bootloader, Machine, build_packages, pick, poll, require_prerequisites, run_ok, spawn_hub_logged,
};
use upkeep_tests::{TestPki, upkeepctl};

const AGENT: &str = "upkeep-agent.service";
/// The agent's privileged half, which runs the cordon hooks.
const EXECUTOR: &str = "upkeep-agent-executor.service";
const MEMBER: &str = "m1";
const FAMILY: &str = "Debian-12";
const IMAGE_VERSION: &str = "202311.07.0";
const PATCH_VERSION: &str = "202312.05.0";
const LIB: &str = "upkeep-test-lib";
const OTHER: &str = "upkeep-test-other";
const TOOLS: &str = "/usr/local/lib/upkeep-test";
const HOLD: &str = "/var/lib/upkeep-test/hold";
const HOOK_LOG: &str = "/var/log/upkeep-test/cordon.log";
const WAIT: Duration = Duration::from_secs(120);

/// The cordon, drain and uncordon hook of the test nodes.
const CORDON_HOOK_SH: &str = r#"#!/bin/sh
# Cordon hook of the upkeep test nodes: logs "<unix time> <action> <boot id>"; drain waits while the hold
# file exists (at most 5 minutes).
set -e
mkdir -p /var/log/upkeep-test
echo "$(date +%s.%N) $1 $(cat /proc/sys/kernel/random/boot_id)" >> /var/log/upkeep-test/cordon.log
if [ "$1" = drain ]; then
  n=0
  while [ -e /var/lib/upkeep-test/hold ]; do
    n=$((n + 1))
    if [ "$n" -gt 1500 ]; then echo "drain hold never released" >&2; exit 1; fi
    sleep 0.2
  done
fi
"#;

/// A drop-in for the agent's executor unit on the test nodes (it runs the hooks), for the test's own bookkeeping
/// only: the cordon hooks log
/// the boot id they see, and under the packaged ProtectControlGroups=yes systemd 252 gives the unit (and its
/// hooks) a fresh /proc where the host's boot id shows, the same on every container boot. The agent itself does
/// not need this (it tells boots apart by its token in /run; tests/tests/system_reimage.rs runs it without).
const HOOK_BOOT_ID_DROP_IN: &str = "[Service]\nProtectControlGroups=no\n";

/// Boots the machine's root as it is: no slots, no kernel command line of its own.
struct Firmware;

impl Bootloader for Firmware {
    fn boot(&mut self, _root: &Path, _scratch: &Path) -> Result<Boot, String> {
        Ok(Boot { label: "debian".into(), nspawn_args: Vec::new() })
    }
}

fn write(path: &Path, bytes: impl AsRef<[u8]>, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A node's security repository (inside its root, as the host sees it) gets `debs`, and a fresh index.
fn serve_security(m: &Machine, debs: &[PathBuf]) {
    let dir = m.path("/srv/sec");
    for d in debs {
        std::fs::copy(d, dir.join(d.file_name().expect("name"))).expect("copy deb");
    }
    flat_repo(&dir, "Debian", "Debian-Security", "bookworm-security");
}

/// The hub process, the fleet PKI, the agent package and the stand-in packages, shared by the test's machines.
struct Site {
    work: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    pki: TestPki,
    url: String,
    hub: std::process::Child,
    deb: PathBuf,
    channels: PathBuf,
    _lock: BootLock,
}

impl Site {
    fn new() -> Site {
        require_prerequisites();
        let missing: Vec<&str> =
            ["chroot", "dpkg-deb", "dpkg-scanpackages", "sha256sum"].into_iter().filter(|t| !on_path(t)).collect();
        assert!(
            missing.is_empty(),
            "system test prerequisites missing: {missing:?} (apt-get install coreutils dpkg dpkg-dev). Run scripts/deps."
        );
        let work = tempfile::tempdir().expect("tempdir");
        let deb = pick(&build_packages("upkeep-agent", "deb", &work.path().join("dist"), None), ".deb");
        let channels = channels_rootfs();
        let debs = work.path().join("debs");
        std::fs::create_dir_all(&debs).expect("mkdir");
        for v in ["1", "2", "3"] {
            build_deb(&debs, LIB, v, "upkeep system-test stand-in package", v == "2");
        }
        for v in ["1", "2"] {
            build_deb(&debs, OTHER, v, "upkeep system-test stand-in package", false);
        }
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let pki = TestPki::new();
        let (hub, url) = spawn_hub_logged(&pki, work.path(), 5, "[auto_upgrade]\nenabled = true\n");
        let site = Site { work, rt, pki, url, hub, deb, channels, _lock: BootLock::take() };
        poll("upkeep-hub to answer", Duration::from_secs(30), || {
            site.rt.block_on(upkeepctl(&site.pki, &site.url, "viewer", &["whoami"])).status.success().then_some(())
        });
        site
    }

    fn deb(&self, name: &str, version: &str) -> PathBuf {
        self.work.path().join("debs").join(format!("{name}_{version}.deb"))
    }

    /// upkeepctl as the operator; fails the test unless it exits 0. Returns stdout.
    fn ctl(&self, args: &[&str]) -> String {
        let out = self.rt.block_on(upkeepctl(&self.pki, &self.url, "operator", args));
        assert!(
            out.status.success(),
            "upkeepctl {args:?}: {}\nhub log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.hub_log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> Option<Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.rt.block_on(upkeepctl(&self.pki, &self.url, "operator", &all));
        out.status.success().then(|| serde_json::from_slice(&out.stdout).ok()).flatten()
    }

    fn node(&self, name: &str) -> Option<Value> {
        self.json(&["node", "show", name])
    }

    /// `lease list`, failing the test if the hub does not answer.
    fn leases(&self) -> Vec<Value> {
        let v = self.json(&["lease", "list"]).unwrap_or_else(|| panic!("lease list failed:\n{}", self.hub_log_tail()));
        v.as_array().cloned().unwrap_or_else(|| panic!("lease list is not an array: {v}"))
    }

    fn rollout_status(&self) -> String {
        self.json(&["member", "show", MEMBER])
            .and_then(|m| m["auto_upgrade_status"].as_str().map(String::from))
            .unwrap_or_default()
    }

    /// The hub's log, without the terminal colours it writes even to a file.
    fn hub_log(&self) -> String {
        let raw = std::fs::read_to_string(self.work.path().join("hub.log")).unwrap_or_default();
        let mut out = String::with_capacity(raw.len());
        let mut rest = raw.as_str();
        while let Some(i) = rest.find("\x1b[") {
            out.push_str(&rest[..i]);
            rest = &rest[i + 2..];
            rest = rest.find('m').map_or("", |j| &rest[j + 1..]);
        }
        out.push_str(rest);
        out
    }

    fn hub_log_tail(&self) -> String {
        let text = self.hub_log();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// A daily node OS window of 4 hours opening at `opens` (UTC).
    fn set_window(&self, opens: chrono::DateTime<chrono::Utc>) {
        let file = self.work.path().join("window.json");
        std::fs::write(
            &file,
            format!(
                r#"{{"frequency":{{"type":"Daily","interval_days":1}},"start_time":"{}","duration_hours":4}}"#,
                opens.format("%H:%M")
            ),
        )
        .expect("window");
        self.ctl(&["member", "set-window", MEMBER, "--kind", "node-os", "-f", &file.to_string_lossy()]);
    }

    /// Node `name` of member m1: the Debian root with unattended-upgrades, its packages at 1 from the local
    /// repositories, booted, with the agent .deb installed and its service registered with the hub.
    fn machine(&self, name: &str) -> Machine {
        let mut m = Machine::new(&format!("upkeep-sp-{name}"));
        // The cached nspawn root is unpacked; the channels root (the same plus unattended-upgrades) goes over it.
        run_ok(Command::new("sh").arg("-c").arg(format!(
            "zstd -dc '{}' | tar -C '{}' --numeric-owner -xf -",
            self.channels.display(),
            m.root().display()
        )));
        assert!(m.path("/usr/bin/unattended-upgrade").is_file(), "the channels root has unattended-upgrades");
        let (cert, key) = self.pki.node(name);
        let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        write(&m.path("/etc/upkeep/pki/ca.pem"), read(&self.pki.file(files::CA_CERT)), 0o644);
        write(&m.path("/etc/upkeep/pki/node.pem"), read(&cert), 0o644);
        write(&m.path("/etc/upkeep/pki/node.key"), read(&key), 0o600);
        write(&m.path("/etc/upkeep/node-image"), format!("FAMILY={FAMILY}\nVERSION={IMAGE_VERSION}\n"), 0o644);
        write(&m.path(&format!("{TOOLS}/cordon-hook")), CORDON_HOOK_SH, 0o755);
        write(
            &m.path(&format!("/etc/systemd/system/{EXECUTOR}.d/50-hooks-see-the-boot-id.conf")),
            HOOK_BOOT_ID_DROP_IN,
            0o644,
        );
        std::fs::create_dir_all(m.path("/var/lib/upkeep-test")).expect("mkdir");
        let hook = |what: &str| format!("[\"{TOOLS}/cordon-hook\", \"{what}\"]");
        let config = format!(
            "hub = \"{url}\"\nmember = \"{MEMBER}\"\nnode_pool = \"pool1\"\nregion = \"eu-west\"\n\
             state_dir = \"/var/lib/upkeep/agent\"\n\
             [tls]\nca = \"/etc/upkeep/pki/ca.pem\"\ncert = \"/etc/upkeep/pki/node.pem\"\nkey = \"/etc/upkeep/pki/node.key\"\n\
             [cordon]\ncordon = {co}\nuncordon = {un}\ndrain = {dr}\n",
            url = self.url,
            co = hook("cordon"),
            un = hook("uncordon"),
            dr = hook("drain"),
        );
        write(&m.path("/etc/upkeep/agent.toml"), &config, 0o644);

        // The node's repositories: a security origin and an ordinary one, no Debian mirror (offline).
        for d in ["/srv/sec", "/srv/plain"] {
            std::fs::create_dir_all(m.path(d)).expect("mkdir repo");
        }
        serve_security(&m, &[self.deb(LIB, "1"), self.deb(LIB, "2")]);
        for v in ["1", "2"] {
            let d = self.deb(OTHER, v);
            std::fs::copy(&d, m.path("/srv/plain").join(d.file_name().expect("name"))).expect("copy deb");
        }
        flat_repo(&m.path("/srv/plain"), "Upkeep", "Upkeep", "upkeep-plain");
        let _ = std::fs::remove_file(m.path("/etc/apt/sources.list"));
        write(
            &m.path("/etc/apt/sources.list.d/upkeep-test.list"),
            "deb [trusted=yes] file:/srv/sec ./\ndeb [trusted=yes] file:/srv/plain ./\n",
            0o644,
        );
        chroot(&m.root(), &["apt-get", "-q", "update"]);
        chroot(&m.root(), &["apt-get", "install", "-y", "-q", &format!("{LIB}=1"), &format!("{OTHER}=1")]);

        m.start(Firmware);
        let deb = m.push_package(&self.deb);
        m.ok(&["dpkg", "-i", &deb]);
        m.wait_active(AGENT);
        poll(&format!("the hub to list {name} Ready on {FAMILY}-{IMAGE_VERSION}"), Duration::from_secs(60), || {
            let n = self.node(name)?;
            (n["status"] == "Ready" && n["node_image_version"] == format!("{FAMILY}-{IMAGE_VERSION}").as_str())
                .then_some(())
        });
        m
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = self.hub.kill();
        let _ = self.hub.wait();
    }
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file())).unwrap_or(false)
}

fn installed(m: &Machine, pkg: &str) -> String {
    m.ok(&["dpkg-query", "-W", "-f=${Version}", pkg])
}

fn candidate(m: &Machine, pkg: &str) -> String {
    let policy = m.ok(&["apt-cache", "policy", pkg]);
    policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|| panic!("{}: no candidate in apt-cache policy {pkg}:\n{policy}", m.name))
}

fn boot_id(m: &Machine) -> String {
    m.ok(&["cat", "/proc/sys/kernel/random/boot_id"]).trim().to_string()
}

/// Starts a oneshot unit of the distribution and waits for it (`systemctl start` blocks, and fails if the unit
/// fails); the unit's journal since then shows that it ran to a successful end and was not skipped. (Its
/// properties cannot tell: a static unit no timer refers to is unloaded when it ends, and `systemctl show` then
/// reports a freshly loaded unit.)
fn run_service(m: &Machine, service: &str) {
    let before = m.ok(&["journalctl", "-n", "0", "--show-cursor", "--no-pager"]);
    let cursor = before
        .lines()
        .find_map(|l| l.strip_prefix("-- cursor: "))
        .unwrap_or_else(|| panic!("{}: no journal cursor in {before:?}", m.name))
        .to_string();
    m.ok(&["systemctl", "start", service]);
    // systemd's messages reach the journal asynchronously: wait for the job's end to be written.
    let messages = poll(&format!("{}: the end of {service} in its journal", m.name), Duration::from_secs(30), || {
        // (Exit status 1 while there is no entry yet.)
        let after = m.exec(&["journalctl", "-u", service, "--after-cursor", &cursor, "-o", "json", "--no-pager"]);
        let messages: Vec<String> = String::from_utf8_lossy(&after.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|e| e["MESSAGE"].as_str().map(String::from))
            .collect();
        messages
            .iter()
            .any(|l| l.starts_with("Finished ") || l.contains("Failed") || l.contains("skipped"))
            .then_some(messages)
    });
    let ran = messages.iter().any(|l| l.contains("Deactivated successfully"))
        && !messages.iter().any(|l| l.contains("skipped") || l.contains("Failed"));
    assert!(ran, "{}: {service} did not run to a successful end: {messages:#?}", m.name);
}

fn uu_log(m: &Machine) -> String {
    std::fs::read_to_string(m.path("/var/log/unattended-upgrades/unattended-upgrades.log")).unwrap_or_default()
}

/// What is in force on the node for its updaters, as the booted system sees it (one `nsenter` per poll:
/// `apt-config dump`, then `systemctl show` of both apt timers). Err: what is not (yet).
fn updaters_state(m: &Machine, on: bool) -> Result<(), String> {
    let text = m.ok(&[
        "sh",
        "-c",
        "apt-config dump && echo @@@ && systemctl show -p TimersCalendar -p DropInPaths -p UnitFileState \
         -p ActiveState apt-daily.timer apt-daily-upgrade.timer",
    ]);
    let (dump, timers) = text.split_once("@@@\n").ok_or_else(|| format!("unexpected output: {text}"))?;
    let has = |line: &str| dump.lines().any(|l| l == line);
    let want_lines: Vec<String> = if on {
        vec![
            "APT::Periodic::Update-Package-Lists \"1\";".into(),
            "APT::Periodic::Unattended-Upgrade \"1\";".into(),
            "Unattended-Upgrade::Automatic-Reboot \"false\";".into(),
            "Unattended-Upgrade::Origins-Pattern:: \"origin=Debian,codename=${distro_codename}-security,label=Debian-Security\";"
                .into(),
        ]
    } else {
        vec!["APT::Periodic::Update-Package-Lists \"0\";".into(), "APT::Periodic::Unattended-Upgrade \"0\";".into()]
    };
    if let Some(missing) = want_lines.iter().find(|l| !has(l)) {
        return Err(format!("apt-config dump lacks {missing}"));
    }
    if on {
        let patterns: Vec<&str> =
            dump.lines().filter(|l| l.starts_with("Unattended-Upgrade::Origins-Pattern::")).collect();
        if !patterns.iter().all(|l| l.contains("Security")) {
            return Err(format!("origins other than security allowed: {patterns:?}"));
        }
    }
    // `systemctl show` of two units: two blocks of KEY=VALUE, in the order asked, separated by a blank line.
    let blocks: Vec<&str> = timers.split("\n\n").filter(|b| !b.trim().is_empty()).collect();
    if blocks.len() != 2 {
        return Err(format!("systemctl show printed {} blocks: {timers}", blocks.len()));
    }
    for ((timer, at), block) in
        [("apt-daily.timer", "05:30:00 UTC"), ("apt-daily-upgrade.timer", "06:00:00 UTC")].into_iter().zip(blocks)
    {
        let get =
            |k: &str| block.lines().find_map(|l| l.strip_prefix(k)?.strip_prefix('=')).unwrap_or_default().to_string();
        let (calendar, dropins) = (get("TimersCalendar"), get("DropInPaths"));
        let (file_state, active) = (get("UnitFileState"), get("ActiveState"));
        let ok = if on {
            calendar.contains(&format!("OnCalendar=*-*-* {at}"))
                && calendar.matches("OnCalendar=").count() == 1
                && dropins.contains("50-upkeep.conf")
                && file_state == "enabled"
                && active == "active"
        } else {
            !calendar.is_empty()
                && !calendar.contains("UTC")
                && dropins.is_empty()
                && file_state == "disabled"
                && active == "inactive"
        };
        if !ok {
            return Err(format!(
                "{timer}: TimersCalendar={calendar:?} DropInPaths={dropins:?} UnitFileState={file_state} ActiveState={active}"
            ));
        }
    }
    Ok(())
}

/// `member set-channel m1 <channel>`, then polls every node until the updaters are `on`/off in its booted system
/// (`apt-config dump`, `systemctl show`, one `nsenter` per node) and the hub shows the node on `channel` with
/// no note (the agent reports the channel in force after applying it). Prints, per node, the time from just
/// before the command was started to the first poll that saw the OS configuration in force, to the first that
/// saw the hub's report, and the agent's own journal entry "node OS channel in force". Switching between None
/// and SecurityPatch leaves the OS configuration as it is (updaters off for both), so there only the report
/// and the journal entry measure anything.
fn set_channel_and_measure(site: &Site, machines: &[&Machine], channel: &str, on: bool) {
    let wall0 = SystemTime::now();
    let t0 = Instant::now();
    site.ctl(&["member", "set-channel", MEMBER, channel]);
    let returned = t0.elapsed();
    let n = machines.len();
    let (mut os_at, mut hub_at): (Vec<Option<Duration>>, Vec<Option<Duration>>) = (vec![None; n], vec![None; n]);
    let mut last: Vec<String> = vec![String::new(); n];
    let mut polls = 0u32;
    let deadline = Instant::now() + Duration::from_secs(60);
    while os_at.iter().chain(&hub_at).any(Option::is_none) {
        polls += 1;
        for (i, m) in machines.iter().enumerate() {
            if os_at[i].is_none() {
                match updaters_state(m, on) {
                    Ok(()) => os_at[i] = Some(t0.elapsed()),
                    Err(why) => last[i] = why,
                }
            }
            if hub_at[i].is_none() {
                let name = m.name.trim_start_matches("upkeep-sp-");
                if site.node(name).is_some_and(|v| v["channel"] == channel && v["channel_note"] == "") {
                    hub_at[i] = Some(t0.elapsed());
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "set-channel {channel}: not in force within 60 s: {last:?} (hub saw the channel: {hub_at:?})\n{}",
            machines.iter().map(|m| m.journal_text(AGENT)).collect::<Vec<_>>().join("\n")
        );
    }
    let round = t0.elapsed() / polls.max(1);
    let t0_us = wall0.duration_since(UNIX_EPOCH).expect("clock").as_micros();
    for (i, m) in machines.iter().enumerate() {
        // The agent's own account: its journal entry "node OS channel in force" for this channel.
        let logged = m
            .ok(&["journalctl", "-u", AGENT, "-o", "json", "--no-pager"])
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["MESSAGE"] == "node OS channel in force" && e["CHANNEL"] == channel)
            .filter_map(|e| e["__REALTIME_TIMESTAMP"].as_str()?.parse::<u128>().ok())
            .find(|us| *us >= t0_us)
            .map(|us| (us - t0_us) / 1000);
        assert!(logged.is_some(), "{}: the agent never logged channel {channel} in force", m.name);
        eprintln!(
            "set-channel {channel} -> {}: OS configuration in force after {} ms, hub shows the node on {channel} \
             after {} ms, agent journal 'node OS channel in force' at {} ms (upkeepctl returned after {} ms; \
             {polls} poll rounds of ~{} ms over {n} nodes)",
            m.name,
            os_at[i].expect("seen").as_millis(),
            hub_at[i].expect("seen").as_millis(),
            logged.expect("logged"),
            returned.as_millis(),
            round.as_millis(),
        );
    }
}

/// Polls `check` every 200 ms like `poll`, failing with `diag`'s report at the deadline.
fn wait<T>(what: &str, within: Duration, diag: impl Fn() -> String, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}\n{}", diag());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What to look at when a wait fails: every node's boots, hook log, hub view and agent log; leases; the hub log.
fn diagnose(site: &Site, machines: &[&Machine]) -> String {
    let mut s = format!("leases: {:#?}\nmember: {:?}\n", site.json(&["lease", "list"]), site.rollout_status());
    for m in machines {
        let name = m.name.trim_start_matches("upkeep-sp-");
        s.push_str(&format!(
            "--- {}: boots {:?}, exits {:?}\nhook log: {:?}\nhub: {:#}\nagent log:\n{}\nconsoles:\n{}\n",
            m.name,
            m.boots(),
            m.exits(),
            hook_log(m),
            site.node(name).unwrap_or_default(),
            m.journal_text(AGENT),
            m.consoles()
        ));
    }
    s.push_str(&format!("hub log:\n{}", site.hub_log_tail()));
    s
}

/// One line of a node's cordon hook log.
#[derive(Debug, Clone)]
struct HookEntry {
    at: f64,
    action: String,
    boot: String,
}

fn hook_log(m: &Machine) -> Vec<HookEntry> {
    std::fs::read_to_string(m.path(HOOK_LOG))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some(HookEntry { at: w.next()?.parse().ok()?, action: w.next()?.to_string(), boot: w.next()?.to_string() })
        })
        .collect()
}

/// The node's hook entries after the first `skip`: exactly one disruption, cordon and drain on boot `before`,
/// uncordon on a later boot. Returns (cordoned at, uncordoned at).
fn one_reboot(m: &Machine, skip: usize, before: &str) -> (f64, f64) {
    let log = hook_log(m);
    let new = &log[skip.min(log.len())..];
    let actions: Vec<&str> = new.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["cordon", "drain", "uncordon"], "{}: hook log {new:?}", m.name);
    assert_eq!((new[0].boot.as_str(), new[1].boot.as_str()), (before, before), "{}: {new:?}", m.name);
    assert_ne!(new[2].boot, before, "{}: uncordoned without a reboot: {new:?}", m.name);
    assert_eq!(new[2].boot, boot_id(m), "{}: {new:?}", m.name);
    (new[0].at, new[2].at)
}

/// The agent's operation journal, read from the host.
fn agent_ops(m: &Machine) -> Vec<Entry> {
    Journal::open(&m.path("/var/lib/upkeep/agent"))
        .unwrap_or_else(|e| panic!("{}: agent journal: {e}", m.name))
        .entries()
        .cloned()
        .collect()
}

/// The finished, successful operation `id` of the node's agent.
fn finished_op(m: &Machine, id: &str) -> (Entry, i64) {
    let ops = agent_ops(m);
    let e = ops.iter().find(|e| e.operation_id == id).unwrap_or_else(|| {
        panic!(
            "{}: no operation {id} in the agent's journal: {:?}",
            m.name,
            ops.iter().map(|e| &e.operation_id).collect::<Vec<_>>()
        )
    });
    let r = e.result.clone().unwrap_or_else(|| panic!("{}: {id} unfinished: {e:?}", m.name));
    assert!(r.ok, "{}: {id} failed: {}", m.name, r.error);
    (e.clone(), r.finished_at_unix_ms)
}

/// The two nodes' out-of-service intervals do not overlap.
fn disjoint(a: (&str, (f64, f64)), b: (&str, (f64, f64))) {
    let ((na, (a0, a1)), (nb, (b0, b1))) = (a, b);
    assert!(a1 < b0 || b1 < a0, "{na} out of service {a0:.3}..{a1:.3} overlaps {nb} out of service {b0:.3}..{b1:.3}");
}

#[test]
fn channels_on_booted_nodes_unmanaged_none_and_a_security_patch_that_really_reboots() {
    let started = Instant::now();
    let site = Site::new();
    let n1 = site.machine("n1");
    let n2 = site.machine("n2");
    let both = [&n1, &n2];
    let names = ["n1", "n2"];
    eprintln!("setup (packages, hub, two booted nodes with the agent) took {} s", started.elapsed().as_secs());
    site.ctl(&["member", "set-max-unavailable", MEMBER, "1"]);

    // ---- Unmanaged: the OS's own patching on, security origin only; reboots under leases, one at a time.
    set_channel_and_measure(&site, &both, "Unmanaged", true);
    for n in names {
        let v = site.node(n).expect("node show");
        assert_eq!(v["channel"], "Unmanaged", "{v:#}");
        assert_eq!(v["channel_note"], "", "{v:#}");
    }
    let boots: Vec<String> = both.iter().map(|m| boot_id(m)).collect();
    for m in both {
        write(&m.path(HOLD), "", 0o644);
        run_service(m, "apt-daily.service");
        run_service(m, "apt-daily-upgrade.service");
        let log = uu_log(m);
        assert!(log.contains(&format!("Packages that will be upgraded: {LIB}\n")), "{}: {log}", m.name);
        assert_eq!(installed(m, LIB), "2", "{}: the security origin's package upgraded", m.name);
        assert_eq!(installed(m, OTHER), "1", "{}: the ordinary origin's package left alone", m.name);
    }
    // Both need a reboot now: one holds the lease (held at drain), the other is denied by the budget.
    let (first, second) = poll("one node draining under a lease, the other denied by the budget", WAIT, || {
        let draining: Vec<usize> = (0..2).filter(|&i| hook_log(both[i]).iter().any(|e| e.action == "drain")).collect();
        let [i] = draining[..] else { return None };
        let other = 1 - i;
        let note = site.node(names[other])?["channel_note"].as_str()?.to_string();
        (note.contains("waiting for a reboot lease") && note.contains("disruption budget")).then_some((i, other))
    });
    let held = site.leases();
    assert_eq!(held.len(), 1, "{held:#?}");
    assert_eq!(held[0]["node"], names[first], "{held:#?}");
    // The hub holds the lease for the node's reboot and carries the reboot out itself.
    assert_eq!(held[0]["holder"], format!("reboot/{}", names[first]).as_str(), "{held:#?}");
    for m in both {
        std::fs::remove_file(m.path(HOLD)).expect("release the drain hold");
    }
    let mut most = 0;
    wait(
        "both nodes rebooted, back, uncordoned, leases released",
        Duration::from_secs(180),
        || diagnose(&site, &both),
        || {
            for m in both {
                m.check();
            }
            let leases = site.leases();
            most = most.max(leases.len());
            if both.iter().any(|m| m.boots().len() < 2) || !leases.is_empty() {
                return None;
            }
            let nodes: Vec<Value> = names.iter().map(|n| site.node(n)).collect::<Option<_>>()?;
            nodes.iter().all(|n| n["status"] == "Ready" && n["reboot_required"] == false).then_some(())
        },
    );
    assert!(most <= 1, "{most} leases held at once in member {MEMBER} with max_unavailable 1");
    let mut out = Vec::new();
    for (i, m) in both.iter().enumerate() {
        m.wait_up(2);
        assert_eq!(m.exits(), ["exit status: 133"], "{}: one real reboot (nspawn exit 133)", m.name);
        assert_ne!(boot_id(m), boots[i], "{}: same boot id after the reboot", m.name);
        let flag = m.exec(&["test", "-e", "/run/reboot-required"]).status.code();
        assert_eq!(flag, Some(1), "{}: the reboot emptied /run and with it the reboot-required flag", m.name);
        let (cordoned, uncordoned) = one_reboot(m, 0, &boots[i]);
        out.push((names[i], (cordoned, uncordoned)));
        // The node asked once, for a lease named for the boot that needed it (`reboot/<boot id>`); the hub
        // rebooted it as the work `reboot/<node>/reboot/<boot id>`: cordon, drain, reboot, uncordon, in order.
        let prefix = format!("reboot/{}/reboot/", names[i]);
        let reboots: Vec<String> = agent_ops(m)
            .into_iter()
            .filter(|e| e.op == Op::Reboot { force: true } && e.operation_id.starts_with(&prefix))
            .map(|e| e.operation_id)
            .collect();
        let [reboot_op] = &reboots[..] else { panic!("{}: hub reboots in the agent's journal: {reboots:?}", m.name) };
        let work = reboot_op.strip_suffix(&format!("/{}/reboot", names[i])).expect("work/node/step");
        let steps: Vec<i64> = ["cordon", "drain", "reboot", "uncordon"]
            .map(|s| finished_op(m, &format!("{work}/{}/{s}", names[i])).1)
            .into();
        assert!(steps.windows(2).all(|w| w[0] <= w[1]), "{}: steps out of order: {steps:?}", m.name);
        assert!(
            !agent_ops(m).iter().any(|e| matches!(e.op, Op::LeasedReboot { .. })),
            "{}: the hub never hands a node its lease",
            m.name
        );
        if i == first {
            assert_eq!(held[0]["lease_id"], work, "{held:#?}");
        }
        m.wait_active(AGENT);
    }
    disjoint(out[0], out[1]);
    assert!(out[second].1.0 > out[first].1.1, "the denied node went second: {out:?}");
    let hub_log = site.hub_log();
    let grants: Vec<&str> = hub_log.lines().filter(|l| l.contains("lease granted")).collect();
    for n in names {
        assert!(
            grants.iter().any(|l| l.contains(&format!("node={n} "))),
            "hub log has no lease granted to {n}:\n{}",
            site.hub_log_tail()
        );
    }
    eprintln!("hub log, lease grants:\n{}", grants.join("\n"));
    eprintln!("Unmanaged reboots: {out:?} (unix seconds cordoned..uncordoned); at most {most} lease(s) seen at once");

    // ---- None: the overrides gone, updaters off; a newer security package available is not installed.
    set_channel_and_measure(&site, &both, "None", false);
    for m in both {
        assert!(!m.path("/etc/systemd/system/apt-daily-upgrade.timer.d").exists(), "{}", m.name);
        assert!(!m.path("/etc/systemd/system/apt-daily.timer.d").exists(), "{}", m.name);
    }
    serve_security(&n1, &[site.deb(LIB, "3")]);
    n1.ok(&["apt-get", "-q", "update"]);
    assert_eq!(candidate(&n1, LIB), "3", "a newer security update is available");
    let uu_before = uu_log(&n1);
    run_service(&n1, "apt-daily.service");
    run_service(&n1, "apt-daily-upgrade.service");
    assert_eq!(installed(&n1, LIB), "2", "None: apt-daily-upgrade.service upgraded nothing");
    assert_eq!(uu_log(&n1), uu_before, "None: unattended-upgrade did not run");
    assert_eq!(n1.exec(&["test", "-e", "/run/reboot-required"]).status.code(), Some(1));

    // ---- SecurityPatch: back to version 1 (under None nothing acts on its own), then the hub's patch.
    serve_security(&n2, &[site.deb(LIB, "3")]);
    for m in both {
        m.ok(&["apt-get", "-q", "update"]);
        m.ok(&["apt-get", "install", "-y", "-q", "--allow-downgrades", &format!("{LIB}=1")]);
        assert_eq!(installed(m, LIB), "1");
        assert_eq!(m.exec(&["test", "-e", "/run/reboot-required"]).status.code(), Some(1), "{}", m.name);
    }
    site.set_window(chrono::Utc::now() + chrono::TimeDelta::hours(6));
    set_channel_and_measure(&site, &both, "SecurityPatch", false);
    let hooks_before: Vec<usize> = both.iter().map(|m| hook_log(m).len()).collect();
    site.ctl(&["patch", "publish", "--family", FAMILY, "--version", PATCH_VERSION, "--package", &format!("{LIB}=2")]);
    let rollout = format!("security-patch:{FAMILY}-{PATCH_VERSION}");
    let status = poll("the patch to wait for the node OS window", Duration::from_secs(60), || {
        let s = site.rollout_status();
        (s.contains(&rollout) && s.contains("waiting for the node OS window")).then_some(s)
    });
    eprintln!("closed window: member show says {status:?}");
    assert!(site.leases().is_empty());
    let boots: Vec<String> = both.iter().map(|m| boot_id(m)).collect();
    for (i, m) in both.iter().enumerate() {
        assert_eq!(installed(m, LIB), "1", "{}: patched outside the window", m.name);
        assert_eq!(hook_log(m).len(), hooks_before[i], "{}: disrupted outside the window", m.name);
        assert_eq!(m.exits().len(), 1, "{}: rebooted outside the window", m.name);
    }

    let opened = Instant::now();
    site.set_window(chrono::Utc::now() - chrono::TimeDelta::hours(1));
    let mut seen_leases: Vec<Value> = Vec::new();
    let mut most = 0;
    let mut started_after = None;
    let status = wait(
        "the security patch rollout to finish",
        Duration::from_secs(240),
        || diagnose(&site, &both),
        || {
            for m in both {
                m.check();
            }
            let leases = site.leases();
            most = most.max(leases.len());
            if started_after.is_none() && (!leases.is_empty() || site.hub_log().contains("channel rollout started")) {
                started_after = Some(opened.elapsed());
            }
            seen_leases.extend(leases);
            let s = site.rollout_status();
            (s.contains(&rollout) && (s.contains("Completed") || s.contains("Failed"))).then_some(s)
        },
    );
    eprintln!(
        "window opened -> rollout started after {:?} (no poke on set-window: the maintenance pass runs at most 30 s \
         apart), finished after {} s: {status:?}",
        started_after,
        opened.elapsed().as_secs()
    );
    assert!(status.contains(&format!("{rollout} Completed (2 of 2 nodes done)")), "{status}\n{}", site.hub_log_tail());
    assert!(most <= 1, "{most} leases held at once in member {MEMBER} with max_unavailable 1: {seen_leases:#?}");
    let rollout_holder = format!("rollout/{MEMBER}");
    assert!(
        seen_leases.iter().any(|l| l["holder"] == rollout_holder.as_str()
            && l["lease_id"].as_str().is_some_and(|id| id.starts_with(&format!("{rollout_holder}/")))),
        "the rollout's lease was never seen in lease list: {seen_leases:#?}"
    );
    let mut out = Vec::new();
    for (i, m) in both.iter().enumerate() {
        m.wait_up(3);
        assert_eq!(m.exits(), ["exit status: 133", "exit status: 133"], "{}: one more real reboot", m.name);
        assert_ne!(boot_id(m), boots[i], "{}", m.name);
        assert_eq!(installed(m, LIB), "2", "{}: exactly the pinned version (3 is available)", m.name);
        assert_eq!(candidate(m, LIB), "3", "{}", m.name);
        assert_eq!(installed(m, OTHER), "1", "{}: a package the patch does not name", m.name);
        let (cordoned, uncordoned) = one_reboot(m, hooks_before[i], &boots[i]);
        out.push((names[i], (cordoned, uncordoned)));
        // The hub's steps as the agent carried them out, in order, and the patch while the node was cordoned.
        // The rollout's work id (`rollout/<member>/<n>`), from the patch operation the agent carried out.
        let patch_op = agent_ops(m)
            .into_iter()
            .find(|e| matches!(e.op, Op::ApplySecurityPatch { .. }) && e.operation_id.starts_with(&rollout_holder))
            .unwrap_or_else(|| panic!("{}: no rollout patch in the agent's journal", m.name))
            .operation_id;
        let work = patch_op.strip_suffix(&format!("/{}/patch", names[i])).expect("work/node/step").to_string();
        let step = |s: &str| finished_op(m, &format!("{work}/{}/{s}", names[i]));
        let steps: Vec<(Entry, i64)> = ["cordon", "drain", "patch", "reboot", "uncordon"].map(step).into();
        assert!(steps.windows(2).all(|w| w[0].1 <= w[1].1), "{}: steps out of order: {steps:#?}", m.name);
        let want = Op::ApplySecurityPatch {
            family: FAMILY.into(),
            version: PATCH_VERSION.into(),
            packages: vec![format!("{LIB}=2")],
        };
        assert_eq!(steps[2].0.op, want, "{}", m.name);
        assert_eq!(steps[3].0.op, Op::Reboot { force: true }, "{}", m.name);
        let patched = steps[2].1 as f64 / 1000.0;
        assert!(
            cordoned <= patched && patched <= uncordoned,
            "{}: patched at {patched} outside {cordoned}..{uncordoned}",
            m.name
        );
        m.wait_active(AGENT);
    }
    disjoint(out[0], out[1]);
    let nodes = poll("both nodes reporting the patch, no reboot required", Duration::from_secs(30), || {
        let nodes: Vec<Value> = names.iter().map(|n| site.node(n)).collect::<Option<_>>()?;
        nodes
            .iter()
            .all(|n| {
                n["status"] == "Ready" && n["reboot_required"] == false && n["security_patch_version"] == PATCH_VERSION
            })
            .then_some(nodes)
    });
    for n in &nodes {
        assert_eq!(n["channel"], "SecurityPatch", "{n:#}");
    }
    assert!(site.leases().is_empty(), "leases left: {:#?}", site.leases());
    let hub_log = site.hub_log();
    let grants: Vec<&str> = hub_log
        .lines()
        .filter(|l| l.contains("lease granted") && l.contains(&format!("holder=\"{rollout_holder}\"")))
        .collect();
    for n in names {
        assert!(grants.iter().any(|l| l.contains(&format!("node={n} "))), "no rollout lease for {n}: {grants:#?}");
    }
    eprintln!("hub log, rollout lease grants:\n{}", grants.join("\n"));
    let shown: Vec<String> = nodes
        .iter()
        .map(|n| {
            format!(
                "{} channel={} security_patch_version={} node_image_version={} reboot_required={}",
                n["name"], n["channel"], n["security_patch_version"], n["node_image_version"], n["reboot_required"]
            )
        })
        .collect();
    eprintln!("SecurityPatch reboots: {out:?} (unix seconds cordoned..uncordoned); nodes after: {shown:#?}");
    eprintln!("test body: {} s", started.elapsed().as_secs());
    let t = Instant::now();
    drop(n2);
    drop(n1);
    eprintln!("power-off of both nodes: {} s", t.elapsed().as_secs());
}
