//! The README's first command, run to the end without a terminal: it must exit 0 with the run Completed and
//! the nodes it upgraded on the new image.

use std::process::Command;

#[test]
fn the_demo_runs_a_staged_rollout_to_the_end() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
    let out = Command::new(root.join("scripts/demo")).current_dir(root).output().expect("run scripts/demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("demo: run nov-images ended Completed."), "{stdout}");
    // The canary and both prod members of group east were reimaged; member-3 waited for its window.
    let upgraded = stdout.lines().filter(|l| l.contains("Ready") && l.contains("Debian-12-gen2-202312.01.0")).count();
    assert!(upgraded >= 9, "nine nodes on the new image:\n{stdout}");
    assert!(stdout.contains("maintenance window not open; next opening"), "{stdout}");
}

#[test]
fn the_demo_on_postgresql_splits_the_agents_over_two_replicas_and_ends_the_same() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
    let out = Command::new(root.join("scripts/demo"))
        .args(["--store", "postgres"])
        .current_dir(root)
        .output()
        .expect("run scripts/demo --store postgres");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("demo: run nov-images ended Completed."), "{stdout}");
    // The agents are split: each replica held sessions (six each when every agent found its first replica up;
    // an agent that did not moved to the other), and one of the two leads.
    let held: Vec<usize> = ["a", "b"]
        .iter()
        .map(|r| {
            let line = stdout.lines().find(|l| l.starts_with(&format!("replica {r} holds "))).unwrap_or_default();
            line.split_whitespace().nth(3).and_then(|n| n.parse().ok()).unwrap_or(0)
        })
        .collect();
    assert!(held.iter().all(|n| *n >= 1) && held.iter().sum::<usize>() >= 12, "sessions {held:?}:\n{stdout}");
    assert_eq!(stdout.matches(" and leads").count(), 1, "{stdout}");
    let upgraded = stdout.lines().filter(|l| l.contains("Ready") && l.contains("Debian-12-gen2-202312.01.0")).count();
    assert!(upgraded >= 9, "nine nodes on the new image:\n{stdout}");
    // The throwaway database is gone with the demo.
    let left: Vec<_> = std::fs::read_dir("/tmp")
        .expect("/tmp")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("upkeep-demo-pg.") && stdout.contains(n.as_str()))
        .collect();
    assert!(left.is_empty(), "the demo's PostgreSQL directory is removed: {left:?}");
}
