//! `upkeep-agent join`: enrollment without copying keys. The node makes its key here (written 0600 before anything
//! is sent), asks the hub for the fleet CA over a connection it does not verify, accepts that CA only if its
//! SHA-256 fingerprint is the one the operator gave (`--ca-fingerprint`), then sends its join token and a CSR over
//! a connection verified with that CA alone, and writes ca.pem, node.pem (chain) and the agent configuration.
//!
//! The first connection's lack of verification is harmless: nothing secret is sent on it, and what it returns is
//! checked against the fingerprint. This is a one-shot command run before the agent serves; its file writes are
//! the enrollment's own, not the running agent's side effects (those go through `NodeOs`).
//!
//! Where the packages created the system user [`AGENT_USER`] (the agent's network half runs as it, without
//! privileges), the key and the certificate are handed to it and the PKI directory gets its group with the sticky
//! bit, so that the agent can read the pair and later replace it when it renews its certificate, and nothing
//! else in that directory.

use anyhow::{Context, anyhow, bail};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::future::Future;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;
use tonic::codegen::Service;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Uri};
use upkeep_proto::v1;

/// What `join` needs.
#[derive(Debug, Clone)]
pub struct JoinArgs {
    /// `--hub`.
    pub hub: String,
    /// `--token`.
    pub token: String,
    /// `--ca-fingerprint`.
    pub ca_fingerprint: String,
    /// `--name` (default: the host name).
    pub name: Option<String>,
    /// `--config`.
    pub config: PathBuf,
    /// `--pki-dir`.
    pub pki_dir: PathBuf,
    /// `--region` (written to a new configuration).
    pub region: String,
    /// `--state-dir` (written to a new configuration).
    pub state_dir: PathBuf,
}

/// File names written into `--pki-dir`.
pub const CA_FILE: &str = "ca.pem";
/// The node's certificate chain.
pub const CERT_FILE: &str = "node.pem";
/// The node's key.
pub const KEY_FILE: &str = "node.key";
/// The system user the packaged agent's network half runs as (`systemd/upkeep-agent.sysusers`); when the host has
/// it, `join` gives it the node's key and certificate.
pub const AGENT_USER: &str = "upkeep-agent";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the join; returns the lines to print (what was written).
pub async fn join(args: &JoinArgs) -> anyhow::Result<Vec<String>> {
    let want =
        upkeep_proto::tls::parse_fingerprint(&args.ca_fingerprint).map_err(|e| anyhow!("--ca-fingerprint {e}"))?;
    let (url, host) = upkeep_proto::tls::hub_endpoint(&args.hub).map_err(|e| anyhow!("--hub {e}"))?;
    if !args.token.trim().starts_with("upkeep-join-") {
        bail!(
            "--token: not a join token: expected upkeep-join-<id>.<secret> as `upkeepctl pki token create` prints it"
        );
    }
    let name = match &args.name {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .context("--name not given and the host name cannot be read")?,
    };
    upkeep_core::ids::validate_name("node name", &name).map_err(|e| anyhow!("--name: {e}"))?;

    std::fs::create_dir_all(&args.pki_dir).with_context(|| format!("--pki-dir {}", args.pki_dir.display()))?;
    let key = rcgen::KeyPair::generate().context("generating the node's key")?;
    let key_path = args.pki_dir.join(KEY_FILE);
    // The key is on disk, 0600, before anything is sent.
    write_file(&key_path, &key.serialize_pem(), true).with_context(|| format!("--pki-dir: {}", key_path.display()))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .context("making the certificate request")?;

    // 1. The fleet CA, from a connection not verified: checked against the fingerprint before any use.
    let unverified = Endpoint::from_shared(url.replacen("https://", "http://", 1))
        .map_err(|e| anyhow!("--hub {}: {e}", args.hub))?
        .connect_timeout(CONNECT_TIMEOUT)
        .connect_with_connector(UnverifiedTls::new(&host)?)
        .await
        .map_err(|e| anyhow!("--hub {}: cannot reach the hub: {}", args.hub, upkeep_proto::error_chain(&e)))?;
    let ca_pem = v1::join_service_client::JoinServiceClient::new(unverified)
        .ca_certificate(v1::CaCertificateRequest {})
        .await
        .map_err(|s| anyhow!("--hub {}: the hub did not give its CA: {}", args.hub, s.message()))?
        .into_inner()
        .ca_pem;
    let got = CertificateDer::pem_slice_iter(ca_pem.as_bytes())
        .next()
        .and_then(|c| c.ok())
        .map(|c| upkeep_proto::tls::fingerprint(c.as_ref()))
        .ok_or_else(|| anyhow!("--hub {}: the hub's answer holds no CA certificate", args.hub))?;
    if got != want {
        bail!(
            "--ca-fingerprint: the hub at {} has a CA with fingerprint {got}, not {want}: check the fingerprint (`upkeepctl pki fingerprint --dir DIR`) and the hub address; nothing was sent",
            args.hub
        );
    }

    // 2. The join, over TLS verified with that CA alone.
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem.as_bytes())).domain_name(host);
    let channel = Endpoint::from_shared(url.clone())
        .map_err(|e| anyhow!("--hub {}: {e}", args.hub))?
        .tls_config(tls)
        .map_err(|e| anyhow!("--hub {}: {e}", args.hub))?
        .connect_timeout(CONNECT_TIMEOUT)
        .connect()
        .await
        .map_err(|e| anyhow!("--hub {}: {}", args.hub, upkeep_proto::error_chain(&e)))?;
    let r = v1::join_service_client::JoinServiceClient::new(channel)
        .join(v1::JoinRequest { token: args.token.trim().to_string(), node_name: name.clone(), csr_pem: csr })
        .await
        .map_err(|s| anyhow!("the hub refused the join: {}", s.message().replace('\n', " ")))?
        .into_inner();

    let ca_path = args.pki_dir.join(CA_FILE);
    let cert_path = args.pki_dir.join(CERT_FILE);
    write_file(&ca_path, &r.ca_pem, false).with_context(|| format!("--pki-dir: {}", ca_path.display()))?;
    write_file(&cert_path, &r.certificate_chain_pem, false)
        .with_context(|| format!("--pki-dir: {}", cert_path.display()))?;
    let mut lines = vec![
        format!("joined as node {name} of member {} pool {}", r.member, r.pool),
        format!("wrote {}", key_path.display()),
        format!("wrote {}", ca_path.display()),
        format!("wrote {}", cert_path.display()),
    ];
    lines.extend(write_config(args, &url, &r.member, &r.pool, [&ca_path, &cert_path, &key_path])?);
    let agent =
        nix::unistd::User::from_name(AGENT_USER).with_context(|| format!("looking up the user {AGENT_USER}"))?;
    match agent {
        Some(user) => lines.extend(
            hand_over(&args.pki_dir, &[&key_path, &cert_path], AGENT_USER, user.uid.as_raw(), user.gid.as_raw())
                .with_context(|| {
                    format!("--pki-dir {}: giving the node's key pair to {AGENT_USER}", args.pki_dir.display())
                })?,
        ),
        None => lines.push(format!("no user {AGENT_USER} on this host: the files stay with {}", whoami())),
    }
    Ok(lines)
}

