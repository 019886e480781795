//! The local-cluster launcher behind `tally cluster`: N node processes on
//! one store, HAProxy in front of them, and a supervisor that restarts a
//! node that dies.
//!
//! It owns the child processes it starts, each held by a [`ChildGuard`],
//! and signals them only by their pids; it never looks for processes by
//! name. It must never restart a node whose data directory a caller is
//! about to wipe before the wipe is done: every change to a node's process
//! happens under that node's lock, and the supervisor only takes locks it
//! can get without waiting.
//!
//! The library is what a fault tool drives (`kill9`, `pause`,
//! `kill9_and_wipe`, ...); the binary's `tally cluster` only prints the
//! endpoints and waits for a signal.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::ports::free_loopback_ports;
use crate::process::{ChildGuard, READY_TIMEOUT, ReadyWatch};
use crate::wire::http;

/// How often the supervisor polls each node with `try_wait`.
pub const SUPERVISE_INTERVAL: Duration = Duration::from_millis(100);
/// First delay before restarting a node that died.
pub const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The back-off doubles up to this.
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A node that stayed up this long starts again from the smallest back-off.
pub const RESTART_BACKOFF_RESET: Duration = Duration::from_secs(10);
/// How long a stopped process gets between SIGTERM and SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `start` waits for HAProxy to listen.
pub const HAPROXY_LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one probe of HAProxy's frontends may take while `start` waits.
const LB_PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Pause between two polls of any wait.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// HAProxy health-check interval per server. With `fall 2` a dead or
/// paused node leaves rotation within about 2 × (interval + check timeout).
pub const HAPROXY_CHECK_INTERVAL_MS: u64 = 200;
/// HAProxy's stats socket, in the cluster's directory.
pub const HAPROXY_STATS_SOCKET: &str = "haproxy.sock";
/// How long one HAProxy health check may take before it counts as failed.
pub const HAPROXY_CHECK_TIMEOUT_MS: u64 = 200;

/// What can go wrong while starting or driving a local cluster.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LauncherError {
    #[error(
        "HAProxy is not installed: on Debian/Ubuntu run `apt-get install haproxy` (or pass --no-haproxy)"
    )]
    HaproxyMissing,
    /// A file, directory or process could not be created; `what` names it.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A node or HAProxy did not become ready in time, or has no process;
    /// the message names its log.
    #[error("{0}")]
    NotReady(String),
    /// The index is not below the number of nodes.
    #[error("no node {0} in this cluster")]
    NoSuchNode(usize),
    /// The configuration cannot describe a cluster.
    #[error("{0}")]
    Invalid(String),
}

type Result<T> = std::result::Result<T, LauncherError>;

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LauncherError {
    let what = what.into();
    move |source| LauncherError::Io { what, source }
}

/// How to start a local cluster. `Default` is what `tally cluster` runs.
#[derive(Debug, Clone)]
pub struct LocalClusterConfig {
    /// How many nodes (node1..nodeN).
    pub nodes: usize,
    /// Holds every node's data directory, the SQLite store, the HAProxy
    /// configuration and the logs.
    pub base_dir: PathBuf,
    /// Store URL; `None` means `sqlite://<base_dir>/store.db`.
    pub store: Option<String>,
    /// The `tally` binary to run; `None` means the current executable.
    pub exe: Option<PathBuf>,
    /// RESP port of node1; node i gets base + i - 1.
    pub resp_port_base: u16,
    /// HTTP port of node1; node i gets base + i - 1.
    pub http_port_base: u16,
    /// Exact (RESP, HTTP) ports per node, overriding the bases (tests use
    /// free ports). Its length must equal `nodes` when not empty.
    pub node_ports: Vec<(u16, u16)>,
    /// Load balancer's HTTP frontend.
    pub lb_http: SocketAddr,
    /// Load balancer's RESP frontend.
    pub lb_resp: SocketAddr,
    /// Start HAProxy (it must be installed).
    pub haproxy: bool,
    /// Extra flags for every `tally serve`.
    pub node_args: Vec<String>,
    /// Secured: nodes serve TLS ports only, with users; HAProxy terminates
    /// HTTPS and re-encrypts to the nodes, passes RESP over TLS through,
    /// and checks the nodes over TLS with an authenticated RESP check. The
    /// CA, certificates and users are in `base_dir/secrets`
    /// ([`crate::secrets`]).
    pub secure: bool,
    /// Nodes and HAProxy get SIGTERM when the launcher dies, even by
    /// `kill -9` ([`crate::process::exit_with_parent`]). Only for a launcher
    /// whose methods are called from long-lived threads (`tally cluster`,
    /// `tally chaos`): a child started from a thread that ends is stopped
    /// with it.
    pub exit_with_launcher: bool,
}

