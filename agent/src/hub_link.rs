//! The agent's side of the session with its hub: connect over mutual TLS, register, heartbeat, report on
//! change, adopt the member configuration the hub pushes, answer commands; reconnect with jittered
//! exponential backoff (capped near 30 s) and re-send the full state on every new session.

use crate::backoff;
use crate::config::AgentConfig;
use crate::engine::{Engine, Fetcher, Link, Submitted};
use crate::os::NodeOs;
use crate::state::{self, AgentState};
use anyhow::{Context, anyhow};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use upkeep_proto::tls::client_tls;
use upkeep_proto::v1::{self, agent_message, hub_message};

/// Heartbeat interval used until the hub's Welcome says otherwise.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
/// How often the adopted channel is put in force again although nothing changed, so that updaters someone
/// switched back on by hand are switched off again ("kept off", SPEC §2).
pub const CHANNEL_REASSERT_EVERY: Duration = Duration::from_secs(3600);
/// Outbound queue depth of one session.
const OUTBOUND_QUEUE: usize = 16;

/// A running agent: its configuration, its OS seam, its adopted state, and its operation engine.
pub struct Agent {
    cfg: AgentConfig,
    os: Arc<dyn NodeOs>,
    state: std::sync::Mutex<AgentState>,
    engine: Arc<Engine>,
    link: Arc<SessionLink>,
    /// Results of operations finished in the background, sent on whichever session is open.
    results: tokio::sync::Mutex<mpsc::UnboundedReceiver<v1::OperationResult>>,
    /// What the node says about its channel: why the adopted channel is not in force as asked, what is missing,
    /// or why applying it failed. Empty when the channel is in force as asked.
    channel_note: std::sync::Mutex<String>,
    /// When the channel was last put in force.
    channel_applied_at: std::sync::Mutex<Option<tokio::time::Instant>>,
}

/// What the engine sees of the hub session: the channel of the open session (for image downloads), a count
/// of established sessions (for the after-boot health check), and a way to restart the session.
#[derive(Default)]
pub struct SessionLink {
    channel: std::sync::Mutex<Option<Channel>>,
    epoch: tokio::sync::watch::Sender<u64>,
    restart: tokio::sync::Notify,
}

impl SessionLink {
    fn channel(&self) -> Option<Channel> {
        self.channel.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Link for SessionLink {
    fn epoch(&self) -> u64 {
        *self.epoch.borrow()
    }

    fn restart_session(&self) {
        self.restart.notify_one();
    }

    fn wait_epoch_above(&self, above: u64, within: Duration) -> futures::future::BoxFuture<'_, bool> {
        let mut rx = self.epoch.subscribe();
        Box::pin(
            async move { tokio::time::timeout(within, rx.wait_for(|e| *e > above)).await.is_ok_and(|r| r.is_ok()) },
        )
    }
}

/// Downloads images over the open session's channel (`AgentService.FetchImage`).
struct HubFetcher {
    link: Arc<SessionLink>,
}

/// How long a download waits for a session to the hub.
const FETCH_WAIT_FOR_SESSION: Duration = Duration::from_secs(30);

impl Fetcher for HubFetcher {
    fn open(
        &self,
        sha256: &str,
        offset: u64,
    ) -> futures::future::BoxFuture<
        '_,
        Result<futures::stream::BoxStream<'static, Result<v1::ImageChunk, String>>, String>,
    > {
        let sha256 = sha256.to_string();
        Box::pin(async move {
            let mut rx = self.link.epoch.subscribe();
            let deadline = tokio::time::Instant::now() + FETCH_WAIT_FOR_SESSION;
            let channel = loop {
                if let Some(c) = self.link.channel() {
                    break c;
                }
                if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                    return Err("no session to the hub to download from".to_string());
                }
            };
            let mut client =
                v1::agent_service_client::AgentServiceClient::new(channel).max_decoding_message_size(8 * 1024 * 1024);
            let stream = client
                .fetch_image(v1::FetchImageRequest { sha256, offset })
                .await
                .map_err(|s| format!("FetchImage: {}: {}", s.code(), s.message()))?
                .into_inner();
            use futures::StreamExt;
            Ok(stream.map(|r| r.map_err(|s| format!("FetchImage: {}: {}", s.code(), s.message()))).boxed())
        })
    }
}

