//! The real `NodeOs` over a root directory: facts read from files under the root; slots and boot control
//! delegated to the configured backend (`slots`), cordon/drain to `cordon` (which goes through `kube` when
//! `[kubernetes] api_server` is set), health commands to `command`. With `[kubernetes]`, the node's Kubernetes
//! version is read from `version_command` or the package manager, and the version operation installs the
//! configured packages (`apt`, `dnf`) and runs the configured upgrade hook.

use super::cordon::Cordon;
use super::kube::KubeNode;
use super::slots::{self, Backend, DirSlots, GrubEnv, HookSlots};
use super::{
    BootState, NODE_IMAGE_FILE, NodeOs, OsError, OsFacts, REBOOT_REQUIRED_FILE, RUN_REBOOT_REQUIRED_FILE, Rebooted,
    Slot, SlotImage, apt, autoupdate, command, dnf, parse_env_file, parse_node_image,
};
use crate::channel::{ChannelPlan, OsKind, PackagePin, classify};
use crate::config::{AgentConfig, CordonSettings, ImageSettings, KubernetesSettings, SlotBackend};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use upkeep_core::version::KubernetesVersion;

/// Security patch marker written when a patch is applied, relative to the root.
pub const SECURITY_PATCH_FILE: &str = "etc/upkeep/security-patch";
/// Kubernetes version marker, relative to the root.
pub const KUBERNETES_VERSION_FILE: &str = "etc/upkeep/kubernetes-version";

/// How long dnf's reboot-required answer is reused (`dnf needs-restarting -r` takes seconds; reports are
/// read every heartbeat). Installing packages through the agent forgets it at once.
const DNF_REBOOT_CHECK_EVERY: Duration = Duration::from_secs(300);
/// The rpm databases whose presence under the root makes dnf's answer worth asking for.
const RPM_DBS: [&str; 2] = ["var/lib/rpm", "usr/lib/sysimage/rpm"];

/// Timeout of one health command.
const HEALTH_COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
/// Timeout of the Kubernetes upgrade hook (`kubeadm upgrade apply` pulls images and restarts the control plane).
const KUBERNETES_HOOK_TIMEOUT: Duration = Duration::from_secs(3600);
/// Timeout of `[kubernetes] version_command`.
const KUBERNETES_VERSION_TIMEOUT: Duration = Duration::from_secs(60);

/// The first `MAJOR.MINOR.PATCH` in a version command's output (`Kubernetes v1.29.3`, `v1.29.3+k3s1`).
pub fn kubernetes_version_in(output: &str) -> Option<KubernetesVersion> {
    output.split_whitespace().find_map(|token| {
        let t = token.trim_matches(|c: char| !c.is_ascii_alphanumeric());
        let t = t.strip_prefix('v').unwrap_or(t);
        let core = t.split(['+', '-']).next().unwrap_or(t);
        core.parse().ok()
    })
}

/// The node as seen through `root`.
#[derive(Clone)]
pub struct HostOs {
    root: PathBuf,
    image: ImageSettings,
    backend: Arc<dyn Backend>,
    cordon: Cordon,
    /// dnf's last reboot-required answer and when it was given.
    dnf_reboot: Arc<Mutex<Option<(Instant, bool)>>>,
    /// `[kubernetes]`, if the node has the section.
    kubernetes: Option<Arc<KubernetesSettings>>,
}

impl HostOs {
    /// Over `root` (`/` on a real node) with default settings (directory slots, no hooks).
    pub fn new(root: impl Into<PathBuf>) -> HostOs {
        let root = root.into();
        HostOs::with_settings(root.clone(), ImageSettings::defaults(&root), CordonSettings::default())
    }

    /// Over the configuration's root with its `[image]`, `[cordon]` and `[kubernetes]` settings.
    pub fn from_config(cfg: &AgentConfig) -> HostOs {
        let os = HostOs::with_settings(cfg.root.clone(), cfg.image.clone(), cfg.cordon.clone());
        match &cfg.kubernetes {
            Some(k) => os.with_kubernetes(k.clone(), &cfg.state_dir),
            None => os,
        }
    }

