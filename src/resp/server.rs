//! The listener and the per-connection loop: accepting within the
//! connection limit, one task per connection, and graceful shutdown.
//!
//! Each connection task repeats one round: take the complete requests
//! buffered (at most `resp_pipeline_depth_max`), run them through the
//! pipeline, write their replies with one flush, then read more bytes. On
//! shutdown the listener closes, each connection finishes the requests it
//! has already received, flushes their replies and closes, and [`serve`]
//! returns once every connection task has ended, or after
//! [`SHUTDOWN_DRAIN_TIMEOUT`] at the latest.
//!
//! A connection's failure (a reset, a protocol error, a stalled request)
//! ends that connection only, and is logged at debug level: it is the
//! client's business, not the operator's.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::shutdown::Shutdown;
use crate::{Node, ServerConfig};

use crate::listen::{Listeners, Port, accept_any};

use super::cmd::{Context, Session};
use super::connection::{Connection, ReadError, linger_close};
use super::frame::{Frame, Limits};
use super::pipeline::{self, Flow};

/// Longest wait, at shutdown, for connections to finish what they have
/// received; connections still open after it are dropped.
pub const SHUTDOWN_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Most connections being turned away at once (each gets its error reply
/// and a short linger). Beyond it, a connection over the limit is closed
/// without a reply, so a flood of connections cannot grow this number.
pub const REJECTING_CONNECTIONS_MAX: usize = 64;

/// First pause after a failed `accept` (out of file descriptors, say);
/// it doubles on each further failure up to [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// State shared by the listener and every connection.
pub struct Shared {
    pub node: Node,
    pub config: Arc<ServerConfig>,
    pub limits: Limits,
    /// The listening address (`INFO`'s `tcp_port`).
    pub local_addr: SocketAddr,
    /// One permit per open connection: the semaphore is the connection
    /// limit, and its free permits say how many more may open.
    connections: Arc<Semaphore>,
    connections_max: usize,
    next_client_id: AtomicU64,
    pub stats: ServerStats,
}

impl Shared {
    /// Connections open now.
    pub fn connected_clients(&self) -> usize {
        self.connections_max - self.connections.available_permits()
    }
}

/// Counts for `INFO stats`. Relaxed atomics: they are statistics, and
/// nothing is decided by them.
#[derive(Debug, Default)]
pub struct ServerStats {
    connections_received: AtomicU64,
    connections_rejected: AtomicU64,
    commands_processed: AtomicU64,
}

impl ServerStats {
    pub fn connections_received(&self) -> u64 {
        self.connections_received.load(Ordering::Relaxed)
    }

    pub fn connections_rejected(&self) -> u64 {
        self.connections_rejected.load(Ordering::Relaxed)
    }

    pub fn commands_processed(&self) -> u64 {
        self.commands_processed.load(Ordering::Relaxed)
    }

    /// Counted once per round rather than per command, to keep shared
    /// cache lines out of the per-command path.
    pub fn count_commands(&self, n: usize) {
        self.commands_processed
            .fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Serves RESP on `listener` until `shutdown` fires; see [`serve_on`].
pub async fn serve(
    listener: TcpListener,
    node: Node,
    config: Arc<ServerConfig>,
    shutdown: Shutdown,
) -> io::Result<()> {
    serve_on(Listeners::plain(listener), node, config, shutdown).await
}

/// Serves RESP on `listeners` until `shutdown` fires, then waits (at most
/// [`SHUTDOWN_DRAIN_TIMEOUT`]) for connections to answer what they have
/// received, and returns. The node is left running: the caller shuts it
/// down afterwards, so that every reply sent was for a node still up.
pub async fn serve_on(
    listeners: Listeners,
    node: Node,
    config: Arc<ServerConfig>,
    mut shutdown: Shutdown,
) -> io::Result<()> {
    // A limit of zero would refuse everyone; tokio's semaphore caps the
    // other end.
    let connections_max = config.resp_connections_max.clamp(1, Semaphore::MAX_PERMITS);
    let shared = Arc::new(Shared {
        node,
        limits: Limits::from_config(&config),
        local_addr: listeners.first_addr()?,
        connections: Arc::new(Semaphore::new(connections_max)),
        connections_max,
        next_client_id: AtomicU64::new(1),
        stats: ServerStats::default(),
        config,
    });
    let rejecting = Arc::new(Semaphore::new(REJECTING_CONNECTIONS_MAX));
    let mut tasks = JoinSet::new();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    if let Some(l) = &listeners.plain {
        tracing::info!(addr = %l.local_addr()?, "RESP front end listening");
    }
    if let Some(l) = listeners.tls_listener() {
        tracing::info!(addr = %l.local_addr()?, "RESP front end listening for TLS");
    }

    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.fired() => break,
            Some(ended) = tasks.join_next(), if !tasks.is_empty() => {
                log_task_end(ended);
                continue;
            }
            a = accept_any(&listeners) => a,
        };
        match accepted {
            Ok((stream, peer, port)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                shared
                    .stats
                    .connections_received
                    .fetch_add(1, Ordering::Relaxed);
                match shared.connections.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let shared = shared.clone();
                        let shutdown = shutdown.clone();
                        match port {
                            Port::Plain => {
                                tasks.spawn(handle(stream, peer, shared, shutdown, permit));
                            }
                            Port::Tls => {
                                spawn_tls(
                                    &mut tasks, &listeners, stream, peer, shared, shutdown, permit,
                                );
                            }
                        }
                    }
                    Err(_) => {
                        shared
                            .stats
                            .connections_rejected
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, "connection refused: resp_connections_max reached");
                        // Over TLS the error reply would first need a
                        // handshake: the connection is closed without one.
                        if port == Port::Plain
                            && let Ok(permit) = rejecting.clone().try_acquire_owned()
                        {
                            tasks.spawn(reject(stream, permit));
                        }
                    }
                }
            }
            Err(e) => {
                // Usually a transient lack of resources; the listener
                // itself is fine, so wait and go on.
                tracing::warn!(error = %e, pause_ms = backoff.as_millis() as u64, "accept failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.fired() => break,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }

    drop(listeners);
    crate::shutdown::drain(&mut tasks, SHUTDOWN_DRAIN_TIMEOUT, "RESP").await;
    Ok(())
}

/// Starts a task that completes the TLS handshake on `stream`, bounded by
/// the frame timeout, then serves the connection.
#[cfg(feature = "tls")]
fn spawn_tls(
    tasks: &mut JoinSet<()>,
    listeners: &Listeners,
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Shutdown,
    slot: OwnedSemaphorePermit,
) {
    let Some((_, tls)) = &listeners.tls else {
        return;
    };
    let tls = tls.clone();
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %e, "could not set TCP_NODELAY");
    }
    tasks.spawn(async move {
        let local = stream.local_addr();
        match tls.accept(stream, shared.config.frame_timeout).await {
            Ok(stream) => handle_stream(stream, local, peer, shared, shutdown, slot).await,
            Err(e) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
        }
    });
}

