//! The control endpoint of `tally cluster`, and its client.
//!
//! `tally cluster` serves a small HTTP API on a loopback address so that a
//! fault tool in another process (`tally chaos --attach`) can act on the
//! cluster's nodes. The launcher carries out every action on the processes
//! it started itself, by their pids: the tool never signals a process, and
//! nothing outside this machine can reach the endpoint (it refuses to bind
//! anything but a loopback address).
//!
//! | request | answer |
//! |---|---|
//! | `GET /v1/cluster` | the load balancer's addresses and every node (id, addresses, pid, data directory, restarts) |
//! | `POST /v1/nodes/{id}/{action}` | `kill9`, `restart`, `pause`, `resume` or `wipe` on that node; 200 when done |
//! | `POST /v1/nodes/{id}/wait-ready?timeout_ms=N` | 200 once the node's current process is ready, 504 after `N` ms |
//!
//! Every request carries `Authorization: Bearer <token>`: the launcher makes
//! a random token at start and writes it to `DIR/control-token`, readable
//! by its owner only, so that another local user who can reach the port
//! still cannot kill or wipe nodes; a missing or wrong token is 401.
//!
//! Errors are JSON `{"error": "..."}` with 400 (bad request), 401 (no or a
//! wrong token), 404 (no such node or path) or 409 (the action could not
//! be carried out). One request
//! is served at a time, on the launcher's control thread: the fault tool
//! makes one call at a time, and a serial endpoint cannot interleave two
//! actions on one node.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::launcher::{Action, LocalCluster};
use crate::wire::http::{self, HttpError};

/// Default address of the endpoint.
pub const DEFAULT_CONTROL_ADDR: &str = "127.0.0.1:7069";
/// The file, in the launcher's directory, that holds the endpoint's token.
pub const CONTROL_TOKEN_FILE: &str = "control-token";
/// Random bytes in a token (written as hex).
const TOKEN_BYTES: usize = 16;
/// Largest request head the endpoint reads; longer requests get 400.
pub const CONTROL_REQUEST_BYTES_MAX: usize = 8 * 1024;
/// Largest answer the client reads.
pub const CONTROL_RESPONSE_BYTES_MAX: usize = 1024 * 1024;
/// How long the endpoint waits for a request's head, and the client for an
/// answer (beyond the wait it asked for).
pub const CONTROL_IO_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest `wait-ready` the endpoint accepts.
pub const WAIT_READY_MAX: Duration = Duration::from_secs(120);
/// How often the endpoint's accept loop looks at its stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(50);

/// What the client can meet.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    #[error("control endpoint {addr}: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The endpoint answered with an error.
    #[error("control endpoint {addr}: {status}: {message}")]
    Refused {
        addr: SocketAddr,
        status: u16,
        message: String,
    },
    /// The answer was not what the endpoint sends.
    #[error("control endpoint {addr}: unexpected answer: {detail}")]
    Protocol { addr: SocketAddr, detail: String },
    /// The cluster has no node at this index.
    #[error("the cluster has no node {0}")]
    NoSuchNode(usize),
}

/// One node, as `GET /v1/cluster` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub node_id: String,
    pub http: SocketAddr,
    pub resp: SocketAddr,
    pub pid: Option<u32>,
    pub data_dir: PathBuf,
    pub restarts: u64,
}

/// The answer of `GET /v1/cluster`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    /// The load balancer's HTTP and RESP frontends, when HAProxy runs.
    pub lb_http: Option<SocketAddr>,
    pub lb_resp: Option<SocketAddr>,
    pub nodes: Vec<NodeView>,
    /// A secured cluster's secrets directory ([`crate::secrets`]): the CA
    /// and users a client on this machine needs.
    #[serde(default)]
    pub secrets_dir: Option<PathBuf>,
}

/// A new random token, from the kernel's random source.
pub fn new_token() -> std::io::Result<String> {
    let mut bytes = [0u8; TOKEN_BYTES];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes `token` to `dir/`[`CONTROL_TOKEN_FILE`], readable and writable
/// by its owner only; returns the path.
pub fn write_token(dir: &std::path::Path, token: &str) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join(CONTROL_TOKEN_FILE);
    // A file left by an earlier run is replaced, never reused.
    let _ = std::fs::remove_file(&path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    file.write_all(token.as_bytes())?;
    Ok(path)
}

/// Reads a token written by [`write_token`].
pub fn read_token(path: &std::path::Path) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(path)?.trim().to_string())
}

