//! Carries out a `channel::ChannelPlan` on the node: writes the agent's own drop-in files (atomically, only when
//! their contents differ), removes every other file the agent owns (what a previous channel set), and switches
//! the OS's update timers with `systemctl`. It never writes a file outside `channel::OWNED_FILES`.
//!
//! With systemd running on the node (root `/` and `/run/systemd/system` present) timers are switched live
//! (`daemon-reload`, `enable --now` / `disable --now`); on any other root (a chroot, an image being prepared) the
//! unit symlinks are changed offline with `systemctl --root=ROOT`. A timer whose unit is not installed under the
//! root is skipped and said so in the returned notes.

use super::{OsError, command};
use crate::channel::{ChannelPlan, OWNED_FILES, TimerState};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Timeout of one `systemctl` call.
const SYSTEMCTL_TIMEOUT: Duration = Duration::from_secs(60);
/// Where unit files live, relative to the root, in systemd's search order.
const UNIT_DIRS: [&str; 3] = ["etc/systemd/system", "usr/lib/systemd/system", "lib/systemd/system"];

/// What applying a plan did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Files written (relative to the root).
    pub written: Vec<String>,
    /// Owned files removed (relative to the root).
    pub removed: Vec<String>,
    /// `systemctl` argv run.
    pub systemctl: Vec<Vec<String>>,
    /// What could not be done or is missing (a timer not installed, ...).
    pub notes: Vec<String>,
}

/// The root is the running system with systemd as PID 1.
pub fn systemd_live(root: &Path) -> bool {
    root == Path::new("/") && Path::new("/run/systemd/system").is_dir()
}

fn unit_installed(root: &Path, unit: &str) -> bool {
    UNIT_DIRS.iter().any(|d| root.join(d).join(unit).exists())
}

/// Writes `contents` to `path` atomically (temp file, fsync, rename) unless it already holds exactly that.
fn ensure_file(path: &Path, contents: &str) -> Result<bool, OsError> {
    match std::fs::read_to_string(path) {
        Ok(cur) if cur == contents => return Ok(false),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(OsError::Io { path: path.to_path_buf(), source: e }),
    }
    crate::state::write_atomic(path, contents.as_bytes()).map_err(|e| match e {
        crate::state::StateError::Io { path, source } => OsError::Io { path, source },
        crate::state::StateError::Corrupt { path, reason } => OsError::Malformed { path, reason },
    })?;
    Ok(true)
}

/// Removes `path` if present, and its directory if that is a now-empty `*.d` drop-in directory.
fn ensure_absent(path: &Path) -> Result<bool, OsError> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(OsError::Io { path: path.to_path_buf(), source: e }),
    }
    if let Some(dir) = path.parent()
        && dir.extension().is_some_and(|x| x == "d")
        && dir
            .file_name()
            .is_some_and(|n| n.to_string_lossy().ends_with(".timer.d") || n.to_string_lossy().ends_with(".service.d"))
    {
        // Only our own unit drop-in directories; fails harmlessly if someone else put a file there.
        let _ = std::fs::remove_dir(dir);
    }
    Ok(true)
}

/// Applies `plan` under `root`, running `systemctl` through `run` (the real one is `command::run`).
pub fn apply_with(
    root: &Path,
    plan: &ChannelPlan,
    live: bool,
    run: &dyn Fn(&[String]) -> Result<String, OsError>,
) -> Result<Applied, OsError> {
    let mut out = Applied::default();
    for f in &plan.files {
        if ensure_file(&root.join(f.path), &f.contents)? {
            out.written.push(f.path.to_string());
        }
    }
    for owned in OWNED_FILES {
        if !plan.files.iter().any(|f| f.path == owned) && ensure_absent(&root.join(owned))? {
            out.removed.push(owned.to_string());
        }
    }
    let changed = !out.written.is_empty() || !out.removed.is_empty();
    let argv_of = |args: &[&str]| -> Vec<String> {
        let mut a = vec!["systemctl".to_string()];
        if !live {
            a.push(format!("--root={}", root.display()));
        }
        a.extend(args.iter().map(|s| s.to_string()));
        a
    };
    let mut todo: Vec<Vec<String>> = Vec::new();
    if live && changed {
        todo.push(argv_of(&["daemon-reload"]));
    }
    for (timer, state) in &plan.timers {
        if !unit_installed(root, timer) {
            if *state == TimerState::On {
                out.notes.push(format!("{timer} is not installed under {}; it cannot run", root.display()));
            }
            continue;
        }
        let verb = if *state == TimerState::On { "enable" } else { "disable" };
        todo.push(if live { argv_of(&[verb, "--now", timer]) } else { argv_of(&[verb, timer]) });
    }
    for argv in todo {
        run(&argv)?;
        out.systemctl.push(argv);
    }
    for (needed, what) in required_programs(plan) {
        if !root.join(needed).exists() {
            out.notes.push(format!("{what} is not installed (no /{needed}); the OS's automatic updates cannot run"));
        }
    }
    Ok(out)
}

