//! A/B slots and boot control, one backend per kind of node:
//! - `DirSlots`: two directory trees `<root>/var/lib/upkeep/slots/{a,b}`; an image is a tar of a root tree;
//!   booting is simulated in-process (the booted slot's `etc/upkeep/node-image` becomes the node's live
//!   metadata), with its state in `slots/boot.json`. For containers, simulated nodes and the demo.
//! - `GrubEnv`: the GRUB environment block through `grub-editenv` (`next_entry` boot-once, `upkeep_tries`
//!   boot counter, `saved_entry` default); raw slots (block devices or image files); the booted slot is read
//!   from `upkeep.slot=a|b` on the kernel command line.
//! - `HookSlots`: configured commands for other bootloaders or image tools.
//!
//! Every backend hashes the bytes it writes (through `copy`, which overlaps reading, hashing and writing) and
//! refuses a slot whose bytes do not match the expected digest, saying what the slot holds then; such a slot is
//! never marked bootable. Only the directory backend writes outside the slot first (`<slot>.incoming`,
//! renamed into place once verified); it removes that copy when the write fails, and `remove_leftovers`
//! removes one a crash left.

use super::copy::{Buffers, CopyError, consume_and_hash, copy_and_hash_with};
use super::{BootState, OsError, Rebooted, Slot, command, parse_node_image};
use crate::config::HookCommands;
use crate::state::write_atomic;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Slot trees of the directory backend, relative to the root.
pub const DIR_SLOTS: &str = "var/lib/upkeep/slots";
/// Boot-once menu entry prefix of the GRUB backend: entries are `upkeep-a` and `upkeep-b`.
pub const GRUB_ENTRY_PREFIX: &str = "upkeep-";
/// Where the current boot's id is read (real backends).
pub const BOOT_ID_FILE: &str = "/proc/sys/kernel/random/boot_id";

/// One slot/boot-control backend.
pub trait Backend: Send + Sync {
    /// The boot state.
    fn boot_state(&self) -> Result<BootState, OsError>;
    /// Writes `image` into `slot`, hashing what it streams, and makes it visible only when the bytes are what
    /// `expect` says; returns bytes written.
    fn write_slot(&self, slot: Slot, image: &Path, expect: &Expect<'_>) -> Result<u64, OsError>;
    /// Removes what an interrupted or failed `write_slot` left outside the slots; returns what it removed.
    fn remove_leftovers(&self) -> Result<Vec<PathBuf>, OsError>;
    /// Marks `slot` to be booted once.
    fn mark_boot_once(&self, slot: Slot) -> Result<(), OsError>;
    /// Reboots.
    fn reboot(&self) -> Result<Rebooted, OsError>;
    /// Makes `slot` the default.
    fn commit(&self, slot: Slot) -> Result<(), OsError>;
    /// Returns to `to`.
    fn fall_back(&self, to: Slot) -> Result<Rebooted, OsError>;
    /// The root of the booted image (health commands get it as `UPKEEP_BOOTED_ROOT`).
    fn booted_root(&self) -> PathBuf;
}

/// Lower-case hex (digests are written and compared in it).
pub use super::copy::hex;

/// A check of the signature prehash and size of the bytes a slot write streamed; Err says why they are refused.
pub type SignedCheck<'a> = dyn Fn(&[u8; 64], u64) -> Result<(), String> + Sync + 'a;

/// What the bytes of a slot write must be before the slot holds them as an image: their SHA-256, and when a
/// signature check is given (the privileged executor), a signature by a trusted key over those very bytes.
pub struct Expect<'a> {
    /// SHA-256, lower-case hex.
    pub sha256: &'a str,
    /// The signature check, computed on the prehash of the bytes as they streamed by (one pass, no re-read).
    pub signed: Option<&'a SignedCheck<'a>>,
}

/// Why the streamed bytes are refused.
pub enum Mismatch {
    /// They hash to another digest.
    Digest {
        /// Expected.
        expected: String,
        /// Actual.
        actual: String,
    },
    /// Their signature (or size) does not check out.
    Signature(String),
}

impl Expect<'_> {
    /// Only the digest.
    pub fn digest(sha256: &str) -> Expect<'_> {
        Expect { sha256, signed: None }
    }

    /// The copy buffers that compute what this check needs.
    pub fn buffers(&self, base: Buffers) -> Buffers {
        if self.signed.is_some() { base.with_prehash() } else { base }
    }

    /// Checks what a copy computed.
    pub fn check(&self, c: &super::copy::Copied) -> Result<(), Mismatch> {
        if c.sha256 != self.sha256 {
            return Err(Mismatch::Digest { expected: self.sha256.to_string(), actual: c.sha256.clone() });
        }
        if let Some(check) = self.signed {
            let pre = c.prehash.ok_or_else(|| Mismatch::Signature("no prehash computed".into()))?;
            check(&pre, c.bytes).map_err(Mismatch::Signature)?;
        }
        Ok(())
    }
}

/// The error of a refused slot write, saying what the slot holds now.
pub fn refused(image: &Path, m: Mismatch, slot_state: String) -> OsError {
    match m {
        Mismatch::Digest { expected, actual } => {
            OsError::Digest { path: image.to_path_buf(), expected, actual, slot_state }
        }
        Mismatch::Signature(why) => OsError::Unverified { path: image.to_path_buf(), reason: why, slot_state },
    }
}

/// Where the per-boot token lives under the node's root: /run is a tmpfs emptied at every boot.
pub const BOOT_TOKEN_FILE: &str = "run/upkeep/boot-token";

