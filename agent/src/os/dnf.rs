//! Installing a security patch with dnf (`dnf -y install name-version ...`, with `--installroot=ROOT` when the
//! root is not `/`) from the node's configured repositories, then `rpm -q` to check every package is at the
//! pinned version; and `dnf needs-restarting -r` for the reboot-required fact (exit code 1: a reboot is
//! required). Argv building and output parsing are pure and tested.
//!
//! Kubernetes packages go the same way as `name-<version>` (dnf picks the newest release of that version; a bare
//! version never matches `1.29.30` for `1.29.3`, which a glob `name-1.29.3*` would), with repository excludes
//! disabled: the Kubernetes repositories are set up with `exclude=kubelet kubeadm ...` to keep routine updates
//! away from them.

use super::{OsError, command};
use crate::channel::PackagePin;
use std::path::Path;
use std::time::Duration;

/// Timeout of `dnf install`.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(1800);
/// Timeout of queries (`rpm -q`, `dnf needs-restarting`).
const QUERY_TIMEOUT: Duration = Duration::from_secs(120);

fn installroot(root: &Path) -> Option<String> {
    (root != Path::new("/")).then(|| format!("--installroot={}", root.display()))
}

/// `dnf install` of exactly `pins`. Fresh metadata (`--refresh`), no weak dependencies, and the `local` plugin
/// off (it copies every installed package into a repository of its own; Debian's dnf-plugins-core enables it).
pub fn install_argv(root: &Path, pins: &[PackagePin]) -> Vec<String> {
    install_argv_with(root, pins, &[])
}

/// `install_argv` with `extra` options before `install`.
pub fn install_argv_with(root: &Path, pins: &[PackagePin], extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["dnf", "-y", "-q", "--refresh"].map(String::from).to_vec();
    a.extend(installroot(root));
    a.extend(["--disableplugin=local", "--setopt=install_weak_deps=False"].map(String::from));
    a.extend(extra.iter().map(|s| s.to_string()));
    a.push("install".into());
    a.extend(pins.iter().map(|p| format!("{}-{}", p.name, p.version)));
    a
}

/// `rpm -q` for the installed versions of `pins`: NAME, EPOCH, VERSION-RELEASE per line.
pub fn query_argv(root: &Path, pins: &[PackagePin]) -> Vec<String> {
    let mut a = vec!["rpm".to_string()];
    if root != Path::new("/") {
        a.extend(["--root".to_string(), root.display().to_string()]);
    }
    a.extend(["-q".to_string(), "--qf".to_string(), "%{NAME}\t%{EPOCH}\t%{VERSION}\t%{RELEASE}\n".to_string()]);
    a.extend(pins.iter().map(|p| p.name.clone()));
    a
}

/// `dnf needs-restarting -r`.
pub fn needs_restarting_argv(root: &Path) -> Vec<String> {
    let mut a = vec!["dnf".to_string(), "-q".to_string()];
    a.extend(installroot(root));
    a.extend(["--disableplugin=local".to_string(), "needs-restarting".to_string(), "-r".to_string()]);
    a
}

/// Checks `rpm -q` output against the pins. A pin may name `version`, `version-release` or
/// `epoch:version-release`.
pub fn check_installed(stdout: &str, pins: &[PackagePin]) -> Result<(), String> {
    let mut wrong = Vec::new();
    for p in pins {
        let rows: Vec<Vec<&str>> = stdout
            .lines()
            .map(|l| l.split('\t').collect::<Vec<_>>())
            .filter(|r| r.len() == 4 && r[0] == p.name)
            .collect();
        let matches = |r: &Vec<&str>| {
            let (epoch, ver, rel) = (r[1], r[2], r[3]);
            let vr = format!("{ver}-{rel}");
            p.version == ver || p.version == vr || (epoch != "(none)" && p.version == format!("{epoch}:{vr}"))
        };
        if rows.is_empty() {
            wrong.push(format!("{} is not installed, the patch names {}", p.name, p.version));
        } else if !rows.iter().any(matches) {
            let have: Vec<String> = rows.iter().map(|r| format!("{}-{}", r[2], r[3])).collect();
            wrong.push(format!("{} is {}, the patch names {}", p.name, have.join(", "), p.version));
        }
    }
    if wrong.is_empty() { Ok(()) } else { Err(wrong.join("; ")) }
}

/// Installs exactly `pins` under `root`.
pub fn install(root: &Path, pins: &[PackagePin]) -> Result<(), OsError> {
    install_with(root, pins, &[])
}

/// Installs the Kubernetes packages `names` at `version` (`1.29.3`) under `root`, repository excludes disabled.
pub fn install_kubernetes(root: &Path, names: &[String], version: &str) -> Result<(), OsError> {
    let pins: Vec<PackagePin> =
        names.iter().map(|n| PackagePin { name: n.clone(), version: version.to_string() }).collect();
    install_with(root, &pins, &["--disableexcludes=all"])
}

