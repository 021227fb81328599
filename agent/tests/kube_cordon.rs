//! Cordon, uncordon, drain and node labels through the agent's Kubernetes API client (`os::kube`, wired into
//! `HostOs` by `[kubernetes] api_server`), against `FakeKubeApiServer`: a FAKE, scripted API server written for
//! these tests (no kube-apiserver can be installed on the test machines). It speaks real HTTPS with a
//! certificate from a CA generated in the test and answers the handful of requests the agent makes from an
//! in-memory Node, Pods and PodDisruptionBudgets; evictions it is told to block are answered HTTP 429 as the
//! real API server does when a disruption budget allows no disruption.

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use upkeep_agent::config::{KubeApiSettings, KubeCredentials, KubernetesSettings};
use upkeep_agent::os::NodeOs;
use upkeep_agent::os::host::HostOs;
use upkeep_agent::os::kube::{CORDON_MEMORY_FILE, KubeNode, NODE_IMAGE_LABEL, SECURITY_PATCH_LABEL};

const NODE: &str = "node-1";
const TOKEN: &str = "s3cr3t-token";

/// A CA generated for one test.
struct TestCa {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("CA certificate");
        TestCa { pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// A leaf certificate for 127.0.0.1 / localhost (server) or `cn` (client): (cert PEM, key PEM).
    fn leaf(&self, cn: &str) -> (String, String) {
        let key = KeyPair::generate().expect("leaf key");
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        (cert.pem(), key.serialize_pem())
    }
}

/// What the fake API server holds and what it saw.
#[derive(Default)]
struct FakeCluster {
    node: Value,
    pods: Vec<Value>,
    pdbs: Vec<Value>,
    /// `namespace/name` of pods whose eviction is answered 429 (a disruption budget blocks it).
    blocked: BTreeSet<String>,
    /// Evicted pods that stay listed for this many more pod lists (still terminating).
    linger: BTreeMap<String, u32>,
    /// Pods being deleted: `namespace/name` -> lists left before they are gone.
    terminating: BTreeMap<String, u32>,
    /// Required bearer token (None: client certificates are checked by TLS instead).
    token: Option<String>,
    /// Every request, as `METHOD path?query`.
    requests: Vec<String>,
    /// Bodies of the PATCHes of the Node.
    node_patches: Vec<Value>,
}

fn key_of(pod: &Value) -> String {
    format!(
        "{}/{}",
        pod.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or(""),
        pod.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("")
    )
}

/// RFC 7386 JSON merge patch, as the API server applies `application/merge-patch+json`.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().expect("made an object above");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Percent-decoding of a query value.
fn decode(s: &str) -> String {
    let mut out = Vec::new();
    let mut rest = s.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        let hex = tail.get(..2).and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b, hex) {
            (b'%', Some(v)) => {
                out.push(v);
                rest = &tail[2..];
            }
            _ => {
                out.push(b);
                rest = tail;
            }
        }
    }
    String::from_utf8(out).expect("utf-8 query")
}

fn status(code: u16, message: &str) -> (u16, Value) {
    (code, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "code": code}))
}

