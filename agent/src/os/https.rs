//! Image downloads from an https URL: the alternative source a reimage may name (`reimage.image.url`) instead of
//! the hub's FetchImage stream. HTTP/1.1 over rustls with the ring provider, trusting the system roots plus the
//! optional `[image] url_ca`; plain http is refused. A download resumes with `Range: bytes=<staged>-`: a 206
//! continues at the staged offset, a 200 (a server that ignores ranges) restarts from 0, which the stream says
//! with a first chunk at offset 0. Redirects are followed, https only, at most `MAX_REDIRECTS`.
//!
//! This module decides nothing about trust in the image: its bytes go to staging, and the engine checks digest,
//! size and signature against node-local keys before any byte reaches a slot. It spawns no process and writes
//! no file; it reads the CA files only.

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{ACCEPT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE, HOST, LOCATION, RANGE, USER_AGENT};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use upkeep_proto::v1;

/// Limit of the TCP connect and of the TLS handshake, each.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for the response head, and for each piece of the body; then the attempt breaks (and resumes).
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Redirects followed before a download fails.
pub const MAX_REDIRECTS: usize = 5;

/// Streams an artifact from an https URL (a reimage's `image.url`), from `offset`. The first chunk is at
/// `offset`, or at 0 when the source restarts from the beginning (the engine then discards what it staged).
pub trait UrlFetcher: Send + Sync {
    /// Opens `url` at `offset`.
    fn open_url(
        &self,
        url: &str,
        offset: u64,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<v1::ImageChunk, String>>, String>>;
}

/// Downloads images from https URLs.
#[derive(Debug, Clone, Default)]
pub struct HttpsFetcher {
    /// `[image] url_ca`: a CA trusted besides the system roots.
    url_ca: Option<PathBuf>,
}

/// Checks a reimage's image URL: `https://` with a host. The error names the field and the fix.
pub fn check_image_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url.parse().map_err(|e| {
        format!("reimage.image.url: {url:?} is not a URL ({e}); give https://host[:port]/path, or leave it empty")
    })?;
    match uri.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("https") => {}
        Some(s) if s.eq_ignore_ascii_case("http") => {
            return Err(format!(
                "reimage.image.url: {url:?} is plain http; the agent downloads images over https only: serve the image \
                 over https, or leave url empty to fetch it from the hub"
            ));
        }
        _ => {
            return Err(format!(
                "reimage.image.url: {url:?} is not an https:// URL; give https://host[:port]/path, or leave it empty"
            ));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("reimage.image.url: {url:?} names no host; give https://host[:port]/path"));
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(format!(
            "reimage.image.url: {url:?} carries credentials; the agent sends none: put the image where it can be read without them"
        ));
    }
    Ok(uri)
}

/// Parses a 206's `Content-Range: bytes <first>-<last>/<total|*>` into (first, total if known).
pub fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let (range, total) = v.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (first, last) = range.trim().split_once('-')?;
    let (first, last): (u64, u64) = (first.trim().parse().ok()?, last.trim().parse().ok()?);
    if last < first {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((first, total))
}

/// Parses a 416's `Content-Range: bytes */<total>`.
pub fn parse_unsatisfied_range(v: &str) -> Option<u64> {
    v.trim().strip_prefix("bytes */")?.trim().parse().ok()
}

/// The URL a redirect's `Location` points to, against the URL that answered it; https only.
pub fn resolve_location(base: &Uri, location: &str) -> Result<Uri, String> {
    let location = location.trim();
    let absolute = if location.contains("://") {
        location.to_string()
    } else if let Some(rest) = location.strip_prefix("//") {
        format!("https://{rest}")
    } else {
        let authority = base.authority().map_or("", |a| a.as_str());
        let path = if location.starts_with('/') {
            location.to_string()
        } else {
            let dir = base.path().rsplit_once('/').map_or("", |(d, _)| d);
            format!("{dir}/{location}")
        };
        format!("https://{authority}{path}")
    };
    check_image_url(&absolute).map_err(|e| format!("redirected to {location:?}, refused: {e}"))
}

/// The error of a failed TLS handshake, with the likely fix.
fn tls_failure(e: &std::io::Error) -> String {
    let hint = if e.to_string().contains("certificate") {
        "; the server's certificate is not trusted by this node: if a private CA signs it, set [image] url_ca in agent.toml"
    } else {
        ""
    };
    format!("TLS handshake failed: {e}{hint}")
}

impl HttpsFetcher {
    /// Trusting the system roots and, if set, the CA certificates in `url_ca`.
    pub fn new(url_ca: Option<PathBuf>) -> HttpsFetcher {
        HttpsFetcher { url_ca }
    }

