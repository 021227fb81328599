//! `upkeep-hub migrate --from sqlite:FILE`: moves a SQLite hub's whole state into a PostgreSQL store.
//!
//! The two schemas mirror each other table for table and column for column, so the copy is driven by one list,
//! [`COPIED`]: for each table the columns are those of the PostgreSQL table, each read by name from the SQLite
//! table and converted to the PostgreSQL column's type. Every table either schema has must be in [`COPIED`] or
//! named in [`SQLITE_ONLY`] / [`POSTGRES_ONLY`] with the reason it is not copied; the import refuses to run
//! otherwise (and a unit test fails first).
//!
//! Order of work, so that a refusal changes nothing and a failure leaves nothing half done:
//! 1. the SQLite file is checked: readable, `PRAGMA quick_check`, schema version exactly this hub's;
//! 2. the PostgreSQL database must hold no fleet (every copied table that exists is empty);
//! 3. image files are copied (or hard-linked) into `artifacts_dir`, each verified against its digest; content
//!    addressing makes this safe to repeat;
//! 4. the database's schema is migrated if needed (what `upkeep-hub migrate` does);
//! 5. one PostgreSQL transaction takes an exclusive lock on every copied table, checks again that they are
//!    empty, copies every row (binary COPY), moves every serial sequence past the largest copied number (and
//!    past SQLite's own AUTOINCREMENT high-water mark, so that numbers of pruned rows are not reused), compares
//!    each table's count with the SQLite count, and commits.

use super::postgres::{self, PostgresSettings};
use crate::artifacts::{Artifacts, check_digest, hex};
use ::postgres::binary_copy::BinaryCopyInWriter;
use ::postgres::types::{ToSql, Type};
use ::postgres::{Client, NoTls, Transaction};
use anyhow::{Context, anyhow, bail};
use rusqlite::{Connection, OpenFlags};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every table holding fleet state, in copy order (a table after the tables its foreign keys name).
pub const COPIED: &[&str] = &[
    "members",
    "nodes",
    "member_settings",
    "images",
    "kubernetes_releases",
    "security_patches",
    "strategies",
    "runs",
    "run_parts",
    "events",
    "leases",
    "rollouts",
    "channel_switches",
    "hub_meta",
    "jobs",
    "revoked_certs",
    "node_certs",
    "join_tokens",
    "join_token_uses",
    "webhooks",
    "outbox",
    "webhook_deliveries",
    "notices",
];

/// SQLite tables not copied, and why.
pub const SQLITE_ONLY: &[(&str, &str)] =
    &[("sqlite_sequence", "SQLite's AUTOINCREMENT high-water marks: they move the PostgreSQL sequences instead")];

/// PostgreSQL tables not copied, and why.
pub const POSTGRES_ONLY: &[(&str, &str)] = &[
    ("schema_migrations", "the PostgreSQL schema's own version record, written by the migration"),
    ("leadership", "the leader lease of hub replicas (`crate::cluster`): a moved fleet starts with no leader, term 0"),
    ("relay", "notes between hub replicas (`crate::relay`), short-lived: a moved fleet starts with none"),
    ("session_places", "where agent sessions are on hub replicas: a moved fleet's agents connect again"),
    ("replicas", "hub replicas heard from recently: a moved fleet has none yet"),
];

/// PostgreSQL columns with no SQLite column: they keep their default (a moved fleet had no replicas).
const POSTGRES_ONLY_COLUMNS: &[(&str, &str)] =
    &[("runs", "term"), ("jobs", "term"), ("leases", "term"), ("rollouts", "term")];

/// SQLite columns with no PostgreSQL column, and the one value they may hold (anything else is refused).
const DROPPED_COLUMNS: &[(&str, &str, &str)] =
    &[("runs", "state", "emptied by SQLite migration 6: run states live in run_parts")];

/// What an import did.
#[derive(Debug, Default)]
pub struct Imported {
    /// Schema migrations applied to the PostgreSQL database first (version, description).
    pub migrations: Vec<(u32, &'static str)>,
    /// Rows copied per table, in copy order.
    pub tables: Vec<(String, u64)>,
    /// Sequences moved: (table.column, the value it now stands at).
    pub sequences: Vec<(String, i64)>,
    /// Image files: hard-linked, copied, already there.
    pub artifacts: ArtifactsMoved,
}

/// What happened to the image files.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ArtifactsMoved {
    /// Hard-linked from the old directory (same file system).
    pub linked: u64,
    /// Copied byte for byte.
    pub copied: u64,
    /// Already in `artifacts_dir` with the right digest.
    pub present: u64,
}

/// Where the import reads from and writes to.
pub struct ImportFrom<'a> {
    /// The SQLite database (`hub.db`), its hub stopped.
    pub sqlite: &'a Path,
    /// The old hub's artifacts directory (holding `sha256/`).
    pub artifacts_from: &'a Path,
}

/// Parses `--from sqlite:PATH`.
pub fn parse_from(from: &str) -> anyhow::Result<PathBuf> {
    match from.strip_prefix("sqlite:") {
        Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
        _ => bail!(
            "--from {from}: give sqlite:PATH, the hub.db of the stopped SQLite hub (e.g. sqlite:/var/lib/upkeep/hub.db)"
        ),
    }
}

