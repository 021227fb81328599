//! Reading a process's footprint from `/proc` and summarising samples.
//!
//! The parsers are pure and unit-tested on captured text; `sample` is the thin reader around them. Nothing
//! here decides pass or fail: figures are reported against targets, never asserted.

use anyhow::Context;
use std::time::Instant;

/// One reading of a process.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    /// When it was taken.
    pub at: Instant,
    /// Resident set size, KiB (`VmRSS`).
    pub rss_kib: u64,
    /// Peak resident set size, KiB (`VmHWM`).
    pub hwm_kib: u64,
    /// User + system CPU time, clock ticks (`/proc/PID/stat` fields 14 and 15).
    pub cpu_ticks: u64,
    /// Voluntary context switches summed over all threads (each one is a sleep: a wakeup follows).
    pub voluntary_ctxt: u64,
    /// Involuntary context switches summed over all threads.
    pub involuntary_ctxt: u64,
    /// Number of threads.
    pub threads: u64,
}

/// The value of a `Key:   123 kB` line in `/proc/PID/status`, in the file's unit (kB for sizes).
pub fn status_value(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let (k, rest) = line.split_once(':')?;
        if k != key {
            return None;
        }
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// User + system CPU ticks from the text of `/proc/PID/stat`. The command name (field 2) may contain spaces
/// and parentheses, so fields are counted after the last `)`.
pub fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the command: field 3 (state) is index 0, so utime (14) is index 11 and stime (15) index 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second for `/proc/PID/stat` CPU times (USER_HZ; 100 on every Linux ABI in use).
pub fn clk_tck() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as u64,
        _ => 100,
    }
}

/// Reads `/proc/PID/status`, `/proc/PID/stat` and every thread's context switches.
pub fn sample(pid: u32) -> anyhow::Result<ProcSample> {
    let at = Instant::now();
    let base = format!("/proc/{pid}");
    let status = std::fs::read_to_string(format!("{base}/status")).with_context(|| format!("reading {base}/status"))?;
    let stat = std::fs::read_to_string(format!("{base}/stat")).with_context(|| format!("reading {base}/stat"))?;
    let (mut voluntary_ctxt, mut involuntary_ctxt) = (0, 0);
    if let Ok(tasks) = std::fs::read_dir(format!("{base}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("status")) {
                voluntary_ctxt += status_value(&s, "voluntary_ctxt_switches").unwrap_or(0);
                involuntary_ctxt += status_value(&s, "nonvoluntary_ctxt_switches").unwrap_or(0);
            }
        }
    }
    Ok(ProcSample {
        at,
        rss_kib: status_value(&status, "VmRSS").unwrap_or(0),
        hwm_kib: status_value(&status, "VmHWM").unwrap_or(0),
        cpu_ticks: stat_cpu_ticks(&stat).with_context(|| format!("{base}/stat: no utime/stime"))?,
        voluntary_ctxt,
        involuntary_ctxt,
        threads: status_value(&status, "Threads").unwrap_or(0),
    })
}

/// Context switches (voluntary, involuntary) of each thread of `pid` now, by thread id.
pub fn thread_switches(pid: u32) -> Vec<(u32, u64, u64)> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let Some(tid) = t.file_name().to_str().and_then(|n| n.parse().ok()) else { continue };
            if let Ok(s) = std::fs::read_to_string(t.path().join("status")) {
                let vol = status_value(&s, "voluntary_ctxt_switches").unwrap_or(0);
                let invol = status_value(&s, "nonvoluntary_ctxt_switches").unwrap_or(0);
                out.push((tid, vol, invol));
            }
        }
    }
    out
}

/// Context switches of every thread seen over a window. Summing the live threads at its two ends loses every
/// switch of a thread that exits in between (a tokio blocking thread ends 10 s after its last job) and can even
/// come out negative; here an exited thread keeps its last reading and one born after the first reading counts
/// from zero. What is lost: the switches of a thread after its last reading (at most one sampling period).
#[derive(Debug, Default)]
pub struct SwitchTally {
    first: std::collections::BTreeMap<u32, (u64, u64)>,
    last: std::collections::BTreeMap<u32, (u64, u64)>,
    readings: u64,
}

impl SwitchTally {
    /// Adds one reading (`thread_switches`).
    pub fn record(&mut self, threads: &[(u32, u64, u64)]) {
        for &(tid, vol, invol) in threads {
            if self.readings == 0 {
                self.first.insert(tid, (vol, invol));
            }
            self.last.insert(tid, (vol, invol));
        }
        self.readings += 1;
    }

