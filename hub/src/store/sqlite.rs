//! The embedded default store: one SQLite file in WAL mode.
//!
//! One connection behind a mutex: SQLite serialises writers anyway, and every statement here is short.
//! Schema changes are numbered migrations applied in order and recorded in `PRAGMA user_version`.

use super::runparts::RunWrite;
use super::{
    Delivery, EventRecord, ImageRecord, JobRecord, JoinTokenRecord, LeaseRecord, LeasesOf, MemberRecord,
    MemberSettings, NewEvent, NodeFacts, NodeRecord, OutboxEvent, ReportWrite, RevokedCert, RunRecord,
    SecurityPatchRecord, Store, StoreError, TokenRefusal, WebhookRecord, WebhookStatus, WindowKind,
};
use rusqlite::{Connection, OptionalExtension, params};

/// A query of the `leases` table: the columns `lease_from_row` reads, then `$rest` (its `WHERE` and `ORDER BY`).
macro_rules! leases {
    ($rest:literal) => {
        concat!("SELECT node, lease_id, member, holder, purpose, granted_ms, expires_ms, forced FROM leases ", $rest)
    };
}
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use upkeep_core::channel::{AutoUpgradeChannel, NodeOsChannel};

/// Migrations, applied in order; index + 1 is the schema version they lead to.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE members (
        name TEXT PRIMARY KEY,
        node_os_channel TEXT NOT NULL,
        auto_upgrade_channel TEXT NOT NULL,
        generation INTEGER NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE nodes (
        name TEXT PRIMARY KEY,
        member TEXT NOT NULL REFERENCES members(name),
        node_pool TEXT NOT NULL,
        region TEXT NOT NULL,
        facts TEXT NOT NULL,
        first_seen_ms INTEGER NOT NULL,
        last_seen_ms INTEGER NOT NULL,
        last_report_ms INTEGER NOT NULL
    );
    CREATE INDEX nodes_by_member ON nodes(member, name);",
    // 2: member settings, image catalog, strategies, runs and their events.
    "CREATE TABLE member_settings (
        member TEXT PRIMARY KEY REFERENCES members(name),
        node_os_schedule TEXT,
        cluster_schedule TEXT,
        max_unavailable TEXT NOT NULL DEFAULT '1'
    );
    CREATE TABLE images (
        family TEXT NOT NULL,
        version TEXT NOT NULL,
        regions TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        signature TEXT NOT NULL,
        url TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        published_ms INTEGER NOT NULL,
        PRIMARY KEY (family, version)
    );
    CREATE TABLE strategies (name TEXT PRIMARY KEY, spec TEXT NOT NULL);
    CREATE TABLE runs (
        name TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        strategy_name TEXT,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        run TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        kind TEXT NOT NULL,
        level TEXT NOT NULL,
        from_status TEXT NOT NULL,
        to_status TEXT NOT NULL,
        message TEXT NOT NULL,
        error TEXT NOT NULL,
        run_status TEXT NOT NULL
    );
    CREATE INDEX events_by_run ON events(run, seq);",
    // 3: Kubernetes releases by region.
    "CREATE TABLE kubernetes_releases (version TEXT PRIMARY KEY, regions TEXT NOT NULL);",
    // 4: security patches, disruption leases, channel rollouts and owed channel-switch reimages.
    "CREATE TABLE security_patches (
        family TEXT NOT NULL,
        version TEXT NOT NULL,
        packages TEXT NOT NULL,
        published_ms INTEGER NOT NULL,
        PRIMARY KEY (family, version)
    );
    CREATE TABLE leases (
        node TEXT NOT NULL,
        lease_id TEXT NOT NULL,
        member TEXT NOT NULL,
        holder TEXT NOT NULL,
        purpose TEXT NOT NULL,
        granted_ms INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL,
        forced INTEGER NOT NULL,
        PRIMARY KEY (node, lease_id)
    );
    CREATE TABLE rollouts (member TEXT PRIMARY KEY, state TEXT NOT NULL);
    CREATE TABLE channel_switches (member TEXT PRIMARY KEY, generation INTEGER NOT NULL, at_ms INTEGER NOT NULL);",
    // 5: one node-work executor: its jobs, the hub epoch that fences commands, members' drain policies.
    "CREATE TABLE hub_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        member TEXT NOT NULL,
        status TEXT NOT NULL,
        state TEXT NOT NULL,
        updated_ms INTEGER NOT NULL
    );
    CREATE INDEX jobs_by_status ON jobs(status, id);
    ALTER TABLE member_settings ADD COLUMN drain_policy TEXT;",
    // 6: run states in parts (`store::runparts`): one member's transition writes that member's row. A state
    // stored whole becomes the run's single `state` part, read as is and split at its next commit.
    "CREATE TABLE run_parts (
        run TEXT NOT NULL,
        key TEXT NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (run, key)
    );
    ALTER TABLE runs ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE runs ADD COLUMN status TEXT NOT NULL DEFAULT '';
    INSERT INTO run_parts (run, key, body) SELECT name, 'state', state FROM runs;
    UPDATE runs SET state = '', status = COALESCE(json_extract(state, '$.run.status'), '')
        WHERE json_valid(state);
    UPDATE runs SET state = '';",
    // 7: revoked certificates, and the serials each node presented (so that forgetting a node revokes them).
    "CREATE TABLE revoked_certs (
        serial TEXT PRIMARY KEY,
        subject TEXT NOT NULL,
        reason TEXT NOT NULL,
        revoked_by TEXT NOT NULL,
        revoked_ms INTEGER NOT NULL
    );
    CREATE TABLE node_certs (
        node TEXT NOT NULL,
        serial TEXT NOT NULL,
        first_seen_ms INTEGER NOT NULL,
        PRIMARY KEY (node, serial)
    );
    CREATE INDEX node_certs_by_serial ON node_certs(serial);",
    // Join tokens: the secret is kept only as its SHA-256; every use is recorded with the node that joined.
    "CREATE TABLE join_tokens (
        id TEXT PRIMARY KEY,
        secret_sha256 TEXT NOT NULL,
        member TEXT NOT NULL,
        node_pool TEXT NOT NULL,
        expires_ms INTEGER NOT NULL,
        uses_left INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE join_token_uses (
        token_id TEXT NOT NULL,
        node TEXT NOT NULL,
        at_ms INTEGER NOT NULL
    );",
    // 9: webhooks, the outbox of events for them, and each webhook's progress through it (`crate::webhooks`).
    "CREATE TABLE webhooks (
        name TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        events TEXT NOT NULL,
        secret TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        failures INTEGER NOT NULL DEFAULT 0,
        last_attempt_ms INTEGER NOT NULL DEFAULT 0,
        last_error TEXT NOT NULL DEFAULT '',
        last_delivered_ms INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        type TEXT NOT NULL,
        subject TEXT NOT NULL,
        time_ms INTEGER NOT NULL,
        data TEXT NOT NULL
    );
    CREATE TABLE webhook_deliveries (
        webhook TEXT NOT NULL,
        seq INTEGER NOT NULL,
        subject TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_ms INTEGER NOT NULL DEFAULT 0,
        delivered_ms INTEGER,
        PRIMARY KEY (webhook, seq)
    );
    CREATE INDEX deliveries_pending ON webhook_deliveries(webhook, subject, seq) WHERE delivered_ms IS NULL;
    CREATE INDEX deliveries_by_seq ON webhook_deliveries(seq);
    CREATE INDEX deliveries_done ON webhook_deliveries(delivered_ms) WHERE delivered_ms IS NOT NULL;",
    // 10: notices sent once (`upkeep.maintenance.upcoming`, `crate::schedule::notices`), by key.
    "CREATE TABLE notices (
        key TEXT PRIMARY KEY,
        at_ms INTEGER NOT NULL
    );",
];

/// The schema version this hub's migrations lead to (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The SQLite store.
pub struct SqliteStore {
    conn: std::sync::Arc<Mutex<Connection>>,
    /// Whether any webhook exists, as last read: with none, an event owed to nobody costs no transaction and no
    /// read. Read and changed only with the connection held; a serving hub holds the state directory's lock, so
    /// no other process writes webhooks meanwhile. Exact, unlike `Fleet::webhooks_active`, a hint polled for
    /// every replica that only spares work before an event is made; this decides whether one is stored.
    webhooks: std::sync::atomic::AtomicU8,
    /// Copies the write-ahead log into the database off the writers' path (see [`Checkpointer`]).
    _checkpointer: Checkpointer,
}

/// `SqliteStore::webhooks`: not read since the last change, none, some.
const WEBHOOKS_UNKNOWN: u8 = 0;
const WEBHOOKS_NONE: u8 = 1;
const WEBHOOKS_SOME: u8 = 2;

/// How often the checkpointer copies committed pages from the write-ahead log into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);
/// A log longer than this many pages (16 MiB of 4 KiB pages) is copied to its end with commits held back.
const RESTART_LOG_AFTER_PAGES: i64 = 4096;
/// How soon the next round comes after one that found the log long.
const CHECKPOINT_SOON: std::time::Duration = std::time::Duration::from_millis(50);
/// The log file is cut back to this size when it starts over (`journal_size_limit`).
const LOG_SIZE_LIMIT_BYTES: i64 = 64 * 1024 * 1024;

/// SQLite's automatic checkpoint runs inside the commit that crosses 1000 log pages: that writer copies the pages
/// and syncs the database file while holding the store's one connection, and every other store call (a run's
/// transition, a lease) waits behind it; at 100k nodes such stalls were the tail of the run handoff. Instead a
/// thread with a connection of its own runs a PASSIVE checkpoint every [`CHECKPOINT_EVERY`]: it never blocks a
/// writer. But a PASSIVE checkpoint never lets the log start over while commits keep coming (pages arrive while it
/// copies, so it never reaches the log's end), and under a steady stream of commits the log grew without end:
/// 6.4 GB in the 78 s of the 100k-node bench, every read searching an ever longer log index, the disk filling.
/// So when a round finds more than [`RESTART_LOG_AFTER_PAGES`] pages in the log, it copies the rest while holding
/// the store's connection (commits wait for the pages written during the first pass, not for the whole log); the
/// next commit then writes the log from its start, `journal_size_limit` cuts the file back to
/// [`LOG_SIZE_LIMIT_BYTES`], and the next round comes after [`CHECKPOINT_SOON`]. Dropping the store stops the
/// thread.
struct Checkpointer {
    stop: std::sync::Arc<(Mutex<bool>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    fn start(path: &Path, writer: std::sync::Arc<Mutex<Connection>>) -> Result<Checkpointer, StoreError> {
        let ctx = format!("opening {} for checkpoints", path.display());
        let conn = Connection::open(path).map_err(db(ctx.clone()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(db(ctx.clone()))?;
        // One checkpoint now: the connection opens the log files it keeps, at start rather than mid-run.
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())).map_err(db(ctx))?;
        let stop = std::sync::Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || {
                let (lock, cv) = &*flag;
                let mut stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
                let mut wait = CHECKPOINT_EVERY;
                while !*stopped {
                    stopped = cv.wait_timeout(stopped, wait).unwrap_or_else(|e| e.into_inner()).0;
                    // A log that grew long since the last round grows fast: the next round comes sooner.
                    wait = match checkpoint(&conn, &writer) {
                        Ok(true) => CHECKPOINT_SOON,
                        Ok(false) => CHECKPOINT_EVERY,
                        Err(e) => {
                            tracing::warn!(error = %e, "store checkpoint");
                            CHECKPOINT_EVERY
                        }
                    };
                }
            })
            .map_err(|e| StoreError::Corrupt {
                context: "starting the store checkpoint thread".into(),
                reason: e.to_string(),
            })?;
        Ok(Checkpointer { stop, thread: Some(thread) })
    }
}

