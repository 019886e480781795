//! The fault test: `tally chaos --duration 60s`, the binary as a user runs
//! it, on a real 3-node cluster behind the real HAProxy, on SQLite and on a
//! private PostgreSQL server, loses and double-counts nothing under every
//! fault kind; the same attached to a running `tally cluster`; and the
//! checker it relies on reports lost and doubled increments, on hand-made
//! histories and on a run that really loses data.
//!
//! HAProxy and the PostgreSQL server binaries must be installed
//! (`scripts/test.sh` installs them): the runs fail without them rather
//! than skip.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use tally_lab::chaos::{self, ChaosConfig, ChaosReport, Fault, Level, Outcome, Protocol, Request};

fn request(counter: &str, level: Level, key: &str, delta: u64, outcome: Outcome) -> Request {
    Request {
        client: 0,
        counter: counter.into(),
        protocol: Protocol::Http,
        level,
        key: key.into(),
        delta,
        attempts: 1,
        unknown_attempts: 0,
        sent_ms: 0,
        done_ms: 1,
        outcome,
        last_error: None,
    }
}

fn values(pairs: &[(&str, &[u64])]) -> BTreeMap<String, Vec<u64>> {
    pairs
        .iter()
        .map(|(c, v)| ((*c).to_string(), v.to_vec()))
        .collect()
}

/// The checker accepts exact values, and values within the unresolved
/// increments' window.
#[test]
fn checker_accepts_a_correct_history() {
    let history = vec![
        request("a", Level::Local, "k1", 3, Outcome::Acked),
        request("a", Level::Local, "k2", 2, Outcome::Indeterminate),
        request("a", Level::Local, "k3", 7, Outcome::Failed),
        request("m", Level::Memory, "k4", 4, Outcome::Acked),
    ];
    for a in [3, 5] {
        let v = chaos::check(&history, &values(&[("a", &[a, a, a]), ("m", &[4, 4, 4])]));
        assert!(v.ok(), "{:?}", v.violations);
        assert_eq!((v.lost, v.counted_twice), (0, 0));
    }
}

/// An acknowledged increment missing from the final value is a violation,
/// and so is a value above acknowledged plus unresolved.
#[test]
fn checker_reports_lost_and_doubled_increments() {
    let history = vec![
        request("a", Level::Replicated, "k1", 3, Outcome::Acked),
        request("a", Level::Replicated, "k2", 2, Outcome::Acked),
        request("a", Level::Replicated, "k3", 4, Outcome::Failed),
    ];
    let lost = chaos::check(&history, &values(&[("a", &[3, 3, 3])]));
    assert!(!lost.ok());
    assert_eq!(lost.lost, 2);
    let doubled = chaos::check(&history, &values(&[("a", &[9, 9, 9])]));
    assert!(!doubled.ok());
    assert_eq!(doubled.counted_twice, 4);
    let split = chaos::check(&history, &values(&[("a", &[5, 5, 4])]));
    assert!(!split.ok(), "nodes that disagree must be reported");
    assert_eq!(split.disagreements, vec!["a".to_string()]);
}

/// A `memory` write lost by a crash is allowed and reported as such; the
/// same loss counted as if it were `local` is a violation.
#[test]
fn checker_holds_memory_only_to_the_upper_bound() {
    let memory = vec![request("m", Level::Memory, "k1", 5, Outcome::Acked)];
    let v = chaos::check(&memory, &values(&[("m", &[0, 0, 0])]));
    assert!(v.ok(), "{:?}", v.violations);
    assert_eq!(v.memory_lost, 5);
    let as_local = vec![request("m", Level::Local, "k1", 5, Outcome::Acked)];
    let v = chaos::check(&as_local, &values(&[("m", &[0, 0, 0])]));
    assert!(!v.ok());
    assert_eq!(v.lost, 5);
}

/// A retried `local` increment may be applied once per unknown attempt
/// (keys are per node below `replicated`), and that is reported; the same
/// history at `replicated`, whose keys are cluster-wide, is a violation.
#[test]
fn checker_allows_per_node_keys_only_below_replicated() {
    let retried = |level| {
        let mut r = request("a", level, "k1", 2, Outcome::Acked);
        r.attempts = 2;
        r.unknown_attempts = 1;
        vec![r]
    };
    let v = chaos::check(&retried(Level::Local), &values(&[("a", &[4, 4, 4])]));
    assert!(v.ok(), "{:?}", v.violations);
    assert_eq!(v.retry_applied_twice, 2);
    let v = chaos::check(&retried(Level::Local), &values(&[("a", &[6, 6, 6])]));
    assert!(
        !v.ok(),
        "two applications are the most one unknown attempt allows"
    );
    let v = chaos::check(&retried(Level::Replicated), &values(&[("a", &[4, 4, 4])]));
    assert!(!v.ok());
    assert_eq!(v.counted_twice, 2);
}