/// The endpoint: a listener on a loopback address, and the token every
/// request must carry.
pub struct ControlServer {
    listener: TcpListener,
    token: String,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

/// Whether the request head carries `Authorization: Bearer <token>`,
/// compared in time that does not depend on where it differs.
fn authorized(head: &str, token: &str) -> bool {
    let given = head.lines().skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("authorization")
            .then(|| value.trim())
    });
    let Some(given) = given.and_then(|v| v.strip_prefix("Bearer ")) else {
        return false;
    };
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

impl ControlServer {
    /// Binds `addr`, which must be a loopback address; every request must
    /// carry `token`.
    pub fn bind(addr: SocketAddr, token: String) -> std::io::Result<ControlServer> {
        if !addr.ip().is_loopback() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "the control endpoint kills and wipes nodes: it binds only a loopback \
                     address, not {addr}"
                ),
            ));
        }
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(ControlServer { listener, token })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves requests one at a time until `stop` is set.
    pub fn serve(&self, cluster: &LocalCluster, stop: &AtomicBool) {
        while !stop.load(Ordering::SeqCst) {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = serve_one(cluster, stream, &self.token, stop) {
                        tracing::debug!(error = %e, "control request failed");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(ACCEPT_POLL);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "control endpoint: accept failed");
                    std::thread::sleep(ACCEPT_POLL);
                }
            }
        }
    }
}

/// Reads one request head, up to [`CONTROL_REQUEST_BYTES_MAX`].
fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end);
            return Ok(String::from_utf8(buf).ok());
        }
        if buf.len() > CONTROL_REQUEST_BYTES_MAX {
            return Ok(None);
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn serve_one(
    cluster: &LocalCluster,
    mut stream: TcpStream,
    token: &str,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(CONTROL_IO_TIMEOUT))?;
    stream.set_write_timeout(Some(CONTROL_IO_TIMEOUT))?;
    let (status, body) = match read_head(&mut stream)? {
        None => (400, error_body("malformed or oversized request")),
        Some(head) if !authorized(&head, token) => (
            401,
            error_body(format!(
                "no or a wrong token: send Authorization: Bearer <the token in the launcher's \
                 {CONTROL_TOKEN_FILE} file>"
            )),
        ),
        Some(head) => route(cluster, &head, stop),
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        409 => "Conflict",
        504 => "Gateway Timeout",
        _ => "Error",
    };
    write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

fn error_body(message: impl std::fmt::Display) -> String {
    serde_json::json!({ "error": message.to_string() }).to_string()
}

/// The view a client gets of `cluster`.
pub fn view(cluster: &LocalCluster) -> ClusterView {
    let has_lb = cluster.haproxy_pid().is_some();
    ClusterView {
        lb_http: has_lb.then(|| cluster.lb_http()),
        lb_resp: has_lb.then(|| cluster.lb_resp()),
        nodes: cluster
            .nodes()
            .into_iter()
            .enumerate()
            .map(|(i, n)| NodeView {
                restarts: cluster.restarts(i).unwrap_or(0),
                node_id: n.node_id,
                http: n.http,
                resp: n.resp,
                pid: n.pid,
                data_dir: n.data_dir,
            })
            .collect(),
        secrets_dir: cluster.secrets().map(|s| s.dir.clone()),
    }
}

/// Answers one request head with a status and a JSON body.
fn route(cluster: &LocalCluster, head: &str, stop: &AtomicBool) -> (u16, String) {
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return (400, error_body("malformed request line"));
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        ("GET", ["v1", "cluster"]) => match serde_json::to_string(&view(cluster)) {
            Ok(body) => (200, body),
            Err(e) => (500, error_body(e)),
        },
        ("POST", ["v1", "nodes", id, verb]) => {
            let Some(i) = cluster.nodes().iter().position(|n| n.node_id == *id) else {
                return (404, error_body(format!("no node {id}")));
            };
            if *verb == "wait-ready" {
                let timeout = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("timeout_ms="))
                    .map(|v| v.parse::<u64>().map(Duration::from_millis));
                let timeout = match timeout {
                    None => WAIT_READY_MAX,
                    Some(Ok(t)) if t <= WAIT_READY_MAX => t,
                    Some(_) => {
                        return (
                            400,
                            error_body(format!(
                                "timeout_ms must be a number of milliseconds up to {}",
                                WAIT_READY_MAX.as_millis()
                            )),
                        );
                    }
                };
                // Waits in short steps, so that stopping the cluster is
                // never held up by a waiting client.
                let deadline = std::time::Instant::now() + timeout;
                loop {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    match cluster.wait_ready(i, left.min(ACCEPT_POLL)) {
                        Ok(()) => {
                            let body = serde_json::json!({ "node": id, "ready": true });
                            return (200, body.to_string());
                        }
                        Err(e) if left.is_zero() || stop.load(Ordering::SeqCst) => {
                            return (504, error_body(e));
                        }
                        Err(_) => {}
                    }
                }
            }
            let Some(action) = Action::from_name(verb) else {
                let names: Vec<&str> = Action::ALL.iter().map(|a| a.name()).collect();
                return (
                    400,
                    error_body(format!(
                        "unknown action {verb}: one of {} or wait-ready",
                        names.join(", ")
                    )),
                );
            };
            tracing::info!(node = %id, action = action.name(), "control: acting on a node");
            match cluster.act(i, action) {
                Ok(()) => (
                    200,
                    serde_json::json!({ "node": id, "action": action.name() }).to_string(),
                ),
                Err(e) => (409, error_body(e)),
            }
        }
        _ => (404, error_body(format!("no route {method} {path}"))),
    }
}

