//! The agent's network half's `NodeOs`: every call becomes one request to the privileged executor
//! (`os::executor`) over its Unix socket, and the executor's answer comes back as the call's result.
//!
//! The wire is deliberately small: one connection per call; the request is one JSON document the client ends
//! by shutting down its write side; the answer is one JSON document the executor ends by closing. The one
//! exception is `Request::WatchFacts`, a subscription answered with one line per change of the node's facts
//! (`os::facts_feed`), which `RemoteOs::facts` then answers from. Requests
//! carry only what the executor cannot decide itself (which slot, which digest and signature, which channel,
//! which pins); paths, package sets, os-release and hooks come from the executor's own configuration and node.

use super::{BootState, NodeOs, OsError, OsFacts, Rebooted, Slot, SlotImage};
use crate::channel::{ChannelPlan, OsKind, PackagePin};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use upkeep_core::channel::NodeOsChannel;
use upkeep_core::version::KubernetesVersion;

/// Largest request the executor reads (a request is a few hundred bytes; pins lists stay far below this).
pub const MAX_REQUEST_BYTES: u64 = 1024 * 1024;
/// Largest answer the client reads (facts, trusted keys, notes).
pub const MAX_REPLY_BYTES: u64 = 16 * 1024 * 1024;

/// One node operation asked of the executor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// `NodeOs::facts`.
    Facts,
    /// A subscription to the facts (`os::facts_feed`): the connection stays open and carries one line per
    /// change, the first at once.
    WatchFacts,
    /// `NodeOs::trusted_keys`.
    TrustedKeys,
    /// `NodeOs::boot_state`.
    BootState,
    /// `NodeOs::write_slot` of the staged image of `sha256` (the executor finds it in its own state directory).
    WriteSlot {
        /// Target slot.
        slot: Slot,
        /// The image's SHA-256 (names the staged file; the written bytes must hash to it).
        sha256: String,
        /// Its size (0: not given).
        size: u64,
        /// Its minisign signature, checked against the node's trusted keys on the bytes the executor reads.
        signature: String,
    },
    /// `NodeOs::remove_slot_leftovers`.
    RemoveSlotLeftovers,
    /// `NodeOs::mark_boot_once`.
    MarkBootOnce {
        /// The slot.
        slot: Slot,
    },
    /// `NodeOs::reboot`.
    Reboot,
    /// `NodeOs::commit`.
    Commit {
        /// The slot.
        slot: Slot,
    },
    /// `NodeOs::fall_back`.
    FallBack {
        /// The slot to make the default again.
        to: Slot,
    },
    /// `NodeOs::health_check`.
    HealthCheck,
    /// `NodeOs::cordon`.
    Cordon,
    /// `NodeOs::uncordon`.
    Uncordon,
    /// `NodeOs::drain`.
    Drain {
        /// Timeout.
        timeout_seconds: u64,
        /// Ignore disruption budgets.
        force: bool,
    },
    /// `NodeOs::os_release`.
    OsRelease,
    /// `NodeOs::apply_channel`: the executor plans `channel` for its own node (os-release, pool) and applies
    /// that plan; the files it writes never come from the request.
    ApplyChannel {
        /// The requested channel.
        channel: NodeOsChannel,
    },
    /// `NodeOs::install_packages`, with the package manager of the executor's own node.
    InstallPackages {
        /// The pins.
        pins: Vec<Pin>,
    },
    /// `NodeOs::record_security_patch`.
    RecordSecurityPatch {
        /// `YYYYMM.DD.N`.
        version: String,
    },
    /// `NodeOs::kubernetes_version`.
    KubernetesVersion,
    /// `NodeOs::install_kubernetes` of the configured packages.
    InstallKubernetes {
        /// The version.
        version: String,
    },
    /// `NodeOs::upgrade_kubernetes_hook`.
    UpgradeKubernetesHook {
        /// The version.
        version: String,
        /// Run the first control plane's hook.
        first_control_plane: bool,
    },
    /// `NodeOs::publish_node_labels`.
    PublishNodeLabels {
        /// node-image-version label.
        image: String,
        /// security-patch-version label.
        patch: String,
    },
}