    /// With `[kubernetes]` settings: cordon, drain and labels through the API server when it is set (what
    /// cordon found is remembered under `state_dir`), and the Kubernetes version operation.
    pub fn with_kubernetes(mut self, settings: KubernetesSettings, state_dir: &Path) -> HostOs {
        if let Some(api) = &settings.api {
            let node = Arc::new(KubeNode::new(api.clone(), state_dir));
            self.cordon = self.cordon.clone().with_kube(node);
        }
        self.kubernetes = Some(Arc::new(settings));
        self
    }

    /// The Kubernetes API backend, when `[kubernetes] api_server` is set.
    pub fn kube_node(&self) -> Option<&KubeNode> {
        self.cordon.kube()
    }

    fn kubernetes_settings(&self) -> Result<&KubernetesSettings, OsError> {
        self.kubernetes.as_deref().ok_or_else(|| {
            OsError::NotConfigured(
                "this node has no [kubernetes] section in agent.toml; add one (packages, upgrade hooks) to let \
                 upkeep manage its Kubernetes version"
                    .into(),
            )
        })
    }

    fn os_kind(&self) -> Result<OsKind, OsError> {
        Ok(classify(&self.os_release()?))
    }

    /// Over `root` with explicit settings.
    pub fn with_settings(root: PathBuf, image: ImageSettings, cordon: CordonSettings) -> HostOs {
        let backend: Arc<dyn Backend> = match &image.backend {
            // A node whose root is `/` is a real machine: its reboots are real. Under a root prefix (a simulated
            // node, tests and the demo) boots happen in-process.
            SlotBackend::Dir => Arc::new(DirSlots::new(
                root.clone(),
                image.boot_tries,
                (root == std::path::Path::new("/")).then(|| image.reboot_command.clone()),
            )),
            SlotBackend::Grub { env_file, slot_a, slot_b, cmdline } => Arc::new(GrubEnv {
                env_file: env_file.clone(),
                slots: [slot_a.clone(), slot_b.clone()],
                cmdline: cmdline.clone(),
                boot_id: PathBuf::from(slots::BOOT_ID_FILE),
                boot_token: root.join(slots::BOOT_TOKEN_FILE),
                boot_tries: image.boot_tries,
                reboot_command: image.reboot_command.clone(),
            }),
            SlotBackend::Hook(h) => Arc::new(HookSlots {
                hooks: h.clone(),
                state_file: root.join("var/lib/upkeep/hook-boot.json"),
                boot_id: PathBuf::from(slots::BOOT_ID_FILE),
                boot_token: root.join(slots::BOOT_TOKEN_FILE),
                reboot_command: image.reboot_command.clone(),
            }),
        };
        let cordon = Cordon::new(root.clone(), cordon);
        HostOs { root, image, backend, cordon, dnf_reboot: Arc::new(Mutex::new(None)), kubernetes: None }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn read_optional(&self, rel: &str) -> Result<Option<String>, OsError> {
        read_optional(&self.path(rel))
    }

    fn os_release_text(&self) -> Result<Option<String>, OsError> {
        match self.read_optional("etc/os-release")? {
            Some(s) => Ok(Some(s)),
            None => self.read_optional("usr/lib/os-release"),
        }
    }

    /// Debian's reboot-required flag. `/var/run` is an absolute symlink to `/run` on current systems: under a
    /// root other than `/` following it would look at the host's flag, so both places are read inside the root.
    fn debian_reboot_flag(&self) -> bool {
        self.path(RUN_REBOOT_REQUIRED_FILE).exists()
            || (!self.path("var/run").is_symlink() && self.path(REBOOT_REQUIRED_FILE).exists())
    }

    /// dnf's reboot-required answer on an RPM node (cached for `DNF_REBOOT_CHECK_EVERY`); false elsewhere. A
    /// failing dnf is logged and counts as "not required" so that the rest of the report still goes out.
    fn dnf_reboot_required(&self, kv: &[(String, String)]) -> bool {
        if !matches!(classify(kv), OsKind::Rpm { .. }) || !RPM_DBS.iter().any(|d| self.path(d).is_dir()) {
            return false;
        }
        let mut cached = self.dnf_reboot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, answer)) = *cached
            && at.elapsed() < DNF_REBOOT_CHECK_EVERY
        {
            return answer;
        }
        match dnf::reboot_required(&self.root) {
            Ok(answer) => {
                *cached = Some((Instant::now(), answer));
                answer
            }
            Err(e) => {
                tracing::warn!(error = %e, "asking dnf whether a reboot is required");
                *cached = Some((Instant::now(), false));
                false
            }
        }
    }
}

