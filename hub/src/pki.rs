//! The fleet PKI for newcomers: a root CA, an online issuing CA under it, the hub's server certificate, operator,
//! viewer and node certificates.
//!
//! `pki init` writes the root (`ca.pem`/`ca.key`, path length 1) and the issuing intermediate
//! (`issuer.pem`/`issuer.key`, path length 0) signed by it. Every leaf is signed by the intermediate and its `.pem`
//! holds the leaf followed by the intermediate (the chain a client or the hub presents); everyone trusts `ca.pem`
//! only, so the root key can be moved offline after init while the hub keeps issuing for joins. A PKI directory
//! without an intermediate (written before it existed) keeps working: its leaves are signed by the root.
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
use upkeep_core::ids::{Principal, Role, validate_hub_name, validate_name};

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
    /// `pki init` would overwrite a file of an existing PKI (nothing was written).
    #[error(
        "{0} already exists; pki init writes a new fleet CA and never overwrites any of its files, so nothing was written: give an empty or new --dir, or issue certificates with the existing CA (`upkeepctl pki issue-node|issue-operator|issue-viewer --dir DIR`)"
    )]
    Exists(PathBuf),
    /// A `--hub-name` is neither a DNS name nor an IP address. Not a `#[source]`: the message is the whole story,
    /// and a source would repeat it in the error chain.
    #[error("--hub-name: {0}")]
    BadHubName(upkeep_core::ids::BadHubName),
    /// A flag's value is out of range (the message names the flag and the range).
    #[error("{0}")]
    Invalid(String),
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
    /// The fleet CA key (move offline after `pki init`: only the intermediate is needed to issue).
    pub const CA_KEY: &str = "ca.key";
    /// The issuing intermediate CA, signed by the root (appended to every leaf's `.pem`).
    pub const ISSUER_CERT: &str = "issuer.pem";
    /// Its key: the hub's `tls.issuer_key`, used to sign certificates for joining nodes.
    pub const ISSUER_KEY: &str = "issuer.key";
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

/// Default validity of hub, operator and viewer certificates, days.
pub const LEAF_VALIDITY_DAYS: i64 = 397;
/// Longest validity `pki issue-* --days` accepts.
pub const MAX_LEAF_VALIDITY_DAYS: i64 = 825;
/// Default validity of the CA, days.
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// Validity of the issuing intermediate, days (less than the root's: it is the key kept online).
pub const ISSUER_VALIDITY_DAYS: i64 = 1825;
/// Validity of a node certificate, days, whether issued to a joining node or by `pki issue-node`: short, since
/// the agent renews its certificate over its session at 2/3 of its life.
pub const JOIN_VALIDITY_DAYS: i64 = 30;

/// A certificate and its key in PEM.
#[derive(Debug, Clone)]
pub struct Pem {
    /// Certificate chain: the leaf, then the issuing intermediate when there is one.
    pub cert: String,
    /// PKCS#8 private key.
    pub key: String,
}

/// A loaded CA able to issue certificates: the root, or the issuing intermediate under it.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate in PEM.
    pub cert_pem: String,
    /// Certificates appended to every leaf this CA issues: empty for the root, the intermediate itself for the
    /// intermediate (the root is never sent: every peer has it).
    chain_pem: String,
}

fn validity(params: &mut CertificateParams, days: i64) {
    // Backdate by an hour so that small clock skew between hub and nodes does not reject a fresh certificate.
    let start = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_before = start;
    params.not_after = start + time::Duration::days(days);
}

/// A CA certificate's parameters: `path_len` CAs may sit below it, valid `days`.
fn ca_params(common_name: &str, path_len: u8, days: i64) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "upkeep fleet");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, days);
    params
}

impl Ca {
    /// Generates a new fleet CA.
    pub fn generate(common_name: &str) -> Result<Ca, PkiError> {
        let gen_err = |source| PkiError::Generate { what: "fleet CA".into(), source };
        let key = KeyPair::generate().map_err(gen_err)?;
        // One intermediate (the online issuing CA) may sit below the root.
        let params = ca_params(common_name, 1, CA_VALIDITY_DAYS);
        let cert = params.self_signed(&key).map_err(gen_err)?;
        Ok(Ca { cert_pem: cert.pem(), issuer: Issuer::new(params, key), chain_pem: String::new() })
    }

