//! The planner's picture of the fleet, kept in memory and updated where the store is written.
//!
//! Planning a run needs every member's nodes, settings and the catalog. Reading them from the store for every
//! transition cost ~20 ms at 10k nodes (all node rows decoded), under the engine's commit lock. [`Viewed`] wraps
//! the hub's store: every write of a node report, a member's settings or the catalog goes through it, and it
//! updates the affected member's view (or the catalog) right after the write succeeds, in write order. Readers take
//! a snapshot ([`Viewed::snapshot`]): shared (`Arc`) member views, so a snapshot costs one map of pointers and no
//! node is copied. Changed member views wait in a pending map until the next snapshot applies them together: a
//! write never copies the map, and a snapshot copies it at most once (only while a reader still holds the last).
//!
//! Every other call is passed through unchanged. The view is loaded once from the store when the hub starts.

use super::runparts::RunWrite;
use super::{
    Delivery, EventRecord, ImageRecord, JobRecord, JoinTokenRecord, LeaseRecord, LeasesOf, MemberRecord,
    MemberSettings, NewEvent, NodeFacts, NodeRecord, OutboxEvent, Regions, RelayWait, ReportWrite, RevokedCert,
    RunRecord, SecurityPatchRecord, SessionChange, SessionPlace, Store, StoreError, TokenRefusal, WebhookRecord,
    WebhookStatus, WindowKind,
};
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use upkeep_core::channel::{AutoUpgradeChannel, NodeOsChannel};
use upkeep_core::run::{self, Catalog, MemberView, NodePoolView};
use upkeep_core::schedule::MaintenanceSchedule;
use upkeep_core::version::{ImageVersion, KubernetesVersion, NodeImageVersion};
use upkeep_core::work::WorkNode;

/// What the planner reads of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ViewNode {
    member: String,
    region: String,
    work: WorkNode,
}

impl ViewNode {
    fn of(name: &str, facts: &NodeFacts) -> ViewNode {
        ViewNode { member: facts.member.clone(), region: facts.region.clone(), work: work_node_of(name, facts) }
    }
}

/// What the work planner needs to know about a node (`upkeep_core::work::plan_work`).
pub fn work_node_of(name: &str, facts: &NodeFacts) -> WorkNode {
    WorkNode {
        name: name.to_string(),
        pool: facts.node_pool.clone(),
        control_plane: facts.control_plane,
        image: facts.image_version().parse().ok(),
        kubernetes: facts.kubernetes_version.parse().ok(),
    }
}

#[derive(Default)]
struct View {
    nodes: HashMap<String, ViewNode>,
    /// Member -> its nodes' names.
    members: HashMap<String, BTreeSet<String>>,
    /// Members with settings of their own (the others have the defaults).
    settings: HashMap<String, MemberSettings>,
    /// Members with at least one node, as the planner saw them at the last snapshot.
    fleet: Arc<run::Fleet>,
    /// Member views changed since the last snapshot (None: the member left the fleet). Writes land here and the
    /// next snapshot applies them all at once: while a reader still holds the previous snapshot, a write applied
    /// directly would copy the whole member map (10k entries at 100k nodes) every time.
    pending: HashMap<String, Option<Arc<MemberView>>>,
    catalog: Arc<Catalog>,
}

impl View {
    /// Recomputes one member's view from its nodes and settings (a member without nodes leaves the fleet).
    fn refresh(&mut self, member: &str) {
        let names = self.members.get(member);
        let nodes: Vec<&ViewNode> = names.into_iter().flatten().filter_map(|n| self.nodes.get(n)).collect::<Vec<_>>();
        if nodes.is_empty() {
            self.members.remove(member);
            self.pending.insert(member.to_string(), None);
            return;
        }
        let defaults = MemberSettings::defaults(member);
        let settings = self.settings.get(member).unwrap_or(&defaults);
        let view = member_view(&nodes, settings);
        if self.current(member).is_none_or(|old| *old != view) {
            self.pending.insert(member.to_string(), Some(Arc::new(view)));
        }
    }

    /// A member's view as of the last write.
    fn current(&self, member: &str) -> Option<&MemberView> {
        match self.pending.get(member) {
            Some(change) => change.as_deref(),
            None => self.fleet.members.get(member).map(|v| &**v),
        }
    }

