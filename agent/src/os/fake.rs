//! A scripted `NodeOs` for unit tests of the agent's engine only. Never used by the binary. It keeps boot
//! control in memory, records every side effect in `calls`, and can be told to fail health checks, to keep
//! a boot-once slot from booting, or to make reboots "real" (Pending: the test then restarts the engine).

use super::{BootState, NodeOs, OsError, OsFacts, Rebooted, Slot, SlotImage};
use crate::channel::{ChannelPlan, OsKind, PackagePin};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use upkeep_core::version::{KubernetesVersion, NodeImageVersion};

/// Everything the fake holds; tests read and set it through `FakeOs::with`.
#[derive(Debug, Default)]
pub struct FakeState {
    /// Facts reported.
    pub facts: OsFacts,
    /// Trusted key files.
    pub keys: Vec<(PathBuf, String)>,
    /// Booted slot.
    pub booted: Option<Slot>,
    /// Committed slot.
    pub committed: Option<Slot>,
    /// Boot-once mark.
    pub next_once: Option<Slot>,
    /// Boot counter.
    pub boot_seq: u64,
    /// Digest of what each slot holds.
    pub slot_sha: HashMap<Slot, String>,
    /// Image metadata per digest (what the image says it is once booted).
    pub images: HashMap<String, NodeImageVersion>,
    /// Metadata of what each slot holds, for slots not written by the test (slot A at start).
    pub slot_image: HashMap<Slot, NodeImageVersion>,
    /// Partial slot writes left beside the slots (as an interrupted or failed write leaves them), until
    /// `remove_slot_leftovers`.
    pub incoming: Vec<Slot>,
    /// Slot writes fail half-way with this reason, leaving a partial write in `incoming`.
    pub write_fails: Option<String>,
    /// Slot writes read bytes that differ from the verified image (a disk or staging fault after
    /// verification): the slot is overwritten and the write reports a digest mismatch, as a raw slot does.
    pub write_corrupts: bool,
    /// Health check failure to report, if any.
    pub unhealthy: Option<String>,
    /// A boot-once slot does not come up.
    pub boot_fails: bool,
    /// Reboots are real: they return Pending and the boot happens when the test calls `power_cycle`.
    pub real_reboots: bool,
    /// A real reboot was requested.
    pub reboot_requested: bool,
    /// os-release pairs.
    pub os_release: Vec<(String, String)>,
    /// Files the channel plans left, by path relative to the root, as `HostOs` would (owned files not in the
    /// newest plan removed).
    pub channel_files: std::collections::BTreeMap<String, String>,
    /// Notes `apply_channel` returns.
    pub channel_notes: Vec<String>,
    /// Package installs fail with this reason.
    pub install_fails: Option<String>,
    /// Drains fail with this reason.
    pub drain_fails: Option<String>,
    /// Installed packages: name -> version.
    pub packages: std::collections::BTreeMap<String, String>,
    /// Every side effect, in order.
    pub calls: Vec<String>,
    /// The Kubernetes methods fail with this reason (a node without `[kubernetes]`).
    pub kubernetes_unconfigured: Option<String>,
    /// The Kubernetes upgrade hook fails with this reason.
    pub kubernetes_hook_fails: Option<String>,
    /// Installing Kubernetes packages does not change the running version (`facts.kubernetes_version`), as when
    /// the version command reads a component the hook did not restart.
    pub kubernetes_version_stuck: bool,
    /// Node labels published: (node-image-version, security patch version).
    pub node_labels: Option<(String, String)>,
}

/// The fake.
#[derive(Debug, Default)]
pub struct FakeOs {
    state: Mutex<FakeState>,
}

impl FakeOs {
    /// With these facts.
    pub fn new(facts: OsFacts) -> FakeOs {
        let slot_a = facts.node_image.clone();
        let fake = FakeOs { state: Mutex::new(FakeState { facts, ..Default::default() }) };
        if let Some(a) = slot_a {
            fake.with(|s| s.slot_image.insert(Slot::A, a));
        }
        fake
    }

    /// Replaces the facts.
    pub fn set(&self, facts: OsFacts) {
        self.with(|s| s.facts = facts);
    }

    /// Reads or changes the state.
    pub fn with<T>(&self, f: impl FnOnce(&mut FakeState) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Completes a pending real reboot: the bootloader boots the boot-once slot (unless told it fails), else the
    /// committed one.
    pub fn power_cycle(&self) {
        self.with(|s| {
            s.reboot_requested = false;
            boot(s);
        });
    }
}

fn boot(s: &mut FakeState) {
    let committed = s.committed.unwrap_or(Slot::A);
    let chosen = match s.next_once.take() {
        Some(n) if !s.boot_fails => n,
        _ => committed,
    };
    s.booted = Some(chosen);
    s.boot_seq += 1;
    let image = s
        .slot_sha
        .get(&chosen)
        .and_then(|sha| s.images.get(sha))
        .cloned()
        .or_else(|| s.slot_image.get(&chosen).cloned());
    s.facts.node_image = image;
    s.calls.push(format!("booted {chosen}"));
}

fn sha256_file(p: &Path) -> Result<String, OsError> {
    let bytes = std::fs::read(p).map_err(OsError::io(p))?;
    Ok(super::slots::hex(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref()))
}

impl NodeOs for FakeOs {
    fn facts(&self) -> Result<OsFacts, OsError> {
        Ok(self.with(|s| s.facts.clone()))
    }

