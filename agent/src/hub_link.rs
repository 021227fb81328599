//! The agent's side of the session with its hub: connect over mutual TLS, register, heartbeat, report on
//! change, adopt the member configuration the hub pushes, answer commands; reconnect with jittered
//! exponential backoff (capped near 30 s) and re-send the full state on every new session.
//!
//! Reboot leases (SPEC §4): when the node needs a reboot on a channel that leaves reboots to the node
//! (`Unmanaged`, `SecurityPatch`) and nothing is in flight, the agent asks the hub for a lease at its
//! once-per-interval wakeup (no other timer), no more often than the hub's last `retry_after_seconds`; a denial's
//! reason is shown in the report's channel note. A granted lease (asked for, or an operator's) becomes the
//! engine's leased reboot. Every session starts with a `LeaseRelease{all_except}` naming the leases of leased
//! reboots still under way, so a lease left behind by a crash or a lost release is given back.

use crate::backoff;
use crate::config::AgentConfig;
use crate::engine::{Engine, Fetcher, LeaseTaken, Link, Submitted};
use crate::hub_socket::{HubConnector, Silence};
use crate::os::NodeOs;
use crate::state::{self, AgentState};
use crate::ticker::Ticker;
use crate::watchdog::Watchdog;
use anyhow::{Context, anyhow};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use upkeep_core::version::{ImageVersion, NodeImageVersion};
use upkeep_proto::tls::{HubAddress, client_tls};
use upkeep_proto::v1::{self, agent_message, hub_message};

/// Heartbeat interval used until the hub's Welcome says otherwise (kept with the socket timeout that follows it).
pub use crate::hub_socket::DEFAULT_HEARTBEAT;
/// How often the adopted channel is put in force again although nothing changed, so that updaters someone
/// switched back on by hand are switched off again ("kept off", SPEC §2).
pub const CHANNEL_REASSERT_EVERY: Duration = Duration::from_secs(3600);
/// Outbound queue depth of one session.
const OUTBOUND_QUEUE: usize = 16;
/// After a failed certificate renewal, the next attempt (seconds): the certificate still has a third of its life.
const RENEW_RETRY_S: i64 = 3600;
/// After a leased reboot failed on this boot, the node waits this long before it asks for the next lease (a
/// drain that cannot finish is not retried, with its cordon and uncordon, at every wakeup).
pub const LEASED_REBOOT_RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30 * 60);

/// What the agent knows when it decides whether to ask for a reboot lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseNeed<'a> {
    /// The node's facts say a reboot is required.
    pub reboot_required: bool,
    /// The adopted node OS channel, as reported (empty: none adopted yet).
    pub channel: &'a str,
    /// An operation is in flight in the engine.
    pub in_flight: bool,
    /// The current boot id.
    pub boot_id: &'a str,
    /// Finish times (Unix ms, ascending) of leased reboots already tried on this boot; they failed.
    pub tried_on_this_boot: &'a [i64],
    /// Now, Unix ms.
    pub now_ms: i64,
}

/// What the agent does about a reboot lease at a wakeup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeasePlan {
    /// Nothing: no reboot needed, the channel does not leave reboots to the node, or an operation is in flight.
    Nothing,
    /// Ask the hub for this lease.
    Ask(v1::LeaseRequest),
    /// A leased reboot failed on this boot; ask again (under the next lease id) from this time on, Unix ms.
    After(i64),
}

/// Decides whether the node asks for a reboot lease now (pure). Only `Unmanaged` and `SecurityPatch` leave the
/// reboot to the node (`None` applies nothing on its own, `NodeImage` reboots inside its reimages); the lease id
/// is `reboot/<boot id>`, and `reboot/<boot id>/<n>` for the n-th try after failed ones on the same boot.
pub fn plan_lease_request(need: &LeaseNeed<'_>) -> LeasePlan {
    use upkeep_core::channel::NodeOsChannel;
    let channel = need.channel.parse::<NodeOsChannel>().ok();
    let leaves_reboots_to_node = matches!(channel, Some(NodeOsChannel::Unmanaged | NodeOsChannel::SecurityPatch));
    if !need.reboot_required || !leaves_reboots_to_node || need.in_flight || need.boot_id.is_empty() {
        return LeasePlan::Nothing;
    }
    if let Some(last) = need.tried_on_this_boot.last() {
        let again = last.saturating_add(LEASED_REBOOT_RETRY_AFTER_FAILURE.as_millis() as i64);
        if need.now_ms < again {
            return LeasePlan::After(again);
        }
    }
    let lease_id = match need.tried_on_this_boot.len() {
        0 => format!("reboot/{}", need.boot_id),
        n => format!("reboot/{}/{}", need.boot_id, n + 1),
    };
    LeasePlan::Ask(v1::LeaseRequest { lease_id, reason: format!("reboot required ({} channel)", need.channel) })
}

