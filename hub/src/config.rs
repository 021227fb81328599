//! `hub.toml`: where the hub listens, its TLS material, its state directory and agent timing.
//! Unknown keys are refused; every error names the file and the key.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7443";
/// Default heartbeat interval handed to agents.
pub const DEFAULT_HEARTBEAT_SECONDS: u32 = 10;

/// The hub's settings, validated.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Address to listen on (mTLS only).
    pub listen: SocketAddr,
    /// Directory for the database and artifacts.
    pub state_dir: PathBuf,
    /// Fleet CA certificate: client certificates must chain to it.
    pub ca: PathBuf,
    /// The hub's server certificate.
    pub cert: PathBuf,
    /// The hub's key.
    pub key: PathBuf,
    /// `tls.issuer_cert` and `tls.issuer_key`: the online issuing CA that signs certificates for joining nodes;
    /// None: `upkeep-agent join` is refused.
    pub issuer: Option<IssuerFiles>,
    /// Heartbeat interval handed to agents.
    pub heartbeat_interval_seconds: u32,
    /// A node silent for this many heartbeat intervals is shown `Unknown`.
    pub silent_after_heartbeats: u32,
    /// `[auto_upgrade]`: channel rollouts and leases.
    pub auto_upgrade: crate::maintenance::AutoUpgradeSettings,
    /// `[limits]`: what one client may hold of the hub.
    pub limits: Limits,
    /// `[images] trusted_keys`: when given, `image publish` refuses an uploaded image whose signature does not
    /// verify against one of these keys (nodes still verify against their own).
    pub trusted_image_keys: Vec<upkeep_core::signature::PublicKey>,
    /// `[metrics] listen`: where Prometheus metrics are served (plain HTTP); None: not served.
    pub metrics: Option<SocketAddr>,
    /// `[webhooks]`: the CloudEvents source and the extra CA of https receivers (`crate::webhooks`).
    pub webhooks: crate::webhooks::WebhookSettings,
    /// `[store]`: where the fleet's state is kept.
    pub store: StoreBackend,
    /// `[store] artifacts_dir`: where image files are kept (content-addressed under `sha256/`); default
    /// `<state_dir>/artifacts`. Hubs sharing one database share this directory too (docs/postgres.md).
    pub artifacts_dir: PathBuf,
    /// `[cluster]`: this hub is one of several replicas on one PostgreSQL database (`crate::cluster`); None: the
    /// only hub, always the leader.
    pub cluster: Option<crate::cluster::ClusterSettings>,
}

pub use crate::store::StoreBackend;

/// The environment variable the PostgreSQL password may come from (when `store.password_file` is not set).
pub const STORE_PASSWORD_ENV: &str = "UPKEEP_STORE_PASSWORD";

impl HubConfig {
    /// The certificates the hub itself uses, by setting: `tls.cert`, `tls.ca` and, when set, `tls.issuer_cert`
    /// (what its expiry warning and metrics watch).
    pub fn certificates(&self) -> Vec<(&'static str, PathBuf)> {
        let mut certs = vec![("tls.cert", self.cert.clone()), ("tls.ca", self.ca.clone())];
        if let Some(i) = &self.issuer {
            certs.push(("tls.issuer_cert", i.cert.clone()));
        }
        certs
    }
}

/// The issuing intermediate's files (`tls.issuer_cert`, `tls.issuer_key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerFiles {
    /// Its certificate (signed by `tls.ca`).
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

/// `[limits]` in hub.toml.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// A TLS handshake not finished by then is dropped.
    pub handshake_timeout: std::time::Duration,
    /// Image downloads one node may have open at once.
    pub fetches_per_node: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { handshake_timeout: crate::door::DEFAULT_HANDSHAKE_TIMEOUT, fetches_per_node: 2 }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    state_dir: Option<PathBuf>,
    tls: Option<RawTls>,
    agents: Option<RawAgents>,
    auto_upgrade: Option<RawAutoUpgrade>,
    limits: Option<RawLimits>,
    images: Option<RawImages>,
    metrics: Option<RawMetrics>,
    webhooks: Option<RawWebhooks>,
    store: Option<RawStore>,
    cluster: Option<RawCluster>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    replica: Option<String>,
    lease_seconds: Option<u64>,
}

