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
