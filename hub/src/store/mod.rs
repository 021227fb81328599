//! The hub's persistent state behind one trait, `Store`.
//!
//! `sqlite` is the embedded default (one file, WAL); `postgres` is the server store (`[store] url` in hub.toml),
//! for fleets that outgrow one machine. The store holds facts; it makes no decisions.

#[cfg(test)]
mod contract;
pub mod fence;
pub mod import;
pub mod postgres;
pub mod runparts;
pub mod safety;
pub mod sqlite;
pub mod view;

use serde::{Deserialize, Serialize};
use upkeep_core::channel::{AutoUpgradeChannel, NodeOsChannel};

/// Where the hub keeps its state (`[store]` in hub.toml).
#[derive(Debug, Clone)]
pub enum StoreBackend {
    /// The embedded default: `hub.db` under `state_dir` (no `[store] url`).
    Sqlite,
    /// A PostgreSQL database (`[store] url`).
    Postgres(Box<postgres::PostgresSettings>),
}

/// Opens the store `backend` names (hub.toml's `store`): PostgreSQL when `[store] url` is set (its schema must be
/// current: `upkeep-hub migrate`), else the SQLite database under `state_dir` (checked, and migrated in place).
pub fn open(backend: &StoreBackend, state_dir: &std::path::Path) -> anyhow::Result<std::sync::Arc<dyn Store>> {
    Ok(match backend {
        StoreBackend::Sqlite => std::sync::Arc::new(safety::open_state(state_dir)?),
        StoreBackend::Postgres(s) => std::sync::Arc::new(self::postgres::PostgresStore::open(s)?),
    })
}

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed an operation. The cause is the backend's own error, kept as such (the
    /// trait names no backend's types, so that SQLite and a server database answer alike).
    #[error("{context}: {source}")]
    Db {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A stored value could not be decoded (corruption or a newer schema).
    #[error("{context}: stored value is unreadable: {reason}")]
    Corrupt {
        /// Where.
        context: String,
        /// Why.
        reason: String,
    },
    /// The request conflicts with what is stored (a name taken, a version republished with other bytes).
    #[error("{0}")]
    Conflict(String),
    /// A write of a leader whose term is no longer current was refused (`store::fence`): another replica leads
    /// now. The replica that got it steps down and acts no further.
    #[error("{0}")]
    Fenced(String),
    /// The named thing does not exist.
    #[error("{kind} {name:?} not found; {hint}")]
    NotFound {
        /// Member, node...
        kind: &'static str,
        /// The name asked for.
        name: String,
        /// Where to look.
        hint: &'static str,
    },
}

/// Where a node's agent session is: which replica (and which start of it) holds it, its id there, and since when
/// the node has been silent on it (a frozen agent), as that replica announced (`crate::relay`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionPlace {
    /// The node.
    pub node: String,
    /// The replica holding the session.
    pub replica: String,
    /// That replica's start (a restarted replica holds none of its earlier sessions).
    pub instance: u64,
    /// The session's id on that replica.
    pub session: u64,
    /// Silent on its open session since (Unix ms), if it is.
    pub silent_since_ms: Option<i64>,
}

/// A change of the session places (`Store::relay_post`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionChange {
    /// The node's session is now (or is still, with a new silence) this one.
    Here(SessionPlace),
    /// This session of the node ended (a newer one elsewhere is left alone).
    Gone {
        /// The node.
        node: String,
        /// The replica that held it.
        replica: String,
        /// That replica's start.
        instance: u64,
        /// The session's id there.
        session: u64,
    },
}

/// Waits for the relay's wake-ups on a connection of its own (`Store::relay_listener`).
pub trait RelayWait: Send {
    /// Waits at most `timeout` for a wake-up; true when one came. A broken connection is an error (the caller
    /// opens another one and reads what it missed).
    fn wait(&mut self, timeout: std::time::Duration) -> Result<bool, StoreError>;
}

fn no_relay() -> StoreError {
    StoreError::Conflict(
        "hub replicas need a shared PostgreSQL store: set [store] url in hub.toml, or remove [cluster]".into(),
    )
}