/// `[cluster]`: the replica's name (default: the host name) and the leader lease (default
/// `crate::cluster::DEFAULT_LEASE`); only with a PostgreSQL store.
fn parse_cluster(
    raw: Option<RawCluster>,
    store: &StoreBackend,
) -> Result<Option<crate::cluster::ClusterSettings>, (String, String)> {
    let Some(raw) = raw else { return Ok(None) };
    if matches!(store, StoreBackend::Sqlite) {
        return Err((
            "cluster".into(),
            "needs a PostgreSQL store: several replicas share one database ([store] url); remove [cluster] for a \
             single hub on SQLite"
                .into(),
        ));
    }
    let replica = match raw.replica {
        Some(r) => r,
        None => crate::cluster::host_name(),
    };
    if replica.is_empty() || replica.len() > 128 || replica.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err((
            "cluster.replica".into(),
            "must be 1 to 128 characters without spaces (it names this replica in the leader lease)".into(),
        ));
    }
    let lease_seconds = raw.lease_seconds.unwrap_or(crate::cluster::DEFAULT_LEASE.as_secs());
    if !(2..=60).contains(&lease_seconds) {
        return Err(("cluster.lease_seconds".into(), "must be between 2 and 60".into()));
    }
    Ok(Some(crate::cluster::ClusterSettings { replica, lease: std::time::Duration::from_secs(lease_seconds) }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhooks {
    source: Option<String>,
    ca_file: Option<PathBuf>,
    upcoming_notice_minutes: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    url: Option<String>,
    artifacts_dir: Option<PathBuf>,
    password_file: Option<PathBuf>,
    connections: Option<usize>,
}

/// `[store]`: SQLite unless `url` is given; the password from `password_file`, else from the environment
/// ([`STORE_PASSWORD_ENV`]), never from the URL. Errors never repeat the URL (it might hold a secret).
fn parse_store(
    raw: Option<RawStore>,
    resolve: impl Fn(PathBuf) -> PathBuf,
    env_password: Option<String>,
) -> Result<StoreBackend, (String, String)> {
    let Some(raw) = raw else { return Ok(StoreBackend::Sqlite) };
    // `artifacts_dir` is the same for either store (read by `load`).
    let Some(url) = raw.url else {
        if raw.password_file.is_some() || raw.connections.is_some() {
            return Err((
                "store.url".into(),
                "missing: [store] settings need a url (postgres://USER@HOST:PORT/DBNAME); remove [store] to keep \
                 the SQLite database under state_dir"
                    .into(),
            ));
        }
        return Ok(StoreBackend::Sqlite);
    };
    let mut settings =
        crate::store::postgres::PostgresSettings::parse(&url).map_err(|reason| ("store.url".to_string(), reason))?;
    if let Some(n) = raw.connections {
        if !(1..=64).contains(&n) {
            return Err(("store.connections".into(), "must be between 1 and 64".into()));
        }
        settings.connections = n;
    }
    let password = match raw.password_file.map(resolve) {
        Some(p) => {
            let text = std::fs::read_to_string(&p).map_err(|e| {
                (
                    "store.password_file".to_string(),
                    format!("{}: {e}; give a file the hub can read holding the database password", p.display()),
                )
            })?;
            let pw = text.trim_end_matches(['\n', '\r']).to_string();
            if pw.is_empty() {
                return Err((
                    "store.password_file".into(),
                    format!("{} is empty; write the password in it", p.display()),
                ));
            }
            Some(pw)
        }
        None => env_password.filter(|p| !p.is_empty()),
    };
    Ok(StoreBackend::Postgres(Box::new(match password {
        Some(pw) => settings.with_password(&pw),
        None => settings,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
    allow_remote: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    handshake_timeout_seconds: Option<u64>,
    fetches_per_node: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImages {
    trusted_keys: Option<Vec<PathBuf>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAutoUpgrade {
    enabled: Option<bool>,
    cadence_days: Option<u32>,
    lease_ttl_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    issuer_cert: Option<PathBuf>,
    issuer_key: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgents {
    heartbeat_interval_seconds: Option<u32>,
    silent_after_heartbeats: Option<u32>,
}

/// `[metrics]`: the listen address, loopback unless `allow_remote = true` (the endpoint is plain HTTP without
/// authentication: off the loopback it needs a firewall or a scraping proxy in front, and the operator saying so).
fn parse_metrics(raw: Option<RawMetrics>) -> Result<Option<SocketAddr>, (String, String)> {
    let Some(m) = raw else { return Ok(None) };
    let listen = m.listen.ok_or_else(|| {
        (
            "metrics.listen".to_string(),
            "missing: give an address, e.g. \"127.0.0.1:9464\", or remove [metrics]".to_string(),
        )
    })?;
    let addr: SocketAddr = listen
        .parse()
        .map_err(|e| ("metrics.listen".to_string(), format!("{listen:?}: {e}; give IP:PORT, e.g. 127.0.0.1:9464")))?;
    if !addr.ip().is_loopback() && !m.allow_remote.unwrap_or(false) {
        return Err((
            "metrics.listen".into(),
            format!(
                "{addr} is not a loopback address; metrics are plain HTTP without authentication: keep them on \
                 127.0.0.1 (scrape through a proxy), or set metrics.allow_remote = true behind a firewall"
            ),
        ));
    }
    Ok(Some(addr))
}

/// Flag overrides (from the command line).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// --listen
    pub listen: Option<String>,
    /// --state-dir
    pub state_dir: Option<PathBuf>,
}

/// A configuration error: one line naming the file and key (shared by both daemons).
pub use upkeep_proto::layered::ConfigError;

fn err(file: &Path, key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError { file: file.display().to_string(), key: key.to_string(), reason: reason.into() }
}

/// Reads `/usr/lib/upkeep/hub.d/*.toml`, then `<dir of path>/hub.d/*.toml`, then `path` (later keys win),
/// and validates the result with flag overrides. Every error names the file the offending key came from.
/// Relative paths are resolved against the directory of `path`. TLS files are checked to be readable.
pub fn load(path: &Path, overrides: &Overrides) -> Result<HubConfig, ConfigError> {
    let layered = upkeep_proto::layered::load_checked::<RawConfig>(path, "hub")?;
    parse(path, &layered.merged, overrides).map_err(|mut e| {
        if let Some(f) = layered.file_of(&e.key) {
            e.file = f.display().to_string();
        }
        e
    })
}

/// Parses the text of `path` (see `load`).
pub fn parse(path: &Path, text: &str, overrides: &Overrides) -> Result<HubConfig, ConfigError> {
    let mut raw: RawConfig = toml::from_str(text).map_err(|e| {
        let key = e.span().map(|s| text.get(s).unwrap_or("?").to_string()).unwrap_or_else(|| "(syntax)".into());
        err(path, key.trim(), e.message().to_string())
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let resolve = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
    let (listen_key, listen_text) = match (&overrides.listen, raw.listen) {
        (Some(l), _) => ("--listen", l.clone()),
        (None, Some(l)) => ("listen", l),
        (None, None) => ("listen", DEFAULT_LISTEN.to_string()),
    };
    let listen: SocketAddr = listen_text.parse().map_err(|_| {
        err(path, listen_key, format!("malformed address {listen_text:?}: expected IP:PORT, e.g. 0.0.0.0:7443"))
    })?;
    let state_dir = overrides
        .state_dir
        .clone()
        .or(raw.state_dir.map(resolve))
        .ok_or_else(|| err(path, "state_dir", "missing: set the directory for the hub database"))?;
    let tls = raw.tls.ok_or_else(|| err(path, "tls", "missing: set tls.ca, tls.cert and tls.key"))?;
    let mut files = Vec::new();
    for (key, value) in [("tls.ca", tls.ca), ("tls.cert", tls.cert), ("tls.key", tls.key)] {
        let p = value.map(resolve).ok_or_else(|| err(path, key, "missing: give the path of a PEM file"))?;
        std::fs::metadata(&p).map_err(|e| err(path, key, format!("{}: {e}", p.display())))?;
        files.push(p);
    }
    let issuer = match (tls.issuer_cert.map(resolve), tls.issuer_key.map(resolve)) {
        (None, None) => None,
        (Some(cert), Some(key)) => {
            for (k, p) in [("tls.issuer_cert", &cert), ("tls.issuer_key", &key)] {
                std::fs::metadata(p).map_err(|e| err(path, k, format!("{}: {e}", p.display())))?;
            }
            Some(IssuerFiles { cert, key })
        }
        (Some(_), None) => {
            return Err(err(path, "tls.issuer_key", "missing: tls.issuer_cert is set, give its key too (issuer.key)"));
        }
        (None, Some(_)) => {
            return Err(err(
                path,
                "tls.issuer_cert",
                "missing: tls.issuer_key is set, give its certificate too (issuer.pem)",
            ));
        }
    };
    let agents = raw.agents.unwrap_or(RawAgents { heartbeat_interval_seconds: None, silent_after_heartbeats: None });
    let heartbeat_interval_seconds = agents.heartbeat_interval_seconds.unwrap_or(DEFAULT_HEARTBEAT_SECONDS);
    if !(1..=3600).contains(&heartbeat_interval_seconds) {
        return Err(err(path, "agents.heartbeat_interval_seconds", "must be between 1 and 3600"));
    }
    let silent_after_heartbeats = agents.silent_after_heartbeats.unwrap_or(3);
    if !(2..=100).contains(&silent_after_heartbeats) {
        return Err(err(path, "agents.silent_after_heartbeats", "must be between 2 and 100"));
    }
    let [ca, cert, key]: [PathBuf; 3] = files.try_into().map_err(|_| err(path, "tls", "internal: three paths"))?;
    let mut auto_upgrade = crate::maintenance::AutoUpgradeSettings::default();
    if let Some(a) = raw.auto_upgrade {
        if let Some(e) = a.enabled {
            auto_upgrade.enabled = e;
        }
        if let Some(d) = a.cadence_days {
            if !(1..=90).contains(&d) {
                return Err(err(path, "auto_upgrade.cadence_days", "must be between 1 and 90 (7 = weekly)"));
            }
            auto_upgrade.cadence = chrono::TimeDelta::days(i64::from(d));
        }
        if let Some(t) = a.lease_ttl_seconds {
            if !(10..=86_400).contains(&t) {
                return Err(err(
                    path,
                    "auto_upgrade.lease_ttl_seconds",
                    "must be between 10 and 86400; a lease lapses this long after its node was last heard from",
                ));
            }
            auto_upgrade.lease_ttl = std::time::Duration::from_secs(t);
        }
    }
    let mut limits = Limits::default();
    if let Some(l) = raw.limits {
        if let Some(t) = l.handshake_timeout_seconds {
            if !(1..=300).contains(&t) {
                return Err(err(path, "limits.handshake_timeout_seconds", "must be between 1 and 300"));
            }
            limits.handshake_timeout = std::time::Duration::from_secs(t);
        }
        if let Some(n) = l.fetches_per_node {
            if !(1..=16).contains(&n) {
                return Err(err(path, "limits.fetches_per_node", "must be between 1 and 16"));
            }
            limits.fetches_per_node = n;
        }
    }
    let mut trusted_image_keys = Vec::new();
    for (i, p) in raw.images.and_then(|im| im.trusted_keys).unwrap_or_default().into_iter().enumerate() {
        let key = format!("images.trusted_keys[{i}]");
        let p = resolve(p);
        let text = std::fs::read_to_string(&p).map_err(|e| err(path, &key, format!("{}: {e}", p.display())))?;
        let parsed = upkeep_core::signature::PublicKey::parse(&text).map_err(|e| {
            err(path, &key, format!("{}: {e}; give a public key written by `upkeepctl image keygen`", p.display()))
        })?;
        trusted_image_keys.push(parsed);
    }
    let metrics = parse_metrics(raw.metrics).map_err(|(key, reason)| err(path, &key, reason))?;
    let mut webhooks = crate::webhooks::WebhookSettings::default();
    if let Some(w) = raw.webhooks {
        if let Some(source) = w.source {
            if source.trim().is_empty() || !source.contains(':') {
                return Err(err(
                    path,
                    "webhooks.source",
                    format!("{source:?} is not a URI; give one such as \"upkeep://hub/prod-eu\" or leave it out"),
                ));
            }
            webhooks.source = source;
        }
        if let Some(m) = w.upcoming_notice_minutes {
            if m > 30 * 24 * 60 {
                return Err(err(
                    path,
                    "webhooks.upcoming_notice_minutes",
                    format!(
                        "{m} is more than 30 days (43200); give how long before an operation to announce it, or 0 for never"
                    ),
                ));
            }
            webhooks.upcoming_notice = std::time::Duration::from_secs(u64::from(m) * 60);
        }
        if let Some(ca) = w.ca_file.map(resolve) {
            std::fs::metadata(&ca).map_err(|e| err(path, "webhooks.ca_file", format!("{}: {e}", ca.display())))?;
            webhooks.ca_file = Some(ca);
        }
    }
    let artifacts_dir = match raw.store.as_mut().and_then(|s| s.artifacts_dir.take()) {
        Some(dir) if dir.as_os_str().is_empty() => {
            return Err(err(
                path,
                "store.artifacts_dir",
                "is empty; give a directory, or leave it out for STATE_DIR/artifacts",
            ));
        }
        Some(dir) => resolve(dir),
        None => state_dir.join("artifacts"),
    };
    let store = parse_store(raw.store, resolve, std::env::var(STORE_PASSWORD_ENV).ok())
        .map_err(|(key, reason)| err(path, &key, reason))?;
    let cluster = parse_cluster(raw.cluster, &store).map_err(|(key, reason)| err(path, &key, reason))?;
    Ok(HubConfig {
        artifacts_dir,
        cluster,
        webhooks,
        store,
        metrics,
        limits,
        trusted_image_keys,
        listen,
        state_dir,
        ca,
        cert,
        key,
        issuer,
        heartbeat_interval_seconds,
        silent_after_heartbeats,
        auto_upgrade,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_tls(dir: &Path) -> String {
        for f in ["ca.pem", "hub.pem", "hub.key"] {
            std::fs::write(dir.join(f), "x").expect("write");
        }
        "state_dir = \"state\"\n[tls]\nca = \"ca.pem\"\ncert = \"hub.pem\"\nkey = \"hub.key\"\n".to_string()
    }

    #[test]
    fn metrics_listen_on_loopback_unless_the_operator_allows_more() {
        let m = |text: &str| parse_metrics(Some(toml::from_str(text).expect("toml")));
        assert_eq!(parse_metrics(None).expect("none"), None);
        assert_eq!(m("listen = \"127.0.0.1:9464\"").expect("ok"), Some("127.0.0.1:9464".parse().expect("addr")));
        assert_eq!(m("listen = \"[::1]:9464\"").expect("ok"), Some("[::1]:9464".parse().expect("addr")));
        let (k, r) = m("listen = \"0.0.0.0:9464\"").expect_err("not loopback");
        assert_eq!(k, "metrics.listen");
        assert!(r.contains("metrics.allow_remote = true"), "{r}");
        assert!(m("listen = \"0.0.0.0:9464\"\nallow_remote = true").expect("allowed").is_some());
        let (k, r) = m("listen = \"localhost\"").expect_err("not IP:PORT");
        assert_eq!(k, "metrics.listen");
        assert!(r.contains("IP:PORT"), "{r}");
        assert_eq!(m("allow_remote = false").expect_err("no address").0, "metrics.listen");
    }

    #[test]
    fn a_good_file_resolves_relative_paths() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.toml");
        let c = parse(&path, &with_tls(dir.path()), &Overrides::default()).expect("valid");
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.ca, dir.path().join("ca.pem"));
        assert_eq!(c.heartbeat_interval_seconds, DEFAULT_HEARTBEAT_SECONDS);
    }

    #[test]
    fn drop_ins_layer_under_the_main_file_and_errors_name_the_fragment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.toml");
        std::fs::write(&path, with_tls(dir.path())).expect("write");
        let d = dir.path().join("hub.d");
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(
            d.join("20-timing.toml"),
            "listen = \"127.0.0.1:9443\"\n[agents]\nheartbeat_interval_seconds = 5\n",
        )
        .expect("write");
        let c = load(&path, &Overrides::default()).expect("valid");
        assert_eq!(c.heartbeat_interval_seconds, 5, "a drop-in sets what the main file does not");
        assert_eq!(c.listen.to_string(), "127.0.0.1:9443");
        std::fs::write(&path, format!("listen = \"127.0.0.1:7000\"\n{}", with_tls(dir.path()))).expect("write");
        assert_eq!(
            load(&path, &Overrides::default()).expect("valid").listen.to_string(),
            "127.0.0.1:7000",
            "the main file wins"
        );
        std::fs::write(d.join("30-bad.toml"), "[agents]\nheartbeat_interval_seconds = 0\n").expect("write");
        let e = load(&path, &Overrides::default()).expect_err("out of range");
        assert!(e.to_string().contains("30-bad.toml: agents.heartbeat_interval_seconds"), "{e}");
        std::fs::write(d.join("30-bad.toml"), "colour = 1\n").expect("write");
        let e = load(&path, &Overrides::default()).expect_err("unknown key");
        assert!(e.to_string().contains("30-bad.toml: colour: unknown field"), "{e}");
    }

    #[test]
    fn errors_name_file_and_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.toml");
        let base = with_tls(dir.path());
        let unknown = parse(&path, &format!("colour = 1\n{base}"), &Overrides::default()).expect_err("unknown");
        assert!(unknown.to_string().contains("hub.toml: colour: unknown field"), "{unknown}");
        let addr = parse(&path, &format!("listen = \"nowhere\"\n{base}"), &Overrides::default()).expect_err("bad");
        assert!(addr.to_string().contains("listen: malformed address"), "{addr}");
        std::fs::remove_file(dir.path().join("hub.key")).expect("rm");
        let missing = parse(&path, &base, &Overrides::default()).expect_err("missing");
        assert!(missing.to_string().contains("tls.key:"), "{missing}");
    }

    #[test]
    fn the_issuer_is_optional_but_comes_as_a_pair() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.toml");
        let base = with_tls(dir.path());
        assert_eq!(parse(&path, &base, &Overrides::default()).expect("valid").issuer, None);
        for f in ["issuer.pem", "issuer.key"] {
            std::fs::write(dir.path().join(f), "x").expect("write");
        }
        let both = base.replace("[tls]\n", "[tls]\nissuer_cert = \"issuer.pem\"\nissuer_key = \"issuer.key\"\n");
        let c = parse(&path, &both, &Overrides::default()).expect("valid");
        assert_eq!(c.issuer.expect("issuer").key, dir.path().join("issuer.key"));
        let half = base.replace("[tls]\n", "[tls]\nissuer_cert = \"issuer.pem\"\n");
        let e = parse(&path, &half, &Overrides::default()).expect_err("half").to_string();
        assert!(e.contains("hub.toml: tls.issuer_key: missing"), "{e}");
    }

    #[test]
    fn artifacts_dir_defaults_under_state_dir_and_may_be_shared_with_either_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.toml");
        let base = with_tls(dir.path());
        let c = parse(&path, &base, &Overrides::default()).expect("valid");
        assert_eq!(c.artifacts_dir, dir.path().join("state/artifacts"));
        let sqlite = format!("{base}[store]\nartifacts_dir = \"/srv/shared\"\n");
        let c = parse(&path, &sqlite, &Overrides::default()).expect("valid");
        assert!(matches!(c.store, StoreBackend::Sqlite), "artifacts_dir alone keeps SQLite");
        assert_eq!(c.artifacts_dir, PathBuf::from("/srv/shared"));
        let pg = format!("{base}[store]\nurl = \"postgres://u@h/f\"\nartifacts_dir = \"shared\"\n");
        let c = parse(&path, &pg, &Overrides::default()).expect("valid");
        assert!(matches!(c.store, StoreBackend::Postgres(_)));
        assert_eq!(c.artifacts_dir, dir.path().join("shared"), "relative to hub.toml");
        let e = parse(&path, &format!("{base}[store]\nartifacts_dir = \"\"\n"), &Overrides::default())
            .expect_err("empty")
            .to_string();
        assert!(e.contains("store.artifacts_dir: is empty"), "{e}");
    }

    #[test]
    fn images_trusted_keys_are_read_and_a_bad_one_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.toml");
        let base = with_tls(dir.path());
        let (public, _) = crate::image_tools::keygen(&dir.path().join("keys")).expect("keygen");
        let good = format!("{base}\n[images]\ntrusted_keys = [{:?}]\n", public.to_string_lossy());
        let c = parse(&path, &good, &Overrides::default()).expect("valid");
        assert_eq!(c.trusted_image_keys.len(), 1);
        std::fs::write(dir.path().join("garbage.pub"), "not a key").expect("write");
        let bad = format!("{base}\n[images]\ntrusted_keys = [\"garbage.pub\"]\n");
        let e = parse(&path, &bad, &Overrides::default()).expect_err("bad key").to_string();
        assert!(e.contains("images.trusted_keys[0]") && e.contains("upkeepctl image keygen"), "{e}");
        assert!(parse(&path, &base, &Overrides::default()).expect("valid").trusted_image_keys.is_empty());
    }

    #[test]
    fn cluster_needs_postgres_and_names_the_bad_field() {
        let pg = StoreBackend::Postgres(Box::new(
            crate::store::postgres::PostgresSettings::parse("postgres://u@h/fleet").expect("url"),
        ));
        let cluster = |raw: &str, store: &StoreBackend| parse_cluster(Some(toml::from_str(raw).expect("toml")), store);
        assert_eq!(parse_cluster(None, &pg), Ok(None), "no [cluster]: the only hub");
        let c = cluster("replica = \"hub-a\"\nlease_seconds = 5", &pg).expect("valid").expect("cluster");
        assert_eq!((c.replica.as_str(), c.lease), ("hub-a", std::time::Duration::from_secs(5)));
        let c = cluster("", &pg).expect("valid").expect("cluster");
        assert_eq!((c.replica, c.lease), (crate::cluster::host_name(), crate::cluster::DEFAULT_LEASE), "defaults");
        let (key, why) = cluster("replica = \"a\"", &StoreBackend::Sqlite).expect_err("sqlite");
        assert!(key == "cluster" && why.contains("[store] url"), "{key}: {why}");
        assert_eq!(cluster("lease_seconds = 1", &pg).expect_err("too short").0, "cluster.lease_seconds");
        assert_eq!(cluster("replica = \"a b\"", &pg).expect_err("space").0, "cluster.replica");
        assert_eq!(cluster("replica = \"\"", &pg).expect_err("empty").0, "cluster.replica");
    }

    #[test]
    fn a_store_url_selects_postgres_and_the_password_never_comes_from_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.toml");
        let base = with_tls(dir.path());
        let store = |raw: &str, env: Option<&str>| {
            parse_store(Some(toml::from_str(raw).expect("toml")), |p| dir.path().join(p), env.map(str::to_string))
        };
        assert!(matches!(parse_store(None, |p| p, None), Ok(StoreBackend::Sqlite)));
        assert!(matches!(parse(&path, &base, &Overrides::default()).expect("valid").store, StoreBackend::Sqlite));
        let Ok(StoreBackend::Postgres(pg)) = store("url = \"postgres://upkeep@db.example:5433/fleet\"", None) else {
            panic!("postgres")
        };
        assert_eq!(pg.describe(), "upkeep@db.example:5433/fleet");
        assert_eq!((pg.config.get_password(), pg.connections), (None, crate::store::postgres::DEFAULT_CONNECTIONS));
        let Ok(StoreBackend::Postgres(pg)) = store("url = \"host=/run/postgresql dbname=fleet user=u\"", Some("s3"))
        else {
            panic!("postgres")
        };
        assert_eq!(pg.config.get_password(), Some(&b"s3"[..]), "from UPKEEP_STORE_PASSWORD");
        std::fs::write(dir.path().join("pw"), "from-file\n").expect("write");
        let Ok(StoreBackend::Postgres(pg)) =
            store("url = \"postgres://u@h/fleet\"\npassword_file = \"pw\"\nconnections = 9", Some("env"))
        else {
            panic!("postgres")
        };
        assert_eq!((pg.config.get_password(), pg.connections), (Some(&b"from-file"[..]), 9), "the file wins");
        assert!(!format!("{pg:?}").contains("from-file"), "never printed");

        let (key, why) = store("url = \"postgres://u:hunter2@h/fleet\"", None).expect_err("password in the url");
        assert_eq!(key, "store.url");
        assert!(why.contains("store.password_file") && why.contains("UPKEEP_STORE_PASSWORD"), "{why}");
        assert!(!why.contains("hunter2"), "{why}");
        let (key, why) = store("url = \"mysql://h/x\"", None).expect_err("not postgres");
        assert_eq!(key, "store.url");
        assert!(why.contains("postgres://"), "{why}");
        assert_eq!(store("url = \"postgres://u@h\"", None).expect_err("no database").0, "store.url");
        let (key, why) = store("url = \"postgres://u@h/f\"\npassword_file = \"missing\"", None).expect_err("file");
        assert_eq!(key, "store.password_file");
        assert!(why.contains("missing"), "{why}");
        assert_eq!(store("password_file = \"pw\"", None).expect_err("no url").0, "store.url");
        assert_eq!(
            store("url = \"postgres://u@h/f\"\nconnections = 0", None).expect_err("range").0,
            "store.connections"
        );
        let e = parse(&path, &format!("{base}[store]\nurl = \"postgres://u:pw@h/f\"\n"), &Overrides::default())
            .expect_err("named with the file")
            .to_string();
        assert!(e.contains("hub.toml: store.url:"), "{e}");
    }
}
