//! The agent's image staging area (`<state_dir>/images/`) and image trust. A download is appended to
//! `<sha256>.part` while both digests are computed (SHA-256 for the content address, BLAKE2b-512 for the
//! signature prehash); after a broken stream it resumes from the file's length, re-hashing the partial file
//! when the agent restarted in between. A staged part is only a guess at a prefix of the image (it may be a
//! leftover of a crash, of another agent version, or garbage): the engine restarts it from 0 (`restart`) when
//! it cannot be one, and `clean_staging` removes every file of an image no longer in flight. Nothing here
//! touches a slot: an image reaches a slot only after `verify` accepted it.

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
            len = hash_into(&part, &mut f, &mut sha, &mut pre)?;
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

    /// SHA-256 of the bytes staged so far, lower-case hex (the download goes on).
    pub fn sha256_so_far(&self) -> String {
        super::copy::hex(self.sha.clone().finish().as_ref())
    }

    /// Throws away what is staged and starts again from 0 (same file, truncated and fsynced).
    pub fn restart(&mut self) -> Result<(), OsError> {
        self.file.set_len(0).and_then(|()| self.file.sync_all()).map_err(OsError::io(&self.part))?;
        self.sha = Context::new(&SHA256);
        self.pre = Prehasher::new();
        self.len = 0;
        Ok(())
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
            sha256: super::copy::hex(self.sha.finish().as_ref()),
            prehash: self.pre.finish(),
            size: self.len,
        })
    }
}

/// Feeds everything `r` yields to both digests; returns the byte count.
fn hash_into(path: &Path, r: &mut impl Read, sha: &mut Context, pre: &mut Prehasher) -> Result<u64, OsError> {
    let mut buf = vec![0u8; 1024 * 1024];
    let mut len = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(len),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(OsError::io(path)(e)),
        };
        sha.update(&buf[..n]);
        pre.update(&buf[..n]);
        len += n as u64;
    }
}

/// Reads an image from `r` once: both digests and its size, as a `Staged` at `path`.
pub fn hash_image(path: &Path, r: &mut impl Read) -> Result<Staged, OsError> {
    let (mut sha, mut pre) = (Context::new(&SHA256), Prehasher::new());
    let size = hash_into(path, r, &mut sha, &mut pre)?;
    Ok(Staged {
        path: path.to_path_buf(),
        sha256: super::copy::hex(sha.finish().as_ref()),
        prehash: pre.finish(),
        size,
    })
}

/// Removes the staged download of `sha256`, if any.
pub fn discard(state_dir: &Path, sha256: &str) {
    let _ = std::fs::remove_file(part_path(state_dir, sha256));
}

/// Removes everything in the staging directory except the staged download of `keep` (the image of the
/// operation in flight, if any): parts of other images, of failed or finished operations, and anything else
/// left there. Returns what it removed; the first file it could not remove is the error.
pub fn clean_staging(state_dir: &Path, keep: Option<&str>) -> Result<Vec<PathBuf>, OsError> {
    let dir = state_dir.join(STAGING_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(OsError::Io { path: dir, source: e }),
    };
    let kept = keep.map(|sha| part_path(state_dir, sha));
    let mut removed = Vec::new();
    for e in entries {
        let p = e.map_err(OsError::io(&dir))?.path();
        if kept.as_ref() == Some(&p) {
            continue;
        }
        let is_dir = std::fs::symlink_metadata(&p).map(|m| m.is_dir()).unwrap_or(false);
        let r = if is_dir { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        match r {
            Ok(()) => removed.push(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(OsError::Io { path: p, source: e }),
        }
    }
    Ok(removed)
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

/// Whether `sig` names one of `keys` (checked before any byte is fetched or written); Err says whose it is and
/// whom the node trusts.
pub fn signed_by_a_trusted_key(sig: &Signature, keys: &[PublicKey]) -> Result<(), String> {
    if keys.iter().any(|k| k.key_id == sig.key_id) {
        return Ok(());
    }
    let trusted = if keys.is_empty() {
        "no keys".to_string()
    } else {
        keys.iter().map(|k| k.id()).collect::<Vec<_>>().join(", ")
    };
    Err(format!("signature by unknown key {} (the node trusts {trusted})", sig.key_id_string()))
}

/// The check a signature-checking slot write runs on the streamed bytes' prehash and size: `signature` (a
/// prehashed minisign signature) by one of `keys`, and `size` bytes when `size` is not 0. A legacy signature
/// covers the whole message, which a streaming write does not hold: it is refused before anything is written.
pub fn prehash_check(
    signature: &str,
    size: u64,
    keys: Vec<PublicKey>,
) -> Result<impl Fn(&[u8; 64], u64) -> Result<(), String> + Sync, OsError> {
    let sig =
        Signature::parse(signature).map_err(|e| OsError::Executor(format!("image refused, nothing written: {e}")))?;
    if sig.needs_whole_message() {
        return Err(OsError::Executor(
            "image refused, nothing written: a legacy (whole-message) signature cannot be checked while the image \
             streams into the slot; sign it prehashed (minisign's default since 0.9)"
                .into(),
        ));
    }
    signed_by_a_trusted_key(&sig, &keys)
        .map_err(|why| OsError::Executor(format!("image refused, nothing written: {why}")))?;
    Ok(move |prehash: &[u8; 64], got: u64| {
        if size != 0 && got != size {
            return Err(TrustError::Truncated { got, expected: size }.to_string());
        }
        sig.verify(&keys, Signed::Prehash(prehash)).map(drop).map_err(|e| format!("image refused: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use upkeep_core::signature::{SecretKey, blake2b_512};

    #[test]
    fn resumes_after_a_break_and_verifies() {
        let d = tempfile::tempdir().expect("tempdir");
        let data = b"0123456789abcdef".repeat(100);
        let sha = super::super::copy::hex(ring::digest::digest(&SHA256, &data).as_ref());
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

    #[test]
    fn a_restarted_part_holds_only_what_follows_and_clean_staging_keeps_one_image() {
        let d = tempfile::tempdir().expect("tempdir");
        let data = b"the image".repeat(50);
        let sha = super::super::copy::hex(ring::digest::digest(&SHA256, &data).as_ref());
        std::fs::create_dir_all(d.path().join(STAGING_DIR)).expect("mkdir");
        std::fs::write(staged_path(d.path(), &sha), vec![0xa5; 1000]).expect("garbage longer than the image");
        let mut dl = Download::open(d.path(), &sha).expect("open");
        assert_eq!(dl.len(), 1000);
        dl.restart().expect("restart");
        assert!(dl.is_empty());
        dl.append(0, &data).expect("append");
        assert_eq!(dl.sha256_so_far(), sha);
        let staged = dl.finish().expect("finish");
        assert_eq!((staged.size, staged.sha256.as_str()), (data.len() as u64, sha.as_str()));
        assert_eq!(std::fs::read(&staged.path).expect("read"), data, "nothing of the garbage is left");

        let other = d.path().join(STAGING_DIR).join(format!("{}.part", "1".repeat(64)));
        std::fs::write(&other, b"x").expect("w");
        std::fs::create_dir_all(d.path().join(STAGING_DIR).join("junk")).expect("mkdir");
        let removed = clean_staging(d.path(), Some(&sha)).expect("clean");
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(staged.path.exists() && !other.exists());
        assert_eq!(clean_staging(d.path(), None).expect("clean"), vec![staged.path.clone()]);
        assert!(clean_staging(&d.path().join("none"), None).expect("no staging dir").is_empty());
    }
}
