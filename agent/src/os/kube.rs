//! Cordon, uncordon, drain and node labels through the Kubernetes API (`[kubernetes] api_server` in agent.toml).
//!
//! A small HTTPS JSON client: HTTP/1.1 (hyper) over rustls with the ring provider, one connection per request,
//! the CA, token and client certificate read again for every request so that rotated credentials are picked up.
//! `NodeOs` methods are synchronous and already run off the agent's async threads, so every public method here
//! runs its requests on a short-lived thread of its own with a single-threaded runtime; it never blocks a
//! runtime thread of the caller and works from any context.
//!
//! What it owns: the Node's `spec.unschedulable` (cordon remembers the value it found, under the agent's state
//! directory, so that uncordon leaves a node cordoned that someone else had cordoned), evictions of the node's
//! pods through the `policy/v1` Eviction subresource (which is how PodDisruptionBudgets are honoured), and the
//! `upkeep.io/*` labels on the Node. It does not create, delete or change any other object.

use super::OsError;
use crate::config::{KubeApiSettings, KubeCredentials};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Node label carrying the node-image-version the agent reports (SPEC §3).
pub const NODE_IMAGE_LABEL: &str = "upkeep.io/node-image-version";
/// Node label carrying the security patch version the agent reports.
pub const SECURITY_PATCH_LABEL: &str = "upkeep.io/security-patch-version";
/// What cordon found before it cordoned, inside the agent's state directory.
pub const CORDON_MEMORY_FILE: &str = "kubernetes-cordon.json";

/// Limit of one request, connection and TLS handshake included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Limit of establishing the TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response body accepted (a pod list of a busy node is well below this).
const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;
/// Pause before a failed label update is tried again (sooner when the wanted labels change).
const LABEL_RETRY: Duration = Duration::from_secs(30);
/// Longest Kubernetes label value.
const MAX_LABEL_VALUE: usize = 63;

/// `[kubernetes] api_server` is read with the configuration's own parser.
pub use crate::config::parse_api_server;

/// Percent-encodes `s` for a URL path segment or query value (everything but RFC 3986 unreserved characters).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A Kubernetes label value: empty, or at most 63 characters, alphanumeric at both ends, `-_.` inside.
fn check_label_value(v: &str) -> Result<(), String> {
    let ok = v.is_empty()
        || (v.len() <= MAX_LABEL_VALUE
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric())
            && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{v:?} is not a valid label value (at most {MAX_LABEL_VALUE} characters: letters, digits, '-', '_', '.', \
             beginning and ending with a letter or digit)"
        ))
    }
}

/// A pod to evict, as read from the pod list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Uid (a pod recreated under the same name is another pod).
    pub uid: String,
    /// Its labels, matched against PodDisruptionBudget selectors.
    pub labels: BTreeMap<String, String>,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// Decides whether drain evicts `pod`: mirror pods (static pods the kubelet runs from files), pods owned by a
/// DaemonSet (its controller ignores unschedulable and would put them straight back) and pods that already
/// terminated are left alone. Returns the pod, or why it is skipped.
pub fn evictable(pod: &Value) -> Result<PodRef, &'static str> {
    if pod.pointer("/metadata/annotations/kubernetes.io~1config.mirror").is_some() {
        return Err("mirror pod");
    }
    let owners = pod.pointer("/metadata/ownerReferences").and_then(Value::as_array);
    if owners.is_some_and(|o| o.iter().any(|r| str_at(r, "/kind") == "DaemonSet")) {
        return Err("owned by a DaemonSet");
    }
    if matches!(str_at(pod, "/status/phase"), "Succeeded" | "Failed") {
        return Err("already terminated");
    }
    let labels = pod
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default();
    Ok(PodRef {
        namespace: str_at(pod, "/metadata/namespace").to_string(),
        name: str_at(pod, "/metadata/name").to_string(),
        uid: str_at(pod, "/metadata/uid").to_string(),
        labels,
    })
}