/// How a session ended.
enum SessionEnd {
    /// The session was established (Welcome received) before it ended: reset the backoff.
    AfterWelcome(anyhow::Error),
    /// It never got that far.
    BeforeWelcome(anyhow::Error),
}

impl Agent {
    /// Loads the persisted state and builds the agent.
    pub fn new(cfg: AgentConfig, os: Arc<dyn NodeOs>) -> anyhow::Result<Agent> {
        let st = state::load(&cfg.state_dir)?;
        let link = Arc::new(SessionLink::default());
        let (results_tx, results_rx) = mpsc::unbounded_channel();
        let fetcher = Arc::new(HubFetcher { link: link.clone() });
        let engine =
            Engine::new(os.clone(), &cfg.state_dir, fetcher, link.clone(), results_tx, cfg.image.health_timeout)?;
        engine.set_pool(&cfg.node_pool, &cfg.hardware_class);
        Ok(Agent {
            cfg,
            os,
            state: std::sync::Mutex::new(st),
            engine,
            link,
            results: tokio::sync::Mutex::new(results_rx),
            channel_note: std::sync::Mutex::new(String::new()),
            channel_applied_at: std::sync::Mutex::new(None),
        })
    }

    fn state(&self) -> AgentState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The full report of this node now.
    pub fn report(&self) -> v1::NodeReport {
        let facts = match self.os.facts() {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(node = %self.cfg.node_name, error = %e, "reading node facts");
                crate::os::OsFacts { os_family: "unknown".into(), ..Default::default() }
            }
        };
        let st = self.state();
        v1::NodeReport {
            node_name: self.cfg.node_name.clone(),
            member: self.cfg.member.clone(),
            node_pool: self.cfg.node_pool.clone(),
            region: self.cfg.region.clone(),
            os_family: facts.os_family,
            os_version: facts.os_version,
            kernel: facts.kernel,
            node_image_version: facts.node_image.map(|n| n.label()).unwrap_or_default(),
            security_patch_version: facts.security_patch_version,
            reboot_required: facts.reboot_required,
            channel: st.channel.unwrap_or_default(),
            agent_version: upkeep_proto::VERSION.to_string(),
            kubernetes_version: facts.kubernetes_version,
            control_plane: self.cfg.control_plane,
            hardware_class: self.cfg.hardware_class.clone(),
            operations: self.engine.operations(),
            channel_note: self.channel_note(),
        }
    }

    /// Adopts a member configuration if it is newer than what we hold; true if anything changed.
    fn adopt(&self, desired: &v1::DesiredConfig) -> anyhow::Result<bool> {
        let channel: upkeep_core::channel::NodeOsChannel = desired
            .node_os_channel
            .parse()
            .map_err(|e| anyhow!("hub sent desired.node_os_channel that this agent does not know: {e}"))?;
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if desired.generation < guard.config_generation {
            tracing::info!(
                generation = desired.generation,
                held = guard.config_generation,
                "ignoring older configuration"
            );
            return Ok(false);
        }
        let next = AgentState { channel: Some(channel.as_str().to_string()), config_generation: desired.generation };
        if next == *guard {
            return Ok(false);
        }
        // Journal first: the adopted configuration is on disk before we act on it or report it.
        state::save(&self.cfg.state_dir, &next)?;
        tracing::info!(node = %self.cfg.node_name, channel = %channel, generation = desired.generation, "adopted member configuration");
        *guard = next;
        Ok(true)
    }

    /// What the node says about its channel (empty when the adopted channel is in force as asked).
    pub fn channel_note(&self) -> String {
        self.channel_note.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts the adopted channel in force on the node (off the async threads: it writes files and runs
    /// `systemctl`). Failures do not end the session: they are logged and kept as the channel note, and the
    /// channel is applied again at the next adoption and at every start.
    pub async fn apply_channel(&self) {
        let Some(name) = self.state().channel else { return };
        let channel: upkeep_core::channel::NodeOsChannel = match name.parse() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "persisted channel unreadable; not applying it");
                return;
            }
        };
        let os = self.os.clone();
        let (pool, hw) = (self.cfg.node_pool.clone(), self.cfg.hardware_class.clone());
        let outcome = tokio::task::spawn_blocking(move || apply_channel(os.as_ref(), channel, pool, hw)).await;
        let note = match outcome {
            Ok(Ok(note)) => note,
            Ok(Err(e)) => format!("applying node OS channel {channel} failed: {e}"),
            Err(e) => format!("applying node OS channel {channel} panicked: {e}"),
        };
        if note.is_empty() {
            tracing::info!(node = %self.cfg.node_name, channel = %channel, "node OS channel in force");
        } else {
            tracing::warn!(node = %self.cfg.node_name, channel = %channel, note = %note, "node OS channel");
        }
        *self.channel_note.lock().unwrap_or_else(|e| e.into_inner()) = note;
        *self.channel_applied_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(tokio::time::Instant::now());
    }

    /// The channel was last put in force longer ago than `CHANNEL_REASSERT_EVERY` (or never).
    fn channel_reassert_due(&self) -> bool {
        self.channel_applied_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none_or(|t| t.elapsed() >= CHANNEL_REASSERT_EVERY)
    }

    /// Runs until `shutdown` completes, reconnecting as needed.
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        // Whatever the node's updaters were switched to while we were not running, the channel is put back.
        self.apply_channel().await;
        // Operations interrupted by a restart or a reboot carry on from their journalled step.
        self.engine.resume();
        let mut attempt: u32 = 0;
        loop {
            let end = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                end = self.session() => end,
            };
            let err = match end {
                SessionEnd::AfterWelcome(e) => {
                    attempt = 0;
                    e
                }
                SessionEnd::BeforeWelcome(e) => e,
            };
            let wait = backoff::delay(attempt, fastrand::f64());
            attempt = attempt.saturating_add(1);
            tracing::warn!(node = %self.cfg.node_name, hub = %self.cfg.hub, error = %format!("{err:#}").replace('\n', " "), retry_in_ms = wait.as_millis() as u64, "hub session ended");
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn session(&self) -> SessionEnd {
        let mut welcomed = false;
        let r = self.session_inner(&mut welcomed).await;
        let e = r.err().unwrap_or_else(|| anyhow!("hub closed the session"));
        if welcomed { SessionEnd::AfterWelcome(e) } else { SessionEnd::BeforeWelcome(e) }
    }

    async fn session_inner(&self, welcomed: &mut bool) -> anyhow::Result<()> {
        let tls = client_tls(&self.cfg.tls, &self.cfg.hub_host)?;
        let channel = Endpoint::from_shared(self.cfg.hub.clone())
            .context("hub address")?
            .tls_config(tls)
            .context("tls")?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .connect()
            .await
            .context("connecting to the hub")?;
        *self.link.channel.lock().unwrap_or_else(|e| e.into_inner()) = Some(channel.clone());
        let mut results = self.results.lock().await;
        let mut client = v1::agent_service_client::AgentServiceClient::new(channel);
        let (tx, rx) = mpsc::channel::<v1::AgentMessage>(OUTBOUND_QUEUE);
        let mut last = self.report();
        tx.send(msg(agent_message::Body::Register(last.clone()))).await.context("queueing register")?;
        let mut inbound = client.session(ReceiverStream::new(rx)).await.context("opening the session")?.into_inner();

        let mut beat = tokio::time::interval(DEFAULT_HEARTBEAT);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        beat.reset();
        let mut seq = 0u64;
        loop {
            tokio::select! {
                m = inbound.message() => {
                    let m = m.context("session")?.ok_or_else(|| anyhow!("hub ended the session"))?;
                    match m.body {
                        Some(hub_message::Body::Welcome(w)) => {
                            *welcomed = true;
                            self.link.epoch.send_modify(|e| *e += 1);
                            let every = Duration::from_secs(u64::from(w.heartbeat_interval_seconds.max(1)));
                            beat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                            beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                            tracing::info!(node = %self.cfg.node_name, hub_version = %w.hub_version, heartbeat_s = every.as_secs(), "registered with hub");
                        }
                        Some(hub_message::Body::Desired(d)) => {
                            if self.adopt(&d)? {
                                self.apply_channel().await;
                                last = self.report();
                                tx.send(msg(agent_message::Body::Report(last.clone()))).await.context("sending report")?;
                            }
                        }
                        Some(hub_message::Body::Command(c)) => {
                            if let Some(result) = self.execute(&c) {
                                tx.send(msg(agent_message::Body::Result(result))).await.context("sending result")?;
                            }
                        }
                        Some(hub_message::Body::Lease(a)) => tracing::info!(lease = %a.lease_id, granted = a.granted, "lease answer"), // LEASES: wired next
                        None => tracing::warn!("empty message from hub ignored"),
                    }
                }
                Some(result) = results.recv() => {
                    tx.send(msg(agent_message::Body::Result(result))).await.context("sending result")?;
                    last = self.report();
                    tx.send(msg(agent_message::Body::Report(last.clone()))).await.context("sending report")?;
                }
                _ = self.link.restart.notified() => {
                    return Err(anyhow!("session restarted after an in-process boot"));
                }
                _ = beat.tick() => {
                    if self.channel_reassert_due() {
                        self.apply_channel().await;
                    }
                    // One wakeup per interval: re-read the node, report if anything changed, else heartbeat.
                    let now = self.report();
                    let body = if now != last {
                        last = now.clone();
                        agent_message::Body::Report(now)
                    } else {
                        seq += 1;
                        agent_message::Body::Heartbeat(v1::Heartbeat { seq })
                    };
                    tx.send(msg(body)).await.context("sending heartbeat")?;
                }
            }
        }
    }

    /// Hands a command to the engine. Returns the result when it is known at once (a repeat of a finished
    /// operation, a refusal); otherwise the engine sends it through the results channel when it is reached.
    fn execute(&self, c: &v1::Command) -> Option<v1::OperationResult> {
        match self.engine.submit(c) {
            Submitted::Finished(r) => Some(r),
            Submitted::Running => None,
        }
    }
}

