//! The node's facts pushed from the executor to the network half when they change, so that a heartbeat reads
//! them from memory instead of asking the executor every time (one wakeup per heartbeat in each process).
//!
//! - **Executor side (`FactsFeed`).** The network half subscribes with `Request::WatchFacts`; the executor
//!   keeps that connection and writes one line per change: a JSON `Reply<OsFacts>`, the first at once. It
//!   re-reads the facts after every request that may change the node (before it answers that request), and
//!   when one of `NodeOs::facts_sources` changes: an inotify watch on their directories, so that an idle node
//!   costs no wakeup at all. The feed sends a line only when the facts differ from the last line sent.
//! - **Network half (`os::remote::FactsCache` and `follow`, kept with `RemoteOs` so that the wire's modules form
//!   no circle).** A thread reads the subscription and keeps the last facts. `RemoteOs::facts` answers from it
//!   while it is valid. Any request that may change the node invalidates it
//!   before it is sent and again when it returns; the next `facts` then asks the executor directly, unless a
//!   pushed line (read after the request's answer, so written after the change) came first. While the
//!   subscription is down (executor restarting, watch refused) every `facts` asks the executor, as before.
//!
//! Why this is exact: every change of a source or by a request is followed by a re-read and, if anything
//! differs, a line written after that change. A line written before a change can still be read after it by a
//! slow reader thread; the line of that change is then already behind it in the same connection.

use super::NodeOs;
use super::remote::{WireError, encode_reply, encode_value};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Subscriptions kept at once; a new one beyond this ends the oldest (the network half holds one; a restart of
/// it leaves its old one behind until the next write finds it closed).
const MAX_SUBSCRIBERS: usize = 4;
/// How long a write to a subscriber may block before it is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// A burst of changes (a package transaction) is read again once it has been quiet this long...
const SETTLE: Duration = Duration::from_millis(300);
/// ... or, in a burst that does not end, this often.
const SETTLE_AT_MOST: Duration = Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether the source watch runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watch {
    NotStarted,
    Running,
    /// inotify could not be set up: subscriptions are refused, so the network half asks every time.
    Failed,
}

struct Feed {
    /// The last line sent (None: none yet, or nobody listens).
    last: Option<Vec<u8>>,
    subscribers: Vec<UnixStream>,
    watch: Watch,
}

/// The executor's side: subscriptions and what changes the facts.
pub struct FactsFeed {
    os: Arc<dyn NodeOs>,
    feed: Mutex<Feed>,
}

impl FactsFeed {
    /// A feed of `os`'s facts; the source watch starts with the first subscription.
    pub fn new(os: Arc<dyn NodeOs>) -> Arc<FactsFeed> {
        Arc::new(FactsFeed {
            os,
            feed: Mutex::new(Feed { last: None, subscribers: Vec::new(), watch: Watch::NotStarted }),
        })
    }

    fn line(&self) -> Vec<u8> {
        let facts = self.os.facts().and_then(encode_value);
        let mut line = encode_reply(facts.map_err(WireError::from));
        line.push(b'\n');
        line
    }

    /// Takes `conn` (whose `watch_facts` request has been read) as a subscription: sends it the facts now and
    /// at every change after. Closed without a line when the source watch could not be set up.
    pub fn subscribe(self: &Arc<Self>, mut conn: UnixStream) {
        let start = {
            let mut f = lock(&self.feed);
            if f.watch == Watch::Failed {
                // Closed without a line: the network half asks for the facts instead.
                return;
            }
            let _ = conn.set_write_timeout(Some(WRITE_TIMEOUT));
            let line = self.line();
            if conn.write_all(&line).is_err() {
                return;
            }
            if f.last.as_ref() != Some(&line) {
                send(&mut f.subscribers, &line);
                f.last = Some(line);
            }
            f.subscribers.push(conn);
            if f.subscribers.len() > MAX_SUBSCRIBERS {
                f.subscribers.remove(0);
            }
            let start = f.watch == Watch::NotStarted;
            if start {
                f.watch = Watch::Running;
            }
            start
        };
        if start {
            let me = self.clone();
            let spawned = std::thread::Builder::new().name("facts-watch".into()).spawn(move || {
                if let Err(why) = me.watch() {
                    tracing::warn!(error = %why, "executor: cannot watch the node's files; the agent asks for its facts at every heartbeat");
                    let mut f = lock(&me.feed);
                    f.watch = Watch::Failed;
                    // Closing them sends the network half back to asking.
                    f.subscribers.clear();
                    f.last = None;
                }
            });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "executor: cannot start the facts watch");
                let mut f = lock(&self.feed);
                f.watch = Watch::Failed;
                f.subscribers.clear();
            }
        }
    }

    /// Reads the facts again and sends them to every subscriber if they changed. Called after every request
    /// that may change the node, before it is answered, and by the source watch.
    pub fn refresh(&self) {
        let mut f = lock(&self.feed);
        if f.subscribers.is_empty() {
            f.last = None;
            return;
        }
        let line = self.line();
        if f.last.as_ref() != Some(&line) {
            send(&mut f.subscribers, &line);
            f.last = Some(line);
        }
    }

    /// Subscriptions held now.
    pub fn subscribers(&self) -> usize {
        lock(&self.feed).subscribers.len()
    }

    /// Watches the directories of `facts_sources` and refreshes when one of the sources changes. Returns only
    /// when inotify fails; with no sources it returns at once (only requests change the facts then).
    fn watch(&self) -> Result<(), String> {
        let sources = self.os.facts_sources();
        if sources.is_empty() {
            return Ok(());
        }
        let ino = Inotify::init(InitFlags::IN_CLOEXEC).map_err(|e| format!("inotify_init: {e}"))?;
        let mut dirs = Vec::new();
        add_watches(&ino, &sources, &mut dirs)?;
        // What changed between the subscription's first line and the watches being in place.
        self.refresh();
        loop {
            let events = ino.read_events().map_err(|e| format!("reading inotify events: {e}"))?;
            if !events.iter().any(|e| relevant(e, &mut dirs, &sources)) {
                continue;
            }
            // Let a burst end (a package transaction touches its database many times) before reading again.
            let began = Instant::now();
            while began.elapsed() < SETTLE_AT_MOST && readable(&ino, SETTLE)? {
                let more = ino.read_events().map_err(|e| format!("reading inotify events: {e}"))?;
                more.iter().for_each(|e| {
                    relevant(e, &mut dirs, &sources);
                });
            }
            // A directory made or removed changes what has to be watched.
            add_watches(&ino, &sources, &mut dirs)?;
            self.os.forget_cached_facts();
            self.refresh();
        }
    }
}