impl FakeCluster {
    /// Answers one request (after authentication).
    fn answer(&mut self, method: &str, path: &str, query: &str, content_type: &str, body: &[u8]) -> (u16, Value) {
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (method, parts.as_slice()) {
            ("GET", ["api", "v1", "nodes", name]) if *name == NODE => (200, self.node.clone()),
            ("PATCH", ["api", "v1", "nodes", name]) if *name == NODE => {
                if content_type != "application/merge-patch+json" {
                    return status(415, "unsupported patch type");
                }
                let patch: Value = serde_json::from_slice(body).expect("patch is JSON");
                merge_patch(&mut self.node, &patch);
                self.node_patches.push(patch);
                (200, self.node.clone())
            }
            ("GET", ["api", "v1", "nodes", name]) | ("PATCH", ["api", "v1", "nodes", name]) => {
                status(404, &format!("nodes \"{name}\" not found"))
            }
            ("GET", ["api", "v1", "pods"]) => {
                let selector = query.strip_prefix("fieldSelector=").map(decode).unwrap_or_default();
                let node = selector.strip_prefix("spec.nodeName=").expect("the agent lists pods by node");
                // Terminating pods get one list closer to gone.
                for left in self.terminating.values_mut() {
                    *left = left.saturating_sub(1);
                }
                let gone: Vec<String> =
                    self.terminating.iter().filter(|(_, l)| **l == 0).map(|(k, _)| k.clone()).collect();
                self.pods.retain(|p| !gone.contains(&key_of(p)));
                let items: Vec<Value> = self
                    .pods
                    .iter()
                    .filter(|p| p.pointer("/spec/nodeName").and_then(Value::as_str) == Some(node))
                    .cloned()
                    .collect();
                (200, json!({"kind": "PodList", "apiVersion": "v1", "items": items}))
            }
            ("POST", ["api", "v1", "namespaces", ns, "pods", name, "eviction"]) => {
                let ev: Value = serde_json::from_slice(body).expect("eviction is JSON");
                assert_eq!(ev["kind"], "Eviction");
                assert_eq!(ev["apiVersion"], "policy/v1");
                assert_eq!(
                    (ev["metadata"]["namespace"].as_str(), ev["metadata"]["name"].as_str()),
                    (Some(*ns), Some(*name))
                );
                let key = format!("{ns}/{name}");
                if !self.pods.iter().any(|p| key_of(p) == key) {
                    return status(404, &format!("pods \"{name}\" not found"));
                }
                if self.blocked.contains(&key) {
                    return status(429, "Cannot evict pod as it would violate the pod's disruption budget.");
                }
                match self.linger.get(&key) {
                    Some(n) => {
                        self.terminating.insert(key, *n);
                    }
                    None => self.pods.retain(|p| key_of(p) != key),
                }
                (201, json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}))
            }
            ("GET", ["apis", "policy", "v1", "namespaces", ns, "poddisruptionbudgets"]) => {
                let items: Vec<Value> = self
                    .pdbs
                    .iter()
                    .filter(|p| p.pointer("/metadata/namespace").and_then(Value::as_str) == Some(*ns))
                    .cloned()
                    .collect();
                (200, json!({"kind": "PodDisruptionBudgetList", "apiVersion": "policy/v1", "items": items}))
            }
            _ => status(404, "the fake API server does not serve this"),
        }
    }
}

/// A FAKE Kubernetes API server (not a real kube-apiserver): scripted HTTPS on 127.0.0.1 with a certificate of a
/// test CA, serving one Node, its Pods and PodDisruptionBudgets from a `FakeCluster`, on a thread of its own.
struct FakeKubeApiServer {
    url: String,
    cluster: Arc<Mutex<FakeCluster>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeKubeApiServer {
    /// Serves `cluster` with a server certificate from `ca`; with `client_ca`, only clients with a certificate
    /// from it get through the handshake.
    fn start(cluster: FakeCluster, ca: &TestCa, client_ca: Option<&TestCa>) -> FakeKubeApiServer {
        let (cert, key) = ca.leaf("fake-kube-apiserver");
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<_, _>>().expect("server chain");
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("server key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("protocol versions");
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(c) => {
                let mut roots = rustls::RootCertStore::empty();
                for der in CertificateDer::pem_slice_iter(c.pem.as_bytes()) {
                    roots.add(der.expect("client CA")).expect("add client CA");
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .expect("client verifier");
                builder.with_client_cert_verifier(verifier)
            }
        };
        let tls = Arc::new(builder.with_single_cert(chain, key).expect("server config"));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener.set_nonblocking(true).expect("nonblocking");
        let url = format!("https://127.0.0.1:{}", listener.local_addr().expect("addr").port());
        let cluster = Arc::new(Mutex::new(cluster));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let shared = cluster.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(serve(listener, tls, shared, stopped));
        });
        FakeKubeApiServer { url, cluster, stop: Some(stop), thread: Some(thread) }
    }