/// Moves the state of the SQLite hub `from` into the PostgreSQL database `pg` and its image files into
/// `artifacts_to`. See the module comment for the order of work; every refusal is one line naming the fix.
pub fn import_sqlite(
    from: &ImportFrom<'_>,
    pg: &PostgresSettings,
    artifacts_to: &Artifacts,
) -> anyhow::Result<Imported> {
    let db = from.sqlite;
    let flag = format!("--from sqlite:{}", db.display());
    // A serving SQLite hub holds its state directory's lock; take it (when the directory has one) so that the hub
    // cannot start while its state is being read.
    let _lock = match db.parent() {
        Some(dir) if dir.join(super::safety::LOCK_FILE).exists() => {
            Some(super::safety::lock_state_dir(dir).map_err(|e| anyhow!("{flag}: {e}"))?)
        }
        _ => None,
    };
    let src = open_sqlite(db, &flag)?;
    let sqlite_tables = sqlite_tables(&src).with_context(|| flag.clone())?;
    check_lists(&sqlite_tables, "the SQLite database", SQLITE_ONLY).map_err(|e| anyhow!("{flag}: {e}"))?;
    // Refuse a database that holds a fleet before changing anything in it (not even its schema).
    let pg = pg.clone();
    let database = pg.describe();
    let holding = on_thread(&pg, move |c| fleet_rows(&mut c.transaction()?))?;
    if !holding.is_empty() {
        bail!("{}", holds_fleet(&database, &holding));
    }
    let digests = blob_digests(from.artifacts_from)?;
    let needed = local_images(&src).with_context(|| flag.clone())?;
    // Files and directories the move creates get the owner of the SQLite hub's state directory: the move is often
    // run as root for a hub that runs as its own user, which must still read them and write new uploads beside.
    let owner = {
        use std::os::unix::fs::MetadataExt;
        let dir = db.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::metadata(dir).map(|m| (m.uid(), m.gid())).with_context(|| format!("{flag}: {}", dir.display()))?
    };
    let artifacts = move_artifacts(from.artifacts_from, &digests, artifacts_to, &needed, owner)?;
    let migrations = postgres::migrate(&pg).context("migrating the PostgreSQL schema")?;
    // The copy itself: every table streamed from one SQLite read transaction into one PostgreSQL transaction.
    let (tables, sequences) = on_thread(&pg, move |c| copy_all(&src, c, &database).map_err(CopyError::Other))?;
    Ok(Imported { migrations, tables, sequences, artifacts })
}

/// An error inside the PostgreSQL thread: the database's own, or ours.
#[derive(Debug)]
enum CopyError {
    Pg(::postgres::Error),
    Other(anyhow::Error),
}

impl From<::postgres::Error> for CopyError {
    fn from(e: ::postgres::Error) -> Self {
        CopyError::Pg(e)
    }
}

/// Runs `f` with a fresh connection on a thread of its own (the synchronous client must not run inside a tokio
/// runtime, and callers may be in one).
fn on_thread<R: Send + 'static>(
    pg: &PostgresSettings,
    f: impl FnOnce(&mut Client) -> Result<R, CopyError> + Send + 'static,
) -> anyhow::Result<R> {
    let pg = pg.clone();
    let database = pg.describe();
    let thread = std::thread::Builder::new()
        .name("store-import".into())
        .spawn(move || -> anyhow::Result<R> {
            let mut config = pg.config.clone();
            if config.get_connect_timeout().is_none() {
                config.connect_timeout(std::time::Duration::from_secs(10));
            }
            let mut client = config
                .application_name("upkeep-hub migrate")
                .connect(NoTls)
                .map_err(|e| anyhow!("store.url: connecting to {database}: {e}"))?;
            f(&mut client).map_err(|e| match e {
                CopyError::Pg(e) => anyhow!("store.url: {database}: {}", one_line(&e)),
                CopyError::Other(e) => e,
            })
        })
        .context("starting the import thread")?;
    thread.join().map_err(|_| anyhow!("the import thread panicked"))?
}

/// A PostgreSQL error with its server message (the plain Display says only "db error").
fn one_line(e: &::postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} ({})", d.message(), d.code().code()),
        None => e.to_string(),
    }
}

fn open_sqlite(db: &Path, flag: &str) -> anyhow::Result<Connection> {
    match std::fs::metadata(db) {
        Ok(m) if m.len() > 0 => {}
        Ok(_) => bail!("{flag}: the file is empty; give the hub.db of the SQLite hub to move"),
        Err(e) => bail!("{flag}: {e}; give the hub.db of the SQLite hub to move"),
    }
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| anyhow!("{flag}: cannot open it as SQLite: {e}"))?;
    conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(|e| anyhow!("{flag}: {e}"))?;
    if let Some(report) =
        super::safety::quick_check(&conn).map_err(|e| anyhow!("{flag}: not a readable SQLite database: {e}"))?
    {
        bail!(
            "{flag}: the database is damaged (PRAGMA quick_check: {report}); restore a backup with `upkeep-hub restore` \
             on the SQLite hub, then move that"
        );
    }
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|e| anyhow!("{flag}: reading its schema version: {e}"))?;
    let wanted = super::sqlite::SCHEMA_VERSION;
    if version < wanted {
        bail!(
            "{flag}: SQLite schema version {version}, this hub moves version {wanted} only; start this version of \
             upkeep-hub on it once with the old hub.toml (it migrates the file), stop it, then run the move again"
        );
    }
    if version > wanted {
        bail!(
            "{flag}: SQLite schema version {version} is newer than this hub knows ({wanted}); run the move with the \
             upkeep-hub version that wrote it"
        );
    }
    Ok(conn)
}