impl Request {
    /// The operation's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Facts => "facts",
            Request::WatchFacts => "watch_facts",
            Request::TrustedKeys => "trusted_keys",
            Request::BootState => "boot_state",
            Request::WriteSlot { .. } => "write_slot",
            Request::RemoveSlotLeftovers => "remove_slot_leftovers",
            Request::MarkBootOnce { .. } => "mark_boot_once",
            Request::Reboot => "reboot",
            Request::Commit { .. } => "commit",
            Request::FallBack { .. } => "fall_back",
            Request::HealthCheck => "health_check",
            Request::Cordon => "cordon",
            Request::Uncordon => "uncordon",
            Request::Drain { .. } => "drain",
            Request::OsRelease => "os_release",
            Request::ApplyChannel { .. } => "apply_channel",
            Request::InstallPackages { .. } => "install_packages",
            Request::RecordSecurityPatch { .. } => "record_security_patch",
            Request::KubernetesVersion => "kubernetes_version",
            Request::InstallKubernetes { .. } => "install_kubernetes",
            Request::UpgradeKubernetesHook { .. } => "upgrade_kubernetes_hook",
            Request::PublishNodeLabels { .. } => "publish_node_labels",
        }
    }

    /// True when the request only reads the node: it cannot change its facts.
    pub fn only_reads(&self) -> bool {
        matches!(
            self,
            Request::Facts
                | Request::WatchFacts
                | Request::TrustedKeys
                | Request::BootState
                | Request::OsRelease
                | Request::KubernetesVersion
        )
    }
}

/// A package pin on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    /// Package name.
    pub name: String,
    /// Exact version.
    pub version: String,
}

/// The executor's answer: `{"ok": <the value the NodeOs call returned>}` or `{"err": <its error>}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply<T> {
    /// The value.
    Ok(T),
    /// The error.
    Err(WireError),
}

/// A call's value as the JSON text of an answer (see `encode_reply`).
pub fn encode_value<T: Serialize>(v: T) -> Result<String, OsError> {
    serde_json::to_string(&v).map_err(|e| OsError::Executor(format!("encoding the answer: {e}")))
}

/// Encodes an answer whose value is already JSON text (the executor encodes each call's value once, typed).
pub fn encode_reply(r: Result<String, WireError>) -> Vec<u8> {
    match r {
        Ok(json) => format!("{{\"ok\":{json}}}").into_bytes(),
        Err(e) => serde_json::to_vec(&Reply::<()>::Err(e)).unwrap_or_else(|_| b"{\"err\":null}".to_vec()),
    }
}

/// `OsError` on the wire (an I/O error travels as its text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireError {
    /// `OsError::Io`.
    Io {
        /// The path.
        path: PathBuf,
        /// The error's text.
        message: String,
    },
    /// `OsError::Malformed`.
    Malformed {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `OsError::Command`.
    Command {
        /// The argv.
        argv: Vec<String>,
        /// How it ended.
        status: String,
        /// Last lines of stderr.
        stderr_tail: String,
    },
    /// `OsError::Digest`.
    Digest {
        /// The image.
        path: PathBuf,
        /// Expected.
        expected: String,
        /// Actual.
        actual: String,
        /// What the slot holds now.
        slot_state: String,
    },
    /// `OsError::Unverified`.
    Unverified {
        /// The image.
        path: PathBuf,
        /// Why.
        reason: String,
        /// What the slot holds now.
        slot_state: String,
    },
    /// `OsError::Unhealthy`.
    Unhealthy {
        /// Why.
        message: String,
    },
    /// `OsError::Kube`.
    Kube {
        /// The API server.
        api_server: String,
        /// What was being done.
        action: String,
        /// Why it failed.
        reason: String,
    },
    /// `OsError::DrainTimedOut`.
    DrainTimedOut {
        /// The timeout.
        after_seconds: u64,
        /// What blocks.
        blocking: String,
    },
    /// `OsError::NotConfigured`.
    NotConfigured {
        /// What to add.
        message: String,
    },
    /// `OsError::Executor`.
    Executor {
        /// Why it refused.
        message: String,
    },
}

impl From<OsError> for WireError {
    fn from(e: OsError) -> WireError {
        match e {
            OsError::Io { path, source } => WireError::Io { path, message: source.to_string() },
            OsError::Malformed { path, reason } => WireError::Malformed { path, reason },
            OsError::Command { argv, status, stderr_tail } => WireError::Command { argv, status, stderr_tail },
            OsError::Digest { path, expected, actual, slot_state } => {
                WireError::Digest { path, expected, actual, slot_state }
            }
            OsError::Unverified { path, reason, slot_state } => WireError::Unverified { path, reason, slot_state },
            OsError::Unhealthy(message) => WireError::Unhealthy { message },
            OsError::Kube { api_server, action, reason } => WireError::Kube { api_server, action, reason },
            OsError::DrainTimedOut { after_seconds, blocking } => WireError::DrainTimedOut { after_seconds, blocking },
            OsError::NotConfigured(message) => WireError::NotConfigured { message },
            OsError::Executor(message) => WireError::Executor { message },
        }
    }
}

