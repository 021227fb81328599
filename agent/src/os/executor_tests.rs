//! The executor's checks, over a real Unix socket; the node behind it is the unit tests' `FakeOs` (the OS seam).

use super::*;
use crate::config::{CordonSettings, ImageSettings};
use crate::os::fake::FakeOs;
use crate::os::image::STAGING_DIR;
use crate::os::remote::{RemoteOs, Reply};
use crate::os::{OsFacts, Slot};
use upkeep_core::channel::NodeOsChannel;
use upkeep_core::signature::{SecretKey, blake2b_512};

struct Node {
    dir: tempfile::TempDir,
    os: Arc<FakeOs>,
    cfg: AgentConfig,
    sk: SecretKey,
}

fn sha_hex(b: &[u8]) -> String {
    crate::os::slots::hex(ring::digest::digest(&ring::digest::SHA256, b).as_ref())
}

fn me() -> u32 {
    nix::unistd::getuid().as_raw()
}

impl Node {
    fn new() -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let os = Arc::new(FakeOs::new(OsFacts::default()));
        let sk = SecretKey::from_seed([7; 32], [3; 8]);
        os.with(|s| {
            s.keys = vec![(PathBuf::from("k.pub"), sk.public_key().to_file_text())];
            s.os_release = vec![("ID".into(), "debian".into())];
        });
        let cfg = AgentConfig {
            source: dir.path().join("agent.toml"),
            hubs: vec![upkeep_proto::tls::HubAddress { url: "https://127.0.0.1:1".into(), host: "127.0.0.1".into() }],
            node_name: "n1".into(),
            member: "m1".into(),
            node_pool: "p1".into(),
            region: "r1".into(),
            hardware_class: String::new(),
            control_plane: false,
            state_dir: dir.path().join("state"),
            root: dir.path().to_path_buf(),
            tls: upkeep_proto::tls::ClientFiles {
                ca: PathBuf::from("ca.pem"),
                cert: PathBuf::from("cert.pem"),
                key: PathBuf::from("key.pem"),
                settings: ["tls.ca".into(), "tls.cert".into(), "tls.key".into()],
            },
            image: ImageSettings::defaults(dir.path()),
            cordon: CordonSettings::default(),
            kubernetes: None,
            executor: Some(ExecutorSettings { socket: dir.path().join("executor.sock"), client_user: "unused".into() }),
        };
        Node { dir, os, cfg, sk }
    }

    fn executor(&self, client_uid: u32) -> Executor {
        Executor::new(self.os.clone(), &self.cfg, client_uid)
    }

    /// Stages `bytes` as the download of `sha` (as the network half does).
    fn stage(&self, sha: &str, bytes: &[u8]) -> PathBuf {
        let p = staged_path(&self.cfg.state_dir, sha);
        std::fs::create_dir_all(self.cfg.state_dir.join(STAGING_DIR)).expect("mkdir");
        std::fs::write(&p, bytes).expect("stage");
        p
    }

    fn sign(&self, bytes: &[u8]) -> String {
        self.sk.sign_prehashed(&blake2b_512(bytes), "image").to_file_text()
    }

    fn writes(&self) -> Vec<String> {
        self.os.with(|s| s.calls.iter().filter(|c| c.starts_with("write")).cloned().collect())
    }

    /// Serves on the configured socket in a thread; returns the client and the listener (shut it down to stop).
    fn serve(&self, client_uid: u32) -> (RemoteOs, std::thread::JoinHandle<()>, UnixListener) {
        let x = self.cfg.executor.clone().expect("executor settings");
        let l = listener(&x).expect("listen");
        let l2 = l.try_clone().expect("clone");
        let exec = Arc::new(self.executor(client_uid));
        let t = std::thread::spawn(move || exec.serve(&l2));
        (RemoteOs::new(&x.socket), t, l)
    }
}

fn write(exec: &Executor, sha: &str, size: u64, signature: &str) -> Result<String, OsError> {
    exec.handle(Request::WriteSlot { slot: Slot::B, sha256: sha.into(), size, signature: signature.into() })
}

