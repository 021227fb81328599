//! Installing a security patch with apt: `apt-get update`, then `apt-get install` of exactly the pinned
//! `name=version` packages from the node's configured repositories, then `dpkg-query` to check that every
//! package is at the pinned version. When the root is not `/` the commands run under `chroot ROOT` (maintainer
//! scripts must run inside the node's own file system). Argv building and output parsing are pure and tested.
//!
//! Kubernetes packages are installed the same way, after `apt-cache madison` resolved the candidate of the
//! ordered version (`1.29.3` -> `1.29.3-1.1`); they are usually held (`apt-mark hold`), so that install may change
//! held packages and the hold stays in place.

use super::{OsError, command};
use crate::channel::PackagePin;
use std::path::Path;
use std::time::Duration;

/// Timeout of `apt-get update`.
const UPDATE_TIMEOUT: Duration = Duration::from_secs(600);
/// Timeout of `apt-get install`.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(1800);

fn prefix(root: &Path) -> Vec<String> {
    if root == Path::new("/") { Vec::new() } else { vec!["chroot".into(), root.display().to_string()] }
}

/// `apt-get update` under `root`.
pub fn update_argv(root: &Path) -> Vec<String> {
    let mut a = prefix(root);
    a.extend(["apt-get", "-q", "update"].map(String::from));
    a
}

/// `apt-get install` of exactly `pins` under `root`; keeps existing configuration files, installs no
/// recommendations, and never downgrades (apt refuses without `--allow-downgrades`).
pub fn install_argv(root: &Path, pins: &[PackagePin]) -> Vec<String> {
    install_argv_with(root, pins, &[])
}

/// `install_argv` with `extra` options before `install`.
pub fn install_argv_with(root: &Path, pins: &[PackagePin], extra: &[&str]) -> Vec<String> {
    let mut a = prefix(root);
    a.extend(
        [
            "apt-get",
            "-q",
            "-y",
            "--no-install-recommends",
            "-o",
            "Dpkg::Options::=--force-confdef",
            "-o",
            "Dpkg::Options::=--force-confold",
            "install",
        ]
        .map(String::from),
    );
    // The options go before the `install` verb (the last element pushed above).
    let verb = a.pop();
    a.extend(extra.iter().map(|s| s.to_string()));
    a.extend(verb);
    a.extend(pins.iter().map(|p| format!("{}={}", p.name, p.version)));
    a
}

/// `apt-cache madison` of `names` under `root`: every version the configured repositories offer.
pub fn madison_argv(root: &Path, names: &[String]) -> Vec<String> {
    let mut a = prefix(root);
    a.extend(["apt-cache", "madison"].map(String::from));
    a.extend(names.iter().cloned());
    a
}

/// The version without its epoch (`1:`) and Debian revision (`-1.1`): `1:1.29.3-1.1` -> `1.29.3`.
pub fn upstream_version(v: &str) -> &str {
    let v = v.split_once(':').map_or(v, |(_, rest)| rest);
    v.rsplit_once('-').map_or(v, |(up, _)| up)
}

/// From `apt-cache madison` output, the newest version of each of `names` that is `version` or `version-*`
/// (madison lists a package's versions newest first). Names every package without one, with what is offered.
pub fn pick_candidates(stdout: &str, names: &[String], version: &str) -> Result<Vec<PackagePin>, String> {
    let rows: Vec<(&str, &str)> = stdout
        .lines()
        .filter_map(|l| {
            let mut it = l.split('|').map(str::trim);
            let (name, ver, source) = (it.next()?, it.next()?, it.next()?);
            source.ends_with("Packages").then_some((name, ver))
        })
        .collect();
    let prefix = format!("{version}-");
    let mut pins = Vec::new();
    let mut missing = Vec::new();
    for n in names {
        let offered: Vec<&str> = rows.iter().filter(|(name, _)| name == n).map(|(_, v)| *v).collect();
        let hit = offered.iter().find(|v| {
            let no_epoch = v.split_once(':').map_or(**v, |(_, rest)| rest);
            no_epoch == version || no_epoch.starts_with(&prefix)
        });
        match hit {
            Some(v) => pins.push(PackagePin { name: n.clone(), version: v.to_string() }),
            None if offered.is_empty() => missing.push(format!("{n} is not offered by any configured repository")),
            None => missing.push(format!("{n} has no version {version} (offered: {})", offered.join(", "))),
        }
    }
    if missing.is_empty() {
        Ok(pins)
    } else {
        Err(format!("{}; add the repository of Kubernetes {version} to the node's apt sources", missing.join("; ")))
    }
}

/// The installed (`ii`) version of `name` under `root`, None when it is not installed.
pub fn installed_version(root: &Path, name: &str) -> Result<Option<String>, OsError> {
    let argv = query_argv(root, &[PackagePin { name: name.to_string(), version: String::new() }]);
    // dpkg-query exits 1 for a package it has never heard of; its stdout is then empty.
    let (_, out, _) = command::run_status(&argv, &[("LC_ALL", "C")], Some(UPDATE_TIMEOUT))?;
    Ok(out.lines().find_map(|l| {
        let mut it = l.split('\t');
        let (n, v, st) = (it.next()?, it.next()?, it.next().unwrap_or(""));
        (n == name && installed_state(st)).then(|| v.to_string())
    }))
}

