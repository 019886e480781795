//! A private `redis-server` for comparisons: on a free loopback port, with
//! its files in a directory of the caller's, RDB snapshots off, stopped by
//! its own process id when dropped (it is held by a [`ChildGuard`]).
//! The benchmark measures tally against it; the client compatibility suite
//! runs the same client checks against it, so that a check that Redis
//! itself fails is a wrong check, not a tally bug.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::{ChildGuard, tail_lines};
use crate::wire::resp::{Client, Reply};

/// How long a freshly started Redis may take to answer PING.
pub const REDIS_START_TIMEOUT: Duration = Duration::from_secs(20);
/// How often the wait for Redis looks again.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Longest wait for one PING reply.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Lines of Redis's log quoted in an error.
const LOG_TAIL_LINES: usize = 10;

/// A running private `redis-server`.
pub struct RedisServer {
    pub guard: ChildGuard,
    pub addr: SocketAddr,
}

impl RedisServer {
    /// Starts `redis-server` with its files in `dir` (created if needed)
    /// plus `extra_args` (persistence settings, say), and waits until it
    /// answers PING. `label` names it in errors and in the guard.
    pub fn start(dir: &Path, label: &str, extra_args: &[&str]) -> std::io::Result<RedisServer> {
        std::fs::create_dir_all(dir)?;
        let port = crate::ports::free_loopback_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut guard = ChildGuard::spawn(
            Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--save", "", "--daemonize", "no"])
                .arg("--dir")
                .arg(dir)
                .arg("--logfile")
                .arg(dir.join("redis.log"))
                .args(extra_args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            format!("redis-server ({label})"),
        )
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("starting redis-server (Debian package redis-server): {e}"),
            )
        })?;
        let deadline = Instant::now() + REDIS_START_TIMEOUT;
        loop {
            if let Some(status) = guard.try_wait()? {
                let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
                return Err(std::io::Error::other(format!(
                    "redis-server exited ({status}) at start; its log ends:\n{}",
                    tail_lines(&log, LOG_TAIL_LINES)
                )));
            }
            if ping(addr).is_ok() {
                return Ok(RedisServer { guard, addr });
            }
            if Instant::now() >= deadline {
                return Err(std::io::Error::other(format!(
                    "redis-server did not answer PING on {addr} within {} s",
                    REDIS_START_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

/// Sends PING and expects PONG within a few seconds.
pub fn ping(addr: SocketAddr) -> std::io::Result<()> {
    let reply = Client::connect_with_timeout(addr, PING_TIMEOUT)
        .and_then(|mut c| c.command(&["PING"]))
        .map_err(|e| std::io::Error::other(format!("PING to {addr}: {e}")))?;
    if reply != Reply::Simple("PONG".into()) {
        return Err(std::io::Error::other(format!(
            "PING to {addr} answered {reply:?}"
        )));
    }
    Ok(())
}