#[cfg(not(feature = "tls"))]
fn spawn_tls(
    _: &mut JoinSet<()>,
    _: &Listeners,
    _: TcpStream,
    _: SocketAddr,
    _: Arc<Shared>,
    _: Shutdown,
    _: OwnedSemaphorePermit,
) {
}

fn log_task_end(ended: Result<(), tokio::task::JoinError>) {
    match ended {
        Err(e) if e.is_panic() => tracing::error!(error = %e, "RESP connection task panicked"),
        _ => {}
    }
}

/// Answers a connection over the limit as Redis does, then closes it.
async fn reject(stream: TcpStream, _slot: OwnedSemaphorePermit) {
    let reply = Frame::Error("ERR max number of clients reached".into());
    let mut bytes = bytes::BytesMut::new();
    reply.encode(&mut bytes);
    // A new socket's send buffer is empty: this write does not block.
    if stream.try_write(&bytes).is_ok() {
        linger_close(stream).await;
    }
}

/// One plaintext connection, from accept to close.
async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Shutdown,
    slot: OwnedSemaphorePermit,
) {
    // Replies are written once per round; Nagle's delay would only add
    // latency to each round trip.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %e, "could not set TCP_NODELAY");
    }
    let local = stream.local_addr();
    handle_stream(stream, local, peer, shared, shutdown, slot).await
}

/// One connection over `stream` (TCP, or TLS over TCP), from its first
/// request to close.
async fn handle_stream<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    local: io::Result<SocketAddr>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut shutdown: Shutdown,
    _slot: OwnedSemaphorePermit,
) {
    let id = shared.next_client_id.fetch_add(1, Ordering::Relaxed);
    let mut session = Session::new(id, peer, local.unwrap_or(shared.local_addr));
    let mut conn = Connection::new(stream, shared.limits, shared.config.frame_timeout);
    let depth = shared.config.resp_pipeline_depth_max.max(1);
    let mut frames = Vec::new();
    let mut replies = Vec::new();
    tracing::debug!(%peer, id, "connection opened");

    loop {
        let parsed = conn.read_frames(depth, &mut frames);
        let ran = !frames.is_empty();
        if ran {
            let mut cx = Context {
                session: &mut session,
                shared: &shared,
            };
            let flow = pipeline::run(&mut frames, &mut cx, &mut replies).await;
            for (reply, protocol) in replies.drain(..) {
                conn.queue(&reply, protocol);
            }
            if flow == Flow::Quit {
                conn.close_with(None).await;
                break;
            }
            if let Err(e) = conn.flush().await {
                tracing::debug!(%peer, id, error = %e, "write failed; closing");
                break;
            }
        }
        if let Err(e) = parsed {
            tracing::debug!(%peer, id, error = %e, "protocol error; closing");
            conn.close_with(Some(&Frame::Error(format!("ERR {e}"))))
                .await;
            break;
        }
        if ran {
            // More complete requests may be buffered beyond this round.
            continue;
        }
        if shutdown.is_fired() {
            conn.close_with(None).await;
            break;
        }
        let read = tokio::select! {
            read = conn.read_more() => read,
            _ = shutdown.fired() => {
                // Every received request is answered; close without
                // letting unread input turn the close into a reset.
                conn.close_with(None).await;
                break;
            }
        };
        match read {
            Ok(true) => {}
            Ok(false) => {
                if conn.has_partial_request() {
                    tracing::debug!(%peer, id, "client closed in the middle of a request");
                }
                break;
            }
            Err(e @ ReadError::FrameTimeout(_)) => {
                tracing::debug!(%peer, id, "request not completed in time; closing");
                conn.close_with(e.reply().as_ref()).await;
                break;
            }
            Err(ReadError::Io(e)) => {
                tracing::debug!(%peer, id, error = %e, "read failed; closing");
                break;
            }
        }
    }
    tracing::debug!(%peer, id, "connection closed");
}