    /// Generates the issuing intermediate under this (root) CA: path length 0, so it signs leaves only.
    pub fn generate_intermediate(&self, common_name: &str) -> Result<Ca, PkiError> {
        let gen_err = |source| PkiError::Generate { what: "issuing CA".into(), source };
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = ca_params(common_name, 0, ISSUER_VALIDITY_DAYS);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err)?;
        let pem = cert.pem();
        Ok(Ca { cert_pem: pem.clone(), issuer: Issuer::new(params, key), chain_pem: pem })
    }

    /// Loads the root CA from `ca.pem` and `ca.key` in `dir`.
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        Ca::load_files(&dir.join(files::CA_CERT), &dir.join(files::CA_KEY), false)
    }

    /// Loads the CA that issues leaves in `dir`: the intermediate (`issuer.pem`, `issuer.key`) when the directory
    /// has one, else the root (a PKI written before intermediates existed).
    pub fn load_issuing(dir: &Path) -> Result<Ca, PkiError> {
        let (cert, key) = (dir.join(files::ISSUER_CERT), dir.join(files::ISSUER_KEY));
        if fs::symlink_metadata(&cert).is_ok() || fs::symlink_metadata(&key).is_ok() {
            Ca::load_files(&cert, &key, true)
        } else {
            Ca::load(dir)
        }
    }

    /// Loads a CA from a certificate and a key file. `intermediate`: its certificate is appended to every leaf.
    pub fn load_files(cert_path: &Path, key_path: &Path, intermediate: bool) -> Result<Ca, PkiError> {
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| PkiError::BadCa { path: key_path.to_path_buf(), reason: e.to_string() })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| PkiError::BadCa { path: cert_path.to_path_buf(), reason: e.to_string() })?;
        let chain_pem = if intermediate { cert_pem.clone() } else { String::new() };
        Ok(Ca { issuer, cert_pem, chain_pem })
    }

    /// The CA key in PEM.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a client certificate for `principal` (role and name in the SAN URI, name also as CN).
    /// Valid `JOIN_VALIDITY_DAYS` for a node, `LEAF_VALIDITY_DAYS` otherwise.
    pub fn issue_client(&self, principal: &Principal) -> Result<Pem, PkiError> {
        self.issue_client_for(principal, default_days(principal.role))
    }

    /// `issue_client`, valid `days`.
    pub fn issue_client_for(&self, principal: &Principal, days: i64) -> Result<Pem, PkiError> {
        self.issue(principal, &[], &[], ExtendedKeyUsagePurpose::ClientAuth, days)
    }

    /// Issues the hub's server certificate for the given DNS names and IP addresses.
    pub fn issue_hub(&self, name: &str, dns: &[String], ips: &[IpAddr]) -> Result<Pem, PkiError> {
        let principal = Principal { role: Role::Hub, name: name.to_string() };
        self.issue(&principal, dns, ips, ExtendedKeyUsagePurpose::ServerAuth, LEAF_VALIDITY_DAYS)
    }

    fn issue(
        &self,
        principal: &Principal,
        dns: &[String],
        ips: &[IpAddr],
        usage: ExtendedKeyUsagePurpose,
        days: i64,
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
        validity(&mut params, days);
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err)?;
        Ok(Pem { cert: self.with_chain(&cert.pem()), key: key.serialize_pem() })
    }

    /// `leaf_pem` followed by the certificates above it that a peer needs (the intermediate, if any).
    fn with_chain(&self, leaf_pem: &str) -> String {
        let mut out = leaf_pem.to_string();
        if !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&self.chain_pem);
        out
    }

    /// Issues a node certificate for `upkeep://node/<name>` to a public key the node generated (from its CSR),
    /// valid [`JOIN_VALIDITY_DAYS`]. Returns the chain in PEM (leaf, then intermediate).
    pub fn issue_node_for_key(&self, name: &str, public_key: &impl rcgen::PublicKeyData) -> Result<String, PkiError> {
        validate_name("node name", name)?;
        let principal = Principal { role: Role::Node, name: name.to_string() };
        let what = principal.uri();
        let gen_err = |source| PkiError::Generate { what: what.clone(), source };
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationalUnitName, Role::Node.as_str());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(principal.uri().try_into().map_err(gen_err)?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, JOIN_VALIDITY_DAYS);
        let cert = params.signed_by(public_key, &self.issuer).map_err(gen_err)?;
        Ok(self.with_chain(&cert.pem()))
    }
}

