//! CloudEvents 1.0 webhooks (docs/webhooks.md): what happens in the fleet, POSTed to the operators' receivers.
//!
//! Events enter a durable outbox in the store (`Store::enqueue_events`; run events inside the transaction of the
//! run commit that caused them), only for the webhooks whose patterns match their type. One worker per webhook
//! then delivers them, in structured mode (`application/cloudevents+json`):
//!
//! - **At least once.** An event is marked delivered only after a 2xx answer; a hub killed in between sends it
//!   again after its restart, with the same `id` (the outbox sequence number), so receivers dedupe on `id`.
//! - **In order per subject.** Only the oldest undelivered event of each subject (`runs/<run>`, `nodes/<node>`,
//!   `members/<member>`) is attempted; different subjects go in parallel, at most [`IN_FLIGHT`] at once.
//! - **Retried** with capped exponential backoff and jitter ([`retry_delay`]), for as long as the webhook exists.
//! - **Signed**: `upkeep-signature: sha256=<hex HMAC-SHA256 of the body with the webhook's secret>`.
//! - **Bounded**: a worker holds at most [`IN_FLIGHT`] events in memory and each attempt ends after
//!   [`ATTEMPT_TIMEOUT`]; the rest waits on disk. Nothing here runs on the engine's path: a dead receiver only
//!   grows its own backlog.
//!
//! Delivered events are pruned after [`RETENTION`].

use crate::fleet::{Fleet, NodeStatus, now_ms};
use crate::store::{Delivery, OutboxEvent};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Events attempted at once per webhook (each of a different subject).
pub const IN_FLIGHT: usize = 8;
/// One delivery attempt (connect, TLS, request and answer) ends after this.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// First retry delay; doubled per failed attempt up to [`MAX_RETRY_DELAY`].
pub const FIRST_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);
/// Delivered events are kept this long (then pruned).
pub const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often a worker with nothing due looks again.
const IDLE_POLL: Duration = Duration::from_millis(500);
/// How often node statuses are compared for `upkeep.node.ready` / `upkeep.node.unknown`.
const STATUS_POLL: Duration = Duration::from_secs(1);
/// The prefix of every event type.
/// The signature header.
pub const SIGNATURE_HEADER: &str = "upkeep-signature";
/// The content type of a structured-mode CloudEvent.
pub const CONTENT_TYPE: &str = "application/cloudevents+json; charset=utf-8";

/// `[webhooks]` in hub.toml.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookSettings {
    /// The CloudEvents `source` of every event (default `upkeep://hub/<hostname>`).
    pub source: String,
    /// A CA file trusted besides the system roots for https receivers.
    pub ca_file: Option<PathBuf>,
    /// How long before a predicted operation its `upkeep.maintenance.upcoming` notice is sent (zero: never;
    /// `crate::schedule::notices`).
    pub upcoming_notice: std::time::Duration,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let host = host.trim();
        WebhookSettings {
            source: format!("upkeep://hub/{}", if host.is_empty() { "localhost" } else { host }),
            ca_file: None,
            upcoming_notice: std::time::Duration::from_secs(24 * 3600),
        }
    }
}

pub use upkeep_core::events::{TYPE_PREFIX, check_pattern, snake, type_matches};

/// Checks a receiver URL: `https://host[:port]/path`, or `http://` to a loopback address (127.0.0.0/8, ::1). No
/// credentials in it. `label` names the field or flag in the error.
pub fn check_url(label: &str, url: &str) -> Result<Uri, String> {
    let uri: Uri = url.parse().map_err(|e| format!("{label}: {url:?} is not a URL ({e}); give https://host/path"))?;
    let host = uri.host().unwrap_or_default();
    if host.is_empty() {
        return Err(format!("{label}: {url:?} names no host; give https://host[:port]/path"));
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(format!(
            "{label}: {url:?} carries credentials; use --secret-file to sign deliveries instead of a password in the URL"
        ));
    }
    match uri.scheme_str() {
        Some("https") => Ok(uri),
        Some("http") if is_loopback(host) => Ok(uri),
        Some("http") => Err(format!(
            "{label}: {url:?} is plain http to a host that is not a loopback address; webhooks go over https \
             (http only to 127.0.0.0/8 or [::1], e.g. a local relay)"
        )),
        _ => Err(format!("{label}: {url:?} is not an https:// URL; give https://host[:port]/path")),
    }
}

