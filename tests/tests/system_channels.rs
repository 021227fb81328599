//! System tests of the node OS channels and the security patch operation against real package managers (see
//! TEST-INFRA.md), through the agent's own code (`HostOs`, `hub_link::apply_channel`, the operation `Engine`):
//!
//! - Debian: a real bookworm root (the cached nspawn root of `scripts/system-rootfs` plus unattended-upgrades,
//!   cached as `bookworm-channels.tar.zst` next to it), used as a chroot. `apt-config dump` inside shows each
//!   channel's settings in force; a real `unattended-upgrade` run under `Unmanaged` upgrades a package from a
//!   local "security" origin (Origin Debian, Label Debian-Security, Codename bookworm-security) and leaves one from
//!   an ordinary origin alone; `ApplySecurityPatch` installs exactly the pinned version with apt in the chroot.
//! - dnf: an empty `--installroot` and a local repository (createrepo_c) of two versions of a tiny noarch rpm
//!   built with rpmbuild (no scriptlets and no files needing an interpreter, so the empty root needs no /bin/sh);
//!   the channel files as written, `ApplySecurityPatch` to version 2, and `dnf needs-restarting -r` answered.
//!
//! Missing prerequisites fail the tests, naming what installs them (scripts/deps).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tempfile::TempDir;
use upkeep_agent::engine::{Engine, Fetcher, Link, Submitted};
use upkeep_agent::os::NodeOs;
use upkeep_agent::os::host::HostOs;
use upkeep_core::channel::NodeOsChannel;
use upkeep_proto::v1;
use upkeep_tests::debs::{build_deb, channels_rootfs, chroot, flat_repo, installed, require_root_and};
use upkeep_tests::system::run_ok;

fn apt_config(root: &Path) -> String {
    chroot(root, &["apt-config", "dump"])
}

fn apply(os: &HostOs, ch: NodeOsChannel) -> String {
    upkeep_agent::hub_link::apply_channel(os, ch, "np1".into(), String::new()).expect("apply channel")
}

struct NoFetch;
impl Fetcher for NoFetch {
    fn open(
        &self,
        _: &str,
        _: u64,
    ) -> futures_like::BoxFuture<'_, Result<futures_like::BoxStream<'static, Result<v1::ImageChunk, String>>, String>>
    {
        Box::pin(async { Err("no downloads in this test".to_string()) })
    }
}

struct NoLink;
impl Link for NoLink {
    fn epoch(&self) -> u64 {
        0
    }
    fn restart_session(&self) {}
    fn wait_epoch_above(&self, _: u64, _: Duration) -> futures_like::BoxFuture<'_, bool> {
        Box::pin(async { false })
    }
}

/// The futures types the engine's traits use, without a direct dependency on `futures` here.
mod futures_like {
    pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
    pub type BoxStream<'a, T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = T> + Send + 'a>>;
}

