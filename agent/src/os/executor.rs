//! The privileged half of a privilege-separated agent (`upkeep-agent executor`): it serves the closed set of
//! `NodeOs` operations to the network half (`os::remote::RemoteOs`) over a Unix socket and does them with the
//! real `HostOs`. It runs as root; the network half runs as an unprivileged user without capabilities.
//!
//! It trusts nothing it is sent:
//! - a peer is served only when its SO_PEERCRED uid is `[executor] client_user`'s;
//! - a slot write takes an image only from the executor's own staging path for the named digest, opened
//!   without following links and held open; it streams into the slot once while the SHA-256 and the signature
//!   prehash are computed, and the slot holds the bytes as an image only when their digest, size and signature
//!   (by a key the node trusts) check out, so bytes changed under the executor are never an image; only a slot
//!   the executor wrote and verified can be marked bootable, and only the booted slot can be committed;
//! - a channel is re-planned from the executor's own view of the node: the request names a channel, never a
//!   file or its contents;
//! - package pins must be well-formed and name packages the node already has: a security patch upgrades what
//!   is installed and never adds a package; Kubernetes packages are the configured ones;
//! - versions are parsed, drain timeouts bounded, requests size- and time-limited.
//!
//! Each connection carries one request (`os::remote`'s wire) and is served on its own thread, at most
//! `MAX_CONNECTIONS` at a time. On SIGTERM it stops accepting and lets the operations under way finish (a
//! package transaction is never cut short by a restart of the agent).

use super::facts_feed::FactsFeed;
use super::host::HostOs;
use super::image::{parse_trusted_keys, staged_path};
use super::remote::{MAX_REQUEST_BYTES, Pin, Request, WireError, encode_reply, encode_value as value, read_document};
use super::{NodeOs, OsError, Slot, SlotImage, apt, dnf};
use crate::channel::{NodeKind, OsKind, PackagePin, classify, parse_package_pins, plan_channel};
use crate::config::{AgentConfig, ExecutorSettings};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use upkeep_core::version::{ImageVersion, KubernetesVersion};

/// Connections served at once; more are answered "busy".
pub const MAX_CONNECTIONS: usize = 16;
/// How long a peer may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest drain the executor carries out.
const MAX_DRAIN: Duration = Duration::from_secs(24 * 3600);

/// The executor: the node's `HostOs` and what it checks requests against.
pub struct Executor {
    os: Arc<dyn NodeOs>,
    root: PathBuf,
    state_dir: PathBuf,
    node_pool: String,
    hardware_class: String,
    client_uid: u32,
    active: AtomicUsize,
    slots: VerifiedSlots,
    /// `[kubernetes] api_server` is set: cordon, drain and labels are the network half's (it talks to the API
    /// server); the executor refuses them and holds no API client.
    kube_api: bool,
    /// Subscriptions to the node's facts, told after every request that may change the node.
    feed: Arc<FactsFeed>,
    /// Requests served (subscriptions included), for tests and benches.
    served: std::sync::atomic::AtomicU64,
}

/// Which slot holds which image this executor wrote and verified, kept in a file only root may change
/// (`VERIFIED_SLOTS_FILE` under the node's root) so that it outlives a restart of the executor.
pub struct VerifiedSlots {
    file: PathBuf,
    held: std::sync::Mutex<std::collections::BTreeMap<Slot, String>>,
}

/// Where the executor keeps its verified slots, relative to the node's root.
pub const VERIFIED_SLOTS_FILE: &str = "var/lib/upkeep/executor/verified-slots.json";

impl VerifiedSlots {
    /// Reads the record under `root` (none yet: nothing verified).
    pub fn load(root: &Path) -> VerifiedSlots {
        let file = root.join(VERIFIED_SLOTS_FILE);
        let held = std::fs::read(&file).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        VerifiedSlots { file, held: std::sync::Mutex::new(held) }
    }

