//! The hub's state is never served as empty: the database marker, the checks made before the store opens, and
//! online backup and restore of the database.
//!
//! When a hub first creates its database (or first opens one written by an older hub) it writes a marker file,
//! `hub.db.marker`, next to it (temp + fsync + rename). From then on a hub refuses to start when the marker says a
//! database should exist but `hub.db` is missing or empty, and whenever the database fails `PRAGMA quick_check`.
//! Older hubs wrote no marker, so image files under `artifacts/` count as the same evidence. Nothing here ever
//! creates an empty database in place of a lost one: only a state directory with no trace of a fleet starts a new
//! one. This module owns files in the state directory only; it does not read or change the fleet's rows.

use super::StoreError;
use super::sqlite::{SCHEMA_VERSION, SqliteStore};
use rusqlite::{Connection, OpenFlags};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The database file inside the state directory.
pub const DB_FILE: &str = "hub.db";
/// The marker that says this state directory has a database.
pub const MARKER_FILE: &str = "hub.db.marker";
/// The lock a serving hub holds on its state directory (and `restore` takes).
pub const LOCK_FILE: &str = "hub.lock";
/// Image files live under this directory of the state directory.
const ARTIFACTS_DIR: &str = "artifacts";
/// How many lines of a failed `quick_check` an error repeats.
const QUICK_CHECK_LINES: usize = 3;

/// What to do about a state directory the hub refuses; every refusal ends with it.
fn remedy(state_dir: &Path) -> String {
    format!(
        "restore a backup with `upkeep-hub restore FILE` (hub stopped), or remove {} to start a new fleet",
        state_dir.display()
    )
}

/// Why the state directory cannot be served, or a backup or restore failed. Each names the path concerned.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The database is missing or empty where there is evidence of a fleet.
    #[error("{db} is {what} but {evidence}; refusing to start an empty fleet: {remedy}")]
    Lost {
        /// The database file.
        db: PathBuf,
        /// "missing" or "empty (0 bytes)".
        what: &'static str,
        /// What says a database should be there.
        evidence: String,
        /// What to do.
        remedy: String,
    },
    /// The database fails `PRAGMA quick_check` or cannot be read as a database at all.
    #[error("{db} is damaged (PRAGMA quick_check: {report}); refusing to serve it: {remedy}")]
    Damaged {
        /// The database file.
        db: PathBuf,
        /// The first lines quick_check returned, or the error opening it.
        report: String,
        /// What to do.
        remedy: String,
    },
    /// A file operation failed.
    #[error("{path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The database refused an operation of a backup or restore.
    #[error("{context}")]
    Db {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: rusqlite::Error,
    },
    /// The store itself failed to open (migrations, schema newer than this hub).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Another hub process serves this state directory.
    #[error("{lock} is held: a hub is running on {state_dir}; stop it first (systemctl stop upkeep-hub)")]
    Running {
        /// The lock file.
        lock: PathBuf,
        /// The state directory.
        state_dir: PathBuf,
    },
    /// The file given to `restore` is not a usable hub database.
    #[error("{file}: not a usable hub database backup: {reason}")]
    BadBackup {
        /// The file.
        file: PathBuf,
        /// Why.
        reason: String,
    },
    /// `restore` would replace a healthy database.
    #[error("{db} is a healthy database; refusing to replace it (stop the hub and pass --force to replace it)")]
    Healthy {
        /// The database file.
        db: PathBuf,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + use<> {
    let path = path.to_path_buf();
    move |source| StateError::Io { path, source }
}

fn db_err(context: String) -> impl FnOnce(rusqlite::Error) -> StateError {
    move |source| StateError::Db { context, source }
}

/// What the marker records.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Marker {
    /// A random id given to the database when the marker was written (a new one after each restore).
    pub database_id: String,
    /// When the marker was written, Unix milliseconds.
    pub created_unix_ms: i64,
    /// The hub that wrote it.
    pub written_by: String,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn new_marker() -> Marker {
    use ring::rand::SecureRandom;
    let mut id = [0u8; 16];
    // If the system RNG fails, the id is only less unique; the marker's job is to exist.
    let _ = ring::rand::SystemRandom::new().fill(&mut id);
    Marker {
        database_id: id.iter().map(|b| format!("{b:02x}")).collect(),
        created_unix_ms: now_ms(),
        written_by: format!("upkeep-hub {}", env!("CARGO_PKG_VERSION")),
    }
}

fn sync_dir(dir: &Path) -> Result<(), StateError> {
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Gives `path` the owner of `state_dir` when they differ: `restore` is often run as root for a hub that runs as
/// its own user (User=upkeep), which must still be able to open the files restore leaves.
fn match_owner(path: &Path, state_dir: &Path) -> Result<(), StateError> {
    use std::os::unix::fs::MetadataExt;
    let dir = fs::metadata(state_dir).map_err(io(state_dir))?;
    let file = fs::metadata(path).map_err(io(path))?;
    if (file.uid(), file.gid()) == (dir.uid(), dir.gid()) {
        return Ok(());
    }
    std::os::unix::fs::chown(path, Some(dir.uid()), Some(dir.gid())).map_err(io(path))
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsync, rename, fsync of the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        std::process::id()
    ));
    let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io(path))?;
    sync_dir(dir)
}

