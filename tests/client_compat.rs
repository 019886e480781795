//! Real Redis client libraries, written by others, at their defaults and in
//! both protocol versions, against a tally node: redis-py, ioredis and the
//! official Node.js client (scripts in `compat/`, see `compat/README.md`),
//! and `redis-cli -3`. Each script also runs against a private
//! `redis-server`, the witness that its checks are right: a check Redis
//! fails is a wrong check, not a tally bug.
//!
//! The libraries are installed by `scripts/test.sh` (`pip install -r
//! compat/python/requirements.txt`, `npm ci --prefix compat/node`); a test
//! whose library is missing fails, saying how to install it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tally_lab::process::ChildGuard;
use tally_lab::redis_server::RedisServer;
use tally_lab::testing::served::ServedNode;

/// Longest run of one suite against one server.
const SUITE_TIMEOUT: Duration = Duration::from_secs(120);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `program args` (with `--host`, `--port` and `--server` added),
/// bounded by [`SUITE_TIMEOUT`]; panics with its output unless it exits 0.
fn run_suite(program: &str, args: &[&Path], addr: SocketAddr, server: &str) -> String {
    let out_path = tempfile::NamedTempFile::new().unwrap();
    let out = out_path.reopen().unwrap();
    let err = out.try_clone().unwrap();
    let mut child = ChildGuard::spawn(
        Command::new(program)
            .args(args)
            .args(["--host", &addr.ip().to_string()])
            .args(["--port", &addr.port().to_string()])
            .args(["--server", server])
            .current_dir(repo())
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err)),
        program,
    )
    .unwrap_or_else(|e| panic!("starting {program}: {e}"));
    let status = child.wait_or_kill(SUITE_TIMEOUT).unwrap();
    let output = std::fs::read_to_string(out_path.path()).unwrap_or_default();
    match status {
        Some(s) if s.success() => output,
        Some(s) => panic!("{program} {args:?} against {server} failed ({s}):\n{output}"),
        None => panic!(
            "{program} {args:?} against {server} did not end within {SUITE_TIMEOUT:?}:\n{output}"
        ),
    }
}

/// Fails, saying how to install them, unless the Python libraries are there.
fn require_redis_py() {
    let ok = Command::new("python3")
        .args(["-c", "import redis"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "redis-py is not installed: pip install -r compat/python/requirements.txt \
         (scripts/test.sh does it)"
    );
}

/// Fails, saying how to install them, unless the Node.js libraries are there.
fn require_node_clients() {
    let modules = repo().join("compat/node/node_modules");
    assert!(
        modules.join("ioredis").is_dir() && modules.join("redis").is_dir(),
        "the Node.js clients are not installed: npm ci --prefix compat/node \
         (scripts/test.sh does it)"
    );
}

fn redis_py_script() -> PathBuf {
    repo().join("compat/python/test_redis_py.py")
}

fn node_script() -> PathBuf {
    repo().join("compat/node/test_clients.js")
}

/// A private redis-server in a temporary directory.
fn redis_server(dir: &Path) -> RedisServer {
    RedisServer::start(
        &dir.join("redis"),
        "client witness",
        &["--appendonly", "no"],
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_py_works_with_tally_in_both_protocols() {
    require_redis_py();
    let dir = tempfile::tempdir().unwrap();
    let server = ServedNode::open(dir.path()).await;
    let addr = server.resp;
    let script = redis_py_script();
    let out = tokio::task::spawn_blocking(move || run_suite("python3", &[&script], addr, "tally"))
        .await
        .unwrap();
    println!("{out}");
    server.stop().await;
}

#[test]
fn redis_py_checks_hold_against_redis() {
    require_redis_py();
    let dir = tempfile::tempdir().unwrap();
    let redis = redis_server(dir.path());
    println!(
        "{}",
        run_suite("python3", &[&redis_py_script()], redis.addr, "redis")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_clients_work_with_tally() {
    require_node_clients();
    let dir = tempfile::tempdir().unwrap();
    let server = ServedNode::open(dir.path()).await;
    let addr = server.resp;
    let script = node_script();
    let out = tokio::task::spawn_blocking(move || run_suite("node", &[&script], addr, "tally"))
        .await
        .unwrap();
    println!("{out}");
    server.stop().await;
}

#[test]
fn node_client_checks_hold_against_redis() {
    require_node_clients();
    let dir = tempfile::tempdir().unwrap();
    let redis = redis_server(dir.path());
    println!(
        "{}",
        run_suite("node", &[&node_script()], redis.addr, "redis")
    );
}

/// `redis-cli -3 ARGS` against `addr`: its output, which must exit 0.
fn redis_cli_3(addr: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args([
            "-3",
            "--no-raw",
            "-h",
            &addr.ip().to_string(),
            "-p",
            &addr.port().to_string(),
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli (Debian package redis-tools)");
    assert!(out.status.success(), "redis-cli -3 {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_3_reads_tally_as_it_reads_redis() {
    // redis-cli prints each RESP3 type its own way (a map as `1# "k" =>
    // v`, a missing key as `(nil)`, INFO's verbatim text as is): the same
    // commands print the same shapes from tally and from Redis.
    let dir = tempfile::tempdir().unwrap();
    let server = ServedNode::open(dir.path()).await;
    let tally = server.resp;
    let redis_dir = tempfile::tempdir().unwrap();
    let outputs = tokio::task::spawn_blocking(move || {
        let redis = redis_server(redis_dir.path());
        let mut outputs = Vec::new();
        for addr in [tally, redis.addr] {
            outputs.push((
                redis_cli_3(addr, &["INCRBY", "cli3", "41"]),
                redis_cli_3(addr, &["GET", "cli3"]),
                redis_cli_3(addr, &["GET", "cli3-missing"]),
                redis_cli_3(addr, &["CONFIG", "GET", "appendonly"]),
                redis_cli_3(addr, &["HELLO", "3"]),
                redis_cli_3(addr, &["INFO", "server"]),
            ));
        }
        outputs
    })
    .await
    .unwrap();
    let (t, r) = (&outputs[0], &outputs[1]);
    assert_eq!(t.0, "(integer) 41\n");
    assert_eq!(t.0, r.0);
    assert_eq!(t.1, "\"41\"\n");
    assert_eq!(t.1, r.1);
    assert_eq!(t.2, "(nil)\n");
    assert_eq!(t.2, r.2);
    // Redis here runs with appendonly no; tally says yes.
    assert_eq!(t.3, "1# \"appendonly\" => \"yes\"\n");
    assert_eq!(r.3, "1# \"appendonly\" => \"no\"\n");
    for (hello, who) in [(&t.4, "tally"), (&r.4, "redis")] {
        assert!(hello.starts_with("1# \"server\" => "), "{who}: {hello}");
        assert!(
            hello.contains("3# \"proto\" => (integer) 3\n"),
            "{who}: {hello}"
        );
    }
    // INFO's text as is, CRLFs included, from both.
    assert!(t.5.starts_with("# Server\r\n"), "{:?}", t.5);
    assert!(r.5.starts_with("# Server\r\n"), "{:?}", r.5);
    assert!(t.5.contains("\r\nredis_version:"), "{:?}", t.5);
    server.stop().await;
}
