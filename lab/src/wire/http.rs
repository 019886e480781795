//! A small HTTP/1.1 client, blocking ([`request`], [`status`]) and async
//! ([`request_async`]): the launcher's readiness probe through HAProxy, the
//! control endpoint's client, and the fault test's load.
//!
//! One request per connection (`Connection: close`): a load balancer then
//! picks a server for every request, and the answer ends where the
//! connection does. Every call is bounded in time and in the bytes it
//! reads. It is not a general client: no keep-alive, no redirects, no
//! chunked bodies (tally's and the control endpoint's answers carry a
//! length).

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::access::Access;

/// Largest answer [`status`] reads: a status line, headers and the short
/// body of a health check.
pub const PROBE_RESPONSE_BYTES_MAX: usize = 4 * 1024;

/// What one blocking request may cost.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest wait to connect, and to send the request.
    pub send_timeout: Duration,
    /// Longest wait for each read of the answer: longer than
    /// `send_timeout` when the server takes its time on purpose.
    pub read_timeout: Duration,
    /// Largest answer read, head and body; a longer one is an error.
    pub response_bytes_max: usize,
}

/// An answer: its status code and its body (lossily decoded as UTF-8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// Why a request has no answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// Connecting, sending or reading failed (a blocking read that waited
    /// too long is an error of kind `WouldBlock` or `TimedOut`).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The whole async request took longer than its limit.
    #[error("timed out after {0:?}")]
    TimedOut(Duration),
    /// The answer was longer than its limit, in bytes.
    #[error("answer larger than {0} bytes")]
    TooLarge(usize),
    /// The answer is not an HTTP answer.
    #[error("{0}")]
    Malformed(String),
}

/// The request's bytes. A body is sent as JSON.
fn encode(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    bearer: Option<&str>,
) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    if let Some(token) = bearer {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if body.is_some() {
        head.push_str("Content-Type: application/json\r\n");
    }
    let body = body.unwrap_or("");
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    head.into_bytes()
}

/// Reads the status code and the body of a whole answer.
fn decode(raw: &[u8]) -> Result<Response, HttpError> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| HttpError::Malformed(format!("incomplete answer: {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| HttpError::Malformed(format!("no status line: {head:?}")))?;
    Ok(Response {
        status,
        body: body.to_string(),
    })
}

/// One blocking request on a fresh connection.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    limits: Limits,
) -> Result<Response, HttpError> {
    request_authorized(addr, method, path, body, None, limits)
}

/// [`request`] with `Authorization: Bearer <bearer>` when given.
pub fn request_authorized(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    bearer: Option<&str>,
    limits: Limits,
) -> Result<Response, HttpError> {
    let mut s = TcpStream::connect_timeout(&addr, limits.send_timeout)?;
    s.set_read_timeout(Some(limits.read_timeout))?;
    s.set_write_timeout(Some(limits.send_timeout))?;
    s.write_all(&encode(addr, method, path, body, bearer))?;
    let mut raw = Vec::new();
    s.take(limits.response_bytes_max as u64 + 1)
        .read_to_end(&mut raw)?;
    if raw.len() > limits.response_bytes_max {
        return Err(HttpError::TooLarge(limits.response_bytes_max));
    }
    decode(&raw)
}

/// The status code of `GET path` on `addr`, or `None` if no answer came
/// within `timeout` (for each step): a readiness probe.
pub fn status(addr: SocketAddr, path: &str, timeout: Duration) -> Option<u16> {
    let limits = Limits {
        send_timeout: timeout,
        read_timeout: timeout,
        response_bytes_max: PROBE_RESPONSE_BYTES_MAX,
    };
    request(addr, "GET", path, None, limits)
        .ok()
        .map(|r| r.status)
}

/// One request on a fresh connection, all of it (connecting included)
/// within `timeout`, reading at most `response_bytes_max` bytes.
pub async fn request_async(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
    response_bytes_max: usize,
) -> Result<Response, HttpError> {
    let open = Access::open();
    request_async_with(&open, addr, method, path, body, timeout, response_bytes_max).await
}

/// [`request_async`] over TLS and with a bearer token as `access` says.
pub async fn request_async_with(
    access: &Access,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
    response_bytes_max: usize,
) -> Result<Response, HttpError> {
    let work = async {
        let mut s = access.connect(addr).await?;
        let bearer = access.bearer();
        s.write_all(&encode(addr, method, path, body, bearer.as_deref()))
            .await?;
        let mut raw = Vec::new();
        let read = (&mut s)
            .take(response_bytes_max as u64 + 1)
            .read_to_end(&mut raw)
            .await;
        finish(access, read, &raw, response_bytes_max)
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(HttpError::TimedOut(timeout)))
}

