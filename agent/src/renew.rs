//! Certificate rotation: at 2/3 of its certificate's life the agent makes a fresh key, asks its hub for a
//! certificate for it over the open session's connection (`RenewCertificate`), and puts both in place of the old
//! ones. The session in progress goes on; the next connection presents the new certificate. No restart, and no
//! operation is interrupted.
//!
//! Replacing the pair is crash-safe: both are written in full next to the old files first (`*.next`, fsynced),
//! then the key is renamed over the old key and the certificate over the old certificate. A crash between the two
//! renames leaves `CERT.next` behind with the new key in place; [`finish_rotation`], run when the agent starts,
//! completes the rotation from whatever it finds, so the key and the certificate on disk always belong together
//! once the agent runs.

use anyhow::{Context, anyhow};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use tonic::transport::Channel;
use upkeep_proto::v1;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The share of a certificate's life after which it is renewed.
pub const RENEW_AFTER: f64 = 2.0 / 3.0;

fn next(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".next");
    PathBuf::from(name)
}

/// When (Unix seconds) the certificate in the PEM file at `cert` is due for renewal.
pub fn due_at(cert: &Path) -> anyhow::Result<i64> {
    let pem = std::fs::read(cert).with_context(|| format!("tls.cert {}", cert.display()))?;
    let (_, block) =
        x509_parser::pem::parse_x509_pem(&pem).map_err(|e| anyhow!("tls.cert {}: bad PEM: {e}", cert.display()))?;
    let (_, c) = X509Certificate::from_der(&block.contents)
        .map_err(|e| anyhow!("tls.cert {}: bad certificate: {e}", cert.display()))?;
    let (from, until) = (c.validity().not_before.timestamp(), c.validity().not_after.timestamp());
    Ok(from + ((until - from) as f64 * RENEW_AFTER) as i64)
}

/// Completes a rotation a crash interrupted (see the module documentation). Returns whether there was one.
pub fn finish_rotation(cert: &Path, key: &Path) -> std::io::Result<bool> {
    let (cert_next, key_next) = (next(cert), next(key));
    if !cert_next.exists() {
        // Nothing written, or everything renamed; a key written without its certificate is of no use.
        let _ = std::fs::remove_file(&key_next);
        return Ok(false);
    }
    if key_next.exists() {
        std::fs::rename(&key_next, key)?;
    }
    std::fs::rename(&cert_next, cert)?;
    sync_dir(cert)?;
    Ok(true)
}

fn sync_dir(file: &Path) -> std::io::Result<()> {
    std::fs::File::open(file.parent().unwrap_or(Path::new("."))).and_then(|d| d.sync_all())
}

fn write_new(path: &Path, contents: &str, secret: bool) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let mut f =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(if secret { 0o600 } else { 0o644 }).open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

/// Renews over `channel`: a fresh key, a request, the hub's certificate, both files replaced. Returns the new
/// certificate's not-after time (Unix seconds).
pub async fn renew(channel: Channel, cert: &Path, key: &Path) -> anyhow::Result<i64> {
    let new_key = rcgen::KeyPair::generate().context("generating a key")?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&new_key)
        .and_then(|c| c.pem())
        .context("making the certificate request")?;
    let chain = v1::agent_service_client::AgentServiceClient::new(channel)
        .renew_certificate(v1::RenewCertificateRequest { csr_pem: csr })
        .await
        .map_err(|s| anyhow!("the hub did not renew the certificate: {}", s.message()))?
        .into_inner()
        .certificate_chain_pem;
    // What came back must be a certificate for this key before anything on disk changes.
    let (_, block) =
        x509_parser::pem::parse_x509_pem(chain.as_bytes()).map_err(|e| anyhow!("the renewed certificate: {e}"))?;
    let (_, c) = X509Certificate::from_der(&block.contents).map_err(|e| anyhow!("the renewed certificate: {e}"))?;
    if c.public_key().subject_public_key.data.as_ref() != new_key.public_key_raw() {
        return Err(anyhow!("the renewed certificate is not for the key this node made; kept the old one"));
    }
    let until = c.validity().not_after.timestamp();
    let (cert_next, key_next) = (next(cert), next(key));
    // The key first; the certificate appears under its `.next` name only complete (written aside, then renamed),
    // so a `.next` certificate on disk always has its key beside it or already in place.
    write_new(&key_next, &new_key.serialize_pem(), true).with_context(|| format!("{}", key_next.display()))?;
    let aside = cert_next.with_extension("next-tmp");
    write_new(&aside, &chain, false).with_context(|| format!("{}", aside.display()))?;
    std::fs::rename(&aside, &cert_next).with_context(|| format!("{}", cert_next.display()))?;
    sync_dir(cert).with_context(|| format!("{}", cert.display()))?;
    finish_rotation(cert, key).with_context(|| format!("replacing {} and {}", cert.display(), key.display()))?;
    Ok(until)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupted_rotation_is_completed_from_whatever_it_left() {
        let dir = tempfile::tempdir().expect("tmp");
        let (cert, key) = (dir.path().join("node.pem"), dir.path().join("node.key"));
        std::fs::write(&cert, "old-cert").expect("cert");
        std::fs::write(&key, "old-key").expect("key");
        // Nothing pending: nothing changes.
        assert!(!finish_rotation(&cert, &key).expect("finish"));
        // Crash after both were written, before any rename.
        std::fs::write(next(&cert), "new-cert").expect("cert.next");
        std::fs::write(next(&key), "new-key").expect("key.next");
        assert!(finish_rotation(&cert, &key).expect("finish"));
        assert_eq!(std::fs::read_to_string(&cert).expect("cert"), "new-cert");
        assert_eq!(std::fs::read_to_string(&key).expect("key"), "new-key");
        // Crash between the renames: the key is new, the certificate still waits.
        std::fs::write(next(&cert), "newer-cert").expect("cert.next");
        std::fs::write(&key, "newer-key").expect("key");
        assert!(finish_rotation(&cert, &key).expect("finish"));
        assert_eq!(std::fs::read_to_string(&cert).expect("cert"), "newer-cert");
        assert_eq!(std::fs::read_to_string(&key).expect("key"), "newer-key");
        // Crash while writing the key only: the old pair stays, the stray key goes.
        std::fs::write(next(&key), "stray").expect("key.next");
        assert!(!finish_rotation(&cert, &key).expect("finish"));
        assert!(!next(&key).exists());
        assert_eq!(std::fs::read_to_string(&key).expect("key"), "newer-key");
    }
}
