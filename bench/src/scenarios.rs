//! The five scenarios of issue 8. Each starts what it measures (the real hub binary, simulated agents, the
//! real agent binary, or the Store in-process), samples it, and returns an `Outcome` (table + JSON figures).

use crate::certs::{CertCache, NodeCert};
use crate::hubproc::{HubProc, HubSetup, free_port, fresh_run_dir};
use crate::measure::{self, ProcSample, clk_tck, cpu_percent, cpu_seconds, percentile, slot_handoffs};
use crate::report::{Outcome, Row, machine, mib, row};
use crate::sim::{self, Phase, Shared, SimNode, SimSpec, member_name};
use anyhow::{Context, bail};
use serde_json::json;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use upkeep_core::ids::{Principal, Role};
use upkeep_hub::pki;
use upkeep_hub::store::runparts::{self, RunWrite};
use upkeep_hub::store::{NewEvent, RunRecord, Store};
use upkeep_proto::v1;

/// Image family the simulated nodes report.
pub const FAMILY: &str = "bench-debian";
/// Their image before a run.
pub const OLD_VERSION: &str = "202401.01.0";
/// The image published for the run.
pub const NEW_VERSION: &str = "202402.01.0";
/// Their region.
pub const REGION: &str = "bench-region";
/// Source addresses: one loopback address per this many connections (ephemeral ports are 32768-60999).
pub const CONNECTIONS_PER_SOURCE: usize = 20_000;

/// Where things are and how the command line read.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Certificate cache and run directories.
    pub cache: PathBuf,
    /// The upkeep-hub binary.
    pub hub_bin: PathBuf,
    /// The upkeep-agent binary.
    pub agent_bin: PathBuf,
    /// Where JSON results go.
    pub results: PathBuf,
    /// The command line, for the record.
    pub command: String,
    /// RUST_LOG for the hub process.
    pub hub_log: String,
}

impl Ctx {
    /// An outcome stamped with the command, the commit and the machine (load averages included).
    pub fn outcome(&self, scenario: String, table: Vec<Row>, figures: serde_json::Value) -> Outcome {
        let finished_unix_s =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Outcome {
            scenario,
            command: self.command.clone(),
            finished_unix_s,
            commit: crate::report::commit(),
            machine: machine(),
            table,
            figures,
        }
    }

    pub(crate) fn hub_setup(
        &self,
        cache: &CertCache,
        run_dir: PathBuf,
        heartbeat_seconds: u32,
    ) -> anyhow::Result<HubSetup> {
        Ok(HubSetup {
            bin: self.hub_bin.clone(),
            run_dir,
            pki_dir: cache.pki_dir(),
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), free_port()?),
            heartbeat_seconds,
            log_filter: self.hub_log.clone(),
            store_url: None,
            replica: None,
        })
    }
}

pub(crate) fn spec_for(setup: &HubSetup, cache: &CertCache) -> anyhow::Result<Arc<SimSpec>> {
    Ok(Arc::new(SimSpec {
        hub_url: format!("https://{}", setup.listen),
        domain: "127.0.0.1".into(),
        ca_pem: cache.read(pki::files::CA_CERT)?,
        family: FAMILY.into(),
        old_version: OLD_VERSION.into(),
        new_version: NEW_VERSION.into(),
        region: REGION.into(),
    }))
}

/// Simulated agents running on the current runtime.
struct SimFleet {
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    sources: usize,
}

/// Starts one simulated agent per certificate; node `i` is in member `i / nodes_per_member`.
fn start_fleet(certs: Vec<NodeCert>, nodes_per_member: usize, spec: Arc<SimSpec>, shared: Arc<Shared>) -> SimFleet {
    start_mixed_fleet(certs, nodes_per_member, spec, shared, None)
}

/// Simulated nodes: the first `local.1` over mTLS, the rest (when `local` is given) in-process on the hub's agent
/// API (a node without a certificate is named `local-<index>`).
fn start_mixed_fleet(
    certs: Vec<NodeCert>,
    nodes_per_member: usize,
    spec: Arc<SimSpec>,
    shared: Arc<Shared>,
    local: Option<(Arc<upkeep_hub::grpc::agent::AgentApi>, usize)>,
) -> SimFleet {
    let real = local.as_ref().map_or(certs.len(), |(_, r)| (*r).min(certs.len()));
    let sources = real.div_ceil(CONNECTIONS_PER_SOURCE).max(1);
    let tasks = certs
        .into_iter()
        .enumerate()
        .map(|(i, cert)| {
            let node = SimNode {
                cert: Arc::new(cert),
                member: (i / nodes_per_member.max(1)) as u32,
                source: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % sources) as u8)),
                local: local.as_ref().filter(|_| i >= real).map(|(api, _)| api.clone()),
            };
            tokio::spawn(sim::run_agent(node, spec.clone(), shared.clone()))
        })
        .collect();
    SimFleet { shared, tasks, sources }
}

impl SimFleet {
    async fn stop(self) {
        self.shared.phase.send_replace(Phase::Stop);
        let all = futures::future::join_all(self.tasks);
        let _ = tokio::time::timeout(Duration::from_secs(30), all).await;
    }
}

