//! The relay between hub replicas on one PostgreSQL database: how the leader reaches an agent whose session is on
//! another replica, and how everything a replica hears that the leader must know gets to it.
//!
//! Every replica posts notes to one table (`Store::relay_post`: in commit order, each post followed by a NOTIFY)
//! and reads every note after the last one it read (`Store::relay_since`), woken by the NOTIFY or, at the latest,
//! once a [`TICK`]. A note is addressed to every replica, to whichever replica leads when it is read, or to one
//! replica (by name and start). What travels:
//! - a command for a node, from the leader to the replica holding the node's session, and the node's result
//!   back to the leader (the leader's waiter gets it as from a local session: `Fleet::deliver_result`);
//! - a node's lease request to the leader (the lease desk runs only there) and its answer back; lease releases;
//! - where each agent session is (`SessionChange`, also kept in a table for a replica that starts), including
//!   when a node falls silent on its open session;
//! - every change of the planner's view written through one replica (`ViewChange`: a node's report, a member's
//!   settings, the catalog), which the others apply to theirs from the store, one node or member at a time;
//! - a member whose desired configuration changed, so that every replica pushes it to its own sessions.
//!
//! Each replica also says every [`TICK`] that it is alive; sessions held by a replica not heard from for
//! [`REPLICA_ALIVE_MS`] count as gone (its agents connect to another one). Posting goes through one writer thread
//! that batches what queued and retries while the database is away, so a session never waits for the database to
//! post, and nothing is dropped while the database restarts.

use crate::engine::Engine;
use crate::fleet::Fleet;
use crate::maintenance::Maintenance;
use crate::peers::{AskRefused, Asked, OperatorAsk, Peers, RemoteSession};
use crate::store::view::ViewChange;
use crate::store::{SessionChange, SessionPlace, Store, StoreError};
use prost::Message;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use upkeep_proto::v1;

/// How often a replica says it is alive, reads who else is, and reads the relay when nothing woke it.
pub const TICK: Duration = Duration::from_secs(1);
/// A replica not heard from for this long holds no sessions any more.
pub const REPLICA_ALIVE_MS: i64 = 5_000;
/// Notes are dropped this long after they were posted (by the leader, once a minute).
const KEEP_MS: i64 = 10 * 60 * 1000;
/// Notes read per query.
const READ_BATCH: usize = 2_000;
/// Notes posted per transaction.
const POST_BATCH: usize = 2_000;

/// Who a note is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum To {
    /// Every replica.
    All,
    /// Whichever replica leads when it reads the note.
    Leader,
    /// One start of one replica.
    Replica { name: String, instance: u64 },
}

/// What a note says. Protocol messages travel as their protobuf encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Note {
    /// Send this `v1::Command` on the node's session `session`.
    Command { node: String, session: u64, command: Vec<u8> },
    /// The node's `v1::OperationResult`.
    Result { node: String, result: Vec<u8> },
    /// The node's `v1::LeaseRequest`, read on its session `session` of the sender.
    LeaseRequest { node: String, session: u64, request: Vec<u8> },
    /// The `v1::LeaseAnswer` to send on the node's session `session`.
    LeaseAnswer { node: String, session: u64, answer: Vec<u8> },
    /// The node's `v1::LeaseRelease`.
    LeaseRelease { node: String, release: Vec<u8> },
    /// Where a node's session is now.
    Session(Place),
    /// A node's session ended.
    SessionGone { node: String, session: u64 },
    /// The planner's view changed.
    View(ViewChange),
    /// The member's desired configuration changed: push it to its nodes.
    MemberConfig { member: String },
    /// Events of the run after sequence number `after` were committed: publish them to this replica's watchers.
    RunEvents { run: String, after: u64 },
    /// An operator's request that only the leader carries out, sent to a replica that does not lead.
    Ask { id: u64, ask: OperatorAsk },
    /// The leader's answer to `Ask` `id`: the work or lease id, or why not.
    Answer { id: u64, answer: Result<String, AskRefused> },
}

/// A session place as a note carries it (the replica is the note's sender).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Place {
    node: String,
    session: u64,
    silent_since_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Envelope {
    from: String,
    instance: u64,
    to: To,
    note: Note,
}

/// One queued post: a note, and the change of the session places it stands for.
struct Post {
    body: Vec<u8>,
    session: Option<SessionChange>,
}

