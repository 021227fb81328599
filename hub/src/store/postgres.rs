//! The server store: PostgreSQL, for hubs that outgrow one machine's SQLite file.
//!
//! The [`Store`] trait is synchronous and is called from tokio worker threads, where the synchronous `postgres`
//! client must not run (it drives its own runtime). So every connection lives on an OS thread of its own: a call
//! packs its work into a job, the first free connection thread runs it, and the caller waits for the answer, as it
//! waits for SQLite's mutex. Callers need no runtime and may be anywhere.
//!
//! A connection found broken (the server restarted, the backend was terminated) is dropped after the call that
//! found it, which fails; that thread reconnects for its next job, and every other thread checks its own
//! connection once before its next job, so one restart costs the calls in flight and the one that discovered it.
//!
//! Semantics follow `sqlite.rs` statement for statement. Where SQLite's single writer made an order or a check
//! safe by itself, a lock says so here: events of one run are appended under a transaction-level advisory lock
//! (so sequence numbers become visible in increasing order), and read-modify-write of the catalog, security
//! patches and join tokens locks what it reads.
//!
//! The schema is a list of numbered migrations applied by `upkeep-hub migrate` (never by a serving hub) and
//! recorded in `schema_migrations`; a hub refuses a database behind or ahead of [`SCHEMA_VERSION`].

use super::runparts::RunWrite;
use super::{
    Delivery, EventRecord, ImageRecord, JobRecord, JoinTokenRecord, LeaseRecord, LeasesOf, MemberRecord,
    MemberSettings, NewEvent, NodeFacts, NodeRecord, OutboxEvent, RelayWait, ReportWrite, RevokedCert, RunRecord,
    SecurityPatchRecord, SessionChange, SessionPlace, Store, StoreError, TokenRefusal, WebhookRecord, WebhookStatus,
    WindowKind,
};
use ::postgres::types::ToSql;
use ::postgres::{Client, GenericClient, NoTls, Row};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use upkeep_core::channel::{AutoUpgradeChannel, NodeOsChannel};

/// Migrations, applied in order by `upkeep-hub migrate`; index + 1 is the schema version each leads to. Text
/// columns that lists are ordered by use the "C" collation: byte order, as SQLite sorts, whatever the database's
/// locale.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "the hub's tables (as SQLite schema 8)",
        r#"CREATE TABLE members (
        name TEXT COLLATE "C" PRIMARY KEY,
        node_os_channel TEXT NOT NULL,
        auto_upgrade_channel TEXT NOT NULL,
        generation BIGINT NOT NULL,
        created_ms BIGINT NOT NULL
    );
    CREATE TABLE nodes (
        name TEXT COLLATE "C" PRIMARY KEY,
        member TEXT COLLATE "C" NOT NULL REFERENCES members(name),
        node_pool TEXT NOT NULL,
        region TEXT NOT NULL,
        facts TEXT NOT NULL,
        first_seen_ms BIGINT NOT NULL,
        last_seen_ms BIGINT NOT NULL,
        last_report_ms BIGINT NOT NULL
    );
    CREATE INDEX nodes_by_member ON nodes(member, name);
    CREATE TABLE member_settings (
        member TEXT COLLATE "C" PRIMARY KEY REFERENCES members(name),
        node_os_schedule TEXT,
        cluster_schedule TEXT,
        max_unavailable TEXT NOT NULL DEFAULT '1',
        drain_policy TEXT
    );
    CREATE TABLE images (
        family TEXT COLLATE "C" NOT NULL,
        version TEXT COLLATE "C" NOT NULL,
        regions TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        signature TEXT NOT NULL,
        url TEXT NOT NULL,
        size_bytes BIGINT NOT NULL,
        published_ms BIGINT NOT NULL,
        PRIMARY KEY (family, version)
    );
    CREATE TABLE strategies (name TEXT COLLATE "C" PRIMARY KEY, spec TEXT NOT NULL);
    CREATE TABLE runs (
        name TEXT COLLATE "C" PRIMARY KEY,
        strategy_name TEXT,
        created_ms BIGINT NOT NULL,
        version BIGINT NOT NULL,
        status TEXT NOT NULL
    );
    CREATE TABLE run_parts (
        run TEXT COLLATE "C" NOT NULL,
        key TEXT COLLATE "C" NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (run, key)
    );
    CREATE TABLE events (
        seq BIGSERIAL PRIMARY KEY,
        run TEXT COLLATE "C" NOT NULL,
        at_ms BIGINT NOT NULL,
        kind TEXT NOT NULL,
        level TEXT NOT NULL,
        from_status TEXT NOT NULL,
        to_status TEXT NOT NULL,
        message TEXT NOT NULL,
        error TEXT NOT NULL,
        run_status TEXT NOT NULL
    );
    CREATE INDEX events_by_run ON events(run, seq);
    CREATE TABLE kubernetes_releases (version TEXT COLLATE "C" PRIMARY KEY, regions TEXT NOT NULL);
    CREATE TABLE security_patches (
        family TEXT COLLATE "C" NOT NULL,
        version TEXT COLLATE "C" NOT NULL,
        packages TEXT NOT NULL,
        published_ms BIGINT NOT NULL,
        PRIMARY KEY (family, version)
    );
    CREATE TABLE leases (
        node TEXT COLLATE "C" NOT NULL,
        lease_id TEXT COLLATE "C" NOT NULL,
        member TEXT COLLATE "C" NOT NULL,
        holder TEXT NOT NULL,
        purpose TEXT NOT NULL,
        granted_ms BIGINT NOT NULL,
        expires_ms BIGINT NOT NULL,
        forced BOOLEAN NOT NULL,
        PRIMARY KEY (node, lease_id)
    );
    CREATE TABLE rollouts (member TEXT COLLATE "C" PRIMARY KEY, state TEXT NOT NULL);
    CREATE TABLE channel_switches (
        member TEXT COLLATE "C" PRIMARY KEY,
        generation BIGINT NOT NULL,
        at_ms BIGINT NOT NULL
    );
    CREATE TABLE hub_meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
    CREATE TABLE jobs (
        id TEXT COLLATE "C" PRIMARY KEY,
        member TEXT NOT NULL,
        status TEXT COLLATE "C" NOT NULL,
        state TEXT NOT NULL,
        updated_ms BIGINT NOT NULL
    );
    CREATE INDEX jobs_by_status ON jobs(status, id);
    CREATE TABLE revoked_certs (
        serial TEXT COLLATE "C" PRIMARY KEY,
        subject TEXT NOT NULL,
        reason TEXT NOT NULL,
        revoked_by TEXT NOT NULL,
        revoked_ms BIGINT NOT NULL
    );
    CREATE TABLE node_certs (
        node TEXT COLLATE "C" NOT NULL,
        serial TEXT COLLATE "C" NOT NULL,
        first_seen_ms BIGINT NOT NULL,
        PRIMARY KEY (node, serial)
    );
    CREATE INDEX node_certs_by_serial ON node_certs(serial);
    CREATE TABLE join_tokens (
        id TEXT COLLATE "C" PRIMARY KEY,
        secret_sha256 TEXT NOT NULL,
        member TEXT NOT NULL,
        node_pool TEXT NOT NULL,
        expires_ms BIGINT NOT NULL,
        uses_left BIGINT NOT NULL,
        created_by TEXT NOT NULL,
        created_ms BIGINT NOT NULL
    );
    CREATE TABLE join_token_uses (
        token_id TEXT NOT NULL,
        node TEXT NOT NULL,
        at_ms BIGINT NOT NULL
    );"#,
    ),
    (
        "webhooks, their outbox and delivery progress, and notices sent once (as SQLite schemas 9 and 10)",
        r#"CREATE TABLE webhooks (
        name TEXT COLLATE "C" PRIMARY KEY,
        url TEXT NOT NULL,
        events TEXT NOT NULL,
        secret TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        failures BIGINT NOT NULL DEFAULT 0,
        last_attempt_ms BIGINT NOT NULL DEFAULT 0,
        last_error TEXT NOT NULL DEFAULT '',
        last_delivered_ms BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE outbox (
        seq BIGSERIAL PRIMARY KEY,
        type TEXT NOT NULL,
        subject TEXT NOT NULL,
        time_ms BIGINT NOT NULL,
        data TEXT NOT NULL
    );
    CREATE TABLE webhook_deliveries (
        webhook TEXT COLLATE "C" NOT NULL,
        seq BIGINT NOT NULL,
        subject TEXT NOT NULL,
        attempts BIGINT NOT NULL DEFAULT 0,
        next_attempt_ms BIGINT NOT NULL DEFAULT 0,
        delivered_ms BIGINT,
        PRIMARY KEY (webhook, seq)
    );
    CREATE INDEX deliveries_pending ON webhook_deliveries(webhook, subject, seq) WHERE delivered_ms IS NULL;
    CREATE INDEX deliveries_by_seq ON webhook_deliveries(seq);
    CREATE INDEX deliveries_done ON webhook_deliveries(delivered_ms) WHERE delivered_ms IS NOT NULL;
    CREATE TABLE notices (
        key TEXT PRIMARY KEY,
        at_ms BIGINT NOT NULL
    );"#,
    ),
    (
        "the leader lease of hub replicas, and the term of the leader that last wrote runs, work, leases and rollouts",
        r#"CREATE TABLE leadership (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        holder TEXT NOT NULL,
        term BIGINT NOT NULL,
        expires_ms BIGINT NOT NULL
    );
    INSERT INTO leadership (id, holder, term, expires_ms) VALUES (1, '', 0, 0);
    ALTER TABLE runs ADD COLUMN term BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN term BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE leases ADD COLUMN term BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE rollouts ADD COLUMN term BIGINT NOT NULL DEFAULT 0;"#,
    ),
    (
        "the relay between hub replicas: notes in commit order, where each agent session is, which replicas live",
        r#"CREATE TABLE relay (
        seq BIGSERIAL PRIMARY KEY,
        at_ms BIGINT NOT NULL,
        body BYTEA NOT NULL
    );
    CREATE INDEX relay_by_time ON relay(at_ms);
    CREATE TABLE session_places (
        node TEXT COLLATE "C" PRIMARY KEY,
        replica TEXT NOT NULL,
        instance BIGINT NOT NULL,
        session BIGINT NOT NULL,
        silent_since_ms BIGINT
    );
    CREATE INDEX session_places_by_replica ON session_places(replica);
    CREATE TABLE replicas (
        name TEXT COLLATE "C" PRIMARY KEY,
        instance BIGINT NOT NULL,
        seen_ms BIGINT NOT NULL
    );"#,
    ),
];

/// The schema version this hub's migrations lead to; a hub serves only a database at exactly this version.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Connection threads when `store.connections` is not set.
pub const DEFAULT_CONNECTIONS: usize = 4;
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long checking a possibly broken connection may take.
const VALID_TIMEOUT: Duration = Duration::from_secs(5);
/// Advisory lock namespaces (the first key of `pg_advisory_xact_lock(int, int)`).
const LOCK_EVENTS: i32 = 0x7570_0001;
const LOCK_CATALOG: i32 = 0x7570_0002;
const LOCK_MIGRATE: i32 = 0x7570_0003;
const LOCK_OUTBOX: i32 = 0x7570_0004;
const LOCK_NOTICE: i32 = 0x7570_0005;
const LOCK_RELAY: i32 = 0x7570_0006;
/// The channel the relay's posts NOTIFY.
const RELAY_CHANNEL: &str = "upkeep_relay";

/// Where the PostgreSQL store is, as `[store]` in hub.toml gives it (password already applied, never printed).
#[derive(Clone)]
pub struct PostgresSettings {
    /// Connection parameters (with the password from `store.password_file` or `UPKEEP_STORE_PASSWORD`).
    pub config: ::postgres::Config,
    /// Connection threads.
    pub connections: usize,
}

impl std::fmt::Debug for PostgresSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSettings")
            .field("database", &self.describe())
            .field("connections", &self.connections)
            .finish()
    }
}

