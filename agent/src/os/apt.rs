//! Installing a security patch with apt: `apt-get update`, then `apt-get install` of exactly the pinned
//! `name=version` packages from the node's configured repositories, then `dpkg-query` to check that every
//! package is at the pinned version. When the root is not `/` the commands run under `chroot ROOT` (maintainer
//! scripts must run inside the node's own file system). Argv building and output parsing are pure and tested.

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
    a.extend(pins.iter().map(|p| format!("{}={}", p.name, p.version)));
    a
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
            Some((_, v, st)) if *v == p.version && st.starts_with("ii") => {}
            Some((_, v, st)) => wrong.push(format!("{} is {v} ({st}), the patch names {}", p.name, p.version)),
            None => wrong.push(format!("{} is not installed, the patch names {}", p.name, p.version)),
        }
    }
    if wrong.is_empty() { Ok(()) } else { Err(wrong.join("; ")) }
}

/// Installs exactly `pins` under `root`.
pub fn install(root: &Path, pins: &[PackagePin]) -> Result<(), OsError> {
    let env = [("DEBIAN_FRONTEND", "noninteractive"), ("LC_ALL", "C")];
    command::run(&update_argv(root), &env, Some(UPDATE_TIMEOUT))?;
    command::run(&install_argv(root, pins), &env, Some(INSTALL_TIMEOUT))?;
    let out = command::run(&query_argv(root, pins), &env, Some(UPDATE_TIMEOUT))?;
    check_installed(&out, pins).map_err(|reason| OsError::Malformed { path: root.join("var/lib/dpkg/status"), reason })
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
    fn checks_every_pinned_version() {
        let ok = "openssl\t3.0.11-1~deb12u2\tii \nlibssl3\t3.0.11-1~deb12u2\tii \n";
        assert_eq!(check_installed(ok, &pins()), Ok(()));
        let old = "openssl\t3.0.9-1\tii \nlibssl3\t3.0.11-1~deb12u2\tii \n";
        assert_eq!(
            check_installed(old, &pins()).expect_err("old"),
            "openssl is 3.0.9-1 (ii), the patch names 3.0.11-1~deb12u2"
        );
        let half = "openssl\t3.0.11-1~deb12u2\tiU \n";
        let e = check_installed(half, &pins()).expect_err("half");
        assert!(e.contains("(iU)") && e.contains("libssl3 is not installed"), "{e}");
    }
}