/// One round of the checkpointer: a PASSIVE checkpoint; when the log has grown long, a second one while the
/// store's connection is held, so that no commit can add pages meanwhile and the log is copied to its end (the
/// next commit then writes it from its start). Returns whether the log had grown long.
fn checkpoint(conn: &Connection, writer: &Mutex<Connection>) -> rusqlite::Result<bool> {
    let passive = || conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1));
    if passive()? <= RESTART_LOG_AFTER_PAGES {
        return Ok(false);
    }
    // Commits wait here for the pages the first pass did not reach: those written while it ran.
    let _held = writer.lock().unwrap_or_else(|e| e.into_inner());
    passive()?;
    Ok(true)
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn db(context: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Db { context, source: Box::new(source) }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and brings its schema up to date.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let ctx = format!("opening {}", path.display());
        let conn = Connection::open(path).map_err(db(ctx.clone()))?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(db(ctx.clone()))?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(db(ctx.clone()))?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(db(ctx.clone()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(db(ctx.clone()))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(db(ctx.clone()))?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::Corrupt {
                context: ctx,
                reason: format!("schema version {version} is newer than this hub knows ({known}); upgrade the hub"),
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.unchecked_transaction().map_err(db(ctx.clone()))?;
            tx.execute_batch(sql).map_err(db(format!("migrating schema to version {}", i + 1)))?;
            tx.pragma_update(None, "user_version", (i + 1) as i64).map_err(db(ctx.clone()))?;
            tx.commit().map_err(db(ctx.clone()))?;
        }
        // Checkpoints are the checkpointer's; a commit never runs one (see `Checkpointer`).
        conn.pragma_update(None, "wal_autocheckpoint", 0).map_err(db(ctx.clone()))?;
        conn.pragma_update(None, "journal_size_limit", LOG_SIZE_LIMIT_BYTES).map_err(db(ctx.clone()))?;
        // Room for every statement the store prepares with `prepare_cached` (rusqlite keeps 16 by default).
        conn.set_prepared_statement_cache_capacity(128);
        // Plans that never depend on the values bound. Without this SQLite marks a statement that filters on a
        // bound value and sorts (`WHERE member = ?1 ORDER BY ...`) to be planned again whenever the value
        // changes: every lease decision and every reading of a run's events prepared its statement anew.
        conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true).map_err(db(ctx.clone()))?;
        let conn = std::sync::Arc::new(Mutex::new(conn));
        let checkpointer = Checkpointer::start(path, conn.clone())?;
        Ok(SqliteStore {
            conn,
            webhooks: std::sync::atomic::AtomicU8::new(WEBHOOKS_UNKNOWN),
            _checkpointer: checkpointer,
        })
    }

    /// Whether any webhook exists (`conn` is the held connection).
    fn any_webhooks(&self, conn: &Connection) -> Result<bool, StoreError> {
        use std::sync::atomic::Ordering;
        match self.webhooks.load(Ordering::Relaxed) {
            WEBHOOKS_NONE => Ok(false),
            WEBHOOKS_SOME => Ok(true),
            _ => {
                let some: bool = conn
                    .prepare_cached("SELECT EXISTS (SELECT 1 FROM webhooks)")
                    .and_then(|mut stmt| stmt.query_row([], |r| r.get(0)))
                    .map_err(db("reading webhooks"))?;
                self.webhooks.store(if some { WEBHOOKS_SOME } else { WEBHOOKS_NONE }, Ordering::Relaxed);
                Ok(some)
            }
        }
    }

    /// Puts `events` in the outbox for the webhooks that want them, in `tx`, unless no webhook exists.
    fn enqueue_if_wanted(
        &self,
        tx: &Connection,
        events: impl FnOnce() -> Vec<OutboxEvent>,
    ) -> Result<usize, StoreError> {
        if !self.any_webhooks(tx)? {
            return Ok(0);
        }
        enqueue(tx, &events())
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (transactions roll back), so recover the guard.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn member_from_row(conn: &Connection, name: &str) -> Result<Option<MemberRecord>, StoreError> {
    let ctx = format!("reading member {name}");
    let row = conn
        .prepare_cached("SELECT node_os_channel, auto_upgrade_channel, generation FROM members WHERE name = ?1")
        .and_then(|mut s| {
            s.query_row(params![name], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)))
        })
        .optional()
        .map_err(db(ctx.clone()))?;
    let Some((os, auto, generation)) = row else { return Ok(None) };
    let corrupt = |reason: String| StoreError::Corrupt { context: ctx.clone(), reason };
    let node_os_channel = os.parse::<NodeOsChannel>().map_err(|e| corrupt(e.to_string()))?;
    let auto_upgrade_channel = auto.parse::<AutoUpgradeChannel>().map_err(|e| corrupt(e.to_string()))?;
    let mut stmt =
        conn.prepare_cached("SELECT region, node_pool FROM nodes WHERE member = ?1").map_err(db(ctx.clone()))?;
    let mut regions = BTreeSet::new();
    let mut pools = BTreeSet::new();
    let mut count = 0u32;
    let rows = stmt
        .query_map(params![name], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .map_err(db(ctx.clone()))?;
    for row in rows {
        let (region, pool) = row.map_err(db(ctx.clone()))?;
        regions.insert(region);
        pools.insert(pool);
        count += 1;
    }
    Ok(Some(MemberRecord {
        name: name.to_string(),
        node_os_channel,
        auto_upgrade_channel,
        generation: generation as u64,
        node_count: count,
        regions: regions.into_iter().collect(),
        node_pools: pools.into_iter().collect(),
    }))
}

type NodeRow = (String, String, i64, i64, i64);

fn node_from_row(row: NodeRow) -> Result<NodeRecord, StoreError> {
    let (name, facts, first_seen_ms, last_seen_ms, last_report_ms) = row;
    let facts: NodeFacts = serde_json::from_str(&facts)
        .map_err(|e| StoreError::Corrupt { context: format!("reading node {name}"), reason: e.to_string() })?;
    Ok(NodeRecord { name, facts, first_seen_ms, last_seen_ms, last_report_ms })
}

/// Writes one node report inside the caller's transaction; returns the member's configuration as of it.
fn write_report(tx: &Connection, name: &str, facts: &NodeFacts, now_ms: i64) -> Result<MemberRecord, StoreError> {
    let ctx = || format!("recording report of node {name}");
    let json =
        serde_json::to_string(facts).map_err(|e| StoreError::Corrupt { context: ctx(), reason: e.to_string() })?;
    // Prepared once per connection: a report is the store's most frequent write (one per node per result).
    tx.prepare_cached(
        "INSERT INTO members (name, node_os_channel, auto_upgrade_channel, generation, created_ms)
         VALUES (?1, ?2, ?3, 1, ?4) ON CONFLICT(name) DO NOTHING",
    )
    .and_then(|mut s| {
        s.execute(params![
            facts.member,
            NodeOsChannel::default().as_str(),
            AutoUpgradeChannel::default().as_str(),
            now_ms
        ])
    })
    .map_err(db(ctx()))?;
    tx.prepare_cached(
        "INSERT INTO nodes (name, member, node_pool, region, facts, first_seen_ms, last_seen_ms, last_report_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?6)
         ON CONFLICT(name) DO UPDATE SET member = excluded.member, node_pool = excluded.node_pool,
           region = excluded.region, facts = excluded.facts,
           last_seen_ms = max(nodes.last_seen_ms, excluded.last_seen_ms), last_report_ms = excluded.last_report_ms",
    )
    .and_then(|mut s| s.execute(params![name, facts.member, facts.node_pool, facts.region, json, now_ms]))
    .map_err(db(ctx()))?;
    member_from_row(tx, &facts.member)?
        .ok_or_else(|| StoreError::Corrupt { context: ctx(), reason: "member vanished inside a transaction".into() })
}

const NODE_COLUMNS: &str = "name, facts, first_seen_ms, last_seen_ms, last_report_ms";

impl Store for SqliteStore {
    fn record_report(&self, name: &str, facts: &NodeFacts, now_ms: i64) -> Result<MemberRecord, StoreError> {
        let ctx = format!("recording report of node {name}");
        let conn = self.conn();
        let tx = conn.unchecked_transaction().map_err(db(ctx.clone()))?;
        let member = write_report(&tx, name, facts, now_ms)?;
        tx.commit().map_err(db(ctx))?;
        Ok(member)
    }

    fn record_reports(&self, batch: &[ReportWrite]) -> Vec<Result<MemberRecord, StoreError>> {
        super::reports_together_or_alone(self, batch, || {
            let ctx = format!("recording {} node reports", batch.len());
            let conn = self.conn();
            let tx = conn.unchecked_transaction().map_err(db(ctx.clone()))?;
            let members =
                batch.iter().map(|r| write_report(&tx, &r.node, &r.facts, r.now_ms)).collect::<Result<Vec<_>, _>>()?;
            tx.commit().map_err(db(ctx))?;
            Ok(members)
        })
    }

    fn touch_nodes(&self, seen: &[(String, i64)]) -> Result<(), StoreError> {
        let ctx = "recording last-seen times";
        let conn = self.conn();
        let tx = conn.unchecked_transaction().map_err(db(ctx))?;
        {
            let mut stmt = tx
                .prepare_cached("UPDATE nodes SET last_seen_ms = max(last_seen_ms, ?2) WHERE name = ?1")
                .map_err(db(ctx))?;
            for (name, ms) in seen {
                stmt.execute(params![name, ms]).map_err(db(ctx))?;
            }
        }
        tx.commit().map_err(db(ctx))
    }

    fn list_nodes(&self, member: Option<&str>) -> Result<Vec<NodeRecord>, StoreError> {
        let ctx = "listing nodes";
        let conn = self.conn();
        let map = |r: &rusqlite::Row<'_>| -> rusqlite::Result<NodeRow> {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        };
        let rows: Vec<NodeRow> = match member {
            Some(m) => {
                let mut stmt = conn
                    .prepare_cached(&format!("SELECT {NODE_COLUMNS} FROM nodes WHERE member = ?1 ORDER BY name"))
                    .map_err(db(ctx))?;
                stmt.query_map(params![m], map).map_err(db(ctx))?.collect::<Result<_, _>>().map_err(db(ctx))?
            }
            None => {
                let mut stmt = conn
                    .prepare_cached(&format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY member, name"))
                    .map_err(db(ctx))?;
                stmt.query_map([], map).map_err(db(ctx))?.collect::<Result<_, _>>().map_err(db(ctx))?
            }
        };
        rows.into_iter().map(node_from_row).collect()
    }

    fn get_node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        let ctx = format!("reading node {name}");
        let conn = self.conn();
        let row = conn
            .prepare_cached(&format!("SELECT {NODE_COLUMNS} FROM nodes WHERE name = ?1"))
            .and_then(|mut stmt| {
                stmt.query_row(params![name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
                    .optional()
            })
            .map_err(db(ctx))?;
        row.map(node_from_row).transpose()
    }

    fn forget_node(&self, name: &str) -> Result<bool, StoreError> {
        let n =
            self.conn().execute("DELETE FROM nodes WHERE name = ?1", params![name]).map_err(db("forgetting node"))?;
        Ok(n > 0)
    }

    fn list_members(&self) -> Result<Vec<MemberRecord>, StoreError> {
        let ctx = "listing members";
        let conn = self.conn();
        let names: Vec<String> = {
            let mut stmt = conn.prepare_cached("SELECT name FROM members ORDER BY name").map_err(db(ctx))?;
            stmt.query_map([], |r| r.get(0)).map_err(db(ctx))?.collect::<Result<_, _>>().map_err(db(ctx))?
        };
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            if let Some(m) = member_from_row(&conn, &n)? {
                out.push(m);
            }
        }
        Ok(out)
    }

    fn get_member(&self, name: &str) -> Result<Option<MemberRecord>, StoreError> {
        member_from_row(&self.conn(), name)
    }

    fn set_node_os_channel(&self, member: &str, channel: NodeOsChannel) -> Result<MemberRecord, StoreError> {
        self.update_member(member, "node_os_channel", channel.as_str())
    }

    fn set_auto_upgrade_channel(&self, member: &str, channel: AutoUpgradeChannel) -> Result<MemberRecord, StoreError> {
        self.update_member(member, "auto_upgrade_channel", channel.as_str())
    }

    fn member_settings(&self, member: &str) -> Result<MemberSettings, StoreError> {
        settings_of(&self.conn(), member)
    }

    fn all_member_settings(&self) -> Result<Vec<MemberSettings>, StoreError> {
        let ctx = "reading member settings";
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT member, node_os_schedule, cluster_schedule, max_unavailable, drain_policy FROM member_settings",
            )
            .map_err(db(ctx))?;
        stmt.query_map([], |r| {
            Ok(MemberSettings {
                member: r.get(0)?,
                node_os_schedule: r.get(1)?,
                cluster_schedule: r.get(2)?,
                max_unavailable: r.get(3)?,
                drain_policy: r.get(4)?,
            })
        })
        .map_err(db(ctx))?
        .collect::<Result<_, _>>()
        .map_err(db(ctx))
    }

    fn set_member_window(
        &self,
        member: &str,
        kind: WindowKind,
        schedule: Option<&str>,
    ) -> Result<MemberSettings, StoreError> {
        let column = match kind {
            WindowKind::NodeOs => "node_os_schedule",
            WindowKind::Cluster => "cluster_schedule",
        };
        self.upsert_settings(member, column, schedule)
    }

    fn set_member_disruption(&self, member: &str, max_unavailable: &str) -> Result<MemberSettings, StoreError> {
        self.upsert_settings(member, "max_unavailable", Some(max_unavailable))
    }

    fn set_member_drain(&self, member: &str, policy_json: &str) -> Result<MemberSettings, StoreError> {
        self.upsert_settings(member, "drain_policy", Some(policy_json))
    }

    fn next_epoch(&self) -> Result<u64, StoreError> {
        let ctx = "advancing the hub epoch";
        let conn = self.conn();
        let tx = conn.unchecked_transaction().map_err(db(ctx))?;
        tx.execute(
            "INSERT INTO hub_meta (key, value) VALUES ('epoch', 1)
             ON CONFLICT(key) DO UPDATE SET value = value + 1",
            [],
        )
        .map_err(db(ctx))?;
        let epoch: i64 =
            tx.query_row("SELECT value FROM hub_meta WHERE key = 'epoch'", [], |r| r.get(0)).map_err(db(ctx))?;
        tx.commit().map_err(db(ctx))?;
        Ok(epoch as u64)
    }

    fn put_job(&self, job: &JobRecord) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached(
                "INSERT INTO jobs (id, member, status, state, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(id) DO UPDATE SET member = excluded.member, status = excluded.status,
                     state = excluded.state, updated_ms = excluded.updated_ms",
            )
            .and_then(|mut stmt| stmt.execute(params![job.id, job.member, job.status, job.state, job.updated_ms]))
            .map(drop)
            .map_err(db(format!("recording work {}", job.id)))
    }

    fn get_job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        self.conn()
            .query_row(
                "SELECT id, member, status, state, updated_ms FROM jobs WHERE id = ?1",
                params![id],
                job_from_row,
            )
            .optional()
            .map_err(db(format!("reading work {id}")))
    }

    fn list_jobs(&self, status: Option<&str>) -> Result<Vec<JobRecord>, StoreError> {
        let ctx = "listing work";
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, member, status, state, updated_ms FROM jobs WHERE ?1 IS NULL OR status = ?1 ORDER BY id",
            )
            .map_err(db(ctx))?;
        stmt.query_map(params![status], job_from_row).map_err(db(ctx))?.collect::<Result<_, _>>().map_err(db(ctx))
    }

    fn put_image(&self, image: &ImageRecord) -> Result<ImageRecord, StoreError> {
        let ctx = format!("publishing image {}-{}", image.family, image.version);
        let conn = self.conn();
        let tx = conn.unchecked_transaction().map_err(db(ctx.clone()))?;
        let stored = match image_of(&tx, &image.family, &image.version, &ctx)? {
            None => {
                tx.execute(
                    "INSERT INTO images (family, version, regions, sha256, signature, url, size_bytes, published_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    params![
                        image.family,
                        image.version,
                        regions_json(&image.regions, &ctx)?,
                        image.sha256,
                        image.signature,
                        image.url,
                        image.size_bytes as i64,
                        image.published_ms
                    ],
                )
                .map_err(db(ctx.clone()))?;
                image.clone()
            }
            Some(mut old) => {
                same_artifact(&old, image)?;
                // Releases spread region by region: a republish adds regions, it never takes any away (that is
                // `withdraw_image_region`). A region given again takes the availability time given now.
                old.regions.extend(image.regions.iter().map(|(r, at)| (r.clone(), *at)));
                old.url = image.url.clone();
                tx.execute(
                    "UPDATE images SET regions = ?3, url = ?4 WHERE family = ?1 AND version = ?2",
                    params![old.family, old.version, regions_json(&old.regions, &ctx)?, old.url],
                )
                .map_err(db(ctx.clone()))?;
                old
            }
        };
        tx.commit().map_err(db(ctx))?;
        Ok(stored)
    }

    fn withdraw_image_region(&self, family: &str, version: &str, region: &str) -> Result<ImageRecord, StoreError> {
        let ctx = format!("withdrawing image {family}-{version} from region {region}");
        let conn = self.conn();
        let tx = conn.unchecked_transaction().map_err(db(ctx.clone()))?;
        let Some(mut img) = image_of(&tx, family, version, &ctx)? else {
            return Err(StoreError::NotFound {
                kind: "image",
                name: format!("{family}-{version}"),
                hint: "`upkeepctl image list` shows the published versions; nothing was withdrawn",
            });
        };
        let published_in = || img.regions.keys().cloned().collect::<Vec<_>>().join(", ");
        if !img.regions.contains_key(region) {
            return Err(StoreError::Conflict(format!(
                "region: image {family}-{version} is not published in region {region:?} (it is in {}); nothing was \
                 withdrawn",
                published_in()
            )));
        }
        if img.regions.len() == 1 {
            return Err(StoreError::Conflict(format!(
                "region: {region:?} is the only region of image {family}-{version}; a published version keeps at \
                 least one region: publish it in another region first (upkeepctl image publish ... --regions R); \
                 nothing was withdrawn"
            )));
        }
        img.regions.remove(region);
        tx.execute(
            "UPDATE images SET regions = ?3 WHERE family = ?1 AND version = ?2",
            params![family, version, regions_json(&img.regions, &ctx)?],
        )
        .map_err(db(ctx.clone()))?;
        tx.commit().map_err(db(ctx))?;
        Ok(img)
    }

    fn list_images(&self, family: Option<&str>) -> Result<Vec<ImageRecord>, StoreError> {
        let ctx = "listing images";
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT family, version, regions, sha256, signature, url, size_bytes, published_ms FROM images
                 WHERE ?1 IS NULL OR family = ?1 ORDER BY family, published_ms",
            )
            .map_err(db(ctx))?;
        let rows: Vec<(ImageRecord, String)> = stmt
            .query_map(params![family], image_from_row)
            .map_err(db(ctx))?
            .collect::<Result<_, _>>()
            .map_err(db(ctx))?;
        rows.into_iter()
            .map(|(mut img, regions)| {
                img.regions = serde_json::from_str(&regions)
                    .map_err(|e| StoreError::Corrupt { context: ctx.into(), reason: e.to_string() })?;
                Ok(img)
            })
            .collect()
    }

    fn put_kubernetes(
        &self,
        version: &str,
        regions: &std::collections::BTreeMap<String, i64>,
    ) -> Result<(), StoreError> {
        let ctx = format!("publishing Kubernetes {version}");
        let conn = self.conn();
        let tx = conn.unchecked_transaction().map_err(db(ctx.clone()))?;
        let existing: Option<String> = tx
            .query_row("SELECT regions FROM kubernetes_releases WHERE version = ?1", params![version], |r| r.get(0))
            .optional()
            .map_err(db(ctx.clone()))?;
        let mut merged: std::collections::BTreeMap<String, i64> = match existing {
            Some(j) => serde_json::from_str(&j)
                .map_err(|e| StoreError::Corrupt { context: ctx.clone(), reason: e.to_string() })?,
            None => Default::default(),
        };
        merged.extend(regions.iter().map(|(k, v)| (k.clone(), *v)));
        let json = serde_json::to_string(&merged)
            .map_err(|e| StoreError::Corrupt { context: ctx.clone(), reason: e.to_string() })?;
        tx.execute(
            "INSERT INTO kubernetes_releases (version, regions) VALUES (?1, ?2)
             ON CONFLICT(version) DO UPDATE SET regions = excluded.regions",
            params![version, json],
        )
        .map_err(db(ctx.clone()))?;
        tx.commit().map_err(db(ctx))
    }

    fn list_kubernetes(&self) -> Result<Vec<(String, super::Regions)>, StoreError> {
        let ctx = "listing Kubernetes releases";
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT version, regions FROM kubernetes_releases").map_err(db(ctx))?;
        let rows: Vec<(String, String)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(db(ctx))?
            .collect::<Result<_, _>>()
            .map_err(db(ctx))?;
        rows.into_iter()
            .map(|(v, j)| {
                serde_json::from_str(&j)
                    .map(|m| (v, m))
                    .map_err(|e| StoreError::Corrupt { context: ctx.into(), reason: e.to_string() })
            })
            .collect()
    }

    fn put_strategy(&self, name: &str, spec_json: &str) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "INSERT INTO strategies (name, spec) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET spec = excluded.spec",
                params![name, spec_json],
            )
            .map_err(db(format!("storing strategy {name}")))?;
        Ok(())
    }

    fn get_strategy(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.conn()
            .query_row("SELECT spec FROM strategies WHERE name = ?1", params![name], |r| r.get(0))
            .optional()
            .map_err(db(format!("reading strategy {name}")))
    }

    fn list_strategies(&self) -> Result<Vec<(String, String)>, StoreError> {
        let ctx = "listing strategies";
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT name, spec FROM strategies ORDER BY name").map_err(db(ctx))?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(db(ctx))?.collect::<Result<_, _>>().map_err(db(ctx))
    }

    fn delete_strategy(&self, name: &str) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute("DELETE FROM strategies WHERE name = ?1", params![name])
            .map_err(db(format!("deleting strategy {name}")))?;
        Ok(n > 0)
    }

    fn create_run(&self, run: &RunRecord) -> Result<(), StoreError> {
        let ctx = format!("creating run {}", run.name);
        let conn = self.conn();
        let tx = conn.unchecked_transaction().map_err(db(ctx.clone()))?;
        let r = tx.execute(
            "INSERT INTO runs (name, state, strategy_name, created_ms, version, status) VALUES (?1, '', ?2, ?3, ?4, ?5)",
            params![run.name, run.strategy_name, run.created_ms, run.version as i64, run.status],
        );
        match r {
            Ok(_) => {
                tx.execute("DELETE FROM run_parts WHERE run = ?1", params![run.name]).map_err(db(ctx.clone()))?;
                write_parts(&tx, &run.name, &run.parts).map_err(db(ctx.clone()))?;
                tx.commit().map_err(db(ctx))
            }
            Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
                Err(StoreError::Conflict(format!(
                    "a run named {:?} already exists; choose another name or delete it first",
                    run.name
                )))
            }
            Err(e) => Err(db(ctx)(e)),
        }
    }

    fn get_run(&self, name: &str) -> Result<Option<RunRecord>, StoreError> {
        let ctx = format!("reading run {name}");
        let conn = self.conn();
        let rec = conn
            .query_row(
                "SELECT name, strategy_name, created_ms, version, status FROM runs WHERE name = ?1",
                params![name],
                run_from_row,
            )
            .optional()
            .map_err(db(ctx.clone()))?;
        let Some(mut rec) = rec else { return Ok(None) };
        rec.parts = read_parts(&conn, name).map_err(db(ctx))?;
        Ok(Some(rec))
    }

    fn list_runs(&self) -> Result<Vec<RunRecord>, StoreError> {
        let ctx = "listing runs";
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT name, strategy_name, created_ms, version, status FROM runs ORDER BY created_ms, name",
            )
            .map_err(db(ctx))?;
        let mut runs: Vec<RunRecord> =
            stmt.query_map([], run_from_row).map_err(db(ctx))?.collect::<Result<_, _>>().map_err(db(ctx))?;
        for r in &mut runs {
            r.parts = read_parts(&conn, &r.name).map_err(db(ctx))?;
        }
        Ok(runs)
    }

    fn run_version(&self, name: &str) -> Result<Option<u64>, StoreError> {
        self.conn()
            .query_row("SELECT version FROM runs WHERE name = ?1", params![name], |r| r.get::<_, i64>(0))
            .optional()
            .map(|v| v.map(|v| v as u64))
            .map_err(db(format!("reading the version of run {name}")))
    }

    fn run_versions(&self) -> Result<Vec<(String, u64, String)>, StoreError> {
        let ctx = "listing run versions";
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT name, version, status FROM runs ORDER BY created_ms, name").map_err(db(ctx))?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?)))
            .map_err(db(ctx))?
            .collect::<Result<_, _>>()
            .map_err(db(ctx))
    }

    fn delete_run(&self, name: &str) -> Result<bool, StoreError> {
        let ctx = format!("deleting run {name}");
        let conn = self.conn();
        let tx = conn.unchecked_transaction().map_err(db(ctx.clone()))?;
        tx.execute("DELETE FROM events WHERE run = ?1", params![name]).map_err(db(ctx.clone()))?;
        tx.execute("DELETE FROM run_parts WHERE run = ?1", params![name]).map_err(db(ctx.clone()))?;
        let n = tx.execute("DELETE FROM runs WHERE name = ?1", params![name]).map_err(db(ctx.clone()))?;
        tx.commit().map_err(db(ctx))?;
        Ok(n > 0)
    }

    fn commit_run(
        &self,
        name: &str,
        expected: u64,
        status: &str,
        write: &RunWrite,
        events: &[NewEvent],
    ) -> Result<Vec<EventRecord>, StoreError> {
        let ctx = format!("committing run {name}");
        let conn = self.conn();
        let tx = conn.unchecked_transaction().map_err(db(ctx.clone()))?;
        let n = tx
            .prepare_cached("UPDATE runs SET version = version + 1, status = ?3 WHERE name = ?1 AND version = ?2")
            .and_then(|mut stmt| stmt.execute(params![name, expected as i64, status]))
            .map_err(db(ctx.clone()))?;
        if n == 0 {
            return Err(StoreError::Conflict(format!("run {name:?} changed or was deleted meanwhile; plan again")));
        }
        if let RunWrite::Replace(_) = write {
            tx.execute("DELETE FROM run_parts WHERE run = ?1", params![name]).map_err(db(ctx.clone()))?;
        }
        write_parts(&tx, name, write.parts()).map_err(db(ctx.clone()))?;
        let out = insert_events(&tx, name, events)?;
        self.enqueue_if_wanted(&tx, || out.iter().map(super::run_event_outbox).collect())?;
        tx.commit().map_err(db(ctx))?;
        Ok(out)
    }

    fn append_events(&self, run: &str, events: &[NewEvent]) -> Result<Vec<EventRecord>, StoreError> {
        let conn = self.conn();
        let tx = conn.unchecked_transaction().map_err(db("appending events"))?;
        let out = insert_events(&tx, run, events)?;
        self.enqueue_if_wanted(&tx, || out.iter().map(super::run_event_outbox).collect())?;
        tx.commit().map_err(db("appending events"))?;
        Ok(out)
    }

    fn events_since(&self, run: &str, after: u64) -> Result<Vec<EventRecord>, StoreError> {
        let ctx = "reading events";
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT seq, at_ms, kind, level, from_status, to_status, message, error, run_status FROM events
                 WHERE run = ?1 AND seq > ?2 ORDER BY seq",
            )
            .map_err(db(ctx))?;
        stmt.query_map(params![run, after as i64], |r| {
            Ok(EventRecord {
                seq: r.get::<_, i64>(0)? as u64,
                run: run.to_string(),
                event: NewEvent {
                    at_ms: r.get(1)?,
                    kind: r.get(2)?,
                    level: r.get(3)?,
                    from: r.get(4)?,
                    to: r.get(5)?,
                    message: r.get(6)?,
                    error: r.get(7)?,
                    run_status: r.get(8)?,
                },
            })
        })
        .map_err(db(ctx))?
        .collect::<Result<_, _>>()
        .map_err(db(ctx))
    }

    fn put_security_patch(&self, patch: &SecurityPatchRecord) -> Result<(), StoreError> {
        let ctx = format!("publishing security patch {}-{}", patch.family, patch.version);
        let packages = serde_json::to_string(&patch.packages)
            .map_err(|e| StoreError::Corrupt { context: ctx.clone(), reason: e.to_string() })?;
        let conn = self.conn();
        let tx = conn.unchecked_transaction().map_err(db(ctx.clone()))?;
        let existing: Option<String> = tx
            .query_row(
                "SELECT packages FROM security_patches WHERE family = ?1 AND version = ?2",
                params![patch.family, patch.version],
                |r| r.get(0),
            )
            .optional()
            .map_err(db(ctx.clone()))?;
        match existing {
            Some(p) if p == packages => return Ok(()),
            Some(p) => {
                return Err(StoreError::Conflict(format!(
                    "security patch {}-{} is already published with packages {p}; a patch never changes, publish a \
                     new version",
                    patch.family, patch.version
                )));
            }
            None => {}
        }
        tx.execute(
            "INSERT INTO security_patches (family, version, packages, published_ms) VALUES (?1, ?2, ?3, ?4)",
            params![patch.family, patch.version, packages, patch.published_ms],
        )
        .map_err(db(ctx.clone()))?;
        tx.commit().map_err(db(ctx))
    }

    fn list_security_patches(&self, family: Option<&str>) -> Result<Vec<SecurityPatchRecord>, StoreError> {
        let ctx = "listing security patches";
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT family, version, packages, published_ms FROM security_patches
                 WHERE ?1 IS NULL OR family = ?1 ORDER BY family, published_ms",
            )
            .map_err(db(ctx))?;
        let rows: Vec<(String, String, String, i64)> = stmt
            .query_map(params![family], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .map_err(db(ctx))?
            .collect::<Result<_, _>>()
            .map_err(db(ctx))?;
        rows.into_iter()
            .map(|(family, version, packages, published_ms)| {
                let packages = serde_json::from_str(&packages)
                    .map_err(|e| StoreError::Corrupt { context: ctx.into(), reason: e.to_string() })?;
                Ok(SecurityPatchRecord { family, version, packages, published_ms })
            })
            .collect()
    }

    fn put_lease(&self, l: &LeaseRecord) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached(
                "INSERT INTO leases (node, lease_id, member, holder, purpose, granted_ms, expires_ms, forced)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT(node, lease_id) DO UPDATE SET expires_ms = excluded.expires_ms",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![
                    l.node,
                    l.lease_id,
                    l.member,
                    l.holder,
                    l.purpose,
                    l.granted_ms,
                    l.expires_ms,
                    l.forced
                ])
            })
            .map(drop)
            .map_err(db(format!("granting lease {} to node {}", l.lease_id, l.node)))
    }

    fn list_leases(&self) -> Result<Vec<LeaseRecord>, StoreError> {
        let ctx = "listing leases";
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(leases!("ORDER BY member, node, granted_ms")).map_err(db(ctx))?;
        stmt.query_map([], lease_from_row).map_err(db(ctx))?.collect::<Result<_, _>>().map_err(db(ctx))
    }

    fn leases_of(&self, of: LeasesOf<'_>) -> Result<Vec<LeaseRecord>, StoreError> {
        let ctx = "listing leases";
        let (sql, key) = match of {
            LeasesOf::Member(m) => (LEASES_OF_MEMBER, m),
            LeasesOf::Node(n) => (LEASES_OF_NODE, n),
        };
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(sql).map_err(db(ctx))?;
        stmt.query_map(params![key], lease_from_row).map_err(db(ctx))?.collect::<Result<_, _>>().map_err(db(ctx))
    }

    fn release_leases(&self, node: &str, ids: &[String], all_except: bool) -> Result<Vec<LeaseRecord>, StoreError> {
        let ctx = format!("releasing leases of node {node}");
        let conn = self.conn();
        let tx = conn.unchecked_transaction().map_err(db(ctx.clone()))?;
        let held: Vec<LeaseRecord> = {
            let mut stmt = tx.prepare_cached(LEASES_OF_NODE).map_err(db(ctx.clone()))?;
            stmt.query_map(params![node], lease_from_row)
                .map_err(db(ctx.clone()))?
                .collect::<Result<_, _>>()
                .map_err(db(ctx.clone()))?
        };
        let released: Vec<LeaseRecord> = held.into_iter().filter(|l| ids.contains(&l.lease_id) != all_except).collect();
        for l in &released {
            tx.prepare_cached("DELETE FROM leases WHERE node = ?1 AND lease_id = ?2")
                .and_then(|mut stmt| stmt.execute(params![node, l.lease_id]))
                .map_err(db(ctx.clone()))?;
        }
        tx.commit().map_err(db(ctx))?;
        Ok(released)
    }

    fn extend_leases(&self, node: &str, expires_ms: i64) -> Result<(), StoreError> {
        self.conn()
            .execute("UPDATE leases SET expires_ms = MAX(expires_ms, ?2) WHERE node = ?1", params![node, expires_ms])
            .map(drop)
            .map_err(db(format!("extending the leases of node {node}")))
    }

    fn expire_leases(&self, now_ms: i64) -> Result<Vec<LeaseRecord>, StoreError> {
        let ctx = "expiring leases";
        let conn = self.conn();
        let tx = conn.unchecked_transaction().map_err(db(ctx))?;
        let expired: Vec<LeaseRecord> = {
            let mut stmt = tx.prepare_cached(leases!("WHERE expires_ms <= ?1")).map_err(db(ctx))?;
            stmt.query_map(params![now_ms], lease_from_row)
                .map_err(db(ctx))?
                .collect::<Result<_, _>>()
                .map_err(db(ctx))?
        };
        tx.execute("DELETE FROM leases WHERE expires_ms <= ?1", params![now_ms]).map_err(db(ctx))?;
        tx.commit().map_err(db(ctx))?;
        Ok(expired)
    }

    fn put_rollout(&self, member: &str, state_json: &str) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "INSERT INTO rollouts (member, state) VALUES (?1, ?2)
                 ON CONFLICT(member) DO UPDATE SET state = excluded.state",
                params![member, state_json],
            )
            .map(drop)
            .map_err(db(format!("recording the channel rollout of member {member}")))
    }

    fn list_rollouts(&self) -> Result<Vec<(String, String)>, StoreError> {
        let ctx = "listing channel rollouts";
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT member, state FROM rollouts ORDER BY member").map_err(db(ctx))?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(db(ctx))?.collect::<Result<_, _>>().map_err(db(ctx))
    }

    fn put_channel_switch(&self, member: &str, generation: u64, at_ms: i64) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "INSERT INTO channel_switches (member, generation, at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT(member) DO UPDATE SET generation = excluded.generation, at_ms = excluded.at_ms",
                params![member, generation as i64, at_ms],
            )
            .map(drop)
            .map_err(db(format!("recording the channel switch of member {member}")))
    }

    fn list_channel_switches(&self) -> Result<Vec<(String, u64, i64)>, StoreError> {
        let ctx = "listing channel switches";
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT member, generation, at_ms FROM channel_switches").map_err(db(ctx))?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?)))
            .map_err(db(ctx))?
            .collect::<Result<_, _>>()
            .map_err(db(ctx))
    }

    fn clear_channel_switch(&self, member: &str, generation: u64) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "DELETE FROM channel_switches WHERE member = ?1 AND generation = ?2",
                params![member, generation as i64],
            )
            .map(drop)
            .map_err(db(format!("clearing the channel switch of member {member}")))
    }

    fn revoke_certs(&self, certs: &[RevokedCert]) -> Result<(), StoreError> {
        let ctx = "recording revoked certificates";
        let conn = self.conn();
        let tx = conn.unchecked_transaction().map_err(db(ctx))?;
        for c in certs {
            tx.execute(
                "INSERT OR IGNORE INTO revoked_certs (serial, subject, reason, revoked_by, revoked_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![c.serial, c.subject, c.reason, c.revoked_by, c.revoked_ms],
            )
            .map_err(db(ctx))?;
        }
        tx.commit().map_err(db(ctx))
    }

    fn list_revoked_certs(&self) -> Result<Vec<RevokedCert>, StoreError> {
        let ctx = "listing revoked certificates";
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT serial, subject, reason, revoked_by, revoked_ms FROM revoked_certs ORDER BY revoked_ms, serial",
            )
            .map_err(db(ctx))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(RevokedCert {
                    serial: r.get(0)?,
                    subject: r.get(1)?,
                    reason: r.get(2)?,
                    revoked_by: r.get(3)?,
                    revoked_ms: r.get(4)?,
                })
            })
            .map_err(db(ctx))?;
        rows.collect::<Result<_, _>>().map_err(db(ctx))
    }

    fn note_node_cert(&self, node: &str, serial: &str, at_ms: i64) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "INSERT OR IGNORE INTO node_certs (node, serial, first_seen_ms) VALUES (?1, ?2, ?3)",
                params![node, serial, at_ms],
            )
            .map(drop)
            .map_err(db(format!("noting the certificate of node {node}")))
    }

    fn node_cert_serials(&self, node: &str) -> Result<Vec<String>, StoreError> {
        let ctx = format!("listing the certificates of node {node}");
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT serial FROM node_certs WHERE node = ?1 ORDER BY serial")
            .map_err(db(ctx.clone()))?;
        let rows = stmt.query_map(params![node], |r| r.get(0)).map_err(db(ctx.clone()))?;
        rows.collect::<Result<_, _>>().map_err(db(ctx))
    }

    fn node_of_cert(&self, serial: &str) -> Result<Option<String>, StoreError> {
        self.conn()
            .query_row("SELECT node FROM node_certs WHERE serial = ?1 LIMIT 1", params![serial], |r| r.get(0))
            .optional()
            .map_err(db(format!("finding the node of certificate {serial}")))
    }

    fn node_certs(&self) -> Result<Vec<(String, String)>, StoreError> {
        let ctx = "listing node certificates";
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT node, serial FROM node_certs ORDER BY node, serial").map_err(db(ctx))?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(db(ctx))?;
        rows.collect::<Result<_, _>>().map_err(db(ctx))
    }

    fn create_join_token(&self, t: &JoinTokenRecord) -> Result<(), StoreError> {
        self.conn()
            .execute(
                &format!("INSERT INTO join_tokens ({TOKEN_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"),
                params![
                    t.id,
                    t.secret_sha256,
                    t.member,
                    t.node_pool,
                    t.expires_ms,
                    t.uses_left,
                    t.created_by,
                    t.created_ms
                ],
            )
            .map(drop)
            .map_err(db("storing a join token"))
    }

    fn list_join_tokens(&self) -> Result<Vec<JoinTokenRecord>, StoreError> {
        let ctx = "listing join tokens";
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&format!("SELECT {TOKEN_COLUMNS} FROM join_tokens ORDER BY created_ms, id"))
            .map_err(db(ctx))?;
        let rows = stmt.query_map([], token_from_row).map_err(db(ctx))?;
        rows.collect::<Result<_, _>>().map_err(db(ctx))
    }

    fn revoke_join_token(&self, id: &str) -> Result<bool, StoreError> {
        self.conn()
            .execute("DELETE FROM join_tokens WHERE id = ?1", params![id])
            .map(|n| n > 0)
            .map_err(db(format!("revoking join token {id}")))
    }

    fn check_join_token(
        &self,
        id: &str,
        secret_sha256: &str,
        now_ms: i64,
    ) -> Result<Result<JoinTokenRecord, TokenRefusal>, StoreError> {
        checked_token(&self.conn(), id, secret_sha256, now_ms).map_err(db(format!("reading join token {id}")))
    }

    fn use_join_token(
        &self,
        id: &str,
        secret_sha256: &str,
        node: &str,
        now_ms: i64,
    ) -> Result<Result<JoinTokenRecord, TokenRefusal>, StoreError> {
        let ctx = format!("using join token {id}");
        let conn = self.conn();
        let tx = conn.unchecked_transaction().map_err(db(ctx.clone()))?;
        let mut token = match checked_token(&tx, id, secret_sha256, now_ms).map_err(db(ctx.clone()))? {
            Ok(t) => t,
            // Nothing written: the transaction is rolled back on drop.
            Err(refusal) => return Ok(Err(refusal)),
        };
        tx.execute("UPDATE join_tokens SET uses_left = uses_left - 1 WHERE id = ?1 AND uses_left > 0", params![id])
            .map_err(db(ctx.clone()))?;
        tx.execute(
            "INSERT INTO join_token_uses (token_id, node, at_ms) VALUES (?1, ?2, ?3)",
            params![id, node, now_ms],
        )
        .map_err(db(ctx.clone()))?;
        tx.commit().map_err(db(ctx))?;
        token.uses_left -= 1;
        Ok(Ok(token))
    }
    fn create_webhook(&self, h: &WebhookRecord) -> Result<(), StoreError> {
        let ctx = format!("creating webhook {}", h.name);
        let events = serde_json::to_string(&h.events)
            .map_err(|e| StoreError::Corrupt { context: ctx.clone(), reason: e.to_string() })?;
        let conn = self.conn();
        let n = conn
            .execute(
                "INSERT INTO webhooks (name, url, events, secret, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(name) DO NOTHING",
                params![h.name, h.url, events, h.secret, h.created_ms],
            )
            .map_err(db(ctx))?;
        self.webhooks.store(WEBHOOKS_UNKNOWN, std::sync::atomic::Ordering::Relaxed);
        if n == 0 {
            return Err(StoreError::Conflict(format!(
                "webhook {:?} exists; pick another name, or `upkeepctl webhook delete {}` first",
                h.name, h.name
            )));
        }
        Ok(())
    }

    fn list_webhooks(&self) -> Result<Vec<WebhookStatus>, StoreError> {
        let ctx = "listing webhooks";
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT name, url, events, secret, created_ms, failures, last_attempt_ms, last_error,
                    last_delivered_ms,
                    (SELECT COUNT(*) FROM webhook_deliveries d WHERE d.webhook = w.name AND d.delivered_ms IS NULL)
                 FROM webhooks w ORDER BY name",
            )
            .map_err(db(ctx))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    WebhookStatus {
                        hook: WebhookRecord {
                            name: r.get(0)?,
                            url: r.get(1)?,
                            events: Vec::new(),
                            secret: r.get(3)?,
                            created_ms: r.get(4)?,
                        },
                        failures: r.get::<_, i64>(5)? as u64,
                        last_attempt_ms: r.get(6)?,
                        last_error: r.get(7)?,
                        last_delivered_ms: r.get(8)?,
                        pending: r.get::<_, i64>(9)? as u64,
                    },
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(db(ctx))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db(ctx))?;
        rows.into_iter()
            .map(|(mut w, events)| {
                w.hook.events = serde_json::from_str(&events)
                    .map_err(|e| StoreError::Corrupt { context: ctx.into(), reason: e.to_string() })?;
                Ok(w)
            })
            .collect()
    }

    fn delete_webhook(&self, name: &str) -> Result<bool, StoreError> {
        let ctx = format!("deleting webhook {name}");
        let conn = self.conn();
        let tx = conn.unchecked_transaction().map_err(db(ctx.clone()))?;
        tx.execute("DELETE FROM webhook_deliveries WHERE webhook = ?1", params![name]).map_err(db(ctx.clone()))?;
        let n = tx.execute("DELETE FROM webhooks WHERE name = ?1", params![name]).map_err(db(ctx.clone()))?;
        tx.commit().map_err(db(ctx))?;
        self.webhooks.store(WEBHOOKS_UNKNOWN, std::sync::atomic::Ordering::Relaxed);
        Ok(n > 0)
    }

    fn enqueue_events(&self, events: &[OutboxEvent]) -> Result<(), StoreError> {
        let conn = self.conn();
        if events.is_empty() || !self.any_webhooks(&conn)? {
            return Ok(());
        }
        let tx = conn.unchecked_transaction().map_err(db("enqueueing webhook events"))?;
        enqueue(&tx, events)?;
        tx.commit().map_err(db("enqueueing webhook events"))
    }

    fn enqueue_once(&self, key: &str, at_ms: i64, events: &[OutboxEvent]) -> Result<bool, StoreError> {
        let ctx = "enqueueing a notice";
        let conn = self.conn();
        let tx = conn.unchecked_transaction().map_err(db(ctx))?;
        let sent: bool = tx
            .query_row("SELECT EXISTS (SELECT 1 FROM notices WHERE key = ?1)", params![key], |r| r.get(0))
            .map_err(db(ctx))?;
        if sent || enqueue(&tx, events)? == 0 {
            return Ok(false);
        }
        tx.execute("INSERT INTO notices (key, at_ms) VALUES (?1, ?2)", params![key, at_ms]).map_err(db(ctx))?;
        tx.commit().map_err(db(ctx))?;
        Ok(true)
    }

    fn due_deliveries(&self, webhook: &str, now_ms: i64, limit: usize) -> Result<Vec<Delivery>, StoreError> {
        let ctx = format!("reading the deliveries owed to webhook {webhook}");
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT d.seq, o.type, o.subject, o.time_ms, o.data, d.attempts
                 FROM webhook_deliveries d JOIN outbox o ON o.seq = d.seq
                 WHERE d.webhook = ?1 AND d.delivered_ms IS NULL AND d.next_attempt_ms <= ?2
                   AND d.seq = (SELECT MIN(h.seq) FROM webhook_deliveries h
                                WHERE h.webhook = d.webhook AND h.subject = d.subject AND h.delivered_ms IS NULL)
                 ORDER BY d.seq LIMIT ?3",
            )
            .map_err(db(ctx.clone()))?;
        stmt.query_map(params![webhook, now_ms, limit as i64], |r| {
            Ok(Delivery {
                seq: r.get::<_, i64>(0)? as u64,
                event: OutboxEvent { event_type: r.get(1)?, subject: r.get(2)?, time_ms: r.get(3)?, data: r.get(4)? },
                attempts: r.get::<_, i64>(5)? as u32,
            })
        })
        .map_err(db(ctx.clone()))?
        .collect::<Result<_, _>>()
        .map_err(db(ctx))
    }

    fn record_delivery(
        &self,
        webhook: &str,
        seq: u64,
        at_ms: i64,
        error: Option<&str>,
        retry_at_ms: i64,
    ) -> Result<(), StoreError> {
        let ctx = format!("recording a delivery to webhook {webhook}");
        let conn = self.conn();
        let tx = conn.unchecked_transaction().map_err(db(ctx.clone()))?;
        match error {
            None => {
                tx.execute(
                    "UPDATE webhook_deliveries SET attempts = attempts + 1, delivered_ms = ?3
                     WHERE webhook = ?1 AND seq = ?2",
                    params![webhook, seq as i64, at_ms],
                )
                .map_err(db(ctx.clone()))?;
                tx.execute(
                    "UPDATE webhooks SET last_attempt_ms = ?2, last_error = '', last_delivered_ms = ?2 WHERE name = ?1",
                    params![webhook, at_ms],
                )
                .map_err(db(ctx.clone()))?;
            }
            Some(e) => {
                tx.execute(
                    "UPDATE webhook_deliveries SET attempts = attempts + 1, next_attempt_ms = ?3
                     WHERE webhook = ?1 AND seq = ?2",
                    params![webhook, seq as i64, retry_at_ms],
                )
                .map_err(db(ctx.clone()))?;
                tx.execute(
                    "UPDATE webhooks SET last_attempt_ms = ?2, last_error = ?3, failures = failures + 1
                     WHERE name = ?1",
                    params![webhook, at_ms, e],
                )
                .map_err(db(ctx.clone()))?;
            }
        }
        tx.commit().map_err(db(ctx))
    }

    fn prune_outbox(&self, before_ms: i64) -> Result<u64, StoreError> {
        let ctx = "pruning the webhook outbox";
        let conn = self.conn();
        let tx = conn.unchecked_transaction().map_err(db(ctx))?;
        tx.execute(
            "DELETE FROM webhook_deliveries WHERE delivered_ms IS NOT NULL AND delivered_ms < ?1",
            params![before_ms],
        )
        .map_err(db(ctx))?;
        let n = tx
            .execute(
                "DELETE FROM outbox WHERE NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.seq = outbox.seq)",
                [],
            )
            .map_err(db(ctx))?;
        tx.execute("DELETE FROM notices WHERE at_ms < ?1", params![before_ms]).map_err(db(ctx))?;
        tx.commit().map_err(db(ctx))?;
        Ok(n as u64)
    }
}