    fn with<T>(&self, f: impl FnOnce(&mut FakeCluster) -> T) -> T {
        f(&mut self.cluster.lock().expect("cluster lock"))
    }
}

impl Drop for FakeKubeApiServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    cluster: Arc<Mutex<FakeCluster>>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let tcp = tokio::select! {
            _ = &mut stopped => return,
            a = listener.accept() => match a { Ok((tcp, _)) => tcp, Err(_) => continue },
        };
        let acceptor = acceptor.clone();
        let cluster = cluster.clone();
        tokio::spawn(async move {
            // A client that refuses our certificate (or has none we accept) ends here.
            let Ok(stream) = acceptor.accept(tcp).await else { return };
            let service = hyper::service::service_fn(move |req| handle(cluster.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

async fn handle(
    cluster: Arc<Mutex<FakeCluster>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let (auth, content_type) = (header("authorization"), header("content-type"));
    let body = req.into_body().collect().await?.to_bytes();
    let (code, value) = {
        let mut c = cluster.lock().expect("cluster lock");
        c.requests.push(if query.is_empty() { format!("{method} {path}") } else { format!("{method} {path}?{query}") });
        match &c.token {
            Some(t) if auth != format!("Bearer {t}") => status(401, "Unauthorized"),
            _ => c.answer(&method, &path, &query, &content_type, &body),
        }
    };
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())));
    *resp.status_mut() = StatusCode::from_u16(code).expect("status code");
    resp.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    Ok(resp)
}

fn node(unschedulable: Option<bool>) -> Value {
    let mut n = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}},
        "spec": {},
    });
    if let Some(u) = unschedulable {
        n["spec"]["unschedulable"] = json!(u);
    }
    n
}

fn pod(ns: &str, name: &str, node: &str, app: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "uid": format!("uid-{ns}-{name}"), "labels": {"app": app},
                     "ownerReferences": [{"kind": "ReplicaSet", "name": format!("{app}-rs"), "controller": true}]},
        "spec": {"nodeName": node},
        "status": {"phase": "Running"},
    })
}

fn pdb(ns: &str, name: &str, app: &str) -> Value {
    json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
           "metadata": {"namespace": ns, "name": name},
           "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": app}}}})
}

/// Files for the agent's side: the CA it trusts and its token.
struct Agent {
    dir: tempfile::TempDir,
}

impl Agent {
    fn new(ca: &TestCa) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("ca.pem"), &ca.pem).expect("ca");
        std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).expect("token");
        std::fs::create_dir_all(dir.path().join("state")).expect("state");
        Agent { dir }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn settings(&self, server: &FakeKubeApiServer) -> KubeApiSettings {
        let (host, port) = upkeep_agent::os::kube::parse_api_server(&server.url).expect("url");
        KubeApiSettings {
            api_server: server.url.clone(),
            host,
            port,
            ca_file: self.dir.path().join("ca.pem"),
            credentials: KubeCredentials::Token(self.dir.path().join("token")),
            node_name: NODE.into(),
            drain_timeout: Duration::from_secs(10),
            eviction_retry: Duration::from_millis(50),
        }
    }

    /// The real `HostOs` with `[kubernetes] api_server` pointing at `server`.
    fn host(&self, server: &FakeKubeApiServer) -> HostOs {
        let k = KubernetesSettings { api: Some(self.settings(server)), ..KubernetesSettings::defaults() };
        HostOs::new(self.dir.path()).with_kubernetes(k, &self.state())
    }
}

fn unschedulable(server: &FakeKubeApiServer) -> Option<bool> {
    server.with(|c| c.node.pointer("/spec/unschedulable").and_then(Value::as_bool))
}