impl From<WireError> for OsError {
    fn from(e: WireError) -> OsError {
        match e {
            WireError::Io { path, message } => OsError::Io { path, source: std::io::Error::other(message) },
            WireError::Malformed { path, reason } => OsError::Malformed { path, reason },
            WireError::Command { argv, status, stderr_tail } => OsError::Command { argv, status, stderr_tail },
            WireError::Digest { path, expected, actual, slot_state } => {
                OsError::Digest { path, expected, actual, slot_state }
            }
            WireError::Unverified { path, reason, slot_state } => OsError::Unverified { path, reason, slot_state },
            WireError::Unhealthy { message } => OsError::Unhealthy(message),
            WireError::Kube { api_server, action, reason } => OsError::Kube { api_server, action, reason },
            WireError::DrainTimedOut { after_seconds, blocking } => OsError::DrainTimedOut { after_seconds, blocking },
            WireError::NotConfigured { message } => OsError::NotConfigured(message),
            WireError::Executor { message } => OsError::Executor(message),
        }
    }
}

/// Reads one JSON document from `r` until end of stream, refusing more than `limit` bytes.
pub fn read_document<T: DeserializeOwned>(r: &mut impl Read, limit: u64, what: &str) -> Result<T, String> {
    let mut buf = Vec::new();
    r.take(limit + 1).read_to_end(&mut buf).map_err(|e| format!("reading the {what}: {e}"))?;
    if buf.len() as u64 > limit {
        return Err(format!("{what} larger than {limit} bytes"));
    }
    serde_json::from_slice(&buf).map_err(|e| format!("{what} is not valid: {e}"))
}

/// The network half's `NodeOs`: every call is a request to the executor at `socket`, except cordon, drain
/// and node labels when `[kubernetes] api_server` is set: those are calls to the Kubernetes API server, made
/// here, so that the root executor never talks to the network.
#[derive(Clone)]
pub struct RemoteOs {
    socket: PathBuf,
    kube: Option<std::sync::Arc<super::kube::KubeNode>>,
    /// The facts the executor pushes, once `follow_facts` runs.
    facts: Option<Arc<FactsCache>>,
}

impl RemoteOs {
    /// Talks to the executor listening on `socket` (`[executor] socket`).
    pub fn new(socket: impl Into<PathBuf>) -> RemoteOs {
        RemoteOs { socket: socket.into(), kube: None, facts: None }
    }

    /// Subscribes to the executor's facts (`os::facts_feed`) on a thread of its own, so that `facts` answers
    /// from memory while the subscription is open instead of asking at every heartbeat.
    pub fn follow_facts(mut self) -> RemoteOs {
        let cache = Arc::new(FactsCache::default());
        follow(self.socket.clone(), cache.clone());
        self.facts = Some(cache);
        self
    }

    /// True while the facts come from the subscription (for tests and the status line).
    pub fn facts_followed(&self) -> bool {
        self.facts.as_ref().is_some_and(|c| c.subscribed())
    }

    /// Cordons, drains and labels the node through the Kubernetes API itself (`[kubernetes] api_server`).
    pub fn with_kube(mut self, kube: std::sync::Arc<super::kube::KubeNode>) -> RemoteOs {
        self.kube = Some(kube);
        self
    }

    /// Sends `req` and waits for the answer (as long as the operation takes: a drain or a package transaction
    /// may take many minutes; the executor bounds each).
    pub fn call<T: DeserializeOwned>(&self, req: &Request) -> Result<T, OsError> {
        let changes = !req.only_reads();
        if changes && let Some(c) = &self.facts {
            c.invalidate();
        }
        let r = self.exchange(req);
        if changes && let Some(c) = &self.facts {
            c.invalidate();
        }
        r
    }

    fn exchange<T: DeserializeOwned>(&self, req: &Request) -> Result<T, OsError> {
        let lost = |why: String| {
            OsError::Executor(format!(
                "{} ({}): {why}; is upkeep-agent-executor running?",
                self.socket.display(),
                req.name()
            ))
        };
        let mut s = UnixStream::connect(&self.socket).map_err(|e| lost(format!("cannot connect: {e}")))?;
        let body = serde_json::to_vec(req).map_err(|e| lost(format!("encoding the request: {e}")))?;
        s.write_all(&body).and_then(|()| s.shutdown(std::net::Shutdown::Write)).map_err(|e| lost(e.to_string()))?;
        match read_document::<Reply<T>>(&mut s, MAX_REPLY_BYTES, "answer").map_err(lost)? {
            Reply::Ok(v) => Ok(v),
            Reply::Err(e) => Err(e.into()),
        }
    }
}

