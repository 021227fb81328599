//! Prometheus metrics on a listener of their own (`[metrics] listen`), apart from the mTLS port: plain HTTP,
//! loopback unless the operator says otherwise, `GET /metrics` only, in the OpenMetrics text format.
//!
//! Values are read when scraped (nothing is counted on the hot paths for this): agents connected, certificates
//! revoked, and the expiry time of the hub's own certificates (`tls.cert`, `tls.ca`, `tls.issuer_cert`), so
//! that an alert can fire two weeks ahead (`upkeep_certificate_expiry_timestamp_seconds - time() < 14 * 86400`;
//! packaging/hub/upkeep-alerts.yml). The one listener serves at most `MAX_SCRAPES` connections at once.

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
            match std::fs::read(file).map_err(|e| e.to_string()).and_then(|pem| not_after_unix(&pem)) {
                Ok(t) => {
                    expiry.get_or_create(&CertLabels { certificate: (*setting).to_string() }).set(t);
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
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            tracing::error!(error = %e, "metrics: encoding failed");
        }
        out
    }
}

/// Not-after of the first certificate in `pem`, Unix seconds.
pub fn not_after_unix(pem: &[u8]) -> Result<i64, String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, block) = x509_parser::pem::parse_x509_pem(pem).map_err(|e| format!("bad PEM: {e}"))?;
    let (_, cert) = X509Certificate::from_der(&block.contents).map_err(|e| format!("bad certificate: {e}"))?;
    Ok(cert.validity().not_after.timestamp())
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
