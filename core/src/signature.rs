//! Detached Ed25519 signatures of node images in a minisign-compatible text format. Pure: it parses,
//! formats, signs with a secret key it is given, and verifies. It never reads files, the clock or a random
//! source; the caller brings key bytes (from a file or from a random generator) and the message or its
//! BLAKE2b-512 prehash.
//!
//! Formats (as minisign writes them):
//! - public key: `untrusted comment: ...` then base64 of `"Ed" || key_id[8] || public_key[32]`;
//! - signature: `untrusted comment: ...`, base64 of `alg[2] || key_id[8] || sig[64]` where alg is `"Ed"`
//!   (legacy: the signature is over the whole file) or `"ED"` (over the file's BLAKE2b-512 prehash), then
//!   `trusted comment: TEXT`, then base64 of the global signature over `sig || TEXT`;
//! - secret key: only the unencrypted variant (`minisign -G -W`): base64 of `"Ed" || kdf "\0\0" || "B2" ||
//!   salt[32] || opslimit[8] || memlimit[8] || key_id[8] || seed+public[64] || blake2b-256 checksum[32]`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};

/// Signature algorithm tag of the legacy, whole-message mode.
pub const ALG_LEGACY: [u8; 2] = *b"Ed";
/// Signature algorithm tag of the prehashed (BLAKE2b-512) mode, minisign's default.
pub const ALG_PREHASHED: [u8; 2] = *b"ED";
/// File name suffix of a detached signature.
pub const SIGNATURE_SUFFIX: &str = ".minisig";

/// A signature or key text that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The text is not in the expected format; the message names the line or field.
    #[error("{what}: {reason}")]
    Malformed {
        /// Which document (public key, signature, secret key).
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// No signature was given at all.
    #[error("missing signature: the image carries no detached signature; sign it with `upkeepctl image sign`")]
    Missing,
    /// Signed by a key this node does not trust.
    #[error("signature by unknown key {key_id}: not among the node's trusted keys")]
    UnknownKey {
        /// Key id of the signer, as minisign prints it.
        key_id: String,
    },
    /// The signature does not match the data (or the trusted comment was altered).
    #[error("bad signature by key {key_id}: {reason}")]
    Bad {
        /// Key id of the signer.
        key_id: String,
        /// Which check failed.
        reason: &'static str,
    },
    /// The signature is over a whole file but only a prehash was available (or the reverse).
    #[error("signature algorithm {alg} needs {needs}")]
    WrongMode {
        /// The algorithm tag.
        alg: String,
        /// What it needs.
        needs: &'static str,
    },
}

fn malformed(what: &'static str, reason: impl Into<String>) -> SignatureError {
    SignatureError::Malformed { what, reason: reason.into() }
}

/// Key id as minisign prints it: the 8 bytes read as a little-endian integer, in upper-case hex.
pub fn key_id_string(id: &[u8; 8]) -> String {
    format!("{:016X}", u64::from_le_bytes(*id))
}

/// A public key (what a node trusts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// Key id.
    pub key_id: [u8; 8],
    /// Ed25519 public key.
    pub key: [u8; 32],
}

impl PublicKey {
    /// Parses a `.pub` file (comment line optional) or the bare base64 line.
    pub fn parse(text: &str) -> Result<PublicKey, SignatureError> {
        const WHAT: &str = "public key";
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with("untrusted comment:"))
            .ok_or_else(|| malformed(WHAT, "no key line (expected base64 after the untrusted comment)"))?;
        let raw = B64.decode(line).map_err(|e| malformed(WHAT, format!("key line is not base64: {e}")))?;
        if raw.len() != 42 {
            return Err(malformed(WHAT, format!("key line decodes to {} bytes, expected 42", raw.len())));
        }
        if raw[..2] != ALG_LEGACY {
            return Err(malformed(WHAT, "algorithm is not Ed (Ed25519)"));
        }
        Ok(PublicKey { key_id: take(&raw[2..10]), key: take(&raw[10..42]) })
    }

    /// The `.pub` file text.
    pub fn to_file_text(&self) -> String {
        let mut raw = Vec::with_capacity(42);
        raw.extend_from_slice(&ALG_LEGACY);
        raw.extend_from_slice(&self.key_id);
        raw.extend_from_slice(&self.key);
        format!("untrusted comment: minisign public key {}\n{}\n", self.id(), B64.encode(raw))
    }

    /// Key id as minisign prints it.
    pub fn id(&self) -> String {
        key_id_string(&self.key_id)
    }
}