/// The identity of the running boot: the kernel's boot id plus a token the agent keeps in /run. The token is
/// needed where the kernel's id does not change between boots as the agent sees it: in a container whose unit
/// gets a fresh /proc (ProtectControlGroups=), the host's boot id shows through, the same on every container
/// boot. /run, a tmpfs, is new at every boot of the machine or container; a restart of the agent keeps it.
fn read_boot_id(kernel: &Path, token: &Path) -> String {
    let k = std::fs::read_to_string(kernel).map(|s| s.trim().to_string()).unwrap_or_else(|_| "unknown".into());
    let t = match std::fs::read_to_string(token) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        _ => {
            let fresh = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
            let written = token
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| write_atomic(token, format!("{fresh}\n").as_bytes()).map_err(std::io::Error::other));
            match written {
                Ok(()) => fresh,
                Err(e) => {
                    tracing::warn!(path = %token.display(), error = %e, "cannot keep the boot token; using the kernel boot id alone");
                    String::new()
                }
            }
        }
    };
    if t.is_empty() { k } else { format!("{k}/{t}") }
}

/// fsyncs every file and directory under `dir`.
fn sync_tree(dir: &Path) -> Result<(), OsError> {
    for e in std::fs::read_dir(dir).map_err(OsError::io(dir))? {
        let e = e.map_err(OsError::io(dir))?;
        let p = e.path();
        let ft = e.file_type().map_err(OsError::io(&p))?;
        if ft.is_dir() {
            sync_tree(&p)?;
        } else if ft.is_file() {
            std::fs::File::open(&p).and_then(|f| f.sync_all()).map_err(OsError::io(&p))?;
        }
    }
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(OsError::io(dir))
}

/// Removes `p` (file or tree) if it exists.
fn remove_any(p: &Path) -> Result<(), OsError> {
    let r = match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    r.map_err(OsError::io(p))
}

// ---------------------------------------------------------------------------------------------------------
// Directory slots.

/// Persisted state of the directory backend (`slots/boot.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct DirBoot {
    committed: Slot,
    booted: Slot,
    next_once: Option<Slot>,
    tries_left: u32,
    boot_seq: u64,
}

impl Default for DirBoot {
    fn default() -> Self {
        DirBoot { committed: Slot::A, booted: Slot::A, next_once: None, tries_left: 0, boot_seq: 0 }
    }
}

/// The directory-slot backend over a node root.
#[derive(Debug, Clone)]
pub struct DirSlots {
    root: PathBuf,
    boot_tries: u32,
    /// The machine's reboot command; `None` for a simulated node (a root prefix), whose boots happen in-process.
    reboot_command: Option<Vec<String>>,
}

impl DirSlots {
    /// Over `root`, giving a boot-once slot `boot_tries` attempts. Boots are simulated in-process (the slot is
    /// switched and /run's flags cleared, the agent carries on) unless `reboot_command` is given, which the real
    /// machine (root `/`) always has: then the switch is recorded and the machine really reboots.
    pub fn new(root: PathBuf, boot_tries: u32, reboot_command: Option<Vec<String>>) -> DirSlots {
        DirSlots { root, boot_tries, reboot_command }
    }

    fn dir(&self) -> PathBuf {
        self.root.join(DIR_SLOTS)
    }

    /// The tree of `slot`.
    pub fn slot_dir(&self, slot: Slot) -> PathBuf {
        self.dir().join(slot.as_str())
    }

    fn boot_file(&self) -> PathBuf {
        self.dir().join("boot.json")
    }

    /// Where `write_slot` unpacks an image of `slot` before it is verified and renamed into place.
    fn incoming_dir(&self, slot: Slot) -> PathBuf {
        self.dir().join(format!("{slot}.incoming"))
    }

    /// Unpacks `image` into `incoming` while hashing it on other threads; returns what the copy computed.
    fn unpack(image: &Path, incoming: &Path, buffers: Buffers) -> Result<super::copy::Copied, OsError> {
        std::fs::create_dir_all(incoming).map_err(OsError::io(incoming))?;
        let f = std::fs::File::open(image).map_err(OsError::io(image))?;
        let unpacked = consume_and_hash(f, buffers, |reader| {
            let mut ar = tar::Archive::new(reader);
            ar.set_preserve_permissions(true);
            ar.set_overwrite(true);
            ar.unpack(incoming)
        });
        match unpacked {
            Ok((c, ())) => Ok(c),
            Err(CopyError::Write(e)) => {
                Err(OsError::Malformed { path: image.to_path_buf(), reason: format!("unpacking tar: {e}") })
            }
            Err(e) => Err(OsError::Io { path: image.to_path_buf(), source: e.into_io() }),
        }
    }