/// The SHA-256 fingerprint of the first certificate in `pem`, lower-case hex pairs joined by colons (what
/// `upkeep-agent join --ca-fingerprint` wants).
pub fn fingerprint_pem(pem: &str) -> Result<String, String> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or_else(|| "no PEM certificate".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(upkeep_proto::tls::fingerprint(der.as_ref()))
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
    /// `pki init` only: the SHA-256 fingerprint of the root CA (`upkeep-agent join --ca-fingerprint`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_fingerprint: Option<String>,
}

/// Every file `pki init` writes: name, and whether it is a secret (mode 0600).
const INIT_FILES: [(&str, bool); 10] = [
    (files::CA_KEY, true),
    (files::CA_CERT, false),
    (files::ISSUER_CERT, false),
    (files::ISSUER_KEY, true),
    (files::HUB_CERT, false),
    (files::HUB_KEY, true),
    (files::OPERATOR_CERT, false),
    (files::OPERATOR_KEY, true),
    (files::VIEWER_CERT, false),
    (files::VIEWER_KEY, true),
];

/// `upkeepctl pki init`: a fleet CA, a hub certificate, one operator and one viewer certificate in `dir`.
///
/// All or nothing: every hub name is checked and every target file is checked to be absent before anything is
/// generated; the files are written and fsynced in a temporary directory next to `dir`, which then becomes `dir`
/// by one rename when `dir` is missing or empty. When `dir` already holds other files, each file is hard-linked
/// into it (a link never replaces a file), and the links made so far are removed if one fails. An existing file
/// of a PKI, above all a CA, is never overwritten.
pub fn init(dir: &Path, hub_names: &[String]) -> Result<InitReport, PkiError> {
    for n in hub_names {
        validate_hub_name(n).map_err(PkiError::BadHubName)?;
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PkiError::Io { path, source }
    };
    for (name, _) in INIT_FILES {
        let p = dir.join(name);
        // symlink_metadata: a dangling symlink in the way is a file in the way too.
        if fs::symlink_metadata(&p).is_ok() {
            return Err(PkiError::Exists(p));
        }
    }
    let ca = Ca::generate("upkeep fleet CA")?;
    let issuing = ca.generate_intermediate("upkeep issuing CA")?;
    let (mut dns, mut ips) = (Vec::new(), Vec::new());
    let names: Vec<String> =
        if hub_names.is_empty() { vec!["localhost".into(), "127.0.0.1".into()] } else { hub_names.to_vec() };
    for n in &names {
        match n.parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => dns.push(n.clone()),
        }
    }
    let hub = issuing.issue_hub("hub", &dns, &ips)?;
    let operator = issuing.issue_client(&Principal { role: Role::Operator, name: "admin".into() })?;
    let viewer = issuing.issue_client(&Principal { role: Role::Viewer, name: "viewer".into() })?;
    let fingerprint =
        fingerprint_pem(&ca.cert_pem).map_err(|reason| PkiError::BadCa { path: dir.join(files::CA_CERT), reason })?;
    let contents = [
        ca.key_pem(),
        ca.cert_pem.clone(),
        issuing.cert_pem.clone(),
        issuing.key_pem(),
        hub.cert,
        hub.key,
        operator.cert,
        operator.key,
        viewer.cert,
        viewer.key,
    ];

    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(io(&parent))?;
    let base = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "pki".into());
    let tmp = parent.join(format!(".{base}.pki-init-{}", std::process::id()));
    // A leftover from a crashed run of this same process id is ours to replace.
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp).map_err(io(&tmp))?;
    let result = write_all(&tmp, &contents).and_then(|()| move_into_place(&tmp, dir, &parent));
    // On success the temporary directory was renamed away or is left with links only; on failure it holds the
    // only copies. Either way it goes.
    let _ = fs::remove_dir_all(&tmp);
    result?;
    Ok(InitReport {
        files: INIT_FILES.iter().map(|(name, _)| dir.join(name)).collect(),
        ca_fingerprint: Some(fingerprint),
    })
}

