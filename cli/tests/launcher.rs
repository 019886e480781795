//! The local-cluster launcher with the real HAProxy in front of three real
//! nodes on one SQLite store: traffic through the load balancer, the
//! supervisor restoring killed and wiped nodes, HAProxy taking a paused node
//! out of rotation, a shutdown that leaves nothing running, and the control
//! endpoint through which another process acts on the nodes.
//!
//! HAProxy must be installed (`scripts/test.sh` installs it): these tests
//! fail without it rather than skip.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tally_lab::launcher::{LocalCluster, LocalClusterConfig};

/// How many nodes each test cluster runs.
const NODES: usize = 3;
/// How long a restarted node may take to be ready again.
const RESTART_TIMEOUT: Duration = Duration::from_secs(20);
/// How long every node may take to agree on a total.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one request through the load balancer may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// HAProxy's window to take a paused node out of (or put it back into)
/// rotation: 2 checks of 200 ms plus their 200 ms timeouts, with margin.
const ROTATION_WINDOW: Duration = Duration::from_millis(1200);
/// Pause between two polls of a wait.
const POLL: Duration = Duration::from_millis(50);

/// The clusters run one at a time: on two cores, timing-sensitive checks
/// (rotation within a second) must not compete with another cluster.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn start_cluster(dir: &std::path::Path) -> LocalCluster {
    let config = LocalClusterConfig {
        exe: Some(env!("CARGO_BIN_EXE_tally").into()),
        ..LocalClusterConfig::for_fault_tests(NODES, dir).unwrap()
    };
    LocalCluster::start(config).expect("starting the local cluster (is haproxy installed?)")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A client that opens a new connection for every request, so that
/// HAProxy balances each one.
fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .unwrap()
}

async fn http_incr(
    c: &reqwest::Client,
    addr: SocketAddr,
    name: &str,
    by: i64,
    durability: &str,
) -> Result<(), String> {
    let r = c
        .post(format!("http://{addr}/v1/counters/{name}/increment"))
        .json(&serde_json::json!({"by": by, "durability": durability}))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status().is_success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            r.status(),
            r.text().await.unwrap_or_default()
        ))
    }
}

/// One `INCR` on a new connection through `addr`.
async fn resp_incr(addr: SocketAddr, name: &str) -> Result<i64, String> {
    let work = async {
        let client = redis::Client::open(format!("redis://{addr}/")).map_err(|e| e.to_string())?;
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())?;
        redis::cmd("INCR")
            .arg(name)
            .query_async::<i64>(&mut conn)
            .await
            .map_err(|e| e.to_string())
    };
    tokio::time::timeout(REQUEST_TIMEOUT, work)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// Counter `name` as node at `addr` reports it: (global value, this
/// node's own shard).
async fn read_on(
    c: &reqwest::Client,
    addr: SocketAddr,
    name: &str,
    node_id: &str,
) -> Option<(i64, i64)> {
    let r = c
        .get(format!("http://{addr}/v1/counters/{name}"))
        .send()
        .await
        .ok()?;
    let v: serde_json::Value = r.json().await.ok()?;
    let total = v["value"].as_i64()?;
    let shard = v["nodes"][node_id].as_i64().unwrap_or(0);
    Some((total, shard))
}

