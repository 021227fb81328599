//! The live fleet: the store plus what only exists while the hub runs (open agent sessions and last-seen
//! times not yet flushed). Handlers call into `Fleet`; `Fleet` persists, then acts (pushes to agents).

use crate::peers::{Peers, RemoteSession};
use crate::revocation::Revocations;
use crate::store::view::Viewed;
use crate::store::{MemberRecord, NodeFacts, NodeRecord, OperationFact, ReportWrite, Store, StoreError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tonic::Status;
use upkeep_proto::v1;

/// How a node is shown, from what the hub has heard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeStatus {
    /// Connected and heard from within its deadline.
    Ready,
    /// Silent past its deadline, or not connected: nobody knows what it is doing.
    Unknown,
}

impl NodeStatus {
    /// Display form.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Ready => "Ready",
            NodeStatus::Unknown => "Unknown",
        }
    }
}

/// Why a command did not produce a result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The waiter was dropped (the hub is shutting down).
    #[error("hub shutting down")]
    NotConnected,
    /// The node stayed disconnected past its silence deadline.
    #[error("node {node} is Unknown: no session for {for_ms} ms")]
    Silent {
        /// The node.
        node: String,
        /// How long it has been gone.
        for_ms: i64,
    },
    /// No result within the deadline.
    #[error("no result within {0:?}")]
    TimedOut(std::time::Duration),
    /// Not sent: the leader term of the sending work is over (`store::fence`).
    #[error("not sent: {0}")]
    Fenced(String),
}

/// How long a node may stay disconnected during a step that reboots it (reimage, reboot, security patch,
/// Kubernetes upgrade) before the step fails with `Silent`: a server's firmware and boot take minutes.
pub const BOOT_GRACE: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// How often a waiting command re-checks the node's session.
const COMMAND_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// Where a command's result goes: the result and the node's report count when it arrived.
type ResultWaiter = tokio::sync::oneshot::Sender<(v1::OperationResult, u64)>;

/// What goes down one agent session: a message, or the status that ends the session. Boxed: a channel allocates
/// its first block of 32 slots up front, and an unboxed `HubMessage` would make that ~7 KiB per idle session.
pub type SessionItem = Result<Box<v1::HubMessage>, Status>;

/// The sending half of one agent session.
pub type SessionTx = mpsc::Sender<SessionItem>;

struct Session {
    id: u64,
    member: String,
    tx: SessionTx,
}

/// Timing the fleet view needs.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Heartbeat interval handed to agents, seconds.
    pub heartbeat_interval_seconds: u32,
    /// Silent for this many intervals = Unknown.
    pub silent_after_heartbeats: u32,
}

/// How stale a node's stored last-seen time may get while the hub hears from it. The hub itself reads the time
/// from memory; the stored one is what `node list` shows after a restart. Storing every heartbeat cost 10k row
/// updates a second at 100k nodes (14 % of the hub's CPU, and the store held ~100 ms each second).
pub const SEEN_STORED_EVERY_MS: i64 = 60_000;

/// Nodes per last-seen transaction.
pub const SEEN_FLUSH_CHUNK: usize = 500;

/// When a node was last heard from, and when that was last queued for the store.
#[derive(Debug, Clone, Copy)]
struct Heard {
    at: i64,
    queued: i64,
}

/// The hub's fleet state.
pub struct Fleet {
    store: Arc<dyn Store>,
    view: Arc<Viewed>,
    sessions: Mutex<HashMap<String, Session>>,
    /// Certificates refused at the door and at session start.
    revocations: Arc<Revocations>,
    /// Last-seen times queued for the store (`touch`, `flush_seen`).
    seen: Mutex<HashMap<String, i64>>,
    next_session: AtomicU64,
    closing: tokio::sync::watch::Sender<bool>,
    /// Operation id -> the node it was sent to and its waiter, which gets the result and the node's report count
    /// when it arrived.
    waiting: Mutex<HashMap<String, (String, ResultWaiter)>>,
    /// When each node was last heard from since this hub started (never drained, unlike `seen`), and when that
    /// was last queued for the store.
    heard: Mutex<HashMap<String, Heard>>,
    /// This hub start's epoch (from the store; a replica takes a new one whenever it becomes the leader): the
    /// high bits of every command generation.
    epoch: AtomicU64,
    /// Where the leader's work (member upgrades, node work) is started (`spawn_work`).
    work: Mutex<WorkPlace>,
    /// Commands sent since this hub started: the low bits of every command generation.
    sent: AtomicU64,
    /// Heartbeats read from agents since the hub started.
    heartbeats: AtomicU64,
    /// Reports recorded per node since the hub started (to wait for the report that follows a result).
    reports: Mutex<HashMap<String, u64>>,
    /// Bumped on every report (wakes waiters).
    report_tick: tokio::sync::watch::Sender<u64>,
    /// Writes node reports to the store in batches (`crate::reports`).
    report_writer: crate::reports::ReportWriter,
    /// Timing settings.
    pub timing: Timing,
    /// What the metrics count as it happens (`metrics::Counters`).
    counters: crate::counters::Counters,
    /// Some webhook exists: node events are worth working out (`crate::webhooks`).
    webhooks_active: std::sync::atomic::AtomicBool,
    /// Hub replicas: the other replicas (`crate::relay` through the database); unset for a single hub.
    relay: std::sync::OnceLock<Arc<dyn Peers>>,
}

