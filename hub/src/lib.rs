//! upkeep-hub: the control plane.
//!
//! Code map: `config` (hub.toml), `pki` (fleet CA and certificates), `store` (trait Store, SQLite default),
//! `fleet` (live sessions + inventory), `engine` (update runs), `maintenance` (channel rollouts, reboots),
//! `executor` (the one node-work executor every disruption goes through), `ledger` (the one table of nodes out
//! of service), `cluster` (hub replicas: one leader, fenced), `grpc` (thin adapters, one error -> Status map),
//! `server` (the mTLS shell), `cli` (upkeepctl).
//! Decisions live in upkeep-core; this crate persists, then acts.

pub mod artifacts;
pub mod certstatus;
pub mod cli;
pub mod client_verifier;
pub mod cluster;
pub mod config;
pub mod counters;
pub mod door;
pub mod engine;
pub mod executor;
pub mod fleet;
pub mod grpc;
pub mod image_tools;
pub mod join;
pub mod ledger;
pub mod maintenance;
pub mod memory;
pub mod metrics;
pub mod outbox;
pub mod peers;
pub mod pki;
pub mod relay;
pub mod reports;
pub mod revocation;
pub mod schedule;
pub mod server;
pub mod store;
pub mod webhooks;