    fn update(&self, f: impl FnOnce(&mut std::collections::BTreeMap<Slot, String>)) -> Result<(), OsError> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut held);
        let bytes = serde_json::to_vec(&*held).map_err(|e| OsError::Executor(format!("encoding: {e}")))?;
        crate::state::write_atomic(&self.file, &bytes)
            .map_err(|e| OsError::Malformed { path: self.file.clone(), reason: e.to_string() })
    }

    /// `slot` is being written: it holds no verified image.
    pub fn forget(&self, slot: Slot) -> Result<(), OsError> {
        self.update(|h| {
            h.remove(&slot);
        })
    }

    /// `slot` holds the verified image `sha256`.
    pub fn verified(&self, slot: Slot, sha256: &str) -> Result<(), OsError> {
        self.update(|h| {
            h.insert(slot, sha256.to_string());
        })
    }

    /// Whether `slot` holds an image this executor verified.
    pub fn holds_verified(&self, slot: Slot) -> bool {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&slot)
    }
}

/// The uid of `user` (a name, or a number).
pub fn uid_of(user: &str) -> Result<u32, String> {
    if let Ok(n) = user.parse::<u32>() {
        return Ok(n);
    }
    match nix::unistd::User::from_name(user) {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        Ok(None) => Err(format!(
            "executor.client_user: no user {user:?} on this node; create it (the packages do) or name the user the \
             network half runs as"
        )),
        Err(e) => Err(format!("executor.client_user: looking up {user:?}: {e}")),
    }
}

impl Executor {
    /// The executor of `cfg`'s node (`[executor]` must be set).
    pub fn from_config(cfg: &AgentConfig) -> Result<Executor, String> {
        let x = executor_settings(cfg)?;
        // The node's work as configured, without the Kubernetes API client (packages and hooks stay).
        let mut own = cfg.clone();
        if let Some(k) = own.kubernetes.as_mut() {
            k.api = None;
        }
        Ok(Executor::new(Arc::new(HostOs::from_config(&own)), cfg, uid_of(&x.client_user)?))
    }

