//! The hub's front door: TCP accept, the TLS handshake with a deadline, and a bounded number of connections.
//!
//! A client certificate is optional at the TLS layer (so that `upkeep-agent join`, which has none yet, can reach
//! `JoinService`), but one that is presented must chain to the fleet CA, or the handshake fails. Every handler but
//! the join refuses a caller without a certificate (`grpc::principal_of`; the tidy test checks they all call it).
//! Nothing may exhaust the hub on the way there:
//! - every TLS handshake must finish within `handshake_timeout`, or the connection is closed (a client that opens
//!   a socket and says nothing holds it for that long, not forever);
//! - at most `max_connections` connections (handshaking or established) are open at once, set below the
//!   process's descriptor limit with room for the store, the artifacts and the log: past it, a new connection is
//!   accepted and closed at once, so existing sessions keep working instead of failing on `EMFILE`;
//! - node certificates may hold at most `max_connections - operator_reserve` of them, so an operator's
//!   `upkeepctl` still gets in while agents (or someone with a node certificate) fill the door;
//! - a node connection that sends nothing for `node_idle` is closed: a live agent heartbeats on it every interval,
//!   so a silent one is dead, frozen or cut off, and its descriptor goes back to the door (the hub sends no HTTP/2
//!   pings; see `server.rs`).
//!
//! Connections handed to tonic are [`Conn`]s: the TLS stream plus the slot it occupies, given back when tonic
//! drops the connection.

use crate::client_verifier::FleetClientVerifier;
use crate::revocation::Revocations;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};
use upkeep_core::ids::Role;

/// Descriptors kept for everything but client connections (store, WAL, artifacts, logs, the runtime).
pub const FD_RESERVE: usize = 256;
/// Connections only operator and viewer certificates may use once node certificates hold all the others.
pub const OPERATOR_RESERVE: usize = 64;
/// Default TLS handshake deadline.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The least time a node connection may be silent past its silence deadline before it is closed (room for a slow
/// agent, a busy hub and the network; with long heartbeat intervals the slack is one interval).
pub const NODE_IDLE_SLACK: Duration = Duration::from_secs(10);

/// The door's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DoorLimits {
    /// Connections open at once, all kinds.
    pub max_connections: usize,
    /// Of those, kept for operators and viewers.
    pub operator_reserve: usize,
    /// A TLS handshake not finished by then is dropped.
    pub handshake_timeout: Duration,
    /// A node connection from which nothing was read for this long is closed (None: never).
    pub node_idle: Option<Duration>,
    /// A connection without a client certificate is closed this long after its handshake.
    pub certless_lifetime: Duration,
}

impl DoorLimits {
    /// Limits for this process: raises the soft descriptor limit to the hard one, then keeps [`FD_RESERVE`]
    /// descriptors for everything but connections.
    pub fn for_this_process(handshake_timeout: Duration) -> DoorLimits {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let soft = match getrlimit(Resource::RLIMIT_NOFILE) {
            Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                Ok(()) => hard,
                Err(e) => {
                    tracing::warn!(soft, hard, error = %e, "could not raise the descriptor limit");
                    soft
                }
            },
            Ok((soft, _)) => soft,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the descriptor limit; assuming 1024");
                1024
            }
        };
        let soft = usize::try_from(soft).unwrap_or(usize::MAX);
        DoorLimits::within(soft, handshake_timeout)
    }

    /// Limits for a descriptor limit of `nofile`.
    pub fn within(nofile: usize, handshake_timeout: Duration) -> DoorLimits {
        let max_connections = nofile.saturating_sub(FD_RESERVE).max(16);
        let operator_reserve = OPERATOR_RESERVE.min(max_connections / 4);
        DoorLimits {
            max_connections,
            operator_reserve,
            handshake_timeout,
            node_idle: None,
            certless_lifetime: CERTLESS_LIFETIME,
        }
    }

    /// These limits, closing node connections silent past `silence_deadline` (when the hub calls a node Unknown)
    /// by one heartbeat interval, at least [`NODE_IDLE_SLACK`].
    pub fn closing_silent_nodes(self, heartbeat_interval: Duration, silence_deadline: Duration) -> DoorLimits {
        DoorLimits { node_idle: Some(silence_deadline + heartbeat_interval.max(NODE_IDLE_SLACK)), ..self }
    }
}

