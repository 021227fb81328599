//! `upkeep-bench`: thin main. Parses the scenario, raises the file descriptor limit, runs it on a small tokio
//! runtime, prints the table and writes JSON under bench/results/.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use upkeep_bench::scenarios::{self, Ctx};

/// Benchmarks for upkeep (issue 8). Build first: cargo build --release -p upkeep-hub -p upkeep-agent -p upkeep-bench
#[derive(Debug, Parser)]
#[command(name = "upkeep-bench")]
struct Args {
    /// Certificate cache and run directories.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/upkeep-bench"))]
    cache: PathBuf,
    /// The upkeep-hub binary under test.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/upkeep-hub"))]
    hub_bin: PathBuf,
    /// The upkeep-agent binary under test.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/upkeep-agent"))]
    agent_bin: PathBuf,
    /// Where JSON results are written.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    results: PathBuf,
    /// Worker threads of the load generator's runtime.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// RUST_LOG for the hub process (its default `info` logs a line per session; see BENCHMARKS.md).
    #[arg(long, default_value = "warn")]
    hub_log: String,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// 1. Connect and register many agents; optionally restart the hub and time the reconnect storm.
    Scale {
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        /// Restart the hub once all are registered and time until all are back.
        #[arg(long)]
        restart: bool,
        /// Seconds to hold the fleet after registration (steady-state CPU and RSS).
        #[arg(long, default_value_t = 20)]
        settle_secs: u64,
        #[arg(long, default_value_t = 10)]
        heartbeat_secs: u32,
        /// Connects + registers in flight at once from the generator.
        #[arg(long, default_value_t = 1000)]
        connect_concurrency: usize,
        #[arg(long, default_value_t = 900)]
        timeout_secs: u64,
    },
    /// 2. A NodeImageOnly run over simulated nodes whose upgrades finish at once.
    Orchestrate {
        #[arg(long, default_value_t = 10_000)]
        nodes: usize,
        #[arg(long, default_value_t = 1000)]
        members: u32,
        #[arg(long, default_value_t = 3)]
        stages: u32,
        /// Each stage is one group with this max_concurrency.
        #[arg(long, default_value_t = 10)]
        group_concurrency: u32,
        #[arg(long, default_value_t = 3600)]
        timeout_secs: u64,
        /// Serve the hub inside the bench process: this many nodes connect over real mTLS sessions and the rest
        /// open in-process sessions on the hub's agent API (past the descriptor limit). Default: the real hub
        /// binary as a child process and every node over mTLS.
        #[arg(long)]
        real_agents: Option<usize>,
    },
    /// Window opening to first step: members held Pending by their node OS window start when it opens.
    WindowOpen {
        #[arg(long, default_value_t = 100)]
        members: u32,
        #[arg(long, default_value_t = 10)]
        nodes_per_member: usize,
    },
    /// 3. Heartbeats per second the hub reads, every session sending as fast as it accepts.
    Heartbeats {
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        #[arg(long, default_value_t = 30)]
        secs: u64,
    },
    /// 4. An idle real upkeep-agent: RSS, CPU, wakeups; and the binary sizes.
    AgentIdle {
        #[arg(long, default_value_t = 600)]
        secs: u64,
        #[arg(long, default_value_t = 10)]
        heartbeat_secs: u32,
        /// Run the agent privilege-separated (its executor as a second process, as the packages do) and
        /// measure both.
        #[arg(long)]
        executor: bool,
    },
    /// Stripped release binary sizes only.
    Sizes,
    /// 5. Committed run transitions per second through Store::commit_run (SQLite).
    Store {
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// Run state sizes to commit, bytes (comma-separated).
        #[arg(long, value_delimiter = ',', default_values_t = vec![2048usize, 262_144])]
        state_bytes: Vec<usize>,
        #[arg(long, default_value_t = 1)]
        events_per_commit: usize,
    },
    /// Store::commit_run on SQLite and PostgreSQL side by side (issue 16): alternating rounds, medians, ratio.
    StoreCompare {
        /// Seconds per contender (store and writer count), over all rounds.
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// Rounds; each runs every contender once for secs / rounds, the order rotating.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Writer thread counts (comma-separated); each writer commits its own run.
        #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 4])]
        threads: Vec<usize>,
        #[arg(long, default_value_t = 1)]
        events_per_commit: usize,
    },
    /// Hub replicas on one PostgreSQL database with agents spread evenly over them (issue 16): RSS per agent per
    /// replica, time until every agent is welcomed, the leader.
    Replicas {
        #[arg(long, default_value_t = 10_000)]
        agents: usize,
        #[arg(long, default_value_t = 3)]
        replicas: usize,
        /// Seconds to hold the fleet after registration (steady-state CPU and RSS).
        #[arg(long, default_value_t = 20)]
        settle_secs: u64,
        #[arg(long, default_value_t = 10)]
        heartbeat_secs: u32,
        /// Connects + registers in flight at once from the generator (all replicas together).
        #[arg(long, default_value_t = 1000)]
        connect_concurrency: usize,
        #[arg(long, default_value_t = 900)]
        timeout_secs: u64,
    },
    /// The agent's raw slot write + verify against `dd bs=4M conv=fsync` on the same disk, alternating.
    SlotWrite {
        /// Image size, MiB.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        /// Rounds; each runs every contender once, the order rotating.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Directory for the image and the outputs, on the disk under test.
        #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/upkeep-bench/slot-write"))]
        dir: PathBuf,
        /// Also time the old single-threaded copy loop (SHA-256 inline) for a side-by-side ratio.
        #[arg(long)]
        inline_hash: bool,
        /// Also time the privileged executor's slot write (a verify pass over the staged file, then the write).
        #[arg(long)]
        executor: bool,
        /// Buffer size of the upkeep copy, KiB (the agent's default).
        #[arg(long, default_value_t = upkeep_agent::os::copy::CHUNK_BYTES / 1024)]
        chunk_kib: usize,
        /// Buffers in circulation in the upkeep copy (the agent's default).
        #[arg(long, default_value_t = upkeep_agent::os::copy::CHUNKS_IN_FLIGHT)]
        chunks: usize,
    },
    /// Mint and cache node certificates ahead of a run.
    Certs {
        #[arg(long)]
        count: usize,
    },
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("upkeep-bench: error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// Raises RLIMIT_NOFILE as far as allowed (the hub child inherits it): 50k sessions need 50k descriptors on
/// each side.
fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let want = 1_048_576;
    if setrlimit(Resource::RLIMIT_NOFILE, want, want).is_err()
        && let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    if let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) {
        eprintln!("file descriptor limit: {soft}");
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let ctx = Ctx {
        cache: args.cache.clone(),
        hub_bin: args.hub_bin.clone(),
        agent_bin: args.agent_bin.clone(),
        results: args.results.clone(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        hub_log: args.hub_log.clone(),
    };
    raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers.max(1))
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let outcome = rt.block_on(async {
        match args.scenario {
            Scenario::Scale { agents, restart, settle_secs, heartbeat_secs, connect_concurrency, timeout_secs } => {
                scenarios::scale(
                    &ctx,
                    agents,
                    restart,
                    Duration::from_secs(settle_secs),
                    heartbeat_secs,
                    connect_concurrency,
                    Duration::from_secs(timeout_secs),
                )
                .await
            }
            Scenario::Orchestrate { nodes, members, stages, group_concurrency, timeout_secs, real_agents } => {
                scenarios::orchestrate(
                    &ctx,
                    nodes,
                    members,
                    stages,
                    group_concurrency,
                    Duration::from_secs(timeout_secs),
                    real_agents,
                )
                .await
            }
            Scenario::WindowOpen { members, nodes_per_member } => {
                scenarios::window_open(&ctx, members, nodes_per_member).await
            }
            Scenario::Heartbeats { agents, secs } => {
                scenarios::heartbeats(&ctx, agents, Duration::from_secs(secs)).await
            }
            Scenario::AgentIdle { secs, heartbeat_secs, executor } => {
                scenarios::agent_idle(&ctx, Duration::from_secs(secs), heartbeat_secs, executor).await
            }
            Scenario::Sizes => Ok(scenarios::sizes(&ctx)),
            Scenario::Store { secs, state_bytes, events_per_commit } => {
                scenarios::store(&ctx, Duration::from_secs(secs), &state_bytes, events_per_commit)
            }
            Scenario::StoreCompare { secs, rounds, threads, events_per_commit } => {
                let args = upkeep_bench::storecmp::StoreCompareArgs {
                    window: Duration::from_secs(secs),
                    rounds,
                    threads,
                    events_per_commit,
                };
                upkeep_bench::storecmp::store_compare(&ctx, &args)
            }
            Scenario::Replicas { agents, replicas, settle_secs, heartbeat_secs, connect_concurrency, timeout_secs } => {
                let args = upkeep_bench::replicas::ReplicasArgs {
                    agents,
                    replicas,
                    settle: Duration::from_secs(settle_secs),
                    heartbeat_seconds: heartbeat_secs,
                    connect_concurrency,
                    within: Duration::from_secs(timeout_secs),
                };
                upkeep_bench::replicas::replicas(&ctx, &args).await
            }
            Scenario::SlotWrite { size_mib, rounds, dir, inline_hash, executor, chunk_kib, chunks } => {
                let buffers =
                    upkeep_agent::os::copy::Buffers { chunk_bytes: chunk_kib.max(1) * 1024, chunks, prehash: false };
                let args =
                    upkeep_bench::slotwrite::SlotWriteArgs { size_mib, rounds, dir, inline_hash, executor, buffers };
                upkeep_bench::slotwrite::slot_write(&ctx, &args)
            }
            Scenario::Certs { count } => {
                let cache = upkeep_bench::certs::CertCache::open(&ctx.cache)?;
                let n = cache.nodes(count)?.len();
                eprintln!("{n} node certificates cached in {}", ctx.cache.display());
                return Ok(None);
            }
        }
        .map(Some)
    })?;
    if let Some(o) = outcome {
        o.emit(&ctx.results)?;
    }
    Ok(())
}