fn write_marker(state_dir: &Path, marker: &Marker) -> Result<(), StateError> {
    let path = state_dir.join(MARKER_FILE);
    let mut text = serde_json::to_string_pretty(marker)
        .map_err(|e| StateError::Io { path: path.clone(), source: std::io::Error::other(e) })?;
    text.push('\n');
    write_atomic(&path, text.as_bytes())
}

/// Describes the marker for an error message: when its database was created, or that it is unreadable.
fn marker_evidence(path: &Path) -> Option<String> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(_) => return Some(format!("{} says this state directory has a database", path.display())),
    };
    match serde_json::from_str::<Marker>(&text) {
        Ok(m) => {
            let when = chrono::DateTime::from_timestamp_millis(m.created_unix_ms)
                .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                .unwrap_or_else(|| m.created_unix_ms.to_string());
            Some(format!("{} records database {} created {when}", path.display(), m.database_id))
        }
        Err(_) => Some(format!("{} says this state directory has a database", path.display())),
    }
}

/// True when any regular file lies under `dir` (a few levels deep: artifacts/sha256/<digest>).
fn holds_files(dir: &Path, depth: u32) -> bool {
    let Ok(entries) = fs::read_dir(dir) else { return false };
    entries.flatten().any(|e| match e.file_type() {
        Ok(t) if t.is_dir() => depth > 0 && holds_files(&e.path(), depth - 1),
        Ok(_) => true,
        Err(_) => false,
    })
}

/// Runs `PRAGMA quick_check` and returns None when the database is fine, else its first lines.
pub(crate) fn quick_check(conn: &Connection) -> Result<Option<String>, rusqlite::Error> {
    let mut stmt = conn.prepare("PRAGMA quick_check")?;
    let lines: Vec<String> = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<_, _>>()?;
    if lines.len() == 1 && lines[0] == "ok" {
        return Ok(None);
    }
    let mut report = lines.iter().take(QUICK_CHECK_LINES).cloned().collect::<Vec<_>>().join("; ");
    if lines.len() > QUICK_CHECK_LINES {
        report.push_str(&format!("; and {} more", lines.len() - QUICK_CHECK_LINES));
    }
    Ok(Some(report))
}

/// Opens `path` (which must exist) and checks it; Err names what quick_check or the open said.
fn check_file(path: &Path) -> Result<(), String> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| e.to_string())?;
    match quick_check(&conn) {
        Ok(None) => Ok(()),
        Ok(Some(report)) => Err(report),
        Err(e) => Err(e.to_string()),
    }
}