fn sqlite_tables(src: &Connection) -> anyhow::Result<BTreeSet<String>> {
    let mut stmt = src.prepare("SELECT name FROM sqlite_master WHERE type = 'table'")?;
    let names = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<BTreeSet<_>, _>>()?;
    Ok(names)
}

/// Checks that every table `found` is copied or deliberately left, and every copied table exists.
fn check_lists(found: &BTreeSet<String>, what: &str, only: &[(&str, &str)]) -> Result<(), String> {
    let known: BTreeSet<&str> = COPIED.iter().copied().chain(only.iter().map(|(t, _)| *t)).collect();
    if let Some(t) = found.iter().find(|t| !known.contains(t.as_str())) {
        return Err(format!(
            "{what} has a table {t} this hub does not know how to move; use the upkeep-hub version that wrote it"
        ));
    }
    if let Some(t) = COPIED.iter().find(|t| !found.contains(**t)) {
        return Err(format!("{what} has no table {t}; it is not a hub database of this version"));
    }
    Ok(())
}

/// Copied tables that exist in the PostgreSQL database and hold rows: (table, rows).
fn fleet_rows(tx: &mut Transaction<'_>) -> Result<Vec<(String, i64)>, CopyError> {
    let existing = pg_tables(tx)?;
    let mut holding = Vec::new();
    for t in COPIED.iter().filter(|t| existing.contains(**t)) {
        let n: i64 = tx.query_one(&format!("SELECT count(*) FROM {t}"), &[])?.try_get(0)?;
        if n > 0 {
            holding.push((t.to_string(), n));
        }
    }
    Ok(holding)
}

fn holds_fleet(database: &str, holding: &[(String, i64)]) -> String {
    let what: Vec<String> = holding.iter().take(4).map(|(t, n)| format!("{t}: {n}")).collect();
    format!(
        "store.url: database {database} already holds hub state ({}{}); moving a fleet into it would mix two fleets, \
         so nothing was changed: create an empty database (createdb), point store.url at it and run the move again",
        what.join(", "),
        if holding.len() > 4 { ", ..." } else { "" }
    )
}

fn pg_tables(c: &mut impl ::postgres::GenericClient) -> Result<BTreeSet<String>, ::postgres::Error> {
    let rows = c.query(
        "SELECT table_name::text FROM information_schema.tables
         WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'",
        &[],
    )?;
    rows.iter().map(|r| r.try_get::<_, String>(0)).collect()
}

/// The image files in the old artifacts directory, by digest (temporary files and strays are left).
fn blob_digests(artifacts_from: &Path) -> anyhow::Result<Vec<String>> {
    let dir = artifacts_from.join("sha256");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => bail!("{}: {e}; give the old hub's artifacts directory with --artifacts-from", dir.display()),
    };
    let mut digests = Vec::new();
    for e in entries {
        let e = e.with_context(|| dir.display().to_string())?;
        let name = e.file_name().to_string_lossy().into_owned();
        if check_digest(&name).is_ok() && e.file_type().map(|t| t.is_file()).unwrap_or(false) {
            digests.push(name);
        }
    }
    digests.sort();
    Ok(digests)
}

/// Digests of catalog images served by the hub itself (published from a file, no download URL): their files
/// must come along.
fn local_images(src: &Connection) -> anyhow::Result<Vec<(String, String)>> {
    let mut stmt = src.prepare("SELECT family || '-' || version, sha256 FROM images WHERE url = '' ORDER BY 1")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn sha256_of(path: &Path) -> anyhow::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf).with_context(|| path.display().to_string())?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(hex(ctx.finish().as_ref()))
}