impl Default for LocalClusterConfig {
    fn default() -> Self {
        LocalClusterConfig {
            nodes: 3,
            base_dir: PathBuf::from("tally-cluster"),
            store: None,
            exe: None,
            resp_port_base: 7381,
            http_port_base: 7071,
            node_ports: Vec::new(),
            lb_http: ([127, 0, 0, 1], 7070).into(),
            lb_resp: ([127, 0, 0, 1], 7379).into(),
            haproxy: true,
            node_args: Vec::new(),
            secure: false,
            exit_with_launcher: false,
        }
    }
}

impl LocalClusterConfig {
    /// What fault tests run: `nodes` nodes and HAProxy on free loopback
    /// ports, SQLite in `base_dir`, and the test timings
    /// ([`crate::testing::FAST`]), short enough that the cluster settles
    /// within a second of the load stopping.
    pub fn for_fault_tests(nodes: usize, base_dir: &Path) -> std::io::Result<LocalClusterConfig> {
        let ports = free_loopback_ports(2 * nodes + 2)?;
        Ok(LocalClusterConfig {
            nodes,
            base_dir: base_dir.to_path_buf(),
            node_ports: (0..nodes)
                .map(|i| (ports[2 * i], ports[2 * i + 1]))
                .collect(),
            lb_http: ([127, 0, 0, 1], ports[2 * nodes]).into(),
            lb_resp: ([127, 0, 0, 1], ports[2 * nodes + 1]).into(),
            haproxy: true,
            node_args: crate::testing::FAST.serve_flags(),
            ..Default::default()
        })
    }
}

/// What a caller can do to one node of a running cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// [`LocalCluster::kill9`]
    Kill9,
    /// [`LocalCluster::restart`]
    Restart,
    /// [`LocalCluster::pause`]
    Pause,
    /// [`LocalCluster::resume`]
    Resume,
    /// [`LocalCluster::kill9_and_wipe`]
    Wipe,
}

impl Action {
    pub const ALL: [Action; 5] = [
        Action::Kill9,
        Action::Restart,
        Action::Pause,
        Action::Resume,
        Action::Wipe,
    ];

    /// The name used on the control endpoint (`POST /v1/nodes/node2/kill9`).
    pub fn name(self) -> &'static str {
        match self {
            Action::Kill9 => "kill9",
            Action::Restart => "restart",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Wipe => "wipe",
        }
    }

    pub fn from_name(name: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.name() == name)
    }
}

/// One node as seen from outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub node_id: String,
    pub resp: SocketAddr,
    pub http: SocketAddr,
    pub data_dir: PathBuf,
    /// The running process, if any (none while it waits to be restarted).
    pub pid: Option<u32>,
}

/// A node's process and restart bookkeeping; guarded by the slot's lock.
#[derive(Debug)]
struct Process {
    child: Option<ChildGuard>,
    /// The current process's stdout, read for its ready line. Taken away
    /// when the process is killed: it is not ready until its successor
    /// says so.
    ready: Option<ReadyWatch>,
    started_at: Instant,
    /// When the supervisor may start the node again, once it has exited.
    restart_at: Option<Instant>,
    backoff: Duration,
    restarts: u64,
}

