//! Results: a table on stdout and a JSON file under `bench/results/`, each with the machine it ran on.

use anyhow::Context;
use serde::Serialize;
use std::path::Path;

/// One line of the table: what, the figure, and the target it is read against (empty if none).
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What was measured.
    pub metric: String,
    /// The figure, with its unit.
    pub value: String,
    /// The target from issue 8, if any.
    pub target: String,
}

/// A scenario's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// Scenario name (file stem of the JSON).
    pub scenario: String,
    /// The command line that produced it.
    pub command: String,
    /// Unix seconds at the end.
    pub finished_unix_s: u64,
    /// The commit the binaries were built from (`git describe --always --dirty` of the working tree).
    pub commit: String,
    /// The machine.
    pub machine: Machine,
    /// The table.
    pub table: Vec<Row>,
    /// Every figure, machine-readable.
    pub figures: serde_json::Value,
}

/// The machine, as far as /proc tells.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPU model.
    pub cpu: String,
    /// Online CPUs.
    pub cpus: usize,
    /// MemTotal, MiB.
    pub mem_mib: u64,
    /// Kernel release.
    pub kernel: String,
    /// 1-minute load average when the scenario ended (others share this machine).
    pub loadavg_1m: f64,
    /// 1-, 5- and 15-minute load averages when the scenario ended.
    pub loadavg: String,
}

/// The commit of the working tree the bench runs in, `-dirty` when tracked files differ from it.
pub fn commit() -> String {
    std::process::Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown (not a git checkout)".into())
}

/// Reads the machine description.
pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_mib = crate::measure::status_value(&meminfo, "MemTotal").unwrap_or(0) / 1024;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let loadavg_text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let loadavg_1m = loadavg_text.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let loadavg = loadavg_text.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    let cpus = std::thread::available_parallelism().map(|p| p.get()).unwrap_or(0);
    Machine { cpu, cpus, mem_mib, kernel, loadavg_1m, loadavg }
}

/// A row.
pub fn row(metric: impl Into<String>, value: impl Into<String>, target: impl Into<String>) -> Row {
    Row { metric: metric.into(), value: value.into(), target: target.into() }
}

impl Outcome {
    /// Prints the table and writes `<dir>/<scenario>.json`.
    pub fn emit(&self, dir: &Path) -> anyhow::Result<()> {
        let w0 = self.table.iter().map(|r| r.metric.len()).max().unwrap_or(6).max(6);
        let w1 = self.table.iter().map(|r| r.value.len()).max().unwrap_or(5).max(5);
        println!("\n== {} ==  ({}) at {}", self.scenario, self.command, self.commit);
        println!(
            "machine: {} x{}, {} MiB, kernel {}, load {}",
            self.machine.cpu, self.machine.cpus, self.machine.mem_mib, self.machine.kernel, self.machine.loadavg
        );
        println!("{:<w0$}  {:>w1$}  target", "metric", "value");
        for r in &self.table {
            println!("{:<w0$}  {:>w1$}  {}", r.metric, r.value, r.target);
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("{}.json", self.scenario));
        let text = serde_json::to_string_pretty(self).context("encoding results")?;
        std::fs::write(&path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        println!("written: {}", path.display());
        Ok(())
    }
}

/// Formats bytes given in KiB as MiB with one decimal.
pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}