/// Waits until `want` sessions are welcomed (and, if given, `want` welcomes happened since `welcomes_from`),
/// sampling the hub every second. Returns the elapsed time, or None at the deadline.
async fn wait_registered(
    shared: &Shared,
    hub: &HubProc,
    want: usize,
    welcomes_from: Option<u64>,
    within: Duration,
    samples: &mut Vec<ProcSample>,
) -> Option<Duration> {
    let began = Instant::now();
    let mut last_print = Instant::now();
    loop {
        let reg = shared.registered();
        let fresh = welcomes_from.map(|w| shared.welcomes.load(Ordering::Relaxed).saturating_sub(w) as usize);
        if reg >= want && fresh.is_none_or(|f| f >= want) {
            return Some(began.elapsed());
        }
        if began.elapsed() > within {
            return None;
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            last_print = Instant::now();
            let rss = hub.sample().map(|s| s.rss_kib).unwrap_or(0);
            eprintln!(
                "  {:>6.1} s: {reg}/{want} registered, hub RSS {}, session failures {} (last: {})",
                began.elapsed().as_secs_f64(),
                mib(rss),
                shared.failures.load(Ordering::Relaxed),
                shared.last_error.lock().unwrap_or_else(|p| p.into_inner()),
            );
        }
        if let Ok(s) = hub.sample() {
            samples.push(s);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn secs(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.2} s", d.as_secs_f64())).unwrap_or_else(|| "not reached".into())
}

pub(crate) fn self_sample() -> anyhow::Result<ProcSample> {
    measure::sample(std::process::id())
}

/// Scenario 1: connect and register `agents`; hub RSS per agent, CPU, time; optionally a restart storm.
pub async fn scale(
    ctx: &Ctx,
    agents: usize,
    restart: bool,
    settle: Duration,
    heartbeat_seconds: u32,
    connect_concurrency: usize,
    within: Duration,
) -> anyhow::Result<Outcome> {
    let cache = CertCache::open(&ctx.cache)?;
    let certs = cache.nodes(agents)?;
    let setup = ctx.hub_setup(&cache, fresh_run_dir(&ctx.cache, &format!("scale-{agents}"))?, heartbeat_seconds)?;
    let spec = spec_for(&setup, &cache)?;
    let hub = setup.start().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tck = clk_tck();
    let s0 = hub.sample()?;
    let g0 = self_sample()?;
    eprintln!("scale: {agents} agents against hub pid {} (baseline RSS {})", hub.pid, mib(s0.rss_kib));
    let shared = Shared::new(connect_concurrency, false);
    let fleet = start_fleet(certs, 10, spec, shared.clone());
    let mut samples = Vec::new();
    let t_reg = wait_registered(&shared, &hub, agents, None, within, &mut samples).await;
    let s1 = hub.sample()?;
    let peak_cpu = samples.windows(2).map(|w| cpu_percent(&w[0], &w[1], tck)).fold(0.0, f64::max);
    eprintln!("  registered in {}; settling {} s", secs(t_reg), settle.as_secs());
    tokio::time::sleep(settle).await;
    let s2 = hub.sample()?;
    let g2 = self_sample()?;
    let connected = shared.registered();
    let per_agent_kib = s2.rss_kib.saturating_sub(s0.rss_kib) as f64 / connected.max(1) as f64;
    let mut table = vec![
        row("agents connected", format!("{connected}/{agents}"), ""),
        row("time until all registered", secs(t_reg), ""),
        row(
            "registrations per second",
            t_reg.map(|t| format!("{:.0}/s", agents as f64 / t.as_secs_f64())).unwrap_or_default(),
            "",
        ),
        row("hub RSS idle (before agents)", mib(s0.rss_kib), ""),
        row("hub RSS with all agents", mib(s2.rss_kib), ""),
        row("hub RSS per connected agent", format!("{per_agent_kib:.1} KiB"), "<= 40 KiB"),
        row("hub CPU during registration", format!("{:.1} CPU-s", cpu_seconds(&s0, &s1, tck)), ""),
        row("hub CPU peak (1 s window)", format!("{peak_cpu:.0} %"), "<= 200 % (2 cores)"),
        row(
            format!("hub CPU steady ({} s, heartbeat {heartbeat_seconds} s)", settle.as_secs()),
            format!("{:.1} %", cpu_percent(&s1, &s2, tck)),
            "",
        ),
        row("hub threads", s2.threads.to_string(), ""),
        row("load generator RSS", mib(g2.rss_kib), ""),
        row("load generator CPU", format!("{:.1} CPU-s", cpu_seconds(&g0, &g2, tck)), ""),
    ];
    let mut figures = json!({
        "agents": agents,
        "connected": connected,
        "source_addresses": fleet.sources,
        "connect_concurrency": connect_concurrency,
        "heartbeat_interval_seconds": heartbeat_seconds,
        "hub_log": ctx.hub_log,
        "registered_seconds": t_reg.map(|t| t.as_secs_f64()),
        "hub_rss_idle_kib": s0.rss_kib,
        "hub_rss_loaded_kib": s2.rss_kib,
        "hub_rss_peak_kib": s2.hwm_kib,
        "hub_rss_per_agent_kib": per_agent_kib,
        "hub_cpu_registration_seconds": cpu_seconds(&s0, &s1, tck),
        "hub_cpu_peak_percent": peak_cpu,
        "hub_cpu_steady_percent": cpu_percent(&s1, &s2, tck),
        "settle_seconds": settle.as_secs(),
        "generator_rss_kib": g2.rss_kib,
        "generator_cpu_seconds": cpu_seconds(&g0, &g2, tck),
        "session_failures": shared.failures.load(Ordering::Relaxed),
    });
    let mut hub = Some(hub);
    if restart && let Some(h) = hub.take() {
        let welcomes = shared.welcomes.load(Ordering::Relaxed);
        let stopped = h.stop().await?;
        let down_at = Instant::now();
        eprintln!("  hub stopped in {:.2} s; restarting", stopped.as_secs_f64());
        let h2 = setup.start().await?;
        let restart_s0 = h2.sample()?;
        let up = down_at.elapsed();
        let mut samples = Vec::new();
        let back = wait_registered(&shared, &h2, agents, Some(welcomes), within, &mut samples).await;
        let restart_s1 = h2.sample()?;
        table.push(row("restart: hub graceful stop", format!("{:.2} s", stopped.as_secs_f64()), ""));
        table.push(row("restart: all back after new hub listens", secs(back), "<= 30 s (10k agents)"));
        table.push(row("restart: all back after old hub exited", secs(back.map(|b| b + up)), ""));
        table.push(row(
            "restart: hub CPU during storm",
            format!("{:.1} CPU-s", cpu_seconds(&restart_s0, &restart_s1, tck)),
            "",
        ));
        table.push(row("restart: hub RSS after storm", mib(restart_s1.rss_kib), ""));
        figures["restart"] = json!({
            "stop_seconds": stopped.as_secs_f64(),
            "back_after_listen_seconds": back.map(|b| b.as_secs_f64()),
            "back_after_exit_seconds": back.map(|b| (b + up).as_secs_f64()),
            "hub_cpu_storm_seconds": cpu_seconds(&restart_s0, &restart_s1, tck),
            "hub_rss_after_kib": restart_s1.rss_kib,
        });
        hub = Some(h2);
    }
    fleet.stop().await;
    if let Some(h) = hub {
        let _ = h.stop().await;
    }
    Ok(ctx.outcome(format!("scale-{agents}{}", if restart { "-restart" } else { "" }), table, figures))
}

/// An operator client over mTLS.
async fn operator(
    cache: &CertCache,
    setup: &HubSetup,
) -> anyhow::Result<v1::operator_service_client::OperatorServiceClient<Channel>> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(cache.read(pki::files::CA_CERT)?))
        .identity(Identity::from_pem(cache.read(pki::files::OPERATOR_CERT)?, cache.read(pki::files::OPERATOR_KEY)?))
        .domain_name("127.0.0.1");
    let ch = Endpoint::from_shared(format!("https://{}", setup.listen))
        .context("hub url")?
        .tls_config(tls)
        .context("tls")?
        .tcp_nodelay(true)
        .connect()
        .await
        .context("operator connect")?;
    Ok(v1::operator_service_client::OperatorServiceClient::new(ch).max_decoding_message_size(256 * 1024 * 1024))
}