const TOKEN_COLUMNS: &str = "id, secret_sha256, member, node_pool, expires_ms, uses_left, created_by, created_ms";

fn token_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JoinTokenRecord> {
    Ok(JoinTokenRecord {
        id: r.get(0)?,
        secret_sha256: r.get(1)?,
        member: r.get(2)?,
        node_pool: r.get(3)?,
        expires_ms: r.get(4)?,
        uses_left: r.get(5)?,
        created_by: r.get(6)?,
        created_ms: r.get(7)?,
    })
}

/// The token `id` with this secret hash, or why it is refused at `now_ms` (read inside the caller's transaction).
fn checked_token(
    conn: &Connection,
    id: &str,
    secret_sha256: &str,
    now_ms: i64,
) -> rusqlite::Result<Result<JoinTokenRecord, TokenRefusal>> {
    let row = conn
        .query_row(
            &format!("SELECT {TOKEN_COLUMNS} FROM join_tokens WHERE id = ?1 AND secret_sha256 = ?2"),
            params![id, secret_sha256],
            token_from_row,
        )
        .optional()?;
    Ok(match row {
        None => Err(TokenRefusal::Unknown),
        Some(t) if t.expires_ms <= now_ms => Err(TokenRefusal::Expired),
        Some(t) if t.uses_left == 0 => Err(TokenRefusal::UsedUp),
        Some(t) => Ok(t),
    })
}

