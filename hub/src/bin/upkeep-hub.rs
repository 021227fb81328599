//! upkeep-hub: thin main. `upkeep-hub [--config FILE]` serves; `upkeep-hub check-config` validates and exits;
//! `upkeep-hub backup FILE` copies a running hub's database; `upkeep-hub restore FILE` puts one back (hub stopped);
//! `upkeep-hub migrate` brings a PostgreSQL store's schema up to date (SQLite migrates itself at start);
//! `upkeep-hub man --dir DIR` (hidden) writes the man pages the packages ship.

use upkeep_proto::service;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use upkeep_hub::config::{self, Overrides};
use upkeep_hub::store::safety;

/// The upkeep control plane: keeps the fleet inventory and orchestrates staged OS update runs over mutual TLS.
#[derive(Debug, Parser)]
#[command(name = "upkeep-hub", version)]
struct Args {
    /// Configuration file (before or after the subcommand: `upkeep-hub migrate --config FILE`).
    #[arg(long, global = true, env = "UPKEEP_HUB_CONFIG", default_value = "/etc/upkeep/hub.toml")]
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
    /// Write a consistent copy of the hub's database to FILE (safe while the hub runs).
    Backup {
        /// Where to write the copy (replaced atomically if it exists).
        file: PathBuf,
    },
    /// Put a backup in place of the hub's database (stop the hub first).
    Restore {
        /// A file written by `upkeep-hub backup`.
        file: PathBuf,
        /// Replace the database even if it is healthy (it is kept beside as hub.db.replaced-<ms>).
        #[arg(long)]
        force: bool,
    },
    /// Bring the PostgreSQL store's schema ([store] url) up to this hub's version; prints what it applied.
    /// Safe to run again, and while other hubs run. A SQLite store needs nothing: it migrates itself at start.
    /// With --from, also move a stopped SQLite hub's whole state (and its image files) into the PostgreSQL
    /// database, which must hold no fleet yet (docs/postgres.md, "Moving from SQLite").
    Migrate {
        /// sqlite:PATH: the hub.db of the SQLite hub to move (stop that hub first).
        #[arg(long)]
        from: Option<String>,
        /// The old hub's artifacts directory (default: `artifacts` beside the hub.db).
        #[arg(long, requires = "from")]
        artifacts_from: Option<PathBuf>,
    },
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
            eprintln!("upkeep-hub: error: {}", format!("{e:#}").replace('\n', " "));
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
    let overrides = Overrides { listen: args.listen.clone(), state_dir: args.state_dir.clone() };
    let cfg = config::load(&args.config, &overrides)?;
    if let config::StoreBackend::Postgres(pg) = &cfg.store {
        match &args.command {
            Some(Cmd::Backup { .. } | Cmd::Restore { .. }) => anyhow::bail!(
                "store.url: this hub keeps its state in PostgreSQL ({}); back it up and restore it with pg_dump and \
                 pg_restore (upkeep-hub backup and restore copy the SQLite database only)",
                pg.describe()
            ),
            Some(Cmd::Migrate { from: Some(from), artifacts_from }) => {
                return move_sqlite(pg, &cfg.artifacts_dir, from, artifacts_from.as_deref());
            }
            Some(Cmd::Migrate { from: None, .. }) => {
                let applied = upkeep_hub::store::postgres::migrate(pg).context("migrate")?;
                for (version, what) in &applied {
                    println!("applied schema migration {version}: {what}");
                }
                println!(
                    "{}: schema at version {}{}",
                    pg.describe(),
                    upkeep_hub::store::postgres::SCHEMA_VERSION,
                    if applied.is_empty() { " (nothing to apply)" } else { "" }
                );
                return Ok(());
            }
            _ => {}
        }
    }
    match &args.command {
        Some(Cmd::Migrate { from: Some(from), .. }) => anyhow::bail!(
            "store.url: missing; to move {from} into PostgreSQL, set [store] url in {} to the (empty) database to \
             move into",
            args.config.display()
        ),
        Some(Cmd::Migrate { from: None, .. }) => {
            println!(
                "the store is SQLite ({}): it migrates itself when the hub starts; nothing to do",
                cfg.state_dir.join(safety::DB_FILE).display()
            );
            return Ok(());
        }
        Some(Cmd::Backup { file }) => {
            let c = safety::backup(&cfg.state_dir, file).context("backup")?;
            println!(
                "backed up {} to {} ({} pages, schema version {}); back up {} separately for images",
                cfg.state_dir.join(safety::DB_FILE).display(),
                file.display(),
                c.pages,
                c.schema_version,
                cfg.artifacts_dir.display()
            );
            return Ok(());
        }
        Some(Cmd::Restore { file, force }) => {
            let c = safety::restore(&cfg.state_dir, file, *force).context("restore")?;
            let kept =
                c.kept.map(|p| format!("; the previous database is kept as {}", p.display())).unwrap_or_default();
            println!(
                "restored {} into {} ({} pages, schema version {}){kept}",
                file.display(),
                cfg.state_dir.join(safety::DB_FILE).display(),
                c.pages,
                c.schema_version
            );
            return Ok(());
        }
        Some(Cmd::CheckConfig) | Some(Cmd::Man { .. }) | None => {}
    }
    upkeep_hub::server::server_tls(&cfg, std::sync::Arc::new(upkeep_hub::revocation::Revocations::none()))?;
    if matches!(args.command, Some(Cmd::CheckConfig)) {
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    // Before anything else allocates much: per-connection buffers get their own mappings (memory.rs).
    let tuning = upkeep_hub::memory::tune_allocator();
    // One hub per state directory; `restore` takes the same lock. Held until the process exits.
    let _lock = safety::lock_state_dir(&cfg.state_dir)?;
    // Open (and check) the database before announcing readiness: a lost or damaged one stops the hub here.
    let fleet = upkeep_hub::server::open_fleet(&cfg)?;
    service::init_logging();
    tracing::debug!(?tuning, "allocator");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("listen = {}: cannot bind", cfg.listen))?;
        // The watchdog pings from this same runtime: if it stalls, systemd restarts us.
        let watchdog = tokio::spawn(service::watchdog());
        // Ready once the port is bound and the database is open: from here on, agents and upkeepctl can connect.
        let state = match &cfg.store {
            config::StoreBackend::Sqlite => cfg.state_dir.display().to_string(),
            config::StoreBackend::Postgres(pg) => format!("PostgreSQL {}", pg.describe()),
        };
        service::ready(&format!("listening on {} (mTLS only), state in {state}", cfg.listen));
        let result = upkeep_hub::server::serve_fleet(cfg, fleet, listener, shutdown_signal()).await;
        watchdog.abort();
        result
    })
}

