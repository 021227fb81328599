//! The engine's decisions, without I/O: `transition(entry, cursor, event, ctx)` says what an operation does
//! next. The runner (`Engine::step` in engine.rs) performs the `Effect` it asks for (through `NodeOs`, the
//! staging area, the hub link or the journal) and calls it again with the outcome, until the step is over.
//!
//! A journalled step (`journal::Step`) may take several effects; `cursor` counts them inside the step. The
//! cursor is not journalled: a step interrupted by a crash starts again from its first effect, which is why
//! every effect of a step is safe to repeat (as it was before this split). Time comes in through `Ctx`.

use crate::channel::{NodeKind, OsKind, PackagePin};
use crate::journal::{Entry, Op, Outcome, Step};
use crate::os::{BootState, OsFacts, Rebooted, Slot, SlotImage};
use std::path::PathBuf;
use std::time::Duration;
use upkeep_core::signature::{PublicKey, Signature};
use upkeep_core::version::{ImageVersion, KubernetesVersion, NodeImageVersion};

/// Reboots the reboot step asks for before it gives up on seeing a new boot id.
pub const MAX_REBOOTS: u32 = 3;
/// Drain timeout of a leased reboot (no agent.toml key: a node that cannot drain in 15 minutes is not rebooted).
pub const LEASED_REBOOT_DRAIN_TIMEOUT: Duration = Duration::from_secs(900);
/// Directory of images that were rolled back on this node, inside the state directory. A file named
/// `<family>-<version>` holds the reason; delete it to allow that image again.
pub const ROLLED_BACK_DIR: &str = "rolled-back";
/// File in the state directory naming the Kubernetes version whose upgrade started and has not finished.
pub const KUBERNETES_PENDING_FILE: &str = "kubernetes-upgrade-pending";

/// What a decision may depend on besides the entry and the outcome: plain values, no handles.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The agent's state directory (where staged images and marks live).
    pub state_dir: PathBuf,
    /// Now, in Unix milliseconds (stamps results).
    pub now_ms: i64,
    /// Whether the agent can download from an https URL.
    pub has_url_fetcher: bool,
}

impl Ctx {
    /// The rolled-back mark of image `label`.
    pub fn rolled_back_file(&self, label: &str) -> PathBuf {
        self.state_dir.join(ROLLED_BACK_DIR).join(label)
    }

    /// The pending-Kubernetes-upgrade mark.
    pub fn kubernetes_pending_file(&self) -> PathBuf {
        self.state_dir.join(KUBERNETES_PENDING_FILE)
    }
}

/// One side effect (or read) the runner performs; its outcome comes back as `Event::Done`.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// `NodeOs::cordon`.
    Cordon,
    /// `NodeOs::uncordon`.
    Uncordon,
    /// `NodeOs::drain`.
    Drain {
        /// Timeout.
        timeout: Duration,
        /// Ignore disruption budgets.
        force: bool,
    },
    /// `NodeOs::boot_state` -> `Value::Boot`.
    BootState,
    /// `NodeOs::facts` -> `Value::Facts`.
    Facts,
    /// The node's kind (os-release through `NodeOs`, the pool the hub named) -> `Value::Kind`.
    NodeKind,
    /// The trusted keys, parsed -> `Value::Keys`.
    TrustedKeys,
    /// Reads a mark file (rolled-back image, pending Kubernetes upgrade) -> `Value::Mark`.
    ReadMark(PathBuf),
    /// Writes a mark file with `text` (persist, then act).
    WriteMark(PathBuf, String),
    /// Removes a mark file (a failure is only logged: the work it marked is done).
    ClearMark(PathBuf),
    /// Removes staging and slot-write leftovers of everything but the staged image of `keep` (never fails).
    CleanLeftovers {
        /// The digest whose staged image stays.
        keep: Option<String>,
    },
    /// Downloads the image into staging and verifies its digest, size and signature against the trusted keys.
    Fetch {
        /// Digest.
        sha256: String,
        /// https URL, or empty for the hub.
        url: String,
        /// Announced size (0: unknown).
        size: u64,
        /// Signature text.
        signature: String,
    },
    /// `NodeOs::write_slot`.
    WriteSlot(Slot, SlotImage),
    /// Removes the staged image of `sha256` (never fails).
    DiscardStaged(String),
    /// `NodeOs::mark_boot_once`.
    MarkBootOnce(Slot),
    /// `NodeOs::reboot` (the entry is journalled first); after an in-process boot the session is restarted
    /// -> `Value::Rebooted`.
    Reboot,
    /// Waits for the hub session to be back after the boot -> Err when it is not within the health timeout.
    AwaitSession,
    /// `NodeOs::health_check`.
    HealthCheck,
    /// `NodeOs::commit`.
    Commit(Slot),
    /// `NodeOs::fall_back` -> `Value::Rebooted`.
    FallBack(Slot),
    /// Gives the lease back to the hub (never fails).
    ReleaseLease(String),
    /// `NodeOs::install_packages`.
    InstallPackages(OsKind, Vec<PackagePin>),
    /// `NodeOs::record_security_patch`.
    RecordSecurityPatch(String),
    /// `NodeOs::kubernetes_version` -> `Value::Kubernetes`.
    KubernetesVersion,
    /// `NodeOs::install_kubernetes`.
    InstallKubernetes(OsKind, KubernetesVersion),
    /// `NodeOs::upgrade_kubernetes_hook`.
    KubernetesHook(KubernetesVersion, bool),
}

