//! Engine tests of the Kubernetes version operation over `FakeOs`: install then hook, idempotency, refusals
//! (format, downgrade, skipped minor, no `[kubernetes]`, unknown OS), a failed hook that a retry does not skip,
//! a version that does not arrive, and a restart at each journalled step.

use super::transition::KUBERNETES_PENDING_FILE;
use super::*;
use crate::journal::{Entry, Journal};
use crate::os::OsFacts;
use crate::os::fake::FakeOs;

struct NoFetch;

impl Fetcher for NoFetch {
    fn open(
        &self,
        _sha256: &str,
        _offset: u64,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<v1::ImageChunk, String>>, String>> {
        Box::pin(async { Err("no downloads in Kubernetes tests".to_string()) })
    }
}

struct NoLink;

impl Link for NoLink {
    fn epoch(&self) -> u64 {
        1
    }
    fn restart_session(&self) {}
    fn wait_epoch_above(&self, _above: u64, _within: Duration) -> BoxFuture<'_, bool> {
        Box::pin(async { true })
    }
}

struct Node {
    dir: tempfile::TempDir,
    os: Arc<FakeOs>,
}

impl Node {
    /// A Debian node running Kubernetes `running` (empty: none installed).
    fn new(running: &str) -> Node {
        let os = Arc::new(FakeOs::new(OsFacts { kubernetes_version: running.into(), ..Default::default() }));
        os.with(|s| s.os_release = crate::os::parse_env_file("ID=debian\nVERSION_ID=12\n"));
        Node { dir: tempfile::tempdir().expect("tempdir"), os }
    }

    fn engine(&self) -> (Arc<Engine>, mpsc::UnboundedReceiver<v1::OperationResult>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let e = Engine::new(
            self.os.clone(),
            self.dir.path(),
            Arc::new(NoFetch),
            Arc::new(NoLink),
            tx,
            Duration::from_secs(1),
        )
        .expect("engine");
        (e, rx)
    }

    fn calls(&self) -> Vec<String> {
        self.os.with(|s| s.calls.clone())
    }

    fn running(&self) -> String {
        self.os.with(|s| s.facts.kubernetes_version.clone())
    }

    fn pending(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.path().join(KUBERNETES_PENDING_FILE)).ok().map(|s| s.trim().to_string())
    }
}

fn order(id: &str, generation: u64, version: &str, first_control_plane: bool) -> v1::Command {
    v1::Command {
        operation_id: id.into(),
        generation,
        kind: Some(v1::command::Kind::UpgradeKubernetes(v1::UpgradeKubernetes {
            version: version.into(),
            first_control_plane,
        })),
    }
}

async fn result_of(rx: &mut mpsc::UnboundedReceiver<v1::OperationResult>) -> v1::OperationResult {
    tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("a result within 10 s").expect("channel open")
}

async fn run(n: &Node, c: &v1::Command) -> v1::OperationResult {
    let (e, mut rx) = n.engine();
    match e.submit(c) {
        Submitted::Finished(r) => r,
        Submitted::Running => result_of(&mut rx).await,
    }
}

#[tokio::test]
async fn upgrade_installs_the_packages_then_runs_the_first_control_plane_hook_once() {
    let n = Node::new("1.29.1");
    let c = order("k-1", 1, "v1.29.3", true);
    let r = run(&n, &c).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(n.calls(), ["install-kubernetes debian 1.29.3", "kubernetes-hook first-control-plane 1.29.3"]);
    assert_eq!(n.running(), "1.29.3");
    assert_eq!(n.os.with(|s| s.packages.get("kubelet").cloned()).as_deref(), Some("1.29.3"));
    let (e, _rx) = n.engine();
    let entry = e.entry("k-1").expect("journalled");
    assert_eq!(entry.op, Op::UpgradeKubernetes { version: "1.29.3".into(), first_control_plane: true }, "normalised");
    assert_eq!(entry.step, Step::Done);
    assert_eq!(n.pending(), None, "the pending mark is cleared once the hook ran");
    // A repeat is answered from the journal; a new order for the same version finds the node already there.
    assert_eq!(run(&n, &c).await, r);
    let again = run(&n, &order("k-2", 2, "1.29.3", true)).await;
    assert!(again.ok, "{again:?}");
    assert_eq!(n.calls().len(), 2, "nothing redone: {:?}", n.calls());
}

#[tokio::test]
async fn other_nodes_run_the_other_hook_and_a_fresh_node_installs() {
    let n = Node::new("");
    let r = run(&n, &order("k-1", 1, "1.29.1", false)).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(n.calls(), ["install-kubernetes debian 1.29.1", "kubernetes-hook other 1.29.1"]);
}

#[tokio::test]
async fn a_malformed_version_is_refused_before_it_is_journalled() {
    let n = Node::new("1.29.1");
    for (i, bad) in ["1.29", "latest", ""].into_iter().enumerate() {
        let id = format!("bad-{i}");
        let r = run(&n, &order(&id, 1, bad, false)).await;
        assert!(
            !r.ok && r.error.starts_with("upgrade_kubernetes.version: ") && r.error.contains("MAJOR.MINOR.PATCH"),
            "{bad:?}: {r:?}"
        );
        assert_eq!(n.engine().0.entry(&id), None, "a refusal is not journalled");
    }
    assert!(n.calls().is_empty());
}

