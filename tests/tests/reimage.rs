//! Reimage scenarios through a real in-process hub and a real in-process agent with the directory-slot
//! backend: cordon, drain, reimage, uncordon through `Fleet::command`; idempotent repeats; untrusted images
//! refused with nothing written to the inactive slot; an unhealthy image falls back by itself and is not
//! retried.

use std::path::{Path, PathBuf};
use std::time::Duration;
use upkeep_hub::artifacts::Artifacts;
use upkeep_hub::image_tools;
use upkeep_proto::v1;
use upkeep_tests::{TestAgent, TestHub, TestNode, TestPki, make_node, wait_for};

const FAMILY: &str = "Test-1";
const REIMAGE_WITHIN: Duration = Duration::from_secs(60);

struct Image {
    sha256: String,
    size: u64,
    signature: String,
}

/// Builds, signs (with `key`) and publishes an image on the hub; returns its reference parts.
fn publish(hub: &TestHub, dir: &Path, key: &Path, version: &str, extra: &[(&str, &[u8])]) -> Image {
    let file = dir.join(format!("{version}.tar"));
    image_tools::build_test_image(&file, FAMILY, version, extra).expect("build image");
    let sig = image_tools::sign(key, &file).expect("sign");
    let (sha256, size) = Artifacts::new(&hub.state_dir.join("db"))
        .put(std::fs::File::open(&file).expect("open image"), None)
        .expect("store artifact");
    Image { sha256, size, signature: std::fs::read_to_string(sig).expect("signature") }
}

fn reimage(version: &str, img: &Image) -> v1::command::Kind {
    v1::command::Kind::Reimage(v1::Reimage {
        image: Some(v1::ImageRef {
            family: FAMILY.into(),
            version: version.into(),
            url: String::new(),
            sha256: img.sha256.clone(),
            signature: img.signature.clone(),
            size_bytes: img.size,
        }),
        allow_downgrade: false,
        reinstall: false,
    })
}

/// Every file under `dir` with its content (to prove a slot was not touched).
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let c = std::fs::read(&p).expect("read");
                out.push((p, c));
            }
        }
    }
    out.sort();
    out
}

async fn reported_image(hub: &TestHub, node: &str) -> String {
    hub.fleet().store().get_node(node).expect("store").map(|n| n.facts.node_image_version).unwrap_or_default()
}

struct Setup {
    _pki: TestPki,
    _dir: tempfile::TempDir,
    work: PathBuf,
    hub: TestHub,
    node: TestNode,
    key: PathBuf,
}