/// The seed of the runs: `TALLY_CHAOS_SEED` replays another one.
fn seed() -> u64 {
    std::env::var("TALLY_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x7a11_c4a0_5eed)
}

/// The runs go one at a time: on two cores, two clusters under faults
/// would each miss their readiness and rotation windows.
static ONE_AT_A_TIME: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// How long the full runs last: about a minute, as the acceptance
/// criterion asks.
const RUN: Duration = Duration::from_secs(60);

/// Runs chaos in a temporary directory, kept for analysis if the run's
/// result is not `expected` (pass or fail).
fn run(config: ChaosConfig, expected: bool) -> ChaosReport {
    let _one = ONE_AT_A_TIME.lock();
    let dir = tempfile::tempdir().unwrap();
    let report = chaos::run(ChaosConfig {
        exe: Some(env!("CARGO_BIN_EXE_tally").into()),
        base_dir: dir.path().to_path_buf(),
        seed: seed(),
        clients: 6,
        ..config
    })
    .expect("running chaos (is haproxy installed?)");
    println!("{}", report.render());
    if !report.passed() {
        // A failing run keeps its history for analysis.
        let history = report.history_path.as_ref().expect("a history path");
        assert!(
            std::fs::metadata(history).is_ok_and(|m| m.len() > 0),
            "no history at {}",
            history.display()
        );
    }
    if report.passed() != expected {
        // Keep the cluster's logs and the history for analysis.
        println!("kept {}", dir.keep().display());
    }
    report
}

/// Runs `tally chaos` (the binary, as a user would) for [`RUN`] in a
/// temporary directory, kept if the run fails; returns its exit status,
/// output and JSON report.
fn run_binary(args: &[&str]) -> (std::process::ExitStatus, String, serde_json::Value) {
    let _one = ONE_AT_A_TIME.lock();
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("chaos")
        .args(["--duration", &format!("{}s", RUN.as_secs())])
        .args(["--clients", "6", "--seed", &seed().to_string()])
        .arg("--dir")
        .arg(dir.path().join("run"))
        .arg("--report-json")
        .arg(&report_path)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    let report = std::fs::read_to_string(&report_path)
        .ok()
        .and_then(|r| serde_json::from_str(&r).ok())
        .unwrap_or(serde_json::Value::Null);
    if !out.status.success() {
        // Keep the cluster's logs and the history for analysis.
        println!("kept {}", dir.keep().display());
    }
    (out.status, text, report)
}

/// A passing run: exit 0, every required fault kind injected, nothing
/// lost or counted twice, and acknowledgements at every level over both
/// protocols.
fn assert_clean(
    status: std::process::ExitStatus,
    output: &str,
    report: &serde_json::Value,
    faults: &[&str],
) {
    assert!(status.success(), "tally chaos failed ({status}):\n{output}");
    let required: Vec<&str> = report["required_faults"]
        .as_array()
        .unwrap_or_else(|| panic!("no report:\n{output}"))
        .iter()
        .filter_map(|f| f.as_str())
        .collect();
    assert_eq!(required, faults, "{output}");
    for f in faults {
        assert!(
            report["faults"][f].as_u64().unwrap_or(0) > 0,
            "{f} never ran\n{output}"
        );
    }
    assert_eq!(report["verdict"]["lost"], 0, "{output}");
    assert_eq!(report["verdict"]["counted_twice"], 0, "{output}");
    // A passing run deletes what it created, and each counter then reads 0
    // on every node.
    assert!(
        report["cleanup"]["counters"].as_u64().unwrap_or(0) > 0,
        "{output}"
    );
    assert_eq!(
        report["cleanup"]["errors"],
        serde_json::json!([]),
        "{output}"
    );
    for level in ["local", "memory", "replicated"] {
        for protocol in ["Http", "Resp"] {
            let kind = format!("{protocol} {level}");
            assert!(
                report["by_kind"][&kind]["acked"].as_u64().unwrap_or(0) > 0,
                "no {kind} increment was acknowledged\n{output}"
            );
        }
    }
}

/// `tally chaos --duration 60s` on SQLite: every fault kind that applies
/// (all but the store's) runs, nothing is lost or counted twice.
#[test]
fn chaos_run_sqlite() {
    let (status, output, report) = run_binary(&[]);
    assert_clean(
        status,
        &output,
        &report,
        &["Kill9", "Restart", "Pause", "Wipe"],
    );
}

/// The same on a private PostgreSQL server that the run stops and starts
/// as a fault: all five kinds.
#[test]
fn chaos_run_postgres() {
    let (status, output, report) = run_binary(&["--store", "private-postgres"]);
    assert_clean(
        status,
        &output,
        &report,
        &["Kill9", "Restart", "Pause", "Wipe", "StoreOutage"],
    );
}

/// The same on a highly available store of the run's own (etcd, Patroni,
/// PostgreSQL with a synchronous standby, HAProxy): every node fault and
/// every HA store fault (the primary killed, frozen past the leader TTL,
/// switched over, an etcd member killed) runs, and nothing acknowledged is
/// lost or counted twice; the report says, per store fault, how long
/// `replicated` went unacknowledged.
#[test]
fn chaos_run_ha_postgres() {
    let (status, output, report) = run_binary(&["--store", "private-ha-postgres"]);
    assert_clean(
        status,
        &output,
        &report,
        &[
            "Kill9",
            "Restart",
            "Pause",
            "Wipe",
            "PrimaryKill9",
            "PrimaryFreeze",
            "Switchover",
            "EtcdKill9",
        ],
    );
    let gaps = report["store_faults"]
        .as_array()
        .unwrap_or_else(|| panic!("no store fault figures:\n{output}"));
    assert!(gaps.len() >= 4, "{output}");
    assert!(
        gaps.iter()
            .all(|g| g["replicated_unavailable_ms"].as_u64().is_some()),
        "{output}"
    );
}

/// The checker catches real loss, not only hand-made histories: clients
/// send `memory` increments but record them as `local`, and `kill -9`
/// destroys those still waiting for the background sync (up to 100 ms of
/// them). The run must fail, with lost increments counted.
#[test]
fn checker_reports_memory_writes_killed_before_their_sync() {
    let report = run(
        ChaosConfig {
            duration: Duration::from_secs(10),
            faults: vec![Fault::Kill9],
            mislabel_memory_as_local: true,
            ..ChaosConfig::default()
        },
        false,
    );
    let table = report.render();
    assert!(
        report.faults.get("Kill9").copied().unwrap_or(0) > 0,
        "{table}"
    );
    assert!(report.verdict.lost > 0, "the loss went unseen\n{table}");
    assert!(
        report.cleanup.is_none(),
        "a failing run keeps its counters\n{table}"
    );
    assert!(
        report
            .verdict
            .violations
            .iter()
            .any(|v| v.contains("(Local)") && v.contains("below acknowledged")),
        "{table}"
    );
    assert!(!report.passed(), "{table}");
}

/// A `tally cluster` process this test started: stopped with SIGINT (as
/// Ctrl-C would) by its pid, also when the test fails half-way.
struct Interrupted(Option<std::process::Child>);

impl Interrupted {
    fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.0.take().expect("stopped once");
        // SAFETY: kill(2) on the child this test started and has not reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                return child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Interrupted {
    fn drop(&mut self) {
        if self.0.is_some() {
            self.stop();
        }
    }
}

/// The README's path: `tally cluster --secure` in one process, `tally
/// chaos --attach` in another, driving it through the control endpoint.
/// HAProxy's checks pass over TLS with authentication, clients without
/// credentials (or without TLS) are refused, the attached run (carrying
/// the cluster's CA and the `app` user's credentials) injects every node
/// fault and passes, and the cluster then stops cleanly on SIGINT.
#[test]
fn chaos_attaches_to_a_running_secured_tally_cluster() {
    let _one = ONE_AT_A_TIME.lock();
    let dir = tempfile::tempdir().unwrap();
    let exe = env!("CARGO_BIN_EXE_tally");
    // One run of free ports for everything, so no two roles collide:
    // control, load balancer HTTP and RESP, then three nodes' HTTP and RESP.
    // `tally cluster` numbers its nodes' ports from a base; the run lies
    // below the ephemeral range, where a chaos run's TIME-WAIT entries
    // cannot block the bind.
    let base = tally_lab::ports::free_loopback_port_run(9).unwrap_or_else(|e| panic!("{e}"));
    let control: SocketAddr = ([127, 0, 0, 1], base).into();
    let mut cluster = Command::new(exe)
        .arg("cluster")
        .arg("--dir")
        .arg(dir.path().join("cluster"))
        .args(["--http-addr", &format!("127.0.0.1:{}", base + 1)])
        .args(["--resp-addr", &format!("127.0.0.1:{}", base + 2)])
        .args(["--node-http-port", &(base + 3).to_string()])
        .args(["--node-resp-port", &(base + 6).to_string()])
        .args(["--control-addr", &control.to_string()])
        .arg("--secure")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Up once it prints its last line.
    let stdout = cluster.stdout.take().unwrap();
    let mut cluster = Interrupted(Some(cluster));
    let banner = tally_lab::testing::process::cluster_banner(stdout, Duration::from_secs(60))
        .expect("tally cluster did not come up");
    assert!(
        banner.iter().any(|l| l.contains(&control.to_string())),
        "{banner:?}"
    );

    // The token is the launcher's owner's alone, and so are the secrets.
    let token_file = dir.path().join("cluster/control-token");
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let secrets = dir.path().join("cluster/secrets");
    let mode_of = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode_of(&secrets), 0o700);
    for secret in ["users", "node.key", "haproxy.pem"] {
        assert_eq!(mode_of(&secrets.join(secret)), 0o600, "{secret}");
    }
    assert_eq!(
        mode_of(&dir.path().join("cluster/haproxy.cfg")),
        0o600,
        "the HAProxy configuration holds the check's secret"
    );
    check_secured_front(dir.path(), base + 1, base + 2);

    let report_path = dir.path().join("report.json");
    let out = Command::new(exe)
        .arg("chaos")
        .args(["--attach", &control.to_string()])
        .arg("--control-token-file")
        .arg(&token_file)
        .args(["--duration", "20s", "--clients", "6"])
        .args(["--seed", &seed().to_string()])
        .arg("--dir")
        .arg(dir.path().join("chaos"))
        .arg("--report-json")
        .arg(&report_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&out.stderr));

    let status = cluster.stop();

    assert!(out.status.success(), "chaos failed:\n{stdout}");
    assert!(
        stdout.contains("the store fault is not injected"),
        "{stdout}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    for kind in ["Kill9", "Restart", "Pause", "Wipe"] {
        assert!(
            report["faults"][kind].as_u64().unwrap_or(0) > 0,
            "{kind} never ran: {stdout}"
        );
    }
    assert_eq!(report["verdict"]["lost"], 0);
    assert_eq!(report["verdict"]["counted_twice"], 0);
    assert!(status.success(), "tally cluster exited with {status}");
}

