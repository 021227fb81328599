//! `replicas`: N real `upkeep-hub` processes as replicas of one PostgreSQL database (`[store] url`, `[cluster]
//! replica`), simulated agents spread evenly over them (agent `i` on replica `i mod N`), as issue 16 asks of
//! 10,000 agents over 3 replicas: each replica's RSS before the agents and after, RSS per agent it serves, CPU,
//! the leader, and the time until every agent is welcomed.

use crate::certs::CertCache;
use crate::hubproc::{HubProc, HubSetup, fresh_run_dir};
use crate::measure::{ProcSample, clk_tck, cpu_percent, cpu_seconds};
use crate::pg::PgCluster;
use crate::report::{Outcome, mib, row};
use crate::scenarios::{Ctx, secs, self_sample, spec_for};
use crate::sim::{self, Phase, Shared, SimNode};
use anyhow::{Context, bail};
use serde_json::json;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// What to run.
#[derive(Debug, Clone)]
pub struct ReplicasArgs {
    /// Simulated agents in all.
    pub agents: usize,
    /// Hub replicas.
    pub replicas: usize,
    /// Hold after registration before the loaded sample.
    pub settle: Duration,
    /// `[agents] heartbeat_interval_seconds`.
    pub heartbeat_seconds: u32,
    /// Connects + registers in flight, all replicas together.
    pub connect_concurrency: usize,
    /// Give up waiting for registration after this.
    pub within: Duration,
}

/// One replica under test.
struct Replica {
    name: String,
    hub: HubProc,
    shared: Arc<Shared>,
    /// Agents assigned to it.
    assigned: usize,
    /// When all of its agents were welcomed (from the first connect).
    all_in: Option<Duration>,
    idle: ProcSample,
}

/// The leadership row: (holder, term); holder empty when nobody leads.
fn leadership(pg: &PgCluster) -> anyhow::Result<(String, String)> {
    let row = pg.query("upkeep", "SELECT holder || ' ' || term FROM leadership WHERE id = 1")?;
    let text = row.into_iter().next().unwrap_or_default();
    let (holder, term) = text.rsplit_once(' ').unwrap_or(("", ""));
    Ok((holder.to_string(), term.to_string()))
}

/// Checks that this process may hold a socket per agent (the hub children inherit its limit; each holds a share).
fn check_descriptors(agents: usize) -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit};
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).context("reading RLIMIT_NOFILE")?;
    let need = agents as u64 + 1024;
    if soft < need {
        bail!(
            "--agents {agents}: the file descriptor limit is {soft}, the generator needs about {need} (a socket per \
             agent); raise the hard limit (ulimit -Hn) or give fewer agents"
        );
    }
    Ok(())
}

