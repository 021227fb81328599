//! Rendering of upkeepctl's read commands: aligned tables for people, JSON with stable names for programs.
//! The JSON shapes are a public interface (docs/cli-json.md): add fields, never rename or remove them.

use super::Format;
use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use upkeep_proto::v1;

/// The node label carrying the node-image-version, as on Kubernetes nodes.
pub const NODE_IMAGE_LABEL: &str = "upkeep.io/node-image-version";
/// The node label carrying the security patch version.
pub const SECURITY_PATCH_LABEL: &str = "upkeep.io/security-patch-version";

/// JSON form of a node.
#[derive(Debug, Serialize)]
pub struct NodeJson {
    /// Node name.
    pub name: String,
    /// Member.
    pub member: String,
    /// Node pool.
    pub node_pool: String,
    /// Region.
    pub region: String,
    /// Ready or Unknown.
    pub status: String,
    /// Whether the agent has a session open now.
    pub connected: bool,
    /// Node OS channel in force on the node.
    pub channel: String,
    /// `<family>-<YYYYMM.DD.N>` as the node reports it: the booted image with the applied security patch folded
    /// in (SPEC §1), the value of the `upkeep.io/node-image-version` label.
    pub node_image_version: String,
    /// `<family>-<YYYYMM.DD.N>` of the booted image alone.
    pub booted_image_version: String,
    /// Security patch version.
    pub security_patch_version: String,
    /// Labels as on a Kubernetes node.
    pub labels: BTreeMap<String, String>,
    /// os-release ID.
    pub os_family: String,
    /// os-release VERSION_ID.
    pub os_version: String,
    /// Kernel release.
    pub kernel: String,
    /// Kubernetes version.
    pub kubernetes_version: String,
    /// Control-plane node.
    pub control_plane: bool,
    /// Hardware class.
    pub hardware_class: String,
    /// Why the channel in force differs from the member's, or what could not be applied.
    pub channel_note: String,
    /// Reboot required.
    pub reboot_required: bool,
    /// Agent version.
    pub agent_version: String,
    /// First registration (RFC 3339 UTC).
    pub first_seen: Option<String>,
    /// Last message of any kind (RFC 3339 UTC).
    pub last_seen: Option<String>,
    /// Last report (RFC 3339 UTC).
    pub last_report: Option<String>,
    /// Operations in flight.
    pub operations: Vec<OperationJson>,
    /// What its channel wants that it does not have yet (empty: up to date).
    pub behind: String,
    /// Why not now: what the node waits for, or what is being done to it (empty: nothing owed).
    pub waiting: String,
    /// When it is next eligible for what it waits for (RFC 3339 UTC), if known.
    pub next_eligible: Option<String>,
    /// The lease that keeps it out of service, with holder and since when (empty: in service).
    pub out_of_service: String,
    /// The work done to it, newest first (`node show` only; absent from `node list`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<Vec<HistoryJson>>,
}

/// JSON form of one entry of a node's history.
#[derive(Debug, Serialize)]
pub struct HistoryJson {
    /// Work id.
    pub work_id: String,
    /// What it was for.
    pub purpose: String,
    /// Done, Skipped, Failed, NotReached or Running.
    pub outcome: String,
    /// Why skipped or failed.
    pub detail: String,
    /// Started (RFC 3339 UTC).
    pub started: Option<String>,
    /// Finished (RFC 3339 UTC), null while running.
    pub finished: Option<String>,
}

/// JSON form of an operation in flight.
#[derive(Debug, Serialize)]
pub struct OperationJson {
    /// Operation id.
    pub operation_id: String,
    /// Kind.
    pub kind: String,
    /// Step.
    pub step: String,
    /// State.
    pub state: String,
}

/// JSON form of a member.
#[derive(Debug, Serialize)]
pub struct MemberJson {
    /// Member name.
    pub name: String,
    /// Node OS upgrade channel.
    pub node_os_channel: String,
    /// Cluster auto-upgrade channel.
    pub auto_upgrade_channel: String,
    /// Nodes in the inventory.
    pub node_count: u32,
    /// Regions.
    pub regions: Vec<String>,
    /// Node pools.
    pub node_pools: Vec<String>,
    /// Configuration generation.
    pub config_generation: u64,
}