    /// The fleet with every pending change applied: in place when no reader holds the last snapshot, else one
    /// copy of the member map of pointers for all the changes together.
    fn fleet(&mut self) -> Arc<run::Fleet> {
        if !self.pending.is_empty() {
            let fleet = Arc::make_mut(&mut self.fleet);
            for (member, change) in self.pending.drain() {
                match change {
                    Some(view) => {
                        fleet.members.insert(member, view);
                    }
                    None => {
                        fleet.members.remove(&member);
                    }
                }
            }
        }
        self.fleet.clone()
    }

    /// Returns whether the planner's view of the node changed.
    fn put_node(&mut self, name: &str, facts: &NodeFacts) -> bool {
        let next = ViewNode::of(name, facts);
        if self.nodes.get(name) == Some(&next) {
            return false;
        }
        let before = self.nodes.insert(name.to_string(), next.clone());
        if let Some(old) = &before
            && old.member != next.member
        {
            if let Some(set) = self.members.get_mut(&old.member) {
                set.remove(name);
            }
            self.refresh(&old.member);
        }
        self.members.entry(next.member.clone()).or_default().insert(name.to_string());
        self.refresh(&next.member);
        true
    }

    fn forget_node(&mut self, name: &str) {
        if let Some(old) = self.nodes.remove(name) {
            if let Some(set) = self.members.get_mut(&old.member) {
                set.remove(name);
            }
            self.refresh(&old.member);
        }
    }

    fn put_settings(&mut self, settings: MemberSettings) {
        let member = settings.member.clone();
        self.settings.insert(member.clone(), settings);
        if self.members.contains_key(&member) {
            self.refresh(&member);
        }
    }
}

/// A write through one hub that changed the planner's view (`Viewed::on_change`): other hub replicas on the same
/// database apply it to theirs (`Viewed::apply`) instead of reading the whole view again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ViewChange {
    /// The node reported (its row holds the report).
    Reported(String),
    /// The node was forgotten.
    Forgotten(String),
    /// The member's settings (windows, budget, drain policy) changed.
    Settings(String),
    /// The image or Kubernetes catalog changed.
    Catalog,
}

/// Hears every change of the view written through this hub.
type ChangeSink = Box<dyn Fn(ViewChange) + Send + Sync>;