/// One member's leases (`Store::leases_of`), in `list_leases`' order.
const LEASES_OF_MEMBER: &str = leases!("WHERE member = ?1 ORDER BY member, node, granted_ms");
/// One node's leases, in `list_leases`' order.
const LEASES_OF_NODE: &str = leases!("WHERE node = ?1 ORDER BY member, node, granted_ms");

fn lease_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<LeaseRecord> {
    Ok(LeaseRecord {
        node: r.get(0)?,
        lease_id: r.get(1)?,
        member: r.get(2)?,
        holder: r.get(3)?,
        purpose: r.get(4)?,
        granted_ms: r.get(5)?,
        expires_ms: r.get(6)?,
        forced: r.get(7)?,
    })
}

fn run_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRecord> {
    Ok(RunRecord {
        name: r.get(0)?,
        parts: Vec::new(),
        strategy_name: r.get(1)?,
        created_ms: r.get(2)?,
        version: r.get::<_, i64>(3)? as u64,
        status: r.get(4)?,
    })
}

fn read_parts(conn: &Connection, run: &str) -> rusqlite::Result<Vec<(String, String)>> {
    let mut stmt = conn.prepare_cached("SELECT key, body FROM run_parts WHERE run = ?1")?;
    stmt.query_map(params![run], |r| Ok((r.get(0)?, r.get(1)?)))?.collect()
}

