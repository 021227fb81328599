//! The four packages as a distribution would check them (issue 15): lintian on the .debs, rpmlint on the .rpms,
//! both from Debian's own packages (scripts/deps installs them). Packages come from the debug build
//! (`scripts/package --profile dev --no-build`, stripped), as in the other system tests; the release packages
//! are the same files around other binaries (packaging/README.md says how to lint those by hand).
//!
//! Fails on any lintian error or warning (its false positives are overridden in the packages, each with its
//! reason: packaging/deb/*/lintian-overrides) and on any rpmlint error (packaging/rpm/rpmlint.toml filters its
//! false positives, each with its reason; the warnings it leaves are printed). Because those configurations
//! silence two checks that matter here, the test checks them itself: every binary has its man page, and the
//! changelog's newest entry is this version.

use std::path::{Path, PathBuf};
use std::process::Command;
use upkeep_tests::system::{on_path, workspace};

/// Every binary each package ships: each must have a man page of its own name.
const BINARIES: &[(&str, &[&str])] =
    &[("upkeep-agent", &["upkeep-agent"]), ("upkeep-hub", &["upkeep-hub", "upkeepctl"])];

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Lines of `output` that report a finding of one of `levels` ("E", "W"): lintian prints `E: pkg: tag`,
/// rpmlint `pkg.arch: E: tag`.
fn findings(output: &str, levels: &[&str]) -> Vec<String> {
    output
        .lines()
        .filter(|l| levels.iter().any(|lv| l.starts_with(&format!("{lv}: ")) || l.contains(&format!(": {lv}: "))))
        .map(str::to_string)
        .collect()
}

fn packages(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read package dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    files.sort();
    assert_eq!(files.len(), 2, "expected upkeep-agent and upkeep-hub *{suffix} in {}: {files:?}", dir.display());
    files
}

fn workspace_version() -> String {
    let manifest = std::fs::read_to_string(workspace().join("Cargo.toml")).expect("Cargo.toml");
    let package = manifest.split("[workspace.package]").nth(1).expect("[workspace.package]");
    let line = package.lines().find(|l| l.starts_with("version")).expect("workspace version");
    line.split('"').nth(1).expect("quoted version").to_string()
}

#[test]
fn packages_pass_lintian_and_rpmlint() {
    for (tool, fix) in [("lintian", "apt-get install lintian"), ("rpmlint", "apt-get install rpmlint")] {
        assert!(on_path(tool), "{tool} is missing ({fix}); run scripts/deps");
    }
    let dist = tempfile::tempdir().expect("tempdir");
    let (ok, log) = run(Command::new(workspace().join("scripts/package"))
        .args(["--profile", "dev", "--no-build", "--out"])
        .arg(dist.path()));
    assert!(ok, "scripts/package failed:\n{log}");

    let mut failures = Vec::new();
    for deb in packages(dist.path(), ".deb") {
        let (_, out) = run(Command::new("lintian").arg(&deb));
        println!("lintian {}:\n{out}", deb.display());
        failures.extend(findings(&out, &["E", "W"]));
    }
    let config = workspace().join("packaging/rpm/rpmlint.toml");
    for rpm in packages(dist.path(), ".rpm") {
        let (_, out) = run(Command::new("rpmlint").arg("-c").arg(&config).arg(&rpm));
        println!("rpmlint {}:\n{out}", rpm.display());
        failures.extend(findings(&out, &["E"]));
        assert!(out.contains("packages and 0 specfiles checked"), "rpmlint did not check {}:\n{out}", rpm.display());
    }
    assert!(failures.is_empty(), "lintian/rpmlint report:\n{}", failures.join("\n"));

    // Man pages, which rpmlint 2.4 cannot see (see rpmlint.toml): one per binary, gzipped, in both formats.
    for (package, binaries) in BINARIES {
        let deb = packages(dist.path(), ".deb").into_iter().find(|p| p.to_string_lossy().contains(package));
        let rpm = packages(dist.path(), ".rpm").into_iter().find(|p| p.to_string_lossy().contains(package));
        let (_, deb_files) = run(Command::new("dpkg-deb").arg("--contents").arg(deb.expect("deb")));
        let (_, rpm_files) = run(Command::new("rpm").arg("-qpl").arg(rpm.expect("rpm")));
        for bin in *binaries {
            let page = format!("/usr/share/man/man1/{bin}.1.gz");
            assert!(deb_files.contains(&format!(".{page}")), "{package}.deb lacks {page}:\n{deb_files}");
            assert!(rpm_files.lines().any(|l| l == page), "{package}.rpm lacks {page}:\n{rpm_files}");
        }
    }

    // The changelog both formats ship starts with this version (lintian does not compare them).
    let changelog = std::fs::read_to_string(workspace().join("packaging/changelog")).expect("packaging/changelog");
    let first = changelog.lines().next().unwrap_or_default();
    let want = format!("upkeep ({}-1) ", workspace_version());
    assert!(first.starts_with(&want), "packaging/changelog starts with {first:?}; add an entry {want:?}");
}