/// The hub's store with the planner's view kept beside it.
pub struct Viewed {
    inner: Arc<dyn Store>,
    /// Held across a write and its view update, so the view follows the store's write order.
    writes: Mutex<()>,
    view: Mutex<View>,
    /// Told of every change written through this hub (hub replicas: `crate::relay`).
    on_change: std::sync::OnceLock<ChangeSink>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Viewed {
    /// Wraps `inner` and loads the view from it.
    pub fn open(inner: Arc<dyn Store>) -> Result<Viewed, StoreError> {
        let view = Self::load(inner.as_ref())?;
        Ok(Viewed { inner, writes: Mutex::new(()), view: Mutex::new(view), on_change: std::sync::OnceLock::new() })
    }

    /// From now on, `sink` hears every change of the view written through this hub, in write order (it is called
    /// with the write lock held). Set once; later calls change nothing.
    pub fn on_change(&self, sink: ChangeSink) {
        let _ = self.on_change.set(sink);
    }

    fn changed(&self, change: ViewChange) {
        if let Some(sink) = self.on_change.get() {
            sink(change);
        }
    }

    /// Applies a change another hub replica wrote to the shared database (read from the store here). Returns
    /// whether the planner's inputs changed.
    pub fn apply(&self, change: &ViewChange) -> Result<bool, StoreError> {
        let _w = lock(&self.writes);
        match change {
            ViewChange::Reported(name) | ViewChange::Forgotten(name) => match self.inner.get_node(name)? {
                Some(n) => Ok(lock(&self.view).put_node(name, &n.facts)),
                None => {
                    let mut v = lock(&self.view);
                    let known = v.nodes.contains_key(name);
                    v.forget_node(name);
                    Ok(known)
                }
            },
            ViewChange::Settings(member) => {
                let settings = self.inner.member_settings(member)?;
                lock(&self.view).put_settings(settings);
                Ok(true)
            }
            ViewChange::Catalog => {
                self.catalog_changed()?;
                Ok(true)
            }
        }
    }

    /// Reads the whole view again from the store: what other hub replicas wrote to the same database (their
    /// agents' reports, operators' catalog and settings changes) reaches this one's planner. Returns whether the
    /// planner's inputs changed.
    pub fn reload(&self) -> Result<bool, StoreError> {
        let _w = lock(&self.writes);
        let mut fresh = Self::load(self.inner.as_ref())?;
        let mut v = lock(&self.view);
        let changed = v.fleet() != fresh.fleet() || v.catalog != fresh.catalog;
        *v = fresh;
        Ok(changed)
    }

    fn load(inner: &dyn Store) -> Result<View, StoreError> {
        let mut view = View::default();
        for s in inner.all_member_settings()? {
            view.settings.insert(s.member.clone(), s);
        }
        for n in inner.list_nodes(None)? {
            let vn = ViewNode::of(&n.name, &n.facts);
            view.members.entry(vn.member.clone()).or_default().insert(n.name.clone());
            view.nodes.insert(n.name, vn);
        }
        let members: Vec<String> = view.members.keys().cloned().collect();
        for m in members {
            view.refresh(&m);
        }
        view.catalog = Arc::new(load_catalog(inner)?);
        Ok(view)
    }

    /// The planner's inputs as of the last write: every member with nodes, and the catalog.
    pub fn snapshot(&self) -> (Arc<run::Fleet>, Arc<Catalog>) {
        let mut v = lock(&self.view);
        (v.fleet(), v.catalog.clone())
    }

    /// The nodes the planner would give work to in `member` (none for an unknown member).
    pub fn member_nodes(&self, member: &str) -> Vec<WorkNode> {
        let v = lock(&self.view);
        v.current(member).map(|m| m.nodes.clone()).unwrap_or_default()
    }

    /// The member node `node` reported last, if the hub knows the node.
    pub fn member_of(&self, node: &str) -> Option<String> {
        lock(&self.view).nodes.get(node).map(|n| n.member.clone())
    }

    /// How many nodes `member` has.
    pub fn member_node_count(&self, member: &str) -> usize {
        lock(&self.view).members.get(member).map_or(0, BTreeSet::len)
    }

    fn catalog_changed(&self) -> Result<(), StoreError> {
        let catalog = load_catalog(self.inner.as_ref())?;
        lock(&self.view).catalog = Arc::new(catalog);
        Ok(())
    }

    /// The catalog was written through this hub.
    fn catalog_written(&self) -> Result<(), StoreError> {
        self.catalog_changed()?;
        self.changed(ViewChange::Catalog);
        Ok(())
    }
}

/// A stored time. One out of bounds (2000..2200, refused at the door since; only a damaged or older store holds
/// one) reads as the calendar's end, "never": a release with a garbage time is never taken as already out.
fn ms_to_time(ms: i64) -> DateTime<Utc> {
    upkeep_core::limits::time_from_ms(ms).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

fn load_catalog(store: &dyn Store) -> Result<Catalog, StoreError> {
    let mut catalog = Catalog::default();
    for img in store.list_images(None)? {
        let Ok(version) = img.version.parse::<ImageVersion>() else { continue };
        let regions = img.regions.iter().map(|(r, ms)| (r.clone(), ms_to_time(*ms))).collect();
        catalog.images.entry(img.family.clone()).or_default().insert(version, regions);
    }
    for (version, regions) in store.list_kubernetes()? {
        let Ok(v) = version.parse::<KubernetesVersion>() else { continue };
        catalog.kubernetes.insert(v, regions.iter().map(|(r, ms)| (r.clone(), ms_to_time(*ms))).collect());
    }
    Ok(catalog)
}

/// The planner's view of one member from its nodes.
fn member_view(nodes: &[&ViewNode], settings: &MemberSettings) -> MemberView {
    let schedule =
        |j: &Option<String>| -> Option<MaintenanceSchedule> { j.as_deref().and_then(|s| serde_json::from_str(s).ok()) };
    // The member's region is the one most of its nodes are in; pools elsewhere carry their own.
    let mut region_count: BTreeMap<&str, usize> = BTreeMap::new();
    for n in nodes {
        *region_count.entry(n.region.as_str()).or_default() += 1;
    }
    let region = region_count
        .iter()
        .max_by_key(|(r, c)| (**c, std::cmp::Reverse(**r)))
        .map(|(r, _)| r.to_string())
        .unwrap_or_default();
    let mut pools: BTreeMap<&str, Vec<&ViewNode>> = BTreeMap::new();
    for n in nodes {
        pools.entry(n.work.pool.as_str()).or_default().push(n);
    }
    let node_pools = pools
        .into_iter()
        .filter_map(|(name, ns)| {
            let parsed: Vec<Option<&NodeImageVersion>> = ns.iter().map(|n| n.work.image.as_ref()).collect();
            let family = parsed.iter().flatten().next()?.family.clone();
            let image_version = if parsed.iter().all(|p| p.is_some_and(|v| v.family == family)) {
                parsed.iter().flatten().map(|v| v.version).min()
            } else {
                None
            };
            let pool_region = ns[0].region.clone();
            Some(NodePoolView {
                name: name.to_string(),
                family,
                image_version,
                region: (pool_region != region).then_some(pool_region),
            })
        })
        .collect();
    let kubernetes_version = if nodes.iter().all(|n| n.work.kubernetes.is_some()) {
        nodes.iter().filter_map(|n| n.work.kubernetes).min()
    } else {
        None
    };
    // In name order (the member's set is ordered), as the store lists them.
    let work: Vec<WorkNode> = nodes.iter().map(|n| n.work.clone()).collect();
    MemberView {
        region,
        kubernetes_version,
        node_pools,
        node_os_schedule: schedule(&settings.node_os_schedule),
        cluster_schedule: schedule(&settings.cluster_schedule),
        nodes: work,
        max_unavailable: settings.budget(),
    }
}

impl Store for Viewed {
    fn record_report(&self, name: &str, facts: &NodeFacts, now_ms: i64) -> Result<MemberRecord, StoreError> {
        let _w = lock(&self.writes);
        let out = self.inner.record_report(name, facts, now_ms)?;
        lock(&self.view).put_node(name, facts);
        self.changed(ViewChange::Reported(name.to_string()));
        Ok(out)
    }
    fn record_reports(&self, batch: &[ReportWrite]) -> Vec<Result<MemberRecord, StoreError>> {
        let _w = lock(&self.writes);
        let out = self.inner.record_reports(batch);
        let mut view = lock(&self.view);
        for (r, written) in batch.iter().zip(&out) {
            if written.is_ok() {
                view.put_node(&r.node, &r.facts);
            }
        }
        drop(view);
        for (r, written) in batch.iter().zip(&out) {
            if written.is_ok() {
                self.changed(ViewChange::Reported(r.node.clone()));
            }
        }
        out
    }
    fn touch_nodes(&self, seen: &[(String, i64)]) -> Result<(), StoreError> {
        self.inner.touch_nodes(seen)
    }
    fn list_nodes(&self, member: Option<&str>) -> Result<Vec<NodeRecord>, StoreError> {
        self.inner.list_nodes(member)
    }
    fn get_node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        self.inner.get_node(name)
    }
    fn forget_node(&self, name: &str) -> Result<bool, StoreError> {
        let _w = lock(&self.writes);
        let existed = self.inner.forget_node(name)?;
        lock(&self.view).forget_node(name);
        self.changed(ViewChange::Forgotten(name.to_string()));
        Ok(existed)
    }
    fn list_members(&self) -> Result<Vec<MemberRecord>, StoreError> {
        self.inner.list_members()
    }
    fn get_member(&self, name: &str) -> Result<Option<MemberRecord>, StoreError> {
        self.inner.get_member(name)
    }
    fn set_node_os_channel(&self, member: &str, channel: NodeOsChannel) -> Result<MemberRecord, StoreError> {
        self.inner.set_node_os_channel(member, channel)
    }
    fn set_auto_upgrade_channel(&self, member: &str, channel: AutoUpgradeChannel) -> Result<MemberRecord, StoreError> {
        self.inner.set_auto_upgrade_channel(member, channel)
    }
    fn member_settings(&self, member: &str) -> Result<MemberSettings, StoreError> {
        if let Some(s) = lock(&self.view).settings.get(member) {
            return Ok(s.clone());
        }
        Ok(MemberSettings::defaults(member))
    }
    fn all_member_settings(&self) -> Result<Vec<MemberSettings>, StoreError> {
        self.inner.all_member_settings()
    }
    fn set_member_window(
        &self,
        member: &str,
        kind: WindowKind,
        schedule: Option<&str>,
    ) -> Result<MemberSettings, StoreError> {
        let _w = lock(&self.writes);
        let out = self.inner.set_member_window(member, kind, schedule)?;
        lock(&self.view).put_settings(out.clone());
        self.changed(ViewChange::Settings(member.to_string()));
        Ok(out)
    }
    fn set_member_disruption(&self, member: &str, max_unavailable: &str) -> Result<MemberSettings, StoreError> {
        let _w = lock(&self.writes);
        let out = self.inner.set_member_disruption(member, max_unavailable)?;
        lock(&self.view).put_settings(out.clone());
        self.changed(ViewChange::Settings(member.to_string()));
        Ok(out)
    }
    fn set_member_drain(&self, member: &str, policy_json: &str) -> Result<MemberSettings, StoreError> {
        let _w = lock(&self.writes);
        let out = self.inner.set_member_drain(member, policy_json)?;
        lock(&self.view).put_settings(out.clone());
        self.changed(ViewChange::Settings(member.to_string()));
        Ok(out)
    }
    fn next_epoch(&self) -> Result<u64, StoreError> {
        self.inner.next_epoch()
    }
    fn lead(&self, replica: &str, lease_ms: i64, held: Option<u64>) -> Result<Option<u64>, StoreError> {
        self.inner.lead(replica, lease_ms, held)
    }
    fn resign(&self, replica: &str, term: u64) -> Result<(), StoreError> {
        self.inner.resign(replica, term)
    }
    fn relay_post(&self, notes: &[Vec<u8>], sessions: &[SessionChange]) -> Result<(), StoreError> {
        self.inner.relay_post(notes, sessions)
    }
    fn relay_since(&self, after: i64, limit: usize) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
        self.inner.relay_since(after, limit)
    }
    fn relay_head(&self) -> Result<i64, StoreError> {
        self.inner.relay_head()
    }
    fn relay_prune(&self, keep_ms: i64) -> Result<u64, StoreError> {
        self.inner.relay_prune(keep_ms)
    }
    fn replica_alive(&self, replica: &str, instance: u64, alive_ms: i64) -> Result<Vec<(String, u64)>, StoreError> {
        self.inner.replica_alive(replica, instance, alive_ms)
    }
    fn session_places(&self) -> Result<Vec<SessionPlace>, StoreError> {
        self.inner.session_places()
    }
    fn drop_session_places(&self, replica: &str) -> Result<(), StoreError> {
        self.inner.drop_session_places(replica)
    }
    fn relay_listener(&self) -> Result<Box<dyn RelayWait>, StoreError> {
        self.inner.relay_listener()
    }
    fn check_fence(&self) -> Result<(), StoreError> {
        self.inner.check_fence()
    }
    fn put_job(&self, job: &JobRecord) -> Result<(), StoreError> {
        self.inner.put_job(job)
    }
    fn get_job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        self.inner.get_job(id)
    }
    fn list_jobs(&self, status: Option<&str>) -> Result<Vec<JobRecord>, StoreError> {
        self.inner.list_jobs(status)
    }
    fn put_image(&self, image: &ImageRecord) -> Result<ImageRecord, StoreError> {
        let _w = lock(&self.writes);
        let out = self.inner.put_image(image)?;
        self.catalog_written()?;
        Ok(out)
    }
    fn withdraw_image_region(&self, family: &str, version: &str, region: &str) -> Result<ImageRecord, StoreError> {
        let _w = lock(&self.writes);
        let out = self.inner.withdraw_image_region(family, version, region)?;
        self.catalog_written()?;
        Ok(out)
    }
    fn list_images(&self, family: Option<&str>) -> Result<Vec<ImageRecord>, StoreError> {
        self.inner.list_images(family)
    }
    fn put_kubernetes(&self, version: &str, regions: &BTreeMap<String, i64>) -> Result<(), StoreError> {
        let _w = lock(&self.writes);
        self.inner.put_kubernetes(version, regions)?;
        self.catalog_written()
    }
    fn list_kubernetes(&self) -> Result<Vec<(String, Regions)>, StoreError> {
        self.inner.list_kubernetes()
    }
    fn put_strategy(&self, name: &str, spec_json: &str) -> Result<(), StoreError> {
        self.inner.put_strategy(name, spec_json)
    }
    fn get_strategy(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.inner.get_strategy(name)
    }
    fn list_strategies(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.inner.list_strategies()
    }
    fn delete_strategy(&self, name: &str) -> Result<bool, StoreError> {
        self.inner.delete_strategy(name)
    }
    fn create_run(&self, run: &RunRecord) -> Result<(), StoreError> {
        self.inner.create_run(run)
    }
    fn get_run(&self, name: &str) -> Result<Option<RunRecord>, StoreError> {
        self.inner.get_run(name)
    }
    fn list_runs(&self) -> Result<Vec<RunRecord>, StoreError> {
        self.inner.list_runs()
    }
    fn delete_run(&self, name: &str) -> Result<bool, StoreError> {
        self.inner.delete_run(name)
    }
    fn commit_run(
        &self,
        name: &str,
        expected: u64,
        status: &str,
        write: &RunWrite,
        events: &[NewEvent],
    ) -> Result<Vec<EventRecord>, StoreError> {
        self.inner.commit_run(name, expected, status, write, events)
    }
    fn run_versions(&self) -> Result<Vec<(String, u64, String)>, StoreError> {
        self.inner.run_versions()
    }
    fn run_version(&self, name: &str) -> Result<Option<u64>, StoreError> {
        self.inner.run_version(name)
    }
    fn append_events(&self, run: &str, events: &[NewEvent]) -> Result<Vec<EventRecord>, StoreError> {
        self.inner.append_events(run, events)
    }
    fn events_since(&self, run: &str, after: u64) -> Result<Vec<EventRecord>, StoreError> {
        self.inner.events_since(run, after)
    }
    fn put_security_patch(&self, patch: &SecurityPatchRecord) -> Result<(), StoreError> {
        self.inner.put_security_patch(patch)
    }
    fn list_security_patches(&self, family: Option<&str>) -> Result<Vec<SecurityPatchRecord>, StoreError> {
        self.inner.list_security_patches(family)
    }
    fn put_lease(&self, lease: &LeaseRecord) -> Result<(), StoreError> {
        self.inner.put_lease(lease)
    }
    fn list_leases(&self) -> Result<Vec<LeaseRecord>, StoreError> {
        self.inner.list_leases()
    }
    fn leases_of(&self, of: LeasesOf<'_>) -> Result<Vec<LeaseRecord>, StoreError> {
        self.inner.leases_of(of)
    }
    fn release_leases(&self, node: &str, ids: &[String], all_except: bool) -> Result<Vec<LeaseRecord>, StoreError> {
        self.inner.release_leases(node, ids, all_except)
    }
    fn extend_leases(&self, node: &str, expires_ms: i64) -> Result<(), StoreError> {
        self.inner.extend_leases(node, expires_ms)
    }
    fn expire_leases(&self, now_ms: i64) -> Result<Vec<LeaseRecord>, StoreError> {
        self.inner.expire_leases(now_ms)
    }
    fn put_rollout(&self, member: &str, state_json: &str) -> Result<(), StoreError> {
        self.inner.put_rollout(member, state_json)
    }
    fn list_rollouts(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.inner.list_rollouts()
    }
    fn put_channel_switch(&self, member: &str, generation: u64, at_ms: i64) -> Result<(), StoreError> {
        self.inner.put_channel_switch(member, generation, at_ms)
    }
    fn list_channel_switches(&self) -> Result<Vec<(String, u64, i64)>, StoreError> {
        self.inner.list_channel_switches()
    }
    fn clear_channel_switch(&self, member: &str, generation: u64) -> Result<(), StoreError> {
        self.inner.clear_channel_switch(member, generation)
    }
    fn revoke_certs(&self, certs: &[RevokedCert]) -> Result<(), StoreError> {
        self.inner.revoke_certs(certs)
    }
    fn list_revoked_certs(&self) -> Result<Vec<RevokedCert>, StoreError> {
        self.inner.list_revoked_certs()
    }
    fn note_node_cert(&self, node: &str, serial: &str, at_ms: i64) -> Result<(), StoreError> {
        self.inner.note_node_cert(node, serial, at_ms)
    }
    fn node_certs(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.inner.node_certs()
    }
    fn node_cert_serials(&self, node: &str) -> Result<Vec<String>, StoreError> {
        self.inner.node_cert_serials(node)
    }
    fn node_of_cert(&self, serial: &str) -> Result<Option<String>, StoreError> {
        self.inner.node_of_cert(serial)
    }

    fn create_join_token(&self, token: &JoinTokenRecord) -> Result<(), StoreError> {
        self.inner.create_join_token(token)
    }

    fn list_join_tokens(&self) -> Result<Vec<JoinTokenRecord>, StoreError> {
        self.inner.list_join_tokens()
    }

    fn revoke_join_token(&self, id: &str) -> Result<bool, StoreError> {
        self.inner.revoke_join_token(id)
    }

    fn check_join_token(
        &self,
        id: &str,
        secret_sha256: &str,
        now_ms: i64,
    ) -> Result<Result<JoinTokenRecord, TokenRefusal>, StoreError> {
        self.inner.check_join_token(id, secret_sha256, now_ms)
    }

    fn use_join_token(
        &self,
        id: &str,
        secret_sha256: &str,
        node: &str,
        now_ms: i64,
    ) -> Result<Result<JoinTokenRecord, TokenRefusal>, StoreError> {
        self.inner.use_join_token(id, secret_sha256, node, now_ms)
    }

    fn create_webhook(&self, hook: &WebhookRecord) -> Result<(), StoreError> {
        self.inner.create_webhook(hook)
    }
    fn list_webhooks(&self) -> Result<Vec<WebhookStatus>, StoreError> {
        self.inner.list_webhooks()
    }
    fn delete_webhook(&self, name: &str) -> Result<bool, StoreError> {
        self.inner.delete_webhook(name)
    }
    fn enqueue_events(&self, events: &[OutboxEvent]) -> Result<(), StoreError> {
        self.inner.enqueue_events(events)
    }
    fn enqueue_once(&self, key: &str, at_ms: i64, events: &[OutboxEvent]) -> Result<bool, StoreError> {
        self.inner.enqueue_once(key, at_ms, events)
    }
    fn due_deliveries(&self, webhook: &str, now_ms: i64, limit: usize) -> Result<Vec<Delivery>, StoreError> {
        self.inner.due_deliveries(webhook, now_ms, limit)
    }
    fn record_delivery(
        &self,
        webhook: &str,
        seq: u64,
        at_ms: i64,
        error: Option<&str>,
        retry_at_ms: i64,
    ) -> Result<(), StoreError> {
        self.inner.record_delivery(webhook, seq, at_ms, error, retry_at_ms)
    }
    fn prune_outbox(&self, before_ms: i64) -> Result<u64, StoreError> {
        self.inner.prune_outbox(before_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;

    fn facts(member: &str, pool: &str, image: &str) -> NodeFacts {
        NodeFacts {
            member: member.into(),
            node_pool: pool.into(),
            region: "eu".into(),
            node_image_version: image.into(),
            booted_image_version: image.into(),
            ..Default::default()
        }
    }

    fn open(dir: &std::path::Path) -> (Arc<dyn Store>, Viewed) {
        let inner: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.join("hub.db")).expect("store"));
        let viewed = Viewed::open(inner.clone()).expect("view");
        (inner, viewed)
    }

    /// The view a hub builds from the store at start, to compare against the one kept up to date by writes.
    fn fresh(inner: &Arc<dyn Store>) -> run::Fleet {
        (*Viewed::open(inner.clone()).expect("view").snapshot().0).clone()
    }

    #[test]
    fn writes_keep_the_view_equal_to_one_read_fresh_from_the_store() {
        let dir = tempfile::tempdir().expect("tmp");
        let (inner, v) = open(dir.path());
        v.record_report("n1", &facts("m1", "p", "Ubuntu-202401.01.0"), 1).expect("n1");
        v.record_report("n2", &facts("m1", "p", "Ubuntu-202402.01.0"), 1).expect("n2");
        v.record_report("n3", &facts("m2", "q", "Ubuntu-202402.01.0"), 1).expect("n3");
        let (fleet, _) = v.snapshot();
        assert_eq!(*fleet, fresh(&inner));
        let m1 = &fleet.members["m1"];
        assert_eq!(m1.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), vec!["n1", "n2"]);
        assert_eq!(m1.node_pools[0].image_version, Some("202401.01.0".parse().expect("v")), "the oldest node's");

        // A node upgraded, a node moved to another member, a node forgotten, settings changed.
        v.record_report("n1", &facts("m1", "p", "Ubuntu-202402.01.0"), 2).expect("n1 upgraded");
        v.record_report("n3", &facts("m1", "p", "Ubuntu-202402.01.0"), 2).expect("n3 moved");
        v.set_member_disruption("m1", "2").expect("budget");
        let (after, _) = v.snapshot();
        assert_eq!(*after, fresh(&inner));
        assert!(!after.members.contains_key("m2"), "a member without nodes leaves the view");
        assert_eq!(after.members["m1"].max_unavailable, upkeep_core::concurrency::Limit::Count(2));
        assert_eq!(v.member_node_count("m1"), 3);
        v.forget_node("n2").expect("forget");
        assert_eq!(*v.snapshot().0, fresh(&inner));
        assert_eq!(v.member_node_count("m1"), 2);
        // The snapshot taken before is unchanged by later writes.
        assert_eq!(fleet.members["m1"].nodes.len(), 2);
    }

    #[test]
    fn a_snapshot_shares_every_member_view_no_write_touched() {
        let dir = tempfile::tempdir().expect("tmp");
        let (inner, v) = open(dir.path());
        for (n, m) in [("n1", "m1"), ("n2", "m2"), ("n3", "m3")] {
            v.record_report(n, &facts(m, "p", "Ubuntu-202401.01.0"), 1).expect("report");
        }
        let first = v.snapshot().0;
        assert!(Arc::ptr_eq(&first, &v.snapshot().0), "no write in between: the same snapshot");
        // Writes while a reader holds `first`: m2 changes twice, m3 leaves, m4 arrives.
        v.record_report("n2", &facts("m2", "p", "Ubuntu-202402.01.0"), 2).expect("n2 upgraded");
        v.record_report("n2", &facts("m2", "p", "Ubuntu-202403.01.0"), 3).expect("n2 upgraded again");
        v.forget_node("n3").expect("forget");
        v.record_report("n4", &facts("m4", "p", "Ubuntu-202401.01.0"), 3).expect("n4");
        // What a member's nodes read says reflects the writes before any snapshot is taken.
        assert_eq!(v.member_nodes("m2")[0].image, Some("Ubuntu-202403.01.0".parse().expect("v")));
        assert!(v.member_nodes("m3").is_empty());
        let second = v.snapshot().0;
        assert_eq!(*second, fresh(&inner));
        assert!(Arc::ptr_eq(&first.members["m1"], &second.members["m1"]), "m1 untouched: shared, not copied");
        assert!(!Arc::ptr_eq(&first.members["m2"], &second.members["m2"]));
        assert!(first.members.contains_key("m3") && !second.members.contains_key("m3"));
        assert_eq!(
            first.members["m2"].nodes[0].image,
            Some("Ubuntu-202401.01.0".parse().expect("v")),
            "held: unchanged"
        );
    }

    #[test]
    fn the_catalog_follows_publishing_and_withdrawing() {
        let dir = tempfile::tempdir().expect("tmp");
        let (_inner, v) = open(dir.path());
        let img = ImageRecord {
            family: "Ubuntu".into(),
            version: "202403.01.0".into(),
            regions: [("eu".to_string(), 1_700_000_000_000), ("us".to_string(), 1_700_000_000_000)].into(),
            sha256: "ab".repeat(32),
            signature: "sig".into(),
            url: "https://x.invalid/i".into(),
            size_bytes: 1,
            published_ms: 1,
        };
        v.put_image(&img).expect("publish");
        let v3: ImageVersion = "202403.01.0".parse().expect("v");
        assert_eq!(v.snapshot().1.images["Ubuntu"][&v3].len(), 2);
        v.withdraw_image_region("Ubuntu", "202403.01.0", "us").expect("withdraw");
        assert_eq!(v.snapshot().1.images["Ubuntu"][&v3].keys().collect::<Vec<_>>(), vec!["eu"]);
    }
}