/// An unencrypted secret key.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey {
    /// Key id.
    pub key_id: [u8; 8],
    /// Ed25519 seed.
    seed: [u8; 32],
    /// Ed25519 public key.
    public: [u8; 32],
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretKey").field("key_id", &key_id_string(&self.key_id)).finish_non_exhaustive()
    }
}

fn take<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[..N]);
    out
}

/// BLAKE2b with a 32-byte output (a different hash from BLAKE2b-512 cut short: the length is a parameter).
fn blake2b_256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = blake2b_simd::Params::new().hash_length(32).to_state();
    for p in parts {
        h.update(p);
    }
    take(h.finalize().as_bytes())
}

impl SecretKey {
    /// A key from 32 random seed bytes and 8 random key-id bytes (the caller draws them).
    pub fn from_seed(seed: [u8; 32], key_id: [u8; 8]) -> SecretKey {
        let kp = Ed25519KeyPair::from_seed_unchecked(&seed).expect("any 32 bytes are an Ed25519 seed");
        SecretKey { key_id, seed, public: take(kp.public_key().as_ref()) }
    }

    /// Its public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey { key_id: self.key_id, key: self.public }
    }

    /// Parses an unencrypted minisign secret key file.
    pub fn parse(text: &str) -> Result<SecretKey, SignatureError> {
        const WHAT: &str = "secret key";
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with("untrusted comment:"))
            .ok_or_else(|| malformed(WHAT, "no key line"))?;
        let raw = B64.decode(line).map_err(|e| malformed(WHAT, format!("key line is not base64: {e}")))?;
        if raw.len() != 158 {
            return Err(malformed(WHAT, format!("key line decodes to {} bytes, expected 158", raw.len())));
        }
        if raw[..2] != ALG_LEGACY || &raw[4..6] != b"B2" {
            return Err(malformed(WHAT, "algorithms are not Ed/B2"));
        }
        if raw[2..4] != [0, 0] {
            return Err(malformed(WHAT, "the key is encrypted; only unencrypted keys (minisign -W) are supported"));
        }
        let k = &raw[54..];
        let key_id: [u8; 8] = take(&k[..8]);
        let seed: [u8; 32] = take(&k[8..40]);
        let public: [u8; 32] = take(&k[40..72]);
        if blake2b_256(&[&ALG_LEGACY, &key_id, &k[8..72]]) != take::<32>(&k[72..104]) {
            return Err(malformed(WHAT, "checksum mismatch (corrupt key file)"));
        }
        let sk = SecretKey::from_seed(seed, key_id);
        if sk.public != public {
            return Err(malformed(WHAT, "public half does not match the seed"));
        }
        Ok(sk)
    }

    /// The unencrypted secret key file text.
    pub fn to_file_text(&self) -> String {
        let mut raw = Vec::with_capacity(158);
        raw.extend_from_slice(&ALG_LEGACY);
        raw.extend_from_slice(&[0, 0]);
        raw.extend_from_slice(b"B2");
        raw.extend_from_slice(&[0u8; 32 + 8 + 8]);
        raw.extend_from_slice(&self.key_id);
        raw.extend_from_slice(&self.seed);
        raw.extend_from_slice(&self.public);
        let mut sk = [0u8; 64];
        sk[..32].copy_from_slice(&self.seed);
        sk[32..].copy_from_slice(&self.public);
        raw.extend_from_slice(&blake2b_256(&[&ALG_LEGACY, &self.key_id, &sk]));
        format!("untrusted comment: minisign unencrypted secret key\n{}\n", B64.encode(raw))
    }

    fn pair(&self) -> Ed25519KeyPair {
        Ed25519KeyPair::from_seed_unchecked(&self.seed).expect("seed was accepted when the key was made")
    }

    /// Signs a file given its BLAKE2b-512 prehash (the `ED` mode), with `trusted_comment` bound to it.
    pub fn sign_prehashed(&self, prehash: &[u8; 64], trusted_comment: &str) -> Signature {
        let kp = self.pair();
        let sig: [u8; 64] = take(kp.sign(prehash).as_ref());
        let global: [u8; 64] = take(kp.sign(&[&sig[..], trusted_comment.as_bytes()].concat()).as_ref());
        Signature { alg: ALG_PREHASHED, key_id: self.key_id, sig, trusted_comment: trusted_comment.to_string(), global }
    }

    /// Signs a whole message in the legacy `Ed` mode.
    pub fn sign_legacy(&self, message: &[u8], trusted_comment: &str) -> Signature {
        let kp = self.pair();
        let sig: [u8; 64] = take(kp.sign(message).as_ref());
        let global: [u8; 64] = take(kp.sign(&[&sig[..], trusted_comment.as_bytes()].concat()).as_ref());
        Signature { alg: ALG_LEGACY, key_id: self.key_id, sig, trusted_comment: trusted_comment.to_string(), global }
    }
}

