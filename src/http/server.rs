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
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "HTTP front end listening");
    }
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.fired() => break,
            // Reap finished connections so the set holds only live ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
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
                connections.spawn(serve_connection(
                    stream,
                    peer,
                    router.clone(),
                    builder.clone(),
                    config.frame_timeout,
                    shutdown.clone(),
                    permit,
                ));
            }
        }
    }
    drop(listener);
    crate::shutdown::drain(&mut connections, SHUTDOWN_DRAIN_TIMEOUT, "HTTP").await;
    Ok(())
}

/// Serves one connection until the client closes it, it fails or times
/// out, or shutdown fires and the request in flight (if any) is answered.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: axum::Router,
    builder: http1::Builder,
    stall_timeout: Duration,
    mut shutdown: Shutdown,
    // Held for the life of the connection: its slot under the limit.
    _permit: OwnedSemaphorePermit,
) {
    let io = TokioIo::new(StallGuard::new(stream, stall_timeout));
    let connection = builder.serve_connection(io, TowerToHyperService::new(router));
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = shutdown.fired() => {
            // Finishes the request in flight, then closes; an idle
            // connection closes at once.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
    }
}

/// A stream whose writes fail once they have made no progress for
/// `timeout`: a client that stops reading its replies is disconnected
/// rather than holding a connection slot and a response buffer forever.
/// Reads need no guard here, as hyper's header read timeout and the body
/// read timeout bound them.
struct StallGuard {
    stream: TcpStream,
    timeout: Duration,
    /// Running while a write is blocked; cleared by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl StallGuard {
    fn new(stream: TcpStream, timeout: Duration) -> Self {
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

impl AsyncRead for StallGuard {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for StallGuard {
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