/// What an effect gave back.
#[derive(Debug, Clone)]
pub enum Value {
    /// Nothing (done).
    Unit,
    /// Boot state.
    Boot(BootState),
    /// Facts.
    Facts(OsFacts),
    /// Node kind.
    Kind(NodeKind),
    /// Trusted keys.
    Keys(Vec<PublicKey>),
    /// A mark's text, if the mark exists.
    Mark(Option<String>),
    /// What a reboot or fall-back did.
    Rebooted(Rebooted),
    /// The Kubernetes version the node runs.
    Kubernetes(Option<KubernetesVersion>),
}

/// What happened since the last transition.
#[derive(Debug, Clone)]
pub enum Event {
    /// The step begins (or begins again after a restart).
    Enter,
    /// The effect asked for is over: its value, or its error as text.
    Done(Result<Value, String>),
}

/// What to do next.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one short-lived value per effect; boxing buys nothing
pub enum Transition {
    /// Perform `effect` (journal `entry` first when `persist_first`), then call `transition` with `entry`,
    /// `cursor` and the outcome.
    Do {
        /// The operation meanwhile.
        entry: Entry,
        /// Where the step is.
        cursor: u8,
        /// The effect.
        effect: Effect,
        /// Journal `entry` before the effect (a reboot).
        persist_first: bool,
    },
    /// The step is over: journal this entry (its next step, or its result) and go on.
    Next(Entry),
    /// The machine is going down; the journal carries on after the boot.
    Park,
    /// The step cannot even be attempted (the journal or the node is unreadable): a definite failure.
    Stuck(String),
}

fn go(entry: Entry, cursor: u8, effect: Effect) -> Transition {
    Transition::Do { entry, cursor, effect, persist_first: false }
}

fn to(mut e: Entry, step: Step) -> Transition {
    e.step = step;
    Transition::Next(e)
}

fn finish(mut e: Entry, ok: bool, error: String, ctx: &Ctx) -> Transition {
    e.step = Step::Done;
    e.result = Some(Outcome { ok, error, finished_at_unix_ms: ctx.now_ms });
    Transition::Next(e)
}

fn ok(e: Entry, ctx: &Ctx) -> Transition {
    finish(e, true, String::new(), ctx)
}

fn fail(e: Entry, why: String, ctx: &Ctx) -> Transition {
    finish(e, false, why, ctx)
}

/// A leased reboot after a failed step: uncordon (best effort), give the lease back, then fail with `why`.
pub fn unwound(mut e: Entry, why: String) -> Entry {
    e.failure = Some(why);
    e.step = Step::Uncordon;
    e
}

fn unwind(e: Entry, why: String) -> Transition {
    Transition::Next(unwound(e, why))
}

/// The image a reimage orders.
pub fn target_image(family: &str, version: &str) -> Result<NodeImageVersion, String> {
    let v: ImageVersion = version.parse().map_err(|e| format!("reimage.image.version: {e}"))?;
    NodeImageVersion::new(family, v).map_err(|e| format!("reimage.image.family: {e}"))
}

/// The outcome of the effect just performed; `Enter` where an outcome was expected means the runner broke the
/// protocol (never happens: it is reported as stuck).
fn outcome(ev: Event) -> Result<Result<Value, String>, String> {
    match ev {
        Event::Done(r) => Ok(r),
        Event::Enter => Err("engine: an effect's outcome was expected".into()),
    }
}

