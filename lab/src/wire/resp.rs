//! A small RESP2 client: a blocking [`Client`] with exact control over
//! pipelining (the benchmark writes a fixed number of commands before it
//! reads any reply, PINGs servers, reads `INFO` and `DBSIZE`), and
//! [`command_once`], one async command on a fresh connection (the fault
//! test's increments through the load balancer).
//!
//! Both read replies with one parser, [`parse_reply`], which takes bytes
//! and never does I/O, and which bounds every line, bulk string, array and
//! nesting level it accepts.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::access::Access;

/// Longest a blocking [`Client`] waits for one reply by default: a server
/// that takes longer is stuck, and a tool must not hang on it.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest bulk string accepted (an `INFO` reply is a few kilobytes).
pub const BULK_BYTES_MAX: usize = 16 << 20;
/// Largest array accepted in a reply.
pub const ARRAY_LEN_MAX: usize = 1 << 20;
/// Deepest nesting of arrays accepted in a reply.
pub const ARRAY_DEPTH_MAX: usize = 8;
/// Longest reply line (type byte, length or simple string, CRLF).
pub const LINE_BYTES_MAX: usize = 64 << 10;
/// Bytes asked of the socket by one read.
const READ_CHUNK_BYTES: usize = 64 << 10;

/// One RESP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

/// Why a command has no reply, or not the one expected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RespError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no reply within {0:?}")]
    TimedOut(Duration),
    #[error("the server closed the connection")]
    Closed,
    /// A reply over one of this module's limits.
    #[error("{0}")]
    TooLarge(String),
    /// Bytes that are not a RESP reply.
    #[error("{0}")]
    Malformed(String),
    /// A reply of another type than the caller expected.
    #[error("{0}")]
    Unexpected(String),
}

impl Reply {
    /// The integer of an integer reply; any other reply is an error that
    /// quotes it.
    pub fn integer(self) -> Result<i64, RespError> {
        match self {
            Reply::Integer(n) => Ok(n),
            other => Err(RespError::Unexpected(format!(
                "expected an integer reply, got {other:?}"
            ))),
        }
    }

    /// The text of a bulk or simple string reply.
    pub fn text(self) -> Result<String, RespError> {
        match self {
            Reply::Bulk(Some(b)) => Ok(String::from_utf8_lossy(&b).into_owned()),
            Reply::Simple(s) => Ok(s),
            other => Err(RespError::Unexpected(format!(
                "expected a string reply, got {other:?}"
            ))),
        }
    }
}