    /// The client TLS configuration, built per download so that a renewed system store or CA file is picked up.
    fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        let (_added, _unparsable) = roots.add_parsable_certificates(native.certs);
        if let Some(p) = &self.url_ca {
            let fix = "give a PEM file with the CA certificate that signs the image server's certificate";
            let pem = std::fs::read(p).map_err(|e| format!("image.url_ca: {}: {e}; {fix}", p.display()))?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("image.url_ca: {}: {e}; {fix}", p.display()))?;
            if certs.is_empty() {
                return Err(format!("image.url_ca: {}: no certificate in it; {fix}", p.display()));
            }
            for c in certs {
                roots.add(c).map_err(|e| format!("image.url_ca: {}: {e}; {fix}", p.display()))?;
            }
        }
        if roots.is_empty() {
            let why = native.errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
            return Err(format!(
                "no CA to check an image server's certificate against: the system store is empty ({why}); install the \
                 ca-certificates package or set [image] url_ca in agent.toml"
            ));
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

    /// Streams the image at `url` from `offset` (see the module comment for the chunk offsets).
    pub async fn get(
        &self,
        url: &str,
        offset: u64,
    ) -> Result<BoxStream<'static, Result<v1::ImageChunk, String>>, String> {
        let tls = self.client_config()?;
        let mut uri = check_image_url(url)?;
        for _ in 0..=MAX_REDIRECTS {
            let (resp, sender) = request(&tls, &uri, offset).await.map_err(|e| format!("downloading {uri}: {e}"))?;
            let status = resp.status();
            let header = |name| resp.headers().get(name).and_then(|v: &hyper::header::HeaderValue| v.to_str().ok());
            match status {
                StatusCode::MOVED_PERMANENTLY
                | StatusCode::FOUND
                | StatusCode::SEE_OTHER
                | StatusCode::TEMPORARY_REDIRECT
                | StatusCode::PERMANENT_REDIRECT => {
                    let location = header(LOCATION)
                        .ok_or_else(|| format!("downloading {uri}: HTTP {status} without a Location"))?;
                    let next = resolve_location(&uri, location).map_err(|e| format!("downloading {uri}: {e}"))?;
                    tracing::info!(from = %uri, to = %next, "image download redirected");
                    uri = next;
                }
                StatusCode::OK => {
                    // The whole image: a first download, or a server that ignores ranges (then we restart at 0).
                    let total = header(CONTENT_LENGTH).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
                    if offset > 0 {
                        tracing::warn!(url = %uri, offset, "the image server ignored the range; downloading from the start");
                    }
                    return Ok(chunks(resp, sender, 0, total, uri.to_string()));
                }
                StatusCode::PARTIAL_CONTENT => {
                    let range = header(CONTENT_RANGE).unwrap_or_default();
                    let (first, total) = parse_content_range(range).ok_or_else(|| {
                        format!("downloading {uri}: HTTP 206 with an unreadable Content-Range {range:?}")
                    })?;
                    if first != offset {
                        return Err(format!(
                            "downloading {uri}: asked for bytes from {offset}, the server sent them from {first}"
                        ));
                    }
                    return Ok(chunks(resp, sender, first, total.unwrap_or(0), uri.to_string()));
                }
                StatusCode::RANGE_NOT_SATISFIABLE => {
                    let total = header(CONTENT_RANGE).and_then(parse_unsatisfied_range);
                    if total == Some(offset) {
                        // Everything is staged already (a restart between download and verification).
                        return Ok(futures::stream::empty().boxed());
                    }
                    // The staged part does not fit the server's file: start again from 0.
                    let restart = v1::ImageChunk { offset: 0, data: Vec::new(), total_size: total.unwrap_or(0) };
                    return Ok(futures::stream::iter([Ok(restart)]).boxed());
                }
                _ => return Err(format!("downloading {uri}: the server answered HTTP {status}")),
            }
        }
        Err(format!("downloading {url}: more than {MAX_REDIRECTS} redirects"))
    }
}