/// `dpkg-query` for the installed versions of `pins`.
pub fn query_argv(root: &Path, pins: &[PackagePin]) -> Vec<String> {
    let mut a = vec!["dpkg-query".to_string()];
    if root != Path::new("/") {
        a.push(format!("--admindir={}", root.join("var/lib/dpkg").display()));
    }
    a.extend(["-W".to_string(), "-f=${Package}\t${Version}\t${db:Status-Abbrev}\n".to_string()]);
    a.extend(pins.iter().map(|p| p.name.clone()));
    a
}

/// A `${db:Status-Abbrev}` of a package that is installed: wanted `i`nstall or `h`old, state `i`nstalled.
fn installed_state(status: &str) -> bool {
    matches!(status.as_bytes(), [b'i' | b'h', b'i', ..])
}

/// The packages among `names` that `dpkg-query` output shows on hold (`apt-mark hold`).
pub fn held(stdout: &str, names: &[String]) -> Vec<String> {
    names
        .iter()
        .filter(|n| {
            stdout.lines().any(|l| {
                let mut it = l.split('\t');
                it.next() == Some(n.as_str()) && it.nth(1).is_some_and(|st| st.starts_with('h'))
            })
        })
        .cloned()
        .collect()
}

/// `apt-mark hold` of `names` under `root`.
pub fn hold_argv(root: &Path, names: &[String]) -> Vec<String> {
    let mut a = prefix(root);
    a.extend(["apt-mark", "hold"].map(String::from));
    a.extend(names.iter().cloned());
    a
}

/// Checks `dpkg-query` output against the pins: every package installed (`ii`) at exactly its version.
pub fn check_installed(stdout: &str, pins: &[PackagePin]) -> Result<(), String> {
    let rows: Vec<(&str, &str, &str)> = stdout
        .lines()
        .filter_map(|l| {
            let mut it = l.split('\t');
            Some((it.next()?, it.next()?, it.next().unwrap_or("").trim()))
        })
        .collect();
    let mut wrong = Vec::new();
    for p in pins {
        match rows.iter().find(|(n, _, _)| *n == p.name) {
            Some((_, v, st)) if *v == p.version && installed_state(st) => {}
            Some((_, v, st)) => wrong.push(format!("{} is {v} ({st}), the patch names {}", p.name, p.version)),
            None => wrong.push(format!("{} is not installed, the patch names {}", p.name, p.version)),
        }
    }
    if wrong.is_empty() { Ok(()) } else { Err(wrong.join("; ")) }
}

const ENV: [(&str, &str); 2] = [("DEBIAN_FRONTEND", "noninteractive"), ("LC_ALL", "C")];

/// Installs exactly `pins` under `root`.
pub fn install(root: &Path, pins: &[PackagePin]) -> Result<(), OsError> {
    command::run(&update_argv(root), &ENV, Some(UPDATE_TIMEOUT))?;
    install_resolved(root, pins, &[])
}

/// Installs `pins` (versions already resolved) with `extra` apt options and checks the result.
fn install_resolved(root: &Path, pins: &[PackagePin], extra: &[&str]) -> Result<(), OsError> {
    command::run(&install_argv_with(root, pins, extra), &ENV, Some(INSTALL_TIMEOUT))?;
    let out = command::run(&query_argv(root, pins), &ENV, Some(UPDATE_TIMEOUT))?;
    check_installed(&out, pins).map_err(|reason| OsError::Malformed { path: root.join("var/lib/dpkg/status"), reason })
}

