//! System tests for packaging and service management (issue 6), on a real systemd: the .deb of each daemon
//! installed into a booted Debian 12 container (systemd-nspawn), configured, started, upgraded, stopped,
//! removed and purged; `systemd-analyze verify` and `security` on the installed units; the .rpm packages
//! installed with `dnf --installroot` from a local repository.
//!
//! The agent runs privilege-separated (issue 15): the network half as the user upkeep-agent without
//! capabilities, the executor as root behind a socket; the agent test checks both processes, what the
//! network half can write, that the hub's channel change is carried out by the executor, and the upgrade from
//! the single-process agent's root-owned state and key pair.
//!
//! They need root and the tools `scripts/deps` installs; a missing prerequisite fails the test with the fix.
//! Packages come from the debug build (`scripts/package --profile dev --no-build`), so these tests add no
//! compile of their own; `scripts/test` builds the binaries first.

use std::path::Path;
use std::process::Command;
use std::time::Duration;
use upkeep_hub::pki::files;
use upkeep_tests::system::{
    Container, build_packages, free_port, pick, poll, require_prerequisites, run_ok, workspace,
};
use upkeep_tests::{TestHub, TestPki, upkeepctl, upkeepctl_json};

const AGENT: &str = "upkeep-agent.service";
const EXECUTOR: &str = "upkeep-agent-executor.service";
const EXECUTOR_SOCKET: &str = "upkeep-agent-executor.socket";
/// Every unit the agent package ships: the network half, the executor and the executor's socket.
const AGENT_UNITS: [&str; 3] = [AGENT, EXECUTOR, EXECUTOR_SOCKET];
const HUB: &str = "upkeep-hub.service";

