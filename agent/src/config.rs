//! `agent.toml`: where the hub is, the node's certificate, which member/pool/region it belongs to, where its
//! state lives, and an optional `root` prefix so that one machine can host many simulated nodes.
//! Unknown keys are refused; every error is one line naming the file and the key.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use upkeep_core::ids::{Role, validate_name};
use upkeep_proto::tls::{ClientFiles, HubAddress, principal_from_pem_file};

/// Validated agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The file this came from (for messages).
    pub source: PathBuf,
    /// The hub's replicas, in the order they are tried (https only; at least one). The session fails over to
    /// the next when one cannot be reached.
    pub hubs: Vec<HubAddress>,
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
    /// Kubernetes: the API server for cordon/drain/labels and the packages and hooks of the Kubernetes version
    /// operation (`[kubernetes]`); None without the section.
    pub kubernetes: Option<KubernetesSettings>,
    /// Privilege separation (`[executor]`): with it, the agent's network half does every node operation
    /// through the privileged executor on this socket; without it, one process does both (simulated nodes,
    /// tests, the demo).
    pub executor: Option<ExecutorSettings>,
}

/// `[executor]`: where the privileged half listens and whom it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutorSettings {
    /// The executor's Unix socket.
    pub socket: PathBuf,
    /// The only user whose processes the executor serves (checked with SO_PEERCRED).
    pub client_user: String,
}

/// Default `[executor] client_user`: the system user the packaged network half runs as.
pub const DEFAULT_EXECUTOR_USER: &str = "upkeep-agent";

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
    /// An extra CA (PEM) trusted, besides the system roots, for images a reimage names by https URL.
    pub url_ca: Option<PathBuf>,
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

/// `[kubernetes]` settings, validated. The section serves two things that may be used apart: with `api_server`
/// the node is cordoned, drained and labelled through the Kubernetes API (instead of `[cordon]`); the package
/// and hook keys drive the Kubernetes version operation (a node may have them without an API server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesSettings {
    /// The API server and how to reach it; None: no API access (package-only node).
    pub api: Option<KubeApiSettings>,
    /// Packages installed at the ordered version, in this order; the first one's installed version is the node's
    /// Kubernetes version unless `version_command` is set.
    pub packages: Vec<String>,
    /// Runs after the packages on the member's first control-plane node; `{version}` is replaced.
    pub upgrade_first_control_plane: Vec<String>,
    /// Runs after the packages on every other node; `{version}` is replaced.
    pub upgrade_other: Vec<String>,
    /// Prints the running Kubernetes version on stdout (e.g. `kubelet --version`); empty: read the installed
    /// version of the first package through the package manager.
    pub version_command: Vec<String>,
}

/// Default `[kubernetes] packages`.
pub const DEFAULT_KUBERNETES_PACKAGES: [&str; 2] = ["kubeadm", "kubelet"];
/// Default `[kubernetes] drain_timeout_seconds`: used when the hub's drain command carries no timeout.
pub const DEFAULT_DRAIN_TIMEOUT_SECONDS: u64 = 900;
/// Default `[kubernetes] eviction_retry_seconds`: pause between eviction attempts a disruption budget refused.
pub const DEFAULT_EVICTION_RETRY_SECONDS: u64 = 5;

/// How the agent reaches its node's Kubernetes API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeApiSettings {
    /// The URL as configured (`https://HOST[:PORT]`), named in every error.
    pub api_server: String,
    /// Host name (or IP address) the server's certificate must carry.
    pub host: String,
    /// TCP port (443 when the URL names none).
    pub port: u16,
    /// PEM file of the CA(s) that sign the API server's certificate.
    pub ca_file: PathBuf,
    /// How the agent authenticates.
    pub credentials: KubeCredentials,
    /// The Node object of this machine (defaults to the agent's node name).
    pub node_name: String,
    /// Drain timeout when the hub's drain command carries none.
    pub drain_timeout: std::time::Duration,
    /// Pause between eviction attempts that a PodDisruptionBudget refused (HTTP 429).
    pub eviction_retry: std::time::Duration,
}

