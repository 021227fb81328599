//! Engine tests over `FakeOs`: the reimage path, idempotency, fencing, refusals, fall back, and a crash at
//! every step (before and after the step's effect) followed by a restart from the journal; leased reboots
//! (order of steps, a crash after each step, unwinding after a failure, idempotent grants, the start release).

use super::*;
use crate::os::fake::FakeOs;
use crate::os::{OsFacts, Slot};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use transition::target_image;
use upkeep_core::signature::{SecretKey, blake2b_512};

const FAMILY: &str = "Test-1";
const OLD: &str = "202301.01.0";
const NEW: &str = "202302.01.0";

struct MemFetcher {
    data: Vec<u8>,
    /// The first stream breaks after this many bytes.
    break_first_at: Option<usize>,
    /// Every stream ends cleanly this many bytes short of the end.
    short_by: usize,
    opens: AtomicUsize,
    bytes_sent: AtomicUsize,
}

impl MemFetcher {
    fn new(data: Vec<u8>) -> MemFetcher {
        MemFetcher {
            data,
            break_first_at: None,
            short_by: 0,
            opens: AtomicUsize::new(0),
            bytes_sent: AtomicUsize::new(0),
        }
    }
}

impl Fetcher for MemFetcher {
    fn open(
        &self,
        _sha: &str,
        offset: u64,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<v1::ImageChunk, String>>, String>> {
        let n = self.opens.fetch_add(1, Ordering::SeqCst);
        let total = self.data.len();
        if offset as usize > total {
            // What the hub answers (its message included), before the agent's hub link reads it.
            let why = format!("FetchImage: InvalidArgument: offset: {offset} is past the end ({total} bytes)");
            return Box::pin(async move { Err(why) });
        }
        let end = if n == 0 { self.break_first_at.unwrap_or(total) } else { total - self.short_by };
        let mut items = Vec::new();
        let mut off = offset as usize;
        while off < end.min(total - self.short_by) {
            let stop = (off + 100).min(end).min(total - self.short_by);
            items.push(Ok(v1::ImageChunk {
                offset: off as u64,
                data: self.data[off..stop].to_vec(),
                total_size: total as u64,
            }));
            self.bytes_sent.fetch_add(stop - off, Ordering::SeqCst);
            off = stop;
        }
        if n == 0 && self.break_first_at.is_some() {
            items.push(Err("stream reset".to_string()));
        }
        Box::pin(async move { Ok(futures::stream::iter(items).boxed()) })
    }
}

#[derive(Default)]
struct FakeLink {
    epoch: AtomicU64,
    unreachable: AtomicBool,
    /// Leases given back, in order.
    releases: Mutex<Vec<String>>,
    /// Where releases are also logged, so their order against the node's calls shows.
    log: std::sync::OnceLock<Arc<FakeOs>>,
}

impl FakeLink {
    fn releases(&self) -> Vec<String> {
        self.releases.lock().expect("releases").clone()
    }
}

impl Link for FakeLink {
    fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }
    fn restart_session(&self) {
        if !self.unreachable.load(Ordering::SeqCst) {
            self.epoch.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn wait_epoch_above(&self, above: u64, _within: Duration) -> BoxFuture<'_, bool> {
        let ok = self.epoch() > above;
        Box::pin(async move { ok })
    }
    fn release_lease(&self, lease_id: &str) {
        self.releases.lock().expect("releases").push(lease_id.to_string());
        if let Some(os) = self.log.get() {
            os.with(|s| s.calls.push(format!("release {lease_id}")));
        }
    }
}

struct World {
    dir: tempfile::TempDir,
    os: Arc<FakeOs>,
    fetcher: Arc<MemFetcher>,
    link: Arc<FakeLink>,
    sk: SecretKey,
    image: Vec<u8>,
    sha: String,
}

fn sha_hex(b: &[u8]) -> String {
    crate::os::slots::hex(ring::digest::digest(&ring::digest::SHA256, b).as_ref())
}

impl World {
    fn new() -> World {
        let facts = OsFacts { node_image: Some(target_image(FAMILY, OLD).expect("old")), ..Default::default() };
        let os = Arc::new(FakeOs::new(facts));
        let sk = SecretKey::from_seed([4; 32], [9; 8]);
        let image: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let sha = sha_hex(&image);
        os.with(|s| {
            s.keys = vec![(PathBuf::from("k.pub"), sk.public_key().to_file_text())];
            s.images.insert(sha.clone(), target_image(FAMILY, NEW).expect("new"));
        });
        let link = Arc::new(FakeLink::default());
        let _ = link.log.set(os.clone());
        World {
            dir: tempfile::tempdir().expect("tempdir"),
            os,
            fetcher: Arc::new(MemFetcher::new(image.clone())),
            link,
            sk,
            image,
            sha,
        }
    }

    fn engine(&self) -> (Arc<Engine>, mpsc::UnboundedReceiver<v1::OperationResult>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let e = Engine::new(
            self.os.clone(),
            self.dir.path(),
            self.fetcher.clone(),
            self.link.clone(),
            tx,
            Duration::from_secs(1),
        )
        .expect("engine");
        (e, rx)
    }

    fn signature(&self) -> String {
        self.sk.sign_prehashed(&blake2b_512(&self.image), "test image").to_file_text()
    }

    fn reimage(&self, id: &str, generation: u64, signature: String) -> v1::Command {
        v1::Command {
            operation_id: id.into(),
            generation,
            kind: Some(v1::command::Kind::Reimage(v1::Reimage {
                image: Some(v1::ImageRef {
                    family: FAMILY.into(),
                    version: NEW.into(),
                    url: String::new(),
                    sha256: self.sha.clone(),
                    signature,
                    size_bytes: self.image.len() as u64,
                }),
                allow_downgrade: false,
                reinstall: false,
            })),
        }
    }

