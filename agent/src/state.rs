//! The agent's persisted state (the configuration it adopted from the hub), written atomically:
//! temp file, fsync, rename, fsync of the directory. A torn write leaves the previous state intact.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// File name inside the state directory.
pub const STATE_FILE: &str = "agent-state.json";

/// What survives an agent restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    /// The node OS channel adopted from the hub, if any yet.
    pub channel: Option<String>,
    /// Generation of the member configuration adopted.
    pub config_generation: u64,
}

/// State file failures.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// I/O on the state file.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The state file is not valid JSON of the expected shape.
    #[error("{path}: unreadable state ({reason}); move it aside to start fresh")]
    Corrupt {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Loads the state, or the default if there is none yet.
pub fn load(dir: &Path) -> Result<AgentState, StateError> {
    let path = dir.join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt { path, reason: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AgentState::default()),
        Err(source) => Err(StateError::Io { path, source }),
    }
}

/// Writes `bytes` to `path` atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| StateError::Io { path: p, source }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io(path))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// The text of a mark the agent left for itself (a rolled-back image, a pending Kubernetes upgrade), if there is one
/// and it can be read.
pub fn read_mark(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// Removes a mark; one already gone is fine.
pub fn clear_mark(path: &Path) -> Result<(), StateError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(StateError::Io { path: path.to_path_buf(), source: e })
        }
        _ => Ok(()),
    }
}

/// Saves the state.
pub fn save(dir: &Path, state: &AgentState) -> Result<(), StateError> {
    let path = dir.join(STATE_FILE);
    let bytes = serde_json::to_vec_pretty(state)
        .map_err(|e| StateError::Corrupt { path: path.clone(), reason: e.to_string() })?;
    write_atomic(&path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_ignores_a_leftover_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(load(dir.path()).expect("empty"), AgentState::default());
        let s = AgentState { channel: Some("SecurityPatch".into()), config_generation: 3 };
        save(dir.path(), &s).expect("save");
        std::fs::write(dir.path().join("agent-state.tmp"), b"{torn").expect("write");
        assert_eq!(load(dir.path()).expect("load"), s);
        std::fs::write(dir.path().join(STATE_FILE), b"{torn").expect("write");
        assert!(load(dir.path()).expect_err("corrupt").to_string().contains("move it aside"));
    }
}
