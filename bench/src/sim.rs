//! Simulated agents: real mutual-TLS sessions speaking the real `upkeep.v1` agent protocol, with little state
//! each, many per process on one tokio runtime.
//!
//! A simulated agent registers with a fixed report, heartbeats at the interval the hub's Welcome gives (or as
//! fast as the hub reads, in flood mode), answers every command with an ok result at once, and after a Reimage
//! result reports the new node-image-version, as the real agent does. On any break it reconnects with the
//! agent's backoff (equal jitter, 200 ms doubling to 30 s; `agent/src/backoff.rs`). It does not adopt
//! DesiredConfig (no OS to change). It must not be used as a reference for the agent's behaviour beyond that.

use crate::certs::NodeCert;
use anyhow::{Context, anyhow};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

/// What the hub sends on a session, over either transport.
type Inbound = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::HubMessage, tonic::Status>> + Send>>;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use upkeep_proto::v1::{self, agent_message::Body, hub_message};

/// What every simulated agent shares.
#[derive(Debug, Clone)]
pub struct SimSpec {
    /// `https://127.0.0.1:PORT`.
    pub hub_url: String,
    /// The name the hub's certificate carries.
    pub domain: String,
    /// Fleet CA PEM.
    pub ca_pem: String,
    /// Image family reported.
    pub family: String,
    /// Version reported before a Reimage.
    pub old_version: String,
    /// Version reported after a Reimage.
    pub new_version: String,
    /// Region of every node.
    pub region: String,
}

/// One simulated node.
#[derive(Clone)]
pub struct SimNode {
    /// Certificate and key.
    pub cert: Arc<NodeCert>,
    /// Member index (the member is named `m-<index, 4 digits>`).
    pub member: u32,
    /// Source address to connect from (several loopback addresses widen the ephemeral port space).
    pub source: IpAddr,
    /// Sessions opened inside this process on an in-process hub's agent API (no socket, no TLS) instead.
    pub local: Option<Arc<upkeep_hub::grpc::agent::AgentApi>>,
}

/// The member name for index `i`.
pub fn member_name(i: u32) -> String {
    format!("m-{i:04}")
}

/// What the agents are doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Normal: heartbeat at the Welcome interval.
    Normal,
    /// Send heartbeats as fast as the hub reads them.
    Flood,
    /// End sessions and stop.
    Stop,
}

/// One command as seen by a simulated agent.
#[derive(Debug, Clone, Copy)]
pub struct OpRecord {
    /// Member index.
    pub member: u32,
    /// cordon, drain, reimage, uncordon, other.
    pub kind: &'static str,
    /// When the command arrived.
    pub received: Instant,
    /// When the ok result was queued.
    pub answered: Instant,
}

/// Counters and controls shared by all simulated agents.
pub struct Shared {
    /// Sessions currently welcomed.
    pub registered: AtomicUsize,
    /// Welcomes received in total.
    pub welcomes: AtomicU64,
    /// Heartbeats queued to the hub in total.
    pub heartbeats: AtomicU64,
    /// Sessions that failed or ended.
    pub failures: AtomicU64,
    /// The last failure's message (a sample for the report).
    pub last_error: Mutex<String>,
    /// Limits connects + registers in flight.
    pub connecting: Semaphore,
    /// Commands seen (only when `record_ops`).
    pub ops: Mutex<Vec<OpRecord>>,
    /// Whether to record commands.
    pub record_ops: bool,
    /// Phase control.
    pub phase: watch::Sender<Phase>,
}

impl Shared {
    /// New shared state allowing `connect_concurrency` connects at once.
    pub fn new(connect_concurrency: usize, record_ops: bool) -> Arc<Shared> {
        Arc::new(Shared {
            registered: AtomicUsize::new(0),
            welcomes: AtomicU64::new(0),
            heartbeats: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_error: Mutex::new(String::new()),
            connecting: Semaphore::new(connect_concurrency.max(1)),
            ops: Mutex::new(Vec::new()),
            record_ops,
            phase: watch::channel(Phase::Normal).0,
        })
    }

    /// Sessions currently welcomed.
    pub fn registered(&self) -> usize {
        self.registered.load(Ordering::Relaxed)
    }
}

/// Decrements `registered` when a welcomed session ends.
struct Welcomed<'a>(&'a AtomicUsize);

impl Drop for Welcomed<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The agent's reconnect delay (same formula as `upkeep_agent::backoff::delay`).
pub fn backoff(attempt: u32, u: f64) -> Duration {
    let base = Duration::from_millis(200);
    let cap = Duration::from_secs(30);
    let ceiling = base.saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX)).min(cap);
    ceiling.mul_f64(0.5 + 0.5 * u.clamp(0.0, 1.0))
}

/// Runs one simulated agent until the phase turns to Stop.
pub async fn run_agent(node: SimNode, spec: Arc<SimSpec>, shared: Arc<Shared>) {
    let mut image = spec.old_version.clone();
    let mut attempt = 0u32;
    let mut phase = shared.phase.subscribe();
    loop {
        if *phase.borrow() == Phase::Stop {
            return;
        }
        let mut welcomed = false;
        let r = session(&node, &spec, &shared, &mut image, &mut welcomed).await;
        if *phase.borrow() == Phase::Stop {
            return;
        }
        shared.failures.fetch_add(1, Ordering::Relaxed);
        let e = r.err().unwrap_or_else(|| anyhow!("hub closed the session"));
        *shared.last_error.lock().unwrap_or_else(|p| p.into_inner()) = format!("{e:#}");
        if welcomed {
            attempt = 0;
        }
        let delay = backoff(attempt, fastrand::f64());
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = phase.wait_for(|p| *p == Phase::Stop) => return,
        }
    }
}

