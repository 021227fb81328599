//! upkeep-proto: the only crate that knows the wire format.
//!
//! `v1` is generated from `proto/upkeep/v1/*.proto` at build time (protox, no protoc). `convert` turns wire
//! messages into checked core types and names the bad field when it cannot; `codec` is the protobuf codec every
//! generated client and server uses (small per-stream buffers).

/// Generated messages and services of package `upkeep.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("upkeep.v1");
}

pub mod codec;
pub mod convert;
pub mod layered;
pub mod service;
pub mod tls;

/// The agent and hub version string carried in reports and welcomes.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// An error and its causes on one line (a cause already said by the one above it is not repeated): how the CLI and
/// the agent report a connection that failed.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s.replace('\n', " ")
}