impl PostgresSettings {
    /// Parses a connection string (URL or `key=value` form). A password in it is refused: a hub.toml is read by
    /// more people than the database password should be.
    pub fn parse(url: &str) -> Result<PostgresSettings, String> {
        let config: ::postgres::Config = url.parse().map_err(|e| {
            format!(
                "not a PostgreSQL connection string ({e}); give postgres://USER@HOST:PORT/DBNAME or \
                 \"host=/run/postgresql dbname=upkeep user=upkeep\""
            )
        })?;
        if config.get_password().is_some() {
            return Err("holds a password; remove it from the URL and put it in store.password_file (a file only \
                        the hub can read) or the UPKEEP_STORE_PASSWORD environment variable"
                .into());
        }
        if config.get_dbname().is_none() {
            return Err("names no database; add /DBNAME to the URL (or dbname=NAME)".into());
        }
        if config.get_hosts().is_empty() {
            return Err("names no host; give HOST:PORT, or host=/path/to/socket/directory".into());
        }
        Ok(PostgresSettings { config, connections: DEFAULT_CONNECTIONS })
    }

    /// Sets the password (from a file or the environment).
    pub fn with_password(mut self, password: &str) -> PostgresSettings {
        self.config.password(password);
        self
    }

    /// `user@host:port/dbname`, for messages (never the password).
    pub fn describe(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(::postgres::config::Host::Tcp(h)) => h.clone(),
            Some(::postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "?".into(),
        };
        let port = self.config.get_ports().first().map(|p| format!(":{p}")).unwrap_or_default();
        format!("{}@{host}{port}/{}", self.config.get_user().unwrap_or("?"), self.config.get_dbname().unwrap_or("?"))
    }

    fn connect(&self) -> Result<Client, ::postgres::Error> {
        let mut config = self.config.clone();
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.application_name("upkeep-hub").connect(NoTls)
    }
}

fn db(context: impl Into<String>) -> impl FnOnce(::postgres::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Db { context, source: Box::new(source) }
}

fn corrupt(context: impl Into<String>) -> impl FnOnce(String) -> StoreError {
    let context = context.into();
    move |reason| StoreError::Corrupt { context, reason }
}

/// Why a PostgreSQL store could not be opened or migrated.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The database could not be reached or read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The database's schema is older than this hub's.
    #[error(
        "store.url: database {database} is at schema version {found}, this hub needs {wanted}; run `upkeep-hub \
         migrate --config FILE` (with this hub's configuration), then start the hub"
    )]
    Behind {
        /// `user@host:port/dbname`.
        database: String,
        /// Its version.
        found: u32,
        /// This hub's.
        wanted: u32,
    },
    /// The database's schema is newer than this hub knows.
    #[error(
        "store.url: database {database} is at schema version {found}, newer than this hub knows ({wanted}); \
         upgrade the hub"
    )]
    Ahead {
        /// `user@host:port/dbname`.
        database: String,
        /// Its version.
        found: u32,
        /// This hub's.
        wanted: u32,
    },
}

/// Runs `f` with a fresh connection on a thread of its own (callable from inside a runtime or not).
fn with_connection<R: Send + 'static>(
    settings: &PostgresSettings,
    ctx: String,
    f: impl FnOnce(&mut Client) -> Result<R, StoreError> + Send + 'static,
) -> Result<R, StoreError> {
    let settings = settings.clone();
    let thread = std::thread::Builder::new()
        .name("store-pg-admin".into())
        .spawn(move || {
            let mut client = settings.connect().map_err(db(format!("{ctx}: connecting to {}", settings.describe())))?;
            f(&mut client)
        })
        .map_err(|e| StoreError::Corrupt { context: "starting a store thread".into(), reason: e.to_string() })?;
    thread.join().map_err(|_| StoreError::Corrupt { context: "a store thread".into(), reason: "it panicked".into() })?
}

fn schema_version(c: &mut impl GenericClient) -> Result<u32, StoreError> {
    let ctx = "reading the schema version";
    c.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, description TEXT NOT NULL,
           applied_ms BIGINT NOT NULL)",
    )
    .map_err(db(ctx))?;
    let v: Option<i32> =
        c.query_one("SELECT max(version) FROM schema_migrations", &[]).and_then(|r| r.try_get(0)).map_err(db(ctx))?;
    Ok(v.unwrap_or(0).max(0) as u32)
}

/// Brings the database's schema to [`SCHEMA_VERSION`]; returns the migrations applied (version, description),
/// none when it was already there. Safe to run while another migrates: they take turns.
pub fn migrate(settings: &PostgresSettings) -> Result<Vec<(u32, &'static str)>, OpenError> {
    let database = settings.describe();
    let found = with_connection(settings, "migrating".into(), move |c| {
        let mut tx = c.transaction().map_err(db("migrating"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1, 0)", &[&LOCK_MIGRATE]).map_err(db("migrating"))?;
        let found = schema_version(&mut tx)?;
        if found > SCHEMA_VERSION {
            return Ok(Err(found));
        }
        let mut applied = Vec::new();
        for (i, (what, sql)) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let version = (i + 1) as i32;
            let ctx = format!("migrating the schema to version {version}");
            tx.batch_execute(sql).map_err(db(ctx.clone()))?;
            tx.execute(
                "INSERT INTO schema_migrations (version, description, applied_ms) VALUES ($1, $2, $3)",
                &[&version, what, &chrono::Utc::now().timestamp_millis()],
            )
            .map_err(db(ctx))?;
            applied.push((version as u32, *what));
        }
        tx.commit().map_err(db("migrating"))?;
        Ok(Ok(applied))
    })?;
    found.map_err(|found| OpenError::Ahead { database, found, wanted: SCHEMA_VERSION })
}

/// The database's schema version (0: never migrated).
pub fn current_version(settings: &PostgresSettings) -> Result<u32, StoreError> {
    with_connection(settings, "reading the schema version".into(), schema_version)
}

type Job = Box<dyn FnOnce(&mut Worker) + Send>;

/// One connection thread's state.
struct Worker {
    settings: PostgresSettings,
    client: Option<Client>,
    /// The value of `Shared::broken` this worker's connection has been checked against.
    checked: u64,
    shared: Arc<Shared>,
}

struct Shared {
    /// Bumped whenever a worker finds its connection broken: the others check theirs before their next job.
    broken: AtomicU64,
}

impl Worker {
    fn take_client(&mut self) -> Result<Client, ::postgres::Error> {
        let broken = self.shared.broken.load(Ordering::SeqCst);
        if broken != self.checked {
            self.checked = broken;
            if let Some(c) = self.client.as_mut()
                && c.is_valid(VALID_TIMEOUT).is_err()
            {
                self.client = None;
            }
        }
        match self.client.take() {
            Some(c) if !c.is_closed() => Ok(c),
            _ => {
                let c = self.settings.connect()?;
                self.checked = self.shared.broken.load(Ordering::SeqCst);
                Ok(c)
            }
        }
    }
}

/// Whether a failure means the connection is gone (rather than a statement refused).
fn connection_lost(e: &StoreError) -> bool {
    let StoreError::Db { source, .. } = e else { return false };
    let Some(pg) = source.downcast_ref::<::postgres::Error>() else { return false };
    if pg.is_closed() {
        return true;
    }
    match pg.code() {
        // admin_shutdown, crash_shutdown, cannot_connect_now, and the connection_exception class.
        Some(code) => {
            let c = code.code();
            c.starts_with("57P") || c.starts_with("08")
        }
        // No SQLSTATE: an I/O or protocol failure.
        None => true,
    }
}

/// The PostgreSQL store.
pub struct PostgresStore {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    database: String,
    /// For connections of their own (the relay's listener).
    settings: PostgresSettings,
}