macro_rules! value {
    ($r:expr, $pat:pat => $v:expr) => {
        match $r {
            Ok($pat) => Ok($v),
            Ok(other) => Err(format!("engine: unexpected value {other:?}")),
            Err(e) => Err(e),
        }
    };
}

/// The next move of operation `e` at `cursor` of its step, given `ev`.
pub fn transition(e: Entry, cursor: u8, ev: Event, ctx: &Ctx) -> Transition {
    let op = e.op.clone();
    // Every effect's outcome arrives with cursor >= 1; the step's first move is at cursor 0 on `Enter`.
    let r = if cursor == 0 {
        Ok(Value::Unit)
    } else {
        match outcome(ev) {
            Ok(r) => r,
            Err(why) => return Transition::Stuck(why),
        }
    };
    match (&op, e.step) {
        (Op::Cordon | Op::Uncordon | Op::Drain { .. }, Step::Accepted) => to(e, Step::Act),
        (Op::Cordon | Op::Uncordon | Op::Drain { .. }, Step::Act) => match cursor {
            0 => {
                let effect = match &op {
                    Op::Cordon => Effect::Cordon,
                    Op::Uncordon => Effect::Uncordon,
                    Op::Drain { timeout_seconds, force } => {
                        Effect::Drain { timeout: Duration::from_secs(u64::from(*timeout_seconds)), force: *force }
                    }
                    _ => return Transition::Stuck("engine: not a single-step operation".into()),
                };
                go(e, 1, effect)
            }
            _ => match r {
                Ok(_) => ok(e, ctx),
                Err(err) => fail(e, format!("{} failed: {err}", op.kind()), ctx),
            },
        },
        (Op::Reboot { .. }, Step::Accepted) => match cursor {
            0 => go(e, 1, Effect::BootState),
            _ => match value!(r, Value::Boot(bs) => bs) {
                Ok(bs) => {
                    let mut e = e;
                    e.boot_id = Some(bs.boot_id);
                    to(e, Step::Reboot)
                }
                Err(why) => Transition::Stuck(why),
            },
        },
        (Op::Reimage { family, version, sha256, signature, url, allow_downgrade, reinstall, .. }, Step::Accepted) => {
            reimage_checks(
                e,
                cursor,
                r,
                ctx,
                ReimageOrder {
                    family,
                    version,
                    sha256,
                    signature,
                    url,
                    allow_downgrade: *allow_downgrade,
                    reinstall: *reinstall,
                },
            )
        }
        (Op::Reimage { sha256, signature, size_bytes, url, .. }, Step::Fetch) => match cursor {
            // Only this operation is in flight: whatever else is staged or half-written is a leftover.
            0 => go(e, 1, Effect::CleanLeftovers { keep: Some(sha256.clone()) }),
            1 => go(
                e,
                2,
                Effect::Fetch {
                    sha256: sha256.clone(),
                    url: url.clone(),
                    size: *size_bytes,
                    signature: signature.clone(),
                },
            ),
            2 => match r {
                Ok(_) => go(e, 3, Effect::BootState),
                Err(why) => fail(e, why, ctx),
            },
            _ => match value!(r, Value::Boot(bs) => bs) {
                Ok(bs) => {
                    let mut e = e;
                    e.previous = Some(bs.booted);
                    e.target = Some(bs.booted.other());
                    to(e, Step::Write)
                }
                Err(err) => fail(e, format!("reading boot state: {err}"), ctx),
            },
        },
        (Op::Reimage { sha256, signature, size_bytes, .. }, Step::Write) => {
            let Some(target) = e.target else {
                return Transition::Stuck("journal: write step without a target slot".into());
            };
            match cursor {
                0 => {
                    let image = SlotImage {
                        path: crate::os::image::staged_path(&ctx.state_dir, sha256),
                        sha256: sha256.clone(),
                        size: *size_bytes,
                        signature: signature.clone(),
                        // Verified when it was staged, by this process.
                        check_signature: false,
                    };
                    go(e, 1, Effect::WriteSlot(target, image))
                }
                _ => match r {
                    Ok(_) => to(e, Step::Mark),
                    Err(err) => fail(e, format!("writing slot {target}: {err}"), ctx),
                },
            }
        }
        (Op::Reimage { sha256, .. }, Step::Mark) => {
            let Some(target) = e.target else {
                return Transition::Stuck("journal: mark step without a target slot".into());
            };
            match cursor {
                // The slot holds the image now (its write is journalled): the staged copy is not needed again.
                0 => go(e, 1, Effect::DiscardStaged(sha256.clone())),
                1 => go(e, 2, Effect::MarkBootOnce(target)),
                2 => match r {
                    Ok(_) => go(e, 3, Effect::BootState),
                    Err(err) => fail(e, format!("marking slot {target} boot-once: {err}"), ctx),
                },
                _ => match value!(r, Value::Boot(bs) => bs) {
                    Ok(bs) => {
                        let mut e = e;
                        e.boot_id = Some(bs.boot_id);
                        to(e, Step::Reboot)
                    }
                    Err(why) => Transition::Stuck(why),
                },
            }
        }
        (Op::Reimage { .. } | Op::Reboot { .. } | Op::LeasedReboot { .. }, Step::Reboot) => reboot(e, cursor, r, ctx),
        (Op::Reboot { .. }, Step::Health) => match health(e, cursor, r) {
            Health::Do(t) => t,
            Health::Healthy(e) => ok(e, ctx),
            Health::Unhealthy(e, why) => fail(e, format!("after reboot: {why}"), ctx),
        },
        (Op::Reimage { family, version, .. }, Step::Health) => reimage_health(e, cursor, r, family, version),
        (Op::Reimage { .. }, Step::Commit) => {
            let Some(target) = e.target else {
                return Transition::Stuck("journal: commit step without a target slot".into());
            };
            match cursor {
                0 => go(e, 1, Effect::BootState),
                // The node may have lost power between health and commit and come back on the old slot: commit
                // only the slot that is running.
                1 => match value!(r, Value::Boot(bs) => bs) {
                    Err(why) => Transition::Stuck(why),
                    Ok(bs) if bs.booted != target => fail(
                        e,
                        format!(
                            "slot {target} passed its health check but the node now runs slot {} (a boot between \
                             health and commit); nothing committed, the node stays on slot {}",
                            bs.booted, bs.booted
                        ),
                        ctx,
                    ),
                    Ok(_) => go(e, 2, Effect::Commit(target)),
                },
                _ => match r {
                    Ok(_) => ok(e, ctx),
                    Err(err) => {
                        let mut e = e;
                        e.failure = Some(format!("committing slot {target}: {err}"));
                        to(e, Step::FallBack)
                    }
                },
            }
        }
        (Op::Reimage { family, version, .. }, Step::FallBack) => {
            let Some(previous) = e.previous else {
                return Transition::Stuck("journal: fall-back step without a previous slot".into());
            };
            let why = e.failure.clone().unwrap_or_else(|| "unknown failure".into());
            let label = format!("{family}-{version}");
            match cursor {
                // Persist, then act: the image is remembered as rolled back before the node leaves it.
                0 => go(e, 1, Effect::WriteMark(ctx.rolled_back_file(&label), format!("{why}\n"))),
                1 => match r {
                    Ok(_) => go(e, 2, Effect::FallBack(previous)),
                    Err(err) => Transition::Stuck(err),
                },
                _ => match value!(r, Value::Rebooted(b) => b) {
                    Ok(Rebooted::Done) => {
                        fail(e, format!("reimage to {label} rolled back to slot {previous}: {why}"), ctx)
                    }
                    Ok(Rebooted::Pending) => Transition::Park,
                    Err(err) => fail(
                        e,
                        format!("reimage to {label} failed ({why}) and falling back to slot {previous} failed: {err}"),
                        ctx,
                    ),
                },
            }
        }
        (Op::LeasedReboot { .. }, Step::Accepted) => to(e, Step::Cordon),
        (Op::LeasedReboot { .. }, Step::Cordon) => match cursor {
            0 => go(e, 1, Effect::Cordon),
            _ => match r {
                Ok(_) => to(e, Step::Drain),
                Err(err) => unwind(e, format!("cordon failed: {err}")),
            },
        },
        (Op::LeasedReboot { .. }, Step::Drain) => match cursor {
            0 => go(e, 1, Effect::Drain { timeout: LEASED_REBOOT_DRAIN_TIMEOUT, force: false }),
            // Fencing for the reboot step: a different boot id later means the reboot happened.
            1 => match r {
                Ok(_) => go(e, 2, Effect::BootState),
                Err(err) => unwind(e, format!("drain failed: {err}")),
            },
            _ => match value!(r, Value::Boot(bs) => bs) {
                Ok(bs) => {
                    let mut e = e;
                    e.boot_id = Some(bs.boot_id);
                    to(e, Step::Reboot)
                }
                Err(err) => unwind(e, format!("reading the boot id before the reboot: {err}")),
            },
        },
        (Op::LeasedReboot { .. }, Step::Health) => match health(e, cursor, r) {
            Health::Do(t) => t,
            Health::Healthy(e) => to(e, Step::Uncordon),
            Health::Unhealthy(e, why) => unwind(e, format!("after the reboot: {why}")),
        },
        (Op::LeasedReboot { .. }, Step::Uncordon) => match cursor {
            0 => go(e, 1, Effect::Uncordon),
            _ => {
                let mut e = e;
                // Best effort after a failure: the failure stays the reason, the uncordon error is added to it.
                if let Err(err) = r {
                    e.failure = Some(match e.failure.take() {
                        Some(why) => format!("{why}; uncordon afterwards failed too: {err}"),
                        None => format!("uncordon failed: {err}"),
                    });
                }
                to(e, Step::Release)
            }
        },
        (Op::LeasedReboot { lease_id, .. }, Step::Release) => match cursor {
            // Safe to repeat after a crash: releasing a lease the hub no longer holds changes nothing.
            0 => go(e, 1, Effect::ReleaseLease(lease_id.clone())),
            _ => match e.failure.clone() {
                None => ok(e, ctx),
                Some(why) => fail(
                    e,
                    format!("leased reboot under lease {lease_id}: {why} (node uncordoned, lease given back)"),
                    ctx,
                ),
            },
        },
        (Op::ApplySecurityPatch { family, version, .. }, Step::Accepted) => {
            security_patch_checks(e, cursor, r, ctx, family, version)
        }
        (Op::ApplySecurityPatch { version, packages, .. }, Step::Act) => {
            let pins = match crate::channel::parse_package_pins(packages) {
                Ok(p) => p,
                Err(why) => return Transition::Stuck(why),
            };
            match cursor {
                0 => go(e, 1, Effect::NodeKind),
                1 => match value!(r, Value::Kind(k) => k) {
                    Ok(kind) => go(e, 2, Effect::InstallPackages(kind.os, pins)),
                    Err(err) => Transition::Stuck(format!("reading os-release: {err}")),
                },
                _ => match r {
                    Ok(_) => to(e, Step::Commit),
                    Err(err) => fail(e, format!("installing security patch {version}: {err}"), ctx),
                },
            }
        }
        (Op::ApplySecurityPatch { version, .. }, Step::Commit) => match cursor {
            0 => go(e, 1, Effect::RecordSecurityPatch(version.clone())),
            _ => match r {
                Ok(_) => ok(e, ctx),
                Err(err) => fail(e, format!("security patch {version} installed but not recorded: {err}"), ctx),
            },
        },
        (Op::UpgradeKubernetes { version, first_control_plane }, _) => {
            upgrade_kubernetes(e, cursor, r, ctx, version, *first_control_plane)
        }
        (_, step) => {
            Transition::Stuck(format!("journal: {} operation at step {} cannot continue", op.kind(), step.as_str()))
        }
    }
}

