//! Test harness for scenario tests: a fleet PKI generated per test, an in-process hub on 127.0.0.1:0 with real
//! mutual TLS and a real SQLite file (or, with `UPKEEP_TEST_STORE=postgres`, a PostgreSQL database of its own), real agents (in-process, each over its own root tree), and the real
//! upkeepctl / upkeep-agent / upkeep-hub binaries for CLI behaviour.

use anyhow::{Context, anyhow};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use upkeep_core::ids::Role;
use upkeep_hub::pki;

pub mod debs;
pub mod system;

/// A fleet PKI in a temporary directory (CA, hub, operator, viewer; nodes on demand).
pub struct TestPki {
    /// Keeps the directory alive.
    pub dir: TempDir,
}

impl TestPki {
    /// Runs the same code as `upkeepctl pki init`.
    pub fn new() -> TestPki {
        let dir = tempfile::tempdir().expect("tempdir");
        pki::init(dir.path(), &[]).expect("pki init");
        TestPki { dir }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A file in the PKI directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Issues a node certificate; returns (cert, key).
    pub fn node(&self, name: &str) -> (PathBuf, PathBuf) {
        let r = pki::issue(self.path(), Role::Node, name).expect("issue node");
        (r.files[0].clone(), r.files[1].clone())
    }

    /// Issues a client certificate carrying an arbitrary SAN URI (to test refused identities).
    pub fn raw_uri_cert(&self, file_stem: &str, uri: &str) -> (PathBuf, PathBuf) {
        let now = time::OffsetDateTime::now_utc();
        self.client_cert(file_stem, uri, now - time::Duration::hours(1), now + time::Duration::days(1))
    }

    /// Issues a client certificate for `uri` (e.g. `upkeep://operator/old`) that expired an hour ago.
    pub fn expired_cert(&self, file_stem: &str, uri: &str) -> (PathBuf, PathBuf) {
        let now = time::OffsetDateTime::now_utc();
        self.client_cert(file_stem, uri, now - time::Duration::days(2), now - time::Duration::hours(1))
    }

    /// Issues a client certificate for `uri` valid from `not_before` to `not_after`, signed by the fleet CA.
    pub fn client_cert(
        &self,
        file_stem: &str,
        uri: &str,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> (PathBuf, PathBuf) {
        let ca_pem = std::fs::read_to_string(self.file(pki::files::CA_CERT)).expect("ca");
        let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(self.file(pki::files::CA_KEY)).expect("key"))
            .expect("ca key");
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("issuer");
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(uri.to_string().try_into().expect("ia5"))];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &issuer).expect("sign");
        let c = self.file(&format!("{file_stem}.pem"));
        let k = self.file(&format!("{file_stem}.key"));
        std::fs::write(&c, cert.pem()).expect("write");
        std::fs::write(&k, key.serialize_pem()).expect("write");
        (c, k)
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}

/// A hub running in this process.
pub struct TestHub {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its state directory (kept across restarts).
    pub state_dir: PathBuf,
    config_path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    fleet: Option<std::sync::Arc<upkeep_hub::fleet::Fleet>>,
}

/// Writes a hub.toml for `pki` and `state_dir` with a 1 s heartbeat (fast tests).
/// Channel auto-upgrades are off unless `extra` (more TOML appended) turns them on: scenario tests of update runs
/// must not race the NodeImage channel every member starts on.
pub fn write_hub_config(pki: &TestPki, state_dir: &Path) -> PathBuf {
    write_hub_config_with(pki, state_dir, "[auto_upgrade]\nenabled = false\n")
}

/// Like `write_hub_config`, with `extra` TOML appended (e.g. an `[auto_upgrade]` section).
pub fn write_hub_config_with(pki: &TestPki, state_dir: &Path, extra: &str) -> PathBuf {
    write_hub_config_silent(pki, state_dir, 5, extra)
}

