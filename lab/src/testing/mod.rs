//! Harnesses shared by the test suites of every crate: a node served on
//! loopback in this process ([`served`]), the real `tally` binary as a
//! child process ([`process`]), and a private PostgreSQL server
//! ([`postgres`]); the one set of fast cluster timings ([`FAST`]) and the
//! one way to wait for a condition ([`eventually`]).

pub mod postgres;
pub mod process;
pub mod served;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tally::cluster::ClusterConfig;

/// The `tally` binary that the running test belongs with: cargo puts test
/// executables in `target/<profile>/deps/` and binaries one level up, and
/// builds a package's binaries before its integration tests run.
pub fn tally_exe() -> PathBuf {
    let me = std::env::current_exe().expect("the test executable's path");
    let dir = me
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executables live in target/<profile>/deps");
    let exe = dir.join("tally");
    assert!(
        exe.is_file(),
        "{} does not exist: run the tests that start the binary from the tally-cli package \
         (cargo test -p tally-cli), which builds it first",
        exe.display()
    );
    exe
}

/// How often a test node flushes, refreshes and heartbeats.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    pub flush_interval: Duration,
    pub refresh_interval: Duration,
    pub heartbeat_interval: Duration,
}

/// The timings of every test cluster: a change on one node reaches the
/// others within about 40 ms (a flush plus a refresh), and a node's
/// liveness is judged within a second.
pub const FAST: Timings = Timings {
    flush_interval: Duration::from_millis(20),
    refresh_interval: Duration::from_millis(20),
    heartbeat_interval: Duration::from_millis(200),
};

impl Timings {
    /// Store settings for `store_url` with these timings.
    pub fn cluster_config(&self, store_url: impl Into<String>) -> ClusterConfig {
        let mut c = ClusterConfig::new(store_url);
        c.flush_interval = self.flush_interval;
        c.refresh_interval = self.refresh_interval;
        c.heartbeat_interval = self.heartbeat_interval;
        c
    }

    /// The same timings as `tally serve` flags.
    pub fn serve_flags(&self) -> Vec<String> {
        let ms = |d: Duration| d.as_millis().to_string();
        vec![
            "--flush-interval-ms".into(),
            ms(self.flush_interval),
            "--refresh-interval-ms".into(),
            ms(self.refresh_interval),
            "--heartbeat-interval-ms".into(),
            ms(self.heartbeat_interval),
        ]
    }
}

/// Longest a test waits for nodes to agree after a change: far above the
/// [`FAST`] bounds, so that only a real fault exceeds it.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between two polls of a condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Polls `check` until it returns `Ok`, failing the test after
/// [`SETTLE_TIMEOUT`] with `what` and the last thing `check` reported.
/// Tests wait for a condition this way, never by sleeping a fixed time.
pub async fn eventually<T>(what: &str, mut check: impl AsyncFnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what}: not reached within {SETTLE_TIMEOUT:?}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
        }
    }
}

/// [`eventually`] for a test without a runtime.
pub fn eventually_blocking<T>(what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what}: not reached within {SETTLE_TIMEOUT:?}; last seen: {last}")
            }
            Err(_) => std::thread::sleep(POLL_INTERVAL),
        }
    }
}

/// Fails the test unless `haproxy -c` accepts the configuration at `path`
/// (a missing HAProxy fails it too, naming the package to install).
pub fn assert_haproxy_accepts(path: &std::path::Path) {
    let out = std::process::Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(path)
        .output()
        .expect("running haproxy -c (is haproxy installed? apt-get install haproxy)");
    assert!(
        out.status.success(),
        "haproxy rejects {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
