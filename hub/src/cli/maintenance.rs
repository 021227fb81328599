//! `upkeepctl patch ...`, `upkeepctl lease ...` and `upkeepctl node reboot`: the SecurityPatch catalog and the
//! disruption leases that channel rollouts and reboots run under.

use super::output::{emit, table};
use super::{Format, status_line};
use anyhow::bail;
use clap::Subcommand;
use std::io::Write;
use tonic::transport::Channel;
use upkeep_proto::v1;
use upkeep_proto::v1::operator_service_client::OperatorServiceClient;

type Client = OperatorServiceClient<Channel>;

/// `upkeepctl patch ...`
#[derive(Debug, Subcommand)]
pub enum PatchCommand {
    /// Publish a security patch: the exact packages SecurityPatch members of this image family install.
    Publish {
        /// Image family, e.g. Debian12-gen2.
        #[arg(long)]
        family: String,
        /// Patch version YYYYMM.DD.N.
        #[arg(long)]
        version: String,
        /// A pinned package, name=version (repeat for each package).
        #[arg(long = "package", required = true)]
        packages: Vec<String>,
    },
    /// List published security patches.
    List {
        /// Only this image family.
        #[arg(long)]
        family: Option<String>,
    },
}

/// `upkeepctl lease ...`
#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// Nodes out of service with the hub's permission now.
    List {
        /// Only this member.
        #[arg(long)]
        member: Option<String>,
    },
}

/// `upkeepctl schedule`
#[derive(Debug, clap::Args)]
pub struct ScheduleArgs {
    /// How far ahead, days (1..=90).
    #[arg(long, default_value_t = 7)]
    pub days: u32,
    /// Only this member.
    #[arg(long)]
    pub member: Option<String>,
    /// How long one node's operation is assumed to take, seconds (spaces a rollout's batches).
    #[arg(long, default_value_t = 600)]
    pub node_seconds: u32,
    /// How long one update-run member is assumed to take, seconds (as `run plan --member-seconds`).
    #[arg(long, default_value_t = 600)]
    pub member_seconds: u32,
}

fn time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| "-".into())
}

fn patch_json(p: &v1::SecurityPatch) -> serde_json::Value {
    serde_json::json!({
        "family": p.family,
        "version": p.version,
        "packages": p.packages,
        "published": time(p.published_unix_ms),
    })
}

fn lease_json(l: &v1::Lease) -> serde_json::Value {
    serde_json::json!({
        "node": l.node,
        "lease_id": l.lease_id,
        "member": l.member,
        "holder": l.holder,
        "purpose": l.purpose,
        "granted": time(l.granted_unix_ms),
        "expires": time(l.expires_unix_ms),
        "forced": l.forced,
    })
}

/// Runs a patch command.
pub async fn patch(c: &mut Client, cmd: &PatchCommand, format: Format, out: &mut dyn Write) -> anyhow::Result<()> {
    match cmd {
        PatchCommand::Publish { family, version, packages } => {
            let req = v1::PublishSecurityPatchRequest {
                family: family.clone(),
                version: version.clone(),
                packages: packages.clone(),
            };
            let p = c.publish_security_patch(req).await.map_err(status_line)?.into_inner();
            if format.is_structured() {
                return emit(format, out, &patch_json(&p));
            }
            writeln!(out, "security patch {}-{} published ({} packages)", p.family, p.version, p.packages.len())?;
        }
        PatchCommand::List { family } => {
            let req = v1::ListSecurityPatchesRequest { family: family.clone().unwrap_or_default() };
            let all = c.list_security_patches(req).await.map_err(status_line)?.into_inner().patches;
            if format.is_structured() {
                return emit(format, out, &all.iter().map(patch_json).collect::<Vec<_>>());
            }
            let rows: Vec<Vec<String>> = all
                .iter()
                .map(|p| vec![p.family.clone(), p.version.clone(), p.packages.join(" "), time(p.published_unix_ms)])
                .collect();
            table(out, &["FAMILY", "VERSION", "PACKAGES", "PUBLISHED"], &rows)?;
        }
    }
    Ok(())
}