/// Like `write_hub_config_with`, a node being Unknown after `silent_after` missed heartbeats (tests whose nodes
/// really reboot give them longer).
pub fn write_hub_config_silent(pki: &TestPki, state_dir: &Path, silent_after: u32, extra: &str) -> PathBuf {
    let path = state_dir.join("hub.toml");
    std::fs::create_dir_all(state_dir).expect("mkdir");
    // The issuing CA, when the PKI has one (every `pki init` since intermediates): joins are then possible.
    let issuer = if pki.file(pki::files::ISSUER_KEY).exists() {
        format!(
            "issuer_cert = {:?}\nissuer_key = {:?}\n",
            pki.file(pki::files::ISSUER_CERT),
            pki.file(pki::files::ISSUER_KEY)
        )
    } else {
        String::new()
    };
    let store = test_store_section(state_dir);
    let text = format!(
        "state_dir = {:?}\n{store}[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n{issuer}[agents]\nheartbeat_interval_seconds = 1\nsilent_after_heartbeats = {silent_after}\n{extra}",
        state_dir.join("db"),
        pki.file(pki::files::CA_CERT),
        pki.file(pki::files::HUB_CERT),
        pki.file(pki::files::HUB_KEY),
    );
    std::fs::write(&path, text).expect("write hub.toml");
    path
}

/// Writes `<dir>/hub.toml` for one replica of several on the PostgreSQL database `store_url`: `[cluster] replica`
/// named `replica` with a `lease_seconds` lease, its state directory `<dir>/state` whose `artifacts` is a link to
/// `shared_artifacts` (every replica serves every image), heartbeat 1 s, `extra` TOML appended.
pub fn write_replica_config(
    pki: &TestPki,
    dir: &Path,
    shared_artifacts: &Path,
    store_url: &str,
    replica: &str,
    lease_seconds: u64,
    extra: &str,
) -> PathBuf {
    let path = dir.join("hub.toml");
    let state = dir.join("state");
    std::fs::create_dir_all(&state).expect("mkdir");
    std::fs::create_dir_all(shared_artifacts).expect("mkdir");
    if !state.join("artifacts").exists() {
        std::os::unix::fs::symlink(shared_artifacts, state.join("artifacts")).expect("link the shared artifacts");
    }
    let text = format!(
        "state_dir = {state:?}
[store]
url = {store_url:?}
[cluster]
replica = {replica:?}
lease_seconds = {lease_seconds}
[tls]
ca = {:?}
cert = {:?}
key = {:?}
[agents]
heartbeat_interval_seconds = 1
silent_after_heartbeats = 10
{extra}",
        pki.file(pki::files::CA_CERT),
        pki.file(pki::files::HUB_CERT),
        pki.file(pki::files::HUB_KEY),
    );
    std::fs::write(&path, text).expect("write hub.toml");
    path
}

/// The variable that runs the scenario tests against PostgreSQL: `UPKEEP_TEST_STORE=postgres`.
pub const TEST_STORE_ENV: &str = "UPKEEP_TEST_STORE";

/// Whether this test run keeps hub state in PostgreSQL (`UPKEEP_TEST_STORE=postgres`) rather than SQLite.
pub fn postgres_store() -> bool {
    match std::env::var(TEST_STORE_ENV) {
        Ok(v) if v == "postgres" => true,
        Ok(v) if v.is_empty() || v == "sqlite" => false,
        Ok(v) => panic!("{TEST_STORE_ENV}={v:?}: give postgres or sqlite"),
        Err(_) => false,
    }
}