/// The scenario.
pub async fn replicas(ctx: &Ctx, args: &ReplicasArgs) -> anyhow::Result<Outcome> {
    let (agents, n) = (args.agents, args.replicas.max(1));
    check_descriptors(agents)?;
    let cache = CertCache::open(&ctx.cache)?;
    let certs = cache.nodes(agents)?;
    let run_dir = fresh_run_dir(&ctx.cache, &format!("replicas-{n}-{agents}"))?;
    let pg_dir = std::env::temp_dir().join(format!("upkeep-bench-pg-{}", std::process::id()));
    eprintln!("replicas: starting PostgreSQL in {}", pg_dir.display());
    let pg = PgCluster::start(&pg_dir)?;
    pg.create_database("upkeep")?;
    let url = pg.url("upkeep");
    let mut setups: Vec<HubSetup> = Vec::new();
    for k in 0..n {
        let mut s = ctx.hub_setup(&cache, run_dir.join(format!("r{}", k + 1)), args.heartbeat_seconds)?;
        s.store_url = Some(url.clone());
        s.replica = Some(format!("r{}", k + 1));
        setups.push(s);
    }
    let migrated = setups[0].migrate()?;
    eprintln!("  {}", migrated.replace('\n', "; "));
    let mut hubs = Vec::new();
    for s in &setups {
        hubs.push(s.start().await?);
    }
    // Wait for an elected leader, then let the replicas settle before the idle sample.
    let began = Instant::now();
    let (leader_before, term_before) = loop {
        let (holder, term) = leadership(&pg)?;
        if !holder.is_empty() {
            break (holder, term);
        }
        if began.elapsed() > Duration::from_secs(30) {
            bail!("no replica was elected leader within 30 s; see {}/r*/hub.log", run_dir.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!("  {n} replicas up; leader {leader_before} (term {term_before})");
    let tck = clk_tck();
    let g0 = self_sample()?;
    let pg0 = pg.cpu_ticks();
    let mut reps = Vec::new();
    for (k, hub) in hubs.into_iter().enumerate() {
        let idle = hub.sample()?;
        let shared = Shared::new((args.connect_concurrency / n).max(1), false);
        reps.push(Replica { name: format!("r{}", k + 1), hub, shared, assigned: 0, all_in: None, idle });
    }
    let mut specs = Vec::new();
    for s in &setups {
        specs.push(spec_for(s, &cache)?);
    }
    let mut tasks = Vec::new();
    for (i, cert) in certs.into_iter().enumerate() {
        let k = i % n;
        reps[k].assigned += 1;
        let node = SimNode {
            cert: Arc::new(cert),
            member: (i / 10) as u32,
            source: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
            local: None,
        };
        tasks.push(tokio::spawn(sim::run_agent(node, specs[k].clone(), reps[k].shared.clone())));
    }
    // Until every agent is welcomed, sampling every 50 ms; progress every 5 s.
    let start = Instant::now();
    let mut last_print = Instant::now();
    let total = loop {
        let mut all = 0;
        for r in reps.iter_mut() {
            let reg = r.shared.registered();
            all += reg;
            if r.all_in.is_none() && reg >= r.assigned {
                r.all_in = Some(start.elapsed());
            }
        }
        if all >= agents {
            break Some(start.elapsed());
        }
        if start.elapsed() > args.within {
            break None;
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            last_print = Instant::now();
            let each: Vec<String> = reps
                .iter()
                .map(|r| {
                    format!(
                        "{} {}/{} ({}, failures {})",
                        r.name,
                        r.shared.registered(),
                        r.assigned,
                        mib(r.hub.sample().map(|s| s.rss_kib).unwrap_or(0)),
                        r.shared.failures.load(Ordering::Relaxed)
                    )
                })
                .collect();
            eprintln!("  {:>6.1} s: {}", start.elapsed().as_secs_f64(), each.join(", "));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let registered: Vec<ProcSample> = reps.iter().map(|r| r.hub.sample()).collect::<Result<_, _>>()?;
    let (pg1, pg_t1) = (pg.cpu_ticks(), Instant::now());
    eprintln!("  all welcomed in {}; settling {} s", secs(total), args.settle.as_secs());
    // RSS of each replica every 5 s while the fleet idles (does the leader's grow with its fleet view re-reads?).
    let mut series: Vec<Vec<u64>> = vec![Vec::new(); reps.len()];
    let settle_end = Instant::now() + args.settle;
    loop {
        for (k, r) in reps.iter().enumerate() {
            series[k].push(r.hub.sample().map(|s| s.rss_kib).unwrap_or(0));
        }
        let left = settle_end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        tokio::time::sleep(left.min(Duration::from_secs(5))).await;
    }
    let loaded: Vec<ProcSample> = reps.iter().map(|r| r.hub.sample()).collect::<Result<_, _>>()?;
    let (pg2, pg_t2) = (pg.cpu_ticks(), Instant::now());
    // The database's CPU: while agents registered (CPU-s), and while the fleet idled (% of a core).
    let pg_registering = pg1.saturating_sub(pg0) as f64 / tck.max(1) as f64;
    let pg_steady = 100.0 * pg2.saturating_sub(pg1) as f64
        / tck.max(1) as f64
        / pg_t2.duration_since(pg_t1).as_secs_f64().max(1e-9);
    let g2 = self_sample()?;
    let (leader_after, term_after) = leadership(&pg)?;
    let connected: usize = reps.iter().map(|r| r.shared.registered()).sum();
    let mut table = vec![
        row("replicas, agents (spread evenly)", format!("{n}, {agents}"), ""),
        row("agents connected", format!("{connected}/{agents}"), ""),
        row("time until every agent welcomed", secs(total), ""),
        row(
            "leader (term) at start / at end",
            format!("{leader_before} ({term_before}) / {leader_after} ({term_after})"),
            "",
        ),
    ];
    let mut per_replica = Vec::new();
    for (k, r) in reps.iter().enumerate() {
        let here = r.shared.registered();
        let per_agent = loaded[k].rss_kib.saturating_sub(r.idle.rss_kib) as f64 / here.max(1) as f64;
        let role = if r.name == leader_after { "leader" } else { "follower" };
        table.push(row(
            format!("{} ({role}): agents, all welcomed after", r.name),
            format!("{here}/{}, {}", r.assigned, secs(r.all_in)),
            "",
        ));
        table.push(row(
            format!("{} ({role}): RSS before agents -> with them", r.name),
            format!("{} -> {}", mib(r.idle.rss_kib), mib(loaded[k].rss_kib)),
            "",
        ));
        table.push(row(format!("{} ({role}): RSS per connected agent", r.name), format!("{per_agent:.1} KiB"), ""));
        let (first, last) = (series[k].first().copied().unwrap_or(0), series[k].last().copied().unwrap_or(0));
        let top = series[k].iter().copied().max().unwrap_or(0);
        table.push(row(
            format!("{} ({role}): RSS settling first / max / last (every 5 s); VmHWM", r.name),
            format!("{} / {} / {}; {}", mib(first), mib(top), mib(last), mib(loaded[k].hwm_kib)),
            "",
        ));
        table.push(row(
            format!("{} ({role}): CPU registering / steady", r.name),
            format!(
                "{:.1} CPU-s / {:.1} %",
                cpu_seconds(&r.idle, &registered[k], tck),
                cpu_percent(&registered[k], &loaded[k], tck)
            ),
            "",
        ));
        per_replica.push(json!({
            "replica": r.name,
            "role_at_end": role,
            "assigned": r.assigned,
            "connected": here,
            "all_welcomed_seconds": r.all_in.map(|d| d.as_secs_f64()),
            "rss_idle_kib": r.idle.rss_kib,
            "rss_loaded_kib": loaded[k].rss_kib,
            "rss_peak_kib": loaded[k].hwm_kib,
            "rss_settle_every_5s_kib": series[k],
            "rss_per_agent_kib": per_agent,
            "cpu_registration_seconds": cpu_seconds(&r.idle, &registered[k], tck),
            "cpu_steady_percent": cpu_percent(&registered[k], &loaded[k], tck),
            "threads": loaded[k].threads,
            "session_failures": r.shared.failures.load(Ordering::Relaxed),
            "last_failure": r.shared.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }));
    }
    table.push(row(
        "load generator RSS / CPU",
        format!("{} / {:.1} CPU-s", mib(g2.rss_kib), cpu_seconds(&g0, &g2, tck)),
        "",
    ));
    table.push(row(
        "PostgreSQL server CPU registering / steady",
        format!("{pg_registering:.1} CPU-s / {pg_steady:.1} %"),
        "",
    ));
    table.push(row("PostgreSQL", format!("{} (fsync {})", pg.show("server_version"), pg.show("fsync")), ""));
    let figures = json!({
        "agents": agents,
        "replicas": n,
        "connected": connected,
        "heartbeat_interval_seconds": args.heartbeat_seconds,
        "connect_concurrency": args.connect_concurrency,
        "settle_seconds": args.settle.as_secs(),
        "hub_log": ctx.hub_log,
        "all_welcomed_seconds": total.map(|d| d.as_secs_f64()),
        "leader_before": leader_before, "term_before": term_before,
        "leader_after": leader_after, "term_after": term_after,
        "per_replica": per_replica,
        "generator_rss_kib": g2.rss_kib,
        "generator_cpu_seconds": cpu_seconds(&g0, &g2, tck),
        "postgres_cpu_registration_seconds": pg_registering,
        "postgres_cpu_steady_percent": pg_steady,
        "postgres": {"server_version": pg.show("server_version"), "fsync": pg.show("fsync"),
            "synchronous_commit": pg.show("synchronous_commit")},
    });
    for r in &reps {
        r.shared.phase.send_replace(Phase::Stop);
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(tasks)).await;
    for r in reps {
        let _ = r.hub.stop().await;
    }
    drop(pg);
    Ok(ctx.outcome(format!("replicas-{n}-{agents}"), table, figures))
}