impl UrlFetcher for HttpsFetcher {
    fn open_url(
        &self,
        url: &str,
        offset: u64,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<v1::ImageChunk, String>>, String>> {
        let url = url.to_string();
        Box::pin(async move { self.get(&url, offset).await })
    }
}

type Sender = SendRequest<Empty<Bytes>>;

/// One GET on a fresh connection; the sender is returned to keep the connection's dispatcher alive.
async fn request(
    tls: &Arc<rustls::ClientConfig>,
    uri: &Uri,
    offset: u64,
) -> Result<(Response<Incoming>, Sender), String> {
    let host = uri.host().unwrap_or_default();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(443);
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect((bare, port)))
        .await
        .map_err(|_| format!("connecting to {host}:{port}: no answer within {}s", CONNECT_TIMEOUT.as_secs()))?
        .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(bare.to_string()).map_err(|e| format!("server name {bare:?}: {e}"))?;
    let stream =
        tokio::time::timeout(CONNECT_TIMEOUT, tokio_rustls::TlsConnector::from(tls.clone()).connect(name, tcp))
            .await
            .map_err(|_| format!("TLS handshake with {host}:{port}: no answer within {}s", CONNECT_TIMEOUT.as_secs()))?
            .map_err(|e| tls_failure(&e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "image download connection ended");
        }
    });
    let host_header = match uri.port_u16() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    };
    let mut req = Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(HOST, host_header)
        .header(USER_AGENT, format!("upkeep-agent/{}", upkeep_proto::VERSION))
        .header(ACCEPT_ENCODING, "identity");
    if offset > 0 {
        req = req.header(RANGE, format!("bytes={offset}-"));
    }
    let req = req.body(Empty::<Bytes>::new()).map_err(|e| format!("building the request: {e}"))?;
    let resp = tokio::time::timeout(READ_TIMEOUT, sender.send_request(req))
        .await
        .map_err(|_| format!("no response within {}s", READ_TIMEOUT.as_secs()))?
        .map_err(|e| format!("request failed: {e}"))?;
    Ok((resp, sender))
}

/// The body as image chunks from `offset`; a break or a stall ends the stream with an error naming the URL.
fn chunks(
    resp: Response<Incoming>,
    sender: Sender,
    offset: u64,
    total: u64,
    url: String,
) -> BoxStream<'static, Result<v1::ImageChunk, String>> {
    struct State {
        body: Incoming,
        _sender: Sender,
        offset: u64,
        total: u64,
        url: String,
        done: bool,
    }
    let state = State { body: resp.into_body(), _sender: sender, offset, total, url, done: false };
    futures::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            let broke = match tokio::time::timeout(READ_TIMEOUT, st.body.frame()).await {
                Err(_) => format!("no data for {}s", READ_TIMEOUT.as_secs()),
                Ok(None) => return None,
                Ok(Some(Err(e))) => e.to_string(),
                Ok(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else { continue }; // trailers
                    if data.is_empty() {
                        continue;
                    }
                    let chunk = v1::ImageChunk { offset: st.offset, data: data.to_vec(), total_size: st.total };
                    st.offset += data.len() as u64;
                    return Some((Ok(chunk), st));
                }
            };
            st.done = true;
            let err = format!("downloading {}: broke at byte {}: {broke}", st.url, st.offset);
            return Some((Err(err), st));
        }
    })
    .boxed()
}

#[cfg(test)]
pub mod testing {
    //! A tiny https server for tests: a certificate from a CA generated in the test, one request per
    //! connection, honouring (or ignoring) `Range`, and able to cut the first response mid-body.

    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A CA generated for one test.
    pub struct TestCa {
        /// Its certificate, PEM.
        pub pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    impl TestCa {
        /// A new CA named `name`.
        pub fn new(name: &str) -> TestCa {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            let cert = params.self_signed(&key).expect("self-signed");
            TestCa { pem: cert.pem(), issuer: Issuer::new(params, key) }
        }

        fn server_config(&self) -> Arc<rustls::ServerConfig> {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
            params.subject_alt_names = vec![SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into())];
            let cert = params.signed_by(&key, &self.issuer).expect("signed");
            let chain = vec![CertificateDer::from(cert.der().to_vec())];
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .expect("server config");
            Arc::new(config)
        }
    }