/// The `[store]` section of a hub.toml under `state_dir`: empty for SQLite; with `UPKEEP_TEST_STORE=postgres`, a
/// database of its own on the shared test cluster (`UPKEEP_TEST_PG`, or one `scripts/pg-cluster` starts), created
/// and migrated the first time and kept for the state directory's later configurations (restarts keep the fleet).
pub fn test_store_section(state_dir: &Path) -> String {
    if !postgres_store() {
        return String::new();
    }
    let marker = state_dir.join("postgres-url");
    let url = match std::fs::read_to_string(&marker) {
        Ok(url) => url,
        Err(_) => {
            let (url, _) = upkeep_hub::store::postgres::testing::fresh_database()
                .unwrap_or_else(|e| panic!("{TEST_STORE_ENV}=postgres: {e}"));
            std::fs::write(&marker, &url).expect("write postgres-url");
            url
        }
    };
    format!("[store]\nurl = {url:?}\n")
}

impl TestHub {
    /// Starts a hub on 127.0.0.1 (port 0 = any) with its state under `state_dir`.
    pub async fn start(pki: &TestPki, state_dir: &Path, addr: SocketAddr) -> TestHub {
        Self::start_with(pki, state_dir, addr, "[auto_upgrade]\nenabled = false\n").await
    }

    /// Starts a hub whose hub.toml has `extra` appended (see `write_hub_config_with`).
    pub async fn start_with(pki: &TestPki, state_dir: &Path, addr: SocketAddr, extra: &str) -> TestHub {
        let config_path = write_hub_config_with(pki, state_dir, extra);
        let mut hub =
            TestHub { addr, state_dir: state_dir.to_path_buf(), config_path, stop: None, task: None, fleet: None };
        hub.launch().await;
        hub
    }

    /// Starts a hub from a hub.toml the test wrote itself (its own `[store]`, whatever `UPKEEP_TEST_STORE` says),
    /// on `addr` (port 0 = any).
    pub async fn start_config(config_path: PathBuf, state_dir: &Path, addr: SocketAddr) -> TestHub {
        let mut hub =
            TestHub { addr, state_dir: state_dir.to_path_buf(), config_path, stop: None, task: None, fleet: None };
        hub.launch().await;
        hub
    }

    async fn launch(&mut self) {
        let cfg = upkeep_hub::config::load(&self.config_path, &Default::default()).expect("hub config");
        let listener = TcpListener::bind(self.addr).await.expect("bind");
        self.addr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        self.stop = Some(tx);
        let fleet = upkeep_hub::server::open_fleet(&cfg).expect("open fleet");
        self.fleet = Some(fleet.clone());
        self.task = Some(tokio::spawn(upkeep_hub::server::serve_fleet(cfg, fleet, listener, async move {
            let _ = rx.await;
        })));
    }

    /// A handle for a hub running elsewhere (a process): only its address is known; stop() does nothing.
    pub fn detached(url: &str) -> TestHub {
        let addr = url.trim_start_matches("https://").parse().expect("hub address");
        TestHub { addr, state_dir: PathBuf::new(), config_path: PathBuf::new(), stop: None, task: None, fleet: None }
    }

    /// The running hub's fleet (to send commands to nodes directly in tests).
    pub fn fleet(&self) -> std::sync::Arc<upkeep_hub::fleet::Fleet> {
        self.fleet.clone().expect("hub is running")
    }

    /// Stops the hub gracefully and waits until it has stopped.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.fleet = None;
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("hub stops within 20 s")
                .expect("hub task")
                .expect("hub served cleanly");
        }
    }

    /// Opens the hub's store as its configuration names it (SQLite under the state directory, or its PostgreSQL
    /// database): for tests that look at the stored state while the hub is stopped.
    pub fn open_store(&self) -> std::sync::Arc<dyn upkeep_hub::store::Store> {
        let cfg = upkeep_hub::config::load(&self.config_path, &Default::default()).expect("hub config");
        upkeep_hub::store::open(&cfg.store, &cfg.state_dir).expect("open the hub's store")
    }

    /// Stops and starts again on the same address with the same state.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.launch().await;
    }

    /// The URL agents and upkeepctl use.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
}