fn rfc3339(ms: i64) -> Option<String> {
    (ms > 0)
        .then(|| Utc.timestamp_millis_opt(ms).single())
        .flatten()
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// The JSON view of a wire node.
pub fn node_json(n: &v1::Node) -> NodeJson {
    let r = n.report.clone().unwrap_or_default();
    let mut labels = BTreeMap::new();
    if !r.node_image_version.is_empty() {
        labels.insert(NODE_IMAGE_LABEL.to_string(), r.node_image_version.clone());
    }
    if !r.security_patch_version.is_empty() {
        labels.insert(SECURITY_PATCH_LABEL.to_string(), r.security_patch_version.clone());
    }
    NodeJson {
        name: r.node_name,
        member: r.member,
        node_pool: r.node_pool,
        region: r.region,
        status: n.status.clone(),
        connected: n.connected,
        channel: r.channel,
        // A hub older than the field sends it empty; its agents' node_image_version is the booted image.
        booted_image_version: if r.booted_image_version.is_empty() {
            r.node_image_version.clone()
        } else {
            r.booted_image_version
        },
        node_image_version: r.node_image_version,
        security_patch_version: r.security_patch_version,
        labels,
        os_family: r.os_family,
        os_version: r.os_version,
        kernel: r.kernel,
        kubernetes_version: r.kubernetes_version,
        control_plane: r.control_plane,
        hardware_class: r.hardware_class,
        channel_note: r.channel_note,
        reboot_required: r.reboot_required,
        agent_version: r.agent_version,
        first_seen: rfc3339(n.first_seen_unix_ms),
        last_seen: rfc3339(n.last_seen_unix_ms),
        last_report: rfc3339(n.last_report_unix_ms),
        operations: r
            .operations
            .into_iter()
            .map(|o| OperationJson { operation_id: o.operation_id, kind: o.kind, step: o.step, state: o.state })
            .collect(),
        behind: n.behind.clone(),
        waiting: n.waiting.clone(),
        next_eligible: rfc3339(n.next_eligible_unix_ms),
        out_of_service: n.out_of_service.clone(),
        history: None,
    }
}

/// `node show`'s JSON: the node with its history.
pub fn node_show_json(n: &v1::Node) -> NodeJson {
    let mut j = node_json(n);
    j.history = Some(
        n.history
            .iter()
            .map(|h| HistoryJson {
                work_id: h.work_id.clone(),
                purpose: h.purpose.clone(),
                outcome: h.outcome.clone(),
                detail: h.detail.clone(),
                started: rfc3339(h.started_unix_ms),
                finished: rfc3339(h.finished_unix_ms),
            })
            .collect(),
    );
    j
}

/// One cell for `node list`: out of service (and who holds it), behind its channel, or "-".
fn work_cell(j: &NodeJson) -> String {
    if let Some(holder) = j.out_of_service.split(' ').next().filter(|h| !h.is_empty()) {
        return format!("out of service ({holder})");
    }
    match j.behind.split_once(" wants ") {
        Some((_, rest)) => format!("behind: wants {}", rest.split(' ').next().unwrap_or(rest)),
        None if !j.behind.is_empty() => format!("behind: {}", j.behind),
        None => "-".into(),
    }
}

/// The JSON view of a wire member.
pub fn member_json(m: &v1::Member) -> MemberJson {
    MemberJson {
        name: m.name.clone(),
        node_os_channel: m.node_os_channel.clone(),
        auto_upgrade_channel: m.auto_upgrade_channel.clone(),
        node_count: m.node_count,
        regions: m.regions.clone(),
        node_pools: m.node_pools.clone(),
        config_generation: m.config_generation,
    }
}

/// "12s ago", "3m ago", "2h ago", "4d ago", or "never".
pub fn ago(ms: i64, now: DateTime<Utc>) -> String {
    if ms <= 0 {
        return "never".into();
    }
    let secs = ((now.timestamp_millis() - ms) / 1000).max(0);
    match secs {
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s if s < 172_800 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86_400),
    }
}

/// Writes a value as JSON (pretty) or YAML, as `format` asks.
pub fn emit(format: Format, out: &mut dyn Write, v: &impl Serialize) -> anyhow::Result<()> {
    match format {
        Format::Yaml => write!(out, "{}", super::yaml::to_string(v)?)?,
        _ => writeln!(out, "{}", serde_json::to_string_pretty(v)?)?,
    }
    Ok(())
}

/// Writes rows as aligned columns (two spaces between columns, no trailing spaces).
pub fn table(out: &mut dyn Write, header: &[&str], rows: &[Vec<String>]) -> std::io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string()
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for row in rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

fn or_dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.to_string() }
}