fn write_all(tmp: &Path, contents: &[String; 10]) -> Result<(), PkiError> {
    for ((name, secret), text) in INIT_FILES.iter().zip(contents) {
        write_new(&tmp.join(name), text, *secret)?;
    }
    sync_dir(tmp)
}

fn sync_dir(dir: &Path) -> Result<(), PkiError> {
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|source| PkiError::Io { path: dir.to_path_buf(), source })
}

/// Puts the files of `tmp` into `dir` so that all of them appear or none does.
fn move_into_place(tmp: &Path, dir: &Path, parent: &Path) -> Result<(), PkiError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PkiError::Io { path, source }
    };
    let empty = match fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(io(dir)(e)),
    };
    let symlink = fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink());
    if empty && !symlink {
        // rename(2) replaces an empty directory in one step (and fails if something appeared in it meanwhile).
        fs::rename(tmp, dir).map_err(io(dir))?;
        return sync_dir(parent);
    }
    // `dir` holds other files: link ours in one by one (never replacing anything), undoing on the first failure.
    let mut linked: Vec<PathBuf> = Vec::new();
    for (name, _) in INIT_FILES {
        let target = dir.join(name);
        if let Err(e) = fs::hard_link(tmp.join(name), &target) {
            for p in &linked {
                let _ = fs::remove_file(p);
            }
            return Err(if e.kind() == std::io::ErrorKind::AlreadyExists {
                PkiError::Exists(target)
            } else {
                PkiError::Io { path: target, source: e }
            });
        }
        linked.push(target);
    }
    sync_dir(dir)
}

/// `upkeepctl pki issue-node` (and `issue-operator`, `issue-viewer`): writes `<name>.pem` and `<name>.key` in `dir`,
/// signed by the intermediate when `dir` has one (else by the root).
pub fn issue(dir: &Path, role: Role, name: &str) -> Result<InitReport, PkiError> {
    issue_for(dir, role, name, None)
}

/// The default validity of a client certificate of `role`, days: nodes renew theirs, people do not.
pub fn default_days(role: Role) -> i64 {
    if role == Role::Node { JOIN_VALIDITY_DAYS } else { LEAF_VALIDITY_DAYS }
}

