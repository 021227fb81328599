//! Tidy checks: architectural invariants that a grep can verify (see ARCHITECTURE.md).

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Lines of non-comment code containing `needle`, as `path:line`.
fn offenders(dir: &Path, needles: &[&str], allow: impl Fn(&Path) -> bool) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(dir, &mut files);
    let mut hits = Vec::new();
    for f in files.iter().filter(|f| !allow(f)) {
        let text = std::fs::read_to_string(f).expect("read");
        for (i, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for n in needles {
                if code.contains(n) {
                    hits.push(format!("{}:{}: {n}", f.display(), i + 1));
                }
            }
        }
    }
    hits
}

#[test]
fn core_is_pure() {
    let hits = offenders(
        &workspace().join("core/src"),
        &["std::fs", "std::process", "std::net", "tokio", "Utc::now", "SystemTime::now", "Local::now", "rand::"],
        |_| false,
    );
    assert!(hits.is_empty(), "core must do no I/O and never read the clock:\n{}", hits.join("\n"));
}

#[test]
fn agent_commands_only_in_os() {
    let os_dir = workspace().join("agent/src/os");
    let hits =
        offenders(&workspace().join("agent/src"), &["Command::new", "process::Command"], |p| p.starts_with(&os_dir));
    assert!(hits.is_empty(), "agent side effects go through NodeOs (agent/src/os):\n{}", hits.join("\n"));
}

#[test]
fn tidy_check_can_fail() {
    // The checker itself must find a planted offender, or the two checks above prove nothing.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("x.rs"), "fn f() { let _ = std::fs::read(\"x\"); }\n// std::net in a comment\n")
        .expect("write");
    let hits = offenders(dir.path(), &["std::fs", "std::net"], |_| false);
    assert_eq!(hits.len(), 1, "{hits:?}");
}