fn msg(body: Body) -> v1::AgentMessage {
    v1::AgentMessage { body: Some(body) }
}

fn report(node: &SimNode, spec: &SimSpec, image: &str) -> v1::NodeReport {
    v1::NodeReport {
        node_name: node.cert.name.clone(),
        member: member_name(node.member),
        node_pool: "pool".into(),
        region: spec.region.clone(),
        os_family: "debian".into(),
        os_version: "12".into(),
        kernel: "6.1.0-bench".into(),
        node_image_version: format!("{}-{image}", spec.family),
        agent_version: "bench".into(),
        ..Default::default()
    }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

async fn session(
    node: &SimNode,
    spec: &SimSpec,
    shared: &Shared,
    image: &mut String,
    welcomed: &mut bool,
) -> anyhow::Result<()> {
    let mut permit = Some(shared.connecting.acquire().await.context("connect semaphore")?);
    let (tx, rx) = mpsc::channel::<v1::AgentMessage>(16);
    tx.send(msg(Body::Register(report(node, spec, image)))).await.context("queueing register")?;
    let mut inbound: Inbound = match &node.local {
        Some(agents) => {
            let outbound = Box::pin(ReceiverStream::new(rx).map(Ok));
            agents.open_session(node.cert.name.clone(), outbound).await.context("opening the session")?
        }
        None => {
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&spec.ca_pem))
                .identity(Identity::from_pem(&node.cert.cert, &node.cert.key))
                .domain_name(spec.domain.clone());
            let channel = Endpoint::from_shared(spec.hub_url.clone())
                .context("hub url")?
                .tls_config(tls)
                .context("tls")?
                .local_address(Some(node.source))
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(30))
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(10))
                .connect()
                .await
                .context("connecting")?;
            let mut client = v1::agent_service_client::AgentServiceClient::new(channel);
            Box::pin(client.session(ReceiverStream::new(rx)).await.context("opening the session")?.into_inner())
        }
    };
    let mut phase = shared.phase.subscribe();
    let mut guard: Option<Welcomed<'_>> = None;
    let mut every = Duration::from_secs(3600);
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut seq = 0u64;
    loop {
        let flooding = guard.is_some() && *phase.borrow() == Phase::Flood;
        tokio::select! {
            m = inbound.next() => {
                let m = m.ok_or_else(|| anyhow!("hub ended the session"))?.context("session")?;
                match m.body {
                    Some(hub_message::Body::Welcome(w)) => {
                        *welcomed = true;
                        let _ = permit.take();
                        if guard.is_none() {
                            shared.registered.fetch_add(1, Ordering::Relaxed);
                            guard = Some(Welcomed(&shared.registered));
                        }
                        shared.welcomes.fetch_add(1, Ordering::Relaxed);
                        every = Duration::from_secs(u64::from(w.heartbeat_interval_seconds.max(1)));
                        // Spread the fleet's heartbeats over the interval, as independent agents would be.
                        let first = every.mul_f64(fastrand::f64());
                        beat = tokio::time::interval_at(tokio::time::Instant::now() + first, every);
                        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                    Some(hub_message::Body::Desired(_)) | Some(hub_message::Body::Lease(_)) | None => {}
                    Some(hub_message::Body::Command(c)) => {
                        let received = Instant::now();
                        let kind = match &c.kind {
                            Some(v1::command::Kind::Cordon(_)) => "cordon",
                            Some(v1::command::Kind::Drain(_)) => "drain",
                            Some(v1::command::Kind::Reimage(_)) => "reimage",
                            Some(v1::command::Kind::Uncordon(_)) => "uncordon",
                            _ => "other",
                        };
                        let result = v1::OperationResult {
                            operation_id: c.operation_id.clone(),
                            generation: c.generation,
                            ok: true,
                            error: String::new(),
                            finished_at_unix_ms: unix_ms(),
                            busy: false,
                        };
                        tx.send(msg(Body::Result(result))).await.context("sending result")?;
                        if kind == "reimage" && *image != spec.new_version {
                            image.clone_from(&spec.new_version);
                            tx.send(msg(Body::Report(report(node, spec, image)))).await.context("sending report")?;
                        }
                        if shared.record_ops {
                            let rec = OpRecord { member: node.member, kind, received, answered: Instant::now() };
                            shared.ops.lock().unwrap_or_else(|p| p.into_inner()).push(rec);
                        }
                    }
                }
            }
            _ = beat.tick(), if guard.is_some() && !flooding => {
                seq += 1;
                tx.send(msg(Body::Heartbeat(v1::Heartbeat { seq }))).await.context("sending heartbeat")?;
                shared.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
            p = tx.reserve(), if flooding => {
                seq += 1;
                p.context("session queue closed")?.send(msg(Body::Heartbeat(v1::Heartbeat { seq })));
                shared.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
            changed = phase.changed() => {
                if changed.is_err() || *phase.borrow() == Phase::Stop {
                    return Ok(());
                }
            }
        }
    }
}
