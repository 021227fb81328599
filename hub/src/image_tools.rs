//! Image tooling for operators, the demo and the tests: make a signing key pair, sign an image file
//! (minisign-compatible detached signature, `ED` prehashed mode), and build a tiny test image (a tar of a root
//! tree with `etc/upkeep/node-image`). The format code is pure and lives in `upkeep_core::signature`; this
//! module adds the files and the random numbers. `upkeepctl image keygen|sign|build` call these.

use ring::rand::SecureRandom;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use upkeep_core::signature::{Prehasher, SIGNATURE_SUFFIX, SecretKey};

/// File names written by `keygen`.
pub const PUBLIC_KEY_FILE: &str = "upkeep-image.pub";
/// Secret key file name (mode 0600).
pub const SECRET_KEY_FILE: &str = "upkeep-image.key";

/// Image tool failures, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum ImageToolError {
    /// File system failure.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A key or an argument is unusable.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and the fix.
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImageToolError + '_ {
    move |source| ImageToolError::Io { path: path.to_path_buf(), source }
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ImageToolError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => ImageToolError::Invalid {
                path: path.to_path_buf(),
                reason: "already exists; refusing to overwrite a key (move it aside first)".into(),
            },
            _ => ImageToolError::Io { path: path.to_path_buf(), source: e },
        })?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// Generates a key pair in `dir`: returns (public key path, secret key path). The secret key is unencrypted
/// (minisign `-W` format), mode 0600; nodes trust the public key by copying it into
/// `/etc/upkeep/trusted-keys/`.
pub fn keygen(dir: &Path) -> Result<(PathBuf, PathBuf), ImageToolError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let rng = ring::rand::SystemRandom::new();
    let mut seed = [0u8; 32];
    let mut id = [0u8; 8];
    rng.fill(&mut seed)
        .and_then(|_| rng.fill(&mut id))
        .map_err(|_| ImageToolError::Invalid { path: dir.to_path_buf(), reason: "no system randomness".into() })?;
    let sk = SecretKey::from_seed(seed, id);
    let public = dir.join(PUBLIC_KEY_FILE);
    let secret = dir.join(SECRET_KEY_FILE);
    write_new(&secret, sk.to_file_text().as_bytes(), 0o600)?;
    write_new(&public, sk.public_key().to_file_text().as_bytes(), 0o644)?;
    Ok((public, secret))
}

/// Signs `file` with the secret key at `secret_key`; writes and returns `<file>.minisig`.
pub fn sign(secret_key: &Path, file: &Path) -> Result<PathBuf, ImageToolError> {
    let text = std::fs::read_to_string(secret_key).map_err(io(secret_key))?;
    let sk = SecretKey::parse(&text)
        .map_err(|e| ImageToolError::Invalid { path: secret_key.to_path_buf(), reason: e.to_string() })?;
    let mut f = std::fs::File::open(file).map_err(io(file))?;
    let mut h = Prehasher::new();
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(io(file))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let comment = format!("timestamp:{}\tfile:{name}\thashed", chrono::Utc::now().timestamp());
    let sig = sk.sign_prehashed(&h.finish(), &comment);
    let mut out = file.as_os_str().to_owned();
    out.push(SIGNATURE_SUFFIX);
    let out = PathBuf::from(out);
    std::fs::write(&out, sig.to_file_text()).map_err(io(&out))?;
    Ok(out)
}

/// Writes a test image to `out`: a tar of a root tree with `etc/upkeep/node-image` (FAMILY, VERSION),
/// `etc/os-release`, and `extra_files` (relative path, content). Deterministic: the same inputs give the
/// same bytes. Returns (sha256, size).
pub fn build_test_image(
    out: &Path,
    family: &str,
    version: &str,
    extra_files: &[(&str, &[u8])],
) -> Result<(String, u64), ImageToolError> {
    let meta = format!("# built by upkeep image_tools\nFAMILY={family}\nVERSION={version}\n");
    let os_release = "ID=debian\nVERSION_ID=\"12\"\nPRETTY_NAME=\"upkeep test image\"\n";
    let f = std::fs::File::create(out).map_err(io(out))?;
    let mut b = tar::Builder::new(std::io::BufWriter::new(f));
    let mut files: Vec<(&str, &[u8])> =
        vec![("etc/upkeep/node-image", meta.as_bytes()), ("etc/os-release", os_release.as_bytes())];
    files.extend_from_slice(extra_files);
    for dir in ["etc/", "etc/upkeep/"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, dir, std::io::empty()).map_err(io(out))?;
    }
    for (path, data) in files {
        if path.starts_with('/') || path.split('/').any(|c| c == "..") {
            return Err(ImageToolError::Invalid {
                path: PathBuf::from(path),
                reason: "extra file paths must be relative, without `..`".into(),
            });
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, path, data).map_err(io(out))?;
    }
    let w = b.into_inner().map_err(io(out))?;
    let f = w.into_inner().map_err(|e| ImageToolError::Io { path: out.to_path_buf(), source: e.into_error() })?;
    f.sync_all().map_err(io(out))?;
    let bytes = std::fs::read(out).map_err(io(out))?;
    let sha = crate::artifacts::hex(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref());
    Ok((sha, bytes.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use upkeep_core::signature::{PublicKey, Signature, Signed};

    #[test]
    fn keygen_sign_and_build_make_a_verifiable_image() {
        let d = tempfile::tempdir().expect("tempdir");
        let (public, secret) = keygen(d.path()).expect("keygen");
        assert!(keygen(d.path()).expect_err("no overwrite").to_string().contains("already exists"));
        let img = d.path().join("img.tar");
        let (sha, size) = build_test_image(&img, "Test-1", "202401.02.3", &[("etc/motd", b"hi")]).expect("build");
        assert_eq!(size, std::fs::metadata(&img).expect("meta").len());
        let (sha2, _) = build_test_image(&d.path().join("again.tar"), "Test-1", "202401.02.3", &[("etc/motd", b"hi")])
            .expect("build");
        assert_eq!(sha, sha2, "deterministic");
        let sig_path = sign(&secret, &img).expect("sign");
        assert_eq!(sig_path, d.path().join("img.tar.minisig"));
        let pk = PublicKey::parse(&std::fs::read_to_string(&public).expect("pub")).expect("pub parses");
        let sig = Signature::parse(&std::fs::read_to_string(&sig_path).expect("sig")).expect("sig parses");
        let bytes = std::fs::read(&img).expect("img");
        assert!(sig.verify(std::slice::from_ref(&pk), Signed::Message(&bytes)).is_ok());
        let mut ar = tar::Archive::new(std::io::Cursor::new(bytes));
        let names: Vec<String> = ar
            .entries()
            .expect("entries")
            .map(|e| e.expect("entry").path().expect("path").display().to_string())
            .collect();
        assert!(names.contains(&"etc/upkeep/node-image".to_string()), "{names:?}");
    }
}
