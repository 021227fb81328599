//! upkeep-agent: thin main. `upkeep-agent [--config FILE]` runs; `upkeep-agent check-config` validates;
//! `upkeep-agent man --dir DIR` (hidden) writes the man page the packages ship.

use upkeep_proto::service;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

/// The upkeep node agent: applies the node's OS upgrade channel and carries out the hub's commands (cordon,
/// drain, upgrade, reboot) over mutual TLS.
#[derive(Debug, Parser)]
#[command(name = "upkeep-agent", version)]
struct Args {
    /// Configuration file.
    #[arg(long, env = "UPKEEP_AGENT_CONFIG", default_value = upkeep_agent::config::DEFAULT_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Validate the configuration (and the certificate's identity) and exit.
    CheckConfig,
    /// Enroll this node: make its key here, send a certificate request with a join token
    /// (`upkeepctl pki token create`), write ca.pem, node.pem, node.key and the configuration (if missing).
    Join {
        /// Hub address, e.g. https://hub.example:7443.
        #[arg(long)]
        hub: String,
        /// The join token (upkeep-join-...).
        #[arg(long)]
        token: String,
        /// SHA-256 fingerprint of the fleet CA (`upkeepctl pki fingerprint --dir DIR`; colons allowed).
        #[arg(long)]
        ca_fingerprint: String,
        /// The node's name (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// Where to write the key and certificates.
        #[arg(long, default_value = "/etc/upkeep/pki")]
        pki_dir: PathBuf,
        /// Region written into a new configuration.
        #[arg(long, default_value = "default")]
        region: String,
        /// State directory written into a new configuration.
        #[arg(long, default_value = "/var/lib/upkeep/agent")]
        state_dir: PathBuf,
    },
    /// Run the privileged executor: serve the node operations of `[executor] socket` to the unprivileged
    /// network half (the user `[executor] client_user`), re-checking every request (run by
    /// upkeep-agent-executor.service).
    Executor,
    /// Write this command's man pages into DIR (for packaging; needs no configuration).
    #[command(hide = true)]
    Man {
        /// Output directory.
        #[arg(long)]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("upkeep-agent: error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    if let Some(Cmd::Man { dir }) = &args.command {
        std::fs::create_dir_all(dir).with_context(|| format!("--dir {}: cannot create", dir.display()))?;
        clap_mangen::generate_to(<Args as clap::CommandFactory>::command(), dir)
            .with_context(|| format!("--dir {}: writing man pages", dir.display()))?;
        return Ok(());
    }
    if let Some(Cmd::Join { hub, token, ca_fingerprint, name, pki_dir, region, state_dir }) = &args.command {
        let join = upkeep_agent::join::JoinArgs {
            hub: hub.clone(),
            token: token.clone(),
            ca_fingerprint: ca_fingerprint.clone(),
            name: name.clone(),
            config: args.config.clone(),
            pki_dir: pki_dir.clone(),
            region: region.clone(),
            state_dir: state_dir.clone(),
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
        for line in rt.block_on(upkeep_agent::join::join(&join))? {
            println!("{line}");
        }
        return Ok(());
    }
    let cfg = upkeep_agent::config::load(&args.config)?;
    if matches!(args.command, Some(Cmd::CheckConfig)) {
        println!("{}: ok (node {})", args.config.display(), cfg.node_name);
        return Ok(());
    }
    service::init_logging();
    if matches!(args.command, Some(Cmd::Executor)) {
        return upkeep_agent::os::executor::run(&cfg).map_err(anyhow::Error::msg);
    }
    // One thread is plenty for one session and keeps the footprint small.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
    rt.block_on(async move {
        // The watchdog pings from this same runtime (if it stalls, systemd restarts us), at every heartbeat and,
        // when none comes in time, from its own timer.
        let watchdog = upkeep_agent::watchdog::Watchdog::from_env().context("watchdog timer")?.map(Arc::new);
        let serving = watchdog.clone().map(|w| tokio::spawn(async move { w.serve(|| {}).await }));
        let hubs = cfg.hubs.iter().map(|h| h.url.as_str()).collect::<Vec<_>>().join(", ");
        tracing::info!(node = %cfg.node_name, hub = %hubs, member = %cfg.member, "upkeep-agent started");
        service::ready(&format!("node {} of member {}, hub {hubs}", cfg.node_name, cfg.member));
        let result = upkeep_agent::run_with_watchdog(cfg, watchdog, shutdown_signal()).await;
        if let Some(s) = serving {
            s.abort();
        }
        result
    })
}

async fn shutdown_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = tokio::signal::ctrl_c() => {},
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutting down");
    service::stopping("shutting down");
}