/// One blocking request over TLS and with a bearer token as `access`
/// says, every step bounded by `timeout`, the answer by
/// `response_bytes_max`.
pub fn request_blocking_with(
    access: &Access,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
    response_bytes_max: usize,
) -> Result<Response, HttpError> {
    let mut s = access.connect_blocking(addr, timeout)?;
    let bearer = access.bearer();
    s.write_all(&encode(addr, method, path, body, bearer.as_deref()))?;
    let mut raw = Vec::new();
    let read = s.take(response_bytes_max as u64 + 1).read_to_end(&mut raw);
    finish(access, read, &raw, response_bytes_max)
}

/// The answer of a whole read of at most `response_bytes_max + 1` bytes.
fn finish(
    access: &Access,
    read: std::io::Result<usize>,
    raw: &[u8],
    response_bytes_max: usize,
) -> Result<Response, HttpError> {
    // A TLS server that closes without close_notify after a whole answer:
    // the answer stands.
    if let Err(e) = read
        && !(access.is_tls() && e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty())
    {
        return Err(e.into());
    }
    if raw.len() > response_bytes_max {
        return Err(HttpError::TooLarge(response_bytes_max));
    }
    decode(raw)
}

/// [`status`] over TLS when `access` says so (no credentials are needed
/// for a health route).
pub fn status_with(
    access: &Access,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Option<u16> {
    let mut s = access.connect_blocking(addr, timeout).ok()?;
    s.write_all(&encode(addr, "GET", path, None, None)).ok()?;
    let mut raw = Vec::new();
    let _ = s
        .take(PROBE_RESPONSE_BYTES_MAX as u64 + 1)
        .read_to_end(&mut raw);
    decode(&raw).ok().map(|r| r.status)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A request names its host, its length and the end of the connection;
    // only a request with a body says it is JSON.
    #[test]
    fn requests_are_framed() {
        let addr: SocketAddr = "127.0.0.1:7070".parse().unwrap();
        let get = String::from_utf8(encode(addr, "GET", "/readyz", None, None)).unwrap();
        assert_eq!(
            get,
            "GET /readyz HTTP/1.1\r\nHost: 127.0.0.1:7070\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n"
        );
        let post = String::from_utf8(encode(addr, "POST", "/x", Some("{}"), Some("t0k"))).unwrap();
        assert!(post.contains("Content-Type: application/json\r\nContent-Length: 2\r\n"));
        assert!(post.contains("\r\nAuthorization: Bearer t0k\r\n"));
        assert!(post.ends_with("\r\n\r\n{}"));
    }

    // The status and the body are read; an answer cut before its blank
    // line, or without a status, is refused.
    #[test]
    fn answers_are_read() {
        let r = decode(b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((r.status, r.body.as_str()), (404, "{}"));
        assert!(matches!(
            decode(b"HTTP/1.1 200 OK\r\n"),
            Err(HttpError::Malformed(_))
        ));
        assert!(matches!(
            decode(b"hello\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
    }

    // Both clients talk to a real listener; an answer over the limit is
    // refused rather than cut.
    #[test]
    fn both_clients_read_a_whole_answer() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            for body in ["{\"a\":1}", "{\"b\":2}", &"x".repeat(100)] {
                let (mut s, _) = listener.accept().unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    s.read_exact(&mut byte).unwrap();
                    head.push(byte[0]);
                }
                // The body is read too: closing a socket with unread bytes
                // resets the connection instead of ending it.
                let length = String::from_utf8(head)
                    .unwrap()
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: ")?.parse().ok())
                    .unwrap_or(0);
                s.read_exact(&mut vec![0; length]).unwrap();
                write!(
                    s,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
            }
        });
        let limits = Limits {
            send_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(10),
            response_bytes_max: 64,
        };
        let r = request(addr, "GET", "/a", None, limits).unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "{\"a\":1}"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let r = rt
            .block_on(request_async(
                addr,
                "POST",
                "/b",
                Some("{}"),
                Duration::from_secs(10),
                64,
            ))
            .unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "{\"b\":2}"));
        assert!(matches!(
            request(addr, "GET", "/c", None, limits),
            Err(HttpError::TooLarge(64))
        ));
        server.join().unwrap();
    }
}