/// Everything a node last reported about itself (mirrors the wire NodeReport, minus the node name).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFacts {
    /// Member the node belongs to.
    pub member: String,
    /// Node pool inside the member.
    pub node_pool: String,
    /// Region.
    pub region: String,
    /// os-release ID.
    pub os_family: String,
    /// os-release VERSION_ID.
    pub os_version: String,
    /// Kernel release.
    pub kernel: String,
    /// `<family>-<YYYYMM.DD.N>`, empty if unknown: what people and the node label see, the booted image with the
    /// applied security patch folded in (SPEC §1). Never compare it for a decision: use [`Self::image_version`]
    /// and `security_patch_version`.
    pub node_image_version: String,
    /// `<family>-<YYYYMM.DD.N>` of the booted image alone; empty if unknown or sent by an agent older than the
    /// field (rows stored before it load with it empty). Read it through [`Self::image_version`].
    #[serde(default)]
    pub booted_image_version: String,
    /// Security patch version, empty if none.
    pub security_patch_version: String,
    /// Whether the OS says a reboot is required.
    pub reboot_required: bool,
    /// Channel the agent enforces.
    pub channel: String,
    /// Agent version.
    pub agent_version: String,
    /// Kubernetes version, empty if none.
    pub kubernetes_version: String,
    /// Runs the member's control plane.
    pub control_plane: bool,
    /// Hardware class of the pool.
    pub hardware_class: String,
    /// Operations in flight: (id, kind, step, state).
    pub operations: Vec<OperationFact>,
    /// What the agent says about the channel in force (refusals, fallbacks), empty if nothing.
    #[serde(default)]
    pub channel_note: String,
}

impl NodeFacts {
    /// The booted image, `<family>-<YYYYMM.DD.N>` (empty if unknown): what NodeImage decisions compare with the
    /// catalog. Agents older than `booted_image_version` did not fold patches in, so their
    /// `node_image_version` is the booted image.
    pub fn image_version(&self) -> &str {
        if self.booted_image_version.is_empty() { &self.node_image_version } else { &self.booted_image_version }
    }
}

/// One operation in flight on a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationFact {
    /// Operation id.
    pub operation_id: String,
    /// Kind (cordon, drain, reimage...).
    pub kind: String,
    /// Step reached.
    pub step: String,
    /// running, succeeded, failed.
    pub state: String,
}

/// A node in the inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// Node name (from its certificate).
    pub name: String,
    /// Last report.
    pub facts: NodeFacts,
    /// First registration, Unix ms.
    pub first_seen_ms: i64,
    /// Last message of any kind, Unix ms.
    pub last_seen_ms: i64,
    /// Last report, Unix ms.
    pub last_report_ms: i64,
}

/// A member and its configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRecord {
    /// Member name.
    pub name: String,
    /// Node OS upgrade channel.
    pub node_os_channel: NodeOsChannel,
    /// Cluster auto-upgrade channel.
    pub auto_upgrade_channel: AutoUpgradeChannel,
    /// Bumped on every configuration change; agents ignore older ones.
    pub generation: u64,
    /// Nodes currently in the inventory.
    pub node_count: u32,
    /// Distinct regions of its nodes.
    pub regions: Vec<String>,
    /// Distinct node pools.
    pub node_pools: Vec<String>,
}

/// Where a release is available: region -> available from (Unix ms).
pub type Regions = std::collections::BTreeMap<String, i64>;

/// A node image version in the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    /// Image family.
    pub family: String,
    /// `YYYYMM.DD.N`.
    pub version: String,
    /// region -> available from (Unix ms).
    pub regions: std::collections::BTreeMap<String, i64>,
    /// Artifact digest (hex).
    pub sha256: String,
    /// Detached signature text.
    pub signature: String,
    /// https URL when not stored on the hub.
    pub url: String,
    /// Artifact size.
    pub size_bytes: u64,
    /// When it was published (Unix ms).
    pub published_ms: i64,
}

/// A member's windows and disruption settings (JSON schedules as given, validated by the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberSettings {
    /// Member name.
    pub member: String,
    /// Node OS maintenance schedule (JSON), if any.
    pub node_os_schedule: Option<String>,
    /// Cluster maintenance schedule (JSON), if any.
    pub cluster_schedule: Option<String>,
    /// Count or percentage of the member's nodes out of service at once (every kind of work together).
    pub max_unavailable: String,
    /// Drain timeout and undrainable policy (JSON of `upkeep_core::work::DrainPolicy`); None: the defaults.
    pub drain_policy: Option<String>,
}

impl MemberSettings {
    /// The settings of a member nobody configured.
    pub fn defaults(member: &str) -> MemberSettings {
        MemberSettings {
            member: member.to_string(),
            node_os_schedule: None,
            cluster_schedule: None,
            max_unavailable: "1".into(),
            drain_policy: None,
        }
    }