/// A cluster run by another process's `tally cluster`, driven through its
/// control endpoint.
#[derive(Debug, Clone)]
pub struct RemoteCluster {
    addr: SocketAddr,
    token: String,
    view: ClusterView,
}

impl RemoteCluster {
    /// Reads the cluster's view from the endpoint at `addr`, with the
    /// endpoint's `token`.
    pub fn connect(addr: SocketAddr, token: String) -> Result<RemoteCluster, ControlError> {
        let body = call(addr, &token, "GET", "/v1/cluster", Duration::ZERO)?;
        let view = serde_json::from_str(&body).map_err(|e| ControlError::Protocol {
            addr,
            detail: e.to_string(),
        })?;
        Ok(RemoteCluster { addr, token, view })
    }

    /// The view read at connect time (pids and restarts are not refreshed).
    pub fn view(&self) -> &ClusterView {
        &self.view
    }

    fn node_id(&self, i: usize) -> Result<&str, ControlError> {
        self.view
            .nodes
            .get(i)
            .map(|n| n.node_id.as_str())
            .ok_or(ControlError::NoSuchNode(i))
    }

    /// Carries out `action` on node `i` (0-based).
    pub fn act(&self, i: usize, action: Action) -> Result<(), ControlError> {
        let path = format!("/v1/nodes/{}/{}", self.node_id(i)?, action.name());
        call(self.addr, &self.token, "POST", &path, Duration::ZERO).map(drop)
    }

    /// Waits until node `i`'s current process is ready.
    pub fn wait_ready(&self, i: usize, timeout: Duration) -> Result<(), ControlError> {
        let timeout = timeout.min(WAIT_READY_MAX);
        let path = format!(
            "/v1/nodes/{}/wait-ready?timeout_ms={}",
            self.node_id(i)?,
            timeout.as_millis()
        );
        call(self.addr, &self.token, "POST", &path, timeout).map(drop)
    }
}

/// One request to the endpoint; the body of a 200 answer. `wait` is how
/// long the endpoint may take on purpose, on top of the I/O timeout.
fn call(
    addr: SocketAddr,
    token: &str,
    method: &str,
    path: &str,
    wait: Duration,
) -> Result<String, ControlError> {
    let limits = http::Limits {
        send_timeout: CONTROL_IO_TIMEOUT,
        read_timeout: CONTROL_IO_TIMEOUT + wait,
        response_bytes_max: CONTROL_RESPONSE_BYTES_MAX,
    };
    let answer = http::request_authorized(addr, method, path, None, Some(token), limits).map_err(
        |e| match e {
            HttpError::Io(source) => ControlError::Io { addr, source },
            e @ (HttpError::TooLarge(_) | HttpError::Malformed(_) | HttpError::TimedOut(_)) => {
                ControlError::Protocol {
                    addr,
                    detail: e.to_string(),
                }
            }
        },
    )?;
    if answer.status == 200 {
        return Ok(answer.body);
    }
    let message = serde_json::from_str::<serde_json::Value>(&answer.body)
        .ok()
        .and_then(|v| v.get("error")?.as_str().map(String::from))
        .unwrap_or(answer.body);
    Err(ControlError::Refused {
        addr,
        status: answer.status,
        message,
    })
}