/// A hub running as a separate `upkeep-hub` process (to be killed with SIGKILL in crash tests).
pub struct HubProcess {
    /// Where it listens.
    pub addr: SocketAddr,
    config: PathBuf,
    /// Where its output is appended across restarts (None: discarded).
    log: Option<PathBuf>,
    child: Option<tokio::process::Child>,
}

impl HubProcess {
    /// Starts `upkeep-hub` with state under `state_dir` on a free loopback port, and waits until it answers.
    pub async fn start(pki: &TestPki, state_dir: &Path) -> HubProcess {
        Self::start_with(pki, state_dir, "[auto_upgrade]\nenabled = false\n").await
    }

    /// Like `start`, with `extra` TOML appended to hub.toml (e.g. `[auto_upgrade]\nenabled = true\n`).
    pub async fn start_with(pki: &TestPki, state_dir: &Path, extra: &str) -> HubProcess {
        let config = write_hub_config_with(pki, state_dir, extra);
        Self::start_config(pki, config, None).await
    }

    /// A hub with heartbeat 1 s, Unknown after `silent_after` missed heartbeats, `extra` TOML appended, and its
    /// output appended to `<state_dir>/hub.log` across restarts (see [`HubProcess::tail`]).
    pub async fn start_logged(pki: &TestPki, state_dir: &Path, silent_after: u32, extra: &str) -> HubProcess {
        let config = write_hub_config_silent(pki, state_dir, silent_after, extra);
        Self::start_config(pki, config, Some(state_dir.join("hub.log"))).await
    }

    /// Starts `upkeep-hub` with the hub.toml at `config` (e.g. from [`write_replica_config`]), its output appended
    /// to `log`.
    pub async fn start_config_logged(pki: &TestPki, config: PathBuf, log: PathBuf) -> HubProcess {
        Self::start_config(pki, config, Some(log)).await
    }

    async fn start_config(pki: &TestPki, config: PathBuf, log: Option<PathBuf>) -> HubProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let mut hub = HubProcess { addr, config, log, child: None };
        hub.spawn(pki).await;
        hub
    }

    async fn spawn(&mut self, pki: &TestPki) {
        let (out, err) = match &self.log {
            Some(path) => {
                let f = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("hub.log");
                (std::process::Stdio::from(f.try_clone().expect("dup hub.log")), std::process::Stdio::from(f))
            }
            None => (std::process::Stdio::null(), std::process::Stdio::null()),
        };
        let child = tokio::process::Command::new(bin("upkeep-hub"))
            .arg("--config")
            .arg(&self.config)
            .arg("--listen")
            .arg(self.addr.to_string())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn upkeep-hub");
        self.child = Some(child);
        let url = self.url();
        wait_for("upkeep-hub answers", Duration::from_secs(30), || async {
            upkeepctl(pki, &url, "viewer", &["whoami"]).await.status.success().then_some(())
        })
        .await;
    }

    /// SIGKILL: no shutdown path runs.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().await.expect("kill -9 upkeep-hub");
        }
    }

    /// Starts it again on the same address and state.
    pub async fn restart(&mut self, pki: &TestPki) {
        self.kill().await;
        self.spawn(pki).await;
    }

    /// The URL.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Sends `signal` to the hub process (SIGSTOP/SIGCONT to pause and resume it).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = self.pid().expect("the hub runs");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).expect("signal upkeep-hub");
    }

    /// Its whole output so far (empty when not logged).
    pub fn log_text(&self) -> String {
        self.log.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default()
    }

    /// The hub's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// The last `n` lines of the hub's output (for failure messages; empty when not logged).
    pub fn tail(&self, n: usize) -> String {
        let text = self.log.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// The operations a node's agent journalled under `node_dir/state/journal` (`make_node`'s layout: `work/<node>`),
/// as (operation id, ok: None while it runs), in id order.
pub fn agent_journal(node_dir: &Path) -> Vec<(String, Option<bool>)> {
    let mut ops: Vec<(String, Option<bool>)> = std::fs::read_dir(node_dir.join("state/journal"))
        .map(|rd| {
            rd.filter_map(|e| std::fs::read(e.ok()?.path()).ok())
                .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .filter_map(|v| Some((v["operation_id"].as_str()?.to_string(), v["result"]["ok"].as_bool())))
                .collect()
        })
        .unwrap_or_default();
    ops.sort();
    ops
}

/// Reimage operations a node's agent journalled (one per operation id).
pub fn reimages_journalled(node_dir: &Path) -> usize {
    agent_journal(node_dir).iter().filter(|(id, _)| id.ends_with("/reimage")).count()
}

/// A member's level in a run as `run show -o json` gives it (panics naming the run when it is not there).
pub fn run_member<'a>(run: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    run["stages"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["groups"].as_array().into_iter().flatten())
        .flat_map(|g| g["members"].as_array().into_iter().flatten())
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("member {name} not in run: {run}"))
}

