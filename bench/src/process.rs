//! Child processes: the servers under test and the tools that drive them.
//!
//! Every child is held by a [`Guard`] that stops it by its own process id
//! when dropped, so a failed step, an error return or a panic never leaves a
//! server running. Nothing is ever stopped by name.

use std::io::{BufRead as _, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::resp::{Client, Reply};

/// How long a server may take to exit after its stop signal before it gets
/// SIGKILL.
/// tally's graceful stop writes a final snapshot of up to a few million
/// counters, which takes seconds, not minutes.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a freshly started Redis may take to answer PING.
const REDIS_START_TIMEOUT: Duration = Duration::from_secs(20);
/// How often a waiting loop looks again.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Longest wait for a PING reply from a server that says it is ready.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// A child process that is stopped by pid when the guard is dropped.
pub struct Guard {
    child: Child,
    name: String,
}

impl Guard {
    pub fn new(child: Child, name: impl Into<String>) -> Guard {
        Guard {
            child,
            name: name.into(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The child's stdout pipe, if it was piped and not yet taken.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// Sends `signal` to the child if it has not been reaped. While the
    /// `Child` is unreaped its pid cannot be reused by another process, so
    /// the signal cannot reach a stranger.
    fn signal(&mut self, signal: libc::c_int) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: kill(2) with the pid of our own unreaped child.
        if unsafe { libc::kill(pid, signal) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e).with_context(|| format!("signalling {}", self.name));
            }
        }
        Ok(())
    }

    /// Waits for the child to exit, at most `timeout`.
    fn wait_for(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Graceful stop: SIGTERM, then wait up to [`STOP_TIMEOUT`]; a child
    /// still running then is killed and the stop is an error.
    pub fn stop(mut self) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM)?;
        if let Some(status) = self.wait_for(STOP_TIMEOUT)? {
            return Ok(status);
        }
        self.kill_now();
        bail!(
            "{} did not exit within {} s of its stop signal and was killed",
            self.name,
            STOP_TIMEOUT.as_secs()
        )
    }

    /// Abrupt stop (SIGKILL), as a crash would; waits for the exit.
    pub fn kill(mut self) {
        self.kill_now();
    }

    fn kill_now(&mut self) {
        let _ = self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// Waits for the child to exit by itself within `timeout` and returns
    /// its status; past the timeout it is killed and that is an error.
    pub fn wait_exit(mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.wait_for(timeout)? {
            return Ok(status);
        }
        self.kill_now();
        bail!(
            "{} did not finish within {} s and was killed",
            self.name,
            timeout.as_secs()
        )
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = self.signal(libc::SIGTERM);
        if !matches!(self.wait_for(STOP_TIMEOUT), Ok(Some(_))) {
            self.kill_now();
        }
    }
}

/// Runs `command` to completion with its output captured, killing it if it
/// runs longer than `timeout`.
pub fn run_with_timeout(command: &mut Command, name: &str, timeout: Duration) -> Result<Output> {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    // Read both pipes on threads so that a chatty child never blocks on a
    // full pipe while we wait for it.
    let mut guard = Guard::new(child, name);
    let stdout = drain(guard.child.stdout.take());
    let stderr = drain(guard.child.stderr.take());
    let status = guard.wait_for(timeout)?;
    let Some(status) = status else {
        guard.kill_now();
        bail!(
            "{name} did not finish within {} s and was killed",
            timeout.as_secs()
        );
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

fn drain<R: std::io::Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    })
}

/// A loopback port that was free a moment ago. Redis needs its port on the
/// command line; tally is given port 0 and reports the port it bound.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(l.local_addr()?.port())
}

/// A running `tally serve`.
pub struct Tally {
    pub guard: Guard,
    pub resp_addr: Option<SocketAddr>,
    /// From spawning the process to its ready line.
    pub ready_after: Duration,
    /// Where its log (stderr) goes.
    pub log_path: PathBuf,
}