/// Splits `0..members` into `stages` contiguous, near-equal parts.
pub fn split_stages(members: u32, stages: u32) -> Vec<std::ops::Range<u32>> {
    let stages = stages.max(1);
    (0..stages).map(|s| (members * s / stages)..(members * (s + 1) / stages)).collect()
}

/// Scenario 2: a NodeImageOnly run over `nodes` nodes in `members` members and `stages` stages.
pub async fn orchestrate(
    ctx: &Ctx,
    nodes: usize,
    members: u32,
    stages: u32,
    group_concurrency: u32,
    within: Duration,
    real_agents: Option<usize>,
) -> anyhow::Result<Outcome> {
    if members == 0 || nodes < members as usize {
        bail!("--members must be between 1 and --nodes");
    }
    let per_member = nodes / members as usize;
    let total_nodes = per_member * members as usize;
    let cache = CertCache::open(&ctx.cache)?;
    let real = real_agents.unwrap_or(total_nodes).min(total_nodes);
    let mut certs = cache.nodes(real)?;
    certs.extend((certs.len()..total_nodes).map(|i| NodeCert {
        name: format!("local-{i:06}"),
        cert: String::new(),
        key: String::new(),
    }));
    let nodes = certs.len();
    let setup = ctx.hub_setup(&cache, fresh_run_dir(&ctx.cache, &format!("orchestrate-{nodes}"))?, 10)?;
    let spec = spec_for(&setup, &cache)?;
    let (hub, local) = match real_agents {
        None => (setup.start().await?, None),
        Some(_) => {
            let (hub, api, _) = setup.start_in_process().await?;
            (hub, Some((api, real)))
        }
    };
    let tck = clk_tck();
    let shared = Shared::new(1000, true);
    let fleet = start_mixed_fleet(certs, per_member, spec, shared.clone(), local);
    let mut samples = Vec::new();
    let t_reg = wait_registered(&shared, &hub, nodes, None, within, &mut samples).await;
    if t_reg.is_none() {
        bail!("only {}/{nodes} agents registered within {within:?}", shared.registered());
    }
    eprintln!("orchestrate: {nodes} nodes registered in {}", secs(t_reg));
    let mut op = operator(&cache, &setup).await?;
    publish_new_image(&mut op).await?;
    let ranges = split_stages(members, stages);
    let stage_specs: Vec<serde_json::Value> = ranges
        .iter()
        .enumerate()
        .map(|(s, r)| {
            json!({"name": format!("stage-{s}"), "groups": [{
                "name": "all",
                "members": r.clone().map(member_name).collect::<Vec<_>>(),
                "max_concurrency": group_concurrency,
            }]})
        })
        .collect();
    let stages_json = json!({ "stages": stage_specs }).to_string();
    create_image_run(&mut op, "bench", stages_json).await?;
    // The run is followed the way `upkeepctl run watch` follows it: one WatchRun stream, subscribed before the
    // start, whose events carry the run's status and which ends when the run does. (Polling GetRun instead reads
    // and serialises the whole run state, 2.7 MB at 10k members, and that load is the bench's, not the run's.)
    let mut stream =
        op.watch_run(v1::WatchRunRequest { name: "bench".into(), from_seq: 0 }).await.context("WatchRun")?.into_inner();
    let h0 = hub.sample()?;
    let started = Instant::now();
    op.start_run(v1::RunNameRequest { name: "bench".into() }).await.context("StartRun")?;
    let mut status = String::new();
    let mut events = Vec::new();
    let mut last_print = Instant::now();
    let mut hub_samples = vec![h0];
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let deadline = tokio::time::sleep(within);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            e = stream.message() => match e.context("reading run events")? {
                Some(e) => {
                    status.clone_from(&e.run_status);
                    events.push(e);
                }
                None => break,
            },
            _ = tick.tick() => {
                if let Ok(s) = hub.sample() {
                    hub_samples.push(s);
                }
                if last_print.elapsed() > Duration::from_secs(10) {
                    last_print = Instant::now();
                    let ops = shared.ops.lock().unwrap_or_else(|p| p.into_inner()).len();
                    eprintln!("  {:>6.1} s: run {status}, {ops} commands answered", started.elapsed().as_secs_f64());
                }
            }
            _ = &mut deadline => break,
        }
    }
    let total = started.elapsed();
    let h1 = hub.sample()?;
    let run = op.get_run(v1::RunNameRequest { name: "bench".into() }).await.context("GetRun")?.into_inner();
    let state_bytes = prost::Message::encoded_len(&run);
    status = run.level.as_ref().map(|l| l.status.clone()).unwrap_or_else(|| "?".into());
    let ops: Vec<sim::OpRecord> = shared.ops.lock().unwrap_or_else(|p| p.into_inner()).clone();
    fleet.stop().await;
    let _ = hub.stop().await;
    let by_hub = hub_member_times(&events);

    // Per member: first command received, last uncordon answered (ms since StartRun).
    let ms = |t: Instant| t.saturating_duration_since(started).as_secs_f64() * 1000.0;
    let mut first: BTreeMap<u32, f64> = BTreeMap::new();
    let mut done: BTreeMap<u32, f64> = BTreeMap::new();
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for o in &ops {
        *kinds.entry(o.kind).or_default() += 1;
        let f = first.entry(o.member).or_insert(f64::MAX);
        *f = f.min(ms(o.received));
        if o.kind == "uncordon" {
            let d = done.entry(o.member).or_insert(0.0);
            *d = d.max(ms(o.answered));
        }
    }
    let durations: Vec<f64> = done.iter().filter_map(|(m, d)| first.get(m).map(|f| d - f)).collect();
    let mut handoffs = Vec::new();
    let mut hub_handoffs = Vec::new();
    let mut stage_handoffs = Vec::new();
    let mut waves = 0u64;
    for (i, r) in ranges.iter().enumerate() {
        let d: Vec<f64> = r.clone().filter_map(|m| done.get(&m).copied()).collect();
        let s: Vec<f64> = r.clone().filter_map(|m| first.get(&m).copied()).collect();
        handoffs.extend(slot_handoffs(&d, &s, group_concurrency as usize));
        let hd: Vec<f64> = r.clone().filter_map(|m| by_hub.get(&member_name(m)).map(|t| t.1)).collect();
        let hs: Vec<f64> = r.clone().filter_map(|m| by_hub.get(&member_name(m)).map(|t| t.0)).collect();
        hub_handoffs.extend(slot_handoffs(&hd, &hs, group_concurrency as usize));
        waves += u64::from(r.len() as u32).div_ceil(u64::from(group_concurrency.max(1)));
        if let Some(next) = ranges.get(i + 1) {
            let last_done = d.iter().copied().fold(f64::MIN, f64::max);
            let next_first = next.clone().filter_map(|m| first.get(&m).copied()).fold(f64::MAX, f64::min);
            if next_first >= last_done && next_first < f64::MAX {
                stage_handoffs.push(next_first - last_done);
            }
        }
    }
    let p = |v: &[f64], q: f64| percentile(v, q).map(|x| format!("{x:.1} ms")).unwrap_or_else(|| "n/a".into());
    let member_p50 = percentile(&durations, 50.0).unwrap_or(0.0);
    let critical_ms = waves as f64 * member_p50;
    let peak_rss = hub_samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let table = vec![
        row("nodes / members / stages", format!("{nodes} / {members} / {stages}"), ""),
        row("group max_concurrency, member max_unavailable", format!("{group_concurrency}, 1 (default)"), ""),
        row("run final status", status.clone(), "Completed"),
        row("total run time (StartRun to terminal status)", format!("{:.1} s", total.as_secs_f64()), ""),
        row("critical path: sequential member waves", waves.to_string(), ""),
        row("member execution p50 (first command to last result)", p(&durations, 50.0), ""),
        row("critical path at p50 member time", format!("{:.1} s", critical_ms / 1000.0), ""),
        row(
            "orchestration overhead (total - critical path)",
            format!("{:.1} s", total.as_secs_f64() - critical_ms / 1000.0),
            "",
        ),
        row(
            "agents: over mTLS / in-process",
            format!("{} / {}", real, nodes - real),
            if real_agents.is_some() { "hub served inside the bench process" } else { "hub binary as a child" },
        ),
        row(
            "handoff p50 (hub events: member's last node done -> next member's first node)",
            p(&hub_handoffs, 50.0),
            "",
        ),
        row("handoff p99 (hub events)", p(&hub_handoffs, 99.0), "<= 10 ms at 10k, <= 50 ms at 100k"),
        row("handoff max (hub events)", p(&hub_handoffs, 100.0), ""),
        row(
            "handoff p50 / p99 (generator: last uncordon answered -> next first command)",
            format!("{} / {}", p(&handoffs, 50.0), p(&handoffs, 99.0)),
            "",
        ),
        row(
            "total / critical path",
            format!("{:.2}", total.as_secs_f64() / (critical_ms / 1000.0).max(1e-9)),
            "<= 1.20",
        ),
        row(
            "stage handoffs (last done -> next stage's first command)",
            stage_handoffs.iter().map(|h| format!("{h:.0} ms")).collect::<Vec<_>>().join(", "),
            "",
        ),
        row(
            "commands answered",
            format!("{} ({})", ops.len(), kinds.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ")),
            "",
        ),
        row("hub CPU during the run", format!("{:.1} CPU-s", cpu_seconds(&h0, &h1, tck)), ""),
        row("hub RSS peak during the run", mib(peak_rss), ""),
        row("run state JSON size", format!("{} KiB", state_bytes / 1024), ""),
    ];
    let figures = json!({
        "nodes": nodes, "members": members, "stages": stages, "group_max_concurrency": group_concurrency,
        "status": status,
        "total_seconds": total.as_secs_f64(),
        "member_waves": waves,
        "member_execution_ms": {"p50": percentile(&durations, 50.0), "p99": percentile(&durations, 99.0), "count": durations.len()},
        "critical_path_seconds": critical_ms / 1000.0,
        "agents_mtls": real, "agents_in_process": nodes - real, "hub_in_process": real_agents.is_some(),
        "handoff_ms": {"p50": percentile(&hub_handoffs, 50.0), "p99": percentile(&hub_handoffs, 99.0), "max": percentile(&hub_handoffs, 100.0), "count": hub_handoffs.len(), "source": "hub run events"},
        "generator_handoff_ms": {"p50": percentile(&handoffs, 50.0), "p99": percentile(&handoffs, 99.0), "max": percentile(&handoffs, 100.0), "count": handoffs.len()},
        "total_over_critical_path": total.as_secs_f64() / (critical_ms / 1000.0).max(1e-9),
        "stage_handoff_ms": stage_handoffs,
        "commands": kinds,
        "hub_cpu_seconds": cpu_seconds(&h0, &h1, tck),
        "hub_rss_peak_kib": peak_rss,
        "run_message_bytes": state_bytes,
        "registered_seconds": t_reg.map(|t| t.as_secs_f64()),
    });
    Ok(ctx.outcome(format!("orchestrate-{nodes}"), table, figures))
}

