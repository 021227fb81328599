//! `agent.toml`: where the hub is, the node's certificate, which member/pool/region it belongs to, where its
//! state lives, and an optional `root` prefix so that one machine can host many simulated nodes.
//! Unknown keys are refused; every error is one line naming the file and the key.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use upkeep_core::ids::{Role, validate_name};
use upkeep_proto::tls::{ClientFiles, principal_from_pem_file};

/// Validated agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The file this came from (for messages).
    pub source: PathBuf,
    /// Hub URL (https only).
    pub hub: String,
    /// Host name the hub's certificate must carry.
    pub hub_host: String,
    /// Node name, from the certificate.
    pub node_name: String,
    /// Member.
    pub member: String,
    /// Node pool.
    pub node_pool: String,
    /// Region.
    pub region: String,
    /// Hardware class of the pool, e.g. gpu.
    pub hardware_class: String,
    /// Whether this node runs the member's control plane.
    pub control_plane: bool,
    /// Where the agent keeps its journal and state.
    pub state_dir: PathBuf,
    /// Root of the tree the agent manages (`/` on a real node).
    pub root: PathBuf,
    /// TLS files.
    pub tls: ClientFiles,
    /// Node images: slot backend, trusted keys, health checks (`[image]`).
    pub image: ImageSettings,
    /// Cordon / uncordon / drain hooks (`[cordon]`).
    pub cordon: CordonSettings,
}

/// Which boot-control and slot backend the agent drives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotBackend {
    /// Two directory trees under `<root>/var/lib/upkeep/slots/{a,b}`; an image is a tar of a root tree and a
    /// "reboot" is simulated in-process (containers, simulated nodes, the demo).
    Dir,
    /// The GRUB environment block through `grub-editenv`; slots are block devices or image files.
    Grub {
        /// The environment block file, e.g. /boot/grub/grubenv.
        env_file: PathBuf,
        /// Slot A's device or file.
        slot_a: PathBuf,
        /// Slot B's device or file.
        slot_b: PathBuf,
        /// Where the booted slot is read from (`upkeep.slot=a|b` on the kernel command line).
        cmdline: PathBuf,
    },
    /// Configured commands for other bootloaders or image tools.
    Hook(HookCommands),
}

/// Commands of the hook backend. Placeholders: `{slot}` (a or b), `{image}` (path of the verified image).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HookCommands {
    /// Writes `{image}` to `{slot}`.
    pub write: Vec<String>,
    /// Marks `{slot}` to be booted once.
    pub mark_boot_once: Vec<String>,
    /// Makes `{slot}` the default.
    pub commit: Vec<String>,
    /// Makes `{slot}` (the previous one) the default again, dropping any boot-once mark.
    pub fall_back: Vec<String>,
    /// Prints the booted slot (a or b) on stdout.
    pub booted_slot: Vec<String>,
}

/// `[image]` settings, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSettings {
    /// The backend.
    pub backend: SlotBackend,
    /// Directory of trusted minisign public keys (`*.pub`).
    pub trusted_keys: PathBuf,
    /// Commands that must all exit 0 after a boot before the new slot is committed. They run with
    /// `UPKEEP_BOOTED_ROOT` set to the root of the booted image.
    pub health_commands: Vec<Vec<String>>,
    /// How long after a boot the hub must be reachable again (session re-established).
    pub health_timeout: std::time::Duration,
    /// Boot attempts of a new slot before the bootloader returns to the committed one.
    pub boot_tries: u32,
    /// The command that reboots the machine (grub and hook backends).
    pub reboot_command: Vec<String>,
}

/// `[cordon]` settings: hook commands; without them the agent keeps a marker file under the root
/// (`var/lib/upkeep/cordoned`) and drain has nothing to evict.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CordonSettings {
    /// Marks the node unschedulable.
    pub cordon: Vec<String>,
    /// Makes it schedulable again.
    pub uncordon: Vec<String>,
    /// Evicts workloads; `{timeout}` is replaced by the timeout in seconds.
    pub drain: Vec<String>,
}

