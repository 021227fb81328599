//! System test of the Kubernetes version operation against real apt (see TEST-INFRA.md), through the agent's own
//! code (`HostOs` with `[kubernetes]` settings, the operation `Engine`), in a real Debian bookworm root (the cached
//! root of `scripts/system-rootfs`) used as a chroot.
//!
//! No Kubernetes packages can be fetched here, so the repository holds STAND-INS: `upkeep-standin-kubeadm` and
//! `upkeep-standin-kubelet`, empty packages versioned like the real ones (`1.29.1-1.1`, `1.29.3-1.1`, plus a decoy
//! `1.29.30-1.1` that must not be taken for 1.29.3), and the upgrade hook is a STAND-IN script that records its
//! argv instead of running kubeadm. The test installs 1.29.1, holds the packages as kubeadm installs are set up,
//! upgrades to 1.29.3 and checks versions, holds, hook calls, idempotency and the error for a version the
//! repository lacks.
//!
//! Missing prerequisites fail the test, naming what installs them (scripts/deps).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use upkeep_agent::config::KubernetesSettings;
use upkeep_agent::engine::{Engine, Fetcher, Link, Submitted};
use upkeep_agent::os::NodeOs;
use upkeep_agent::os::host::HostOs;
use upkeep_proto::v1;
use upkeep_tests::debs::{build_deb, chroot, installed, require_root_and, sh};
use upkeep_tests::system::{rootfs_tarball, run_ok};

const KUBEADM: &str = "upkeep-standin-kubeadm";
const KUBELET: &str = "upkeep-standin-kubelet";

struct NoFetch;
impl Fetcher for NoFetch {
    fn open(
        &self,
        _: &str,
        _: u64,
    ) -> futures_like::BoxFuture<'_, Result<futures_like::BoxStream<'static, Result<v1::ImageChunk, String>>, String>>
    {
        Box::pin(async { Err("no downloads in this test".to_string()) })
    }
}

struct NoLink;
impl Link for NoLink {
    fn epoch(&self) -> u64 {
        0
    }
    fn restart_session(&self) {}
    fn wait_epoch_above(&self, _: u64, _: Duration) -> futures_like::BoxFuture<'_, bool> {
        Box::pin(async { false })
    }
}

/// The futures types the engine's traits use, without a direct dependency on `futures` here.
mod futures_like {
    pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
    pub type BoxStream<'a, T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = T> + Send + 'a>>;
}