#[test]
fn a_slot_write_is_checked_on_the_bytes_it_streams_from_the_executors_own_staging_path() {
    let n = Node::new();
    let exec = n.executor(me());
    let image: Vec<u8> = (0..70_000u32).map(|i| (i % 253) as u8).collect();
    let sha = sha_hex(&image);
    let good = n.sign(&image);
    n.stage(&sha, &image);

    // A signature by a key the node does not trust.
    let stranger = SecretKey::from_seed([9; 32], [9; 8]).sign_prehashed(&blake2b_512(&image), "x").to_file_text();
    let e = write(&exec, &sha, 0, &stranger).expect_err("untrusted key");
    assert!(e.to_string().contains("image refused, nothing written"), "{e}");
    // A size that is not the file's.
    let e = write(&exec, &sha, 69_999, &good).expect_err("size");
    assert!(matches!(e, OsError::Unverified { .. }), "{e}");
    // The staged file is not what its name says: the network half changed it after its own check.
    let mut changed = image.clone();
    changed[100] ^= 1;
    n.stage(&sha, &changed);
    let e = write(&exec, &sha, 0, &good).expect_err("changed bytes");
    assert!(matches!(e, OsError::Unverified { .. } | OsError::Digest { .. }), "{e}");
    // ... or signed the changed bytes with a key it made up: not a trusted key, refused before a byte moves.
    let e = write(&exec, &sha_hex(&changed), 0, &stranger).expect_err("untrusted key");
    assert!(e.to_string().contains("unknown key"), "{e}");
    // A digest that is a path.
    let e = write(&exec, "../../../../etc/shadow", 0, &good).expect_err("path");
    assert!(e.to_string().contains("64 lower-case hex digits"), "{e}");
    // A staged path that is a link to another file is not followed.
    let p = staged_path(&n.cfg.state_dir, &sha);
    std::fs::remove_file(&p).expect("rm");
    let elsewhere = n.dir.path().join("elsewhere");
    std::fs::write(&elsewhere, &image).expect("w");
    std::os::unix::fs::symlink(&elsewhere, &p).expect("symlink");
    let e = write(&exec, &sha, 0, &good).expect_err("symlink");
    assert!(matches!(e, OsError::Io { .. }), "{e}");
    assert!(n.writes().is_empty(), "nothing reached a slot: {:?}", n.writes());

    // The real thing is written, from the file the executor held open.
    std::fs::remove_file(&p).expect("rm");
    n.stage(&sha, &image);
    let written = write(&exec, &sha, image.len() as u64, &good).expect("write");
    assert_eq!(written, image.len().to_string());
    assert_eq!(n.writes(), vec!["write b".to_string()]);
    assert_eq!(n.os.with(|s| s.slot_sha.get(&Slot::B).cloned()), Some(sha));
}

#[test]
fn a_legacy_signature_is_refused_before_anything_is_written() {
    let n = Node::new();
    let exec = n.executor(me());
    let image = b"a small legacy-signed image".repeat(100);
    let sha = sha_hex(&image);
    n.stage(&sha, &image);
    let legacy = n.sk.sign_legacy(&image, "t").to_file_text();
    let e = write(&exec, &sha, 0, &legacy).expect_err("legacy");
    assert!(e.to_string().contains("legacy (whole-message) signature"), "{e}");
    assert!(n.writes().is_empty());
}

