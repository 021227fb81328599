//! The fleet PKI for newcomers: a fleet CA, the hub's server certificate, operator, viewer and node certificates.
//!
//! The role and name of every client certificate live in one SAN URI `upkeep://<role>/<name>` (see
//! docs/identity.md). Keys are ECDSA P-256 generated with ring. Files are written with mode 0600 for keys.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use upkeep_core::ids::{Principal, Role, validate_name};

/// PKI failures, each naming the file or the input concerned.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("generating {what}: {source}")]
    Generate {
        /// Which certificate.
        what: String,
        /// The cause.
        #[source]
        source: rcgen::Error,
    },
    /// A name given for a certificate is not allowed.
    #[error("--name: {0}")]
    BadName(#[from] upkeep_core::ids::BadName),
    /// `pki init` would overwrite an existing CA.
    #[error("{0} already exists; refusing to overwrite a fleet CA (choose another --dir)")]
    Exists(PathBuf),
    /// The CA files could not be loaded for issuing.
    #[error("{path}: not a usable CA ({reason}); create one with `upkeepctl pki init --dir DIR`")]
    BadCa {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// File names inside a PKI directory.
pub mod files {
    /// The fleet CA certificate (distribute to every node and operator).
    pub const CA_CERT: &str = "ca.pem";
    /// The fleet CA key (keep offline in production).
    pub const CA_KEY: &str = "ca.key";
    /// The hub's server certificate.
    pub const HUB_CERT: &str = "hub.pem";
    /// The hub's key.
    pub const HUB_KEY: &str = "hub.key";
    /// The first operator certificate.
    pub const OPERATOR_CERT: &str = "operator.pem";
    /// Its key.
    pub const OPERATOR_KEY: &str = "operator.key";
    /// The first viewer certificate.
    pub const VIEWER_CERT: &str = "viewer.pem";
    /// Its key.
    pub const VIEWER_KEY: &str = "viewer.key";
}

/// Default validity of leaf certificates, days.
pub const LEAF_VALIDITY_DAYS: i64 = 397;
/// Default validity of the CA, days.
pub const CA_VALIDITY_DAYS: i64 = 3650;

/// A certificate and its key in PEM.
#[derive(Debug, Clone)]
pub struct Pem {
    /// Certificate chain (leaf only).
    pub cert: String,
    /// PKCS#8 private key.
    pub key: String,
}

/// A loaded CA able to issue certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate in PEM.
    pub cert_pem: String,
}

fn validity(params: &mut CertificateParams, days: i64) {
    // Backdate by an hour so that small clock skew between hub and nodes does not reject a fresh certificate.
    let start = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_before = start;
    params.not_after = start + time::Duration::days(days);
}

impl Ca {
    /// Generates a new fleet CA.
    pub fn generate(common_name: &str) -> Result<Ca, PkiError> {
        let gen_err = |source| PkiError::Generate { what: "fleet CA".into(), source };
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "upkeep fleet");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        validity(&mut params, CA_VALIDITY_DAYS);
        let cert = params.self_signed(&key).map_err(gen_err)?;
        Ok(Ca { cert_pem: cert.pem(), issuer: Issuer::new(params, key) })
    }

    /// Loads a CA from `ca.pem` and `ca.key` in `dir`.
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let cert_path = dir.join(files::CA_CERT);
        let key_path = dir.join(files::CA_KEY);
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| PkiError::BadCa { path: key_path.clone(), reason: e.to_string() })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| PkiError::BadCa { path: cert_path.clone(), reason: e.to_string() })?;
        Ok(Ca { issuer, cert_pem })
    }

    /// The CA key in PEM.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a client certificate for `principal` (role and name in the SAN URI, name also as CN).
    pub fn issue_client(&self, principal: &Principal) -> Result<Pem, PkiError> {
        self.issue(principal, &[], &[], ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// Issues the hub's server certificate for the given DNS names and IP addresses.
    pub fn issue_hub(&self, name: &str, dns: &[String], ips: &[IpAddr]) -> Result<Pem, PkiError> {
        let principal = Principal { role: Role::Hub, name: name.to_string() };
        self.issue(&principal, dns, ips, ExtendedKeyUsagePurpose::ServerAuth)
    }

    fn issue(
        &self,
        principal: &Principal,
        dns: &[String],
        ips: &[IpAddr],
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<Pem, PkiError> {
        validate_name("certificate name", &principal.name)?;
        let what = principal.uri();
        let gen_err = |source| PkiError::Generate { what: what.clone(), source };
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, principal.name.as_str());
        dn.push(DnType::OrganizationalUnitName, principal.role.as_str());
        params.distinguished_name = dn;
        let mut sans = vec![SanType::URI(principal.uri().try_into().map_err(gen_err)?)];
        for d in dns {
            sans.push(SanType::DnsName(d.clone().try_into().map_err(gen_err)?));
        }
        for ip in ips {
            sans.push(SanType::IpAddress(*ip));
        }
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, LEAF_VALIDITY_DAYS);
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err)?;
        Ok(Pem { cert: cert.pem(), key: key.serialize_pem() })
    }
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io { path: path.to_path_buf(), source })
}

