//! Bad input over raw TCP: malformed frames, huge or over-limit lengths,
//! garbage, bad names, stalled clients and too many connections each get a
//! clear error, lose nothing, and leave the server answering everyone else.

use tally_lab::testing::served as resp_support;

use std::time::{Duration, Instant};

use resp_support::{ServedNode, assert_serving, exchange, read_at_least, read_to_close, request};
use tally::ServerConfig;
use tokio::io::AsyncWriteExt;

/// Sends `bytes` on a fresh connection and returns everything the server
/// sends before it closes the connection.
async fn reply_then_close(server: &ServedNode, bytes: &[u8]) -> String {
    let mut s = server.raw().await;
    // The server may close before taking every byte; a failed write is
    // part of what is being tested, not a test failure.
    let _ = s.write_all(bytes).await;
    String::from_utf8_lossy(&read_to_close(&mut s).await).into_owned()
}

/// Starts a server holding one counter, `kept`, at 5.
async fn server_with_a_counter(dir: &std::path::Path, config: ServerConfig) -> ServedNode {
    let server = ServedNode::open_with(dir, config).await;
    let mut s = server.raw().await;
    assert_eq!(
        exchange(&mut s, &request(&[b"INCRBY", b"kept", b"5"]), 4).await,
        b":5\r\n"
    );
    server
}