/// Starts `tally serve` on `data_dir` with HTTP off and, if `resp`, RESP on
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
    let child = Command::new(bin)
        .arg("serve")
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--resp-addr", if resp { "127.0.0.1:0" } else { "off" }])
        .args(["--http-addr", "off"])
        .args(["--durability", durability, "--log-format", "json"])
        .args(extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut guard = Guard::new(child, format!("tally serve ({durability})"));
    let stdout = guard.child.stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    // The reader goes on draining stdout after the ready line and ends when
    // the child exits and its end of the pipe closes.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = started + ready_timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.starts_with("tally ready ") => {
                let ready_after = started.elapsed();
                let resp_addr = ready_line_addr(&line, "resp")?;
                // A front end that accepts connections but never answers
                // would hang redis-benchmark; find out now.
                if let Some(addr) = resp_addr {
                    ping(addr).context("tally is ready but its RESP front end does not answer")?;
                }
                return Ok(Tally {
                    guard,
                    resp_addr,
                    ready_after,
                    log_path,
                });
            }
            Ok(_) => continue,
            Err(mpsc::RecvTimeoutError::Timeout) => bail!(
                "tally serve printed no ready line within {} s; its log is {}",
                ready_timeout.as_secs(),
                log_path.display()
            ),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = guard.wait_for(STOP_TIMEOUT)?;
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!(
                    "tally serve exited ({status:?}) before it was ready; its log ends:\n{}",
                    tail(&log, 20)
                );
            }
        }
    }
}

/// The address after `what=` in a ready line; `off` is `None`.
fn ready_line_addr(line: &str, what: &str) -> Result<Option<SocketAddr>> {
    let value = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(what)?.strip_prefix('='))
        .ok_or_else(|| anyhow!("ready line has no {what}=: {line}"))?;
    if value == "off" {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .with_context(|| format!("ready line has a bad {what} address: {line}"))
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A running private `redis-server`.
pub struct Redis {
    pub guard: Guard,
    pub addr: SocketAddr,
}

/// Starts a private `redis-server` on a free loopback port with its files
/// in `dir` (RDB snapshots off), plus `extra_args` (persistence settings),
/// and waits until it answers PING.
pub fn start_redis(dir: &Path, label: &str, extra_args: &[&str]) -> Result<Redis> {
    std::fs::create_dir_all(dir)?;
    let port = free_port()?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let child = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .args(extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting redis-server")?;
    let mut guard = Guard::new(child, format!("redis-server ({label})"));
    let deadline = Instant::now() + REDIS_START_TIMEOUT;
    loop {
        if let Some(status) = guard.child.try_wait()? {
            let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
            bail!(
                "redis-server exited ({status}) at start; its log ends:\n{}",
                tail(&log, 10)
            );
        }
        if ping(addr).is_ok() {
            return Ok(Redis { guard, addr });
        }
        if Instant::now() >= deadline {
            bail!(
                "redis-server did not answer PING on {addr} within {} s",
                REDIS_START_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(POLL_INTERVAL * 5);
    }
}

/// Sends PING and expects PONG within [`PING_TIMEOUT`].
pub fn ping(addr: SocketAddr) -> Result<()> {
    let reply = Client::connect_with_timeout(addr, PING_TIMEOUT)?.command(&["PING"])?;
    if reply != Reply::Simple("PONG".into()) {
        bail!("PING to {addr} answered {reply:?}");
    }
    Ok(())
}

/// Resident set size of process `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    crate::parse::proc_status_rss_bytes(&status)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The RESP address is read from tally's ready line; "off" means none.
    #[test]
    fn ready_line_addresses_are_parsed() {
        let line = "tally ready node_id=node-1a2b resp=127.0.0.1:40123 http=off";
        assert_eq!(
            ready_line_addr(line, "resp").unwrap(),
            Some("127.0.0.1:40123".parse().unwrap())
        );
        assert_eq!(ready_line_addr(line, "http").unwrap(), None);
        assert!(ready_line_addr("tally ready node_id=x", "resp").is_err());
    }

    // A child that ignores nothing is stopped by SIGTERM through its guard,
    // and a dropped guard leaves no process behind.
    #[test]
    fn guards_stop_their_child() {
        let child = Command::new("sleep").arg("600").spawn().unwrap();
        let guard = Guard::new(child, "sleep");
        let status = guard.stop().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGTERM)
        );

        let child = Command::new("sleep").arg("600").spawn().unwrap();
        let pid = child.id();
        drop(Guard::new(child, "sleep"));
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }
}