/// Whether the label selector `selector` (`matchLabels` and `matchExpressions`) selects `labels`. A missing or
/// null selector selects nothing; an empty one selects every pod (policy/v1 semantics).
pub fn selector_matches(selector: Option<&Value>, labels: &BTreeMap<String, String>) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_null()) else { return false };
    let by_labels = sel
        .get("matchLabels")
        .and_then(Value::as_object)
        .is_none_or(|m| m.iter().all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str()));
    let by_expressions = sel.get("matchExpressions").and_then(Value::as_array).is_none_or(|exprs| {
        exprs.iter().all(|e| {
            let key = str_at(e, "/key");
            let values: Vec<&str> = e
                .get("values")
                .and_then(Value::as_array)
                .map(|v| v.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let have = labels.get(key).map(String::as_str);
            match str_at(e, "/operator") {
                "In" => have.is_some_and(|h| values.contains(&h)),
                "NotIn" => have.is_none_or(|h| !values.contains(&h)),
                "Exists" => have.is_some(),
                "DoesNotExist" => have.is_none(),
                _ => false,
            }
        })
    });
    by_labels && by_expressions
}

/// The PodDisruptionBudgets of `pdb_list` (a PodDisruptionBudgetList) that select `pod`, as `namespace/name`.
pub fn budgets_of(pdb_list: &Value, pod: &PodRef) -> Vec<String> {
    pdb_list
        .get("items")
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter(|p| selector_matches(p.pointer("/spec/selector"), &pod.labels))
                .map(|p| format!("{}/{}", str_at(p, "/metadata/namespace"), str_at(p, "/metadata/name")))
                .collect()
        })
        .unwrap_or_default()
}

/// What cordon found, persisted until uncordon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CordonMemory {
    /// The Node it is about.
    node: String,
    /// `spec.unschedulable` before upkeep cordoned the node.
    was_unschedulable: bool,
}

/// How one eviction went.
enum Evicted {
    /// Accepted: the pod is being deleted.
    Yes,
    /// The pod no longer exists.
    Gone,
    /// Refused with HTTP 429 (a disruption budget allows no disruption now); the API server's message.
    Blocked(String),
}

/// An HTTP answer.
struct Reply {
    status: u16,
    body: Vec<u8>,
}

/// Requests to one API server.
#[derive(Debug, Clone)]
struct Api {
    s: KubeApiSettings,
}

impl Api {
    fn fail(&self, action: &str, reason: impl Into<String>) -> OsError {
        OsError::Kube { api_server: self.s.api_server.clone(), action: action.to_string(), reason: reason.into() }
    }

    fn node_path(&self) -> String {
        format!("/api/v1/nodes/{}", encode(&self.s.node_name))
    }