    fn calls(&self) -> Vec<String> {
        self.os.with(|s| s.calls.clone())
    }

    fn image_now(&self) -> String {
        self.os.with(|s| s.facts.node_image.as_ref().map(|n| n.label()).unwrap_or_default())
    }
}

async fn result_of(rx: &mut mpsc::UnboundedReceiver<v1::OperationResult>) -> v1::OperationResult {
    tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("a result within 10 s").expect("channel open")
}

async fn run(w: &World, c: &v1::Command) -> v1::OperationResult {
    let (e, mut rx) = w.engine();
    match e.submit(c) {
        Submitted::Finished(r) => r,
        Submitted::Running => result_of(&mut rx).await,
    }
}

#[tokio::test]
async fn reimage_boots_commits_and_a_repeat_returns_the_first_result() {
    let w = World::new();
    let c = w.reimage("op-1", 3, w.signature());
    let r = run(&w, &c).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(w.calls(), ["write b", "mark b", "reboot", "booted b", "health", "commit b"]);
    assert_eq!(w.image_now(), format!("{FAMILY}-{NEW}"), "reported from the booted image's metadata");
    // A repeat (same engine or after a restart) is answered from the journal, nothing redone.
    let again = run(&w, &c).await;
    assert_eq!(again, r);
    assert_eq!(w.calls().len(), 6);
    // An older generation is refused.
    let stale = run(&w, &w.reimage("op-0", 2, w.signature())).await;
    assert!(!stale.ok && stale.error.contains("older than the newest seen"), "{stale:?}");
    // The same image again is already there.
    let same = run(&w, &w.reimage("op-2", 3, w.signature())).await;
    assert!(same.ok, "{same:?}");
    assert_eq!(w.calls().len(), 6, "nothing redone for an image already running");
}

#[tokio::test]
async fn untrusted_images_are_refused_before_any_slot_write() {
    let w = World::new();
    let mut flipped = w.image.clone();
    flipped[10] ^= 1;
    let bad = w.sk.sign_prehashed(&blake2b_512(&flipped), "x").to_file_text();
    let other = SecretKey::from_seed([5; 32], [8; 8]).sign_prehashed(&blake2b_512(&w.image), "x").to_file_text();
    let cases = [
        ("missing", String::new(), "missing signature"),
        ("unknown", other, "unknown key"),
        ("bad", bad, "bad signature"),
    ];
    for (i, (name, sig, want)) in cases.into_iter().enumerate() {
        let r = run(&w, &w.reimage(&format!("op-{name}"), i as u64, sig)).await;
        assert!(!r.ok && r.error.contains(want), "{name}: {r:?}");
    }
    // A digest that does not match the bytes served.
    let mut c = w.reimage("op-digest", 9, w.signature());
    if let Some(v1::command::Kind::Reimage(r)) = &mut c.kind {
        r.image.as_mut().expect("image").sha256 = "0".repeat(64);
    }
    let r = run(&w, &c).await;
    assert!(!r.ok && r.error.contains("digest mismatch"), "{r:?}");
    assert!(w.calls().is_empty(), "nothing written: {:?}", w.calls());
}

#[tokio::test]
async fn a_truncated_download_is_refused_and_a_broken_one_resumes() {
    let mut w = World::new();
    w.fetcher = Arc::new(MemFetcher { short_by: 10, ..MemFetcher::new(w.image.clone()) });
    let r = run(&w, &w.reimage("op-t", 1, w.signature())).await;
    assert!(!r.ok && r.error.contains("truncated download"), "{r:?}");
    assert!(w.calls().is_empty());
    let w = {
        let mut w = World::new();
        w.fetcher = Arc::new(MemFetcher { break_first_at: Some(1234), ..MemFetcher::new(w.image.clone()) });
        w
    };
    let r = run(&w, &w.reimage("op-r", 1, w.signature())).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(w.fetcher.bytes_sent.load(Ordering::SeqCst), w.image.len(), "resumed from the offset, no byte twice");
}

#[tokio::test]
async fn unhealthy_image_falls_back_and_is_not_retried() {
    let w = World::new();
    w.os.with(|s| s.unhealthy = Some("kubelet not running".into()));
    let r = run(&w, &w.reimage("op-1", 1, w.signature())).await;
    assert!(!r.ok && r.error.contains("rolled back to slot a") && r.error.contains("kubelet not running"), "{r:?}");
    assert_eq!(w.image_now(), format!("{FAMILY}-{OLD}"));
    assert_eq!(w.os.with(|s| (s.booted, s.committed)), (Some(Slot::A), Some(Slot::A)));
    w.os.with(|s| s.unhealthy = None);
    let again = run(&w, &w.reimage("op-2", 2, w.signature())).await;
    assert!(!again.ok && again.error.contains("was rolled back on this node"), "{again:?}");
    let n = w.calls().len();
    std::fs::remove_file(w.dir.path().join(ROLLED_BACK_DIR).join(format!("{FAMILY}-{NEW}"))).expect("operator clears");
    let third = run(&w, &w.reimage("op-3", 3, w.signature())).await;
    assert!(third.ok, "{third:?}");
    assert!(w.calls().len() > n);
}

#[tokio::test]
async fn a_slot_that_does_not_boot_falls_back() {
    let w = World::new();
    w.os.with(|s| s.boot_fails = true);
    let r = run(&w, &w.reimage("op-1", 1, w.signature())).await;
    assert!(!r.ok && r.error.contains("did not boot"), "{r:?}");
    assert_eq!(w.image_now(), format!("{FAMILY}-{OLD}"));
}

#[tokio::test]
async fn hub_unreachable_after_boot_falls_back() {
    let w = World::new();
    w.link.unreachable.store(true, Ordering::SeqCst);
    let r = run(&w, &w.reimage("op-1", 1, w.signature())).await;
    assert!(!r.ok && r.error.contains("hub not reachable"), "{r:?}");
}

/// Runs `n` steps by hand, optionally performing step n+1's effect without journalling it (a crash in the
/// middle of a step), then restarts the engine from the journal and lets it finish.
async fn crash_after(n: usize, mid_step: bool) {
    let w = World::new();
    let c = w.reimage("op-c", 1, w.signature());
    {
        let (e, _rx) = w.engine();
        {
            // Journal the command as submit would, without spawning the driver.
            let op = decode(&c).expect("decodes");
            e.journal().put(Entry::accepted("op-c", 1, op)).expect("put");
        }
        for i in 0..=n {
            let entry = e.entry("op-c").expect("entry");
            if entry.result.is_some() {
                break;
            }
            let next = e.step(entry).await.expect("step");
            let Next::Go(next) = next else { panic!("no real reboots here") };
            if i == n && mid_step {
                break; // the effect happened, the journal does not know
            }
            if i < n || !mid_step {
                e.journal().put(next).expect("put");
            }
            if i == n {
                break;
            }
        }
    } // the agent dies
    let (e, mut rx) = w.engine();
    e.resume();
    let r = match e.entry("op-c").and_then(|x| x.result) {
        Some(o) => wire("op-c", 1, &o),
        None => result_of(&mut rx).await,
    };
    assert!(r.ok, "crash after {n} steps (mid step: {mid_step}): {r:?}, calls {:?}", w.calls());
    assert_eq!(w.image_now(), format!("{FAMILY}-{NEW}"), "crash after {n} (mid {mid_step})");
    assert_eq!(w.os.with(|s| (s.booted, s.committed)), (Some(Slot::B), Some(Slot::B)));
    let boots = w.calls().iter().filter(|c| c.starts_with("booted")).count();
    assert_eq!(boots, 1, "exactly one boot, crash after {n} (mid {mid_step}): {:?}", w.calls());
}

#[tokio::test]
async fn resumes_after_a_crash_at_every_step() {
    // Steps: accepted, fetch, write, mark, reboot, health, commit.
    for n in 0..7 {
        crash_after(n, false).await;
        crash_after(n, true).await;
    }
}

#[tokio::test]
async fn real_reboot_parks_and_the_restarted_agent_finishes() {
    let w = World::new();
    w.os.with(|s| s.real_reboots = true);
    let c = w.reimage("op-1", 1, w.signature());
    let (e, _rx) = w.engine();
    assert_eq!(e.submit(&c), Submitted::Running);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !w.os.with(|s| s.reboot_requested) {
        assert!(tokio::time::Instant::now() < deadline, "no reboot requested");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(e.entry("op-1").expect("entry").step, Step::Reboot, "journalled before the reboot");
    drop(e);
    w.os.power_cycle();
    let (e, mut rx) = w.engine();
    e.resume();
    // The hub asks again with the same id after the node reconnects.
    assert_eq!(e.submit(&c), Submitted::Running);
    w.link.epoch.fetch_add(1, Ordering::SeqCst); // the new session
    let r = result_of(&mut rx).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(w.calls().iter().filter(|c| *c == "reboot").count(), 1, "{:?}", w.calls());
}

#[tokio::test]
async fn a_reboot_that_never_changes_the_boot_id_stops_after_three_tries() {
    let w = World::new();
    w.os.with(|s| s.real_reboots = true);
    let c = v1::Command {
        operation_id: "rb".into(),
        generation: 1,
        kind: Some(v1::command::Kind::Reboot(v1::Reboot { force: true })),
    };
    for attempt in 1..=3u32 {
        let (e, _rx) = w.engine();
        e.resume();
        if attempt == 1 {
            assert_eq!(e.submit(&c), Submitted::Running);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !w.os.with(|s| s.reboot_requested) {
            assert!(tokio::time::Instant::now() < deadline, "no reboot requested on attempt {attempt}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(e.entry("rb").expect("entry").reboots, attempt, "journalled before rebooting");
        // The agent restarts but the boot id it reads is the same: as if no boot happened.
        w.os.with(|s| s.reboot_requested = false);
        drop(e);
    }
    let (e, mut rx) = w.engine();
    e.resume();
    let r = result_of(&mut rx).await;
    assert!(!r.ok && r.error.contains("boot id never changed"), "{r:?}");
    assert_eq!(w.calls().iter().filter(|c| *c == "reboot").count(), 3, "{:?}", w.calls());
}

#[tokio::test]
async fn cordon_drain_uncordon_and_unsupported_kinds() {
    let w = World::new();
    let cmd =
        |id: &str, g: u64, k: v1::command::Kind| v1::Command { operation_id: id.into(), generation: g, kind: Some(k) };
    assert!(run(&w, &cmd("c", 1, v1::command::Kind::Cordon(v1::Cordon {}))).await.ok);
    assert!(run(&w, &cmd("d", 1, v1::command::Kind::Drain(v1::Drain { timeout_seconds: 30, force: false }))).await.ok);
    assert!(run(&w, &cmd("u", 1, v1::command::Kind::Uncordon(v1::Uncordon {}))).await.ok);
    assert_eq!(w.calls(), ["cordon", "drain 30s", "uncordon"]);
    let r = run(
        &w,
        &cmd(
            "k",
            1,
            v1::command::Kind::UpgradeKubernetes(v1::UpgradeKubernetes {
                version: "1.30.1".into(),
                first_control_plane: false,
            }),
        ),
    )
    .await;
    // Supported now (engine/kube_tests.rs); this node has no os-release, so no package manager to upgrade with.
    assert!(!r.ok && r.error.contains("no package manager known"), "{r:?}");
}

fn patch_cmd(id: &str, family: &str, version: &str, packages: &[&str]) -> v1::Command {
    v1::Command {
        operation_id: id.into(),
        generation: 1,
        kind: Some(v1::command::Kind::ApplySecurityPatch(v1::ApplySecurityPatch {
            family: family.into(),
            version: version.into(),
            packages: packages.iter().map(|p| p.to_string()).collect(),
        })),
    }
}

fn set_os_release(w: &World, text: &str) {
    let kv = crate::os::parse_env_file(text);
    w.os.with(|s| s.os_release = kv);
}

#[tokio::test]
async fn security_patch_installs_exactly_the_pins_records_the_version_and_is_idempotent() {
    let w = World::new();
    set_os_release(&w, "ID=debian\nVERSION_ID=12\n");
    let c = patch_cmd("p1", FAMILY, "202402.01.1", &["openssl=3.0.11-1~deb12u2", "libssl3=3.0.11-1~deb12u2"]);
    let r = run(&w, &c).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(
        w.calls(),
        ["install debian openssl=3.0.11-1~deb12u2 libssl3=3.0.11-1~deb12u2", "security-patch 202402.01.1"]
    );
    assert_eq!(w.os.with(|s| s.facts.security_patch_version.clone()), "202402.01.1");
    // The same operation again: the first result, nothing done.
    assert_eq!(run(&w, &c).await, r);
    // Another operation for the version already applied: done without installing.
    assert!(run(&w, &patch_cmd("p2", FAMILY, "202402.01.1", &["openssl=3.0.11-1~deb12u2"])).await.ok);
    assert_eq!(w.calls().len(), 2, "{:?}", w.calls());
    // RPM nodes install through dnf's path.
    set_os_release(&w, "ID=rocky\nID_LIKE=\"rhel centos fedora\"\n");
    assert!(run(&w, &patch_cmd("p3", FAMILY, "202403.01.0", &["openssl=3.0.7-25.el9"])).await.ok);
    assert_eq!(w.calls()[2], "install rocky openssl=3.0.7-25.el9");
}

#[tokio::test]
async fn malformed_security_patches_are_refused_naming_the_field() {
    let w = World::new();
    set_os_release(&w, "ID=debian\n");
    for (c, field) in [
        (patch_cmd("a", FAMILY, "2024.1", &["x=1"]), "apply_security_patch.version: \"2024.1\""),
        (patch_cmd("b", FAMILY, "202402.01.1", &[]), "apply_security_patch.packages: empty"),
        (patch_cmd("c", "", "202402.01.1", &["x=1"]), "apply_security_patch.family: empty"),
        (patch_cmd("d", FAMILY, "202402.01.1", &["x=1", "--force"]), "apply_security_patch.packages[1]"),
        (
            patch_cmd("e", "Other-1", "202402.01.1", &["x=1"]),
            "apply_security_patch.family: the patch is for \"Other-1\"",
        ),
    ] {
        let r = run(&w, &c).await;
        assert!(!r.ok && r.error.contains(field), "{field}: {r:?}");
    }
    assert!(w.calls().is_empty(), "nothing installed: {:?}", w.calls());
}

#[tokio::test]
async fn security_patches_are_refused_on_unsupported_pools_and_failures_are_reported() {
    let w = World::new();
    set_os_release(&w, "ID=azurelinux\nVERSION_ID=3.0\n");
    let (e, mut rx) = w.engine();
    e.set_pool("gpunp1", "gpu");
    let r = match e.submit(&patch_cmd("g", FAMILY, "202402.01.1", &["x=1"])) {
        Submitted::Finished(r) => r,
        Submitted::Running => result_of(&mut rx).await,
    };
    assert!(!r.ok && r.error.contains("node pool \"gpunp1\"") && r.error.contains("Azure Linux GPU"), "{r:?}");
    set_os_release(&w, "ID=arch\n");
    let r = run(&w, &patch_cmd("u", FAMILY, "202402.01.1", &["x=1"])).await;
    assert!(!r.ok && r.error.contains("no package manager known for os-release ID \"arch\""), "{r:?}");
    set_os_release(&w, "ID=debian\n");
    w.os.with(|s| s.install_fails = Some("E: Version '9' for 'x' was not found".into()));
    let r = run(&w, &patch_cmd("f", FAMILY, "202402.01.1", &["x=9"])).await;
    assert!(!r.ok && r.error.contains("installing security patch 202402.01.1") && r.error.contains("'9'"), "{r:?}");
    assert_eq!(w.os.with(|s| s.facts.security_patch_version.clone()), "", "not recorded after a failure");
}

#[tokio::test]
async fn a_security_patch_interrupted_at_each_step_finishes_once_after_a_restart() {
    for (step, expected) in [
        (Step::Act, vec!["install debian x=2", "security-patch 202402.01.1"]),
        (Step::Commit, vec!["security-patch 202402.01.1"]),
    ] {
        let w = World::new();
        set_os_release(&w, "ID=debian\n");
        let c = patch_cmd("p", FAMILY, "202402.01.1", &["x=2"]);
        let op = decode(&c).expect("decodes");
        {
            // The journal as a crash left it: the step recorded, not (or not entirely) performed.
            let (e, _rx) = w.engine();
            e.journal()
                .put(Entry {
                    operation_id: "p".into(),
                    generation: 1,
                    op,
                    step,
                    target: None,
                    previous: None,
                    boot_id: None,
                    failure: None,
                    reboots: 0,
                    result: None,
                })
                .expect("journal");
        }
        let (e, mut rx) = w.engine();
        e.resume();
        let r = result_of(&mut rx).await;
        assert!(r.ok, "{step:?}: {r:?}");
        assert_eq!(w.calls(), expected, "{step:?}");
        assert_eq!(run(&w, &c).await, r, "a repeat gets the first result");
        assert_eq!(w.calls(), expected, "and does nothing");
    }
}

const LEASE: &str = "reboot/fake-0";

fn count(calls: &[String], what: &str) -> usize {
    calls.iter().filter(|c| c.as_str() == what).count()
}

/// Grants `lease` to a fresh engine and waits for the leased reboot's result.
async fn leased(w: &World, lease: &str) -> v1::OperationResult {
    let (e, mut rx) = w.engine();
    assert_eq!(e.submit_lease(lease, false), LeaseTaken::Started);
    result_of(&mut rx).await
}

#[tokio::test]
async fn a_granted_lease_cordons_drains_reboots_checks_uncordons_and_releases_in_that_order() {
    let w = World::new();
    let r = leased(&w, LEASE).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(r.operation_id, "lease/reboot/fake-0");
    assert_eq!(
        w.calls(),
        ["cordon", "drain 900s", "reboot", "booted a", "health", "uncordon", "release reboot/fake-0"]
    );
    let entry = w.engine().0.entry("lease/reboot/fake-0").expect("journalled");
    assert_eq!(entry.op, Op::LeasedReboot { lease_id: LEASE.into(), forced: false });
    assert_eq!(entry.step, Step::Done);
}

/// Performs `n` journalled steps of a leased reboot by hand (and, with `mid_step`, step n+1's effect without
/// journalling it), drops the engine as a crash would, then lets a new engine over the same state finish.
async fn leased_crash_after(n: usize, mid_step: bool) {
    let w = World::new();
    let id = lease_operation_id(LEASE);
    {
        let (e, _rx) = w.engine();
        e.journal()
            .put(Entry::accepted(id.clone(), 0, Op::LeasedReboot { lease_id: LEASE.into(), forced: true }))
            .expect("put");
        for i in 0..=n {
            let entry = e.entry(&id).expect("entry");
            if entry.result.is_some() || (i == n && !mid_step) {
                break;
            }
            let Next::Go(next) = e.step(entry).await.expect("step") else { panic!("no real reboots here") };
            if i == n {
                break; // the effect happened, the journal does not know
            }
            e.journal().put(next).expect("put");
        }
    } // the agent dies
    let (e, mut rx) = w.engine();
    e.resume();
    let r = match e.entry(&id).and_then(|x| x.result) {
        Some(o) => wire(&id, 0, &o),
        None => result_of(&mut rx).await,
    };
    let calls = w.calls();
    assert!(r.ok, "crash after {n} steps (mid step: {mid_step}): {r:?}, calls {calls:?}");
    assert_eq!(count(&calls, "reboot"), 1, "one reboot, crash after {n} (mid {mid_step}): {calls:?}");
    assert_eq!(calls.last().map(String::as_str), Some("release reboot/fake-0"), "released last: {calls:?}");
    let releases = w.link.releases().len();
    if mid_step && n == 6 {
        assert_eq!(releases, 2, "the release was sent but not journalled: sent again (harmless at the hub)");
    } else {
        assert_eq!(releases, 1, "one release, crash after {n} (mid {mid_step}): {calls:?}");
    }
    // A repeat of the grant after the restart does nothing but give the lease back again.
    assert_eq!(e.submit_lease(LEASE, true), LeaseTaken::AlreadyFinished);
    assert_eq!(count(&w.calls(), "reboot"), 1);
}

#[tokio::test]
async fn a_leased_reboot_resumes_after_a_crash_at_every_step_and_finishes_once() {
    // Steps: accepted, cordon, drain, reboot, health, uncordon, release.
    for n in 0..7 {
        leased_crash_after(n, false).await;
        leased_crash_after(n, true).await;
    }
}

#[tokio::test]
async fn a_failing_drain_uncordons_releases_and_fails_naming_the_drain_error() {
    let w = World::new();
    w.os.with(|s| s.drain_fails = Some("cannot evict pod web-1: it would violate its PodDisruptionBudget".into()));
    let r = leased(&w, LEASE).await;
    assert!(!r.ok, "{r:?}");
    assert!(
        r.error.contains("drain failed") && r.error.contains("would violate its PodDisruptionBudget"),
        "{}",
        r.error
    );
    assert!(r.error.contains("lease reboot/fake-0") && r.error.contains("lease given back"), "{}", r.error);
    assert_eq!(w.calls(), ["cordon", "drain 900s", "uncordon", "release reboot/fake-0"], "no reboot");

    // A node that comes back unhealthy is uncordoned and the lease given back as well.
    let w = World::new();
    w.os.with(|s| s.unhealthy = Some("kubelet not running".into()));
    let r = leased(&w, LEASE).await;
    assert!(!r.ok && r.error.contains("after the reboot") && r.error.contains("kubelet not running"), "{r:?}");
    assert_eq!(w.calls()[w.calls().len() - 2..], ["uncordon", "release reboot/fake-0"]);
}

#[tokio::test]
async fn a_repeated_grant_is_one_operation_and_a_busy_node_gives_the_lease_back() {
    let w = World::new();
    let (e, mut rx) = w.engine();
    assert_eq!(e.submit_lease(LEASE, false), LeaseTaken::Started);
    assert_eq!(e.submit_lease(LEASE, false), LeaseTaken::AlreadyRunning);
    let r = result_of(&mut rx).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(e.submit_lease(LEASE, false), LeaseTaken::AlreadyFinished);
    assert!(rx.try_recv().is_err(), "no second result");
    assert_eq!(count(&w.calls(), "reboot"), 1, "{:?}", w.calls());
    assert_eq!(w.link.releases(), [LEASE, LEASE], "the late grant is given back, nothing redone");
    let leased_ops = e.journal().entries().filter(|x| matches!(x.op, Op::LeasedReboot { .. })).count();
    assert_eq!(leased_ops, 1);

    // Another operation in flight: the lease is not used but given back.
    e.journal().put(Entry::accepted("run-1/drain", 1, Op::Drain { timeout_seconds: 30, force: false })).expect("put");
    match e.submit_lease("reboot/other", true) {
        LeaseTaken::Refused(why) => assert!(why.contains("operation run-1/drain (drain) is still in flight"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(w.link.releases().last().map(String::as_str), Some("reboot/other"));
    assert!(e.entry("lease/reboot/other").is_none(), "nothing journalled");
    // A hub command meanwhile is refused as busy (nothing journalled), so the hub sends it again later.
    let busy = e.submit(&v1::Command {
        operation_id: "run-1/uncordon".into(),
        generation: 2,
        kind: Some(v1::command::Kind::Uncordon(v1::Uncordon {})),
    });
    match busy {
        Submitted::Finished(r) => assert!(!r.ok && r.busy && r.error.contains("still in flight"), "{r:?}"),
        Submitted::Running => panic!("a command was accepted while another is in flight"),
    }
    assert!(e.entry("run-1/uncordon").is_none(), "a busy refusal journals nothing");
    assert!(matches!(e.submit_lease(" ", false), LeaseTaken::Refused(why) if why.contains("lease.lease_id: empty")));
}

#[tokio::test]
async fn the_start_of_session_release_keeps_only_unfinished_leased_reboots() {
    let w = World::new();
    {
        let (e, _rx) = w.engine();
        let mut j = e.journal();
        let leased = |id: &str| Op::LeasedReboot { lease_id: id.into(), forced: false };
        j.put(Entry::accepted(lease_operation_id("reboot/b1"), 0, leased("reboot/b1"))).expect("put");
        let mut done = Entry::accepted(lease_operation_id("reboot/b0"), 0, leased("reboot/b0"));
        done.step = Step::Done;
        done.result = Some(failed("drain failed".into()));
        j.put(done).expect("put");
        j.put(Entry::accepted("run-1/cordon", 1, Op::Cordon)).expect("put");
    }
    // After a restart, from the journal alone.
    let (e, _rx) = w.engine();
    assert_eq!(e.lease_release_on_start(), v1::LeaseRelease { lease_ids: vec!["reboot/b1".into()], all_except: true });
    assert_eq!(lease_release_on_start(&[]), v1::LeaseRelease { lease_ids: vec![], all_except: true });
    // The failed try counts for the next lease id on that boot; the unfinished one does not.
    assert_eq!(e.leased_reboots_tried("b0").len(), 1);
    assert!(e.leased_reboots_tried("b1").is_empty());
    assert!(e.leased_reboots_tried("b").is_empty(), "a boot id that is a prefix of another is not confused");
}

// Images named by an https URL, served by a real https server in the test (os::https::testing).

use crate::os::https::HttpsFetcher;
use crate::os::https::testing::{GOOD, Script, TestCa, serve};

/// A real image: a tar of a root tree with its metadata, and some bulk so the body spans many TLS records.
fn tar_image(version: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let meta = format!("FAMILY={FAMILY}\nVERSION={version}\n");
    let bulk: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    for (path, data) in [("etc/upkeep/node-image", meta.as_bytes()), ("usr/lib/upkeep-test/bulk.bin", &bulk[..])] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, path, data).expect("tar entry");
    }
    b.into_inner().expect("tar")
}

/// A world whose new image is a signed tar, and a downloader trusting a CA made for the test.
fn https_world() -> (World, TestCa, Arc<HttpsFetcher>) {
    let mut w = World::new();
    w.image = tar_image(NEW);
    w.sha = sha_hex(&w.image);
    let sha = w.sha.clone();
    w.os.with(|s| s.images.insert(sha, target_image(FAMILY, NEW).expect("new")));
    let ca = TestCa::new("upkeep test image CA");
    let ca_file = w.dir.path().join("image-ca.pem");
    std::fs::write(&ca_file, &ca.pem).expect("ca file");
    (w, ca, Arc::new(HttpsFetcher::new(Some(ca_file))))
}

fn with_url(mut c: v1::Command, url: &str) -> v1::Command {
    if let Some(v1::command::Kind::Reimage(r)) = &mut c.kind {
        r.image.as_mut().expect("image").url = url.to_string();
    }
    c
}

async fn run_https(w: &World, f: &Arc<HttpsFetcher>, c: &v1::Command) -> v1::OperationResult {
    let (e, mut rx) = w.engine();
    e.set_url_fetcher(f.clone());
    match e.submit(c) {
        Submitted::Finished(r) => r,
        Submitted::Running => result_of(&mut rx).await,
    }
}

const WRITTEN: [&str; 6] = ["write b", "mark b", "reboot", "booted b", "health", "commit b"];

#[tokio::test]
async fn an_https_image_is_downloaded_verified_and_written() {
    let (w, ca, f) = https_world();
    let server = serve(&ca, w.image.clone(), GOOD).await;
    let r = run_https(&w, &f, &with_url(w.reimage("op-1", 1, w.signature()), &server.url())).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(w.calls(), WRITTEN);
    assert_eq!(w.image_now(), format!("{FAMILY}-{NEW}"));
    assert_eq!(server.ranges(), [None], "one request for the whole image");
    assert_eq!(w.fetcher.opens.load(Ordering::SeqCst), 0, "nothing fetched from the hub");

    // Through a redirect on the same server.
    let (w, ca, f) = https_world();
    let server = serve(&ca, w.image.clone(), GOOD).await;
    let r = run_https(&w, &f, &with_url(w.reimage("op-1", 1, w.signature()), &server.moved_url())).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(w.calls(), WRITTEN);
}

#[tokio::test]
async fn a_cut_https_download_resumes_with_a_range_and_verifies() {
    let cut = Script { cut_first_at: Some(70_000), honour_range: true };
    let (w, ca, f) = https_world();
    let server = serve(&ca, w.image.clone(), cut).await;
    let r = run_https(&w, &f, &with_url(w.reimage("op-1", 1, w.signature()), &server.url())).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(server.ranges(), [None, Some("bytes=70000-".to_string())], "resumed where the cut left it");
    assert_eq!(w.calls(), WRITTEN);

    // A server that answers the range with the whole image (200): the download starts again and verifies.
    let (w, ca, f) = https_world();
    let server = serve(&ca, w.image.clone(), Script { honour_range: false, ..cut }).await;
    let r = run_https(&w, &f, &with_url(w.reimage("op-1", 1, w.signature()), &server.url())).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(server.ranges(), [None, Some("bytes=70000-".to_string())]);
    assert_eq!(w.calls(), WRITTEN);
}

#[tokio::test]
async fn a_flipped_byte_from_an_https_server_is_refused_before_any_slot_write() {
    let (w, ca, f) = https_world();
    let mut flipped = w.image.clone();
    flipped[1000] ^= 1;
    let server = serve(&ca, flipped, GOOD).await;
    let r = run_https(&w, &f, &with_url(w.reimage("op-1", 1, w.signature()), &server.url())).await;
    assert!(!r.ok && r.error.contains("nothing written") && r.error.contains("digest mismatch"), "{r:?}");
    assert!(w.calls().is_empty(), "no slot touched: {:?}", w.calls());
    assert!(!crate::os::image::staged_path(w.dir.path(), &w.sha).exists(), "the refused bytes are discarded");
}

#[tokio::test]
async fn an_untrusted_https_server_or_a_plain_http_url_is_refused_naming_it() {
    let (w, _ca, f) = https_world();
    let stranger = TestCa::new("a CA this node does not trust");
    let server = serve(&stranger, w.image.clone(), GOOD).await;
    let r = run_https(&w, &f, &with_url(w.reimage("op-1", 1, w.signature()), &server.url())).await;
    assert!(!r.ok, "{r:?}");
    assert!(r.error.contains(&server.url()), "names the url: {}", r.error);
    assert!(r.error.contains("certificate") && r.error.contains("[image] url_ca"), "{}", r.error);
    assert!(server.ranges().is_empty(), "no request reached the server");
    assert!(w.calls().is_empty(), "{:?}", w.calls());

    let r = run_https(&w, &f, &with_url(w.reimage("op-2", 2, w.signature()), "http://127.0.0.1:1/test.tar")).await;
    assert!(!r.ok && r.error.starts_with("reimage.image.url: ") && r.error.contains("plain http"), "{r:?}");
    assert!(r.error.contains("serve the image over https, or leave url empty"), "{}", r.error);
    // Without an https downloader, a URL is refused rather than fetched from the hub.
    let r = run(&w, &with_url(w.reimage("op-3", 3, w.signature()), &server.url())).await;
    assert!(!r.ok && r.error.contains("no https downloader"), "{r:?}");
    assert_eq!(w.fetcher.opens.load(Ordering::SeqCst), 0);
}

// ---------------------------------------------------------------------------------------------------------
// Staging and slot-write leftovers.

impl World {
    fn staging(&self) -> PathBuf {
        self.dir.path().join(crate::os::image::STAGING_DIR)
    }

    /// Leaves `bytes` staged for the image, as a crash or an earlier agent might have.
    fn prestage(&self, bytes: &[u8]) {
        std::fs::create_dir_all(self.staging()).expect("mkdir");
        std::fs::write(crate::os::image::staged_path(self.dir.path(), &self.sha), bytes).expect("stage");
    }

    /// Files in the staging directory.
    fn staged_files(&self) -> Vec<PathBuf> {
        match std::fs::read_dir(self.staging()) {
            Ok(rd) => rd.map(|e| e.expect("entry").path()).collect(),
            Err(_) => Vec::new(),
        }
    }

    fn incoming(&self) -> Vec<Slot> {
        self.os.with(|s| s.incoming.clone())
    }
}

#[tokio::test]
async fn a_staged_part_longer_than_the_image_is_dropped_and_the_download_starts_from_0() {
    let w = World::new();
    w.prestage(&vec![0xa5; w.image.len() + 1000]);
    let r = run(&w, &w.reimage("op-long", 1, w.signature())).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(w.fetcher.bytes_sent.load(Ordering::SeqCst), w.image.len(), "downloaded once, from 0");
    assert_eq!(w.os.with(|s| s.slot_sha.get(&Slot::B).cloned()), Some(w.sha.clone()));
    assert!(w.staged_files().is_empty(), "nothing staged after success: {:?}", w.staged_files());
    assert!(w.incoming().is_empty());
}

#[tokio::test]
async fn a_staged_part_that_is_not_a_prefix_of_the_image_is_downloaded_again_once() {
    // Garbage of exactly the image's size: the source has nothing to add, the digest gives it away.
    let w = World::new();
    w.prestage(&vec![0x5a; w.image.len()]);
    let r = run(&w, &w.reimage("op-full", 1, w.signature())).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(w.fetcher.bytes_sent.load(Ordering::SeqCst), w.image.len());
    assert_eq!(w.fetcher.opens.load(Ordering::SeqCst), 2, "one try from the staged end, one from 0");
    assert!(w.staged_files().is_empty(), "{:?}", w.staged_files());
    // Shorter garbage: resumed, found out at the end, downloaded again from 0.
    let w = World::new();
    w.prestage(&vec![0x5a; 1000]);
    let r = run(&w, &w.reimage("op-short", 1, w.signature())).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(w.fetcher.bytes_sent.load(Ordering::SeqCst), (w.image.len() - 1000) + w.image.len());
    assert!(w.staged_files().is_empty(), "{:?}", w.staged_files());
}

#[tokio::test]
async fn a_source_serving_other_bytes_is_downloaded_again_only_once_then_refused_leaving_nothing() {
    let mut w = World::new();
    let mut other = w.image.clone();
    other[4000] ^= 0xff;
    w.fetcher = Arc::new(MemFetcher::new(other));
    w.prestage(&w.image[..1000]); // a true prefix: the source's wrong bytes follow it
    let r = run(&w, &w.reimage("op-bad-source", 1, w.signature())).await;
    assert!(!r.ok && r.error.contains("digest mismatch"), "{r:?}");
    assert_eq!(w.fetcher.opens.load(Ordering::SeqCst), 2, "one restart from 0, not a loop");
    assert!(w.calls().is_empty(), "nothing written: {:?}", w.calls());
    assert!(w.staged_files().is_empty(), "{:?}", w.staged_files());
}

#[tokio::test]
async fn leftovers_of_operations_no_longer_in_flight_are_removed_at_start() {
    let w = World::new();
    w.prestage(b"half an image from before a crash");
    let other = w.staging().join(format!("{}.part", "e".repeat(64)));
    std::fs::write(&other, b"another image").expect("w");
    w.os.with(|s| s.incoming = vec![Slot::B]); // a slot write cut by a crash
    let (e, _rx) = w.engine();
    e.resume();
    assert!(w.staged_files().is_empty(), "{:?}", w.staged_files());
    assert!(w.incoming().is_empty());

    // A reimage still fetching keeps its staged part (it resumes from it); anything else goes.
    w.prestage(&w.image[..1234]);
    std::fs::write(&other, b"another image").expect("w");
    w.os.with(|s| s.incoming = vec![Slot::B]);
    let mut entry = Entry::accepted("op-f", 1, decode(&w.reimage("op-f", 1, w.signature())).expect("decodes"));
    entry.step = Step::Fetch;
    e.journal().put(entry).expect("put");
    drop(e);
    let (e, mut rx) = w.engine();
    e.resume();
    assert!(!other.exists() && w.incoming().is_empty());
    let r = result_of(&mut rx).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(w.fetcher.bytes_sent.load(Ordering::SeqCst), w.image.len() - 1234, "resumed from the kept part");
    assert!(w.staged_files().is_empty(), "{:?}", w.staged_files());
}

#[tokio::test]
async fn a_failed_reimage_leaves_no_staging_and_no_partial_slot_write() {
    let w = World::new();
    // A slot write that breaks half-way.
    w.os.with(|s| s.write_fails = Some("no space left on device".into()));
    let r = run(&w, &w.reimage("op-w", 1, w.signature())).await;
    assert!(!r.ok && r.error.contains("writing slot b") && r.error.contains("no space left"), "{r:?}");
    assert!(w.staged_files().is_empty(), "{:?}", w.staged_files());
    assert!(w.incoming().is_empty(), "{:?}", w.incoming());
    w.os.with(|s| s.write_fails = None);
    assert_eq!(w.os.with(|s| s.next_once), None, "a failed write marks nothing");
    // A slot write whose bytes do not hash to the verified digest: written, not marked, and said so.
    w.os.with(|s| s.write_corrupts = true);
    let r = run(&w, &w.reimage("op-corrupt", 2, w.signature())).await;
    assert!(!r.ok && r.error.contains("writing slot b"), "{r:?}");
    assert!(r.error.contains("does not hold a verified image; it is not marked bootable"), "{r:?}");
    let (calls, next_once) = w.os.with(|s| (s.calls.clone(), s.next_once));
    assert!(calls.contains(&"write b (corrupt)".to_string()), "{calls:?}");
    assert!(!calls.iter().any(|c| c.starts_with("mark")) && next_once.is_none(), "{calls:?}");
    w.os.with(|s| s.write_corrupts = false);
    // A refused signature, over a part staged before.
    let bad = SecretKey::from_seed([5; 32], [8; 8]).sign_prehashed(&blake2b_512(&w.image), "x").to_file_text();
    w.prestage(&w.image[..100]);
    let r = run(&w, &w.reimage("op-sig", 3, bad)).await;
    assert!(!r.ok && r.error.contains("unknown key"), "{r:?}");
    assert!(w.staged_files().is_empty(), "{:?}", w.staged_files());
    // An unhealthy image, rolled back.
    w.os.with(|s| s.unhealthy = Some("kubelet not running".into()));
    let r = run(&w, &w.reimage("op-h", 4, w.signature())).await;
    assert!(!r.ok && r.error.contains("rolled back"), "{r:?}");
    assert!(w.staged_files().is_empty(), "{:?}", w.staged_files());
    assert!(w.incoming().is_empty(), "{:?}", w.incoming());
}
