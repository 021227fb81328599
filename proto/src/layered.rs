//! Layered configuration for both daemons: `/usr/lib/upkeep/<name>.d/*.toml` (package defaults), then
//! `<dir of the main file>/<name>.d/*.toml` (operator drop-ins, `/etc/upkeep/<name>.d/`), then the main file
//! itself; each in lexical order, a later key overriding an earlier one, tables merged key by key.
//!
//! This module only reads and merges TOML and remembers which file each key came from, so that the daemon's
//! own validation can name the right file. It does not know any key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where packages put their defaults.
pub const VENDOR_DIR: &str = "/usr/lib/upkeep";

/// One fragment as read.
#[derive(Debug, Clone)]
pub struct Fragment {
    /// Its file.
    pub path: PathBuf,
    /// Its text.
    pub text: String,
    /// Its table.
    pub table: toml::Table,
}

/// The merged configuration.
#[derive(Debug, Clone)]
pub struct Layered {
    /// Every fragment, in the order applied (the main file last).
    pub fragments: Vec<Fragment>,
    /// The merged table, as TOML text.
    pub merged: String,
    /// Dotted key (`tls.key`) -> the file its value came from.
    pub provenance: BTreeMap<String, PathBuf>,
}

impl Layered {
    /// The file a key came from (the main file if unknown).
    pub fn file_of(&self, key: &str) -> Option<&Path> {
        self.provenance.get(key).map(PathBuf::as_path)
    }
}

/// A configuration error of either daemon, one line: `<file>: <key>: <reason>`.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {reason}")]
pub struct ConfigError {
    /// The file (or `--flag`).
    pub file: String,
    /// The key, or `(file)` / `(syntax)`.
    pub key: String,
    /// What is wrong and how to fix it.
    pub reason: String,
}

/// The drop-in directories for `main` (a `<name>.toml` file): vendor first, then beside the main file.
pub fn dropin_dirs(main: &Path, name: &str) -> Vec<PathBuf> {
    let beside = main.parent().unwrap_or(Path::new(".")).join(format!("{name}.d"));
    let vendor = Path::new(VENDOR_DIR).join(format!("{name}.d"));
    if vendor == beside { vec![vendor] } else { vec![vendor, beside] }
}

fn read_fragment(path: &Path) -> Result<Fragment, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.display().to_string(),
        key: "(file)".into(),
        reason: format!("cannot read: {e}"),
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError {
        file: path.display().to_string(),
        key: e.span().and_then(|s| text.get(s)).unwrap_or("(syntax)").trim().to_string(),
        reason: e.message().to_string(),
    })?;
    Ok(Fragment { path: path.to_path_buf(), text, table })
}

fn merge(into: &mut toml::Table, from: &toml::Table, prefix: &str, file: &Path, prov: &mut BTreeMap<String, PathBuf>) {
    for (k, v) in from {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match (into.get_mut(k), v) {
            (Some(toml::Value::Table(dst)), toml::Value::Table(src)) => merge(dst, src, &key, file, prov),
            _ => {
                into.insert(k.clone(), v.clone());
                if let toml::Value::Table(t) = v {
                    let mut sub = toml::Table::new();
                    merge(&mut sub, t, &key, file, prov);
                }
                prov.insert(key, file.to_path_buf());
            }
        }
    }
}

/// Reads the drop-ins in `dirs` (missing directories are fine) and then `main` (which must exist), and merges them.
pub fn load(main: &Path, dirs: &[PathBuf]) -> Result<Layered, ConfigError> {
    let mut paths = Vec::new();
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(d) else { continue };
        let mut files: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        paths.extend(files);
    }
    paths.push(main.to_path_buf());
    let mut fragments = Vec::new();
    let mut merged = toml::Table::new();
    let mut provenance = BTreeMap::new();
    for p in paths {
        let f = read_fragment(&p)?;
        merge(&mut merged, &f.table, "", &f.path, &mut provenance);
        fragments.push(f);
    }
    let merged = toml::to_string(&merged).map_err(|e| ConfigError {
        file: main.display().to_string(),
        key: "(merge)".into(),
        reason: e.to_string(),
    })?;
    Ok(Layered { fragments, merged, provenance })
}

/// `load` with the drop-in directories of `name` (`hub`, `agent`), checking every fragment against the daemon's
/// raw schema `R` (unknown keys, wrong types) so that such errors name the fragment that has them.
pub fn load_checked<R: serde::de::DeserializeOwned>(main: &Path, name: &str) -> Result<Layered, ConfigError> {
    let layered = load(main, &dropin_dirs(main, name))?;
    for f in &layered.fragments {
        toml::from_str::<R>(&f.text).map_err(|e| ConfigError {
            file: f.path.display().to_string(),
            key: e.span().and_then(|s| f.text.get(s)).unwrap_or("(syntax)").trim().to_string(),
            reason: e.message().to_string(),
        })?;
    }
    Ok(layered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_fragments_override_and_provenance_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().join("hub.d");
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join("10-a.toml"), "listen = \"1.1.1.1:1\"\n[tls]\nca = \"/a/ca.pem\"\nkey = \"/a/k\"\n")
            .expect("w");
        std::fs::write(d.join("20-b.toml"), "[tls]\nkey = \"/b/k\"\n").expect("w");
        std::fs::write(d.join("ignored.conf"), "nonsense").expect("w");
        let main = dir.path().join("hub.toml");
        std::fs::write(&main, "listen = \"2.2.2.2:2\"\n").expect("w");
        let l = load(&main, std::slice::from_ref(&d)).expect("load");
        let t: toml::Table = toml::from_str(&l.merged).expect("merged");
        assert_eq!(t["listen"].as_str(), Some("2.2.2.2:2"));
        assert_eq!(t["tls"]["ca"].as_str(), Some("/a/ca.pem"));
        assert_eq!(t["tls"]["key"].as_str(), Some("/b/k"));
        assert_eq!(l.file_of("tls.key"), Some(d.join("20-b.toml").as_path()));
        assert_eq!(l.file_of("listen"), Some(main.as_path()));
        std::fs::write(d.join("30-bad.toml"), "listen = ").expect("w");
        let err = load(&main, &[d]).expect_err("bad fragment");
        assert!(err.to_string().contains("30-bad.toml"), "{err}");
    }
}
