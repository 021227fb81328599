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
