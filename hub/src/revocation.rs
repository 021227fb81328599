//! Revoked certificates: the serials the hub refuses, kept in the store and in memory.
//!
//! The door's certificate check ([`crate::door::server_config`]) consults [`Revocations::revoked`] on every TLS
//! handshake, an agent session re-checks its certificate when it starts, and every open connection watches its
//! own certificate (`door::Conn`): a revocation ends it before the next thing its peer sends is served. `upkeepctl pki revoke SERIAL` revokes one serial; `upkeepctl node forget`
//! revokes every certificate the hub has seen the node use, which is why each node certificate's serial is noted
//! (once per node and serial) when a session starts. The list is read from the store at start, so it survives
//! restarts.

use crate::store::{RevokedCert, Store, StoreError};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use x509_parser::prelude::{FromDer, X509Certificate};

/// The certificates this hub refuses, and the serials each node has been seen with.
pub struct Revocations {
    /// None: a hub configuration being checked, with nothing stored (`upkeep-hub check-config`).
    store: Option<Arc<dyn Store>>,
    revoked: RwLock<HashMap<String, RevokedCert>>,
    /// Hashes of the (node, serial) pairs already noted in the store, so a session start writes nothing for a
    /// pair the store has (16 bytes a node in memory, not the names; the store answers the lookups).
    noted: Mutex<HashSet<u64>>,
    /// Bumped by every revocation: an open connection compares it with the value it last saw before it reads, and
    /// looks its own serial up only when it moved.
    generation: AtomicU64,
}

fn pair_key(node: &str, serial: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (node, serial).hash(&mut h);
    h.finish()
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocations").field("revoked", &self.read().len()).finish_non_exhaustive()
    }
}

/// A serial as the hub keeps it: lowercase hex, no separators, no leading zeros. Accepts what `openssl x509
/// -serial` prints (`serial=0A1B...`) and colon-separated forms.
pub fn normalise_serial(input: &str) -> Result<String, String> {
    let s = input.trim();
    let s = s.strip_prefix("serial=").unwrap_or(s);
    let hex: String = s.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "serial: {input:?} is not a certificate serial; give it in hex as `openssl x509 -serial -noout -in CERT` \
             prints it (e.g. 3F2A...)"
        ));
    }
    if hex.len() > 42 {
        return Err(format!("serial: {input:?} is longer than a certificate serial (at most 20 bytes, 40 hex digits)"));
    }
    let trimmed = hex.trim_start_matches('0');
    Ok(if trimmed.is_empty() { "0".to_string() } else { trimmed.to_string() })
}