/// `node list`.
pub fn print_nodes(format: Format, nodes: &[v1::Node], now: DateTime<Utc>, out: &mut dyn Write) -> anyhow::Result<()> {
    if format.is_structured() {
        #[derive(Serialize)]
        struct List {
            nodes: Vec<NodeJson>,
        }
        return emit(format, out, &List { nodes: nodes.iter().map(node_json).collect() });
    }
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let j = node_json(n);
            let work = work_cell(&j);
            vec![
                j.name,
                j.member,
                j.node_pool,
                j.region,
                or_dash(&j.channel),
                j.status,
                format!("{NODE_IMAGE_LABEL}={}", j.node_image_version),
                ago(n.last_seen_unix_ms, now),
                work,
            ]
        })
        .collect();
    table(
        out,
        &["NAME", "MEMBER", "POOL", "REGION", "CHANNEL", "STATUS", "NODE-IMAGE-VERSION LABEL", "LAST SEEN", "WORK"],
        &rows,
    )?;
    Ok(())
}

/// `node show`.
pub fn print_node(format: Format, n: &v1::Node, now: DateTime<Utc>, out: &mut dyn Write) -> anyhow::Result<()> {
    let j = node_show_json(n);
    if format.is_structured() {
        return emit(format, out, &j);
    }
    let rows: Vec<(&str, String)> = vec![
        ("Name", j.name.clone()),
        ("Member", j.member.clone()),
        ("Node pool", j.node_pool.clone()),
        ("Region", j.region.clone()),
        ("Status", format!("{} (last seen {})", j.status, ago(n.last_seen_unix_ms, now))),
        (
            "Channel",
            if j.channel_note.is_empty() {
                or_dash(&j.channel)
            } else {
                format!("{} ({})", or_dash(&j.channel), j.channel_note)
            },
        ),
        ("Node image version", or_dash(&j.node_image_version)),
        ("Booted image", or_dash(&j.booted_image_version)),
        ("Security patch", or_dash(&j.security_patch_version)),
        ("OS", format!("{} {}", j.os_family, j.os_version)),
        ("Kernel", or_dash(&j.kernel)),
        ("Kubernetes", or_dash(&j.kubernetes_version)),
        ("Control plane", j.control_plane.to_string()),
        ("Reboot required", j.reboot_required.to_string()),
        ("Agent", or_dash(&j.agent_version)),
        ("First seen", j.first_seen.clone().unwrap_or_else(|| "never".into())),
        ("Last report", j.last_report.clone().unwrap_or_else(|| "never".into())),
        ("Behind channel", if j.behind.is_empty() { "no".into() } else { j.behind.clone() }),
        (
            "Waiting",
            match (&j.waiting, &j.next_eligible) {
                (w, _) if w.is_empty() => "-".into(),
                (w, Some(t)) => format!("{w} (next eligible {t})"),
                (w, None) => w.clone(),
            },
        ),
        ("Out of service", if j.out_of_service.is_empty() { "no".into() } else { j.out_of_service.clone() }),
    ];
    for (k, v) in rows {
        writeln!(out, "{:<20}{}", format!("{k}:"), v)?;
    }
    writeln!(out, "Labels:")?;
    for (k, v) in &j.labels {
        writeln!(out, "  {k}={v}")?;
    }
    if !j.operations.is_empty() {
        writeln!(out, "Operations:")?;
        for o in &j.operations {
            writeln!(out, "  {} {} step={} state={}", o.operation_id, o.kind, o.step, o.state)?;
        }
    }
    if let Some(history) = j.history.as_ref().filter(|h| !h.is_empty()) {
        writeln!(out, "History:")?;
        for h in history {
            let when = h.started.clone().unwrap_or_else(|| "-".into());
            let detail = if h.detail.is_empty() { String::new() } else { format!(": {}", h.detail) };
            writeln!(out, "  {when} {} {} ({}){detail}", h.outcome, h.work_id, h.purpose)?;
        }
    }
    Ok(())
}

/// `member list`.
pub fn print_members(format: Format, members: &[v1::Member], out: &mut dyn Write) -> anyhow::Result<()> {
    if format.is_structured() {
        #[derive(Serialize)]
        struct List {
            members: Vec<MemberJson>,
        }
        return emit(format, out, &List { members: members.iter().map(member_json).collect() });
    }
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| {
            vec![
                m.name.clone(),
                m.node_os_channel.clone(),
                m.auto_upgrade_channel.clone(),
                m.node_count.to_string(),
                m.regions.join(","),
                m.node_pools.join(","),
            ]
        })
        .collect();
    table(out, &["NAME", "NODE-OS-CHANNEL", "AUTO-UPGRADE", "NODES", "REGIONS", "POOLS"], &rows)?;
    Ok(())
}