/// Brings every file into `to`, verified: one already there must hash to its name; otherwise it is hard-linked
/// (same file system) or copied through [`Artifacts::put`], which hashes as it writes and refuses a mismatch.
fn move_artifacts(
    from: &Path,
    digests: &[String],
    to: &Artifacts,
    needed: &[(String, String)],
    owner: (u32, u32),
) -> anyhow::Result<ArtifactsMoved> {
    let mut moved = ArtifactsMoved::default();
    let src_dir = from.join("sha256");
    let root = to.dir().parent().unwrap_or(to.dir()).to_path_buf();
    let fresh = [!root.exists(), !to.dir().exists()];
    std::fs::create_dir_all(to.dir())
        .with_context(|| format!("store.artifacts_dir: creating {}", to.dir().display()))?;
    for (dir, created) in [root.as_path(), to.dir()].into_iter().zip(fresh) {
        if created {
            give(dir, owner)?;
        }
    }
    for d in digests {
        let src = src_dir.join(d);
        let dest = to.path(d)?;
        if dest.exists() {
            let actual = sha256_of(&dest)?;
            if &actual != d {
                bail!(
                    "store.artifacts_dir: {} hashes to {actual}, not its name; remove it (the move copies it again)",
                    dest.display()
                );
            }
            moved.present += 1;
            continue;
        }
        let tmp = to.dir().join(format!(".import-{}-{d}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        if std::fs::hard_link(&src, &tmp).is_ok() {
            let actual = sha256_of(&tmp)?;
            if &actual != d {
                let _ = std::fs::remove_file(&tmp);
                bail!(
                    "{}: hashes to {actual}, not its name; the old hub's copy is damaged: publish that image again",
                    src.display()
                );
            }
            std::fs::rename(&tmp, &dest).with_context(|| dest.display().to_string())?;
            give(&dest, owner)?;
            moved.linked += 1;
        } else {
            let f = std::fs::File::open(&src).with_context(|| src.display().to_string())?;
            to.put(f, Some(d)).map_err(|e| {
                anyhow!("{}: {e}; the old hub's copy is damaged: publish that image again", src.display())
            })?;
            give(&dest, owner)?;
            moved.copied += 1;
        }
    }
    if moved.linked + moved.copied > 0 {
        std::fs::File::open(to.dir()).and_then(|d| d.sync_all()).with_context(|| to.dir().display().to_string())?;
    }
    for (image, d) in needed {
        if !to.path(d)?.exists() {
            bail!(
                "image {image}: its file sha256/{d} is neither in {} nor in store.artifacts_dir; give the old hub's \
                 artifacts directory with --artifacts-from",
                src_dir.display()
            );
        }
    }
    Ok(moved)
}

/// Gives `path` to `owner` (uid, gid) when it belongs to someone else.
fn give(path: &Path, owner: (u32, u32)) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).with_context(|| path.display().to_string())?;
    if (m.uid(), m.gid()) == owner {
        return Ok(());
    }
    std::os::unix::fs::chown(path, Some(owner.0), Some(owner.1)).map_err(|e| {
        anyhow!(
            "{}: cannot give it to the hub's user (uid {}, the owner of the SQLite hub's state directory): {e}; run \
             the move as root or as that user",
            path.display(),
            owner.0
        )
    })
}

/// One column of a copied table: its name and PostgreSQL type.
struct Column {
    name: String,
    ty: Type,
}

fn pg_columns(tx: &mut Transaction<'_>, table: &str) -> Result<Vec<Column>, CopyError> {
    let rows = tx.query(
        "SELECT column_name::text, data_type::text FROM information_schema.columns
         WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
        &[&table],
    )?;
    let mut cols = Vec::new();
    for r in rows {
        let name: String = r.try_get(0)?;
        let data_type: String = r.try_get(1)?;
        let ty = match data_type.as_str() {
            "bigint" => Type::INT8,
            "integer" => Type::INT4,
            "text" => Type::TEXT,
            "boolean" => Type::BOOL,
            other => {
                return Err(CopyError::Other(anyhow!(
                    "table {table} column {name}: type {other} is not one the move knows; use the upkeep-hub version \
                     that created the database"
                )));
            }
        };
        cols.push(Column { name, ty });
    }
    Ok(cols)
}

/// One SQLite value as the PostgreSQL column's type.
fn convert(v: rusqlite::types::Value, ty: &Type) -> Result<Box<dyn ToSql + Sync>, String> {
    use rusqlite::types::Value as V;
    Ok(match (v, ty) {
        (V::Null, t) if *t == Type::INT8 => Box::new(None::<i64>),
        (V::Null, t) if *t == Type::INT4 => Box::new(None::<i32>),
        (V::Null, t) if *t == Type::BOOL => Box::new(None::<bool>),
        (V::Null, _) => Box::new(None::<String>),
        (V::Integer(i), t) if *t == Type::INT8 => Box::new(i),
        (V::Integer(i), t) if *t == Type::INT4 => {
            Box::new(i32::try_from(i).map_err(|_| format!("{i} does not fit a PostgreSQL integer"))?)
        }
        (V::Integer(i), t) if *t == Type::BOOL => Box::new(i != 0),
        (V::Text(s), t) if *t == Type::TEXT => Box::new(s),
        (v, t) => return Err(format!("holds {:?}, which does not fit PostgreSQL type {t}", v.data_type())),
    })
}

type Copied = (Vec<(String, u64)>, Vec<(String, i64)>);