/// Applies a security patch through the agent's engine over `os`, as the hub would order it.
async fn apply_patch(os: HostOs, state: &Path, id: &str, version: &str, packages: &[&str]) -> v1::OperationResult {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let engine = Engine::new(Arc::new(os), state, Arc::new(NoFetch), Arc::new(NoLink), tx, Duration::from_secs(1))
        .expect("engine");
    let c = v1::Command {
        operation_id: id.into(),
        generation: 1,
        kind: Some(v1::command::Kind::ApplySecurityPatch(v1::ApplySecurityPatch {
            family: "Debian-12".into(),
            version: version.into(),
            packages: packages.iter().map(|p| p.to_string()).collect(),
        })),
    };
    match engine.submit(&c) {
        Submitted::Finished(r) => r,
        Submitted::Running => tokio::time::timeout(Duration::from_secs(600), rx.recv())
            .await
            .expect("the patch finishes within 10 minutes")
            .expect("result"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_channels_are_in_force_and_a_security_patch_installs_with_apt() {
    require_root_and(&[
        ("chroot", "coreutils"),
        ("tar", "tar"),
        ("zstd", "zstd"),
        ("debootstrap", "debootstrap"),
        ("dpkg-deb", "dpkg"),
        ("dpkg-scanpackages", "dpkg-dev"),
        ("sha256sum", "coreutils"),
        ("systemctl", "systemd"),
    ]);
    let tarball = channels_rootfs();
    let tmp = TempDir::new().expect("tempdir");
    let root = tmp.path().join("root");
    std::fs::create_dir_all(&root).expect("mkdir");
    run_ok(Command::new("tar").arg("--zstd").arg("-xf").arg(&tarball).arg("-C").arg(&root));
    assert!(root.join("usr/bin/unattended-upgrade").is_file(), "the cached root has unattended-upgrades");

    // Local repositories inside the root: a security origin and an ordinary one; no Debian mirror (offline).
    let sec = root.join("srv/sec");
    let plain = root.join("srv/plain");
    for d in [&sec, &plain] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    for v in ["1.0", "2.0"] {
        build_deb(&sec, "upkeep-sec", v, "upkeep system-test stand-in package", false);
        build_deb(&plain, "upkeep-plain", v, "upkeep system-test stand-in package", v == "2.0");
    }
    flat_repo(&sec, "Debian", "Debian-Security", "bookworm-security");
    flat_repo(&plain, "Upkeep", "Upkeep", "upkeep-plain");
    std::fs::remove_file(root.join("etc/apt/sources.list")).expect("no mirror");
    std::fs::write(
        root.join("etc/apt/sources.list.d/upkeep-test.list"),
        "deb [trusted=yes] file:/srv/sec ./\ndeb [trusted=yes] file:/srv/plain ./\n",
    )
    .expect("sources");
    chroot(&root, &["apt-get", "-q", "update"]);
    chroot(&root, &["apt-get", "install", "-y", "-q", "upkeep-sec=1.0", "upkeep-plain=1.0"]);
    let wants = |t: &str| root.join("etc/systemd/system/timers.target.wants").join(t).exists();
    assert!(wants("apt-daily.timer") && wants("apt-daily-upgrade.timer"), "the distribution enables apt's timers");
    let os = HostOs::new(&root);

    // None: periodic runs off, the timers disabled.
    assert_eq!(apply(&os, NodeOsChannel::None), "");
    let dump = apt_config(&root);
    for line in ["APT::Periodic::Update-Package-Lists \"0\";", "APT::Periodic::Unattended-Upgrade \"0\";"] {
        assert!(dump.lines().any(|l| l == line), "None: {line} not in force:\n{dump}");
    }
    assert!(!wants("apt-daily.timer") && !wants("apt-daily-upgrade.timer"), "None disables apt's timers");
    let distro_conf = std::fs::read(root.join("etc/apt/apt.conf.d/50unattended-upgrades")).expect("shipped file");

    // Unmanaged: on, security origins only, no automatic reboot, 06:00 UTC; a real run upgrades only the
    // security origin's package.
    assert_eq!(apply(&os, NodeOsChannel::Unmanaged), "");
    let dump = apt_config(&root);
    for line in [
        "APT::Periodic::Unattended-Upgrade \"1\";",
        "Unattended-Upgrade::Automatic-Reboot \"false\";",
        "Unattended-Upgrade::Origins-Pattern:: \"origin=Debian,codename=${distro_codename}-security,label=Debian-Security\";",
    ] {
        assert!(dump.lines().any(|l| l == line), "Unmanaged: {line} not in force:\n{dump}");
    }
    let patterns: Vec<&str> = dump.lines().filter(|l| l.starts_with("Unattended-Upgrade::Origins-Pattern::")).collect();
    assert!(patterns.iter().all(|l| l.contains("Security")), "only security origins allowed: {patterns:?}");
    assert!(wants("apt-daily.timer") && wants("apt-daily-upgrade.timer"), "Unmanaged enables apt's timers");
    let dropin = std::fs::read_to_string(root.join("etc/systemd/system/apt-daily-upgrade.timer.d/50-upkeep.conf"))
        .expect("timer override");
    assert!(dropin.contains("OnCalendar=*-*-* 06:00:00 UTC"), "{dropin}");
    run_ok(Command::new("systemd-analyze").args(["calendar", "*-*-* 06:00:00 UTC"]));
    let log = chroot(&root, &["unattended-upgrade", "--debug"]);
    assert!(log.contains("Packages that will be upgraded: upkeep-sec"), "unattended-upgrade:\n{log}");
    assert_eq!(installed(&root, "upkeep-sec"), "2.0", "security origin upgraded");
    assert_eq!(installed(&root, "upkeep-plain"), "1.0", "ordinary origin left alone");
    assert_eq!(std::fs::read(root.join("etc/apt/apt.conf.d/50unattended-upgrades")).expect("read"), distro_conf);

    // SecurityPatch: the Unmanaged overrides removed, updaters off again; the hub's patch installs exactly the
    // pinned version with apt in the chroot, is recorded, and the package's reboot flag is reported.
    assert_eq!(apply(&os, NodeOsChannel::SecurityPatch), "");
    assert!(!root.join("etc/systemd/system/apt-daily-upgrade.timer.d").exists(), "Unmanaged's override removed");
    assert!(!wants("apt-daily-upgrade.timer"));
    assert!(apt_config(&root).lines().any(|l| l == "APT::Periodic::Unattended-Upgrade \"0\";"));
    assert!(!os.facts().expect("facts").reboot_required);
    let state = tmp.path().join("state");
    let r = apply_patch(HostOs::new(&root), &state, "patch-1", "202402.01.1", &["upkeep-plain=2.0"]).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(installed(&root, "upkeep-plain"), "2.0");
    let facts = os.facts().expect("facts");
    assert_eq!(facts.security_patch_version, "202402.01.1");
    assert!(facts.reboot_required, "the patched package asked for a reboot");
    // A version the repositories do not have fails, naming apt's complaint; nothing recorded.
    let r = apply_patch(HostOs::new(&root), &state, "patch-2", "202403.01.1", &["upkeep-plain=9.9"]).await;
    assert!(!r.ok && r.error.contains("apt-get") && r.error.contains("9.9"), "{r:?}");
    assert_eq!(os.facts().expect("facts").security_patch_version, "202402.01.1");
}

fn build_rpm(spec_dir: &Path, repo: &Path, name: &str, version: &str) {
    let spec = spec_dir.join(format!("{name}.spec"));
    std::fs::write(
        &spec,
        format!(
            "Name: {name}\nVersion: {version}\nRelease: 1\nSummary: upkeep system-test stand-in\nLicense: MIT\n\
             BuildArch: noarch\n%description\nupkeep system-test stand-in package\n%install\n\
             mkdir -p %{{buildroot}}/usr/share/{name}\necho {version} > %{{buildroot}}/usr/share/{name}/version\n\
             %files\n/usr/share/{name}/version\n"
        ),
    )
    .expect("spec");
    run_ok(
        Command::new("rpmbuild")
            .arg("-bb")
            .arg("--define")
            .arg(format!("_topdir {}", spec_dir.join("top").display()))
            .arg("--define")
            .arg(format!("_rpmdir {}", repo.display()))
            .arg(&spec),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dnf_channel_files_and_a_security_patch_under_an_installroot() {
    require_root_and(&[
        ("dnf", "dnf"),
        ("rpm", "rpm"),
        ("rpmbuild", "rpm"),
        ("createrepo_c", "createrepo-c"),
        ("systemd-analyze", "systemd"),
    ]);
    assert!(
        Path::new("/usr/lib/python3/dist-packages/dnf-plugins/needs_restarting.py").is_file(),
        "system test prerequisite missing: dnf needs-restarting (apt-get install dnf-plugins-core). Run scripts/deps."
    );
    let tmp = TempDir::new().expect("tempdir");
    let repo = tmp.path().join("repo");
    let root = tmp.path().join("root");
    std::fs::create_dir_all(&repo).expect("mkdir");
    for v in ["1.0", "2.0"] {
        build_rpm(tmp.path(), &repo, "upkeep-test-pkg", v);
    }
    run_ok(Command::new("createrepo_c").arg("-q").arg(&repo));
    std::fs::create_dir_all(root.join("etc/yum.repos.d")).expect("mkdir");
    // The node's configured repository (dnf reads repos from the installroot first).
    std::fs::write(
        root.join("etc/yum.repos.d/upkeep-test.repo"),
        format!("[upkeep-test]\nname=upkeep test\nbaseurl=file://{}\ngpgcheck=0\n", repo.display()),
    )
    .expect("repo");
    std::fs::write(root.join("etc/os-release"), "ID=\"rocky\"\nID_LIKE=\"rhel centos fedora\"\nVERSION_ID=\"9.3\"\n")
        .expect("os-release");
    run_ok(
        Command::new("dnf")
            .args(["-y", "-q", "--disableplugin=local"])
            .arg(format!("--installroot={}", root.display()))
            .args(["install", "upkeep-test-pkg-1.0-1"]),
    );
    let os = HostOs::new(&root);

    // Unmanaged: the agent's dnf-automatic configuration and overrides, as written; the units parse.
    let note = apply(&os, NodeOsChannel::Unmanaged);
    assert!(note.contains("dnf-automatic.timer is not installed"), "the empty root has no dnf-automatic: {note}");
    let conf = std::fs::read_to_string(root.join("etc/upkeep/dnf-automatic.conf")).expect("conf");
    for line in ["upgrade_type = security", "apply_updates = yes", "reboot = never"] {
        assert!(conf.lines().any(|l| l == line), "{line} in\n{conf}");
    }
    let service = std::fs::read_to_string(root.join("etc/systemd/system/dnf-automatic.service.d/50-upkeep.conf"))
        .expect("service override");
    assert!(service.contains("ExecStart=\nExecStart=/usr/bin/dnf-automatic /etc/upkeep/dnf-automatic.conf --timer\n"));
    let timer = std::fs::read_to_string(root.join("etc/systemd/system/dnf-automatic.timer.d/50-upkeep.conf"))
        .expect("timer override");
    assert!(timer.contains("OnCalendar=*-*-* 06:00:00 UTC"), "{timer}");

    // SecurityPatch: Unmanaged's files removed; the patch installs version 2 with dnf under the installroot.
    assert_eq!(apply(&os, NodeOsChannel::SecurityPatch), "");
    assert!(!root.join("etc/upkeep/dnf-automatic.conf").exists());
    assert!(!root.join("etc/systemd/system/dnf-automatic.service.d").exists());
    let state = tmp.path().join("state");
    let r = apply_patch(HostOs::new(&root), &state, "rpm-1", "202402.01.1", &["upkeep-test-pkg=2.0-1"]).await;
    assert!(r.ok, "{r:?}");
    let q = run_ok(Command::new("rpm").arg("--root").arg(&root).args(["-q", "upkeep-test-pkg"]));
    assert_eq!(String::from_utf8_lossy(&q.stdout).trim(), "upkeep-test-pkg-2.0-1.noarch");
    let facts = os.facts().expect("facts (asks dnf needs-restarting -r)");
    assert_eq!(facts.security_patch_version, "202402.01.1");
    assert!(!facts.reboot_required, "no core package changed");
    let r = apply_patch(HostOs::new(&root), &state, "rpm-2", "202403.01.1", &["upkeep-test-pkg=9.9-1"]).await;
    assert!(!r.ok && r.error.contains("dnf") && r.error.contains("upkeep-test-pkg-9.9-1"), "{r:?}");
}