    /// The TLS client configuration, from the files as they are now.
    fn tls(&self, action: &str) -> Result<rustls::ClientConfig, OsError> {
        let ca = &self.s.ca_file;
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(ca)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.fail(action, format!("kubernetes.ca_file {}: {e}", ca.display())))?;
        if certs.is_empty() {
            return Err(self.fail(action, format!("kubernetes.ca_file {}: no PEM certificate in it", ca.display())));
        }
        for c in certs {
            roots.add(c).map_err(|e| {
                self.fail(action, format!("kubernetes.ca_file {}: unusable CA certificate: {e}", ca.display()))
            })?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| self.fail(action, format!("TLS setup: {e}")))?
            .with_root_certificates(roots);
        let mut cfg = match &self.s.credentials {
            KubeCredentials::Token(_) => builder.with_no_client_auth(),
            KubeCredentials::ClientCert { cert, key } => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| self.fail(action, format!("kubernetes.client_cert {}: {e}", cert.display())))?;
                if chain.is_empty() {
                    return Err(
                        self.fail(action, format!("kubernetes.client_cert {}: no PEM certificate", cert.display()))
                    );
                }
                let k = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| self.fail(action, format!("kubernetes.client_key {}: {e}", key.display())))?;
                builder.with_client_auth_cert(chain, k).map_err(|e| {
                    self.fail(
                        action,
                        format!("kubernetes.client_cert/client_key: the key does not fit the certificate: {e}"),
                    )
                })?
            }
        };
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(cfg)
    }

    fn authorization(&self, action: &str) -> Result<Option<String>, OsError> {
        let KubeCredentials::Token(path) = &self.s.credentials else { return Ok(None) };
        let token = std::fs::read_to_string(path)
            .map_err(|e| self.fail(action, format!("kubernetes.token_file {}: {e}", path.display())))?;
        let token = token.trim();
        if token.is_empty() || token.contains(char::is_whitespace) {
            return Err(self.fail(action, format!("kubernetes.token_file {}: empty or not one token", path.display())));
        }
        Ok(Some(format!("Bearer {token}")))
    }

    /// One request; `body` is (content type, bytes).
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
        action: &str,
    ) -> Result<Reply, OsError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.call_once(method, path, body, action)).await {
            Ok(r) => r,
            Err(_) => Err(self.fail(action, format!("no answer within {}s", REQUEST_TIMEOUT.as_secs()))),
        }
    }

    async fn call_once(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
        action: &str,
    ) -> Result<Reply, OsError> {
        let tls = self.tls(action)?;
        let auth = self.authorization(action)?;
        let (host, port) = (self.s.host.as_str(), self.s.port);
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect((host, port)))
            .await
            .map_err(|_| {
                self.fail(
                    action,
                    format!("connecting to {host}:{port}: no answer within {}s", CONNECT_TIMEOUT.as_secs()),
                )
            })?
            .map_err(|e| self.fail(action, format!("connecting to {host}:{port}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| self.fail(action, format!("{host:?} is not a valid TLS server name: {e}")))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp).await.map_err(|e| {
            self.fail(
                action,
                format!("TLS handshake failed ({e}); check that kubernetes.ca_file is the CA of the API server's certificate"),
            )
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.fail(action, format!("HTTP handshake: {e}")))?;
        // The connection is driven on this runtime until the exchange ends; one connection per request.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let authority = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::USER_AGENT, concat!("upkeep-agent/", env!("CARGO_PKG_VERSION")));
        if let Some(a) = auth {
            req = req.header(hyper::header::AUTHORIZATION, a);
        }
        let bytes = match body {
            Some((content_type, b)) => {
                req = req.header(hyper::header::CONTENT_TYPE, content_type);
                b
            }
            None => Vec::new(),
        };
        let req = req
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| self.fail(action, format!("building the request: {e}")))?;
        let resp = sender.send_request(req).await.map_err(|e| self.fail(action, format!("request failed: {e}")))?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| self.fail(action, format!("reading the answer (HTTP {status}): {e}")))?
            .to_bytes()
            .to_vec();
        Ok(Reply { status, body })
    }

    /// The error for an unexpected status: the API server's own message plus what to check.
    fn status_error(&self, action: &str, r: &Reply) -> OsError {
        let message = serde_json::from_slice::<Value>(&r.body)
            .ok()
            .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&r.body).chars().take(300).collect());
        let hint = match r.status {
            401 => {
                "; the API server did not accept the credentials: check kubernetes.token_file or client_cert/client_key"
            }
            403 => {
                "; the agent's identity needs RBAC rights to get/patch nodes, list pods, create pods/eviction and list \
                 poddisruptionbudgets"
            }
            404 if action.contains("Node") => "; check kubernetes.node_name against `kubectl get nodes`",
            _ => "",
        };
        self.fail(action, format!("HTTP {}: {}{hint}", r.status, message.trim()))
    }

    async fn get_json(&self, path: &str, action: &str) -> Result<Value, OsError> {
        let r = self.call(Method::GET, path, None, action).await?;
        if r.status != 200 {
            return Err(self.status_error(action, &r));
        }
        serde_json::from_slice(&r.body).map_err(|e| self.fail(action, format!("answer is not JSON: {e}")))
    }

    async fn patch_node(&self, patch: Value, action: &str) -> Result<(), OsError> {
        let body = Some(("application/merge-patch+json", patch.to_string().into_bytes()));
        let r = self.call(Method::PATCH, &self.node_path(), body, action).await?;
        if r.status != 200 {
            return Err(self.status_error(action, &r));
        }
        Ok(())
    }

    async fn cordon(&self, memory: &Path) -> Result<(), OsError> {
        let node = &self.s.node_name;
        // Remember what we found only the first time: a repeated cordon must not take our own cordon for the
        // operator's.
        if read_memory(memory, node)?.is_none() {
            let action = format!("reading Node {node}");
            let n = self.get_json(&self.node_path(), &action).await?;
            let was = n.pointer("/spec/unschedulable").and_then(Value::as_bool).unwrap_or(false);
            write_memory(memory, &CordonMemory { node: node.clone(), was_unschedulable: was })?;
        }
        self.patch_node(json!({"spec": {"unschedulable": true}}), &format!("cordoning Node {node}")).await
    }

    async fn uncordon(&self, memory: &Path) -> Result<(), OsError> {
        let node = &self.s.node_name;
        match read_memory(memory, node)? {
            Some(m) if m.was_unschedulable => {
                tracing::info!(node = %node, "Node was cordoned before upkeep cordoned it: leaving it cordoned");
            }
            _ => {
                self.patch_node(json!({"spec": {"unschedulable": false}}), &format!("uncordoning Node {node}")).await?
            }
        }
        match std::fs::remove_file(memory) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(OsError::Io { path: memory.to_path_buf(), source: e })
            }
            _ => Ok(()),
        }
    }

    async fn node_pods(&self, action: &str) -> Result<Vec<Value>, OsError> {
        let path = format!("/api/v1/pods?fieldSelector={}", encode(&format!("spec.nodeName={}", self.s.node_name)));
        let list = self.get_json(&path, action).await?;
        Ok(list.get("items").and_then(Value::as_array).cloned().unwrap_or_default())
    }

    async fn evict(&self, pod: &PodRef) -> Result<Evicted, OsError> {
        let action = format!("evicting pod {pod}");
        let path = format!("/api/v1/namespaces/{}/pods/{}/eviction", encode(&pod.namespace), encode(&pod.name));
        let body = json!({
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": pod.name, "namespace": pod.namespace},
        });
        let r =
            self.call(Method::POST, &path, Some(("application/json", body.to_string().into_bytes())), &action).await?;
        match r.status {
            200 | 201 => Ok(Evicted::Yes),
            404 => Ok(Evicted::Gone),
            429 => Ok(Evicted::Blocked(
                serde_json::from_slice::<Value>(&r.body)
                    .ok()
                    .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
                    .unwrap_or_default(),
            )),
            _ => Err(self.status_error(&action, &r)),
        }
    }

    /// Names the PodDisruptionBudgets that select `pod` (for the timeout message).
    async fn describe_block(&self, pod: &PodRef, message: &str) -> String {
        let path = format!("/apis/policy/v1/namespaces/{}/poddisruptionbudgets", encode(&pod.namespace));
        let found = match self.get_json(&path, &format!("listing PodDisruptionBudgets in {}", pod.namespace)).await {
            Ok(list) => budgets_of(&list, pod),
            Err(e) => return format!("pod {pod} blocked by a PodDisruptionBudget (listing them failed: {e})"),
        };
        match found.as_slice() {
            [] => {
                format!("pod {pod} blocked by the API server (HTTP 429: {message}); no PodDisruptionBudget selects it")
            }
            [one] => format!("pod {pod} blocked by PodDisruptionBudget {one}"),
            many => format!("pod {pod} blocked by PodDisruptionBudgets {}", many.join(", ")),
        }
    }

    /// Deletes a pod outright (a forced drain: disruption budgets do not apply to deletes).
    async fn delete_pod(&self, pod: &PodRef) -> Result<Evicted, OsError> {
        let action = format!("deleting pod {pod} (forced drain)");
        let path = format!("/api/v1/namespaces/{}/pods/{}", encode(&pod.namespace), encode(&pod.name));
        let r = self.call(Method::DELETE, &path, None, &action).await?;
        match r.status {
            200 | 202 => Ok(Evicted::Yes),
            404 => Ok(Evicted::Gone),
            _ => Err(self.status_error(&action, &r)),
        }
    }

    async fn drain(&self, timeout: Duration, force: bool) -> Result<(), OsError> {
        let node = &self.s.node_name;
        let started = Instant::now();
        let deadline = started + timeout;
        let mut todo = Vec::new();
        for p in self.node_pods(&format!("listing pods on Node {node}")).await? {
            match evictable(&p) {
                Ok(pod) => todo.push(pod),
                Err(why) => tracing::info!(
                    node = %node,
                    pod = %format!("{}/{}", str_at(&p, "/metadata/namespace"), str_at(&p, "/metadata/name")),
                    why,
                    "drain leaves pod in place"
                ),
            }
        }
        let mut evicted: Vec<PodRef> = Vec::new();
        loop {
            let mut blocked: Vec<(PodRef, String)> = Vec::new();
            for pod in std::mem::take(&mut todo) {
                let answer = if force { self.delete_pod(&pod).await? } else { self.evict(&pod).await? };
                match answer {
                    Evicted::Yes => {
                        tracing::info!(node = %node, pod = %pod, "pod evicted");
                        evicted.push(pod);
                    }
                    Evicted::Gone => {}
                    Evicted::Blocked(message) => blocked.push((pod, message)),
                }
            }
            if !evicted.is_empty() {
                // Evicted pods count as gone once no pod with their uid is left on the node.
                let now = self.node_pods(&format!("listing pods on Node {node}")).await?;
                evicted.retain(|p| now.iter().any(|n| str_at(n, "/metadata/uid") == p.uid));
            }
            if blocked.is_empty() && evicted.is_empty() {
                tracing::info!(node = %node, seconds = started.elapsed().as_secs(), "Node drained");
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                let mut why = Vec::new();
                for (pod, message) in &blocked {
                    why.push(self.describe_block(pod, message).await);
                }
                why.extend(evicted.iter().map(|p| format!("pod {p} evicted but still terminating")));
                return Err(OsError::DrainTimedOut { after_seconds: timeout.as_secs(), blocking: why.join("; ") });
            }
            if let Some((pod, _)) = blocked.first() {
                tracing::info!(node = %node, pod = %pod, blocked = blocked.len(), "eviction refused by a disruption budget; retrying");
            }
            todo = blocked.into_iter().map(|(p, _)| p).collect();
            tokio::time::sleep(self.s.eviction_retry.min(deadline - now)).await;
        }
    }

    async fn patch_labels(&self, labels: &Labels) -> Result<(), OsError> {
        let value = |v: &str| if v.is_empty() { Value::Null } else { Value::String(v.to_string()) };
        let patch = json!({"metadata": {"labels": {
            NODE_IMAGE_LABEL: value(&labels.image),
            SECURITY_PATCH_LABEL: value(&labels.patch),
        }}});
        self.patch_node(patch, &format!("labelling Node {}", self.s.node_name)).await
    }
}

