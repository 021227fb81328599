//! How long certificates have left: `upkeepctl pki status`, and the hub's own warning about its certificate and
//! the fleet CA (at start and once a day), both [`WARN_DAYS`] ahead of expiry.

use serde::Serialize;
use std::path::{Path, PathBuf};
use x509_parser::prelude::{FromDer, X509Certificate};

/// Days before expiry at which a certificate is reported as expiring.
pub const WARN_DAYS: i64 = 14;

/// One certificate's expiry as reported.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CertStatus {
    /// The file it was read from.
    pub file: PathBuf,
    /// Its identity (`upkeep://role/name`), or its subject when it has none (CAs, the hub).
    pub subject: String,
    /// Serial, as `pki revoke` takes it.
    pub serial: String,
    /// Not after, RFC 3339.
    pub not_after: String,
    /// Not after, Unix seconds (the metrics' value; not in `pki status` output).
    #[serde(skip)]
    pub not_after_unix: i64,
    /// Whole days left (negative: expired that many days ago).
    pub days_left: i64,
    /// `ok`, `expiring` (within [`WARN_DAYS`]) or `expired`.
    pub state: &'static str,
}

/// The status of the first certificate in `pem` (read from `file`) at `now_unix` seconds.
pub fn status_of_pem(file: &Path, pem: &[u8], now_unix: i64, warn_days: i64) -> Result<CertStatus, String> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem).map_err(|e| format!("{}: bad PEM: {e}", file.display()))?;
    let (_, cert) =
        X509Certificate::from_der(&block.contents).map_err(|e| format!("{}: bad certificate: {e}", file.display()))?;
    let subject = upkeep_proto::tls::principal_from_der(&block.contents)
        .map(|p| p.uri())
        .unwrap_or_else(|_| cert.subject().to_string());
    let serial = crate::revocation::serial_of_der(&block.contents).map_err(|e| format!("{}: {e}", file.display()))?;
    let not_after = cert.validity().not_after.timestamp();
    let days_left = (not_after - now_unix).div_euclid(86_400);
    let state = if not_after <= now_unix {
        "expired"
    } else if days_left < warn_days {
        "expiring"
    } else {
        "ok"
    };
    let not_after_unix = not_after;
    let not_after = chrono::DateTime::from_timestamp(not_after, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default();
    Ok(CertStatus { file: file.to_path_buf(), subject, serial, not_after, not_after_unix, days_left, state })
}

/// The status of every certificate (`*.pem`) in `dir`, by file name.
pub fn status_of_dir(dir: &Path, now_unix: i64, warn_days: i64) -> Result<Vec<CertStatus>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("--dir {}: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "pem"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            let pem = std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?;
            status_of_pem(f, &pem, now_unix, warn_days)
        })
        .collect()
}

/// Logs a warning for each of `files` (setting name, path) that expires within [`WARN_DAYS`] or has expired.
pub fn warn_if_expiring(files: &[(&'static str, PathBuf)]) {
    let now = chrono::Utc::now().timestamp();
    for (setting, path) in files {
        let status =
            std::fs::read(path).map_err(|e| e.to_string()).and_then(|pem| status_of_pem(path, &pem, now, WARN_DAYS));
        match status {
            Ok(s) if s.state != "ok" => tracing::warn!(setting, file = %path.display(), subject = %s.subject,
                not_after = %s.not_after, days_left = s.days_left, state = s.state,
                "certificate expiring: renew it before it runs out (`upkeepctl pki status`)"),
            Ok(_) => {}
            Err(e) => tracing::warn!(setting, error = %e, "cannot read a certificate to check its expiry"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(days: i64) -> String {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut p = rcgen::CertificateParams::new(vec!["hub".to_string()]).expect("params");
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::days(400);
        p.not_after = now + time::Duration::days(days) + time::Duration::hours(1);
        p.self_signed(&key).expect("sign").pem()
    }

    #[test]
    fn a_certificate_is_ok_expiring_or_expired_by_its_days_left() {
        let now = chrono::Utc::now().timestamp();
        let f = Path::new("x.pem");
        let ok = status_of_pem(f, cert(30).as_bytes(), now, WARN_DAYS).expect("30");
        assert_eq!((ok.state, ok.days_left), ("ok", 30));
        let soon = status_of_pem(f, cert(13).as_bytes(), now, WARN_DAYS).expect("13");
        assert_eq!((soon.state, soon.days_left), ("expiring", 13));
        let gone = status_of_pem(f, cert(-2).as_bytes(), now, WARN_DAYS).expect("-2");
        assert_eq!(gone.state, "expired");
        assert!(gone.days_left < 0, "{gone:?}");
        let err = status_of_pem(f, b"not a pem", now, WARN_DAYS).expect_err("bad");
        assert!(err.starts_with("x.pem: "), "{err}");
    }

    #[test]
    fn a_pki_directory_reports_every_certificate_with_its_identity() {
        let dir = tempfile::tempdir().expect("tmp");
        crate::pki::init(dir.path(), &[]).expect("init");
        let all = status_of_dir(dir.path(), chrono::Utc::now().timestamp(), WARN_DAYS).expect("status");
        let subjects: Vec<&str> = all.iter().map(|s| s.subject.as_str()).collect();
        assert!(subjects.contains(&"upkeep://operator/admin") && subjects.contains(&"upkeep://viewer/viewer"));
        assert!(all.iter().all(|s| s.state == "ok" && s.days_left > WARN_DAYS), "{all:?}");
        // Checked a year and a half later, the leaves (397 days) have expired and the CAs (root, issuer) have not.
        let later = chrono::Utc::now().timestamp() + 540 * 86_400;
        let all = status_of_dir(dir.path(), later, WARN_DAYS).expect("status");
        let is_ca = |s: &CertStatus| s.file.ends_with("ca.pem") || s.file.ends_with("issuer.pem");
        assert_eq!(all.iter().filter(|s| is_ca(s)).map(|s| s.state).collect::<Vec<_>>(), ["ok", "ok"], "{all:?}");
        assert!(all.iter().filter(|s| !is_ca(s)).all(|s| s.state == "expired"), "{all:?}");
    }
}