async fn setup() -> Setup {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let hub = TestHub::start(&pki, &dir.path().join("hub"), "127.0.0.1:0".parse().expect("addr")).await;
    let node = make_node(&pki, dir.path(), &hub.url(), "node-1", "m1", "pool1", "r1", &format!("{FAMILY}-202301.01.0"));
    // The health check runs against the booted image: an image that carries etc/upkeep/fail-health is unhealthy.
    let mut cfg = std::fs::read_to_string(&node.config).expect("agent.toml");
    cfg.push_str(
        "[image]\nhealth_timeout_seconds = 30\nhealth_commands = [[\"sh\", \"-c\", \"test ! -e \\\"$UPKEEP_BOOTED_ROOT/etc/upkeep/fail-health\\\" || { echo 'image marked unhealthy' >&2; exit 1; }\"]]\n",
    );
    std::fs::write(&node.config, cfg).expect("write agent.toml");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).expect("mkdir");
    let (public, key) = image_tools::keygen(&work.join("keys")).expect("keygen");
    let trusted = node.root.join("etc/upkeep/trusted-keys");
    std::fs::create_dir_all(&trusted).expect("mkdir");
    std::fs::copy(&public, trusted.join("fleet.pub")).expect("trust the key");
    Setup { _pki: pki, _dir: dir, work, hub, node, key }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cordon_drain_reimage_uncordon_then_refusals_and_an_unhealthy_image() {
    let s = setup().await;
    let (hub, node) = (&s.hub, &s.node);
    let good = publish(hub, &s.work, &s.key, "202302.01.0", &[]);
    let agent = TestAgent::start(node);
    let fleet = hub.fleet();
    wait_for("node-1 connected", Duration::from_secs(20), || async { fleet.is_connected("node-1").then_some(()) })
        .await;
    assert_eq!(reported_image(hub, "node-1").await, format!("{FAMILY}-202301.01.0"));

    let cmd = |id: &'static str, kind: v1::command::Kind, within: Duration| {
        let fleet = fleet.clone();
        async move { fleet.command("node-1", id, kind, within).await.expect("a result") }
    };
    let r = cmd("run1/cordon", v1::command::Kind::Cordon(v1::Cordon {}), Duration::from_secs(10)).await;
    assert!(r.ok, "{r:?}");
    assert!(node.root.join("var/lib/upkeep/cordoned").exists(), "cordon marker written");
    let r = cmd(
        "run1/drain",
        v1::command::Kind::Drain(v1::Drain { timeout_seconds: 30, force: false }),
        Duration::from_secs(10),
    )
    .await;
    assert!(r.ok, "{r:?}");
    let first = cmd("run1/reimage", reimage("202302.01.0", &good), REIMAGE_WITHIN).await;
    assert!(first.ok, "{first:?}");
    let r = cmd("run1/uncordon", v1::command::Kind::Uncordon(v1::Uncordon {}), Duration::from_secs(10)).await;
    assert!(r.ok, "{r:?}");
    assert!(!node.root.join("var/lib/upkeep/cordoned").exists(), "uncordon removes the marker");

    // The node reports what the booted image says about itself.
    let live = std::fs::read_to_string(node.root.join("etc/upkeep/node-image")).expect("live metadata");
    assert!(live.contains("VERSION=202302.01.0") && live.contains("built by upkeep"), "{live}");
    wait_for("node-1 reports the new image", Duration::from_secs(20), || async {
        (reported_image(hub, "node-1").await == format!("{FAMILY}-202302.01.0")).then_some(())
    })
    .await;

    // A repeat of the same operation id is answered with the first result, nothing redone.
    let slot_b = node.root.join("var/lib/upkeep/slots/b");
    let before_b = snapshot(&slot_b);
    let boot = std::fs::read_to_string(node.root.join("var/lib/upkeep/slots/boot.json")).expect("boot state");
    let again = cmd("run1/reimage", reimage("202302.01.0", &good), REIMAGE_WITHIN).await;
    assert_eq!(again, first, "the first result, including its time");
    assert_eq!(snapshot(&slot_b), before_b);
    assert_eq!(std::fs::read_to_string(node.root.join("var/lib/upkeep/slots/boot.json")).expect("boot"), boot);

    // Untrusted images: refused, the inactive slot (a) untouched.
    let slot_a = node.root.join("var/lib/upkeep/slots/a");
    let before_a = snapshot(&slot_a);
    assert!(!before_a.is_empty(), "slot a holds the original image's metadata");
    let file = s.work.join("202303.01.0.tar");
    image_tools::build_test_image(&file, FAMILY, "202303.01.0", &[]).expect("build");
    let sig = std::fs::read_to_string(image_tools::sign(&s.key, &file).expect("sign")).expect("sig");
    let mut bytes = std::fs::read(&file).expect("read");
    bytes[1600] ^= 0x01; // inside the metadata file's data block (after three 512-byte headers)
    let (flipped_sha, flipped_size) =
        Artifacts::new(&hub.state_dir.join("db")).put(&bytes[..], None).expect("store flipped");
    let flipped = Image { sha256: flipped_sha, size: flipped_size, signature: sig };
    let (_, other_key) = image_tools::keygen(&s.work.join("other-keys")).expect("other key");
    let unknown = publish(hub, &s.work.join("other-keys"), &other_key, "202303.01.0", &[]);
    let unsigned = Image { signature: String::new(), ..publish(hub, &s.work, &s.key, "202303.01.0", &[]) };
    let mut other_image = publish(hub, &s.work, &s.key, "202303.01.0", &[]);
    other_image.sha256 = good.sha256.clone(); // C's signature over the bytes of image B
    for (id, img, want) in [
        ("run2/flipped", &flipped, "bad signature"),
        ("run2/unknown", &unknown, "unknown key"),
        ("run2/unsigned", &unsigned, "missing signature"),
        ("run2/other-image", &other_image, "bad signature"),
    ] {
        let r = cmd(id, reimage("202303.01.0", img), REIMAGE_WITHIN).await;
        assert!(!r.ok && r.error.contains(want), "{id}: {r:?}");
        assert_eq!(snapshot(&slot_a), before_a, "{id}: nothing written to the inactive slot");
        assert!(!node.root.join("var/lib/upkeep/slots/a.incoming").exists(), "{id}");
    }
    let r = cmd("run2/downgrade", reimage("202301.01.0", &good), REIMAGE_WITHIN).await;
    assert!(!r.ok && r.error.contains("downgrade refused"), "{r:?}");

    // An image whose health check fails boots, fails, falls back to b by itself, and is not tried again.
    let sick = publish(hub, &s.work, &s.key, "202304.01.0", &[("etc/upkeep/fail-health", b"1")]);
    let r = cmd("run3/reimage", reimage("202304.01.0", &sick), REIMAGE_WITHIN).await;
    assert!(!r.ok, "{r:?}");
    assert!(r.error.contains("rolled back to slot b") && r.error.contains("image marked unhealthy"), "{r:?}");
    let live = std::fs::read_to_string(node.root.join("etc/upkeep/node-image")).expect("live metadata");
    assert!(live.contains("VERSION=202302.01.0"), "back on the previous image: {live}");
    let r = cmd("run4/reimage", reimage("202304.01.0", &sick), REIMAGE_WITHIN).await;
    assert!(!r.ok && r.error.contains("was rolled back on this node"), "{r:?}");
    wait_for("node-1 reports the previous image", Duration::from_secs(20), || async {
        (reported_image(hub, "node-1").await == format!("{FAMILY}-202302.01.0")).then_some(())
    })
    .await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reimage_survives_an_agent_restart_and_the_hub_asking_again() {
    let s = setup().await;
    let (hub, node) = (&s.hub, &s.node);
    let good = publish(hub, &s.work, &s.key, "202302.01.0", &[]);
    let agent = TestAgent::start(node);
    let fleet = hub.fleet();
    wait_for("node-1 connected", Duration::from_secs(20), || async { fleet.is_connected("node-1").then_some(()) })
        .await;
    let first = fleet.command("node-1", "op-x", reimage("202302.01.0", &good), REIMAGE_WITHIN).await.expect("result");
    assert!(first.ok, "{first:?}");
    agent.stop().await;
    let agent = TestAgent::start(node);
    wait_for("node-1 reconnected", Duration::from_secs(20), || async { fleet.is_connected("node-1").then_some(()) })
        .await;
    let again = fleet.command("node-1", "op-x", reimage("202302.01.0", &good), REIMAGE_WITHIN).await.expect("result");
    assert_eq!(again, first, "answered from the journal after a restart");
    let stale = fleet
        .command_at_generation("node-1", "op-old", 4, v1::command::Kind::Cordon(v1::Cordon {}), Duration::from_secs(10))
        .await
        .expect("result");
    assert!(!stale.ok && stale.error.contains("older than the newest seen"), "{stale:?}");
    agent.stop().await;
}