fn read_memory(path: &Path, node: &str) -> Result<Option<CordonMemory>, OsError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let m: CordonMemory = serde_json::from_slice(&bytes).map_err(|e| OsError::Malformed {
                path: path.to_path_buf(),
                reason: format!("unreadable cordon memory ({e}); delete it if the Node's cordon state is right"),
            })?;
            Ok((m.node == node).then_some(m))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(OsError::Io { path: path.to_path_buf(), source }),
    }
}

fn write_memory(path: &Path, m: &CordonMemory) -> Result<(), OsError> {
    let bytes = serde_json::to_vec_pretty(m)
        .map_err(|e| OsError::Malformed { path: path.to_path_buf(), reason: e.to_string() })?;
    crate::state::write_atomic(path, &bytes)
        .map_err(|e| OsError::Malformed { path: path.to_path_buf(), reason: e.to_string() })
}

/// Runs `fut` to completion on a thread of its own with a single-threaded runtime, so that a synchronous caller
/// (a `NodeOs` method) never blocks or nests inside the caller's runtime.
fn block_on<T: Send>(fut: impl Future<Output = Result<T, OsError>> + Send) -> Result<T, OsError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| OsError::Unhealthy(format!("starting the Kubernetes client runtime: {e}")))?;
            rt.block_on(fut)
        })
        .join()
        .unwrap_or_else(|_| Err(OsError::Unhealthy("the Kubernetes client thread panicked".into())))
    })
}

