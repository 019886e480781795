//! Users and roles on both front ends: every role against every kind of
//! command and route, each refusal in Redis's words or HTTP's statuses,
//! nothing applied by a refused request, and secrets never echoed.

use std::time::{Duration, Instant};

use tally::ServerConfig;
use tally::auth::Users;
use tally_lab::testing::served::{ServedNode, exchange, read_at_least, request};
use tokio::io::AsyncWriteExt;

const READER: &str = "reader-secret-0123456789";
const WRITER: &str = "writer-secret-0123456789";
const ADMIN: &str = "default-secret-012345678";

fn users() -> Users {
    Users::parse(&format!(
        "# roles\nreader read {READER}\napp write {WRITER}\ndefault admin {ADMIN}\n"
    ))
    .unwrap()
}

async fn node_with_users(dir: &std::path::Path, metrics_open: bool) -> ServedNode {
    let config = ServerConfig {
        resp_addr: Some(([127, 0, 0, 1], 0).into()),
        http_addr: Some(([127, 0, 0, 1], 0).into()),
        users: users(),
        metrics_without_auth: metrics_open,
        ..ServerConfig::default()
    };
    ServedNode::open_with(dir, config).await
}

/// One request and its whole reply (a simple line, an error or an integer).
async fn line(s: &mut tokio::net::TcpStream, args: &[&[u8]]) -> String {
    s.write_all(&request(args)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n") {
        assert!(Instant::now() < deadline, "no reply to {args:?}");
        got.extend(read_at_least(s, 1).await);
    }
    String::from_utf8(got).unwrap()
}

