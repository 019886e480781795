//! The HTTP connection server: accepts connections up to a limit, serves
//! each with hyper (HTTP/1.1, keep-alive), bounds how long a stalled client
//! holds one, and drains them on shutdown.
//!
//! It owns connections, never requests: what a request means is decided by
//! the router it is given.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Sleep;

use crate::config::ServerConfig;
use crate::listen::{Listeners, Port, accept_any};
use crate::node::Node;
use crate::shutdown::Shutdown;

/// After shutdown fires, how long in-flight requests get to finish before
/// their connections are dropped and [`serve`] returns anyway.
pub const SHUTDOWN_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause after a failed `accept` (for example, out of file descriptors)
/// before the next one, so that the loop does not spin on the error.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Largest request head (request line and headers) a connection buffers;
/// a larger one is answered 431. It bounds hyper's read buffer, which hyper
/// checks before each read, so a head may overrun it by up to one read.
pub const HEAD_BYTES_MAX: usize = 64 * 1024;

/// Serves `router(node, config)` on `listener` until `shutdown` fires, then
/// stops accepting, lets in-flight requests finish (up to
/// [`SHUTDOWN_DRAIN_TIMEOUT`]) and returns.
///
/// At most `config.http_connections_max` connections are open at once; one
/// more is closed as soon as it is accepted. A client that takes longer
/// than `config.frame_timeout` to send a request head (or that leaves a
/// kept-alive connection idle that long), to send a request body, or to
/// take a response it is sent, is disconnected.
///
/// Errors on single connections are logged and never end the server; the
/// `Result` is for the listener itself.
pub async fn serve(
    listener: TcpListener,
    node: Node,
    config: Arc<ServerConfig>,
    shutdown: Shutdown,
) -> io::Result<()> {
    serve_on(Listeners::plain(listener), node, config, shutdown).await
}

/// Serves as [`serve`] does, on a plaintext listener, an HTTPS listener, or
/// both, under one connection limit. Over HTTPS the TLS handshake is
/// bounded by `config.frame_timeout` like a request head.
pub async fn serve_on(
    listeners: Listeners,
    node: Node,
    config: Arc<ServerConfig>,
    mut shutdown: Shutdown,
) -> io::Result<()> {
    let router = super::router(node, config.clone());
    let permits = Arc::new(Semaphore::new(config.http_connections_max));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(config.frame_timeout)
        .max_buf_size(HEAD_BYTES_MAX);
    if let Some(addr) = listeners.plain.as_ref().and_then(|l| l.local_addr().ok()) {
        tracing::info!(%addr, "HTTP front end listening");
    }
    if let Some(addr) = listeners.tls_listener().and_then(|l| l.local_addr().ok()) {
        tracing::info!(%addr, "HTTP front end listening for HTTPS");
    }
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.fired() => break,
            // Reap finished connections so the set holds only live ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = accept_any(&listeners) => {
                let (stream, peer, port) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "HTTP accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                        continue;
                    }
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    tracing::debug!(
                        %peer,
                        limit = config.http_connections_max,
                        "HTTP connection closed at accept: http_connections_max reached"
                    );
                    drop(stream);
                    continue;
                };
                // Replies are small and answered at once: do not let Nagle
                // hold them back waiting for an ACK.
                let _ = stream.set_nodelay(true);
                let conn = Conn {
                    peer,
                    router: router.clone(),
                    builder: builder.clone(),
                    stall_timeout: config.frame_timeout,
                    shutdown: shutdown.clone(),
                    _permit: permit,
                };
                match port {
                    Port::Plain => {
                        connections.spawn(conn.serve(stream));
                    }
                    Port::Tls => spawn_tls(&mut connections, &listeners, stream, conn),
                }
            }
        }
    }
    drop(listeners);
    crate::shutdown::drain(&mut connections, SHUTDOWN_DRAIN_TIMEOUT, "HTTP").await;
    Ok(())
}

/// What one connection is served with.
struct Conn {
    peer: SocketAddr,
    router: axum::Router,
    builder: http1::Builder,
    stall_timeout: Duration,
    shutdown: Shutdown,
    // Held for the life of the connection: its slot under the limit.
    _permit: OwnedSemaphorePermit,
}

impl Conn {
    /// Serves one connection until the client closes it, it fails or
    /// times out, or shutdown fires and the request in flight (if any) is
    /// answered.
    async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(mut self, stream: S) {
        let io = TokioIo::new(StallGuard::new(stream, self.stall_timeout));
        let connection = self
            .builder
            .serve_connection(io, TowerToHyperService::new(self.router.clone()));
        tokio::pin!(connection);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            _ = self.shutdown.fired() => {
                // Finishes the request in flight, then closes; an idle
                // connection closes at once.
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(peer = %self.peer, error = %e, "HTTP connection ended with an error");
        }
    }
}

/// Starts a task that completes the TLS handshake (bounded by the frame
/// timeout), then serves the connection.
#[cfg(feature = "tls")]
fn spawn_tls(connections: &mut JoinSet<()>, listeners: &Listeners, stream: TcpStream, conn: Conn) {
    let Some((_, tls)) = &listeners.tls else {
        return;
    };
    let tls = tls.clone();
    connections.spawn(async move {
        match tls.accept(stream, conn.stall_timeout).await {
            Ok(stream) => conn.serve(stream).await,
            Err(e) => tracing::debug!(peer = %conn.peer, error = %e, "TLS handshake failed"),
        }
    });
}

#[cfg(not(feature = "tls"))]
fn spawn_tls(_: &mut JoinSet<()>, _: &Listeners, _: TcpStream, _: Conn) {}

/// A stream whose writes fail once they have made no progress for
/// `timeout`: a client that stops reading its replies is disconnected
/// rather than holding a connection slot and a response buffer forever.
/// Reads need no guard here, as hyper's header read timeout and the body
/// read timeout bound them.
struct StallGuard<S> {
    stream: S,
    timeout: Duration,
    /// Running while a write is blocked; cleared by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> StallGuard<S> {
    fn new(stream: S, timeout: Duration) -> Self {
        StallGuard {
            stream,
            timeout,
            stalled: None,
        }
    }

    /// Passes `poll` through, starting the stall timer when it is pending
    /// and failing it when the timer has run out.
    fn guard<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let timeout = self.timeout;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the client took no response bytes for {} ms (frame_timeout)",
                timeout.as_millis()
            ),
        )))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallGuard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.guard(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.guard(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_flush(cx);
        this.guard(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_shutdown(cx);
        this.guard(cx, poll)
    }
}
