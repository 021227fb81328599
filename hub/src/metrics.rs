//! Prometheus metrics on a listener of their own (`[metrics] listen`), apart from the mTLS port: plain HTTP,
//! loopback unless the operator says otherwise, `GET /metrics` only, in the OpenMetrics text format.
//!
//! Most values are read when scraped: agents connected, certificates revoked, the expiry time of the hub's own
//! certificates (`tls.cert`, `tls.ca`, `tls.issuer_cert`; an alert fires two weeks ahead,
//! packaging/hub/upkeep-alerts.yml), nodes by member/status/channel, each node's image identity (an info
//! metric), runs by status, leases by kind of holder. Those read the store, so a scrape of a 100k-node hub reads
//! every node row: scrape it every 30 s or more. A few things are counted as they happen (`counters::Counters`,
//! kept in the `Fleet`): steps of node work by step and result with their durations, the lease desk's decisions,
//! run handoffs and run commits.
//! No series has a per-node label except the info metric. The one listener serves at most `MAX_SCRAPES`
//! connections at once.

use crate::fleet::Fleet;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Scrapes served at once; more wait for their turn.
pub const MAX_SCRAPES: usize = 4;
/// How long a scraper may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The OpenMetrics text format's content type.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A certificate the hub uses, by its setting.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabels {
    certificate: String,
}

/// Node labels of the fleet gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    member: String,
    status: String,
    channel: String,
}

/// One node's image identity (an info metric: value 1).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeImageLabels {
    node: String,
    member: String,
    node_image_version: String,
    security_patch_version: String,
}

/// A run's status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    status: String,
}

/// An image family.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FamilyLabels {
    family: String,
}

/// Who holds leases (`run`, `rollout`, `reboot`, `operator`, `node`: the holder's kind, not its name).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HolderLabels {
    holder: String,
}

/// The kinds of lease holder (`run/<run>/<member>`, `rollout/<member>`, `reboot/<node>`, `operator/<name>`, and
/// `node` for leases agents took from hubs before the one executor).
const HOLDER_KINDS: [&str; 5] = ["run", "rollout", "reboot", "operator", "node"];

/// What the metrics are read from.
pub struct Source {
    fleet: Arc<Fleet>,
    /// (setting, file) of the hub's certificates.
    certs: Vec<(&'static str, PathBuf)>,
}

impl Source {
    /// Metrics of `fleet` and of the certificates `certs` ((setting, file) pairs).
    pub fn new(fleet: Arc<Fleet>, certs: Vec<(&'static str, PathBuf)>) -> Source {
        Source { fleet, certs }
    }

    /// The metrics now, in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut registry = Registry::default();
        let connected = Gauge::<i64>::default();
        connected.set(i64::try_from(self.fleet.connected_count()).unwrap_or(i64::MAX));
        registry.register("upkeep_agents_connected", "Agent sessions open on this hub", connected);
        let revoked = Gauge::<i64>::default();
        revoked.set(i64::try_from(self.fleet.revocations().list().len()).unwrap_or(i64::MAX));
        registry.register("upkeep_certificates_revoked", "Certificate serials this hub refuses", revoked);
        let expiry = Family::<CertLabels, Gauge<i64>>::default();
        for (setting, file) in &self.certs {
            let status = std::fs::read(file)
                .map_err(|e| e.to_string())
                .and_then(|pem| crate::certstatus::status_of_pem(file, &pem, 0, crate::certstatus::WARN_DAYS));
            match status {
                Ok(s) => {
                    expiry.get_or_create(&CertLabels { certificate: (*setting).to_string() }).set(s.not_after_unix);
                }
                Err(e) => {
                    tracing::warn!(setting, file = %file.display(), error = %e, "metrics: cannot read a certificate")
                }
            }
        }
        registry.register(
            "upkeep_certificate_expiry_timestamp_seconds",
            "When each certificate the hub uses expires (Unix time), by its setting",
            expiry,
        );
        self.fleet.counters().register(&mut registry);
        if let Err(e) = self.register_fleet(&mut registry) {
            tracing::warn!(error = %e, "metrics: reading the fleet's state");
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            tracing::error!(error = %e, "metrics: encoding failed");
        }
        out
    }
}

impl Source {
    /// Gauges read from the store at scrape time: nodes by member, status and channel; each node's image
    /// identity; runs by status; leases held by holder kind.
    fn register_fleet(&self, registry: &mut Registry) -> Result<(), crate::store::StoreError> {
        let store = self.fleet.store();
        let now = crate::fleet::now_ms();
        let nodes = Family::<NodeLabels, Gauge<i64>>::default();
        let images = Family::<NodeImageLabels, Gauge<i64>>::default();
        for n in store.list_nodes(None)? {
            let labels = NodeLabels {
                member: n.facts.member.clone(),
                status: self.fleet.status_of(&n, now).as_str().to_string(),
                channel: n.facts.channel.clone(),
            };
            nodes.get_or_create(&labels).inc();
            images
                .get_or_create(&NodeImageLabels {
                    node: n.name.clone(),
                    member: n.facts.member.clone(),
                    node_image_version: n.facts.node_image_version.clone(),
                    security_patch_version: n.facts.security_patch_version.clone(),
                })
                .set(1);
        }
        registry.register("upkeep_nodes", "Nodes by member, status and node OS channel", nodes);
        registry.register(
            "upkeep_node_image",
            "Each node's node-image-version label and security patch (value 1), as `node list` shows them",
            images,
        );
        // Every known status and holder kind is present, at 0 when none: a dashboard or an alert sees 0, not
        // an absent series.
        let runs = Family::<RunLabels, Gauge<i64>>::default();
        for st in upkeep_core::run::Status::ALL {
            runs.get_or_create(&RunLabels { status: st.as_str().to_string() }).set(0);
        }
        for r in store.list_runs()? {
            runs.get_or_create(&RunLabels { status: r.status.clone() }).inc();
        }
        registry.register("upkeep_runs", "Update runs by status", runs);
        let leases = Family::<HolderLabels, Gauge<i64>>::default();
        for kind in HOLDER_KINDS {
            leases.get_or_create(&HolderLabels { holder: kind.to_string() }).set(0);
        }
        for l in store.list_leases()? {
            let kind = l.holder.split('/').next().unwrap_or_default().to_string();
            leases.get_or_create(&HolderLabels { holder: kind }).inc();
        }
        registry.register("upkeep_leases_held", "Nodes out of service under a lease, by the kind of holder", leases);
        let releases = Family::<FamilyLabels, Gauge<i64>>::default();
        for image in store.list_images(None)? {
            releases.get_or_create(&FamilyLabels { family: image.family.clone() }).inc();
        }
        registry.register("upkeep_catalog_releases", "Node image releases in the catalog, by image family", releases);
        Ok(())
    }
}

fn respond(source: &Source, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    match (req.method(), req.uri().path()) {
        (&hyper::Method::GET, "/metrics") => reply(StatusCode::OK, CONTENT_TYPE, source.render()),
        (&hyper::Method::GET, _) => {
            reply(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "only /metrics is served here\n".into())
        }
        _ => reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", "GET /metrics only\n".into()),
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, source: Arc<Source>) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accepting a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let source = source.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let source = source.clone();
                async move { Ok::<_, Infallible>(respond(&source, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .header_read_timeout(READ_TIMEOUT)
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(TokioIo::new(tcp), svc);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "metrics: connection ended");
            }
            drop(permit);
        });
    }
}