/// This replica's side of the relay: what it posts, and what it knows of the others' sessions.
pub struct Relay {
    name: String,
    instance: u64,
    store: Arc<dyn Store>,
    out: Mutex<mpsc::Sender<Post>>,
    /// Filled by `start`, taken by the writer thread.
    queue: Mutex<Option<mpsc::Receiver<Post>>>,
    /// Sessions on other replicas, by node.
    places: Mutex<HashMap<String, SessionPlace>>,
    /// Replicas heard from within REPLICA_ALIVE_MS: name -> start.
    live: Mutex<HashMap<String, u64>>,
    /// Nodes announced silent on their session here.
    silent: Mutex<HashSet<String>>,
    stop: AtomicBool,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Operator requests passed to the leader, waiting for its answer.
    asked: Mutex<HashMap<u64, tokio::sync::oneshot::Sender<Result<String, AskRefused>>>>,
    next_ask: std::sync::atomic::AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Relay {
    /// The relay of replica `name` (this start of it: `instance`, unique per start) over `store`. It forgets
    /// the session places an earlier start of this replica left. Nothing moves until [`Relay::start`].
    pub fn new(name: &str, instance: u64, store: Arc<dyn Store>) -> Result<Arc<Relay>, StoreError> {
        store.drop_session_places(name)?;
        let (tx, rx) = mpsc::channel();
        Ok(Arc::new(Relay {
            name: name.to_string(),
            instance,
            store,
            out: Mutex::new(tx),
            queue: Mutex::new(Some(rx)),
            places: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
            silent: Mutex::new(HashSet::new()),
            stop: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
            asked: Mutex::new(HashMap::new()),
            next_ask: std::sync::atomic::AtomicU64::new(1),
        }))
    }

    /// Starts the writer and the reader threads. `runtime` is where sends on this replica's sessions run.
    pub fn start(self: &Arc<Self>, hands: Hands, runtime: tokio::runtime::Handle) -> Result<(), StoreError> {
        // Who is alive and where sessions are, before the first note is read: notes after `head` apply on top.
        self.refresh_live()?;
        let head = self.store.relay_head()?;
        {
            let mut places = lock(&self.places);
            for p in self.store.session_places()? {
                if p.replica != self.name {
                    places.insert(p.node.clone(), p);
                }
            }
        }
        let Some(queue) = lock(&self.queue).take() else { return Ok(()) };
        let spawn_err = |e: std::io::Error| StoreError::Corrupt {
            context: "starting the relay's threads".into(),
            reason: e.to_string(),
        };
        let writer = {
            let relay = self.clone();
            let fleet = hands.fleet.clone();
            std::thread::Builder::new()
                .name("upkeep-relay-out".into())
                .spawn(move || relay.write_loop(queue, &fleet))
                .map_err(spawn_err)?
        };
        let reader = {
            let relay = self.clone();
            std::thread::Builder::new()
                .name("upkeep-relay-in".into())
                .spawn(move || relay.read_loop(head, &hands, &runtime))
                .map_err(spawn_err)?
        };
        lock(&self.threads).extend([writer, reader]);
        Ok(())
    }

    fn post(&self, to: To, note: Note, session: Option<SessionChange>) {
        let envelope = Envelope { from: self.name.clone(), instance: self.instance, to, note };
        match serde_json::to_vec(&envelope) {
            Ok(body) => {
                let _ = lock(&self.out).send(Post { body, session });
            }
            Err(e) => tracing::error!(error = %e, "encoding a relay note"),
        }
    }

    fn post_place(&self, node: &str, session: u64, silent_since_ms: Option<i64>) {
        let place = SessionPlace {
            node: node.to_string(),
            replica: self.name.clone(),
            instance: self.instance,
            session,
            silent_since_ms,
        };
        let note = Note::Session(Place { node: node.to_string(), session, silent_since_ms });
        self.post(To::All, note, Some(SessionChange::Here(place)));
    }

    fn refresh_live(&self) -> Result<(), StoreError> {
        let live = self.store.replica_alive(&self.name, self.instance, REPLICA_ALIVE_MS)?;
        *lock(&self.live) = live.into_iter().collect();
        Ok(())
    }

    fn write_loop(&self, queue: mpsc::Receiver<Post>, fleet: &Fleet) {
        let mut batch: Vec<Post> = Vec::new();
        let mut last_alive = Instant::now();
        let mut last_prune = Instant::now();
        let mut failing_since: Option<Instant> = None;
        loop {
            let stopping = self.stop.load(Ordering::SeqCst);
            if batch.is_empty() {
                match queue.recv_timeout(if stopping { Duration::ZERO } else { TICK }) {
                    Ok(p) => batch.push(p),
                    Err(mpsc::RecvTimeoutError::Timeout) if stopping => return,
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            while batch.len() < POST_BATCH {
                match queue.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                let bodies: Vec<Vec<u8>> = batch.iter().map(|p| p.body.clone()).collect();
                let sessions: Vec<SessionChange> = batch.iter().filter_map(|p| p.session.clone()).collect();
                match self.store.relay_post(&bodies, &sessions) {
                    Ok(()) => {
                        batch.clear();
                        if failing_since.take().is_some() {
                            tracing::info!("relay: posting again");
                        }
                    }
                    Err(e) => {
                        // Kept, and posted in order once the database answers (a stopping replica gives up).
                        if failing_since.is_none() {
                            tracing::warn!(error = %e, "relay: the database did not take a post; retrying");
                            failing_since = Some(Instant::now());
                        }
                        if stopping {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }
            if last_alive.elapsed() >= TICK {
                last_alive = Instant::now();
                if let Err(e) = self.refresh_live() {
                    tracing::warn!(error = %e, "relay: recording this replica as alive");
                }
            }
            if fleet.leads() && last_prune.elapsed() >= Duration::from_secs(60) {
                last_prune = Instant::now();
                if let Err(e) = self.store.relay_prune(KEEP_MS) {
                    tracing::warn!(error = %e, "relay: pruning old notes");
                }
            }
        }
    }

    fn read_loop(self: &Arc<Self>, mut last: i64, hands: &Hands, runtime: &tokio::runtime::Handle) {
        let mut listener: Option<Box<dyn crate::store::RelayWait>> = None;
        let mut last_tick = Instant::now();
        while !self.stop.load(Ordering::SeqCst) {
            match &mut listener {
                Some(l) => {
                    if let Err(e) = l.wait(TICK) {
                        tracing::warn!(error = %e, "relay: the listening connection broke; opening another");
                        listener = None;
                    }
                }
                None => match self.store.relay_listener() {
                    Ok(l) => listener = Some(l),
                    Err(e) => {
                        tracing::warn!(error = %e, "relay: cannot listen yet; reading once a second");
                        std::thread::sleep(TICK);
                    }
                },
            }
            // Everything after the last note read (what woke it, and anything a broken listener missed).
            loop {
                match self.store.relay_since(last, READ_BATCH) {
                    Ok(notes) => {
                        let full = notes.len() == READ_BATCH;
                        for (seq, body) in notes {
                            last = seq;
                            match serde_json::from_slice::<Envelope>(&body) {
                                Ok(e) => self.receive(e, hands, runtime),
                                Err(e) => tracing::error!(seq, error = %e, "relay: unreadable note skipped"),
                            }
                        }
                        if !full {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "relay: reading notes");
                        break;
                    }
                }
            }
            if last_tick.elapsed() >= TICK {
                last_tick = Instant::now();
                self.tick(hands);
            }
        }
    }

    /// Once a [`TICK`]: a leader keeps the leases of nodes heard on other replicas alive.
    fn tick(&self, hands: &Hands) {
        if !hands.fleet.leads() {
            return;
        }
        for node in hands.maintenance.lease_holders() {
            if self.remote(&node).is_some_and(|r| r.silent_since_ms.is_none()) {
                hands.maintenance.alive(&node);
            }
        }
    }

    fn receive(self: &Arc<Self>, e: Envelope, hands: &Hands, runtime: &tokio::runtime::Handle) {
        if e.instance == self.instance && e.from == self.name {
            return;
        }
        let for_me = match &e.to {
            To::All => true,
            To::Leader => hands.fleet.leads(),
            To::Replica { name, instance } => *name == self.name && *instance == self.instance,
        };
        if !for_me {
            return;
        }
        let fleet = &hands.fleet;
        match e.note {
            Note::Command { node, session, command } => match v1::Command::decode(command.as_slice()) {
                Ok(c) => {
                    let msg = v1::HubMessage { body: Some(v1::hub_message::Body::Command(c)) };
                    fleet.send_on_session(runtime, &node, session, msg);
                }
                Err(err) => tracing::error!(node, error = %err, "relay: unreadable command"),
            },
            Note::Result { node, result } => match v1::OperationResult::decode(result.as_slice()) {
                Ok(r) => {
                    if let Err(refused) = fleet.deliver_result(&node, r) {
                        tracing::warn!(node, replica = %e.from, error = %refused, "result from the wrong node refused");
                    }
                }
                Err(err) => tracing::error!(node, error = %err, "relay: unreadable result"),
            },
            Note::LeaseRequest { node, session, request } => match v1::LeaseRequest::decode(request.as_slice()) {
                Ok(req) => {
                    let (maintenance, relay) = (hands.maintenance.clone(), self.clone());
                    let to = To::Replica { name: e.from, instance: e.instance };
                    // Decided on the leader's runtime: the lease it writes carries the leader's term.
                    fleet.spawn_work(async move {
                        let answer = match maintenance.lease_answer(&node, &req) {
                            Ok(a) => a,
                            Err(err) => {
                                tracing::error!(node, error = %err, "deciding a relayed lease request");
                                crate::maintenance::lease_retry(&req, "the hub could not read its store; asking again")
                            }
                        };
                        let note = Note::LeaseAnswer { node, session, answer: answer.encode_to_vec() };
                        relay.post(to, note, None);
                    });
                }
                Err(err) => tracing::error!(node, error = %err, "relay: unreadable lease request"),
            },
            Note::LeaseAnswer { node, session, answer } => match v1::LeaseAnswer::decode(answer.as_slice()) {
                Ok(a) => {
                    let msg = v1::HubMessage { body: Some(v1::hub_message::Body::Lease(a)) };
                    fleet.send_on_session(runtime, &node, session, msg);
                }
                Err(err) => tracing::error!(node, error = %err, "relay: unreadable lease answer"),
            },
            Note::LeaseRelease { node, release } => match v1::LeaseRelease::decode(release.as_slice()) {
                Ok(rel) => {
                    if let Err(err) = hands.maintenance.release(&node, &rel) {
                        tracing::error!(node, error = %err, "relay: releasing leases");
                    }
                }
                Err(err) => tracing::error!(node, error = %err, "relay: unreadable lease release"),
            },
            Note::Session(p) => {
                let place = SessionPlace {
                    node: p.node.clone(),
                    replica: e.from,
                    instance: e.instance,
                    session: p.session,
                    silent_since_ms: p.silent_since_ms,
                };
                let new = lock(&self.places).insert(p.node.clone(), place.clone()).is_none_or(|old| {
                    (old.replica.as_str(), old.instance, old.session)
                        != (place.replica.as_str(), place.instance, place.session)
                });
                if new && fleet.leads() {
                    // A node that (re)joins may be behind its channel.
                    hands.maintenance.poke();
                }
            }
            Note::SessionGone { node, session } => {
                let mut places = lock(&self.places);
                if places
                    .get(&node)
                    .is_some_and(|p| p.replica == e.from && p.instance == e.instance && p.session == session)
                {
                    places.remove(&node);
                }
            }
            Note::View(change) => {
                match fleet.view().apply(&change) {
                    Ok(changed) => {
                        if changed && fleet.leads() {
                            hands.engine.poke();
                            hands.maintenance.poke();
                        }
                    }
                    Err(err) => tracing::warn!(error = %err, ?change, "relay: applying a view change"),
                }
                if let ViewChange::Reported(node) = &change {
                    fleet.reported_elsewhere(node);
                }
            }
            Note::RunEvents { run, after } => hands.engine.publish_stored(&run, after),
            Note::Ask { id, ask } => {
                let (maintenance, relay) = (hands.maintenance.clone(), self.clone());
                let to = To::Replica { name: e.from, instance: e.instance };
                // On the leader's runtime: the work it starts carries the leader's term.
                fleet.spawn_work(async move {
                    let answer = match ask {
                        OperatorAsk::Reboot { node, force, operator } => {
                            maintenance.operator_reboot(&node, force, &operator)
                        }
                        OperatorAsk::Uncordon { node, operator } => {
                            maintenance.operator_uncordon(&node, &operator).await
                        }
                    };
                    relay.post(to, Note::Answer { id, answer: answer.map_err(AskRefused::from) }, None);
                });
            }
            Note::Answer { id, answer } => {
                if let Some(waiter) = lock(&self.asked).remove(&id) {
                    let _ = waiter.send(answer);
                }
            }
            Note::MemberConfig { member } => match fleet.store().get_member(&member) {
                Ok(Some(m)) => fleet.push_member_config_here(&m),
                Ok(None) => {}
                Err(err) => tracing::warn!(member, error = %err, "relay: reading a member's configuration"),
            },
        }
    }
}

impl Peers for Relay {
    /// Stops both threads after what they hold (posts queued by then are written first).
    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let threads: Vec<_> = lock(&self.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }

    /// A session of `node` opened here.
    fn session_opened(&self, node: &str, session: u64) {
        lock(&self.silent).remove(node);
        self.post_place(node, session, None);
    }

    /// A session of `node` here ended.
    fn session_closed(&self, node: &str, session: u64) {
        lock(&self.silent).remove(node);
        let gone = SessionChange::Gone {
            node: node.to_string(),
            replica: self.name.clone(),
            instance: self.instance,
            session,
        };
        self.post(To::All, Note::SessionGone { node: node.to_string(), session }, Some(gone));
    }

    /// Whether `node`'s session here is silent now (`since`: since when): posted when it changes.
    fn session_silence(&self, node: &str, session: u64, since: Option<i64>) {
        let changed = {
            let mut silent = lock(&self.silent);
            if since.is_some() { silent.insert(node.to_string()) } else { silent.remove(node) }
        };
        if changed {
            self.post_place(node, session, since);
        }
    }

    /// The planner's view changed through this replica.
    fn view_changed(&self, change: ViewChange) {
        self.post(To::All, Note::View(change), None);
    }

    /// `member`'s desired configuration changed: every replica pushes it to its sessions.
    fn member_config(&self, member: &str) {
        self.post(To::All, Note::MemberConfig { member: member.to_string() }, None);
    }

    /// Passes an operator's request for node work to the leader and waits (at most `within`) for its answer.
    fn ask_leader(&self, ask: OperatorAsk, within: Duration) -> Asked<'_> {
        let id = self.next_ask.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        lock(&self.asked).insert(id, tx);
        self.post(To::Leader, Note::Ask { id, ask }, None);
        Box::pin(async move {
            let out = tokio::time::timeout(within, rx).await;
            lock(&self.asked).remove(&id);
            match out {
                Ok(Ok(answer)) => answer,
                _ => Err(AskRefused::Denied(format!(
                    "no hub replica leading answered within {} s (a new leader may be taking over); ask again",
                    within.as_secs()
                ))),
            }
        })
    }

    /// Events of `run` after `after` were committed here.
    fn run_events(&self, run: &str, after: u64) {
        self.post(To::All, Note::RunEvents { run: run.to_string(), after }, None);
    }

    /// Sends `command` to `node` on its session on another replica.
    fn command(&self, at: &RemoteSession, node: &str, command: &v1::Command) {
        let to = To::Replica { name: at.replica.clone(), instance: at.instance };
        self.post(
            to,
            Note::Command { node: node.to_string(), session: at.session, command: command.encode_to_vec() },
            None,
        );
    }

    /// A result read here for a command the leader sent.
    fn result(&self, node: &str, result: &v1::OperationResult) {
        self.post(To::Leader, Note::Result { node: node.to_string(), result: result.encode_to_vec() }, None);
    }

    /// A lease request read here, for the leader's lease desk.
    fn lease_request(&self, node: &str, session: u64, request: &v1::LeaseRequest) {
        let note = Note::LeaseRequest { node: node.to_string(), session, request: request.encode_to_vec() };
        self.post(To::Leader, note, None);
    }

    /// A lease release read here, for the leader's lease desk.
    fn lease_release(&self, node: &str, release: &v1::LeaseRelease) {
        self.post(To::Leader, Note::LeaseRelease { node: node.to_string(), release: release.encode_to_vec() }, None);
    }

    /// Where `node`'s session is, when it is on another replica that is alive.
    fn remote(&self, node: &str) -> Option<RemoteSession> {
        let place = lock(&self.places).get(node).cloned()?;
        let alive = lock(&self.live).get(&place.replica).is_some_and(|i| *i == place.instance);
        alive.then_some(RemoteSession {
            replica: place.replica,
            instance: place.instance,
            session: place.session,
            silent_since_ms: place.silent_since_ms,
        })
    }
}

/// What the relay's reader acts on.
#[derive(Clone)]
pub struct Hands {
    /// Sessions, waiters, the view.
    pub fleet: Arc<Fleet>,
    /// The lease desk and the rollout loop.
    pub maintenance: Arc<Maintenance>,
    /// The run engine (poked when the view changed).
    pub engine: Arc<Engine>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_survive_their_encoding() {
        let notes = vec![
            Note::Command { node: "n1".into(), session: 3, command: vec![1, 2, 3] },
            Note::Session(Place { node: "n1".into(), session: 3, silent_since_ms: Some(5) }),
            Note::View(ViewChange::Settings("m".into())),
            Note::MemberConfig { member: "m".into() },
        ];
        for note in notes {
            for to in [To::All, To::Leader, To::Replica { name: "b".into(), instance: 9 }] {
                let e = Envelope { from: "a".into(), instance: 7, to: to.clone(), note: note.clone() };
                let back: Envelope = serde_json::from_slice(&serde_json::to_vec(&e).expect("encode")).expect("decode");
                assert_eq!(back, e);
            }
        }
    }
}