/// The reboot step: reboot unless the boot id shows the boot already happened.
fn reboot(e: Entry, cursor: u8, r: Result<Value, String>, ctx: &Ctx) -> Transition {
    match cursor {
        0 => go(e, 1, Effect::BootState),
        1 => {
            let bs = match value!(r, Value::Boot(bs) => bs) {
                Ok(bs) => bs,
                Err(why) => return Transition::Stuck(why),
            };
            if e.boot_id.as_deref() != Some(bs.boot_id.as_str()) {
                return to(e, Step::Health); // the boot happened (we were restarted by it)
            }
            if e.reboots >= MAX_REBOOTS {
                let why = format!(
                    "asked for {} reboots but the boot id never changed (still {}); the node cannot tell a boot \
                     happened, so it stops rebooting",
                    e.reboots, bs.boot_id
                );
                return match e.op {
                    Op::LeasedReboot { .. } => unwind(e, why),
                    Op::Reimage { .. } => fail(
                        e,
                        format!("{why}; the boot-once mark stays and the boot counter falls back on its own"),
                        ctx,
                    ),
                    _ => fail(e, why, ctx),
                };
            }
            // Persist, then act: the attempt is journalled before the reboot.
            let mut e = e;
            e.reboots += 1;
            Transition::Do { entry: e, cursor: 2, effect: Effect::Reboot, persist_first: true }
        }
        _ => match value!(r, Value::Rebooted(b) => b) {
            // In-process boot: the session went down and comes back as after a real boot.
            Ok(Rebooted::Done) => to(e, Step::Health),
            Ok(Rebooted::Pending) => Transition::Park,
            Err(err) => match e.op {
                Op::Reboot { .. } => fail(e, format!("reboot: {err}"), ctx),
                Op::LeasedReboot { .. } => unwind(e, format!("reboot failed: {err}")),
                _ => {
                    let mut e = e;
                    e.failure = Some(format!("reboot into slot {}: {err}", e.target.map_or("?", Slot::as_str)));
                    to(e, Step::FallBack)
                }
            },
        },
    }
}

