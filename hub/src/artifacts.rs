//! Content-addressed artifact storage: `<artifacts_dir>/sha256/<hex>`, `artifacts_dir` being `[store]
//! artifacts_dir` (default `<state_dir>/artifacts`).
//!
//! An artifact is written to a temporary file while it is hashed, fsynced, then renamed to its digest, so a
//! reader never sees a partial artifact and the same bytes are stored once. The hub only stores and serves
//! bytes; nodes verify digest and signature against their own keys.
//!
//! Several hubs may share the directory (hub replicas on one database, on a shared file system): a temporary
//! name is random, so two writers never write the same temporary file, and two hubs storing the same bytes
//! rename identical files onto the same name, which is harmless.

use ring::digest::{Context, SHA256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Artifact store failures.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// File system failure.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The bytes do not hash to what the publisher declared.
    #[error("sha256: declared {declared} but the uploaded bytes hash to {actual}; check the file and its digest")]
    DigestMismatch {
        /// What the publisher said.
        declared: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// Not a lower-case hex SHA-256.
    #[error("sha256: {0:?} is not 64 lower-case hex characters")]
    BadDigest(String),
    /// No such artifact.
    #[error("no artifact with sha256 {0} on this hub; publish it with `upkeepctl image publish --file`")]
    Missing(String),
}

/// Checks a digest string.
pub fn check_digest(d: &str) -> Result<(), ArtifactError> {
    if d.len() == 64 && d.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(ArtifactError::BadDigest(d.to_string()))
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The store.
#[derive(Debug, Clone)]
pub struct Artifacts {
    dir: PathBuf,
}

/// An artifact being received: hashed as it is written.
pub struct Incoming {
    tmp: PathBuf,
    file: std::fs::File,
    hasher: Context,
    size: u64,
}

impl Artifacts {
    /// Under `state_dir` (the default `artifacts_dir`).
    pub fn new(state_dir: &Path) -> Artifacts {
        Artifacts::at(&state_dir.join("artifacts"))
    }

    /// Under `artifacts_dir` (`[store] artifacts_dir`): files at `<artifacts_dir>/sha256/<hex>`.
    pub fn at(artifacts_dir: &Path) -> Artifacts {
        Artifacts { dir: artifacts_dir.join("sha256") }
    }

    /// The directory holding the files (`<artifacts_dir>/sha256`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where an artifact lives.
    pub fn path(&self, sha256: &str) -> Result<PathBuf, ArtifactError> {
        check_digest(sha256)?;
        Ok(self.dir.join(sha256))
    }

    /// Starts receiving an artifact.
    pub fn begin(&self) -> Result<Incoming, ArtifactError> {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| ArtifactError::Io { path: p, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let tmp = self.dir.join(format!(".incoming-{}-{:016x}", std::process::id(), random_suffix()));
        let file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        Ok(Incoming { tmp, file, hasher: Context::new(&SHA256), size: 0 })
    }

    /// Stores a whole reader (used by tests and local publishing).
    pub fn put(&self, mut r: impl Read, declared: Option<&str>) -> Result<(String, u64), ArtifactError> {
        let mut inc = self.begin()?;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = r.read(&mut buf).map_err(|source| ArtifactError::Io { path: inc.tmp.clone(), source })?;
            if n == 0 {
                break;
            }
            inc.write(&buf[..n])?;
        }
        inc.finish(self, declared)
    }

    /// Size of a stored artifact.
    pub fn size(&self, sha256: &str) -> Result<u64, ArtifactError> {
        let p = self.path(sha256)?;
        match std::fs::metadata(&p) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ArtifactError::Missing(sha256.to_string())),
            Err(source) => Err(ArtifactError::Io { path: p, source }),
        }
    }
}

/// A temporary name's random part: unique across the hubs sharing the directory (process ids repeat across
/// machines). Falls back to a process-local counter mixed with the clock if the system's generator fails.
fn random_suffix() -> u64 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_ok() {
        return u64::from_le_bytes(bytes);
    }
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64);
    nanos.unwrap_or_default() ^ N.fetch_add(1, Ordering::Relaxed)
}

impl Incoming {
    /// Appends bytes.
    pub fn write(&mut self, data: &[u8]) -> Result<(), ArtifactError> {
        self.file.write_all(data).map_err(|source| ArtifactError::Io { path: self.tmp.clone(), source })?;
        self.hasher.update(data);
        self.size += data.len() as u64;
        Ok(())
    }

    /// Verifies the declared digest (if any), fsyncs and moves the artifact into place. Returns (sha256, size).
    pub fn finish(self, store: &Artifacts, declared: Option<&str>) -> Result<(String, u64), ArtifactError> {
        let actual = hex(self.hasher.clone().finish().as_ref());
        if let Some(d) = declared
            && d != actual
        {
            let _ = std::fs::remove_file(&self.tmp);
            return Err(ArtifactError::DigestMismatch { declared: d.to_string(), actual });
        }
        self.file.sync_all().map_err(|source| ArtifactError::Io { path: self.tmp.clone(), source })?;
        let dest = store.dir.join(&actual);
        std::fs::rename(&self.tmp, &dest).map_err(|source| ArtifactError::Io { path: dest.clone(), source })?;
        std::fs::File::open(&store.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| ArtifactError::Io { path: store.dir.clone(), source })?;
        Ok((actual, self.size))
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        // After a successful finish the temporary name no longer exists; otherwise remove the partial file.
        let _ = std::fs::remove_file(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_by_digest_and_refuses_a_wrong_declared_digest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Artifacts::new(dir.path());
        let (sha, size) = a.put(&b"hello image"[..], None).expect("put");
        assert_eq!(size, 11);
        assert_eq!(sha, hex(ring::digest::digest(&SHA256, b"hello image").as_ref()));
        assert_eq!(std::fs::read(a.path(&sha).expect("path")).expect("read"), b"hello image");
        let wrong = "0".repeat(64);
        let err = a.put(&b"other"[..], Some(&wrong)).expect_err("mismatch");
        assert!(err.to_string().starts_with("sha256: declared"), "{err}");
        let leftovers = std::fs::read_dir(dir.path().join("artifacts/sha256")).expect("ls").count();
        assert_eq!(leftovers, 1, "a refused upload leaves nothing behind");
        assert!(matches!(a.size(&"a".repeat(64)), Err(ArtifactError::Missing(_))));
        assert!(matches!(a.path("../etc/passwd"), Err(ArtifactError::BadDigest(_))));
    }
}