    /// The drain policy (defaults when unset or unreadable).
    pub fn drain(&self) -> upkeep_core::work::DrainPolicy {
        self.drain_policy.as_deref().and_then(|j| serde_json::from_str(j).ok()).unwrap_or_default()
    }

    /// `max_unavailable` parsed (one node when unreadable).
    pub fn budget(&self) -> upkeep_core::concurrency::Limit {
        self.max_unavailable.parse().unwrap_or(upkeep_core::concurrency::Limit::Count(1))
    }
}

/// One piece of node work as stored (`hub/src/executor.rs` owns the state JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    /// Work id (also the lease id of its nodes, and the prefix of its operation ids).
    pub id: String,
    /// The member it works on.
    pub member: String,
    /// Running, Completed, Failed.
    pub status: String,
    /// Executor state (JSON).
    pub state: String,
    /// Last written (Unix ms).
    pub updated_ms: i64,
}

/// Which maintenance window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    /// Node OS upgrades (and NodeImageOnly runs).
    NodeOs,
    /// Cluster auto-upgrade (and Full / ControlPlaneOnly runs).
    Cluster,
}

/// A stored update run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRecord {
    /// Run name.
    pub name: String,
    /// The core RunState in parts (key, JSON), as `runparts` cuts it.
    pub parts: Vec<(String, String)>,
    /// Bumped by every commit (what a commit's compare-and-swap checks).
    pub version: u64,
    /// The run level's status as last committed.
    pub status: String,
    /// The strategy it was copied from.
    pub strategy_name: Option<String>,
    /// Created (Unix ms).
    pub created_ms: i64,
}

impl RunRecord {
    /// The run's state, put together from its parts (the unreadable or missing part is named).
    pub fn state(&self) -> Result<upkeep_core::run::RunState, runparts::PartError> {
        runparts::join(&self.parts)
    }
}

/// An event to append (the store assigns the sequence number).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// Unix ms.
    pub at_ms: i64,
    /// run, stage, wait, group, member, node.
    pub kind: String,
    /// Human name of the level.
    pub level: String,
    /// Status before.
    pub from: String,
    /// Status after.
    pub to: String,
    /// Message.
    pub message: String,
    /// Error, empty if none.
    pub error: String,
    /// The run's status after the event.
    pub run_status: String,
}

/// A stored event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    /// Sequence number, increasing across the hub.
    pub seq: u64,
    /// Run name.
    pub run: String,
    /// The event.
    pub event: NewEvent,
}

/// A published security patch: an exact package set for an image family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityPatchRecord {
    /// Image family.
    pub family: String,
    /// `YYYYMM.DD.N`.
    pub version: String,
    /// `name=version` pins.
    pub packages: Vec<String>,
    /// Published (Unix ms).
    pub published_ms: i64,
}

/// A certificate the hub refuses (`upkeepctl pki revoke`, `upkeepctl node forget`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedCert {
    /// Serial, lowercase hex without leading zeros (`revocation::normalise_serial`).
    pub serial: String,
    /// Whose it was, when the hub knows (`node NAME`), else empty.
    pub subject: String,
    /// Why, as the operator said.
    pub reason: String,
    /// The operator who revoked it.
    pub revoked_by: String,
    /// When.
    pub revoked_ms: i64,
}

/// A join token (`upkeepctl pki token create`): only the SHA-256 of its secret is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTokenRecord {
    /// Public id (the part of the token before the dot), how the hub finds the row.
    pub id: String,
    /// Lower-case hex SHA-256 of the secret.
    pub secret_sha256: String,
    /// The member a node joining with it belongs to.
    pub member: String,
    /// Its node pool.
    pub node_pool: String,
    /// Refused from then on (Unix ms).
    pub expires_ms: i64,
    /// Joins left.
    pub uses_left: u32,
    /// The operator who created it.
    pub created_by: String,
    /// When (Unix ms).
    pub created_ms: i64,
}

/// Why a join token was not accepted (nothing was changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// No token with that id and secret (never made, mistyped, or revoked).
    Unknown,
    /// Past its expiry.
    Expired,
    /// Every use was taken.
    UsedUp,
}

