//! Join tokens and the checks of a join: what `upkeepctl pki token create` makes and `upkeep-agent join` redeems.
//!
//! A token reads `upkeep-join-<id>.<secret>`: the id (8 random bytes, hex) finds the row, the secret (32 random
//! bytes, hex) proves the holder; the store keeps only the SHA-256 of the secret. A token is single-purpose (a
//! node certificate for its member and pool), expires, and allows a number of joins. This module makes and parses
//! tokens and checks a CSR; it touches neither the store nor the network (see `grpc::join`).

use crate::store::{JoinTokenRecord, TokenRefusal};
use ring::rand::SecureRandom;
use upkeep_core::ids::validate_name;

/// What every token starts with.
pub const TOKEN_PREFIX: &str = "upkeep-join-";
/// Lifetime of a token when none is given, seconds.
pub const DEFAULT_TTL_SECONDS: u64 = 3600;
/// The longest lifetime of a token, seconds (7 days).
pub const MAX_TTL_SECONDS: u64 = 7 * 86_400;
/// The most joins one token may allow.
pub const MAX_USES: u32 = 1000;
/// Node pool of a token made without one.
pub const DEFAULT_POOL: &str = "default";
/// Random bytes of a token's id.
const ID_BYTES: usize = 8;
/// Random bytes of a token's secret.
const SECRET_BYTES: usize = 32;

/// A token just made: the record to store, and the text to show once.
#[derive(Debug, Clone)]
pub struct NewToken {
    /// What the store keeps (the secret's hash only).
    pub record: JoinTokenRecord,
    /// `upkeep-join-<id>.<secret>`.
    pub text: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lower-case hex SHA-256 of a token's secret.
pub fn hash_secret(secret: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref())
}

/// Makes a token. `ttl_seconds` 0 means [`DEFAULT_TTL_SECONDS`], `uses` 0 means 1, an empty pool
/// [`DEFAULT_POOL`]. Errors name the `upkeepctl` flag and the fix.
pub fn new_token(
    member: &str,
    pool: &str,
    ttl_seconds: u64,
    uses: u32,
    created_by: &str,
    now_ms: i64,
) -> Result<NewToken, String> {
    validate_name("member", member).map_err(|e| format!("--member: {e}"))?;
    let pool = if pool.is_empty() { DEFAULT_POOL } else { pool };
    validate_name("node pool", pool).map_err(|e| format!("--pool: {e}"))?;
    let ttl = if ttl_seconds == 0 { DEFAULT_TTL_SECONDS } else { ttl_seconds };
    if ttl > MAX_TTL_SECONDS {
        return Err(format!("--ttl: {ttl} s is longer than the most a token may live (7 days); give e.g. --ttl 1h"));
    }
    let uses = if uses == 0 { 1 } else { uses };
    if uses > MAX_USES {
        return Err(format!("--uses: {uses} is more than {MAX_USES}; make several tokens, or fewer joins per token"));
    }
    let rng = ring::rand::SystemRandom::new();
    let mut id = [0u8; ID_BYTES];
    let mut secret = [0u8; SECRET_BYTES];
    rng.fill(&mut id).map_err(|_| "the system random generator failed".to_string())?;
    rng.fill(&mut secret).map_err(|_| "the system random generator failed".to_string())?;
    let (id, secret) = (hex(&id), hex(&secret));
    let ttl_ms = i64::try_from(ttl.saturating_mul(1000)).unwrap_or(i64::MAX);
    Ok(NewToken {
        text: format!("{TOKEN_PREFIX}{id}.{secret}"),
        record: JoinTokenRecord {
            id,
            secret_sha256: hash_secret(&secret),
            member: member.to_string(),
            node_pool: pool.to_string(),
            expires_ms: now_ms.saturating_add(ttl_ms),
            uses_left: uses,
            created_by: created_by.to_string(),
            created_ms: now_ms,
        },
    })
}

