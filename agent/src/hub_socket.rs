//! The TCP connection under the hub session, and how the agent notices a hub that went silent.
//!
//! The session has no HTTP/2 keep-alive pings: each ping and each answer is a wakeup of an idle node, and the
//! heartbeat already crosses the connection every interval. What the heartbeat alone does not give is an
//! answer: the hub acknowledges nothing at the gRPC level. The kernel does: every heartbeat must be
//! acknowledged by the hub's TCP stack, and `TCP_USER_TIMEOUT` makes the kernel abort the connection when sent
//! data stays unacknowledged for longer than `user_timeout_for(heartbeat)`. A hub host that vanished, a network
//! partition or a hub address that moved are so noticed within one interval plus that timeout (3 intervals at
//! most, 6 s at least) with no timer of ours; a hub process that died is noticed at once (its kernel closes the
//! connection). A hub process that is alive but stuck still has its kernel acknowledge, and is not noticed: a
//! new connection would reach the same stuck process, and its own watchdog restarts it.
//!
//! This module only opens the connection (through hyper-util's connector, as tonic would) and keeps the socket
//! option in step with the interval the hub asked for; it decides nothing about the session.

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;
use tonic::codegen::Service;
use tonic::transport::Uri;

/// The least `TCP_USER_TIMEOUT`: shorter, a routine retransmission or two would end the session.
pub const MIN_USER_TIMEOUT: Duration = Duration::from_secs(5);

/// How long heartbeats may stay unacknowledged before the connection is given up: two intervals (so a silent
/// hub is noticed within three), never less than `MIN_USER_TIMEOUT`.
pub fn user_timeout_for(heartbeat: Duration) -> Duration {
    heartbeat.saturating_mul(2).max(MIN_USER_TIMEOUT)
}

/// The user timeout the session's sockets should have, in ms; shared between the session loop (which learns
/// the interval from the hub's Welcome) and every connection it opened.
#[derive(Clone, Debug)]
pub struct Silence(Arc<AtomicU32>);

impl Silence {
    /// Starts at `user_timeout_for(heartbeat)`.
    pub fn new(heartbeat: Duration) -> Silence {
        let s = Silence(Arc::new(AtomicU32::new(0)));
        s.set_heartbeat(heartbeat);
        s
    }

    /// The hub asked for this interval: sockets take the matching timeout at their next write.
    pub fn set_heartbeat(&self, heartbeat: Duration) {
        let ms = u32::try_from(user_timeout_for(heartbeat).as_millis()).unwrap_or(u32::MAX);
        self.0.store(ms, Ordering::Relaxed);
    }

    fn ms(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Heartbeat interval used until the hub's Welcome says otherwise.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);

impl Default for Silence {
    /// Until a Welcome says otherwise: the agent's default heartbeat.
    fn default() -> Silence {
        Silence::new(DEFAULT_HEARTBEAT)
    }
}

/// Connects like tonic's own connector (hyper-util's `HttpConnector`, Nagle off) and hands out sockets that
/// keep `TCP_USER_TIMEOUT` at the `Silence` value.
#[derive(Clone)]
pub struct HubConnector {
    http: HttpConnector,
    silence: Silence,
}

impl HubConnector {
    /// A connector whose sockets follow `silence`.
    pub fn new(silence: Silence) -> HubConnector {
        let mut http = HttpConnector::new();
        // The scheme is https; TLS is layered on top by tonic.
        http.enforce_http(false);
        http.set_nodelay(true);
        HubConnector { http, silence }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Service<Uri> for HubConnector {
    type Response = HubSocket;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<HubSocket, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.http.call(uri);
        let silence = self.silence.clone();
        Box::pin(async move {
            let io = connecting.await?;
            let mut socket = HubSocket { io, silence, applied_ms: 0 };
            socket.keep_user_timeout();
            Ok(socket)
        })
    }
}

/// A connected socket to the hub that applies a changed user timeout before its next write.
pub struct HubSocket {
    io: TokioIo<TcpStream>,
    silence: Silence,
    applied_ms: u32,
}

impl HubSocket {
    fn keep_user_timeout(&mut self) {
        let want = self.silence.ms();
        if want == self.applied_ms {
            return;
        }
        // Applied once per change; on failure the session works as before, without the bound.
        match nix::sys::socket::setsockopt(self.io.inner(), nix::sys::socket::sockopt::TcpUserTimeout, &want) {
            Ok(()) => {}
            Err(e) => tracing::warn!(error = %e, "cannot set TCP_USER_TIMEOUT: a silent hub is noticed later"),
        }
        self.applied_ms = want;
    }

    /// The socket's `TCP_USER_TIMEOUT` now, ms (for tests).
    pub fn user_timeout_ms(&self) -> std::io::Result<u32> {
        Ok(nix::sys::socket::getsockopt(self.io.inner(), nix::sys::socket::sockopt::TcpUserTimeout)?)
    }
}

impl hyper::rt::Read for HubSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for HubSocket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.keep_user_timeout();
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.keep_user_timeout();
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_intervals_and_never_under_five_seconds() {
        assert_eq!(user_timeout_for(Duration::from_secs(10)), Duration::from_secs(20));
        assert_eq!(user_timeout_for(Duration::from_secs(60)), Duration::from_secs(120));
        assert_eq!(user_timeout_for(Duration::from_secs(1)), MIN_USER_TIMEOUT);
    }

    #[tokio::test]
    async fn a_socket_takes_the_timeout_at_connect_and_a_new_interval_at_its_next_write() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accept = tokio::spawn(async move { listener.accept().await.map(|(s, _)| s) });
        let silence = Silence::new(Duration::from_secs(10));
        let mut connector = HubConnector::new(silence.clone());
        let uri: Uri = format!("https://{addr}").parse().expect("uri");
        let mut socket = connector.call(uri).await.expect("connect");
        let _peer = accept.await.expect("join").expect("accept");
        assert_eq!(socket.user_timeout_ms().expect("getsockopt"), 20_000);
        silence.set_heartbeat(Duration::from_secs(3));
        assert_eq!(socket.user_timeout_ms().expect("getsockopt"), 20_000, "not before a write");
        let written = std::future::poll_fn(|cx| hyper::rt::Write::poll_write(Pin::new(&mut socket), cx, b"x"))
            .await
            .expect("write");
        assert_eq!(written, 1);
        assert_eq!(socket.user_timeout_ms().expect("getsockopt"), 6_000);
    }
}
