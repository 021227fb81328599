//! The hub's check of a client certificate at the TLS handshake: the chain to the fleet CA (webpki), then two
//! rules webpki leaves to us:
//! - path length: a CA whose basic constraints allow `n` CAs below it refuses a chain with more (webpki builds
//!   the path but does not enforce `pathLenConstraint`, so an intermediate under a CA limited to 0 was accepted);
//! - revocation: a certificate whose serial is revoked ([`Revocations`]) is refused, with a log line naming it.
//!
//! A refusal becomes the TLS alert the client reads (`certificate_revoked`, `bad_certificate`), which the CLI and
//! the agent turn into one line saying which (`upkeep_proto::tls::explain_refusal`).

use crate::revocation::Revocations;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use std::sync::Arc;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The door's client certificate check (see the module documentation).
#[derive(Debug)]
pub struct FleetClientVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    roots: Vec<CertificateDer<'static>>,
    revocations: Arc<Revocations>,
}

impl FleetClientVerifier {
    /// The hub's verifier of client certificates under the fleet CA(s) in `ca_pem` (errors name `tls.ca`). A
    /// certificate is optional at the TLS layer: `JoinService` serves nodes that have none yet, and every other
    /// handler starts with `principal_of`, which refuses a caller that presented none.
    pub fn from_ca_pem(ca_pem: &[u8], revocations: Arc<Revocations>) -> Result<FleetClientVerifier, String> {
        use rustls::pki_types::pem::PemObject;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        let mut root_ders = Vec::new();
        for c in CertificateDer::pem_slice_iter(ca_pem) {
            let c = c.map_err(|e| format!("tls.ca: {e}"))?;
            roots.add(c.clone()).map_err(|e| format!("tls.ca: {e}"))?;
            root_ders.push(c);
        }
        let chain = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .allow_unauthenticated()
            .build()
            .map_err(|e| format!("tls.ca: {e}"))?;
        Ok(FleetClientVerifier::new(chain, root_ders, revocations))
    }

    /// `chain` verifies the chain to `roots` (the fleet CA certificates); `revocations` is consulted after it.
    pub fn new(
        chain: Arc<dyn ClientCertVerifier>,
        roots: Vec<CertificateDer<'static>>,
        revocations: Arc<Revocations>,
    ) -> FleetClientVerifier {
        FleetClientVerifier { chain, roots, revocations }
    }
}

/// Checks the basic constraints' path length of every CA on the path from `leaf` through `intermediates` to one
/// of `roots` (the path is followed by issuer and subject names, as webpki built it).
pub fn check_path_length(
    leaf: &[u8],
    intermediates: &[CertificateDer<'_>],
    roots: &[CertificateDer<'_>],
) -> Result<(), String> {
    fn parse(der: &[u8]) -> Result<X509Certificate<'_>, String> {
        X509Certificate::from_der(der).map(|(_, c)| c).map_err(|e| format!("bad certificate: {e}"))
    }
    let inter: Vec<X509Certificate<'_>> = intermediates.iter().map(|c| parse(c.as_ref())).collect::<Result<_, _>>()?;
    let anchors: Vec<X509Certificate<'_>> = roots.iter().map(|c| parse(c.as_ref())).collect::<Result<_, _>>()?;
    let mut current = parse(leaf)?;
    let mut used = vec![false; inter.len()];
    // `below`: CAs between the leaf and the CA being looked at. Bounded: each intermediate is used at most once,
    // then a root ends the path.
    for below in 0..=inter.len() {
        let issuer = current.issuer().as_raw();
        let next = inter.iter().enumerate().find(|(i, c)| !used[*i] && c.subject().as_raw() == issuer);
        let (ca, is_root) = match next {
            Some((i, c)) => {
                used[i] = true;
                (c.clone(), false)
            }
            None => match anchors.iter().find(|c| c.subject().as_raw() == issuer) {
                Some(c) => (c.clone(), true),
                None => return Ok(()),
            },
        };
        if let Ok(Some(bc)) = ca.basic_constraints()
            && let Some(limit) = bc.value.path_len_constraint
            && below > limit as usize
        {
            return Err(format!(
                "the CA {} allows {limit} intermediate CA(s) below it, the chain presented has {below}",
                ca.subject()
            ));
        }
        if is_root {
            return Ok(());
        }
        current = ca;
    }
    Ok(())
}

/// Whether a node certificate `issuer` signs would pass the hub's own client check against the fleet CA
/// `ca_pem`: a throwaway node certificate is issued and verified as a handshake would (chain, path length).
/// The hub runs this at start, so an issuing CA from another fleet is a configuration error, not a stream of
/// joins and renewals that fail later.
pub fn check_issuer(ca_pem: &[u8], issuer: &crate::pki::Ca) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    let verifier = FleetClientVerifier::from_ca_pem(ca_pem, Arc::new(Revocations::none()))?;
    let probe = upkeep_core::ids::Principal { role: upkeep_core::ids::Role::Node, name: "issuer-check".into() };
    let pem = issuer.issue_client_for(&probe, 1).map_err(|e| e.to_string())?;
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pem.cert.as_bytes()).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
    let (leaf, intermediates) = certs.split_first().ok_or("the issuing CA produced no certificate")?;
    verifier.verify_client_cert(leaf, intermediates, UnixTime::now()).map(drop).map_err(|e| e.to_string())
}