impl PostgresStore {
    /// Connects, checks that the schema is exactly at [`SCHEMA_VERSION`] (a hub never migrates a shared database
    /// on its own: `upkeep-hub migrate` does), and starts the connection threads.
    pub fn open(settings: &PostgresSettings) -> Result<PostgresStore, OpenError> {
        let database = settings.describe();
        let found = current_version(settings)?;
        if found < SCHEMA_VERSION {
            return Err(OpenError::Behind { database, found, wanted: SCHEMA_VERSION });
        }
        if found > SCHEMA_VERSION {
            return Err(OpenError::Ahead { database, found, wanted: SCHEMA_VERSION });
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let shared = Arc::new(Shared { broken: AtomicU64::new(0) });
        let mut threads = Vec::new();
        for i in 0..settings.connections.max(1) {
            let rx = rx.clone();
            let mut worker = Worker { settings: settings.clone(), client: None, checked: 0, shared: shared.clone() };
            let t = std::thread::Builder::new()
                .name(format!("store-pg-{i}"))
                .spawn(move || {
                    loop {
                        let job = {
                            let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
                            rx.recv()
                        };
                        match job {
                            Ok(job) => job(&mut worker),
                            Err(_) => return,
                        }
                    }
                })
                .map_err(|e| StoreError::Corrupt {
                    context: "starting the store's connection threads".into(),
                    reason: e.to_string(),
                })?;
            threads.push(t);
        }
        Ok(PostgresStore { jobs: Mutex::new(Some(tx)), threads, database, settings: settings.clone() })
    }

    /// Runs `f` on a pooled connection and waits for its answer.
    fn run<R: Send + 'static>(
        &self,
        ctx: impl Into<String>,
        f: impl FnOnce(&mut Client) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let ctx = ctx.into();
        let (reply, answer) = mpsc::sync_channel::<Result<R, StoreError>>(1);
        let database = self.database.clone();
        let job_ctx = ctx.clone();
        let job: Job = Box::new(move |w: &mut Worker| {
            let out = match w.take_client() {
                Err(e) => Err(db(format!("{job_ctx}: connecting to {database}"))(e)),
                Ok(mut c) => {
                    let out = f(&mut c);
                    match &out {
                        Err(e) if c.is_closed() || connection_lost(e) => {
                            w.shared.broken.fetch_add(1, Ordering::SeqCst);
                        }
                        _ => w.client = Some(c),
                    }
                    out
                }
            };
            let _ = reply.send(out);
        });
        let gone = || StoreError::Corrupt { context: ctx.clone(), reason: "the store is closed".into() };
        {
            let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
            jobs.as_ref().ok_or_else(gone)?.send(job).map_err(|_| gone())?;
        }
        answer.recv().map_err(|_| gone())?
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // Closing the queue ends every thread after its job in hand.
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A connection of its own, LISTENing on the relay's channel.
struct RelayListener {
    client: Client,
}

impl RelayWait for RelayListener {
    fn wait(&mut self, timeout: Duration) -> Result<bool, StoreError> {
        use ::postgres::fallible_iterator::FallibleIterator;
        let ctx = "waiting for the relay";
        let mut woken = false;
        {
            let mut notifications = self.client.notifications();
            let mut it = notifications.timeout_iter(timeout);
            if it.next().map_err(db(ctx))?.is_some() {
                woken = true;
            }
        }
        // Several posts may have woken it: one read takes them all.
        {
            let mut notifications = self.client.notifications();
            let mut pending = notifications.iter();
            while pending.next().map_err(db(ctx))?.is_some() {}
        }
        if self.client.is_closed() {
            return Err(StoreError::Corrupt { context: ctx.into(), reason: "the connection closed".into() });
        }
        Ok(woken)
    }
}

/// Writes one node report inside the caller's transaction; returns the member's configuration as of it.
fn write_report(
    tx: &mut impl GenericClient,
    name: &str,
    facts: &NodeFacts,
    now_ms: i64,
) -> Result<MemberRecord, StoreError> {
    let ctx = format!("recording report of node {name}");
    let json = serde_json::to_string(facts).map_err(|e| corrupt(ctx.clone())(e.to_string()))?;
    tx.execute(
        "INSERT INTO members (name, node_os_channel, auto_upgrade_channel, generation, created_ms)
         VALUES ($1, $2, $3, 1, $4) ON CONFLICT (name) DO NOTHING",
        &[&facts.member, &NodeOsChannel::default().as_str(), &AutoUpgradeChannel::default().as_str(), &now_ms],
    )
    .map_err(db(ctx.clone()))?;
    tx.execute(
        "INSERT INTO nodes (name, member, node_pool, region, facts, first_seen_ms, last_seen_ms, last_report_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $6, $6)
         ON CONFLICT (name) DO UPDATE SET member = excluded.member, node_pool = excluded.node_pool,
           region = excluded.region, facts = excluded.facts,
           last_seen_ms = GREATEST(nodes.last_seen_ms, excluded.last_seen_ms),
           last_report_ms = excluded.last_report_ms",
        &[&name, &facts.member, &facts.node_pool, &facts.region, &json, &now_ms],
    )
    .map_err(db(ctx.clone()))?;
    member_of(tx, &facts.member)?.ok_or_else(|| corrupt(ctx)("member vanished inside a transaction".into()))
}

fn member_of(c: &mut impl GenericClient, name: &str) -> Result<Option<MemberRecord>, StoreError> {
    let ctx = format!("reading member {name}");
    let Some(row) = c
        .query_opt("SELECT node_os_channel, auto_upgrade_channel, generation FROM members WHERE name = $1", &[&name])
        .map_err(db(ctx.clone()))?
    else {
        return Ok(None);
    };
    let os: String = row.try_get(0).map_err(db(ctx.clone()))?;
    let auto: String = row.try_get(1).map_err(db(ctx.clone()))?;
    let generation: i64 = row.try_get(2).map_err(db(ctx.clone()))?;
    let node_os_channel = os.parse::<NodeOsChannel>().map_err(|e| corrupt(ctx.clone())(e.to_string()))?;
    let auto_upgrade_channel = auto.parse::<AutoUpgradeChannel>().map_err(|e| corrupt(ctx.clone())(e.to_string()))?;
    let mut regions = BTreeSet::new();
    let mut pools = BTreeSet::new();
    let mut count = 0u32;
    for r in c.query("SELECT region, node_pool FROM nodes WHERE member = $1", &[&name]).map_err(db(ctx.clone()))? {
        regions.insert(r.try_get::<_, String>(0).map_err(db(ctx.clone()))?);
        pools.insert(r.try_get::<_, String>(1).map_err(db(ctx.clone()))?);
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

const NODE_COLUMNS: &str = "name, facts, first_seen_ms, last_seen_ms, last_report_ms";

fn node_from_row(r: &Row, ctx: &str) -> Result<NodeRecord, StoreError> {
    let name: String = r.try_get(0).map_err(db(ctx))?;
    let facts: String = r.try_get(1).map_err(db(ctx))?;
    let facts: NodeFacts =
        serde_json::from_str(&facts).map_err(|e| corrupt(format!("reading node {name}"))(e.to_string()))?;
    Ok(NodeRecord {
        name,
        facts,
        first_seen_ms: r.try_get(2).map_err(db(ctx))?,
        last_seen_ms: r.try_get(3).map_err(db(ctx))?,
        last_report_ms: r.try_get(4).map_err(db(ctx))?,
    })
}

fn not_found_member(member: &str) -> StoreError {
    StoreError::NotFound {
        kind: "member",
        name: member.to_string(),
        hint: "see `upkeepctl member list` (a member appears when its first node registers)",
    }
}

fn settings_from_row(r: &Row, ctx: &str) -> Result<MemberSettings, StoreError> {
    Ok(MemberSettings {
        member: r.try_get(0).map_err(db(ctx))?,
        node_os_schedule: r.try_get(1).map_err(db(ctx))?,
        cluster_schedule: r.try_get(2).map_err(db(ctx))?,
        max_unavailable: r.try_get(3).map_err(db(ctx))?,
        drain_policy: r.try_get(4).map_err(db(ctx))?,
    })
}

fn settings_of(c: &mut impl GenericClient, member: &str) -> Result<MemberSettings, StoreError> {
    let ctx = format!("reading settings of member {member}");
    if c.query_opt("SELECT 1 FROM members WHERE name = $1", &[&member]).map_err(db(ctx.clone()))?.is_none() {
        return Err(not_found_member(member));
    }
    match c
        .query_opt(
            "SELECT member, node_os_schedule, cluster_schedule, max_unavailable, drain_policy FROM member_settings
             WHERE member = $1",
            &[&member],
        )
        .map_err(db(ctx.clone()))?
    {
        Some(r) => settings_from_row(&r, &ctx),
        None => Ok(MemberSettings::defaults(member)),
    }
}

const IMAGE_COLUMNS: &str = "family, version, regions, sha256, signature, url, size_bytes, published_ms";

fn image_from_row(r: &Row, ctx: &str) -> Result<ImageRecord, StoreError> {
    let regions: String = r.try_get(2).map_err(db(ctx))?;
    Ok(ImageRecord {
        family: r.try_get(0).map_err(db(ctx))?,
        version: r.try_get(1).map_err(db(ctx))?,
        regions: serde_json::from_str(&regions).map_err(|e| corrupt(ctx)(e.to_string()))?,
        sha256: r.try_get(3).map_err(db(ctx))?,
        signature: r.try_get(4).map_err(db(ctx))?,
        url: r.try_get(5).map_err(db(ctx))?,
        size_bytes: r.try_get::<_, i64>(6).map_err(db(ctx))? as u64,
        published_ms: r.try_get(7).map_err(db(ctx))?,
    })
}

/// One image version with its regions, if published, locked until the transaction ends.
fn image_of(
    c: &mut impl GenericClient,
    family: &str,
    version: &str,
    ctx: &str,
) -> Result<Option<ImageRecord>, StoreError> {
    let row = c
        .query_opt(
            &format!("SELECT {IMAGE_COLUMNS} FROM images WHERE family = $1 AND version = $2 FOR UPDATE"),
            &[&family, &version],
        )
        .map_err(db(ctx))?;
    row.map(|r| image_from_row(&r, ctx)).transpose()
}

fn regions_json(regions: &super::Regions, ctx: &str) -> Result<String, StoreError> {
    serde_json::to_string(regions).map_err(|e| corrupt(ctx)(e.to_string()))
}

/// A version's artifact never changes once published (the same rule and words as the SQLite store).
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

/// Takes a transaction-level advisory lock on `key` in namespace `space`.
/// The database's clock in Unix ms (leases of the leadership are measured by it, not by each replica's).
const DB_NOW_MS: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::BIGINT";

/// The fence of a write made with `term` (`store::fence`): inside the write's transaction, the leadership row is
/// share-locked (a change of leader waits for the write to end) and its term must be `term`; else the write is
/// refused. No term: unfenced. Returns the term to record with the write (0 when unfenced).
fn check_term(c: &mut impl GenericClient, term: Option<u64>, ctx: &str) -> Result<i64, StoreError> {
    let Some(term) = term else { return Ok(0) };
    // A leader paused inside this transaction must not hold the leadership row past its lease: the database ends
    // the transaction (and this write) when it idles, so that another replica can be elected.
    c.batch_execute("SET LOCAL idle_in_transaction_session_timeout = 1000").map_err(db(ctx))?;
    let row = c.query_opt("SELECT term, holder FROM leadership WHERE id = 1 FOR SHARE", &[]).map_err(db(ctx))?;
    let (current, holder): (i64, String) = match &row {
        Some(r) => (r.try_get(0).map_err(db(ctx))?, r.try_get(1).map_err(db(ctx))?),
        None => (0, String::new()),
    };
    if current != term as i64 {
        super::fence::note_refused();
        return Err(StoreError::Fenced(format!(
            "{ctx}: refused, this replica's leader term {term} is over (replica {holder:?} leads at term {current})"
        )));
    }
    Ok(current)
}

fn lock(c: &mut impl GenericClient, space: i32, key: &str, ctx: &str) -> Result<(), StoreError> {
    c.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", &[&space, &key]).map(drop).map_err(db(ctx))
}

fn insert_events(c: &mut impl GenericClient, run: &str, events: &[NewEvent]) -> Result<Vec<EventRecord>, StoreError> {
    let ctx = "appending events";
    if events.is_empty() {
        return Ok(Vec::new());
    }
    // One run's events are appended one transaction at a time: a sequence number is then visible only after
    // every smaller one of the run (SQLite's single writer gives the same for free).
    lock(c, LOCK_EVENTS, run, ctx)?;
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        let row = c
            .query_one(
                "INSERT INTO events (run, at_ms, kind, level, from_status, to_status, message, error, run_status)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING seq",
                &[&run, &e.at_ms, &e.kind, &e.level, &e.from, &e.to, &e.message, &e.error, &e.run_status],
            )
            .map_err(db(ctx))?;
        let seq: i64 = row.try_get(0).map_err(db(ctx))?;
        out.push(EventRecord { seq: seq as u64, run: run.to_string(), event: e.clone() });
    }
    Ok(out)
}

/// Enqueues `events` for the webhooks whose patterns match, inside the caller's transaction; returns how many
/// events some webhook was owed. Each subject's events are enqueued one transaction at a time (an advisory lock per
/// subject, taken in order), so a delivery worker never sees a subject's later event before an earlier one
/// commits (SQLite's single writer gives the same).
fn enqueue(c: &mut impl GenericClient, events: &[OutboxEvent]) -> Result<usize, StoreError> {
    let ctx = "enqueueing webhook events";
    if events.is_empty() {
        return Ok(0);
    }
    let hooks: Vec<(String, Vec<String>)> = c
        .query("SELECT name, events FROM webhooks", &[])
        .map_err(db(ctx))?
        .iter()
        .map(|r| {
            let name: String = r.try_get(0).map_err(db(ctx))?;
            let events: String = r.try_get(1).map_err(db(ctx))?;
            let patterns =
                serde_json::from_str(&events).map_err(|e| corrupt(format!("webhook {name}"))(e.to_string()))?;
            Ok((name, patterns))
        })
        .collect::<Result<_, StoreError>>()?;
    if hooks.is_empty() {
        return Ok(0);
    }
    let owed: Vec<(&OutboxEvent, Vec<&String>)> = events
        .iter()
        .map(|e| {
            let to = hooks
                .iter()
                .filter(|(_, patterns)| upkeep_core::events::type_matches(patterns, &e.event_type))
                .map(|(name, _)| name)
                .collect::<Vec<_>>();
            (e, to)
        })
        .filter(|(_, to)| !to.is_empty())
        .collect();
    let subjects: BTreeSet<&str> = owed.iter().map(|(e, _)| e.subject.as_str()).collect();
    for s in subjects {
        lock(c, LOCK_OUTBOX, s, ctx)?;
    }
    for (e, to) in &owed {
        let seq: i64 = c
            .query_one(
                "INSERT INTO outbox (type, subject, time_ms, data) VALUES ($1, $2, $3, $4) RETURNING seq",
                &[&e.event_type, &e.subject, &e.time_ms, &e.data],
            )
            .map_err(db(ctx))?
            .try_get(0)
            .map_err(db(ctx))?;
        for name in to {
            c.execute(
                "INSERT INTO webhook_deliveries (webhook, seq, subject) VALUES ($1, $2, $3)",
                &[name, &seq, &e.subject],
            )
            .map_err(db(ctx))?;
        }
    }
    Ok(owed.len())
}

fn write_parts(c: &mut impl GenericClient, run: &str, parts: &[(String, String)], ctx: &str) -> Result<(), StoreError> {
    if parts.is_empty() {
        return Ok(());
    }
    // A key given twice: the last wins (as SQLite's INSERT OR REPLACE); one statement may touch a row once.
    let last: BTreeMap<&str, &str> = parts.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let keys: Vec<&str> = last.keys().copied().collect();
    let bodies: Vec<&str> = last.values().copied().collect();
    c.execute(
        "INSERT INTO run_parts (run, key, body) SELECT $1, k, b FROM unnest($2::text[], $3::text[]) AS p(k, b)
         ON CONFLICT (run, key) DO UPDATE SET body = excluded.body",
        &[&run, &keys, &bodies],
    )
    .map(drop)
    .map_err(db(ctx))
}

fn read_parts(c: &mut impl GenericClient, run: &str, ctx: &str) -> Result<Vec<(String, String)>, StoreError> {
    c.query("SELECT key, body FROM run_parts WHERE run = $1 ORDER BY key", &[&run])
        .map_err(db(ctx))?
        .iter()
        .map(|r| Ok((r.try_get(0).map_err(db(ctx))?, r.try_get(1).map_err(db(ctx))?)))
        .collect()
}

const RUN_COLUMNS: &str = "name, strategy_name, created_ms, version, status";

fn run_from_row(r: &Row, ctx: &str) -> Result<RunRecord, StoreError> {
    Ok(RunRecord {
        name: r.try_get(0).map_err(db(ctx))?,
        parts: Vec::new(),
        strategy_name: r.try_get(1).map_err(db(ctx))?,
        created_ms: r.try_get(2).map_err(db(ctx))?,
        version: r.try_get::<_, i64>(3).map_err(db(ctx))? as u64,
        status: r.try_get(4).map_err(db(ctx))?,
    })
}

const LEASE_COLUMNS: &str = "node, lease_id, member, holder, purpose, granted_ms, expires_ms, forced";

fn lease_from_row(r: &Row, ctx: &str) -> Result<LeaseRecord, StoreError> {
    Ok(LeaseRecord {
        node: r.try_get(0).map_err(db(ctx))?,
        lease_id: r.try_get(1).map_err(db(ctx))?,
        member: r.try_get(2).map_err(db(ctx))?,
        holder: r.try_get(3).map_err(db(ctx))?,
        purpose: r.try_get(4).map_err(db(ctx))?,
        granted_ms: r.try_get(5).map_err(db(ctx))?,
        expires_ms: r.try_get(6).map_err(db(ctx))?,
        forced: r.try_get(7).map_err(db(ctx))?,
    })
}

const JOB_COLUMNS: &str = "id, member, status, state, updated_ms";

fn job_from_row(r: &Row, ctx: &str) -> Result<JobRecord, StoreError> {
    Ok(JobRecord {
        id: r.try_get(0).map_err(db(ctx))?,
        member: r.try_get(1).map_err(db(ctx))?,
        status: r.try_get(2).map_err(db(ctx))?,
        state: r.try_get(3).map_err(db(ctx))?,
        updated_ms: r.try_get(4).map_err(db(ctx))?,
    })
}

const TOKEN_COLUMNS: &str = "id, secret_sha256, member, node_pool, expires_ms, uses_left, created_by, created_ms";

fn token_from_row(r: &Row, ctx: &str) -> Result<JoinTokenRecord, StoreError> {
    let uses: i64 = r.try_get(5).map_err(db(ctx))?;
    Ok(JoinTokenRecord {
        id: r.try_get(0).map_err(db(ctx))?,
        secret_sha256: r.try_get(1).map_err(db(ctx))?,
        member: r.try_get(2).map_err(db(ctx))?,
        node_pool: r.try_get(3).map_err(db(ctx))?,
        expires_ms: r.try_get(4).map_err(db(ctx))?,
        uses_left: u32::try_from(uses).map_err(|e| corrupt(ctx)(format!("uses_left {uses}: {e}")))?,
        created_by: r.try_get(6).map_err(db(ctx))?,
        created_ms: r.try_get(7).map_err(db(ctx))?,
    })
}

/// The token `id` with this secret hash, or why it is refused at `now_ms`; with `lock`, its row stays locked
/// until the caller's transaction ends (two joins never take the same last use).
fn checked_token(
    c: &mut impl GenericClient,
    id: &str,
    secret_sha256: &str,
    now_ms: i64,
    lock: bool,
    ctx: &str,
) -> Result<Result<JoinTokenRecord, TokenRefusal>, StoreError> {
    let sql = format!(
        "SELECT {TOKEN_COLUMNS} FROM join_tokens WHERE id = $1 AND secret_sha256 = $2{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    let row = c.query_opt(&sql, &[&id, &secret_sha256]).map_err(db(ctx))?;
    Ok(match row.map(|r| token_from_row(&r, ctx)).transpose()? {
        None => Err(TokenRefusal::Unknown),
        Some(t) if t.expires_ms <= now_ms => Err(TokenRefusal::Expired),
        Some(t) if t.uses_left == 0 => Err(TokenRefusal::UsedUp),
        Some(t) => Ok(t),
    })
}

fn json_map(text: &str, ctx: &str) -> Result<super::Regions, StoreError> {
    serde_json::from_str(text).map_err(|e| corrupt(ctx)(e.to_string()))
}

impl PostgresStore {
    fn update_member(&self, member: &str, column: &'static str, value: &str) -> Result<MemberRecord, StoreError> {
        let ctx = format!("setting {column} of member {member}");
        let (member, value) = (member.to_string(), value.to_string());
        self.run(ctx.clone(), move |c| {
            let mut tx = c.transaction().map_err(db(ctx.clone()))?;
            let n = tx
                .execute(
                    &format!("UPDATE members SET {column} = $2, generation = generation + 1 WHERE name = $1"),
                    &[&member, &value],
                )
                .map_err(db(ctx.clone()))?;
            if n == 0 {
                return Err(not_found_member(&member));
            }
            let rec = member_of(&mut tx, &member)?;
            tx.commit().map_err(db(ctx.clone()))?;
            rec.ok_or_else(|| corrupt(ctx)("member vanished inside a transaction".into()))
        })
    }

    fn upsert_settings(
        &self,
        member: &str,
        column: &'static str,
        value: Option<&str>,
    ) -> Result<MemberSettings, StoreError> {
        let ctx = format!("setting {column} of member {member}");
        let (member, value) = (member.to_string(), value.map(str::to_string));
        self.run(ctx.clone(), move |c| {
            let mut tx = c.transaction().map_err(db(ctx.clone()))?;
            settings_of(&mut tx, &member)?;
            tx.execute("INSERT INTO member_settings (member) VALUES ($1) ON CONFLICT (member) DO NOTHING", &[&member])
                .map_err(db(ctx.clone()))?;
            tx.execute(&format!("UPDATE member_settings SET {column} = $2 WHERE member = $1"), &[&member, &value])
                .map_err(db(ctx.clone()))?;
            let out = settings_of(&mut tx, &member)?;
            tx.commit().map_err(db(ctx))?;
            Ok(out)
        })
    }

    /// The leader lease as stored: holder, term, and how many ms it has left by the database's clock (negative:
    /// lapsed). For operators' tools and tests; the hub itself only calls `Store::lead`.
    pub fn leadership(&self) -> Result<(String, u64, i64), StoreError> {
        let ctx = "reading the leader lease";
        self.run(ctx, move |c| {
            let r = c
                .query_one(&format!("SELECT holder, term, expires_ms - {DB_NOW_MS} FROM leadership WHERE id = 1"), &[])
                .map_err(db(ctx))?;
            let term: i64 = r.try_get(1).map_err(db(ctx))?;
            Ok((r.try_get(0).map_err(db(ctx))?, term as u64, r.try_get(2).map_err(db(ctx))?))
        })
    }

    /// Every row a leader wrote with its term (`store::fence`): (what, its key and content, term), for tests that
    /// check that a deposed leader wrote nothing more.
    pub fn written_terms(&self) -> Result<Vec<(String, String, u64)>, StoreError> {
        let ctx = "reading the terms of written rows";
        self.run(ctx, move |c| {
            let sql = "SELECT 'run', name || ' v' || version || ' ' || status, term FROM runs WHERE term > 0
                 UNION ALL SELECT 'job', id || ' ' || status || ' ' || md5(state), term FROM jobs WHERE term > 0
                 UNION ALL SELECT 'lease', node || ' ' || lease_id || ' ' || expires_ms, term FROM leases WHERE term > 0
                 UNION ALL SELECT 'rollout', member || ' ' || md5(state), term FROM rollouts WHERE term > 0";
            c.query(sql, &[])
                .map_err(db(ctx))?
                .iter()
                .map(|r| {
                    let term: i64 = r.try_get(2).map_err(db(ctx))?;
                    Ok((r.try_get(0).map_err(db(ctx))?, r.try_get(1).map_err(db(ctx))?, term as u64))
                })
                .collect()
        })
    }

    /// Runs `f` in a transaction fenced with this thread's term (`store::fence`, [`check_term`]); `f` gets the
    /// term to record (0 when unfenced).
    fn fenced<R: Send + 'static>(
        &self,
        ctx: String,
        f: impl FnOnce(&mut ::postgres::Transaction<'_>, i64, &str) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let fence = super::fence::current();
        self.run(ctx.clone(), move |c| {
            let mut tx = c.transaction().map_err(db(ctx.clone()))?;
            let term = check_term(&mut tx, fence, &ctx)?;
            let out = f(&mut tx, term, &ctx)?;
            tx.commit().map_err(db(ctx))?;
            Ok(out)
        })
    }

    /// Runs one statement and returns the rows it touched.
    fn exec(
        &self,
        ctx: String,
        sql: &'static str,
        params: Vec<Box<dyn ToSql + Send + Sync>>,
    ) -> Result<u64, StoreError> {
        self.run(ctx.clone(), move |c| {
            let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
            c.execute(sql, &refs).map_err(db(ctx))
        })
    }

    /// Runs one query and decodes its rows.
    fn rows<T: Send + 'static>(
        &self,
        ctx: String,
        sql: String,
        params: Vec<Box<dyn ToSql + Send + Sync>>,
        decode: fn(&Row, &str) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        self.run(ctx.clone(), move |c| {
            let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
            c.query(&sql, &refs).map_err(db(ctx.clone()))?.iter().map(|r| decode(r, &ctx)).collect()
        })
    }
}

/// Boxes statement parameters (they travel to a connection thread).
macro_rules! params {
    ($($p:expr),* $(,)?) => { vec![$(Box::new($p) as Box<dyn ToSql + Send + Sync>),*] };
}

fn text_pair(r: &Row, ctx: &str) -> Result<(String, String), StoreError> {
    Ok((r.try_get(0).map_err(db(ctx))?, r.try_get(1).map_err(db(ctx))?))
}

fn text_one(r: &Row, ctx: &str) -> Result<String, StoreError> {
    r.try_get(0).map_err(db(ctx))
}

impl Store for PostgresStore {
    fn record_report(&self, name: &str, facts: &NodeFacts, now_ms: i64) -> Result<MemberRecord, StoreError> {
        let ctx = format!("recording report of node {name}");
        let (name, facts) = (name.to_string(), facts.clone());
        self.run(ctx.clone(), move |c| {
            let mut tx = c.transaction().map_err(db(ctx.clone()))?;
            let member = write_report(&mut tx, &name, &facts, now_ms)?;
            tx.commit().map_err(db(ctx))?;
            Ok(member)
        })
    }

    fn record_reports(&self, batch: &[ReportWrite]) -> Vec<Result<MemberRecord, StoreError>> {
        super::reports_together_or_alone(self, batch, || {
            let ctx = format!("recording {} node reports", batch.len());
            let owned = batch.to_vec();
            self.run(ctx.clone(), move |c| {
                let mut tx = c.transaction().map_err(db(ctx.clone()))?;
                let members = owned
                    .iter()
                    .map(|r| write_report(&mut tx, &r.node, &r.facts, r.now_ms))
                    .collect::<Result<Vec<_>, _>>()?;
                tx.commit().map_err(db(ctx))?;
                Ok(members)
            })
        })
    }

    fn touch_nodes(&self, seen: &[(String, i64)]) -> Result<(), StoreError> {
        if seen.is_empty() {
            return Ok(());
        }
        // One statement; a node named twice takes its latest time; names in order, so that concurrent writers
        // lock rows in the same order.
        let mut latest: BTreeMap<String, i64> = BTreeMap::new();
        for (n, ms) in seen {
            let e = latest.entry(n.clone()).or_insert(*ms);
            *e = (*e).max(*ms);
        }
        let names: Vec<String> = latest.keys().cloned().collect();
        let times: Vec<i64> = latest.values().copied().collect();
        self.exec(
            "recording last-seen times".into(),
            "UPDATE nodes SET last_seen_ms = GREATEST(nodes.last_seen_ms, s.ms)
             FROM unnest($1::text[], $2::bigint[]) AS s(name, ms) WHERE nodes.name = s.name",
            params![names, times],
        )
        .map(drop)
    }

    fn list_nodes(&self, member: Option<&str>) -> Result<Vec<NodeRecord>, StoreError> {
        let sql = match member {
            Some(_) => format!("SELECT {NODE_COLUMNS} FROM nodes WHERE member = $1 ORDER BY name"),
            None => format!("SELECT {NODE_COLUMNS} FROM nodes WHERE $1::text IS NULL ORDER BY member, name"),
        };
        self.rows("listing nodes".into(), sql, params![member.map(str::to_string)], node_from_row)
    }

    fn get_node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        let sql = format!("SELECT {NODE_COLUMNS} FROM nodes WHERE name = $1");
        Ok(self.rows(format!("reading node {name}"), sql, params![name.to_string()], node_from_row)?.pop())
    }

    fn forget_node(&self, name: &str) -> Result<bool, StoreError> {
        let n = self.exec("forgetting node".into(), "DELETE FROM nodes WHERE name = $1", params![name.to_string()])?;
        Ok(n > 0)
    }

    fn list_members(&self) -> Result<Vec<MemberRecord>, StoreError> {
        let ctx = "listing members";
        self.run(ctx, move |c| {
            let names: Vec<String> = c
                .query("SELECT name FROM members ORDER BY name", &[])
                .map_err(db(ctx))?
                .iter()
                .map(|r| r.try_get(0).map_err(db(ctx)))
                .collect::<Result<_, _>>()?;
            let mut out = Vec::with_capacity(names.len());
            for n in names {
                if let Some(m) = member_of(c, &n)? {
                    out.push(m);
                }
            }
            Ok(out)
        })
    }

    fn get_member(&self, name: &str) -> Result<Option<MemberRecord>, StoreError> {
        let name = name.to_string();
        self.run(format!("reading member {name}"), move |c| member_of(c, &name))
    }

    fn set_node_os_channel(&self, member: &str, channel: NodeOsChannel) -> Result<MemberRecord, StoreError> {
        self.update_member(member, "node_os_channel", channel.as_str())
    }

    fn set_auto_upgrade_channel(&self, member: &str, channel: AutoUpgradeChannel) -> Result<MemberRecord, StoreError> {
        self.update_member(member, "auto_upgrade_channel", channel.as_str())
    }

    fn member_settings(&self, member: &str) -> Result<MemberSettings, StoreError> {
        let member = member.to_string();
        self.run(format!("reading settings of member {member}"), move |c| settings_of(c, &member))
    }

    fn all_member_settings(&self) -> Result<Vec<MemberSettings>, StoreError> {
        self.rows(
            "reading member settings".into(),
            "SELECT member, node_os_schedule, cluster_schedule, max_unavailable, drain_policy FROM member_settings
             ORDER BY member"
                .into(),
            params![],
            settings_from_row,
        )
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
        self.run(ctx, move |c| {
            let row = c
                .query_one(
                    "INSERT INTO hub_meta (key, value) VALUES ('epoch', 1)
                     ON CONFLICT (key) DO UPDATE SET value = hub_meta.value + 1 RETURNING value",
                    &[],
                )
                .map_err(db(ctx))?;
            Ok(row.try_get::<_, i64>(0).map_err(db(ctx))? as u64)
        })
    }

    fn lead(&self, replica: &str, lease_ms: i64, held: Option<u64>) -> Result<Option<u64>, StoreError> {
        let ctx = "taking or renewing the leader lease";
        let replica = replica.to_string();
        self.run(ctx, move |c| {
            let mut tx = c.transaction().map_err(db(ctx))?;
            // A write in flight holds the row (its fence): wait for it, but not past the next attempt.
            tx.batch_execute("SET LOCAL lock_timeout = 1000").map_err(db(ctx))?;
            let row = tx
                .query_one(
                    &format!("SELECT holder, term, expires_ms, {DB_NOW_MS} FROM leadership WHERE id = 1 FOR UPDATE"),
                    &[],
                )
                .map_err(db(ctx))?;
            let holder: String = row.try_get(0).map_err(db(ctx))?;
            let term: i64 = row.try_get(1).map_err(db(ctx))?;
            let expires: i64 = row.try_get(2).map_err(db(ctx))?;
            let now: i64 = row.try_get(3).map_err(db(ctx))?;
            let mine = holder == replica;
            let out = if mine && held == Some(term as u64) && expires > now {
                tx.execute("UPDATE leadership SET expires_ms = $1 WHERE id = 1", &[&(now + lease_ms)])
                    .map_err(db(ctx))?;
                Some(term as u64)
            } else if expires <= now || mine {
                let next = term + 1;
                tx.execute(
                    "UPDATE leadership SET holder = $1, term = $2, expires_ms = $3 WHERE id = 1",
                    &[&replica, &next, &(now + lease_ms)],
                )
                .map_err(db(ctx))?;
                Some(next as u64)
            } else {
                None
            };
            tx.commit().map_err(db(ctx))?;
            Ok(out)
        })
    }

    fn check_fence(&self) -> Result<(), StoreError> {
        let Some(term) = super::fence::current() else { return Ok(()) };
        let ctx = "checking the leader term";
        self.run(ctx, move |c| {
            let mut tx = c.transaction().map_err(db(ctx))?;
            check_term(&mut tx, Some(term), ctx)?;
            tx.commit().map_err(db(ctx))
        })
    }

    fn resign(&self, replica: &str, term: u64) -> Result<(), StoreError> {
        self.exec(
            "giving up the leader lease".to_string(),
            "UPDATE leadership SET expires_ms = 0 WHERE id = 1 AND holder = $1 AND term = $2",
            params![replica.to_string(), term as i64],
        )
        .map(drop)
    }

    fn relay_post(&self, notes: &[Vec<u8>], sessions: &[SessionChange]) -> Result<(), StoreError> {
        let ctx = "posting to the relay between replicas";
        let notes = notes.to_vec();
        let sessions = sessions.to_vec();
        self.run(ctx, move |c| {
            let mut tx = c.transaction().map_err(db(ctx))?;
            // One poster at a time: sequence numbers commit in order, so a reader never skips one.
            tx.execute("SELECT pg_advisory_xact_lock($1, 0)", &[&LOCK_RELAY]).map_err(db(ctx))?;
            for change in &sessions {
                match change {
                    SessionChange::Here(p) => tx.execute(
                        "INSERT INTO session_places (node, replica, instance, session, silent_since_ms)
                         VALUES ($1, $2, $3, $4, $5)
                         ON CONFLICT (node) DO UPDATE SET replica = excluded.replica, instance = excluded.instance,
                             session = excluded.session, silent_since_ms = excluded.silent_since_ms",
                        &[&p.node, &p.replica, &(p.instance as i64), &(p.session as i64), &p.silent_since_ms],
                    ),
                    SessionChange::Gone { node, replica, instance, session } => tx.execute(
                        "DELETE FROM session_places WHERE node = $1 AND replica = $2 AND instance = $3
                             AND session = $4",
                        &[node, replica, &(*instance as i64), &(*session as i64)],
                    ),
                }
                .map_err(db(ctx))?;
            }
            if !notes.is_empty() {
                let statement = tx
                    .prepare(&format!("INSERT INTO relay (at_ms, body) VALUES ({DB_NOW_MS}, $1)"))
                    .map_err(db(ctx))?;
                for body in &notes {
                    tx.execute(&statement, &[body]).map_err(db(ctx))?;
                }
                tx.batch_execute(&format!("NOTIFY {RELAY_CHANNEL}")).map_err(db(ctx))?;
            }
            tx.commit().map_err(db(ctx))
        })
    }

    fn relay_since(&self, after: i64, limit: usize) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
        let ctx = "reading the relay between replicas";
        let limit = limit as i64;
        self.run(ctx, move |c| {
            c.query("SELECT seq, body FROM relay WHERE seq > $1 ORDER BY seq LIMIT $2", &[&after, &limit])
                .map_err(db(ctx))?
                .iter()
                .map(|r| Ok((r.try_get(0).map_err(db(ctx))?, r.try_get(1).map_err(db(ctx))?)))
                .collect()
        })
    }

    fn relay_head(&self) -> Result<i64, StoreError> {
        let ctx = "reading the relay's newest note";
        self.run(ctx, move |c| {
            let head: Option<i64> =
                c.query_one("SELECT max(seq) FROM relay", &[]).and_then(|r| r.try_get(0)).map_err(db(ctx))?;
            Ok(head.unwrap_or(0))
        })
    }

    fn relay_prune(&self, keep_ms: i64) -> Result<u64, StoreError> {
        let ctx = "pruning the relay";
        self.run(ctx, move |c| {
            c.execute(&format!("DELETE FROM relay WHERE at_ms < {DB_NOW_MS} - $1"), &[&keep_ms]).map_err(db(ctx))
        })
    }

    fn replica_alive(&self, replica: &str, instance: u64, alive_ms: i64) -> Result<Vec<(String, u64)>, StoreError> {
        let ctx = "recording this replica as alive";
        let replica = replica.to_string();
        self.run(ctx, move |c| {
            c.execute(
                &format!(
                    "INSERT INTO replicas (name, instance, seen_ms) VALUES ($1, $2, {DB_NOW_MS})
                     ON CONFLICT (name) DO UPDATE SET instance = excluded.instance, seen_ms = excluded.seen_ms"
                ),
                &[&replica, &(instance as i64)],
            )
            .map_err(db(ctx))?;
            c.query(&format!("SELECT name, instance FROM replicas WHERE seen_ms >= {DB_NOW_MS} - $1"), &[&alive_ms])
                .map_err(db(ctx))?
                .iter()
                .map(|r| Ok((r.try_get(0).map_err(db(ctx))?, r.try_get::<_, i64>(1).map_err(db(ctx))? as u64)))
                .collect()
        })
    }

    fn session_places(&self) -> Result<Vec<SessionPlace>, StoreError> {
        let ctx = "reading where agent sessions are";
        self.run(ctx, move |c| {
            c.query("SELECT node, replica, instance, session, silent_since_ms FROM session_places", &[])
                .map_err(db(ctx))?
                .iter()
                .map(|r| {
                    Ok(SessionPlace {
                        node: r.try_get(0).map_err(db(ctx))?,
                        replica: r.try_get(1).map_err(db(ctx))?,
                        instance: r.try_get::<_, i64>(2).map_err(db(ctx))? as u64,
                        session: r.try_get::<_, i64>(3).map_err(db(ctx))? as u64,
                        silent_since_ms: r.try_get(4).map_err(db(ctx))?,
                    })
                })
                .collect()
        })
    }

    fn drop_session_places(&self, replica: &str) -> Result<(), StoreError> {
        self.exec(
            format!("forgetting the agent sessions replica {replica} held"),
            "DELETE FROM session_places WHERE replica = $1",
            params![replica.to_string()],
        )
        .map(drop)
    }

    fn relay_listener(&self) -> Result<Box<dyn RelayWait>, StoreError> {
        let ctx = format!("listening for the relay on {}", self.database);
        let mut client = self.settings.connect().map_err(db(ctx.clone()))?;
        client.batch_execute(&format!("LISTEN {RELAY_CHANNEL}")).map_err(db(ctx))?;
        Ok(Box::new(RelayListener { client }))
    }

    fn put_job(&self, job: &JobRecord) -> Result<(), StoreError> {
        let ctx = format!("recording work {}", job.id);
        let job = job.clone();
        self.fenced(ctx, move |tx, term, ctx| {
            tx.execute(
                "INSERT INTO jobs (id, member, status, state, updated_ms, term) VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (id) DO UPDATE SET member = excluded.member, status = excluded.status,
                     state = excluded.state, updated_ms = excluded.updated_ms, term = excluded.term",
                &[&job.id, &job.member, &job.status, &job.state, &job.updated_ms, &term],
            )
            .map_err(db(ctx))
            .map(drop)
        })
    }

    fn get_job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
        Ok(self.rows(format!("reading work {id}"), sql, params![id.to_string()], job_from_row)?.pop())
    }