/// Appends one command, as an array of bulk strings, to `out`.
pub fn encode_command(out: &mut Vec<u8>, args: &[&str]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// The first reply in `buf` and the bytes it takes; `None` if `buf` holds
/// only the start of one.
pub fn parse_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, RespError> {
    parse_at(buf, 0)
}

/// One line without its line end, and the bytes it takes with it.
fn line(buf: &[u8]) -> Result<Option<(&str, usize)>, RespError> {
    let window = &buf[..buf.len().min(LINE_BYTES_MAX)];
    let Some(end) = window.iter().position(|b| *b == b'\n') else {
        if buf.len() >= LINE_BYTES_MAX {
            return Err(RespError::TooLarge(format!(
                "reply line longer than {LINE_BYTES_MAX} bytes"
            )));
        }
        return Ok(None);
    };
    let text = buf[..end].strip_suffix(b"\r").unwrap_or(&buf[..end]);
    let text = std::str::from_utf8(text)
        .map_err(|_| RespError::Malformed(format!("reply line is not UTF-8: {text:?}")))?;
    if text.is_empty() {
        return Err(RespError::Malformed("empty reply line".into()));
    }
    Ok(Some((text, end + 1)))
}

fn parse_at(buf: &[u8], depth: usize) -> Result<Option<(Reply, usize)>, RespError> {
    let Some((line, mut used)) = line(buf)? else {
        return Ok(None);
    };
    let (kind, rest) = line.split_at(1);
    let length = |what: &str| -> Result<i64, RespError> {
        rest.parse()
            .map_err(|_| RespError::Malformed(format!("bad {what} {line:?}")))
    };
    let reply = match kind {
        "+" => Reply::Simple(rest.to_string()),
        "-" => Reply::Error(rest.to_string()),
        ":" => Reply::Integer(length("integer reply")?),
        "$" => {
            let Ok(len) = usize::try_from(length("bulk length")?) else {
                return Ok(Some((Reply::Bulk(None), used)));
            };
            if len > BULK_BYTES_MAX {
                return Err(RespError::TooLarge(format!(
                    "bulk reply of {len} bytes is over the {BULK_BYTES_MAX}-byte limit"
                )));
            }
            let Some(data) = buf.get(used..used + len + 2) else {
                return Ok(None);
            };
            if !data.ends_with(b"\r\n") {
                return Err(RespError::Malformed(format!(
                    "bulk reply of {len} bytes not followed by CRLF"
                )));
            }
            used += len + 2;
            Reply::Bulk(Some(data[..len].to_vec()))
        }
        "*" => {
            let Ok(len) = usize::try_from(length("array length")?) else {
                return Ok(Some((Reply::Array(None), used)));
            };
            if len > ARRAY_LEN_MAX {
                return Err(RespError::TooLarge(format!(
                    "array reply of {len} items is over the {ARRAY_LEN_MAX} limit"
                )));
            }
            if depth >= ARRAY_DEPTH_MAX {
                return Err(RespError::TooLarge(format!(
                    "arrays nested deeper than {ARRAY_DEPTH_MAX}"
                )));
            }
            let mut items = Vec::with_capacity(len.min(1024));
            for _ in 0..len {
                let Some((item, n)) = parse_at(&buf[used..], depth + 1)? else {
                    return Ok(None);
                };
                items.push(item);
                used += n;
            }
            Reply::Array(Some(items))
        }
        _ => return Err(RespError::Malformed(format!("not a RESP reply: {line:?}"))),
    };
    Ok(Some((reply, used)))
}

/// A blocking connection to a RESP server.
#[derive(Debug)]
pub struct Client {
    stream: TcpStream,
    /// Commands queued and not yet sent.
    pending: Vec<u8>,
    /// Bytes read and not yet parsed start at `start`.
    read: Vec<u8>,
    start: usize,
    /// Longest wait for one reply, for error messages.
    timeout: Duration,
}

impl Client {
    /// Connects with [`REPLY_TIMEOUT`].
    pub fn connect(addr: SocketAddr) -> Result<Client, RespError> {
        Self::connect_with_timeout(addr, REPLY_TIMEOUT)
    }

    /// Connects with `timeout` for the connection and for each reply.
    pub fn connect_with_timeout(addr: SocketAddr, timeout: Duration) -> Result<Client, RespError> {
        let stream = TcpStream::connect_timeout(&addr, timeout)
            .map_err(|source| RespError::Connect { addr, source })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(Client {
            stream,
            pending: Vec::new(),
            read: Vec::new(),
            start: 0,
            timeout,
        })
    }

    /// Queues one command without sending it.
    pub fn queue(&mut self, args: &[&str]) -> Result<(), RespError> {
        encode_command(&mut self.pending, args);
        Ok(())
    }

    /// Sends what is queued.
    pub fn flush(&mut self) -> Result<(), RespError> {
        let sent = self.stream.write_all(&self.pending);
        self.pending.clear();
        sent.map_err(|e| self.io_error(e))
    }

    /// Sends one command and reads its reply.
    pub fn command(&mut self, args: &[&str]) -> Result<Reply, RespError> {
        self.queue(args)?;
        self.flush()?;
        self.read_reply()
    }

    /// Reads one reply.
    pub fn read_reply(&mut self) -> Result<Reply, RespError> {
        loop {
            if let Some((reply, n)) = parse_reply(&self.read[self.start..])? {
                self.start += n;
                if self.start == self.read.len() {
                    self.read.clear();
                    self.start = 0;
                }
                return Ok(reply);
            }
            // What is parsed goes before more is read.
            self.read.drain(..self.start);
            self.start = 0;
            let filled = self.read.len();
            self.read.resize(filled + READ_CHUNK_BYTES, 0);
            let n = self.stream.read(&mut self.read[filled..]);
            self.read.truncate(filled + *n.as_ref().unwrap_or(&0));
            match n {
                Ok(0) => return Err(RespError::Closed),
                Ok(_) => {}
                Err(e) => return Err(self.io_error(e)),
            }
        }
    }

    fn io_error(&self, e: std::io::Error) -> RespError {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => RespError::TimedOut(self.timeout),
            _ => RespError::Io(e),
        }
    }
}

/// Sends one command on a fresh connection and reads its reply, all of it
/// (connecting included) within `timeout`, reading at most
/// `reply_bytes_max` bytes.
pub async fn command_once(
    addr: SocketAddr,
    args: &[&str],
    timeout: Duration,
    reply_bytes_max: usize,
) -> Result<Reply, RespError> {
    command_once_with(&Access::open(), addr, args, timeout, reply_bytes_max).await
}