fn is_loopback(host: &str) -> bool {
    host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The signature header's value for `body`: `sha256=<lower-case hex of HMAC-SHA256(secret, body)>`.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, body);
    let mut out = String::from("sha256=");
    for b in tag.as_ref() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Whether `header` is a valid signature of `body` with `secret` (checked in constant time), as a receiver does.
pub fn verify(secret: &str, body: &[u8], header: &str) -> bool {
    let Some(hex) = header.trim().strip_prefix("sha256=") else { return false };
    if hex.len() != 64 {
        return false;
    }
    let mut tag = Vec::with_capacity(32);
    for i in (0..64).step_by(2) {
        match hex.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()) {
            Some(b) => tag.push(b),
            None => return false,
        }
    }
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    ring::hmac::verify(&key, body, &tag).is_ok()
}

/// The CloudEvent of an outbox event, in structured mode (JSON).
pub fn cloudevent(source: &str, seq: u64, e: &OutboxEvent) -> serde_json::Value {
    let data: serde_json::Value =
        serde_json::from_str(&e.data).unwrap_or_else(|_| serde_json::Value::String(e.data.clone()));
    let time = chrono::DateTime::from_timestamp_millis(e.time_ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    serde_json::json!({
        "specversion": "1.0",
        "id": seq.to_string(),
        "source": source,
        "type": e.event_type,
        "subject": e.subject,
        "time": time,
        "datacontenttype": "application/json",
        "data": data,
    })
}

/// `node.ready` / `node.unknown`.
pub fn status_event(node: &str, from: NodeStatus, to: NodeStatus, now: i64) -> OutboxEvent {
    crate::outbox::event(
        &format!("node.{}", snake(to.as_str())),
        format!("nodes/{node}"),
        now,
        serde_json::json!({"node": node, "from": from.as_str(), "to": to.as_str()}),
    )
}

/// The delay before attempt `attempts + 1` after `attempts` failed ones: 1 s doubled per failure, at most 5 min,
/// a random part of it (between half and all) so that receivers coming back are not hit at once.
pub fn retry_delay(attempts: u32) -> Duration {
    let full = FIRST_RETRY_DELAY.saturating_mul(1u32 << attempts.saturating_sub(1).min(16)).min(MAX_RETRY_DELAY);
    let ms = full.as_millis() as u64;
    Duration::from_millis(ms / 2 + fastrand::u64(0..=ms / 2))
}

/// Runs the webhook machinery until aborted: a worker per webhook, the node status watch, the outbox pruning.
pub async fn run(fleet: Arc<Fleet>, settings: WebhookSettings) {
    let settings = Arc::new(settings);
    let mut workers: HashMap<String, (String, tokio::task::JoinHandle<()>)> = HashMap::new();
    let statuses = tokio::spawn(watch_statuses(fleet.clone()));
    let mut last_prune: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(IDLE_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let hooks = match fleet.store().list_webhooks() {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "listing webhooks");
                continue;
            }
        };
        fleet.set_webhooks_active(!hooks.is_empty());
        // A webhook deleted (or deleted and created again under its name with another URL) loses its worker.
        workers.retain(|name, (url, task)| {
            let keep = hooks.iter().any(|h| &h.hook.name == name && &h.hook.url == url) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for h in hooks {
            if workers.contains_key(&h.hook.name) {
                continue;
            }
            let task = tokio::spawn(worker(fleet.clone(), settings.clone(), h.hook.clone()));
            workers.insert(h.hook.name.clone(), (h.hook.url.clone(), task));
        }
        if last_prune.is_none_or(|t| t.elapsed() >= Duration::from_secs(3600)) {
            last_prune = Some(tokio::time::Instant::now());
            let before = now_ms() - RETENTION.as_millis() as i64;
            match fleet.store().prune_outbox(before) {
                Ok(0) => {}
                Ok(n) => tracing::info!(events = n, "webhook outbox pruned"),
                Err(e) => tracing::error!(error = %e, "pruning the webhook outbox"),
            }
        }
        if statuses.is_finished() {
            tracing::error!("the node status watch stopped");
        }
    }
}

/// Emits `node.ready` / `node.unknown` when a node's status changes. Statuses are compared from one silence
/// deadline after the hub started (before that, nodes are still reconnecting to the new hub process).
async fn watch_statuses(fleet: Arc<Fleet>) {
    let settle = Duration::from_millis(u64::try_from(fleet.silence_deadline_ms()).unwrap_or(0));
    tokio::time::sleep(settle).await;
    let mut known: HashMap<String, NodeStatus> = HashMap::new();
    let mut first = true;
    let mut tick = tokio::time::interval(STATUS_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !fleet.webhooks_active() {
            first = true;
            continue;
        }
        let now = now_ms();
        let mut events = Vec::new();
        for (node, status) in fleet.heard_statuses(now) {
            let before = known.insert(node.clone(), status);
            match before {
                Some(b) if b != status && !first => events.push(status_event(&node, b, status, now)),
                _ => {}
            }
        }
        first = false;
        crate::outbox::emit(fleet.store(), &events);
    }
}

/// Delivers what one webhook is owed, until aborted.
async fn worker(fleet: Arc<Fleet>, settings: Arc<WebhookSettings>, hook: crate::store::WebhookRecord) {
    let target = match Target::new(&hook.url, settings.ca_file.as_ref()) {
        Ok(t) => Arc::new(t),
        Err(e) => {
            tracing::error!(webhook = %hook.name, error = %e, "webhook cannot be delivered to");
            return;
        }
    };
    loop {
        let due = match fleet.store().due_deliveries(&hook.name, now_ms(), IN_FLIGHT) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(webhook = %hook.name, error = %e, "reading the webhook outbox");
                Vec::new()
            }
        };
        if due.is_empty() {
            tokio::time::sleep(IDLE_POLL).await;
            continue;
        }
        let attempts = due.into_iter().map(|d| {
            let target = target.clone();
            let source = settings.source.clone();
            let secret = hook.secret.clone();
            async move {
                let body = cloudevent(&source, d.seq, &d.event).to_string();
                let r = tokio::time::timeout(ATTEMPT_TIMEOUT, target.post(body.into_bytes(), &secret))
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {}s", ATTEMPT_TIMEOUT.as_secs())));
                (d, r)
            }
        });
        for (d, r) in futures::future::join_all(attempts).await {
            record(&fleet, &hook.name, &d, r);
        }
    }
}