enum Health {
    Do(Transition),
    Healthy(Entry),
    Unhealthy(Entry, String),
}

/// The node is healthy after a boot: the hub reachable again (cursor 1), then the configured commands (2).
fn health(e: Entry, cursor: u8, r: Result<Value, String>) -> Health {
    match cursor {
        0 => Health::Do(go(e, 1, Effect::AwaitSession)),
        1 => match r {
            Ok(_) => Health::Do(go(e, 2, Effect::HealthCheck)),
            Err(why) => Health::Unhealthy(e, why),
        },
        _ => match r {
            Ok(_) => Health::Healthy(e),
            Err(why) => Health::Unhealthy(e, why),
        },
    }
}

/// After the boot into the new slot: the slot booted (1), the node healthy (2, 3), the image the one ordered (4).
fn reimage_health(e: Entry, cursor: u8, r: Result<Value, String>, family: &str, version: &str) -> Transition {
    let Some(target) = e.target else {
        return Transition::Stuck("journal: health step without a target slot".into());
    };
    let verdict = match cursor {
        0 => return go(e, 1, Effect::BootState),
        1 => match value!(r, Value::Boot(bs) => bs) {
            Err(why) => return Transition::Stuck(why),
            Ok(bs) if bs.booted != target => Err(format!(
                "slot {target} did not boot (boot-once entry not taken or boot counter exhausted); the node came back on slot {}",
                bs.booted
            )),
            Ok(_) => return go(e, 2, Effect::AwaitSession),
        },
        2 => match r {
            Ok(_) => return go(e, 3, Effect::HealthCheck),
            Err(why) => Err(why),
        },
        3 => match r {
            Ok(_) => return go(e, 4, Effect::Facts),
            Err(why) => Err(why),
        },
        _ => {
            let want = match target_image(family, version) {
                Ok(w) => w,
                Err(why) => return Transition::Stuck(why),
            };
            match value!(r, Value::Facts(f) => f.node_image) {
                Ok(Some(got)) if got == want => Ok(()),
                Ok(got) => Err(format!(
                    "the booted image reports {} but {} was ordered",
                    got.map_or("no image metadata".to_string(), |g| g.label()),
                    want.label()
                )),
                Err(err) => Err(format!("reading the booted image's metadata: {err}")),
            }
        }
    };
    match verdict {
        Ok(()) => to(e, Step::Commit),
        Err(why) => fall_back(e, why),
    }
}

