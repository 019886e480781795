//! Starting and stopping the real `tally` binary from tests, on the crate's
//! one child guard and ready-line reader ([`crate::process`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::process::{ChildGuard, READY_TIMEOUT, ReadyWatch};

/// A `tally serve` child process, killed by pid when dropped.
pub struct TallyProcess {
    /// Declared first, so dropped first: the process is killed before its
    /// log directory is removed.
    pub child: ChildGuard,
    pub resp: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    /// RESP over TLS.
    pub resp_tls: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub node_id: String,
    pub stderr_path: PathBuf,
    /// Holds the stderr log; removed with the process handle.
    _log_dir: tempfile::TempDir,
}

impl TallyProcess {
    /// Starts `tally serve` on `data_dir` with both front ends on free
    /// loopback ports, plus `extra` flags, and waits for its ready line.
    pub fn start(data_dir: &Path, extra: &[&str]) -> TallyProcess {
        let mut args: Vec<&str> = vec!["--data-dir", data_dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        Self::start_with(&args, &[])
    }

    /// Starts `tally serve` with exactly `args` (plus free loopback ports
    /// unless the args or environment set them) and extra environment,
    /// and waits up to [`READY_TIMEOUT`] for its ready line.
    pub fn start_with(args: &[&str], env: &[(&str, &str)]) -> TallyProcess {
        Self::spawn_with(args, env).wait_ready(READY_TIMEOUT)
    }

    /// Starts `tally serve` like [`TallyProcess::start_with`], without
    /// waiting for its ready line.
    pub fn spawn_with(args: &[&str], env: &[(&str, &str)]) -> Starting {
        let log_dir = tempfile::Builder::new()
            .prefix("tally-log")
            .tempdir()
            .unwrap();
        let stderr_path = log_dir.path().join("stderr.log");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stderr_path)
            .unwrap();
        let mut cmd = Command::new(super::tally_exe());
        cmd.arg("serve").args(args);
        if !args.contains(&"--resp-addr") {
            cmd.env("TALLY_RESP_ADDR", "127.0.0.1:0");
        }
        if !args.contains(&"--http-addr") && !args.contains(&"--config") {
            cmd.env("TALLY_HTTP_ADDR", "127.0.0.1:0");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = ChildGuard::spawn(
            cmd.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::from(stderr)),
            "tally serve",
        )
        .expect("starting the tally binary");
        let ready = child
            .watch_ready_line()
            .expect("reading the tally binary's stdout");
        Starting {
            child,
            ready,
            stderr_path,
            log_dir,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.pid() as i32
    }

    /// `kill -9`: no chance to sync anything.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
    }

    /// SIGTERM, then wait for a clean exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.child.signal(libc::SIGTERM).unwrap();
        self.child.wait().unwrap()
    }

    pub fn resp_url(&self) -> String {
        format!("redis://{}/", self.resp.expect("RESP is on"))
    }
}

/// A `tally serve` child that has not printed its ready line yet.
pub struct Starting {
    pub child: ChildGuard,
    ready: ReadyWatch,
    pub stderr_path: PathBuf,
    log_dir: tempfile::TempDir,
}

impl Starting {
    /// Whether the ready line has come.
    pub fn is_ready(&self) -> bool {
        self.ready.ready().is_some()
    }

    /// What the process wrote on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits up to `timeout` for the ready line; fails the test (killing
    /// the process) if it does not come.
    pub fn wait_ready(mut self, timeout: std::time::Duration) -> TallyProcess {
        let line = match self.ready.wait(timeout) {
            Ok(line) => line,
            Err(e) => {
                let _ = self.child.kill();
                panic!(
                    "tally did not become ready ({e}); stderr:\n{}",
                    self.stderr()
                );
            }
        };
        TallyProcess {
            resp: line.resp,
            http: line.http,
            resp_tls: line.resp_tls,
            https: line.https,
            node_id: line.node_id,
            child: self.child,
            stderr_path: self.stderr_path,
            _log_dir: self.log_dir,
        }
    }
}

/// The banner `tally cluster` prints on `stdout`, up to its last line
/// ("Ctrl-C stops the cluster."), or `None` if it does not come within
/// `timeout`. The reader thread goes on draining stdout afterwards, so the
/// launcher never blocks on a full pipe.
pub fn cluster_banner(
    stdout: std::process::ChildStdout,
    timeout: std::time::Duration,
) -> Option<Vec<String>> {
    use std::io::{BufRead as _, BufReader};
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let done = line.starts_with("Ctrl-C");
            lines.push(line);
            if done {
                let _ = tx.send(lines.clone());
            }
        }
    });
    rx.recv_timeout(timeout).ok()
}
