//! RESP frames: the reply type the server writes, in RESP2 or RESP3 (the
//! [`Protocol`] a connection chose with `HELLO`), and the request parser
//! that turns bytes from a client into command frames.
//!
//! The parser is incremental and allocation-careful. A request is either an
//! array of bulk strings (`*2\r\n$4\r\nINCR\r\n$4\r\nhits\r\n`, what every
//! client library sends) or an inline command (`INCR hits\r\n`, what a person
//! types into a telnet session). Each call to [`Parser::parse`] looks at the
//! bytes buffered so far and answers one of three things: not enough bytes
//! yet ([`None`]), one complete frame (consumed from the buffer), or a
//! protocol error. Every length a client claims is checked against the
//! named [`Limits`] as soon as its header line is in the buffer, before any
//! memory is set aside for it; the parser never allocates in proportion to a
//! claimed length, only to bytes actually received, and a complete frame's
//! bulk strings are zero-copy slices of the received bytes.
//!
//! This module must never do I/O and never panic on any input: it is run on
//! bytes from the network as they come.

use std::fmt;
use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

use crate::ServerConfig;

/// Longest header line (`*<count>` or `$<length>`) after its type byte and
/// before its CRLF. The longest valid one is `-9223372036854775808`, 20
/// bytes; anything longer can never parse, so it is refused without waiting
/// for its end.
pub const HEADER_LINE_BYTES_MAX: usize = 20;

/// The limits a request must respect, taken from [`ServerConfig`].
///
/// Together they also bound the largest request a client can make the
/// server buffer: `array_len_max` bulk strings of `bulk_bytes_max` bytes
/// each, plus their headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest bulk string (one command argument), in bytes.
    pub bulk_bytes_max: usize,
    /// Most elements in a request array (the command name and arguments).
    pub array_len_max: usize,
    /// Longest inline command line, in bytes.
    pub inline_bytes_max: usize,
}

impl Limits {
    /// The RESP limits of a server configuration.
    pub fn from_config(config: &ServerConfig) -> Self {
        Limits {
            bulk_bytes_max: config.resp_bulk_bytes_max,
            array_len_max: config.resp_array_len_max,
            inline_bytes_max: config.resp_inline_bytes_max,
        }
    }
}

/// The reply protocol of a connection: RESP2 until the client sends
/// `HELLO 3`, and again after `HELLO 2` or `RESET`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    #[default]
    Resp2,
    Resp3,
}

impl Protocol {
    /// The number `HELLO` takes and reports.
    pub fn version(self) -> i64 {
        match self {
            Protocol::Resp2 => 2,
            Protocol::Resp3 => 3,
        }
    }
}

/// One RESP value.
///
/// Requests are always an [`Frame::Array`] of [`Frame::Bulk`]; the other
/// variants appear only in replies. The RESP3 types ([`Frame::Map`],
/// [`Frame::Set`], [`Frame::Verbatim`], and the null) have a RESP2 form,
/// exactly as Redis sends each to a RESP2 client, so a command builds one
/// reply and the connection's protocol decides its wire form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// `+OK`: a short status line.
    Simple(String),
    /// `-ERR message`: the text starts with the error prefix (`ERR`,
    /// `NOPROTO`, ...) and carries no `-`.
    Error(String),
    /// `:42`
    Integer(i64),
    /// `$5\r\nhello`: binary-safe.
    Bulk(Bytes),
    /// The nil reply (`GET` of a missing key): `$-1` in RESP2, `_` in
    /// RESP3.
    Null,
    /// `*2\r\n...`
    Array(Vec<Frame>),
    /// Field/value pairs: `%2` in RESP3, a flat array of twice as many
    /// elements in RESP2 (`HELLO`, `CONFIG GET`).
    Map(Vec<(Frame, Frame)>),
    /// Unordered distinct elements: `~2` in RESP3, an array in RESP2
    /// (`COMMAND`'s flags).
    Set(Vec<Frame>),
    /// Text meant for a person: `=N\r\ntxt:...` in RESP3, a bulk string in
    /// RESP2 (`INFO`, `CLIENT INFO`).
    Verbatim(Bytes),
}