fn record(fleet: &Fleet, webhook: &str, d: &Delivery, r: Result<(), String>) {
    let now = now_ms();
    let ok = r.is_ok();
    fleet.counters().webhook_delivery(webhook, ok);
    let retry_at = now + retry_delay(d.attempts + 1).as_millis() as i64;
    if let Err(why) = &r {
        tracing::warn!(webhook, id = d.seq, r#type = %d.event.event_type, attempts = d.attempts + 1, error = %why,
            "webhook delivery failed; retrying");
    }
    if let Err(e) = fleet.store().record_delivery(webhook, d.seq, now, r.err().as_deref(), retry_at) {
        tracing::error!(webhook, id = d.seq, error = %e, "recording a webhook delivery");
    }
}

/// Where a webhook's events are POSTed.
struct Target {
    uri: Uri,
    host: String,
    port: u16,
    /// None: plain http (loopback only).
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Target {
    fn new(url: &str, ca_file: Option<&PathBuf>) -> Result<Target, String> {
        let uri = check_url("url", url)?;
        let https = uri.scheme_str() == Some("https");
        let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https { Some(client_config(ca_file)?) } else { None };
        Ok(Target { uri, host, port, tls })
    }

    /// One POST on a fresh connection; Ok on a 2xx answer.
    async fn post(&self, body: Vec<u8>, secret: &str) -> Result<(), String> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("connecting to {}:{}: {e}", self.host, self.port))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => self.exchange(TokioIo::new(tcp), body, secret).await,
            Some(tls) => {
                let name = ServerName::try_from(self.host.clone()).map_err(|e| format!("server name: {e}"))?;
                let stream = tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS handshake with {}: {e}", self.host))?;
                self.exchange(TokioIo::new(stream), body, secret).await
            }
        }
    }

    async fn exchange<T>(&self, io: T, body: Vec<u8>, secret: &str) -> Result<(), String>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(io).await.map_err(|e| format!("HTTP handshake: {e}"))?;
        let conn = tokio::spawn(conn);
        let authority = self.uri.authority().map_or(self.host.clone(), |a| a.as_str().to_string());
        let mut req = Request::post(self.uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(hyper::header::HOST, authority)
            .header(hyper::header::CONTENT_TYPE, CONTENT_TYPE)
            .header(hyper::header::USER_AGENT, format!("upkeep-hub/{}", upkeep_proto::VERSION));
        if !secret.is_empty() {
            req = req.header(SIGNATURE_HEADER, sign(secret, &body));
        }
        let req = req.body(Full::new(Bytes::from(body))).map_err(|e| format!("building the request: {e}"))?;
        let resp = sender.send_request(req).await.map_err(|e| format!("request failed: {e}"))?;
        let status = resp.status();
        // Read (and drop) the answer's body, so that the connection ends cleanly.
        let _ = resp.into_body().collect().await;
        conn.abort();
        if status.is_success() { Ok(()) } else { Err(format!("the receiver answered HTTP {}", status.as_u16())) }
    }
}

