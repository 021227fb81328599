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

/// The SHA-256 fingerprint of a DER certificate: lower-case hex pairs joined by colons.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Normalises a SHA-256 fingerprint as people copy it (hex, colons or none, any case) to the form
/// [`fingerprint`] returns; the error says what is wrong.
pub fn parse_fingerprint(text: &str) -> Result<String, String> {
    let hex: String = text.trim().chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    let hex = hex.strip_prefix("sha256").map(|h| h.trim_start_matches('=')).unwrap_or(&hex).to_string();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "{text:?} is not a SHA-256 fingerprint: expected 64 hex digits (colons allowed), as `upkeepctl pki fingerprint` prints"
        ));
    }
    let bytes: Vec<&str> = (0..32).map(|i| &hex[2 * i..2 * i + 2]).collect();
    Ok(bytes.join(":"))
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

/// One hub address: the https URL to connect to and the host name its certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubAddress {
    /// `https://host:port`.
    pub url: String,
    /// Host name (or IP) the hub's certificate must carry.
    pub host: String,
}

/// Several hub replicas (`hub = ["https://a:7443", "https://b:7443"]`, `--hub a:7443,b:7443`): each address
/// checked as [`hub_endpoint`] does, at least one, no repeats. A bad entry is named by its position (`[1]`).
/// (One DNS name with several addresses needs no list: every resolved address is tried in turn at connect.)
pub fn hub_endpoints<S: AsRef<str>>(hubs: &[S]) -> Result<Vec<HubAddress>, String> {
    if hubs.is_empty() {
        return Err("no hub address: give at least one, e.g. https://hub.example:7443".into());
    }
    let mut out: Vec<HubAddress> = Vec::with_capacity(hubs.len());
    for (i, h) in hubs.iter().enumerate() {
        let at = |reason: String| if hubs.len() == 1 { reason } else { format!("[{i}]: {reason}") };
        let (url, host) = hub_endpoint(h.as_ref().trim()).map_err(at)?;
        if out.iter().any(|a| a.url == url) {
            return Err(at(format!("{url} is listed twice; list each hub replica once")));
        }
        out.push(HubAddress { url, host });
    }
    Ok(out)
}

/// Why a TLS connection to the hub failed, in one line naming the certificate at fault and the fix, when the
/// cause is a certificate: `cert_setting` and `ca_setting` name the settings that hold the client certificate and
/// the fleet CA (`--cert`/`--ca` for upkeepctl, `tls.cert`/`tls.ca` for the agent). None for other failures.
///
/// The hub says why it refused a client certificate with a TLS alert (rustls sends `certificate_expired`,
/// `certificate_revoked`, `unknown_ca` ...); this client's own check of the hub's certificate fails with a
/// certificate error. Both are found anywhere in `e`'s chain of causes.
pub fn explain_refusal(e: &(dyn std::error::Error + 'static), cert_setting: &str, ca_setting: &str) -> Option<String> {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let tls = err.downcast_ref::<E>().or_else(|| {
            err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).and_then(|inner| inner.downcast_ref::<E>())
        });
        if let Some(tls) = tls {
            let theirs = |why: &str, fix: &str| {
                format!("the hub refused this client's certificate ({cert_setting}): {why}; {fix}")
            };
            let ours = |why: &str, fix: &str| format!("the hub's certificate was refused: {why}; {fix}");
            return Some(match tls {
                E::AlertReceived(A::CertificateExpired) => {
                    theirs("it has expired or is not valid yet", "issue a new one (`upkeepctl pki issue-...`)")
                }
                E::AlertReceived(A::CertificateRevoked) => {
                    theirs("it has been revoked", "ask the fleet's operators for a new certificate")
                }
                E::AlertReceived(A::UnknownCA | A::DecryptError) => theirs(
                    "it is not issued by the fleet CA the hub trusts",
                    "use a certificate issued with the hub's CA",
                ),
                E::AlertReceived(A::AccessDenied | A::BadCertificate | A::UnsupportedCertificate) => theirs(
                    "it does not meet the hub's rules (chain, path length or key usage; the hub's log says which)",
                    "issue a new one with `upkeepctl pki`",
                ),
                E::AlertReceived(A::CertificateRequired | A::HandshakeFailure) => {
                    theirs("none was presented", "give a certificate and key")
                }
                E::InvalidCertificate(
                    C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
                ) => ours("it has expired or is not valid yet", "renew the hub's certificate"),
                E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => ours(
                    &format!("it is not issued by the CA in {ca_setting}"),
                    &format!("check {ca_setting} and the hub address"),
                ),
                E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => ours(
                    "it does not carry the name used to reach it",
                    "reach the hub by a name its certificate carries (`pki init --hub-name`)",
                ),
                E::InvalidCertificate(C::Revoked) => ours("it has been revoked", "give the hub a new certificate"),
                other => format!("TLS with the hub failed: {other}"),
            });
        }
        cur = err.source();
    }
    None
}

/// Asks the hub at `hub` (as [`hub_endpoint`] takes it) whether it accepts the certificates in `files`, with one
/// TLS handshake of its own, and says why not when the cause is a certificate ([`explain_refusal`]).
///
/// Why a probe: in TLS 1.3 the hub checks the client's certificate after the client has finished its side of
/// the handshake, so the refusal (a TLS alert) reaches the client on its first read. Under gRPC that read belongs
/// to the HTTP/2 connection task, and the call only sees its stream cancelled ("operation was canceled"). The
/// probe reads once after the handshake itself: an accepting hub sends its HTTP/2 settings, a refusing one its
/// alert. None: the hub accepted, or it could not be reached at all (the original error says why).
pub async fn probe_refusal(hub: &str, files: &ClientFiles) -> Option<String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::AsyncReadExt;
    let (url, host) = hub_endpoint(hub).ok()?;
    let authority = url.strip_prefix("https://")?.split('/').next()?.to_string();
    let ca = read_pem(&files.settings[0], &files.ca, PemKind::Certificate).ok()?;
    let cert = read_pem(&files.settings[1], &files.cert, PemKind::Certificate).ok()?;
    let key = read_pem(&files.settings[2], &files.key, PemKind::PrivateKey).ok()?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.ok()?).ok()?;
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert).collect::<Result<_, _>>().ok()?;
    let key = PrivateKeyDer::from_pem_slice(&key).ok()?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .ok()?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = ServerName::try_from(host).ok()?;
    let within = std::time::Duration::from_secs(5);
    let tcp = tokio::time::timeout(within, tokio::net::TcpStream::connect(&authority)).await.ok()?.ok()?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let (cert_setting, ca_setting) = (files.settings[1].as_str(), files.settings[0].as_str());
    let mut tls = match tokio::time::timeout(within, connector.connect(name, tcp)).await.ok()? {
        Ok(tls) => tls,
        Err(e) => return explain_refusal(&e, cert_setting, ca_setting),
    };
    let mut buf = [0u8; 64];
    match tokio::time::timeout(within, tls.read(&mut buf)).await.ok()? {
        Ok(_) => None,
        Err(e) => explain_refusal(&e, cert_setting, ca_setting),
    }
}