fn file_len(path: &Path) -> Result<Option<u64>, StateError> {
    match fs::metadata(path) {
        Ok(m) => Ok(Some(m.len())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

/// Opens the hub's database in `state_dir` for serving, refusing a lost or damaged one (see the module comment),
/// and records the marker if it is not there yet.
pub fn open_state(state_dir: &Path) -> Result<SqliteStore, StateError> {
    fs::create_dir_all(state_dir).map_err(io(state_dir))?;
    let db = state_dir.join(DB_FILE);
    let marker = state_dir.join(MARKER_FILE);
    let has_marker = fs::symlink_metadata(&marker).is_ok();
    match file_len(&db)? {
        Some(len) if len > 0 => {
            check_file(&db).map_err(|report| StateError::Damaged {
                db: db.clone(),
                report,
                remedy: remedy(state_dir),
            })?;
        }
        len => {
            let what = if len.is_some() { "empty (0 bytes)" } else { "missing" };
            let artifacts = state_dir.join(ARTIFACTS_DIR);
            let wal = state_dir.join(format!("{DB_FILE}-wal"));
            let evidence = marker_evidence(&marker)
                .or_else(|| {
                    holds_files(&artifacts, 3)
                        .then(|| format!("{} holds image files of an existing fleet", artifacts.display()))
                })
                .or_else(|| wal.exists().then(|| format!("{} holds its write-ahead log", wal.display())));
            if let Some(evidence) = evidence {
                return Err(StateError::Lost { db, what, evidence, remedy: remedy(state_dir) });
            }
        }
    }
    let store = SqliteStore::open(&db)?;
    if !has_marker {
        write_marker(state_dir, &new_marker())?;
    }
    Ok(store)
}

/// Takes the state directory's lock, held by a serving hub for its lifetime and by `restore`. The lock goes with
/// the returned file.
pub fn lock_state_dir(state_dir: &Path) -> Result<fs::File, StateError> {
    fs::create_dir_all(state_dir).map_err(io(state_dir))?;
    let lock = state_dir.join(LOCK_FILE);
    let f = fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock).map_err(io(&lock))?;
    match_owner(&lock, state_dir)?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(fs::TryLockError::WouldBlock) => Err(StateError::Running { lock, state_dir: state_dir.to_path_buf() }),
        Err(fs::TryLockError::Error(e)) => Err(io(&lock)(e)),
    }
}

/// What a backup or restore did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    /// Pages copied.
    pub pages: i64,
    /// The schema version of the copy.
    pub schema_version: i64,
    /// Where a replaced database was kept (restore only).
    pub kept: Option<PathBuf>,
}

fn schema_version(conn: &Connection, what: &str) -> Result<i64, StateError> {
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(db_err(format!("reading the schema version of {what}")))
}

/// `upkeep-hub backup FILE`: an online, consistent copy of the database in `state_dir` written to `dest`.
///
/// The SQLite backup API copies every page in one step, that is inside one read transaction, so with WAL the copy
/// is the database as of one commit while the hub keeps writing. The copy is written beside `dest`, checked with
/// quick_check, switched out of WAL mode (one self-contained file), fsynced and renamed into place.
pub fn backup(state_dir: &Path, dest: &Path) -> Result<Copied, StateError> {
    let db = state_dir.join(DB_FILE);
    if file_len(&db)?.is_none_or(|n| n == 0) {
        return Err(StateError::Io {
            path: db,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no database to back up"),
        });
    }
    let src = Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(db_err(format!("opening {}", db.display())))?;
    src.busy_timeout(std::time::Duration::from_secs(10)).map_err(db_err(format!("opening {}", db.display())))?;
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "backup".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let result = backup_into(&src, &db, &tmp);
    match result {
        Ok(copied) => {
            fs::rename(&tmp, dest).map_err(io(dest))?;
            sync_dir(&dir)?;
            Ok(copied)
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn backup_into(src: &Connection, db: &Path, tmp: &Path) -> Result<Copied, StateError> {
    let ctx = || format!("backing up {} to {}", db.display(), tmp.display());
    let mut dst = Connection::open(tmp).map_err(db_err(ctx()))?;
    let pages = {
        let b = rusqlite::backup::Backup::new(src, &mut dst).map_err(db_err(ctx()))?;
        // -1: every page in one step, under one read transaction of the source (a consistent snapshot).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            match b.step(-1).map_err(db_err(ctx()))? {
                rusqlite::backup::StepResult::Done => break,
                _ if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(50)),
                other => {
                    return Err(StateError::Io {
                        path: db.to_path_buf(),
                        source: std::io::Error::other(format!("the database stayed busy for 30 s ({other:?})")),
                    });
                }
            }
        }
        i64::from(b.progress().pagecount)
    };
    dst.pragma_update(None, "journal_mode", "DELETE").map_err(db_err(ctx()))?;
    if let Some(report) = quick_check(&dst).map_err(db_err(ctx()))? {
        return Err(StateError::Damaged {
            db: db.to_path_buf(),
            report,
            remedy: "the source database is damaged; it was not backed up".into(),
        });
    }
    let schema_version = schema_version(&dst, &tmp.display().to_string())?;
    drop(dst);
    fs::File::open(tmp).and_then(|f| f.sync_all()).map_err(io(tmp))?;
    Ok(Copied { pages, schema_version, kept: None })
}

