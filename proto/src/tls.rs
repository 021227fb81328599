//! Shared TLS plumbing for both ends of the wire: reading the certificate identity (`upkeep://<role>/<name>`)
//! out of a certificate, and building the mutual-TLS client configuration that agents and upkeepctl use.
//!
//! The hub's server side lives in upkeep-hub; both ends use rustls with the ring provider through tonic.

use std::path::{Path, PathBuf};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use upkeep_core::ids::{IdentityError, Principal};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Why TLS material could not be used, naming the file and the setting it came from.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("{setting} = {path}: cannot read: {source}")]
    Read {
        /// The configuration key or flag that named the file.
        setting: String,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file holds no PEM certificate or key.
    #[error("{setting} = {path}: {what}")]
    Bad {
        /// The configuration key or flag that named the file.
        setting: String,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

/// Reads a PEM file named by `setting`, checking that it holds at least one block of the expected kind.
pub fn read_pem(setting: &str, path: &Path, kind: PemKind) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        setting: setting.to_string(),
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let ok = match kind {
        PemKind::Certificate => text.contains("-----BEGIN CERTIFICATE-----"),
        PemKind::PrivateKey => text.contains("PRIVATE KEY-----"),
    };
    if !ok {
        let expected = match kind {
            PemKind::Certificate => "no PEM certificate in file (expected -----BEGIN CERTIFICATE-----)",
            PemKind::PrivateKey => "no PEM private key in file (expected -----BEGIN PRIVATE KEY-----)",
        };
        return Err(TlsError::Bad { setting: setting.to_string(), path: path.to_path_buf(), what: expected.into() });
    }
    Ok(bytes)
}

/// What a PEM file should hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PemKind {
    /// One or more certificates.
    Certificate,
    /// A private key.
    PrivateKey,
}

/// The upkeep identity in a DER certificate.
pub fn principal_from_der(der: &[u8]) -> Result<Principal, IdentityError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| IdentityError::Malformed(format!("bad certificate: {e}")))?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name {
                uris.push(*u);
            }
        }
    }
    Principal::from_san_uris(uris)
}

/// The upkeep identity of the first certificate in a PEM file named by `setting`.
pub fn principal_from_pem_file(setting: &str, path: &Path) -> Result<Principal, TlsError> {
    let pem = read_pem(setting, path, PemKind::Certificate)?;
    let bad = |what: String| TlsError::Bad { setting: setting.to_string(), path: path.to_path_buf(), what };
    let (_, block) = x509_parser::pem::parse_x509_pem(&pem).map_err(|e| bad(format!("bad PEM: {e}")))?;
    principal_from_der(&block.contents).map_err(|e| bad(e.to_string()))
}

/// Paths of the three files a client needs, with the names of the settings they came from (for errors).
#[derive(Debug, Clone)]
pub struct ClientFiles {
    /// Fleet CA certificate.
    pub ca: PathBuf,
    /// Client certificate.
    pub cert: PathBuf,
    /// Client key.
    pub key: PathBuf,
    /// Setting names for ca, cert, key (e.g. `tls.ca` or `--ca`).
    pub settings: [String; 3],
}

/// Builds the mutual-TLS client configuration: trust only the fleet CA, present our certificate.
/// `domain` is the name the hub's certificate must carry (DNS name or IP address).
pub fn client_tls(files: &ClientFiles, domain: &str) -> Result<ClientTlsConfig, TlsError> {
    let ca = read_pem(&files.settings[0], &files.ca, PemKind::Certificate)?;
    let cert = read_pem(&files.settings[1], &files.cert, PemKind::Certificate)?;
    let key = read_pem(&files.settings[2], &files.key, PemKind::PrivateKey)?;
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key))
        .domain_name(domain.to_string()))
}

/// Normalises a hub address (`host:port` or `https://host:port`) to an https URL and the host name the hub's
/// certificate must carry. Plaintext schemes are refused: the hub has no plaintext listener.
pub fn hub_endpoint(hub: &str) -> Result<(String, String), String> {
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