    /// (voluntary, involuntary) switches over the window, all threads.
    pub fn totals(&self) -> (u64, u64) {
        self.last.iter().fold((0, 0), |(v, i), (tid, &(lv, li))| {
            let (fv, fi) = self.first.get(tid).copied().unwrap_or((0, 0));
            (v + lv.saturating_sub(fv), i + li.saturating_sub(fi))
        })
    }

    /// Threads seen at any reading.
    pub fn threads_seen(&self) -> usize {
        self.last.len()
    }
}

/// CPU use between two samples in percent of one core (200 % = both cores of a 2-core machine).
pub fn cpu_percent(a: &ProcSample, b: &ProcSample, ticks_per_second: u64) -> f64 {
    let secs = b.at.duration_since(a.at).as_secs_f64();
    if secs <= 0.0 || ticks_per_second == 0 {
        return 0.0;
    }
    let cpu = b.cpu_ticks.saturating_sub(a.cpu_ticks) as f64 / ticks_per_second as f64;
    100.0 * cpu / secs
}

/// CPU seconds between two samples.
pub fn cpu_seconds(a: &ProcSample, b: &ProcSample, ticks_per_second: u64) -> f64 {
    b.cpu_ticks.saturating_sub(a.cpu_ticks) as f64 / ticks_per_second.max(1) as f64
}

/// The `p`-th percentile (0..=100) of `values` by the nearest-rank method; None when empty.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v: Vec<f64> = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p.clamp(0.0, 100.0) / 100.0) * v.len() as f64).ceil() as usize;
    v.get(rank.clamp(1, v.len()) - 1).copied()
}

/// Handoff latencies inside one group whose members run at most `slots` at a time, in declared order: the
/// k-th completion (in time order) frees the slot the (k + slots)-th start takes. `done` and `starts` are
/// times in ms; pairs whose start precedes its completion (clock noise, or a member that needed no work) are
/// dropped. Returns start − done for every pair.
pub fn slot_handoffs(done: &[f64], starts: &[f64], slots: usize) -> Vec<f64> {
    let mut d: Vec<f64> = done.to_vec();
    let mut s: Vec<f64> = starts.to_vec();
    d.sort_by(f64::total_cmp);
    s.sort_by(f64::total_cmp);
    s.iter()
        .skip(slots.max(1))
        .zip(d.iter())
        .filter(|(start, done)| start >= done)
        .map(|(start, done)| start - done)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tupkeep-agent\nState:\tS (sleeping)\nThreads:\t1\nVmHWM:\t    6100 kB\n\
VmRSS:\t    5872 kB\nvoluntary_ctxt_switches:\t42\nnonvoluntary_ctxt_switches:\t3\n";

    #[test]
    fn status_values_by_key() {
        assert_eq!(status_value(STATUS, "VmRSS"), Some(5872));
        assert_eq!(status_value(STATUS, "VmHWM"), Some(6100));
        assert_eq!(status_value(STATUS, "voluntary_ctxt_switches"), Some(42));
        assert_eq!(status_value(STATUS, "nonvoluntary_ctxt_switches"), Some(3));
        assert_eq!(status_value(STATUS, "Threads"), Some(1));
        assert_eq!(status_value(STATUS, "VmSwap"), None);
    }

    #[test]
    fn stat_fields_counted_after_the_command_name() {
        // A command name with spaces and a parenthesis must not shift the fields.
        let stat = "1234 (we ird) name) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 70 0 0 20 0 1 0 100 1000 200";
        assert_eq!(stat_cpu_ticks(stat), Some(320));
        assert_eq!(stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[7.0, 1.0, 3.0], 50.0), Some(3.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn handoffs_pair_completions_with_the_start_they_free() {
        // Two slots: members start at 0 and 0; the first to finish (10) lets the third start (12), the second
        // (20) the fourth (21).
        let h = slot_handoffs(&[20.0, 10.0, 40.0, 50.0], &[0.0, 0.0, 12.0, 21.0], 2);
        assert_eq!(h, vec![2.0, 1.0]);
        // One slot: strictly sequential.
        assert_eq!(slot_handoffs(&[5.0, 9.0], &[0.0, 6.0], 1), vec![1.0]);
        assert!(slot_handoffs(&[5.0], &[0.0], 1).is_empty());
    }

    #[test]
    fn a_thread_that_exits_keeps_its_switches_and_a_new_one_counts_from_zero() {
        let mut t = SwitchTally::default();
        t.record(&[(1, 10, 1), (2, 12, 0)]);
        t.record(&[(1, 11, 1), (2, 15, 0)]);
        // Thread 2 has exited; thread 3 was born.
        t.record(&[(1, 13, 2), (3, 4, 0)]);
        assert_eq!(t.totals(), (3 + 3 + 4, 1));
        assert_eq!(t.threads_seen(), 3);
    }
}
