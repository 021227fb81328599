//! The hub's server shell: mTLS-only gRPC on a listener, until a shutdown signal.
//!
//! There is no plaintext listener and no unauthenticated RPC: the TLS layer requires a client certificate that
//! chains to the fleet CA before any request reaches a handler, and handlers then check the role.

use crate::artifacts::Artifacts;
use crate::config::HubConfig;
use crate::engine::Engine;
use crate::executor::{Executor, StepLimits};
use crate::fleet::{Fleet, Timing};
use crate::grpc::{agent::AgentApi, operator::OperatorApi};
use crate::ledger::Ledger;
use crate::maintenance::Maintenance;
use crate::store::sqlite::SqliteStore;
use anyhow::Context;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use upkeep_proto::tls::{PemKind, read_pem};
use upkeep_proto::v1::agent_service_server::AgentServiceServer;
use upkeep_proto::v1::operator_service_server::OperatorServiceServer;

/// How often batched last-seen times are written to the store.
pub const SEEN_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// The database file inside the state directory.
pub const DB_FILE: &str = "hub.db";

/// Builds the server TLS configuration: our identity, and client certificates required from the fleet CA.
pub fn server_tls(config: &HubConfig) -> anyhow::Result<ServerTlsConfig> {
    let ca = read_pem("tls.ca", &config.ca, PemKind::Certificate)?;
    let cert = read_pem("tls.cert", &config.cert, PemKind::Certificate)?;
    let key = read_pem("tls.key", &config.key, PemKind::PrivateKey)?;
    Ok(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)).client_ca_root(Certificate::from_pem(ca)))
}

/// Opens the store and builds the fleet for `config`.
pub fn open_fleet(config: &HubConfig) -> anyhow::Result<Arc<Fleet>> {
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("state_dir = {}: cannot create", config.state_dir.display()))?;
    let store = SqliteStore::open(&config.state_dir.join(DB_FILE))?;
    Ok(Arc::new(Fleet::new(
        Arc::new(store),
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
    let tls = server_tls(&config)?;
    // One ledger of nodes out of service and one executor for every disruption, shared by runs and channels.
    let ledger = Ledger::new(fleet.clone(), config.auto_upgrade.lease_ttl);
    let executor = Executor::new(fleet.clone(), ledger, StepLimits::default());
    let engine = Engine::new(fleet.clone(), executor.clone());
    let engine_task = tokio::spawn(engine.clone().run());
    let maintenance = Maintenance::new(fleet.clone(), config.auto_upgrade, executor);
    let maintenance_task = tokio::spawn(maintenance.clone().run());
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
            }
        })
    };
    let addr = listener.local_addr().context("reading the listen address")?;
    // Nagle off: with it on, every mTLS handshake stalls ~40 ms on delayed ACKs.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tracing::info!(%addr, "upkeep-hub listening (mTLS only)");
    let closing_fleet = fleet.clone();
    let shutdown = async move {
        shutdown.await;
        closing_fleet.close_all_sessions();
    };
    let result = Server::builder()
        .tls_config(tls)
        .context("tls configuration")?
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(AgentServiceServer::new(AgentApi::new(
            fleet.clone(),
            maintenance.clone(),
            Artifacts::new(&config.state_dir),
        )))
        .add_service(OperatorServiceServer::new(OperatorApi::new(
            fleet.clone(),
            engine.clone(),
            maintenance.clone(),
            Artifacts::new(&config.state_dir),
            config.trusted_image_keys.clone(),
        )))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("serving gRPC");
    flusher.abort();
    engine_task.abort();
    maintenance_task.abort();
    if let Err(e) = fleet.flush_seen() {
        tracing::error!(error = %e, "flushing last-seen times at shutdown");
    }
    result
}