/// Copies every table in one PostgreSQL transaction (and one SQLite read transaction); commits only when every
/// count matches.
fn copy_all(src: &Connection, c: &mut Client, database: &str) -> anyhow::Result<Copied> {
    let pgerr = |what: String| move |e: ::postgres::Error| anyhow!("store.url: {database}: {what}: {}", one_line(&e));
    let mut tx = c.transaction().map_err(pgerr("starting the transaction".into()))?;
    let tables = pg_tables(&mut tx).map_err(pgerr("listing tables".into()))?;
    check_lists(&tables, &format!("database {database}"), POSTGRES_ONLY).map_err(|e| anyhow!("store.url: {e}"))?;
    tx.batch_execute(&format!("LOCK TABLE {} IN EXCLUSIVE MODE", COPIED.join(", ")))
        .map_err(pgerr("locking the tables".into()))?;
    let holding = fleet_rows(&mut tx).map_err(|e| match e {
        CopyError::Pg(e) => pgerr("counting rows".into())(e),
        CopyError::Other(e) => e,
    })?;
    if !holding.is_empty() {
        bail!("{}", holds_fleet(database, &holding));
    }
    // One snapshot of the SQLite database for every table (the file is read-only here; its hub is stopped).
    src.execute_batch("BEGIN").context("reading the SQLite database")?;
    let mut copied = Vec::new();
    for table in COPIED {
        let cols = pg_columns(&mut tx, table).map_err(|e| match e {
            CopyError::Pg(e) => pgerr(format!("reading the columns of {table}"))(e),
            CopyError::Other(e) => e,
        })?;
        let n = copy_table(src, &mut tx, table, &cols).with_context(|| format!("copying table {table}"))?;
        copied.push((table.to_string(), n));
    }
    // Sequences past every copied number, and past SQLite's high-water mark for the table.
    let high: BTreeMap<String, i64> = {
        let mut stmt = src.prepare("SELECT name, seq FROM sqlite_sequence").context("reading sqlite_sequence")?;
        stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .and_then(|rows| rows.collect::<Result<_, _>>())
            .context("reading sqlite_sequence")?
    };
    let serials = tx
        .query(
            "SELECT table_name::text, column_name::text FROM information_schema.columns
             WHERE table_schema = current_schema() AND (column_default LIKE 'nextval(%' OR is_identity = 'YES')
             ORDER BY 1, 2",
            &[],
        )
        .map_err(pgerr("listing sequences".into()))?;
    let mut sequences = Vec::new();
    for r in serials {
        let (table, column): (String, String) = (
            r.try_get(0).map_err(pgerr("listing sequences".into()))?,
            r.try_get(1).map_err(pgerr("listing sequences".into()))?,
        );
        let max: Option<i64> = tx
            .query_one(&format!("SELECT max({column})::bigint FROM {table}"), &[])
            .and_then(|r| r.try_get(0))
            .map_err(pgerr(format!("reading the largest {table}.{column}")))?;
        let at = max.unwrap_or(0).max(high.get(&table).copied().unwrap_or(0));
        if at > 0 {
            tx.execute("SELECT setval(pg_get_serial_sequence($1, $2), $3)", &[&table, &column, &at])
                .map_err(pgerr(format!("moving the sequence of {table}.{column}")))?;
            sequences.push((format!("{table}.{column}"), at));
        }
    }
    // Verify: every table holds exactly what SQLite holds.
    for (table, n) in &copied {
        let want: i64 = src.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))?;
        let got: i64 = tx
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .and_then(|r| r.try_get(0))
            .map_err(pgerr(format!("counting {table}")))?;
        if got != want || *n as i64 != want {
            bail!(
                "table {table}: SQLite holds {want} rows, {n} were copied and PostgreSQL counts {got}; nothing was committed"
            );
        }
    }
    src.execute_batch("COMMIT").context("reading the SQLite database")?;
    tx.commit().map_err(pgerr("committing".into()))?;
    Ok((copied, sequences))
}