/// `member show`: the member and its auto-upgrade profile (both channels, both windows).
pub fn print_member(format: Format, m: &v1::Member, s: &v1::MemberSettings, out: &mut dyn Write) -> anyhow::Result<()> {
    let parse = |j: &str| -> serde_json::Value {
        if j.is_empty() { serde_json::Value::Null } else { serde_json::from_str(j).unwrap_or(serde_json::Value::Null) }
    };
    if format.is_structured() {
        let mut v = serde_json::to_value(member_json(m))?;
        v["node_os_schedule"] = parse(&s.node_os_schedule_json);
        v["cluster_schedule"] = parse(&s.cluster_schedule_json);
        v["max_unavailable"] = s.max_unavailable.clone().into();
        v["auto_upgrade_status"] = m.auto_upgrade_status.clone().into();
        return emit(format, out, &v);
    }
    let window = |j: &str| if j.is_empty() { "none (may run any time)".to_string() } else { j.to_string() };
    writeln!(out, "{:<24}{}", "Name:", m.name)?;
    writeln!(out, "{:<24}{}", "Node OS channel:", m.node_os_channel)?;
    writeln!(out, "{:<24}{}", "Auto-upgrade channel:", m.auto_upgrade_channel)?;
    writeln!(out, "{:<24}{}", "Nodes:", m.node_count)?;
    writeln!(out, "{:<24}{}", "Regions:", m.regions.join(", "))?;
    writeln!(out, "{:<24}{}", "Node pools:", m.node_pools.join(", "))?;
    writeln!(out, "{:<24}{}", "Config generation:", m.config_generation)?;
    writeln!(out, "{:<24}{}", "Max unavailable:", s.max_unavailable)?;
    writeln!(out, "{:<24}{}", "Node OS window:", window(&s.node_os_schedule_json))?;
    writeln!(out, "{:<24}{}", "Cluster window:", window(&s.cluster_schedule_json))?;
    if !m.auto_upgrade_status.is_empty() {
        writeln!(out, "{:<24}{}", "Channel rollout:", m.auto_upgrade_status)?;
    }
    Ok(())
}

/// `whoami`.
pub fn print_whoami(format: Format, me: &v1::WhoAmIResponse, out: &mut dyn Write) -> anyhow::Result<()> {
    if format.is_structured() {
        #[derive(Serialize)]
        struct Me<'a> {
            role: &'a str,
            name: &'a str,
        }
        return emit(format, out, &Me { role: &me.role, name: &me.name });
    }
    writeln!(out, "{} {}", me.role, me.name)?;
    Ok(())
}

/// A join token as `-o json` shows it (docs/cli-json.md); never its secret.
pub fn token_json(t: &v1::JoinToken) -> serde_json::Value {
    serde_json::json!({
        "id": t.id,
        "member": t.member,
        "pool": t.pool,
        "expires_at": rfc3339(t.expires_unix_ms),
        "uses_left": t.uses_left,
        "created_by": t.created_by,
        "created_at": rfc3339(t.created_unix_ms),
    })
}

/// A time for people (RFC 3339, UTC).
pub fn time_text(ms: i64) -> String {
    rfc3339(ms).unwrap_or_else(|| "-".into())
}