/// The two upkeep labels of the Node.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Labels {
    image: String,
    patch: String,
}

/// Labels last written successfully, for `wait_labels_published`.
#[derive(Default)]
struct Published {
    labels: Mutex<Option<Labels>>,
    changed: Condvar,
}

/// The background writer of the Node's labels: the wanted values go in through a watch channel (never blocks
/// the caller), a thread of its own PATCHes them when they differ from what it last wrote, and tries again after
/// a failure.
struct LabelWorker {
    want: watch::Sender<Option<Labels>>,
    published: Arc<Published>,
}

impl LabelWorker {
    fn start(api: Api) -> Result<LabelWorker, OsError> {
        let (want, rx) = watch::channel(None);
        let published = Arc::new(Published::default());
        let done = published.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| OsError::Unhealthy(format!("starting the Kubernetes label thread: {e}")))?;
        std::thread::Builder::new()
            .name("upkeep-kube-labels".into())
            .spawn(move || rt.block_on(label_loop(api, rx, done)))
            .map_err(|e| OsError::Unhealthy(format!("starting the Kubernetes label thread: {e}")))?;
        Ok(LabelWorker { want, published })
    }
}

async fn label_loop(api: Api, mut want: watch::Receiver<Option<Labels>>, published: Arc<Published>) {
    let mut applied: Option<Labels> = None;
    loop {
        let target = want.borrow_and_update().clone();
        if let Some(t) = target
            && applied.as_ref() != Some(&t)
        {
            match api.patch_labels(&t).await {
                Ok(()) => {
                    tracing::info!(node = %api.s.node_name, image = %t.image, patch = %t.patch, "Node labels updated");
                    applied = Some(t.clone());
                    *published.labels.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
                    published.changed.notify_all();
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_s = LABEL_RETRY.as_secs(), "updating the Node's labels");
                    tokio::select! {
                        _ = tokio::time::sleep(LABEL_RETRY) => continue,
                        r = want.changed() => if r.is_err() { return } else { continue },
                    }
                }
            }
        }
        if want.changed().await.is_err() {
            return; // the node handle is gone
        }
    }
}