    fn list_jobs(&self, status: Option<&str>) -> Result<Vec<JobRecord>, StoreError> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE $1::text IS NULL OR status = $1 ORDER BY id");
        self.rows("listing work".into(), sql, params![status.map(str::to_string)], job_from_row)
    }

    fn put_image(&self, image: &ImageRecord) -> Result<ImageRecord, StoreError> {
        let ctx = format!("publishing image {}-{}", image.family, image.version);
        let image = image.clone();
        self.run(ctx.clone(), move |c| {
            let mut tx = c.transaction().map_err(db(ctx.clone()))?;
            // A version not yet published has no row to lock: two first publications take turns here.
            lock(&mut tx, LOCK_CATALOG, &format!("image/{}/{}", image.family, image.version), &ctx)?;
            let stored = match image_of(&mut tx, &image.family, &image.version, &ctx)? {
                None => {
                    tx.execute(
                        &format!("INSERT INTO images ({IMAGE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"),
                        &[
                            &image.family,
                            &image.version,
                            &regions_json(&image.regions, &ctx)?,
                            &image.sha256,
                            &image.signature,
                            &image.url,
                            &(image.size_bytes as i64),
                            &image.published_ms,
                        ],
                    )
                    .map_err(db(ctx.clone()))?;
                    image.clone()
                }
                Some(mut old) => {
                    same_artifact(&old, &image)?;
                    old.regions.extend(image.regions.iter().map(|(r, at)| (r.clone(), *at)));
                    old.url = image.url.clone();
                    tx.execute(
                        "UPDATE images SET regions = $3, url = $4 WHERE family = $1 AND version = $2",
                        &[&old.family, &old.version, &regions_json(&old.regions, &ctx)?, &old.url],
                    )
                    .map_err(db(ctx.clone()))?;
                    old
                }
            };
            tx.commit().map_err(db(ctx))?;
            Ok(stored)
        })
    }

    fn withdraw_image_region(&self, family: &str, version: &str, region: &str) -> Result<ImageRecord, StoreError> {
        let ctx = format!("withdrawing image {family}-{version} from region {region}");
        let (family, version, region) = (family.to_string(), version.to_string(), region.to_string());
        self.run(ctx.clone(), move |c| {
            let mut tx = c.transaction().map_err(db(ctx.clone()))?;
            let Some(mut img) = image_of(&mut tx, &family, &version, &ctx)? else {
                return Err(StoreError::NotFound {
                    kind: "image",
                    name: format!("{family}-{version}"),
                    hint: "`upkeepctl image list` shows the published versions; nothing was withdrawn",
                });
            };
            let published_in = img.regions.keys().cloned().collect::<Vec<_>>().join(", ");
            if !img.regions.contains_key(&region) {
                return Err(StoreError::Conflict(format!(
                    "region: image {family}-{version} is not published in region {region:?} (it is in \
                     {published_in}); nothing was withdrawn"
                )));
            }
            if img.regions.len() == 1 {
                return Err(StoreError::Conflict(format!(
                    "region: {region:?} is the only region of image {family}-{version}; a published version keeps \
                     at least one region: publish it in another region first (upkeepctl image publish ... \
                     --regions R); nothing was withdrawn"
                )));
            }
            img.regions.remove(&region);
            tx.execute(
                "UPDATE images SET regions = $3 WHERE family = $1 AND version = $2",
                &[&family, &version, &regions_json(&img.regions, &ctx)?],
            )
            .map_err(db(ctx.clone()))?;
            tx.commit().map_err(db(ctx))?;
            Ok(img)
        })
    }

    fn list_images(&self, family: Option<&str>) -> Result<Vec<ImageRecord>, StoreError> {
        let sql = format!(
            "SELECT {IMAGE_COLUMNS} FROM images WHERE $1::text IS NULL OR family = $1
             ORDER BY family, published_ms, version"
        );
        self.rows("listing images".into(), sql, params![family.map(str::to_string)], image_from_row)
    }

    fn put_kubernetes(&self, version: &str, regions: &BTreeMap<String, i64>) -> Result<(), StoreError> {
        let ctx = format!("publishing Kubernetes {version}");
        let (version, regions) = (version.to_string(), regions.clone());
        self.run(ctx.clone(), move |c| {
            let mut tx = c.transaction().map_err(db(ctx.clone()))?;
            lock(&mut tx, LOCK_CATALOG, &format!("kubernetes/{version}"), &ctx)?;
            let existing = tx
                .query_opt("SELECT regions FROM kubernetes_releases WHERE version = $1", &[&version])
                .map_err(db(ctx.clone()))?;
            let mut merged = match existing {
                Some(r) => json_map(&r.try_get::<_, String>(0).map_err(db(ctx.clone()))?, &ctx)?,
                None => Default::default(),
            };
            merged.extend(regions);
            tx.execute(
                "INSERT INTO kubernetes_releases (version, regions) VALUES ($1, $2)
                 ON CONFLICT (version) DO UPDATE SET regions = excluded.regions",
                &[&version, &regions_json(&merged, &ctx)?],
            )
            .map_err(db(ctx.clone()))?;
            tx.commit().map_err(db(ctx))
        })
    }

    fn list_kubernetes(&self) -> Result<Vec<(String, super::Regions)>, StoreError> {
        let ctx = "listing Kubernetes releases";
        let rows = self.rows(
            ctx.into(),
            "SELECT version, regions FROM kubernetes_releases ORDER BY version".into(),
            params![],
            text_pair,
        )?;
        rows.into_iter().map(|(v, j)| Ok((v, json_map(&j, ctx)?))).collect()
    }

    fn put_strategy(&self, name: &str, spec_json: &str) -> Result<(), StoreError> {
        self.exec(
            format!("storing strategy {name}"),
            "INSERT INTO strategies (name, spec) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET spec = excluded.spec",
            params![name.to_string(), spec_json.to_string()],
        )
        .map(drop)
    }

    fn get_strategy(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .rows(
                format!("reading strategy {name}"),
                "SELECT spec FROM strategies WHERE name = $1".into(),
                params![name.to_string()],
                text_one,
            )?
            .pop())
    }

    fn list_strategies(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.rows(
            "listing strategies".into(),
            "SELECT name, spec FROM strategies ORDER BY name".into(),
            params![],
            text_pair,
        )
    }

    fn delete_strategy(&self, name: &str) -> Result<bool, StoreError> {
        let n = self.exec(
            format!("deleting strategy {name}"),
            "DELETE FROM strategies WHERE name = $1",
            params![name.to_string()],
        )?;
        Ok(n > 0)
    }

    fn create_run(&self, run: &RunRecord) -> Result<(), StoreError> {
        let ctx = format!("creating run {}", run.name);
        let run = run.clone();
        self.run(ctx.clone(), move |c| {
            let mut tx = c.transaction().map_err(db(ctx.clone()))?;
            let n = tx
                .execute(
                    "INSERT INTO runs (name, strategy_name, created_ms, version, status) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (name) DO NOTHING",
                    &[&run.name, &run.strategy_name, &run.created_ms, &(run.version as i64), &run.status],
                )
                .map_err(db(ctx.clone()))?;
            if n == 0 {
                return Err(StoreError::Conflict(format!(
                    "a run named {:?} already exists; choose another name or delete it first",
                    run.name
                )));
            }
            tx.execute("DELETE FROM run_parts WHERE run = $1", &[&run.name]).map_err(db(ctx.clone()))?;
            write_parts(&mut tx, &run.name, &run.parts, &ctx)?;
            tx.commit().map_err(db(ctx))
        })
    }

    fn get_run(&self, name: &str) -> Result<Option<RunRecord>, StoreError> {
        let ctx = format!("reading run {name}");
        let name = name.to_string();
        self.run(ctx.clone(), move |c| {
            // One snapshot for the row and its parts.
            let mut tx = c.build_transaction().read_only(true).start().map_err(db(ctx.clone()))?;
            let row = tx
                .query_opt(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE name = $1"), &[&name])
                .map_err(db(ctx.clone()))?;
            let Some(row) = row else { return Ok(None) };
            let mut rec = run_from_row(&row, &ctx)?;
            rec.parts = read_parts(&mut tx, &name, &ctx)?;
            tx.commit().map_err(db(ctx))?;
            Ok(Some(rec))
        })
    }

    fn list_runs(&self) -> Result<Vec<RunRecord>, StoreError> {
        let ctx = "listing runs";
        self.run(ctx, move |c| {
            let mut tx = c
                .build_transaction()
                .isolation_level(::postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .map_err(db(ctx))?;
            let mut runs: Vec<RunRecord> = tx
                .query(&format!("SELECT {RUN_COLUMNS} FROM runs ORDER BY created_ms, name"), &[])
                .map_err(db(ctx))?
                .iter()
                .map(|r| run_from_row(r, ctx))
                .collect::<Result<_, _>>()?;
            for r in &mut runs {
                r.parts = read_parts(&mut tx, &r.name, ctx)?;
            }
            tx.commit().map_err(db(ctx))?;
            Ok(runs)
        })
    }

    fn delete_run(&self, name: &str) -> Result<bool, StoreError> {
        let ctx = format!("deleting run {name}");
        let name = name.to_string();
        self.run(ctx.clone(), move |c| {
            let mut tx = c.transaction().map_err(db(ctx.clone()))?;
            tx.execute("DELETE FROM events WHERE run = $1", &[&name]).map_err(db(ctx.clone()))?;
            tx.execute("DELETE FROM run_parts WHERE run = $1", &[&name]).map_err(db(ctx.clone()))?;
            let n = tx.execute("DELETE FROM runs WHERE name = $1", &[&name]).map_err(db(ctx.clone()))?;
            tx.commit().map_err(db(ctx))?;
            Ok(n > 0)
        })
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
        let (name, status, write, events) = (name.to_string(), status.to_string(), write.clone(), events.to_vec());
        let fence = super::fence::current();
        self.run(ctx.clone(), move |c| {
            let mut tx = c.transaction().map_err(db(ctx.clone()))?;
            let term = check_term(&mut tx, fence, &ctx)?;
            // The compare-and-swap: a concurrent commit of the same run holds the row until it ends, and this
            // one then finds the version moved and changes nothing.
            let n = tx
                .execute(
                    "UPDATE runs SET version = version + 1, status = $3, term = $4 WHERE name = $1 AND version = $2",
                    &[&name, &(expected as i64), &status, &term],
                )
                .map_err(db(ctx.clone()))?;
            if n == 0 {
                return Err(StoreError::Conflict(format!("run {name:?} changed or was deleted meanwhile; plan again")));
            }
            if let RunWrite::Replace(_) = write {
                tx.execute("DELETE FROM run_parts WHERE run = $1", &[&name]).map_err(db(ctx.clone()))?;
            }
            write_parts(&mut tx, &name, write.parts(), &ctx)?;
            let out = insert_events(&mut tx, &name, &events)?;
            enqueue(&mut tx, &out.iter().map(super::run_event_outbox).collect::<Vec<_>>())?;
            tx.commit().map_err(db(ctx))?;
            Ok(out)
        })
    }

    fn run_versions(&self) -> Result<Vec<(String, u64, String)>, StoreError> {
        self.rows(
            "listing run versions".into(),
            "SELECT name, version, status FROM runs ORDER BY created_ms, name".into(),
            params![],
            |r, ctx| {
                Ok((
                    r.try_get(0).map_err(db(ctx))?,
                    r.try_get::<_, i64>(1).map_err(db(ctx))? as u64,
                    r.try_get(2).map_err(db(ctx))?,
                ))
            },
        )
    }

    fn run_version(&self, name: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .rows(
                format!("reading the version of run {name}"),
                "SELECT version FROM runs WHERE name = $1".into(),
                params![name.to_string()],
                |r, ctx| Ok(r.try_get::<_, i64>(0).map_err(db(ctx))? as u64),
            )?
            .pop())
    }

    fn append_events(&self, run: &str, events: &[NewEvent]) -> Result<Vec<EventRecord>, StoreError> {
        let ctx = "appending events";
        let (run, events) = (run.to_string(), events.to_vec());
        self.run(ctx, move |c| {
            let mut tx = c.transaction().map_err(db(ctx))?;
            let out = insert_events(&mut tx, &run, &events)?;
            enqueue(&mut tx, &out.iter().map(super::run_event_outbox).collect::<Vec<_>>())?;
            tx.commit().map_err(db(ctx))?;
            Ok(out)
        })
    }

    fn events_since(&self, run: &str, after: u64) -> Result<Vec<EventRecord>, StoreError> {
        let ctx = "reading events";
        let run = run.to_string();
        self.run(ctx, move |c| {
            c.query(
                "SELECT seq, at_ms, kind, level, from_status, to_status, message, error, run_status FROM events
                 WHERE run = $1 AND seq > $2 ORDER BY seq",
                &[&run, &(after.min(i64::MAX as u64) as i64)],
            )
            .map_err(db(ctx))?
            .iter()
            .map(|r| {
                Ok(EventRecord {
                    seq: r.try_get::<_, i64>(0).map_err(db(ctx))? as u64,
                    run: run.clone(),
                    event: NewEvent {
                        at_ms: r.try_get(1).map_err(db(ctx))?,
                        kind: r.try_get(2).map_err(db(ctx))?,
                        level: r.try_get(3).map_err(db(ctx))?,
                        from: r.try_get(4).map_err(db(ctx))?,
                        to: r.try_get(5).map_err(db(ctx))?,
                        message: r.try_get(6).map_err(db(ctx))?,
                        error: r.try_get(7).map_err(db(ctx))?,
                        run_status: r.try_get(8).map_err(db(ctx))?,
                    },
                })
            })
            .collect()
        })
    }

    fn put_security_patch(&self, patch: &SecurityPatchRecord) -> Result<(), StoreError> {
        let ctx = format!("publishing security patch {}-{}", patch.family, patch.version);
        let packages = serde_json::to_string(&patch.packages).map_err(|e| corrupt(ctx.clone())(e.to_string()))?;
        let patch = patch.clone();
        self.run(ctx.clone(), move |c| {
            let mut tx = c.transaction().map_err(db(ctx.clone()))?;
            lock(&mut tx, LOCK_CATALOG, &format!("patch/{}/{}", patch.family, patch.version), &ctx)?;
            let existing = tx
                .query_opt(
                    "SELECT packages FROM security_patches WHERE family = $1 AND version = $2",
                    &[&patch.family, &patch.version],
                )
                .map_err(db(ctx.clone()))?;
            if let Some(r) = existing {
                let p: String = r.try_get(0).map_err(db(ctx.clone()))?;
                if p == packages {
                    return Ok(());
                }
                return Err(StoreError::Conflict(format!(
                    "security patch {}-{} is already published with packages {p}; a patch never changes, publish a \
                     new version",
                    patch.family, patch.version
                )));
            }
            tx.execute(
                "INSERT INTO security_patches (family, version, packages, published_ms) VALUES ($1, $2, $3, $4)",
                &[&patch.family, &patch.version, &packages, &patch.published_ms],
            )
            .map_err(db(ctx.clone()))?;
            tx.commit().map_err(db(ctx))
        })
    }

    fn list_security_patches(&self, family: Option<&str>) -> Result<Vec<SecurityPatchRecord>, StoreError> {
        self.rows(
            "listing security patches".into(),
            "SELECT family, version, packages, published_ms FROM security_patches
             WHERE $1::text IS NULL OR family = $1 ORDER BY family, published_ms, version"
                .into(),
            params![family.map(str::to_string)],
            |r, ctx| {
                let packages: String = r.try_get(2).map_err(db(ctx))?;
                Ok(SecurityPatchRecord {
                    family: r.try_get(0).map_err(db(ctx))?,
                    version: r.try_get(1).map_err(db(ctx))?,
                    packages: serde_json::from_str(&packages).map_err(|e| corrupt(ctx)(e.to_string()))?,
                    published_ms: r.try_get(3).map_err(db(ctx))?,
                })
            },
        )
    }

    fn put_lease(&self, l: &LeaseRecord) -> Result<(), StoreError> {
        let ctx = format!("granting lease {} to node {}", l.lease_id, l.node);
        let l = l.clone();
        self.fenced(ctx, move |tx, term, ctx| {
            tx.execute(
                "INSERT INTO leases (node, lease_id, member, holder, purpose, granted_ms, expires_ms, forced, term)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                 ON CONFLICT (node, lease_id) DO UPDATE SET expires_ms = excluded.expires_ms, term = excluded.term",
                &[
                    &l.node,
                    &l.lease_id,
                    &l.member,
                    &l.holder,
                    &l.purpose,
                    &l.granted_ms,
                    &l.expires_ms,
                    &l.forced,
                    &term,
                ],
            )
            .map_err(db(ctx))
            .map(drop)
        })
    }

    fn list_leases(&self) -> Result<Vec<LeaseRecord>, StoreError> {
        self.rows(
            "listing leases".into(),
            format!("SELECT {LEASE_COLUMNS} FROM leases ORDER BY member, node, granted_ms, lease_id"),
            params![],
            lease_from_row,
        )
    }

    fn leases_of(&self, of: LeasesOf<'_>) -> Result<Vec<LeaseRecord>, StoreError> {
        let (column, key) = match of {
            LeasesOf::Member(m) => ("member", m.to_string()),
            LeasesOf::Node(n) => ("node", n.to_string()),
        };
        self.rows(
            "listing leases".into(),
            format!(
                "SELECT {LEASE_COLUMNS} FROM leases WHERE {column} = $1 ORDER BY member, node, granted_ms, lease_id"
            ),
            params![key],
            lease_from_row,
        )
    }

    fn release_leases(&self, node: &str, ids: &[String], all_except: bool) -> Result<Vec<LeaseRecord>, StoreError> {
        let ctx = format!("releasing leases of node {node}");
        let (node, ids) = (node.to_string(), ids.to_vec());
        self.fenced(ctx, move |c, _, ctx| {
            let ctx = ctx.to_string();
            // One statement: what it deletes is what it returns, even beside a concurrent release.
            let mut released: Vec<LeaseRecord> = c
                .query(
                    &format!(
                        "DELETE FROM leases WHERE node = $1 AND (lease_id = ANY($2)) <> $3 RETURNING {LEASE_COLUMNS}"
                    ),
                    &[&node, &ids, &all_except],
                )
                .map_err(db(ctx.clone()))?
                .iter()
                .map(|r| lease_from_row(r, &ctx))
                .collect::<Result<_, _>>()?;
            released.sort_by(|a, b| a.lease_id.cmp(&b.lease_id));
            Ok(released)
        })
    }

    fn extend_leases(&self, node: &str, expires_ms: i64) -> Result<(), StoreError> {
        self.exec(
            format!("extending the leases of node {node}"),
            "UPDATE leases SET expires_ms = GREATEST(expires_ms, $2) WHERE node = $1",
            params![node.to_string(), expires_ms],
        )
        .map(drop)
    }

    fn expire_leases(&self, now_ms: i64) -> Result<Vec<LeaseRecord>, StoreError> {
        self.fenced("expiring leases".to_string(), move |c, _, ctx| {
            let mut expired: Vec<LeaseRecord> = c
                .query(&format!("DELETE FROM leases WHERE expires_ms <= $1 RETURNING {LEASE_COLUMNS}"), &[&now_ms])
                .map_err(db(ctx))?
                .iter()
                .map(|r| lease_from_row(r, ctx))
                .collect::<Result<_, _>>()?;
            expired.sort_by(|a, b| (&a.node, &a.lease_id).cmp(&(&b.node, &b.lease_id)));
            Ok(expired)
        })
    }

    fn put_rollout(&self, member: &str, state_json: &str) -> Result<(), StoreError> {
        let ctx = format!("recording the channel rollout of member {member}");
        let (member, state) = (member.to_string(), state_json.to_string());
        self.fenced(ctx, move |tx, term, ctx| {
            tx.execute(
                "INSERT INTO rollouts (member, state, term) VALUES ($1, $2, $3)
                 ON CONFLICT (member) DO UPDATE SET state = excluded.state, term = excluded.term",
                &[&member, &state, &term],
            )
            .map_err(db(ctx))
            .map(drop)
        })
    }

    fn list_rollouts(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.rows(
            "listing channel rollouts".into(),
            "SELECT member, state FROM rollouts ORDER BY member".into(),
            params![],
            text_pair,
        )
    }

    fn put_channel_switch(&self, member: &str, generation: u64, at_ms: i64) -> Result<(), StoreError> {
        self.exec(
            format!("recording the channel switch of member {member}"),
            "INSERT INTO channel_switches (member, generation, at_ms) VALUES ($1, $2, $3)
             ON CONFLICT (member) DO UPDATE SET generation = excluded.generation, at_ms = excluded.at_ms",
            params![member.to_string(), generation as i64, at_ms],
        )
        .map(drop)
    }

    fn list_channel_switches(&self) -> Result<Vec<(String, u64, i64)>, StoreError> {
        self.rows(
            "listing channel switches".into(),
            "SELECT member, generation, at_ms FROM channel_switches ORDER BY member".into(),
            params![],
            |r, ctx| {
                Ok((
                    r.try_get(0).map_err(db(ctx))?,
                    r.try_get::<_, i64>(1).map_err(db(ctx))? as u64,
                    r.try_get(2).map_err(db(ctx))?,
                ))
            },
        )
    }

    fn clear_channel_switch(&self, member: &str, generation: u64) -> Result<(), StoreError> {
        self.exec(
            format!("clearing the channel switch of member {member}"),
            "DELETE FROM channel_switches WHERE member = $1 AND generation = $2",
            params![member.to_string(), generation as i64],
        )
        .map(drop)
    }

    fn revoke_certs(&self, certs: &[RevokedCert]) -> Result<(), StoreError> {
        let ctx = "recording revoked certificates";
        let certs = certs.to_vec();
        self.run(ctx, move |c| {
            let mut tx = c.transaction().map_err(db(ctx))?;
            for r in &certs {
                tx.execute(
                    "INSERT INTO revoked_certs (serial, subject, reason, revoked_by, revoked_ms)
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (serial) DO NOTHING",
                    &[&r.serial, &r.subject, &r.reason, &r.revoked_by, &r.revoked_ms],
                )
                .map_err(db(ctx))?;
            }
            tx.commit().map_err(db(ctx))
        })
    }

    fn list_revoked_certs(&self) -> Result<Vec<RevokedCert>, StoreError> {
        self.rows(
            "listing revoked certificates".into(),
            "SELECT serial, subject, reason, revoked_by, revoked_ms FROM revoked_certs ORDER BY revoked_ms, serial"
                .into(),
            params![],
            |r, ctx| {
                Ok(RevokedCert {
                    serial: r.try_get(0).map_err(db(ctx))?,
                    subject: r.try_get(1).map_err(db(ctx))?,
                    reason: r.try_get(2).map_err(db(ctx))?,
                    revoked_by: r.try_get(3).map_err(db(ctx))?,
                    revoked_ms: r.try_get(4).map_err(db(ctx))?,
                })
            },
        )
    }

    fn note_node_cert(&self, node: &str, serial: &str, at_ms: i64) -> Result<(), StoreError> {
        self.exec(
            format!("noting the certificate of node {node}"),
            "INSERT INTO node_certs (node, serial, first_seen_ms) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            params![node.to_string(), serial.to_string(), at_ms],
        )
        .map(drop)
    }

    fn node_certs(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.rows(
            "listing node certificates".into(),
            "SELECT node, serial FROM node_certs ORDER BY node, serial".into(),
            params![],
            text_pair,
        )
    }

    fn node_cert_serials(&self, node: &str) -> Result<Vec<String>, StoreError> {
        self.rows(
            format!("listing the certificates of node {node}"),
            "SELECT serial FROM node_certs WHERE node = $1 ORDER BY serial".into(),
            params![node.to_string()],
            text_one,
        )
    }

    fn node_of_cert(&self, serial: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .rows(
                format!("finding the node of certificate {serial}"),
                "SELECT node FROM node_certs WHERE serial = $1 ORDER BY node LIMIT 1".into(),
                params![serial.to_string()],
                text_one,
            )?
            .pop())
    }

    fn create_join_token(&self, t: &JoinTokenRecord) -> Result<(), StoreError> {
        self.exec(
            "storing a join token".into(),
            "INSERT INTO join_tokens (id, secret_sha256, member, node_pool, expires_ms, uses_left, created_by,
               created_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            params![
                t.id.clone(),
                t.secret_sha256.clone(),
                t.member.clone(),
                t.node_pool.clone(),
                t.expires_ms,
                i64::from(t.uses_left),
                t.created_by.clone(),
                t.created_ms
            ],
        )
        .map(drop)
    }

    fn list_join_tokens(&self) -> Result<Vec<JoinTokenRecord>, StoreError> {
        self.rows(
            "listing join tokens".into(),
            format!("SELECT {TOKEN_COLUMNS} FROM join_tokens ORDER BY created_ms, id"),
            params![],
            token_from_row,
        )
    }

    fn create_webhook(&self, h: &WebhookRecord) -> Result<(), StoreError> {
        let ctx = format!("creating webhook {}", h.name);
        let events = serde_json::to_string(&h.events).map_err(|e| corrupt(ctx.clone())(e.to_string()))?;
        let n = self.exec(
            ctx,
            "INSERT INTO webhooks (name, url, events, secret, created_ms) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (name) DO NOTHING",
            params![h.name.clone(), h.url.clone(), events, h.secret.clone(), h.created_ms],
        )?;
        if n == 0 {
            return Err(StoreError::Conflict(format!(
                "webhook {:?} exists; pick another name, or `upkeepctl webhook delete {}` first",
                h.name, h.name
            )));
        }
        Ok(())
    }

    fn list_webhooks(&self) -> Result<Vec<WebhookStatus>, StoreError> {
        self.rows(
            "listing webhooks".into(),
            "SELECT name, url, events, secret, created_ms, failures, last_attempt_ms, last_error, last_delivered_ms,
                (SELECT COUNT(*) FROM webhook_deliveries d WHERE d.webhook = w.name AND d.delivered_ms IS NULL)
             FROM webhooks w ORDER BY name"
                .into(),
            params![],
            |r, ctx| {
                let events: String = r.try_get(2).map_err(db(ctx))?;
                Ok(WebhookStatus {
                    hook: WebhookRecord {
                        name: r.try_get(0).map_err(db(ctx))?,
                        url: r.try_get(1).map_err(db(ctx))?,
                        events: serde_json::from_str(&events).map_err(|e| corrupt(ctx)(e.to_string()))?,
                        secret: r.try_get(3).map_err(db(ctx))?,
                        created_ms: r.try_get(4).map_err(db(ctx))?,
                    },
                    failures: r.try_get::<_, i64>(5).map_err(db(ctx))? as u64,
                    last_attempt_ms: r.try_get(6).map_err(db(ctx))?,
                    last_error: r.try_get(7).map_err(db(ctx))?,
                    last_delivered_ms: r.try_get(8).map_err(db(ctx))?,
                    pending: r.try_get::<_, i64>(9).map_err(db(ctx))? as u64,
                })
            },
        )
    }

    fn delete_webhook(&self, name: &str) -> Result<bool, StoreError> {
        let ctx = format!("deleting webhook {name}");
        let name = name.to_string();
        self.run(ctx.clone(), move |c| {
            let mut tx = c.transaction().map_err(db(ctx.clone()))?;
            tx.execute("DELETE FROM webhook_deliveries WHERE webhook = $1", &[&name]).map_err(db(ctx.clone()))?;
            let n = tx.execute("DELETE FROM webhooks WHERE name = $1", &[&name]).map_err(db(ctx.clone()))?;
            tx.commit().map_err(db(ctx))?;
            Ok(n > 0)
        })
    }

    fn enqueue_events(&self, events: &[OutboxEvent]) -> Result<(), StoreError> {
        let ctx = "enqueueing webhook events";
        let events = events.to_vec();
        self.run(ctx, move |c| {
            let mut tx = c.transaction().map_err(db(ctx))?;
            enqueue(&mut tx, &events)?;
            tx.commit().map_err(db(ctx))
        })
    }

    fn enqueue_once(&self, key: &str, at_ms: i64, events: &[OutboxEvent]) -> Result<bool, StoreError> {
        let ctx = "enqueueing a notice";
        let (key, events) = (key.to_string(), events.to_vec());
        self.run(ctx, move |c| {
            let mut tx = c.transaction().map_err(db(ctx))?;
            // Two hubs (or passes) sending the same notice take turns; the second finds it sent.
            lock(&mut tx, LOCK_NOTICE, &key, ctx)?;
            let sent: bool = tx
                .query_one("SELECT EXISTS (SELECT 1 FROM notices WHERE key = $1)", &[&key])
                .map_err(db(ctx))?
                .try_get(0)
                .map_err(db(ctx))?;
            if sent || enqueue(&mut tx, &events)? == 0 {
                return Ok(false);
            }
            tx.execute("INSERT INTO notices (key, at_ms) VALUES ($1, $2)", &[&key, &at_ms]).map_err(db(ctx))?;
            tx.commit().map_err(db(ctx))?;
            Ok(true)
        })
    }

    fn due_deliveries(&self, webhook: &str, now_ms: i64, limit: usize) -> Result<Vec<Delivery>, StoreError> {
        self.rows(
            format!("reading the deliveries owed to webhook {webhook}"),
            "SELECT d.seq, o.type, o.subject, o.time_ms, o.data, d.attempts
             FROM webhook_deliveries d JOIN outbox o ON o.seq = d.seq
             WHERE d.webhook = $1 AND d.delivered_ms IS NULL AND d.next_attempt_ms <= $2
               AND d.seq = (SELECT MIN(h.seq) FROM webhook_deliveries h
                            WHERE h.webhook = d.webhook AND h.subject = d.subject AND h.delivered_ms IS NULL)
             ORDER BY d.seq LIMIT $3"
                .into(),
            params![webhook.to_string(), now_ms, limit.min(i64::MAX as usize) as i64],
            |r, ctx| {
                Ok(Delivery {
                    seq: r.try_get::<_, i64>(0).map_err(db(ctx))? as u64,
                    event: OutboxEvent {
                        event_type: r.try_get(1).map_err(db(ctx))?,
                        subject: r.try_get(2).map_err(db(ctx))?,
                        time_ms: r.try_get(3).map_err(db(ctx))?,
                        data: r.try_get(4).map_err(db(ctx))?,
                    },
                    attempts: r.try_get::<_, i64>(5).map_err(db(ctx))?.clamp(0, i64::from(u32::MAX)) as u32,
                })
            },
        )
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
        let (webhook, error, seq) = (webhook.to_string(), error.map(str::to_string), seq.min(i64::MAX as u64) as i64);
        self.run(ctx.clone(), move |c| {
            let mut tx = c.transaction().map_err(db(ctx.clone()))?;
            match error {
                None => {
                    tx.execute(
                        "UPDATE webhook_deliveries SET attempts = attempts + 1, delivered_ms = $3
                         WHERE webhook = $1 AND seq = $2",
                        &[&webhook, &seq, &at_ms],
                    )
                    .map_err(db(ctx.clone()))?;
                    tx.execute(
                        "UPDATE webhooks SET last_attempt_ms = $2, last_error = '', last_delivered_ms = $2 WHERE name = $1",
                        &[&webhook, &at_ms],
                    )
                    .map_err(db(ctx.clone()))?;
                }
                Some(e) => {
                    tx.execute(
                        "UPDATE webhook_deliveries SET attempts = attempts + 1, next_attempt_ms = $3
                         WHERE webhook = $1 AND seq = $2",
                        &[&webhook, &seq, &retry_at_ms],
                    )
                    .map_err(db(ctx.clone()))?;
                    tx.execute(
                        "UPDATE webhooks SET last_attempt_ms = $2, last_error = $3, failures = failures + 1
                         WHERE name = $1",
                        &[&webhook, &at_ms, &e],
                    )
                    .map_err(db(ctx.clone()))?;
                }
            }
            tx.commit().map_err(db(ctx))
        })
    }

    fn prune_outbox(&self, before_ms: i64) -> Result<u64, StoreError> {
        let ctx = "pruning the webhook outbox";
        self.run(ctx, move |c| {
            let mut tx = c.transaction().map_err(db(ctx))?;
            tx.execute(
                "DELETE FROM webhook_deliveries WHERE delivered_ms IS NOT NULL AND delivered_ms < $1",
                &[&before_ms],
            )
            .map_err(db(ctx))?;
            let n = tx
                .execute(
                    "DELETE FROM outbox WHERE NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.seq = outbox.seq)",
                    &[],
                )
                .map_err(db(ctx))?;
            tx.execute("DELETE FROM notices WHERE at_ms < $1", &[&before_ms]).map_err(db(ctx))?;
            tx.commit().map_err(db(ctx))?;
            Ok(n)
        })
    }

    fn revoke_join_token(&self, id: &str) -> Result<bool, StoreError> {
        let n = self.exec(
            format!("revoking join token {id}"),
            "DELETE FROM join_tokens WHERE id = $1",
            params![id.to_string()],
        )?;
        Ok(n > 0)
    }

    fn check_join_token(
        &self,
        id: &str,
        secret_sha256: &str,
        now_ms: i64,
    ) -> Result<Result<JoinTokenRecord, TokenRefusal>, StoreError> {
        let ctx = format!("reading join token {id}");
        let (id, secret) = (id.to_string(), secret_sha256.to_string());
        self.run(ctx.clone(), move |c| checked_token(c, &id, &secret, now_ms, false, &ctx))
    }

    fn use_join_token(
        &self,
        id: &str,
        secret_sha256: &str,
        node: &str,
        now_ms: i64,
    ) -> Result<Result<JoinTokenRecord, TokenRefusal>, StoreError> {
        let ctx = format!("using join token {id}");
        let (id, secret, node) = (id.to_string(), secret_sha256.to_string(), node.to_string());
        self.run(ctx.clone(), move |c| {
            let mut tx = c.transaction().map_err(db(ctx.clone()))?;
            let mut token = match checked_token(&mut tx, &id, &secret, now_ms, true, &ctx)? {
                Ok(t) => t,
                // Nothing written: the transaction is rolled back on drop.
                Err(refusal) => return Ok(Err(refusal)),
            };
            tx.execute("UPDATE join_tokens SET uses_left = uses_left - 1 WHERE id = $1 AND uses_left > 0", &[&id])
                .map_err(db(ctx.clone()))?;
            tx.execute(
                "INSERT INTO join_token_uses (token_id, node, at_ms) VALUES ($1, $2, $3)",
                &[&id, &node, &now_ms],
            )
            .map_err(db(ctx.clone()))?;
            tx.commit().map_err(db(ctx))?;
            token.uses_left -= 1;
            Ok(Ok(token))
        })
    }
}

