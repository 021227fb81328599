//! The hub under test as a separate process: the real `upkeep-hub` binary with a generated hub.toml, so that
//! its RSS and CPU can be read from `/proc` without the load generator's own memory in the figures.

use crate::measure::{self, ProcSample};
use anyhow::{Context, bail};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use upkeep_hub::grpc::agent::AgentApi;

/// How to start the hub.
#[derive(Debug, Clone)]
pub struct HubSetup {
    /// The upkeep-hub binary.
    pub bin: PathBuf,
    /// Directory for hub.toml, hub.log and the state directory.
    pub run_dir: PathBuf,
    /// PKI directory (ca.pem, hub.pem, hub.key).
    pub pki_dir: PathBuf,
    /// Where it listens.
    pub listen: SocketAddr,
    /// `[agents] heartbeat_interval_seconds`.
    pub heartbeat_seconds: u32,
    /// RUST_LOG for the hub.
    pub log_filter: String,
    /// `[store] url`: a PostgreSQL database (None: SQLite under the state directory).
    pub store_url: Option<String>,
    /// `[cluster] replica`: this hub is one replica of several on `store_url` (needs it).
    pub replica: Option<String>,
}

/// A running hub process.
pub struct HubProc {
    child: Option<Child>,
    /// A hub served inside this process instead: how to stop it, and its task.
    local: Option<(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<anyhow::Result<()>>)>,
    /// Its pid.
    pub pid: u32,
    /// When it was spawned.
    pub started: Instant,
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr().context("reading the port")?.port())
}

impl HubSetup {
    /// Writes hub.toml; returns its path.
    pub fn write_config(&self) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(&self.run_dir).with_context(|| format!("creating {}", self.run_dir.display()))?;
        let path = self.run_dir.join("hub.toml");
        let p = |f: &str| self.pki_dir.join(f);
        let text = format!(
            "listen = \"{}\"\nstate_dir = {:?}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n[auto_upgrade]\nenabled = false\n[agents]\nheartbeat_interval_seconds = {}\nsilent_after_heartbeats = 3\n",
            self.listen,
            self.run_dir.join("state"),
            p(upkeep_hub::pki::files::CA_CERT),
            p(upkeep_hub::pki::files::HUB_CERT),
            p(upkeep_hub::pki::files::HUB_KEY),
            self.heartbeat_seconds,
        );
        let mut text = text;
        if let Some(url) = &self.store_url {
            text.push_str(&format!("[store]\nurl = {url:?}\n"));
        }
        if let Some(replica) = &self.replica {
            text.push_str(&format!("[cluster]\nreplica = {replica:?}\n"));
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Runs `upkeep-hub migrate` on this configuration (a PostgreSQL store: a serving hub never migrates it).
    pub fn migrate(&self) -> anyhow::Result<String> {
        let config = self.write_config()?;
        if !self.bin.exists() {
            bail!("{} missing: run `cargo build --release -p upkeep-hub` first", self.bin.display());
        }
        let out = Command::new(&self.bin)
            .arg("migrate")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} migrate", self.bin.display()))?;
        if !out.status.success() {
            bail!("upkeep-hub migrate failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Starts the hub and waits until its port accepts connections.
    pub async fn start(&self) -> anyhow::Result<HubProc> {
        let config = self.write_config()?;
        let log_path = self.run_dir.join("hub.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        if !self.bin.exists() {
            bail!("{} missing: run `cargo build --release -p upkeep-hub` first", self.bin.display());
        }
        let child = Command::new(&self.bin)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", &self.log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let hub = HubProc { pid: child.id(), child: Some(child), local: None, started: Instant::now() };
        wait_for_port(self.listen, Duration::from_secs(30)).await.with_context(|| {
            format!("hub did not listen on {} within 30 s; see {}", self.listen, log_path.display())
        })?;
        Ok(hub)
    }
}

impl HubSetup {
    /// The same hub served inside this process (its figures then include the load generator's), with the agent
    /// API for in-process simulated nodes: past this machine's descriptor limit, nodes open sessions without a
    /// socket each (`AgentApi::open_session`), everything behind the session (fleet, engine, executor, store)
    /// being the hub's own.
    pub async fn start_in_process(&self) -> anyhow::Result<(HubProc, Arc<AgentApi>, Arc<upkeep_hub::fleet::Fleet>)> {
        let path = self.write_config()?;
        let config = upkeep_hub::config::load(&path, &Default::default())?;
        let listener = tokio::net::TcpListener::bind(self.listen).await.context("binding the hub's port")?;
        let fleet = upkeep_hub::server::open_fleet(&config)?;
        let (agents_tx, agents_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(upkeep_hub::server::serve_fleet_with_local_agents(
            config,
            fleet.clone(),
            listener,
            async move {
                let _ = stop_rx.await;
            },
            Some(agents_tx),
        ));
        let agents = agents_rx.await.context("the in-process hub did not start")?;
        let hub =
            HubProc { pid: std::process::id(), child: None, local: Some((stop_tx, task)), started: Instant::now() };
        Ok((hub, agents, fleet))
    }
}

/// Waits until `addr` accepts a TCP connection.
pub async fn wait_for_port(addr: SocketAddr, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{addr} refused connections for {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl HubProc {
    /// Reads its footprint now.
    pub fn sample(&self) -> anyhow::Result<ProcSample> {
        measure::sample(self.pid)
    }

    /// Stops it with SIGTERM (graceful: sessions are ended) and waits; returns how long it took.
    pub async fn stop(mut self) -> anyhow::Result<Duration> {
        let began = Instant::now();
        if let Some((stop, task)) = self.local.take() {
            let _ = stop.send(());
            task.await.context("the in-process hub panicked")??;
            return Ok(began.elapsed());
        }
        let Some(mut child) = self.child.take() else { return Ok(Duration::ZERO) };
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).context("sending SIGTERM to the hub")?;
        loop {
            if child.try_wait().context("waiting for the hub")?.is_some() {
                return Ok(began.elapsed());
            }
            if began.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                let _ = child.wait();
                bail!("hub did not stop within 60 s of SIGTERM; killed");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for HubProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A fresh run directory `<cache>/runs/<label>` (an older one of the same label is removed).
pub fn fresh_run_dir(cache: &Path, label: &str) -> anyhow::Result<PathBuf> {
    let dir = cache.join("runs").join(label);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
