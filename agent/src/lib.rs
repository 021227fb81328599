//! upkeep-agent: the node daemon.
//!
//! Code map: `config` (agent.toml), `channel` (pure node OS channel decisions: owned drop-ins, timers, refusals), `os` (the one seam to the machine: trait NodeOs), `state` (atomic
//! persisted state), `journal` (write-ahead journal of operations), `engine` (executes hub commands step by
//! step through the journal), `hub_link` (the mTLS session with the hub), `backoff` (pure reconnect delays).
//! The agent never trusts the hub with its identity: its node name comes from its own certificate.

pub mod backoff;
pub mod channel;
pub mod config;
pub mod engine;
pub mod hub_link;
pub mod hub_socket;
pub mod join;
pub mod journal;
pub mod os;
pub mod renew;
pub mod state;
pub mod ticker;
pub mod watchdog;

use std::future::Future;
use std::sync::Arc;

/// Runs an agent with `cfg` on the real host (under `cfg.root`) until `shutdown` completes.
pub async fn run(cfg: config::AgentConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    run_with_watchdog(cfg, None, shutdown).await
}

/// Like `run`, pinging the systemd `watchdog` at every heartbeat.
pub async fn run_with_watchdog(
    cfg: config::AgentConfig,
    watchdog: Option<Arc<watchdog::Watchdog>>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    // With `[executor]`, this process is the unprivileged network half and the executor does the node's work.
    let os: Arc<dyn os::NodeOs> = match &cfg.executor {
        Some(x) => {
            tracing::info!(socket = %x.socket.display(), "node operations go through the executor");
            let remote = os::remote::RemoteOs::new(&x.socket).follow_facts();
            // The Kubernetes API is network: this half talks to it, not the root executor.
            Arc::new(match cfg.kubernetes.as_ref().and_then(|k| k.api.clone()) {
                Some(api) => remote.with_kube(Arc::new(os::kube::KubeNode::new(api, &cfg.state_dir))),
                None => remote,
            })
        }
        None => Arc::new(os::host::HostOs::from_config(&cfg)),
    };
    let agent = Arc::new(hub_link::Agent::new(cfg, os)?.with_watchdog(watchdog));
    agent.run(shutdown).await
}