/// `upkeep-hub restore FILE [--force]`, with the hub stopped: checks `file` (quick_check, schema version this hub
/// knows), then puts a copy in place of the database in `state_dir` by one rename. A healthy database is replaced
/// only with `force`; a replaced database (and its write-ahead log) is kept beside it, never deleted. A new marker
/// is written.
pub fn restore(state_dir: &Path, file: &Path, force: bool) -> Result<Copied, StateError> {
    let _lock = lock_state_dir(state_dir)?;
    let bad = |reason: String| StateError::BadBackup { file: file.to_path_buf(), reason };
    match file_len(file)? {
        None => return Err(bad("no such file".into())),
        Some(0) => return Err(bad("it is empty (0 bytes)".into())),
        Some(_) => {}
    }
    let db = state_dir.join(DB_FILE);
    if !force && file_len(&db)?.is_some_and(|n| n > 0) && check_file(&db).is_ok() {
        return Err(StateError::Healthy { db });
    }
    // Check a private copy (opening a WAL-mode file may write to it), then move that copy into place.
    let tmp = state_dir.join(format!(".{DB_FILE}.restore-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        fs::copy(file, &tmp).map_err(io(&tmp))?;
        check_copy(&tmp).map_err(bad)
    })();
    let copied = match result {
        Ok(c) => c,
        Err(e) => {
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let _ = fs::remove_file(format!("{}{suffix}", tmp.display()));
            }
            return Err(e);
        }
    };
    match_owner(&tmp, state_dir)?;
    fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io(&tmp))?;
    // Move the old database and its log aside together: a log left next to another database would be replayed
    // into it.
    let stamp = now_ms();
    let mut kept = None;
    for suffix in ["", "-wal", "-shm"] {
        let from = state_dir.join(format!("{DB_FILE}{suffix}"));
        if fs::symlink_metadata(&from).is_ok() {
            let to = state_dir.join(format!("{DB_FILE}.replaced-{stamp}{suffix}"));
            fs::rename(&from, &to).map_err(io(&from))?;
            if suffix.is_empty() {
                kept = Some(to);
            }
        }
    }
    fs::rename(&tmp, &db).map_err(io(&db))?;
    sync_dir(state_dir)?;
    write_marker(state_dir, &new_marker())?;
    match_owner(&state_dir.join(MARKER_FILE), state_dir)?;
    Ok(Copied { kept, ..copied })
}