#[derive(Debug)]
struct Slot {
    info: NodeInfo,
    process: Mutex<Process>,
}

#[derive(Debug)]
struct Shared {
    slots: Vec<Slot>,
    exe: PathBuf,
    store: String,
    node_args: Vec<String>,
    base_dir: PathBuf,
    /// Set for a secured cluster.
    secrets: Option<crate::secrets::Secrets>,
    exit_with_launcher: bool,
    stop: AtomicBool,
}

/// A running local cluster. Dropping it stops every process it started.
#[derive(Debug)]
pub struct LocalCluster {
    shared: Arc<Shared>,
    supervisor: Option<JoinHandle<()>>,
    haproxy: Option<ChildGuard>,
    haproxy_config: Option<PathBuf>,
    lb_http: SocketAddr,
    lb_resp: SocketAddr,
    /// How the launcher's own probes reach the load balancer.
    probe: crate::wire::access::Access,
    /// Holds `DIR/`[`LOCK_FILE`] locked while the cluster runs.
    _lock: File,
    stopped: bool,
}

/// The file a running launcher holds locked in its directory, with its
/// pid inside: a second launcher on the same directory names that pid.
pub const LOCK_FILE: &str = "launcher.pid";

/// Locks `dir/`[`LOCK_FILE`] for this process (released when the file is
/// closed, so also when the process dies), or says which process holds it.
fn lock_dir(dir: &Path) -> Result<File> {
    use std::io::{Read as _, Seek as _, Write as _};
    use std::os::fd::AsRawFd as _;
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err(format!("opening {}", path.display())))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        return Err(LauncherError::Invalid(format!(
            "{} is in use by another tally cluster (pid {}); stop it first or choose another --dir",
            dir.display(),
            holder.trim()
        )));
    }
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .map_err(io_err(format!("writing {}", path.display())))?;
    Ok(file)
}

impl Shared {
    /// Starts node `i`'s process; the caller holds its lock.
    fn spawn(&self, i: usize, process: &mut Process) -> Result<()> {
        let slot = &self.slots[i];
        let info = &slot.info;
        fs::create_dir_all(&info.data_dir)
            .map_err(io_err(format!("creating {}", info.data_dir.display())))?;
        let log_path = self.base_dir.join(format!("{}.log", info.node_id));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err(format!("opening {}", log_path.display())))?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("serve")
            .arg("--node-id")
            .arg(&info.node_id)
            .arg("--data-dir")
            .arg(&info.data_dir)
            .arg("--store")
            .arg(&self.store);
        match &self.secrets {
            None => {
                cmd.arg("--resp-addr")
                    .arg(info.resp.to_string())
                    .arg("--http-addr")
                    .arg(info.http.to_string());
            }
            Some(s) => {
                cmd.args(["--resp-addr", "off", "--http-addr", "off"])
                    .arg("--resp-tls-addr")
                    .arg(info.resp.to_string())
                    .arg("--https-addr")
                    .arg(info.http.to_string())
                    .arg("--tls-cert")
                    .arg(s.node_cert())
                    .arg("--tls-key")
                    .arg(s.node_key())
                    .arg("--users-file")
                    .arg(s.users());
            }
        }
        cmd.args(&self.node_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            // A process group of its own: Ctrl-C in the terminal reaches
            // only the launcher, which then stops the nodes in order.
            .process_group(0);
        if self.exit_with_launcher {
            crate::process::exit_with_parent(&mut cmd);
        }
        let mut child = ChildGuard::spawn(&mut cmd, &info.node_id)
            .map_err(io_err(format!("starting {}", self.exe.display())))?;
        // Reads until the process exits: a full pipe would block it.
        let ready = child
            .watch_ready_line()
            .map_err(io_err("starting a stdout reader thread"))?;
        process.child = Some(child);
        process.ready = Some(ready);
        process.started_at = Instant::now();
        process.restart_at = None;
        Ok(())
    }

