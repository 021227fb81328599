//! Names of things (nodes, members, node pools, regions) and the rule they all follow, plus the principal a
//! certificate stands for.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A name that was refused, with the field it was for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid {field} {}: use 1-63 characters of a-z, 0-9, '-', '.' and '_', starting with a letter or digit",
    crate::limits::quoted(.given)
)]
pub struct BadName {
    /// Which field (node name, member, node pool, region).
    pub field: &'static str,
    /// What was given.
    pub given: String,
}

/// Checks a name against the common rule (DNS-label-like, also allows '.' and '_').
pub fn validate_name(field: &'static str, s: &str) -> Result<(), BadName> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_'));
    if ok { Ok(()) } else { Err(BadName { field, given: s.to_string() }) }
}

/// Longest hub name accepted, characters (the DNS limit for a name in text form).
pub const HUB_NAME_MAX_CHARS: usize = 253;
/// Longest label of a hub's DNS name, characters.
pub const HUB_NAME_LABEL_MAX_CHARS: usize = 63;
/// How much of a refused value an error message repeats, characters.
const ECHO_MAX_CHARS: usize = 80;

/// A hub name (a name the hub's certificate is valid for) that was refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid hub name {given:?}: {reason}; give a DNS name (labels of a-z, 0-9 and '-', not starting or ending with '-', joined by '.', at most 253 characters) or an IPv4/IPv6 address"
)]
pub struct BadHubName {
    /// What was given (cut to 80 characters).
    pub given: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Checks a name the hub is reached by: an IPv4 or IPv6 address, or a DNS name in lowercase (labels of a-z, 0-9
/// and '-', none empty, none starting or ending with '-', each at most 63 and all at most 253 characters).
/// Certificates are issued only for names that pass, so a typo cannot end up as a SAN nobody can connect to.
pub fn validate_hub_name(s: &str) -> Result<(), BadHubName> {
    let refuse = |reason| Err(BadHubName { given: s.chars().take(ECHO_MAX_CHARS).collect(), reason });
    // `core::net` parses without touching the network; core stays free of I/O.
    if s.parse::<core::net::IpAddr>().is_ok() {
        return Ok(());
    }
    if s.is_empty() {
        return refuse("it is empty");
    }
    if s.len() > HUB_NAME_MAX_CHARS {
        return refuse("it is longer than 253 characters");
    }
    for label in s.split('.') {
        if label.is_empty() {
            return refuse("it has an empty label (a leading, trailing or doubled '.')");
        }
        if label.len() > HUB_NAME_LABEL_MAX_CHARS {
            return refuse("a label is longer than 63 characters");
        }
        if !label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            return refuse("it holds a character other than a-z, 0-9, '-' and '.'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return refuse("a label starts or ends with '-'");
        }
    }
    Ok(())
}

/// The role a certificate grants. It lives in the certificate as a SAN URI `upkeep://<role>/<name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A node: may speak only for itself on the agent service.
    Node,
    /// An operator: may read and change everything on the operator service.
    Operator,
    /// A viewer: may read on the operator service and change nothing.
    Viewer,
    /// The hub's own server identity; never a client.
    Hub,
}

impl Role {
    /// The spelling used in the SAN URI.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
            Role::Hub => "hub",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a SAN URI is not a valid upkeep identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// Not of the form `upkeep://<role>/<name>`.
    #[error("certificate identity {0:?} is not of the form upkeep://<role>/<name>")]
    Malformed(String),
    /// A role other than node, operator, viewer, hub.
    #[error(
        "certificate identity {uri:?} has unknown role {role:?}: expected node, operator, viewer or hub; reissue it with upkeepctl pki"
    )]
    UnknownRole {
        /// The whole URI.
        uri: String,
        /// The role found.
        role: String,
    },
    /// The name part breaks the naming rule.
    #[error("certificate identity {uri:?}: {source}")]
    BadName {
        /// The whole URI.
        uri: String,
        /// What is wrong with the name.
        source: BadName,
    },
    /// The certificate carries no `upkeep://` URI at all.
    #[error("certificate carries no upkeep:// identity; issue it with upkeepctl pki")]
    Missing,
    /// The certificate carries more than one `upkeep://` URI; which one counts would be ambiguous.
    #[error("certificate carries {0} upkeep:// identities; exactly one is allowed")]
    Ambiguous(usize),
}