async fn assert_intact(server: &ServedNode) {
    assert_serving(server).await;
    assert_eq!(server.node.get("kept").unwrap(), Some(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_a_protocol_error_and_close() {
    // Proves each malformed frame is answered with Redis's protocol error
    // and its connection closed, while the server and counters carry on.
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_a_counter(dir.path(), ServerConfig::default()).await;
    let cases: &[(&[u8], &str)] = &[
        (
            b"*abc\r\n",
            "-ERR Protocol error: invalid multibulk length\r\n",
        ),
        (
            b"*-5\r\n",
            "-ERR Protocol error: invalid multibulk length\r\n",
        ),
        (
            b"*1\r\n+PING\r\n",
            "-ERR Protocol error: expected '$', got '+'\r\n",
        ),
        (
            b"*1\r\n$-1\r\n",
            "-ERR Protocol error: invalid bulk length\r\n",
        ),
        (
            b"*1\r\n$x\r\n",
            "-ERR Protocol error: invalid bulk length\r\n",
        ),
        (
            b"*1\r\n$4\r\nPINGPONG\r\n",
            "-ERR Protocol error: bulk string is not followed by CRLF",
        ),
        (
            b"ECHO \"unbalanced\r\n",
            "-ERR Protocol error: unbalanced quotes in request\r\n",
        ),
    ];
    for (bytes, want) in cases {
        let got = reply_then_close(&server, bytes).await;
        assert!(got.starts_with(want), "{bytes:?}: got {got:?}");
    }
    assert_intact(&server).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_before_a_protocol_error_are_still_answered() {
    // Proves well-formed requests pipelined ahead of a bad frame run and
    // are answered before the protocol error.
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_a_counter(dir.path(), ServerConfig::default()).await;
    let mut bytes = request(&[b"INCR", b"kept"]);
    bytes.extend_from_slice(b"*1\r\n+oops\r\n");
    let got = reply_then_close(&server, &bytes).await;
    assert_eq!(got, ":6\r\n-ERR Protocol error: expected '$', got '+'\r\n");
    assert_eq!(server.node.get("kept").unwrap(), Some(6));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_length_prefixes_are_refused_before_their_bytes() {
    // Proves a claimed length far beyond the limits is refused from the
    // header alone: the server answers at once instead of waiting for (or
    // allocating) the claimed size.
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_a_counter(dir.path(), ServerConfig::default()).await;
    let cases: &[&[u8]] = &[
        b"*999999999999\r\n",
        b"*3\r\n$6\r\nINCRBY\r\n$2147483647\r\n",
        b"*2\r\n$4\r\nINCR\r\n$99999999999999999999999999",
        b"*9223372036854775807\r\n",
    ];
    for bytes in cases {
        let started = Instant::now();
        let got = reply_then_close(&server, bytes).await;
        assert!(
            got.starts_with("-ERR Protocol error: "),
            "{bytes:?}: got {got:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    assert_intact(&server).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_limit_bulk_array_and_inline_are_refused() {
    // Proves the configured limits on bulk size, array length and inline
    // length are enforced with a protocol error, while requests at the
    // limits are served.
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        resp_bulk_bytes_max: 1024,
        resp_array_len_max: 16,
        resp_inline_bytes_max: 512,
        ..ServerConfig::default()
    };
    let server = server_with_a_counter(dir.path(), config).await;

    let big = vec![b'x'; 1025];
    let got = reply_then_close(&server, &request(&[b"ECHO", &big])).await;
    assert_eq!(
        got,
        "-ERR Protocol error: invalid bulk length: 1025 bytes is over the limit of 1024 (resp_bulk_bytes_max)\r\n"
    );
    let mut s = server.raw().await;
    let at_limit = vec![b'y'; 1024];
    let reply = exchange(&mut s, &request(&[b"ECHO", &at_limit]), 1024 + 9).await;
    assert_eq!(reply.len(), 1024 + 9);

    let mut args: Vec<&[u8]> = vec![b"EXISTS"];
    args.extend(std::iter::repeat_n(&b"kept"[..], 16));
    let got = reply_then_close(&server, &request(&args)).await;
    assert_eq!(
        got,
        "-ERR Protocol error: invalid multibulk length: 17 arguments is over the limit of 16 (resp_array_len_max)\r\n"
    );
    args.pop();
    assert_eq!(exchange(&mut s, &request(&args), 5).await, b":15\r\n");

    let got = reply_then_close(&server, &vec![b'a'; 600]).await;
    assert!(
        got.starts_with("-ERR Protocol error: too big inline request"),
        "{got:?}"
    );
    assert_intact(&server).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bytes_get_errors_not_a_crash() {
    // Proves binary garbage is answered with errors (an unknown command for
    // a line, a protocol error otherwise) and the server carries on.
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_a_counter(dir.path(), ServerConfig::default()).await;

    let mut s = server.raw().await;
    let got = exchange(&mut s, b"\x00\x01\x02\xff\xfegarbage\r\n", 1).await;
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("-ERR unknown command '"), "{got:?}");
    // An unknown command is not a protocol error: the connection goes on.
    assert_eq!(exchange(&mut s, b"PING\r\n", 7).await, b"+PONG\r\n");

    // Pseudo-random bytes from a fixed seed, starting like an array.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut noise = b"*3\r\n".to_vec();
    noise.extend((0..4096).map(|_| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed as u8
    }));
    let got = reply_then_close(&server, &noise).await;
    assert!(got.starts_with("-ERR Protocol error: "), "{got:?}");
    assert_intact(&server).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_tally_cannot_store_are_refused_clearly() {
    // Proves oversized, empty and non-UTF-8 counter names and oversized
    // idempotency keys get an ERR naming the rule, without closing the
    // connection or creating a counter.
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_a_counter(dir.path(), ServerConfig::default()).await;
    let mut s = server.raw().await;
    let long = vec![b'n'; 257];
    let long_key = vec![b'k'; 129];
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            request(&[b"INCR", &long]),
            "-ERR counter name is invalid: it is 257 bytes long; the limit is 256 bytes\r\n",
        ),
        (
            request(&[b"GET", &long]),
            "-ERR counter name is invalid: it is 257 bytes long; the limit is 256 bytes\r\n",
        ),
        (
            request(&[b"INCRBY", b"\xff\xfe", b"1"]),
            "-ERR counter name is invalid: it is not valid UTF-8\r\n",
        ),
        (
            request(&[b"INCR", b""]),
            "-ERR counter name is invalid: it is empty\r\n",
        ),
        (
            request(&[b"TALLY.INCRBY", b"kept", b"1", b"IDEMPOTENCY", &long_key]),
            "-ERR idempotency key is invalid: it is 129 bytes long; the limit is 128 bytes\r\n",
        ),
        (
            request(&[b"TALLY.INCRBY", b"kept", b"1", b"IDEMPOTENCY", b"\xc3"]),
            "-ERR idempotency key is invalid: it is not valid UTF-8\r\n",
        ),
    ];
    for (bytes, want) in cases {
        let got = exchange(&mut s, &bytes, want.len()).await;
        assert_eq!(String::from_utf8_lossy(&got), want);
    }
    let exact = vec![b'n'; 256];
    assert_eq!(
        exchange(&mut s, &request(&[b"INCR", &exact]), 4).await,
        b":1\r\n"
    );
    assert_eq!(server.node.counter_count(), 2);
    assert_intact(&server).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_request_is_disconnected_after_the_frame_timeout() {
    // Proves a client that stops mid-request, or trickles it byte by byte,
    // is disconnected once the frame timeout has passed, while an idle
    // client with no partial request is left alone.
    let dir = tempfile::tempdir().unwrap();
    let frame_timeout = Duration::from_millis(300);
    let config = ServerConfig {
        frame_timeout,
        ..ServerConfig::default()
    };
    let server = server_with_a_counter(dir.path(), config).await;
    let mut idle = server.raw().await;

    let mut stalled = server.raw().await;
    let started = Instant::now();
    stalled
        .write_all(b"*3\r\n$6\r\nINCRBY\r\n$4\r\nkept\r\n$1")
        .await
        .unwrap();
    let got = String::from_utf8_lossy(&read_to_close(&mut stalled).await).into_owned();
    assert_eq!(
        got,
        "-ERR Protocol error: request not completed within 300 ms (frame_timeout)\r\n"
    );
    assert!(started.elapsed() >= frame_timeout);

    // One byte every 100 ms keeps the socket busy but never finishes the
    // request: the clock runs from the first wait, not the latest byte.
    let mut trickle = server.raw().await;
    let started = Instant::now();
    let request = request(&[b"INCRBY", b"kept", b"1000"]);
    let mut closed = false;
    for byte in &request[..request.len() - 1] {
        if trickle.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if started.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    if !closed {
        let got = String::from_utf8_lossy(&read_to_close(&mut trickle).await).into_owned();
        assert!(got.contains("frame_timeout"), "{got:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(5));

    // The idle connection outlived several frame timeouts and still works.
    assert!(started.elapsed() > frame_timeout * 3);
    assert_eq!(exchange(&mut idle, b"PING\r\n", 7).await, b"+PONG\r\n");
    assert_intact(&server).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_refused_as_redis_does() {
    // Proves with resp_connections_max = 2 a third connection gets Redis's
    // "max number of clients" error and is closed, and a slot freed by a
    // closing client is usable again.
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        resp_connections_max: 2,
        ..ServerConfig::default()
    };
    let server = ServedNode::open_with(dir.path(), config).await;
    let mut first = server.raw().await;
    let mut second = server.raw().await;
    assert_eq!(exchange(&mut first, b"PING\r\n", 7).await, b"+PONG\r\n");
    assert_eq!(exchange(&mut second, b"PING\r\n", 7).await, b"+PONG\r\n");

    let mut third = server.raw().await;
    let _ = third.write_all(b"PING\r\n").await;
    assert_eq!(
        read_to_close(&mut third).await,
        b"-ERR max number of clients reached\r\n"
    );
    let info = exchange(&mut first, b"INFO stats\r\n", 1).await;
    let info = String::from_utf8_lossy(&info);
    assert!(info.contains("rejected_connections:1\r\n"), "{info}");

    // Closing one client frees its slot once the server has seen it go.
    drop(second);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut again = server.raw().await;
        let got = exchange(&mut again, b"PING\r\n", 7).await;
        if got == b"+PONG\r\n" {
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed: {got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(exchange(&mut first, b"PING\r\n", 7).await, b"+PONG\r\n");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_from_other_clients_do_not_disturb_a_pipeline() {
    // Proves a client's long pipeline is answered completely and in order
    // while other clients send protocol errors at the same time.
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_a_counter(dir.path(), ServerConfig::default()).await;
    let mut good = server.raw().await;
    let mut pipeline = Vec::new();
    for _ in 0..500 {
        pipeline.extend_from_slice(&request(&[b"INCR", b"busy"]));
    }
    good.write_all(&pipeline).await.unwrap();
    for _ in 0..20 {
        let got = reply_then_close(&server, b"*1\r\n$-7\r\n").await;
        assert!(got.starts_with("-ERR Protocol error"));
    }
    let expected: String = (1..=500).map(|i| format!(":{i}\r\n")).collect();
    let got = read_at_least(&mut good, expected.len()).await;
    assert_eq!(String::from_utf8_lossy(&got), expected);
    assert_intact(&server).await;
    server.stop().await;
}