/// This node's Node object, through the API server.
pub struct KubeNode {
    api: Api,
    memory: PathBuf,
    labels: OnceLock<Result<LabelWorker, String>>,
}

impl std::fmt::Debug for KubeNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeNode").field("api", &self.api).field("memory", &self.memory).finish()
    }
}

impl KubeNode {
    /// The Node of `settings`; what cordon found is remembered under `state_dir`.
    pub fn new(settings: KubeApiSettings, state_dir: &Path) -> KubeNode {
        KubeNode { api: Api { s: settings }, memory: state_dir.join(CORDON_MEMORY_FILE), labels: OnceLock::new() }
    }

    /// The settings in use.
    pub fn settings(&self) -> &KubeApiSettings {
        &self.api.s
    }

    /// Remembers `spec.unschedulable` as found (first cordon only), then sets it.
    pub fn cordon(&self) -> Result<(), OsError> {
        block_on(self.api.cordon(&self.memory))
    }

    /// Restores `spec.unschedulable` as cordon found it (false without memory) and forgets the memory.
    pub fn uncordon(&self) -> Result<(), OsError> {
        block_on(self.api.uncordon(&self.memory))
    }

    /// Evicts the node's pods through the Eviction API within `timeout` (zero: the configured drain timeout),
    /// retrying evictions a disruption budget refuses, and waits until the evicted pods are gone.
    pub fn drain(&self, timeout: Duration, force: bool) -> Result<(), OsError> {
        let timeout = if timeout.is_zero() { self.api.s.drain_timeout } else { timeout };
        block_on(self.api.drain(timeout, force))
    }