    fn load(&self) -> Result<DirBoot, OsError> {
        let p = self.boot_file();
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| OsError::Malformed { path: p, reason: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DirBoot::default()),
            Err(e) => Err(OsError::Io { path: p, source: e }),
        }
    }

    fn save(&self, b: &DirBoot) -> Result<(), OsError> {
        let p = self.boot_file();
        let bytes =
            serde_json::to_vec_pretty(b).map_err(|e| OsError::Malformed { path: p.clone(), reason: e.to_string() })?;
        write_atomic(&p, &bytes).map_err(|e| OsError::Malformed { path: p, reason: e.to_string() })
    }

    fn meta_rel() -> &'static str {
        super::NODE_IMAGE_FILE
    }

    /// A slot boots if its tree carries valid image metadata.
    fn bootable(&self, slot: Slot) -> bool {
        std::fs::read_to_string(self.slot_dir(slot).join(Self::meta_rel()))
            .ok()
            .is_some_and(|t| parse_node_image(&t).is_ok())
    }

    /// Makes `slot`'s own metadata the node's live metadata. Slot A without a tree is the node's original image,
    /// already live.
    fn activate(&self, slot: Slot) -> Result<(), OsError> {
        let src = self.slot_dir(slot).join(Self::meta_rel());
        let text = match std::fs::read(&src) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && slot == Slot::A => return Ok(()),
            Err(e) => return Err(OsError::Io { path: src, source: e }),
        };
        let dst = self.root.join(Self::meta_rel());
        write_atomic(&dst, &text).map_err(|e| OsError::Malformed { path: dst, reason: e.to_string() })
    }

    /// Keeps a copy of the live metadata in the booted slot's tree if it has none, so that a fall back restores it.
    fn snapshot_booted(&self, booted: Slot) -> Result<(), OsError> {
        let dst = self.slot_dir(booted).join(Self::meta_rel());
        if dst.exists() {
            return Ok(());
        }
        let live = self.root.join(Self::meta_rel());
        match std::fs::read(&live) {
            Ok(t) => write_atomic(&dst, &t).map_err(|e| OsError::Malformed { path: dst, reason: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(OsError::Io { path: live, source: e }),
        }
    }
}

impl Backend for DirSlots {
    fn boot_state(&self) -> Result<BootState, OsError> {
        let b = self.load()?;
        Ok(BootState {
            booted: b.booted,
            committed: b.committed,
            next_once: b.next_once,
            tries_left: b.next_once.map(|_| b.tries_left),
            boot_id: format!("dir-{}", b.boot_seq),
        })
    }

    fn write_slot(&self, slot: Slot, image: &Path, expect: &Expect<'_>) -> Result<u64, OsError> {
        let b = self.load()?;
        if slot == b.booted {
            return Err(OsError::Malformed {
                path: self.slot_dir(slot),
                reason: "refusing to write the booted slot".into(),
            });
        }
        self.snapshot_booted(b.booted)?;
        let incoming = self.incoming_dir(slot);
        remove_any(&incoming)?;
        let copied = match Self::unpack(image, &incoming, expect.buffers(Buffers::DEFAULT)) {
            Ok(r) => r,
            Err(e) => {
                // A half-unpacked tree is of no use to anyone: the slot itself was not touched.
                if let Err(rm) = remove_any(&incoming) {
                    tracing::warn!(error = %rm, "cannot remove a partly unpacked image; removed at the next attempt");
                }
                return Err(e);
            }
        };
        if let Err(m) = expect.check(&copied) {
            remove_any(&incoming)?;
            return Err(refused(
                image,
                m,
                format!("slot {slot} left unchanged and not marked bootable (the unpacked copy was removed)"),
            ));
        }
        let bytes = copied.bytes;
        sync_tree(&incoming)?;
        let dst = self.slot_dir(slot);
        remove_any(&dst)?;
        std::fs::rename(&incoming, &dst).map_err(OsError::io(&dst))?;
        let dir = self.dir();
        std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(OsError::io(&dir))?;
        Ok(bytes)
    }

    fn remove_leftovers(&self) -> Result<Vec<PathBuf>, OsError> {
        let mut removed = Vec::new();
        for slot in [Slot::A, Slot::B] {
            let p = self.incoming_dir(slot);
            if std::fs::symlink_metadata(&p).is_ok() {
                remove_any(&p)?;
                removed.push(p);
            }
        }
        Ok(removed)
    }

    fn mark_boot_once(&self, slot: Slot) -> Result<(), OsError> {
        let mut b = self.load()?;
        b.next_once = Some(slot);
        b.tries_left = self.boot_tries;
        self.save(&b)
    }

    fn reboot(&self) -> Result<Rebooted, OsError> {
        let mut b = self.load()?;
        // What a bootloader with a one-shot entry and a counter does: try the marked slot while tries are left,
        // else the committed one. The marked slot "fails to boot" when its tree has no valid image metadata.
        let mut chosen = b.committed;
        if let Some(n) = b.next_once
            && b.tries_left > 0
        {
            b.tries_left -= 1;
            if self.bootable(n) {
                chosen = n;
                b.next_once = None;
            }
        }
        if b.next_once.is_some() && b.tries_left == 0 {
            b.next_once = None;
        }
        // Activate before recording: a crash in between leaves the boot not taken, and the engine boots again.
        self.activate(chosen)?;
        // A boot empties /run (a tmpfs), and with it the OS's reboot-required flags.
        for flag in [super::RUN_REBOOT_REQUIRED_FILE, super::REBOOT_REQUIRED_FILE] {
            let p = self.root.join(flag);
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(OsError::Io { path: p, source: e }),
            }
        }
        b.booted = chosen;
        b.boot_seq += 1;
        self.save(&b)?;
        match &self.reboot_command {
            Some(argv) => {
                command::run(argv, &[], None)?;
                Ok(Rebooted::Pending)
            }
            None => Ok(Rebooted::Done),
        }
    }

    fn commit(&self, slot: Slot) -> Result<(), OsError> {
        let mut b = self.load()?;
        b.committed = slot;
        b.next_once = None;
        self.save(&b)
    }

    fn fall_back(&self, to: Slot) -> Result<Rebooted, OsError> {
        let mut b = self.load()?;
        b.committed = to;
        b.next_once = None;
        if b.booted != to {
            self.activate(to)?;
            b.booted = to;
            b.boot_seq += 1;
        }
        self.save(&b)?;
        Ok(Rebooted::Done)
    }

    fn booted_root(&self) -> PathBuf {
        let booted = self.load().map(|b| b.booted).unwrap_or(Slot::A);
        let d = self.slot_dir(booted);
        if d.is_dir() { d } else { self.root.clone() }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Raw slots (block devices or image files), shared by the GRUB backend.

/// Copies `image` onto `dest` (a block device or a file), the image of `slot`, while hashing (overlapped, see
/// `copy`), then fsyncs; returns the bytes written, or an error when they do not hash to `sha256`. The copy
/// goes straight to `dest` (there is no room for a second copy of a raw image), so after a mismatch `dest`
/// holds the bytes written, and the error says so; the caller marks nothing bootable after an error.
pub fn write_raw(image: &Path, dest: &Path, slot: Slot, expect: &Expect<'_>) -> Result<u64, OsError> {
    write_raw_with(image, dest, slot, expect, Buffers::DEFAULT)
}

/// `write_raw` with the given copy buffers (the agent uses `Buffers::DEFAULT`; the benchmark tries others).
pub fn write_raw_with(
    image: &Path,
    dest: &Path,
    slot: Slot,
    expect: &Expect<'_>,
    buffers: Buffers,
) -> Result<u64, OsError> {
    let buffers = expect.buffers(buffers);
    let src = std::fs::File::open(image).map_err(OsError::io(image))?;
    let is_file = std::fs::metadata(dest).map(|m| m.is_file()).unwrap_or(true);
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(is_file)
        .truncate(is_file)
        .open(dest)
        .map_err(OsError::io(dest))?;
    let copied = copy_and_hash_with(src, &mut out, buffers).map_err(|e| match e {
        CopyError::Write(source) => OsError::Io { path: dest.to_path_buf(), source },
        e => OsError::Io { path: image.to_path_buf(), source: e.into_io() },
    })?;
    out.sync_all().map_err(OsError::io(dest))?;
    if let Err(m) = expect.check(&copied) {
        return Err(refused(
            image,
            m,
            format!(
                "slot {slot} ({}) was written with these {} bytes and does not hold a verified image; it is not \
                 marked bootable, and the next image written replaces them",
                dest.display(),
                copied.bytes
            ),
        ));
    }
    Ok(copied.bytes)
}

// ---------------------------------------------------------------------------------------------------------
// GRUB environment block.

/// The GRUB backend. The GRUB configuration is expected to boot `next_entry` once while `upkeep_tries` is
/// above zero (decrementing it), else `saved_entry`, and to pass `upkeep.slot=a|b` on the kernel command line.
#[derive(Debug, Clone)]
pub struct GrubEnv {
    /// The environment block file.
    pub env_file: PathBuf,
    /// Slot A, slot B.
    pub slots: [PathBuf; 2],
    /// Kernel command line to read the booted slot from.
    pub cmdline: PathBuf,
    /// Boot id file.
    pub boot_id: PathBuf,
    /// Per-boot token file (under /run; see `read_boot_id`).
    pub boot_token: PathBuf,
    /// Tries given to a boot-once slot.
    pub boot_tries: u32,
    /// The reboot command.
    pub reboot_command: Vec<String>,
}

impl GrubEnv {
    fn editenv(&self, args: &[&str]) -> Result<String, OsError> {
        let mut argv = vec!["grub-editenv".to_string(), self.env_file.display().to_string()];
        argv.extend(args.iter().map(|s| s.to_string()));
        command::run(&argv, &[], None)
    }

    fn ensure_env(&self) -> Result<(), OsError> {
        if !self.env_file.exists() {
            self.editenv(&["create"])?;
        }
        Ok(())
    }

    /// The variables in the environment block.
    pub fn list(&self) -> Result<Vec<(String, String)>, OsError> {
        self.ensure_env()?;
        Ok(parse_grub_env(&self.editenv(&["list"])?))
    }

    fn entry_slot(v: Option<&String>) -> Option<Slot> {
        v.and_then(|e| e.strip_prefix(GRUB_ENTRY_PREFIX)).and_then(Slot::parse)
    }

    fn path(&self, slot: Slot) -> &Path {
        match slot {
            Slot::A => &self.slots[0],
            Slot::B => &self.slots[1],
        }
    }

    fn booted(&self) -> Result<Slot, OsError> {
        let text = std::fs::read_to_string(&self.cmdline).map_err(OsError::io(&self.cmdline))?;
        Ok(text
            .split_whitespace()
            .find_map(|w| w.strip_prefix("upkeep.slot="))
            .and_then(Slot::parse)
            .unwrap_or(Slot::A))
    }
}

/// Parses `grub-editenv list` output (`KEY=VALUE` lines).
pub fn parse_grub_env(text: &str) -> Vec<(String, String)> {
    text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

impl Backend for GrubEnv {
    fn boot_state(&self) -> Result<BootState, OsError> {
        let env = self.list()?;
        let get = |k: &str| env.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        let tries_left = get("upkeep_tries").and_then(|t| t.parse().ok());
        let next_once = Self::entry_slot(get("next_entry").as_ref()).filter(|_| tries_left != Some(0));
        Ok(BootState {
            booted: self.booted()?,
            committed: Self::entry_slot(get("saved_entry").as_ref()).unwrap_or(Slot::A),
            next_once,
            tries_left,
            boot_id: read_boot_id(&self.boot_id, &self.boot_token),
        })
    }

    fn write_slot(&self, slot: Slot, image: &Path, expect: &Expect<'_>) -> Result<u64, OsError> {
        if slot == self.booted()? {
            return Err(OsError::Malformed {
                path: self.path(slot).to_path_buf(),
                reason: "refusing to write the booted slot".into(),
            });
        }
        write_raw(image, self.path(slot), slot, expect)
    }

    fn remove_leftovers(&self) -> Result<Vec<PathBuf>, OsError> {
        Ok(Vec::new()) // raw slots are written in place: nothing is left outside them
    }

    fn mark_boot_once(&self, slot: Slot) -> Result<(), OsError> {
        self.ensure_env()?;
        let entry = format!("next_entry={GRUB_ENTRY_PREFIX}{slot}");
        let tries = format!("upkeep_tries={}", self.boot_tries);
        self.editenv(&["set", &entry, &tries]).map(drop)
    }

    fn reboot(&self) -> Result<Rebooted, OsError> {
        command::run(&self.reboot_command, &[], None)?;
        Ok(Rebooted::Pending)
    }

    fn commit(&self, slot: Slot) -> Result<(), OsError> {
        self.ensure_env()?;
        self.editenv(&["set", &format!("saved_entry={GRUB_ENTRY_PREFIX}{slot}")])?;
        self.editenv(&["unset", "next_entry", "upkeep_tries"]).map(drop)
    }

    fn fall_back(&self, to: Slot) -> Result<Rebooted, OsError> {
        self.commit(to)?;
        if self.booted()? != to {
            return self.reboot();
        }
        Ok(Rebooted::Done)
    }

    fn booted_root(&self) -> PathBuf {
        PathBuf::from("/")
    }
}

// ---------------------------------------------------------------------------------------------------------
// Hooks.

/// Agent-kept state of the hook backend (the hooks own the bootloader; the agent remembers what it asked).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct HookBoot {
    committed: Option<Slot>,
    next_once: Option<Slot>,
}

/// The command-hook backend.
#[derive(Debug, Clone)]
pub struct HookSlots {
    /// The commands.
    pub hooks: HookCommands,
    /// Where the agent keeps what it asked the hooks.
    pub state_file: PathBuf,
    /// Boot id file.
    pub boot_id: PathBuf,
    /// Per-boot token file (under /run; see `read_boot_id`).
    pub boot_token: PathBuf,
    /// The reboot command.
    pub reboot_command: Vec<String>,
}

impl HookSlots {
    fn run(&self, argv: &[String], slot: Slot, image: Option<&Path>) -> Result<String, OsError> {
        let img = image.map(|p| p.display().to_string()).unwrap_or_default();
        command::run(&command::substitute(argv, &[("slot", slot.as_str()), ("image", &img)]), &[], None)
    }

    fn load(&self) -> HookBoot {
        std::fs::read(&self.state_file).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    fn save(&self, s: &HookBoot) -> Result<(), OsError> {
        let p = &self.state_file;
        let bytes = serde_json::to_vec(s).map_err(|e| OsError::Malformed { path: p.clone(), reason: e.to_string() })?;
        write_atomic(p, &bytes).map_err(|e| OsError::Malformed { path: p.clone(), reason: e.to_string() })
    }

    fn booted(&self) -> Result<Slot, OsError> {
        let out = command::run(&self.hooks.booted_slot, &[], None)?;
        Slot::parse(&out).ok_or_else(|| OsError::Command {
            argv: self.hooks.booted_slot.clone(),
            status: "printed no slot".into(),
            stderr_tail: format!("expected `a` or `b` on stdout, got {:?}", out.trim()),
        })
    }
}

impl Backend for HookSlots {
    fn boot_state(&self) -> Result<BootState, OsError> {
        let s = self.load();
        let booted = self.booted()?;
        Ok(BootState {
            booted,
            committed: s.committed.unwrap_or(booted),
            next_once: s.next_once,
            tries_left: None,
            boot_id: read_boot_id(&self.boot_id, &self.boot_token),
        })
    }

    fn write_slot(&self, slot: Slot, image: &Path, expect: &Expect<'_>) -> Result<u64, OsError> {
        // Only hashed here (the write hook does the copy); the helper still reads ahead of the hash.
        let f = std::fs::File::open(image).map_err(OsError::io(image))?;
        let c = copy_and_hash_with(f, &mut std::io::sink(), expect.buffers(Buffers::DEFAULT))
            .map_err(|e| OsError::Io { path: image.to_path_buf(), source: e.into_io() })?;
        let bytes = c.bytes;
        if let Err(m) = expect.check(&c) {
            return Err(refused(
                image,
                m,
                format!(
                    "nothing written (checked before the write hook ran), slot {slot} left unchanged and not marked \
                     bootable"
                ),
            ));
        }
        self.run(&self.hooks.write, slot, Some(image))?;
        Ok(bytes)
    }

    fn remove_leftovers(&self) -> Result<Vec<PathBuf>, OsError> {
        Ok(Vec::new()) // the write hook owns whatever it stages
    }

    fn mark_boot_once(&self, slot: Slot) -> Result<(), OsError> {
        let mut s = self.load();
        s.next_once = Some(slot);
        self.save(&s)?;
        self.run(&self.hooks.mark_boot_once, slot, None).map(drop)
    }

    fn reboot(&self) -> Result<Rebooted, OsError> {
        let mut s = self.load();
        s.next_once = None;
        self.save(&s)?;
        command::run(&self.reboot_command, &[], None)?;
        Ok(Rebooted::Pending)
    }

    fn commit(&self, slot: Slot) -> Result<(), OsError> {
        self.run(&self.hooks.commit, slot, None)?;
        self.save(&HookBoot { committed: Some(slot), next_once: None })
    }

    fn fall_back(&self, to: Slot) -> Result<Rebooted, OsError> {
        self.run(&self.hooks.fall_back, to, None)?;
        self.save(&HookBoot { committed: Some(to), next_once: None })?;
        if self.booted()? != to {
            return self.reboot();
        }
        Ok(Rebooted::Done)
    }

    fn booted_root(&self) -> PathBuf {
        PathBuf::from("/")
    }
}

#[cfg(test)]
mod tests {
    use super::super::copy::CHUNK_BYTES;
    use super::*;
    use ring::digest::SHA256;

    fn tar_image(dir: &Path, version: &str, with_meta: bool) -> (PathBuf, String) {
        let path = dir.join(format!("img-{version}.tar"));
        let mut b = tar::Builder::new(std::fs::File::create(&path).expect("create"));
        if with_meta {
            let meta = format!("FAMILY=Test-1\nVERSION={version}\n");
            let mut h = tar::Header::new_gnu();
            h.set_size(meta.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, "etc/upkeep/node-image", meta.as_bytes()).expect("append");
        }
        b.into_inner().expect("finish").sync_all().expect("sync");
        let bytes = std::fs::read(&path).expect("read");
        (path, hex(ring::digest::digest(&SHA256, &bytes).as_ref()))
    }

    /// A node root booted from image 202301.01.0 with directory slots (one boot try).
    fn dir_slots_on_202301() -> (tempfile::TempDir, PathBuf, DirSlots) {
        let d = tempfile::tempdir().expect("tempdir");
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("etc/upkeep")).expect("mkdir");
        std::fs::write(root.join("etc/upkeep/node-image"), "FAMILY=Test-1\nVERSION=202301.01.0\n").expect("w");
        let s = DirSlots::new(root.clone(), 1, None);
        (d, root, s)
    }

    #[test]
    fn dir_slots_boot_once_commit_and_fall_back() {
        let (d, root, s) = dir_slots_on_202301();
        let (img, sha) = tar_image(d.path(), "202302.01.0", true);
        assert!(matches!(s.write_slot(Slot::B, &img, &Expect::digest(&"0".repeat(64))), Err(OsError::Digest { .. })));
        assert!(!s.slot_dir(Slot::B).exists(), "a digest mismatch leaves the slot absent");
        assert!(s.write_slot(Slot::A, &img, &Expect::digest(&sha)).is_err(), "the booted slot is never written");
        s.write_slot(Slot::B, &img, &Expect::digest(&sha)).expect("write");
        s.mark_boot_once(Slot::B).expect("mark");
        assert_eq!(s.boot_state().expect("state").next_once, Some(Slot::B));
        s.reboot().expect("boot");
        let st = s.boot_state().expect("state");
        assert_eq!((st.booted, st.committed, st.next_once), (Slot::B, Slot::A, None));
        let live = std::fs::read_to_string(root.join("etc/upkeep/node-image")).expect("meta");
        assert!(live.contains("202302.01.0"), "{live}");
        s.fall_back(Slot::A).expect("fall back");
        let live = std::fs::read_to_string(root.join("etc/upkeep/node-image")).expect("meta");
        assert!(live.contains("202301.01.0"), "the original image's metadata is restored: {live}");
        // An image without metadata does not boot: the one try is used up and the committed slot comes back.
        let (bad, bad_sha) = tar_image(d.path(), "x", false);
        s.write_slot(Slot::B, &bad, &Expect::digest(&bad_sha)).expect("write");
        s.mark_boot_once(Slot::B).expect("mark");
        s.reboot().expect("boot");
        let st = s.boot_state().expect("state");
        assert_eq!((st.booted, st.next_once), (Slot::A, None));
    }

    #[test]
    fn dir_slots_leave_no_incoming_copy_behind_and_remove_one_a_crash_left() {
        let (d, _root, s) = dir_slots_on_202301();
        let (img, sha) = tar_image(d.path(), "202302.01.0", true);
        s.write_slot(Slot::B, &img, &Expect::digest(&sha)).expect("write");
        let slot_b = std::fs::read_to_string(s.slot_dir(Slot::B).join("etc/upkeep/node-image")).expect("b");
        // A crash in the middle of a write leaves an unpacked copy beside the slots.
        for slot in [Slot::A, Slot::B] {
            std::fs::create_dir_all(s.incoming_dir(slot).join("etc")).expect("mkdir");
            std::fs::write(s.incoming_dir(slot).join("etc/half"), b"half").expect("w");
        }
        let removed = s.remove_leftovers().expect("remove");
        assert_eq!(removed, [s.incoming_dir(Slot::A), s.incoming_dir(Slot::B)]);
        assert!(s.remove_leftovers().expect("again").is_empty());
        let after = std::fs::read_to_string(s.slot_dir(Slot::B).join("etc/upkeep/node-image")).expect("b");
        assert_eq!(after, slot_b, "the slot itself is never touched");
        // A file that is not an image archive fails to unpack: nothing is left beside the slot.
        let junk = d.path().join("junk");
        std::fs::write(&junk, vec![0x5a; 2048]).expect("w");
        let junk_sha = hex(ring::digest::digest(&SHA256, &[0x5a; 2048]).as_ref());
        let e = s.write_slot(Slot::B, &junk, &Expect::digest(&junk_sha)).expect_err("not a tar");
        assert!(e.to_string().contains("unpacking tar"), "{e}");
        assert!(!s.incoming_dir(Slot::B).exists(), "no partly unpacked copy after a failed write");
        let e = s.write_slot(Slot::B, &img, &Expect::digest(&"0".repeat(64))).expect_err("digest");
        assert!(
            e.to_string().ends_with("slot b left unchanged and not marked bootable (the unpacked copy was removed)"),
            "{e}"
        );
        assert!(!s.incoming_dir(Slot::B).exists());
        assert_eq!(s.boot_state().expect("state").next_once, None);
        assert_eq!(std::fs::read_to_string(s.slot_dir(Slot::B).join("etc/upkeep/node-image")).expect("b"), slot_b);
    }

    #[test]
    fn a_raw_slot_written_with_the_wrong_digest_is_not_called_unchanged() {
        let d = tempfile::tempdir().expect("tempdir");
        let img = d.path().join("img.raw");
        std::fs::write(&img, b"new bytes").expect("w");
        let dest = d.path().join("slot-b.img");
        std::fs::write(&dest, b"old").expect("w");
        let e = write_raw(&img, &dest, Slot::B, &Expect::digest(&"0".repeat(64))).expect_err("digest");
        let text = e.to_string();
        assert!(!text.contains("unchanged"), "{text}");
        assert!(text.contains("slot b") && text.contains("was written with these 9 bytes"), "{text}");
        assert!(text.contains("does not hold a verified image; it is not marked bootable"), "{text}");
        assert_eq!(std::fs::read(&dest).expect("slot"), b"new bytes", "the message says what the slot holds");
    }

    #[test]
    fn a_raw_slot_write_with_a_signature_check_hands_it_the_prehash_of_the_bytes_written() {
        let d = tempfile::tempdir().expect("tempdir");
        let img = d.path().join("img.raw");
        let bytes = b"signed bytes".repeat(1000);
        std::fs::write(&img, &bytes).expect("w");
        let sha = hex(ring::digest::digest(&SHA256, &bytes).as_ref());
        let dest = d.path().join("slot-b.img");
        let want = upkeep_core::signature::blake2b_512(&bytes);
        let seen = std::sync::Mutex::new(None);
        let check = |pre: &[u8; 64], n: u64| {
            *seen.lock().expect("lock") = Some((*pre, n));
            if *pre == want { Ok(()) } else { Err("not the signed bytes".to_string()) }
        };
        let n = write_raw(&img, &dest, Slot::B, &Expect { sha256: &sha, signed: Some(&check) }).expect("signed");
        assert_eq!(n, bytes.len() as u64);
        assert_eq!(*seen.lock().expect("lock"), Some((want, bytes.len() as u64)));
        let refuse = |_: &[u8; 64], _: u64| Err("signature by nobody".to_string());
        let e = write_raw(&img, &dest, Slot::B, &Expect { sha256: &sha, signed: Some(&refuse) }).expect_err("refused");
        assert!(matches!(&e, OsError::Unverified { reason, .. } if reason == "signature by nobody"), "{e}");
        assert!(e.to_string().contains("not marked bootable"), "{e}");
    }

    #[test]
    fn raw_slot_write_errors_name_the_side_that_failed() {
        let d = tempfile::tempdir().expect("tempdir");
        let img = d.path().join("img.raw");
        std::fs::write(&img, b"bytes").expect("w");
        // A destination that cannot take bytes (a directory opened for writing fails at open; /dev/full at write).
        let full = Path::new("/dev/full");
        if full.exists() {
            let e = write_raw(&img, full, Slot::B, &Expect::digest(&"0".repeat(64))).expect_err("write fails");
            assert!(matches!(&e, OsError::Io { path, .. } if path == full), "{e}");
        }
        // A source that cannot be read as a file (a directory): the error names the image.
        let e = write_raw(d.path(), &d.path().join("out"), Slot::B, &Expect::digest(&"0".repeat(64)))
            .expect_err("read fails");
        assert!(matches!(&e, OsError::Io { path, .. } if path == d.path()), "{e}");
    }

    #[test]
    fn a_grub_slot_with_the_wrong_digest_is_not_marked_bootable() {
        let d = tempfile::tempdir().expect("tempdir");
        let cmdline = d.path().join("cmdline");
        std::fs::write(&cmdline, "root=/dev/sda2 upkeep.slot=a\n").expect("w");
        let g = GrubEnv {
            env_file: d.path().join("grubenv"),
            slots: [d.path().join("slot-a.img"), d.path().join("slot-b.img")],
            cmdline,
            boot_token: d.path().join("run/boot-token"),
            boot_id: d.path().join("boot_id"),
            boot_tries: 2,
            reboot_command: vec!["true".into()],
        };
        let img = d.path().join("img.raw");
        std::fs::write(&img, vec![3u8; CHUNK_BYTES + 1]).expect("w");
        let e = g.write_slot(Slot::B, &img, &Expect::digest(&"0".repeat(64))).expect_err("digest");
        assert!(matches!(e, OsError::Digest { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("slot b") && text.contains("not marked bootable") && !text.contains("unchanged"),
            "{text}"
        );
        let st = g.boot_state().expect("state");
        assert_eq!((st.next_once, st.committed), (None, Slot::A), "nothing marked after a mismatch");
        assert!(!g.list().expect("list").iter().any(|(k, _)| k == "next_entry"));
    }

    #[test]
    fn grub_env_block_boot_once_commit_fall_back() {
        let d = tempfile::tempdir().expect("tempdir");
        let cmdline = d.path().join("cmdline");
        std::fs::write(&cmdline, "BOOT_IMAGE=/vmlinuz root=/dev/sda2 upkeep.slot=a quiet\n").expect("w");
        let boot_id = d.path().join("boot_id");
        std::fs::write(&boot_id, "1111\n").expect("w");
        let g = GrubEnv {
            env_file: d.path().join("grubenv"),
            slots: [d.path().join("slot-a.img"), d.path().join("slot-b.img")],
            cmdline: cmdline.clone(),
            boot_token: d.path().join("run/boot-token"),
            boot_id,
            boot_tries: 2,
            reboot_command: vec!["true".into()],
        };
        let st = g.boot_state().expect("a fresh env block is created");
        assert_eq!((st.booted, st.committed, st.next_once), (Slot::A, Slot::A, None));
        assert_eq!(std::fs::metadata(&g.env_file).expect("env").len(), 1024, "a real GRUB environment block");
        let img = d.path().join("img.raw");
        std::fs::write(&img, vec![7u8; 3 * CHUNK_BYTES + 5]).expect("w");
        let sha = hex(ring::digest::digest(&SHA256, &std::fs::read(&img).expect("r")).as_ref());
        assert!(g.write_slot(Slot::A, &img, &Expect::digest(&sha)).is_err(), "the booted slot is never written");
        assert_eq!(g.write_slot(Slot::B, &img, &Expect::digest(&sha)).expect("write"), 3 * CHUNK_BYTES as u64 + 5);
        assert_eq!(std::fs::read(&g.slots[1]).expect("slot"), std::fs::read(&img).expect("img"));
        g.mark_boot_once(Slot::B).expect("mark");
        let env = g.list().expect("list");
        assert!(env.contains(&("next_entry".into(), "upkeep-b".into())), "{env:?}");
        assert!(env.contains(&("upkeep_tries".into(), "2".into())), "{env:?}");
        assert_eq!(g.boot_state().expect("st").next_once, Some(Slot::B));
        assert_eq!(g.reboot().expect("reboot"), Rebooted::Pending);
        // The bootloader took the entry: the kernel command line says b.
        std::fs::write(&cmdline, "root=/dev/sda3 upkeep.slot=b\n").expect("w");
        g.commit(Slot::B).expect("commit");
        let env = g.list().expect("list");
        assert!(env.contains(&("saved_entry".into(), "upkeep-b".into())), "{env:?}");
        assert!(!env.iter().any(|(k, _)| k == "next_entry" || k == "upkeep_tries"), "{env:?}");
        let st = g.boot_state().expect("st");
        assert_eq!((st.booted, st.committed, st.next_once), (Slot::B, Slot::B, None));
        // Counter exhausted: a boot-once mark with no tries left is not pending any more.
        g.mark_boot_once(Slot::A).expect("mark");
        g.editenv(&["set", "upkeep_tries=0"]).expect("set");
        assert_eq!(g.boot_state().expect("st").next_once, None);
        assert_eq!(g.fall_back(Slot::B).expect("fall back"), Rebooted::Done, "already on b: no reboot");
        assert!(!g.list().expect("list").iter().any(|(k, _)| k == "next_entry"));
        assert_eq!(g.fall_back(Slot::A).expect("fall back"), Rebooted::Pending, "on b, falling back to a reboots");
        assert!(g.list().expect("list").contains(&("saved_entry".into(), "upkeep-a".into())));
    }

    #[test]
    fn hook_backend_runs_the_commands_with_slot_and_image() {
        let d = tempfile::tempdir().expect("tempdir");
        let log = d.path().join("log");
        let booted = d.path().join("booted");
        std::fs::write(&booted, "a\n").expect("w");
        let sh = |s: String| vec!["sh".to_string(), "-c".to_string(), s];
        let l = log.display().to_string();
        let h = HookSlots {
            hooks: HookCommands {
                write: vec![
                    "sh".into(),
                    "-c".into(),
                    format!("echo write $0 $1 >> {l}"),
                    "{slot}".into(),
                    "{image}".into(),
                ],
                mark_boot_once: vec!["sh".into(), "-c".into(), format!("echo mark $0 >> {l}"), "{slot}".into()],
                commit: vec!["sh".into(), "-c".into(), format!("echo commit $0 >> {l}"), "{slot}".into()],
                fall_back: vec!["sh".into(), "-c".into(), format!("echo fallback $0 >> {l}"), "{slot}".into()],
                booted_slot: sh(format!("cat {}", booted.display())),
            },
            state_file: d.path().join("hook.json"),
            boot_id: d.path().join("none"),
            boot_token: d.path().join("run/boot-token"),
            reboot_command: sh(format!("echo reboot >> {l}")),
        };
        let img = d.path().join("img");
        std::fs::write(&img, b"bytes").expect("w");
        let sha = hex(ring::digest::digest(&SHA256, b"bytes").as_ref());
        assert!(matches!(h.write_slot(Slot::B, &img, &Expect::digest(&"1".repeat(64))), Err(OsError::Digest { .. })));
        h.write_slot(Slot::B, &img, &Expect::digest(&sha)).expect("write");
        h.mark_boot_once(Slot::B).expect("mark");
        assert_eq!(h.boot_state().expect("st").next_once, Some(Slot::B));
        assert_eq!(h.reboot().expect("reboot"), Rebooted::Pending);
        std::fs::write(&booted, "b\n").expect("w");
        h.commit(Slot::B).expect("commit");
        let st = h.boot_state().expect("st");
        assert_eq!((st.booted, st.committed), (Slot::B, Slot::B));
        let text = std::fs::read_to_string(&log).expect("log");
        assert_eq!(text, format!("write b {}\nmark b\nreboot\ncommit b\n", img.display()));
    }
}