fn send(subscribers: &mut Vec<UnixStream>, line: &[u8]) {
    subscribers.retain_mut(|s| s.write_all(line).is_ok());
}

fn readable(ino: &Inotify, within: Duration) -> Result<bool, String> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let ms = u16::try_from(within.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(ino.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(n) => Ok(n > 0),
        Err(nix::errno::Errno::EINTR) => Ok(true),
        Err(e) => Err(format!("poll on inotify: {e}")),
    }
}

/// The directories watched, by watch descriptor (a handful: a list is enough).
type Watched = Vec<(WatchDescriptor, PathBuf)>;

/// What a change looks like in a watched directory.
fn mask() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
}

/// Watches, for every source, the source itself when it is a directory and the nearest directory above it that
/// exists (so that a file, or a directory on its way, is seen when it appears).
fn add_watches(ino: &Inotify, sources: &[PathBuf], dirs: &mut Watched) -> Result<(), String> {
    let mut add = |dir: &Path| -> Result<(), String> {
        match ino.add_watch(dir, mask()) {
            Ok(wd) => {
                if !dirs.iter().any(|(w, _)| *w == wd) {
                    dirs.push((wd, dir.to_path_buf()));
                }
                Ok(())
            }
            // Gone between the look and the watch: the watch above it sees it come back.
            Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR) => Ok(()),
            Err(e) => Err(format!("watching {}: {e}", dir.display())),
        }
    };
    for s in sources {
        if s.is_dir() {
            add(s)?;
        }
        if let Some(dir) = s.ancestors().skip(1).find(|a| a.is_dir()) {
            add(dir)?;
        }
    }
    Ok(())
}

/// Whether `e` may change the facts: it names a source or a directory on a source's path, happens inside a
/// source directory, or concerns a watched directory itself (removed, moved, or the queue overflowed).
fn relevant(e: &InotifyEvent, dirs: &mut Watched, sources: &[PathBuf]) -> bool {
    if e.mask.contains(AddWatchFlags::IN_IGNORED) {
        dirs.retain(|(w, _)| *w != e.wd);
        return true;
    }
    let Some((_, dir)) = dirs.iter().find(|(w, _)| *w == e.wd) else { return true };
    match &e.name {
        None => true,
        Some(name) => {
            let path = dir.join(name);
            sources.iter().any(|s| s.starts_with(&path) || s == dir)
        }
    }
}
