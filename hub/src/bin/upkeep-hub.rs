//! upkeep-hub: thin main. `upkeep-hub [--config FILE]` serves; `upkeep-hub check-config` validates and exits.

use upkeep_proto::service;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use upkeep_hub::config::{self, Overrides};

/// The upkeep control plane.
#[derive(Debug, Parser)]
#[command(name = "upkeep-hub", version)]
struct Args {
    /// Configuration file.
    #[arg(long, env = "UPKEEP_HUB_CONFIG", default_value = "/etc/upkeep/hub.toml")]
    config: PathBuf,
    /// Listen address (overrides `listen`).
    #[arg(long)]
    listen: Option<String>,
    /// State directory (overrides `state_dir`).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Validate the configuration and exit (for ExecStartPre=).
    CheckConfig,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("upkeep-hub: error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let overrides = Overrides { listen: args.listen.clone(), state_dir: args.state_dir.clone() };
    let cfg = config::load(&args.config, &overrides)?;
    upkeep_hub::server::server_tls(&cfg)?;
    if matches!(args.command, Some(Cmd::CheckConfig)) {
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    service::init_logging();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("listen = {}: cannot bind", cfg.listen))?;
        // The watchdog pings from this same runtime: if it stalls, systemd restarts us.
        let watchdog = tokio::spawn(service::watchdog());
        // Ready once the port is bound: from here on, agents and upkeepctl can connect (the database is opened
        // by `serve` next; if that fails the hub exits non-zero and systemd sees the failure).
        service::ready(&format!("listening on {} (mTLS only), state in {}", cfg.listen, cfg.state_dir.display()));
        let result = upkeep_hub::server::serve(cfg, listener, shutdown_signal()).await;
        watchdog.abort();
        result
    })
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    tracing::info!("shutting down");
    service::stopping("shutting down");
}