/// Throwaway databases for tests (the hub's own unit tests and the scenario harness): one PostgreSQL cluster
/// shared by every test process, a fresh migrated database for each store.
pub mod testing {
    use super::{PostgresSettings, StoreError, with_connection};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// The variable naming the shared test cluster (`host=DIR port=PORT user=postgres`), set by `scripts/test`.
    pub const CLUSTER_ENV: &str = "UPKEEP_TEST_PG";

    /// The test cluster's connection string: `UPKEEP_TEST_PG`, else a cluster in `<tmp>/upkeep-test-pg` started
    /// (or found running) by `scripts/pg-cluster`; it keeps running for the next test (stop it with
    /// `scripts/pg-cluster stop <tmp>/upkeep-test-pg`). Err says what is missing.
    pub fn cluster() -> Result<String, String> {
        if let Ok(c) = std::env::var(CLUSTER_ENV)
            && !c.trim().is_empty()
        {
            return Ok(c);
        }
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/pg-cluster");
        let dir = std::env::temp_dir().join("upkeep-test-pg");
        // Test processes run side by side: one starts the cluster, the others find it running.
        let lock_path = std::env::temp_dir().join("upkeep-test-pg.lock");
        let lock = std::fs::File::create(&lock_path).map_err(|e| format!("{}: {e}", lock_path.display()))?;
        lock.lock().map_err(|e| format!("locking {}: {e}", lock_path.display()))?;
        let out = std::process::Command::new(&script)
            .arg("start")
            .arg(&dir)
            .output()
            .map_err(|e| format!("{}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "no PostgreSQL for the tests: {CLUSTER_ENV} is not set and `scripts/pg-cluster start {}` failed: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// A new database on the test cluster, migrated to the current schema: its connection string and settings.
    pub fn fresh_database() -> Result<(String, PostgresSettings), String> {
        let (url, settings) = empty_database()?;
        super::migrate(&settings).map_err(|e| e.to_string())?;
        Ok((url, settings))
    }

    /// A new, empty database on the test cluster (no schema): its connection string and settings.
    pub fn empty_database() -> Result<(String, PostgresSettings), String> {
        static N: AtomicU64 = AtomicU64::new(0);
        let cluster = cluster()?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let name = format!("upkeep_t{}_{}_{nanos}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
        let admin = PostgresSettings::parse(&format!("{cluster} dbname=postgres"))?;
        // FILE_COPY: a small database copied as files, not written through the log (the log stays small).
        let create = format!("CREATE DATABASE {name} STRATEGY FILE_COPY");
        with_connection(&admin, format!("creating database {name}"), move |c| {
            c.batch_execute(&create)
                .map_err(|e| StoreError::Db { context: "creating a test database".into(), source: Box::new(e) })
        })
        .map_err(|e| format!("{e} (cluster {cluster})"))?;
        let url = format!("{cluster} dbname={name}");
        let settings = PostgresSettings::parse(&url)?;
        Ok((url, settings))
    }

    /// Drops a test database, ending its sessions first.
    pub fn drop_database(settings: &PostgresSettings) -> Result<(), String> {
        let name = settings.config.get_dbname().unwrap_or_default().to_string();
        let mut admin = settings.clone();
        admin.config.dbname("postgres");
        with_connection(&admin, format!("dropping database {name}"), move |c| {
            c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .map_err(|e| StoreError::Db { context: "dropping a test database".into(), source: Box::new(e) })
        })
        .map_err(|e| e.to_string())
    }

    /// Ends every session on the database but the caller's (what a database restart does to a hub's
    /// connections, without disturbing the other tests sharing the cluster); returns how many it ended.
    pub fn terminate_sessions(settings: &PostgresSettings) -> Result<i64, String> {
        let name = settings.config.get_dbname().unwrap_or_default().to_string();
        with_connection(settings, "ending sessions".into(), move |c| {
            let row = c
                .query_one(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                     WHERE datname = $1 AND pid <> pg_backend_pid()",
                    &[&name],
                )
                .map_err(|e| StoreError::Db { context: "ending sessions".into(), source: Box::new(e) })?;
            row.try_get::<_, i64>(0)
                .map_err(|e| StoreError::Db { context: "ending sessions".into(), source: Box::new(e) })
        })
        .map_err(|e| e.to_string())
    }
}