    /// An executor doing its work through `os`, serving only `client_uid`.
    pub fn new(os: Arc<dyn NodeOs>, cfg: &AgentConfig, client_uid: u32) -> Executor {
        Executor {
            feed: FactsFeed::new(os.clone()),
            os,
            root: cfg.root.clone(),
            state_dir: cfg.state_dir.clone(),
            node_pool: cfg.node_pool.clone(),
            hardware_class: cfg.hardware_class.clone(),
            client_uid,
            active: AtomicUsize::new(0),
            slots: VerifiedSlots::load(&cfg.root),
            kube_api: cfg.kubernetes.as_ref().is_some_and(|k| k.api.is_some()),
            served: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Accepts and serves connections until `listener` is shut down (`stop`), then waits for the requests
    /// under way to finish.
    pub fn serve(self: &Arc<Self>, listener: &UnixListener) {
        std::thread::scope(|scope| {
            for conn in listener.incoming() {
                let conn = match conn {
                    Ok(c) => c,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::info!(error = %e, "executor stops accepting");
                        break;
                    }
                };
                if self.active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                    self.active.fetch_sub(1, Ordering::SeqCst);
                    // Read on the accepting thread: briefly, so that a slow peer cannot hold the door.
                    refuse(conn, Duration::from_secs(1), "busy: too many requests under way; retry");
                    continue;
                }
                let me = self.clone();
                scope.spawn(move || {
                    me.serve_one(conn);
                    me.active.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
    }

    /// Serves one connection: checks the peer, reads its request, does it, answers.
    pub fn serve_one(&self, mut conn: UnixStream) {
        let peer = match nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "executor: cannot read the peer's credentials; refused");
                return;
            }
        };
        let _ = conn.set_read_timeout(Some(REQUEST_TIMEOUT));
        if peer.uid() != self.client_uid {
            tracing::warn!(uid = peer.uid(), pid = peer.pid(), expected = self.client_uid, "executor: peer refused");
            let why = format!("refused: uid {} is not executor.client_user (uid {})", peer.uid(), self.client_uid);
            refuse(conn, REQUEST_TIMEOUT, &why);
            return;
        }
        let req = match read_document::<Request>(&mut conn, MAX_REQUEST_BYTES, "request") {
            Ok(r) => r,
            Err(why) => {
                tracing::warn!(pid = peer.pid(), why = %why, "executor: bad request refused");
                answer(conn, Err(refusal(&why)));
                return;
            }
        };
        self.served.fetch_add(1, Ordering::Relaxed);
        if req == Request::WatchFacts {
            tracing::debug!(pid = peer.pid(), "executor: facts subscription");
            self.feed.subscribe(conn);
            return;
        }
        let name = req.name();
        let changes = !req.only_reads();
        let reply = match self.handle(req) {
            Ok(v) => {
                tracing::debug!(op = name, pid = peer.pid(), "executor: done");
                Ok(v)
            }
            Err(e) => {
                tracing::warn!(op = name, pid = peer.pid(), error = %e, "executor: failed or refused");
                Err(e.into())
            }
        };
        // Before the answer: the subscription's line for this change is written before the requester learns
        // that the request is done.
        if changes {
            self.feed.refresh();
        }
        answer(conn, reply);
    }

    /// Requests served since start (subscriptions included).
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Facts subscriptions held now.
    pub fn facts_subscribers(&self) -> usize {
        self.feed.subscribers()
    }

    /// Checks `req` and does it.
    /// The value comes back as its JSON text.
    pub fn handle(&self, req: Request) -> Result<String, OsError> {
        let os = self.os.as_ref();
        if self.kube_api
            && matches!(
                req,
                Request::Cordon | Request::Uncordon | Request::Drain { .. } | Request::PublishNodeLabels { .. }
            )
        {
            return Err(OsError::Executor(format!(
                "{}: with [kubernetes] api_server the network half talks to the API server; the executor does not",
                req.name()
            )));
        }
        match req {
            Request::Facts => value(os.facts()?),
            Request::WatchFacts => {
                Err(OsError::Executor("watch_facts is a subscription: send it on a connection of its own".into()))
            }
            Request::TrustedKeys => value(os.trusted_keys()?),
            Request::BootState => value(os.boot_state()?),
            Request::WriteSlot { slot, sha256, size, signature } => {
                value(self.write_slot(slot, &sha256, size, &signature)?)
            }
            Request::RemoveSlotLeftovers => value(os.remove_slot_leftovers()?),
            Request::MarkBootOnce { slot } => {
                if !self.slots.holds_verified(slot) {
                    return Err(OsError::Executor(format!(
                        "slot {slot} holds no image this executor wrote and verified; not marked bootable"
                    )));
                }
                value(os.mark_boot_once(slot)?)
            }
            Request::Reboot => {
                tracing::info!("executor: reboot");
                value(os.reboot()?)
            }
            Request::Commit { slot } => {
                let booted = os.boot_state()?.booted;
                if booted != slot {
                    return Err(OsError::Executor(format!(
                        "slot {slot} is not the booted slot ({booted}); only the running slot is made the default"
                    )));
                }
                value(os.commit(slot)?)
            }
            Request::FallBack { to } => value(os.fall_back(to)?),
            Request::HealthCheck => value(os.health_check()?),
            Request::Cordon => value(os.cordon()?),
            Request::Uncordon => value(os.uncordon()?),
            Request::Drain { timeout_seconds, force } => {
                let timeout = Duration::from_secs(timeout_seconds);
                if timeout > MAX_DRAIN {
                    return Err(OsError::Executor(format!(
                        "drain timeout {timeout_seconds}s is longer than {}s",
                        MAX_DRAIN.as_secs()
                    )));
                }
                value(os.drain(timeout, force)?)
            }
            Request::OsRelease => value(os.os_release()?),
            Request::ApplyChannel { channel } => {
                let plan = plan_channel(channel, &self.node_kind()?);
                tracing::info!(requested = %channel, effective = %plan.effective, "executor: channel");
                value(os.apply_channel(&plan)?)
            }
            Request::InstallPackages { pins } => {
                let kind = self.node_kind()?.os;
                let pins = check_pins(&pins)?;
                check_installed(&self.root, &kind, &pins)?;
                tracing::info!(pins = ?pins, "executor: installing packages");
                value(os.install_packages(&kind, &pins)?)
            }
            Request::RecordSecurityPatch { version } => {
                version
                    .parse::<ImageVersion>()
                    .map_err(|e| OsError::Executor(format!("security patch version {version:?}: {e}")))?;
                value(os.record_security_patch(&version)?)
            }
            Request::KubernetesVersion => value(os.kubernetes_version()?.map(|v| v.to_string())),
            Request::InstallKubernetes { version } => {
                let v = kubernetes_version(&version)?;
                value(os.install_kubernetes(&self.node_kind()?.os, &v)?)
            }
            Request::UpgradeKubernetesHook { version, first_control_plane } => {
                value(os.upgrade_kubernetes_hook(&kubernetes_version(&version)?, first_control_plane)?)
            }
            Request::PublishNodeLabels { image, patch } => value(os.publish_node_labels(&image, &patch)?),
        }
    }

    fn node_kind(&self) -> Result<NodeKind, OsError> {
        Ok(NodeKind {
            os: classify(&self.os.os_release()?),
            node_pool: self.node_pool.clone(),
            hardware_class: self.hardware_class.clone(),
        })
    }

    /// Writes the staged image of `sha256` into `slot`, in one pass: the file (opened here without following
    /// links, and held open) streams into the slot while its SHA-256 and signature prehash are computed, and the
    /// slot holds the bytes as an image only when they hash to `sha256`, are `size` bytes and carry a signature
    /// by a key the node trusts. The slot is recorded as verified only then; `mark_boot_once` takes no other.
    fn write_slot(&self, slot: Slot, sha256: &str, size: u64, signature: &str) -> Result<u64, OsError> {
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(OsError::Executor(format!("sha256 {sha256:?}: expected 64 lower-case hex digits")));
        }
        // Refused before a byte moves: a signature that does not parse, a legacy one, or an unknown key.
        let keys = parse_trusted_keys(&self.os.trusted_keys()?).map_err(OsError::Executor)?;
        super::image::prehash_check(signature, size, keys).map(drop)?;
        let path = staged_path(&self.state_dir, sha256);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&path)
            .map_err(OsError::io(&path))?;
        let meta = file.metadata().map_err(OsError::io(&path))?;
        if !meta.is_file() {
            return Err(OsError::Executor(format!("{}: not a regular file; nothing written", path.display())));
        }
        // Whatever the slot held is not a verified image any more from here on.
        self.slots.forget(slot)?;
        // The slot backend (and a hook's `{image}`) reads the same open file through its /proc path.
        let image = SlotImage {
            path: PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), file.as_raw_fd())),
            sha256: sha256.to_string(),
            size,
            signature: signature.to_string(),
            check_signature: true,
        };
        let written = self.os.write_slot(slot, &image)?;
        drop(file);
        self.slots.verified(slot, sha256)?;
        tracing::info!(slot = %slot, sha256, bytes = written, "executor: slot written and verified");
        Ok(written)
    }
}