fn write_parts(conn: &Connection, run: &str, parts: &[(String, String)]) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached("INSERT OR REPLACE INTO run_parts (run, key, body) VALUES (?1, ?2, ?3)")?;
    for (k, v) in parts {
        stmt.execute(params![run, k, v])?;
    }
    Ok(())
}

impl SqliteStore {
    fn update_member(&self, member: &str, column: &'static str, value: &str) -> Result<MemberRecord, StoreError> {
        let ctx = format!("setting {column} of member {member}");
        let conn = self.conn();
        let tx = conn.unchecked_transaction().map_err(db(ctx.clone()))?;
        let n = tx
            .execute(
                &format!("UPDATE members SET {column} = ?2, generation = generation + 1 WHERE name = ?1"),
                params![member, value],
            )
            .map_err(db(ctx.clone()))?;
        if n == 0 {
            return Err(StoreError::NotFound {
                kind: "member",
                name: member.to_string(),
                hint: "see `upkeepctl member list` (a member appears when its first node registers)",
            });
        }
        let rec = member_from_row(&tx, member)?;
        tx.commit().map_err(db(ctx.clone()))?;
        rec.ok_or_else(|| StoreError::Corrupt { context: ctx, reason: "member vanished inside a transaction".into() })
    }
}

fn not_found_member(member: &str) -> StoreError {
    StoreError::NotFound {
        kind: "member",
        name: member.to_string(),
        hint: "see `upkeepctl member list` (a member appears when its first node registers)",
    }
}