fn deb_version(deb: &Path) -> String {
    let out = run_ok(Command::new("dpkg-deb").arg("--field").arg(deb).arg("Version"));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn installed_version(c: &Container, package: &str) -> String {
    c.ok(&["dpkg-query", "-W", "-f", "${Version}", package])
}

fn write(path: &Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// `systemd-analyze verify` of the installed unit: exit 0 and not one warning about the unit itself.
fn verify_unit(c: &Container, unit: &str) {
    let path = format!("/usr/lib/systemd/system/{unit}");
    let out = c.exec(&["systemd-analyze", "verify", &path]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify {unit} failed:\n{stderr}");
    let about_unit: Vec<&str> = stderr.lines().filter(|l| l.contains(unit)).collect();
    assert!(about_unit.is_empty(), "systemd-analyze verify warns about {unit}:\n{}", about_unit.join("\n"));
}

/// Stops `unit` and checks it went down cleanly: exit 0, result success, the daemon logged its shutdown.
fn stop_cleanly(c: &Container, unit: &str) {
    let invocation = c.unit_property(unit, "InvocationID");
    c.ok(&["systemctl", "stop", unit]);
    assert_eq!(c.unit_property(unit, "ActiveState"), "inactive");
    assert_eq!(c.unit_property(unit, "Result"), "success", "{}", c.journal_text(unit));
    assert_eq!(c.unit_property(unit, "ExecMainStatus"), "0", "{}", c.journal_text(unit));
    let said_goodbye = c.journal(unit).iter().any(|e| {
        e["MESSAGE"].as_str() == Some("shutting down") && e["_SYSTEMD_INVOCATION_ID"].as_str() == Some(&invocation)
    });
    assert!(said_goodbye, "{unit} stopped without logging its shutdown:\n{}", c.journal_text(unit));
}

/// `stat -c FORMAT path` inside the container.
fn stat(c: &Container, format: &str, path: &str) -> String {
    c.ok(&["stat", "-c", format, path]).trim().to_string()
}

/// The value of a `Name:` line of `/proc/<pid>/status` inside the container (first field for Uid/Gid: the
/// real id).
fn proc_status(c: &Container, pid: &str, field: &str) -> String {
    let status = c.ok(&["cat", &format!("/proc/{pid}/status")]);
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status:\n{status}"))
        .to_string()
}

/// Runs `script` with `sh -c` in the mount namespace of process `pid`, as `uid`:`gid` (what that service could
/// do to the file system); true if it succeeded.
fn as_service(c: &Container, pid: &str, uid: &str, gid: &str, script: &str) -> bool {
    let out = c.exec(&["nsenter", "-t", pid, "-m", "-S", uid, "-G", gid, "--", "sh", "-c", script]);
    println!(
        "as uid {uid} in the mount namespace of {pid}: {script}: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out.status.success()
}

#[test]
fn agent_deb_installs_runs_under_systemd_upgrades_and_purges() {
    require_prerequisites();
    let work = tempfile::tempdir().expect("tempdir");
    let old = pick(&build_packages("upkeep-agent", "deb", &work.path().join("old"), Some("0.0.9")), ".deb");
    let new = pick(&build_packages("upkeep-agent", "deb", &work.path().join("new"), None), ".deb");
    assert_eq!(deb_version(&old), "0.0.9-1");

    // A hub on the host: the container shares the host's loopback.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let pki = TestPki::new();
    let (cert, key) = pki.node("node-01");
    let hub = rt.block_on(TestHub::start(&pki, &work.path().join("hub"), "127.0.0.1:0".parse().expect("addr")));

    let c = Container::boot("upkeep-agent-sys");

    // Install (an older version first, to upgrade from it later): the user, three units enabled, all skipped
    // until configured.
    let old_in = c.push_package(&old);
    c.ok(&["dpkg", "-i", &old_in]);
    assert_eq!(installed_version(&c, "upkeep-agent"), "0.0.9-1");
    let owned = c.ok(&["dpkg", "-L", "upkeep-agent"]);
    for unit in AGENT_UNITS {
        assert!(owned.lines().any(|l| l == format!("/usr/lib/systemd/system/{unit}")), "{unit} not shipped:\n{owned}");
        assert_eq!(c.unit_property(unit, "UnitFileState"), "enabled", "{unit}");
    }
    assert!(owned.lines().any(|l| l == "/usr/lib/sysusers.d/upkeep-agent.conf"), "{owned}");
    assert_eq!(c.unit_property(AGENT, "ConditionResult"), "no", "unconfigured agent must be skipped, not failed");
    let uid = c.ok(&["id", "-u", "upkeep-agent"]).trim().to_string();
    let gid = c.ok(&["id", "-g", "upkeep-agent"]).trim().to_string();
    assert_ne!(uid, "0");
    assert!(c.path("/usr/lib/upkeep/agent.d/10-defaults.toml").is_file());
    assert_eq!(stat(&c, "%a %U %G", "/var/lib/upkeep/agent"), "700 upkeep-agent upkeep-agent", "postinst");
    assert_eq!(stat(&c, "%a %U %G", "/etc/upkeep/pki"), "1770 root upkeep-agent", "postinst");

    // Configure as an operator would (packaging/README.md: the key pair, copied by hand, is given to the agent's
    // user; `upkeep-agent join` does that itself), then start.
    let config = format!(
        "hub = \"{}\"\nmember = \"prod-eu-1\"\nnode_pool = \"system\"\nregion = \"eu-west\"\n\
         state_dir = \"/var/lib/upkeep/agent\"\n[tls]\nca = \"/etc/upkeep/pki/ca.pem\"\n\
         cert = \"/etc/upkeep/pki/node.pem\"\nkey = \"/etc/upkeep/pki/node.key\"\n",
        hub.url()
    );
    let ca_text = std::fs::read_to_string(pki.file(files::CA_CERT)).expect("ca");
    write(&c.path("/etc/upkeep/agent.toml"), &config, 0o644);
    write(&c.path("/etc/upkeep/pki/ca.pem"), &ca_text, 0o644);
    write(&c.path("/etc/upkeep/pki/node.pem"), &std::fs::read_to_string(&cert).expect("cert"), 0o644);
    write(&c.path("/etc/upkeep/pki/node.key"), &std::fs::read_to_string(&key).expect("key"), 0o600);
    c.ok(&["chown", "upkeep-agent:upkeep-agent", "/etc/upkeep/pki/node.pem", "/etc/upkeep/pki/node.key"]);
    c.ok(&["systemctl", "restart", AGENT]);
    c.wait_active(AGENT);
    // The network half's first request starts the executor through its socket.
    c.wait_active(EXECUTOR);

    // Two processes: the network half as upkeep-agent without any capability, the executor as root, and the
    // socket between them reachable by root and the upkeep-agent group only.
    let agent_pid = c.unit_property(AGENT, "MainPID");
    assert_eq!(proc_status(&c, &agent_pid, "Uid"), uid, "the network half must not run as root");
    assert_eq!(proc_status(&c, &agent_pid, "Gid"), gid);
    for caps in ["CapEff", "CapPrm", "CapBnd", "CapAmb"] {
        assert_eq!(proc_status(&c, &agent_pid, caps), "0000000000000000", "{caps} of the network half");
    }
    let executor_pid = c.unit_property(EXECUTOR, "MainPID");
    assert_ne!(executor_pid, agent_pid);
    assert_eq!(proc_status(&c, &executor_pid, "Uid"), "0", "the executor runs as root");
    let cmdline = c.ok(&["cat", &format!("/proc/{executor_pid}/cmdline")]).replace('\0', " ");
    assert!(cmdline.trim_end().ends_with(" executor"), "{cmdline}");
    assert_eq!(stat(&c, "%F %a %U %G", "/run/upkeep-agent/executor.sock"), "socket 660 root upkeep-agent");

    // READY came with a STATUS, and the watchdog is being pinged.
    assert!(c.unit_property(AGENT, "StatusText").contains("node node-01"), "STATUS= not sent");
    poll("a watchdog ping from the agent", Duration::from_secs(20), || {
        (c.unit_property(AGENT, "WatchdogTimestampMonotonic") != "0").then_some(())
    });

    // Its log lines are in the journal with their fields, and the hub knows the node.
    let started = c.wait_journal_message(AGENT, "upkeep-agent started");
    assert_eq!(started["NODE"], "node-01", "{started}");
    assert_eq!(started["MEMBER"], "prod-eu-1", "{started}");
    assert_eq!(started["SYSLOG_IDENTIFIER"], "upkeep-agent", "{started}");
    let registered = c.wait_journal_message(AGENT, "registered with hub");
    assert_eq!(registered["NODE"], "node-01", "{registered}");
    assert_eq!(registered["PRIORITY"], "5", "info maps to notice in tracing-journald: {registered}");
    let nodes = rt.block_on(async {
        upkeep_tests::wait_for("the hub to list node-01", Duration::from_secs(30), || async {
            let v = upkeepctl_json(&pki, &hub.url(), &["node", "list"]).await.ok()?;
            v.to_string().contains("node-01").then_some(v)
        })
        .await
    });
    assert!(nodes.to_string().contains("prod-eu-1"), "{nodes}");

    // A channel change from the hub is put in force on the node: apt's drop-in, which only root can write, is
    // written by the executor (NodeImage, the default: apt's own upgrades off; Unmanaged: on).
    let apt_conf = "/etc/apt/apt.conf.d/52upkeep-channel";
    let apt_conf_says = |want: &str| {
        poll(&format!("{apt_conf} to hold {want}"), Duration::from_secs(60), || {
            std::fs::read_to_string(c.path(apt_conf)).ok().filter(|t| t.contains(want))
        })
    };
    apt_conf_says("APT::Periodic::Unattended-Upgrade \"0\";");
    let out =
        rt.block_on(upkeepctl(&pki, &hub.url(), "operator", &["member", "set-channel", "prod-eu-1", "Unmanaged"]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    apt_conf_says("APT::Periodic::Unattended-Upgrade \"1\";");
    assert_eq!(stat(&c, "%U", apt_conf), "root");
    rt.block_on(async {
        upkeep_tests::wait_for("node-01 to report Unmanaged", Duration::from_secs(30), || async {
            let n = upkeepctl_json(&pki, &hub.url(), &["node", "show", "node-01"]).await.ok()?;
            (n["channel"] == "Unmanaged").then_some(())
        })
        .await
    });
    // A security patch recorded behind the agent's back, then removed: the executor sees each change (inotify,
    // under its unit's sandbox) and pushes the facts; the network half reports them without asking.
    let patch_reported = |want: &'static str| {
        rt.block_on(async {
            upkeep_tests::wait_for(&format!("node-01 to report patch {want:?}"), Duration::from_secs(30), || async {
                let n = upkeepctl_json(&pki, &hub.url(), &["node", "show", "node-01"]).await.ok()?;
                (n["security_patch_version"] == want).then_some(())
            })
            .await
        })
    };
    write(&c.path("/etc/upkeep/security-patch"), "202611.30.7\n", 0o644);
    patch_reported("202611.30.7");
    std::fs::remove_file(c.path("/etc/upkeep/security-patch")).expect("remove the patch marker");
    patch_reported("");

    // What the network half can write: its state directory (so the probe below can write at all), not the
    // system, and in /etc/upkeep/pki nothing it does not own.
    assert!(as_service(&c, &agent_pid, &uid, &gid, "echo x > /var/lib/upkeep/agent/probe"), "state dir not writable");
    assert_eq!(stat(&c, "%U", "/var/lib/upkeep/agent/probe"), "upkeep-agent");
    std::fs::remove_file(c.path("/var/lib/upkeep/agent/probe")).expect("remove probe");
    for probe in ["/usr/upkeep-probe", "/etc/upkeep-probe", "/etc/upkeep/agent.d/upkeep-probe.toml"] {
        assert!(
            !as_service(&c, &agent_pid, &uid, &gid, &format!("echo x > {probe}")),
            "the network half wrote {probe}"
        );
        assert!(!c.path(probe).exists(), "{probe} exists");
    }
    // Those are closed to the user anyway; a directory the user owns is closed only by the sandbox
    // (ProtectSystem=strict): writable from the container's own mount namespace, not from the service's.
    c.ok(&["install", "-d", "-o", "upkeep-agent", "-g", "upkeep-agent", "/srv/agent-owned"]);
    assert!(as_service(&c, "1", &uid, &gid, "echo x > /srv/agent-owned/outside"), "control write failed");
    assert!(!as_service(&c, &agent_pid, &uid, &gid, "echo x > /srv/agent-owned/inside"), "sandbox let it write");
    assert!(!c.path("/srv/agent-owned/inside").exists());
    let replaced = as_service(
        &c,
        &agent_pid,
        &uid,
        &gid,
        "echo x > /etc/upkeep/pki/probe.tmp && mv -f /etc/upkeep/pki/probe.tmp /etc/upkeep/pki/ca.pem",
    );
    assert!(!replaced, "the network half replaced ca.pem");
    assert_eq!(std::fs::read_to_string(c.path("/etc/upkeep/pki/ca.pem")).expect("ca.pem"), ca_text);
    let _ = std::fs::remove_file(c.path("/etc/upkeep/pki/probe.tmp"));
    // ... but it may replace its own key, as renewal does (written aside, renamed over).
    assert!(as_service(
        &c,
        &agent_pid,
        &uid,
        &gid,
        "cp /etc/upkeep/pki/node.key /etc/upkeep/pki/node.key.next && mv -f /etc/upkeep/pki/node.key.next /etc/upkeep/pki/node.key"
    ));

    // Upgrade from what the single-process agent left: its state, key pair and PKI directory all root's. The
    // package scripts and StateDirectory= give them to upkeep-agent; configuration and state survive, and the
    // units run again on the new binary.
    write(&c.path("/var/lib/upkeep/agent/operator-marker"), "keep me\n", 0o600);
    let state_before: Vec<String> = list(&c.path("/var/lib/upkeep/agent"));
    assert!(state_before.len() > 1, "the agent persisted nothing: {state_before:?}");
    c.ok(&["systemctl", "stop", AGENT, EXECUTOR]);
    c.ok(&["chown", "-R", "root:root", "/var/lib/upkeep/agent", "/etc/upkeep/pki"]);
    c.ok(&["chmod", "0750", "/etc/upkeep/pki"]);
    let invocation_before = c.unit_property(AGENT, "InvocationID");
    let new_in = c.push_package(&new);
    c.ok(&["dpkg", "-i", &new_in]);
    assert_eq!(installed_version(&c, "upkeep-agent"), deb_version(&new));
    assert_eq!(std::fs::read_to_string(c.path("/etc/upkeep/agent.toml")).expect("agent.toml"), config);
    assert_eq!(list(&c.path("/var/lib/upkeep/agent")), state_before, "upgrade touched the state");
    c.wait_active(AGENT);
    assert_ne!(c.unit_property(AGENT, "InvocationID"), invocation_before, "upgrade did not restart the agent");
    c.wait_active(EXECUTOR);
    let not_its = c.ok(&[
        "find",
        "/var/lib/upkeep/agent",
        "(",
        "!",
        "-user",
        "upkeep-agent",
        "-o",
        "!",
        "-group",
        "upkeep-agent",
        ")",
    ]);
    assert!(not_its.trim().is_empty(), "state not given to upkeep-agent:\n{not_its}");
    assert_eq!(stat(&c, "%a %U %G", "/etc/upkeep/pki"), "1770 root upkeep-agent");
    assert_eq!(stat(&c, "%U %G", "/etc/upkeep/pki/node.key"), "upkeep-agent upkeep-agent");
    assert_eq!(stat(&c, "%U %G", "/etc/upkeep/pki/node.pem"), "upkeep-agent upkeep-agent");
    assert_eq!(stat(&c, "%U", "/etc/upkeep/pki/ca.pem"), "root", "ca.pem stays root's");
    let registrations =
        || c.journal(AGENT).iter().filter(|e| e["MESSAGE"].as_str() == Some("registered with hub")).count();
    poll("the upgraded agent to register", Duration::from_secs(60), || (registrations() >= 2).then_some(()));

    // `upkeep-agent join`, run by root on a node that has the user: it gives the new key pair to upkeep-agent
    // and says so, and the network half runs with it.
    let token = rt.block_on(upkeep_tests::upkeepctl_ok(
        &pki,
        &hub.url(),
        &["pki", "token", "create", "--member", "prod-eu-1", "--pool", "system"],
    ));
    let token = token.lines().next().expect("token line").to_string();
    let fingerprint = upkeep_hub::pki::fingerprint_pem(&ca_text).expect("fingerprint");
    c.ok(&["rm", "/etc/upkeep/pki/node.key", "/etc/upkeep/pki/node.pem"]);
    let said = c.ok(&[
        "upkeep-agent",
        "join",
        "--hub",
        &hub.url(),
        "--token",
        &token,
        "--ca-fingerprint",
        &fingerprint,
        "--name",
        "node-01",
    ]);
    assert!(said.contains("gave /etc/upkeep/pki/node.key to upkeep-agent"), "{said}");
    assert!(said.contains("gave /etc/upkeep/pki/node.pem to upkeep-agent"), "{said}");
    assert_eq!(stat(&c, "%a %U %G", "/etc/upkeep/pki/node.key"), "600 upkeep-agent upkeep-agent");
    assert_eq!(stat(&c, "%U %G", "/etc/upkeep/pki/node.pem"), "upkeep-agent upkeep-agent");
    assert_eq!(stat(&c, "%a %U %G", "/etc/upkeep/pki"), "1770 root upkeep-agent");
    let before = registrations();
    c.ok(&["systemctl", "restart", AGENT]);
    c.wait_active(AGENT);
    poll("the agent to register with the joined key", Duration::from_secs(60), || {
        (registrations() > before).then_some(())
    });

    for unit in AGENT_UNITS {
        verify_unit(&c, unit);
    }
    let exposure = c.exposure(AGENT);
    println!("systemd-analyze security {AGENT}: {exposure}");
    let score: f64 = exposure.parse().expect("exposure is a number");
    assert!(score <= 2.0, "network half unit exposure regressed to {score}");
    let exposure = c.exposure(EXECUTOR);
    println!("systemd-analyze security {EXECUTOR}: {exposure}");
    let score: f64 = exposure.parse().expect("exposure is a number");
    assert!(score <= 6.5, "executor unit exposure regressed to {score}");

    stop_cleanly(&c, AGENT);
    c.ok(&["systemctl", "stop", EXECUTOR]);
    assert_eq!(c.unit_property(EXECUTOR, "Result"), "success", "{}", c.journal_text(EXECUTOR));

    // Remove keeps state and configuration; purge deletes the state and every unit, with its enablement.
    c.ok(&["dpkg", "-r", "upkeep-agent"]);
    assert!(!c.path("/usr/bin/upkeep-agent").exists());
    assert!(c.path("/var/lib/upkeep/agent/operator-marker").is_file(), "dpkg -r deleted state");
    assert!(c.path("/etc/upkeep/agent.toml").is_file(), "dpkg -r deleted the operator's configuration");
    c.ok(&["dpkg", "--purge", "upkeep-agent"]);
    assert!(!c.path("/var/lib/upkeep").exists(), "dpkg --purge left /var/lib/upkeep");
    assert!(c.path("/etc/upkeep/agent.toml").is_file(), "purge must not delete files the operator wrote");
    for unit in AGENT_UNITS {
        assert!(!c.path(&format!("/usr/lib/systemd/system/{unit}")).exists(), "purge left {unit}");
        assert_eq!(c.unit_property(unit, "LoadState"), "not-found", "{unit} still known to systemd");
    }
    let links = c.ok(&["find", "/etc/systemd/system", "-name", "upkeep-agent*"]);
    assert!(links.trim().is_empty(), "purge left unit links:\n{links}");
    drop(c);
    rt.block_on(async move {
        let mut hub = hub;
        hub.stop().await;
    });
}

fn list(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn hub_deb_runs_sandboxed_as_upkeep_upgrades_and_purges() {
    require_prerequisites();
    let work = tempfile::tempdir().expect("tempdir");
    let old = pick(&build_packages("upkeep-hub", "deb", &work.path().join("old"), Some("0.0.9")), ".deb");
    let new = pick(&build_packages("upkeep-hub", "deb", &work.path().join("new"), None), ".deb");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let pki = TestPki::new();
    let port = free_port();

    let c = Container::boot("upkeep-hub-sys");
    let old_in = c.push_package(&old);
    c.ok(&["dpkg", "-i", &old_in]);
    assert_eq!(installed_version(&c, "upkeep-hub"), "0.0.9-1");
    assert_eq!(c.unit_property(HUB, "UnitFileState"), "enabled");
    assert_eq!(c.unit_property(HUB, "ConditionResult"), "no", "unconfigured hub must be skipped, not failed");
    let uid = c.ok(&["id", "-u", "upkeep"]).trim().to_string();
    assert_ne!(uid, "0");
    assert!(c.path("/usr/lib/sysusers.d/upkeep-hub.conf").is_file());
    assert!(c.path("/usr/bin/upkeepctl").is_file(), "upkeepctl ships with the hub");
    c.ok(&["upkeepctl", "--version"]);

    // Configure: the hub key readable by the upkeep group only.
    let config = format!(
        "listen = \"127.0.0.1:{port}\"\nstate_dir = \"/var/lib/upkeep/hub\"\n[tls]\nca = \"/etc/upkeep/pki/ca.pem\"\n\
         cert = \"/etc/upkeep/pki/hub.pem\"\nkey = \"/etc/upkeep/pki/hub.key\"\n"
    );
    write(&c.path("/etc/upkeep/hub.toml"), &config, 0o644);
    for (name, mode) in [(files::CA_CERT, 0o644), (files::HUB_CERT, 0o644), (files::HUB_KEY, 0o640)] {
        let text = std::fs::read_to_string(pki.file(name)).expect("pki file");
        write(&c.path(&format!("/etc/upkeep/pki/{name}")), &text, mode);
    }
    c.ok(&["chgrp", "upkeep", "/etc/upkeep/pki/hub.key"]);
    c.ok(&["systemctl", "restart", HUB]);
    c.wait_active(HUB);

    // It runs as `upkeep`, announced READY with a STATUS, pings the watchdog and logs with fields.
    let pid = c.unit_property(HUB, "MainPID");
    let status = c.ok(&["cat", &format!("/proc/{pid}/status")]);
    let real_uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|l| l.split_whitespace().next());
    assert_eq!(real_uid, Some(uid.as_str()), "the hub must not run as root");
    assert!(c.unit_property(HUB, "StatusText").contains(&format!("listening on 127.0.0.1:{port}")));
    poll("a watchdog ping from the hub", Duration::from_secs(20), || {
        (c.unit_property(HUB, "WatchdogTimestampMonotonic") != "0").then_some(())
    });
    let listening = c.wait_journal_message(HUB, "upkeep-hub listening (mTLS only)");
    assert_eq!(listening["ADDR"], format!("127.0.0.1:{port}"), "{listening}");
    assert_eq!(listening["SYSLOG_IDENTIFIER"], "upkeep-hub", "{listening}");

    // It serves: upkeepctl from the host over mTLS.
    let url = format!("https://127.0.0.1:{port}");
    let listed = rt.block_on(async {
        upkeep_tests::wait_for("the packaged hub to answer upkeepctl", Duration::from_secs(30), || async {
            upkeepctl_json(&pki, &url, &["node", "list"]).await.ok()
        })
        .await
    });
    assert!(listed.is_array() || listed.is_object(), "{listed}");
    assert!(c.path("/var/lib/upkeep/hub/hub.db").is_file(), "{:?}", list(&c.path("/var/lib/upkeep/hub")));

    // Upgrade keeps configuration and the database, and restarts the hub.
    let invocation_before = c.unit_property(HUB, "InvocationID");
    let new_in = c.push_package(&new);
    c.ok(&["dpkg", "-i", &new_in]);
    assert_eq!(installed_version(&c, "upkeep-hub"), deb_version(&new));
    assert_eq!(std::fs::read_to_string(c.path("/etc/upkeep/hub.toml")).expect("hub.toml"), config);
    assert!(c.path("/var/lib/upkeep/hub/hub.db").is_file(), "upgrade lost the database");
    c.wait_active(HUB);
    assert_ne!(c.unit_property(HUB, "InvocationID"), invocation_before, "upgrade did not restart the hub");

    verify_unit(&c, HUB);
    let exposure = c.exposure(HUB);
    println!("systemd-analyze security {HUB}: {exposure}");
    let score: f64 = exposure.parse().expect("exposure is a number");
    assert!(score <= 2.0, "hub unit exposure regressed to {score}");

    stop_cleanly(&c, HUB);

    c.ok(&["dpkg", "-r", "upkeep-hub"]);
    assert!(!c.path("/usr/bin/upkeep-hub").exists());
    assert!(c.path("/var/lib/upkeep/hub/hub.db").is_file(), "dpkg -r deleted the database");
    assert!(c.path("/etc/upkeep/hub.toml").is_file());
    c.ok(&["dpkg", "--purge", "upkeep-hub"]);
    assert!(!c.path("/var/lib/upkeep").exists(), "dpkg --purge left /var/lib/upkeep");
}

#[test]
fn rpms_install_with_dnf_installroot_from_a_local_repo() {
    require_prerequisites();
    let work = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let repo = work.path().join("repo");
    let mut rpms = Vec::new();
    for package in ["upkeep-agent", "upkeep-hub"] {
        let files = build_packages(package, "rpm", &work.path().join(package), None);
        let rpm = pick(&files, ".rpm");
        std::fs::create_dir_all(&repo).expect("mkdir repo");
        std::fs::copy(&rpm, repo.join(rpm.file_name().expect("name"))).expect("copy rpm");
        rpms.push(rpm);
    }

    // No RPM distribution is reachable: the install root is the Debian tree (it has /bin/sh, coreutils and an
    // offline systemctl for the scriptlets), and a stand-in package provides what our packages require.
    let mut requires = Vec::new();
    for rpm in &rpms {
        let out = run_ok(Command::new("rpm").args(["-qp", "--requires"]).arg(rpm));
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let cap = line.split_whitespace().next().unwrap_or_default().to_string();
            if !cap.is_empty() && !cap.starts_with("rpmlib(") && !requires.contains(&cap) {
                requires.push(cap);
            }
        }
    }
    build_base_rpm(work.path(), &repo, &requires);
    run_ok(Command::new("createrepo_c").arg("--quiet").arg(&repo));

    let root = work.path().join("root");
    std::fs::create_dir(&root).expect("mkdir root");
    let tarball = upkeep_tests::system::rootfs_tarball();
    run_ok(Command::new("sh").arg("-c").arg(format!(
        "zstd -dc '{}' | tar -C '{}' --numeric-owner -xf -",
        tarball.display(),
        root.display()
    )));
    let dnf = |args: &[&str]| {
        run_ok(
            Command::new("dnf")
                .arg("-y")
                .arg("-q")
                .arg(format!("--installroot={}", root.display()))
                .args([
                    "--releasever=40",
                    "--disablerepo=*",
                    "--setopt=local.gpgcheck=0",
                    "--setopt=install_weak_deps=0",
                ])
                .arg(format!("--repofrompath=local,file://{}", repo.display()))
                .args(args),
        )
    };
    dnf(&["install", "upkeep-test-base", "upkeep-agent", "upkeep-hub"]);

    // Files in place.
    for f in [
        "usr/bin/upkeep-agent",
        "usr/bin/upkeep-hub",
        "usr/bin/upkeepctl",
        "usr/lib/systemd/system/upkeep-agent.service",
        "usr/lib/systemd/system/upkeep-agent-executor.service",
        "usr/lib/systemd/system/upkeep-agent-executor.socket",
        "usr/lib/systemd/system/upkeep-hub.service",
        "usr/lib/sysusers.d/upkeep-agent.conf",
        "usr/lib/sysusers.d/upkeep-hub.conf",
        "usr/lib/upkeep/agent.d/10-defaults.toml",
        "usr/lib/upkeep/hub.d/10-defaults.toml",
    ] {
        assert!(root.join(f).is_file(), "{f} not installed");
    }
    // Scriptlets in place and run: user, directories, enabled units.
    let rpm_root = format!("--root={}", root.display());
    let scripts = run_ok(Command::new("rpm").args([rpm_root.as_str(), "-q", "--scripts", "upkeep-agent"]));
    let scripts = String::from_utf8_lossy(&scripts.stdout);
    for part in ["postinstall scriptlet", "preuninstall scriptlet", "postuninstall scriptlet"] {
        assert!(scripts.contains(part), "upkeep-agent lacks its {part}:\n{scripts}");
    }
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).expect("passwd");
    assert!(passwd.lines().any(|l| l.starts_with("upkeep:")), "hub %pre did not create the upkeep user");
    let agent_user =
        passwd.lines().find(|l| l.starts_with("upkeep-agent:")).expect("agent %pre did not create upkeep-agent");
    let agent_uid: u32 = agent_user.split(':').nth(2).and_then(|u| u.parse().ok()).expect("uid");
    assert_ne!(agent_uid, 0);
    assert!(root.join("var/lib/upkeep/agent").is_dir());
    assert!(root.join("var/lib/upkeep/hub").is_dir());
    {
        use std::os::unix::fs::MetadataExt;
        let state = std::fs::metadata(root.join("var/lib/upkeep/agent")).expect("state dir");
        assert_eq!(state.uid(), agent_uid, "the agent's state directory belongs to upkeep-agent");
        // Both packages' scripts ran over one PKI directory, in whatever order: the agent's group may write
        // (sticky), the hub may pass through to its key.
        let pki_dir = std::fs::metadata(root.join("etc/upkeep/pki")).expect("pki dir");
        assert_eq!((pki_dir.uid(), pki_dir.mode() & 0o7777), (0, 0o1771), "/etc/upkeep/pki");
        let group = std::fs::read_to_string(root.join("etc/group")).expect("group");
        let agent_gid = group.lines().find(|l| l.starts_with("upkeep-agent:")).and_then(|l| l.split(':').nth(2));
        assert_eq!(Some(pki_dir.gid().to_string()).as_deref(), agent_gid, "/etc/upkeep/pki group");
    }
    for (target, unit) in [
        ("multi-user.target.wants", AGENT),
        ("multi-user.target.wants", EXECUTOR),
        ("sockets.target.wants", EXECUTOR_SOCKET),
        ("multi-user.target.wants", HUB),
    ] {
        let link = root.join("etc/systemd/system").join(target).join(unit);
        assert!(link.is_symlink(), "%post did not enable {unit}");
    }

    // Erase: files and enablement go, state stays (RPM has no purge).
    std::fs::write(root.join("var/lib/upkeep/agent/marker"), "keep").expect("marker");
    dnf(&["remove", "upkeep-agent"]);
    assert!(!root.join("usr/bin/upkeep-agent").exists());
    for (target, unit) in [
        ("multi-user.target.wants", AGENT),
        ("multi-user.target.wants", EXECUTOR),
        ("sockets.target.wants", EXECUTOR_SOCKET),
    ] {
        assert!(!root.join("etc/systemd/system").join(target).join(unit).exists(), "rpm -e left {unit} enabled");
    }
    assert!(root.join("var/lib/upkeep/agent/marker").is_file(), "rpm -e deleted the agent's state");
}

/// A noarch rpm that provides `capabilities` (and no files): stands in for the distribution in the install root.
fn build_base_rpm(work: &Path, repo: &Path, capabilities: &[String]) {
    let top = work.join("rpmbuild");
    let provides: String = capabilities.iter().map(|c| format!("Provides: {c}\n")).collect();
    let spec = format!(
        "Name: upkeep-test-base\nVersion: 1\nRelease: 1\nSummary: stand-in for a distribution in tests\n\
         License: Apache-2.0\nBuildArch: noarch\n{provides}\n%description\nProvides what upkeep packages \
         require; the files come from the Debian tree underneath.\n\n%files\n"
    );
    let spec_path = work.join("base.spec");
    std::fs::write(&spec_path, spec).expect("spec");
    run_ok(
        Command::new("rpmbuild")
            .arg("--quiet")
            .arg("--define")
            .arg(format!("_topdir {}", top.display()))
            .arg("-bb")
            .arg(&spec_path),
    );
    let built = top.join("RPMS/noarch/upkeep-test-base-1-1.noarch.rpm");
    std::fs::copy(&built, repo.join("upkeep-test-base-1-1.noarch.rpm")).expect("copy base rpm");
}

#[test]
fn units_pass_offline_verification_against_the_built_binaries() {
    // Host-side check of every unit in systemd/ (no container): ExecStart paths rewritten to the built
    // binaries, since `systemd-analyze verify` insists they exist. All units are copied first: verify loads the
    // units one names (upkeep-agent.service requires the executor's socket) from the same directory.
    require_prerequisites();
    let dir = tempfile::tempdir().expect("tempdir");
    let bin_dir = upkeep_tests::bin("upkeep-agent").parent().expect("bin dir").to_path_buf();
    let mut units = Vec::new();
    for entry in std::fs::read_dir(workspace().join("systemd")).expect("systemd/") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "service" && e != "socket") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("unit");
        let unit = dir.path().join(path.file_name().expect("name"));
        std::fs::write(&unit, text.replace("/usr/bin/", &format!("{}/", bin_dir.display()))).expect("write");
        units.push((path, unit));
    }
    let mut checked = 0;
    for (path, unit) in &units {
        let out = Command::new("systemd-analyze").arg("verify").arg(unit).output().expect("systemd-analyze");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && stderr.trim().is_empty(), "{}: {stderr}", path.display());
        checked += 1;
    }
    assert_eq!(checked, 4, "expected the agent's three units and the hub's in systemd/");
}