/// The installed version (`%{VERSION}`, no release) of `name` under `root`, None when it is not installed.
pub fn installed_version(root: &Path, name: &str) -> Result<Option<String>, OsError> {
    let argv = query_argv(root, &[PackagePin { name: name.to_string(), version: String::new() }]);
    // `rpm -q` exits 1 for a package that is not installed ("package x is not installed" on stdout).
    let (_, out, _) = command::run_status(&argv, &[("LC_ALL", "C")], Some(QUERY_TIMEOUT))?;
    Ok(out.lines().find_map(|l| {
        let r: Vec<&str> = l.split('\t').collect();
        (r.len() == 4 && r[0] == name).then(|| r[2].to_string())
    }))
}

fn install_with(root: &Path, pins: &[PackagePin], extra: &[&str]) -> Result<(), OsError> {
    command::run(&install_argv_with(root, pins, extra), &[("LC_ALL", "C")], Some(INSTALL_TIMEOUT))?;
    // `rpm -q` exits non-zero when a package is missing; its stdout still says which.
    let argv = query_argv(root, pins);
    let (_, out, _) = command::run_status(&argv, &[("LC_ALL", "C")], Some(QUERY_TIMEOUT))?;
    let out = out.lines().map(|l| if l.contains('\t') { l.to_string() } else { String::new() }).collect::<Vec<_>>();
    check_installed(&out.join("\n"), pins)
        .map_err(|reason| OsError::Malformed { path: root.join("var/lib/rpm"), reason })
}

/// Interprets `dnf needs-restarting -r`'s exit code.
pub fn reboot_required_from(argv: &[String], code: Option<i32>, stderr_tail: String) -> Result<bool, OsError> {
    match code {
        Some(0) => Ok(false),
        Some(1) => Ok(true),
        other => Err(OsError::Command {
            argv: argv.to_vec(),
            status: other.map_or("was killed by a signal".into(), |c| format!("exited with exit status: {c}")),
            stderr_tail,
        }),
    }
}

/// Asks dnf whether the node needs a reboot.
pub fn reboot_required(root: &Path) -> Result<bool, OsError> {
    let argv = needs_restarting_argv(root);
    let (code, _, err) = command::run_status(&argv, &[("LC_ALL", "C")], Some(QUERY_TIMEOUT))?;
    reboot_required_from(&argv, code, err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pins() -> Vec<PackagePin> {
        vec![PackagePin { name: "openssl".into(), version: "3.0.7-25.el9".into() }]
    }

    #[test]
    fn argv_on_the_host_and_under_an_installroot() {
        assert_eq!(
            install_argv(Path::new("/"), &pins()),
            [
                "dnf",
                "-y",
                "-q",
                "--refresh",
                "--disableplugin=local",
                "--setopt=install_weak_deps=False",
                "install",
                "openssl-3.0.7-25.el9"
            ]
        );
        assert_eq!(install_argv(Path::new("/srv/r"), &pins())[4], "--installroot=/srv/r");
        let k = install_argv_with(Path::new("/"), &pins(), &["--disableexcludes=all"]);
        assert_eq!(&k[k.len() - 3..], ["--disableexcludes=all", "install", "openssl-3.0.7-25.el9"]);
        assert_eq!(&query_argv(Path::new("/srv/r"), &pins())[..3], ["rpm", "--root", "/srv/r"]);
        assert_eq!(
            needs_restarting_argv(Path::new("/")),
            ["dnf", "-q", "--disableplugin=local", "needs-restarting", "-r"]
        );
    }

    #[test]
    fn checks_versions_with_and_without_release_and_epoch() {
        let out = "openssl\t1\t3.0.7\t25.el9\n";
        assert_eq!(check_installed(out, &pins()), Ok(()));
        for v in ["3.0.7", "1:3.0.7-25.el9"] {
            assert_eq!(check_installed(out, &[PackagePin { name: "openssl".into(), version: v.into() }]), Ok(()));
        }
        let e = check_installed("openssl\t(none)\t3.0.1\t1\n", &pins()).expect_err("old");
        assert_eq!(e, "openssl is 3.0.1-1, the patch names 3.0.7-25.el9");
        assert!(check_installed("", &pins()).expect_err("missing").contains("not installed"));
    }

    #[test]
    fn needs_restarting_exit_codes() {
        let argv = needs_restarting_argv(Path::new("/"));
        assert!(!reboot_required_from(&argv, Some(0), String::new()).expect("0"));
        assert!(reboot_required_from(&argv, Some(1), String::new()).expect("1"));
        let e = reboot_required_from(&argv, Some(2), "no such command".into()).expect_err("2");
        assert!(e.to_string().contains("needs-restarting") && e.to_string().contains("no such command"), "{e}");
    }
}
