//! The write-ahead journal of node operations, one JSON file per operation under `<state_dir>/journal/`,
//! each written atomically (temp, fsync, rename, fsync of the directory). The engine records the step it is
//! about to perform before performing it, and the result before it reports it; after a restart or a reboot
//! an operation resumes from its journalled step. Finished entries are kept so that a repeated operation id
//! gets its first result.

use crate::os::Slot;
use crate::state::{StateError, write_atomic};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Journal directory inside the state directory.
pub const JOURNAL_DIR: &str = "journal";

/// What an operation does, as journalled (the wire command, decoded and checked).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Op {
    /// Mark unschedulable.
    Cordon,
    /// Mark schedulable.
    Uncordon,
    /// Evict workloads.
    Drain {
        /// Seconds.
        timeout_seconds: u32,
        /// Ignore disruption budgets: delete instead of evict (the member's undrainable policy is Force).
        #[serde(default)]
        force: bool,
    },
    /// Reboot.
    Reboot {
        /// Outside the window.
        force: bool,
    },
    /// Reimage.
    Reimage {
        /// Image family.
        family: String,
        /// Image version.
        version: String,
        /// https URL (empty: from the hub).
        url: String,
        /// Content address.
        sha256: String,
        /// Detached signature text.
        signature: String,
        /// Announced size (0: unknown).
        size_bytes: u64,
        /// A lower version may be installed.
        allow_downgrade: bool,
        /// Write it even when the node already runs this version (a channel switch reimages to the current image).
        #[serde(default)]
        reinstall: bool,
    },
    /// Install a security patch: exactly these packages.
    ApplySecurityPatch {
        /// Image family the patch is for.
        family: String,
        /// Patch version, `YYYYMM.DD.N`.
        version: String,
        /// `name=version` pins.
        packages: Vec<String>,
    },
    /// A reboot under a lease the hub granted (asked for by this node, or granted by an operator): cordon,
    /// drain, reboot, health, uncordon, give the lease back. Its operation id is `lease/<lease_id>`.
    LeasedReboot {
        /// The lease, as the hub knows it (released when the operation ends, whatever the outcome).
        lease_id: String,
        /// Granted by an operator outside the window (`upkeepctl node reboot --force`).
        forced: bool,
    },
    /// Install the node's Kubernetes packages at a version, then run the configured upgrade hook.
    UpgradeKubernetes {
        /// Target version `MAJOR.MINOR.PATCH` (checked, without a leading `v`).
        version: String,
        /// The member's first control-plane node: runs `upgrade_first_control_plane` instead of `upgrade_other`.
        first_control_plane: bool,
    },
}

impl Op {
    /// The kind, as reported.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Cordon => "cordon",
            Op::Uncordon => "uncordon",
            Op::Drain { .. } => "drain",
            Op::Reboot { .. } => "reboot",
            Op::Reimage { .. } => "reimage",
            Op::ApplySecurityPatch { .. } => "apply-security-patch",
            Op::LeasedReboot { .. } => "leased-reboot",
            Op::UpgradeKubernetes { .. } => "upgrade-kubernetes",
        }
    }
}

/// The step an operation is at: the one to perform next (or being performed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// Recorded; nothing done yet. Reimage: local checks (rolled back before, downgrade, keys).
    Accepted,
    /// Reimage: download to staging, verify digest and signature.
    Fetch,
    /// Reimage: write the inactive slot.
    Write,
    /// Reimage: mark the new slot boot-once.
    Mark,
    /// Reboot (reimage or reboot): if the boot id is still the recorded one, reboot.
    Reboot,
    /// After the boot: the booted slot, the hub reachable, the health commands.
    Health,
    /// Reimage: make the new slot the default. Security patch: record the patch version.
    Commit,
    /// Reimage: return to the previous slot (the failure is in `failure`).
    FallBack,
    /// Single-step operations (cordon, uncordon, drain): do it. Security patch: install the packages.
    Act,
    /// Leased reboot: mark the node unschedulable.
    Cordon,
    /// Leased reboot: evict workloads (then the boot id is recorded for the reboot step).
    Drain,
    /// Leased reboot: make the node schedulable again (best effort after a failure, kept in `failure`).
    Uncordon,
    /// Leased reboot: give the lease back to the hub; then the operation finishes.
    Release,
    /// Kubernetes version (after `Act` installed the packages): run the upgrade hook, check the version.
    Hook,
    /// Finished: `result` is set.
    Done,
}

impl Step {
    /// As reported in OperationState.step.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Accepted => "accepted",
            Step::Fetch => "fetch",
            Step::Write => "write",
            Step::Mark => "mark",
            Step::Reboot => "reboot",
            Step::Health => "health",
            Step::Commit => "commit",
            Step::FallBack => "fall-back",
            Step::Act => "act",
            Step::Cordon => "cordon",
            Step::Drain => "drain",
            Step::Uncordon => "uncordon",
            Step::Release => "release",
            Step::Hook => "hook",
            Step::Done => "done",
        }
    }
}

/// The final result of an operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// Succeeded.
    pub ok: bool,
    /// Why not.
    pub error: String,
    /// When, Unix ms.
    pub finished_at_unix_ms: i64,
}