fn fall_back(mut e: Entry, why: String) -> Transition {
    e.failure = Some(why);
    to(e, Step::FallBack)
}

/// A reimage order's fields.
struct ReimageOrder<'a> {
    family: &'a str,
    version: &'a str,
    sha256: &'a str,
    signature: &'a str,
    url: &'a str,
    allow_downgrade: bool,
    reinstall: bool,
}

/// A reimage's local checks: the order well-formed (0), the image not rolled back here (1), not a downgrade and
/// not already running (2), signed by a key the node trusts (3).
fn reimage_checks(e: Entry, cursor: u8, r: Result<Value, String>, ctx: &Ctx, o: ReimageOrder<'_>) -> Transition {
    let want = match target_image(o.family, o.version) {
        Ok(w) => w,
        Err(why) => return fail(e, why, ctx),
    };
    let label = want.label();
    match cursor {
        0 => {
            if !(o.sha256.len() == 64 && o.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))) {
                return fail(
                    e,
                    format!("reimage.image.sha256: {:?} is not 64 lower-case hex characters", o.sha256),
                    ctx,
                );
            }
            go(e, 1, Effect::ReadMark(ctx.rolled_back_file(&label)))
        }
        1 => match value!(r, Value::Mark(m) => m) {
            Ok(Some(reason)) => fail(
                e,
                format!(
                    "image {label} was rolled back on this node ({}); not trying it again until an operator deletes {}",
                    reason.trim(),
                    ctx.rolled_back_file(&label).display()
                ),
                ctx,
            ),
            Ok(None) => go(e, 2, Effect::Facts),
            Err(why) => Transition::Stuck(why),
        },
        2 => {
            let current = match value!(r, Value::Facts(f) => f.node_image) {
                Ok(c) => c,
                Err(err) => return fail(e, format!("reading the node's image: {err}"), ctx),
            };
            if let Some(cur) = &current {
                if *cur == want && !o.reinstall {
                    tracing::info!(op = %e.operation_id, image = %label, "already running the ordered image");
                    return ok(e, ctx);
                }
                if cur.family == want.family && want.version < cur.version && !o.allow_downgrade {
                    return fail(
                        e,
                        format!(
                            "downgrade refused: the node runs {} and {label} is older; set allow_downgrade",
                            cur.label()
                        ),
                        ctx,
                    );
                }
            }
            if !o.url.is_empty() {
                if let Err(why) = crate::os::https::check_image_url(o.url) {
                    return fail(e, why, ctx);
                }
                if !ctx.has_url_fetcher {
                    return fail(
                        e,
                        format!("reimage.image.url: {:?}: this agent has no https downloader; leave url empty", o.url),
                        ctx,
                    );
                }
            }
            if let Err(err) = Signature::parse(o.signature) {
                return fail(e, format!("image {label} refused: {err}"), ctx);
            }
            go(e, 3, Effect::TrustedKeys)
        }
        _ => {
            let keys = match value!(r, Value::Keys(k) => k) {
                Ok(k) => k,
                Err(why) => return fail(e, format!("reading trusted keys: {why}"), ctx),
            };
            let sig = match Signature::parse(o.signature) {
                Ok(s) => s,
                Err(err) => return fail(e, format!("image {label} refused: {err}"), ctx),
            };
            if let Err(why) = crate::os::image::signed_by_a_trusted_key(&sig, &keys) {
                return fail(e, format!("image {label} refused: {why}"), ctx);
            }
            to(e, Step::Fetch)
        }
    }
}

