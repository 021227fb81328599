//! The hub's server shell: mTLS-only gRPC on a listener, until a shutdown signal.
//!
//! There is no plaintext listener. A client certificate, when presented, must chain to the fleet CA at the TLS
//! layer; every handler then requires one and checks its role, except the join service, which serves the public
//! CA and redeems join tokens (`grpc::join`).

use crate::artifacts::Artifacts;
use crate::config::HubConfig;
use crate::door::{DoorLimits, Occupancy};
use crate::engine::Engine;
use crate::executor::{Executor, StepLimits};
use crate::fleet::{Fleet, Timing};
use crate::grpc::{agent::AgentApi, join::JoinApi, operator::OperatorApi};
use crate::ledger::Ledger;
use crate::maintenance::Maintenance;
use crate::revocation::Revocations;
use anyhow::Context;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::transport::Server;
use upkeep_proto::tls::{PemKind, read_pem};
use upkeep_proto::v1::agent_service_server::AgentServiceServer;
use upkeep_proto::v1::join_service_server::JoinServiceServer;
use upkeep_proto::v1::operator_service_server::OperatorServiceServer;

/// How often batched last-seen times are written to the store.
pub const SEEN_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// The database file inside the state directory.
pub const DB_FILE: &str = crate::store::safety::DB_FILE;

/// Builds the server TLS configuration: our identity, and client certificates required from the fleet CA.
pub fn server_tls(config: &HubConfig, revocations: Arc<Revocations>) -> anyhow::Result<rustls::ServerConfig> {
    let ca = read_pem("tls.ca", &config.ca, PemKind::Certificate)?;
    let cert = read_pem("tls.cert", &config.cert, PemKind::Certificate)?;
    let key = read_pem("tls.key", &config.key, PemKind::PrivateKey)?;
    crate::door::server_config(&ca, &cert, &key, revocations).map_err(|e| anyhow::anyhow!(e))
}

/// The join service for `config`: the fleet CA it hands out, and the issuing CA when `tls.issuer_cert` and
/// `tls.issuer_key` are set (without them joins are refused with a line naming those settings).
pub fn join_api(config: &HubConfig, fleet: Arc<Fleet>, issuer: Option<Arc<crate::pki::Ca>>) -> anyhow::Result<JoinApi> {
    let ca = read_pem("tls.ca", &config.ca, PemKind::Certificate)?;
    Ok(JoinApi::new(fleet, issuer, String::from_utf8_lossy(&ca).into_owned()))
}

/// The issuing CA of `config` (`tls.issuer_cert`, `tls.issuer_key`), which signs joining nodes' certificates and
/// renewals; None when not set.
pub fn issuer(config: &HubConfig) -> anyhow::Result<Option<Arc<crate::pki::Ca>>> {
    match &config.issuer {
        Some(f) => {
            let ca = crate::pki::Ca::load_files(&f.cert, &f.key, true).context("tls.issuer_cert/tls.issuer_key")?;
            let ca_pem = std::fs::read(&config.ca).with_context(|| format!("tls.ca: {}", config.ca.display()))?;
            crate::client_verifier::check_issuer(&ca_pem, &ca).map_err(|why| {
                anyhow::anyhow!(
                    "tls.issuer_cert: {} does not issue certificates this hub accepts under tls.ca {} ({why}); give \
                     the issuer.pem and issuer.key that `upkeepctl pki init` wrote next to that ca.pem",
                    f.cert.display(),
                    config.ca.display()
                )
            })?;
            Ok(Some(Arc::new(ca)))
        }
        None => Ok(None),
    }
}

/// Largest message an agent may send (reports, results; image bytes flow the other way).
pub const AGENT_MESSAGE_LIMIT: usize = 1024 * 1024;
/// Largest message an operator may send (strategies, run specs, artifact chunks).
pub const OPERATOR_MESSAGE_LIMIT: usize = 4 * 1024 * 1024;
/// Streams one connection may have open at once (an agent needs its session and an image download or two).
pub const STREAMS_PER_CONNECTION: u32 = 32;

