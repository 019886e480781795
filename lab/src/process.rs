//! Child processes of the development tools: the one guard that holds every
//! child they start (a `tally serve` node, HAProxy, PostgreSQL, Redis, a
//! build), the one reader of a node's ready line, and bounded runs of short
//! programs.
//!
//! A child is signalled only by its own pid (`kill(2)`), and only while it
//! is unreaped: until its status has been collected the kernel keeps its
//! pid, so a signal can never reach another process. Nothing here looks up
//! or signals a process by name, and nothing signals a process group: a
//! caller that wants its child in a group of its own (so that a Ctrl-C in
//! the terminal reaches only the caller) sets that on the `Command`.
//!
//! A dropped [`ChildGuard`] SIGKILLs and reaps its child, so a failed step,
//! an error return or a panic never leaves a process running.

use std::io::{BufRead as _, BufReader, Read};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tally::ready::{READY_LINE_PREFIX, ReadyLine};

/// How long a `tally serve` node may take from its start to its ready line.
/// Recovery of its data directory and registration with the store come
/// first; on the directories the tests, the launcher and the benchmark give
/// it that is well under a second, and 60 s leaves room for a loaded
/// two-core machine without letting a node that hangs go unnoticed. (A
/// recovery of millions of journal records is timed by the benchmark with a
/// limit of its own.)
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a bounded wait for a child's exit looks again.
const EXIT_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Makes the child started by `command` receive SIGTERM when the thread
/// that starts it ends (Linux's parent-death signal, which follows the
/// forking thread, so start such children only from threads that live as
/// long as the launcher: the main thread, a supervisor). A parent that is
/// already gone when the child sets it up is caught too: the child then
/// stops at once. SIGTERM, not SIGKILL: a node stops gracefully.
pub fn exit_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: between fork and exec only async-signal-safe calls are made
    // (prctl, getppid, raise), and nothing is allocated.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::raise(libc::SIGTERM);
            }
            Ok(())
        });
    }
}

/// A child process, signalled only by its own pid and SIGKILLed and reaped
/// when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    /// Names the child in errors and names its reader threads.
    name: String,
}

impl ChildGuard {
    /// Starts `command` and guards the child.
    pub fn spawn(command: &mut Command, name: impl Into<String>) -> std::io::Result<ChildGuard> {
        Ok(ChildGuard::new(command.spawn()?, name))
    }

    /// Guards a child started elsewhere.
    pub fn new(child: Child, name: impl Into<String>) -> ChildGuard {
        ChildGuard {
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
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// The child's stderr pipe, if it was piped and not yet taken.
    pub fn take_stderr(&mut self) -> Option<ChildStderr> {
        self.child.stderr.take()
    }

    /// The child's status if it has exited (reaping it), without waiting.
    /// Once reaped, the status is remembered and returned again.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Waits for the child to exit, however long that takes.
    pub fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait()
    }

    /// Sends `signal` to the child by its pid, unless it has already been
    /// reaped (then its pid may belong to another process by now).
    pub fn signal(&mut self, signal: libc::c_int) -> std::io::Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(self.child.id())
            .map_err(|_| std::io::Error::other(format!("{}: pid out of range", self.name)))?;
        // SAFETY: kill(2) with the pid of our own child, which is not
        // reaped yet (checked above), so the pid cannot have been reused.
        if unsafe { libc::kill(pid, signal) } != 0 {
            let e = std::io::Error::last_os_error();
            // ESRCH: it exited after the check; it is a zombie until reaped.
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Waits up to `timeout` for the child to exit and reaps it; `None` if
    /// it is still running then.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(EXIT_POLL_INTERVAL);
        }
    }

    /// SIGKILL, as a crash would, and reap; the child's status.
    pub fn kill(&mut self) -> std::io::Result<ExitStatus> {
        self.signal(libc::SIGKILL)?;
        self.child.wait()
    }

    /// Waits up to `timeout` for the child to exit; SIGKILLs and reaps it
    /// if it has not. Its status if it exited by itself, `None` if it had
    /// to be killed.
    pub fn wait_or_kill(&mut self, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
        if let Some(status) = self.wait_exit(timeout)? {
            return Ok(Some(status));
        }
        self.kill()?;
        Ok(None)
    }

