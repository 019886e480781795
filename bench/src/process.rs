//! The servers under test: starting `tally serve` and a private
//! `redis-server`, and stopping them gracefully.
//!
//! Every child is held by a [`ChildGuard`] (`tally_lab::process`), which
//! stops it by its own process id when dropped, so a failed step, an error
//! return or a panic never leaves a server running. Nothing is ever stopped
//! by name.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use tally_lab::process::{ChildGuard, ReadyLineError, tail_lines};

/// How long a server may take to exit after its stop signal before it gets
/// SIGKILL.
/// tally's graceful stop writes a final snapshot of up to a few million
/// counters, which takes seconds, not minutes.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Lines of a server's log quoted in an error.
const LOG_TAIL_LINES: usize = 20;

/// Graceful stop: SIGTERM, then wait up to [`STOP_TIMEOUT`]; a child
/// still running then is killed and the stop is an error.
pub fn stop(mut guard: ChildGuard) -> Result<ExitStatus> {
    let stopped = guard
        .stop(libc::SIGTERM, STOP_TIMEOUT)
        .with_context(|| format!("stopping {}", guard.name()))?;
    match stopped {
        Some(status) => Ok(status),
        None => bail!(
            "{} did not exit within {} s of its stop signal and was killed",
            guard.name(),
            STOP_TIMEOUT.as_secs()
        ),
    }
}

/// A running `tally serve`.
pub struct Tally {
    pub guard: ChildGuard,
    pub resp_addr: Option<SocketAddr>,
    /// RESP over TLS, when the extra arguments asked for it.
    pub resp_tls_addr: Option<SocketAddr>,
    /// HTTP, when the extra arguments asked for it (`--http-addr`).
    pub http_addr: Option<SocketAddr>,
    /// From spawning the process to its ready line.
    pub ready_after: Duration,
    /// Where its log (stderr) goes.
    pub log_path: PathBuf,
}

/// Starts `tally serve` on `data_dir` with HTTP off (unless `extra_args`
/// gives `--http-addr`) and, if `resp`, RESP on
/// a loopback port chosen by the kernel; waits for its ready line, at most
/// `ready_timeout` (recovery of a large journal happens before it), and
/// checks that RESP answers PING.
pub fn start_tally(
    bin: &Path,
    data_dir: &Path,
    resp: bool,
    durability: &str,
    extra_args: &[&str],
    ready_timeout: Duration,
) -> Result<Tally> {
    std::fs::create_dir_all(data_dir)?;
    let log_path = data_dir.with_extension("log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let started = Instant::now();
    let mut guard = ChildGuard::spawn(
        Command::new(bin)
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--resp-addr", if resp { "127.0.0.1:0" } else { "off" }])
            .args(if extra_args.contains(&"--http-addr") {
                &[][..]
            } else {
                &["--http-addr", "off"][..]
            })
            .args(["--durability", durability, "--log-format", "json"])
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log),
        format!("tally serve ({durability})"),
    )
    .with_context(|| format!("starting {}", bin.display()))?;
    // The reader goes on draining stdout after the ready line and ends when
    // the child exits and its end of the pipe closes.
    let ready = guard
        .watch_ready_line()
        .context("reading tally's standard output")?
        .wait(ready_timeout);
    match ready {
        Ok(line) => {
            let ready_after = started.elapsed();
            // A front end that accepts connections but never answers
            // would hang redis-benchmark; find out now.
            if let Some(addr) = line.resp {
                ping(addr).context("tally is ready but its RESP front end does not answer")?;
            }
            Ok(Tally {
                guard,
                resp_addr: line.resp,
                resp_tls_addr: line.resp_tls,
                http_addr: line.http,
                ready_after,
                log_path,
            })
        }
        Err(ReadyLineError::Timeout(_)) => bail!(
            "tally serve printed no ready line within {} s; its log is {}",
            ready_timeout.as_secs(),
            log_path.display()
        ),
        Err(ReadyLineError::Closed) => {
            let status = guard.wait_exit(STOP_TIMEOUT)?;
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!(
                "tally serve exited ({status:?}) before it was ready; its log ends:\n{}",
                tail_lines(&log, LOG_TAIL_LINES)
            );
        }
        Err(e) => bail!("tally serve: {e}; its log is {}", log_path.display()),
    }
}

/// A running private `redis-server`.
pub use tally_lab::redis_server::RedisServer as Redis;

/// Starts a private `redis-server` on a free loopback port with its files
/// in `dir` (RDB snapshots off), plus `extra_args` (persistence settings),
/// and waits until it answers PING. Redis needs its port on the command
/// line; tally is given port 0 and reports the port it bound.
pub fn start_redis(dir: &Path, label: &str, extra_args: &[&str]) -> Result<Redis> {
    Redis::start(dir, label, extra_args).context("starting redis-server")
}

/// Sends PING and expects PONG.
pub fn ping(addr: SocketAddr) -> Result<()> {
    Ok(tally_lab::redis_server::ping(addr)?)
}

/// Resident set size of process `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    crate::parse::proc_status_rss_bytes(&status)
}