fn executor_settings(cfg: &AgentConfig) -> Result<&ExecutorSettings, String> {
    cfg.executor.as_ref().ok_or_else(|| {
        format!(
            "{}: no [executor] section; set executor.socket (e.g. \"/run/upkeep-agent/executor.sock\") to run the \
             privileged half",
            cfg.source.display()
        )
    })
}

/// Answers `why` without serving: the request is read (and dropped) first, since closing on unread bytes would
/// reset the connection before the peer could read the answer.
fn refuse(mut conn: UnixStream, within: Duration, why: &str) {
    let _ = conn.set_read_timeout(Some(within));
    let _ = std::io::copy(&mut (&mut conn).take(MAX_REQUEST_BYTES), &mut std::io::sink());
    answer(conn, Err(refusal(why)));
}

fn refusal(why: &str) -> WireError {
    WireError::Executor { message: why.to_string() }
}

fn answer(mut conn: UnixStream, reply: Result<String, WireError>) {
    if let Err(e) = conn.write_all(&encode_reply(reply)) {
        tracing::warn!(error = %e, "executor: the peer left before the answer");
    }
}

fn kubernetes_version(v: &str) -> Result<KubernetesVersion, OsError> {
    v.parse::<KubernetesVersion>().map_err(|e| OsError::Executor(format!("kubernetes version {v:?}: {e}")))
}