/// Credentials for the Kubernetes API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeCredentials {
    /// A bearer token file, read again for every request (projected tokens rotate).
    Token(PathBuf),
    /// A client certificate and key (PEM), read again for every request (kubelet-style rotation).
    ClientCert {
        /// Certificate chain.
        cert: PathBuf,
        /// Private key.
        key: PathBuf,
    },
}

impl KubernetesSettings {
    /// The section's defaults: no API server, the default packages and hooks.
    pub fn defaults() -> KubernetesSettings {
        KubernetesSettings {
            api: None,
            packages: DEFAULT_KUBERNETES_PACKAGES.map(String::from).to_vec(),
            upgrade_first_control_plane: ["kubeadm", "upgrade", "apply", "-y", "{version}"].map(String::from).to_vec(),
            upgrade_other: ["kubeadm", "upgrade", "node"].map(String::from).to_vec(),
            version_command: Vec::new(),
        }
    }
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
            url_ca: None,
        }
    }
}

/// `hub = "https://a:7443"` or `hub = ["https://a:7443", "https://b:7443"]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawHubs {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    hub: Option<RawHubs>,
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
    kubernetes: Option<RawKubernetes>,
    executor: Option<RawExecutor>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExecutor {
    socket: Option<PathBuf>,
    client_user: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKubernetes {
    api_server: Option<String>,
    ca_file: Option<PathBuf>,
    token_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    node_name: Option<String>,
    drain_timeout_seconds: Option<u64>,
    eviction_retry_seconds: Option<u64>,
    packages: Option<Vec<String>>,
    upgrade_first_control_plane: Option<Vec<String>>,
    upgrade_other: Option<Vec<String>>,
    version_command: Option<Vec<String>>,
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
    url_ca: Option<PathBuf>,
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

    let hubs = match raw.hub {
        None => return Err(err("hub", "missing: set the hub address, e.g. https://hub.example:7443".into())),
        Some(RawHubs::One(h)) => vec![h],
        Some(RawHubs::Many(hs)) => hs,
    };
    let hubs = upkeep_proto::tls::hub_endpoints(&hubs).map_err(|reason| err("hub", reason))?;
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
    let kubernetes = match raw.kubernetes {
        None => None,
        Some(k) => Some(parse_kubernetes(k, &principal.name, &resolve).map_err(|(key, reason)| err(&key, reason))?),
    };
    check_one_cordon_backend(&cordon, kubernetes.as_ref()).map_err(|(key, reason)| err(&key, reason))?;
    let executor = parse_executor(raw.executor, &resolve).map_err(|(key, reason)| err(&key, reason))?;
    Ok(AgentConfig {
        image,
        cordon,
        kubernetes,
        executor,
        source: path.to_path_buf(),
        hubs,
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

fn parse_executor(
    raw: Option<RawExecutor>,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<Option<ExecutorSettings>, (String, String)> {
    let Some(x) = raw else { return Ok(None) };
    let socket = x.socket.map(resolve).ok_or_else(|| {
        (
            "executor.socket".to_string(),
            "missing: give the executor's Unix socket, e.g. \"/run/upkeep-agent/executor.sock\", or remove the \
             [executor] section to run as one process"
                .to_string(),
        )
    })?;
    let client_user = x.client_user.unwrap_or_else(|| DEFAULT_EXECUTOR_USER.into());
    if client_user.trim().is_empty() {
        return Err(("executor.client_user".into(), "empty: name the user the network half runs as".into()));
    }
    Ok(Some(ExecutorSettings { socket, client_user }))
}

fn check_argv(v: &[String]) -> Result<(), String> {
    match v.first() {
        Some(p) if !p.trim().is_empty() => Ok(()),
        _ => Err("empty command: give an argv list, e.g. [\"/usr/bin/true\"]".into()),
    }
}

/// Cordon and drain go one way: through the Kubernetes API or through `[cordon]` hooks, never both.
fn check_one_cordon_backend(
    cordon: &CordonSettings,
    kubernetes: Option<&KubernetesSettings>,
) -> Result<(), (String, String)> {
    if kubernetes.is_some_and(|k| k.api.is_some()) && *cordon != CordonSettings::default() {
        return Err((
            "kubernetes.api_server".into(),
            "set together with [cordon] hooks: cordon and drain go through the Kubernetes API when api_server is \
             set; remove the [cordon] section or kubernetes.api_server"
                .into(),
        ));
    }
    Ok(())
}

/// A Kubernetes object name (RFC 1123 subdomain): lower-case letters, digits, '-' and '.', at most 253.
fn check_kube_name(v: &str) -> Result<(), String> {
    let ok = !v.is_empty()
        && v.len() <= 253
        && v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && v.starts_with(|c: char| c.is_ascii_alphanumeric())
        && v.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{v:?} is not a Kubernetes node name (lower-case letters, digits, '-' and '.', at most 253); \
             set the Node's name as `kubectl get nodes` shows it"
        ))
    }
}

/// A Debian or RPM package name: starts with a letter or digit, then letters, digits, `+ - . _`.
fn check_package_name(v: &str) -> Result<(), String> {
    let ok = v.starts_with(|c: char| c.is_ascii_alphanumeric())
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-._".contains(&b));
    if ok { Ok(()) } else { Err(format!("{v:?} is not a package name, e.g. \"kubeadm\"")) }
}

fn parse_kubernetes(
    raw: RawKubernetes,
    agent_node_name: &str,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<KubernetesSettings, (String, String)> {
    let e = |k: &str, r: String| (format!("kubernetes.{k}"), r);
    let mut s = KubernetesSettings::defaults();
    if let Some(p) = raw.packages {
        if p.is_empty() {
            return Err(e("packages", "empty: name at least one package, e.g. [\"kubeadm\", \"kubelet\"]".into()));
        }
        for (i, name) in p.iter().enumerate() {
            check_package_name(name).map_err(|r| e(&format!("packages[{i}]"), r))?;
        }
        s.packages = p;
    }
    for (key, v, slot) in [
        ("upgrade_first_control_plane", raw.upgrade_first_control_plane, &mut s.upgrade_first_control_plane),
        ("upgrade_other", raw.upgrade_other, &mut s.upgrade_other),
        ("version_command", raw.version_command, &mut s.version_command),
    ] {
        if let Some(v) = v {
            check_argv(&v).map_err(|r| e(key, r))?;
            *slot = v;
        }
    }
    let Some(api_server) = raw.api_server else {
        // Keys that only mean something with an API server are refused rather than silently ignored.
        for (key, set) in [
            ("ca_file", raw.ca_file.is_some()),
            ("token_file", raw.token_file.is_some()),
            ("client_cert", raw.client_cert.is_some()),
            ("client_key", raw.client_key.is_some()),
            ("node_name", raw.node_name.is_some()),
            ("drain_timeout_seconds", raw.drain_timeout_seconds.is_some()),
            ("eviction_retry_seconds", raw.eviction_retry_seconds.is_some()),
        ] {
            if set {
                return Err(e(key, "only used with kubernetes.api_server: set api_server or remove this key".into()));
            }
        }
        return Ok(s);
    };
    let (host, port) = parse_api_server(&api_server).map_err(|r| e("api_server", r))?;
    let existing = |key: &str, v: Option<PathBuf>| -> Result<Option<PathBuf>, (String, String)> {
        match v.map(resolve) {
            None => Ok(None),
            Some(p) => match std::fs::metadata(&p) {
                Ok(_) => Ok(Some(p)),
                Err(err) => Err(e(key, format!("{}: {err}", p.display()))),
            },
        }
    };
    let ca_file = existing("ca_file", raw.ca_file)?.ok_or_else(|| {
        e("ca_file", "missing: give the PEM file of the CA that signs the API server's certificate".into())
    })?;
    let token = existing("token_file", raw.token_file)?;
    let cert = existing("client_cert", raw.client_cert)?;
    let key = existing("client_key", raw.client_key)?;
    let credentials = match (token, cert, key) {
        (Some(t), None, None) => KubeCredentials::Token(t),
        (None, Some(cert), Some(key)) => KubeCredentials::ClientCert { cert, key },
        (Some(_), _, _) => {
            return Err(e(
                "token_file",
                "set together with client_cert/client_key: choose one way to authenticate".into(),
            ));
        }
        (None, Some(_), None) => return Err(e("client_key", "missing: client_cert needs its private key".into())),
        (None, None, Some(_)) => return Err(e("client_cert", "missing: client_key needs its certificate".into())),
        (None, None, None) => {
            return Err(e(
                "token_file",
                "missing: give token_file (a bearer token) or client_cert and client_key to authenticate".into(),
            ));
        }
    };
    let node_name = raw.node_name.unwrap_or_else(|| agent_node_name.to_string());
    check_kube_name(&node_name).map_err(|r| e("node_name", r))?;
    let drain = raw.drain_timeout_seconds.unwrap_or(DEFAULT_DRAIN_TIMEOUT_SECONDS);
    if drain == 0 {
        return Err(e("drain_timeout_seconds", "must be at least 1".into()));
    }
    let retry = raw.eviction_retry_seconds.unwrap_or(DEFAULT_EVICTION_RETRY_SECONDS);
    if retry == 0 || retry > drain {
        return Err(e(
            "eviction_retry_seconds",
            format!("{retry} is out of range 1..={drain} (drain_timeout_seconds)"),
        ));
    }
    s.api = Some(KubeApiSettings {
        api_server,
        host,
        port,
        ca_file,
        credentials,
        node_name,
        drain_timeout: std::time::Duration::from_secs(drain),
        eviction_retry: std::time::Duration::from_secs(retry),
    });
    Ok(s)
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
    if let Some(p) = raw.url_ca {
        let p = resolve(p);
        let fix = "give the path of a PEM file with the CA certificate that signs the image server's certificate";
        let text = std::fs::read_to_string(&p).map_err(|err| e("url_ca", format!("{}: {err}; {fix}", p.display())))?;
        if !text.contains("-----BEGIN CERTIFICATE-----") {
            return Err(e("url_ca", format!("{}: no PEM certificate in it; {fix}", p.display())));
        }
        s.url_ca = Some(p);
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

/// Splits `https://HOST[:PORT][/]` into host and port (443 by default). Plain http is refused: the agent sends
/// credentials. IPv6 literals are written in brackets.
pub fn parse_api_server(url: &str) -> Result<(String, u16), String> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("{url:?}: only https:// is supported, e.g. https://10.0.0.1:6443"))?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    let bad = || format!("malformed address {url:?}: expected https://HOST[:PORT], e.g. https://10.0.0.1:6443");
    if authority.contains(['/', '?', '#', '@']) {
        return Err(bad());
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, p) = v6.split_once(']').ok_or_else(bad)?;
        (h, p.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(bad());
    }
    let port = match port {
        None => 443,
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?,
    };
    Ok((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_executor_section_names_its_socket_and_defaults_its_user() {
        let resolve = |p: PathBuf| if p.is_relative() { Path::new("/etc/upkeep").join(p) } else { p };
        let x = |text: &str| parse_executor(Some(toml::from_str(text).expect("toml")), &resolve);
        assert_eq!(parse_executor(None, &resolve).expect("none"), None);
        let s = x("socket = \"run/x.sock\"").expect("ok").expect("some");
        assert_eq!((s.socket.as_path(), s.client_user.as_str()), (Path::new("/etc/upkeep/run/x.sock"), "upkeep-agent"));
        let (k, r) = x("client_user = \"svc\"").expect_err("no socket");
        assert_eq!(k, "executor.socket");
        assert!(r.contains("remove the [executor] section"), "{r}");
        assert_eq!(x("socket = \"/s\"\nclient_user = \" \"").expect_err("empty user").0, "executor.client_user");
        assert!(toml::from_str::<RawExecutor>("sock = \"/s\"").is_err(), "unknown keys are refused");
    }

    #[test]
    fn hub_addresses() {
        assert_eq!(upkeep_proto::tls::hub_endpoint("127.0.0.1:7443").expect("ok").1, "127.0.0.1");
        assert!(upkeep_proto::tls::hub_endpoint("http://x:1").expect_err("plain").contains("only https://"));
        assert!(upkeep_proto::tls::hub_endpoint("https://x:notaport").expect_err("bad").contains("malformed address"));
        assert!(upkeep_proto::tls::hub_endpoint("https://:7443").is_err());
        // Several replicas: each checked, named by position; no repeats; not none.
        let two = upkeep_proto::tls::hub_endpoints(&["a:7443", "https://b:7443"]).expect("two");
        assert_eq!(
            two.iter().map(|h| (h.url.as_str(), h.host.as_str())).collect::<Vec<_>>(),
            [("https://a:7443", "a"), ("https://b:7443", "b")]
        );
        let e = upkeep_proto::tls::hub_endpoints(&["a:7443", "http://b:1"]).expect_err("plain");
        assert!(e.starts_with("[1]: ") && e.contains("only https://"), "{e}");
        let e = upkeep_proto::tls::hub_endpoints(&["a:7443", "https://a:7443"]).expect_err("twice");
        assert!(e.contains("listed twice"), "{e}");
        assert!(upkeep_proto::tls::hub_endpoints::<&str>(&[]).is_err());
    }

    #[test]
    fn hub_is_one_address_or_a_list_of_replicas() {
        let parse_hub = |hub: &str| -> Result<Vec<String>, String> {
            let raw: Raw = toml::from_str(&format!("hub = {hub}")).map_err(|e| e.to_string())?;
            let hubs = match raw.hub.expect("hub") {
                RawHubs::One(h) => vec![h],
                RawHubs::Many(hs) => hs,
            };
            upkeep_proto::tls::hub_endpoints(&hubs).map(|v| v.into_iter().map(|h| h.url).collect())
        };
        assert_eq!(parse_hub("\"h:1\"").expect("one"), ["https://h:1"]);
        assert_eq!(parse_hub("[\"h:1\", \"g:2\"]").expect("list"), ["https://h:1", "https://g:2"]);
        assert!(parse_hub("[]").expect_err("empty").contains("at least one"));
        assert!(parse_hub("7").is_err(), "a number is not an address");
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

    #[test]
    fn image_url_ca_must_be_a_pem_certificate_file() {
        let d = tempfile::tempdir().expect("tempdir");
        let base = d.path().to_path_buf();
        let resolve = move |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
        let image = |text: &str| parse_image(Some(toml::from_str(text).expect("toml")), Path::new("/r"), &resolve);
        let (k, r) = image("url_ca = \"ca.pem\"").expect_err("missing file");
        assert_eq!(k, "image.url_ca");
        assert!(r.contains("ca.pem") && r.contains("give the path of a PEM file"), "{r}");
        std::fs::write(d.path().join("ca.pem"), "not a certificate").expect("write");
        let (k, r) = image("url_ca = \"ca.pem\"").expect_err("not PEM");
        assert_eq!(k, "image.url_ca");
        assert!(r.contains("no PEM certificate"), "{r}");
        std::fs::write(d.path().join("ca.pem"), "-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n")
            .expect("write");
        assert_eq!(image("url_ca = \"ca.pem\"").expect("ok").url_ca, Some(d.path().join("ca.pem")));
    }

    fn kube(text: &str, dir: &Path) -> Result<KubernetesSettings, (String, String)> {
        let raw: RawKubernetes = toml::from_str(text).expect("toml");
        let base = dir.to_path_buf();
        parse_kubernetes(raw, "node-1", &move |p: PathBuf| if p.is_relative() { base.join(p) } else { p })
    }

    #[test]
    fn kubernetes_section_defaults_and_package_only_nodes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = kube("", dir.path()).expect("empty section");
        assert_eq!(k, KubernetesSettings::defaults());
        assert_eq!(k.packages, ["kubeadm", "kubelet"]);
        assert_eq!(k.upgrade_first_control_plane, ["kubeadm", "upgrade", "apply", "-y", "{version}"]);
        assert_eq!(k.upgrade_other, ["kubeadm", "upgrade", "node"]);
        assert!(k.api.is_none() && k.version_command.is_empty());
        let k =
            kube("packages = [\"kubeadm\"]\nversion_command = [\"kubelet\", \"--version\"]", dir.path()).expect("ok");
        assert_eq!((k.packages.len(), k.version_command[0].as_str()), (1, "kubelet"));
        let (key, r) = kube("packages = [\"kube adm\"]", dir.path()).expect_err("bad name");
        assert_eq!(key, "kubernetes.packages[0]");
        assert!(r.contains("not a package name"), "{r}");
        assert_eq!(kube("packages = []", dir.path()).expect_err("empty").0, "kubernetes.packages");
        assert_eq!(kube("upgrade_other = []", dir.path()).expect_err("empty argv").0, "kubernetes.upgrade_other");
        let (key, r) = kube("token_file = \"t\"", dir.path()).expect_err("api key without api_server");
        assert_eq!(key, "kubernetes.token_file");
        assert!(r.contains("only used with kubernetes.api_server"), "{r}");
        assert!(toml::from_str::<RawKubernetes>("apiserver = \"x\"").is_err(), "unknown keys are refused");
    }

    #[test]
    fn kubernetes_api_settings_are_checked_key_by_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        for f in ["ca.pem", "token", "cert.pem", "key.pem"] {
            std::fs::write(dir.path().join(f), "x").expect("write");
        }
        let base = "api_server = \"https://10.0.0.1:6443\"\nca_file = \"ca.pem\"\n";
        let k = kube(&format!("{base}token_file = \"token\""), dir.path()).expect("token");
        let api = k.api.expect("api");
        assert_eq!((api.host.as_str(), api.port, api.node_name.as_str()), ("10.0.0.1", 6443, "node-1"));
        assert_eq!(api.credentials, KubeCredentials::Token(dir.path().join("token")));
        assert_eq!(api.drain_timeout, std::time::Duration::from_secs(900));
        assert_eq!(api.eviction_retry, std::time::Duration::from_secs(5));
        let k = kube(
            &format!("{base}client_cert = \"cert.pem\"\nclient_key = \"key.pem\"\nnode_name = \"worker-7\""),
            dir.path(),
        )
        .expect("client cert");
        let api = k.api.expect("api");
        assert!(matches!(api.credentials, KubeCredentials::ClientCert { .. }));
        assert_eq!(api.node_name, "worker-7");
        let hooks = CordonSettings { cordon: vec!["/usr/bin/true".into()], ..Default::default() };
        let with_api = kube(&format!("{base}token_file = \"token\""), dir.path()).expect("ok");
        let (key, r) = check_one_cordon_backend(&hooks, Some(&with_api)).expect_err("both");
        assert_eq!(key, "kubernetes.api_server");
        assert!(r.contains("remove the [cordon] section"), "{r}");
        assert!(check_one_cordon_backend(&hooks, Some(&KubernetesSettings::defaults())).is_ok(), "package-only node");
        assert!(check_one_cordon_backend(&CordonSettings::default(), Some(&with_api)).is_ok());
        for (text, key, says) in [
            (
                "api_server = \"http://10.0.0.1\"\nca_file = \"ca.pem\"\ntoken_file = \"token\"",
                "api_server",
                "https://",
            ),
            ("api_server = \"https://10.0.0.1\"\ntoken_file = \"token\"", "ca_file", "missing"),
            (
                "api_server = \"https://10.0.0.1\"\nca_file = \"nope.pem\"\ntoken_file = \"token\"",
                "ca_file",
                "nope.pem",
            ),
            (base, "token_file", "client_cert and client_key"),
            (&format!("{base}client_cert = \"cert.pem\""), "client_key", "missing"),
            (&format!("{base}token_file = \"token\"\nclient_cert = \"cert.pem\""), "token_file", "choose one"),
            (&format!("{base}token_file = \"token\"\nnode_name = \"Node_1\""), "node_name", "Kubernetes node name"),
            (
                &format!("{base}token_file = \"token\"\ndrain_timeout_seconds = 0"),
                "drain_timeout_seconds",
                "at least 1",
            ),
            (
                &format!("{base}token_file = \"token\"\ndrain_timeout_seconds = 10\neviction_retry_seconds = 11"),
                "eviction_retry_seconds",
                "1..=10",
            ),
        ] {
            let (k, r) = kube(text, dir.path()).expect_err(text);
            assert_eq!(k, format!("kubernetes.{key}"), "{text}");
            assert!(r.contains(says), "{text}: {r}");
        }
    }
}