/// Runs a lease command.
pub async fn lease(c: &mut Client, cmd: &LeaseCommand, format: Format, out: &mut dyn Write) -> anyhow::Result<()> {
    match cmd {
        LeaseCommand::List { member } => {
            let req = v1::ListLeasesRequest { member: member.clone().unwrap_or_default() };
            let all = c.list_leases(req).await.map_err(status_line)?.into_inner().leases;
            if format.is_structured() {
                return emit(format, out, &all.iter().map(lease_json).collect::<Vec<_>>());
            }
            let rows: Vec<Vec<String>> = all
                .iter()
                .map(|l| {
                    vec![
                        l.member.clone(),
                        l.node.clone(),
                        l.holder.clone(),
                        l.lease_id.clone(),
                        l.purpose.clone(),
                        time(l.granted_unix_ms),
                        time(l.expires_unix_ms),
                    ]
                })
                .collect();
            table(out, &["MEMBER", "NODE", "HOLDER", "LEASE", "PURPOSE", "SINCE", "EXPIRES"], &rows)?;
        }
    }
    Ok(())
}

/// `upkeepctl node reboot NODE [--force]`.
pub async fn reboot(
    c: &mut Client,
    node: &str,
    force: bool,
    format: Format,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    if node.trim().is_empty() {
        bail!("NODE: empty; name the node to reboot (see `upkeepctl node list`)");
    }
    let l =
        c.reboot_node(v1::RebootNodeRequest { node: node.to_string(), force }).await.map_err(status_line)?.into_inner();
    if format.is_structured() {
        return emit(format, out, &lease_json(&l));
    }
    writeln!(
        out,
        "node {} reboots under lease {} (member {}{}); the hub cordons, drains, reboots and uncordons it, then gives \
         the lease back",
        l.node,
        l.lease_id,
        l.member,
        if l.forced { ", forced outside the window" } else { "" }
    )?;
    Ok(())
}

/// `upkeepctl node uncordon NODE`.
pub async fn uncordon(c: &mut Client, node: &str, out: &mut dyn Write) -> anyhow::Result<()> {
    if node.trim().is_empty() {
        bail!("NODE: empty; name the node to uncordon (see `upkeepctl lease list`)");
    }
    let r =
        c.uncordon_node(v1::UncordonNodeRequest { node: node.to_string() }).await.map_err(status_line)?.into_inner();
    let was = if r.out_of_service.is_empty() {
        "it held no lease".to_string()
    } else {
        format!("it was out under {}", r.out_of_service)
    };
    writeln!(out, "node {node} is uncordoned by work {} and its leases given back ({was})", r.work)?;
    Ok(())
}

fn upcoming_json(o: &v1::UpcomingOperation) -> serde_json::Value {
    serde_json::json!({
        "member": o.member,
        "node": o.node,
        "source": o.source,
        "operation": o.operation,
        "earliest": (o.earliest_unix_ms != 0).then(|| time(o.earliest_unix_ms)),
        "why": o.why,
        "reference": o.reference,
        "batch": o.batch,
        "batches": o.batches,
    })
}

/// `upkeepctl schedule`.
pub async fn schedule(c: &mut Client, a: &ScheduleArgs, format: Format, out: &mut dyn Write) -> anyhow::Result<()> {
    if a.days == 0 {
        bail!("--days: 0; give how many days ahead to look (1..=90)");
    }
    if a.node_seconds == 0 || a.member_seconds == 0 {
        bail!("--node-seconds/--member-seconds: 0; give how long one operation takes, in seconds");
    }
    let req = v1::GetScheduleRequest {
        days: a.days,
        member: a.member.clone().unwrap_or_default(),
        assumed_node_seconds: a.node_seconds,
        assumed_member_seconds: a.member_seconds,
    };
    let s = c.get_schedule(req).await.map_err(status_line)?.into_inner();
    if format.is_structured() {
        let v = serde_json::json!({
            "generated": time(s.generated_unix_ms),
            "until": time(s.horizon_unix_ms),
            "operations": s.operations.iter().map(upcoming_json).collect::<Vec<_>>(),
        });
        return emit(format, out, &v);
    }
    if s.operations.is_empty() {
        writeln!(out, "nothing scheduled until {}", time(s.horizon_unix_ms))?;
        return Ok(());
    }
    let rows: Vec<Vec<String>> = s
        .operations
        .iter()
        .map(|o| {
            let batch = if o.batches > 0 { format!("{}/{}", o.batch, o.batches) } else { "-".into() };
            let when = if o.earliest_unix_ms == 0 { "unknown".into() } else { time(o.earliest_unix_ms) };
            let node = if o.node.is_empty() { "-".into() } else { o.node.clone() };
            vec![when, o.member.clone(), node, o.source.clone(), o.operation.clone(), batch, o.why.clone()]
        })
        .collect();
    table(out, &["EARLIEST (UTC)", "MEMBER", "NODE", "SOURCE", "OPERATION", "BATCH", "WHY"], &rows)?;
    Ok(())
}