/// The user running `join` (for the line saying who keeps the files).
fn whoami() -> String {
    match std::fs::metadata("/proc/self") {
        Ok(m) if m.uid() == 0 => "root".to_string(),
        Ok(m) => format!("uid {}", m.uid()),
        Err(_) => "the user running join".to_string(),
    }
}

/// The PKI directory's mode once the agent's group may write in it: its owner's bits as they are, the group's
/// `rwx` with the sticky bit (a member may rename or delete only files it owns), and for others at most the
/// right to pass through (a hub on the same host opens its own key by name), never to list or write.
pub fn pki_dir_mode(current: u32) -> u32 {
    (current & 0o701) | 0o1070
}

/// Gives `files` (the node's key and certificate) to `user` (`uid`, `gid`) and `pki_dir` to its group with
/// [`pki_dir_mode`]; the directory's owner stays. Returns the lines to print.
fn hand_over(pki_dir: &Path, files: &[&Path], user: &str, uid: u32, gid: u32) -> std::io::Result<Vec<String>> {
    let mut lines = Vec::new();
    for f in files {
        std::os::unix::fs::chown(f, Some(uid), Some(gid))?;
        lines.push(format!("gave {} to {user} (the agent reads it, and replaces it when it renews)", f.display()));
    }
    let mode = pki_dir_mode(std::fs::metadata(pki_dir)?.mode());
    std::os::unix::fs::chown(pki_dir, None, Some(gid))?;
    std::fs::set_permissions(pki_dir, std::fs::Permissions::from_mode(mode))?;
    lines.push(format!(
        "{}: group {user}, mode {mode:o} (the agent may replace the files it owns there, nothing else)",
        pki_dir.display()
    ));
    Ok(lines)
}

