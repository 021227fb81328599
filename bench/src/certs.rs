//! The bench's fleet PKI and its node certificates, cached on disk so that 50k certificates are minted once.
//!
//! `<cache>/pki` is made by the same code as `upkeepctl pki init` (hub certificate for 127.0.0.1 and
//! localhost); node certificates (ECDSA P-256 from `Ca::issue_client`) are appended to `<cache>/nodes.jsonl`,
//! one `{name, cert, key}` per line, node `i` named `bn-<i, 5 digits>`.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use upkeep_core::ids::{Principal, Role};
use upkeep_hub::pki;

/// A node's certificate and key in PEM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeCert {
    /// Node name (from the certificate).
    pub name: String,
    /// Certificate PEM.
    pub cert: String,
    /// PKCS#8 key PEM.
    pub key: String,
}

/// The cache directory.
pub struct CertCache {
    /// Root of the cache.
    pub dir: PathBuf,
}

/// The name of simulated node `i`.
pub fn node_name(i: usize) -> String {
    format!("bn-{i:05}")
}

impl CertCache {
    /// Opens the cache, creating the fleet PKI on first use.
    pub fn open(dir: &Path) -> anyhow::Result<CertCache> {
        let pki_dir = dir.join("pki");
        if !pki_dir.join(pki::files::CA_CERT).exists() {
            pki::init(&pki_dir, &["127.0.0.1".into(), "localhost".into()]).context("creating the bench PKI")?;
        }
        Ok(CertCache { dir: dir.to_path_buf() })
    }

    /// The PKI directory (ca.pem, hub.pem, operator.pem ...).
    pub fn pki_dir(&self) -> PathBuf {
        self.dir.join("pki")
    }

    /// A file of the PKI directory, read.
    pub fn read(&self, file: &str) -> anyhow::Result<String> {
        let p = self.pki_dir().join(file);
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    }

    /// The first `n` node certificates, minting (on all cores) and caching the ones missing.
    pub fn nodes(&self, n: usize) -> anyhow::Result<Vec<NodeCert>> {
        let path = self.dir.join("nodes.jsonl");
        let mut have: Vec<NodeCert> = Vec::new();
        if path.exists() {
            let f = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            for line in std::io::BufReader::new(f).lines() {
                let line = line.with_context(|| format!("reading {}", path.display()))?;
                if have.len() >= n {
                    break;
                }
                match serde_json::from_str::<NodeCert>(&line) {
                    // A torn last line (interrupted minting) is minted again.
                    Ok(c) if c.name == node_name(have.len()) => have.push(c),
                    _ => break,
                }
            }
        }
        if have.len() >= n {
            return Ok(have);
        }
        let start = have.len();
        let started = std::time::Instant::now();
        let threads = std::thread::available_parallelism().map(|p| p.get()).unwrap_or(1);
        let pki_dir = self.pki_dir();
        let minted: Vec<anyhow::Result<Vec<NodeCert>>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let pki_dir = pki_dir.clone();
                    s.spawn(move || -> anyhow::Result<Vec<NodeCert>> {
                        let ca = pki::Ca::load(&pki_dir)?;
                        let mut out = Vec::new();
                        for i in (start + t..n).step_by(threads) {
                            let name = node_name(i);
                            let pem = ca.issue_client(&Principal { role: Role::Node, name: name.clone() })?;
                            out.push(NodeCert { name, cert: pem.cert, key: pem.key });
                        }
                        Ok(out)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("minting thread panicked"))))
                .collect()
        });
        let mut fresh: Vec<NodeCert> = Vec::new();
        for m in minted {
            fresh.extend(m?);
        }
        fresh.sort_by(|a, b| a.name.cmp(&b.name));
        // Rewrite the file with exactly the good prefix plus the new ones (drops a torn tail).
        let tmp = self.dir.join("nodes.jsonl.tmp");
        {
            let mut w = std::io::BufWriter::new(
                std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
            );
            for c in have.iter().chain(fresh.iter()) {
                serde_json::to_writer(&mut w, c).context("encoding a certificate")?;
                w.write_all(b"\n").context("writing certificates")?;
            }
            w.flush().context("writing certificates")?;
        }
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
        eprintln!("minted {} node certificates in {:.1} s", fresh.len(), started.elapsed().as_secs_f64());
        have.extend(fresh);
        Ok(have)
    }
}