#[test]
fn only_a_slot_the_executor_wrote_and_verified_is_marked_bootable_and_only_the_booted_slot_committed() {
    let n = Node::new();
    n.os.with(|s| s.booted = Some(Slot::A));
    let exec = n.executor(me());
    let mark = |slot| exec.handle(Request::MarkBootOnce { slot });
    let e = mark(Slot::B).expect_err("nothing verified in b");
    assert!(e.to_string().contains("holds no image this executor wrote and verified"), "{e}");
    let image: Vec<u8> = (0..4000u32).map(|i| (i % 7) as u8).collect();
    let sha = sha_hex(&image);
    n.stage(&sha, &image);
    write(&exec, &sha, 0, &n.sign(&image)).expect("write");
    mark(Slot::B).expect("b was written and verified");
    // The record outlives the executor.
    let again = n.executor(me());
    again.handle(Request::MarkBootOnce { slot: Slot::B }).expect("after a restart too");
    // A write that fails its check forgets what the slot held.
    let other = b"other bytes".repeat(10);
    let other_sha = sha_hex(&other);
    n.stage(&other_sha, &other);
    let stranger = SecretKey::from_seed([9; 32], [9; 8]);
    let forged = stranger.sign_prehashed(&blake2b_512(&other), "x").to_file_text();
    assert!(write(&again, &other_sha, 0, &forged).is_err(), "an untrusted key is refused up front");
    n.stage(&other_sha, &image); // the staged bytes are not the ones signed
    let e = write(&again, &other_sha, 0, &n.sign(&other)).expect_err("bytes do not match the signature");
    assert!(matches!(e, OsError::Unverified { .. }), "{e}");
    let e = again.handle(Request::MarkBootOnce { slot: Slot::B }).expect_err("b no longer verified");
    assert!(e.to_string().contains("not marked bootable"), "{e}");
    // Commit: the booted slot only.
    let e = again.handle(Request::Commit { slot: Slot::B }).expect_err("b is not running");
    assert!(e.to_string().contains("not the booted slot"), "{e}");
    again.handle(Request::Commit { slot: Slot::A }).expect("a is running");
}