/// A node's root tree and agent configuration.
pub struct TestNode {
    /// Node name.
    pub name: String,
    /// Its root directory.
    pub root: PathBuf,
    /// Its agent.toml.
    pub config: PathBuf,
}

/// Lays out a simulated node under `base/<name>`: os-release, image metadata, certificate, agent.toml.
#[allow(clippy::too_many_arguments)] // a flat call reads best in scenarios: where, who, and what it runs
pub fn make_node(
    pki: &TestPki,
    base: &Path,
    hub_url: &str,
    name: &str,
    member: &str,
    pool: &str,
    region: &str,
    image: &str,
) -> TestNode {
    let dir = base.join(name);
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("etc/upkeep")).expect("mkdir");
    std::fs::write(root.join("etc/os-release"), "ID=debian\nVERSION_ID=\"12\"\n").expect("os-release");
    let (family, version) = image.rsplit_once('-').expect("image is family-version");
    std::fs::write(root.join("etc/upkeep/node-image"), format!("FAMILY={family}\nVERSION={version}\n")).expect("meta");
    let (cert, key) = pki.node(name);
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "hub = {hub_url:?}\nmember = {member:?}\nnode_pool = {pool:?}\nregion = {region:?}\nstate_dir = {:?}\nroot = {:?}\n[tls]\nca = {:?}\ncert = {cert:?}\nkey = {key:?}\n",
            dir.join("state"),
            root,
            pki.file(pki::files::CA_CERT),
        ),
    )
    .expect("agent.toml");
    TestNode { name: name.to_string(), root, config }
}

/// An agent running in this process.
pub struct TestAgent {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl TestAgent {
    /// Starts the agent of `node`.
    pub fn start(node: &TestNode) -> TestAgent {
        let cfg = upkeep_agent::config::load(&node.config).expect("agent config");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(upkeep_agent::run(cfg, async move {
            let _ = rx.await;
        }));
        TestAgent { stop: Some(tx), task }
    }

    /// Stops it and waits.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("agent stops")
            .expect("agent task")
            .expect("agent ran cleanly");
    }
}

/// A gRPC channel to `hub` over mutual TLS with the certificate and key files given, trusting the PKI's CA.
pub async fn mtls_channel(pki: &TestPki, hub: &str, cert: &Path, key: &Path) -> tonic::transport::Channel {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&pki.file(pki::files::CA_CERT))))
        .identity(Identity::from_pem(read(cert), read(key)))
        .domain_name("127.0.0.1");
    Endpoint::from_shared(hub.to_string())
        .expect("hub url")
        .tls_config(tls)
        .expect("tls config")
        .connect()
        .await
        .expect("connect to the hub")
}

