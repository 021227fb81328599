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

/// Every file `pki init` writes: name, and whether it is a secret (mode 0600).
const INIT_FILES: [(&str, bool); 8] = [
    (files::CA_KEY, true),
    (files::CA_CERT, false),
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
    let contents =
        [ca.key_pem(), ca.cert_pem.clone(), hub.cert, hub.key, operator.cert, operator.key, viewer.cert, viewer.key];

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
    Ok(InitReport { files: INIT_FILES.iter().map(|(name, _)| dir.join(name)).collect() })
}

fn write_all(tmp: &Path, contents: &[String; 8]) -> Result<(), PkiError> {
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
        assert_eq!(report.files.len(), 8);
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
}