fn settings_of(conn: &Connection, member: &str) -> Result<MemberSettings, StoreError> {
    let ctx = format!("reading settings of member {member}");
    let exists: bool = conn
        .prepare_cached("SELECT 1 FROM members WHERE name = ?1")
        .and_then(|mut stmt| stmt.query_row(params![member], |_| Ok(true)).optional())
        .map_err(db(ctx.clone()))?
        .unwrap_or(false);
    if !exists {
        return Err(not_found_member(member));
    }
    let row = conn
        .prepare_cached(
            "SELECT node_os_schedule, cluster_schedule, max_unavailable, drain_policy FROM member_settings
             WHERE member = ?1",
        )
        .and_then(|mut stmt| {
            stmt.query_row(params![member], |r| {
                Ok((
                    r.get::<_, Option<String>>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<String>>(3)?,
                ))
            })
            .optional()
        })
        .map_err(db(ctx))?;
    let (node_os_schedule, cluster_schedule, max_unavailable, drain_policy) =
        row.unwrap_or((None, None, "1".to_string(), None));
    Ok(MemberSettings { member: member.to_string(), node_os_schedule, cluster_schedule, max_unavailable, drain_policy })
}

fn job_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRecord> {
    Ok(JobRecord { id: r.get(0)?, member: r.get(1)?, status: r.get(2)?, state: r.get(3)?, updated_ms: r.get(4)? })
}