/// Builds, signs and publishes a `Debian-12` image at `version` (region `eu`) through the hub at `url`, with a
/// signing key made under `work/keys`, trusted by the nodes whose roots are `roots`.
pub async fn publish_trusted_debian(pki: &TestPki, url: &str, work: &Path, roots: &[PathBuf], version: &str) {
    let keys = work.join("keys");
    upkeepctl_ok(pki, url, &["image", "keygen", "--dir", &keys.to_string_lossy()]).await;
    for root in roots {
        let dir = root.join("etc/upkeep/trusted-keys");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::copy(keys.join("upkeep-image.pub"), dir.join("upkeep-image.pub")).expect("trust key");
    }
    let img = work.join(format!("debian-{version}.tar")).to_string_lossy().into_owned();
    upkeepctl_ok(pki, url, &["image", "build", "--out", &img, "--family", "Debian-12", "--version", version]).await;
    upkeepctl_ok(pki, url, &["image", "sign", "--key", &keys.join("upkeep-image.key").to_string_lossy(), &img]).await;
    let publish = ["image", "publish", "--family", "Debian-12", "--version", version, "--regions", "eu", "--file"];
    upkeepctl_ok(pki, url, &[&publish[..], &[img.as_str()]].concat()).await;
}

/// Path of a workspace binary (built by `cargo build --workspace --bins` or by the test run).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(p.exists(), "{} missing: run `cargo build --workspace --bins` first", p.display());
    p
}

/// Runs upkeepctl as `role` (operator or viewer files from the PKI) against `hub`.
pub async fn upkeepctl(pki: &TestPki, hub: &str, cert_stem: &str, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(bin("upkeepctl"));
    cmd.args(args)
        .env("UPKEEP_HUB", hub)
        .env("UPKEEP_CA", pki.file(pki::files::CA_CERT))
        .env("UPKEEP_CERT", pki.file(&format!("{cert_stem}.pem")))
        .env("UPKEEP_KEY", pki.file(&format!("{cert_stem}.key")))
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(30), cmd.output()).await.expect("upkeepctl finishes").expect("spawn")
}

/// The serial of the certificate in a PEM file, as the hub keeps it.
pub fn cert_serial(pem_file: &Path) -> String {
    let pem = std::fs::read(pem_file).expect("read cert");
    let (_, block) = x509_parser::pem::parse_x509_pem(&pem).expect("PEM");
    upkeep_hub::revocation::serial_of_der(&block.contents).expect("serial")
}

/// Runs upkeepctl as the operator; asserts success and returns stdout.
pub async fn upkeepctl_ok(pki: &TestPki, hub: &str, args: &[&str]) -> String {
    let out = upkeepctl(pki, hub, "operator", args).await;
    assert!(out.status.success(), "upkeepctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Runs upkeepctl as the operator; asserts it fails with one readable line on stderr and returns it.
pub async fn upkeepctl_refused(pki: &TestPki, hub: &str, args: &[&str]) -> String {
    let out = upkeepctl(pki, hub, "operator", args).await;
    assert!(!out.status.success(), "upkeepctl {args:?} should fail: {}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    err
}

/// Runs upkeepctl and parses its JSON stdout; fails with its stderr if it exited non-zero.
pub async fn upkeepctl_json(pki: &TestPki, hub: &str, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["-o", "json"]);
    let out = upkeepctl(pki, hub, "operator", &all).await;
    if !out.status.success() {
        return Err(anyhow!("upkeepctl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    serde_json::from_slice(&out.stdout).context("upkeepctl output is not JSON")
}

/// Polls `check` until it returns Some or `within` passes. Polling a condition with a deadline is how these
/// tests synchronise with other processes; a fixed sleep never stands in for it.
pub async fn wait_for<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A well-formed image signature by a key no node trusts: the hub's publish accepts its form, nodes refuse it.
pub fn untrusted_signature() -> String {
    use upkeep_core::signature::{SecretKey, blake2b_512};
    SecretKey::from_seed([7; 32], *b"nobody00").sign_prehashed(&blake2b_512(b""), "signed by nobody").to_file_text()
}