/// [`command_once`] over TLS and authenticated as `access` says: `AUTH`
/// goes in the same write as the command; an `AUTH` refused is returned
/// as the reply.
pub async fn command_once_with(
    access: &Access,
    addr: SocketAddr,
    args: &[&str],
    timeout: Duration,
    reply_bytes_max: usize,
) -> Result<Reply, RespError> {
    let mut cmd = Vec::new();
    if let Some(c) = &access.credentials {
        encode_command(&mut cmd, &["AUTH", &c.user, &c.secret]);
    }
    encode_command(&mut cmd, args);
    let work = async {
        let mut s = access
            .connect(addr)
            .await
            .map_err(|source| RespError::Connect { addr, source })?;
        s.write_all(&cmd).await?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        let mut authenticating = access.credentials.is_some();
        loop {
            if let Some((reply, used)) = parse_reply(&buf)? {
                if !authenticating {
                    return Ok(reply);
                }
                if matches!(reply, Reply::Error(_)) {
                    return Ok(reply);
                }
                authenticating = false;
                buf.drain(..used);
                continue;
            }
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                return Err(RespError::Closed);
            }
            if buf.len() + n > reply_bytes_max {
                return Err(RespError::TooLarge(format!(
                    "reply longer than {reply_bytes_max} bytes"
                )));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(RespError::TimedOut(timeout)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(bytes: &[u8]) -> Reply {
        let (reply, n) = parse_reply(bytes).unwrap().expect("a whole reply");
        assert_eq!(n, bytes.len(), "the whole input is one reply");
        reply
    }

    // Every RESP2 type is read, nested arrays included.
    #[test]
    fn replies_are_parsed() {
        assert_eq!(parsed(b"+PONG\r\n"), Reply::Simple("PONG".into()));
        assert_eq!(parsed(b"-ERR no\r\n"), Reply::Error("ERR no".into()));
        assert_eq!(parsed(b":-7\r\n"), Reply::Integer(-7));
        assert_eq!(
            parsed(b"$3\r\na\r\n\r\n"),
            Reply::Bulk(Some(b"a\r\n".to_vec()))
        );
        assert_eq!(parsed(b"$-1\r\n"), Reply::Bulk(None));
        assert_eq!(parsed(b"*-1\r\n"), Reply::Array(None));
        assert_eq!(
            parsed(b"*2\r\n:5\r\n*1\r\n$0\r\n\r\n"),
            Reply::Array(Some(vec![
                Reply::Integer(5),
                Reply::Array(Some(vec![Reply::Bulk(Some(Vec::new()))]))
            ]))
        );
    }

    // A reply cut anywhere is incomplete, never wrong; a pipelined read
    // takes one reply at a time.
    #[test]
    fn partial_replies_wait_for_more() {
        let whole = b"*2\r\n:5\r\n$2\r\nab\r\n";
        for cut in 0..whole.len() {
            assert_eq!(parse_reply(&whole[..cut]).unwrap(), None, "cut at {cut}");
        }
        let (first, n) = parse_reply(b":1\r\n:2\r\n").unwrap().unwrap();
        assert_eq!((first, n), (Reply::Integer(1), 4));
    }

    // What is not RESP, or is over a limit, is an error.
    #[test]
    fn bad_and_oversized_replies_are_refused() {
        assert!(matches!(
            parse_reply(b"?\r\n"),
            Err(RespError::Malformed(_))
        ));
        assert!(matches!(
            parse_reply(b":x\r\n"),
            Err(RespError::Malformed(_))
        ));
        assert!(matches!(parse_reply(b"\r\n"), Err(RespError::Malformed(_))));
        assert!(matches!(
            parse_reply(b"$1\r\nab\r\n"),
            Err(RespError::Malformed(_))
        ));
        let huge = format!("${}\r\n", BULK_BYTES_MAX + 1);
        assert!(matches!(
            parse_reply(huge.as_bytes()),
            Err(RespError::TooLarge(_))
        ));
        let long = vec![b'+'; LINE_BYTES_MAX + 1];
        assert!(matches!(parse_reply(&long), Err(RespError::TooLarge(_))));
        let deep = "*1\r\n".repeat(ARRAY_DEPTH_MAX + 1);
        assert!(matches!(
            parse_reply(deep.as_bytes()),
            Err(RespError::TooLarge(_))
        ));
    }

    // Commands go out as arrays of bulk strings, lengths in bytes.
    #[test]
    fn commands_are_encoded() {
        let mut out = Vec::new();
        encode_command(&mut out, &["INCRBY", "é", "5"]);
        assert_eq!(out, b"*3\r\n$6\r\nINCRBY\r\n$2\r\n\xc3\xa9\r\n$1\r\n5\r\n");
    }
}