/// TLS for https receivers: the system roots plus `[webhooks] ca_file`.
fn client_config(ca_file: Option<&PathBuf>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let _ = roots.add_parsable_certificates(native.certs);
    if let Some(p) = ca_file {
        let pem = std::fs::read(p).map_err(|e| format!("webhooks.ca_file: {}: {e}", p.display()))?;
        for c in CertificateDer::pem_slice_iter(&pem) {
            let c = c.map_err(|e| format!("webhooks.ca_file: {}: {e}", p.display()))?;
            roots.add(c).map_err(|e| format!("webhooks.ca_file: {}: {e}", p.display()))?;
        }
    }
    if roots.is_empty() {
        return Err("no CA to check a receiver's certificate against: install ca-certificates or set \
                    [webhooks] ca_file in hub.toml"
            .into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn patterns_match_by_segment_with_a_trailing_star_for_the_rest() {
        assert!(type_matches(&p(&["run.*"]), "upkeep.run.member.completed"));
        assert!(type_matches(&p(&["run.*"]), "upkeep.run.run.running"));
        assert!(!type_matches(&p(&["run.*"]), "upkeep.node.ready"));
        assert!(!type_matches(&p(&["run.*"]), "upkeep.run"), "a star stands for at least one segment");
        assert!(type_matches(&p(&["node.ready"]), "upkeep.node.ready"));
        assert!(!type_matches(&p(&["node.ready"]), "upkeep.node.ready.extra"), "exact patterns are whole");
        assert!(!type_matches(&p(&["node.ready"]), "upkeep.node.unknown"));
        assert!(type_matches(&p(&["run.*.failed"]), "upkeep.run.member.failed"));
        assert!(!type_matches(&p(&["run.*.failed"]), "upkeep.run.member.completed"));
        assert!(type_matches(&p(&["upkeep.lease.*"]), "upkeep.lease.granted"), "the prefix may be given");
        assert!(type_matches(&p(&["*"]), "upkeep.rollout.started"));
        assert!(type_matches(&p(&["node.*", "lease.expired"]), "upkeep.lease.expired"));
        assert!(!type_matches(&[], "upkeep.node.ready"));
        assert!(!type_matches(&p(&["runs.*"]), "upkeep.run.member.completed"), "no prefix matching inside a segment");
    }

    #[test]
    fn bad_patterns_are_refused_naming_the_flag() {
        for good in ["run.*", "node.ready", "*", "upkeep.lease.*", "run.*.failed"] {
            check_pattern("--events", good).expect(good);
        }
        for bad in ["", "run.", "Run.*", "run..x", "run.m*", "node ready"] {
            let e = check_pattern("--events", bad).expect_err(bad);
            assert!(e.starts_with("--events:"), "{e}");
        }
    }

    #[test]
    fn signatures_are_hmac_sha256_of_the_body_in_hex_and_verify_only_with_the_secret() {
        // RFC 4231 test case 2.
        let s = sign("Jefe", b"what do ya want for nothing?");
        assert_eq!(s, "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        assert!(verify("Jefe", b"what do ya want for nothing?", &s));
        assert!(!verify("jefe", b"what do ya want for nothing?", &s), "another secret");
        assert!(!verify("Jefe", b"what do ya want for nothing!", &s), "another body");
        assert!(!verify("Jefe", b"what do ya want for nothing?", "sha256=zz"));
        assert!(!verify("Jefe", b"what do ya want for nothing?", &s.replace("sha256=", "sha1=")));
    }

    #[test]
    fn urls_are_https_or_http_to_loopback_without_credentials() {
        check_url("--url", "https://hooks.example/x").expect("https");
        check_url("--url", "http://127.0.0.1:8080/in").expect("loopback v4");
        check_url("--url", "http://127.9.9.9/in").expect("all of 127/8");
        check_url("--url", "http://[::1]:9/in").expect("loopback v6");
        for (bad, says) in [
            ("http://hooks.example/x", "plain http"),
            ("http://10.0.0.1/x", "plain http"),
            ("http://localhost/x", "plain http"),
            ("ftp://hooks.example/x", "https://"),
            ("https://user:pw@hooks.example/x", "credentials"),
            ("not a url", "URL"),
        ] {
            let e = check_url("--url", bad).expect_err(bad);
            assert!(e.starts_with("--url:") && e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn retries_back_off_exponentially_with_jitter_up_to_the_cap() {
        for attempts in 1..40 {
            let full = FIRST_RETRY_DELAY.saturating_mul(1 << (attempts - 1).min(16)).min(MAX_RETRY_DELAY);
            let d = retry_delay(attempts);
            assert!(d >= full / 2 && d <= full, "{attempts}: {d:?} of {full:?}");
        }
        assert!(retry_delay(30) <= MAX_RETRY_DELAY);
    }

    #[test]
    fn run_events_become_typed_cloudevents_with_the_outbox_sequence_as_id() {
        let rec = crate::store::EventRecord {
            seq: 42,
            run: "r1".into(),
            event: crate::store::NewEvent {
                at_ms: 1_700_000_000_123,
                kind: "member".into(),
                level: "member \"m1\"".into(),
                from: "NotStarted".into(),
                to: "Running".into(),
                message: "m".into(),
                error: String::new(),
                run_status: "Running".into(),
            },
        };
        let o = crate::store::run_event_outbox(&rec);
        assert_eq!(o.event_type, "upkeep.run.member.running");
        assert_eq!(o.subject, "runs/r1");
        let ce = cloudevent("upkeep://hub/h", 7, &o);
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["id"], "7");
        assert_eq!(ce["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(ce["data"]["seq"], 42);
        assert_eq!(ce["data"]["from"], "NotStarted");
        assert_eq!(snake("NotStarted"), "not_started");
    }
}