    /// Asks for the Node's `upkeep.io/*` labels to be `image` and `patch` (empty: label removed). Returns at
    /// once; a background thread PATCHes the Node when the values differ from what it last wrote.
    pub fn publish_labels(&self, image: &str, patch: &str) -> Result<(), OsError> {
        let action = format!("labelling Node {}", self.api.s.node_name);
        check_label_value(image).map_err(|r| self.api.fail(&action, format!("{NODE_IMAGE_LABEL}: {r}")))?;
        check_label_value(patch).map_err(|r| self.api.fail(&action, format!("{SECURITY_PATCH_LABEL}: {r}")))?;
        let worker = self
            .labels
            .get_or_init(|| LabelWorker::start(self.api.clone()).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| self.api.fail(&action, e.clone()))?;
        let next = Some(Labels { image: image.to_string(), patch: patch.to_string() });
        worker.want.send_if_modified(|w| {
            let changed = *w != next;
            if changed {
                w.clone_from(&next);
            }
            changed
        });
        Ok(())
    }

    /// Waits up to `within` until the labels last written are `image` and `patch`; false on timeout.
    pub fn wait_labels_published(&self, image: &str, patch: &str, within: Duration) -> bool {
        let Some(Ok(w)) = self.labels.get() else { return false };
        let want = Labels { image: image.to_string(), patch: patch.to_string() };
        let guard = w.published.labels.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = w
            .published
            .changed
            .wait_timeout_while(guard, within, |l| l.as_ref() != Some(&want))
            .unwrap_or_else(|e| e.into_inner());
        guard.as_ref() == Some(&want)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_server_addresses() {
        assert_eq!(parse_api_server("https://10.0.0.1:6443").expect("ok"), ("10.0.0.1".into(), 6443));
        assert_eq!(parse_api_server("https://kube.example/").expect("ok"), ("kube.example".into(), 443));
        assert_eq!(parse_api_server("https://[fd00::1]:6443").expect("ok"), ("fd00::1".into(), 6443));
        assert!(parse_api_server("http://10.0.0.1:8080").expect_err("plain").contains("only https://"));
        for bad in ["https://", "https://h:0", "https://h:x", "https://h:1/api", "https://u@h:1", "https://[::1"] {
            assert!(parse_api_server(bad).expect_err(bad).contains("malformed address"), "{bad}");
        }
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(encode("spec.nodeName=node-1"), "spec.nodeName%3Dnode-1");
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn label_values() {
        assert_eq!(check_label_value(""), Ok(()));
        assert_eq!(check_label_value("AKSUbuntu-2204gen2containerd-202311.07.0"), Ok(()));
        assert!(check_label_value("-x").is_err());
        assert!(check_label_value("a b").is_err());
        assert!(check_label_value(&"a".repeat(64)).expect_err("long").contains("at most 63"));
    }

    #[test]
    fn drain_skips_mirror_daemonset_and_finished_pods() {
        let pod = |extra: Value| {
            let mut p = json!({"metadata": {"namespace": "shop", "name": "web-1", "uid": "u1", "labels": {"app": "web"}},
                               "status": {"phase": "Running"}});
            if let (Some(p), Some(e)) = (p.as_object_mut(), extra.as_object()) {
                for (k, v) in e {
                    if k == "metadata" {
                        if let (Some(m), Some(v)) =
                            (p.get_mut("metadata").and_then(Value::as_object_mut), v.as_object())
                        {
                            m.extend(v.clone());
                        }
                    } else {
                        p.insert(k.clone(), v.clone());
                    }
                }
            }
            p
        };
        let web = evictable(&pod(json!({}))).expect("evictable");
        assert_eq!((web.to_string(), web.labels["app"].as_str()), ("shop/web-1".to_string(), "web"));
        let ds = pod(json!({"metadata": {"ownerReferences": [{"kind": "DaemonSet", "name": "fluentd"}]}}));
        assert_eq!(evictable(&ds), Err("owned by a DaemonSet"));
        let rs = pod(json!({"metadata": {"ownerReferences": [{"kind": "ReplicaSet", "name": "web-5d8"}]}}));
        assert!(evictable(&rs).is_ok());
        let mirror = pod(json!({"metadata": {"annotations": {"kubernetes.io/config.mirror": "abc"}}}));
        assert_eq!(evictable(&mirror), Err("mirror pod"));
        assert_eq!(evictable(&pod(json!({"status": {"phase": "Succeeded"}}))), Err("already terminated"));
        assert_eq!(evictable(&pod(json!({"status": {"phase": "Failed"}}))), Err("already terminated"));
    }

    #[test]
    fn budgets_are_matched_by_selector() {
        let labels: BTreeMap<String, String> =
            [("app".to_string(), "web".to_string()), ("tier".to_string(), "front".to_string())].into();
        let m = |sel: Value| selector_matches(Some(&sel), &labels);
        assert!(m(json!({"matchLabels": {"app": "web"}})));
        assert!(!m(json!({"matchLabels": {"app": "db"}})));
        assert!(m(json!({})), "an empty selector selects every pod");
        assert!(!selector_matches(None, &labels) && !m(Value::Null), "a null selector selects none");
        assert!(m(json!({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["front", "x"]}]})));
        assert!(!m(json!({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["front"]}]})));
        assert!(m(json!({"matchExpressions": [{"key": "app", "operator": "Exists"}]})));
        assert!(!m(
            json!({"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]})
        ));
        let pod = PodRef { namespace: "shop".into(), name: "web-1".into(), uid: "u".into(), labels };
        let list = json!({"items": [
            {"metadata": {"namespace": "shop", "name": "db-pdb"}, "spec": {"selector": {"matchLabels": {"app": "db"}}}},
            {"metadata": {"namespace": "shop", "name": "web-pdb"}, "spec": {"selector": {"matchLabels": {"app": "web"}}}},
        ]});
        assert_eq!(budgets_of(&list, &pod), ["shop/web-pdb"]);
    }

    #[test]
    fn cordon_memory_is_per_node_and_a_corrupt_file_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join(CORDON_MEMORY_FILE);
        assert_eq!(read_memory(&p, "n1").expect("none"), None);
        write_memory(&p, &CordonMemory { node: "n1".into(), was_unschedulable: true }).expect("write");
        assert_eq!(read_memory(&p, "n1").expect("read").map(|m| m.was_unschedulable), Some(true));
        assert_eq!(read_memory(&p, "n2").expect("other node"), None);
        std::fs::write(&p, b"{").expect("corrupt");
        let e = read_memory(&p, "n1").expect_err("corrupt").to_string();
        assert!(e.contains(CORDON_MEMORY_FILE) && e.contains("delete it"), "{e}");
    }
}