    /// How the server behaves.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Script {
        /// The first response announces the whole body but the connection is cut after this many bytes.
        pub cut_first_at: Option<usize>,
        /// Answer a ranged request with 206 (else with the whole image, 200).
        pub honour_range: bool,
    }

    /// Good: every request answered in full, ranges honoured.
    pub const GOOD: Script = Script { cut_first_at: None, honour_range: true };

    /// A running server; its task ends with the test's runtime.
    pub struct ImageServer {
        /// `https://127.0.0.1:<port>`.
        pub base: String,
        /// `Range` header of each request for the image (None: no range), in order.
        pub ranges: Arc<Mutex<Vec<Option<String>>>>,
    }

    impl ImageServer {
        /// The image's URL.
        pub fn url(&self) -> String {
            format!("{}/images/test.tar", self.base)
        }

        /// A URL that redirects to the image.
        pub fn moved_url(&self) -> String {
            format!("{}/moved", self.base)
        }

        /// The ranges asked for so far.
        pub fn ranges(&self) -> Vec<Option<String>> {
            self.ranges.lock().expect("ranges").clone()
        }
    }

    /// Serves `data` at `/images/test.tar` (and a redirect to it at `/moved`) with a certificate from `ca`.
    pub async fn serve(ca: &TestCa, data: Vec<u8>, script: Script) -> ImageServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("https://{}", listener.local_addr().expect("addr"));
        let acceptor = tokio_rustls::TlsAcceptor::from(ca.server_config());
        let ranges = Arc::new(Mutex::new(Vec::new()));
        let seen = ranges.clone();
        let data = Arc::new(data);
        tokio::spawn(async move {
            let mut first = true;
            while let Ok((tcp, _)) = listener.accept().await {
                // A client that refuses the certificate ends the handshake: nothing to serve.
                let Ok(mut tls) = acceptor.accept(tcp).await else { continue };
                let head = read_head(&mut tls).await;
                let path = head.lines().next().and_then(|l| l.split(' ').nth(1)).unwrap_or("/").to_string();
                if path == "/moved" {
                    let _ = tls
                        .write_all(b"HTTP/1.1 302 Found\r\nLocation: /images/test.tar\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await;
                    let _ = tls.shutdown().await;
                    continue;
                }
                let range = head.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim().eq_ignore_ascii_case("range").then(|| v.trim().to_string())
                });
                seen.lock().expect("ranges").push(range.clone());
                let from = range
                    .as_deref()
                    .filter(|_| script.honour_range)
                    .and_then(|r| r.strip_prefix("bytes="))
                    .and_then(|r| r.strip_suffix('-'))
                    .and_then(|r| r.parse::<usize>().ok());
                let len = data.len();
                let (head, body) = match from {
                    Some(n) if n >= len => (
                        format!(
                            "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        ),
                        &data[0..0],
                    ),
                    Some(n) => (
                        format!(
                            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {n}-{}/{len}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            len - 1,
                            len - n
                        ),
                        &data[n..],
                    ),
                    None => {
                        (format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"), &data[..])
                    }
                };
                let cut = if first { script.cut_first_at } else { None };
                first = false;
                let _ = tls.write_all(head.as_bytes()).await;
                match cut {
                    Some(at) => {
                        // Announce everything, send part, drop the connection without a TLS close.
                        let _ = tls.write_all(&body[..at.min(body.len())]).await;
                        let _ = tls.flush().await;
                        drop(tls);
                    }
                    None => {
                        let _ = tls.write_all(body).await;
                        let _ = tls.shutdown().await;
                    }
                }
            }
        });
        ImageServer { base, ranges }
    }

    async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") && buf.len() < 16 * 1024 {
            match s.read(&mut byte).await {
                Ok(1) => buf.push(byte[0]),
                _ => break,
            }
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_urls_with_a_host_are_accepted_naming_the_field() {
        assert!(check_image_url("https://images.example/a/b.tar?sig=1").is_ok());
        assert!(check_image_url("HTTPS://images.example:8443/x").is_ok());
        for (url, want) in [
            ("http://images.example/x.tar", "is plain http; the agent downloads images over https only"),
            ("ftp://images.example/x.tar", "is not an https:// URL"),
            ("/x.tar", "is not an https:// URL"),
            ("https://user:pw@images.example/x", "carries credentials"),
            ("not a url", "is not a URL"),
        ] {
            let e = check_image_url(url).expect_err(url);
            assert!(e.starts_with("reimage.image.url: ") && e.contains(want), "{url}: {e}");
        }
    }

    #[test]
    fn content_ranges_and_redirects() {
        assert_eq!(parse_content_range("bytes 100-4999/5000"), Some((100, Some(5000))));
        assert_eq!(parse_content_range("bytes 0-9/*"), Some((0, None)));
        assert_eq!(parse_content_range("bytes 9-1/10"), None);
        assert_eq!(parse_content_range("items 0-9/10"), None);
        assert_eq!(parse_unsatisfied_range("bytes */5000"), Some(5000));
        assert_eq!(parse_unsatisfied_range("bytes 0-1/2"), None);
        let base: Uri = "https://a.example:8443/images/x.tar".parse().expect("uri");
        let to = |l: &str| resolve_location(&base, l).map(|u| u.to_string());
        assert_eq!(to("/other/y.tar").expect("abs path"), "https://a.example:8443/other/y.tar");
        assert_eq!(to("y.tar").expect("relative"), "https://a.example:8443/images/y.tar");
        assert_eq!(to("https://cdn.example/z").expect("absolute"), "https://cdn.example/z");
        assert_eq!(to("//cdn.example/z").expect("scheme-relative"), "https://cdn.example/z");
        let e = to("http://cdn.example/z").expect_err("downgrade");
        assert!(e.contains("redirected to \"http://cdn.example/z\", refused") && e.contains("plain http"), "{e}");
    }
}