    /// A stop: `signal` (SIGTERM for a node, SIGINT for PostgreSQL's fast
    /// shutdown), then [`ChildGuard::wait_or_kill`] with `timeout`.
    pub fn stop(
        &mut self,
        signal: libc::c_int,
        timeout: Duration,
    ) -> std::io::Result<Option<ExitStatus>> {
        self.signal(signal)?;
        self.wait_or_kill(timeout)
    }

    /// Reads the child's stdout (which must be piped) on a thread of its
    /// own, watching for a `tally serve` ready line.
    pub fn watch_ready_line(&mut self) -> std::io::Result<ReadyWatch> {
        let stdout = self.take_stdout().ok_or_else(|| {
            std::io::Error::other(format!(
                "{}: stdout is not piped or already taken",
                self.name
            ))
        })?;
        ReadyWatch::start(stdout, format!("{}-stdout", self.name))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // Only a child known to be unreaped is signalled: after an error
        // from waitpid its pid may no longer be ours.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.kill();
        }
    }
}

/// Why no ready line came.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadyLineError {
    #[error("no ready line within {0:?}")]
    Timeout(Duration),
    /// Standard output closed first: the process exited (or closed it).
    #[error("standard output closed before a ready line: the process exited")]
    Closed,
    /// A line started like a ready line but did not parse.
    #[error("a malformed ready line: {0:?}")]
    Malformed(String),
}

/// What the reader thread has seen so far.
#[derive(Debug)]
enum Seen {
    Waiting,
    Ready(ReadyLine),
    Malformed(String),
    Closed,
}

/// A node's stdout, read to its end on a thread of its own: the first
/// ready line is kept, and every later line is read and dropped, so the
/// node never blocks on a full pipe. Lines before the ready line that are
/// not ready lines are skipped.
#[derive(Debug, Clone)]
pub struct ReadyWatch {
    seen: Arc<(Mutex<Seen>, Condvar)>,
}

impl ReadyWatch {
    /// Starts the reader thread on `stdout`.
    pub fn start(
        stdout: impl Read + Send + 'static,
        thread_name: String,
    ) -> std::io::Result<ReadyWatch> {
        let seen = Arc::new((Mutex::new(Seen::Waiting), Condvar::new()));
        let shared = Arc::clone(&seen);
        std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                let (state, changed) = &*shared;
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let mut s = state.lock();
                    if matches!(*s, Seen::Waiting) && line.starts_with(READY_LINE_PREFIX) {
                        *s = match ReadyLine::parse(&line) {
                            Some(ready) => Seen::Ready(ready),
                            None => Seen::Malformed(line),
                        };
                        changed.notify_all();
                    }
                }
                let mut s = state.lock();
                if matches!(*s, Seen::Waiting) {
                    *s = Seen::Closed;
                }
                changed.notify_all();
            })?;
        Ok(ReadyWatch { seen })
    }

    /// The ready line, if it has come; does not wait.
    pub fn ready(&self) -> Option<ReadyLine> {
        match &*self.seen.0.lock() {
            Seen::Ready(r) => Some(r.clone()),
            _ => None,
        }
    }

    /// Waits up to `timeout` for the ready line.
    pub fn wait(&self, timeout: Duration) -> Result<ReadyLine, ReadyLineError> {
        let deadline = Instant::now() + timeout;
        let (state, changed) = &*self.seen;
        let mut s = state.lock();
        loop {
            match &*s {
                Seen::Ready(r) => return Ok(r.clone()),
                Seen::Malformed(line) => return Err(ReadyLineError::Malformed(line.clone())),
                Seen::Closed => return Err(ReadyLineError::Closed),
                Seen::Waiting => {
                    if changed.wait_until(&mut s, deadline).timed_out()
                        && matches!(*s, Seen::Waiting)
                    {
                        return Err(ReadyLineError::Timeout(timeout));
                    }
                }
            }
        }
    }
}

/// Why [`run_with_timeout`] has no output to give.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    #[error("starting {name}: {source}")]
    Start {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for {name}: {source}")]
    Wait {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} did not finish within {} s and was killed", timeout.as_secs())]
    Timeout { name: String, timeout: Duration },
}

/// Runs `command` to completion with stdin closed and its output captured,
/// killing it (by pid) if it runs longer than `timeout`. The exit status
/// is the caller's to judge.
pub fn run_with_timeout(
    command: &mut Command,
    name: &str,
    timeout: Duration,
) -> Result<Output, RunError> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut guard = ChildGuard::spawn(command, name).map_err(|source| RunError::Start {
        name: name.to_string(),
        source,
    })?;
    // Both pipes are read on threads so that a chatty child never blocks
    // on a full pipe while we wait for it.
    let stdout = drain(guard.take_stdout());
    let stderr = drain(guard.take_stderr());
    let status = guard
        .wait_or_kill(timeout)
        .map_err(|source| RunError::Wait {
            name: name.to_string(),
            source,
        })?
        .ok_or_else(|| RunError::Timeout {
            name: name.to_string(),
            timeout,
        })?;
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    })
}