/// A parsed detached signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// `Ed` or `ED`.
    pub alg: [u8; 2],
    /// Key id of the signer.
    pub key_id: [u8; 8],
    /// Signature over the file (or its prehash).
    pub sig: [u8; 64],
    /// The trusted comment (signed by the global signature).
    pub trusted_comment: String,
    /// Signature over `sig || trusted_comment`.
    pub global: [u8; 64],
}

/// What was signed: the whole message, or its BLAKE2b-512 prehash.
#[derive(Debug, Clone, Copy)]
pub enum Signed<'a> {
    /// The whole message (works for both modes).
    Message(&'a [u8]),
    /// Only the prehash (works for `ED` only).
    Prehash(&'a [u8; 64]),
}

impl Signature {
    /// Parses a `.minisig` text. Empty text is `Missing`.
    pub fn parse(text: &str) -> Result<Signature, SignatureError> {
        const WHAT: &str = "signature";
        if text.trim().is_empty() {
            return Err(SignatureError::Missing);
        }
        let lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
        if lines.len() < 4 {
            return Err(malformed(
                WHAT,
                format!("{} lines, expected 4 (comment, signature, trusted comment, global signature)", lines.len()),
            ));
        }
        if !lines[0].starts_with("untrusted comment:") {
            return Err(malformed(WHAT, "line 1 must start with `untrusted comment:`"));
        }
        let raw = B64.decode(lines[1].trim()).map_err(|e| malformed(WHAT, format!("line 2 is not base64: {e}")))?;
        if raw.len() != 74 {
            return Err(malformed(WHAT, format!("line 2 decodes to {} bytes, expected 74", raw.len())));
        }
        let alg: [u8; 2] = take(&raw[..2]);
        if alg != ALG_LEGACY && alg != ALG_PREHASHED {
            return Err(malformed(WHAT, "line 2: algorithm is neither Ed nor ED"));
        }
        let trusted_comment = lines[2]
            .strip_prefix("trusted comment: ")
            .ok_or_else(|| malformed(WHAT, "line 3 must start with `trusted comment: `"))?
            .to_string();
        let global = B64.decode(lines[3].trim()).map_err(|e| malformed(WHAT, format!("line 4 is not base64: {e}")))?;
        if global.len() != 64 {
            return Err(malformed(WHAT, format!("line 4 decodes to {} bytes, expected 64", global.len())));
        }
        Ok(Signature {
            alg,
            key_id: take(&raw[2..10]),
            sig: take(&raw[10..74]),
            trusted_comment,
            global: take(&global),
        })
    }

    /// The `.minisig` text.
    pub fn to_file_text(&self) -> String {
        let mut raw = Vec::with_capacity(74);
        raw.extend_from_slice(&self.alg);
        raw.extend_from_slice(&self.key_id);
        raw.extend_from_slice(&self.sig);
        format!(
            "untrusted comment: signature from upkeep secret key {}\n{}\ntrusted comment: {}\n{}\n",
            key_id_string(&self.key_id),
            B64.encode(raw),
            self.trusted_comment,
            B64.encode(self.global)
        )
    }

    /// Key id of the signer, as minisign prints it.
    pub fn key_id_string(&self) -> String {
        key_id_string(&self.key_id)
    }

    /// Whether verifying needs the whole message (`Ed`) rather than the prehash.
    pub fn needs_whole_message(&self) -> bool {
        self.alg == ALG_LEGACY
    }

    /// Verifies against the trusted `keys`; returns the key that signed.
    pub fn verify<'k>(&self, keys: &'k [PublicKey], signed: Signed<'_>) -> Result<&'k PublicKey, SignatureError> {
        let key_id = self.key_id_string();
        let key = keys
            .iter()
            .find(|k| k.key_id == self.key_id)
            .ok_or(SignatureError::UnknownKey { key_id: key_id.clone() })?;
        let pk = UnparsedPublicKey::new(&ED25519, &key.key);
        let prehash;
        let msg: &[u8] = match (self.alg == ALG_PREHASHED, signed) {
            (false, Signed::Message(m)) => m,
            (false, Signed::Prehash(_)) => {
                return Err(SignatureError::WrongMode { alg: "Ed".into(), needs: "the whole file, not its prehash" });
            }
            (true, Signed::Message(m)) => {
                prehash = blake2b_512(m);
                &prehash
            }
            (true, Signed::Prehash(h)) => h,
        };
        pk.verify(msg, &self.sig)
            .map_err(|_| SignatureError::Bad { key_id: key_id.clone(), reason: "signature does not match the file" })?;
        pk.verify(&[&self.sig[..], self.trusted_comment.as_bytes()].concat(), &self.global).map_err(|_| {
            SignatureError::Bad { key_id, reason: "global signature does not match the trusted comment" }
        })?;
        Ok(key)
    }
}

/// Streaming BLAKE2b-512 for the `ED` prehash. The compression function is picked at run time: AVX2 where the
/// CPU has it, else portable code (`blake2b_simd`).
#[derive(Clone, Default)]
pub struct Prehasher(blake2b_simd::State);

impl Prehasher {
    /// A fresh hasher.
    pub fn new() -> Prehasher {
        Prehasher::default()
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The prehash.
    pub fn finish(self) -> [u8; 64] {
        take(self.0.finalize().as_bytes())
    }
}

/// BLAKE2b-512 of a whole message.
pub fn blake2b_512(m: &[u8]) -> [u8; 64] {
    let mut h = Prehasher::new();
    h.update(m);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed([n; 32], [n, 1, 2, 3, 4, 5, 6, 7])
    }

    #[test]
    fn round_trips_and_verifies_both_modes() {
        let sk = key(7);
        let parsed_sk = SecretKey::parse(&sk.to_file_text()).expect("secret key parses");
        assert_eq!(parsed_sk, sk);
        let pk = PublicKey::parse(&sk.public_key().to_file_text()).expect("public key parses");
        let data = b"image bytes";
        let sig = Signature::parse(&sk.sign_prehashed(&blake2b_512(data), "file:img").to_file_text()).expect("sig");
        assert_eq!(sig.verify(std::slice::from_ref(&pk), Signed::Message(data)).expect("good"), &pk);
        assert!(sig.verify(std::slice::from_ref(&pk), Signed::Prehash(&blake2b_512(data))).is_ok());
        let legacy = Signature::parse(&sk.sign_legacy(data, "x").to_file_text()).expect("sig");
        assert!(legacy.verify(std::slice::from_ref(&pk), Signed::Message(data)).is_ok());
        assert!(matches!(
            legacy.verify(std::slice::from_ref(&pk), Signed::Prehash(&blake2b_512(data))),
            Err(SignatureError::WrongMode { .. })
        ));
    }

    #[test]
    fn refuses_flipped_byte_unknown_key_missing_truncated_and_altered_comment() {
        let sk = key(9);
        let pk = sk.public_key();
        let data = b"image bytes".to_vec();
        let sig = sk.sign_prehashed(&blake2b_512(&data), "c");
        let mut flipped = data.clone();
        flipped[3] ^= 1;
        let e = sig.verify(std::slice::from_ref(&pk), Signed::Message(&flipped)).expect_err("flipped");
        assert!(matches!(e, SignatureError::Bad { .. }), "{e}");
        let other = key(10).public_key();
        let e = sig.verify(std::slice::from_ref(&other), Signed::Message(&data)).expect_err("unknown");
        assert!(e.to_string().contains("unknown key"), "{e}");
        assert_eq!(Signature::parse("").expect_err("missing"), SignatureError::Missing);
        let text = sig.to_file_text();
        let e = Signature::parse(&text[..text.len() / 2]).expect_err("truncated");
        assert!(matches!(e, SignatureError::Malformed { .. }), "{e}");
        let altered = text.replace("trusted comment: c", "trusted comment: d");
        let e = Signature::parse(&altered).expect("parses").verify(&[pk], Signed::Message(&data)).expect_err("altered");
        assert!(e.to_string().contains("trusted comment"), "{e}");
        assert!(PublicKey::parse("untrusted comment: x\nnot base64!\n").is_err());
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// Known answers, so that a change of BLAKE2b implementation that hashes differently fails here (and
    /// every signature made before it would stop verifying). "abc" is RFC 7693's Appendix A example; the others
    /// were computed with an independent implementation (Python's hashlib).
    #[test]
    fn blake2b_gives_the_known_answers() {
        assert_eq!(
            hex(&blake2b_512(b"abc")),
            "ba80a53f981c4d0d6a2797b69f12f6e94c212f14685ac4b74b12bb6fdbffa2d1\
             7d87c5392aab792dc252d5de4533cc9518d38aa8dbf1925ab92386edd4009923"
        );
        assert_eq!(
            hex(&blake2b_512(b"")),
            "786a02f742015903c6c6fd852552d272912f4740e15847618a86e217f71f5419\
             d25e1031afee585313896444934eb04b903a685b1448b755d56f701afe9be2ce"
        );
        // The key checksum's hash: BLAKE2b with a 32-byte output, not BLAKE2b-512 cut short.
        assert_eq!(
            hex(&blake2b_256(&[b"a", b"", b"bc"])),
            "bddd813c634239723171ef3fee98579b94964e3bb1cb3e427262c8c068d52319"
        );
        // 1 MiB over many blocks, fed whole and in pieces that straddle the 128-byte block edge.
        let big: Vec<u8> = (0..1usize << 20).map(|i| ((i * 7 + 3) % 251) as u8).collect();
        let want = "b0f1e97ec0b56389d63cba37ddb22bcb1c4145e32b4ae0e335e54fcdd09b7aae\
                    9f77c51e6cb4b1289a3df6bfe528ced7ff551cea1cc1cff3d6f58da8152e2ab6";
        assert_eq!(hex(&blake2b_512(&big)), want);
        let mut h = Prehasher::new();
        let mut rest = &big[..];
        for n in [1, 127, 128, 129, 255, 4096, 65_537].iter().cycle() {
            let (head, tail) = rest.split_at((*n).min(rest.len()));
            h.update(head);
            rest = tail;
            if rest.is_empty() {
                break;
            }
        }
        assert_eq!(hex(&h.finish()), want);
    }

    #[test]
    fn reads_a_key_written_by_minisign() {
        // A public key in minisign's own layout (Ed, 8-byte id, 32-byte key), id printed little-endian.
        let pk = PublicKey { key_id: [0x01, 0, 0, 0, 0, 0, 0, 0xAB], key: [5; 32] };
        let text = pk.to_file_text();
        assert!(text.starts_with("untrusted comment: minisign public key AB00000000000001\n"), "{text}");
        assert_eq!(PublicKey::parse(&text).expect("parse"), pk);
    }
}