/// Who is calling, as established by a verified client certificate. Never taken from a request body.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Principal {
    /// The role granted.
    pub role: Role,
    /// The name (node name for nodes).
    pub name: String,
}

/// The URI scheme prefix of identities.
pub const IDENTITY_SCHEME: &str = "upkeep://";

impl Principal {
    /// The SAN URI that encodes this principal.
    pub fn uri(&self) -> String {
        format!("{IDENTITY_SCHEME}{}/{}", self.role, self.name)
    }

    /// Picks the single upkeep identity out of a certificate's SAN URIs (other URIs are ignored).
    pub fn from_san_uris<'a>(uris: impl IntoIterator<Item = &'a str>) -> Result<Principal, IdentityError> {
        let ours: Vec<&str> = uris.into_iter().filter(|u| u.starts_with(IDENTITY_SCHEME)).collect();
        match ours.as_slice() {
            [] => Err(IdentityError::Missing),
            [one] => one.parse(),
            many => Err(IdentityError::Ambiguous(many.len())),
        }
    }
}

impl FromStr for Principal {
    type Err = IdentityError;
    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let rest = uri.strip_prefix(IDENTITY_SCHEME).ok_or_else(|| IdentityError::Malformed(uri.to_string()))?;
        let (role, name) = rest.split_once('/').ok_or_else(|| IdentityError::Malformed(uri.to_string()))?;
        let role = match role {
            "node" => Role::Node,
            "operator" => Role::Operator,
            "viewer" => Role::Viewer,
            "hub" => Role::Hub,
            other => return Err(IdentityError::UnknownRole { uri: uri.to_string(), role: other.to_string() }),
        };
        validate_name("certificate name", name)
            .map_err(|source| IdentityError::BadName { uri: uri.to_string(), source })?;
        Ok(Principal { role, name: name.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rule() {
        assert!(validate_name("node name", "node-01.eu_1").is_ok());
        for bad in ["", "-a", "Node", "a b", "a/b", &"x".repeat(64)] {
            let err = validate_name("member", bad).expect_err(bad);
            assert!(err.to_string().starts_with("invalid member"));
        }
    }

    #[test]
    fn hub_names_are_dns_names_or_ip_addresses() {
        for good in ["localhost", "127.0.0.1", "::1", "fe80::1", "hub.example.com", "hub-1.eu", "a", &"a".repeat(63)] {
            assert_eq!(validate_hub_name(good), Ok(()), "{good}");
        }
        let long = format!("{}.com", "a.".repeat(125));
        for (bad, why) in [
            ("", "empty"),
            ("bad name", "character"),
            ("a..b", "empty label"),
            (".a", "empty label"),
            ("a.", "empty label"),
            ("-a.b", "starts or ends"),
            ("a-.b", "starts or ends"),
            ("Hub.example", "character"),
            ("*.example", "character"),
            ("a_b", "character"),
            (&"a".repeat(64), "longer than 63"),
            (&long, "longer than 253"),
        ] {
            let err = validate_hub_name(bad).expect_err(bad);
            assert!(err.reason.contains(why), "{bad:?}: {err}");
            assert!(err.to_string().starts_with("invalid hub name"), "{err}");
            assert!(err.given.chars().count() <= ECHO_MAX_CHARS);
        }
    }

    #[test]
    fn identities_parse_from_san_uris() {
        let p = Principal::from_san_uris(["https://x", "upkeep://node/n1"]).expect("one identity");
        assert_eq!(p, Principal { role: Role::Node, name: "n1".into() });
        assert_eq!(p.uri(), "upkeep://node/n1");
        assert_eq!(Principal::from_san_uris(["https://x"]), Err(IdentityError::Missing));
        assert!(matches!(
            Principal::from_san_uris(["upkeep://node/a", "upkeep://viewer/b"]),
            Err(IdentityError::Ambiguous(2))
        ));
        let err = "upkeep://admin/root".parse::<Principal>().expect_err("unknown role");
        assert!(matches!(err, IdentityError::UnknownRole { .. }));
        assert!(err.to_string().contains("unknown role \"admin\""));
        assert!("upkeep://node/".parse::<Principal>().is_err());
        assert!("upkeep://node".parse::<Principal>().is_err());
    }
}