    /// One pass of the supervisor over every node it can lock at once.
    fn supervise_once(&self) {
        for (i, slot) in self.slots.iter().enumerate() {
            // A caller that holds the lock is changing the process (kill,
            // wipe, restart); look again at the next pass.
            let Some(mut p) = slot.process.try_lock() else {
                continue;
            };
            let now = Instant::now();
            if let Some(child) = p.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                let up = now.duration_since(p.started_at);
                if up >= RESTART_BACKOFF_RESET {
                    p.backoff = RESTART_BACKOFF_MIN;
                }
                tracing::warn!(node = %slot.info.node_id, %status, up_ms = up.as_millis() as u64,
                    backoff_ms = p.backoff.as_millis() as u64, "node exited; restarting after back-off");
                p.child = None;
                p.ready = None;
                p.restart_at = Some(now + p.backoff);
                p.backoff = (p.backoff * 2).min(RESTART_BACKOFF_MAX);
            }
            if p.child.is_none()
                && let Some(at) = p.restart_at
                && now >= at
            {
                match self.spawn(i, &mut p) {
                    Ok(()) => {
                        p.restarts += 1;
                        tracing::info!(node = %slot.info.node_id, restarts = p.restarts, "node restarted");
                    }
                    Err(e) => {
                        tracing::error!(node = %slot.info.node_id, error = %e, "cannot restart node");
                        p.restart_at = Some(now + p.backoff);
                        p.backoff = (p.backoff * 2).min(RESTART_BACKOFF_MAX);
                    }
                }
            }
        }
    }
}

/// How HAProxy reaches the nodes of a secured cluster.
#[derive(Debug, Clone)]
pub struct HaproxyTls {
    /// HAProxy's HTTPS certificate and key (one PEM file).
    pub frontend_pem: PathBuf,
    /// The CA the nodes' certificates are checked against.
    pub ca: PathBuf,
    /// The user and secret of the RESP health check.
    pub check_user: String,
    pub check_secret: String,
}

/// Writes HAProxy's configuration for `nodes` behind the two frontends;
/// with `tls`, for a secured cluster: HTTPS terminated and re-encrypted,
/// RESP over TLS passed through, every check over TLS and the RESP check
/// authenticated. With `stats_socket`, HAProxy serves its view of the
/// servers there (owner only, read-only level), for `tally status
/// --haproxy-socket`.
pub fn haproxy_config(
    lb_http: SocketAddr,
    lb_resp: SocketAddr,
    nodes: &[NodeInfo],
    tls: Option<&HaproxyTls>,
    stats_socket: Option<&Path>,
) -> String {
    let inter = HAPROXY_CHECK_INTERVAL_MS;
    let check = HAPROXY_CHECK_TIMEOUT_MS;
    let mut s = String::new();
    let bind_tls = tls.map_or(String::new(), |t| {
        format!(" ssl crt {}", t.frontend_pem.display())
    });
    let server_tls = tls.map_or(String::new(), |t| {
        format!(" ssl verify required ca-file {}", t.ca.display())
    });
    let check_tls = tls.map_or(String::new(), |t| {
        format!(" check-ssl verify required ca-file {}", t.ca.display())
    });
    let resp_auth = tls.map_or(String::new(), |t| {
        format!(
            "    tcp-check send AUTH\\ {}\\ {}\\r\\n\n    tcp-check expect string +OK\n",
            t.check_user, t.check_secret
        )
    });
    let stats = stats_socket.map_or(String::new(), |p| {
        format!(
            "    # Its view of every server, for `tally status --haproxy-socket`.\n    \
             stats socket {} mode 600 level user\n",
            p.display()
        )
    });
    let _ = write!(
        s,
        "# Generated by `tally cluster`; rewritten at every start.
global
    maxconn 4096
    # One line per request or session on HAProxy's standard output, which
    # the launcher writes to haproxy.log.
    log stdout format raw local0
{stats}
defaults
    log global
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout check {check}ms
    # A node that fails {inter} ms checks twice leaves rotation; its open
    # sessions are closed so that clients reconnect to a live node.
    default-server inter {inter}ms fall 2 rise 2 on-marked-down shutdown-sessions

frontend tally_http
    mode http
    option httplog
    bind {lb_http}{bind_tls}
    default_backend tally_http_nodes

backend tally_http_nodes
    mode http
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    option redispatch
    retries 2
"
    );
    for n in nodes {
        let _ = writeln!(s, "    server {} {} check{server_tls}", n.node_id, n.http);
    }
    let _ = write!(
        s,
        "
frontend tally_resp
    mode tcp
    option tcplog
    bind {lb_resp}
    default_backend tally_resp_nodes

backend tally_resp_nodes
    mode tcp
    balance roundrobin
    option tcp-check
{resp_auth}    tcp-check send PING\\r\\n
    tcp-check expect string +PONG
"
    );
    for n in nodes {
        let _ = writeln!(s, "    server {} {} check{check_tls}", n.node_id, n.resp);
    }
    s
}