/// The serial of a DER certificate, normalised.
pub fn serial_of_der(der: &[u8]) -> Result<String, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("bad certificate: {e}"))?;
    let hex: String = cert.tbs_certificate.raw_serial().iter().map(|b| format!("{b:02x}")).collect();
    normalise_serial(&hex)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Revocations {
    /// Loads the revoked serials and the nodes' serials from `store`.
    pub fn load(store: Arc<dyn Store>) -> Result<Revocations, StoreError> {
        let revoked = store.list_revoked_certs()?.into_iter().map(|r| (r.serial.clone(), r)).collect();
        let noted = store.node_certs()?.iter().map(|(node, serial)| pair_key(node, serial)).collect();
        Ok(Revocations {
            store: Some(store),
            revoked: RwLock::new(revoked),
            noted: Mutex::new(noted),
            generation: AtomicU64::new(0),
        })
    }

    /// Nothing revoked and nothing stored: for checking a configuration without opening the hub's state.
    pub fn none() -> Revocations {
        Revocations {
            store: None,
            revoked: RwLock::new(HashMap::new()),
            noted: Mutex::new(HashSet::new()),
            generation: AtomicU64::new(0),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, RevokedCert>> {
        self.revoked.read().unwrap_or_else(|e| e.into_inner())
    }

    fn noted(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        self.noted.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves with every revocation (see `door::Conn`).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The revocation of `serial` (normalised), if it is revoked.
    pub fn revoked(&self, serial: &str) -> Option<RevokedCert> {
        self.read().get(serial).cloned()
    }

    /// The revocation of the certificate `der`, if it is revoked (an unreadable certificate is not: the chain
    /// check refuses it anyway).
    pub fn revoked_der(&self, der: &[u8]) -> Option<RevokedCert> {
        if self.read().is_empty() {
            return None;
        }
        serial_of_der(der).ok().and_then(|s| self.revoked(&s))
    }

    /// Every revocation, oldest first.
    pub fn list(&self) -> Vec<RevokedCert> {
        let mut all: Vec<RevokedCert> = self.read().values().cloned().collect();
        all.sort_by(|a, b| (a.revoked_ms, &a.serial).cmp(&(b.revoked_ms, &b.serial)));
        all
    }

    /// Revokes `serial` (stored first, then refused). Revoking it again keeps the first revocation.
    pub fn revoke(&self, serial: &str, reason: &str, by: &str) -> Result<RevokedCert, StoreError> {
        if let Some(r) = self.revoked(serial) {
            return Ok(r);
        }
        let subject = match &self.store {
            Some(store) => store.node_of_cert(serial)?.map(|node| format!("node {node}")).unwrap_or_default(),
            None => String::new(),
        };
        let r = RevokedCert {
            serial: serial.to_string(),
            subject,
            reason: reason.to_string(),
            revoked_by: by.to_string(),
            revoked_ms: now_ms(),
        };
        if let Some(store) = &self.store {
            store.revoke_certs(std::slice::from_ref(&r))?;
        }
        self.revoked.write().unwrap_or_else(|e| e.into_inner()).insert(r.serial.clone(), r.clone());
        self.generation.fetch_add(1, Ordering::Release);
        tracing::warn!(serial = %r.serial, subject = %r.subject, by, reason, "certificate revoked");
        Ok(r)
    }

    /// Revokes every certificate `node` has been seen with. Returns the revocations (already revoked ones too).
    pub fn revoke_node(&self, node: &str, reason: &str, by: &str) -> Result<Vec<RevokedCert>, StoreError> {
        let serials = match &self.store {
            Some(store) => store.node_cert_serials(node)?,
            None => Vec::new(),
        };
        serials.iter().map(|s| self.revoke(s, reason, by)).collect()
    }

    /// Notes that `node` presented the certificate with `serial` (stored once per node and serial).
    pub fn note_node_cert(&self, node: &str, serial: &str) -> Result<(), StoreError> {
        let key = pair_key(node, serial);
        if self.noted().contains(&key) {
            return Ok(());
        }
        if let Some(store) = &self.store {
            store.note_node_cert(node, serial, now_ms())?;
        }
        self.noted().insert(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;

    #[test]
    fn serials_are_compared_in_one_form_and_bad_ones_are_named() {
        assert_eq!(normalise_serial("serial=0A1B2C").expect("openssl form"), "a1b2c");
        assert_eq!(normalise_serial("0a:1b:2c").expect("colon form"), "a1b2c");
        assert_eq!(normalise_serial("00").expect("zero"), "0");
        let err = normalise_serial("node-n1.pem").expect_err("not hex");
        assert!(err.starts_with("serial: ") && err.contains("openssl x509 -serial"), "{err}");
        assert!(normalise_serial(&"ab".repeat(30)).expect_err("too long").contains("20 bytes"));
    }

    #[test]
    fn revocations_and_node_serials_survive_a_restart_and_forget_revokes_every_serial_of_the_node() {
        let dir = tempfile::tempdir().expect("tmp");
        let open = || -> Arc<dyn Store> { Arc::new(SqliteStore::open(&dir.path().join("hub.db")).expect("store")) };
        let r = Revocations::load(open()).expect("load");
        r.note_node_cert("n1", "aa").expect("note");
        r.note_node_cert("n1", "bb").expect("note");
        r.note_node_cert("n2", "cc").expect("note");
        let first = r.revoke("dd", "key lost", "operator alice").expect("revoke");
        assert_eq!(first.subject, "", "a serial no node was seen with");
        drop(r);

        let r = Revocations::load(open()).expect("reload");
        assert_eq!(r.revoked("dd").map(|x| x.reason), Some("key lost".to_string()), "survives a restart");
        let gone = r.revoke_node("n1", "node forgotten", "operator bob").expect("forget");
        assert_eq!(gone.iter().map(|x| x.serial.as_str()).collect::<Vec<_>>(), vec!["aa", "bb"]);
        assert!(gone.iter().all(|x| x.subject == "node n1"), "{gone:?}");
        assert!(r.revoked("cc").is_none(), "another node's certificate stays valid");
        // Revoking again keeps the first record.
        assert_eq!(r.revoke("dd", "again", "x").expect("again").revoked_by, "operator alice");
        drop(r);
        let r = Revocations::load(open()).expect("reload");
        assert_eq!(
            r.list().iter().map(|x| x.serial.as_str()).collect::<std::collections::BTreeSet<_>>(),
            ["aa", "bb", "dd"].into()
        );
    }
}