/// Waits until every node reports `expected` for `name`.
async fn settle(c: &reqwest::Client, cluster: &LocalCluster, name: &str, expected: i64) {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let mut seen = Vec::new();
        for n in cluster.nodes() {
            seen.push(read_on(c, n.http, name, &n.node_id).await.map(|v| v.0));
        }
        if seen.iter().all(|v| *v == Some(expected)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "nodes report {seen:?} for {name}, expected {expected} on each"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until the supervisor has restarted node `i` and it is ready.
fn wait_restarted(cluster: &LocalCluster, i: usize, restarts_before: u64) {
    let deadline = Instant::now() + RESTART_TIMEOUT;
    while cluster.restarts(i).unwrap() <= restarts_before {
        assert!(Instant::now() < deadline, "node {i} was not restarted");
        std::thread::sleep(POLL);
    }
    cluster.wait_ready(i, RESTART_TIMEOUT).unwrap();
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the pid exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

// Proves: increments through HAProxy over RESP and HTTP are counted, and a
// node killed with SIGKILL is restarted by the supervisor (new pid, count
// up) and restores its shard: every node then reports the exact total.
#[test]
fn killed_node_is_restarted_and_loses_nothing() {
    let _one = ONE_AT_A_TIME.lock();
    let dir = tempfile::tempdir().unwrap();
    let cluster = start_cluster(dir.path());
    let rt = runtime();
    let c = http_client();
    let (lb_http, lb_resp) = (cluster.lb_http(), cluster.lb_resp());
    rt.block_on(async {
        for _ in 0..20 {
            resp_incr(lb_resp, "hits").await.unwrap();
            http_incr(&c, lb_http, "hits", 2, "local").await.unwrap();
        }
        // Through the load balancer the global value comes back.
        let (total, _) = read_on(&c, lb_http, "hits", "").await.unwrap();
        assert!(total <= 60);
        settle(&c, &cluster, "hits", 60).await;
    });
    // HAProxy logs each request and session to haproxy.log.
    let log = std::fs::read_to_string(dir.path().join("haproxy.log")).unwrap_or_default();
    assert!(
        log.contains("tally_http") && log.contains("/v1/counters/hits/increment"),
        "haproxy.log: {log}"
    );
    assert!(log.contains("tally_resp"), "haproxy.log: {log}");
    let victim = 1;
    let node = cluster.nodes()[victim].clone();
    let shard_before = rt
        .block_on(read_on(&c, node.http, "hits", &node.node_id))
        .unwrap()
        .1;
    assert!(shard_before > 0, "round robin reached {}", node.node_id);
    let old_pid = cluster.kill9(victim).unwrap();
    wait_restarted(&cluster, victim, 0);
    assert_eq!(cluster.restarts(victim).unwrap(), 1);
    let new_pid = cluster.nodes()[victim].pid.unwrap();
    assert_ne!(new_pid, old_pid);
    assert!(!alive(old_pid));
    rt.block_on(async {
        settle(&c, &cluster, "hits", 60).await;
        let shard_after = read_on(&c, node.http, "hits", &node.node_id)
            .await
            .unwrap()
            .1;
        assert_eq!(shard_after, shard_before);
    });
}

// Proves: a graceful restart (SIGTERM) is followed by the supervisor's
// start of a new process that keeps every increment acknowledged before.
#[test]
fn gracefully_restarted_node_loses_nothing() {
    let _one = ONE_AT_A_TIME.lock();
    let dir = tempfile::tempdir().unwrap();
    let cluster = start_cluster(dir.path());
    let rt = runtime();
    let c = http_client();
    let lb_resp = cluster.lb_resp();
    rt.block_on(async {
        for _ in 0..15 {
            resp_incr(lb_resp, "restarted").await.unwrap();
        }
    });
    let victim = 0;
    let old_pid = cluster.nodes()[victim].pid.unwrap();
    cluster.restart(victim).unwrap();
    assert!(!alive(old_pid));
    wait_restarted(&cluster, victim, 0);
    assert_ne!(cluster.nodes()[victim].pid.unwrap(), old_pid);
    rt.block_on(settle(&c, &cluster, "restarted", 15));
}

// Proves: a paused (SIGSTOPped) node leaves HAProxy's rotation within about
// a second, so every request through the load balancer succeeds, and it
// rejoins the rotation once resumed.
#[test]
fn paused_node_leaves_rotation_and_rejoins() {
    let _one = ONE_AT_A_TIME.lock();
    let dir = tempfile::tempdir().unwrap();
    let cluster = start_cluster(dir.path());
    let rt = runtime();
    let c = http_client();
    let (lb_http, lb_resp) = (cluster.lb_http(), cluster.lb_resp());
    let victim = 2;
    let node = cluster.nodes()[victim].clone();
    cluster.pause(victim).unwrap();
    std::thread::sleep(ROTATION_WINDOW);
    // `tally status` shows HAProxy's view: the paused node is down in
    // both backends, the others up.
    let lb_view = |cluster: &LocalCluster| -> Vec<(String, String, String)> {
        let socket = cluster.haproxy_stats_socket().expect("HAProxy runs");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["status", "--json", "--url"])
            .arg(format!("http://{}", cluster.lb_http()))
            .arg("--haproxy-socket")
            .arg(&socket)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        v["load_balancer"]
            .as_array()
            .unwrap_or_else(|| panic!("no load balancer view: {v}"))
            .iter()
            .map(|s| {
                let f = |k: &str| s[k].as_str().unwrap().to_string();
                (f("backend"), f("server"), f("status"))
            })
            .collect()
    };
    let view = lb_view(&cluster);
    assert_eq!(view.len(), 2 * NODES, "{view:?}");
    for (backend, server, status) in &view {
        let down = *server == node.node_id;
        assert_eq!(
            status.starts_with("DOWN"),
            down,
            "{backend} {server} {status}: {view:?}"
        );
    }
    rt.block_on(async {
        for k in 0..12 {
            http_incr(&c, lb_http, "paused", 1, "local")
                .await
                .unwrap_or_else(|e| panic!("HTTP request {k} with a node paused: {e}"));
            resp_incr(lb_resp, "paused")
                .await
                .unwrap_or_else(|e| panic!("RESP request {k} with a node paused: {e}"));
        }
    });
    cluster.resume(victim).unwrap();
    std::thread::sleep(ROTATION_WINDOW);
    rt.block_on(async {
        let shard_before = read_on(&c, node.http, "paused", &node.node_id)
            .await
            .map_or(0, |v| v.1);
        for _ in 0..12 {
            http_incr(&c, lb_http, "paused", 1, "local").await.unwrap();
        }
        let shard_after = read_on(&c, node.http, "paused", &node.node_id)
            .await
            .unwrap()
            .1;
        assert!(
            shard_after > shard_before,
            "{} took no request after resuming",
            node.node_id
        );
        settle(&c, &cluster, "paused", 36).await;
    });
    let view = lb_view(&cluster);
    assert!(view.iter().all(|(_, _, s)| s == "UP"), "{view:?}");
    assert_eq!(cluster.restarts(victim).unwrap(), 0);
}

// Proves: with `replicated` increments acknowledged, a node whose data
// directory is deleted while it is down restores every one of them from
// the store when the supervisor restarts it.
#[test]
fn wiped_node_restores_replicated_increments() {
    let _one = ONE_AT_A_TIME.lock();
    let dir = tempfile::tempdir().unwrap();
    let cluster = start_cluster(dir.path());
    let rt = runtime();
    let c = http_client();
    let lb_http = cluster.lb_http();
    rt.block_on(async {
        for _ in 0..30 {
            http_incr(&c, lb_http, "billing", 3, "replicated")
                .await
                .unwrap();
        }
    });
    let victim = 0;
    let node = cluster.nodes()[victim].clone();
    let shard_before = rt
        .block_on(read_on(&c, node.http, "billing", &node.node_id))
        .unwrap()
        .1;
    assert!(shard_before > 0);
    cluster.kill9_and_wipe(victim).unwrap();
    wait_restarted(&cluster, victim, 0);
    rt.block_on(async {
        let (total, shard) = read_on(&c, node.http, "billing", &node.node_id)
            .await
            .unwrap();
        assert_eq!(shard, shard_before, "the wiped node's own shard");
        assert!(total <= 90);
        settle(&c, &cluster, "billing", 90).await;
    });
}

// Proves: shutdown stops every node and HAProxy, each by its pid, and
// leaves none of them running.
#[test]
fn shutdown_leaves_no_child_running() {
    let _one = ONE_AT_A_TIME.lock();
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = start_cluster(dir.path());
    let mut pids: Vec<u32> = cluster.nodes().iter().filter_map(|n| n.pid).collect();
    assert_eq!(pids.len(), NODES);
    pids.push(cluster.haproxy_pid().unwrap());
    // A paused node too must be stopped.
    cluster.pause(0).unwrap();
    assert!(pids.iter().all(|&p| alive(p)));
    cluster.shutdown();
    for p in pids {
        assert!(!alive(p), "pid {p} still runs after shutdown");
    }
}

// Proves: the generated HAProxy configuration is accepted by HAProxy's own
// checker and carries the health checks the rotation depends on.
#[test]
fn generated_haproxy_config_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<tally_lab::launcher::NodeInfo> = (1..=3u16)
        .map(|i| tally_lab::launcher::NodeInfo {
            node_id: format!("node{i}"),
            resp: ([127, 0, 0, 1], 7380 + i).into(),
            http: ([127, 0, 0, 1], 7070 + i).into(),
            data_dir: dir.path().join(format!("node{i}")),
            pid: None,
        })
        .collect();
    let cfg = tally_lab::launcher::haproxy_config(
        ([127, 0, 0, 1], 7070).into(),
        ([127, 0, 0, 1], 7379).into(),
        &nodes,
        None,
        Some(&dir.path().join("haproxy.sock")),
    );
    for needle in [
        "option httpchk GET /readyz",
        "http-check expect status 200",
        "option tcp-check",
        "tcp-check send PING\\r\\n",
        "tcp-check expect string +PONG",
        "inter 200ms fall 2 rise 2",
        "timeout check",
        "option redispatch",
        "server node3 127.0.0.1:7383 check",
        "server node3 127.0.0.1:7073 check",
    ] {
        assert!(cfg.contains(needle), "missing `{needle}` in:\n{cfg}");
    }
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, &cfg).unwrap();
    tally_lab::testing::assert_haproxy_accepts(&path);
}