/// The agent's side of the lease conversation.
#[derive(Debug, Default)]
struct LeaseAsk {
    /// The lease last asked for and not yet granted.
    asked: Option<String>,
    /// Not before this wakeup (the hub's retry_after, else one interval).
    next_at: Option<tokio::time::Instant>,
    /// Shown after the channel note: why the node is waiting (empty when it is not).
    note: String,
}

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
    /// Reboot lease asked for, when to ask again, and the denial to show.
    lease: std::sync::Mutex<LeaseAsk>,
    /// The systemd watchdog, pinged at every heartbeat tick (None outside systemd).
    watchdog: Option<Arc<Watchdog>>,
}

/// What the engine sees of the hub session: the channel of the open session (for image downloads), a count
/// of established sessions (for the after-boot health check), and a way to restart the session.
#[derive(Default)]
pub struct SessionLink {
    /// How long the session's sockets may hold unacknowledged data (follows the hub's heartbeat interval).
    silence: Silence,
    channel: std::sync::Mutex<Option<Channel>>,
    epoch: tokio::sync::watch::Sender<u64>,
    restart: tokio::sync::Notify,
    /// Leases to give back on the open session.
    releases: std::sync::Mutex<Vec<String>>,
    /// Wakes the session loop when `releases` got one.
    release_wake: tokio::sync::Notify,
}

