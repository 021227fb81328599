//! Debian pieces the package-manager system tests share: a root with unattended-upgrades, stand-in .debs,
//! flat apt repositories with a named origin, and commands in a chroot.

use crate::system::{rootfs_tarball, run_ok};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Fails with what is missing when not root or when one of `tools` (tool, apt package) is not on PATH.
pub fn require_root_and(tools: &[(&str, &str)]) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|l| l.split_whitespace().nth(1));
    let mut missing = Vec::new();
    if euid != Some("0") {
        missing.push("root (chroot, dpkg and rpm need it)".to_string());
    }
    let path: Vec<PathBuf> = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    for (tool, package) in tools {
        if !path.iter().any(|d| d.join(tool).is_file()) {
            missing.push(format!("{tool} (apt-get install {package})"));
        }
    }
    assert!(missing.is_empty(), "system test prerequisites missing: {}. Run scripts/deps.", missing.join(", "));
}

/// Runs `script` with `sh -ec`; its stdout.
pub fn sh(script: &str) -> String {
    String::from_utf8_lossy(&run_ok(Command::new("sh").args(["-ec", script])).stdout).into_owned()
}

/// Runs `argv` in a chroot at `root` (non-interactive apt); its stdout.
pub fn chroot(root: &Path, argv: &[&str]) -> String {
    let out = run_ok(Command::new("chroot").arg(root).args(argv).env("DEBIAN_FRONTEND", "noninteractive"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The installed version of `pkg` in the Debian root `root`.
pub fn installed(root: &Path, pkg: &str) -> String {
    chroot(root, &["dpkg-query", "-W", "-f=${Version}", pkg])
}

/// The Debian root with unattended-upgrades (`bookworm-channels.tar.zst`), cached next to the nspawn root and
/// built from it when missing (~30 s). Built under a temporary name and renamed, so a concurrent or interrupted
/// build never leaves a torn cache.
pub fn channels_rootfs() -> PathBuf {
    let base = rootfs_tarball();
    let cache = base.parent().expect("the cached rootfs is in a directory").to_path_buf();
    let tarball = cache.join("bookworm-channels.tar.zst");
    if tarball.is_file() {
        return tarball;
    }
    let work = tempfile::Builder::new().prefix("channels-build.").tempdir_in(&cache).expect("tempdir in the cache");
    let root = work.path().join("root");
    std::fs::create_dir_all(&root).expect("mkdir");
    run_ok(Command::new("tar").arg("--zstd").arg("-xf").arg(&base).arg("-C").arg(&root));
    std::fs::copy("/etc/resolv.conf", root.join("etc/resolv.conf")).expect("resolv.conf for the mirror");
    chroot(&root, &["apt-get", "-q", "update"]);
    chroot(&root, &["apt-get", "install", "-y", "-q", "--no-install-recommends", "unattended-upgrades"]);
    sh(&format!(
        "rm -rf {r}/var/lib/apt/lists/* {r}/var/cache/apt/archives/*.deb; \
         tar -C {r} --numeric-owner -cf - . | zstd -q -T0 -3 -o {w}/out.tar.zst; mv {w}/out.tar.zst {t}",
        r = root.display(),
        w = work.path().display(),
        t = tarball.display()
    ));
    tarball
}

/// Builds the stand-in package `name` at `version` as a .deb into `dir` (it holds only a version file);
/// `description` says what it stands in for. With `reboot_flag` its postinst touches Debian's reboot-required
/// flag, as a kernel or libc update would.
pub fn build_deb(dir: &Path, name: &str, version: &str, description: &str, reboot_flag: bool) {
    let tree = dir.join(format!("tree-{name}-{version}"));
    std::fs::create_dir_all(tree.join("DEBIAN")).expect("mkdir");
    std::fs::create_dir_all(tree.join(format!("usr/share/{name}"))).expect("mkdir");
    std::fs::write(
        tree.join("DEBIAN/control"),
        format!(
            "Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: upkeep tests <t@example.invalid>\n\
             Description: {description}\n"
        ),
    )
    .expect("control");
    if reboot_flag {
        let p = tree.join("DEBIAN/postinst");
        std::fs::write(&p, "#!/bin/sh\nset -e\nmkdir -p /var/run\ntouch /var/run/reboot-required\n").expect("postinst");
        run_ok(Command::new("chmod").arg("755").arg(&p));
    }
    std::fs::write(tree.join(format!("usr/share/{name}/version")), format!("{version}\n")).expect("payload");
    run_ok(
        Command::new("dpkg-deb").args(["--build", "-Zgzip"]).arg(&tree).arg(dir.join(format!("{name}_{version}.deb"))),
    );
    std::fs::remove_dir_all(&tree).expect("rm tree");
}

/// Turns `dir` into a flat apt repository whose Release file names the given origin.
pub fn flat_repo(dir: &Path, origin: &str, label: &str, codename: &str) {
    sh(&format!(
        "cd {d}; dpkg-scanpackages -m . > Packages 2>/dev/null; \
         printf 'Origin: {origin}\\nLabel: {label}\\nSuite: {codename}\\nCodename: {codename}\\nDate: %s\\nSHA256:\\n %s %s Packages\\n' \
         \"$(date -Ru)\" \"$(sha256sum Packages | cut -d' ' -f1)\" \"$(stat -c %s Packages)\" > Release",
        d = dir.display()
    ));
}