// Proves: without HAProxy on the PATH, `tally cluster` starts nothing and
// tells the user how to install it.
#[test]
fn missing_haproxy_is_reported_plainly() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("cluster")
        .arg("--dir")
        .arg(dir.path())
        .env("PATH", dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("HAProxy is not installed: on Debian/Ubuntu run `apt-get install haproxy`"),
        "stderr: {stderr}"
    );
    assert!(!dir.path().join("node1").exists(), "a node was started");
}

/// The control endpoint acts on the launcher's own nodes by name, only for
/// a request with its token, answers every mistake with a JSON error, and
/// binds only loopback addresses.
#[test]
fn control_endpoint_acts_on_nodes_and_refuses_mistakes() {
    use tally_lab::control::{ControlError, ControlServer, RemoteCluster};
    use tally_lab::launcher::Action;

    let _one = ONE_AT_A_TIME.lock();
    let dir = tempfile::tempdir().unwrap();
    let cluster = start_cluster(dir.path());
    let token = tally_lab::control::new_token().unwrap();
    assert_eq!(token.len(), 32);
    assert_ne!(token, tally_lab::control::new_token().unwrap());
    assert!(ControlServer::bind(([0, 0, 0, 0], 0).into(), token.clone()).is_err());
    let server = ControlServer::bind(([127, 0, 0, 1], 0).into(), token.clone()).unwrap();
    let addr = server.local_addr().unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| server.serve(&cluster, &stop));
        // Without the token, or with another one: 401, nothing done.
        for other in [String::new(), tally_lab::control::new_token().unwrap()] {
            match RemoteCluster::connect(addr, other) {
                Err(ControlError::Refused { status: 401, .. }) => {}
                other => panic!("a wrong token gave {other:?}"),
            }
        }
        let remote = RemoteCluster::connect(addr, token.clone()).unwrap();
        let view = remote.view().clone();
        assert_eq!(view.lb_http, Some(cluster.lb_http()));
        assert_eq!(view.lb_resp, Some(cluster.lb_resp()));
        let nodes = cluster.nodes();
        assert_eq!(view.nodes.len(), NODES);
        for (v, n) in view.nodes.iter().zip(&nodes) {
            assert_eq!(
                (&v.node_id, v.http, v.resp, v.pid),
                (&n.node_id, n.http, n.resp, n.pid)
            );
        }

        // kill9 through the endpoint: a new process, restarted and ready.
        let old_pid = nodes[1].pid.unwrap();
        remote.act(1, Action::Kill9).unwrap();
        remote.wait_ready(1, RESTART_TIMEOUT).unwrap();
        let new_pid = cluster.nodes()[1].pid.unwrap();
        assert_ne!(new_pid, old_pid);
        assert_eq!(cluster.restarts(1).unwrap(), 1);
        let view = RemoteCluster::connect(addr, token.clone()).unwrap();
        assert_eq!(view.view().nodes[1].restarts, 1);

        assert!(matches!(
            remote.act(NODES, Action::Kill9),
            Err(ControlError::NoSuchNode(_))
        ));
        for (method, path, status) in [
            ("POST", "/v1/nodes/node9/kill9", 404),
            ("POST", "/v1/nodes/node1/explode", 400),
            ("POST", "/v1/nodes/node1/wait-ready?timeout_ms=soon", 400),
            ("GET", "/v1/nowhere", 404),
        ] {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            use std::io::{Read, Write};
            write!(
                s,
                "{method} {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\r\n"
            )
            .unwrap();
            let mut answer = String::new();
            s.read_to_string(&mut answer).unwrap();
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status} ")),
                "{method} {path}: {answer}"
            );
            assert!(answer.contains("{\"error\":"), "{answer}");
        }
        // An oversized request head is refused, and the endpoint serves on.
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        use std::io::{Read, Write};
        // Just over the limit, all of it read by the endpoint (a close with
        // unread bytes would reset the connection before the answer).
        let _ = write!(s, "GET /{} HTTP/1.1\r\n", "x".repeat(8500));
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
        assert!(RemoteCluster::connect(addr, token.clone()).is_ok());
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    });
}