/// `upkeep-hub migrate --from sqlite:PATH`: prints what it did, table by table.
fn move_sqlite(
    pg: &upkeep_hub::store::postgres::PostgresSettings,
    artifacts_dir: &std::path::Path,
    from: &str,
    artifacts_from: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use upkeep_hub::store::import;
    let db = import::parse_from(from)?;
    let beside = db.parent().unwrap_or(std::path::Path::new(".")).join("artifacts");
    let source = import::ImportFrom { sqlite: &db, artifacts_from: artifacts_from.unwrap_or(&beside) };
    let to = upkeep_hub::artifacts::Artifacts::at(artifacts_dir);
    let done = import::import_sqlite(&source, pg, &to).context("migrate")?;
    for (version, what) in &done.migrations {
        println!("applied schema migration {version}: {what}");
    }
    let a = done.artifacts;
    println!(
        "image files in {}: {} hard-linked, {} copied, {} already there (each checked against its sha256)",
        artifacts_dir.display(),
        a.linked,
        a.copied,
        a.present
    );
    for (table, rows) in &done.tables {
        println!("copied {table}: {rows} rows");
    }
    for (seq, at) in &done.sequences {
        println!("sequence {seq} set to {at}");
    }
    let total: u64 = done.tables.iter().map(|(_, n)| n).sum();
    println!(
        "moved {} into {} ({total} rows in {} tables, counts verified); start the hub with this configuration",
        db.display(),
        pg.describe(),
        done.tables.len()
    );
    Ok(())
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