fn pins(pins: &[PackagePin]) -> Vec<Pin> {
    pins.iter().map(|p| Pin { name: p.name.clone(), version: p.version.clone() }).collect()
}

impl NodeOs for RemoteOs {
    fn facts(&self) -> Result<OsFacts, OsError> {
        let Some(cache) = &self.facts else { return self.call(&Request::Facts) };
        if let Some(f) = cache.get() {
            return f;
        }
        let mark = cache.mark();
        let f = self.call(&Request::Facts)?;
        cache.keep(mark, &f);
        Ok(f)
    }

    fn trusted_keys(&self) -> Result<Vec<(PathBuf, String)>, OsError> {
        self.call(&Request::TrustedKeys)
    }

    fn boot_state(&self) -> Result<BootState, OsError> {
        self.call(&Request::BootState)
    }

    fn write_slot(&self, slot: Slot, image: &SlotImage) -> Result<u64, OsError> {
        self.call(&Request::WriteSlot {
            slot,
            sha256: image.sha256.clone(),
            size: image.size,
            signature: image.signature.clone(),
        })
    }

    fn remove_slot_leftovers(&self) -> Result<Vec<PathBuf>, OsError> {
        self.call(&Request::RemoveSlotLeftovers)
    }

    fn mark_boot_once(&self, slot: Slot) -> Result<(), OsError> {
        self.call(&Request::MarkBootOnce { slot })
    }

    fn reboot(&self) -> Result<Rebooted, OsError> {
        self.call(&Request::Reboot)
    }

    fn commit(&self, slot: Slot) -> Result<(), OsError> {
        self.call(&Request::Commit { slot })
    }

    fn fall_back(&self, to: Slot) -> Result<Rebooted, OsError> {
        self.call(&Request::FallBack { to })
    }

    fn health_check(&self) -> Result<(), OsError> {
        self.call(&Request::HealthCheck)
    }

    fn cordon(&self) -> Result<(), OsError> {
        match &self.kube {
            Some(k) => k.cordon(),
            None => self.call(&Request::Cordon),
        }
    }

    fn uncordon(&self) -> Result<(), OsError> {
        match &self.kube {
            Some(k) => k.uncordon(),
            None => self.call(&Request::Uncordon),
        }
    }

    fn drain(&self, timeout: std::time::Duration, force: bool) -> Result<(), OsError> {
        match &self.kube {
            Some(k) => k.drain(timeout, force),
            None => self.call(&Request::Drain { timeout_seconds: timeout.as_secs(), force }),
        }
    }

    fn os_release(&self) -> Result<Vec<(String, String)>, OsError> {
        self.call(&Request::OsRelease)
    }

    fn apply_channel(&self, plan: &ChannelPlan) -> Result<Vec<String>, OsError> {
        self.call(&Request::ApplyChannel { channel: plan.requested })
    }

    fn install_packages(&self, _os: &OsKind, p: &[PackagePin]) -> Result<(), OsError> {
        self.call(&Request::InstallPackages { pins: pins(p) })
    }

    fn record_security_patch(&self, version: &str) -> Result<(), OsError> {
        self.call(&Request::RecordSecurityPatch { version: version.into() })
    }

    fn kubernetes_version(&self) -> Result<Option<KubernetesVersion>, OsError> {
        let v: Option<String> = self.call(&Request::KubernetesVersion)?;
        v.map(|v| {
            v.parse::<KubernetesVersion>().map_err(|e| OsError::Executor(format!("kubernetes version {v:?}: {e}")))
        })
        .transpose()
    }

    fn install_kubernetes(&self, _os: &OsKind, version: &KubernetesVersion) -> Result<(), OsError> {
        self.call(&Request::InstallKubernetes { version: version.to_string() })
    }

    fn upgrade_kubernetes_hook(&self, version: &KubernetesVersion, first_control_plane: bool) -> Result<(), OsError> {
        self.call(&Request::UpgradeKubernetesHook { version: version.to_string(), first_control_plane })
    }

    fn publish_node_labels(&self, image: &str, patch: &str) -> Result<(), OsError> {
        match &self.kube {
            Some(k) => k.publish_labels(image, patch),
            // Without the API there are no labels to keep: nothing to ask the executor.
            None => Ok(()),
        }
    }
}