/// The last `n` lines of `text`: how an error quotes a child's log.
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt as _;
    use std::path::Path;

    // A stop signal reaches the child through its guard, and a dropped
    // guard leaves no process behind.
    #[test]
    fn guards_stop_their_child() {
        let mut guard = ChildGuard::spawn(Command::new("sleep").arg("600"), "sleep").unwrap();
        let status = guard
            .stop(libc::SIGTERM, Duration::from_secs(10))
            .unwrap()
            .expect("sleep exits on SIGTERM");
        assert_eq!(status.signal(), Some(libc::SIGTERM));

        let guard = ChildGuard::spawn(Command::new("sleep").arg("600"), "sleep").unwrap();
        let pid = guard.pid();
        drop(guard);
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }

    // A child that ignores its stop signal is killed once the wait is over.
    #[test]
    fn a_stop_that_is_ignored_ends_in_sigkill() {
        // An ignored signal stays ignored across exec; "armed" says so.
        let mut guard = ChildGuard::spawn(
            Command::new("sh")
                .args(["-c", "trap '' TERM; echo armed; exec sleep 600"])
                .stdout(Stdio::piped()),
            "sh",
        )
        .unwrap();
        let mut armed = String::new();
        BufReader::new(guard.take_stdout().unwrap())
            .read_line(&mut armed)
            .unwrap();
        assert_eq!(armed, "armed\n");
        assert_eq!(
            guard
                .stop(libc::SIGTERM, Duration::from_millis(200))
                .unwrap(),
            None
        );
        assert_eq!(
            guard.try_wait().unwrap().unwrap().signal(),
            Some(libc::SIGKILL)
        );
    }

    // The ready line is found after other lines and its addresses read; a
    // line that only looks like one, or an end without one, is an error.
    #[test]
    fn ready_lines_are_found_and_read() {
        let out = "starting\ntally ready node_id=node-1a2b resp=127.0.0.1:40123 http=off\nlater\n";
        let watch = ReadyWatch::start(std::io::Cursor::new(out), "t".into()).unwrap();
        let ready = watch.wait(Duration::from_secs(10)).unwrap();
        assert_eq!(ready.node_id, "node-1a2b");
        assert_eq!(ready.resp, Some("127.0.0.1:40123".parse().unwrap()));
        assert_eq!(ready.http, None);
        assert_eq!(watch.ready(), Some(ready));

        let watch =
            ReadyWatch::start(std::io::Cursor::new("tally ready node_id=x\n"), "t".into()).unwrap();
        assert!(matches!(
            watch.wait(Duration::from_secs(10)),
            Err(ReadyLineError::Malformed(_))
        ));

        let watch = ReadyWatch::start(std::io::Cursor::new("nothing\n"), "t".into()).unwrap();
        assert!(matches!(
            watch.wait(Duration::from_secs(10)),
            Err(ReadyLineError::Closed)
        ));
    }

    // A node that prints nothing is waited for only as long as asked.
    #[test]
    fn a_silent_node_times_out() {
        let mut guard = ChildGuard::spawn(
            Command::new("sleep").arg("600").stdout(Stdio::piped()),
            "sleep",
        )
        .unwrap();
        let watch = guard.watch_ready_line().unwrap();
        assert!(matches!(
            watch.wait(Duration::from_millis(100)),
            Err(ReadyLineError::Timeout(_))
        ));
        assert!(watch.ready().is_none());
    }

    // A program that outlives its limit is killed, not waited for.
    #[test]
    fn runs_are_bounded() {
        let out = run_with_timeout(
            Command::new("echo").arg("hi"),
            "echo",
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out.stdout, b"hi\n");
        let e = run_with_timeout(
            Command::new("sleep").arg("600"),
            "sleep",
            Duration::from_millis(100),
        )
        .unwrap_err();
        assert!(matches!(e, RunError::Timeout { .. }), "{e}");
    }

    // Errors quote only the end of a long log.
    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail_lines("a", 5), "a");
        assert_eq!(tail_lines("", 3), "");
    }
}