/// A disruption lease: a node out of service with the hub's permission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    /// The node out of service.
    pub node: String,
    /// Lease id (chosen by the node for its own reboots; `auto/<rollout>/<node>` for the hub's rollouts).
    pub lease_id: String,
    /// The node's member when granted.
    pub member: String,
    /// `node` (asked by the agent), `operator` (upkeepctl node reboot) or `hub` (a channel rollout).
    pub holder: String,
    /// What for.
    pub purpose: String,
    /// Granted (Unix ms).
    pub granted_ms: i64,
    /// Lapses at (Unix ms) unless extended.
    pub expires_ms: i64,
    /// Granted outside the window by an operator.
    pub forced: bool,
}

/// Whose leases to read (`Store::leases_of`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeasesOf<'a> {
    /// Every lease granted for a node of this member (as the lease recorded it).
    Member(&'a str),
    /// Every lease of this node.
    Node(&'a str),
}

impl LeasesOf<'_> {
    /// Whether `lease` is one of these.
    pub fn holds(&self, lease: &LeaseRecord) -> bool {
        match self {
            LeasesOf::Member(m) => lease.member == *m,
            LeasesOf::Node(n) => lease.node == *n,
        }
    }
}

/// A webhook (`upkeepctl webhook create`): where events whose type matches one of its patterns are delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookRecord {
    /// Unique name.
    pub name: String,
    /// `https://` URL (or `http://` to a loopback address), checked by `crate::webhooks::check_url`.
    pub url: String,
    /// Event type patterns (`run.*`, `node.ready`; `upkeep_core::events::type_matches`).
    pub events: Vec<String>,
    /// HMAC-SHA256 key of the signature header; empty: deliveries are not signed. Never shown.
    pub secret: String,
    /// Created (Unix ms).
    pub created_ms: i64,
}

/// A webhook with its delivery progress (`upkeepctl webhook list`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookStatus {
    /// The webhook.
    pub hook: WebhookRecord,
    /// Events waiting for delivery to it.
    pub pending: u64,
    /// Failed delivery attempts since it was created.
    pub failures: u64,
    /// Last attempt (Unix ms), 0 if none.
    pub last_attempt_ms: i64,
    /// The error of the last attempt, empty if it succeeded (or there was none).
    pub last_error: String,
    /// Last successful delivery (Unix ms), 0 if none.
    pub last_delivered_ms: i64,
}

/// An event for the webhook outbox: CloudEvents attributes and data; the store assigns the sequence number (the
/// CloudEvents `id`). Kept only when a webhook's patterns match its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    /// `upkeep.<area>.<what>`, e.g. `upkeep.run.member.completed`.
    pub event_type: String,
    /// What it is about: `runs/<run>`, `nodes/<node>`, `members/<member>`; deliveries keep order per subject.
    pub subject: String,
    /// When it happened (Unix ms).
    pub time_ms: i64,
    /// The event's data (a JSON object).
    pub data: String,
}

/// One outbox event owed to one webhook: the oldest undelivered of its subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Outbox sequence number (the CloudEvents `id`).
    pub seq: u64,
    /// The event.
    pub event: OutboxEvent,
    /// Attempts so far.
    pub attempts: u32,
}

/// The outbox event of a stored run event (what `commit_run` and `append_events` enqueue in their transaction).
pub fn run_event_outbox(e: &EventRecord) -> OutboxEvent {
    let to = upkeep_core::events::snake(&e.event.to);
    OutboxEvent {
        event_type: format!("upkeep.run.{}.{to}", upkeep_core::events::snake(&e.event.kind)),
        subject: format!("runs/{}", e.run),
        time_ms: e.event.at_ms,
        data: serde_json::json!({
            "run": e.run, "seq": e.seq, "kind": e.event.kind, "level": e.event.level, "from": e.event.from,
            "to": e.event.to, "message": e.event.message, "error": e.event.error, "run_status": e.event.run_status,
        })
        .to_string(),
    }
}

/// One node report to record (`Store::record_reports`).
#[derive(Debug, Clone)]
pub struct ReportWrite {
    /// The reporting node (from its certificate).
    pub node: String,
    /// What it reported.
    pub facts: NodeFacts,
    /// When the hub read it.
    pub now_ms: i64,
}

/// `Store::record_reports` for a store that writes a batch in one transaction (`together`, which returns each
/// report's member in order): a batch of one is written as `record_report` writes it, and a batch whose transaction
/// failed (and so was rolled back whole) is written again report by report, for an answer of each its own.
fn reports_together_or_alone<S: Store + ?Sized>(
    store: &S,
    batch: &[ReportWrite],
    together: impl FnOnce() -> Result<Vec<MemberRecord>, StoreError>,
) -> Vec<Result<MemberRecord, StoreError>> {
    let alone = || batch.iter().map(|r| store.record_report(&r.node, &r.facts, r.now_ms)).collect();
    if batch.len() < 2 {
        return alone();
    }
    match together() {
        Ok(members) => members.into_iter().map(Ok).collect(),
        Err(_) => alone(),
    }
}