impl Frame {
    /// `+OK`
    pub fn ok() -> Frame {
        Frame::Simple("OK".into())
    }

    /// A bulk string holding `text`.
    pub fn bulk(text: impl Into<Bytes>) -> Frame {
        Frame::Bulk(text.into())
    }

    /// A bulk string holding the decimal form of `n` (how `GET` answers).
    pub fn bulk_decimal(n: i64) -> Frame {
        Frame::Bulk(Bytes::from(n.to_string()))
    }

    /// Appends the RESP2 wire form of this frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        self.encode_as(out, Protocol::Resp2);
    }

    /// Appends the wire form of this frame in `protocol` to `out`.
    ///
    /// Status and error lines cannot carry CR or LF on the wire, so any
    /// there are sent as spaces (Redis does the same); everything else is
    /// written as is.
    pub fn encode_as(&self, out: &mut BytesMut, protocol: Protocol) {
        let resp3 = protocol == Protocol::Resp3;
        match self {
            Frame::Simple(s) => put_line(out, b'+', s.as_bytes()),
            Frame::Error(s) => put_line(out, b'-', s.as_bytes()),
            Frame::Integer(n) => put_header(out, b':', *n),
            Frame::Bulk(b) => put_bulk(out, b'$', b"", b),
            Frame::Null if resp3 => out.put_slice(b"_\r\n"),
            Frame::Null => out.put_slice(b"$-1\r\n"),
            Frame::Array(items) => {
                put_header(out, b'*', items.len() as i64);
                for item in items {
                    item.encode_as(out, protocol);
                }
            }
            Frame::Set(items) => {
                put_header(out, if resp3 { b'~' } else { b'*' }, items.len() as i64);
                for item in items {
                    item.encode_as(out, protocol);
                }
            }
            Frame::Map(pairs) => {
                if resp3 {
                    put_header(out, b'%', pairs.len() as i64);
                } else {
                    put_header(out, b'*', 2 * pairs.len() as i64);
                }
                for (field, value) in pairs {
                    field.encode_as(out, protocol);
                    value.encode_as(out, protocol);
                }
            }
            Frame::Verbatim(text) if resp3 => put_bulk(out, b'=', b"txt:", text),
            Frame::Verbatim(text) => put_bulk(out, b'$', b"", text),
        }
    }
}

/// A length-prefixed string: `kind`, the length of `prefix` and `body`
/// together, then both.
fn put_bulk(out: &mut BytesMut, kind: u8, prefix: &[u8], body: &[u8]) {
    put_header(out, kind, (prefix.len() + body.len()) as i64);
    out.put_slice(prefix);
    out.put_slice(body);
    out.put_slice(b"\r\n");
}

fn put_line(out: &mut BytesMut, kind: u8, text: &[u8]) {
    out.put_u8(kind);
    out.extend(
        text.iter()
            .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.put_slice(b"\r\n");
}

fn put_header(out: &mut BytesMut, kind: u8, n: i64) {
    use std::io::Write;
    out.put_u8(kind);
    // A 20-digit stack buffer is enough for any i64; writing to a slice
    // avoids a String per reply on the hot path.
    let mut digits = [0u8; 24];
    let mut cursor = std::io::Cursor::new(&mut digits[..]);
    let _ = write!(cursor, "{n}");
    let len = cursor.position() as usize;
    out.put_slice(&digits[..len]);
    out.put_slice(b"\r\n");
}

/// A request that breaks the protocol or a limit. RESP has no way to
/// resynchronise after one, so the connection is answered with
/// `-ERR Protocol error: ...` and closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    reason: String,
}

impl ProtocolError {
    fn new(reason: impl Into<String>) -> Self {
        ProtocolError {
            reason: reason.into(),
        }
    }

    /// What was wrong, without the `Protocol error: ` prefix.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Protocol error: {}", self.reason)
    }
}

impl std::error::Error for ProtocolError {}

/// Parses requests out of a connection's read buffer.
///
/// It keeps only a scratch list of the current frame's argument positions,
/// reused from call to call, so that a complete frame is cut out of the
/// buffer in one piece and its arguments handed out as slices of it.
#[derive(Debug)]
pub struct Parser {
    limits: Limits,
    /// Positions of the arguments of the frame being scanned. Grows only
    /// with arguments actually received, never with a claimed count.
    spans: Vec<Range<usize>>,
}