/// Copies one table's rows with binary COPY; returns how many.
fn copy_table(src: &Connection, tx: &mut Transaction<'_>, table: &str, cols: &[Column]) -> anyhow::Result<u64> {
    // The leader's term of replicas: not in SQLite; the column's default (0) is right for a moved fleet.
    let cols: Vec<&Column> =
        cols.iter().filter(|c| !POSTGRES_ONLY_COLUMNS.iter().any(|(t, n)| *t == table && *n == c.name)).collect();
    let sqlite_cols: BTreeSet<String> = {
        let mut stmt = src.prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))?;
        stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<_, _>>()?
    };
    for c in &cols {
        if !sqlite_cols.contains(&c.name) {
            bail!("the SQLite table has no column {}; the schemas disagree (use matching hub versions)", c.name);
        }
    }
    for extra in sqlite_cols.iter().filter(|s| !cols.iter().any(|c| &c.name == *s)) {
        let Some((_, _, why)) = DROPPED_COLUMNS.iter().find(|(t, c, _)| *t == table && c == extra) else {
            bail!("SQLite column {extra} has no PostgreSQL column; the schemas disagree (use matching hub versions)");
        };
        let filled: i64 =
            src.query_row(&format!("SELECT count(*) FROM {table} WHERE {extra} <> ''"), [], |r| r.get(0))?;
        if filled > 0 {
            bail!(
                "SQLite column {extra} ({why}) holds values in {filled} rows; start this upkeep-hub version on the SQLite file once so it migrates, then move it"
            );
        }
    }
    let names: Vec<&str> = cols.iter().map(|c| c.name.as_str()).collect();
    let types: Vec<Type> = cols.iter().map(|c| c.ty.clone()).collect();
    let sink = tx.copy_in(&format!("COPY {table} ({}) FROM STDIN (FORMAT binary)", names.join(", ")))?;
    let mut writer = BinaryCopyInWriter::new(sink, &types);
    let mut stmt = src
        .prepare(&format!("SELECT {} FROM {table} ORDER BY rowid", names.join(", ")))
        .or_else(|_| src.prepare(&format!("SELECT {} FROM {table}", names.join(", "))))?;
    let mut rows = stmt.query([])?;
    let mut n = 0u64;
    while let Some(row) = rows.next()? {
        let mut values: Vec<Box<dyn ToSql + Sync>> = Vec::with_capacity(cols.len());
        for (i, c) in cols.iter().enumerate() {
            let v: rusqlite::types::Value = row.get(i)?;
            values.push(convert(v, &c.ty).map_err(|e| anyhow!("column {}: {e}", c.name))?);
        }
        let refs: Vec<&(dyn ToSql + Sync)> = values.iter().map(|b| b.as_ref()).collect();
        writer.write(&refs).map_err(|e| anyhow!("{}", one_line(&e)))?;
        n += 1;
    }
    writer.finish().map_err(|e| anyhow!("{}", one_line(&e)))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::postgres::{PostgresStore, testing};
    use crate::store::sqlite::SqliteStore;
    use crate::store::*;

    /// A test database dropped when the test ends.
    struct Db(PostgresSettings);
    impl Drop for Db {
        fn drop(&mut self) {
            let _ = testing::drop_database(&self.0);
        }
    }

    fn pg_client(settings: &PostgresSettings) -> Client {
        settings.config.connect(NoTls).unwrap_or_else(|e| panic!("PostgreSQL for the import tests: {e}"))
    }

    /// A table added to either schema without being added to [`COPIED`] (or named as deliberately left) fails
    /// here, before an import ever meets it.
    #[test]
    fn the_copy_list_is_every_table_of_both_schemas() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("hub.db");
        drop(SqliteStore::open(&db).expect("sqlite"));
        let conn = Connection::open(&db).expect("open");
        let sqlite = sqlite_tables(&conn).expect("tables");
        let (_, settings) = testing::fresh_database().expect("postgres");
        let _db = Db(settings.clone());
        let pg =
            std::thread::spawn(move || pg_tables(&mut pg_client(&settings)).expect("tables")).join().expect("thread");
        let copied: BTreeSet<String> = COPIED.iter().map(|t| t.to_string()).collect();
        let with = |only: &[(&str, &str)]| -> BTreeSet<String> {
            copied.iter().cloned().chain(only.iter().map(|(t, _)| t.to_string())).collect()
        };
        assert_eq!(sqlite, with(SQLITE_ONLY), "SQLite tables vs the copy list (import.rs COPIED / SQLITE_ONLY)");
        assert_eq!(pg, with(POSTGRES_ONLY), "PostgreSQL tables vs the copy list (import.rs COPIED / POSTGRES_ONLY)");
        assert!(check_lists(&sqlite, "s", SQLITE_ONLY).is_ok() && check_lists(&pg, "p", POSTGRES_ONLY).is_ok());
        let mut extra = pg.clone();
        extra.insert("leaders".into());
        let e = check_lists(&extra, "database x", POSTGRES_ONLY).expect_err("an unknown table is refused");
        assert!(e.contains("table leaders"), "{e}");
    }

    fn facts(member: &str) -> NodeFacts {
        NodeFacts { member: member.into(), node_pool: "pool1".into(), region: "eu".into(), ..Default::default() }
    }

    fn event(i: i64) -> NewEvent {
        NewEvent {
            at_ms: 1000 + i,
            kind: "run".into(),
            level: "run".into(),
            from: "Pending".into(),
            to: "Running".into(),
            message: format!("event {i}"),
            error: String::new(),
            run_status: "Running".into(),
        }
    }

    /// Fills a SQLite store through the trait, touching every kind of state.
    fn populate(s: &dyn Store) {
        s.record_report("n1", &facts("m1"), 10).expect("report");
        s.record_report("n2", &facts("m2"), 11).expect("report");
        s.set_member_disruption("m1", "2").expect("disruption");
        s.set_member_window("m2", WindowKind::NodeOs, Some("FREQ=DAILY")).expect("window");
        s.next_epoch().expect("epoch");
        s.next_epoch().expect("epoch");
        s.put_job(&JobRecord {
            id: "j1".into(),
            member: "m1".into(),
            status: "Done".into(),
            state: "{}".into(),
            updated_ms: 5,
        })
        .expect("job");
        let regions: BTreeMap<String, i64> = [("eu".to_string(), 7)].into();
        s.put_image(&ImageRecord {
            family: "Debian-12".into(),
            version: "202312.01.0".into(),
            regions: regions.clone(),
            sha256: "a".repeat(64),
            signature: "sig".into(),
            url: "https://example.net/i.img".into(),
            size_bytes: 9,
            published_ms: 7,
        })
        .expect("image");
        s.put_kubernetes("1.30.2", &regions).expect("kubernetes");
        s.put_security_patch(&SecurityPatchRecord {
            family: "Debian-12".into(),
            version: "202312.02.0".into(),
            packages: vec!["openssl=3.0.1".into()],
            published_ms: 8,
        })
        .expect("patch");
        s.put_strategy("all", r#"{"stages":[]}"#).expect("strategy");
        s.create_webhook(&WebhookRecord {
            name: "hook".into(),
            url: "https://example.net/h".into(),
            events: vec!["run.*".into()],
            secret: "s3cret".into(),
            created_ms: 1,
        })
        .expect("webhook");
        s.create_run(&RunRecord {
            name: "r1".into(),
            parts: vec![("state".into(), "{}".into())],
            version: 1,
            status: "Running".into(),
            strategy_name: Some("all".into()),
            created_ms: 3,
        })
        .expect("run");
        let evs: Vec<NewEvent> = (0..5).map(event).collect();
        s.append_events("r1", &evs).expect("events");
        s.enqueue_events(&[OutboxEvent {
            event_type: "run.started".into(),
            subject: "r1".into(),
            time_ms: 4,
            data: "{}".into(),
        }])
        .expect("outbox");
        let due = s.due_deliveries("hook", i64::MAX, 10).expect("due");
        assert!(!due.is_empty(), "the fixture has deliveries");
        s.record_delivery("hook", due[0].seq, 20, None, 0).expect("delivered");
        s.enqueue_once(
            "notice-1",
            100,
            &[OutboxEvent { event_type: "run.x".into(), subject: "n1".into(), time_ms: 30, data: "{}".into() }],
        )
        .expect("notice");
        s.put_lease(&LeaseRecord {
            node: "n1".into(),
            lease_id: "reboot/1".into(),
            member: "m1".into(),
            holder: "node".into(),
            purpose: "reboot".into(),
            granted_ms: 1,
            expires_ms: i64::MAX,
            forced: true,
        })
        .expect("lease");
        s.put_rollout("m1", "{}").expect("rollout");
        s.put_channel_switch("m2", 3, 4).expect("switch");
        s.revoke_certs(&[RevokedCert {
            serial: "01".into(),
            subject: "n9".into(),
            reason: "lost".into(),
            revoked_by: "op".into(),
            revoked_ms: 2,
        }])
        .expect("revoke");
        s.note_node_cert("n1", "02", 3).expect("cert");
        s.create_join_token(&JoinTokenRecord {
            id: "t1".into(),
            secret_sha256: "b".repeat(64),
            member: "m3".into(),
            node_pool: "pool1".into(),
            expires_ms: i64::MAX,
            uses_left: 2,
            created_by: "op".into(),
            created_ms: 1,
        })
        .expect("token");
        s.use_join_token("t1", &"b".repeat(64), "n3", 5).expect("use").expect("accepted");
    }

    /// A table's rows, every column as text.
    type Rows = Vec<Vec<Option<String>>>;

    /// Every row of `table`, every column as text, sorted (the same in both databases when the copy is whole).
    fn sqlite_rows(conn: &Connection, table: &str, cols: &[String]) -> Rows {
        let sql = format!(
            "SELECT {} FROM {table}",
            cols.iter().map(|c| format!("CAST({c} AS TEXT)")).collect::<Vec<_>>().join(", ")
        );
        let mut stmt = conn.prepare(&sql).expect("prepare");
        let mut rows: Rows = stmt
            .query_map([], |r| (0..cols.len()).map(|i| r.get::<_, Option<String>>(i)).collect())
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        rows.sort();
        rows
    }

    #[test]
    fn a_sqlite_store_arrives_whole_and_numbers_continue_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("hub.db");
        let store = SqliteStore::open(&db).expect("sqlite");
        populate(&store);
        // Pruned outbox rows leave SQLite's AUTOINCREMENT mark above the largest seq left: PostgreSQL must not
        // hand those numbers out again.
        s_enqueue_and_prune(&store);
        drop(store);
        let (_, settings) = testing::empty_database().expect("postgres");
        let _db = Db(settings.clone());
        let artifacts = Artifacts::at(&dir.path().join("shared"));
        let from = ImportFrom { sqlite: &db, artifacts_from: &dir.path().join("artifacts") };
        let done = import_sqlite(&from, &settings, &artifacts).expect("import");
        assert_eq!(done.migrations.len() as u32, postgres::SCHEMA_VERSION, "an empty database is migrated first");
        assert_eq!(done.tables.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(), COPIED);
        let conn = Connection::open(&db).expect("open");
        let mut empty = Vec::new();
        let settings2 = settings.clone();
        let pg_side: Vec<(String, Vec<String>, Rows)> = std::thread::spawn(move || {
            let mut c = pg_client(&settings2);
            let mut out = Vec::new();
            for t in COPIED {
                let cols: Vec<String> = c
                    .query(
                        "SELECT column_name::text FROM information_schema.columns WHERE table_schema = current_schema()
                         AND table_name = $1 ORDER BY ordinal_position",
                        &[t],
                    )
                    .expect("columns")
                    .iter()
                    .map(|r| r.get::<_, String>(0))
                    .filter(|c| !POSTGRES_ONLY_COLUMNS.iter().any(|(tt, n)| tt == t && n == c))
                    .collect();
                // Booleans as SQLite stores them (0/1), everything else as text.
                let select = cols
                    .iter()
                    .map(|c| {
                        format!(
                            "CASE WHEN pg_typeof({c}) = 'boolean'::regtype THEN ({c})::int::text ELSE ({c})::text END"
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                let mut rows: Rows = c
                    .query(&format!("SELECT {select} FROM {t}"), &[])
                    .expect("rows")
                    .iter()
                    .map(|r| (0..cols.len()).map(|i| r.get::<_, Option<String>>(i)).collect())
                    .collect();
                rows.sort();
                out.push((t.to_string(), cols, rows));
            }
            out
        })
        .join()
        .expect("thread");
        for (table, cols, rows) in &pg_side {
            assert_eq!(&sqlite_rows(&conn, table, cols), rows, "table {table} differs after the move");
            if rows.is_empty() {
                empty.push(table.as_str());
            }
        }
        assert!(empty.is_empty(), "the fixture leaves tables empty, so their copy is untested: {empty:?}");
        // Numbers continue after the copied ones.
        let pg = PostgresStore::open(&settings).expect("open");
        let before = pg.events_since("r1", 0).expect("events");
        assert_eq!(before.len(), 5);
        let next = pg.append_events("r1", &[event(9)]).expect("append");
        assert!(next[0].seq > before.last().map(|e| e.seq).unwrap_or(0), "{next:?}");
        assert_eq!(pg.next_epoch().expect("epoch"), 3, "the epoch came along");
        let (_, seq_at) = done.sequences.iter().find(|(s, _)| s == "outbox.seq").expect("outbox sequence moved");
        let max_left: i64 = conn.query_row("SELECT max(seq) FROM outbox", [], |r| r.get(0)).expect("max");
        assert!(*seq_at > max_left, "the outbox sequence stands past pruned numbers ({seq_at} > {max_left})");
        drop(pg);
        // A second move into the same database is refused and changes nothing.
        let e = import_sqlite(&from, &settings, &artifacts).expect_err("a database holding a fleet");
        let e = format!("{e:#}");
        assert!(e.contains("already holds hub state") && e.contains("createdb") && !e.contains('\n'), "{e}");
        let pg = PostgresStore::open(&settings).expect("open");
        assert_eq!(pg.events_since("r1", 0).expect("events").len(), 6, "nothing changed");
    }

    #[test]
    fn image_files_are_verified_placed_once_and_given_to_the_hubs_user() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let old = Artifacts::at(&dir.path().join("old"));
        let (good, _) = old.put(&b"an image"[..], None).expect("put");
        let to = Artifacts::at(&dir.path().join("shared/artifacts"));
        let me = std::fs::metadata(dir.path()).map(|m| (m.uid(), m.gid())).expect("meta");
        // As root the files go to the hub's user; as anyone else they are already the caller's.
        let owner = if me.0 == 0 { (65534, 65534) } else { me };
        let from = dir.path().join("old");
        let needed = vec![("Debian-12-1".to_string(), good.clone())];
        let moved = move_artifacts(&from, &blob_digests(&from).expect("ls"), &to, &needed, owner).expect("move");
        assert_eq!(moved.linked + moved.copied, 1, "{moved:?}");
        let placed = to.path(&good).expect("path");
        assert_eq!(std::fs::read(&placed).expect("read"), b"an image");
        for p in [placed.as_path(), to.dir(), dir.path().join("shared/artifacts").as_path()] {
            let m = std::fs::metadata(p).expect("meta");
            assert_eq!((m.uid(), m.gid()), owner, "{}", p.display());
        }
        // Again: already there, checked, nothing placed twice.
        let again = move_artifacts(&from, &blob_digests(&from).expect("ls"), &to, &needed, owner).expect("again");
        assert_eq!(again, ArtifactsMoved { linked: 0, copied: 0, present: 1 });
        // A file whose bytes do not hash to its name is refused, and so is an image whose file is nowhere.
        let bad = "0".repeat(64);
        std::fs::write(old.dir().join(&bad), b"tampered").expect("write");
        let e = move_artifacts(&from, std::slice::from_ref(&bad), &to, &[], owner).expect_err("tampered").to_string();
        assert!(e.contains("hashes to") && e.contains("publish that image again"), "{e}");
        assert!(!to.path(&bad).expect("path").exists(), "a refused file is not placed");
        let missing = vec![("Debian-12-2".to_string(), "1".repeat(64))];
        let e = move_artifacts(&from, &[], &to, &missing, owner).expect_err("missing").to_string();
        assert!(e.contains("image Debian-12-2") && e.contains("--artifacts-from"), "{e}");
    }

    /// Enqueues more outbox events, delivers and prunes them, so that the largest seq left is below SQLite's mark.
    fn s_enqueue_and_prune(s: &SqliteStore) {
        for i in 0..3 {
            s.enqueue_events(&[OutboxEvent {
                event_type: "run.y".into(),
                subject: format!("s{i}"),
                time_ms: 40,
                data: "{}".into(),
            }])
            .expect("outbox");
        }
        for d in s.due_deliveries("hook", i64::MAX, 10).expect("due") {
            if d.event.event_type == "run.y" {
                s.record_delivery("hook", d.seq, 50, None, 0).expect("delivered");
            }
        }
        s.prune_outbox(60).expect("prune");
    }
}