/// Installs the Kubernetes packages `names` at `version` under `root`: refreshes the lists, resolves each
/// package's candidate `version-*`, installs them (held packages included, the hold kept), checks the result.
pub fn install_kubernetes(root: &Path, names: &[String], version: &str) -> Result<(), OsError> {
    command::run(&update_argv(root), &ENV, Some(UPDATE_TIMEOUT))?;
    let argv = madison_argv(root, names);
    let out = command::run(&argv, &ENV, Some(UPDATE_TIMEOUT))?;
    let pins = pick_candidates(&out, names, version).map_err(|reason| OsError::Command {
        argv,
        status: "found no candidate".into(),
        stderr_tail: reason,
    })?;
    // Installing a held package by version drops its hold: note the holds first and put them back after.
    let unpinned: Vec<PackagePin> =
        names.iter().map(|n| PackagePin { name: n.clone(), version: String::new() }).collect();
    let (_, before, _) = command::run_status(&query_argv(root, &unpinned), &ENV, Some(UPDATE_TIMEOUT))?;
    let holds = held(&before, names);
    install_resolved(root, &pins, &["--allow-change-held-packages"])?;
    if !holds.is_empty() {
        command::run(&hold_argv(root, &holds), &ENV, Some(UPDATE_TIMEOUT))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pins() -> Vec<PackagePin> {
        vec![
            PackagePin { name: "openssl".into(), version: "3.0.11-1~deb12u2".into() },
            PackagePin { name: "libssl3".into(), version: "3.0.11-1~deb12u2".into() },
        ]
    }

    #[test]
    fn argv_on_the_host_and_in_a_chroot() {
        assert_eq!(
            install_argv(Path::new("/"), &pins()),
            [
                "apt-get",
                "-q",
                "-y",
                "--no-install-recommends",
                "-o",
                "Dpkg::Options::=--force-confdef",
                "-o",
                "Dpkg::Options::=--force-confold",
                "install",
                "openssl=3.0.11-1~deb12u2",
                "libssl3=3.0.11-1~deb12u2"
            ]
        );
        assert_eq!(&install_argv(Path::new("/srv/n1"), &pins())[..3], ["chroot", "/srv/n1", "apt-get"]);
        assert_eq!(update_argv(Path::new("/srv/n1")), ["chroot", "/srv/n1", "apt-get", "-q", "update"]);
        assert_eq!(query_argv(Path::new("/srv/n1"), &pins())[1], "--admindir=/srv/n1/var/lib/dpkg");
        assert_eq!(query_argv(Path::new("/"), &pins())[1], "-W");
    }

    #[test]
    fn kubernetes_candidates_from_madison() {
        let names = vec!["kubeadm".to_string(), "kubelet".to_string()];
        let out = "   kubeadm | 1.29.30-1.1 | https://pkgs.k8s.io/core:/stable:/v1.29/deb  Packages\n\
                   kubeadm | 1.29.3-1.2 | https://pkgs.k8s.io/core:/stable:/v1.29/deb  Packages\n\
                   kubeadm | 1.29.3-1.1 | https://pkgs.k8s.io/core:/stable:/v1.29/deb  Packages\n\
                   kubeadm | 1.29.1-1.1 | https://pkgs.k8s.io/core:/stable:/v1.29/deb  Packages\n\
                   kubelet | 1:1.29.3-1.1 | file:/srv/repo ./ Packages\n\
                   kubelet | 1.29.3-1.1 | file:/srv/repo ./ Sources\n";
        let pins = pick_candidates(out, &names, "1.29.3").expect("both found");
        assert_eq!(
            pins[0],
            PackagePin { name: "kubeadm".into(), version: "1.29.3-1.2".into() },
            "newest revision, not 1.29.30"
        );
        assert_eq!(pins[1].version, "1:1.29.3-1.1", "the epoch is kept for the pin");
        let e = pick_candidates(out, &names, "1.29.2").expect_err("missing");
        assert!(
            e.contains("kubeadm has no version 1.29.2 (offered: 1.29.30-1.1, 1.29.3-1.2, 1.29.3-1.1, 1.29.1-1.1)"),
            "{e}"
        );
        let e = pick_candidates("", &names[..1], "1.29.3").expect_err("none");
        assert!(e.contains("kubeadm is not offered") && e.contains("apt sources"), "{e}");
        assert_eq!(upstream_version("1:1.29.3-1.1"), "1.29.3");
        assert_eq!(upstream_version("1.29.3"), "1.29.3");
        let argv = install_argv_with(Path::new("/"), &pins[..1], &["--allow-change-held-packages"]);
        assert_eq!(&argv[argv.len() - 3..], ["--allow-change-held-packages", "install", "kubeadm=1.29.3-1.2"]);
        assert_eq!(
            madison_argv(Path::new("/r"), &names),
            ["chroot", "/r", "apt-cache", "madison", "kubeadm", "kubelet"]
        );
    }

    #[test]
    fn checks_every_pinned_version() {
        let ok = "openssl\t3.0.11-1~deb12u2\tii \nlibssl3\t3.0.11-1~deb12u2\tii \n";
        assert_eq!(check_installed(ok, &pins()), Ok(()));
        let old = "openssl\t3.0.9-1\tii \nlibssl3\t3.0.11-1~deb12u2\tii \n";
        assert_eq!(
            check_installed(old, &pins()).expect_err("old"),
            "openssl is 3.0.9-1 (ii), the patch names 3.0.11-1~deb12u2"
        );
        let held_ok = "openssl\t3.0.11-1~deb12u2\thi \nlibssl3\t3.0.11-1~deb12u2\tii \n";
        assert_eq!(check_installed(held_ok, &pins()), Ok(()), "a held package is installed");
        let names = vec!["openssl".to_string(), "libssl3".to_string()];
        assert_eq!(held(held_ok, &names), ["openssl"]);
        assert_eq!(hold_argv(Path::new("/r"), &names[..1]), ["chroot", "/r", "apt-mark", "hold", "openssl"]);
        let half = "openssl\t3.0.11-1~deb12u2\tiU \n";
        let e = check_installed(half, &pins()).expect_err("half");
        assert!(e.contains("(iU)") && e.contains("libssl3 is not installed"), "{e}");
    }
}