/// The hub's persistent state. Implementations must be safe to call from many tasks.
pub trait Store: Send + Sync {
    /// Records a node's report (creating the node, and its member with the default channel, if new).
    /// Returns the member's configuration.
    fn record_report(&self, name: &str, facts: &NodeFacts, now_ms: i64) -> Result<MemberRecord, StoreError>;
    /// Records several reports, each as `record_report` would, in one transaction where the store can: the
    /// hub writes the reports that arrive together this way (`crate::reports`), so that a busy fleet's reports
    /// cost one commit per batch instead of one each. Answers in the batch's order. When the batch as a whole
    /// fails, each report is tried alone, so one that cannot be written fails only its own sender.
    fn record_reports(&self, batch: &[ReportWrite]) -> Vec<Result<MemberRecord, StoreError>> {
        batch.iter().map(|r| self.record_report(&r.node, &r.facts, r.now_ms)).collect()
    }
    /// Moves last-seen times forward (never backward) for many nodes in one transaction.
    fn touch_nodes(&self, seen: &[(String, i64)]) -> Result<(), StoreError>;
    /// All nodes, or those of one member, ordered by member then name.
    fn list_nodes(&self, member: Option<&str>) -> Result<Vec<NodeRecord>, StoreError>;
    /// One node.
    fn get_node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError>;
    /// Removes a node; true if it existed.
    fn forget_node(&self, name: &str) -> Result<bool, StoreError>;
    /// All members, by name.
    fn list_members(&self) -> Result<Vec<MemberRecord>, StoreError>;
    /// One member.
    fn get_member(&self, name: &str) -> Result<Option<MemberRecord>, StoreError>;
    /// Sets the node OS channel (the caller has checked the rules); bumps the generation.
    fn set_node_os_channel(&self, member: &str, channel: NodeOsChannel) -> Result<MemberRecord, StoreError>;
    /// Sets the cluster auto-upgrade channel; bumps the generation.
    fn set_auto_upgrade_channel(&self, member: &str, channel: AutoUpgradeChannel) -> Result<MemberRecord, StoreError>;

    /// Windows and disruption settings of a member (defaults if never set).
    fn member_settings(&self, member: &str) -> Result<MemberSettings, StoreError>;
    /// Settings of every member that has any set (one query; members absent have the defaults).
    fn all_member_settings(&self) -> Result<Vec<MemberSettings>, StoreError>;
    /// Sets or clears one window of a member.
    fn set_member_window(
        &self,
        member: &str,
        kind: WindowKind,
        schedule: Option<&str>,
    ) -> Result<MemberSettings, StoreError>;
    /// Sets a member's max_unavailable.
    fn set_member_disruption(&self, member: &str, max_unavailable: &str) -> Result<MemberSettings, StoreError>;
    /// Sets a member's drain policy (JSON of `DrainPolicy`).
    fn set_member_drain(&self, member: &str, policy_json: &str) -> Result<MemberSettings, StoreError>;
    /// Advances and returns the hub epoch (once per hub start, and whenever a replica becomes the leader): the high
    /// part of every command generation.
    fn next_epoch(&self) -> Result<u64, StoreError>;