    fn trusted_keys(&self) -> Result<Vec<(PathBuf, String)>, OsError> {
        Ok(self.with(|s| s.keys.clone()))
    }

    fn boot_state(&self) -> Result<BootState, OsError> {
        Ok(self.with(|s| BootState {
            booted: s.booted.unwrap_or(Slot::A),
            committed: s.committed.unwrap_or(Slot::A),
            next_once: s.next_once,
            tries_left: None,
            boot_id: format!("fake-{}", s.boot_seq),
        }))
    }

    fn write_slot(&self, slot: Slot, image: &SlotImage) -> Result<u64, OsError> {
        if image.check_signature {
            let keys = super::image::parse_trusted_keys(&self.with(|s| s.keys.clone())).map_err(OsError::Executor)?;
            let check = super::image::prehash_check(&image.signature, image.size, keys)?;
            let bytes = std::fs::read(&image.path).map_err(OsError::io(&image.path))?;
            if let Err(reason) = check(&upkeep_core::signature::blake2b_512(&bytes), bytes.len() as u64) {
                return Err(OsError::Unverified {
                    path: image.path.clone(),
                    reason,
                    slot_state: format!("slot {slot} left unchanged"),
                });
            }
        }
        let (sha256, image) = (image.sha256.as_str(), image.path.as_path());
        if let Some(why) = self.with(|s| {
            s.incoming.push(slot);
            s.write_fails.clone()
        }) {
            return Err(OsError::Malformed { path: image.to_path_buf(), reason: why });
        }
        let mut actual = sha256_file(image)?;
        if self.with(|s| s.write_corrupts) {
            actual = "f".repeat(64);
            self.with(|s| s.calls.push(format!("write {slot} (corrupt)")));
            return Err(OsError::Digest {
                path: image.to_path_buf(),
                expected: sha256.into(),
                actual,
                slot_state: format!(
                    "slot {slot} was written and does not hold a verified image; it is not marked bootable"
                ),
            });
        }
        if actual != sha256 {
            return Err(OsError::Digest {
                path: image.to_path_buf(),
                expected: sha256.into(),
                actual,
                slot_state: format!("slot {slot} left unchanged"),
            });
        }
        let len = std::fs::metadata(image).map_err(OsError::io(image))?.len();
        self.with(|s| {
            s.incoming.retain(|i| *i != slot);
            s.slot_sha.insert(slot, actual);
            s.calls.push(format!("write {slot}"));
        });
        Ok(len)
    }

    fn remove_slot_leftovers(&self) -> Result<Vec<PathBuf>, OsError> {
        // Not in `calls`: the tests compare the node's disruptive calls, and this one may happen at any start.
        Ok(self.with(|s| s.incoming.drain(..).map(|slot| PathBuf::from(format!("{slot}.incoming"))).collect()))
    }

    fn mark_boot_once(&self, slot: Slot) -> Result<(), OsError> {
        self.with(|s| {
            s.next_once = Some(slot);
            s.calls.push(format!("mark {slot}"));
        });
        Ok(())
    }

    fn reboot(&self) -> Result<Rebooted, OsError> {
        Ok(self.with(|s| {
            s.calls.push("reboot".into());
            if s.real_reboots {
                s.reboot_requested = true;
                Rebooted::Pending
            } else {
                boot(s);
                Rebooted::Done
            }
        }))
    }

    fn commit(&self, slot: Slot) -> Result<(), OsError> {
        self.with(|s| {
            s.committed = Some(slot);
            s.next_once = None;
            s.calls.push(format!("commit {slot}"));
        });
        Ok(())
    }

    fn fall_back(&self, to: Slot) -> Result<Rebooted, OsError> {
        Ok(self.with(|s| {
            s.committed = Some(to);
            s.next_once = None;
            s.calls.push(format!("fall back {to}"));
            if s.booted.unwrap_or(Slot::A) == to {
                Rebooted::Done
            } else if s.real_reboots {
                s.reboot_requested = true;
                Rebooted::Pending
            } else {
                boot(s);
                Rebooted::Done
            }
        }))
    }

