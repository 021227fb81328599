//! Node reports written in batches: one store transaction for the reports that arrive together.
//!
//! Every result of a reimage or patch is followed by the node's report, and every (re)connecting agent sends one
//! as it registers: at 100,000 nodes that is thousands of reports a second. Written one transaction each, they
//! held the store's connection most of the time, and a run's transitions (the engine's commit, job and lease
//! writes) queued behind them: that wait was most of a member-to-member handoff.
//!
//! [`ReportWriter`] is a group commit. A session that finds no batch being written writes its own report at once,
//! with every report queued at that moment (up to [`BATCH_MAX`]), in one `Store::record_reports`. Reports that
//! arrive meanwhile queue; when the batch is stored, the writer answers their senders and hands the next batch to
//! the first of them that is still waiting, whose task writes it. Nothing waits to fill a batch, and no thread of
//! its own writes: a thread had to wait for the CPU whenever the hub was busy, and the engine waits for the report
//! that follows each reimage. A report is durable, and in the planner's view, before its sender hears back.

use crate::store::{MemberRecord, ReportWrite, StoreError};
use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

/// Most reports in one transaction: bounds how long a batch holds the store's connection.
pub const BATCH_MAX: usize = 256;

/// Writes one batch, answering each report in order: the hub's is `Store::record_reports`.
pub type WriteBatch = Box<dyn Fn(&[ReportWrite]) -> Vec<Result<MemberRecord, StoreError>> + Send + Sync>;

/// What a queued sender hears.
enum Turn {
    /// Its report was written (or failed).
    Done(Result<MemberRecord, StoreError>),
    /// Its report is not written yet, and it writes the next batch (its own report first).
    Lead(Box<ReportWrite>),
}

struct Waiting {
    write: ReportWrite,
    turn: tokio::sync::oneshot::Sender<Turn>,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Waiting>,
    /// A batch is being written; new reports queue.
    writing: bool,
}

/// Writes node reports in batches (see the module's documentation).
pub struct ReportWriter {
    queue: Mutex<Queue>,
    write: WriteBatch,
}

impl ReportWriter {
    /// A writer that writes each batch with `write`.
    pub fn new(write: WriteBatch) -> ReportWriter {
        ReportWriter { queue: Mutex::new(Queue::default()), write }
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reports queued behind the batch being written.
    pub fn queued(&self) -> usize {
        self.queue().waiting.len()
    }

    /// Records one report with whatever others are waiting, and returns the member's configuration.
    pub async fn record(&self, write: ReportWrite) -> Result<MemberRecord, StoreError> {
        let node = write.node.clone();
        let queued = {
            let mut q = self.queue();
            if q.writing {
                let (turn, rx) = tokio::sync::oneshot::channel();
                q.waiting.push_back(Waiting { write, turn });
                Err(rx)
            } else {
                q.writing = true;
                Ok(write)
            }
        };
        let lead = match queued {
            Ok(write) => write,
            Err(rx) => match rx.await {
                Ok(Turn::Done(result)) => return result,
                Ok(Turn::Lead(write)) => *write,
                // Only a panic inside a batch's write drops a sender unanswered.
                Err(_) => {
                    return Err(StoreError::Db {
                        context: format!("recording report of node {node}"),
                        source: "the batch it was written in failed unexpectedly".into(),
                    });
                }
            },
        };
        // From here to the hand-over nothing awaits, so the lead cannot be dropped half way.
        self.lead(lead)
    }

    /// Writes `own` and what is queued in one batch, answers the others, and hands the next batch on.
    fn lead(&self, own: ReportWrite) -> Result<MemberRecord, StoreError> {
        let mut writes = vec![own];
        let mut turns = Vec::new();
        {
            let mut q = self.queue();
            let n = q.waiting.len().min(BATCH_MAX - 1);
            for w in q.waiting.drain(..n) {
                writes.push(w.write);
                turns.push(w.turn);
            }
        }
        // Should the write panic, the batch's senders hear an error (their channels drop) and the next takes over.
        let handover = HandOver(self);
        let mut results = (self.write)(&writes).into_iter();
        drop(handover);
        let own = results.next().unwrap_or_else(|| {
            Err(StoreError::Db {
                context: format!("recording report of node {}", writes[0].node),
                source: "the store answered no report of the batch".into(),
            })
        });
        for (turn, result) in turns.into_iter().zip(results) {
            // A sender that gave up waiting (its session ended) needs no answer.
            let _ = turn.send(Turn::Done(result));
        }
        own
    }
}

/// Passes the writing on when a batch is done (or its write panicked): to the first queued sender still
/// waiting, else nobody (the next report writes at once).
struct HandOver<'a>(&'a ReportWriter);

