//! The operation engine: executes hub commands step by step through the write-ahead journal. Each step is
//! journalled before it is performed and every step is safe to perform again, so an operation interrupted
//! by an agent restart or a reboot resumes from its journalled step. A repeated operation id is answered with
//! the first result; a command of an older generation than the newest seen is refused.
//!
//! Reimage: local checks (rolled back before? downgrade? a signature by a trusted key? an https URL, if the
//! image names one) -> fetch into staging with resume (from the hub, or from the image's https URL), verify
//! digest and signature -> write the inactive slot -> mark it boot-once -> reboot ->
//! health (booted the new slot, hub reachable again, health commands) -> commit, or fall back to the previous
//! slot, remember the image as rolled back and report the reason.
//!
//! Staging and slot leftovers: a staged part is resumed only while it can be a prefix of the image (not longer
//! than the announced size; at full size, hashing to the image's digest); otherwise the download starts again
//! from 0, once per operation. The staged image is removed once the slot is written, and every reimage that
//! ends (committed, refused, failed, rolled back) removes its staging and the slot write's leftovers
//! (`NodeOs::remove_slot_leftovers`); at start, and before each download, so is everything that belongs to no
//! operation in flight.
//!
//! Apply security patch: checks (the pool may take security patches, the node's OS has a known package manager,
//! the patch is for the node's image family; already applied = done) -> install exactly the pinned packages from
//! the configured repositories (apt or dnf; safe to repeat) -> record the patch version. Reboot-required is then
//! reported with the node's facts; the reboot itself is a separate, leased operation.
//!
//! Decisions and effects are apart: `engine/transition.rs` is a pure function (operation + step + the outcome
//! of the last effect -> the next effect, or the next step, or the result) tested without I/O, and
//! `Engine::step` here is the thin runner that performs each effect it names: on the node through `NodeOs`,
//! downloads through a `Fetcher`, the hub session through `Link`, marks and staging in the state directory.
//!
//! Upgrade Kubernetes: checks (format, already there, no downgrade or skipped minor) -> a pending mark (persist,
//! then act) -> install the configured packages at the version -> run the configured upgrade hook (`kubeadm
//! upgrade apply V` on the member's first control plane, `kubeadm upgrade node` elsewhere; both safe to repeat)
//! and check the version -> clear the mark. The mark keeps a failed hook from being taken for a finished upgrade:
//! after the install the packages are at the new version, so a retry would otherwise find "already there".
//!
//! Leased reboot (SPEC §4 "reboot: coordinated"): a lease the hub granted becomes a local operation
//! `lease/<lease_id>`: cordon -> drain -> reboot (fenced by the boot id) -> health -> uncordon -> give the lease
//! back. A failure at cordon, drain, reboot or health still uncordons (best effort) and gives the lease back, so
//! a failed reboot never keeps a slot of the member's disruption budget.

use crate::journal::{Entry, Journal, Op, Outcome, Step};
use crate::os::image::{Download, TrustError, clean_staging, discard, parse_trusted_keys, verify};
use crate::os::{NodeOs, OsError, Rebooted};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use upkeep_core::version::ImageVersion;
use upkeep_proto::v1;

/// Download attempts (each resumes where the last one broke) before a reimage fails.
const FETCH_ATTEMPTS: u32 = 6;
/// First pause between download attempts; doubles per attempt.
const FETCH_RETRY_BASE: Duration = Duration::from_millis(100);

