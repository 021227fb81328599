//! Node reports written in batches: one store transaction for the reports that arrive together.
//!
//! Every result of a reimage or patch is followed by the node's report, and every (re)connecting agent sends one
//! as it registers: at 100,000 nodes that is thousands of reports a second. Written one transaction each, they
//! held the store's connection most of the time, and a run's transitions (the engine's commit, job and lease
//! writes) queued behind them: that wait was most of a member-to-member handoff.
//!
//! [`ReportWriter`] owns one thread. Sessions hand it their reports and await the answer; the thread takes every
//! report queued at that moment (up to [`BATCH_MAX`]) and writes them with one `Store::record_reports`. Nothing
//! waits to fill a batch: a quiet hub writes each report as it comes, a busy one writes what queued while the last
//! batch committed. A report is durable, and in the planner's view, before its sender hears back, as before.

use crate::store::{MemberRecord, ReportWrite, StoreError};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

/// Most reports in one transaction: bounds how long the batch holds the store's connection (~5 ms at 100k nodes).
pub const BATCH_MAX: usize = 256;

type Answer = tokio::sync::oneshot::Sender<Result<MemberRecord, StoreError>>;

/// Writes node reports in batches on a thread of its own (see the module's documentation).
pub struct ReportWriter {
    queue: Option<mpsc::Sender<(ReportWrite, Answer)>>,
    /// Reports handed over and not yet taken into a batch.
    queued: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

/// Writes one batch, answering each report in order: the hub's is `Store::record_reports`.
pub trait WriteBatch: FnMut(&[ReportWrite]) -> Vec<Result<MemberRecord, StoreError>> + Send + 'static {}
impl<F: FnMut(&[ReportWrite]) -> Vec<Result<MemberRecord, StoreError>> + Send + 'static> WriteBatch for F {}

impl ReportWriter {
    /// Starts the writing thread, which writes each batch with `write`.
    pub fn start(mut write: impl WriteBatch) -> std::io::Result<ReportWriter> {
        let (queue, rx) = mpsc::channel::<(ReportWrite, Answer)>();
        let queued = Arc::new(AtomicUsize::new(0));
        let taken = queued.clone();
        let thread = std::thread::Builder::new().name("report-writer".into()).spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut batch = vec![first];
                while batch.len() < BATCH_MAX {
                    match rx.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                taken.fetch_sub(batch.len(), Ordering::Relaxed);
                let (writes, answers): (Vec<ReportWrite>, Vec<Answer>) = batch.into_iter().unzip();
                let results = write(&writes);
                for (answer, result) in answers.into_iter().zip(results) {
                    // A sender that gave up waiting (its session ended) needs no answer.
                    let _ = answer.send(result);
                }
            }
        })?;
        Ok(ReportWriter { queue: Some(queue), queued, thread: Some(thread) })
    }

    /// Reports handed over and not yet being written.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Records one report with whatever others are waiting, and returns the member's configuration.
    pub async fn record(&self, write: ReportWrite) -> Result<MemberRecord, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let node = write.node.clone();
        let stopped = || StoreError::Db {
            context: format!("recording report of node {node}"),
            source: "the hub's report writer has stopped (the hub is shutting down)".into(),
        };
        let queue = self.queue.as_ref().ok_or_else(stopped)?;
        self.queued.fetch_add(1, Ordering::Relaxed);
        if queue.send((write, tx)).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(stopped());
        }
        rx.await.map_err(|_| stopped())?
    }
}

impl Drop for ReportWriter {
    /// Ends the thread after the reports already queued are written, so that the store is no longer in use when
    /// the hub that owns it is gone (a hub reopening the same database file right after).
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;
    use crate::store::{NodeFacts, Store};
    use std::sync::Mutex;
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reports_queued_while_a_batch_is_written_go_together_into_the_next_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(SqliteStore::open(&dir.path().join("hub.db")).expect("open"));
        let sizes = Arc::new(Mutex::new(Vec::new()));
        // The first batch is held at the store until the test lets it go, as a slow commit would be.
        let (release, held) = mpsc::channel::<()>();
        let (s, seen) = (store.clone(), sizes.clone());
        let mut held = Some(held);
        let writer = Arc::new(
            ReportWriter::start(move |batch: &[ReportWrite]| {
                seen.lock().expect("sizes").push(batch.len());
                if let Some(h) = held.take() {
                    h.recv().expect("released");
                }
                s.record_reports(batch)
            })
            .expect("start"),
        );
        let first = tokio::spawn({
            let w = writer.clone();
            async move { w.record(write("n000", "m0")).await }
        });
        until("the first batch to reach the store", || !sizes.lock().expect("sizes").is_empty());
        let mut rest = Vec::new();
        for i in 1..=100 {
            let w = writer.clone();
            rest.push(tokio::spawn(async move { w.record(write(&format!("n{i:03}"), &format!("m{}", i % 2))).await }));
        }
        until("100 reports to queue", || writer.queued() == 100);
        release.send(()).expect("release");
        assert_eq!(first.await.expect("task").expect("written").node_count, 1);
        for (i, task) in rest.into_iter().enumerate() {
            let member = task.await.expect("task").expect("written");
            assert_eq!(member.name, format!("m{}", (i + 1) % 2), "each sender gets its own member back");
        }
        assert_eq!(*sizes.lock().expect("sizes"), vec![1, 100], "one batch held, then everything queued behind it");
        assert_eq!(writer.queued(), 0);
        assert_eq!(store.list_nodes(None).expect("list").len(), 101, "every report stored");
        assert_eq!(store.get_member("m1").expect("get").expect("m1").node_count, 50);
    }

    #[tokio::test]
    async fn dropping_the_writer_ends_its_thread_and_lets_go_of_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("hub.db")).expect("open"));
        let s = store.clone();
        let writer = ReportWriter::start(move |b: &[ReportWrite]| s.record_reports(b)).expect("start");
        writer.record(write("n1", "m1")).await.expect("written");
        assert_eq!(Arc::strong_count(&store), 2, "the thread holds the store");
        drop(writer);
        assert_eq!(Arc::strong_count(&store), 1, "joined: nothing of the writer holds the store any more");
    }
}