/// A security patch's checks: the pool may take it and the OS has a package manager (1), the patch is for the
/// node's image family and not applied yet (2).
fn security_patch_checks(
    e: Entry,
    cursor: u8,
    r: Result<Value, String>,
    ctx: &Ctx,
    family: &str,
    version: &str,
) -> Transition {
    match cursor {
        0 => go(e, 1, Effect::NodeKind),
        1 => {
            let kind = match value!(r, Value::Kind(k) => k) {
                Ok(k) => k,
                Err(err) => return fail(e, format!("reading os-release: {err}"), ctx),
            };
            if let Some(why) = kind.security_patch_refusal() {
                return fail(e, why, ctx);
            }
            if let Some(why) = kind.os.no_package_manager() {
                return fail(e, format!("security patch {version} refused: {why}"), ctx);
            }
            go(e, 2, Effect::Facts)
        }
        _ => {
            let facts = match value!(r, Value::Facts(f) => f) {
                Ok(f) => f,
                Err(err) => return fail(e, format!("reading the node's facts: {err}"), ctx),
            };
            if let Some(img) = &facts.node_image
                && img.family != family
            {
                return fail(
                    e,
                    format!(
                        "apply_security_patch.family: the patch is for {family:?} but the node runs image {}",
                        img.label()
                    ),
                    ctx,
                );
            }
            if facts.security_patch_version == version {
                tracing::info!(op = %e.operation_id, version, "security patch already applied");
                return ok(e, ctx);
            }
            to(e, Step::Act)
        }
    }
}