impl ImageSettings {
    /// Defaults for a node rooted at `root`: the directory backend, keys in `<root>/etc/upkeep/trusted-keys`.
    pub fn defaults(root: &Path) -> ImageSettings {
        ImageSettings {
            backend: SlotBackend::Dir,
            trusted_keys: root.join("etc/upkeep/trusted-keys"),
            health_commands: Vec::new(),
            health_timeout: std::time::Duration::from_secs(300),
            boot_tries: 3,
            reboot_command: vec!["systemctl".into(), "reboot".into()],
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    hub: Option<String>,
    member: Option<String>,
    node_pool: Option<String>,
    region: Option<String>,
    hardware_class: Option<String>,
    control_plane: Option<bool>,
    state_dir: Option<PathBuf>,
    root: Option<PathBuf>,
    tls: Option<RawTls>,
    image: Option<RawImage>,
    cordon: Option<RawCordon>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImage {
    backend: Option<String>,
    trusted_keys: Option<PathBuf>,
    health_commands: Option<Vec<Vec<String>>>,
    health_timeout_seconds: Option<u64>,
    boot_tries: Option<u32>,
    reboot_command: Option<Vec<String>>,
    grub_env: Option<PathBuf>,
    grub_cmdline: Option<PathBuf>,
    slot_a: Option<PathBuf>,
    slot_b: Option<PathBuf>,
    hook_write: Option<Vec<String>>,
    hook_mark_boot_once: Option<Vec<String>>,
    hook_commit: Option<Vec<String>>,
    hook_fall_back: Option<Vec<String>>,
    hook_booted_slot: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCordon {
    cordon: Option<Vec<String>>,
    uncordon: Option<Vec<String>>,
    drain: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

/// A configuration error: one line naming the file and key (shared by both daemons).
pub use upkeep_proto::layered::ConfigError;

/// Default configuration path.
pub const DEFAULT_PATH: &str = "/etc/upkeep/agent.toml";

/// Reads `/usr/lib/upkeep/agent.d/*.toml`, then `<dir of path>/agent.d/*.toml`, then `path` (later keys win),
/// and validates the result, including the certificate's identity. Every error names the file the offending key
/// came from. Relative paths are resolved against the directory of `path`.
pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
    let layered = upkeep_proto::layered::load_checked::<Raw>(path, "agent")?;
    parse(path, &layered.merged).map_err(|mut e| {
        if let Some(f) = layered.file_of(&e.key) {
            e.file = f.display().to_string();
        }
        e
    })
}

/// Validates the text of `path` (see `load`).
pub fn parse(path: &Path, text: &str) -> Result<AgentConfig, ConfigError> {
    let err = |key: &str, reason: String| ConfigError { file: path.display().to_string(), key: key.into(), reason };
    let raw: Raw = toml::from_str(text).map_err(|e| {
        let key = e.span().and_then(|s| text.get(s)).unwrap_or("(syntax)").trim().to_string();
        err(&key, e.message().to_string())
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let resolve = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };

    let hub =
        raw.hub.ok_or_else(|| err("hub", "missing: set the hub address, e.g. https://hub.example:7443".into()))?;
    let (hub, hub_host) = upkeep_proto::tls::hub_endpoint(&hub).map_err(|reason| err("hub", reason))?;
    let name_field = |key: &str, field: &'static str, v: Option<String>| -> Result<String, ConfigError> {
        let v = v.ok_or_else(|| err(key, format!("missing: set the {field} this node belongs to")))?;
        validate_name(field, &v).map_err(|e| err(key, e.to_string()))?;
        Ok(v)
    };
    let member = name_field("member", "member", raw.member)?;
    let node_pool = name_field("node_pool", "node pool", raw.node_pool)?;
    let region = name_field("region", "region", raw.region)?;
    let hardware_class = raw.hardware_class.unwrap_or_default();
    if !hardware_class.is_empty() {
        validate_name("hardware class", &hardware_class).map_err(|e| err("hardware_class", e.to_string()))?;
    }
    let state_dir = raw
        .state_dir
        .map(resolve)
        .ok_or_else(|| err("state_dir", "missing: set a directory for the agent's journal".into()))?;
    let root = raw.root.map(resolve).unwrap_or_else(|| PathBuf::from("/"));
    if !root.is_dir() {
        return Err(err("root", format!("{} is not a directory", root.display())));
    }
    let tls = raw.tls.ok_or_else(|| err("tls", "missing: set tls.ca, tls.cert and tls.key".into()))?;
    let mut paths = Vec::new();
    for (key, v) in [("tls.ca", tls.ca), ("tls.cert", tls.cert), ("tls.key", tls.key)] {
        let p = v.map(resolve).ok_or_else(|| err(key, "missing: give the path of a PEM file".into()))?;
        std::fs::metadata(&p).map_err(|e| err(key, format!("{}: {e}", p.display())))?;
        paths.push(p);
    }
    let files = ClientFiles {
        ca: paths[0].clone(),
        cert: paths[1].clone(),
        key: paths[2].clone(),
        settings: ["tls.ca".into(), "tls.cert".into(), "tls.key".into()],
    };
    let principal = principal_from_pem_file("tls.cert", &files.cert).map_err(|e| err("tls.cert", e.to_string()))?;
    if principal.role != Role::Node {
        return Err(err(
            "tls.cert",
            format!(
                "certificate is for {} but an agent needs a node certificate; issue one with `upkeepctl pki issue-node`",
                principal.uri()
            ),
        ));
    }
    let image = parse_image(raw.image, &root, &resolve).map_err(|(key, reason)| err(&key, reason))?;
    let cordon = match raw.cordon {
        None => CordonSettings::default(),
        Some(c) => {
            let mut out = CordonSettings::default();
            for (key, v, slot) in [
                ("cordon.cordon", c.cordon, &mut out.cordon),
                ("cordon.uncordon", c.uncordon, &mut out.uncordon),
                ("cordon.drain", c.drain, &mut out.drain),
            ] {
                if let Some(v) = v {
                    check_argv(&v).map_err(|reason| err(key, reason))?;
                    *slot = v;
                }
            }
            out
        }
    };
    Ok(AgentConfig {
        image,
        cordon,
        source: path.to_path_buf(),
        hub,
        hub_host,
        node_name: principal.name,
        member,
        node_pool,
        region,
        hardware_class,
        control_plane: raw.control_plane.unwrap_or(false),
        state_dir,
        root,
        tls: files,
    })
}

fn check_argv(v: &[String]) -> Result<(), String> {
    match v.first() {
        Some(p) if !p.trim().is_empty() => Ok(()),
        _ => Err("empty command: give an argv list, e.g. [\"/usr/bin/true\"]".into()),
    }
}

fn parse_image(
    raw: Option<RawImage>,
    root: &Path,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<ImageSettings, (String, String)> {
    let mut s = ImageSettings::defaults(root);
    let Some(raw) = raw else { return Ok(s) };
    let e = |k: &str, r: String| (format!("image.{k}"), r);
    if let Some(k) = raw.trusted_keys {
        s.trusted_keys = resolve(k);
    }
    if let Some(h) = raw.health_commands {
        for (i, c) in h.iter().enumerate() {
            check_argv(c).map_err(|r| e(&format!("health_commands[{i}]"), r))?;
        }
        s.health_commands = h;
    }
    if let Some(t) = raw.health_timeout_seconds {
        if t == 0 {
            return Err(e("health_timeout_seconds", "must be at least 1".into()));
        }
        s.health_timeout = std::time::Duration::from_secs(t);
    }
    if let Some(n) = raw.boot_tries {
        if !(1..=10).contains(&n) {
            return Err(e("boot_tries", format!("{n} is out of range 1..=10")));
        }
        s.boot_tries = n;
    }
    if let Some(r) = raw.reboot_command {
        check_argv(&r).map_err(|r| e("reboot_command", r))?;
        s.reboot_command = r;
    }
    let backend = raw.backend.unwrap_or_else(|| "dir".into());
    s.backend = match backend.as_str() {
        "dir" => SlotBackend::Dir,
        "grub" => {
            let need = |k: &str, v: Option<PathBuf>| {
                v.map(resolve).ok_or_else(|| e(k, "missing: the grub backend needs it".into()))
            };
            SlotBackend::Grub {
                env_file: need("grub_env", raw.grub_env)?,
                slot_a: need("slot_a", raw.slot_a)?,
                slot_b: need("slot_b", raw.slot_b)?,
                cmdline: raw.grub_cmdline.map(resolve).unwrap_or_else(|| PathBuf::from("/proc/cmdline")),
            }
        }
        "hook" => {
            let need = |k: &str, v: Option<Vec<String>>| -> Result<Vec<String>, (String, String)> {
                let v = v.ok_or_else(|| e(k, "missing: the hook backend needs it".into()))?;
                check_argv(&v).map_err(|r| e(k, r))?;
                Ok(v)
            };
            SlotBackend::Hook(HookCommands {
                write: need("hook_write", raw.hook_write)?,
                mark_boot_once: need("hook_mark_boot_once", raw.hook_mark_boot_once)?,
                commit: need("hook_commit", raw.hook_commit)?,
                fall_back: need("hook_fall_back", raw.hook_fall_back)?,
                booted_slot: need("hook_booted_slot", raw.hook_booted_slot)?,
            })
        }
        other => return Err(e("backend", format!("{other:?} is not one of dir, grub, hook"))),
    };
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_addresses() {
        assert_eq!(upkeep_proto::tls::hub_endpoint("127.0.0.1:7443").expect("ok").1, "127.0.0.1");
        assert!(upkeep_proto::tls::hub_endpoint("http://x:1").expect_err("plain").contains("only https://"));
        assert!(upkeep_proto::tls::hub_endpoint("https://x:notaport").expect_err("bad").contains("malformed address"));
        assert!(upkeep_proto::tls::hub_endpoint("https://:7443").is_err());
    }

    #[test]
    fn image_settings_default_and_refuse_bad_values() {
        let root = Path::new("/r");
        let id = |p: PathBuf| p;
        let d = parse_image(None, root, &id).expect("defaults");
        assert_eq!(d.backend, SlotBackend::Dir);
        assert_eq!(d.trusted_keys, Path::new("/r/etc/upkeep/trusted-keys"));
        let raw: RawImage = toml::from_str("backend = \"grub\"\ngrub_env = \"/boot/grub/grubenv\"\n").expect("toml");
        let (k, r) = parse_image(Some(raw), root, &id).expect_err("slot_a missing");
        assert_eq!(k, "image.slot_a");
        assert!(r.contains("grub backend"), "{r}");
        let raw: RawImage = toml::from_str("backend = \"lilo\"").expect("toml");
        assert_eq!(parse_image(Some(raw), root, &id).expect_err("bad").0, "image.backend");
        let raw: RawImage = toml::from_str("health_commands = [[]]").expect("toml");
        assert_eq!(parse_image(Some(raw), root, &id).expect_err("empty").0, "image.health_commands[0]");
        assert!(toml::from_str::<RawImage>("bogus = 1").is_err(), "unknown keys are refused");
    }
}