impl Parser {
    pub fn new(limits: Limits) -> Self {
        Parser {
            limits,
            spans: Vec::new(),
        }
    }

    /// Takes the next complete request out of `buf`.
    ///
    /// Returns `Ok(None)` when `buf` holds no complete request yet (the
    /// bytes stay in `buf`), `Ok(Some(frame))` with the request removed from
    /// `buf`, or a protocol error (the connection cannot continue). Empty
    /// requests (`*0\r\n`, blank inline lines) are skipped, as Redis skips
    /// them.
    pub fn parse(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
        loop {
            let Some(&first) = buf.first() else {
                return Ok(None);
            };
            let parsed = if first == b'*' {
                self.parse_multibulk(buf)?
            } else {
                self.parse_inline(buf)?
            };
            match parsed {
                Parsed::Incomplete => return Ok(None),
                Parsed::Empty => continue,
                Parsed::Frame(frame) => return Ok(Some(frame)),
            }
        }
    }

    fn parse_multibulk(&mut self, buf: &mut BytesMut) -> Result<Parsed, ProtocolError> {
        let limits = self.limits;
        let Some((count, mut pos)) = header(
            buf,
            1,
            "too big mbulk count string",
            "invalid multibulk length",
        )?
        else {
            return Ok(Parsed::Incomplete);
        };
        if count < 0 {
            // Redis ignores `*-1`; a null array is not a request, and a
            // client sending one is confused, so it is refused here.
            return Err(ProtocolError::new("invalid multibulk length"));
        }
        if count as u64 > limits.array_len_max as u64 {
            return Err(ProtocolError::new(format!(
                "invalid multibulk length: {count} arguments is over the limit of {} (resp_array_len_max)",
                limits.array_len_max
            )));
        }
        if count == 0 {
            let _ = buf.split_to(pos);
            return Ok(Parsed::Empty);
        }
        self.spans.clear();
        for _ in 0..count {
            let Some(&kind) = buf.get(pos) else {
                return Ok(Parsed::Incomplete);
            };
            if kind != b'$' {
                return Err(ProtocolError::new(format!(
                    "expected '$', got '{}'",
                    kind.escape_ascii()
                )));
            }
            let Some((len, start)) = header(
                buf,
                pos + 1,
                "too big bulk count string",
                "invalid bulk length",
            )?
            else {
                return Ok(Parsed::Incomplete);
            };
            if len < 0 {
                return Err(ProtocolError::new("invalid bulk length"));
            }
            if len as u64 > limits.bulk_bytes_max as u64 {
                return Err(ProtocolError::new(format!(
                    "invalid bulk length: {len} bytes is over the limit of {} (resp_bulk_bytes_max)",
                    limits.bulk_bytes_max
                )));
            }
            // `len` is at most `bulk_bytes_max`, a usize: no overflow.
            let end = start + len as usize;
            if buf.len() < end + 2 {
                return Ok(Parsed::Incomplete);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(ProtocolError::new(
                    "bulk string is not followed by CRLF (its length prefix is wrong)",
                ));
            }
            self.spans.push(start..end);
            pos = end + 2;
        }
        let frame = buf.split_to(pos).freeze();
        let args = self
            .spans
            .drain(..)
            .map(|span| Frame::Bulk(frame.slice(span)))
            .collect();
        Ok(Parsed::Frame(Frame::Array(args)))
    }

    fn parse_inline(&mut self, buf: &mut BytesMut) -> Result<Parsed, ProtocolError> {
        let max = self.limits.inline_bytes_max;
        // The line may be `max` bytes plus its CRLF; look no further.
        let window = &buf[..buf.len().min(max.saturating_add(2))];
        let Some(newline) = window.iter().position(|&b| b == b'\n') else {
            let room_for_crlf = buf.len() == max.saturating_add(1) && buf[max] == b'\r';
            if buf.len() > max && !room_for_crlf {
                return Err(too_big_inline(max));
            }
            return Ok(Parsed::Incomplete);
        };
        let line = buf.split_to(newline + 1);
        let text = line[..newline]
            .strip_suffix(b"\r")
            .unwrap_or(&line[..newline]);
        if text.len() > max {
            return Err(too_big_inline(max));
        }
        let args = split_inline(text)?;
        if args.is_empty() {
            return Ok(Parsed::Empty);
        }
        Ok(Parsed::Frame(Frame::Array(
            args.into_iter()
                .map(|a| Frame::Bulk(Bytes::from(a)))
                .collect(),
        )))
    }
}