fn check_copy(tmp: &Path) -> Result<Copied, String> {
    let conn = Connection::open_with_flags(tmp, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| e.to_string())?;
    if let Some(report) = quick_check(&conn).map_err(|e| e.to_string())? {
        return Err(format!("PRAGMA quick_check: {report}"));
    }
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(|e| e.to_string())?;
    if version < 1 {
        return Err("it holds no hub schema (schema version 0)".into());
    }
    if version > SCHEMA_VERSION {
        return Err(format!(
            "schema version {version} is newer than this hub knows ({SCHEMA_VERSION}); upgrade the hub first"
        ));
    }
    let has_nodes: bool = conn
        .query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'nodes'", [], |r| {
            r.get::<_, i64>(0)
        })
        .map(|n| n > 0)
        .map_err(|e| e.to_string())?;
    if !has_nodes {
        return Err("it has no nodes table; it is not an upkeep hub database".into());
    }
    let pages: i64 = conn.pragma_query_value(None, "page_count", |r| r.get(0)).map_err(|e| e.to_string())?;
    // Leave the copy in rollback-journal mode with no side files; the hub switches it to WAL when it opens it.
    conn.pragma_update(None, "journal_mode", "DELETE").map_err(|e| e.to_string())?;
    Ok(Copied { pages, schema_version: version, kept: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_dir_gets_a_database_and_a_marker_and_a_lost_one_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        drop(open_state(&state).expect("fresh state dir starts"));
        let marker: Marker =
            serde_json::from_str(&fs::read_to_string(state.join(MARKER_FILE)).expect("marker")).expect("json");
        assert_eq!(marker.database_id.len(), 32);
        drop(open_state(&state).expect("reopens"));
        fs::write(state.join(DB_FILE), b"").expect("truncate");
        let err = open_state(&state).err().expect("empty refused");
        assert!(matches!(err, StateError::Lost { what: "empty (0 bytes)", .. }), "{err}");
        assert!(err.to_string().contains("upkeep-hub restore"), "{err}");
        fs::remove_file(state.join(DB_FILE)).expect("rm");
        let err = open_state(&state).err().expect("missing refused");
        assert!(err.to_string().contains(&format!("{} is missing", state.join(DB_FILE).display())), "{err}");
        assert!(!state.join(DB_FILE).exists(), "no empty database was created");
    }

    #[test]
    fn artifacts_without_a_marker_are_evidence_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("artifacts/sha256")).expect("mkdir");
        drop(open_state(dir.path()).expect("an empty artifacts dir is no evidence"));
        fs::remove_file(dir.path().join(MARKER_FILE)).expect("rm marker");
        fs::remove_file(dir.path().join(DB_FILE)).expect("rm db");
        fs::write(dir.path().join("artifacts/sha256/abc"), b"image").expect("write");
        let err = open_state(dir.path()).err().expect("refused");
        assert!(err.to_string().contains("holds image files"), "{err}");
    }

    #[test]
    fn restore_refuses_a_healthy_database_without_force_and_keeps_the_old_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        drop(open_state(&state).expect("open"));
        let file = dir.path().join("backup.db");
        let copied = backup(&state, &file).expect("backup");
        assert_eq!(copied.schema_version, SCHEMA_VERSION);
        let err = restore(&state, &file, false).expect_err("healthy db kept");
        assert!(matches!(err, StateError::Healthy { .. }), "{err}");
        let restored = restore(&state, &file, true).expect("forced");
        assert!(restored.kept.as_ref().is_some_and(|p| p.exists()), "{restored:?}");
        drop(open_state(&state).expect("serves the restored copy"));
        let junk = dir.path().join("junk.db");
        fs::write(&junk, vec![7u8; 8192]).expect("write");
        let err = restore(&state, &junk, true).expect_err("junk refused");
        assert!(matches!(err, StateError::BadBackup { .. }), "{err}");
    }

    #[test]
    fn an_online_backup_holds_whole_transactions_while_another_connection_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        drop(open_state(&state).expect("open"));
        let db = state.join(DB_FILE);
        let writer = Connection::open(&db).expect("writer");
        writer.execute_batch("CREATE TABLE pairs (n INTEGER NOT NULL)").expect("table");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0i64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Two rows per transaction: a consistent copy never holds an odd number.
                    writer
                        .execute_batch(&format!(
                            "BEGIN; INSERT INTO pairs VALUES ({n}); INSERT INTO pairs VALUES ({n}); COMMIT;"
                        ))
                        .expect("write");
                    n += 1;
                }
                n
            })
        };
        let mut seen = Vec::new();
        for i in 0..5 {
            let file = dir.path().join(format!("b{i}.db"));
            backup(&state, &file).expect("backup while writing");
            let copy = Connection::open(&file).expect("copy");
            let rows: i64 = copy.query_row("SELECT count(*) FROM pairs", [], |r| r.get(0)).expect("count");
            assert_eq!(rows % 2, 0, "backup {i} holds half a transaction: {rows} rows");
            seen.push(rows);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let written = thread.join().expect("writer");
        assert!(written > 0 && seen.iter().any(|&r| r > 0), "the writer wrote during the backups: {seen:?}");
    }

    #[test]
    fn a_restore_run_as_root_leaves_files_the_state_dirs_owner_can_open() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        if fs::metadata(dir.path()).expect("meta").uid() != 0 {
            return; // Only root can give files away; as anyone else the files are already the caller's.
        }
        let state = dir.path().join("state");
        drop(open_state(&state).expect("open"));
        let file = dir.path().join("backup.db");
        backup(&state, &file).expect("backup");
        std::os::unix::fs::chown(&state, Some(65534), Some(65534)).expect("chown");
        fs::remove_file(state.join(DB_FILE)).expect("rm");
        restore(&state, &file, false).expect("restore");
        for f in [DB_FILE, MARKER_FILE, LOCK_FILE] {
            let m = fs::metadata(state.join(f)).expect(f);
            assert_eq!((m.uid(), m.gid()), (65534, 65534), "{f}");
        }
    }

    #[test]
    fn restore_refuses_while_a_hub_holds_the_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _held = lock_state_dir(dir.path()).expect("lock");
        let err = restore(dir.path(), &dir.path().join("x"), true).expect_err("refused");
        assert!(matches!(err, StateError::Running { .. }), "{err}");
    }
}