/// Whether `haproxy` can be run.
fn haproxy_installed() -> bool {
    Command::new("haproxy")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

impl LocalCluster {
    /// Starts every node, waits for each ready line, then starts HAProxy.
    pub fn start(config: LocalClusterConfig) -> Result<LocalCluster> {
        if config.nodes == 0 {
            return Err(LauncherError::Invalid(
                "a cluster needs at least one node".into(),
            ));
        }
        if !config.node_ports.is_empty() && config.node_ports.len() != config.nodes {
            return Err(LauncherError::Invalid(format!(
                "{} node ports given for {} nodes",
                config.node_ports.len(),
                config.nodes
            )));
        }
        if config.haproxy && !haproxy_installed() {
            return Err(LauncherError::HaproxyMissing);
        }
        fs::create_dir_all(&config.base_dir)
            .map_err(io_err(format!("creating {}", config.base_dir.display())))?;
        let base_dir = fs::canonicalize(&config.base_dir)
            .map_err(io_err(format!("resolving {}", config.base_dir.display())))?;
        let lock = lock_dir(&base_dir)?;
        let exe = match config.exe {
            Some(e) => e,
            None => std::env::current_exe().map_err(io_err("finding the tally executable"))?,
        };
        let store = config
            .store
            .unwrap_or_else(|| format!("sqlite://{}", base_dir.join("store.db").display()));
        let secrets = if config.secure {
            Some(
                crate::secrets::Secrets::prepare(&base_dir)
                    .map_err(|e| LauncherError::Invalid(format!("making the secrets: {e:#}")))?,
            )
        } else {
            None
        };
        let probe = match &secrets {
            // The launcher's probe needs TLS only: /readyz is open.
            Some(s) => crate::wire::access::Access {
                tls: Some(
                    crate::wire::access::client_config(&s.ca())
                        .map_err(|e| LauncherError::Invalid(format!("{e:#}")))?,
                ),
                credentials: None,
            },
            None => crate::wire::access::Access::open(),
        };
        let mut slots = Vec::with_capacity(config.nodes);
        for i in 0..config.nodes {
            let (resp, http) = match config.node_ports.get(i) {
                Some(&p) => p,
                None => {
                    let k = u16::try_from(i).unwrap_or(u16::MAX);
                    (
                        config.resp_port_base.saturating_add(k),
                        config.http_port_base.saturating_add(k),
                    )
                }
            };
            let node_id = format!("node{}", i + 1);
            slots.push(Slot {
                info: NodeInfo {
                    data_dir: base_dir.join(&node_id),
                    node_id,
                    resp: ([127, 0, 0, 1], resp).into(),
                    http: ([127, 0, 0, 1], http).into(),
                    pid: None,
                },
                process: Mutex::new(Process {
                    child: None,
                    ready: None,
                    started_at: Instant::now(),
                    restart_at: None,
                    backoff: RESTART_BACKOFF_MIN,
                    restarts: 0,
                }),
            });
        }
        let shared = Arc::new(Shared {
            slots,
            exe,
            store,
            node_args: config.node_args,
            base_dir: base_dir.clone(),
            secrets: secrets.clone(),
            exit_with_launcher: config.exit_with_launcher,
            stop: AtomicBool::new(false),
        });
        let mut cluster = LocalCluster {
            shared: shared.clone(),
            supervisor: None,
            haproxy: None,
            haproxy_config: None,
            lb_http: config.lb_http,
            lb_resp: config.lb_resp,
            probe,
            _lock: lock,
            stopped: false,
        };
        // Nodes start one after another: each takes its epoch in the store
        // at start, and SQLite serialises those writes anyway.
        for i in 0..shared.slots.len() {
            {
                let mut p = shared.slots[i].process.lock();
                shared.spawn(i, &mut p)?;
            }
            cluster.wait_ready(i, READY_TIMEOUT)?;
        }
        if config.haproxy {
            let nodes = cluster.nodes();
            let path = base_dir.join("haproxy.cfg");
            let tls = match &secrets {
                Some(s) => Some(HaproxyTls {
                    frontend_pem: s.haproxy_pem(),
                    ca: s.ca(),
                    check_user: "healthcheck".into(),
                    check_secret: s
                        .secret("healthcheck")
                        .map_err(|e| LauncherError::Invalid(format!("{e:#}")))?,
                }),
                None => None,
            };
            // It holds the check's secret when secured: owner only.
            crate::pki::write_file(
                &path,
                haproxy_config(
                    config.lb_http,
                    config.lb_resp,
                    &nodes,
                    tls.as_ref(),
                    Some(&base_dir.join(HAPROXY_STATS_SOCKET)),
                )
                .as_bytes(),
                0o600,
            )
            .map_err(|e| LauncherError::Invalid(format!("{e:#}")))?;
            let log_path = base_dir.join("haproxy.log");
            let log = File::create(&log_path)
                .map_err(io_err(format!("creating {}", log_path.display())))?;
            let log2 = log
                .try_clone()
                .map_err(io_err(format!("opening {}", log_path.display())))?;
            let mut cmd = Command::new("haproxy");
            cmd.arg("-f")
                .arg(&path)
                .arg("-db")
                .stdin(Stdio::null())
                .stdout(Stdio::from(log))
                .stderr(Stdio::from(log2))
                .process_group(0);
            if config.exit_with_launcher {
                crate::process::exit_with_parent(&mut cmd);
            }
            let child =
                ChildGuard::spawn(&mut cmd, "haproxy").map_err(io_err("starting haproxy"))?;
            cluster.haproxy = Some(child);
            cluster.haproxy_config = Some(path);
            cluster.wait_lb(HAPROXY_LISTEN_TIMEOUT, &log_path)?;
        }
        let sup = shared.clone();
        cluster.supervisor = Some(
            std::thread::Builder::new()
                .name("tally-supervisor".into())
                .spawn(move || {
                    while !sup.stop.load(Ordering::SeqCst) {
                        sup.supervise_once();
                        std::thread::sleep(SUPERVISE_INTERVAL);
                    }
                })
                .map_err(io_err("starting the supervisor thread"))?,
        );
        Ok(cluster)
    }

    /// Waits until HAProxy answers `/readyz` through the HTTP frontend and
    /// accepts connections on the RESP frontend.
    fn wait_lb(&mut self, timeout: Duration, log_path: &Path) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(h) = self.haproxy.as_mut()
                && let Ok(Some(status)) = h.try_wait()
            {
                return Err(LauncherError::NotReady(format!(
                    "haproxy exited ({status}); its log:\n{}",
                    fs::read_to_string(log_path).unwrap_or_default()
                )));
            }
            if http::status_with(&self.probe, self.lb_http, "/readyz", LB_PROBE_TIMEOUT)
                == Some(200)
                && TcpStream::connect_timeout(&self.lb_resp, LB_PROBE_TIMEOUT).is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LauncherError::NotReady(format!(
                    "haproxy did not answer on {} within {timeout:?}",
                    self.lb_http
                )));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// The load balancer's HTTP frontend.
    pub fn lb_http(&self) -> SocketAddr {
        self.lb_http
    }

    /// The load balancer's RESP frontend.
    pub fn lb_resp(&self) -> SocketAddr {
        self.lb_resp
    }

    /// The generated HAProxy configuration, when HAProxy runs.
    pub fn haproxy_config_path(&self) -> Option<&Path> {
        self.haproxy_config.as_deref()
    }

    /// HAProxy's stats socket (`tally status --haproxy-socket`), when
    /// HAProxy runs.
    pub fn haproxy_stats_socket(&self) -> Option<PathBuf> {
        self.haproxy_config
            .as_ref()
            .and_then(|c| c.parent())
            .map(|d| d.join(HAPROXY_STATS_SOCKET))
    }

    /// The secrets of a secured cluster.
    pub fn secrets(&self) -> Option<&crate::secrets::Secrets> {
        self.shared.secrets.as_ref()
    }

    /// How a client reaches this cluster as `user`: plaintext without
    /// credentials, or for a secured cluster TLS and the user's secret.
    pub fn access(&self, user: &str) -> anyhow::Result<crate::wire::access::Access> {
        match self.secrets() {
            None => Ok(crate::wire::access::Access::open()),
            Some(s) => s.access(user),
        }
    }

    /// HAProxy's pid, when it runs.
    pub fn haproxy_pid(&self) -> Option<u32> {
        self.haproxy.as_ref().map(ChildGuard::pid)
    }

    /// Every node, with its current pid.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.shared
            .slots
            .iter()
            .map(|s| {
                let mut info = s.info.clone();
                info.pid = s.process.lock().child.as_ref().map(ChildGuard::pid);
                info
            })
            .collect()
    }

    fn slot(&self, i: usize) -> Result<&Slot> {
        self.shared.slots.get(i).ok_or(LauncherError::NoSuchNode(i))
    }

    /// How many times the supervisor has restarted node `i`.
    pub fn restarts(&self, i: usize) -> Result<u64> {
        Ok(self.slot(i)?.process.lock().restarts)
    }

    /// Waits until node `i`'s current process has printed its ready line.
    pub fn wait_ready(&self, i: usize, timeout: Duration) -> Result<()> {
        let slot = self.slot(i)?;
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut p = slot.process.lock();
                if p.child.is_some() && p.ready.as_ref().is_some_and(|r| r.ready().is_some()) {
                    return Ok(());
                }
                // Exited before its ready line: say why, from its log.
                if self.supervisor.is_none()
                    && let Some(c) = p.child.as_mut()
                    && let Ok(Some(status)) = c.try_wait()
                {
                    return Err(LauncherError::NotReady(format!(
                        "{} exited before it was ready ({status}); see {}",
                        slot.info.node_id,
                        self.shared
                            .base_dir
                            .join(format!("{}.log", slot.info.node_id))
                            .display()
                    )));
                }
            }
            if Instant::now() >= deadline {
                return Err(LauncherError::NotReady(format!(
                    "{} was not ready within {timeout:?}",
                    slot.info.node_id
                )));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Sends `sig` to node `i`'s process; returns its pid.
    fn signal_node(&self, i: usize, sig: libc::c_int) -> Result<u32> {
        let slot = self.slot(i)?;
        let mut guard = slot.process.lock();
        let p = &mut *guard;
        let child = p.child.as_mut().ok_or_else(|| {
            LauncherError::NotReady(format!("node {} has no running process", i + 1))
        })?;
        if sig == libc::SIGKILL {
            // Not ready until the restarted process says so.
            p.ready = None;
        }
        child
            .signal(sig)
            .map_err(io_err(format!("signalling {}", slot.info.node_id)))?;
        Ok(child.pid())
    }

    /// `kill -9` node `i`; the supervisor restarts it. Returns the old pid.
    pub fn kill9(&self, i: usize) -> Result<u32> {
        self.signal_node(i, libc::SIGKILL)
    }

    /// Stops node `i` gracefully (SIGTERM, up to [`STOP_TIMEOUT`], then
    /// SIGKILL) and returns once it has exited; the supervisor starts it
    /// again at its next poll.
    pub fn restart(&self, i: usize) -> Result<()> {
        let slot = self.slot(i)?;
        let mut p = slot.process.lock();
        p.ready = None;
        if let Some(mut child) = p.child.take() {
            let _ = child.signal(libc::SIGTERM);
            // A paused node handles SIGTERM only once it runs again.
            let _ = child.signal(libc::SIGCONT);
            let _ = child.wait_or_kill(STOP_TIMEOUT);
        }
        p.restart_at = Some(Instant::now());
        p.backoff = RESTART_BACKOFF_MIN;
        Ok(())
    }

    /// SIGSTOP node `i`: it stops answering without closing anything.
    pub fn pause(&self, i: usize) -> Result<u32> {
        self.signal_node(i, libc::SIGSTOP)
    }

    /// SIGCONT node `i`.
    pub fn resume(&self, i: usize) -> Result<u32> {
        self.signal_node(i, libc::SIGCONT)
    }

    /// `kill -9` node `i` and delete its data directory (a lost disk)
    /// before the supervisor starts it again: the node's lock is held from
    /// the kill until the wipe is done.
    pub fn kill9_and_wipe(&self, i: usize) -> Result<()> {
        let slot = self.slot(i)?;
        let mut p = slot.process.lock();
        p.ready = None;
        if let Some(mut child) = p.child.take() {
            let _ = child.kill();
        }
        match fs::remove_dir_all(&slot.info.data_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(io_err(format!("wiping {}", slot.info.data_dir.display()))(
                    e,
                ));
            }
        }
        p.restart_at = Some(Instant::now() + p.backoff);
        p.backoff = (p.backoff * 2).min(RESTART_BACKOFF_MAX);
        Ok(())
    }

    /// Carries out `action` on node `i` (what the control endpoint and the
    /// fault test call). `Pause` returns at once; `Resume` undoes it.
    pub fn act(&self, i: usize, action: Action) -> Result<()> {
        match action {
            Action::Kill9 => self.kill9(i).map(drop),
            Action::Restart => self.restart(i),
            Action::Pause => self.pause(i).map(drop),
            Action::Resume => self.resume(i).map(drop),
            Action::Wipe => self.kill9_and_wipe(i),
        }
    }

    /// Stops supervision, then SIGTERMs every node and HAProxy by pid,
    /// waits up to [`STOP_TIMEOUT`] for each, and SIGKILLs what remains.
    pub fn shutdown(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.supervisor.take() {
            let _ = h.join();
        }
        // HAProxy first, so that no client is sent to a stopping node.
        if let Some(mut h) = self.haproxy.take() {
            let _ = h.stop(libc::SIGTERM, STOP_TIMEOUT);
        }
        let mut children: Vec<ChildGuard> = self
            .shared
            .slots
            .iter()
            .filter_map(|s| s.process.lock().child.take())
            .collect();
        // Every node is told first and then waited for, so that they stop
        // side by side rather than one after another.
        for c in &mut children {
            let _ = c.signal(libc::SIGTERM);
            // A paused node handles SIGTERM only once it runs again.
            let _ = c.signal(libc::SIGCONT);
        }
        for c in &mut children {
            let _ = c.wait_or_kill(STOP_TIMEOUT);
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}