/// Through the secured cluster's load balancer: TLS with the cluster's CA
/// and a user's credentials gets in; no credentials, or no TLS, does not;
/// and HAProxy's authenticated checks over TLS keep every node in
/// rotation.
fn check_secured_front(dir: &std::path::Path, lb_http: u16, lb_resp: u16) {
    let secrets = dir.join("cluster/secrets");
    let ca = secrets.join("ca.crt").display().to_string();
    let secret = tally_lab::wire::access::secret_of(&secrets.join("users"), "app").unwrap();
    let run = |program: &str, args: &[&str]| {
        let out = Command::new(program).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
            + String::from_utf8_lossy(&out.stderr).trim()
    };
    let port = lb_resp.to_string();
    let cli = ["--tls", "--cacert", &ca, "-p", &port];
    let mut with_user = cli.to_vec();
    with_user.extend([
        "--user",
        "app",
        "--pass",
        &secret,
        "--no-auth-warning",
        "PING",
    ]);
    assert_eq!(run("redis-cli", &with_user), "PONG");
    let mut anonymous = cli.to_vec();
    anonymous.push("PING");
    assert!(run("redis-cli", &anonymous).contains("NOAUTH"));
    let url = format!("https://127.0.0.1:{lb_http}/v1/cluster");
    let bearer = format!("Authorization: Bearer app:{secret}");
    let status = |extra: &[&str], url: &str| {
        let mut args = vec![
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
        ];
        args.extend_from_slice(extra);
        args.push(url);
        run("curl", &args)
    };
    assert_eq!(status(&["--cacert", &ca, "-H", &bearer], &url), "200");
    assert_eq!(status(&["--cacert", &ca], &url), "401");
    // Plaintext HTTP to the TLS frontend gets no answer from a node.
    assert_ne!(
        status(&[], &format!("http://127.0.0.1:{lb_http}/readyz")),
        "200"
    );
    // Several check intervals: a check that could not authenticate, or
    // could not verify a node's certificate, would have marked it down.
    std::thread::sleep(Duration::from_millis(1500));
    let log = std::fs::read_to_string(dir.join("cluster/haproxy.log")).unwrap();
    assert!(!log.contains("is DOWN"), "{log}");
}