/// Streams an artifact from `offset`. When the source cannot serve from `offset` (it is past the artifact's
/// end: the staged part is not a prefix of it), the stream starts again from 0 and its first chunk says so
/// with offset 0 (the engine then discards what it staged).
pub trait Fetcher: Send + Sync {
    /// Opens the artifact `sha256` at `offset`.
    fn open(
        &self,
        sha256: &str,
        offset: u64,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<v1::ImageChunk, String>>, String>>;
}

/// Streams an artifact from an https URL; defined beside its implementation, `os::https::HttpsFetcher`.
pub use crate::os::https::UrlFetcher;

/// What the engine needs from the hub session.
pub trait Link: Send + Sync {
    /// Number of sessions established (Welcome received) since the agent started.
    fn epoch(&self) -> u64;
    /// Ends the current session so that it is re-established (after an in-process, simulated boot).
    fn restart_session(&self);
    /// Waits until `epoch() > above`, at most `within`; false on timeout.
    fn wait_epoch_above(&self, above: u64, within: Duration) -> BoxFuture<'_, bool>;
    /// Queues a `LeaseRelease{lease_ids: [lease_id]}` to the hub (sent on the open session, or covered by the
    /// start-of-session release of the next one). Never blocks. A link without a hub keeps the default: it can
    /// only say so, and the hub lets the lease lapse at its expiry.
    fn release_lease(&self, lease_id: &str) {
        tracing::warn!(lease = %lease_id, "no hub session to give the reboot lease back; it lapses at its expiry");
    }
}

/// Operation ids of leased reboots: `lease/<lease_id>`.
pub const LEASE_OP_PREFIX: &str = "lease/";

/// The operation id of the leased reboot under `lease_id`.
pub fn lease_operation_id(lease_id: &str) -> String {
    format!("{LEASE_OP_PREFIX}{lease_id}")
}

/// The release a session sends right after Register: every lease this node holds at the hub except those of
/// leased reboots still unfinished in `journal` (one that is mid-reboot keeps its lease; one left behind by a
/// crash, or whose release was lost with a broken session, is given back).
pub fn lease_release_on_start(journal: &[Entry]) -> v1::LeaseRelease {
    let lease_ids = journal
        .iter()
        .filter(|e| e.result.is_none())
        .filter_map(|e| match &e.op {
            Op::LeasedReboot { lease_id, .. } => Some(lease_id.clone()),
            _ => None,
        })
        .collect();
    v1::LeaseRelease { lease_ids, all_except: true }
}

/// What `submit_lease` did with a granted lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseTaken {
    /// A leased reboot was journalled and started.
    Started,
    /// Its operation is already under way: nothing more to do.
    AlreadyRunning,
    /// Its operation already finished: the lease was given back again, nothing redone.
    AlreadyFinished,
    /// Not taken (the reason); the lease was given back where there was one.
    Refused(String),
}

/// How `submit` answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Submitted {
    /// The result is known now (a repeat, a refusal, or an unsupported kind): send it.
    Finished(v1::OperationResult),
    /// Being carried out; the result is sent through the results channel when it is reached.
    Running,
}

