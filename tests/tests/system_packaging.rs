//! System tests for packaging and service management (issue 6), on a real systemd: the .deb of each daemon
//! installed into a booted Debian 12 container (systemd-nspawn), configured, started, upgraded, stopped,
//! removed and purged; `systemd-analyze verify` and `security` on the installed units; the .rpm packages
//! installed with `dnf --installroot` from a local repository.
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
use upkeep_tests::{TestHub, TestPki, upkeepctl_json};

const AGENT: &str = "upkeep-agent.service";
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

    // Install (an older version first, to upgrade from it later): enabled, skipped until configured.
    let old_in = c.push_package(&old);
    c.ok(&["dpkg", "-i", &old_in]);
    assert_eq!(installed_version(&c, "upkeep-agent"), "0.0.9-1");
    assert_eq!(c.unit_property(AGENT, "UnitFileState"), "enabled");
    assert_eq!(c.unit_property(AGENT, "ConditionResult"), "no", "unconfigured agent must be skipped, not failed");
    let owned = c.ok(&["dpkg", "-L", "upkeep-agent"]);
    assert!(owned.lines().any(|l| l == "/usr/lib/systemd/system/upkeep-agent.service"), "{owned}");
    assert!(c.path("/usr/lib/upkeep/agent.d/10-defaults.toml").is_file());
    assert!(c.path("/var/lib/upkeep/agent").is_dir(), "postinst creates the state directory");

    // Configure as an operator would, then start.
    let config = format!(
        "hub = \"{}\"\nmember = \"prod-eu-1\"\nnode_pool = \"system\"\nregion = \"eu-west\"\n\
         state_dir = \"/var/lib/upkeep/agent\"\n[tls]\nca = \"/etc/upkeep/pki/ca.pem\"\n\
         cert = \"/etc/upkeep/pki/node.pem\"\nkey = \"/etc/upkeep/pki/node.key\"\n",
        hub.url()
    );
    write(&c.path("/etc/upkeep/agent.toml"), &config, 0o644);
    write(&c.path("/etc/upkeep/pki/ca.pem"), &std::fs::read_to_string(pki.file(files::CA_CERT)).expect("ca"), 0o644);
    write(&c.path("/etc/upkeep/pki/node.pem"), &std::fs::read_to_string(&cert).expect("cert"), 0o644);
    write(&c.path("/etc/upkeep/pki/node.key"), &std::fs::read_to_string(&key).expect("key"), 0o600);
    c.ok(&["systemctl", "restart", AGENT]);
    c.wait_active(AGENT);

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

    // Upgrade: configuration and state survive, the daemon is restarted once on the new binary.
    write(&c.path("/var/lib/upkeep/agent/operator-marker"), "keep me\n", 0o600);
    let state_before: Vec<String> = list(&c.path("/var/lib/upkeep/agent"));
    assert!(state_before.len() > 1, "the agent persisted nothing: {state_before:?}");
    let invocation_before = c.unit_property(AGENT, "InvocationID");
    let new_in = c.push_package(&new);
    c.ok(&["dpkg", "-i", &new_in]);
    assert_eq!(installed_version(&c, "upkeep-agent"), deb_version(&new));
    assert_eq!(std::fs::read_to_string(c.path("/etc/upkeep/agent.toml")).expect("agent.toml"), config);
    assert_eq!(list(&c.path("/var/lib/upkeep/agent")), state_before, "upgrade touched the state");
    c.wait_active(AGENT);
    assert_ne!(c.unit_property(AGENT, "InvocationID"), invocation_before, "upgrade did not restart the agent");

    verify_unit(&c, AGENT);
    let exposure = c.exposure(AGENT);
    println!("systemd-analyze security {AGENT}: {exposure}");
    let score: f64 = exposure.parse().expect("exposure is a number");
    assert!(score <= 6.5, "agent unit exposure regressed to {score}");

    stop_cleanly(&c, AGENT);

    // Remove keeps state and configuration; purge deletes the state.
    c.ok(&["dpkg", "-r", "upkeep-agent"]);
    assert!(!c.path("/usr/bin/upkeep-agent").exists());
    assert!(c.path("/var/lib/upkeep/agent/operator-marker").is_file(), "dpkg -r deleted state");
    assert!(c.path("/etc/upkeep/agent.toml").is_file(), "dpkg -r deleted the operator's configuration");
    c.ok(&["dpkg", "--purge", "upkeep-agent"]);
    assert!(!c.path("/var/lib/upkeep").exists(), "dpkg --purge left /var/lib/upkeep");
    assert!(c.path("/etc/upkeep/agent.toml").is_file(), "purge must not delete files the operator wrote");
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
        "usr/lib/systemd/system/upkeep-hub.service",
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
    assert!(root.join("var/lib/upkeep/agent").is_dir());
    assert!(root.join("var/lib/upkeep/hub").is_dir());
    for unit in [AGENT, HUB] {
        let link = root.join("etc/systemd/system/multi-user.target.wants").join(unit);
        assert!(link.is_symlink(), "%post did not enable {unit}");
    }

    // Erase: files and enablement go, state stays (RPM has no purge).
    std::fs::write(root.join("var/lib/upkeep/agent/marker"), "keep").expect("marker");
    dnf(&["remove", "upkeep-agent"]);
    assert!(!root.join("usr/bin/upkeep-agent").exists());
    assert!(!root.join("etc/systemd/system/multi-user.target.wants").join(AGENT).exists());
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
    // binaries, since `systemd-analyze verify` insists they exist.
    require_prerequisites();
    let dir = tempfile::tempdir().expect("tempdir");
    let bin_dir = upkeep_tests::bin("upkeep-agent").parent().expect("bin dir").to_path_buf();
    let mut checked = 0;
    for entry in std::fs::read_dir(workspace().join("systemd")).expect("systemd/") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "service") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("unit");
        let unit = dir.path().join(path.file_name().expect("name"));
        std::fs::write(&unit, text.replace("/usr/bin/", &format!("{}/", bin_dir.display()))).expect("write");
        let out = Command::new("systemd-analyze").arg("verify").arg(&unit).output().expect("systemd-analyze");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && stderr.trim().is_empty(), "{}: {stderr}", path.display());
        checked += 1;
    }
    assert_eq!(checked, 2, "expected the agent and hub units in systemd/");
}