fn token_cluster(n: Value) -> FakeCluster {
    FakeCluster { node: n, token: Some(TOKEN.into()), ..Default::default() }
}

#[test]
fn cordon_sets_unschedulable_and_uncordon_restores_it() {
    let ca = TestCa::new("fake kube CA");
    let server = FakeKubeApiServer::start(token_cluster(node(None)), &ca, None);
    let agent = Agent::new(&ca);
    let os = agent.host(&server);
    os.cordon().expect("cordon");
    assert_eq!(unschedulable(&server), Some(true));
    let memory = std::fs::read_to_string(agent.state().join(CORDON_MEMORY_FILE)).expect("memory persisted");
    assert!(memory.contains("\"was_unschedulable\": false"), "{memory}");
    // A repeated cordon (an operation resumed after a crash) does not take our own cordon for the operator's.
    os.cordon().expect("cordon again");
    os.uncordon().expect("uncordon");
    assert_eq!(unschedulable(&server), Some(false));
    assert!(!agent.state().join(CORDON_MEMORY_FILE).exists(), "memory forgotten after uncordon");
    let patches = server.with(|c| c.node_patches.clone());
    assert_eq!(
        patches,
        [
            json!({"spec": {"unschedulable": true}}),
            json!({"spec": {"unschedulable": true}}),
            json!({"spec": {"unschedulable": false}})
        ]
    );
    assert_eq!(server.with(|c| c.requests.iter().filter(|r| r.starts_with("GET /api/v1/nodes/")).count()), 1);
}

#[test]
fn a_node_cordoned_before_upkeep_stays_cordoned_and_no_memory_means_schedulable() {
    let ca = TestCa::new("fake kube CA");
    let server = FakeKubeApiServer::start(token_cluster(node(Some(true))), &ca, None);
    let agent = Agent::new(&ca);
    let os = agent.host(&server);
    os.cordon().expect("cordon");
    os.uncordon().expect("uncordon");
    assert_eq!(unschedulable(&server), Some(true), "the operator's cordon is left in place");
    assert_eq!(server.with(|c| c.node_patches.clone()), [json!({"spec": {"unschedulable": true}})], "never set false");
    // Without memory (cordoned by someone else, or the memory lost), uncordon makes the node schedulable.
    os.uncordon().expect("uncordon without memory");
    assert_eq!(unschedulable(&server), Some(false));
}

#[test]
fn drain_evicts_normal_pods_skips_daemonset_mirror_and_finished_pods_and_waits_for_them() {
    let ca = TestCa::new("fake kube CA");
    let mut ds = pod("kube-system", "fluentd-abcde", NODE, "fluentd");
    ds["metadata"]["ownerReferences"] = json!([{"kind": "DaemonSet", "name": "fluentd", "controller": true}]);
    let mut mirror = pod("kube-system", "kube-apiserver-node-1", NODE, "apiserver");
    mirror["metadata"]["annotations"] = json!({"kubernetes.io/config.mirror": "0123"});
    let mut done = pod("batch", "report-1", NODE, "report");
    done["status"]["phase"] = json!("Succeeded");
    let mut cluster = token_cluster(node(None));
    cluster.pods = vec![
        pod("shop", "web-1", NODE, "web"),
        pod("shop", "db-0", NODE, "db"),
        ds,
        mirror,
        done,
        pod("shop", "web-2", "node-2", "web"),
    ];
    // web-1 takes three more pod lists to terminate: drain must wait for it.
    cluster.linger.insert("shop/web-1".into(), 3);
    let server = FakeKubeApiServer::start(cluster, &ca, None);
    let agent = Agent::new(&ca);
    agent.host(&server).drain(Duration::from_secs(10), false).expect("drained");
    let evictions: Vec<String> =
        server.with(|c| c.requests.iter().filter(|r| r.ends_with("/eviction")).cloned().collect());
    assert_eq!(
        evictions,
        ["POST /api/v1/namespaces/shop/pods/web-1/eviction", "POST /api/v1/namespaces/shop/pods/db-0/eviction"]
    );
    let left: Vec<String> = server.with(|c| c.pods.iter().map(key_of).collect());
    assert_eq!(
        left,
        ["kube-system/fluentd-abcde", "kube-system/kube-apiserver-node-1", "batch/report-1", "shop/web-2"]
    );
    let lists = server.with(|c| c.requests.iter().filter(|r| r.starts_with("GET /api/v1/pods?")).count());
    assert!(lists >= 4, "waited until web-1 was gone ({lists} lists)");
    assert!(
        server.with(|c| c.requests.contains(&"GET /api/v1/pods?fieldSelector=spec.nodeName%3Dnode-1".to_string())),
        "pods listed by field selector"
    );
}