    // Leadership (`crate::cluster`). Only a store several hubs can share elects: a single hub (SQLite, or
    // PostgreSQL without `[cluster]`) is always the leader and never calls these. Fenced writes (`store::fence`):
    // `commit_run`, `put_job`, `put_lease`, `release_leases`, `expire_leases`, `put_rollout` made from a thread
    // carrying a term are refused with `StoreError::Fenced` unless that term is the current one.
    /// Takes or renews the leader lease for `replica` for `lease_ms` (measured by the database's clock): renewed
    /// (same term) when `replica` holds it at `held`; taken with the next term when it lapsed, or when `replica`
    /// holds it at another term than `held` (it stepped down meanwhile); else None (another replica leads).
    /// The default, for a store only one hub uses: always the leader, at term 1.
    fn lead(&self, replica: &str, lease_ms: i64, held: Option<u64>) -> Result<Option<u64>, StoreError> {
        let _ = (replica, lease_ms);
        Ok(Some(held.unwrap_or(1)))
    }
    /// Checks that this thread's leader term (`store::fence`) is still the current one, as a fenced write does
    /// (`StoreError::Fenced` if not; always Ok for a thread without a term, and for a store only one hub uses).
    /// The leader's work calls it before every command it sends to a node.
    fn check_fence(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Lets the lease lapse now if `replica` holds it at `term` (a clean shutdown: another replica takes over at
    /// its next attempt).
    fn resign(&self, replica: &str, term: u64) -> Result<(), StoreError> {
        let _ = (replica, term);
        Ok(())
    }

    // The relay between replicas (`crate::relay`): notes written to a table in the order they commit, a NOTIFY
    // waking the readers, and where each node's agent session is. Only a store several hubs share has one.
    /// Appends `notes` (in order) and applies `sessions` to the table of session places, in one transaction, and
    /// wakes every replica's listener.
    fn relay_post(&self, notes: &[Vec<u8>], sessions: &[SessionChange]) -> Result<(), StoreError> {
        let _ = (notes, sessions);
        Err(no_relay())
    }
    /// Notes after sequence number `after`, oldest first, at most `limit`. A reader that went on from the last
    /// one it read never skips a note committed later with a lower number (posting is serialised).
    fn relay_since(&self, after: i64, limit: usize) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
        let _ = (after, limit);
        Err(no_relay())
    }
    /// The newest note's sequence number (0 when none): where a replica that starts begins to read.
    fn relay_head(&self) -> Result<i64, StoreError> {
        Err(no_relay())
    }
    /// Drops notes older than `keep_ms` by the database's clock; returns how many.
    fn relay_prune(&self, keep_ms: i64) -> Result<u64, StoreError> {
        let _ = keep_ms;
        Err(no_relay())
    }
    /// Records that `replica` (this start of it: `instance`) is alive now (the database's clock) and returns every
    /// replica heard from within `alive_ms`, itself included.
    fn replica_alive(&self, replica: &str, instance: u64, alive_ms: i64) -> Result<Vec<(String, u64)>, StoreError> {
        let _ = (replica, instance, alive_ms);
        Err(no_relay())
    }
    /// Where every node's agent session is, as the replicas holding them announced.
    fn session_places(&self) -> Result<Vec<SessionPlace>, StoreError> {
        Err(no_relay())
    }
    /// Forgets every session place of `replica` (it starts again: its earlier sessions are gone).
    fn drop_session_places(&self, replica: &str) -> Result<(), StoreError> {
        let _ = replica;
        Err(no_relay())
    }
    /// A connection of its own that waits for the relay's wake-ups.
    fn relay_listener(&self) -> Result<Box<dyn RelayWait>, StoreError> {
        Err(no_relay())
    }
    /// Records (inserts or replaces) a piece of node work.
    fn put_job(&self, job: &JobRecord) -> Result<(), StoreError>;
    /// One piece of node work.
    fn get_job(&self, id: &str) -> Result<Option<JobRecord>, StoreError>;
    /// Node work, optionally only that with this status.
    fn list_jobs(&self, status: Option<&str>) -> Result<Vec<JobRecord>, StoreError>;

    /// Publishes an image version, or adds regions to one already published: the regions given are added to
    /// those it has (a region given again takes the new availability time), the URL may move. Its digest, size
    /// and signature never change: different ones are a Conflict naming the field. Returns the stored version.
    fn put_image(&self, image: &ImageRecord) -> Result<ImageRecord, StoreError>;
    /// Withdraws a published image version from one region and returns what remains. An unknown version is
    /// NotFound; a region it is not published in, or its last region, is a Conflict. A refusal changes nothing.
    fn withdraw_image_region(&self, family: &str, version: &str, region: &str) -> Result<ImageRecord, StoreError>;
    /// Catalog, optionally of one family.
    fn list_images(&self, family: Option<&str>) -> Result<Vec<ImageRecord>, StoreError>;
    /// Publishes (or extends the regions of) a Kubernetes release: version -> region -> available from (ms).
    fn put_kubernetes(
        &self,
        version: &str,
        regions: &std::collections::BTreeMap<String, i64>,
    ) -> Result<(), StoreError>;
    /// Every Kubernetes release with its regions.
    fn list_kubernetes(&self) -> Result<Vec<(String, Regions)>, StoreError>;

    /// Creates or replaces a strategy (runs copy strategies, so edits never reach them).
    fn put_strategy(&self, name: &str, spec_json: &str) -> Result<(), StoreError>;
    /// One strategy's JSON.
    fn get_strategy(&self, name: &str) -> Result<Option<String>, StoreError>;
    /// All strategies (name, JSON).
    fn list_strategies(&self) -> Result<Vec<(String, String)>, StoreError>;
    /// Deletes a strategy; true if it existed.
    fn delete_strategy(&self, name: &str) -> Result<bool, StoreError>;

    /// Creates a run; a taken name conflicts.
    fn create_run(&self, run: &RunRecord) -> Result<(), StoreError>;
    /// One run.
    fn get_run(&self, name: &str) -> Result<Option<RunRecord>, StoreError>;
    /// All runs, oldest first.
    fn list_runs(&self) -> Result<Vec<RunRecord>, StoreError>;
    /// Deletes a run and its events; true if it existed.
    fn delete_run(&self, name: &str) -> Result<bool, StoreError>;
    /// Writes parts of a run's state (only if its version is still `expected`, then bumps it), records its
    /// status and appends its events, in one transaction. Returns the stored events. A run that changed
    /// underneath is a Conflict: the caller re-plans.
    fn commit_run(
        &self,
        name: &str,
        expected: u64,
        status: &str,
        write: &runparts::RunWrite,
        events: &[NewEvent],
    ) -> Result<Vec<EventRecord>, StoreError>;
    /// Every run's name, version and status, oldest first (what changed since a cached copy, without its parts).
    fn run_versions(&self) -> Result<Vec<(String, u64, String)>, StoreError>;
    /// One run's version (None: no such run).
    fn run_version(&self, name: &str) -> Result<Option<u64>, StoreError>;
    /// Appends events without a state change (node progress).
    fn append_events(&self, run: &str, events: &[NewEvent]) -> Result<Vec<EventRecord>, StoreError>;
    /// Events of a run with seq > `after`, in order.
    fn events_since(&self, run: &str, after: u64) -> Result<Vec<EventRecord>, StoreError>;

    /// Publishes a security patch; republishing the same packages is a no-op, other packages conflict.
    fn put_security_patch(&self, patch: &SecurityPatchRecord) -> Result<(), StoreError>;
    /// Security patches, optionally of one family, oldest first.
    fn list_security_patches(&self, family: Option<&str>) -> Result<Vec<SecurityPatchRecord>, StoreError>;

    /// Records a granted lease (replacing one with the same node and id).
    fn put_lease(&self, lease: &LeaseRecord) -> Result<(), StoreError>;
    /// Every lease, expired or not, by member then node.
    fn list_leases(&self) -> Result<Vec<LeaseRecord>, StoreError>;
    /// The leases of one member or one node, expired or not, in `list_leases`' order. A lease decision needs
    /// its member's leases only, and a release its node's.
    fn leases_of(&self, of: LeasesOf<'_>) -> Result<Vec<LeaseRecord>, StoreError> {
        Ok(self.list_leases()?.into_iter().filter(|l| of.holds(l)).collect())
    }
    /// Releases the node's leases named in `ids`, or with `all_except` every other lease of the node.
    /// Returns the released leases.
    fn release_leases(&self, node: &str, ids: &[String], all_except: bool) -> Result<Vec<LeaseRecord>, StoreError>;
    /// Moves the expiry of every lease of `node` to `expires_ms` (the holder is alive).
    fn extend_leases(&self, node: &str, expires_ms: i64) -> Result<(), StoreError>;
    /// Deletes and returns leases whose expiry is at or before `now_ms`.
    fn expire_leases(&self, now_ms: i64) -> Result<Vec<LeaseRecord>, StoreError>;

    /// Stores the channel rollout state of a member (JSON, owned by the hub's maintenance module).
    fn put_rollout(&self, member: &str, state_json: &str) -> Result<(), StoreError>;
    /// Every member's rollout state (member, JSON).
    fn list_rollouts(&self) -> Result<Vec<(String, String)>, StoreError>;
    /// Records that a member's channel changed at `generation` (a rolling reimage is owed).
    fn put_channel_switch(&self, member: &str, generation: u64, at_ms: i64) -> Result<(), StoreError>;
    /// Owed channel-switch reimages: (member, generation, at ms).
    fn list_channel_switches(&self) -> Result<Vec<(String, u64, i64)>, StoreError>;
    /// Clears the owed reimage of `member` if it is still the one of `generation`.
    fn clear_channel_switch(&self, member: &str, generation: u64) -> Result<(), StoreError>;

    /// Records revocations (a serial already revoked keeps its first record).
    fn revoke_certs(&self, certs: &[RevokedCert]) -> Result<(), StoreError>;
    /// Every revocation.
    fn list_revoked_certs(&self) -> Result<Vec<RevokedCert>, StoreError>;
    /// Records that `node` presented the certificate with `serial` (kept when the node is forgotten).
    fn note_node_cert(&self, node: &str, serial: &str, at_ms: i64) -> Result<(), StoreError>;
    /// Every (node, serial) noted.
    fn node_certs(&self) -> Result<Vec<(String, String)>, StoreError>;
    /// The serials noted for `node`, in order.
    fn node_cert_serials(&self, node: &str) -> Result<Vec<String>, StoreError>;
    /// The node that presented the certificate with `serial`, if one did.
    fn node_of_cert(&self, serial: &str) -> Result<Option<String>, StoreError>;
    /// Stores a new join token (its id must be new).
    fn create_join_token(&self, token: &JoinTokenRecord) -> Result<(), StoreError>;
    /// Every join token, oldest first.
    fn list_join_tokens(&self) -> Result<Vec<JoinTokenRecord>, StoreError>;
    /// Deletes a join token; false if there was none with that id.
    fn revoke_join_token(&self, id: &str) -> Result<bool, StoreError>;
    /// Checks a join token without using it: the record, or why it is refused at `now_ms`.
    fn check_join_token(
        &self,
        id: &str,
        secret_sha256: &str,
        now_ms: i64,
    ) -> Result<Result<JoinTokenRecord, TokenRefusal>, StoreError>;
    /// Uses a join token for `node` at `now_ms`: in one transaction, checks it as [`Store::check_join_token`],
    /// takes one use and records which node used it. A refused token changes nothing.
    fn use_join_token(
        &self,
        id: &str,
        secret_sha256: &str,
        node: &str,
        now_ms: i64,
    ) -> Result<Result<JoinTokenRecord, TokenRefusal>, StoreError>;

    // Webhooks (`crate::webhooks`). The outbox holds each event once; a delivery row per matching webhook tracks
    // its progress. `commit_run` and `append_events` enqueue their run events ([`run_event_outbox`]) in their own
    // transaction, for the webhooks that exist then.
    /// Creates a webhook; a taken name is a Conflict. It receives events enqueued from then on.
    fn create_webhook(&self, hook: &WebhookRecord) -> Result<(), StoreError>;
    /// Every webhook with its delivery progress, by name.
    fn list_webhooks(&self) -> Result<Vec<WebhookStatus>, StoreError>;
    /// Deletes a webhook and what it was still owed; true if it existed.
    fn delete_webhook(&self, name: &str) -> Result<bool, StoreError>;
    /// Enqueues events for every webhook whose patterns match their type, in one transaction (none match: nothing
    /// is written).
    fn enqueue_events(&self, events: &[OutboxEvent]) -> Result<(), StoreError>;
    /// Enqueues `events` as [`Self::enqueue_events`] does, once per `key` ever (a notice such as "this node is
    /// reimaged at T"), in one transaction: false when the key was sent before or no webhook wants the events (then
    /// nothing is recorded, so a webhook created later still gets it). Keys sent before `before_ms` are forgotten
    /// by [`Self::prune_outbox`].
    fn enqueue_once(&self, key: &str, at_ms: i64, events: &[OutboxEvent]) -> Result<bool, StoreError>;
    /// What `webhook` is owed and may be attempted at `now_ms`: per subject only its oldest undelivered event, and
    /// only if its retry time has come; oldest first, at most `limit`.
    fn due_deliveries(&self, webhook: &str, now_ms: i64, limit: usize) -> Result<Vec<Delivery>, StoreError>;
    /// Records an attempt: delivered (`error` None) or failed, then retried not before `retry_at_ms`.
    fn record_delivery(
        &self,
        webhook: &str,
        seq: u64,
        at_ms: i64,
        error: Option<&str>,
        retry_at_ms: i64,
    ) -> Result<(), StoreError>;
    /// Deletes deliveries done before `before_ms`, outbox events no webhook is owed any more and notice keys
    /// recorded before `before_ms`; returns how many events were deleted.
    fn prune_outbox(&self, before_ms: i64) -> Result<u64, StoreError>;
}