/// Writes `contents` to `path`; keys get mode 0600. Refuses to overwrite.
pub fn write_new(path: &Path, contents: &str, secret: bool) -> Result<(), PkiError> {
    let io = |source| PkiError::Io { path: path.to_path_buf(), source };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// What `pki init` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InitReport {
    /// Every file written.
    pub files: Vec<PathBuf>,
}

/// `upkeepctl pki init`: a fleet CA, a hub certificate, one operator and one viewer certificate in `dir`.
pub fn init(dir: &Path, hub_names: &[String]) -> Result<InitReport, PkiError> {
    fs::create_dir_all(dir).map_err(|source| PkiError::Io { path: dir.to_path_buf(), source })?;
    let ca_path = dir.join(files::CA_CERT);
    if ca_path.exists() {
        return Err(PkiError::Exists(ca_path));
    }
    let ca = Ca::generate("upkeep fleet CA")?;
    let (mut dns, mut ips) = (Vec::new(), Vec::new());
    let names: Vec<String> =
        if hub_names.is_empty() { vec!["localhost".into(), "127.0.0.1".into()] } else { hub_names.to_vec() };
    for n in &names {
        match n.parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => dns.push(n.clone()),
        }
    }
    let hub = ca.issue_hub("hub", &dns, &ips)?;
    let operator = ca.issue_client(&Principal { role: Role::Operator, name: "admin".into() })?;
    let viewer = ca.issue_client(&Principal { role: Role::Viewer, name: "viewer".into() })?;
    let plan = [
        (files::CA_KEY, ca.key_pem(), true),
        (files::CA_CERT, ca.cert_pem.clone(), false),
        (files::HUB_CERT, hub.cert, false),
        (files::HUB_KEY, hub.key, true),
        (files::OPERATOR_CERT, operator.cert, false),
        (files::OPERATOR_KEY, operator.key, true),
        (files::VIEWER_CERT, viewer.cert, false),
        (files::VIEWER_KEY, viewer.key, true),
    ];
    let mut written = Vec::new();
    for (name, contents, secret) in plan {
        let p = dir.join(name);
        write_new(&p, &contents, secret)?;
        written.push(p);
    }
    Ok(InitReport { files: written })
}

/// `upkeepctl pki issue-node` (and `issue-operator`, `issue-viewer`): writes `<name>.pem` and `<name>.key` in `dir`.
pub fn issue(dir: &Path, role: Role, name: &str) -> Result<InitReport, PkiError> {
    validate_name("certificate name", name)?;
    let ca = Ca::load(dir)?;
    let pem = ca.issue_client(&Principal { role, name: name.to_string() })?;
    let cert_path = dir.join(format!("{role}-{name}.pem"));
    let key_path = dir.join(format!("{role}-{name}.key"));
    write_new(&cert_path, &pem.cert, false)?;
    write_new(&key_path, &pem.key, true)?;
    Ok(InitReport { files: vec![cert_path, key_path] })
}
