//! Engine tests over `FakeOs`: the reimage path, idempotency, fencing, refusals, fall back, and a crash at
//! every step (before and after the step's effect) followed by a restart from the journal.

use super::*;
use crate::os::OsFacts;
use crate::os::fake::FakeOs;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
        World {
            dir: tempfile::tempdir().expect("tempdir"),
            os,
            fetcher: Arc::new(MemFetcher::new(image.clone())),
            link: Arc::new(FakeLink::default()),
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
async fn cordon_drain_uncordon_and_unsupported_kinds() {
    let w = World::new();
    let cmd =
        |id: &str, g: u64, k: v1::command::Kind| v1::Command { operation_id: id.into(), generation: g, kind: Some(k) };
    assert!(run(&w, &cmd("c", 1, v1::command::Kind::Cordon(v1::Cordon {}))).await.ok);
    assert!(run(&w, &cmd("d", 1, v1::command::Kind::Drain(v1::Drain { timeout_seconds: 30 }))).await.ok);
    assert!(run(&w, &cmd("u", 1, v1::command::Kind::Uncordon(v1::Uncordon {}))).await.ok);
    assert_eq!(w.calls(), ["cordon", "drain 30s", "uncordon"]);
    let r =
        run(&w, &cmd("k", 1, v1::command::Kind::UpgradeKubernetes(v1::UpgradeKubernetes { version: "1.30.1".into(), first_control_plane: false })))
            .await;
    assert!(!r.ok && r.error.contains("upgrade-kubernetes is not supported"), "{r:?}");
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