/// `tally cluster` killed with SIGKILL (no chance to stop anything) takes
/// its nodes and HAProxy with it; while it runs, a second launcher on the
/// same directory is refused and names the first one's pid.
#[test]
fn nothing_outlives_a_killed_launcher_and_a_second_one_names_the_first() {
    use std::process::{Command, Stdio};
    let _one = ONE_AT_A_TIME.lock();
    let dir = tempfile::tempdir().unwrap();
    let exe = env!("CARGO_BIN_EXE_tally");
    let base = tally_lab::ports::free_loopback_port_run(9).unwrap_or_else(|e| panic!("{e}"));
    let args = |control: Option<u16>| {
        let mut args = vec![
            "cluster".to_string(),
            "--dir".into(),
            dir.path().join("c").display().to_string(),
            "--http-addr".into(),
            format!("127.0.0.1:{}", base + 1),
            "--resp-addr".into(),
            format!("127.0.0.1:{}", base + 2),
            "--node-http-port".into(),
            (base + 3).to_string(),
            "--node-resp-port".into(),
            (base + 6).to_string(),
        ];
        match control {
            Some(port) => args.extend(["--control-addr".into(), format!("127.0.0.1:{port}")]),
            None => args.push("--no-control".into()),
        }
        args
    };
    let mut launcher = tally_lab::process::ChildGuard::spawn(
        Command::new(exe)
            .args(args(Some(base)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
        "tally cluster",
    )
    .unwrap();
    let stdout = launcher.take_stdout().unwrap();
    let banner = tally_lab::testing::process::cluster_banner(stdout, Duration::from_secs(60))
        .expect("tally cluster did not come up");
    // Every child's pid, from the banner: HAProxy's, then each node's.
    let pids: Vec<u32> = banner
        .iter()
        .filter_map(|l| {
            let rest = l
                .trim()
                .strip_prefix("pid ")
                .or_else(|| l.split("  pid ").nth(1))?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect();
    assert_eq!(pids.len(), NODES + 1, "{banner:?}");
    assert!(pids.iter().all(|p| alive(*p)));

    // A second launcher on the same directory.
    let out = Command::new(exe)
        .args(args(None))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "in use by another tally cluster (pid {})",
            launcher.pid()
        )),
        "{stderr}"
    );
    assert!(
        pids.iter().all(|p| alive(*p)),
        "the refused launcher touched the first's processes"
    );

    launcher.kill().unwrap();
    // A process that exited but is not reaped yet (its new parent may be
    // slow to) is a zombie: it runs nothing.
    let running = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let state = stat
                    .rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .next()?
                    .to_string();
                Some(state != "Z" && state != "X")
            })
            .unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while pids.iter().any(|p| running(*p)) {
        assert!(
            Instant::now() < deadline,
            "still running after the launcher died: {:?}",
            pids.iter().filter(|p| running(**p)).collect::<Vec<_>>()
        );
        std::thread::sleep(POLL);
    }
}