/// Decides what `channel` means on this node and puts it in force through `os`; returns the channel note
/// (empty when the channel is in force as asked).
pub fn apply_channel(
    os: &dyn NodeOs,
    channel: upkeep_core::channel::NodeOsChannel,
    node_pool: String,
    hardware_class: String,
) -> Result<String, crate::os::OsError> {
    let kind = crate::channel::NodeKind { os: crate::channel::classify(&os.os_release()?), node_pool, hardware_class };
    let plan = crate::channel::plan_channel(channel, &kind);
    let notes = os.apply_channel(&plan)?;
    Ok(std::iter::once(plan.note).chain(notes).filter(|n| !n.is_empty()).collect::<Vec<_>>().join("; "))
}

fn msg(body: agent_message::Body) -> v1::AgentMessage {
    v1::AgentMessage { body: Some(body) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::{APT_CHANNEL_CONF, APT_DAILY_TIMER_DROPIN, APT_DAILY_UPGRADE_TIMER_DROPIN};
    use crate::config::{CordonSettings, ImageSettings};
    use crate::os::fake::FakeOs;
    use std::path::PathBuf;

    fn agent(dir: &std::path::Path, os: Arc<FakeOs>, pool: &str, hw: &str) -> Agent {
        let cfg = AgentConfig {
            source: dir.join("agent.toml"),
            hub: "https://127.0.0.1:1".into(),
            hub_host: "127.0.0.1".into(),
            node_name: "n1".into(),
            member: "m1".into(),
            node_pool: pool.into(),
            region: "r1".into(),
            hardware_class: hw.into(),
            control_plane: false,
            state_dir: dir.join("state"),
            root: dir.to_path_buf(),
            tls: upkeep_proto::tls::ClientFiles {
                ca: PathBuf::from("ca.pem"),
                cert: PathBuf::from("cert.pem"),
                key: PathBuf::from("key.pem"),
                settings: ["tls.ca".into(), "tls.cert".into(), "tls.key".into()],
            },
            image: ImageSettings::defaults(dir),
            cordon: CordonSettings::default(),
        };
        Agent::new(cfg, os).expect("agent")
    }

    fn desired(generation: u64, channel: &str) -> v1::DesiredConfig {
        v1::DesiredConfig { generation, node_os_channel: channel.into(), node_os_schedule_json: String::new() }
    }

    fn files(os: &FakeOs) -> Vec<String> {
        os.with(|s| s.channel_files.keys().cloned().collect())
    }

    #[tokio::test]
    async fn adopting_a_channel_applies_it_and_switching_replaces_the_previous_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let os = Arc::new(FakeOs::default());
        os.with(|s| s.os_release = crate::os::parse_env_file("ID=debian\nVERSION_ID=12\n"));
        let a = agent(dir.path(), os.clone(), "np1", "");
        assert!(a.adopt(&desired(1, "Unmanaged")).expect("adopt"));
        a.apply_channel().await;
        assert_eq!(files(&os), [APT_CHANNEL_CONF, APT_DAILY_UPGRADE_TIMER_DROPIN, APT_DAILY_TIMER_DROPIN], "sorted");
        assert_eq!(a.channel_note(), "");
        assert_eq!(a.report().channel, "Unmanaged");
        assert!(a.adopt(&desired(2, "None")).expect("adopt"));
        a.apply_channel().await;
        assert_eq!(files(&os), [APT_CHANNEL_CONF]);
        let conf = os.with(|s| s.channel_files[APT_CHANNEL_CONF].clone());
        assert!(conf.contains("APT::Periodic::Unattended-Upgrade \"0\";"), "{conf}");
        // An older generation is ignored and applies nothing.
        let before = os.with(|s| s.calls.len());
        assert!(!a.adopt(&desired(1, "Unmanaged")).expect("adopt"));
        assert_eq!(os.with(|s| s.calls.len()), before);
        assert_eq!(
            os.with(|s| s.calls.last().cloned()).expect("a call"),
            "channel None files [etc/apt/apt.conf.d/52upkeep-channel] timers [apt-daily.timer=Off apt-daily-upgrade.timer=Off]"
        );
        assert!(!a.channel_reassert_due(), "just applied");
        *a.channel_applied_at.lock().expect("lock") = tokio::time::Instant::now().checked_sub(CHANNEL_REASSERT_EVERY);
        assert!(a.channel_reassert_due(), "an hour later the channel is put in force again");
        // A restarted agent puts the persisted channel back in force.
        let b = agent(dir.path(), os.clone(), "np1", "");
        os.with(|s| s.channel_files.clear());
        b.apply_channel().await;
        assert_eq!(files(&os), [APT_CHANNEL_CONF]);
    }

    #[tokio::test]
    async fn unknown_os_and_refused_security_patch_behave_as_none_and_say_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let os = Arc::new(FakeOs::default());
        let a = agent(dir.path(), os.clone(), "np1", "");
        assert!(a.adopt(&desired(1, "Unmanaged")).expect("adopt"));
        a.apply_channel().await;
        assert!(files(&os).is_empty());
        assert!(a.channel_note().contains("unknown OS (no os-release); behaving as None"), "{}", a.channel_note());

        let dir = tempfile::tempdir().expect("tempdir");
        let os = Arc::new(FakeOs::default());
        os.with(|s| {
            s.os_release = crate::os::parse_env_file("ID=azurelinux\n");
            s.channel_notes = vec!["dnf-automatic.timer is not installed".into()];
        });
        let a = agent(dir.path(), os.clone(), "gpunp", "gpu");
        assert!(a.adopt(&desired(1, "SecurityPatch")).expect("adopt"));
        a.apply_channel().await;
        let note = a.channel_note();
        assert!(
            note.starts_with("SecurityPatch is not supported on node pool \"gpunp\"")
                && note.contains("behaving as None; dnf-automatic.timer is not installed"),
            "{note}"
        );
        assert!(os.with(|s| s.calls.last().cloned()).expect("call").starts_with("channel None"));
    }
}
