//! Several hub replicas on one PostgreSQL database: exactly one leader, elected through the database, fenced.
//!
//! Every replica serves agent and operator sessions. One of them, the leader, also runs what decides and acts:
//! the run engine's loop, the maintenance loop (rollouts, the lease desk's decisions, reboots), the notices loop
//! and every piece of node work of the executor. The leader holds a lease row in the database
//! (`Store::lead`, table `leadership`: holder, term, expiry by the database's clock) and renews it every third of
//! its length; the term grows at every change of holder.
//!
//! A leader that could not renew within two thirds of the lease (the database unreachable, the process paused)
//! steps down before its lease lapses: its leader runtime, the one tokio runtime all of its leader work runs on,
//! is shut down, which stops every task of that work at once. Every thread of that runtime carries the term it
//! was elected with (`store::fence`), and the writes that matter (run commits, node work, leases, rollouts) check
//! that term in their own transaction: a deposed leader's late write (it was paused and resumed, and its threads
//! ran before its lease loop noticed) is refused with `StoreError::Fenced`, and the refusal makes it step down at
//! once. A replica that becomes the leader takes a fresh command epoch (its command generations are above the old
//! leader's, so agents refuse the old leader's commands), forgets the tasks of any earlier term and starts its
//! loops, which resume unfinished work from the store exactly as after a hub restart.

use crate::engine::Engine;
use crate::executor::Executor;
use crate::fleet::Fleet;
use crate::maintenance::Maintenance;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The leader lease when `cluster.lease_seconds` is not set.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(3);

/// How often a replica that does not lead looks at the lease, and a leader at its fence.
const POLL: Duration = Duration::from_millis(100);

/// `[cluster]` in hub.toml.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// This replica's name in the lease (default: the host name).
    pub replica: String,
    /// How long a lease lasts unless renewed; it is renewed every third of it, and a leader that could not renew
    /// within two thirds of it steps down.
    pub lease: Duration,
}

/// The host name (the default replica name); `hub` when it cannot be read.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "hub".to_string())
}

/// The parts a leader runs.
#[derive(Clone)]
pub struct LeaderParts {
    /// The fleet (store, sessions, command epoch).
    pub fleet: Arc<Fleet>,
    /// The run engine.
    pub engine: Arc<Engine>,
    /// The maintenance loop.
    pub maintenance: Arc<Maintenance>,
    /// The node-work executor.
    pub executor: Arc<Executor>,
    /// `[webhooks] upcoming_notice_minutes` (zero: no notices loop).
    pub upcoming_notice: Duration,
}

/// The leadership loop of one replica, on a thread of its own (the store is synchronous).
pub struct Leadership {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Leadership {
    /// Starts campaigning for `settings.replica`.
    pub fn start(settings: ClusterSettings, parts: LeaderParts) -> std::io::Result<Leadership> {
        // Until elected, this replica starts no leader work.
        parts.fleet.lead_on(None);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("upkeep-leadership".into())
                .spawn(move || campaign(settings, parts, stop))?
        };
        Ok(Leadership { stop, thread: Some(thread) })
    }