enum Parsed {
    Incomplete,
    /// A request with no arguments was consumed; look for the next one.
    Empty,
    Frame(Frame),
}

fn too_big_inline(max: usize) -> ProtocolError {
    ProtocolError::new(format!(
        "too big inline request (the limit is {max} bytes, resp_inline_bytes_max)"
    ))
}

/// Reads the decimal header line that starts at `start` and ends in CRLF.
/// Returns the number and the position just past the CRLF, or `None` when
/// the line is not complete yet.
fn header(
    buf: &[u8],
    start: usize,
    too_long: &'static str,
    invalid: &'static str,
) -> Result<Option<(i64, usize)>, ProtocolError> {
    let rest = buf.get(start..).unwrap_or_default();
    let window = &rest[..rest.len().min(HEADER_LINE_BYTES_MAX + 1)];
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        if rest.len() > HEADER_LINE_BYTES_MAX {
            return Err(ProtocolError::new(too_long));
        }
        return Ok(None);
    };
    match rest.get(cr + 1) {
        None => Ok(None),
        Some(b'\n') => {
            let n = parse_i64(&rest[..cr]).ok_or_else(|| ProtocolError::new(invalid))?;
            Ok(Some((n, start + cr + 2)))
        }
        Some(_) => Err(ProtocolError::new(invalid)),
    }
}

/// Parses a decimal integer exactly as Redis does (`string2ll`): an
/// optional `-`, then digits with no leading zero (`0` itself excepted), no
/// `+`, no spaces, within the signed 64-bit range. `-0`, `007` and `+5` are
/// refused, so a value means one thing however a client writes it.
pub fn parse_i64(text: &[u8]) -> Option<i64> {
    let (negative, digits) = match text.split_first()? {
        (b'-', rest) => (true, rest),
        _ => (false, text),
    };
    match digits {
        [] => return None,
        [b'0'] if !negative => return Some(0),
        [b'1'..=b'9', ..] => {}
        _ => return None,
    }
    // Accumulate downwards so that i64::MIN, whose magnitude has no
    // positive i64, parses without a special case.
    let mut value: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        value = value.checked_mul(10)?.checked_sub(i64::from(d - b'0'))?;
    }
    if negative {
        Some(value)
    } else {
        value.checked_neg()
    }
}