#[test]
fn an_eviction_blocked_by_a_budget_times_out_naming_the_pod_and_the_budget() {
    let ca = TestCa::new("fake kube CA");
    let mut cluster = token_cluster(node(None));
    cluster.pods = vec![pod("shop", "web-1", NODE, "web"), pod("shop", "db-0", NODE, "db")];
    cluster.pdbs = vec![pdb("shop", "db-pdb", "cache"), pdb("shop", "web-pdb", "web"), pdb("other", "web-pdb", "web")];
    cluster.blocked.insert("shop/web-1".into());
    let server = FakeKubeApiServer::start(cluster, &ca, None);
    let agent = Agent::new(&ca);
    let err = agent.host(&server).drain(Duration::from_secs(1), false).expect_err("blocked");
    assert_eq!(err.to_string(), "drain timed out after 1s: pod shop/web-1 blocked by PodDisruptionBudget shop/web-pdb");
    let tries = server.with(|c| c.requests.iter().filter(|r| r.ends_with("/shop/pods/web-1/eviction")).count());
    assert!(tries >= 3, "the blocked eviction was retried every eviction_retry ({tries} tries)");
    assert_eq!(server.with(|c| c.pods.iter().map(key_of).collect::<Vec<_>>()), ["shop/web-1"], "db-0 was evicted");
}

#[test]
fn labels_are_patched_with_the_reported_values_only_when_they_change() {
    let ca = TestCa::new("fake kube CA");
    let server = FakeKubeApiServer::start(token_cluster(node(None)), &ca, None);
    let agent = Agent::new(&ca);
    let os = agent.host(&server);
    let kube = os.kube_node().expect("[kubernetes] api_server puts HostOs on the API");
    let labels = |s: &FakeKubeApiServer| s.with(|c| c.node["metadata"]["labels"].clone());
    let image = "Debian-12-202311.07.0";

    // Through the NodeOs method hub_link calls with every report.
    os.publish_node_labels(image, "202402.01.1").expect("publish");
    assert!(kube.wait_labels_published(image, "202402.01.1", Duration::from_secs(10)), "labels written");
    let l = labels(&server);
    assert_eq!((l[NODE_IMAGE_LABEL].as_str(), l[SECURITY_PATCH_LABEL].as_str()), (Some(image), Some("202402.01.1")));
    assert_eq!(l["kubernetes.io/hostname"], NODE, "other labels untouched");

    // The same values again: no PATCH. New values: one PATCH; an empty value removes the label.
    let patches = || server.with(|c| c.node_patches.len());
    let before = patches();
    kube.publish_labels(image, "202402.01.1").expect("same");
    kube.publish_labels(image, "202403.01.1").expect("changed");
    assert!(kube.wait_labels_published(image, "202403.01.1", Duration::from_secs(10)));
    assert_eq!(patches(), before + 1, "one PATCH for one change");
    assert_eq!(labels(&server)[SECURITY_PATCH_LABEL], "202403.01.1");
    kube.publish_labels(image, "").expect("no patch version");
    assert!(kube.wait_labels_published(image, "", Duration::from_secs(10)));
    assert!(labels(&server).get(SECURITY_PATCH_LABEL).is_none(), "{}", labels(&server));
    let bad = kube.publish_labels(&"x".repeat(70), "").expect_err("too long").to_string();
    assert!(bad.contains(NODE_IMAGE_LABEL) && bad.contains("at most 63"), "{bad}");
}