/// Attaching to an address where no cluster listens fails at once and
/// says where it looked.
#[test]
fn chaos_attach_without_a_cluster_is_a_clear_error() {
    let addr = format!(
        "127.0.0.1:{}",
        tally_lab::ports::free_loopback_port().unwrap()
    );
    let dir = tempfile::tempdir().unwrap();
    // Without a token file: said so, naming where tally cluster writes it.
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["chaos", "--attach", &addr, "--duration", "1s"])
        .arg("--control-token-file")
        .arg(dir.path().join("nowhere"))
        .arg("--dir")
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("reading the control token") && stderr.contains("DIR/control-token"),
        "{stderr}"
    );
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "0123").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["chaos", "--attach", &addr, "--duration", "1s"])
        .arg("--control-token-file")
        .arg(&token_file)
        .arg("--dir")
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("control endpoint {addr}")),
        "{stderr}"
    );
}

/// A run clears a directory only if an earlier run made it: a mistyped
/// `--dir` loses nothing.
#[test]
fn a_run_clears_only_its_own_directory() {
    let dir = tempfile::tempdir().unwrap();
    let precious = dir.path().join("precious.txt");
    std::fs::write(&precious, "keep me").unwrap();
    let err = chaos::prepare_run_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("not made by tally chaos"), "{err}");
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me");

    let run = dir.path().join("run");
    chaos::prepare_run_dir(&run).unwrap();
    std::fs::create_dir_all(run.join("node1/journal")).unwrap();
    std::fs::write(run.join("store.db"), "old").unwrap();
    chaos::prepare_run_dir(&run).unwrap();
    let left: Vec<_> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, vec![".tally-chaos".to_string()]);
}