/// Programs the plan relies on, relative to the root, with their package names.
fn required_programs(plan: &ChannelPlan) -> Vec<(&'static str, &'static str)> {
    let has = |p: &str| plan.files.iter().any(|f| f.path == p);
    let mut v = Vec::new();
    if has(crate::channel::APT_DAILY_UPGRADE_TIMER_DROPIN) {
        v.push(("usr/bin/unattended-upgrade", "unattended-upgrades"));
    }
    if has(crate::channel::DNF_AUTOMATIC_SERVICE_DROPIN) {
        v.push(("usr/bin/dnf-automatic", "dnf-automatic"));
    }
    v
}

/// Applies `plan` under `root` with the real `systemctl`.
pub fn apply(root: &Path, plan: &ChannelPlan) -> Result<Applied, OsError> {
    let live = systemd_live(root);
    apply_with(root, plan, live, &|argv| command::run(argv, &[], Some(SYSTEMCTL_TIMEOUT)))
}

/// Every owned file present under `root` (tests and diagnostics).
pub fn owned_present(root: &Path) -> Vec<PathBuf> {
    OWNED_FILES.iter().map(|p| root.join(p)).filter(|p| p.exists()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::{NodeKind, OsKind, plan_channel};
    use std::sync::Mutex;
    use upkeep_core::channel::NodeOsChannel;

    fn node(os: OsKind) -> NodeKind {
        NodeKind { os, node_pool: "p".into(), hardware_class: String::new() }
    }

    fn install_units(root: &Path, units: &[&str]) {
        let d = root.join("lib/systemd/system");
        std::fs::create_dir_all(&d).expect("mkdir");
        for u in units {
            std::fs::write(d.join(u), "[Timer]\nOnCalendar=daily\n").expect("write");
        }
    }

    fn apply_recorded(root: &Path, ch: NodeOsChannel, os: OsKind, live: bool) -> (Applied, Vec<Vec<String>>) {
        let calls = Mutex::new(Vec::new());
        let plan = plan_channel(ch, &node(os));
        let a = apply_with(root, &plan, live, &|argv| {
            calls.lock().expect("lock").push(argv.to_vec());
            Ok(String::new())
        })
        .expect("apply");
        (a, calls.into_inner().expect("lock"))
    }

    fn rel(root: &Path) -> Vec<String> {
        owned_present(root).iter().map(|p| p.strip_prefix(root).expect("under root").display().to_string()).collect()
    }

    #[test]
    fn debian_switching_channels_replaces_and_removes_the_agents_files_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        install_units(root, &["apt-daily.timer", "apt-daily-upgrade.timer"]);
        // A distribution file the agent must never touch.
        std::fs::create_dir_all(root.join("etc/apt/apt.conf.d")).expect("mkdir");
        std::fs::write(root.join("etc/apt/apt.conf.d/50unattended-upgrades"), "shipped\n").expect("write");
        let deb = || OsKind::Debian { id: "debian".into() };

        let (a, calls) = apply_recorded(root, NodeOsChannel::Unmanaged, deb(), false);
        assert_eq!(
            rel(root),
            [
                "etc/apt/apt.conf.d/52upkeep-channel",
                "etc/systemd/system/apt-daily.timer.d/50-upkeep.conf",
                "etc/systemd/system/apt-daily-upgrade.timer.d/50-upkeep.conf"
            ]
        );
        let r = format!("--root={}", root.display());
        assert_eq!(
            calls,
            vec![
                vec!["systemctl".to_string(), r.clone(), "enable".into(), "apt-daily.timer".into()],
                vec!["systemctl".to_string(), r.clone(), "enable".into(), "apt-daily-upgrade.timer".into()],
            ]
        );
        assert_eq!(
            a.notes,
            [
                "unattended-upgrades is not installed (no /usr/bin/unattended-upgrade); the OS's automatic updates cannot run"
            ]
        );
        let conf = std::fs::read_to_string(root.join(crate::channel::APT_CHANNEL_CONF)).expect("read");
        assert!(conf.contains("Unattended-Upgrade::Automatic-Reboot \"false\";"), "{conf}");

        // Unmanaged -> None: the timer overrides go (and their directories), the apt drop-in turns periodic off.
        let (a, calls) = apply_recorded(root, NodeOsChannel::None, deb(), false);
        assert_eq!(rel(root), ["etc/apt/apt.conf.d/52upkeep-channel"]);
        assert_eq!(a.removed.len(), 2);
        assert!(!root.join("etc/systemd/system/apt-daily-upgrade.timer.d").exists());
        assert_eq!(calls[0], vec!["systemctl".to_string(), r.clone(), "disable".into(), "apt-daily.timer".into()]);
        let conf = std::fs::read_to_string(root.join(crate::channel::APT_CHANNEL_CONF)).expect("read");
        assert!(conf.contains("APT::Periodic::Unattended-Upgrade \"0\";"), "{conf}");
        assert_eq!(
            std::fs::read_to_string(root.join("etc/apt/apt.conf.d/50unattended-upgrades")).expect("read"),
            "shipped\n"
        );

        // Applying the same channel again writes nothing.
        let (a, _) = apply_recorded(root, NodeOsChannel::None, deb(), false);
        assert!(a.written.is_empty() && a.removed.is_empty(), "{a:?}");

        // Live systemd: reload after a change, switch with --now.
        let (_, calls) = apply_recorded(root, NodeOsChannel::Unmanaged, deb(), true);
        assert_eq!(calls[0], ["systemctl", "daemon-reload"]);
        assert_eq!(calls[1], ["systemctl", "enable", "--now", "apt-daily.timer"]);
    }

    #[test]
    fn rpm_switching_channels_and_an_os_change_cleans_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        install_units(root, &["dnf-automatic.timer", "dnf-automatic-install.timer"]);
        let rocky = || OsKind::Rpm { id: "rocky".into() };
        let (_, calls) = apply_recorded(root, NodeOsChannel::Unmanaged, rocky(), true);
        assert_eq!(
            rel(root),
            [
                "etc/upkeep/dnf-automatic.conf",
                "etc/systemd/system/dnf-automatic.timer.d/50-upkeep.conf",
                "etc/systemd/system/dnf-automatic.service.d/50-upkeep.conf"
            ]
        );
        assert_eq!(
            calls,
            vec![
                vec!["systemctl".to_string(), "daemon-reload".into()],
                vec!["systemctl".to_string(), "enable".into(), "--now".into(), "dnf-automatic.timer".into()],
                vec!["systemctl".to_string(), "disable".into(), "--now".into(), "dnf-automatic-install.timer".into()],
            ]
        );
        let (a, calls) = apply_recorded(root, NodeOsChannel::SecurityPatch, rocky(), true);
        assert!(rel(root).is_empty(), "{:?}", rel(root));
        assert_eq!(a.removed.len(), 3);
        assert_eq!(calls[1], ["systemctl", "disable", "--now", "dnf-automatic.timer"]);
        // Files left by a Debian channel on a root that now says it is an RPM distribution are removed too.
        std::fs::create_dir_all(root.join("etc/apt/apt.conf.d")).expect("mkdir");
        std::fs::write(root.join(crate::channel::APT_CHANNEL_CONF), "old").expect("write");
        apply_recorded(root, NodeOsChannel::None, rocky(), false);
        assert!(rel(root).is_empty());
    }

    #[test]
    fn unknown_os_touches_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, calls) =
            apply_recorded(dir.path(), NodeOsChannel::Unmanaged, OsKind::Unknown { id: "arch".into() }, true);
        assert_eq!(a, Applied::default());
        assert!(calls.is_empty());
    }

    #[test]
    fn a_failing_systemctl_is_reported_with_its_argv() {
        let dir = tempfile::tempdir().expect("tempdir");
        install_units(dir.path(), &["apt-daily.timer"]);
        let plan = plan_channel(NodeOsChannel::None, &node(OsKind::Debian { id: "debian".into() }));
        let e = apply_with(dir.path(), &plan, false, &|argv| {
            Err(OsError::Command {
                argv: argv.to_vec(),
                status: "exited with exit status: 1".into(),
                stderr_tail: "nope".into(),
            })
        })
        .expect_err("fails");
        assert!(e.to_string().contains("\"disable\", \"apt-daily.timer\"") && e.to_string().contains("nope"), "{e}");
    }
}
