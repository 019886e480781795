//! A small blocking RESP client: enough to PING a server, read `INFO` and
//! `DBSIZE`, and send pipelined `INCR`s to fill a server with counters.
//!
//! Written here rather than taken from a Redis client crate because the
//! benchmark needs exact control over pipelining (a fixed number of commands
//! written before any reply is read) and nothing else.

use std::io::{BufRead, BufReader, BufWriter, ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};

/// Longest wait for one reply: a server that takes longer is stuck, and the
/// benchmark must not hang on it.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest bulk string accepted (an `INFO` reply is a few kilobytes).
const BULK_BYTES_MAX: usize = 16 << 20;
/// Largest array accepted in a reply.
const ARRAY_LEN_MAX: usize = 1 << 20;
/// Longest reply line (type byte, length or simple string, CRLF).
const LINE_BYTES_MAX: u64 = 64 << 10;

/// One RESP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The integer of an integer reply; any other reply is an error that
    /// quotes it.
    pub fn integer(self) -> Result<i64> {
        match self {
            Reply::Integer(n) => Ok(n),
            other => bail!("expected an integer reply, got {other:?}"),
        }
    }

    /// The text of a bulk or simple string reply.
    pub fn text(self) -> Result<String> {
        match self {
            Reply::Bulk(Some(b)) => Ok(String::from_utf8_lossy(&b).into_owned()),
            Reply::Simple(s) => Ok(s),
            other => bail!("expected a string reply, got {other:?}"),
        }
    }
}

pub struct Client {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
    /// Longest wait for one reply, for error messages.
    timeout: Duration,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Result<Client> {
        Self::connect_with_timeout(addr, REPLY_TIMEOUT)
    }

    /// Connects with `timeout` for the connection and for each reply.
    pub fn connect_with_timeout(addr: SocketAddr, timeout: Duration) -> Result<Client> {
        let stream = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(Client {
            reader: BufReader::new(stream.try_clone()?),
            writer: BufWriter::new(stream),
            timeout,
        })
    }

    /// Queues one command without flushing it.
    pub fn queue(&mut self, args: &[&str]) -> Result<()> {
        write!(self.writer, "*{}\r\n", args.len())?;
        for a in args {
            write!(self.writer, "${}\r\n", a.len())?;
            self.writer.write_all(a.as_bytes())?;
            self.writer.write_all(b"\r\n")?;
        }
        Ok(())
    }

    /// Sends what is queued.
    pub fn flush(&mut self) -> Result<()> {
        self.writer.flush().context("sending commands")
    }

    /// Sends one command and reads its reply.
    pub fn command(&mut self, args: &[&str]) -> Result<Reply> {
        self.queue(args)?;
        self.flush()?;
        self.read_reply()
    }

    /// Reads one reply.
    pub fn read_reply(&mut self) -> Result<Reply> {
        let line = self.read_line()?;
        let (kind, rest) = line.split_at(1);
        Ok(match kind {
            "+" => Reply::Simple(rest.to_string()),
            "-" => Reply::Error(rest.to_string()),
            ":" => Reply::Integer(
                rest.parse()
                    .with_context(|| format!("bad integer reply {line:?}"))?,
            ),
            "$" => {
                let len: i64 = rest
                    .parse()
                    .with_context(|| format!("bad bulk length {line:?}"))?;
                if len < 0 {
                    Reply::Bulk(None)
                } else {
                    let len = len as usize;
                    if len > BULK_BYTES_MAX {
                        bail!("bulk reply of {len} bytes is over the {BULK_BYTES_MAX}-byte limit");
                    }
                    let mut buf = vec![0; len + 2];
                    std::io::Read::read_exact(&mut self.reader, &mut buf)
                        .context("reading a bulk reply")?;
                    buf.truncate(len);
                    Reply::Bulk(Some(buf))
                }
            }
            "*" => {
                let len: i64 = rest
                    .parse()
                    .with_context(|| format!("bad array length {line:?}"))?;
                if len < 0 {
                    Reply::Array(None)
                } else {
                    let len = len as usize;
                    if len > ARRAY_LEN_MAX {
                        bail!("array reply of {len} items is over the {ARRAY_LEN_MAX} limit");
                    }
                    let mut items = Vec::with_capacity(len);
                    for _ in 0..len {
                        items.push(self.read_reply()?);
                    }
                    Reply::Array(Some(items))
                }
            }
            _ => bail!("not a RESP reply: {line:?}"),
        })
    }

    fn read_line(&mut self) -> Result<String> {
        let mut line = String::new();
        let n = match std::io::Read::take(&mut self.reader, LINE_BYTES_MAX).read_line(&mut line) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                bail!("no reply within {} s", self.timeout.as_secs_f64())
            }
            Err(e) => return Err(e).context("reading a reply"),
        };
        if n == 0 {
            return Err(anyhow!("the server closed the connection"));
        }
        if !line.ends_with('\n') {
            bail!("reply line longer than {LINE_BYTES_MAX} bytes or cut short");
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line.is_empty() {
            bail!("empty reply line");
        }
        Ok(line)
    }
}
