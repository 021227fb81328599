//! upkeep-bench: the load generator and benchmarks of issue 8 (run by the `upkeep-bench` binary; nothing here
//! runs under `cargo test` except unit tests of the pure helpers).
//!
//! Code map: `measure` (/proc parsing, percentiles, handoff pairing: pure), `certs` (cached node
//! certificates), `hubproc` (the real hub as a child process), `sim` (simulated agents speaking the real
//! protocol over mTLS), `scenarios` (the five scenarios), `slotwrite` (the agent's raw slot write against dd,
//! issue 14), `pg` (a throwaway PostgreSQL cluster), `storecmp` (commit_run on SQLite against PostgreSQL) and
//! `replicas` (agents spread over hub replicas on one database), both issue 16, `report` (table + JSON).
//! Method and latest figures: BENCHMARKS.md at the repository root.

pub mod certs;
pub mod hubproc;
pub mod measure;
pub mod pg;
pub mod replicas;
pub mod report;
pub mod scenarios;
pub mod sim;
pub mod slotwrite;
pub mod storecmp;