/// The engine.
pub struct Engine {
    os: Arc<dyn NodeOs>,
    state_dir: PathBuf,
    journal: Mutex<Journal>,
    running: Mutex<HashSet<String>>,
    reboot_epoch: Mutex<HashMap<String, u64>>,
    fetcher: Arc<dyn Fetcher>,
    /// Downloads of images named by https URL; None: such images are refused.
    url_fetcher: Mutex<Option<Arc<dyn UrlFetcher>>>,
    link: Arc<dyn Link>,
    results: mpsc::UnboundedSender<v1::OperationResult>,
    health_timeout: Duration,
    pool: Mutex<(String, String)>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn wire(id: &str, generation: u64, o: &Outcome) -> v1::OperationResult {
    v1::OperationResult {
        operation_id: id.to_string(),
        generation,
        ok: o.ok,
        error: o.error.clone(),
        finished_at_unix_ms: o.finished_at_unix_ms,
        busy: false,
    }
}

fn failed(error: String) -> Outcome {
    Outcome { ok: false, error, finished_at_unix_ms: now_ms() }
}

/// Decodes the wire command; Err is the refusal text.
fn decode(c: &v1::Command) -> Result<Op, String> {
    use v1::command::Kind;
    match &c.kind {
        Some(Kind::Cordon(_)) => Ok(Op::Cordon),
        Some(Kind::Uncordon(_)) => Ok(Op::Uncordon),
        Some(Kind::Drain(d)) => Ok(Op::Drain { timeout_seconds: d.timeout_seconds, force: d.force }),
        Some(Kind::Reboot(r)) => Ok(Op::Reboot { force: r.force }),
        Some(Kind::Reimage(r)) => {
            let img = r.image.as_ref().ok_or("reimage.image: missing; name the image to install")?;
            Ok(Op::Reimage {
                family: img.family.clone(),
                version: img.version.clone(),
                url: img.url.clone(),
                sha256: img.sha256.clone(),
                signature: img.signature.clone(),
                size_bytes: img.size_bytes,
                allow_downgrade: r.allow_downgrade,
                reinstall: r.reinstall,
            })
        }
        Some(Kind::ApplySecurityPatch(p)) => {
            if p.family.trim().is_empty() {
                return Err("apply_security_patch.family: empty; name the image family the patch is for".into());
            }
            let _: ImageVersion =
                p.version.parse().map_err(|e| format!("apply_security_patch.version: {:?}: {e}", p.version))?;
            crate::channel::parse_package_pins(&p.packages)?;
            Ok(Op::ApplySecurityPatch {
                family: p.family.clone(),
                version: p.version.clone(),
                packages: p.packages.clone(),
            })
        }
        Some(Kind::UpgradeKubernetes(u)) => {
            let v: upkeep_core::version::KubernetesVersion =
                u.version.parse().map_err(|e| format!("upgrade_kubernetes.version: {e}"))?;
            Ok(Op::UpgradeKubernetes { version: v.to_string(), first_control_plane: u.first_control_plane })
        }
        None => Err("command.kind: empty; the hub sent a command without an operation".into()),
    }
}

/// Removes every staged file but `keep`'s, and the slot write's leftovers, logging what it removed. A file that
/// cannot be removed is logged and tried again at the next occasion: cleaning never fails an operation.
fn clean_leftovers(state_dir: &Path, os: &dyn NodeOs, keep: Option<&str>, when: &str) {
    match clean_staging(state_dir, keep) {
        Ok(removed) => {
            for p in removed {
                tracing::info!(path = %p.display(), when, "removed a staging leftover");
            }
        }
        Err(e) => tracing::warn!(error = %e, when, "cannot clean the image staging directory"),
    }
    match os.remove_slot_leftovers() {
        Ok(removed) => {
            for p in removed {
                tracing::info!(path = %p.display(), when, "removed a partial slot write");
            }
        }
        Err(e) => tracing::warn!(error = %e, when, "cannot remove a partial slot write"),
    }
}

/// The image a reimage names, checked.
/// Where a step goes next.
#[allow(clippy::large_enum_variant)] // one short-lived value per step; boxing buys nothing
enum Next {
    /// Journal this entry and go on.
    Go(Entry),
    /// The machine is going down; the journal carries on after the boot.
    Park,
}

impl Engine {
    /// Opens the journal under `state_dir`.
    pub fn new(
        os: Arc<dyn NodeOs>,
        state_dir: &Path,
        fetcher: Arc<dyn Fetcher>,
        link: Arc<dyn Link>,
        results: mpsc::UnboundedSender<v1::OperationResult>,
        health_timeout: Duration,
    ) -> Result<Arc<Engine>, crate::state::StateError> {
        Ok(Arc::new(Engine {
            os,
            state_dir: state_dir.to_path_buf(),
            journal: Mutex::new(Journal::open(state_dir)?),
            running: Mutex::new(HashSet::new()),
            reboot_epoch: Mutex::new(HashMap::new()),
            fetcher,
            url_fetcher: Mutex::new(None),
            link,
            results,
            health_timeout,
            pool: Mutex::new((String::new(), String::new())),
        }))
    }

