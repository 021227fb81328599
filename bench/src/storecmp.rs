//! `store-compare`: the run engine's commit (`Store::commit_run`) on SQLite and on PostgreSQL, side by side in one
//! run (issue 16).
//!
//! Contenders: SQLite as the hub opens it (WAL, synchronous=NORMAL), PostgreSQL with `synchronous_commit = off`
//! (like SQLite's NORMAL: a crash may lose the last commits, never corrupt) and PostgreSQL with its default
//! `synchronous_commit = on` (a commit waits for its WAL flush), each with 1 writer thread and with several, every
//! writer committing its own run. The PostgreSQL server is a throwaway cluster at PostgreSQL's default
//! durability (`crate::pg`). The PostgreSQL writes are fenced as a leader replica's are (its term checked in
//! every commit's transaction); a fourth contender writes unfenced, as a hub without `[cluster]` does, to show
//! what the fence costs. Rounds alternate the contenders, the order rotating, so that the load from
//! others on the machine falls on all of them alike; figures are medians over rounds.

use crate::hubproc::fresh_run_dir;
use crate::measure::{self, clk_tck, percentile};
use crate::pg::PgCluster;
use crate::report::{Outcome, row};
use crate::scenarios::Ctx;
use crate::slotwrite::median;
use anyhow::Context;
use serde_json::json;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use upkeep_hub::store::postgres::{PostgresSettings, PostgresStore};
use upkeep_hub::store::runparts::RunWrite;
use upkeep_hub::store::{NewEvent, RunRecord, Store, fence};

/// What to run.
#[derive(Debug, Clone)]
pub struct StoreCompareArgs {
    /// Time per contender over all rounds.
    pub window: Duration,
    /// Rounds (each runs every contender for window / rounds).
    pub rounds: usize,
    /// Writer thread counts.
    pub threads: Vec<usize>,
    /// Events appended per commit.
    pub events_per_commit: usize,
}

/// One store under test.
struct Backend {
    label: &'static str,
    store: Arc<dyn Store>,
    /// The leader term its writes carry (PostgreSQL), None for SQLite.
    term: Option<u64>,
    postgres: bool,
}

/// One contender: a store and a writer count.
struct Contender {
    backend: usize,
    threads: usize,
    rounds: Vec<RoundFigures>,
    latencies_ms: Vec<f64>,
}

#[derive(Debug, Clone, Copy)]
struct RoundFigures {
    commits: u64,
    seconds: f64,
    /// CPU of the bench process (the store's calls and, for PostgreSQL, its client threads), seconds.
    bench_cpu_s: f64,
    /// CPU of the PostgreSQL server, seconds (0 for SQLite).
    server_cpu_s: f64,
}

impl RoundFigures {
    fn per_second(&self) -> f64 {
        self.commits as f64 / self.seconds.max(1e-9)
    }
    fn cpu_ms_per_commit(&self) -> f64 {
        1000.0 * (self.bench_cpu_s + self.server_cpu_s) / (self.commits.max(1) as f64)
    }
}

fn run_name(threads: usize, writer: usize) -> String {
    format!("bench-t{threads}-w{writer}")
}

/// A PostgreSQL store on a new database `name` of `pg`, migrated, with `synchronous_commit` as given, enough
/// connections for `writers`, and the leadership taken for an hour (its term returned).
fn postgres_backend(
    pg: &PgCluster,
    name: &str,
    synchronous_commit: bool,
    writers: usize,
) -> anyhow::Result<(Arc<dyn Store>, u64)> {
    pg.create_database(name)?;
    let mut settings = PostgresSettings::parse(&pg.url(name)).map_err(|e| anyhow::anyhow!("{e}"))?;
    settings.connections = writers.max(1);
    if !synchronous_commit {
        settings.config.options("-c synchronous_commit=off");
    }
    upkeep_hub::store::postgres::migrate(&settings).context("migrating the bench database")?;
    let store = PostgresStore::open(&settings).context("opening the bench database")?;
    let term = store
        .lead("bench", 3_600_000, None)
        .context("taking the leadership")?
        .context("the leadership of a new database was not free")?;
    Ok((Arc::new(store), term))
}