/// Opens the store and builds the fleet for `config`. A state directory whose database is lost or damaged is
/// refused (`store::safety::open_state`), never served as an empty fleet; a PostgreSQL database whose schema is
/// not current is refused with a line naming `upkeep-hub migrate`.
pub fn open_fleet(config: &HubConfig) -> anyhow::Result<Arc<Fleet>> {
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("state_dir = {}: cannot create", config.state_dir.display()))?;
    let store = crate::store::open(&config.store, &config.state_dir)?;
    Ok(Arc::new(Fleet::new(
        store,
        Timing {
            heartbeat_interval_seconds: config.heartbeat_interval_seconds,
            silent_after_heartbeats: config.silent_after_heartbeats,
        },
    )?))
}

/// Serves the hub on `listener` until `shutdown` completes, then ends agent sessions and stops.
pub async fn serve(
    config: HubConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let fleet = open_fleet(&config)?;
    serve_fleet(config, fleet, listener, shutdown).await
}

/// Serves an already opened fleet (tests use this to reach the fleet from outside).
pub async fn serve_fleet(
    config: HubConfig,
    fleet: Arc<Fleet>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_fleet_with_local_agents(config, fleet, listener, shutdown, None).await
}

/// [`serve_fleet`], also handing out the agent API so that in-process simulated nodes can open sessions
/// without a socket each (`AgentApi::open_session`; the fleet-scale bench, past the descriptor limit).
pub async fn serve_fleet_with_local_agents(
    config: HubConfig,
    fleet: Arc<Fleet>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    local: Option<tokio::sync::oneshot::Sender<Arc<AgentApi>>>,
) -> anyhow::Result<()> {
    let tls = server_tls(&config, fleet.revocations().clone())?;
    // One ledger of nodes out of service and one executor for every disruption, shared by runs and channels.
    let ledger = Ledger::new(fleet.clone(), config.auto_upgrade.lease_ttl);
    let executor = Executor::new(fleet.clone(), ledger, StepLimits::default());
    let engine = Engine::new(fleet.clone(), executor.clone());
    let maintenance = Maintenance::new(fleet.clone(), config.auto_upgrade, executor.clone());
    // A single hub runs the leader's loops itself; a replica of several (`[cluster]`) runs them only while it
    // leads (`crate::cluster`).
    let mut leader_tasks = Vec::new();
    let leadership = match &config.cluster {
        None => {
            leader_tasks.push(tokio::spawn(engine.clone().run()));
            leader_tasks.push(tokio::spawn(maintenance.clone().run()));
            if !config.webhooks.upcoming_notice.is_zero() {
                leader_tasks.push(tokio::spawn(crate::schedule::notices(
                    engine.clone(),
                    maintenance.clone(),
                    config.webhooks.upcoming_notice,
                )));
            }
            None
        }
        Some(settings) => Some({
            // Commands, results, sessions and view changes between the replicas (`crate::relay`).
            let relay = crate::relay::Relay::new(&settings.replica, fleet.epoch(), fleet.shared_store())
                .context("joining the other hub replicas")?;
            fleet.set_relay(relay.clone());
            relay
                .start(
                    crate::relay::Hands {
                        fleet: fleet.clone(),
                        maintenance: maintenance.clone(),
                        engine: engine.clone(),
                    },
                    tokio::runtime::Handle::current(),
                )
                .context("starting the relay between hub replicas")?;
            crate::cluster::Leadership::start(
                settings.clone(),
                crate::cluster::LeaderParts {
                    fleet: fleet.clone(),
                    engine: engine.clone(),
                    maintenance: maintenance.clone(),
                    executor: executor.clone(),
                    upcoming_notice: config.webhooks.upcoming_notice,
                },
            )
            .context("starting the leadership thread")?
        }),
    };
    let webhooks_task = tokio::spawn(crate::webhooks::run(fleet.clone(), config.webhooks.clone()));
    let flusher = {
        let fleet = fleet.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SEEN_FLUSH_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = fleet.flush_seen() {
                    tracing::error!(error = %e, "flushing last-seen times");
                }
                fleet.announce_silences();
            }
        })
    };
    // The hub's own certificates (its own, the fleet CA, the issuing CA): warned about 14 days ahead, at start and
    // once a day.
    let expiry = {
        let certs = config.certificates();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(24 * 3600));
            loop {
                tick.tick().await;
                crate::certstatus::warn_if_expiring(&certs);
            }
        })
    };
    // Prometheus metrics on their own listener, when configured; bound here so that a taken port fails the start.
    let metrics = match config.metrics {
        None => None,
        Some(addr) => {
            let l = TcpListener::bind(addr).await.with_context(|| format!("metrics.listen = {addr}: cannot bind"))?;
            let certs = config.certificates();
            tracing::info!(addr = %l.local_addr().unwrap_or(addr), "metrics served (GET /metrics, plain HTTP)");
            let source = Arc::new(crate::metrics::Source::new(fleet.clone(), certs));
            Some(tokio::spawn(crate::metrics::serve(l, source)))
        }
    };
    let addr = listener.local_addr().context("reading the listen address")?;
    // The front door: TLS with a handshake deadline, connections capped below the descriptor limit, a share kept
    // for operators (Nagle is off on every accepted socket: with it on, mTLS handshakes stall ~40 ms).
    // A node connection silent past the node's silence deadline (plus slack) is closed: no HTTP/2 pings needed.
    let limits = DoorLimits::for_this_process(config.limits.handshake_timeout).closing_silent_nodes(
        Duration::from_secs(u64::from(config.heartbeat_interval_seconds)),
        Duration::from_millis(u64::try_from(fleet.silence_deadline_ms()).unwrap_or(0)),
    );
    let (conns, door) = crate::door::incoming(
        listener,
        Arc::new(tls),
        limits,
        Arc::new(Occupancy::default()),
        fleet.revocations().clone(),
    );
    let incoming = tokio_stream::wrappers::ReceiverStream::new(conns);
    tracing::info!(%addr, max_connections = limits.max_connections, operator_reserve = limits.operator_reserve,
        handshake_timeout_s = limits.handshake_timeout.as_secs(),
        node_idle_s = limits.node_idle.map(|d| d.as_secs()).unwrap_or(0), "upkeep-hub listening (mTLS only)");
    let closing_fleet = fleet.clone();
    let shutdown = async move {
        shutdown.await;
        closing_fleet.close_all_sessions();
    };
    let issuer = issuer(&config)?;
    let agents = Arc::new(
        AgentApi::new(
            fleet.clone(),
            maintenance.clone(),
            Artifacts::at(&config.artifacts_dir),
            config.limits.fetches_per_node,
        )
        .with_issuer(issuer.clone()),
    );
    if let Some(local) = local {
        let _ = local.send(agents.clone());
    }
    let join = join_api(&config, fleet.clone(), issuer)?;
    // No HTTP/2 keep-alive pings: they cost a timer and a wakeup per connection, and liveness is proven
    // otherwise (agents heartbeat and the door closes silent node connections). Window sizes are left at hyper's
    // defaults: they bound what a peer may send ahead, they do not allocate.
    let result = Server::builder()
        .max_concurrent_streams(Some(STREAMS_PER_CONNECTION))
        .add_service(AgentServiceServer::from_arc(agents).max_decoding_message_size(AGENT_MESSAGE_LIMIT))
        .add_service(JoinServiceServer::new(join).max_decoding_message_size(crate::grpc::join::JOIN_MESSAGE_LIMIT))
        .add_service(
            OperatorServiceServer::new(OperatorApi::new(
                fleet.clone(),
                engine.clone(),
                maintenance.clone(),
                Artifacts::at(&config.artifacts_dir),
                config.trusted_image_keys.clone(),
            ))
            .max_decoding_message_size(OPERATOR_MESSAGE_LIMIT),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("serving gRPC");
    // The server dropped the stream of connections: the door stops and closes the listening socket. Waited for,
    // so that the address is free when this returns (a hub started again in the same process binds it at once).
    if tokio::time::timeout(Duration::from_secs(5), door).await.is_err() {
        tracing::warn!("the door did not stop within 5 s");
    }
    flusher.abort();
    expiry.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    for t in leader_tasks {
        t.abort();
    }
    if let Some(l) = leadership {
        // Joining the leadership thread waits for its current database call: off the async threads.
        let _ = tokio::task::spawn_blocking(move || l.stop()).await;
    }
    if let Some(relay) = fleet.relay() {
        // What the sessions' ends queued is posted before the relay stops.
        let _ = tokio::task::spawn_blocking(move || relay.stop()).await;
    }
    webhooks_task.abort();
    if let Err(e) = fleet.flush_seen() {
        tracing::error!(error = %e, "flushing last-seen times at shutdown");
    }
    result
}