#[test]
fn a_wrong_ca_or_token_is_refused_naming_the_api_server_and_the_fix() {
    let ca = TestCa::new("fake kube CA");
    let server = FakeKubeApiServer::start(token_cluster(node(None)), &ca, None);
    let agent = Agent::new(&TestCa::new("some other CA"));
    let err = agent.host(&server).cordon().expect_err("untrusted server").to_string();
    assert!(
        err.starts_with(&format!("kubernetes API {}: reading Node node-1: TLS handshake failed", server.url))
            && err.contains("invalid peer certificate")
            && err.contains("kubernetes.ca_file"),
        "{err}"
    );
    assert!(server.with(|c| c.requests.is_empty()), "nothing sent to a server we do not trust");
    assert!(!agent.state().join(CORDON_MEMORY_FILE).exists());

    let agent = Agent::new(&ca);
    std::fs::write(agent.dir.path().join("token"), "wrong\n").expect("token");
    let err = agent.host(&server).cordon().expect_err("bad token").to_string();
    assert!(err.contains("HTTP 401") && err.contains("kubernetes.token_file"), "{err}");
    // The token is read again for every request: fixing the file is enough.
    std::fs::write(agent.dir.path().join("token"), TOKEN).expect("token");
    agent.host(&server).cordon().expect("cordon with the right token");
    assert_eq!(unschedulable(&server), Some(true));
}

#[test]
fn client_certificates_authenticate_the_agent() {
    let ca = TestCa::new("fake kube CA");
    let clients = TestCa::new("fake kube client CA");
    let server = FakeKubeApiServer::start(FakeCluster { node: node(None), ..Default::default() }, &ca, Some(&clients));
    let agent = Agent::new(&ca);
    let (cert, key) = clients.leaf("system:node:node-1");
    std::fs::write(agent.dir.path().join("client.pem"), cert).expect("cert");
    std::fs::write(agent.dir.path().join("client.key"), key).expect("key");
    let mut s = agent.settings(&server);
    s.credentials = KubeCredentials::ClientCert {
        cert: agent.dir.path().join("client.pem"),
        key: agent.dir.path().join("client.key"),
    };
    KubeNode::new(s, &agent.state()).cordon().expect("cordon with a client certificate");
    assert_eq!(unschedulable(&server), Some(true));
    // A token alone does not get through a server that wants a certificate.
    let err = agent.host(&server).uncordon().expect_err("no client certificate").to_string();
    assert!(err.contains(&server.url), "{err}");
    assert_eq!(unschedulable(&server), Some(true));
}

#[test]
fn the_network_half_cordons_and_drains_through_the_api_itself_and_sends_the_rest_to_the_executor() {
    let ca = TestCa::new("fake kube CA");
    let server = FakeKubeApiServer::start(token_cluster(node(None)), &ca, None);
    let agent = Agent::new(&ca);
    // No executor listens on this socket: whatever reaches it fails, saying so.
    let socket = agent.dir.path().join("executor.sock");
    let kube = std::sync::Arc::new(upkeep_agent::os::kube::KubeNode::new(agent.settings(&server), &agent.state()));
    let os = upkeep_agent::os::remote::RemoteOs::new(&socket).with_kube(kube);
    os.cordon().expect("cordon through the API");
    assert_eq!(unschedulable(&server), Some(true));
    os.drain(Duration::from_secs(5), false).expect("drain through the API");
    os.uncordon().expect("uncordon through the API");
    assert_eq!(unschedulable(&server), Some(false));
    let e = os.facts().expect_err("facts are the executor's");
    assert!(e.to_string().contains("is upkeep-agent-executor running?"), "{e}");
}
