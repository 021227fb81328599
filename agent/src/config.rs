//! `agent.toml`: where the hub is, the node's certificate, which member/pool/region it belongs to, where its
//! state lives, and an optional `root` prefix so that one machine can host many simulated nodes.
//! Unknown keys are refused; every error is one line naming the file and the key.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use upkeep_core::ids::{Role, validate_name};
use upkeep_proto::tls::{ClientFiles, principal_from_pem_file};

/// Validated agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The file this came from (for messages).
    pub source: PathBuf,
    /// Hub URL (https only).
    pub hub: String,
    /// Host name the hub's certificate must carry.
    pub hub_host: String,
    /// Node name, from the certificate.
    pub node_name: String,
    /// Member.
    pub member: String,
    /// Node pool.
    pub node_pool: String,
    /// Region.
    pub region: String,
    /// Hardware class of the pool, e.g. gpu.
    pub hardware_class: String,
    /// Whether this node runs the member's control plane.
    pub control_plane: bool,
    /// Where the agent keeps its journal and state.
    pub state_dir: PathBuf,
    /// Root of the tree the agent manages (`/` on a real node).
    pub root: PathBuf,
    /// TLS files.
    pub tls: ClientFiles,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    hub: Option<String>,
    member: Option<String>,
    node_pool: Option<String>,
    region: Option<String>,
    hardware_class: Option<String>,
    control_plane: Option<bool>,
    state_dir: Option<PathBuf>,
    root: Option<PathBuf>,
    tls: Option<RawTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

/// A configuration error: `<file>: <key>: <reason>`.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {reason}")]
pub struct ConfigError {
    /// The file.
    pub file: String,
    /// The key.
    pub key: String,
    /// What is wrong and the fix.
    pub reason: String,
}

/// Default configuration path.
pub const DEFAULT_PATH: &str = "/etc/upkeep/agent.toml";

/// Reads and validates the agent configuration, including the certificate's identity.
pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.display().to_string(),
        key: "(file)".into(),
        reason: format!("cannot read: {e}"),
    })?;
    parse(path, &text)
}

/// Validates the text of `path` (see `load`).
pub fn parse(path: &Path, text: &str) -> Result<AgentConfig, ConfigError> {
    let err = |key: &str, reason: String| ConfigError { file: path.display().to_string(), key: key.into(), reason };
    let raw: Raw = toml::from_str(text).map_err(|e| {
        let key = e.span().and_then(|s| text.get(s)).unwrap_or("(syntax)").trim().to_string();
        err(&key, e.message().to_string())
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let resolve = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };

    let hub =
        raw.hub.ok_or_else(|| err("hub", "missing: set the hub address, e.g. https://hub.example:7443".into()))?;
    let (hub, hub_host) = parse_hub(&hub).map_err(|reason| err("hub", reason))?;
    let name_field = |key: &str, field: &'static str, v: Option<String>| -> Result<String, ConfigError> {
        let v = v.ok_or_else(|| err(key, format!("missing: set the {field} this node belongs to")))?;
        validate_name(field, &v).map_err(|e| err(key, e.to_string()))?;
        Ok(v)
    };
    let member = name_field("member", "member", raw.member)?;
    let node_pool = name_field("node_pool", "node pool", raw.node_pool)?;
    let region = name_field("region", "region", raw.region)?;
    let hardware_class = raw.hardware_class.unwrap_or_default();
    if !hardware_class.is_empty() {
        validate_name("hardware class", &hardware_class).map_err(|e| err("hardware_class", e.to_string()))?;
    }
    let state_dir = raw
        .state_dir
        .map(resolve)
        .ok_or_else(|| err("state_dir", "missing: set a directory for the agent's journal".into()))?;
    let root = raw.root.map(resolve).unwrap_or_else(|| PathBuf::from("/"));
    if !root.is_dir() {
        return Err(err("root", format!("{} is not a directory", root.display())));
    }
    let tls = raw.tls.ok_or_else(|| err("tls", "missing: set tls.ca, tls.cert and tls.key".into()))?;
    let mut paths = Vec::new();
    for (key, v) in [("tls.ca", tls.ca), ("tls.cert", tls.cert), ("tls.key", tls.key)] {
        let p = v.map(resolve).ok_or_else(|| err(key, "missing: give the path of a PEM file".into()))?;
        std::fs::metadata(&p).map_err(|e| err(key, format!("{}: {e}", p.display())))?;
        paths.push(p);
    }
    let files = ClientFiles {
        ca: paths[0].clone(),
        cert: paths[1].clone(),
        key: paths[2].clone(),
        settings: ["tls.ca".into(), "tls.cert".into(), "tls.key".into()],
    };
    let principal = principal_from_pem_file("tls.cert", &files.cert).map_err(|e| err("tls.cert", e.to_string()))?;
    if principal.role != Role::Node {
        return Err(err(
            "tls.cert",
            format!(
                "certificate is for {} but an agent needs a node certificate; issue one with `upkeepctl pki issue-node`",
                principal.uri()
            ),
        ));
    }
    Ok(AgentConfig {
        source: path.to_path_buf(),
        hub,
        hub_host,
        node_name: principal.name,
        member,
        node_pool,
        region,
        hardware_class,
        control_plane: raw.control_plane.unwrap_or(false),
        state_dir,
        root,
        tls: files,
    })
}

fn parse_hub(hub: &str) -> Result<(String, String), String> {
    let url = if hub.contains("://") { hub.to_string() } else { format!("https://{hub}") };
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("{hub:?}: only https:// is supported (the hub has no plaintext listener)"))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, p) = v6.split_once(']').ok_or_else(|| format!("malformed address {hub:?}"))?;
        (h.to_string(), p.strip_prefix(':').unwrap_or(""))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p),
            None => (authority.to_string(), ""),
        }
    };
    if host.is_empty() || host.contains(char::is_whitespace) || (!port.is_empty() && port.parse::<u16>().is_err()) {
        return Err(format!("malformed address {hub:?}: expected https://HOST:PORT, e.g. https://hub.example:7443"));
    }
    Ok((url, host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_addresses() {
        assert_eq!(parse_hub("127.0.0.1:7443").expect("ok").1, "127.0.0.1");
        assert!(parse_hub("http://x:1").expect_err("plain").contains("only https://"));
        assert!(parse_hub("https://x:notaport").expect_err("bad").contains("malformed address"));
        assert!(parse_hub("https://:7443").is_err());
    }
}