    /// Lets reimages name their image by https URL, downloaded through `f` (without it they are refused).
    pub fn set_url_fetcher(&self, f: Arc<dyn UrlFetcher>) {
        *self.url_fetcher.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    fn url_fetcher(&self) -> Option<Arc<dyn UrlFetcher>> {
        self.url_fetcher.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Tells the engine the node's pool and hardware class (named in, and deciding, security patch refusals).
    pub fn set_pool(&self, node_pool: &str, hardware_class: &str) {
        *self.pool.lock().unwrap_or_else(|e| e.into_inner()) = (node_pool.to_string(), hardware_class.to_string());
    }

    async fn node_kind(&self) -> Result<crate::channel::NodeKind, OsError> {
        let kv = self.os(|os| os.os_release()).await?;
        let (node_pool, hardware_class) = self.pool.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Ok(crate::channel::NodeKind { os: crate::channel::classify(&kv), node_pool, hardware_class })
    }

    fn journal(&self) -> std::sync::MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes staging and slot-write leftovers of operations no longer in flight (a crash, a failure before
    /// this version cleaned up, files of another agent), then resumes every unfinished operation. Call once at
    /// start, inside the runtime, before any command is taken: nothing else runs yet, so the cleaning is done
    /// in place.
    pub fn resume(self: &Arc<Self>) {
        let unfinished = self.journal().unfinished();
        // A reimage before its slot write still needs its staged image (a download resumes from it); a slot
        // write under way is redone from the start by `write_slot`, which removes its own partial copy.
        let keep = unfinished.iter().find_map(|e| match (&e.op, e.step) {
            (Op::Reimage { sha256, .. }, Step::Accepted | Step::Fetch | Step::Write) => Some(sha256.clone()),
            _ => None,
        });
        self.clean_leftovers_now(keep.as_deref(), "at start");
        for e in unfinished {
            tracing::info!(op = %e.operation_id, kind = e.op.kind(), step = e.step.as_str(), "resuming operation");
            self.spawn(e.operation_id);
        }
    }

    fn clean_leftovers_now(&self, keep: Option<&str>, when: &str) {
        clean_leftovers(&self.state_dir, self.os.as_ref(), keep, when);
    }

    /// `clean_leftovers` off the runtime's thread.
    async fn clean_leftovers_off_thread(&self, keep: Option<String>, when: &'static str) {
        let (state_dir, os) = (self.state_dir.clone(), self.os.clone());
        let cleaning =
            tokio::task::spawn_blocking(move || clean_leftovers(&state_dir, os.as_ref(), keep.as_deref(), when));
        if let Err(e) = cleaning.await {
            tracing::warn!(error = %e, when, "cleaning leftovers panicked");
        }
    }

    fn spawn(self: &Arc<Self>, id: String) {
        if !self.running().insert(id.clone()) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move { me.drive(id).await });
    }

    /// Takes a command from the hub.
    pub fn submit(self: &Arc<Self>, c: &v1::Command) -> Submitted {
        let id = c.operation_id.clone();
        let mut j = self.journal();
        if let Some(e) = j.get(&id) {
            if let Some(r) = &e.result {
                tracing::info!(op = %id, "repeated operation: answering with its first result");
                return Submitted::Finished(wire(&id, e.generation, r));
            }
            drop(j);
            self.spawn(id);
            return Submitted::Running;
        }
        let refuse = |why: String| {
            tracing::warn!(op = %c.operation_id, error = %why, "operation refused");
            Submitted::Finished(wire(&c.operation_id, c.generation, &failed(why)))
        };
        if id.is_empty() {
            return refuse("command.operation_id: empty; every command needs an operation id".into());
        }
        let newest = j.newest_generation();
        if c.generation < newest {
            return refuse(format!(
                "command.generation: {} is older than the newest seen on this node ({newest}); refusing a stale command",
                c.generation
            ));
        }
        let op = match decode(c) {
            Ok(op) => op,
            Err(why) => return refuse(why),
        };
        if let Some(busy) = j.unfinished().into_iter().next() {
            let why = format!(
                "operation {} ({}) is still in flight at step {}; send this one after it finished",
                busy.operation_id,
                busy.op.kind(),
                busy.step.as_str()
            );
            tracing::info!(op = %c.operation_id, reason = %why, "operation refused for now");
            // Not journalled: the hub sends the same command again once the node is free.
            let mut r = wire(&c.operation_id, c.generation, &failed(why));
            r.busy = true;
            return Submitted::Finished(r);
        }
        let entry = Entry::accepted(id.clone(), c.generation, op);
        if let Err(e) = j.put(entry) {
            return refuse(format!("cannot journal the operation: {e}"));
        }
        drop(j);
        self.spawn(id);
        Submitted::Running
    }

    /// Takes a reboot lease the hub granted (asked for, or an operator's): journals and starts the leased reboot
    /// `lease/<lease_id>`. Idempotent by operation id. A lease that cannot be used now (another operation in
    /// flight) is given back at once.
    pub fn submit_lease(self: &Arc<Self>, lease_id: &str, forced: bool) -> LeaseTaken {
        if lease_id.trim().is_empty() {
            return LeaseTaken::Refused("lease.lease_id: empty; the hub must name the lease it grants".into());
        }
        let id = lease_operation_id(lease_id);
        let mut j = self.journal();
        if let Some(e) = j.get(&id) {
            let finished = e.result.is_some();
            drop(j);
            if finished {
                tracing::info!(op = %id, "lease granted again for a finished leased reboot: giving it back");
                self.link.release_lease(lease_id);
                return LeaseTaken::AlreadyFinished;
            }
            self.spawn(id);
            return LeaseTaken::AlreadyRunning;
        }
        let give_back = |why: String| {
            tracing::warn!(lease = %lease_id, error = %why, "reboot lease not used; giving it back");
            self.link.release_lease(lease_id);
            LeaseTaken::Refused(why)
        };
        if let Some(busy) = j.unfinished().into_iter().next() {
            drop(j);
            return give_back(format!(
                "operation {} ({}) is still in flight at step {}; the reboot lease {lease_id} was given back",
                busy.operation_id,
                busy.op.kind(),
                busy.step.as_str()
            ));
        }
        let entry = Entry::accepted(id.clone(), 0, Op::LeasedReboot { lease_id: lease_id.to_string(), forced });
        if let Err(e) = j.put(entry) {
            drop(j);
            return give_back(format!("cannot journal the leased reboot: {e}"));
        }
        drop(j);
        tracing::info!(op = %id, forced, "reboot lease granted: leased reboot started");
        self.spawn(id);
        LeaseTaken::Started
    }

    /// The release to send right after Register (see `lease_release_on_start`).
    pub fn lease_release_on_start(&self) -> v1::LeaseRelease {
        let entries: Vec<Entry> = self.journal().unfinished();
        lease_release_on_start(&entries)
    }

    /// Finish times (Unix ms) of the leased reboots already tried under the lease ids this node asks for on boot
    /// `boot_id` (`reboot/<boot id>` and its retries `reboot/<boot id>/<n>`). They all failed: a leased reboot
    /// that rebooted changed the boot id.
    pub fn leased_reboots_tried(&self, boot_id: &str) -> Vec<i64> {
        let base = format!("reboot/{boot_id}");
        let mut tried: Vec<i64> = self
            .journal()
            .entries()
            .filter_map(|e| match (&e.op, &e.result) {
                (Op::LeasedReboot { lease_id, .. }, Some(r))
                    if *lease_id == base
                        || lease_id.strip_prefix(base.as_str()).is_some_and(|t| t.starts_with('/')) =>
                {
                    Some(r.finished_at_unix_ms)
                }
                _ => None,
            })
            .collect();
        tried.sort_unstable();
        tried
    }

    /// Operations in flight, for the node report.
    pub fn operations(&self) -> Vec<v1::OperationState> {
        self.journal()
            .unfinished()
            .into_iter()
            .map(|e| v1::OperationState {
                operation_id: e.operation_id,
                kind: e.op.kind().into(),
                step: e.step.as_str().into(),
                state: "running".into(),
            })
            .collect()
    }

    /// The journalled entry of `id` (tests and diagnostics).
    pub fn entry(&self, id: &str) -> Option<Entry> {
        self.journal().get(id).cloned()
    }

    async fn drive(self: Arc<Self>, id: String) {
        let finished = loop {
            let Some(entry) = self.entry(&id) else { break None };
            if let Some(r) = &entry.result {
                break Some(wire(&id, entry.generation, r));
            }
            let generation = entry.generation;
            let next = match self.step(entry.clone()).await {
                Ok(Next::Go(e)) => e,
                Ok(Next::Park) => {
                    tracing::info!(op = %id, "the node is rebooting; the operation continues after the boot");
                    return; // stays in `running`: a repeat is answered once the node is back
                }
                Err(why)
                    if matches!(entry.op, Op::LeasedReboot { .. })
                        && !matches!(entry.step, Step::Uncordon | Step::Release) =>
                {
                    // A leased reboot still uncordons and gives its lease back.
                    unwound(entry, why)
                }
                Err(why) => {
                    // A step that cannot even be attempted (journal or node unreadable): a definite failure.
                    let mut e = entry;
                    e.step = Step::Done;
                    e.result = Some(failed(why.clone()));
                    self.before_the_end(&e).await;
                    if self.journal().put(e).is_err() {
                        self.running().remove(&id);
                        let _ = self.results.send(wire(&id, generation, &failed(why)));
                        return;
                    }
                    continue;
                }
            };
            tracing::info!(op = %id, kind = next.op.kind(), step = next.step.as_str(), "operation step");
            self.before_the_end(&next).await;
            if let Err(e) = self.journal().put(next) {
                let why = format!("cannot journal the next step: {e}");
                self.running().remove(&id);
                let _ = self.results.send(wire(&id, generation, &failed(why)));
                return;
            }
        };
        self.running().remove(&id);
        if let Some(r) = finished {
            tracing::info!(op = %id, ok = r.ok, error = %r.error, "operation finished");
            let _ = self.results.send(r);
        }
    }

    /// Called with every entry about to be journalled: when it ends a reimage (committed, refused, failed, rolled
    /// back), nothing of the image stays behind. Done before the result is journalled, while the operation still
    /// keeps any other out (a crash in between repeats the last step, which is safe to repeat).
    async fn before_the_end(&self, e: &Entry) {
        if e.result.is_some() && matches!(e.op, Op::Reimage { .. }) {
            self.clean_leftovers_off_thread(None, "as a reimage ends").await;
        }
    }

    async fn os<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn NodeOs) -> Result<T, OsError> + Send + 'static,
    ) -> Result<T, OsError> {
        let os = self.os.clone();
        match tokio::task::spawn_blocking(move || f(os.as_ref())).await {
            Ok(r) => r,
            Err(e) => Err(OsError::Unhealthy(format!("node operation panicked: {e}"))),
        }
    }