/// Runs `threads` writers on `b` for `window`, each committing its own run; returns the figures and latencies.
fn round(
    b: &Backend,
    threads: usize,
    window: Duration,
    events: &Arc<Vec<NewEvent>>,
    pg: &PgCluster,
) -> anyhow::Result<(RoundFigures, Vec<f64>)> {
    let tck = clk_tck();
    let (cpu0, server0) = (measure::sample(std::process::id())?, pg.cpu_ticks());
    let barrier = Arc::new(Barrier::new(threads + 1));
    let mut handles = Vec::new();
    for w in 0..threads {
        let (store, events, barrier, term) = (b.store.clone(), events.clone(), barrier.clone(), b.term);
        let name = run_name(threads, w);
        handles.push(std::thread::spawn(move || -> anyhow::Result<(u64, Vec<f64>)> {
            fence::set_for_this_thread(term);
            let found = store.run_version(&name);
            barrier.wait();
            let mut version = found?.with_context(|| format!("run {name} is missing"))?;
            let deadline = Instant::now() + window;
            let mut lat = Vec::new();
            let mut n = 0u64;
            while Instant::now() < deadline {
                // A member's part is ~250 bytes: its level, target and attempts (what a member transition writes).
                let body = format!("{{\"name\":\"m-{:04}\",\"n\":{n},\"pad\":\"{}\"}}", n % 1000, "y".repeat(200));
                let write = RunWrite::Update(vec![(format!("member/m-{:04}", n % 1000), body)]);
                let t = Instant::now();
                store.commit_run(&name, version, "Running", &write, &events)?;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                version += 1;
                n += 1;
            }
            Ok((n, lat))
        }));
    }
    barrier.wait();
    let began = Instant::now();
    let mut commits = 0;
    let mut latencies = Vec::new();
    let mut failed = None;
    for h in handles {
        match h.join().map_err(|_| anyhow::anyhow!("a writer thread panicked"))? {
            Ok((n, lat)) => {
                commits += n;
                latencies.extend(lat);
            }
            Err(e) => failed = Some(e),
        }
    }
    let seconds = began.elapsed().as_secs_f64();
    if let Some(e) = failed {
        return Err(e.context(format!("{} with {threads} writer(s)", b.label)));
    }
    let cpu1 = measure::sample(std::process::id())?;
    let server_cpu_s = if b.postgres { pg.cpu_ticks().saturating_sub(server0) as f64 / tck.max(1) as f64 } else { 0.0 };
    let figures = RoundFigures { commits, seconds, bench_cpu_s: measure::cpu_seconds(&cpu0, &cpu1, tck), server_cpu_s };
    Ok((figures, latencies))
}