    /// Stops: a leader stops its work and lets its lease lapse at once, so that another replica takes over.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What this replica holds while it leads.
struct Held {
    term: u64,
    /// It steps down at this instant unless renewed before.
    valid_until: Instant,
    runtime: tokio::runtime::Runtime,
}

fn campaign(settings: ClusterSettings, parts: LeaderParts, stop: Arc<AtomicBool>) {
    let lease_ms = i64::try_from(settings.lease.as_millis()).unwrap_or(i64::MAX);
    let renew_every = settings.lease / 3;
    let deadline = settings.lease * 2 / 3;
    let replica = settings.replica.clone();
    tracing::info!(replica = %replica, lease_ms, "hub replica: campaigning for leadership");
    let mut held: Option<Held> = None;
    let mut last_try: Option<Instant> = None;
    loop {
        if stop.load(Ordering::SeqCst) {
            if let Some(h) = held.take() {
                let term = h.term;
                step_down(&parts, h, &replica, "the hub is stopping");
                // The lease is given back only after the work stopped.
                if let Err(e) = parts.fleet.store().resign(&replica, term) {
                    tracing::warn!(replica = %replica, error = %e, "giving up the leader lease");
                }
            }
            return;
        }
        // First what the clock says: a leader paused past its deadline steps down before it looks at anything.
        if held.as_ref().is_some_and(|h| Instant::now() >= h.valid_until)
            && let Some(h) = held.take()
        {
            step_down(&parts, h, &replica, "the lease could not be renewed in time");
        }
        if crate::store::fence::take_refused()
            && let Some(h) = held.take()
        {
            step_down(&parts, h, &replica, "a write was refused: another replica leads at a newer term");
        }
        let due = last_try.is_none_or(|t| t.elapsed() >= if held.is_some() { renew_every } else { POLL * 5 });
        if due {
            let started = Instant::now();
            last_try = Some(started);
            match parts.fleet.store().lead(&replica, lease_ms, held.as_ref().map(|h| h.term)) {
                Ok(Some(term)) => match &mut held {
                    Some(h) if h.term == term => h.valid_until = started + deadline,
                    _ => {
                        if let Some(h) = held.take() {
                            step_down(&parts, h, &replica, "the lease was taken again at a new term");
                        }
                        match become_leader(&parts, term) {
                            Ok(runtime) => {
                                tracing::info!(replica = %replica, term, epoch = parts.fleet.epoch(),
                                    "became the leader");
                                held = Some(Held { term, valid_until: started + deadline, runtime });
                            }
                            Err(e) => {
                                tracing::error!(replica = %replica, term, error = %e, "starting the leader's work");
                                let _ = parts.fleet.store().resign(&replica, term);
                            }
                        }
                    }
                },
                Ok(None) => {
                    if let Some(h) = held.take() {
                        step_down(&parts, h, &replica, "another replica holds the lease");
                    }
                }
                Err(e) => tracing::warn!(replica = %replica, error = %e, "leader lease: the database did not answer"),
            }
        }
        std::thread::sleep(POLL);
    }
}

/// Starts the leader's work at `term` on a runtime of its own whose threads carry the term.
fn become_leader(parts: &LeaderParts, term: u64) -> anyhow::Result<tokio::runtime::Runtime> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(format!("upkeep-leader-{term}"))
        .on_thread_start(move || crate::store::fence::set_for_this_thread(Some(term)))
        .enable_all()
        .build()?;
    // A refusal noted for an earlier term is no reason to step down from this one.
    let _ = crate::store::fence::take_refused();
    // Commands from now on are newer than every command an earlier leader (or this replica, earlier) sent.
    parts.fleet.renew_epoch()?;
    // What other replicas wrote while this one followed.
    parts.fleet.view().reload()?;
    parts.engine.forget_tasks();
    parts.executor.forget_tasks();
    parts.maintenance.forget_tasks();
    parts.fleet.lead_on(Some(runtime.handle().clone()));
    runtime.spawn(parts.engine.clone().run());
    runtime.spawn(parts.maintenance.clone().run());
    if !parts.upcoming_notice.is_zero() {
        runtime.spawn(crate::schedule::notices(parts.engine.clone(), parts.maintenance.clone(), parts.upcoming_notice));
    }
    // Other replicas write to the same database. Their agents' reports and their operators' catalog and settings
    // changes reach this view through the relay, one change at a time (`crate::relay`); operator requests change
    // runs, looked at every second.
    let engine = parts.engine.clone();
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            engine.check_stored();
        }
    });
    Ok(runtime)
}

/// Stops the leader's work: nothing more is started, and every task of it ends at its next await.
fn step_down(parts: &LeaderParts, held: Held, replica: &str, why: &str) {
    parts.fleet.lead_on(None);
    held.runtime.shutdown_background();
    tracing::warn!(replica = %replica, term = held.term, why, "stepped down: no longer the leader");
}