    fn ctx(&self) -> Ctx {
        Ctx { state_dir: self.state_dir.clone(), now_ms: now_ms(), has_url_fetcher: self.url_fetcher().is_some() }
    }

    /// Runs the entry's step: asks `transition` what to do, performs each effect it names, and feeds the
    /// outcome back until the step is over. Returns the entry with its next step (or its result).
    async fn step(&self, e: Entry) -> Result<Next, String> {
        let mut t = transition(e, 0, Event::Enter, &self.ctx());
        loop {
            match t {
                Transition::Next(e) => return Ok(Next::Go(e)),
                Transition::Park => return Ok(Next::Park),
                Transition::Stuck(why) => return Err(why),
                Transition::Do { entry, cursor, effect, persist_first } => {
                    if persist_first {
                        self.journal().put(entry.clone()).map_err(|err| format!("cannot journal the step: {err}"))?;
                    }
                    let outcome = self.perform(&entry, effect).await;
                    t = transition(entry, cursor, Event::Done(outcome), &self.ctx());
                }
            }
        }
    }

    /// Performs one effect for operation `e`.
    async fn perform(&self, e: &Entry, effect: Effect) -> Result<Value, String> {
        let unit = |r: Result<(), OsError>| r.map(|()| Value::Unit).map_err(|err| err.to_string());
        match effect {
            Effect::Cordon => unit(self.os(|os| os.cordon()).await),
            Effect::Uncordon => unit(self.os(|os| os.uncordon()).await),
            Effect::Drain { timeout, force } => unit(self.os(move |os| os.drain(timeout, force)).await),
            Effect::BootState => self.os(|os| os.boot_state()).await.map(Value::Boot).map_err(|err| err.to_string()),
            Effect::Facts => self.os(|os| os.facts()).await.map(Value::Facts).map_err(|err| err.to_string()),
            Effect::NodeKind => self.node_kind().await.map(Value::Kind).map_err(|err| err.to_string()),
            Effect::TrustedKeys => self.trusted_keys().await.map(Value::Keys),
            Effect::ReadMark(path) => Ok(Value::Mark(crate::state::read_mark(&path))),
            Effect::WriteMark(path, text) => {
                crate::state::write_atomic(&path, text.as_bytes()).map(|()| Value::Unit).map_err(|err| err.to_string())
            }
            Effect::ClearMark(path) => {
                if let Err(err) = crate::state::clear_mark(&path) {
                    // What it marked is done; a stale mark only makes a later order run again.
                    tracing::warn!(path = %path.display(), error = %err, "could not clear a mark");
                }
                Ok(Value::Unit)
            }
            Effect::CleanLeftovers { keep } => {
                self.clean_leftovers_off_thread(keep, "before a download").await;
                Ok(Value::Unit)
            }
            Effect::Fetch { sha256, url, size, signature } => {
                let staged = self.download(&sha256, &url, size).await?;
                let keys = self.trusted_keys().await?;
                match verify(&staged, &sha256, size, &signature, &keys) {
                    Ok(key) => {
                        tracing::info!(op = %e.operation_id, key = %key, bytes = staged.size, "image verified");
                        Ok(Value::Unit)
                    }
                    Err(err) => Err(format!("image refused, nothing written: {err}")),
                }
            }
            Effect::WriteSlot(slot, image) => {
                let bytes = self.os(move |os| os.write_slot(slot, &image)).await.map_err(|err| err.to_string())?;
                tracing::info!(op = %e.operation_id, slot = %slot, bytes, "slot written");
                Ok(Value::Unit)
            }
            Effect::DiscardStaged(sha256) => {
                discard(&self.state_dir, &sha256);
                Ok(Value::Unit)
            }
            Effect::MarkBootOnce(slot) => unit(self.os(move |os| os.mark_boot_once(slot)).await),
            Effect::Reboot => {
                let before = self.link.epoch();
                let r = self.os(|os| os.reboot()).await.map_err(|err| err.to_string())?;
                if r == Rebooted::Done {
                    // In-process boot: the session goes down and comes back as after a real boot.
                    self.reboot_epoch.lock().unwrap_or_else(|p| p.into_inner()).insert(e.operation_id.clone(), before);
                    self.link.restart_session();
                }
                Ok(Value::Rebooted(r))
            }
            Effect::AwaitSession => {
                // After an in-process boot: a session newer than the one before it. After a real boot (the agent
                // started afresh): any session.
                let above = self
                    .reboot_epoch
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&e.operation_id)
                    .copied()
                    .unwrap_or(0);
                if self.link.wait_epoch_above(above, self.health_timeout).await {
                    Ok(Value::Unit)
                } else {
                    Err(format!("hub not reachable within {}s after the boot", self.health_timeout.as_secs()))
                }
            }
            Effect::HealthCheck => unit(self.os(|os| os.health_check()).await),
            Effect::Commit(slot) => unit(self.os(move |os| os.commit(slot)).await),
            Effect::FallBack(slot) => {
                self.os(move |os| os.fall_back(slot)).await.map(Value::Rebooted).map_err(|err| err.to_string())
            }
            Effect::ReleaseLease(lease_id) => {
                self.link.release_lease(&lease_id);
                Ok(Value::Unit)
            }
            Effect::InstallPackages(kind, pins) => unit(self.os(move |os| os.install_packages(&kind, &pins)).await),
            Effect::RecordSecurityPatch(version) => unit(self.os(move |os| os.record_security_patch(&version)).await),
            Effect::KubernetesVersion => {
                self.os(|os| os.kubernetes_version()).await.map(Value::Kubernetes).map_err(|err| err.to_string())
            }
            Effect::InstallKubernetes(kind, version) => {
                unit(self.os(move |os| os.install_kubernetes(&kind, &version)).await)
            }
            Effect::KubernetesHook(version, first) => {
                unit(self.os(move |os| os.upgrade_kubernetes_hook(&version, first)).await)
            }
        }
    }