/// Where a command for a node goes now.
enum Route {
    /// A session on this hub: its id and sending half.
    Here(u64, SessionTx),
    /// A session on another replica.
    Elsewhere(RemoteSession),
}

impl Route {
    /// Identifies the session (a new one gets the command again).
    fn key(&self) -> (String, u64, u64) {
        match self {
            Route::Here(id, _) => (String::new(), 0, *id),
            Route::Elsewhere(r) => (r.replica.clone(), r.instance, r.session),
        }
    }
}

/// Where leader work is started (`Fleet::spawn_work`).
enum WorkPlace {
    /// A single hub: the caller's runtime.
    Here,
    /// A replica that leads: its leader runtime.
    Leader(tokio::runtime::Handle),
    /// A replica that does not lead: not started.
    Nowhere,
}

/// The current time in Unix milliseconds (the shells read the clock; core never does).
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A command generation is `epoch << GENERATION_EPOCH_SHIFT | n`: every hub start has a new epoch (kept in the
/// store), and `n` counts the commands sent since. So generations grow across restarts for every issuer, and an
/// agent refuses a command older than the newest it has seen. 2^42 is above every Unix-ms time until 2109, so
/// even the first epoch is newer than the start-time generations hubs sent before this scheme.
pub const GENERATION_EPOCH_SHIFT: u32 = 42;

/// Why a result was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResultRefused {
    /// The operation was sent to another node: a node may answer only for itself.
    #[error(
        "node {sender:?} sent a result for operation {operation:?}, which was sent to node {target:?}; a node may \
         answer only its own commands"
    )]
    NotYours {
        /// Who sent the result.
        sender: String,
        /// The operation.
        operation: String,
        /// The node it was sent to.
        target: String,
    },
}

impl Fleet {
    /// A fleet over `store`; advances the store's hub epoch (the fencing of every command this hub sends).
    pub fn new(store: Arc<dyn Store>, timing: Timing) -> Result<Fleet, StoreError> {
        let epoch = store.next_epoch()?;
        let view = Arc::new(Viewed::open(store)?);
        let store: Arc<dyn Store> = view.clone();
        let revocations = Arc::new(Revocations::load(store.clone())?);
        let webhooks_active = std::sync::atomic::AtomicBool::new(!store.list_webhooks()?.is_empty());
        let writes = store.clone();
        let report_writer =
            crate::reports::ReportWriter::new(Box::new(move |b: &[ReportWrite]| writes.record_reports(b)));
        Ok(Fleet {
            report_writer,
            webhooks_active,
            view,
            revocations,
            epoch: AtomicU64::new(epoch),
            work: Mutex::new(WorkPlace::Here),
            sent: AtomicU64::new(0),
            heartbeats: AtomicU64::new(0),
            heard: Mutex::new(HashMap::new()),
            store,
            sessions: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            closing: tokio::sync::watch::channel(false).0,
            waiting: Mutex::new(HashMap::new()),
            reports: Mutex::new(HashMap::new()),
            report_tick: tokio::sync::watch::channel(0).0,
            timing,
            counters: crate::counters::Counters::default(),
            relay: std::sync::OnceLock::new(),
        })
    }

    /// Joins this hub to its replicas through `relay`: sessions, results, lease requests and view changes travel
    /// between them from now on. Set once.
    pub fn set_relay(&self, relay: Arc<dyn Peers>) {
        let sink = relay.clone();
        if self.relay.set(relay).is_ok() {
            self.view.on_change(Box::new(move |change| sink.view_changed(change)));
        }
    }

    /// The relay to the other replicas, if this hub is one of several.
    pub fn relay(&self) -> Option<Arc<dyn Peers>> {
        self.relay.get().cloned()
    }

