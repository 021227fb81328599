//! The agent's image staging area (`<state_dir>/images/`) and image trust. A download is appended to
//! `<sha256>.part` while both digests are computed (SHA-256 for the content address, BLAKE2b-512 for the
//! signature prehash); after a broken stream it resumes from the file's length, re-hashing the partial file
//! when the agent restarted in between. Nothing here touches a slot: an image reaches a slot only after
//! `verify` accepted it.

use super::OsError;
use ring::digest::{Context, SHA256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use upkeep_core::signature::{Prehasher, PublicKey, Signature, SignatureError, Signed};

/// Staging directory inside the state directory.
pub const STAGING_DIR: &str = "images";

/// A download in progress.
pub struct Download {
    part: PathBuf,
    file: std::fs::File,
    sha: Context,
    pre: Prehasher,
    len: u64,
}

/// A complete, staged download.
#[derive(Debug, Clone)]
pub struct Staged {
    /// The staged file.
    pub path: PathBuf,
    /// Its SHA-256, lower-case hex.
    pub sha256: String,
    /// Its BLAKE2b-512.
    pub prehash: [u8; 64],
    /// Its size.
    pub size: u64,
}

/// Where the staged image of `sha256` lives.
pub fn staged_path(state_dir: &Path, sha256: &str) -> PathBuf {
    part_path(state_dir, sha256)
}

fn part_path(state_dir: &Path, sha256: &str) -> PathBuf {
    state_dir.join(STAGING_DIR).join(format!("{sha256}.part"))
}

impl Download {
    /// Opens (or resumes) the download of `sha256`, re-hashing whatever is already staged.
    pub fn open(state_dir: &Path, sha256: &str) -> Result<Download, OsError> {
        let dir = state_dir.join(STAGING_DIR);
        std::fs::create_dir_all(&dir).map_err(OsError::io(&dir))?;
        let part = part_path(state_dir, sha256);
        let mut sha = Context::new(&SHA256);
        let mut pre = Prehasher::new();
        let mut len = 0u64;
        if let Ok(mut f) = std::fs::File::open(&part) {
            let mut buf = vec![0u8; 1024 * 1024];
            loop {
                let n = f.read(&mut buf).map_err(OsError::io(&part))?;
                if n == 0 {
                    break;
                }
                sha.update(&buf[..n]);
                pre.update(&buf[..n]);
                len += n as u64;
            }
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&part).map_err(OsError::io(&part))?;
        Ok(Download { part, file, sha, pre, len })
    }

    /// Bytes staged so far (the offset to resume from).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing is staged yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends a chunk that must start at the current length.
    pub fn append(&mut self, offset: u64, data: &[u8]) -> Result<(), OsError> {
        if offset != self.len {
            return Err(OsError::Malformed {
                path: self.part.clone(),
                reason: format!("chunk at offset {offset} but {} bytes are staged", self.len),
            });
        }
        self.file.write_all(data).map_err(OsError::io(&self.part))?;
        self.sha.update(data);
        self.pre.update(data);
        self.len += data.len() as u64;
        Ok(())
    }

    /// fsyncs and returns the staged file with its digests.
    pub fn finish(self) -> Result<Staged, OsError> {
        self.file.sync_all().map_err(OsError::io(&self.part))?;
        Ok(Staged {
            path: self.part,
            sha256: super::slots::hex(self.sha.finish().as_ref()),
            prehash: self.pre.finish(),
            size: self.len,
        })
    }
}

/// Removes the staged download of `sha256`, if any.
pub fn discard(state_dir: &Path, sha256: &str) {
    let _ = std::fs::remove_file(part_path(state_dir, sha256));
}

/// Parses the node's trusted keys; a malformed key file is an error naming it.
pub fn parse_trusted_keys(files: &[(PathBuf, String)]) -> Result<Vec<PublicKey>, String> {
    files.iter().map(|(p, text)| PublicKey::parse(text).map_err(|e| format!("{}: {e}", p.display()))).collect()
}

/// Why an image is not trusted.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The bytes do not hash to the digest in the command.
    #[error("digest mismatch: the downloaded image hashes to {actual}, the command says {expected}")]
    Digest {
        /// From the command.
        expected: String,
        /// Of the bytes.
        actual: String,
    },
    /// Fewer (or more) bytes than announced.
    #[error("truncated download: got {got} of {expected} bytes")]
    Truncated {
        /// Bytes received.
        got: u64,
        /// Bytes announced.
        expected: u64,
    },
    /// The signature does not vouch for the image.
    #[error("{0}")]
    Signature(#[from] SignatureError),
    /// Reading the staged file.
    #[error("{0}")]
    Os(#[from] OsError),
}

/// Checks a staged image against the command's digest and size and its signature against `keys`.
/// Returns the signer's key id.
pub fn verify(
    staged: &Staged,
    expected_sha256: &str,
    expected_size: u64,
    signature: &str,
    keys: &[PublicKey],
) -> Result<String, TrustError> {
    if expected_size != 0 && staged.size != expected_size {
        return Err(TrustError::Truncated { got: staged.size, expected: expected_size });
    }
    if staged.sha256 != expected_sha256 {
        return Err(TrustError::Digest { expected: expected_sha256.into(), actual: staged.sha256.clone() });
    }
    let sig = Signature::parse(signature)?;
    let key = if sig.needs_whole_message() {
        let bytes = std::fs::read(&staged.path).map_err(OsError::io(&staged.path))?;
        sig.verify(keys, Signed::Message(&bytes))?
    } else {
        sig.verify(keys, Signed::Prehash(&staged.prehash))?
    };
    Ok(key.id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use upkeep_core::signature::{SecretKey, blake2b_512};

    #[test]
    fn resumes_after_a_break_and_verifies() {
        let d = tempfile::tempdir().expect("tempdir");
        let data = b"0123456789abcdef".repeat(100);
        let sha = super::super::slots::hex(ring::digest::digest(&SHA256, &data).as_ref());
        let mut dl = Download::open(d.path(), &sha).expect("open");
        dl.append(0, &data[..700]).expect("append");
        assert!(dl.append(5, b"x").is_err(), "a chunk at the wrong offset is refused");
        drop(dl); // the stream broke and the agent restarted
        let mut dl = Download::open(d.path(), &sha).expect("reopen");
        assert_eq!(dl.len(), 700);
        dl.append(700, &data[700..]).expect("append");
        let staged = dl.finish().expect("finish");
        let sk = SecretKey::from_seed([3; 32], [1; 8]);
        let sig = sk.sign_prehashed(&blake2b_512(&data), "t").to_file_text();
        let keys = vec![sk.public_key()];
        assert!(verify(&staged, &sha, data.len() as u64, &sig, &keys).is_ok());
        assert!(matches!(verify(&staged, &sha, 5000, &sig, &keys), Err(TrustError::Truncated { .. })));
        assert!(matches!(verify(&staged, &"0".repeat(64), 0, &sig, &keys), Err(TrustError::Digest { .. })));
        let e = verify(&staged, &sha, 0, "", &keys).expect_err("missing");
        assert!(e.to_string().contains("missing signature"), "{e}");
        let legacy = sk.sign_legacy(&data, "t").to_file_text();
        assert!(verify(&staged, &sha, 0, &legacy, &keys).is_ok(), "legacy Ed signatures verify too");
    }
}