fn lock_state(m: &Mutex<CacheState>) -> std::sync::MutexGuard<'_, CacheState> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The network half's copy of the facts the executor pushes.
#[derive(Default)]
pub struct FactsCache {
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    facts: Option<Result<OsFacts, WireError>>,
    valid: bool,
    /// A subscription is open: every change from now on arrives as a line.
    subscribed: bool,
    /// Counts invalidations, so that a direct read that raced one is not kept.
    epoch: u64,
    /// Counts pushed lines, so that a direct read does not replace a line that came while it ran.
    pushes: u64,
}

/// Taken before a direct read; `FactsCache::keep` keeps its answer only if nothing happened meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    epoch: u64,
    pushes: u64,
}

impl FactsCache {
    /// The facts, when the cache holds them as they are now.
    pub fn get(&self) -> Option<Result<OsFacts, OsError>> {
        let s = lock_state(&self.state);
        match (&s.facts, s.valid) {
            (Some(Ok(f)), true) => Some(Ok(f.clone())),
            (Some(Err(e)), true) => Some(Err(e.clone().into())),
            _ => None,
        }
    }

    /// The node may be changing: the next `facts` asks the executor (or takes a line pushed after this).
    pub fn invalidate(&self) {
        let mut s = lock_state(&self.state);
        s.epoch += 1;
        s.valid = false;
    }

    /// Where things stand before a direct read.
    pub fn mark(&self) -> Mark {
        let s = lock_state(&self.state);
        Mark { epoch: s.epoch, pushes: s.pushes }
    }

    /// Keeps the facts of a direct read begun at `mark`, if a subscription is open (later changes will come as
    /// lines) and nothing was invalidated or pushed since `mark`.
    pub fn keep(&self, mark: Mark, facts: &OsFacts) {
        let mut s = lock_state(&self.state);
        if s.subscribed && s.epoch == mark.epoch && s.pushes == mark.pushes {
            s.facts = Some(Ok(facts.clone()));
            s.valid = true;
        }
    }

    /// True while a subscription is open.
    pub fn subscribed(&self) -> bool {
        lock_state(&self.state).subscribed
    }

    fn pushed(&self, facts: Result<OsFacts, WireError>) {
        let mut s = lock_state(&self.state);
        s.facts = Some(facts);
        s.valid = true;
        s.subscribed = true;
        s.pushes += 1;
    }

    fn lost(&self) {
        let mut s = lock_state(&self.state);
        s.valid = false;
        s.subscribed = false;
        s.facts = None;
    }
}

/// Keeps a subscription to the executor at `socket` for `cache`, on a thread of its own, for the life of the
/// process: subscribes, takes lines until the connection ends, and subscribes again after the agent's reconnect
/// delay (`crate::backoff`, growing while it fails, from the first try again after a subscription that worked).
pub fn follow(socket: PathBuf, cache: Arc<FactsCache>) {
    let spawned = std::thread::Builder::new().name("facts-follow".into()).spawn(move || {
        let mut attempt = 0u32;
        loop {
            match subscribe_once(&socket, &cache) {
                Ok(()) => attempt = 0,
                Err(why) => tracing::debug!(error = %why, "facts subscription to the executor"),
            }
            cache.lost();
            std::thread::sleep(crate::backoff::delay(attempt, fastrand::f64()));
            attempt = attempt.saturating_add(1);
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot follow the executor's facts; every heartbeat asks for them");
    }
}

/// One subscription: Ok when it delivered at least one line before it ended.
fn subscribe_once(socket: &Path, cache: &FactsCache) -> Result<(), String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("connecting to {}: {e}", socket.display()))?;
    let body = serde_json::to_vec(&Request::WatchFacts).map_err(|e| e.to_string())?;
    s.write_all(&body).and_then(|()| s.shutdown(std::net::Shutdown::Write)).map_err(|e| e.to_string())?;
    let mut delivered = false;
    for line in BufReader::new(s).lines() {
        let line = line.map_err(|e| format!("reading the subscription: {e}"))?;
        let facts = match serde_json::from_slice::<Reply<OsFacts>>(line.as_bytes()) {
            Ok(Reply::Ok(f)) => Ok(f),
            Ok(Reply::Err(e)) => Err(e),
            Err(e) => return Err(format!("a line of the subscription is not valid: {e}")),
        };
        cache.pushed(facts);
        delivered = true;
    }
    if delivered { Ok(()) } else { Err("the executor refused or ended the subscription".into()) }
}