/// `issue`, valid `days` (default: `default_days(role)`); more than `MAX_LEAF_VALIDITY_DAYS` is refused.
pub fn issue_for(dir: &Path, role: Role, name: &str, days: Option<i64>) -> Result<InitReport, PkiError> {
    validate_name("certificate name", name)?;
    let days = days.unwrap_or_else(|| default_days(role));
    if !(1..=MAX_LEAF_VALIDITY_DAYS).contains(&days) {
        return Err(PkiError::Invalid(format!(
            "--days {days}: give 1 to {MAX_LEAF_VALIDITY_DAYS} days (default {} for a {role} certificate)",
            default_days(role)
        )));
    }
    let ca = Ca::load_issuing(dir)?;
    let pem = ca.issue_client_for(&Principal { role, name: name.to_string() }, days)?;
    let cert_path = dir.join(format!("{role}-{name}.pem"));
    let key_path = dir.join(format!("{role}-{name}.key"));
    write_new(&cert_path, &pem.cert, false)?;
    write_new(&key_path, &pem.key, true)?;
    Ok(InitReport { files: vec![cert_path, key_path], ca_fingerprint: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = match fs::read_dir(dir) {
            Ok(entries) => entries.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        names
    }

    fn all_files() -> Vec<String> {
        let mut names: Vec<String> = INIT_FILES.iter().map(|(n, _)| n.to_string()).collect();
        names.sort();
        names
    }

    #[test]
    fn init_writes_every_file_into_a_new_or_empty_dir_and_leaves_nothing_else() {
        let base = tempfile::tempdir().expect("tempdir");
        let dir = base.path().join("pki");
        let report = init(&dir, &["hub.example".into(), "10.0.0.1".into()]).expect("init");
        assert_eq!(report.files.len(), 10);
        assert_eq!(listing(&dir), all_files());
        assert_eq!(listing(base.path()), vec!["pki".to_string()], "no temporary directory left behind");
        Ca::load(&dir).expect("the CA written is usable");
        let empty = base.path().join("empty");
        fs::create_dir(&empty).expect("mkdir");
        init(&empty, &[]).expect("init into an empty dir");
        assert_eq!(listing(&empty), all_files());
    }

    #[test]
    fn init_next_to_other_files_keeps_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("README"), "mine").expect("write");
        init(dir.path(), &[]).expect("init");
        let mut want = all_files();
        want.push("README".into());
        want.sort();
        assert_eq!(listing(dir.path()), want);
    }

    #[test]
    fn init_refuses_any_existing_file_and_writes_nothing() {
        let base = tempfile::tempdir().expect("tempdir");
        let dir = base.path().join("pki");
        fs::create_dir(&dir).expect("mkdir");
        fs::write(dir.join(files::OPERATOR_CERT), "old").expect("write");
        let err = init(&dir, &[]).expect_err("operator.pem is in the way");
        assert!(matches!(&err, PkiError::Exists(p) if p.ends_with(files::OPERATOR_CERT)), "{err}");
        assert!(err.to_string().contains("nothing was written"), "{err}");
        assert_eq!(listing(&dir), vec![files::OPERATOR_CERT.to_string()]);
        assert_eq!(listing(base.path()), vec!["pki".to_string()]);
        // A full PKI is never overwritten either: the CA stays the same.
        let full = base.path().join("full");
        init(&full, &[]).expect("first init");
        let ca = fs::read(full.join(files::CA_CERT)).expect("ca");
        assert!(matches!(init(&full, &[]), Err(PkiError::Exists(_))));
        assert_eq!(fs::read(full.join(files::CA_CERT)).expect("ca"), ca);
    }

    #[test]
    fn init_refuses_bad_hub_names_before_writing() {
        let base = tempfile::tempdir().expect("tempdir");
        let dir = base.path().join("pki");
        for bad in ["", "bad name", "a..b"] {
            let err = init(&dir, &["ok.example".into(), bad.into()]).expect_err(bad);
            assert!(err.to_string().starts_with("--hub-name: invalid hub name"), "{err}");
            assert!(!dir.exists(), "nothing written for {bad:?}");
        }
    }

    fn verify_client(root_pem: &str, chain_pem: &str) -> Result<(), String> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        let root = CertificateDer::from_pem_slice(root_pem.as_bytes()).expect("root");
        roots.add(root.clone()).expect("add root");
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes()).collect::<Result<_, _>>().expect("chain");
        let v = rustls::server::WebPkiClientVerifier::builder_with_provider(std::sync::Arc::new(roots), provider)
            .build()
            .expect("verifier");
        v.verify_client_cert(&chain[0], &chain[1..], rustls::pki_types::UnixTime::now()).map_err(|e| e.to_string())?;
        crate::client_verifier::check_path_length(chain[0].as_ref(), &chain[1..], &[root])
    }

    #[test]
    fn leaves_are_signed_by_the_intermediate_and_carry_it_and_chain_to_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let report = init(dir.path(), &[]).expect("init");
        let fp = report.ca_fingerprint.expect("fingerprint");
        assert_eq!(fp.len(), 32 * 3 - 1, "{fp}");
        let root = fs::read_to_string(dir.path().join(files::CA_CERT)).expect("ca");
        assert_eq!(fingerprint_pem(&root).expect("fp"), fp);
        for f in [files::HUB_CERT, files::OPERATOR_CERT, files::VIEWER_CERT] {
            let chain = fs::read_to_string(dir.path().join(f)).expect("chain");
            assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2, "{f}: leaf and intermediate");
        }
        verify_client(&root, &fs::read_to_string(dir.path().join(files::OPERATOR_CERT)).expect("op"))
            .expect("operator chains to the root through the intermediate");
        issue(dir.path(), Role::Node, "n1").expect("issue-node");
        verify_client(&root, &fs::read_to_string(dir.path().join("node-n1.pem")).expect("node")).expect("node");
        // The intermediate may not sign another CA: a chain with two intermediates is refused by path length.
        let issuing = Ca::load_issuing(dir.path()).expect("issuer");
        let second = issuing.generate_intermediate("rogue").expect("rogue");
        let leaf = second.issue_client(&Principal { role: Role::Node, name: "n2".into() }).expect("leaf");
        let chain = format!("{}{}", leaf.cert, issuing.cert_pem);
        let why = verify_client(&root, &chain).expect_err("too deep");
        assert!(why.contains("PathLen") || why.contains("allows 0 intermediate"), "{why}");
    }

    #[test]
    fn a_pki_dir_without_an_intermediate_still_issues_with_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        init(dir.path(), &[]).expect("init");
        fs::remove_file(dir.path().join(files::ISSUER_CERT)).expect("rm");
        fs::remove_file(dir.path().join(files::ISSUER_KEY)).expect("rm");
        issue(dir.path(), Role::Node, "old").expect("issue with the root");
        let chain = fs::read_to_string(dir.path().join("node-old.pem")).expect("node");
        assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 1, "the leaf alone");
        let root = fs::read_to_string(dir.path().join(files::CA_CERT)).expect("ca");
        verify_client(&root, &chain).expect("chains to the root directly");
    }

    #[test]
    fn issued_node_certificates_last_30_days_people_397_and_days_out_of_range_write_nothing() {
        let d = tempfile::tempdir().expect("tempdir");
        init(d.path(), &["hub.example".into()]).expect("init");
        let days_of = |file: &str| {
            let pem = fs::read(d.path().join(file)).expect("read");
            let (_, p) = x509_parser::pem::parse_x509_pem(&pem).expect("pem");
            let cert = p.parse_x509().expect("x509");
            (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp()) / 86_400
        };
        issue(d.path(), Role::Node, "n1").expect("node");
        assert_eq!(days_of("node-n1.pem"), JOIN_VALIDITY_DAYS);
        issue(d.path(), Role::Operator, "alice").expect("operator");
        assert_eq!(days_of("operator-alice.pem"), LEAF_VALIDITY_DAYS);
        issue_for(d.path(), Role::Node, "n2", Some(7)).expect("a week");
        assert_eq!(days_of("node-n2.pem"), 7);
        let before = listing(d.path());
        for bad in [0, MAX_LEAF_VALIDITY_DAYS + 1] {
            let e = issue_for(d.path(), Role::Viewer, "v", Some(bad)).expect_err("out of range");
            assert!(e.to_string().starts_with(&format!("--days {bad}: give 1 to")), "{e}");
        }
        assert_eq!(listing(d.path()), before, "nothing written");
    }

    #[test]
    fn a_node_certificate_for_a_foreign_key_names_the_node_and_lasts_30_days() {
        let dir = tempfile::tempdir().expect("tempdir");
        init(dir.path(), &[]).expect("init");
        let issuing = Ca::load_issuing(dir.path()).expect("issuer");
        let node_key = KeyPair::generate().expect("key");
        let chain = issuing.issue_node_for_key("web-1", &node_key).expect("issue");
        let root = fs::read_to_string(dir.path().join(files::CA_CERT)).expect("ca");
        verify_client(&root, &chain).expect("chains");
        let (_, block) = x509_parser::pem::parse_x509_pem(chain.as_bytes()).expect("pem");
        let p = upkeep_proto::tls::principal_from_der(&block.contents).expect("identity");
        assert_eq!(p.uri(), "upkeep://node/web-1");
        let cert = block.parse_x509().expect("x509");
        let days = (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp()) / 86_400;
        assert_eq!(days, JOIN_VALIDITY_DAYS);
        assert_eq!(cert.public_key().subject_public_key.data.as_ref(), rcgen::PublicKeyData::der_bytes(&node_key));
        assert!(issuing.issue_node_for_key("bad name", &node_key).is_err());
    }
}
