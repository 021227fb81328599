//! upkeep-core: the pure decision logic of upkeep.
//!
//! Everything here is deterministic and does no I/O: no files, processes, sockets, clocks or random numbers.
//! Time and randomness arrive as parameters. The hub and the agent are shells around these functions.

pub mod channel;
pub mod concurrency;
pub mod events;
pub mod forecast;
pub mod ids;
pub mod limits;
pub mod maintenance;
pub mod run;
pub mod schedule;
pub mod signature;
#[cfg(test)]
mod testing;
pub mod version;
pub mod work;