impl ClientCertVerifier for FleetClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.chain.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.chain.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self.chain.verify_client_cert(end_entity, intermediates, now)?;
        let who = || {
            upkeep_proto::tls::principal_from_der(end_entity.as_ref())
                .map(|p| p.uri())
                .unwrap_or_else(|_| "a certificate without an upkeep identity".to_string())
        };
        if let Err(why) = check_path_length(end_entity.as_ref(), intermediates, &self.roots) {
            tracing::warn!(principal = %who(), reason = %why, "client certificate refused: path length");
            return Err(Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure));
        }
        if let Some(r) = self.revocations.revoked_der(end_entity.as_ref()) {
            tracing::warn!(principal = %who(), serial = %r.serial, revoked_by = %r.revoked_by, reason = %r.reason,
                "client certificate refused: revoked");
            return Err(Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};

    struct Ca {
        cert: rcgen::Certificate,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca(name: &str, path_len: Option<u8>, parent: Option<&Ca>) -> Ca {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = IsCa::Ca(path_len.map_or(BasicConstraints::Unconstrained, BasicConstraints::Constrained));
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let cert = match parent {
            Some(parent) => p.signed_by(&key, &parent.issuer).expect("sign"),
            None => p.self_signed(&key).expect("self-sign"),
        };
        let issuer = Issuer::new(p, key);
        Ca { cert, issuer }
    }

    fn leaf(issuer: &Ca) -> CertificateDer<'static> {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.subject_alt_names = vec![SanType::URI("upkeep://node/n1".try_into().expect("uri"))];
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        p.signed_by(&key, &issuer.issuer).expect("sign").der().clone()
    }

    fn verifier(root: &Ca, revocations: Arc<Revocations>) -> FleetClientVerifier {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root.cert.der().clone()).expect("root");
        let chain = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .expect("verifier");
        FleetClientVerifier::new(chain, vec![root.cert.der().clone()], revocations)
    }

    fn verify(v: &FleetClientVerifier, leaf: &CertificateDer<'_>, inter: &[CertificateDer<'_>]) -> Result<(), Error> {
        v.verify_client_cert(leaf, inter, UnixTime::now()).map(drop)
    }

    #[test]
    fn an_intermediate_under_a_root_limited_to_path_length_zero_is_refused() {
        let root = ca("root pathlen 0", Some(0), None);
        let inter = ca("intermediate", Some(0), Some(&root));
        let n1 = leaf(&inter);
        let v = verifier(&root, Arc::new(Revocations::none()));
        assert_eq!(
            verify(&v, &n1, &[inter.cert.der().clone()]),
            Err(Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
        );
        let why = check_path_length(n1.as_ref(), &[inter.cert.der().clone()], &[root.cert.der().clone()])
            .expect_err("refused");
        assert!(why.contains("allows 0 intermediate") && why.contains("has 1"), "{why}");
        // Directly under the root it is fine.
        assert_eq!(verify(&v, &leaf(&root), &[]), Ok(()));

        // A root allowing one intermediate accepts the same shape, and refuses two.
        let root = ca("root pathlen 1", Some(1), None);
        let inter = ca("intermediate", None, Some(&root));
        let v = verifier(&root, Arc::new(Revocations::none()));
        assert_eq!(verify(&v, &leaf(&inter), &[inter.cert.der().clone()]), Ok(()));
        let second = ca("second intermediate", None, Some(&inter));
        assert_eq!(
            verify(&v, &leaf(&second), &[second.cert.der().clone(), inter.cert.der().clone()]),
            Err(Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
        );
    }

    #[test]
    fn a_revoked_serial_is_refused_and_others_of_the_same_ca_are_not() {
        let root = ca("root", Some(0), None);
        let (a, b) = (leaf(&root), leaf(&root));
        let dir = tempfile::tempdir().expect("tmp");
        let store: Arc<dyn crate::store::Store> =
            Arc::new(crate::store::sqlite::SqliteStore::open(&dir.path().join("hub.db")).expect("store"));
        let revocations = Arc::new(Revocations::load(store).expect("load"));
        let v = verifier(&root, revocations.clone());
        assert_eq!(verify(&v, &a, &[]), Ok(()));
        let serial = crate::revocation::serial_of_der(a.as_ref()).expect("serial");
        revocations.revoke(&serial, "test", "upkeep://operator/t").expect("revoke");
        assert_eq!(verify(&v, &a, &[]), Err(Error::InvalidCertificate(CertificateError::Revoked)));
        assert_eq!(verify(&v, &b, &[]), Ok(()));
    }

    #[test]
    fn an_issuing_ca_from_another_fleet_is_found_before_it_signs_anything() {
        let ours = tempfile::tempdir().expect("tmp");
        let theirs = tempfile::tempdir().expect("tmp");
        crate::pki::init(ours.path(), &[]).expect("pki");
        crate::pki::init(theirs.path(), &[]).expect("pki");
        let load = |d: &std::path::Path| {
            crate::pki::Ca::load_files(&d.join("issuer.pem"), &d.join("issuer.key"), true).expect("issuer")
        };
        let ca_pem = std::fs::read(ours.path().join("ca.pem")).expect("ca");
        check_issuer(&ca_pem, &load(ours.path())).expect("our issuer");
        let why = check_issuer(&ca_pem, &load(theirs.path())).expect_err("another fleet's issuer");
        assert!(why.contains("invalid peer certificate"), "{why}");
    }
}