/// Builds the rustls server configuration: the hub's identity, client certificates from the fleet CA (optional at
/// this layer: handlers refuse callers without one, but for the token-authenticated join), HTTP/2 only.
/// Client certificates are checked by [`FleetClientVerifier`]: the chain, path lengths, and `revocations`.
pub fn server_config(
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
    revocations: Arc<Revocations>,
) -> Result<rustls::ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(FleetClientVerifier::from_ca_pem(ca_pem, revocations)?);
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert_pem).collect::<Result<_, _>>().map_err(|e| format!("tls.cert: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("tls.key: {e}"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| format!("tls.cert/tls.key: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    // No session resumption: a resumed session takes the client certificate from the stored session and skips
    // the verifier, so a certificate revoked since its first connection would pass the revocation check at the
    // handshake. A full handshake each time costs an agent little (it reconnects rarely), and the hub keeps no
    // cache of sessions with their certificate chains.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// Open connections, by kind (shared by the door and the connections it handed out).
#[derive(Debug, Default)]
pub struct Occupancy {
    /// All connections, handshaking included.
    all: AtomicUsize,
    /// Connections that presented a node certificate.
    nodes: AtomicUsize,
}

impl Occupancy {
    /// Connections open now.
    pub fn open(&self) -> usize {
        self.all.load(Ordering::Relaxed)
    }

    /// Connections of node certificates open now.
    pub fn nodes(&self) -> usize {
        self.nodes.load(Ordering::Relaxed)
    }
}

/// One slot of the door, given back on drop.
struct Slot {
    occupancy: Arc<Occupancy>,
    node: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.occupancy.all.fetch_sub(1, Ordering::Relaxed);
        if self.node {
            self.occupancy.nodes.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// An established connection: the TLS stream, its slot, for node connections the idle deadline, and for
/// connections with a client certificate the watch that ends them when that certificate is revoked.
pub struct Conn {
    tls: TlsStream<TcpStream>,
    _slot: Slot,
    idle: Option<Idle>,
    watch: Option<RevocationWatch>,
}

/// A connection's client certificate, watched for revocation: before each read the connection compares the
/// revocations' generation with the one it saw, and looks its serial up only when it moved. A certificate revoked
/// while its connection is open (`pki revoke`, `node forget`) thus ends the connection at the next thing its peer
/// sends, before that is served.
struct RevocationWatch {
    revocations: Arc<Revocations>,
    serial: String,
    seen: u64,
}

impl RevocationWatch {
    fn new(revocations: Arc<Revocations>, tls: &TlsStream<TcpStream>) -> Option<RevocationWatch> {
        let leaf = tls.get_ref().1.peer_certificates()?.first()?;
        let serial = crate::revocation::serial_of_der(leaf.as_ref()).ok()?;
        let seen = revocations.generation();
        Some(RevocationWatch { revocations, serial, seen })
    }

    /// Err when the certificate has been revoked since the connection opened.
    fn check(&mut self) -> io::Result<()> {
        let now = self.revocations.generation();
        if now == self.seen {
            return Ok(());
        }
        self.seen = now;
        match self.revocations.revoked(&self.serial) {
            None => Ok(()),
            Some(r) => {
                tracing::warn!(serial = %r.serial, subject = %r.subject, "closing a connection: its certificate was revoked");
                Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("certificate serial {} revoked; connection closed", r.serial),
                ))
            }
        }
    }
}

/// Closes a connection nothing was read from for `limit` (node connections), or `limit` after it opened whatever it
/// does (connections without a client certificate: `fixed`). One timer per connection, pushed back on every read
/// unless fixed (tokio only moves a timer in its wheel when it fires before its new deadline, so a push is a store).
struct Idle {
    limit: Duration,
    fixed: bool,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl Idle {
    fn new(limit: Duration) -> Idle {
        Idle { limit, fixed: false, timer: Box::pin(tokio::time::sleep(limit)) }
    }

    fn lifetime(limit: Duration) -> Idle {
        Idle { limit, fixed: true, timer: Box::pin(tokio::time::sleep(limit)) }
    }
}

/// How long a connection without a client certificate may stay open: it can only join (one call), and it must not
/// hold one of the door's slots, kept for nodes and operators, for longer.
pub const CERTLESS_LIFETIME: Duration = Duration::from_secs(30);

impl Connected for Conn {
    type ConnectInfo = TlsConnectInfo<TcpConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tls.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        if let Some(w) = &mut this.watch {
            w.check()?;
        }
        let read = Pin::new(&mut this.tls).poll_read(cx, buf);
        let Some(idle) = &mut this.idle else { return read };
        match read {
            Poll::Ready(Ok(())) if buf.filled().len() > before && !idle.fixed => {
                idle.timer.as_mut().reset(tokio::time::Instant::now() + idle.limit);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Ok(())) if idle.fixed && idle.timer.as_mut().poll(cx).is_ready() => Poll::Ready(Err(
                io::Error::new(io::ErrorKind::TimedOut, "connection without a client certificate past its lifetime"),
            )),
            // Nothing to read: the connection lives on only until the deadline (this registers the waker).
            Poll::Pending if idle.timer.as_mut().poll(cx).is_ready() => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                if idle.fixed {
                    format!("connection without a client certificate open for {} s; closed", idle.limit.as_secs())
                } else {
                    format!("node connection silent for {} s; closed", idle.limit.as_secs())
                },
            ))),
            other => other,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

/// The role in the client certificate of an established connection, if it can be read.
fn role_of(tls: &TlsStream<TcpStream>) -> Option<Role> {
    let (_, session) = tls.get_ref();
    let leaf = session.peer_certificates()?.first()?;
    upkeep_proto::tls::principal_from_der(leaf.as_ref()).ok().map(|p| p.role)
}

/// Accepts connections on `listener` within `limits` and hands established ones to the returned receiver (for
/// `Server::serve_with_incoming_shutdown` through a `ReceiverStream`). Runs until the receiver is dropped; the
/// returned task ends then, and the listening socket is closed when it has (await it before binding the address
/// again).
pub fn incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limits: DoorLimits,
    occupancy: Arc<Occupancy>,
    revocations: Arc<Revocations>,
) -> (mpsc::Receiver<io::Result<Conn>>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(tls);
    let door = tokio::spawn(async move {
        let mut refused: u64 = 0;
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors or a transient error: do not spin on it.
                        tracing::warn!(error = %e, "accepting a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            if occupancy.open() >= limits.max_connections {
                refused += 1;
                if refused.is_power_of_two() {
                    tracing::warn!(open = occupancy.open(), max = limits.max_connections, refused, %peer,
                        "connection refused: the hub is at its connection limit");
                }
                drop(tcp);
                continue;
            }
            occupancy.all.fetch_add(1, Ordering::Relaxed);
            let slot = Slot { occupancy: occupancy.clone(), node: false };
            let (acceptor, tx, occupancy, revocations) =
                (acceptor.clone(), tx.clone(), occupancy.clone(), revocations.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake not finished in time; connection closed");
                        return;
                    }
                };
                let mut slot = slot;
                let mut idle = None;
                if tls.get_ref().1.peer_certificates().is_none_or(|c| c.is_empty()) {
                    // No certificate: only a join can be served on it (every other handler refuses such a caller).
                    idle = Some(Idle::lifetime(limits.certless_lifetime));
                } else if role_of(&tls) == Some(Role::Node) {
                    let cap = limits.max_connections.saturating_sub(limits.operator_reserve);
                    if occupancy.nodes.fetch_add(1, Ordering::Relaxed) >= cap {
                        occupancy.nodes.fetch_sub(1, Ordering::Relaxed);
                        tracing::warn!(%peer, cap, "node connection refused: the rest is kept for operators");
                        return;
                    }
                    slot.node = true;
                    idle = limits.node_idle.map(Idle::new);
                }
                let watch = RevocationWatch::new(revocations, &tls);
                let _ = tx.send(Ok(Conn { tls, _slot: slot, idle, watch })).await;
            });
        }
    });
    (rx, door)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn a_connection_without_a_client_certificate_is_closed_after_its_lifetime_whatever_it_sends() {
        let dir = tempfile::tempdir().expect("tmp");
        crate::pki::init(dir.path(), &[]).expect("pki");
        let read = |f: &str| std::fs::read(dir.path().join(f)).expect(f);
        let server = server_config(&read("ca.pem"), &read("hub.pem"), &read("hub.key"), Arc::new(Revocations::none()))
            .expect("server config");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let limits = DoorLimits {
            certless_lifetime: Duration::from_secs(1),
            ..DoorLimits::within(1000, DEFAULT_HANDSHAKE_TIMEOUT)
        };
        let occupancy = Arc::new(Occupancy::default());
        let (mut conns, _door) =
            incoming(listener, Arc::new(server), limits, occupancy.clone(), Arc::new(Revocations::none()));

        // A client with the fleet CA but no certificate of its own (what `upkeep-agent join` is).
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&read("ca.pem")) {
            roots.add(c.expect("ca")).expect("root");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, tcp).await.expect("handshake");
        let mut conn = conns.recv().await.expect("a connection").expect("accepted");
        assert_eq!(occupancy.open(), 1);
        let opened = tokio::time::Instant::now();
        // The client keeps talking; the hub side still ends the connection at its lifetime.
        let talker = tokio::spawn(async move {
            loop {
                if tokio::io::AsyncWriteExt::write_all(&mut tls, b"x").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let mut buf = [0u8; 64];
        let ended = loop {
            match tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await.expect("closed in time") {
                Ok(0) => panic!("the client closed first"),
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(ended.kind(), io::ErrorKind::TimedOut, "{ended}");
        assert!(opened.elapsed() >= Duration::from_millis(900), "closed after {:?}", opened.elapsed());
        drop(conn);
        assert_eq!(occupancy.open(), 0, "its slot is given back");
        talker.abort();
    }

    #[tokio::test]
    async fn a_certificate_revoked_after_its_first_connection_is_refused_at_the_next_even_if_it_offers_to_resume() {
        let dir = tempfile::tempdir().expect("tmp");
        crate::pki::init(dir.path(), &[]).expect("pki");
        let read = |f: &str| std::fs::read(dir.path().join(f)).expect(f);
        let revocations = Arc::new(Revocations::none());
        let server = server_config(&read("ca.pem"), &read("hub.pem"), &read("hub.key"), revocations.clone())
            .expect("server config");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let limits = DoorLimits::within(1000, DEFAULT_HANDSHAKE_TIMEOUT);
        let (mut conns, _door) =
            incoming(listener, Arc::new(server), limits, Arc::new(Occupancy::default()), revocations.clone());

        // An operator client whose configuration keeps sessions for resumption (rustls' default).
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&read("ca.pem")) {
            roots.add(c.expect("ca")).expect("root");
        }
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&read("operator.pem")).collect::<Result<_, _>>().expect("chain");
        let leaf_serial = crate::revocation::serial_of_der(chain[0].as_ref()).expect("serial");
        let key = PrivateKeyDer::from_pem_slice(&read("operator.key")).expect("key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .expect("client cert");
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");

        let tcp = TcpStream::connect(addr).await.expect("connect");
        let mut first = connector.connect(name.clone(), tcp).await.expect("first handshake");
        let mut conn = conns.recv().await.expect("a connection").expect("accepted");
        // One exchange, so that the client has read whatever the server sent after the handshake (tickets).
        tokio::io::AsyncWriteExt::write_all(&mut conn, b"hello").await.expect("server writes");
        let mut buf = [0u8; 5];
        first.read_exact(&mut buf).await.expect("client reads");
        drop((first, conn));

        revocations.revoke(&leaf_serial, "test", "door test").expect("revoke");
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let second = connector.connect(name, tcp).await;
        // The server refuses at the handshake; TLS 1.3 clients learn it at their first read.
        let refused = match second {
            Err(_) => true,
            Ok(mut tls) => {
                assert_ne!(tls.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Resumed), "resumed");
                matches!(tls.read(&mut buf).await, Err(_) | Ok(0))
            }
        };
        assert!(refused, "a revoked certificate got a connection");
        assert!(
            tokio::time::timeout(Duration::from_millis(500), conns.recv()).await.is_err(),
            "the door handed out a connection for a revoked certificate"
        );
    }

    #[test]
    fn limits_stay_below_the_descriptor_limit_and_keep_a_share_for_operators() {
        let l = DoorLimits::within(20_000, DEFAULT_HANDSHAKE_TIMEOUT);
        assert_eq!(l.max_connections, 20_000 - FD_RESERVE);
        assert_eq!(l.operator_reserve, OPERATOR_RESERVE);
        let small = DoorLimits::within(100, DEFAULT_HANDSHAKE_TIMEOUT);
        assert_eq!(small.max_connections, 16);
        assert_eq!(small.operator_reserve, 4);
    }
}