/// `upkeepctl pki token list`.
pub fn print_tokens(
    format: Format,
    list: &[v1::JoinToken],
    now: DateTime<Utc>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    if format.is_structured() {
        let rows: Vec<serde_json::Value> = list.iter().map(token_json).collect();
        return emit(format, out, &rows);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|t| {
            let state = if t.expires_unix_ms <= now.timestamp_millis() {
                "expired".to_string()
            } else if t.uses_left == 0 {
                "used up".to_string()
            } else {
                "valid".to_string()
            };
            vec![
                t.id.clone(),
                t.member.clone(),
                t.pool.clone(),
                t.uses_left.to_string(),
                time_text(t.expires_unix_ms),
                state,
                t.created_by.clone(),
            ]
        })
        .collect();
    table(out, &["ID", "MEMBER", "POOL", "USES LEFT", "EXPIRES", "STATE", "CREATED BY"], &rows)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> v1::Node {
        v1::Node {
            report: Some(v1::NodeReport {
                node_name: "n1".into(),
                member: "m1".into(),
                node_pool: "p1".into(),
                region: "eu".into(),
                channel: "NodeImage".into(),
                node_image_version: "Ubuntu-2204-202311.07.0".into(),
                ..Default::default()
            }),
            status: "Ready".into(),
            connected: true,
            first_seen_unix_ms: 1_700_000_000_000,
            last_seen_unix_ms: 1_700_000_050_000,
            last_report_unix_ms: 1_700_000_000_000,
            behind: "NodeImage wants Ubuntu-2204-202312.01.0 (runs Ubuntu-2204-202311.07.0)".into(),
            ..Default::default()
        }
    }

    #[test]
    fn node_table_golden() {
        let now = Utc.timestamp_millis_opt(1_700_000_062_000).single().expect("valid");
        let mut out = Vec::new();
        print_nodes(Format::Table, &[node()], now, &mut out).expect("render");
        let text = String::from_utf8(out).expect("utf8");
        let expected = "\
NAME  MEMBER  POOL  REGION  CHANNEL    STATUS  NODE-IMAGE-VERSION LABEL                              LAST SEEN  WORK
n1    m1      p1    eu      NodeImage  Ready   upkeep.io/node-image-version=Ubuntu-2204-202311.07.0  12s ago    behind: wants Ubuntu-2204-202312.01.0
";
        assert_eq!(text, expected);
    }

    #[test]
    fn node_json_has_stable_names() {
        let v = serde_json::to_value(node_json(&node())).expect("json");
        assert_eq!(v["name"], "n1");
        assert_eq!(v["labels"][NODE_IMAGE_LABEL], "Ubuntu-2204-202311.07.0");
        assert_eq!(v["last_seen"], "2023-11-14T22:14:10Z");
        assert_eq!(v["status"], "Ready");
        assert_eq!(v["booted_image_version"], "Ubuntu-2204-202311.07.0", "older hubs: the reported version");
    }

    #[test]
    fn sec1_a_patched_node_shows_the_folded_label_and_its_booted_image() {
        let mut n = node();
        let r = n.report.as_mut().expect("report");
        r.node_image_version = "Ubuntu-2204-202312.05.1".into();
        r.booted_image_version = "Ubuntu-2204-202311.07.0".into();
        r.security_patch_version = "202312.05.1".into();
        let v = serde_json::to_value(node_json(&n)).expect("json");
        assert_eq!(v["node_image_version"], "Ubuntu-2204-202312.05.1");
        assert_eq!(v["labels"][NODE_IMAGE_LABEL], "Ubuntu-2204-202312.05.1");
        assert_eq!(v["booted_image_version"], "Ubuntu-2204-202311.07.0");
        assert_eq!(v["security_patch_version"], "202312.05.1");
        let now = Utc.timestamp_millis_opt(1_700_000_062_000).single().expect("valid");
        let mut out = Vec::new();
        print_node(Format::Table, &n, now, &mut out).expect("render");
        let text = String::from_utf8(out).expect("utf8");
        assert!(text.contains("Node image version: Ubuntu-2204-202312.05.1\n"), "{text}");
        assert!(text.contains("Booted image:       Ubuntu-2204-202311.07.0\n"), "{text}");
    }

    #[test]
    fn ago_buckets() {
        let now = Utc.timestamp_millis_opt(10_000_000).single().expect("valid");
        assert_eq!(ago(0, now), "never");
        assert_eq!(ago(10_000_000 - 5_000, now), "5s ago");
        assert_eq!(ago(10_000_000 - 600_000, now), "10m ago");
    }
}

/// One revoked certificate in `pki revoked -o json` (docs/cli-json.md).
#[derive(Debug, Serialize)]
pub struct RevokedJson {
    pub serial: String,
    pub subject: String,
    pub reason: String,
    pub revoked_by: String,
    pub revoked_at: Option<String>,
}

/// `pki revoked` (and `pki revoke -o json`).
pub fn print_revoked(format: Format, list: &[v1::RevokedCertificate], out: &mut dyn Write) -> anyhow::Result<()> {
    let rows: Vec<RevokedJson> = list
        .iter()
        .map(|c| RevokedJson {
            serial: c.serial.clone(),
            subject: c.subject.clone(),
            reason: c.reason.clone(),
            revoked_by: c.revoked_by.clone(),
            revoked_at: rfc3339(c.revoked_unix_ms),
        })
        .collect();
    if format.is_structured() {
        return emit(format, out, &rows);
    }
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.serial.clone(),
                or_dash(&r.subject),
                r.revoked_at.clone().unwrap_or_default(),
                r.revoked_by.clone(),
                r.reason.clone(),
            ]
        })
        .collect();
    table(out, &["SERIAL", "SUBJECT", "REVOKED", "BY", "REASON"], &table_rows)?;
    Ok(())
}