/// One image version with its regions, if published.
fn image_of(conn: &Connection, family: &str, version: &str, ctx: &str) -> Result<Option<ImageRecord>, StoreError> {
    let row = conn
        .query_row(
            "SELECT family, version, regions, sha256, signature, url, size_bytes, published_ms FROM images
             WHERE family = ?1 AND version = ?2",
            params![family, version],
            image_from_row,
        )
        .optional()
        .map_err(db(ctx))?;
    let Some((mut img, regions)) = row else { return Ok(None) };
    img.regions = serde_json::from_str(&regions)
        .map_err(|e| StoreError::Corrupt { context: ctx.to_string(), reason: e.to_string() })?;
    Ok(Some(img))
}

fn regions_json(regions: &super::Regions, ctx: &str) -> Result<String, StoreError> {
    serde_json::to_string(regions).map_err(|e| StoreError::Corrupt { context: ctx.to_string(), reason: e.to_string() })
}

/// A version's artifact never changes once published: nodes and runs already hold its digest, size and
/// signature. Names the first field that differs and what to do instead.
fn same_artifact(old: &ImageRecord, new: &ImageRecord) -> Result<(), StoreError> {
    let name = format!("{}-{}", old.family, old.version);
    let differs = if old.sha256 != new.sha256 {
        Some(("sha256", format!("sha256 {}, not {}", old.sha256, new.sha256), "artifact"))
    } else if old.size_bytes != new.size_bytes {
        Some(("size_bytes", format!("{} bytes, not {}", old.size_bytes, new.size_bytes), "artifact"))
    } else if old.signature.trim() != new.signature.trim() {
        Some(("signature", "another signature".to_string(), "signature file"))
    } else {
        None
    };
    match differs {
        None => Ok(()),
        Some((field, what, thing)) => Err(StoreError::Conflict(format!(
            "{field}: image {name} is already published with {what}; a published version never changes: to add \
             regions, give the {thing} it was published with; to ship something else, publish a new version"
        ))),
    }
}

fn image_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(ImageRecord, String)> {
    let regions: String = r.get(2)?;
    Ok((
        ImageRecord {
            family: r.get(0)?,
            version: r.get(1)?,
            regions: Default::default(),
            sha256: r.get(3)?,
            signature: r.get(4)?,
            url: r.get(5)?,
            size_bytes: r.get::<_, i64>(6)? as u64,
            published_ms: r.get(7)?,
        },
        regions,
    ))
}

/// Enqueues `events` for the webhooks whose patterns match, inside the caller's transaction; returns how many
/// events some webhook was owed.
fn enqueue(tx: &Connection, events: &[OutboxEvent]) -> Result<usize, StoreError> {
    if events.is_empty() {
        return Ok(0);
    }
    let ctx = "enqueueing webhook events";
    let hooks: Vec<(String, Vec<String>)> = {
        let mut stmt = tx.prepare_cached("SELECT name, events FROM webhooks").map_err(db(ctx))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(db(ctx))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db(ctx))?;
        rows.into_iter()
            .map(|(name, events)| {
                let patterns: Vec<String> = serde_json::from_str(&events)
                    .map_err(|e| StoreError::Corrupt { context: format!("webhook {name}"), reason: e.to_string() })?;
                Ok((name, patterns))
            })
            .collect::<Result<_, StoreError>>()?
    };
    if hooks.is_empty() {
        return Ok(0);
    }
    let mut written = 0;
    let mut outbox = tx
        .prepare_cached("INSERT INTO outbox (type, subject, time_ms, data) VALUES (?1, ?2, ?3, ?4)")
        .map_err(db(ctx))?;
    let mut delivery = tx
        .prepare_cached("INSERT INTO webhook_deliveries (webhook, seq, subject) VALUES (?1, ?2, ?3)")
        .map_err(db(ctx))?;
    for e in events {
        let to: Vec<&String> = hooks
            .iter()
            .filter(|(_, patterns)| upkeep_core::events::type_matches(patterns, &e.event_type))
            .map(|(name, _)| name)
            .collect();
        if to.is_empty() {
            continue;
        }
        outbox.execute(params![e.event_type, e.subject, e.time_ms, e.data]).map_err(db(ctx))?;
        let seq = tx.last_insert_rowid();
        for name in to {
            delivery.execute(params![name, seq, e.subject]).map_err(db(ctx))?;
        }
        written += 1;
    }
    Ok(written)
}