/// The scenario.
pub fn store_compare(ctx: &Ctx, args: &StoreCompareArgs) -> anyhow::Result<Outcome> {
    let rounds = args.rounds.max(1);
    let per_round = args.window / rounds as u32;
    let mut threads = args.threads.clone();
    threads.retain(|&t| t > 0);
    threads.sort_unstable();
    threads.dedup();
    if threads.is_empty() {
        threads.push(1);
    }
    let writers = threads.iter().copied().max().unwrap_or(1);
    let dir = fresh_run_dir(&ctx.cache, "store-compare")?;
    let pg_dir = std::env::temp_dir().join(format!("upkeep-bench-pg-{}", std::process::id()));
    eprintln!("store-compare: starting PostgreSQL in {}", pg_dir.display());
    let pg = PgCluster::start(&pg_dir)?;
    let server = json!({
        "server_version": pg.show("server_version"),
        "fsync": pg.show("fsync"),
        "full_page_writes": pg.show("full_page_writes"),
        "synchronous_commit_default": pg.show("synchronous_commit"),
        "shared_buffers": pg.show("shared_buffers"),
        "wal_level": pg.show("wal_level"),
    });
    eprintln!("  PostgreSQL {server}");
    let sqlite = upkeep_hub::store::sqlite::SqliteStore::open(&dir.join("hub.db")).context("opening SQLite")?;
    let (pg_async, async_term) = postgres_backend(&pg, "bench_async", false, writers)?;
    let (pg_sync, sync_term) = postgres_backend(&pg, "bench_sync", true, writers)?;
    let (pg_unfenced, _) = postgres_backend(&pg, "bench_unfenced", false, writers)?;
    let backends = [
        Backend { label: "SQLite (WAL, synchronous=NORMAL)", store: Arc::new(sqlite), term: None, postgres: false },
        Backend {
            label: "PostgreSQL, synchronous_commit=off",
            store: pg_async,
            term: Some(async_term),
            postgres: true,
        },
        Backend { label: "PostgreSQL, synchronous_commit=on", store: pg_sync, term: Some(sync_term), postgres: true },
        Backend {
            label: "PostgreSQL, synchronous_commit=off, unfenced",
            store: pg_unfenced,
            term: None,
            postgres: true,
        },
    ];
    // The run frame: 2 KiB, as a small run's.
    let frame = vec![("frame".to_string(), format!("{{\"pad\":\"{}\"}}", "x".repeat(2048)))];
    for b in &backends {
        fence::set_for_this_thread(b.term);
        for &t in &threads {
            for w in 0..t {
                b.store
                    .create_run(&RunRecord {
                        name: run_name(t, w),
                        parts: frame.clone(),
                        version: 1,
                        status: "Running".into(),
                        strategy_name: None,
                        created_ms: 0,
                    })
                    .with_context(|| format!("{}: creating the bench runs", b.label))?;
            }
        }
        fence::set_for_this_thread(None);
    }
    let events: Arc<Vec<NewEvent>> = Arc::new(crate::scenarios::commit_events(args.events_per_commit));
    let mut contenders: Vec<Contender> = threads
        .iter()
        .flat_map(|&t| {
            (0..backends.len()).map(move |b| Contender {
                backend: b,
                threads: t,
                rounds: Vec::new(),
                latencies_ms: Vec::new(),
            })
        })
        .collect();
    let n = contenders.len();
    for r in 0..rounds {
        for k in 0..n {
            let c = &mut contenders[(k + r) % n];
            let b = &backends[c.backend];
            let (f, lat) = round(b, c.threads, per_round, &events, &pg)?;
            eprintln!(
                "  round {}/{rounds}: {:<36} {} writer(s): {:>7.0} commits/s, {:.3} CPU-ms per commit",
                r + 1,
                b.label,
                c.threads,
                f.per_second(),
                f.cpu_ms_per_commit()
            );
            c.rounds.push(f);
            c.latencies_ms.extend(lat);
        }
    }
    let mut table = Vec::new();
    let mut results = Vec::new();
    let medians: Vec<f64> =
        contenders.iter().map(|c| median(&c.rounds.iter().map(RoundFigures::per_second).collect::<Vec<_>>())).collect();
    for (i, c) in contenders.iter().enumerate() {
        let b = &backends[c.backend];
        let per_round: Vec<String> = c.rounds.iter().map(|f| format!("{:.0}", f.per_second())).collect();
        let sqlite_median = contenders
            .iter()
            .position(|o| o.threads == c.threads && !backends[o.backend].postgres)
            .map(|j| medians[j])
            .unwrap_or(0.0);
        let ratio = medians[i] / sqlite_median.max(1e-9);
        let p50 = percentile(&c.latencies_ms, 50.0).unwrap_or(0.0);
        let p99 = percentile(&c.latencies_ms, 99.0).unwrap_or(0.0);
        let cpu = median(&c.rounds.iter().map(RoundFigures::cpu_ms_per_commit).collect::<Vec<_>>());
        table.push(row(
            format!("{}, {} writer(s): commits/s median", b.label, c.threads),
            format!("{:.0}/s ({}; {ratio:.2}x SQLite)", medians[i], per_round.join(" ")),
            "",
        ));
        table.push(row(
            format!("{}, {} writer(s): commit p50 / p99; CPU per commit", b.label, c.threads),
            format!("{p50:.3} / {p99:.3} ms; {cpu:.3} CPU-ms"),
            "",
        ));
        results.push(json!({
            "store": b.label,
            "postgres": b.postgres,
            "writers": c.threads,
            "commits_per_second_median": medians[i],
            "ratio_to_sqlite_same_writers": ratio,
            "commit_ms_p50": p50,
            "commit_ms_p99": p99,
            "cpu_ms_per_commit_median": cpu,
            "rounds": c.rounds.iter().map(|f| json!({
                "commits": f.commits, "seconds": f.seconds, "commits_per_second": f.per_second(),
                "bench_cpu_seconds": f.bench_cpu_s, "server_cpu_seconds": f.server_cpu_s,
            })).collect::<Vec<_>>(),
        }));
    }
    table.push(row("each commit", format!("one member part (~250 B) + {} event(s)", args.events_per_commit), ""));
    let figures = json!({
        "seconds_per_contender": args.window.as_secs_f64(),
        "rounds": rounds,
        "events_per_commit": args.events_per_commit,
        "postgres_server": server,
        "contenders": results,
    });
    let outcome = ctx.outcome("store-compare".into(), table, figures);
    drop(backends);
    drop(pg);
    Ok(outcome)
}