/// Writes the agent configuration, or fills in the missing `[tls]` paths of an existing one.
fn write_config(
    args: &JoinArgs,
    hub: &str,
    member: &str,
    pool: &str,
    [ca, cert, key]: [&Path; 3],
) -> anyhow::Result<Vec<String>> {
    let path = &args.config;
    let tls_keys = [("ca", ca), ("cert", cert), ("key", key)];
    if !path.exists() {
        let mut table = toml::Table::new();
        table.insert("hub".into(), hub.into());
        table.insert("member".into(), member.into());
        table.insert("node_pool".into(), pool.into());
        table.insert("region".into(), args.region.clone().into());
        table.insert("state_dir".into(), args.state_dir.display().to_string().into());
        let mut tls = toml::Table::new();
        for (k, p) in tls_keys {
            tls.insert(k.into(), p.display().to_string().into());
        }
        table.insert("tls".into(), tls.into());
        let text = format!(
            "# Written by upkeep-agent join. The node's name comes from its certificate.\n{}",
            toml::to_string(&table).context("writing the configuration")?
        );
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("--config {}", path.display()))?;
        }
        write_file(path, &text, false).with_context(|| format!("--config {}", path.display()))?;
        return Ok(vec![format!("wrote {}", path.display())]);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("--config {}", path.display()))?;
    let mut table: toml::Table = toml::from_str(&text).with_context(|| format!("--config {}", path.display()))?;
    let tls = table.entry("tls").or_insert_with(|| toml::Table::new().into());
    let tls = tls.as_table_mut().ok_or_else(|| anyhow!("--config {}: tls is not a table", path.display()))?;
    let mut filled = Vec::new();
    let mut kept = Vec::new();
    for (k, p) in tls_keys {
        match tls.get(k) {
            Some(v) => kept.push(format!("tls.{k} = {v}")),
            None => {
                tls.insert(k.into(), p.display().to_string().into());
                filled.push(format!("tls.{k}"));
            }
        }
    }
    let mut lines = Vec::new();
    if !filled.is_empty() {
        let text = toml::to_string(&table).context("writing the configuration")?;
        write_file(path, &text, false).with_context(|| format!("--config {}", path.display()))?;
        lines.push(format!("{}: filled in {}", path.display(), filled.join(", ")));
    }
    if !kept.is_empty() {
        lines.push(format!(
            "{}: kept {} (point them at the files above if they name others); member {member}, pool {pool} left as they are",
            path.display(),
            kept.join(", ")
        ));
    }
    Ok(lines)
}

/// Writes `path` through a temporary file and a rename; `secret`: mode 0600.
fn write_file(path: &Path, contents: &str, secret: bool) -> std::io::Result<()> {
    let tmp = path.with_extension("join-tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(if secret { 0o600 } else { 0o644 }).open(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// A TLS connector that accepts any server certificate: only for fetching the public CA, which is then checked
/// against the fingerprint.
#[derive(Clone)]
struct UnverifiedTls {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl UnverifiedTls {
    fn new(host: &str) -> anyhow::Result<UnverifiedTls> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS")?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider)))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let name = ServerName::try_from(host.to_string()).map_err(|e| anyhow!("--hub {host}: {e}"))?;
        Ok(UnverifiedTls { config: Arc::new(config), name })
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Service<Uri> for UnverifiedTls {
    type Response = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let name = self.name.clone();
        Box::pin(async move {
            let host = uri.host().ok_or("no host")?.trim_start_matches('[').trim_end_matches(']').to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            Ok(TokioIo::new(connector.connect(name, tcp).await?))
        })
    }
}

#[derive(Debug)]
struct AnyServerCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pki_directory_lets_the_group_replace_only_its_own_files() {
        // A directory `join` created (umask 022), the package's, and one already handed over.
        assert_eq!(pki_dir_mode(0o40755), 0o1771);
        assert_eq!(pki_dir_mode(0o40750), 0o1770);
        assert_eq!(pki_dir_mode(0o41770), 0o1770);
        // Others never list or write, the owner keeps what it had.
        assert_eq!(pki_dir_mode(0o40777), 0o1771);
        assert_eq!(pki_dir_mode(0o40500), 0o1570);
    }

    #[test]
    fn hand_over_gives_the_pair_to_the_user_and_the_directory_to_its_group() {
        // Without root, the only user files can be given to is the one running the test: the calls and the
        // modes are what is checked here; the system test checks the real `upkeep-agent` user.
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = dir.path().join("pki");
        std::fs::create_dir(&pki).expect("mkdir");
        std::fs::set_permissions(&pki, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let (key, cert) = (pki.join(KEY_FILE), pki.join(CERT_FILE));
        write_file(&key, "key", true).expect("key");
        write_file(&cert, "cert", false).expect("cert");
        let me = std::fs::metadata(&key).expect("stat");
        let lines = hand_over(&pki, &[&key, &cert], "someone", me.uid(), me.gid()).expect("hand over");
        assert_eq!(std::fs::metadata(&pki).expect("stat").mode() & 0o7777, 0o1771);
        assert_eq!(std::fs::metadata(&key).expect("stat").mode() & 0o777, 0o600, "the key stays private");
        for f in [&key, &cert] {
            let m = std::fs::metadata(f).expect("stat");
            assert_eq!((m.uid(), m.gid()), (me.uid(), me.gid()));
            assert!(lines.iter().any(|l| l.starts_with(&format!("gave {} to someone", f.display()))), "{lines:?}");
        }
        assert!(lines.last().expect("a line").contains("group someone, mode 1771"), "{lines:?}");

        // A missing file is an error, not a silent skip.
        let gone = pki.join("missing.pem");
        assert!(hand_over(&pki, &[&gone], "someone", me.uid(), me.gid()).is_err());
    }
}
