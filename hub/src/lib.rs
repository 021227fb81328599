//! upkeep-hub: the control plane.
//!
//! Code map: `config` (hub.toml), `pki` (fleet CA and certificates), `store` (trait Store, SQLite default),
//! `fleet` (live sessions + inventory), `grpc` (thin adapters, one error -> Status map), `server` (the mTLS
//! shell), `cli` (upkeepctl). Decisions live in upkeep-core; this crate persists, then acts.

pub mod artifacts;
pub mod cli;
pub mod config;
pub mod engine;
pub mod fleet;
pub mod grpc;
pub mod image_tools;
pub mod maintenance;
pub mod pki;
pub mod server;
pub mod store;