/// Splits a token into its id and the hash of its secret; the error names `--token`.
pub fn parse_token(text: &str) -> Result<(String, String), String> {
    let bad = || {
        "--token: not a join token: expected upkeep-join-<id>.<secret> as `upkeepctl pki token create` prints it"
            .to_string()
    };
    let rest = text.trim().strip_prefix(TOKEN_PREFIX).ok_or_else(bad)?;
    let (id, secret) = rest.split_once('.').ok_or_else(bad)?;
    let is_hex = |s: &str, n: usize| s.len() == 2 * n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !is_hex(id, ID_BYTES) || !is_hex(secret, SECRET_BYTES) {
        return Err(bad());
    }
    Ok((id.to_ascii_lowercase(), hash_secret(&secret.to_ascii_lowercase())))
}

/// One line saying why a token was refused, and what to do.
pub fn refusal_line(refusal: TokenRefusal, id: &str) -> String {
    let fix = "ask an operator for a new one (`upkeepctl pki token create`)";
    match refusal {
        TokenRefusal::Unknown => {
            format!("join token {id} is not known to this hub (mistyped, revoked, or made on another hub); {fix}")
        }
        TokenRefusal::Expired => format!("join token {id} has expired; {fix}"),
        TokenRefusal::UsedUp => format!("join token {id} has been used as many times as it allows; {fix}"),
    }
}

/// Parses a CSR and verifies its self-signature; returns the public key it carries. Whatever names and
/// extensions it asks for are ignored: the hub decides what the certificate says.
pub fn check_csr(csr_pem: &str) -> Result<rcgen::PublicKey, String> {
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| match e {
        rcgen::Error::InvalidCertificationRequestSignature => {
            "csr_pem: the signature of the certificate request does not verify with its own key".to_string()
        }
        other => format!("csr_pem: not a usable PKCS#10 certificate request ({other})"),
    })?;
    Ok(csr.public_key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_parses_back_to_its_id_and_hash_and_keeps_no_secret() {
        let t = new_token("m1", "", 0, 0, "upkeep://operator/admin", 1_000).expect("token");
        assert_eq!(t.record.node_pool, DEFAULT_POOL);
        assert_eq!(t.record.uses_left, 1);
        assert_eq!(t.record.expires_ms, 1_000 + 3_600_000);
        let (id, hash) = parse_token(&t.text).expect("parse");
        assert_eq!((id.as_str(), hash.as_str()), (t.record.id.as_str(), t.record.secret_sha256.as_str()));
        let secret = t.text.rsplit('.').next().expect("secret");
        assert_eq!(secret.len(), 64);
        assert!(!format!("{:?}", t.record).contains(secret), "the record holds no secret");
        let other = new_token("m1", "p", 60, 3, "x", 0).expect("token");
        assert_ne!(other.record.id, t.record.id);
    }

    #[test]
    fn bad_inputs_name_the_flag() {
        assert!(new_token("bad name", "", 0, 0, "x", 0).expect_err("member").starts_with("--member: "));
        assert!(new_token("m", "a b", 0, 0, "x", 0).expect_err("pool").starts_with("--pool: "));
        assert!(new_token("m", "", MAX_TTL_SECONDS + 1, 0, "x", 0).expect_err("ttl").starts_with("--ttl: "));
        assert!(new_token("m", "", 0, MAX_USES + 1, "x", 0).expect_err("uses").starts_with("--uses: "));
        for bad in ["", "upkeep-join-", "upkeep-join-abc.def", "nope-0011223344556677.00"] {
            assert!(parse_token(bad).expect_err(bad).starts_with("--token: "), "{bad}");
        }
    }

    #[test]
    fn a_csr_whose_signature_does_not_verify_is_refused() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI("upkeep://operator/root".try_into().expect("uri"))];
        let csr = params.serialize_request(&key).expect("csr");
        let public = check_csr(&csr.pem().expect("pem")).expect("a good CSR");
        assert_eq!(rcgen::PublicKeyData::der_bytes(&public), rcgen::PublicKeyData::der_bytes(&key));
        // Flip one bit of the signature (the last byte of the DER).
        let mut der = csr.der().to_vec();
        let last = der.len() - 1;
        der[last] ^= 1;
        let text =
            format!("-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n", base64_lines(&der));
        let e = check_csr(&text).expect_err("bad signature");
        assert!(e.contains("does not verify"), "{e}");
        assert!(check_csr("garbage").expect_err("garbage").starts_with("csr_pem: "));
    }

    fn base64_lines(der: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut s = String::new();
        for chunk in der.chunks(3) {
            let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    s.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    s.push('=');
                }
            }
        }
        s
    }
}