    fn health_check(&self) -> Result<(), OsError> {
        self.with(|s| {
            s.calls.push("health".into());
            s.unhealthy.clone().map_or(Ok(()), |r| Err(OsError::Unhealthy(r)))
        })
    }

    fn cordon(&self) -> Result<(), OsError> {
        self.with(|s| s.calls.push("cordon".into()));
        Ok(())
    }

    fn uncordon(&self) -> Result<(), OsError> {
        self.with(|s| s.calls.push("uncordon".into()));
        Ok(())
    }

    fn drain(&self, timeout: std::time::Duration, force: bool) -> Result<(), OsError> {
        self.with(|s| {
            s.calls.push(format!("drain {}s{}", timeout.as_secs(), if force { " force" } else { "" }));
            if force {
                return Ok(());
            }
            s.drain_fails.clone().map_or(Ok(()), |why| {
                Err(OsError::Command {
                    argv: vec!["fake-drain".into()],
                    status: "exited with exit status: 1".into(),
                    stderr_tail: why,
                })
            })
        })
    }

    fn os_release(&self) -> Result<Vec<(String, String)>, OsError> {
        Ok(self.with(|s| s.os_release.clone()))
    }

    fn apply_channel(&self, plan: &ChannelPlan) -> Result<Vec<String>, OsError> {
        Ok(self.with(|s| {
            s.channel_files = plan.files.iter().map(|f| (f.path.to_string(), f.contents.clone())).collect();
            let timers: Vec<String> = plan.timers.iter().map(|(t, st)| format!("{t}={st:?}")).collect();
            s.calls.push(format!(
                "channel {} files [{}] timers [{}]",
                plan.effective,
                s.channel_files.keys().cloned().collect::<Vec<_>>().join(" "),
                timers.join(" ")
            ));
            s.channel_notes.clone()
        }))
    }

    fn install_packages(&self, os: &OsKind, pins: &[PackagePin]) -> Result<(), OsError> {
        self.with(|s| {
            let list: Vec<String> = pins.iter().map(|p| format!("{}={}", p.name, p.version)).collect();
            s.calls.push(format!("install {} {}", os.id(), list.join(" ")));
            if let Some(why) = &s.install_fails {
                return Err(OsError::Command {
                    argv: vec!["fake-install".into()],
                    status: "exited with exit status: 100".into(),
                    stderr_tail: why.clone(),
                });
            }
            for p in pins {
                s.packages.insert(p.name.clone(), p.version.clone());
            }
            Ok(())
        })
    }

    fn record_security_patch(&self, version: &str) -> Result<(), OsError> {
        self.with(|s| {
            s.calls.push(format!("security-patch {version}"));
            s.facts.security_patch_version = version.to_string();
        });
        Ok(())
    }

    fn kubernetes_version(&self) -> Result<Option<KubernetesVersion>, OsError> {
        self.with(|s| {
            if let Some(why) = &s.kubernetes_unconfigured {
                return Err(OsError::NotConfigured(why.clone()));
            }
            let v = s.facts.kubernetes_version.trim();
            if v.is_empty() {
                return Ok(None);
            }
            v.parse()
                .map(Some)
                .map_err(|e| OsError::Malformed { path: PathBuf::from("fake-kubelet"), reason: format!("{e}") })
        })
    }

    fn install_kubernetes(&self, os: &OsKind, version: &KubernetesVersion) -> Result<(), OsError> {
        self.with(|s| {
            s.calls.push(format!("install-kubernetes {} {version}", os.id()));
            if let Some(why) = &s.kubernetes_unconfigured {
                return Err(OsError::NotConfigured(why.clone()));
            }
            if let Some(why) = &s.install_fails {
                return Err(OsError::Command {
                    argv: vec!["fake-install".into()],
                    status: "exited with exit status: 100".into(),
                    stderr_tail: why.clone(),
                });
            }
            for p in ["kubeadm", "kubelet"] {
                s.packages.insert(p.to_string(), version.to_string());
            }
            if !s.kubernetes_version_stuck {
                s.facts.kubernetes_version = version.to_string();
            }
            Ok(())
        })
    }

    fn upgrade_kubernetes_hook(&self, version: &KubernetesVersion, first_control_plane: bool) -> Result<(), OsError> {
        self.with(|s| {
            let which = if first_control_plane { "first-control-plane" } else { "other" };
            s.calls.push(format!("kubernetes-hook {which} {version}"));
            match &s.kubernetes_hook_fails {
                Some(why) => Err(OsError::Command {
                    argv: vec!["kubeadm".into(), "upgrade".into()],
                    status: "exited with exit status: 1".into(),
                    stderr_tail: why.clone(),
                }),
                None => Ok(()),
            }
        })
    }

    fn publish_node_labels(&self, image: &str, patch: &str) -> Result<(), OsError> {
        self.with(|s| s.node_labels = Some((image.to_string(), patch.to_string())));
        Ok(())
    }
}