    async fn trusted_keys(&self) -> Result<Vec<upkeep_core::signature::PublicKey>, String> {
        self.os(|os| os.trusted_keys()).await.map_err(|e| e.to_string()).and_then(|k| parse_trusted_keys(&k))
    }

    /// Downloads `sha256` into staging (from the hub, or from `url` when the image names one), resuming after
    /// breaks. `announced` (0: unknown) stands in for a total size the source does not tell, and caps it.
    ///
    /// What was staged before this call (by an attempt before a crash, an older agent, or garbage) is resumed
    /// only while it can be a prefix of the image: longer than `announced`, refused by the source as past its
    /// end, or complete but hashing to another digest, it is thrown away and the download starts from 0. That
    /// happens once: bytes this call downloaded itself are not doubted again (verification judges them).
    async fn download(&self, sha256: &str, url: &str, announced: u64) -> Result<crate::os::image::Staged, String> {
        let url_fetcher = match url {
            "" => None,
            _ => Some(self.url_fetcher().ok_or_else(|| format!("reimage.image.url: {url:?}: no https downloader"))?),
        };
        let mut dl = Download::open(&self.state_dir, sha256).map_err(|e| e.to_string())?;
        // Staged bytes this call did not download: a guess at a prefix until the digest proves it.
        let mut doubtful = !dl.is_empty();
        if announced > 0 && dl.len() > announced {
            tracing::warn!(
                sha256,
                staged = dl.len(),
                announced,
                "the staged part is longer than the image; downloading from 0"
            );
            dl.restart().map_err(|e| e.to_string())?;
            doubtful = false;
        }
        // The size the source tells (the hub always does; an https server may not).
        let mut total: Option<u64> = None;
        let mut last_err = String::new();
        for attempt in 0..FETCH_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(FETCH_RETRY_BASE * (1 << attempt.min(4))).await;
            }
            let opened = match &url_fetcher {
                None => self.fetcher.open(sha256, dl.len()).await,
                Some(f) => f.open_url(url, dl.len()).await,
            };
            match opened {
                Err(err) => last_err = err,
                Ok(mut stream) => {
                    let mut broke = false;
                    while let Some(chunk) = stream.next().await {
                        match chunk {
                            Ok(c) => {
                                if c.offset == 0 && !dl.is_empty() {
                                    // The source starts again from the beginning (a server that ignored the
                                    // range, or an offset past the image's end): so does the staging.
                                    tracing::info!(
                                        sha256,
                                        staged = dl.len(),
                                        "image source restarted from 0; discarding the staged part"
                                    );
                                    dl.restart().map_err(|e| e.to_string())?;
                                    doubtful = false;
                                }
                                if c.total_size > 0 {
                                    total = Some(c.total_size);
                                }
                                if announced > 0 && dl.len() + c.data.len() as u64 > announced {
                                    // Refused before the disk fills up; verification would refuse it anyway.
                                    drop(dl);
                                    discard(&self.state_dir, sha256);
                                    return Err(format!(
                                        "image refused, nothing written: the source sent more than the {announced} bytes announced"
                                    ));
                                }
                                dl.append(c.offset, &c.data).map_err(|e| e.to_string())?;
                            }
                            Err(err) => {
                                last_err = err;
                                broke = true;
                                break;
                            }
                        }
                    }
                    if !broke {
                        // The hub sends nothing when the offset is the end: then what we hold is everything.
                        let t = total.or((announced > 0).then_some(announced)).unwrap_or(dl.len());
                        // An empty part is never a whole image (a source that restarted and then sent nothing).
                        if dl.len() >= t && !dl.is_empty() {
                            if doubtful && (dl.len() > t || dl.sha256_so_far() != sha256) {
                                tracing::warn!(
                                    sha256,
                                    staged = dl.len(),
                                    "the staged image is not the image (its first bytes were staged before this \
                                     download); downloading from 0"
                                );
                                dl.restart().map_err(|e| e.to_string())?;
                                doubtful = false;
                                last_err = "the staged part was not a prefix of the image".into();
                                continue;
                            }
                            return dl.finish().map_err(|e| e.to_string());
                        }
                        last_err = format!("stream ended at {} of {t} bytes", dl.len());
                    }
                }
            }
            tracing::warn!(sha256, attempt, offset = dl.len(), error = %last_err, "image download interrupted; resuming");
        }
        match total {
            Some(t) if dl.len() < t => {
                Err(format!("image refused, nothing written: {}", TrustError::Truncated { got: dl.len(), expected: t }))
            }
            _ => Err(format!("downloading image {sha256} failed after {FETCH_ATTEMPTS} attempts: {last_err}")),
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod kube_tests;
pub mod transition;

use transition::{Ctx, Effect, Event, Transition, Value, transition, unwound};
pub use transition::{KUBERNETES_PENDING_FILE, LEASED_REBOOT_DRAIN_TIMEOUT, ROLLED_BACK_DIR};