impl SessionLink {
    fn channel(&self) -> Option<Channel> {
        self.channel.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn take_releases(&self) -> Vec<String> {
        std::mem::take(&mut *self.releases.lock().unwrap_or_else(|e| e.into_inner()))
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

    fn release_lease(&self, lease_id: &str) {
        self.releases.lock().unwrap_or_else(|e| e.into_inner()).push(lease_id.to_string());
        self.release_wake.notify_one();
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
            let stream = match client.fetch_image(v1::FetchImageRequest { sha256: sha256.clone(), offset }).await {
                Ok(r) => r.into_inner(),
                // The hub refuses an offset past the artifact's end as an invalid argument: the staged part is
                // not a prefix of this image. Start again from 0, as the `Fetcher` contract says; a request
                // refused at 0 as well is refused for another reason, which that answer names.
                Err(s) if offset > 0 && s.code() == tonic::Code::InvalidArgument => {
                    tracing::warn!(sha256, offset, reason = %s.message(), "the hub refused the staged offset; downloading from 0");
                    client
                        .fetch_image(v1::FetchImageRequest { sha256, offset: 0 })
                        .await
                        .map_err(|s| format!("FetchImage: {}: {}", s.code(), s.message()))?
                        .into_inner()
                }
                Err(s) => return Err(format!("FetchImage: {}: {}", s.code(), s.message())),
            };
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
        engine.set_url_fetcher(Arc::new(crate::os::https::HttpsFetcher::new(cfg.image.url_ca.clone())));
        Ok(Agent {
            cfg,
            os,
            state: std::sync::Mutex::new(st),
            engine,
            link,
            results: tokio::sync::Mutex::new(results_rx),
            channel_note: std::sync::Mutex::new(String::new()),
            channel_applied_at: std::sync::Mutex::new(None),
            lease: std::sync::Mutex::new(LeaseAsk::default()),
            watchdog: None,
        })
    }

    /// Pings `watchdog` at every heartbeat tick (see `watchdog`: its own timer then stays quiet).
    pub fn with_watchdog(mut self, watchdog: Option<Arc<Watchdog>>) -> Agent {
        self.watchdog = watchdog;
        self
    }

    fn lease(&self) -> std::sync::MutexGuard<'_, LeaseAsk> {
        self.lease.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The report's channel note: what the node says about its channel, then why it waits for a reboot lease.
    fn report_note(&self) -> String {
        let lease = self.lease().note.clone();
        [self.channel_note(), lease].into_iter().filter(|n| !n.is_empty()).collect::<Vec<_>>().join("; ")
    }

    /// At a wakeup: the lease request to send now, if any (see `plan_lease_request`), given the report just
    /// made. `interval` is the heartbeat interval, the fallback pause between requests.
    fn lease_tick(
        &self,
        report: &v1::NodeReport,
        interval: Duration,
        now: tokio::time::Instant,
    ) -> Option<v1::LeaseRequest> {
        let mut l = self.lease();
        if !report.reboot_required {
            // The cheap answer first: the boot id is read only when a reboot is wanted.
            l.asked = None;
            l.note.clear();
            return None;
        }
        if l.next_at.is_some_and(|t| now < t) {
            return None;
        }
        let boot_id = match self.os.boot_state() {
            Ok(b) => b.boot_id,
            Err(e) => {
                tracing::warn!(node = %self.cfg.node_name, error = %e, "reading the boot id for a reboot lease");
                return None;
            }
        };
        let tried = self.engine.leased_reboots_tried(&boot_id);
        let now_ms = chrono::Utc::now().timestamp_millis();
        let need = LeaseNeed {
            reboot_required: report.reboot_required,
            channel: &report.channel,
            in_flight: !report.operations.is_empty(),
            boot_id: &boot_id,
            tried_on_this_boot: &tried,
            now_ms,
        };
        match plan_lease_request(&need) {
            LeasePlan::Nothing => {
                l.asked = None;
                l.note.clear();
                None
            }
            LeasePlan::After(at_ms) => {
                let at = chrono::DateTime::from_timestamp_millis(at_ms)
                    .map_or_else(|| at_ms.to_string(), |t| t.to_rfc3339());
                l.note = format!(
                    "a leased reboot failed on this boot (see its operation result); asking for a reboot lease again after {at}"
                );
                l.next_at = Some(now + Duration::from_millis(at_ms.saturating_sub(now_ms).max(0) as u64));
                None
            }
            LeasePlan::Ask(req) => {
                tracing::info!(node = %self.cfg.node_name, lease = %req.lease_id, reason = %req.reason, "asking the hub for a reboot lease");
                l.asked = Some(req.lease_id.clone());
                l.next_at = Some(now + interval);
                Some(req)
            }
        }
    }

    /// Takes the hub's answer about a lease: a denial of the lease asked for is remembered (its reason shown,
    /// its retry_after respected); a grant, asked for or not (an operator's `upkeepctl node reboot`), becomes
    /// the engine's leased reboot.
    fn on_lease_answer(&self, a: &v1::LeaseAnswer, interval: Duration, now: tokio::time::Instant) {
        if !a.granted {
            let mut l = self.lease();
            if l.asked.as_deref() != Some(a.lease_id.as_str()) {
                tracing::info!(lease = %a.lease_id, reason = %a.reason, "denial of a lease not asked for ignored");
                return;
            }
            let wait =
                if a.retry_after_seconds > 0 { Duration::from_secs(a.retry_after_seconds.into()) } else { interval };
            l.next_at = Some(now + wait);
            let reason = if a.reason.trim().is_empty() { "the hub gave no reason" } else { a.reason.trim() };
            l.note = format!("waiting for a reboot lease: {reason}");
            tracing::info!(node = %self.cfg.node_name, lease = %a.lease_id, reason, retry_s = wait.as_secs(), "reboot lease denied");
            return;
        }
        {
            let mut l = self.lease();
            if l.asked.as_deref() == Some(a.lease_id.as_str()) {
                l.asked = None;
            }
            l.note.clear();
            l.next_at = Some(now + interval);
        }
        tracing::info!(node = %self.cfg.node_name, lease = %a.lease_id, forced = a.forced, expires_at_unix_ms = a.expires_at_unix_ms, "reboot lease granted");
        match self.engine.submit_lease(&a.lease_id, a.forced) {
            LeaseTaken::Started | LeaseTaken::AlreadyRunning => {}
            LeaseTaken::AlreadyFinished => {
                tracing::info!(lease = %a.lease_id, "leased reboot already finished; lease given back")
            }
            LeaseTaken::Refused(why) => {
                tracing::warn!(node = %self.cfg.node_name, lease = %a.lease_id, error = %why, "reboot lease not used")
            }
        }
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
        let (node_image_version, booted_image_version) =
            reported_image_versions(facts.node_image.as_ref(), &facts.security_patch_version);
        v1::NodeReport {
            node_name: self.cfg.node_name.clone(),
            member: self.cfg.member.clone(),
            node_pool: self.cfg.node_pool.clone(),
            region: self.cfg.region.clone(),
            os_family: facts.os_family,
            os_version: facts.os_version,
            kernel: facts.kernel,
            node_image_version,
            booted_image_version,
            security_patch_version: facts.security_patch_version,
            reboot_required: facts.reboot_required,
            channel: st.channel.unwrap_or_default(),
            agent_version: upkeep_proto::VERSION.to_string(),
            kubernetes_version: facts.kubernetes_version,
            control_plane: self.cfg.control_plane,
            hardware_class: self.cfg.hardware_class.clone(),
            operations: self.engine.operations(),
            channel_note: self.report_note(),
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
        // A certificate rotation a crash interrupted is completed before the first connection.
        match crate::renew::finish_rotation(&self.cfg.tls.cert, &self.cfg.tls.key) {
            Ok(true) => {
                tracing::info!(cert = %self.cfg.tls.cert.display(), "finished an interrupted certificate rotation")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(cert = %self.cfg.tls.cert.display(), error = %e, "finishing a certificate rotation")
            }
        }
        // Whatever the node's updaters were switched to while we were not running, the channel is put back.
        self.apply_channel().await;
        // Operations interrupted by a restart or a reboot carry on from their journalled step.
        self.engine.resume();
        let mut attempt: u32 = 0;
        // Fail-over between hub replicas: after every end the next address is tried; a connection that never got
        // to the hub's Welcome moves on to the next replica at once, and only a whole round of such failures (or
        // the end of a welcomed session) waits the jittered backoff. With one address this is the plain backoff.
        let replicas = self.cfg.hubs.len().max(1);
        let mut current = 0usize;
        let mut failed_in_round = 0usize;
        loop {
            let Some(hub) = self.cfg.hubs.get(current % replicas) else {
                return Err(anyhow!("no hub address configured"));
            };
            let end = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                end = self.session(hub) => end,
            };
            let (err, before_welcome) = match end {
                SessionEnd::AfterWelcome(e) => {
                    attempt = 0;
                    failed_in_round = 0;
                    (e, false)
                }
                SessionEnd::BeforeWelcome(e) => {
                    failed_in_round += 1;
                    (e, true)
                }
            };
            // A refused certificate is said as such (which one, why, and the fix), not as a transport error.
            let mut refusal = upkeep_proto::tls::explain_refusal(err.as_ref(), "tls.cert", "tls.ca");
            if refusal.is_none() && before_welcome {
                // Refused after the handshake (TLS 1.3), the session only saw its stream cancelled: ask directly.
                refusal = upkeep_proto::tls::probe_refusal(&hub.url, &self.cfg.tls).await;
            }
            let error = refusal.unwrap_or_else(|| format!("{err:#}").replace('\n', " "));
            current = (current + 1) % replicas;
            if before_welcome && failed_in_round < replicas {
                let next = self.cfg.hubs.get(current).map_or("", |h| h.url.as_str());
                tracing::warn!(node = %self.cfg.node_name, hub = %hub.url, %error, next = %next, "hub replica unreachable; trying the next");
                continue;
            }
            failed_in_round = 0;
            let wait = backoff::delay(attempt, fastrand::f64());
            attempt = attempt.saturating_add(1);
            tracing::warn!(node = %self.cfg.node_name, hub = %hub.url, %error, retry_in_ms = wait.as_millis() as u64, "hub session ended");
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn session(&self, hub: &HubAddress) -> SessionEnd {
        let mut welcomed = false;
        let r = self.session_inner(hub, &mut welcomed).await;
        let e = r.err().unwrap_or_else(|| anyhow!("hub closed the session"));
        if welcomed { SessionEnd::AfterWelcome(e) } else { SessionEnd::BeforeWelcome(e) }
    }

    async fn session_inner(&self, hub: &HubAddress, welcomed: &mut bool) -> anyhow::Result<()> {
        let tls = client_tls(&self.cfg.tls, &hub.host)?;
        // No HTTP/2 keep-alive pings (each is a wakeup on both sides): the heartbeat crosses the connection every
        // interval, and the socket's TCP_USER_TIMEOUT ends the session when the hub stops acknowledging it
        // (`hub_socket`). The connect timeout covers TCP and TLS.
        let channel = Endpoint::from_shared(hub.url.clone())
            .context("hub address")?
            .tls_config(tls)
            .context("tls")?
            .connect_timeout(Duration::from_secs(10))
            .connect_with_connector(HubConnector::new(self.link.silence.clone()))
            .await
            .context("connecting to the hub")?;
        *self.link.channel.lock().unwrap_or_else(|e| e.into_inner()) = Some(channel.clone());
        // Certificate rotation (see `renew`): due at 2/3 of the certificate's life, asked on this connection.
        let renew_channel = channel.clone();
        let mut renew_at = crate::renew::due_at(&self.cfg.tls.cert).ok();
        let mut renewing: Option<tokio::task::JoinHandle<anyhow::Result<i64>>> = None;
        let mut results = self.results.lock().await;
        let mut client = v1::agent_service_client::AgentServiceClient::new(channel);
        let (tx, rx) = mpsc::channel::<v1::AgentMessage>(OUTBOUND_QUEUE);
        let mut last = self.report();
        tx.send(msg(agent_message::Body::Register(last.clone()))).await.context("queueing register")?;
        // Right after Register: give back every lease but those of leased reboots under way (one left behind by a
        // crash, or whose release was lost with the last session). Releases still queued follow it: repeats are
        // harmless, and one queued while this list was made is not lost.
        let release = self.engine.lease_release_on_start();
        tracing::info!(keep = ?release.lease_ids, "giving back reboot leases not in use");
        tx.send(msg(agent_message::Body::LeaseRelease(release))).await.context("queueing lease release")?;
        let mut inbound = client.session(ReceiverStream::new(rx)).await.context("opening the session")?.into_inner();

        let mut interval = DEFAULT_HEARTBEAT;
        // The session's only timer: a kernel timer, one wakeup per tick (see `ticker`). It also pings the systemd
        // watchdog, whose own timer then never fires while the heartbeat is at most its ping interval.
        let beat = Ticker::new(DEFAULT_HEARTBEAT, DEFAULT_HEARTBEAT).context("heartbeat timer")?;
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
                            interval = every;
                            beat.reset(every, every).context("heartbeat timer")?;
                            self.link.silence.set_heartbeat(every);
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
                        Some(hub_message::Body::Lease(a)) => {
                            self.on_lease_answer(&a, interval, tokio::time::Instant::now());
                            let now = self.report();
                            if now != last {
                                last = now.clone();
                                tx.send(msg(agent_message::Body::Report(now))).await.context("sending report")?;
                            }
                        }
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
                _ = self.link.release_wake.notified() => {
                    let lease_ids = self.link.take_releases();
                    if !lease_ids.is_empty() {
                        tracing::info!(leases = ?lease_ids, "giving reboot leases back");
                        let release = v1::LeaseRelease { lease_ids, all_except: false };
                        tx.send(msg(agent_message::Body::LeaseRelease(release))).await.context("sending lease release")?;
                    }
                }
                r = beat.tick() => {
                    r.context("heartbeat timer")?;
                    if let Some(w) = &self.watchdog {
                        w.ping();
                    }
                    let now_s = chrono::Utc::now().timestamp();
                    if let Some(done) = renewing.take_if(|h| h.is_finished()) {
                        match done.await.map_err(anyhow::Error::from).and_then(|r| r) {
                            Ok(until) => {
                                tracing::info!(node = %self.cfg.node_name, not_after = until,
                                    "node certificate renewed; the next connection presents it");
                                renew_at = crate::renew::due_at(&self.cfg.tls.cert).ok();
                            }
                            Err(e) => {
                                tracing::warn!(node = %self.cfg.node_name, error = %format!("{e:#}"),
                                    retry_in_s = RENEW_RETRY_S, "renewing the node certificate");
                                renew_at = Some(now_s + RENEW_RETRY_S);
                            }
                        }
                    }
                    if renewing.is_none() && renew_at.is_some_and(|t| now_s >= t) {
                        let (ch, cert, key) = (renew_channel.clone(), self.cfg.tls.cert.clone(), self.cfg.tls.key.clone());
                        renewing = Some(tokio::spawn(async move { crate::renew::renew(ch, &cert, &key).await }));
                    }
                    if self.channel_reassert_due() {
                        self.apply_channel().await;
                    }
                    // One wakeup per interval: re-read the node, report if anything changed, else heartbeat.
                    let now = self.report();
                    crate::os::publish_labels(self.os.as_ref(), &now.node_image_version, &now.security_patch_version);
                    let ask = self.lease_tick(&now, interval, tokio::time::Instant::now());
                    let body = if now != last {
                        last = now.clone();
                        agent_message::Body::Report(now)
                    } else {
                        seq += 1;
                        agent_message::Body::Heartbeat(v1::Heartbeat { seq })
                    };
                    tx.send(msg(body)).await.context("sending heartbeat")?;
                    if let Some(req) = ask {
                        tx.send(msg(agent_message::Body::LeaseRequest(req))).await.context("sending lease request")?;
                    }
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

/// The two image versions a report carries: the node-image-version people and the node label see (the booted
/// image with the applied security patch folded in, SPEC §1) and the booted image alone, for decisions. Both
/// empty without image metadata. A patch version that does not parse is not folded in (the hub refuses the
/// report's security_patch_version and says why).
pub fn reported_image_versions(booted: Option<&NodeImageVersion>, security_patch_version: &str) -> (String, String) {
    let Some(booted) = booted else { return (String::new(), String::new()) };
    let patch = security_patch_version.parse::<ImageVersion>().ok();
    (booted.folded_with_patch(patch).label(), booted.label())
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
            hubs: vec![upkeep_proto::tls::HubAddress { url: "https://127.0.0.1:1".into(), host: "127.0.0.1".into() }],
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
            kubernetes: None,
            executor: None,
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

    #[test]
    fn a_lease_is_asked_for_only_on_unmanaged_or_security_patch_with_a_reboot_required_and_nothing_in_flight() {
        let need = |reboot_required: bool, channel: &'static str, in_flight: bool| LeaseNeed {
            reboot_required,
            channel,
            in_flight,
            boot_id: "b1",
            tried_on_this_boot: &[],
            now_ms: 1_000,
        };
        let ask = |channel: &str| {
            LeasePlan::Ask(v1::LeaseRequest {
                lease_id: "reboot/b1".into(),
                reason: format!("reboot required ({channel} channel)"),
            })
        };
        assert_eq!(plan_lease_request(&need(true, "Unmanaged", false)), ask("Unmanaged"));
        assert_eq!(plan_lease_request(&need(true, "SecurityPatch", false)), ask("SecurityPatch"));
        for (n, why) in [
            (need(false, "Unmanaged", false), "no reboot required"),
            (need(true, "None", false), "None applies nothing on its own"),
            (need(true, "NodeImage", false), "NodeImage reboots inside its reimages"),
            (need(true, "", false), "no channel adopted yet"),
            (need(true, "Unmanaged", true), "an operation in flight"),
            (LeaseNeed { boot_id: "", ..need(true, "Unmanaged", false) }, "no boot id"),
        ] {
            assert_eq!(plan_lease_request(&n), LeasePlan::Nothing, "{why}");
        }
        // After a failed leased reboot on this boot: wait, then ask under the next lease id.
        let failed_at = [1_000];
        let retry_ms = LEASED_REBOOT_RETRY_AFTER_FAILURE.as_millis() as i64;
        let soon = LeaseNeed { tried_on_this_boot: &failed_at, now_ms: 2_000, ..need(true, "Unmanaged", false) };
        assert_eq!(plan_lease_request(&soon), LeasePlan::After(1_000 + retry_ms));
        let later = LeaseNeed { now_ms: 1_000 + retry_ms, ..soon };
        match plan_lease_request(&later) {
            LeasePlan::Ask(r) => assert_eq!(r.lease_id, "reboot/b1/2"),
            other => panic!("expected a request, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_denial_is_reported_and_its_retry_after_respected_and_a_grant_starts_the_leased_reboot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let os = Arc::new(FakeOs::new(crate::os::OsFacts { reboot_required: true, ..Default::default() }));
        os.with(|s| s.os_release = crate::os::parse_env_file("ID=debian\nVERSION_ID=12\n"));
        let a = agent(dir.path(), os.clone(), "np1", "");
        assert!(a.adopt(&desired(1, "Unmanaged")).expect("adopt"));
        a.apply_channel().await;
        assert_eq!(a.report().channel_note, "");
        let every = Duration::from_secs(10);
        let t0 = tokio::time::Instant::now();
        let asked = a.lease_tick(&a.report(), every, t0).expect("a request");
        assert_eq!(asked.lease_id, "reboot/fake-0");
        assert_eq!(asked.reason, "reboot required (Unmanaged channel)");
        assert_eq!(a.lease_tick(&a.report(), every, t0 + Duration::from_secs(5)), None, "one request per interval");

        let denial = v1::LeaseAnswer {
            lease_id: asked.lease_id.clone(),
            granted: false,
            reason: "node OS window closed until 2024-03-02T01:00:00Z".into(),
            retry_after_seconds: 60,
            ..Default::default()
        };
        a.on_lease_answer(&denial, every, t0);
        let note = a.report().channel_note;
        assert_eq!(note, "waiting for a reboot lease: node OS window closed until 2024-03-02T01:00:00Z");
        assert_eq!(a.lease_tick(&a.report(), every, t0 + Duration::from_secs(30)), None, "retry_after not over");
        let again = a.lease_tick(&a.report(), every, t0 + Duration::from_secs(60)).expect("asked again");
        assert_eq!(again.lease_id, "reboot/fake-0");
        // A denial of some other lease changes nothing.
        a.on_lease_answer(&v1::LeaseAnswer { lease_id: "reboot/old".into(), ..denial.clone() }, every, t0);
        assert_eq!(a.report().channel_note, note);

        let grant = v1::LeaseAnswer {
            lease_id: again.lease_id.clone(),
            granted: true,
            expires_at_unix_ms: 1,
            ..Default::default()
        };
        a.on_lease_answer(&grant, every, t0 + Duration::from_secs(60));
        assert_eq!(a.report().channel_note, "", "cleared once granted");
        let entry = a.engine.entry("lease/reboot/fake-0").expect("leased reboot journalled");
        assert_eq!(entry.op, crate::journal::Op::LeasedReboot { lease_id: "reboot/fake-0".into(), forced: false });
        let report = a.report();
        assert_eq!(report.operations.len(), 1, "{report:?}");
        assert_eq!(a.lease_tick(&report, every, t0 + Duration::from_secs(600)), None, "nothing asked while in flight");
        // The next session gives back every lease but this one.
        assert_eq!(
            a.engine.lease_release_on_start(),
            v1::LeaseRelease { lease_ids: vec!["reboot/fake-0".into()], all_except: true }
        );
    }

    #[test]
    fn sec1_a_patched_node_reports_the_patch_folded_in_and_its_booted_image_apart() {
        let booted: NodeImageVersion = "Debian-12-202311.07.0".parse().expect("valid");
        assert_eq!(
            reported_image_versions(Some(&booted), "202312.05.1"),
            ("Debian-12-202312.05.1".to_string(), "Debian-12-202311.07.0".to_string())
        );
        assert_eq!(
            reported_image_versions(Some(&booted), ""),
            ("Debian-12-202311.07.0".to_string(), "Debian-12-202311.07.0".to_string())
        );
        assert_eq!(reported_image_versions(None, "202312.05.1"), (String::new(), String::new()));
    }

    #[tokio::test]
    async fn the_report_of_a_patched_node_carries_both_versions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let os = Arc::new(FakeOs::new(crate::os::OsFacts {
            node_image: Some("Debian-12-202311.07.0".parse().expect("valid")),
            security_patch_version: "202312.05.1".into(),
            ..Default::default()
        }));
        let a = agent(dir.path(), os, "np1", "");
        let r = a.report();
        assert_eq!(r.node_image_version, "Debian-12-202312.05.1");
        assert_eq!(r.booted_image_version, "Debian-12-202311.07.0");
        assert_eq!(r.security_patch_version, "202312.05.1");
        assert_eq!(upkeep_proto::convert::check_report("report", &r), Ok(()), "the hub accepts it");
    }

    #[tokio::test]
    async fn an_unsolicited_forced_grant_reboots_a_node_that_needs_no_reboot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let os = Arc::new(FakeOs::default());
        let a = agent(dir.path(), os.clone(), "np1", "");
        assert!(a.adopt(&desired(1, "None")).expect("adopt"));
        assert_eq!(a.lease_tick(&a.report(), Duration::from_secs(10), tokio::time::Instant::now()), None);
        let grant =
            v1::LeaseAnswer { lease_id: "operator/reboot-1".into(), granted: true, forced: true, ..Default::default() };
        a.on_lease_answer(&grant, Duration::from_secs(10), tokio::time::Instant::now());
        let entry = a.engine.entry("lease/operator/reboot-1").expect("journalled");
        assert_eq!(entry.op, crate::journal::Op::LeasedReboot { lease_id: "operator/reboot-1".into(), forced: true });
    }
}