    /// Sends `msg` on `node`'s session `session` on this hub, if that session is still open (for the relay: a
    /// command or lease answer from the leader).
    pub fn send_on_session(&self, runtime: &tokio::runtime::Handle, node: &str, session: u64, msg: v1::HubMessage) {
        let tx = self.sessions().get(node).filter(|s| s.id == session).map(|s| s.tx.clone());
        match tx {
            Some(tx) => {
                runtime.spawn(async move {
                    let _ = tx.send(Ok(Box::new(msg))).await;
                });
            }
            None => tracing::debug!(node, session, "relayed message for a session that ended; dropped"),
        }
    }

    /// A node reported on another replica (its row and this hub's view hold the report already).
    pub fn reported_elsewhere(&self, node: &str) {
        *self.reports.lock().unwrap_or_else(|e| e.into_inner()).entry(node.to_string()).or_default() += 1;
        self.report_tick.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Tells the other replicas which nodes went silent on their open session here, or were heard again.
    pub fn announce_silences(&self) {
        let Some(relay) = self.relay.get() else { return };
        let now = now_ms();
        let deadline_ms = self.silence_deadline_ms();
        let open: Vec<(String, u64)> = self.sessions().iter().map(|(n, s)| (n.clone(), s.id)).collect();
        for (node, id) in open {
            let heard = self.heard().get(&node).map(|h| h.at);
            let silent = heard.filter(|h| now - h > deadline_ms);
            relay.session_silence(&node, id, silent);
        }
    }

    /// A fresh command generation, newer than every one this hub (or an earlier start of it) sent.
    pub fn next_generation(&self) -> u64 {
        let n = self.sent.fetch_add(1, Ordering::Relaxed) + 1;
        (self.epoch.load(Ordering::SeqCst) << GENERATION_EPOCH_SHIFT) | (n & ((1 << GENERATION_EPOCH_SHIFT) - 1))
    }

    /// Takes a new epoch from the store (a replica that becomes the leader): every command it sends from now on
    /// is newer than every command an earlier leader sent.
    pub fn renew_epoch(&self) -> Result<u64, StoreError> {
        let epoch = self.store.next_epoch()?;
        self.epoch.store(epoch, Ordering::SeqCst);
        self.sent.store(0, Ordering::SeqCst);
        Ok(epoch)
    }

    /// Starts a task of the leader's work (a member upgrade, a piece of node work): on the caller's runtime for a
    /// single hub, on the leader runtime of a replica that leads (its writes carry its term), nowhere on a replica
    /// that does not lead (false: the caller undoes what it noted; the leader picks the work up from the store).
    pub fn spawn_work<F>(&self, work: F) -> bool
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        match &*self.work.lock().unwrap_or_else(|e| e.into_inner()) {
            WorkPlace::Here => {
                tokio::spawn(work);
                true
            }
            WorkPlace::Leader(h) => {
                h.spawn(work);
                true
            }
            WorkPlace::Nowhere => false,
        }
    }

    /// Where the leader's work runs from now on: the leader runtime's handle, or None (this replica does not lead).
    pub fn lead_on(&self, runtime: Option<tokio::runtime::Handle>) {
        *self.work.lock().unwrap_or_else(|e| e.into_inner()) = match runtime {
            Some(h) => WorkPlace::Leader(h),
            None => WorkPlace::Nowhere,
        };
    }

    /// Whether this process may start leader work now.
    pub fn leads(&self) -> bool {
        !matches!(*self.work.lock().unwrap_or_else(|e| e.into_inner()), WorkPlace::Nowhere)
    }