/// Orders `version` through the agent's engine over `os`, as the hub would.
async fn upgrade(os: HostOs, state: &Path, id: &str, version: &str, first_control_plane: bool) -> v1::OperationResult {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let engine = Engine::new(Arc::new(os), state, Arc::new(NoFetch), Arc::new(NoLink), tx, Duration::from_secs(1))
        .expect("engine");
    let c = v1::Command {
        operation_id: id.into(),
        generation: 1,
        kind: Some(v1::command::Kind::UpgradeKubernetes(v1::UpgradeKubernetes {
            version: version.into(),
            first_control_plane,
        })),
    };
    match engine.submit(&c) {
        Submitted::Finished(r) => r,
        Submitted::Running => tokio::time::timeout(Duration::from_secs(600), rx.recv())
            .await
            .expect("the upgrade finishes within 10 minutes")
            .expect("result"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_packages_install_and_upgrade_with_apt_and_the_hook_runs() {
    require_root_and(&[
        ("chroot", "coreutils"),
        ("tar", "tar"),
        ("zstd", "zstd"),
        ("debootstrap", "debootstrap"),
        ("dpkg-deb", "dpkg"),
        ("dpkg-scanpackages", "dpkg-dev"),
    ]);
    let tarball = rootfs_tarball();
    // Not /tmp: that may be a small tmpfs, and the root is ~350 MB unpacked.
    std::fs::create_dir_all("/var/tmp/upkeep-system").expect("mkdir /var/tmp/upkeep-system");
    let tmp = tempfile::Builder::new().prefix("kubernetes-").tempdir_in("/var/tmp/upkeep-system").expect("tempdir");
    let root = tmp.path().join("root");
    std::fs::create_dir_all(&root).expect("mkdir");
    run_ok(Command::new("tar").arg("--zstd").arg("-xf").arg(&tarball).arg("-C").arg(&root));

    // A flat repository of the stand-ins inside the root; no Debian mirror (offline).
    let repo = root.join("srv/k8s");
    std::fs::create_dir_all(&repo).expect("mkdir");
    for v in ["1.29.1-1.1", "1.29.3-1.1", "1.29.30-1.1"] {
        build_deb(&repo, KUBEADM, v, "upkeep system-test stand-in for a Kubernetes package (contains nothing)", false);
        build_deb(&repo, KUBELET, v, "upkeep system-test stand-in for a Kubernetes package (contains nothing)", false);
    }
    sh(&format!("cd {}; dpkg-scanpackages -m . > Packages 2>/dev/null", repo.display()));
    let _ = std::fs::remove_file(root.join("etc/apt/sources.list"));
    std::fs::write(root.join("etc/apt/sources.list.d/upkeep-k8s.list"), "deb [trusted=yes] file:/srv/k8s ./\n")
        .expect("sources");

    // The stand-in upgrade hook records its argv and the version the agent exports.
    let log = tmp.path().join("hook.log");
    let hook = tmp.path().join("standin-kubeadm-upgrade");
    std::fs::write(&hook, format!("#!/bin/sh\necho \"$* ($UPKEEP_KUBERNETES_VERSION)\" >> {}\n", log.display()))
        .expect("hook");
    run_ok(Command::new("chmod").arg("755").arg(&hook));
    let hook_calls =
        || std::fs::read_to_string(&log).unwrap_or_default().lines().map(str::to_string).collect::<Vec<_>>();
    let settings = KubernetesSettings {
        packages: vec![KUBEADM.into(), KUBELET.into()],
        upgrade_first_control_plane: vec![
            hook.display().to_string(),
            "upgrade".into(),
            "apply".into(),
            "-y".into(),
            "{version}".into(),
        ],
        upgrade_other: vec![hook.display().to_string(), "upgrade".into(), "node".into()],
        ..KubernetesSettings::defaults()
    };
    let state = tmp.path().join("state");
    let os = || HostOs::new(&root).with_kubernetes(settings.clone(), &state);
    assert_eq!(os().kubernetes_version().expect("read"), None, "nothing installed yet");

    // Install 1.29.1 on the first control-plane node.
    let r = upgrade(os(), &state, "k8s-1", "1.29.1", true).await;
    assert!(r.ok, "{r:?}");
    assert_eq!((installed(&root, KUBEADM), installed(&root, KUBELET)), ("1.29.1-1.1".into(), "1.29.1-1.1".into()));
    assert_eq!(hook_calls(), ["upgrade apply -y 1.29.1 (1.29.1)"]);
    assert_eq!(os().facts().expect("facts").kubernetes_version, "1.29.1");

    // Held, as kubeadm installations are: the upgrade changes them anyway and keeps the hold.
    chroot(&root, &["apt-mark", "hold", KUBEADM, KUBELET]);
    let r = upgrade(os(), &state, "k8s-2", "v1.29.3", false).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(
        (installed(&root, KUBEADM), installed(&root, KUBELET)),
        ("1.29.3-1.1".into(), "1.29.3-1.1".into()),
        "1.29.3's own candidate, not the newer 1.29.30"
    );
    let holds = chroot(&root, &["apt-mark", "showhold"]);
    assert_eq!(holds.lines().collect::<Vec<_>>(), [KUBEADM, KUBELET], "holds kept");
    assert_eq!(hook_calls(), ["upgrade apply -y 1.29.1 (1.29.1)", "upgrade node (1.29.3)"]);
    assert_eq!(os().facts().expect("facts").kubernetes_version, "1.29.3", "reported from dpkg");

    // The same version again: already there, nothing run.
    let r = upgrade(os(), &state, "k8s-3", "1.29.3", false).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(hook_calls().len(), 2);

    // A version the repository does not have fails naming the package and what is offered; nothing changes.
    let r = upgrade(os(), &state, "k8s-4", "1.29.4", false).await;
    assert!(
        !r.ok
            && r.error.contains("installing the Kubernetes 1.29.4 packages")
            && r.error
                .contains(&format!("{KUBEADM} has no version 1.29.4 (offered: 1.29.30-1.1, 1.29.3-1.1, 1.29.1-1.1)")),
        "{r:?}"
    );
    assert_eq!(installed(&root, KUBEADM), "1.29.3-1.1");
    assert_eq!(hook_calls().len(), 2, "no hook after a failed install");
}
