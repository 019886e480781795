//! Starting and stopping the real `tally` binary from tests.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long a node may take to print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A `tally serve` child process, killed by pid when dropped.
pub struct TallyProcess {
    pub child: Child,
    pub resp: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    pub node_id: String,
    pub stderr_path: PathBuf,
    /// Holds the stderr log; removed with the process handle.
    _log_dir: tempfile::TempDir,
}

fn parse_addr(line: &str, key: &str) -> Option<SocketAddr> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
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
    /// unless the args or environment set them) and extra environment.
    pub fn start_with(args: &[&str], env: &[(&str, &str)]) -> TallyProcess {
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
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("starting the tally binary");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(READY_TIMEOUT) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "tally did not become ready; stderr:\n{}",
                    std::fs::read_to_string(&stderr_path).unwrap_or_default()
                );
            }
        };
        assert!(
            line.starts_with("tally ready"),
            "unexpected first line: {line}"
        );
        let node_id = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("node_id="))
            .unwrap_or_default()
            .to_string();
        TallyProcess {
            resp: parse_addr(&line, "resp="),
            http: parse_addr(&line, "http="),
            node_id,
            child,
            stderr_path,
            _log_dir: log_dir,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// `kill -9`: no chance to sync anything.
    pub fn kill9(&mut self) {
        // SAFETY: signalling a child we started, by its pid.
        unsafe { libc::kill(self.pid(), libc::SIGKILL) };
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: signalling a child we started, by its pid.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        self.child.wait().unwrap()
    }

    pub fn resp_url(&self) -> String {
        format!("redis://{}/", self.resp.expect("RESP is on"))
    }
}

impl Drop for TallyProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: as above; only our own child, by pid.
            unsafe { libc::kill(self.pid(), libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}