    /// This hub start's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// The store (every write of nodes, member settings and the catalog also updates [`Self::view`]).
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// The store, shared (with the view kept beside it).
    pub fn shared_store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// The planner's in-memory view of the fleet, current with the store's last write.
    pub fn view(&self) -> &Viewed {
        &self.view
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<String, i64>> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn heard(&self) -> std::sync::MutexGuard<'_, HashMap<String, Heard>> {
        self.heard.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When `node` was last heard from by this hub process, if it was; for a node on another replica, now (or
    /// when it fell silent there).
    fn heard_at(&self, node: &str) -> Option<i64> {
        let here = self.heard().get(node).map(|h| h.at);
        let elsewhere = self.remote(node).map(|r| r.silent_since_ms.unwrap_or_else(now_ms));
        here.max(elsewhere)
    }

    /// Where `node`'s session is on another replica, when it has none here.
    fn remote(&self, node: &str) -> Option<RemoteSession> {
        let relay = self.relay.get()?;
        if self.sessions().contains_key(node) {
            return None;
        }
        relay.remote(node)
    }

    fn route(&self, node: &str) -> Option<Route> {
        if let Some(s) = self.sessions().get(node) {
            return Some(Route::Here(s.id, s.tx.clone()));
        }
        self.remote(node).map(Route::Elsewhere)
    }

    /// Records a report and returns the member's configuration. The report is written with the others that
    /// arrive at the same time, in one transaction (`crate::reports`); it is stored when this returns.
    pub async fn record_report(&self, node: &str, report: &v1::NodeReport) -> Result<MemberRecord, StoreError> {
        let now = now_ms();
        let facts = facts_from_wire(report);
        // The node as it was, for its webhook events (only looked up when some webhook may want them).
        let old = if self.webhooks_active() { Some(self.store.get_node(node)?.map(|n| n.facts)) } else { None };
        let events = old.map(|old| (old, facts.clone()));
        let member = self.report_writer.record(ReportWrite { node: node.to_string(), facts, now_ms: now }).await?;
        if let Some((old, facts)) = events {
            crate::outbox::emit(self.store(), &crate::outbox::report_events(node, old.as_ref(), &facts, now));
        }
        // The report's row carries the time: stored now.
        self.heard().insert(node.to_string(), Heard { at: now, queued: now });
        *self.reports.lock().unwrap_or_else(|e| e.into_inner()).entry(node.to_string()).or_default() += 1;
        self.report_tick.send_modify(|n| *n = n.wrapping_add(1));
        Ok(member)
    }

    /// A heartbeat read from `node`: counted, and the node noted as heard from.
    pub fn heartbeat(&self, node: &str) {
        self.heartbeats.fetch_add(1, Ordering::Relaxed);
        self.touch(node);
    }

    /// Heartbeats read since the hub started.
    pub fn heartbeats_read(&self) -> u64 {
        self.heartbeats.load(Ordering::Relaxed)
    }

    /// Notes that a node was heard from. The hub reads the time from memory; the store gets it (in batches, by
    /// `flush_seen`) when the stored one is [`SEEN_STORED_EVERY_MS`] old, for `node list` after a restart.
    pub fn touch(&self, node: &str) {
        let now = now_ms();
        let queue = {
            let mut heard = self.heard();
            let h = heard.entry(node.to_string()).or_insert(Heard { at: now, queued: i64::MIN });
            h.at = now;
            let due = now.saturating_sub(h.queued) >= SEEN_STORED_EVERY_MS;
            if due {
                h.queued = now;
            }
            due
        };
        if queue {
            self.seen().insert(node.to_string(), now);
        }
    }

    /// Writes queued last-seen times to the store, in name order and in transactions of at most
    /// [`SEEN_FLUSH_CHUNK`] nodes: the store is free for a run's transitions between them.
    pub fn flush_seen(&self) -> Result<(), StoreError> {
        let mut batch: Vec<(String, i64)> = self.seen().drain().collect();
        batch.sort_unstable();
        for chunk in batch.chunks(SEEN_FLUSH_CHUNK) {
            self.store.touch_nodes(chunk)?;
        }
        Ok(())
    }

    /// Opens a session for `node` in `member`, replacing (and so closing) any older one. Returns its id.
    pub fn open_session(&self, node: &str, member: &str, tx: SessionTx) -> u64 {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let old = self.sessions().insert(node.to_string(), Session { id, member: member.to_string(), tx });
        if let Some(relay) = self.relay.get() {
            relay.session_opened(node, id);
        }
        if let Some(old) = old {
            tracing::info!(node, old_session = old.id, "newer session replaces an older one");
            let _ = old.tx.try_send(Err(Status::aborted("replaced by a newer session of the same node")));
        }
        id
    }

    /// Updates the member of an open session (a node may be moved between members).
    pub fn session_member(&self, node: &str, id: u64, member: &str) {
        if let Some(s) = self.sessions().get_mut(node).filter(|s| s.id == id) {
            s.member = member.to_string();
        }
    }

    /// Closes a session if it is still the node's current one.
    pub fn close_session(&self, node: &str, id: u64) {
        let mut sessions = self.sessions();
        let ended = sessions.get(node).is_some_and(|s| s.id == id);
        if ended {
            sessions.remove(node);
        }
        drop(sessions);
        if ended && let Some(relay) = self.relay.get() {
            relay.session_closed(node, id);
        }
        self.touch(node);
    }

    /// Ends `node`'s session, if it has one, telling it why (its certificate was revoked).
    pub fn end_session(&self, node: &str, why: &str) {
        let ended = self.sessions().remove(node);
        if let Some(s) = ended {
            if let Some(relay) = self.relay.get() {
                relay.session_closed(node, s.id);
            }
            let _ = s.tx.try_send(Err(Status::permission_denied(why.to_string())));
            self.touch(node);
        }
    }

    /// What the metrics count as it happens.
    pub fn counters(&self) -> &crate::counters::Counters {
        &self.counters
    }

    /// The certificates revoked and the serials nodes used.
    pub fn revocations(&self) -> &Arc<Revocations> {
        &self.revocations
    }

    /// Ends every session (the hub is shutting down): sessions see `closing` and finish, so that a graceful
    /// server shutdown is not held open by long-lived agent streams.
    pub fn close_all_sessions(&self) {
        self.closing.send_replace(true);
        let drained: Vec<(String, Session)> = self.sessions().drain().collect();
        for (node, s) in drained {
            if let Some(relay) = self.relay.get() {
                relay.session_closed(&node, s.id);
            }
            let _ = s.tx.try_send(Err(Status::unavailable("hub shutting down; reconnect")));
            self.touch(&node);
        }
    }

    /// A receiver that turns true when the hub is shutting down.
    pub fn closing(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// Sends a command to a node and waits for its result, at most `within`. The operation id comes from the
    /// caller and must be deterministic for the step it stands for: the agent answers a repeat with the first
    /// result, so sending again (after a reconnect, or after a hub restart) never performs a step twice.
    /// While waiting, a node that reconnects gets the command again on its new session; a node that stays
    /// disconnected past its silence deadline ends the wait with `Silent`.
    pub async fn command(
        &self,
        node: &str,
        operation_id: &str,
        kind: v1::command::Kind,
        within: std::time::Duration,
    ) -> Result<v1::OperationResult, CommandError> {
        self.command_marked(node, operation_id, kind, within, &|_| {}).await.map(|(r, _)| r)
    }

    /// `command` with an explicit generation instead of a fresh one: what a stale issuer (a deposed hub, a replay
    /// of an old message) would send. The agent refuses it when it has seen a newer one. For tests and tools.
    pub async fn command_at_generation(
        &self,
        node: &str,
        operation_id: &str,
        generation: u64,
        kind: v1::command::Kind,
        within: std::time::Duration,
    ) -> Result<v1::OperationResult, CommandError> {
        self.command_inner(node, operation_id, Some(generation), kind, within, &|_| {}).await.map(|(r, _)| r)
    }

    /// `command`, also returning the node's report count when the result arrived (for `report_after`).
    /// `on_silence` hears when the node turns silent (`Some(since_ms)`) and when it is heard again (`None`).
    ///
    /// Silence: a node with no session, or whose session is open but which has sent nothing past its silence
    /// deadline (a frozen agent), is silent. The step fails with `Silent` once the node has been silent for
    /// [`silent_step_limit_ms`](Fleet::silent_step_limit_ms) (a boot's grace for steps that reboot the node).
    pub async fn command_marked(
        &self,
        node: &str,
        operation_id: &str,
        kind: v1::command::Kind,
        within: std::time::Duration,
        on_silence: &(dyn Fn(Option<i64>) + Send + Sync),
    ) -> Result<(v1::OperationResult, u64), CommandError> {
        self.command_inner(node, operation_id, None, kind, within, on_silence).await
    }

    async fn command_inner(
        &self,
        node: &str,
        operation_id: &str,
        generation: Option<u64>,
        kind: v1::command::Kind,
        within: std::time::Duration,
        on_silence: &(dyn Fn(Option<i64>) + Send + Sync),
    ) -> Result<(v1::OperationResult, u64), CommandError> {
        // A step that reboots the node keeps it away for a boot: it fails only after the boot grace.
        let reboots = matches!(
            kind,
            v1::command::Kind::Reimage(_)
                | v1::command::Kind::Reboot(_)
                | v1::command::Kind::ApplySecurityPatch(_)
                | v1::command::Kind::UpgradeKubernetes(_)
        );
        let silent_ms = self.silent_step_limit_ms(reboots);
        let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(operation_id.to_string(), (node.to_string(), done_tx));
        let mut command = v1::Command { operation_id: operation_id.to_string(), generation: 0, kind: Some(kind) };
        let deadline = tokio::time::Instant::now() + within;
        let mut sent_on: Option<(String, u64, u64)> = None;
        // When the node's silence began (None: heard within its deadline), and whether `on_silence` was told.
        let mut silent_since: Option<i64> = None;
        let mut told = false;
        let deadline_ms = self.silence_deadline_ms();
        let outcome = loop {
            let route = self.route(node);
            let now = now_ms();
            let heard = self.heard_at(node);
            silent_since = match &route {
                // Gone: silent since it was last heard (or since we noticed, after a hub restart).
                None => Some(silent_since.unwrap_or_else(|| heard.unwrap_or(now))),
                // Connected but saying nothing (a frozen agent): silent since it was last heard.
                Some(Route::Here(..)) => heard.filter(|h| now - h > deadline_ms),
                // On another replica, which says when it falls silent there.
                Some(Route::Elsewhere(r)) => r.silent_since_ms,
            };
            // Said only once the node is past its deadline (Unknown): a reconnect after a hub restart is not news.
            let silent_now = silent_since.filter(|s| now - s > deadline_ms);
            if silent_now.is_some() != told {
                told = silent_now.is_some();
                on_silence(silent_now);
            }
            if let Some(since) = silent_since
                && now - since > silent_ms
            {
                break Err(CommandError::Silent { node: node.to_string(), for_ms: now - since });
            }
            if let Some(route) = route
                && sent_on.as_ref() != Some(&route.key())
            {
                // Leader work sends only while its term is the database's current one (a replica paused past
                // its lease and resumed sends nothing more).
                if crate::store::fence::current().is_some()
                    && let Err(e) = self.store.check_fence()
                {
                    break Err(CommandError::Fenced(e.to_string()));
                }
                // Every send carries a fresh generation: a repeat of the same operation id is answered from the
                // agent's journal before the generation is looked at, a new one must be the newest.
                command.generation = generation.unwrap_or_else(|| self.next_generation());
                match &route {
                    Route::Here(_, tx) => {
                        let msg = v1::HubMessage { body: Some(v1::hub_message::Body::Command(command.clone())) };
                        if tx.send(Ok(Box::new(msg))).await.is_ok() {
                            sent_on = Some(route.key());
                        }
                    }
                    Route::Elsewhere(at) => {
                        // Through the database to the replica holding the session; the result comes back the
                        // same way (`deliver_result` there posts it, the relay here delivers it).
                        if let Some(relay) = self.relay.get() {
                            relay.command(at, node, &command);
                            sent_on = Some(route.key());
                        }
                    }
                }
            }
            tokio::select! {
                r = &mut done_rx => break r.map_err(|_| CommandError::NotConnected),
                _ = tokio::time::sleep_until(deadline) => break Err(CommandError::TimedOut(within)),
                _ = tokio::time::sleep(COMMAND_POLL) => {}
            }
        };
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(operation_id);
        outcome
    }

    /// How long a node may be silent before it is Unknown, in ms.
    pub fn silence_deadline_ms(&self) -> i64 {
        i64::from(self.timing.heartbeat_interval_seconds) * i64::from(self.timing.silent_after_heartbeats) * 1000
    }

    /// How long a node may stay silent during a step before the step fails (the failure policy's deadline):
    /// twice its silence deadline (it shows Unknown for the second half), or [`BOOT_GRACE`] for a step that
    /// reboots it.
    pub fn silent_step_limit_ms(&self, reboots: bool) -> i64 {
        let twice = 2 * self.silence_deadline_ms();
        if reboots { twice.max(BOOT_GRACE.as_millis() as i64) } else { twice }
    }

    /// Delivers an operation result from `node` to whoever waits for it. `Ok(false)` if nobody waits (a result of
    /// an operation sent before a hub restart; the executor will send it again with the same id and get it then).
    /// A result for an operation sent to another node is refused and changes nothing: the command stays pending.
    pub fn deliver_result(&self, node: &str, result: v1::OperationResult) -> Result<bool, ResultRefused> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        match waiting.get(&result.operation_id) {
            Some((target, _)) if target != node => {
                return Err(ResultRefused::NotYours {
                    sender: node.to_string(),
                    operation: result.operation_id.clone(),
                    target: target.clone(),
                });
            }
            Some(_) => {}
            None => {
                drop(waiting);
                // Replicas: the leader waits for it; a replica that does not lead passes it on.
                if let Some(relay) = self.relay.get().filter(|_| !self.leads()) {
                    relay.result(node, &result);
                    return Ok(true);
                }
                return Ok(false);
            }
        }
        let Some((_, w)) = waiting.remove(&result.operation_id) else { return Ok(false) };
        drop(waiting);
        Ok(w.send((result, self.report_count(node))).is_ok())
    }

    fn report_count(&self, node: &str) -> u64 {
        self.reports.lock().unwrap_or_else(|e| e.into_inner()).get(node).copied().unwrap_or(0)
    }

    /// The node's record from the first report it sent after its report count was `mark` (see
    /// `command_marked`: agents report right after a result), or None when none arrives within `within`.
    pub async fn report_after(&self, node: &str, mark: u64, within: std::time::Duration) -> Option<NodeRecord> {
        let mut tick = self.report_tick.subscribe();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.report_count(node) > mark {
                return self.store.get_node(node).ok().flatten();
            }
            tokio::select! {
                r = tick.changed() => if r.is_err() { return None },
                _ = tokio::time::sleep_until(deadline) => return None,
            }
        }
    }

    /// Whether a node has an open session (on this hub, or on another live replica).
    pub fn is_connected(&self, node: &str) -> bool {
        self.sessions().contains_key(node) || self.relay.get().is_some_and(|r| r.remote(node).is_some())
    }

    /// Number of open sessions.
    pub fn connected_count(&self) -> usize {
        self.sessions().len()
    }

    /// Pushes a member's configuration to every connected node of that member, on every replica.
    pub fn push_member_config(&self, member: &MemberRecord) {
        self.push_member_config_here(member);
        if let Some(relay) = self.relay.get() {
            relay.member_config(&member.name);
        }
    }

    /// Pushes a member's configuration to the nodes of that member connected to this hub.
    pub fn push_member_config_here(&self, member: &MemberRecord) {
        let msg = desired_config(member);
        let targets: Vec<(String, SessionTx)> = self
            .sessions()
            .iter()
            .filter(|(_, s)| s.member == member.name)
            .map(|(n, s)| (n.clone(), s.tx.clone()))
            .collect();
        for (node, tx) in targets {
            if tx.try_send(Ok(Box::new(msg.clone()))).is_err() {
                tracing::warn!(node = %node, "session queue full or closed; the node gets its config on reconnect");
            }
        }
    }

    /// Whether some webhook exists (kept by `crate::webhooks::run` and the webhook RPCs): a hint that spares
    /// work before an event is made. Whether an event is stored is the store's to decide, in its transaction.
    pub fn webhooks_active(&self) -> bool {
        self.webhooks_active.load(Ordering::Relaxed)
    }

    /// Notes whether some webhook exists.
    pub fn set_webhooks_active(&self, active: bool) {
        self.webhooks_active.store(active, Ordering::Relaxed);
    }

    /// The status now of every node this hub process heard from (what `upkeep.node.ready`/`unknown` compare),
    /// from memory only.
    pub fn heard_statuses(&self, now: i64) -> Vec<(String, NodeStatus)> {
        let deadline_ms = self.silence_deadline_ms();
        let heard: Vec<(String, i64)> = self.heard().iter().map(|(n, h)| (n.clone(), h.at)).collect();
        heard
            .into_iter()
            .map(|(n, at)| {
                let ready = now - at <= deadline_ms && self.is_connected(&n);
                (n, if ready { NodeStatus::Ready } else { NodeStatus::Unknown })
            })
            .collect()
    }

    /// The status of a node now.
    pub fn status_of(&self, node: &NodeRecord, now: i64) -> NodeStatus {
        let deadline_ms = self.silence_deadline_ms();
        if self.is_connected(&node.name) && now - self.last_seen(node) <= deadline_ms {
            NodeStatus::Ready
        } else {
            NodeStatus::Unknown
        }
    }

    /// Last seen, including times not yet flushed.
    pub fn last_seen(&self, node: &NodeRecord) -> i64 {
        self.heard_at(&node.name).unwrap_or(node.last_seen_ms).max(node.last_seen_ms)
    }

    /// The wire view of a node.
    pub fn node_to_wire(&self, n: &NodeRecord, now: i64) -> v1::Node {
        v1::Node {
            report: Some(facts_to_wire(&n.name, &n.facts)),
            status: self.status_of(n, now).as_str().to_string(),
            connected: self.is_connected(&n.name),
            first_seen_unix_ms: n.first_seen_ms,
            last_seen_unix_ms: self.last_seen(n),
            last_report_unix_ms: n.last_report_ms,
            ..Default::default()
        }
    }
}

/// The DesiredConfig message for a member.
pub fn desired_config(member: &MemberRecord) -> v1::HubMessage {
    v1::HubMessage {
        body: Some(v1::hub_message::Body::Desired(v1::DesiredConfig {
            generation: member.generation,
            node_os_channel: member.node_os_channel.as_str().to_string(),
            node_os_schedule_json: String::new(),
        })),
    }
}

/// The wire view of a member.
pub fn member_to_wire(m: &MemberRecord) -> v1::Member {
    v1::Member {
        name: m.name.clone(),
        node_os_channel: m.node_os_channel.as_str().to_string(),
        auto_upgrade_channel: m.auto_upgrade_channel.as_str().to_string(),
        node_count: m.node_count,
        regions: m.regions.clone(),
        node_pools: m.node_pools.clone(),
        config_generation: m.generation,
        auto_upgrade_status: String::new(),
    }
}

/// Stored facts from a (checked) wire report.
pub fn facts_from_wire(r: &v1::NodeReport) -> NodeFacts {
    NodeFacts {
        member: r.member.clone(),
        node_pool: r.node_pool.clone(),
        region: r.region.clone(),
        os_family: r.os_family.clone(),
        os_version: r.os_version.clone(),
        kernel: r.kernel.clone(),
        node_image_version: r.node_image_version.clone(),
        booted_image_version: r.booted_image_version.clone(),
        security_patch_version: r.security_patch_version.clone(),
        reboot_required: r.reboot_required,
        channel: r.channel.clone(),
        agent_version: r.agent_version.clone(),
        kubernetes_version: r.kubernetes_version.clone(),
        control_plane: r.control_plane,
        hardware_class: r.hardware_class.clone(),
        channel_note: r.channel_note.clone(),
        operations: r
            .operations
            .iter()
            .map(|o| OperationFact {
                operation_id: o.operation_id.clone(),
                kind: o.kind.clone(),
                step: o.step.clone(),
                state: o.state.clone(),
            })
            .collect(),
    }
}

/// The wire report from stored facts.
pub fn facts_to_wire(name: &str, f: &NodeFacts) -> v1::NodeReport {
    v1::NodeReport {
        node_name: name.to_string(),
        member: f.member.clone(),
        node_pool: f.node_pool.clone(),
        region: f.region.clone(),
        os_family: f.os_family.clone(),
        os_version: f.os_version.clone(),
        kernel: f.kernel.clone(),
        node_image_version: f.node_image_version.clone(),
        // Operators see the booted image even for agents that predate the field (then it equals the above).
        booted_image_version: f.image_version().to_string(),
        security_patch_version: f.security_patch_version.clone(),
        reboot_required: f.reboot_required,
        channel: f.channel.clone(),
        agent_version: f.agent_version.clone(),
        kubernetes_version: f.kubernetes_version.clone(),
        control_plane: f.control_plane,
        hardware_class: f.hardware_class.clone(),
        channel_note: f.channel_note.clone(),
        operations: f
            .operations
            .iter()
            .map(|o| v1::OperationState {
                operation_id: o.operation_id.clone(),
                kind: o.kind.clone(),
                step: o.step.clone(),
                state: o.state.clone(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;

    #[test]
    fn heartbeats_are_read_from_memory_and_stored_once_a_minute_per_node() {
        let dir = tempfile::tempdir().expect("tmp");
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("hub.db")).expect("store"));
        let facts = NodeFacts { member: "m1".into(), node_pool: "p".into(), region: "eu".into(), ..Default::default() };
        store.record_report("n1", &facts, 1_000).expect("n1");
        let fleet = Fleet::new(store.clone(), Timing { heartbeat_interval_seconds: 10, silent_after_heartbeats: 3 })
            .expect("fleet");
        fleet.touch("n1");
        let first = fleet.heard_at("n1").expect("heard");
        fleet.flush_seen().expect("flush");
        let stored = || store.get_node("n1").expect("read").expect("n1").last_seen_ms;
        assert_eq!(stored(), first, "a node heard for the first time is stored at the next flush");
        // Heard again within the minute: the hub knows, the store is not written.
        fleet.touch("n1");
        let second = fleet.heard_at("n1").expect("heard");
        assert!(second >= first);
        assert!(fleet.seen().is_empty(), "nothing queued within {SEEN_STORED_EVERY_MS} ms of the last");
        let node = store.get_node("n1").expect("read").expect("n1");
        assert_eq!(fleet.last_seen(&node), second, "node list shows what the hub heard, not the stored time");
        // A minute after the stored time it is queued again.
        fleet.heard().get_mut("n1").expect("n1").queued -= SEEN_STORED_EVERY_MS;
        fleet.touch("n1");
        fleet.flush_seen().expect("flush");
        assert_eq!(stored(), fleet.heard_at("n1").expect("heard"));
    }
}