/// Processes whose command line mentions `dir`.
fn processes_using(dir: &std::path::Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            e.file_name().to_str()?.parse::<u32>().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(&needle).then_some(cmdline)
        })
        .collect()
}

/// Ctrl-C ends the load early: the run still checks what happened, stops
/// every process it started (nodes, HAProxy, its PostgreSQL server), and
/// fails, since an interrupted run proves too little.
#[test]
fn interrupted_run_checks_stops_everything_and_fails() {
    let _one = ONE_AT_A_TIME.lock();
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let mut chaos = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["chaos", "--duration", "60s", "--store", "private-postgres"])
        .arg("--dir")
        .arg(&run_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = chaos.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Interrupted once the first fault has run, under load.
    let mut output = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("no fault line within a minute");
        let fault = line.contains("acknowledged so far");
        output.push(line);
        if fault {
            break;
        }
    }
    assert!(
        !processes_using(&run_dir).is_empty(),
        "the run's processes name its directory"
    );
    // SAFETY: kill(2) on the child this test started and has not reaped.
    unsafe { libc::kill(chaos.id() as libc::pid_t, libc::SIGINT) };
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = chaos.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = chaos.kill();
            panic!("the interrupted run did not end within 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    output.extend(rx.try_iter());
    let text = output.join("\n");
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(text.contains("interrupted at"), "{text}");
    assert!(text.contains("increments lost               0"), "{text}");
    let left = processes_using(&run_dir);
    assert!(left.is_empty(), "still running: {left:?}");
}

/// A run that could inject no fault at all is refused before it starts
/// anything, rather than pass having proved nothing.
#[test]
fn a_run_without_any_possible_fault_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["chaos", "--faults", "store", "--duration", "5s"])
        .arg("--dir")
        .arg(&run_dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no fault to inject"), "{stderr}");
    assert!(!run_dir.exists(), "nothing is started or created");
}