#[tokio::test]
async fn downgrades_and_skipped_minor_versions_are_refused() {
    let n = Node::new("1.29.3");
    let r = run(&n, &order("k-1", 1, "1.29.1", true)).await;
    assert!(
        !r.ok && r.error.contains("downgrade refused: the node runs Kubernetes 1.29.3 and 1.29.1 is older"),
        "{r:?}"
    );
    let r = run(&n, &order("k-2", 2, "1.31.0", true)).await;
    assert!(
        !r.ok && r.error.contains("1.29.3 -> 1.31.0 refused") && r.error.contains("upgrade to 1.30.x first"),
        "{r:?}"
    );
    assert!(n.calls().is_empty(), "nothing installed: {:?}", n.calls());
    let r = run(&n, &order("k-3", 3, "1.30.2", true)).await;
    assert!(r.ok, "the next minor version is fine: {r:?}");
}

#[tokio::test]
async fn refused_without_kubernetes_settings_or_a_package_manager() {
    let n = Node::new("1.29.1");
    n.os.with(|s| s.kubernetes_unconfigured = Some("this node has no [kubernetes] section in agent.toml".into()));
    let r = run(&n, &order("k-1", 1, "1.29.3", false)).await;
    assert!(
        !r.ok && r.error == "Kubernetes 1.29.3 refused: this node has no [kubernetes] section in agent.toml",
        "{r:?}"
    );
    let n = Node::new("1.29.1");
    n.os.with(|s| s.os_release = crate::os::parse_env_file("ID=windows\n"));
    let r = run(&n, &order("k-1", 1, "1.29.3", false)).await;
    assert!(!r.ok && r.error.contains("no package manager known for os-release ID \"windows\""), "{r:?}");
    assert!(n.calls().is_empty());
}

#[tokio::test]
async fn a_failed_hook_is_not_mistaken_for_a_finished_upgrade() {
    let n = Node::new("1.29.1");
    n.os.with(|s| s.kubernetes_hook_fails = Some("couldn't upgrade control plane: etcd unhealthy".into()));
    let r = run(&n, &order("k-1", 1, "1.29.3", true)).await;
    assert!(
        !r.ok
            && r.error.contains("packages installed but the upgrade hook failed")
            && r.error.contains("etcd unhealthy"),
        "{r:?}"
    );
    assert_eq!(n.running(), "1.29.3", "the packages are in");
    assert_eq!(n.pending().as_deref(), Some("1.29.3"));
    // The retry (a new operation id) finds the packages at the version but the upgrade unfinished: it runs again.
    n.os.with(|s| s.kubernetes_hook_fails = None);
    let r = run(&n, &order("k-2", 2, "1.29.3", true)).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(
        n.calls(),
        [
            "install-kubernetes debian 1.29.3",
            "kubernetes-hook first-control-plane 1.29.3",
            "install-kubernetes debian 1.29.3",
            "kubernetes-hook first-control-plane 1.29.3"
        ]
    );
    assert_eq!(n.pending(), None);
}

#[tokio::test]
async fn install_failure_and_a_version_that_does_not_arrive_fail_the_operation() {
    let n = Node::new("1.29.1");
    n.os.with(|s| s.install_fails = Some("E: Version '1.29.3-1.1' for 'kubeadm' was not found".into()));
    let r = run(&n, &order("k-1", 1, "1.29.3", false)).await;
    assert!(
        !r.ok && r.error.contains("installing the Kubernetes 1.29.3 packages") && r.error.contains("not found"),
        "{r:?}"
    );
    assert_eq!(n.calls(), ["install-kubernetes debian 1.29.3"], "no hook after a failed install");
    let n = Node::new("1.29.1");
    n.os.with(|s| s.kubernetes_version_stuck = true);
    let r = run(&n, &order("k-1", 1, "1.29.3", false)).await;
    assert!(!r.ok && r.error == "after the upgrade hook the node reports Kubernetes 1.29.1, expected 1.29.3", "{r:?}");
}

/// A crash after each step was journalled (its effect done or not): the restarted engine carries on from the
/// journalled step, and repeating a step that had already happened does no harm.
#[tokio::test]
async fn a_restart_resumes_from_the_journalled_step() {
    for (step, effect_done, want) in [
        (Step::Act, false, vec!["install-kubernetes debian 1.29.3", "kubernetes-hook other 1.29.3"]),
        (Step::Act, true, vec!["install-kubernetes debian 1.29.3", "kubernetes-hook other 1.29.3"]),
        (Step::Hook, true, vec!["kubernetes-hook other 1.29.3"]),
    ] {
        let n = Node::new(if effect_done { "1.29.3" } else { "1.29.1" });
        std::fs::write(n.dir.path().join(KUBERNETES_PENDING_FILE), "1.29.3\n").expect("pending mark");
        let mut entry =
            Entry::accepted("k-1", 1, Op::UpgradeKubernetes { version: "1.29.3".into(), first_control_plane: false });
        entry.step = step;
        Journal::open(n.dir.path()).expect("journal").put(entry).expect("put");
        let (e, mut rx) = n.engine();
        e.resume();
        let r = result_of(&mut rx).await;
        assert!(r.ok, "{step:?}: {r:?}");
        assert_eq!(n.calls(), want, "{step:?} effect_done={effect_done}");
        assert_eq!(e.entry("k-1").expect("entry").step, Step::Done);
    }
}
