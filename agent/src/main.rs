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
    let cfg = upkeep_agent::config::load(&args.config)?;
    if matches!(args.command, Some(Cmd::CheckConfig)) {
        println!("{}: ok (node {})", args.config.display(), cfg.node_name);
        return Ok(());
    }
    service::init_logging();
    // One thread is plenty for one session and keeps the footprint small.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
    rt.block_on(async move {
        // The watchdog pings from this same runtime (if it stalls, systemd restarts us), at every heartbeat and,
        // when none comes in time, from its own timer.
        let watchdog = upkeep_agent::watchdog::Watchdog::from_env().context("watchdog timer")?.map(Arc::new);
        let serving = watchdog.clone().map(|w| tokio::spawn(async move { w.serve(|| {}).await }));
        tracing::info!(node = %cfg.node_name, hub = %cfg.hub, member = %cfg.member, "upkeep-agent started");
        service::ready(&format!("node {} of member {}, hub {}", cfg.node_name, cfg.member, cfg.hub));
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