/// The Kubernetes version operation (the steps are described at the top of engine.rs).
fn upgrade_kubernetes(
    e: Entry,
    cursor: u8,
    r: Result<Value, String>,
    ctx: &Ctx,
    version: &str,
    first_control_plane: bool,
) -> Transition {
    let target: KubernetesVersion = match version.parse() {
        Ok(v) => v,
        Err(err) => return Transition::Stuck(format!("journal: upgrade_kubernetes.version: {err}")),
    };
    let pending_file = ctx.kubernetes_pending_file();
    match (e.step, cursor) {
        (Step::Accepted, 0) => go(e, 1, Effect::NodeKind),
        (Step::Accepted, 1) => match value!(r, Value::Kind(k) => k) {
            Err(err) => fail(e, format!("reading os-release: {err}"), ctx),
            Ok(kind) => match kind.os.no_package_manager() {
                Some(why) => fail(e, format!("Kubernetes {target} refused: {why}"), ctx),
                None => go(e, 2, Effect::ReadMark(pending_file)),
            },
        },
        (Step::Accepted, 2) => match value!(r, Value::Mark(m) => m) {
            // The pending mark travels in the next effect's cursor: 3 = no upgrade to `target` left unfinished,
            // 4 = one is.
            Ok(m) => {
                let pending = m.and_then(|s| s.trim().parse::<KubernetesVersion>().ok());
                go(e, if pending == Some(target) { 4 } else { 3 }, Effect::KubernetesVersion)
            }
            Err(why) => Transition::Stuck(why),
        },
        (Step::Accepted, 3 | 4) => {
            let running = match value!(r, Value::Kubernetes(v) => v) {
                Ok(v) => v,
                Err(err) => return fail(e, format!("Kubernetes {target} refused: {err}"), ctx),
            };
            if let Some(cur) = running {
                if cur == target && cursor == 3 {
                    tracing::info!(op = %e.operation_id, version = %target, "already at the ordered Kubernetes version");
                    return ok(e, ctx);
                }
                if cur > target {
                    return fail(
                        e,
                        format!(
                            "downgrade refused: the node runs Kubernetes {cur} and {target} is older; kubeadm does not downgrade"
                        ),
                        ctx,
                    );
                }
                if target.major != cur.major || target.minor > cur.minor + 1 {
                    return fail(
                        e,
                        format!(
                            "Kubernetes {cur} -> {target} refused: kubeadm upgrades one minor version at a time; upgrade to {}.{}.x first",
                            cur.major,
                            cur.minor + 1
                        ),
                        ctx,
                    );
                }
            }
            // Persist, then act: the mark is on disk before any package changes.
            go(e, 5, Effect::WriteMark(pending_file, format!("{target}\n")))
        }
        (Step::Accepted, _) => match r {
            Ok(_) => to(e, Step::Act),
            Err(err) => fail(e, format!("cannot mark the Kubernetes upgrade as started: {err}"), ctx),
        },
        (Step::Act, 0) => go(e, 1, Effect::NodeKind),
        (Step::Act, 1) => match value!(r, Value::Kind(k) => k) {
            Ok(kind) => go(e, 2, Effect::InstallKubernetes(kind.os, target)),
            Err(err) => Transition::Stuck(format!("reading os-release: {err}")),
        },
        (Step::Act, _) => match r {
            Ok(_) => to(e, Step::Hook),
            Err(err) => fail(e, format!("installing the Kubernetes {target} packages: {err}"), ctx),
        },
        (Step::Hook, 0) => go(e, 1, Effect::KubernetesHook(target, first_control_plane)),
        (Step::Hook, 1) => match r {
            Ok(_) => go(e, 2, Effect::KubernetesVersion),
            Err(err) => {
                fail(e, format!("Kubernetes {target} packages installed but the upgrade hook failed: {err}"), ctx)
            }
        },
        (Step::Hook, 2) => match value!(r, Value::Kubernetes(v) => v) {
            Ok(Some(v)) if v == target => go(e, 3, Effect::ClearMark(pending_file)),
            Ok(got) => {
                let got = got.map_or_else(|| "no version".to_string(), |v| v.to_string());
                fail(e, format!("after the upgrade hook the node reports Kubernetes {got}, expected {target}"), ctx)
            }
            Err(err) => fail(e, format!("reading the Kubernetes version after the upgrade: {err}"), ctx),
        },
        (Step::Hook, _) => {
            tracing::info!(op = %e.operation_id, version = %target, "Kubernetes upgraded");
            ok(e, ctx)
        }
        (step, _) => Transition::Stuck(format!(
            "journal: upgrade-kubernetes operation at step {} cannot continue",
            step.as_str()
        )),
    }
}

#[cfg(test)]
#[path = "transition_tests.rs"]
mod tests;