fn insert_events(tx: &Connection, run: &str, events: &[NewEvent]) -> Result<Vec<EventRecord>, StoreError> {
    let ctx = "appending events";
    let mut out = Vec::with_capacity(events.len());
    let mut stmt = tx
        .prepare_cached(
            "INSERT INTO events (run, at_ms, kind, level, from_status, to_status, message, error, run_status)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )
        .map_err(db(ctx))?;
    for e in events {
        stmt.execute(params![run, e.at_ms, e.kind, e.level, e.from, e.to, e.message, e.error, e.run_status])
            .map_err(db(ctx))?;
        out.push(EventRecord { seq: tx.last_insert_rowid() as u64, run: run.to_string(), event: e.clone() });
    }
    Ok(out)
}

impl SqliteStore {
    fn upsert_settings(
        &self,
        member: &str,
        column: &'static str,
        value: Option<&str>,
    ) -> Result<MemberSettings, StoreError> {
        let ctx = format!("setting {column} of member {member}");
        let conn = self.conn();
        let tx = conn.unchecked_transaction().map_err(db(ctx.clone()))?;
        settings_of(&tx, member)?;
        tx.execute("INSERT INTO member_settings (member) VALUES (?1) ON CONFLICT(member) DO NOTHING", params![member])
            .map_err(db(ctx.clone()))?;
        tx.execute(&format!("UPDATE member_settings SET {column} = ?2 WHERE member = ?1"), params![member, value])
            .map_err(db(ctx.clone()))?;
        let out = settings_of(&tx, member)?;
        tx.commit().map_err(db(ctx))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(member: &str, pool: &str, region: &str) -> NodeFacts {
        NodeFacts {
            member: member.into(),
            node_pool: pool.into(),
            region: region.into(),
            node_image_version: "Ubuntu-2204-202311.07.0".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_run_stored_whole_before_parts_is_read_after_the_upgrade_and_split_at_its_next_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.db");
        let whole = r#"{"spec":{"name":"r","upgrade_type":"NodeImageOnly"},"run":{"status":"Running","message":""},
            "stages":[{"name":"s","level":{"status":"Running","message":""},"groups":[{"name":"g",
            "level":{"status":"Running","message":""},"members":[{"name":"m1","level":{"status":"Running",
            "message":""},"attempts":1}]}]}]}"#;
        {
            // A database as a hub of schema 5 left it.
            let conn = Connection::open(&path).expect("open");
            for sql in &MIGRATIONS[..5] {
                conn.execute_batch(sql).expect("old schema");
            }
            conn.pragma_update(None, "user_version", 5).expect("version");
            conn.execute(
                "INSERT INTO runs (name, state, strategy_name, created_ms) VALUES ('r', ?1, NULL, 1)",
                params![whole],
            )
            .expect("old run");
            conn.execute("INSERT INTO runs (name, state, strategy_name, created_ms) VALUES ('bad', '{', NULL, 2)", [])
                .expect("unreadable run");
        }
        let s = SqliteStore::open(&path).expect("upgrade");
        let rec = s.get_run("r").expect("read").expect("run");
        assert_eq!((rec.version, rec.status.as_str()), (1, "Running"));
        let state = rec.state().expect("the whole state is read");
        assert_eq!(state.members().map(|m| m.name.as_str()).collect::<Vec<_>>(), vec!["m1"]);
        let bad = s.get_run("bad").expect("read").expect("run");
        assert_eq!(bad.status, "");
        assert_eq!(bad.state().expect_err("unreadable").part, "state");
        // The next commit writes parts and removes the whole copy; a stale version is a conflict.
        let write = RunWrite::Replace(super::super::runparts::split(&state));
        s.commit_run("r", 1, "Running", &write, &[]).expect("commit");
        let rec = s.get_run("r").expect("read").expect("run");
        assert!(rec.parts.iter().all(|(k, _)| k != super::super::runparts::WHOLE), "{:?}", rec.parts);
        assert_eq!(rec.state().expect("parts"), state);
        assert_eq!(rec.version, 2);
        assert!(matches!(s.commit_run("r", 1, "Running", &write, &[]), Err(StoreError::Conflict(_))));
    }

    #[test]
    fn a_cached_statement_is_not_planned_again_when_its_bound_values_change() {
        let dir = tempfile::tempdir().expect("dir");
        let s = SqliteStore::open(&dir.path().join("hub.db")).expect("open");
        for (i, m) in ["m1", "m2", "m3"].iter().enumerate() {
            let l = LeaseRecord {
                node: format!("n{i}"),
                lease_id: format!("l{i}"),
                member: m.to_string(),
                holder: "operator".into(),
                purpose: "test".into(),
                granted_ms: 1,
                expires_ms: 1_000,
                forced: false,
            };
            s.put_lease(&l).expect("lease");
        }
        for round in 0..3 {
            for (i, m) in ["m1", "m2", "m3", "m4"].iter().enumerate() {
                let mine = s.leases_of(LeasesOf::Member(m)).expect("member's");
                assert_eq!(mine.len(), usize::from(i < 3), "{m}, round {round}");
                s.leases_of(LeasesOf::Node(&format!("n{i}"))).expect("node's");
            }
        }
        let conn = s.conn();
        for sql in [LEASES_OF_MEMBER, LEASES_OF_NODE] {
            let stmt = conn.prepare_cached(sql).expect("cached");
            assert_eq!(stmt.get_status(rusqlite::StatementStatus::RePrepare), 0, "{sql}");
        }
    }

    #[test]
    fn inventory_survives_reopen_and_members_default_to_node_image() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.db");
        {
            let s = SqliteStore::open(&path).expect("open");
            let m = s.record_report("n1", &facts("m1", "p1", "eu"), 1000).expect("record");
            assert_eq!(m.node_os_channel, NodeOsChannel::NodeImage);
            assert_eq!(m.generation, 1);
            s.record_report("n2", &facts("m1", "p2", "us"), 1500).expect("record");
            s.touch_nodes(&[("n1".into(), 5000), ("n2".into(), 100)]).expect("touch");
            s.set_node_os_channel("m1", NodeOsChannel::SecurityPatch).expect("set");
        }
        let s = SqliteStore::open(&path).expect("reopen");
        let nodes = s.list_nodes(None).expect("list");
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[0].last_seen_ms, 5000);
        assert_eq!(nodes[1].last_seen_ms, 1500, "last seen never moves backwards");
        let m = s.get_member("m1").expect("get").expect("exists");
        assert_eq!(m.node_os_channel, NodeOsChannel::SecurityPatch);
        assert_eq!(m.generation, 2);
        assert_eq!(m.node_count, 2);
        assert_eq!(m.regions, vec!["eu".to_string(), "us".to_string()]);
        assert!(matches!(s.set_node_os_channel("nope", NodeOsChannel::None), Err(StoreError::NotFound { .. })));
        assert!(s.forget_node("n1").expect("forget"));
        assert!(!s.forget_node("n1").expect("forget again"));
    }

    fn image(regions: &[(&str, i64)]) -> ImageRecord {
        ImageRecord {
            family: "Debian-12".into(),
            version: "202312.01.0".into(),
            regions: regions.iter().map(|(r, at)| (r.to_string(), *at)).collect(),
            sha256: "ab".repeat(32),
            signature: "untrusted comment: x\nRWQ=\n".into(),
            url: String::new(),
            size_bytes: 7,
            published_ms: 100,
        }
    }

    fn regions_of(s: &SqliteStore) -> Vec<(String, i64)> {
        let all = s.list_images(Some("Debian-12")).expect("list");
        assert_eq!(all.len(), 1);
        all[0].regions.iter().map(|(r, at)| (r.clone(), *at)).collect()
    }

    #[test]
    fn republishing_an_image_adds_regions_and_never_changes_its_artifact() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SqliteStore::open(&dir.path().join("hub.db")).expect("open");
        s.put_image(&image(&[("eu", 1000), ("us", 1000)])).expect("publish");
        let mut later = image(&[("us", 2000), ("ap", 2000)]);
        later.published_ms = 900;
        let stored = s.put_image(&later).expect("republish");
        let want = vec![("ap".to_string(), 2000), ("eu".to_string(), 1000), ("us".to_string(), 2000)];
        assert_eq!(stored.regions.iter().map(|(r, at)| (r.clone(), *at)).collect::<Vec<_>>(), want);
        assert_eq!(stored.published_ms, 100, "first publication time kept");
        assert_eq!(regions_of(&s), want);

        for (field, change) in [
            ("sha256", (|i: &mut ImageRecord| i.sha256 = "cd".repeat(32)) as fn(&mut ImageRecord)),
            ("size_bytes", |i| i.size_bytes = 8),
            ("signature", |i| i.signature = "untrusted comment: y\nRWQ=\n".into()),
        ] {
            let mut other = image(&[("sa", 3000)]);
            change(&mut other);
            let err = s.put_image(&other).expect_err(field).to_string();
            assert!(err.starts_with(&format!("{field}: ")) && err.contains("new version"), "{err}");
            assert_eq!(regions_of(&s), want, "a refused republish changes nothing");
        }
    }

    #[test]
    fn withdrawing_a_region_keeps_the_others_and_refuses_the_last_or_unknown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SqliteStore::open(&dir.path().join("hub.db")).expect("open");
        s.put_image(&image(&[("eu", 1000), ("us", 1000)])).expect("publish");
        let err = s.withdraw_image_region("Debian-12", "202312.01.0", "ap").expect_err("unknown region").to_string();
        assert!(err.contains("not published in region \"ap\"") && err.contains("eu, us"), "{err}");
        let err = s.withdraw_image_region("Debian-12", "202401.01.0", "eu").expect_err("unknown version");
        assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
        let left = s.withdraw_image_region("Debian-12", "202312.01.0", "eu").expect("withdraw");
        assert_eq!(left.regions.keys().collect::<Vec<_>>(), vec!["us"]);
        let err = s.withdraw_image_region("Debian-12", "202312.01.0", "us").expect_err("last region").to_string();
        assert!(err.contains("only region"), "{err}");
        assert_eq!(regions_of(&s), vec![("us".to_string(), 1000)]);
    }

    #[test]
    fn facts_stored_before_booted_image_version_still_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.db");
        let s = SqliteStore::open(&path).expect("open");
        s.record_report("n1", &facts("m1", "p1", "eu"), 1000).expect("record");
        // A row written by a hub that did not know the field.
        let mut old: serde_json::Value = serde_json::to_value(facts("m1", "p1", "eu")).expect("json");
        old.as_object_mut().expect("object").remove("booted_image_version");
        s.conn()
            .execute("UPDATE nodes SET facts = ?1 WHERE name = 'n1'", params![old.to_string()])
            .expect("write old row");
        let n = s.get_node("n1").expect("load").expect("exists");
        assert_eq!(n.facts.booted_image_version, "");
        assert_eq!(n.facts.image_version(), "Ubuntu-2204-202311.07.0", "falls back to the reported version");
        let mut patched = facts("m1", "p1", "eu");
        patched.node_image_version = "Ubuntu-2204-202312.05.1".into();
        patched.booted_image_version = "Ubuntu-2204-202311.07.0".into();
        s.record_report("n1", &patched, 2000).expect("record");
        let n = s.get_node("n1").expect("load").expect("exists");
        assert_eq!(n.facts.image_version(), "Ubuntu-2204-202311.07.0");
        assert_eq!(n.facts.node_image_version, "Ubuntu-2204-202312.05.1");
    }

    #[test]
    fn commits_leave_checkpoints_to_the_checkpointer_which_copies_the_log_into_the_database() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("hub.db");
        let s = SqliteStore::open(&path).expect("open");
        let auto: i64 = s.conn().pragma_query_value(None, "wal_autocheckpoint", |r| r.get(0)).expect("pragma");
        assert_eq!(auto, 0, "no commit runs a checkpoint");
        let before = std::fs::metadata(&path).expect("db").len();
        // ~4 MiB of committed rows: they reach the database file only by a checkpoint.
        let big = "x".repeat(4096);
        for i in 0..1000 {
            s.put_strategy(&format!("s{i}"), &big).expect("write");
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut size = before;
        while size < before + 4_000_000 {
            assert!(std::time::Instant::now() < deadline, "the database file stayed at {size} bytes (was {before})");
            std::thread::sleep(std::time::Duration::from_millis(50));
            size = std::fs::metadata(&path).expect("db").len();
        }
        drop(s);
        let s = SqliteStore::open(&path).expect("reopen");
        assert_eq!(s.list_strategies().expect("list").len(), 1000);
    }

    #[test]
    fn under_a_steady_stream_of_commits_the_log_starts_over_instead_of_growing_without_end() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("hub.db");
        let wal = dir.path().join("hub.db-wal");
        let s = SqliteStore::open(&path).expect("open");
        // 1 GiB of commits back to back (64 KiB rows over 100 names: the database stays small), far faster than
        // a hub writes (~80 MB/s at 100k nodes), the log's size sampled after each. Before, it only grew: here to
        // the whole 1 GiB; now it starts over at every round of the checkpointer and is bounded by what
        // arrives between rounds.
        let mut largest = 0;
        for i in 0..16384 {
            // Every page differs from the last value's: SQLite writes only the pages of a row that changed.
            let big = char::from(b'a' + (i % 26) as u8).to_string().repeat(64 * 1024);
            s.put_strategy(&format!("s{}", i % 100), &big).expect("write");
            largest = largest.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
        }
        assert!(largest < 512 << 20, "the log grew to {} MiB while 1 GiB was committed", largest >> 20);
        assert_eq!(s.list_strategies().expect("list").len(), 100);
    }

    #[test]
    fn a_report_the_database_refuses_fails_alone_and_the_rest_of_its_batch_is_stored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SqliteStore::open(&dir.path().join("hub.db")).expect("open");
        // The database itself refuses one node's row, as a full disk or a broken constraint would one write.
        s.conn()
            .execute_batch(
                "CREATE TRIGGER refuse_bad BEFORE INSERT ON nodes WHEN NEW.name = 'bad'
                 BEGIN SELECT RAISE(ABORT, 'refused by the test trigger'); END;",
            )
            .expect("trigger");
        let w = |node: &str| ReportWrite { node: node.into(), facts: facts("m1", "p", "eu"), now_ms: 1000 };
        let out = s.record_reports(&[w("n1"), w("bad"), w("n2")]);
        assert!(out[0].is_ok() && out[2].is_ok(), "the others are written: {out:?}");
        let err = out[1].as_ref().expect_err("the refused report fails").to_string();
        assert!(err.contains("recording report of node bad") && err.contains("refused by the test trigger"), "{err}");
        let names: Vec<String> = s.list_nodes(None).expect("list").into_iter().map(|n| n.name).collect();
        assert_eq!(names, vec!["n1", "n2"]);
        assert_eq!(out[2].as_ref().map(|m| m.node_count).ok(), Some(2));
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.db");
        Connection::open(&path).expect("open").pragma_update(None, "user_version", 99).expect("set");
        let err = SqliteStore::open(&path).err().expect("refused");
        assert!(err.to_string().contains("upgrade the hub"), "{err}");
    }

    #[test]
    fn join_tokens_are_checked_used_once_per_use_and_refusals_change_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = SqliteStore::open(&dir.path().join("hub.db")).expect("open");
        let t = JoinTokenRecord {
            id: "abc".into(),
            secret_sha256: "h1".into(),
            member: "m1".into(),
            node_pool: "p".into(),
            expires_ms: 1_000,
            uses_left: 2,
            created_by: "upkeep://operator/admin".into(),
            created_ms: 10,
        };
        s.create_join_token(&t).expect("create");
        assert!(s.create_join_token(&t).is_err(), "an id is used once");
        assert_eq!(s.check_join_token("abc", "h1", 500).expect("check"), Ok(t.clone()));
        assert_eq!(s.check_join_token("abc", "wrong", 500).expect("check"), Err(TokenRefusal::Unknown));
        assert_eq!(s.use_join_token("abc", "wrong", "n0", 500).expect("use"), Err(TokenRefusal::Unknown));
        assert_eq!(s.use_join_token("abc", "h1", "n0", 1_000).expect("use"), Err(TokenRefusal::Expired));
        assert_eq!(s.list_join_tokens().expect("list")[0].uses_left, 2, "refusals took no use");
        assert_eq!(s.use_join_token("abc", "h1", "n1", 500).expect("use").expect("ok").uses_left, 1);
        assert_eq!(s.use_join_token("abc", "h1", "n2", 500).expect("use").expect("ok").uses_left, 0);
        assert_eq!(s.use_join_token("abc", "h1", "n3", 500).expect("use"), Err(TokenRefusal::UsedUp));
        let uses: Vec<String> = s
            .conn()
            .prepare("SELECT node FROM join_token_uses ORDER BY at_ms, node")
            .expect("prepare")
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(uses, vec!["n1", "n2"], "each use recorded with its node, refusals not");
        assert!(s.revoke_join_token("abc").expect("revoke"));
        assert!(!s.revoke_join_token("abc").expect("revoke again"));
        assert_eq!(s.check_join_token("abc", "h1", 500).expect("check"), Err(TokenRefusal::Unknown));
    }
}