/// One journalled operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The hub's operation id.
    pub operation_id: String,
    /// The command's generation.
    pub generation: u64,
    /// What to do.
    pub op: Op,
    /// Where it is.
    pub step: Step,
    /// Reimage: the slot being written and booted.
    pub target: Option<Slot>,
    /// Reimage: the slot it came from (fall back target).
    pub previous: Option<Slot>,
    /// Boot id recorded when the reboot step was journalled (a different one means the reboot happened).
    pub boot_id: Option<String>,
    /// Reimage: why it is falling back. Leased reboot: why it is uncordoning and releasing early.
    pub failure: Option<String>,
    /// Reboots asked for at the reboot step (journalled before each), to stop a node that never seems to boot.
    #[serde(default)]
    pub reboots: u32,
    /// Set once finished.
    pub result: Option<Outcome>,
}

impl Entry {
    /// A command just accepted: journalled before its first step runs.
    pub fn accepted(operation_id: impl Into<String>, generation: u64, op: Op) -> Entry {
        Entry {
            operation_id: operation_id.into(),
            generation,
            op,
            step: Step::Accepted,
            target: None,
            previous: None,
            boot_id: None,
            failure: None,
            reboots: 0,
            result: None,
        }
    }
}

/// The journal: entries by operation id, mirrored on disk.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    entries: BTreeMap<String, Entry>,
}

fn file_name(id: &str) -> String {
    let safe = !id.is_empty()
        && id.len() <= 120
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !id.starts_with('.');
    if safe { format!("{id}.json") } else { format!("x-{}.json", crate::os::slots::hex(id.as_bytes())) }
}

impl Journal {
    /// Loads every entry under `state_dir/journal`. An unreadable entry is an error naming its file.
    pub fn open(state_dir: &Path) -> Result<Journal, StateError> {
        let dir = state_dir.join(JOURNAL_DIR);
        std::fs::create_dir_all(&dir).map_err(|source| StateError::Io { path: dir.clone(), source })?;
        let mut entries = BTreeMap::new();
        let listing = std::fs::read_dir(&dir).map_err(|source| StateError::Io { path: dir.clone(), source })?;
        for e in listing {
            let p = e.map_err(|source| StateError::Io { path: dir.clone(), source })?.path();
            if p.extension().is_none_or(|x| x != "json") {
                continue; // leftover temp files of a torn write
            }
            let bytes = std::fs::read(&p).map_err(|source| StateError::Io { path: p.clone(), source })?;
            let entry: Entry = serde_json::from_slice(&bytes)
                .map_err(|e| StateError::Corrupt { path: p.clone(), reason: e.to_string() })?;
            entries.insert(entry.operation_id.clone(), entry);
        }
        Ok(Journal { dir, entries })
    }

    /// The entry of `id`.
    pub fn get(&self, id: &str) -> Option<&Entry> {
        self.entries.get(id)
    }

    /// The newest generation of any operation recorded.
    pub fn newest_generation(&self) -> u64 {
        self.entries.values().map(|e| e.generation).max().unwrap_or(0)
    }

    /// Every entry, finished or not, by operation id.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// Entries not finished.
    pub fn unfinished(&self) -> Vec<Entry> {
        self.entries.values().filter(|e| e.result.is_none()).cloned().collect()
    }

    /// Writes `entry` durably, then holds it.
    pub fn put(&mut self, entry: Entry) -> Result<(), StateError> {
        let path = self.dir.join(file_name(&entry.operation_id));
        let bytes = serde_json::to_vec_pretty(&entry)
            .map_err(|e| StateError::Corrupt { path: path.clone(), reason: e.to_string() })?;
        write_atomic(&path, &bytes)?;
        self.entries.insert(entry.operation_id.clone(), entry);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, generation: u64) -> Entry {
        Entry::accepted(id, generation, Op::Drain { timeout_seconds: 30, force: false })
    }

    #[test]
    fn survives_a_reopen_and_names_a_corrupt_file() {
        let d = tempfile::tempdir().expect("tempdir");
        let mut j = Journal::open(d.path()).expect("open");
        j.put(entry("run-1/member-x/node-1/drain", 4)).expect("put");
        let mut e = entry("op.2", 7);
        e.step = Step::Done;
        e.result = Some(Outcome { ok: true, error: String::new(), finished_at_unix_ms: 1 });
        j.put(e.clone()).expect("put");
        std::fs::write(d.path().join("journal/op.3.tmp"), b"{torn").expect("torn temp");
        let j = Journal::open(d.path()).expect("reopen");
        assert_eq!(j.get("op.2"), Some(&e));
        assert_eq!(j.newest_generation(), 7);
        assert_eq!(j.unfinished().len(), 1);
        assert_eq!(j.unfinished()[0].operation_id, "run-1/member-x/node-1/drain");
        std::fs::write(d.path().join("journal/bad.json"), b"{").expect("corrupt");
        let err = Journal::open(d.path()).expect_err("corrupt");
        assert!(err.to_string().contains("bad.json"), "{err}");
    }
}