const NOAUTH: &str = "-NOAUTH Authentication required.\r\n";
const WRONGPASS: &str = "-WRONGPASS invalid username-password pair or user is disabled.\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp_refuses_before_auth_and_by_role_in_redis_words() {
    let dir = tempfile::tempdir().unwrap();
    let server = node_with_users(dir.path(), false).await;
    let mut s = server.raw().await;

    // Before authentication: every command but AUTH, HELLO, QUIT, RESET.
    assert_eq!(line(&mut s, &[b"PING"]).await, NOAUTH);
    assert_eq!(line(&mut s, &[b"INCR", b"c"]).await, NOAUTH);
    assert_eq!(line(&mut s, &[b"GET", b"c"]).await, NOAUTH);
    assert_eq!(line(&mut s, &[b"INFO"]).await, NOAUTH);
    assert!(
        line(&mut s, &[b"HELLO", b"3"])
            .await
            .starts_with("-NOAUTH HELLO must be called with the client already authenticated")
    );
    assert_eq!(
        server.node.get("c").unwrap(),
        None,
        "a refused INCR applied"
    );

    // A wrong secret, a wrong user: the same words, ever more slowly.
    let failures = || {
        server
            .node
            .metrics()
            .auth_failures
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let started = Instant::now();
    assert_eq!(
        line(&mut s, &[b"AUTH", b"app", READER.as_bytes()]).await,
        WRONGPASS
    );
    assert_eq!(
        line(&mut s, &[b"AUTH", b"nobody", WRITER.as_bytes()]).await,
        WRONGPASS
    );
    assert_eq!(
        line(&mut s, &[b"AUTH", b"wrong-lone-secret"]).await,
        WRONGPASS
    );
    // 100 + 200 + 400 ms of pauses.
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(failures(), 3);
    assert_eq!(line(&mut s, &[b"PING"]).await, NOAUTH);

    // The reader reads and may not write; nothing is applied.
    assert_eq!(
        line(&mut s, &[b"AUTH", b"reader", READER.as_bytes()]).await,
        "+OK\r\n"
    );
    assert_eq!(line(&mut s, &[b"PING"]).await, "+PONG\r\n");
    assert_eq!(line(&mut s, &[b"GET", b"c"]).await, "$-1\r\n");
    assert_eq!(
        line(&mut s, &[b"INCR", b"c"]).await,
        "-NOPERM this user has no permissions to run the 'incr' command\r\n"
    );
    assert_eq!(
        line(&mut s, &[b"TALLY.INCRBY", b"c", b"5", b"IDEMPOTENCY", b"k"]).await,
        "-NOPERM this user has no permissions to run the 'tally.incrby' command\r\n"
    );
    assert_eq!(
        server.node.get("c").unwrap(),
        None,
        "a refused increment applied"
    );

    // The writer (through a pipeline: AUTH, then increments).
    let mut w = server.raw().await;
    let mut pipeline = request(&[b"AUTH", b"app", WRITER.as_bytes()]);
    pipeline.extend(request(&[b"INCR", b"c"]));
    pipeline.extend(request(&[b"INCRBY", b"c", b"4"]));
    w.write_all(&pipeline).await.unwrap();
    let replies = read_at_least(&mut w, b"+OK\r\n:1\r\n:5\r\n".len()).await;
    assert_eq!(replies, b"+OK\r\n:1\r\n:5\r\n");
    assert_eq!(server.node.get("c").unwrap(), Some(5));

    // The default user with a lone secret, HELLO 3 with AUTH, and RESET
    // forgetting who the client was.
    let mut d = server.raw().await;
    assert_eq!(line(&mut d, &[b"AUTH", ADMIN.as_bytes()]).await, "+OK\r\n");
    assert_eq!(line(&mut d, &[b"INCR", b"c"]).await, ":6\r\n");
    assert_eq!(line(&mut d, &[b"RESET"]).await, "+RESET\r\n");
    assert_eq!(line(&mut d, &[b"GET", b"c"]).await, NOAUTH);
    let hello = exchange(
        &mut d,
        &request(&[b"HELLO", b"3", b"AUTH", b"reader", READER.as_bytes()]),
        4,
    )
    .await;
    assert!(
        hello.starts_with(b"%7\r\n"),
        "{:?}",
        String::from_utf8_lossy(&hello)
    );

    // No reply, INFO or CLIENT INFO ever shows a secret.
    let mut a = server.raw().await;
    assert_eq!(
        line(&mut a, &[b"AUTH", b"default", ADMIN.as_bytes()]).await,
        "+OK\r\n"
    );
    a.write_all(&request(&[b"INFO"])).await.unwrap();
    let info = String::from_utf8(read_at_least(&mut a, 200).await).unwrap();
    for secret in [READER, WRITER, ADMIN] {
        assert!(!info.contains(secret));
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_clients_authenticate_as_with_redis() {
    // The redis crate with credentials in its URL, and redis-cli with -a
    // (the default user) and with --user/--pass.
    let dir = tempfile::tempdir().unwrap();
    let server = node_with_users(dir.path(), false).await;
    let addr = server.resp;
    let url = format!("redis://app:{WRITER}@{addr}/");
    let mut con = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let v: i64 = redis::cmd("INCRBY")
        .arg("crate")
        .arg(7)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(v, 7);
    let refused = redis::Client::open(format!("redis://app:{READER}@{addr}/"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await;
    let Err(e) = refused else {
        panic!("a wrong secret connected");
    };
    assert_eq!(e.kind(), redis::ErrorKind::AuthenticationFailed, "{e}");

    let outputs = tokio::task::spawn_blocking(move || {
        let cli = |args: &[&str]| {
            let out = std::process::Command::new("redis-cli")
                .args([
                    "--no-auth-warning",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &addr.port().to_string(),
                ])
                .args(args)
                .output()
                .expect("redis-cli (Debian package redis-tools)");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        (
            cli(&["-a", ADMIN, "INCR", "crate"]),
            cli(&["--user", "reader", "--pass", READER, "GET", "crate"]),
            cli(&["--user", "reader", "--pass", READER, "INCR", "crate"]),
            cli(&["INCR", "crate"]),
        )
    })
    .await
    .unwrap();
    assert_eq!(outputs.0.trim(), "8");
    assert_eq!(outputs.1.trim(), "8");
    assert!(outputs.2.contains("NOPERM"), "{:?}", outputs.2);
    assert!(outputs.3.contains("NOAUTH"), "{:?}", outputs.3);
    assert_eq!(server.node.get("crate").unwrap(), Some(8));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_needs_a_bearer_token_with_the_right_role() {
    let dir = tempfile::tempdir().unwrap();
    let server = node_with_users(dir.path(), false).await;
    let http = reqwest::Client::new();
    let url = |path: &str| server.http_url(path);
    let bearer = |user: &str, secret: &str| format!("Bearer {user}:{secret}");

    // Open to everyone: liveness and readiness.
    for path in ["/healthz", "/readyz"] {
        let r = http.get(url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    // Everything else: 401 without a good token, with the challenge.
    for (method, path) in [
        ("POST", "/v1/counters/h/increment"),
        ("GET", "/v1/counters/h"),
        ("GET", "/v1/counters"),
        ("GET", "/v1/cluster"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/no/such/route"),
    ] {
        for token in [
            None,
            Some(bearer("app", READER)),
            Some("Basic abc".to_string()),
        ] {
            let mut req = http.request(method.parse().unwrap(), url(path));
            if let Some(t) = &token {
                req = req.header("Authorization", t);
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 401, "{method} {path} with {token:?}");
            assert_eq!(
                r.headers()["www-authenticate"],
                "Bearer realm=\"tally\"",
                "{method} {path}"
            );
            let body = r.text().await.unwrap();
            assert!(!body.contains(READER), "{body}");
        }
    }
    // The reader reads; its increment is 403 and applies nothing.
    let r = http
        .post(url("/v1/counters/h/increment"))
        .header("Authorization", bearer("reader", READER))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("needs role write"));
    let r = http
        .post(url("/v1/increments"))
        .header("Authorization", bearer("reader", READER))
        .json(&serde_json::json!([{ "name": "h", "delta": 3 }]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        server.node.get("h").unwrap(),
        None,
        "a refused increment applied"
    );
    for path in ["/v1/counters", "/v1/cluster", "/metrics", "/openapi.json"] {
        let r = http
            .get(url(path))
            .header("Authorization", bearer("reader", READER))
            .send()
            .await
            .unwrap();
        assert!(
            r.status() == 200 || (path == "/v1/cluster" && r.status() == 404),
            "{path}: {}",
            r.status()
        );
    }
    // The writer increments.
    let r = http
        .post(url("/v1/counters/h/increment"))
        .header("Authorization", bearer("app", WRITER))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(server.node.get("h").unwrap(), Some(1));
    // Bad tokens are counted (seven routes with a wrong secret; no token
    // or another scheme is not an attempt).
    let failures = server
        .node
        .metrics()
        .auth_failures
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(failures, 7);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_may_be_left_open_for_scrapers() {
    let dir = tempfile::tempdir().unwrap();
    let server = node_with_users(dir.path(), true).await;
    let r = reqwest::get(server.http_url("/metrics")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("tally_auth_failures"));
    let r = reqwest::get(server.http_url("/v1/counters")).await.unwrap();
    assert_eq!(r.status(), 401);
    server.stop().await;
}