type Operator = v1::operator_service_client::OperatorServiceClient<Channel>;

/// Creates a NodeImageOnly run to the latest image, in the given stages.
async fn create_image_run(op: &mut Operator, name: &str, stages_json: String) -> anyhow::Result<()> {
    op.create_run(v1::CreateRunRequest {
        name: name.into(),
        stages_json,
        upgrade_type: "NodeImageOnly".into(),
        node_image_selection: "Latest".into(),
        ..Default::default()
    })
    .await
    .context("CreateRun")?;
    Ok(())
}

/// Publishes the image the simulated nodes upgrade to, available everywhere now.
async fn publish_new_image(op: &mut Operator) -> anyhow::Result<()> {
    op.publish_image(v1::PublishImageRequest {
        family: FAMILY.into(),
        version: NEW_VERSION.into(),
        regions: vec![v1::RegionAvailability { region: REGION.into(), available_at_unix_ms: 0 }],
        sha256: "ab".repeat(32),
        // Simulated agents verify nothing; the hub only checks that the signature is well formed.
        signature: upkeep_core::signature::SecretKey::from_seed([7; 32], *b"bench000")
            .sign_prehashed(&upkeep_core::signature::blake2b_512(b""), "bench")
            .to_file_text(),
        url: "https://bench.invalid/image.img".into(),
        size_bytes: 1,
        format: "raw".into(),
    })
    .await
    .context("PublishImage")?;
    Ok(())
}