/// The pins, well-formed (the same rules as a security patch command's `packages`).
pub fn check_pins(pins: &[Pin]) -> Result<Vec<PackagePin>, OsError> {
    let entries: Vec<String> = pins.iter().map(|p| format!("{}={}", p.name, p.version)).collect();
    if pins.iter().any(|p| p.name.contains('=')) {
        return Err(OsError::Executor("package names must not contain '='".into()));
    }
    parse_package_pins(&entries).map_err(OsError::Executor)
}

/// Every pinned package is installed on the node under `root` (a security patch upgrades what is there).
pub fn check_installed(root: &Path, kind: &OsKind, pins: &[PackagePin]) -> Result<(), OsError> {
    for p in pins {
        let installed = match kind {
            OsKind::Debian { .. } => apt::installed_version(root, &p.name)?,
            OsKind::Rpm { .. } => dnf::installed_version(root, &p.name)?,
            OsKind::WindowsLike { id } | OsKind::Unknown { id } => {
                return Err(OsError::Executor(format!(
                    "no package manager known for os-release ID {id:?}; nothing installed"
                )));
            }
        };
        if installed.is_none() {
            return Err(OsError::Executor(format!(
                "package {} is not installed on this node; a security patch upgrades installed packages only, \
                 nothing installed",
                p.name
            )));
        }
    }
    Ok(())
}

/// The executor's listening socket: the one systemd passed (socket activation), else `socket` bound here
/// (a stale socket file is replaced) with mode 0660 and group of `client_user`.
pub fn listener(x: &ExecutorSettings) -> Result<UnixListener, String> {
    let fds: Vec<_> = sd_notify::listen_fds().map(|f| f.collect()).unwrap_or_default();
    if let [fd] = fds[..] {
        // SAFETY: systemd passed exactly this one descriptor (LISTEN_FDS=1, LISTEN_PID = us); nothing else in
        // the process owns it, and it is a listening AF_UNIX stream socket by the socket unit's definition.
        #[allow(unsafe_code)]
        let l = unsafe { <UnixListener as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        return Ok(l);
    }
    if !fds.is_empty() {
        return Err(format!("systemd passed {} sockets; the executor takes exactly one", fds.len()));
    }
    let path = &x.socket;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("executor.socket: {}: {e}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("executor.socket: {}: removing the old socket: {e}", path.display())),
    }
    let l = UnixListener::bind(path).map_err(|e| format!("executor.socket: {}: {e}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| format!("executor.socket: {}: {e}", path.display()))?;
    if let Ok(Some(u)) = nix::unistd::User::from_name(&x.client_user) {
        // Best effort: the peer check, not the file mode, is what admits a client.
        let _ = nix::unistd::chown(path, None, Some(u.gid));
    }
    Ok(l)
}

/// `upkeep-agent executor`: serves until SIGTERM or SIGINT, then finishes the requests under way.
pub fn run(cfg: &AgentConfig) -> Result<(), String> {
    use nix::sys::signal::{SigSet, Signal};
    let x = executor_settings(cfg)?;
    let exec = Arc::new(Executor::from_config(cfg)?);
    // Blocked here, before any thread starts, so that every thread inherits the mask and only the waiter
    // below takes the signals.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().map_err(|e| format!("blocking SIGTERM: {e}"))?;
    let l = listener(x)?;
    let fd = l.as_raw_fd();
    std::thread::spawn(move || {
        if let Ok(sig) = signals.wait() {
            tracing::info!(signal = %sig, "executor stopping; operations under way finish first");
            upkeep_proto::service::stopping("finishing operations under way");
            // Wakes `accept` with an error, which ends the accept loop.
            let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both);
        }
    });
    tracing::info!(socket = %x.socket.display(), client_user = %x.client_user, node = %cfg.node_name, "upkeep-agent executor started");
    upkeep_proto::service::ready(&format!("serving {} on {}", x.client_user, x.socket.display()));
    exec.serve(&l);
    Ok(())
}

#[cfg(test)]
#[path = "executor_tests.rs"]
mod tests;