impl Drop for HandOver<'_> {
    fn drop(&mut self) {
        let mut q = self.0.queue();
        while let Some(next) = q.waiting.pop_front() {
            match next.turn.send(Turn::Lead(Box::new(next.write))) {
                Ok(()) => return,
                // Gone: its session ended while it waited, and its report goes with it.
                Err(_) => continue,
            }
        }
        q.writing = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;
    use crate::store::{NodeFacts, Store};
    use std::sync::{Arc, mpsc};
    use std::time::{Duration, Instant};

    fn write(node: &str, member: &str) -> ReportWrite {
        let facts = NodeFacts {
            member: member.into(),
            node_pool: "p".into(),
            region: "eu".into(),
            node_image_version: "Ubuntu-2204-202311.07.0".into(),
            ..Default::default()
        };
        ReportWrite { node: node.into(), facts, now_ms: 1000 }
    }

    /// Waits (bounded) until `ready` holds.
    fn until(what: &str, ready: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// A writer over a real SQLite store whose first batch is held at the store until the test lets it go (as a
    /// slow commit would be), and which panics on a node named "boom". Returns it, the store, the sizes of the
    /// batches written so far, and the release.
    #[allow(clippy::type_complexity)]
    fn held_writer()
    -> (Arc<ReportWriter>, Arc<SqliteStore>, Arc<Mutex<Vec<usize>>>, mpsc::Sender<()>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(SqliteStore::open(&dir.path().join("hub.db")).expect("open"));
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let (release, held) = mpsc::channel::<()>();
        let held = Mutex::new(Some(held));
        let (s, seen) = (store.clone(), sizes.clone());
        let writer = ReportWriter::new(Box::new(move |batch: &[ReportWrite]| {
            seen.lock().expect("sizes").push(batch.len());
            if let Some(h) = held.lock().expect("held").take() {
                h.recv().expect("released");
            }
            assert!(batch.iter().all(|w| w.node != "boom"), "the store failed unexpectedly");
            s.record_reports(batch)
        }));
        (Arc::new(writer), store, sizes, release, dir)
    }

    fn spawn(writer: &Arc<ReportWriter>, w: ReportWrite) -> tokio::task::JoinHandle<Result<MemberRecord, StoreError>> {
        let writer = writer.clone();
        tokio::spawn(async move { writer.record(w).await })
    }

    /// Starts the first report and returns once its batch is held at the store.
    fn first_held(
        writer: &Arc<ReportWriter>,
        sizes: &Mutex<Vec<usize>>,
        w: ReportWrite,
    ) -> tokio::task::JoinHandle<Result<MemberRecord, StoreError>> {
        let task = spawn(writer, w);
        until("the first batch to reach the store", || !sizes.lock().expect("sizes").is_empty());
        task
    }

    /// Starts a report and returns once `n` reports are queued.
    fn queued_as(
        writer: &Arc<ReportWriter>,
        w: ReportWrite,
        n: usize,
    ) -> tokio::task::JoinHandle<Result<MemberRecord, StoreError>> {
        let task = spawn(writer, w);
        until(&format!("{n} queued"), || writer.queued() == n);
        task
    }

    fn stored(store: &SqliteStore) -> Vec<String> {
        store.list_nodes(None).expect("list").into_iter().map(|n| n.name).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reports_queued_while_a_batch_is_written_go_together_into_the_next_one() {
        let (writer, store, sizes, release, _dir) = held_writer();
        let first = first_held(&writer, &sizes, write("n000", "m0"));
        let rest: Vec<_> =
            (1..=100).map(|i| spawn(&writer, write(&format!("n{i:03}"), &format!("m{}", i % 2)))).collect();
        until("100 reports to queue", || writer.queued() == 100);
        release.send(()).expect("release");
        assert_eq!(first.await.expect("task").expect("written").node_count, 1);
        for (i, task) in rest.into_iter().enumerate() {
            let member = task.await.expect("task").expect("written");
            assert_eq!(member.name, format!("m{}", (i + 1) % 2), "each sender gets its own member back");
        }
        assert_eq!(*sizes.lock().expect("sizes"), vec![1, 100], "one batch held, then everything queued behind it");
        assert_eq!(writer.queued(), 0);
        assert_eq!(stored(&store).len(), 101, "every report stored");
        assert_eq!(store.get_member("m1").expect("get").expect("m1").node_count, 50);
        // Nothing is being written now: the next report is written at once, alone.
        writer.record(write("n101", "m1")).await.expect("written");
        assert_eq!(sizes.lock().expect("sizes").last(), Some(&1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sender_that_gave_up_in_the_queue_is_passed_over_and_the_next_writes() {
        let (writer, store, sizes, release, _dir) = held_writer();
        let first = first_held(&writer, &sizes, write("n1", "m"));
        let gave_up = queued_as(&writer, write("gone", "m"), 1);
        gave_up.abort();
        assert!(gave_up.await.expect_err("aborted").is_cancelled());
        let next = queued_as(&writer, write("n2", "m"), 2);
        release.send(()).expect("release");
        first.await.expect("task").expect("written");
        let next =
            tokio::time::timeout(Duration::from_secs(20), next).await.expect("the next sender is handed the writing");
        assert_eq!(next.expect("task").expect("written").node_count, 2);
        assert_eq!(stored(&store), vec!["n1", "n2"], "the report of a sender that left is not written");
        assert_eq!(*sizes.lock().expect("sizes"), vec![1, 1]);
        assert_eq!(writer.queued(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_whose_write_panics_fails_its_own_sender_and_the_queue_goes_on() {
        let (writer, store, sizes, release, _dir) = held_writer();
        let boom = first_held(&writer, &sizes, write("boom", "m"));
        let next = queued_as(&writer, write("n1", "m"), 1);
        release.send(()).expect("release");
        assert!(boom.await.expect_err("the panic reaches the task").is_panic());
        let next =
            tokio::time::timeout(Duration::from_secs(20), next).await.expect("the next sender is handed the writing");
        assert_eq!(next.expect("task").expect("written").node_count, 1);
        assert_eq!(stored(&store), vec!["n1"]);
    }
}