/// Window opening to first step: every member's node OS window opens at the next whole minute (at least 5 s
/// ahead) while a started NodeImageOnly run holds them Pending; latency = the member's first node starting (the
/// hub's run event) − the window's opening, per member, all members allowed at once.
pub async fn window_open(ctx: &Ctx, members: u32, per_member: usize) -> anyhow::Result<Outcome> {
    let cache = CertCache::open(&ctx.cache)?;
    let certs = cache.nodes(members as usize * per_member)?;
    let nodes = certs.len();
    let setup = ctx.hub_setup(&cache, fresh_run_dir(&ctx.cache, "window-open")?, 10)?;
    let spec = spec_for(&setup, &cache)?;
    let hub = setup.start().await?;
    let shared = Shared::new(1000, false);
    let fleet = start_fleet(certs, per_member, spec, shared.clone());
    let mut samples = Vec::new();
    if wait_registered(&shared, &hub, nodes, None, Duration::from_secs(600), &mut samples).await.is_none() {
        bail!("only {}/{nodes} agents registered", shared.registered());
    }
    let mut op = operator(&cache, &setup).await?;
    publish_new_image(&mut op).await?;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let mut open_ms = (now_ms / 60_000 + 1) * 60_000;
    if open_ms - now_ms < 5_000 {
        open_ms += 60_000;
    }
    let open = chrono::DateTime::from_timestamp_millis(open_ms).context("window time")?;
    let schedule = json!({"frequency": {"type": "Daily", "interval_days": 1},
        "start_time": open.format("%H:%M").to_string(), "duration_hours": 1})
    .to_string();
    let names: Vec<String> = (0..members).map(member_name).collect();
    for m in &names {
        op.set_member_window(v1::SetMemberWindowRequest {
            member: m.clone(),
            kind: "node-os".into(),
            schedule_json: schedule.clone(),
        })
        .await
        .context("SetMemberWindow")?;
    }
    let stages_json =
        json!({"stages": [{"name": "s", "groups": [{"name": "all", "members": names, "max_concurrency": members}]}]})
            .to_string();
    create_image_run(&mut op, "window", stages_json).await?;
    op.start_run(v1::RunNameRequest { name: "window".into() }).await.context("StartRun")?;
    eprintln!("window-open: windows open at {open}; waiting");
    let deadline = Instant::now() + Duration::from_millis((open_ms - now_ms).max(0) as u64) + Duration::from_secs(120);
    loop {
        let run = op.get_run(v1::RunNameRequest { name: "window".into() }).await.context("GetRun")?.into_inner();
        let status = run.level.map(|l| l.status).unwrap_or_default();
        if status == "Completed" {
            break;
        }
        if Instant::now() > deadline {
            bail!("run not completed 2 minutes after the windows opened: {status}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let events = run_events(&mut op, "window").await?;
    fleet.stop().await;
    let _ = hub.stop().await;
    let mut lat: Vec<f64> = Vec::new();
    for m in &names {
        let first = events
            .iter()
            .filter(|e| e.kind == "node" && e.from == "NotStarted" && e.level.ends_with(&format!("of member {m:?}")))
            .map(|e| e.at_unix_ms)
            .min();
        if let Some(t) = first {
            lat.push((t - open_ms) as f64);
        }
    }
    let early = lat.iter().filter(|l| **l < 0.0).count();
    let p = |q: f64| percentile(&lat, q).map(|x| format!("{x:.0} ms")).unwrap_or_else(|| "n/a".into());
    let table = vec![
        row("members / nodes", format!("{members} / {nodes}"), ""),
        row("window opening -> member's first node started, p50", p(50.0), ""),
        row("... p99 / max", format!("{} / {}", p(99.0), p(100.0)), "seconds at most"),
        row("members started before their window opened", early.to_string(), "0"),
    ];
    let figures = json!({"members": members, "nodes": nodes, "open_unix_ms": open_ms,
        "latency_ms": {"p50": percentile(&lat, 50.0), "p99": percentile(&lat, 99.0), "max": percentile(&lat, 100.0),
        "count": lat.len()}, "started_early": early});
    Ok(ctx.outcome("window-open".into(), table, figures))
}

/// Every event of a run, read back from the hub (`WatchRun` from the start; it ends once the run has ended).
async fn run_events(op: &mut Operator, run: &str) -> anyhow::Result<Vec<v1::RunEvent>> {
    let mut stream =
        op.watch_run(v1::WatchRunRequest { name: run.into(), from_seq: 0 }).await.context("WatchRun")?.into_inner();
    let mut out = Vec::new();
    while let Some(e) = stream.message().await.context("reading run events")? {
        out.push(e);
    }
    Ok(out)
}

/// Per member, from the hub's own node events: when its first node started (lease taken, first command next)
/// and when its last node finished (last result in), in ms since the first event.
fn hub_member_times(events: &[v1::RunEvent]) -> BTreeMap<String, (f64, f64)> {
    let t0 = events.iter().map(|e| e.at_unix_ms).min().unwrap_or(0);
    let mut out: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for e in events.iter().filter(|e| e.kind == "node") {
        // level: node "<node>" of member "<member>"
        let Some(member) = e.level.rsplit_once("of member ").map(|(_, m)| m.trim_matches('"').to_string()) else {
            continue;
        };
        let t = (e.at_unix_ms - t0) as f64;
        let entry = out.entry(member).or_insert((f64::MAX, f64::MIN));
        if e.from == "NotStarted" && e.to == "Running" {
            entry.0 = entry.0.min(t);
        }
        if e.from == "Running" && e.to != "Running" {
            entry.1 = entry.1.max(t);
        }
    }
    out.retain(|_, (s, d)| *s < f64::MAX && *d > f64::MIN);
    out
}

/// Scenario 3: heartbeats per second the hub reads, with `agents` sessions sending as fast as it accepts.
pub async fn heartbeats(ctx: &Ctx, agents: usize, window: Duration) -> anyhow::Result<Outcome> {
    let cache = CertCache::open(&ctx.cache)?;
    let certs = cache.nodes(agents)?;
    let setup = ctx.hub_setup(&cache, fresh_run_dir(&ctx.cache, &format!("heartbeats-{agents}"))?, 10)?;
    let spec = spec_for(&setup, &cache)?;
    // The hub runs inside this process so that heartbeats are counted where the hub reads them (its CPU then
    // includes the generator's: the process's CPU is reported, and the generator's own sampled alone before).
    let (hub, _, hub_fleet) = setup.start_in_process().await?;
    let tck = clk_tck();
    let shared = Shared::new(1000, false);
    let fleet = start_fleet(certs, 10, spec, shared.clone());
    let mut samples = Vec::new();
    if wait_registered(&shared, &hub, agents, None, Duration::from_secs(600), &mut samples).await.is_none() {
        bail!("only {}/{agents} agents registered", shared.registered());
    }
    shared.phase.send_replace(Phase::Flood);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (b0, r0, s0) = (shared.heartbeats.load(Ordering::Relaxed), hub_fleet.heartbeats_read(), hub.sample()?);
    tokio::time::sleep(window).await;
    let (b1, r1, s1) = (shared.heartbeats.load(Ordering::Relaxed), hub_fleet.heartbeats_read(), hub.sample()?);
    let still = shared.registered();
    fleet.stop().await;
    let _ = hub.stop().await;
    let span = s1.at.duration_since(s0.at).as_secs_f64();
    let rate = (r1 - r0) as f64 / span;
    let sent = (b1 - b0) as f64 / span;
    let hub_cpu = cpu_percent(&s0, &s1, tck);
    let table = vec![
        row("sessions flooding", format!("{agents} ({still} still connected at the end)"), ""),
        row("window", format!("{} s", window.as_secs()), ""),
        row("heartbeats per second read by the hub (sustained)", format!("{rate:.0}/s"), ""),
        row("heartbeats per second queued by the generator", format!("{sent:.0}/s"), ""),
        row("process CPU (hub and generator in one process)", format!("{hub_cpu:.0} %"), ""),
        row("heartbeats read per process CPU-second", format!("{:.0}", rate / (hub_cpu / 100.0).max(0.01)), ""),
        row(
            "= agents at a 10 s interval (at this rate)",
            format!("{:.0}", rate * 10.0),
            "50k agents on 2 cores = 5,000/s",
        ),
        row("hub RSS", mib(s1.rss_kib), ""),
    ];
    let figures = json!({
        "agents": agents, "window_seconds": window.as_secs(), "heartbeats_per_second": rate,
        "counted_at": "hub (Fleet::heartbeats_read, hub in-process)", "generator_heartbeats_per_second": sent,
        "process_cpu_percent": hub_cpu,
        "heartbeats_per_process_cpu_second": rate / (hub_cpu / 100.0).max(0.01),
        "hub_rss_kib": s1.rss_kib, "still_connected": still,
    });
    Ok(ctx.outcome(format!("heartbeats-{agents}"), table, figures))
}

fn file_size(p: &std::path::Path) -> Option<u64> {
    std::fs::metadata(p).ok().map(|m| m.len())
}

/// Sizes of the release binaries (the release profile strips symbols).
pub fn binary_sizes(ctx: &Ctx) -> Vec<(String, Option<u64>)> {
    let dir = ctx.hub_bin.parent().map(std::path::Path::to_path_buf).unwrap_or_default();
    ["upkeep-agent", "upkeep-hub", "upkeepctl"]
        .iter()
        .map(|b| (b.to_string(), file_size(&if *b == "upkeep-agent" { ctx.agent_bin.clone() } else { dir.join(b) })))
        .collect()
}

fn size_rows(sizes: &[(String, Option<u64>)]) -> Vec<Row> {
    sizes
        .iter()
        .map(|(name, size)| {
            row(
                format!("stripped binary size: {name}"),
                size.map(|s| format!("{:.2} MB", s as f64 / 1e6)).unwrap_or_else(|| "not built".into()),
                if name == "upkeep-agent" { "<= 6 MB" } else { "" },
            )
        })
        .collect()
}

/// Scenario 4: an idle real upkeep-agent against a real hub for `window`.
/// With `executor`, the agent runs privilege-separated as the packages run it: the executor as its own process
/// (`upkeep-agent executor`, serving this user), the agent's node operations going to it; both are measured.
pub async fn agent_idle(
    ctx: &Ctx,
    window: Duration,
    heartbeat_seconds: u32,
    executor: bool,
) -> anyhow::Result<Outcome> {
    let cache = CertCache::open(&ctx.cache)?;
    let run_dir = fresh_run_dir(&ctx.cache, "agent-idle")?;
    let setup = ctx.hub_setup(&cache, run_dir.clone(), heartbeat_seconds)?;
    let hub = setup.start().await?;
    let node = run_dir.join("node");
    let root = node.join("root");
    std::fs::create_dir_all(root.join("etc/upkeep")).context("node root")?;
    std::fs::write(root.join("etc/os-release"), "ID=debian\nVERSION_ID=\"12\"\n").context("os-release")?;
    std::fs::write(root.join("etc/upkeep/node-image"), format!("FAMILY={FAMILY}\nVERSION={OLD_VERSION}\n"))
        .context("node-image")?;
    let ca = pki::Ca::load(&cache.pki_dir())?;
    let pem = ca.issue_client(&Principal { role: Role::Node, name: "idle-agent".into() })?;
    std::fs::write(node.join("node.pem"), pem.cert).context("node cert")?;
    std::fs::write(node.join("node.key"), pem.key).context("node key")?;
    let config = node.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "hub = \"https://{}\"\nmember = \"m-idle\"\nnode_pool = \"pool\"\nregion = {REGION:?}\nstate_dir = {:?}\nroot = {:?}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            setup.listen,
            node.join("state"),
            root,
            cache.pki_dir().join(pki::files::CA_CERT),
            node.join("node.pem"),
            node.join("node.key"),
        ),
    )
    .context("agent.toml")?;
    let socket = node.join("executor.sock");
    let mut executor_proc = None;
    if executor {
        let mut text = std::fs::read_to_string(&config).context("agent.toml")?;
        text.push_str(&format!("[executor]\nsocket = {socket:?}\nclient_user = \"{}\"\n", nix::unistd::getuid()));
        std::fs::write(&config, text).context("agent.toml")?;
        let elog = std::fs::File::create(node.join("executor.log")).context("executor.log")?;
        let child = tokio::process::Command::new(&ctx.agent_bin)
            .arg("--config")
            .arg(&config)
            .arg("executor")
            .stdout(std::process::Stdio::null())
            .stderr(elog)
            .kill_on_drop(true)
            .spawn()
            .context("starting upkeep-agent executor")?;
        let began = Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if began.elapsed() > Duration::from_secs(30) {
                bail!("the executor did not listen on {} within 30 s", socket.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        executor_proc = Some(child);
    }
    let log_path = node.join("agent.log");
    let log = std::fs::File::create(&log_path).context("agent.log")?;
    if !ctx.agent_bin.exists() {
        bail!("{} missing: run `cargo build --release -p upkeep-agent` first", ctx.agent_bin.display());
    }
    let mut agent = tokio::process::Command::new(&ctx.agent_bin)
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting upkeep-agent")?;
    let pid = agent.id().context("agent pid")?;
    let began = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains("registered with hub") {
            break;
        }
        if began.elapsed() > Duration::from_secs(30) || agent.try_wait().ok().flatten().is_some() {
            bail!("agent did not register within 30 s; see {}", log_path.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the first report and config exchange finish; the window measures idle only.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let tck = clk_tck();
    let a = measure::sample(pid)?;
    let mut tally = measure::SwitchTally::default();
    tally.record(&measure::thread_switches(pid));
    let mut max_rss = a.rss_kib;
    let xpid = executor_proc.as_ref().and_then(|c| c.id());
    let mut xtally = measure::SwitchTally::default();
    let xa = match xpid {
        Some(x) => {
            xtally.record(&measure::thread_switches(x));
            Some(measure::sample(x)?)
        }
        None => None,
    };
    let end = Instant::now() + window;
    while Instant::now() < end {
        // Every second: reading /proc does not wake the agent, and a thread that exits loses at most 1 s.
        tokio::time::sleep(Duration::from_secs(1).min(end.saturating_duration_since(Instant::now()))).await;
        tally.record(&measure::thread_switches(pid));
        if let Ok(s) = measure::sample(pid) {
            max_rss = max_rss.max(s.rss_kib);
        }
        if let Some(x) = xpid {
            xtally.record(&measure::thread_switches(x));
        }
    }
    let b = measure::sample(pid)?;
    tally.record(&measure::thread_switches(pid));
    let xb = match xpid {
        Some(x) => {
            xtally.record(&measure::thread_switches(x));
            Some(measure::sample(x)?)
        }
        None => None,
    };
    // RSS counts the binary's pages in both processes; PSS shares them out (what the two cost together).
    let (pss, xpss) = (pss_kib(pid), xpid.map(pss_kib).unwrap_or(0));
    let _ = agent.start_kill();
    let _ = agent.wait().await;
    if let Some(mut x) = executor_proc {
        let _ = x.start_kill();
        let _ = x.wait().await;
    }
    let _ = hub.stop().await;
    let secs_f = b.at.duration_since(a.at).as_secs_f64();
    let (vol, invol) = tally.totals();
    let (vol, invol) = (vol as f64 / secs_f, invol as f64 / secs_f);
    // Wakeups the protocol asks of the agent: one heartbeat per interval (its only timer; it sends no HTTP/2
    // pings). A hub that still sends keep-alive pings adds one wakeup per ping to answer it; that is the hub's
    // cost, counted here all the same (all threads' voluntary switches).
    let expected = 1.0 / f64::from(heartbeat_seconds);
    let sizes = binary_sizes(ctx);
    let mut table = vec![
        row("window", format!("{:.0} s (heartbeat {heartbeat_seconds} s)", secs_f), ""),
        row("agent RSS at end", mib(b.rss_kib), "<= 8 MiB"),
        row("agent RSS max sampled (every 1 s)", mib(max_rss), "<= 8 MiB"),
        row("agent RSS peak (VmHWM, whole life)", mib(b.hwm_kib), ""),
        row("agent CPU", format!("{:.4} % ({:.2} CPU-s)", cpu_percent(&a, &b, tck), cpu_seconds(&a, &b, tck)), ""),
        row("agent threads at end / seen in the window", format!("{} / {}", b.threads, tally.threads_seen()), ""),
        row(
            "wakeups/s (voluntary ctxt switches, all threads)",
            format!("{vol:.3}"),
            format!("~{expected:.3}: the heartbeat (+ answers to hub pings)"),
        ),
        row("involuntary ctxt switches/s", format!("{invol:.3}"), ""),
    ];
    let mut executor_figures = serde_json::Value::Null;
    if let (Some(xa), Some(xb)) = (&xa, &xb) {
        let xs = xb.at.duration_since(xa.at).as_secs_f64();
        let (xvol, _) = xtally.totals();
        let xvol = xvol as f64 / xs;
        table.push(row("executor RSS at end", mib(xb.rss_kib), ""));
        table.push(row("agent + executor RSS at end (binary pages counted twice)", mib(b.rss_kib + xb.rss_kib), ""));
        table.push(row("agent + executor PSS at end (shared pages shared out)", mib(pss + xpss), "<= 8 MiB"));
        table.push(row("executor wakeups/s", format!("{xvol:.3}"), "0: it waits for a request"));
        executor_figures = json!({"rss_end_kib": xb.rss_kib, "rss_hwm_kib": xb.hwm_kib, "voluntary_ctxt_per_second": xvol,
            "threads": xb.threads, "agent_plus_executor_rss_kib": b.rss_kib + xb.rss_kib,
            "agent_pss_kib": pss, "executor_pss_kib": xpss, "agent_plus_executor_pss_kib": pss + xpss});
    }
    table.extend(size_rows(&sizes));
    let figures = json!({
        "executor": executor_figures,
        "window_seconds": secs_f, "heartbeat_interval_seconds": heartbeat_seconds,
        "rss_end_kib": b.rss_kib, "rss_max_sampled_kib": max_rss, "rss_hwm_kib": b.hwm_kib,
        "cpu_percent": cpu_percent(&a, &b, tck), "cpu_seconds": cpu_seconds(&a, &b, tck),
        "threads": b.threads, "threads_seen": tally.threads_seen(),
        "voluntary_ctxt_per_second": vol, "involuntary_ctxt_per_second": invol,
        "expected_timer_wakeups_per_second": expected,
        "binary_bytes": sizes.iter().map(|(n, s)| (n.clone(), json!(s))).collect::<serde_json::Map<_, _>>(),
    });
    Ok(ctx.outcome("agent-idle".into(), table, figures))
}

/// Proportional set size of `pid` (`/proc/PID/smaps_rollup`), KiB; 0 when unreadable.
fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Stripped binary sizes only.
pub fn sizes(ctx: &Ctx) -> Outcome {
    let sizes = binary_sizes(ctx);
    let figures = json!({
        "binary_bytes": sizes.iter().map(|(n, s)| (n.clone(), json!(s))).collect::<serde_json::Map<_, _>>(),
    });
    ctx.outcome("sizes".into(), size_rows(&sizes), figures)
}

/// The events one bench commit appends: `n` member transitions, as the engine writes them.
pub fn commit_events(n: usize) -> Vec<NewEvent> {
    (0..n)
        .map(|k| NewEvent {
            at_ms: 0,
            kind: "member".into(),
            level: format!("member \"m-{k:04}\""),
            from: "Running".into(),
            to: "Completed".into(),
            message: "bench".into(),
            error: String::new(),
            run_status: "Running".into(),
        })
        .collect()
}

/// Scenario 5: committed run transitions per second through `Store::commit_run` on SQLite: the whole state
/// rewritten (as before run states were stored in parts) against one member's part, side by side.
pub fn store(ctx: &Ctx, window: Duration, state_bytes: &[usize], events_per_commit: usize) -> anyhow::Result<Outcome> {
    let dir = fresh_run_dir(&ctx.cache, "store")?;
    let mut table = Vec::new();
    let mut results = Vec::new();
    let events = commit_events(events_per_commit);
    let mut db = 0;
    for &size in state_bytes {
        for whole in [true, false] {
            db += 1;
            let store = upkeep_hub::store::sqlite::SqliteStore::open(&dir.join(format!("hub-{db}.db")))?;
            let pad = "x".repeat(size);
            let name = "bench";
            let frame = vec![("frame".to_string(), format!("{{\"pad\":\"{pad}\"}}"))];
            store.create_run(&RunRecord {
                name: name.into(),
                parts: frame,
                version: 1,
                status: "Running".into(),
                strategy_name: None,
                created_ms: 0,
            })?;
            let write = |n: u64| {
                if whole {
                    RunWrite::Replace(vec![(runparts::WHOLE.into(), format!("{{\"n\":{n},\"pad\":\"{pad}\"}}"))])
                } else {
                    // A member's part is ~250 bytes: its level, target and attempts.
                    let body = format!("{{\"name\":\"m-{:04}\",\"n\":{n},\"pad\":\"{}\"}}", n % 1000, "y".repeat(200));
                    RunWrite::Update(vec![(format!("member/m-{:04}", n % 1000), body)])
                }
            };
            let mut n = 0u64;
            let began = Instant::now();
            while began.elapsed() < window {
                store.commit_run(name, n + 1, "Running", &write(n), &events)?;
                n += 1;
            }
            let elapsed = began.elapsed().as_secs_f64();
            let per_s = n as f64 / elapsed;
            let what = if whole { "whole state rewritten" } else { "one member part" };
            table.push(row(
                format!("commit_run/s, run of {} KiB, {what}, {events_per_commit} event(s)", size / 1024),
                format!("{per_s:.0}/s ({:.3} ms each)", 1000.0 / per_s.max(1e-9)),
                "",
            ));
            results.push(json!({"state_bytes": size, "whole": whole, "commits": n, "seconds": elapsed,
                "commits_per_second": per_s, "transitions_per_second": per_s * events_per_commit as f64}));
        }
    }
    table.push(row("SQLite", "WAL, synchronous=NORMAL (the hub's settings)", ""));
    let figures = json!({"events_per_commit": events_per_commit, "runs": results});
    Ok(ctx.outcome("store".into(), table, figures))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_cover_every_member_once() {
        let r = split_stages(1000, 3);
        assert_eq!(r, vec![0..333, 333..666, 666..1000]);
        assert_eq!(split_stages(2, 3).iter().map(|r| r.len()).sum::<usize>(), 2);
    }
}