#[test]
fn only_the_client_user_is_served_over_the_socket() {
    let n = Node::new();
    let (os, t, l) = n.serve(me() + 1);
    let e = os.facts().expect_err("another uid");
    assert!(e.to_string().contains(&format!("uid {} is not executor.client_user", me())), "{e}");
    nix::sys::socket::shutdown(l.as_raw_fd(), nix::sys::socket::Shutdown::Both).expect("shutdown");
    t.join().expect("served");

    let (os, t, l) = n.serve(me());
    n.os.with(|s| s.facts.kernel = "6.1.0-test".into());
    assert_eq!(os.facts().expect("facts").kernel, "6.1.0-test");
    // Errors come back as the same error.
    n.os.with(|s| s.drain_fails = Some("pod shop/web-1 blocked".into()));
    let e = os.drain(Duration::from_secs(5), false).expect_err("drain fails");
    assert!(e.to_string().contains("pod shop/web-1 blocked"), "{e}");
    // A request that is not one is refused with its reason.
    let mut raw = UnixStream::connect(n.cfg.executor.as_ref().expect("x").socket.clone()).expect("connect");
    raw.write_all(br#""format_disk""#).expect("w");
    raw.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let reply: Reply<serde_json::Value> = read_document(&mut raw, 1 << 20, "answer").expect("answer");
    assert!(
        matches!(&reply, Reply::Err(WireError::Executor { message }) if message.contains("format_disk")),
        "{reply:?}"
    );
    nix::sys::socket::shutdown(l.as_raw_fd(), nix::sys::socket::Shutdown::Both).expect("shutdown");
    t.join().expect("served");
}

#[test]
fn a_channel_is_planned_by_the_executor_for_its_own_node() {
    let n = Node::new();
    let exec = n.executor(me());
    exec.handle(Request::ApplyChannel { channel: NodeOsChannel::Unmanaged }).expect("apply");
    let files: Vec<String> = n.os.with(|s| s.channel_files.keys().cloned().collect());
    assert!(files.iter().any(|f| f.contains("apt")), "Debian files from the executor's own os-release: {files:?}");
    // An RPM node gets dnf-automatic's files for the same request.
    n.os.with(|s| s.os_release = vec![("ID".into(), "rocky".into())]);
    exec.handle(Request::ApplyChannel { channel: NodeOsChannel::Unmanaged }).expect("apply");
    let files: Vec<String> = n.os.with(|s| s.channel_files.keys().cloned().collect());
    assert!(files.iter().all(|f| !f.contains("apt")) && files.iter().any(|f| f.contains("dnf")), "{files:?}");
}

#[test]
fn pins_must_be_well_formed_and_name_installed_packages() {
    let n = Node::new();
    let exec = n.executor(me());
    let pin = |name: &str, version: &str| Pin { name: name.into(), version: version.into() };
    for bad in [pin("-oAPT::Get::AllowUnauthenticated=1", "1"), pin("ok", "1 --force"), pin("a=b", "1")] {
        let e = exec.handle(Request::InstallPackages { pins: vec![bad.clone()] }).expect_err("refused");
        assert!(matches!(e, OsError::Executor(_)), "{bad:?}: {e}");
    }
    assert!(n.os.with(|s| s.calls.iter().all(|c| !c.starts_with("install"))), "nothing installed");
    // On this (Debian) machine: dpkg is installed, a made-up package is not.
    let debian = OsKind::Debian { id: "debian".into() };
    let have = check_pins(&[pin("dpkg", "1.0")]).expect("pins");
    check_installed(Path::new("/"), &debian, &have).expect("dpkg is installed");
    let missing = check_pins(&[pin("upkeep-no-such-package", "1.0")]).expect("pins");
    let e = check_installed(Path::new("/"), &debian, &missing).expect_err("not installed");
    assert!(e.to_string().contains("upkeep-no-such-package is not installed"), "{e}");
}

#[test]
fn versions_and_drain_timeouts_are_checked_before_anything_runs() {
    let n = Node::new();
    let exec = n.executor(me());
    assert!(exec.handle(Request::RecordSecurityPatch { version: "../../x".into() }).is_err());
    assert!(exec.handle(Request::InstallKubernetes { version: "1.29; rm -rf /".into() }).is_err());
    assert!(exec.handle(Request::Drain { timeout_seconds: 10 * 24 * 3600, force: true }).is_err());
    assert!(n.os.with(|s| s.calls.is_empty()), "{:?}", n.os.with(|s| s.calls.clone()));
    exec.handle(Request::RecordSecurityPatch { version: "202402.01.1".into() }).expect("a real version");
}

#[test]
fn with_the_kubernetes_api_configured_cordon_drain_and_labels_are_refused_by_the_executor() {
    let mut n = Node::new();
    let api = crate::config::KubeApiSettings {
        api_server: "https://127.0.0.1:6443".into(),
        host: "127.0.0.1".into(),
        port: 6443,
        ca_file: n.dir.path().join("kube-ca.pem"),
        credentials: crate::config::KubeCredentials::Token(n.dir.path().join("token")),
        node_name: "n1".into(),
        drain_timeout: Duration::from_secs(60),
        eviction_retry: Duration::from_secs(1),
    };
    n.cfg.kubernetes =
        Some(crate::config::KubernetesSettings { api: Some(api), ..crate::config::KubernetesSettings::defaults() });
    let exec = n.executor(me());
    for req in [
        Request::Cordon,
        Request::Uncordon,
        Request::Drain { timeout_seconds: 10, force: false },
        Request::PublishNodeLabels { image: "x".into(), patch: String::new() },
    ] {
        let name = req.name();
        let e = exec.handle(req).expect_err("the network half's");
        assert!(e.to_string().contains("the network half talks to the API server"), "{name}: {e}");
    }
    assert!(n.os.with(|s| s.calls.is_empty()), "{:?}", n.os.with(|s| s.calls.clone()));
    exec.handle(Request::HealthCheck).expect("the rest is served");
}

/// Polls `cond` every few milliseconds until it holds; panics with `what` after 10 s.
fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// An executor over the real files of a temporary root (`HostOs`), serving on its socket; the client follows
/// its facts.
fn serve_host(n: &Node) -> (RemoteOs, Arc<Executor>, std::thread::JoinHandle<()>, UnixListener) {
    std::fs::create_dir_all(n.dir.path().join("etc/upkeep")).expect("mkdir");
    std::fs::write(n.dir.path().join("etc/os-release"), "ID=debian\nVERSION_ID=12\n").expect("os-release");
    std::fs::write(n.dir.path().join(crate::os::NODE_IMAGE_FILE), "FAMILY=Debian-12\nVERSION=202611.01.0\n")
        .expect("node-image");
    let x = n.cfg.executor.clone().expect("executor settings");
    let l = listener(&x).expect("listen");
    let l2 = l.try_clone().expect("clone");
    let exec = Arc::new(Executor::new(Arc::new(HostOs::new(n.dir.path())), &n.cfg, me()));
    let e2 = exec.clone();
    let t = std::thread::spawn(move || e2.serve(&l2));
    let os = RemoteOs::new(&x.socket).follow_facts();
    until("the subscription", || os.facts_followed());
    (os, exec, t, l)
}

fn image_version(os: &RemoteOs) -> String {
    os.facts().expect("facts").node_image.map(|v| v.version.to_string()).unwrap_or_default()
}

#[test]
fn a_followed_executor_is_not_asked_for_facts_and_pushes_a_file_changed_on_the_node() {
    let n = Node::new();
    let (os, exec, t, l) = serve_host(&n);
    assert_eq!(image_version(&os), "202611.01.0");
    let served = exec.served();
    for _ in 0..20 {
        assert_eq!(image_version(&os), "202611.01.0");
    }
    assert_eq!(exec.served(), served, "facts came from the subscription, not from requests");

    // Changed behind the agent's back (a reimage tool, an operator): the watch pushes it.
    std::fs::write(n.dir.path().join(crate::os::NODE_IMAGE_FILE), "FAMILY=Debian-12\nVERSION=202611.30.0\n")
        .expect("node-image");
    until("the new image in the facts", || image_version(&os) == "202611.30.0");
    // A directory that did not exist (run/) and then a file in it: both watched as they appear.
    assert!(!os.facts().expect("facts").reboot_required);
    std::fs::create_dir_all(n.dir.path().join("run")).expect("mkdir run");
    std::fs::write(n.dir.path().join(crate::os::RUN_REBOOT_REQUIRED_FILE), "").expect("flag");
    until("the reboot flag in the facts", || os.facts().expect("facts").reboot_required);
    std::fs::remove_file(n.dir.path().join(crate::os::RUN_REBOOT_REQUIRED_FILE)).expect("rm flag");
    until("the reboot flag gone", || !os.facts().expect("facts").reboot_required);
    // A broken file is pushed as the error a direct read gives.
    std::fs::write(n.dir.path().join(crate::os::NODE_IMAGE_FILE), "FAMILY=Debian-12\n").expect("node-image");
    until("the error", || os.facts().is_err_and(|e| e.to_string().contains("missing VERSION=")));
    assert_eq!(exec.served(), served, "every change came without a request");
    assert_eq!(exec.facts_subscribers(), 1);
    nix::sys::socket::shutdown(l.as_raw_fd(), nix::sys::socket::Shutdown::Both).expect("shutdown");
    t.join().expect("served");
}

#[test]
fn a_change_made_through_the_executor_is_in_the_very_next_facts() {
    let n = Node::new();
    let (os, exec, t, l) = serve_host(&n);
    for i in 1..=40 {
        let v = format!("202611.30.{i}");
        os.record_security_patch(&v).expect("record");
        // No wait: the request invalidated the copy; the next read is the executor's or a line pushed after it.
        assert_eq!(os.facts().expect("facts").security_patch_version, v, "round {i}");
    }
    // Once settled, reads are served from memory again.
    until("the subscription", || os.facts_followed());
    let _ = os.facts().expect("facts");
    let served = exec.served();
    for _ in 0..10 {
        assert_eq!(os.facts().expect("facts").security_patch_version, "202611.30.40");
    }
    assert_eq!(exec.served(), served);
    nix::sys::socket::shutdown(l.as_raw_fd(), nix::sys::socket::Shutdown::Both).expect("shutdown");
    t.join().expect("served");
}

#[test]
fn when_the_subscription_ends_facts_are_asked_for_and_never_served_stale() {
    let n = Node::new();
    n.os.with(|s| s.facts.kernel = "6.1.0-a".into());
    let x = n.cfg.executor.clone().expect("executor settings");
    let l = listener(&x).expect("listen");
    let l2 = l.try_clone().expect("clone");
    let exec = Arc::new(n.executor(me()));
    let t = std::thread::spawn(move || exec.serve(&l2));
    let os = RemoteOs::new(&x.socket).follow_facts();
    until("the subscription", || os.facts_followed());
    assert_eq!(os.facts().expect("facts").kernel, "6.1.0-a");
    // The executor goes away: its subscriptions close with it.
    nix::sys::socket::shutdown(l.as_raw_fd(), nix::sys::socket::Shutdown::Both).expect("shutdown");
    t.join().expect("served");
    until("the subscription to end", || !os.facts_followed());
    let e = os.facts().expect_err("nobody to ask");
    assert!(e.to_string().contains("is upkeep-agent-executor running?"), "{e}");
}