/// The agent's image staging directory.
fn staging(node: &TestNode) -> PathBuf {
    node.config.parent().expect("node dir").join("state/images")
}

/// What is left of images outside the slots: staged files and partial slot writes.
fn leftovers(node: &TestNode) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> =
        std::fs::read_dir(staging(node)).map(|rd| rd.map(|e| e.expect("entry").path()).collect()).unwrap_or_default();
    let slots = node.root.join("var/lib/upkeep/slots");
    if let Ok(rd) = std::fs::read_dir(&slots) {
        out.extend(rd.map(|e| e.expect("entry").path()).filter(|p| p.to_string_lossy().ends_with(".incoming")));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_staging_is_recovered_by_the_agent_and_nothing_is_left_behind() {
    let s = setup().await;
    let (hub, node) = (&s.hub, &s.node);
    let v2 = publish(hub, &s.work, &s.key, "202302.01.0", &[]);
    let v3 = publish(hub, &s.work, &s.key, "202303.01.0", &[]);
    // An agent that crashed mid-download and mid-slot-write, with an image no operation waits for any more.
    std::fs::create_dir_all(staging(node)).expect("mkdir");
    std::fs::write(staging(node).join(format!("{}.part", "d".repeat(64))), b"half of an old image").expect("w");
    let incoming = node.root.join("var/lib/upkeep/slots/b.incoming");
    std::fs::create_dir_all(incoming.join("etc")).expect("mkdir");
    std::fs::write(incoming.join("etc/half-written"), b"x").expect("w");
    let agent = TestAgent::start(node);
    let fleet = hub.fleet();
    wait_for("node-1 connected", Duration::from_secs(20), || async { fleet.is_connected("node-1").then_some(()) })
        .await;
    assert!(leftovers(node).is_empty(), "removed at start: {:?}", leftovers(node));

    // Garbage longer than the image where its download would resume; the command announces the size.
    std::fs::write(staging(node).join(format!("{}.part", v2.sha256)), vec![0xa5; v2.size as usize + 4096])
        .expect("garbage");
    let r = fleet.command("node-1", "stage/v2", reimage("202302.01.0", &v2), REIMAGE_WITHIN).await.expect("result");
    assert!(r.ok, "{r:?}");
    assert!(leftovers(node).is_empty(), "after success: {:?}", leftovers(node));

    // The same without a size in the command: the hub refuses the offset as past the end, the agent starts at 0.
    std::fs::write(staging(node).join(format!("{}.part", v3.sha256)), vec![0x5a; v3.size as usize + 4096])
        .expect("garbage");
    let no_size = Image { size: 0, ..v3 };
    let r =
        fleet.command("node-1", "stage/v3", reimage("202303.01.0", &no_size), REIMAGE_WITHIN).await.expect("result");
    assert!(r.ok, "{r:?}");
    assert!(leftovers(node).is_empty(), "after success: {:?}", leftovers(node));
    let live = std::fs::read_to_string(node.root.join("etc/upkeep/node-image")).expect("live metadata");
    assert!(live.contains("VERSION=202303.01.0"), "{live}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_image_leaves_no_staging_and_no_partial_slot_write() {
    let s = setup().await;
    let (hub, node) = (&s.hub, &s.node);
    // Signed by a trusted key and delivered intact, but not an image archive: the slot write fails half-way.
    let file = s.work.join("not-an-image");
    std::fs::write(&file, vec![0x5a; 8192]).expect("w");
    let signature = std::fs::read_to_string(image_tools::sign(&s.key, &file).expect("sign")).expect("sig");
    let (sha256, size) =
        Artifacts::new(&hub.state_dir.join("db")).put(std::fs::File::open(&file).expect("open"), None).expect("put");
    let junk = Image { sha256, size, signature };
    let sick = publish(hub, &s.work, &s.key, "202304.01.0", &[("etc/upkeep/fail-health", b"1")]);
    let agent = TestAgent::start(node);
    let fleet = hub.fleet();
    wait_for("node-1 connected", Duration::from_secs(20), || async { fleet.is_connected("node-1").then_some(()) })
        .await;
    let slot_b = snapshot(&node.root.join("var/lib/upkeep/slots/b"));

    let r = fleet.command("node-1", "fail/junk", reimage("202302.01.0", &junk), REIMAGE_WITHIN).await.expect("result");
    assert!(!r.ok && r.error.contains("writing slot b") && r.error.contains("unpacking tar"), "{r:?}");
    assert!(leftovers(node).is_empty(), "after a failed slot write: {:?}", leftovers(node));
    assert_eq!(snapshot(&node.root.join("var/lib/upkeep/slots/b")), slot_b, "slot b untouched");

    let r = fleet.command("node-1", "fail/sick", reimage("202304.01.0", &sick), REIMAGE_WITHIN).await.expect("result");
    assert!(!r.ok && r.error.contains("rolled back to slot a"), "{r:?}");
    assert!(leftovers(node).is_empty(), "after a roll back: {:?}", leftovers(node));
    agent.stop().await;
}

/// The privileged executor as its own process (`upkeep-agent executor`), serving the agent's node operations.
struct ExecutorProcess {
    child: std::process::Child,
}

impl ExecutorProcess {
    fn start(node: &TestNode, socket: &Path) -> ExecutorProcess {
        let child = std::process::Command::new(upkeep_tests::bin("upkeep-agent"))
            .arg("--config")
            .arg(&node.config)
            .arg("executor")
            .spawn()
            .expect("spawn the executor");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            assert!(std::time::Instant::now() < deadline, "the executor did not listen on {}", socket.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        ExecutorProcess { child }
    }

    fn kill(mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_executor_every_node_operation_goes_through_it_and_its_loss_fails_only_the_operation() {
    let s = setup().await;
    let (hub, node) = (&s.hub, &s.node);
    let socket = node.config.parent().expect("node dir").join("executor.sock");
    let mut cfg = std::fs::read_to_string(&node.config).expect("agent.toml");
    cfg.push_str(&format!("[executor]\nsocket = {socket:?}\nclient_user = \"{}\"\n", nix::unistd::getuid()));
    std::fs::write(&node.config, cfg).expect("write agent.toml");
    let good = publish(hub, &s.work, &s.key, "202302.01.0", &[]);
    let executor = ExecutorProcess::start(node, &socket);
    let agent = TestAgent::start(node);
    let fleet = hub.fleet();
    wait_for("node-1 connected", Duration::from_secs(20), || async { fleet.is_connected("node-1").then_some(()) })
        .await;
    // Its facts came through the executor.
    assert_eq!(reported_image(hub, "node-1").await, format!("{FAMILY}-202301.01.0"));
    let cmd = |id: &'static str, kind: v1::command::Kind| {
        let fleet = fleet.clone();
        async move { fleet.command("node-1", id, kind, REIMAGE_WITHIN).await.expect("a result") }
    };
    let r = cmd("x/cordon", v1::command::Kind::Cordon(v1::Cordon {})).await;
    assert!(r.ok && node.root.join("var/lib/upkeep/cordoned").exists(), "{r:?}");
    let r = cmd("x/reimage", reimage("202302.01.0", &good)).await;
    assert!(r.ok, "{r:?}");
    let live = std::fs::read_to_string(node.root.join("etc/upkeep/node-image")).expect("live metadata");
    assert!(live.contains("VERSION=202302.01.0"), "the executor wrote and booted the slot: {live}");

    // Without its executor the agent stays connected; an operation fails and says what is missing.
    executor.kill();
    let r = cmd("x/uncordon", v1::command::Kind::Uncordon(v1::Uncordon {})).await;
    assert!(!r.ok && r.error.contains("is upkeep-agent-executor running?"), "{r:?}");
    assert!(node.root.join("var/lib/upkeep/cordoned").exists(), "nothing was done");
    assert!(fleet.is_connected("node-1"));
    // Back, it serves the same agent (no restart): the hub's next attempt (a new id) goes through.
    let executor = ExecutorProcess::start(node, &socket);
    let r = cmd("x/uncordon-2", v1::command::Kind::Uncordon(v1::Uncordon {})).await;
    assert!(r.ok && !node.root.join("var/lib/upkeep/cordoned").exists(), "{r:?}");
    wait_for("node-1 reports the new image", Duration::from_secs(20), || async {
        (reported_image(hub, "node-1").await == format!("{FAMILY}-202302.01.0")).then_some(())
    })
    .await;
    agent.stop().await;
    executor.kill();
}