/// Splits an inline command line into arguments the way Redis does
/// (`sdssplitargs`): arguments are separated by whitespace; double quotes
/// allow spaces and the escapes `\n \r \t \b \a \\ \" \xHH`; single quotes
/// allow spaces and `\'`. A closing quote must be followed by whitespace or
/// the end of the line.
fn split_inline(line: &[u8]) -> Result<Vec<Vec<u8>>, ProtocolError> {
    let unbalanced = || ProtocolError::new("unbalanced quotes in request");
    let is_space = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c | 0);
    let mut args = Vec::new();
    let mut i = 0;
    loop {
        while i < line.len() && is_space(line[i]) {
            i += 1;
        }
        if i == line.len() {
            return Ok(args);
        }
        let mut arg = Vec::new();
        match line[i] {
            b'"' => {
                i += 1;
                loop {
                    match line.get(i..) {
                        None | Some([]) => return Err(unbalanced()),
                        Some([b'\\', b'x', h, l, ..]) if hex(*h).is_some() && hex(*l).is_some() => {
                            arg.push(hex(*h).unwrap_or(0) * 16 + hex(*l).unwrap_or(0));
                            i += 4;
                        }
                        Some([b'\\', c, ..]) => {
                            arg.push(match c {
                                b'n' => b'\n',
                                b'r' => b'\r',
                                b't' => b'\t',
                                b'b' => 0x08,
                                b'a' => 0x07,
                                other => *other,
                            });
                            i += 2;
                        }
                        Some([b'"', rest @ ..]) => {
                            if rest.first().is_some_and(|&b| !is_space(b)) {
                                return Err(unbalanced());
                            }
                            i += 1;
                            break;
                        }
                        Some([c, ..]) => {
                            arg.push(*c);
                            i += 1;
                        }
                    }
                }
            }
            b'\'' => {
                i += 1;
                loop {
                    match line.get(i..) {
                        None | Some([]) => return Err(unbalanced()),
                        Some([b'\\', b'\'', ..]) => {
                            arg.push(b'\'');
                            i += 2;
                        }
                        Some([b'\'', rest @ ..]) => {
                            if rest.first().is_some_and(|&b| !is_space(b)) {
                                return Err(unbalanced());
                            }
                            i += 1;
                            break;
                        }
                        Some([c, ..]) => {
                            arg.push(*c);
                            i += 1;
                        }
                    }
                }
            }
            _ => {
                while i < line.len() && !is_space(line[i]) {
                    arg.push(line[i]);
                    i += 1;
                }
            }
        }
        args.push(arg);
    }
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> Limits {
        Limits {
            bulk_bytes_max: 64,
            array_len_max: 8,
            inline_bytes_max: 64,
        }
    }

    fn request(args: &[&[u8]]) -> Frame {
        Frame::Array(
            args.iter()
                .map(|a| Frame::Bulk(Bytes::copy_from_slice(a)))
                .collect(),
        )
    }

    fn encoded(frame: &Frame) -> BytesMut {
        let mut out = BytesMut::new();
        frame.encode(&mut out);
        out
    }

    fn parse_all(bytes: &[u8]) -> Result<Vec<Frame>, ProtocolError> {
        let mut parser = Parser::new(limits());
        let mut buf = BytesMut::from(bytes);
        let mut frames = Vec::new();
        while let Some(f) = parser.parse(&mut buf)? {
            frames.push(f);
        }
        Ok(frames)
    }

    fn parse_err(bytes: &[u8]) -> String {
        match parse_all(bytes) {
            Err(e) => e.to_string(),
            Ok(frames) => panic!("expected a protocol error, parsed {frames:?}"),
        }
    }

    #[test]
    fn resp3_types_have_redis_wire_forms_in_both_protocols() {
        // Proves each RESP3 type is written as Redis writes it to a RESP3
        // client, and as Redis writes the same reply to a RESP2 client.
        let reply = Frame::Array(vec![
            Frame::Null,
            Frame::Map(vec![(Frame::bulk("proto"), Frame::Integer(3))]),
            Frame::Set(vec![Frame::Simple("fast".into())]),
            Frame::Verbatim(Bytes::from_static(b"# Server\r\n")),
        ]);
        let mut resp3 = BytesMut::new();
        reply.encode_as(&mut resp3, Protocol::Resp3);
        assert_eq!(
            &resp3[..],
            b"*4\r\n_\r\n%1\r\n$5\r\nproto\r\n:3\r\n~1\r\n+fast\r\n=14\r\ntxt:# Server\r\n\r\n"
        );
        assert_eq!(
            &encoded(&reply)[..],
            b"*4\r\n$-1\r\n*2\r\n$5\r\nproto\r\n:3\r\n*1\r\n+fast\r\n$10\r\n# Server\r\n\r\n"
        );
        assert_eq!(Protocol::default(), Protocol::Resp2);
    }

    #[test]
    fn replies_encode_as_redis_writes_them() {
        // Proves every reply kind has the exact wire form clients expect.
        let reply = Frame::Array(vec![
            Frame::ok(),
            Frame::Error("ERR bad\r\nthing".into()),
            Frame::Integer(-42),
            Frame::bulk("hi"),
            Frame::Null,
            Frame::Array(vec![]),
            Frame::Integer(i64::MIN),
        ]);
        assert_eq!(
            &encoded(&reply)[..],
            &b"*7\r\n+OK\r\n-ERR bad  thing\r\n:-42\r\n$2\r\nhi\r\n$-1\r\n*0\r\n:-9223372036854775808\r\n"[..]
        );
    }

    #[test]
    fn request_round_trips_through_encode_and_parse() {
        // Proves an encoded request parses back to itself, binary bytes included.
        let frame = request(&[b"INCRBY", b"hits", b"-5", b"", b"\r\n\x00\xff"]);
        assert_eq!(parse_all(&encoded(&frame)).unwrap(), vec![frame]);
    }

    #[test]
    fn every_prefix_of_a_request_is_incomplete() {
        // Proves the parser waits for the rest of a frame instead of failing
        // or consuming bytes, whatever byte the data stops at.
        let mut bytes = encoded(&request(&[b"INCRBY", b"hits", b"12"]));
        bytes.extend_from_slice(b"INCR  \"hi ts\"\r\n");
        for cut in 0..bytes.len() {
            let mut parser = Parser::new(limits());
            let mut buf = BytesMut::from(&bytes[..cut]);
            let first_len = encoded(&request(&[b"INCRBY", b"hits", b"12"])).len();
            let got = parser.parse(&mut buf).unwrap();
            if cut < first_len {
                assert_eq!(got, None, "cut at {cut}");
                assert_eq!(buf.len(), cut, "bytes consumed at cut {cut}");
            } else {
                assert!(got.is_some());
                assert_eq!(parser.parse(&mut buf).unwrap(), None, "cut at {cut}");
            }
        }
    }

    #[test]
    fn pipelined_requests_parse_one_at_a_time_in_order() {
        // Proves a buffer holding several requests yields each, in order.
        let mut bytes = BytesMut::new();
        for i in 0..5 {
            request(&[b"INCR", format!("c{i}").as_bytes()]).encode(&mut bytes);
        }
        bytes.extend_from_slice(b"PING\r\n");
        let frames = parse_all(&bytes).unwrap();
        assert_eq!(frames.len(), 6);
        assert_eq!(frames[3], request(&[b"INCR", b"c3"]));
        assert_eq!(frames[5], request(&[b"PING"]));
    }

    #[test]
    fn inline_commands_split_like_redis() {
        // Proves inline lines split on whitespace and honour Redis quoting.
        let frames =
            parse_all(b"set  a \"b c\\x41\\n\" 'it\\'s'\r\nPING\n\r\n   \r\nECHO \"\"\r\n")
                .unwrap();
        assert_eq!(
            frames,
            vec![
                request(&[b"set", b"a", b"b cA\n", b"it's"]),
                request(&[b"PING"]),
                request(&[b"ECHO", b""]),
            ]
        );
        assert_eq!(
            parse_err(b"ECHO \"open\r\n"),
            "Protocol error: unbalanced quotes in request"
        );
        assert_eq!(
            parse_err(b"ECHO \"a\"b\r\n"),
            "Protocol error: unbalanced quotes in request"
        );
    }

    #[test]
    fn empty_requests_are_skipped() {
        // Proves `*0` and blank lines produce no command, as in Redis.
        assert_eq!(
            parse_all(b"*0\r\n\r\n*1\r\n$4\r\nPING\r\n").unwrap(),
            vec![request(&[b"PING"])]
        );
    }

    #[test]
    fn malformed_headers_are_protocol_errors_with_redis_wording() {
        // Proves each malformed header is refused with the message Redis uses.
        assert_eq!(
            parse_err(b"*abc\r\n"),
            "Protocol error: invalid multibulk length"
        );
        assert_eq!(
            parse_err(b"*-1\r\n"),
            "Protocol error: invalid multibulk length"
        );
        assert_eq!(
            parse_err(b"*1\r\n+PING\r\n"),
            "Protocol error: expected '$', got '+'"
        );
        assert_eq!(
            parse_err(b"*1\r\n$-1\r\n"),
            "Protocol error: invalid bulk length"
        );
        assert_eq!(
            parse_err(b"*1\r\n$x\r\n"),
            "Protocol error: invalid bulk length"
        );
        assert_eq!(
            parse_err(b"*1\r\n$4\r\nPINGxx"),
            "Protocol error: bulk string is not followed by CRLF (its length prefix is wrong)"
        );
        assert_eq!(
            parse_err(b"*1\rx"),
            "Protocol error: invalid multibulk length"
        );
    }

    #[test]
    fn claimed_lengths_over_the_limits_fail_before_their_bytes_arrive() {
        // Proves a huge or over-limit length is refused from its header
        // alone, so the server never waits for nor sets aside the claimed size.
        assert_eq!(
            parse_err(b"*999999999999\r\n"),
            "Protocol error: invalid multibulk length: 999999999999 arguments is over the limit of 8 (resp_array_len_max)"
        );
        assert_eq!(
            parse_err(b"*9\r\n"),
            "Protocol error: invalid multibulk length: 9 arguments is over the limit of 8 (resp_array_len_max)"
        );
        assert_eq!(
            parse_err(b"*1\r\n$2147483647\r\n"),
            "Protocol error: invalid bulk length: 2147483647 bytes is over the limit of 64 (resp_bulk_bytes_max)"
        );
        assert_eq!(
            parse_err(b"*1\r\n$65\r\n"),
            "Protocol error: invalid bulk length: 65 bytes is over the limit of 64 (resp_bulk_bytes_max)"
        );
        assert_eq!(
            parse_err(b"*1\r\n$99999999999999999999999"),
            "Protocol error: too big bulk count string"
        );
        assert_eq!(
            parse_err(b"*111111111111111111111"),
            "Protocol error: too big mbulk count string"
        );
        assert!(parse_all(b"*1\r\n$64\r\n").unwrap().is_empty());
        assert!(parse_all(b"*8\r\n").unwrap().is_empty());
    }

    #[test]
    fn inline_lines_over_the_limit_fail_without_a_newline() {
        // Proves an endless inline line is refused once it passes the limit.
        assert!(parse_all(&[b'a'; 64]).unwrap().is_empty());
        let mut exact = vec![b'a'; 64];
        exact.extend_from_slice(b"\r");
        assert!(parse_all(&exact).unwrap().is_empty());
        exact.extend_from_slice(b"\n");
        assert_eq!(parse_all(&exact).unwrap(), vec![request(&[&[b'a'; 64]])]);
        assert_eq!(
            parse_err(&[b'a'; 65]),
            "Protocol error: too big inline request (the limit is 64 bytes, resp_inline_bytes_max)"
        );
        let mut long = vec![b'a'; 65];
        long.extend_from_slice(b"\r\n");
        assert!(parse_err(&long).starts_with("Protocol error: too big inline request"));
    }

    #[test]
    fn integers_parse_exactly_as_redis_string2ll() {
        // Proves the integer syntax matches Redis, extremes and refusals included.
        for (text, want) in [
            ("0", Some(0)),
            ("-1", Some(-1)),
            ("42", Some(42)),
            ("9223372036854775807", Some(i64::MAX)),
            ("-9223372036854775808", Some(i64::MIN)),
            ("9223372036854775808", None),
            ("-9223372036854775809", None),
            ("", None),
            ("-", None),
            ("-0", None),
            ("007", None),
            ("+5", None),
            (" 5", None),
            ("5 ", None),
            ("1e3", None),
            ("12a", None),
        ] {
            assert_eq!(parse_i64(text.as_bytes()), want, "{text:?}");
        }
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic_the_parser(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            // Proves arbitrary input ends in frames, a wait or an error, never a panic.
            let mut parser = Parser::new(limits());
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = parser.parse(&mut buf) {}
        }

        #[test]
        fn random_requests_round_trip_whatever_the_chunking(
            args in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            // Proves any request within the limits parses back to itself when
            // its bytes arrive in two pieces split anywhere.
            let frame = Frame::Array(args.iter().map(|a| Frame::Bulk(Bytes::copy_from_slice(a))).collect());
            let bytes = encoded(&frame);
            let cut = cut.index(bytes.len());
            let mut parser = Parser::new(limits());
            let mut buf = BytesMut::from(&bytes[..cut]);
            prop_assert_eq!(parser.parse(&mut buf).unwrap(), None);
            buf.extend_from_slice(&bytes[cut..]);
            prop_assert_eq!(parser.parse(&mut buf).unwrap(), Some(frame));
            prop_assert!(buf.is_empty());
        }
    }
}
