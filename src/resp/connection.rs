//! One client's byte stream: a read buffer parsed into request frames, a
//! write buffer of encoded replies, the frame timeout, and the way a
//! connection is closed after an error.
//!
//! This module knows nothing of commands or of the node; it moves bytes and
//! frames. It must never let a client hold the server's memory or a slot
//! without progress: a request left unfinished longer than the frame timeout
//! ends the connection, while a connection with no partial request may stay
//! idle as long as the client likes (as with Redis's `timeout 0`).

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::frame::{Frame, Limits, Parser, Protocol, ProtocolError};

/// Room made in the read buffer before each read. Large enough that a
/// pipeline of small commands arrives in one read, small enough that an
/// idle connection costs little.
pub const READ_CHUNK_BYTES: usize = 16 * 1024;

/// A buffer grown past this by one large request or reply is given back
/// after use, so that one burst does not pin memory for the connection's
/// lifetime.
pub const BUFFER_KEEP_BYTES: usize = 64 * 1024;

/// How long a connection being closed after an error keeps reading (and
/// discarding) what the client still sends. Closing a socket with unread
/// input makes the kernel send a reset, which can destroy the error reply
/// before the client reads it; draining briefly lets the reply arrive.
pub const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Why reading stopped.
#[derive(Debug)]
pub enum ReadError {
    /// The socket failed.
    Io(io::Error),
    /// A request stayed unfinished longer than the frame timeout.
    FrameTimeout(Duration),
}

impl ReadError {
    /// The reply sent before closing, if the client should get one.
    pub fn reply(&self) -> Option<Frame> {
        match self {
            ReadError::Io(_) => None,
            ReadError::FrameTimeout(limit) => Some(Frame::Error(format!(
                "ERR Protocol error: request not completed within {} ms (frame_timeout)",
                limit.as_millis()
            ))),
        }
    }
}

/// A client connection over `S`: a TCP stream, or a TLS stream over one.
#[derive(Debug)]
pub struct Connection<S> {
    stream: S,
    /// Bytes received and not yet parsed into frames.
    read_buf: BytesMut,
    /// Replies encoded and not yet written.
    write_buf: BytesMut,
    parser: Parser,
    frame_timeout: Duration,
    /// When the server first waited for the rest of the partial request now
    /// in `read_buf`. Measured from there, not from the latest read, so a
    /// client trickling one byte at a time cannot hold a request open.
    partial_since: Option<Instant>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub fn new(stream: S, limits: Limits, frame_timeout: Duration) -> Self {
        Connection {
            stream,
            read_buf: BytesMut::with_capacity(READ_CHUNK_BYTES),
            write_buf: BytesMut::new(),
            parser: Parser::new(limits),
            frame_timeout,
            partial_since: None,
        }
    }

    /// Moves up to `max` complete requests from the read buffer to `out`.
    ///
    /// On a protocol error the requests before the bad one are still in
    /// `out`: they were well formed and are answered before the error.
    pub fn read_frames(&mut self, max: usize, out: &mut Vec<Frame>) -> Result<(), ProtocolError> {
        while out.len() < max {
            match self.parser.parse(&mut self.read_buf)? {
                Some(frame) => {
                    // A complete request restarts the clock for the next one.
                    self.partial_since = None;
                    out.push(frame);
                }
                None => break,
            }
        }
        if self.read_buf.is_empty() && self.read_buf.capacity() > BUFFER_KEEP_BYTES {
            self.read_buf = BytesMut::with_capacity(READ_CHUNK_BYTES);
        }
        Ok(())
    }

    /// Whether part of a request is buffered.
    pub fn has_partial_request(&self) -> bool {
        !self.read_buf.is_empty()
    }

    /// Reads more bytes from the client. `Ok(false)` means the client closed
    /// its side. Cancel safe: a read abandoned (for shutdown) loses nothing.
    pub async fn read_more(&mut self) -> Result<bool, ReadError> {
        if self.read_buf.capacity() - self.read_buf.len() < READ_CHUNK_BYTES {
            self.read_buf.reserve(READ_CHUNK_BYTES);
        }
        let read = if self.read_buf.is_empty() {
            self.stream.read_buf(&mut self.read_buf).await
        } else {
            let since = *self.partial_since.get_or_insert_with(Instant::now);
            match tokio::time::timeout_at(
                since + self.frame_timeout,
                self.stream.read_buf(&mut self.read_buf),
            )
            .await
            {
                Ok(read) => read,
                Err(_elapsed) => return Err(ReadError::FrameTimeout(self.frame_timeout)),
            }
        };
        match read {
            Ok(0) => Ok(false),
            Ok(_) => Ok(true),
            Err(e) => Err(ReadError::Io(e)),
        }
    }

    /// Encodes a reply in `protocol` into the write buffer;
    /// [`Connection::flush`] sends it.
    pub fn queue(&mut self, reply: &Frame, protocol: Protocol) {
        reply.encode_as(&mut self.write_buf, protocol);
    }

    /// Writes every queued reply to the client.
    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.write_buf.is_empty() {
            self.stream.write_all(&self.write_buf).await?;
            // A TLS stream may hold encrypted records it could not write
            // yet; on TCP this does nothing.
            self.stream.flush().await?;
            self.write_buf.clear();
        }
        if self.write_buf.capacity() > BUFFER_KEEP_BYTES {
            self.write_buf = BytesMut::new();
        }
        Ok(())
    }

    /// Sends what is queued plus `last` (an error: the same in both
    /// protocols), then closes the connection without destroying that
    /// reply in flight.
    pub async fn close_with(mut self, last: Option<&Frame>) {
        if let Some(reply) = last {
            self.queue(reply, Protocol::Resp2);
        }
        if let Err(e) = self.flush().await {
            tracing::debug!(error = %e, "could not write the last reply");
            return;
        }
        linger_close(self.stream).await;
    }
}

/// Half-closes `stream` (the client sees end of stream after the replies
/// already written) and discards input for up to [`CLOSE_LINGER`], so that
/// the close does not turn into a reset that destroys unread replies.
/// Over TLS, the shutdown sends the close_notify alert first.
pub async fn linger_close<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}
