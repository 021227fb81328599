//! The other hub replicas, as the fleet sees them: what a replica tells the others and asks of them. The fleet
//! and the API call this trait; `crate::relay::Relay` implements it through the shared database. A single hub has
//! no peers.

use crate::store::view::ViewChange;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use upkeep_proto::v1;

/// Where to send something for a node whose session is on another replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteSession {
    /// The replica holding it.
    pub replica: String,
    /// That replica's start.
    pub instance: u64,
    /// The session's id there.
    pub session: u64,
    /// Silent on it since (Unix ms), if it is.
    pub silent_since_ms: Option<i64>,
}

/// An operator's request for node work, which only the leader carries out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OperatorAsk {
    /// `upkeepctl node reboot`.
    Reboot {
        /// The node.
        node: String,
        /// Outside the window.
        force: bool,
        /// Who asked.
        operator: String,
    },
    /// `upkeepctl node uncordon`.
    Uncordon {
        /// The node.
        node: String,
        /// Who asked.
        operator: String,
    },
}

/// Why the leader refused an operator's request (as `maintenance::LeaseError` says it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AskRefused {
    /// No such node.
    NoSuchNode(String),
    /// The node is not connected.
    NotConnected(String),
    /// Refused, or failed.
    Denied(String),
}

/// How long an operator's request passed to the leader may wait for its answer.
pub const ASK_WITHIN: Duration = Duration::from_secs(300);

/// The answer to an operator's request passed to the leader.
pub type Asked<'a> = Pin<Box<dyn Future<Output = Result<String, AskRefused>> + Send + 'a>>;

/// What one replica tells the others, and asks of the leader.
pub trait Peers: Send + Sync {
    /// A session of `node` opened here.
    fn session_opened(&self, node: &str, session: u64);
    /// A session of `node` here ended.
    fn session_closed(&self, node: &str, session: u64);
    /// Whether `node`'s session here is silent now (`since`: since when); told when it changes.
    fn session_silence(&self, node: &str, session: u64, since: Option<i64>);
    /// The planner's view changed through this replica.
    fn view_changed(&self, change: ViewChange);
    /// `member`'s desired configuration changed: every replica pushes it to its sessions.
    fn member_config(&self, member: &str);
    /// Sends `command` to `node` on its session on another replica.
    fn command(&self, at: &RemoteSession, node: &str, command: &v1::Command);
    /// A result read here for a command the leader sent.
    fn result(&self, node: &str, result: &v1::OperationResult);
    /// A lease request read here, for the leader's lease desk (the answer comes back on `session`).
    fn lease_request(&self, node: &str, session: u64, request: &v1::LeaseRequest);
    /// A lease release read here, for the leader's lease desk.
    fn lease_release(&self, node: &str, release: &v1::LeaseRelease);
    /// Events of `run` after `after` were committed here.
    fn run_events(&self, run: &str, after: u64);
    /// Where `node`'s session is, when it is on another replica that is alive.
    fn remote(&self, node: &str) -> Option<RemoteSession>;
    /// Passes an operator's request for node work to the leader and waits (at most `within`) for its answer.
    fn ask_leader(&self, ask: OperatorAsk, within: Duration) -> Asked<'_>;
    /// Stops telling and listening (what was told before is delivered first).
    fn stop(&self);
}