fn read_optional(path: &Path) -> Result<Option<String>, OsError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(OsError::Io { path: path.to_path_buf(), source }),
    }
}

impl NodeOs for HostOs {
    fn facts(&self) -> Result<OsFacts, OsError> {
        let os_release = self.os_release_text()?;
        let kv = os_release.as_deref().map(parse_env_file).unwrap_or_default();
        let get = |k: &str| kv.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).unwrap_or_default();
        let os_family = if kv.is_empty() { "unknown".to_string() } else { get("ID") };
        let node_image = match self.read_optional(NODE_IMAGE_FILE)? {
            Some(text) => Some(
                parse_node_image(&text)
                    .map_err(|reason| OsError::Malformed { path: self.path(NODE_IMAGE_FILE), reason })?,
            ),
            None => None,
        };
        let trimmed = |rel: &str| -> Result<String, OsError> {
            Ok(self.read_optional(rel)?.map(|s| s.trim().to_string()).unwrap_or_default())
        };
        let kernel = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into());
        Ok(OsFacts {
            os_family,
            os_version: get("VERSION_ID"),
            kernel,
            node_image,
            security_patch_version: trimmed(SECURITY_PATCH_FILE)?,
            reboot_required: self.debian_reboot_flag() || self.dnf_reboot_required(&kv),
            kubernetes_version: if self.kubernetes.is_some() {
                // A failing version read must not take the rest of the report down with it.
                match self.kubernetes_version() {
                    Ok(v) => v.map(|v| v.to_string()).unwrap_or_default(),
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the node's Kubernetes version");
                        String::new()
                    }
                }
            } else {
                trimmed(KUBERNETES_VERSION_FILE)?
            },
        })
    }

    fn trusted_keys(&self) -> Result<Vec<(PathBuf, String)>, OsError> {
        let dir = &self.image.trusted_keys;
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(OsError::Io { path: dir.clone(), source: e }),
        };
        let mut out = Vec::new();
        for e in entries {
            let p = e.map_err(OsError::io(dir))?.path();
            if p.extension().is_some_and(|x| x == "pub") {
                let text = std::fs::read_to_string(&p).map_err(OsError::io(&p))?;
                out.push((p, text));
            }
        }
        out.sort();
        Ok(out)
    }

    fn boot_state(&self) -> Result<BootState, OsError> {
        self.backend.boot_state()
    }

    fn write_slot(&self, slot: Slot, image: &SlotImage) -> Result<u64, OsError> {
        if !image.check_signature {
            return self.backend.write_slot(slot, &image.path, &slots::Expect::digest(&image.sha256));
        }
        let keys = super::image::parse_trusted_keys(&self.trusted_keys()?)
            .map_err(|why| OsError::Executor(format!("reading trusted keys: {why}")))?;
        let check = super::image::prehash_check(&image.signature, image.size, keys)?;
        self.backend.write_slot(slot, &image.path, &slots::Expect { sha256: &image.sha256, signed: Some(&check) })
    }

    fn remove_slot_leftovers(&self) -> Result<Vec<PathBuf>, OsError> {
        self.backend.remove_leftovers()
    }

    fn mark_boot_once(&self, slot: Slot) -> Result<(), OsError> {
        self.backend.mark_boot_once(slot)
    }

    fn reboot(&self) -> Result<Rebooted, OsError> {
        self.backend.reboot()
    }

    fn commit(&self, slot: Slot) -> Result<(), OsError> {
        self.backend.commit(slot)
    }

    fn fall_back(&self, to: Slot) -> Result<Rebooted, OsError> {
        self.backend.fall_back(to)
    }

    fn health_check(&self) -> Result<(), OsError> {
        let booted = self.backend.booted_root().display().to_string();
        let root = self.root.display().to_string();
        for argv in &self.image.health_commands {
            command::run(
                argv,
                &[("UPKEEP_BOOTED_ROOT", &booted), ("UPKEEP_ROOT", &root)],
                Some(HEALTH_COMMAND_TIMEOUT),
            )
            .map_err(|e| OsError::Unhealthy(e.to_string()))?;
        }
        Ok(())
    }

    fn cordon(&self) -> Result<(), OsError> {
        self.cordon.cordon()
    }

    fn uncordon(&self) -> Result<(), OsError> {
        self.cordon.uncordon()
    }

    fn drain(&self, timeout: std::time::Duration, force: bool) -> Result<(), OsError> {
        self.cordon.drain(timeout, force)
    }

    fn os_release(&self) -> Result<Vec<(String, String)>, OsError> {
        Ok(self.os_release_text()?.as_deref().map(parse_env_file).unwrap_or_default())
    }

    fn apply_channel(&self, plan: &ChannelPlan) -> Result<Vec<String>, OsError> {
        let done = autoupdate::apply(&self.root, plan)?;
        tracing::info!(
            channel = %plan.effective,
            written = ?done.written,
            removed = ?done.removed,
            systemctl = done.systemctl.len(),
            "node OS channel applied"
        );
        Ok(done.notes)
    }

    fn install_packages(&self, os: &OsKind, pins: &[PackagePin]) -> Result<(), OsError> {
        let r = match os {
            OsKind::Debian { .. } => apt::install(&self.root, pins),
            OsKind::Rpm { .. } => dnf::install(&self.root, pins),
            OsKind::WindowsLike { id } | OsKind::Unknown { id } => Err(OsError::Malformed {
                path: self.path("etc/os-release"),
                reason: format!("no package manager known for os-release ID {id:?}; cannot install packages"),
            }),
        };
        // Whatever happened, dnf's reboot answer may have changed.
        *self.dnf_reboot.lock().unwrap_or_else(|e| e.into_inner()) = None;
        r
    }

    fn record_security_patch(&self, version: &str) -> Result<(), OsError> {
        let path = self.path(SECURITY_PATCH_FILE);
        crate::state::write_atomic(&path, format!("{version}\n").as_bytes())
            .map_err(|e| OsError::Malformed { path: path.clone(), reason: e.to_string() })
    }

    fn kubernetes_version(&self) -> Result<Option<KubernetesVersion>, OsError> {
        let k = self.kubernetes_settings()?;
        if !k.version_command.is_empty() {
            let out = command::run(&k.version_command, &[], Some(KUBERNETES_VERSION_TIMEOUT))?;
            return kubernetes_version_in(&out).map(Some).ok_or_else(|| OsError::Command {
                argv: k.version_command.clone(),
                status: "printed no Kubernetes version (MAJOR.MINOR.PATCH)".into(),
                stderr_tail: format!("stdout: {}; fix kubernetes.version_command", out.trim()),
            });
        }
        let Some(first) = k.packages.first() else { return Ok(None) };
        let (installed, db) = match self.os_kind()? {
            OsKind::Debian { .. } => (apt::installed_version(&self.root, first)?, "var/lib/dpkg/status"),
            OsKind::Rpm { .. } => (dnf::installed_version(&self.root, first)?, "var/lib/rpm"),
            OsKind::WindowsLike { .. } | OsKind::Unknown { .. } => return Ok(None),
        };
        let Some(full) = installed else { return Ok(None) };
        let upstream = apt::upstream_version(&full);
        upstream.parse().map(Some).map_err(|e| OsError::Malformed {
            path: self.path(db),
            reason: format!("installed {first} {full}: {e}; set kubernetes.version_command to read the version"),
        })
    }

    fn install_kubernetes(&self, os: &OsKind, version: &KubernetesVersion) -> Result<(), OsError> {
        let k = self.kubernetes_settings()?;
        let v = version.to_string();
        let r = match os {
            OsKind::Debian { .. } => apt::install_kubernetes(&self.root, &k.packages, &v),
            OsKind::Rpm { .. } => dnf::install_kubernetes(&self.root, &k.packages, &v),
            OsKind::WindowsLike { id } | OsKind::Unknown { id } => Err(OsError::Malformed {
                path: self.path("etc/os-release"),
                reason: format!("no package manager known for os-release ID {id:?}; cannot install Kubernetes {v}"),
            }),
        };
        *self.dnf_reboot.lock().unwrap_or_else(|e| e.into_inner()) = None;
        r
    }

    fn upgrade_kubernetes_hook(&self, version: &KubernetesVersion, first_control_plane: bool) -> Result<(), OsError> {
        let k = self.kubernetes_settings()?;
        let v = version.to_string();
        let hook = if first_control_plane { &k.upgrade_first_control_plane } else { &k.upgrade_other };
        let argv = command::substitute(hook, &[("version", &v)]);
        let root = self.root.display().to_string();
        tracing::info!(argv = ?argv, first_control_plane, "running the Kubernetes upgrade hook");
        command::run(&argv, &[("UPKEEP_ROOT", &root), ("UPKEEP_KUBERNETES_VERSION", &v)], Some(KUBERNETES_HOOK_TIMEOUT))
            .map(drop)
    }

    fn facts_sources(&self) -> Vec<PathBuf> {
        let mut rel: Vec<&str> = vec![
            "etc/os-release",
            "usr/lib/os-release",
            NODE_IMAGE_FILE,
            SECURITY_PATCH_FILE,
            KUBERNETES_VERSION_FILE,
            RUN_REBOOT_REQUIRED_FILE,
            // Packages installed or removed: dnf's reboot answer and the installed Kubernetes version.
            "var/lib/dpkg/status",
        ];
        rel.extend(RPM_DBS);
        // Followed only when it is a directory of the root's own: an absolute `/var/run -> /run` link under a
        // root prefix leads to the host's flag, which `facts` does not read either.
        if !self.path("var/run").is_symlink() {
            rel.push(REBOOT_REQUIRED_FILE);
        }
        let mut out: Vec<PathBuf> = rel.into_iter().map(|r| self.path(r)).collect();
        // A version command's answer changes when its program is replaced (or through the package databases
        // above); its program file is watched too.
        if let Some(program) = self.kubernetes.as_ref().and_then(|k| k.version_command.first()) {
            out.extend(command::program_path(program));
        }
        out
    }

    fn forget_cached_facts(&self) {
        *self.dnf_reboot.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn publish_node_labels(&self, image: &str, patch: &str) -> Result<(), OsError> {
        match self.cordon.kube() {
            Some(k) => k.publish_labels(image, patch),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_facts_under_a_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc/upkeep")).expect("mkdir");
        std::fs::create_dir_all(root.join("var/run")).expect("mkdir");
        std::fs::write(root.join("etc/os-release"), "ID=debian\nVERSION_ID=\"12\"\n").expect("write");
        std::fs::write(root.join(NODE_IMAGE_FILE), "FAMILY=Debian-12\nVERSION=202311.07.0\n").expect("write");
        let os = HostOs::new(root);
        let f = os.facts().expect("facts");
        assert_eq!(f.os_family, "debian");
        assert_eq!(f.os_version, "12");
        assert_eq!(f.node_image.expect("image").label(), "Debian-12-202311.07.0");
        assert!(!f.reboot_required);
        std::fs::write(root.join(REBOOT_REQUIRED_FILE), "").expect("write");
        assert!(os.facts().expect("facts").reboot_required);
        // /var/run -> /run (absolute) as on a real Debian root: the flag is read inside the root, never the host's.
        std::fs::remove_dir_all(root.join("var/run")).expect("rm");
        std::os::unix::fs::symlink("/run", root.join("var/run")).expect("symlink");
        std::fs::create_dir_all(root.join("run")).expect("mkdir");
        assert!(!os.facts().expect("facts").reboot_required);
        std::fs::write(root.join(RUN_REBOOT_REQUIRED_FILE), "").expect("write");
        assert!(os.facts().expect("facts").reboot_required);
        std::fs::write(root.join(NODE_IMAGE_FILE), "FAMILY=Debian-12\n").expect("write");
        let err = os.facts().expect_err("malformed");
        assert!(err.to_string().contains("node-image: missing VERSION="), "{err}");
    }

    #[test]
    fn kubernetes_version_from_command_output() {
        let v = |s: &str| kubernetes_version_in(s).map(|v| v.to_string());
        assert_eq!(v("Kubernetes v1.29.3\n").as_deref(), Some("1.29.3"));
        assert_eq!(v("v1.30.0+k3s1").as_deref(), Some("1.30.0"));
        assert_eq!(v("GitVersion:\"v1.28.9\",").as_deref(), None, "one token, not a version");
        assert_eq!(v("kubelet 1.28.9-rc.1").as_deref(), Some("1.28.9"));
        assert_eq!(v("no version here"), None);
    }

    #[test]
    fn kubernetes_needs_the_section_and_version_command_is_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let os = HostOs::new(dir.path());
        let e = os.kubernetes_version().expect_err("no section");
        assert!(e.to_string().contains("no [kubernetes] section"), "{e}");
        std::fs::create_dir_all(dir.path().join("etc/upkeep")).expect("mkdir");
        std::fs::write(dir.path().join(KUBERNETES_VERSION_FILE), "1.28.0\n").expect("write");
        assert_eq!(os.facts().expect("facts").kubernetes_version, "1.28.0", "the marker without the section");
        let mut k = KubernetesSettings::defaults();
        k.version_command = vec!["sh".into(), "-c".into(), "echo Kubernetes v1.29.3".into()];
        let os = HostOs::new(dir.path()).with_kubernetes(k.clone(), dir.path());
        assert_eq!(os.kubernetes_version().expect("version").map(|v| v.to_string()).as_deref(), Some("1.29.3"));
        assert_eq!(os.facts().expect("facts").kubernetes_version, "1.29.3");
        k.version_command = vec!["sh".into(), "-c".into(), "echo garbage".into()];
        let os = HostOs::new(dir.path()).with_kubernetes(k, dir.path());
        let e = os.kubernetes_version().expect_err("garbage").to_string();
        assert!(e.contains("printed no Kubernetes version") && e.contains("garbage"), "{e}");
        assert_eq!(os.facts().expect("facts still read").kubernetes_version, "");
        // Without an API server labels are a no-op.
        os.publish_node_labels("x", "y").expect("no-op");
    }

    #[test]
    fn kubernetes_hook_gets_the_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("argv");
        let mut k = KubernetesSettings::defaults();
        let script = format!("echo \"$0 $1 $UPKEEP_KUBERNETES_VERSION\" > {}", out.display());
        k.upgrade_first_control_plane =
            vec!["sh".into(), "-c".into(), script.clone(), "apply".into(), "{version}".into()];
        k.upgrade_other = vec!["sh".into(), "-c".into(), script, "node".into(), "-".into()];
        let os = HostOs::new(dir.path()).with_kubernetes(k, dir.path());
        let v: KubernetesVersion = "1.29.3".parse().expect("version");
        os.upgrade_kubernetes_hook(&v, true).expect("hook");
        assert_eq!(std::fs::read_to_string(&out).expect("read").trim(), "apply 1.29.3 1.29.3");
        os.upgrade_kubernetes_hook(&v, false).expect("hook");
        assert_eq!(std::fs::read_to_string(&out).expect("read").trim(), "node - 1.29.3");
    }

    #[test]
    fn a_root_without_os_release_is_unknown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = HostOs::new(dir.path()).facts().expect("facts");
        assert_eq!(f.os_family, "unknown");
        assert_eq!(f.node_image, None);
    }
}
