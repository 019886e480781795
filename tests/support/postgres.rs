//! A private PostgreSQL server for tests: its own data directory in a
//! temporary directory, its own loopback port, stopped by process id.
//!
//! The server binaries (`initdb`, `postgres`) are looked up in `PATH`, then
//! in `/usr/lib/postgresql/*/bin` (newest version first). If they are
//! missing the test fails, saying which package to install: a store test
//! that silently skips proves nothing.
//!
//! PostgreSQL refuses to run as root. When the tests run as root (as in
//! CI), `initdb` and `postgres` run as the unprivileged `nobody` user (or a
//! `tally-test` system user, created once, where there is no `nobody`),
//! through `setpriv` (or `runuser`), in a temporary directory under `/tmp`
//! that is owned by that user and readable by all.
//!
//! [`shared`] gives one server per test binary, stopped at process exit;
//! each test takes a database of its own on it ([`PgServer::create_database`]).
//! A test that stops the server ([`PgServer::stop`], [`PgServer::start`])
//! starts a server of its own with [`PgServer::new`].
#![allow(dead_code)]

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How long the server may take to accept connections after it starts.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a fast shutdown (SIGINT) may take before the server is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Fresh ports tried when another process took the one picked.
const PORT_ATTEMPTS_MAX: u32 = 5;
/// The server's superuser; authentication is `trust` on loopback.
pub const SUPERUSER: &str = "tally";
/// Connections the server accepts: tests open several stores at once.
const CONNECTIONS_MAX: u32 = 300;
/// Unprivileged users tried, in order, when running as root.
const UNPRIVILEGED_USERS: [&str; 2] = ["nobody", "tally-test"];

const MISSING_BINARIES: &str = "PostgreSQL server binaries (initdb, postgres) were not found in \
     PATH or /usr/lib/postgresql/*/bin: install the `postgresql` Debian package \
     (apt-get install postgresql), or run scripts/test.sh, which installs it";

/// A running (or stopped) private PostgreSQL server.
pub struct PgServer {
    bin_dir: PathBuf,
    /// Runs a command as the unprivileged user when we are root.
    run_as: Option<RunAs>,
    port: u16,
    /// Whether `pg_stat_statements` is loaded (its library was found).
    pub stat_statements: bool,
    state: Mutex<State>,
}

struct State {
    child: Option<Child>,
    /// Holds the data directory, the socket and the log; removed on drop.
    dir: Option<tempfile::TempDir>,
}

#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

static SHARED: OnceLock<PgServer> = OnceLock::new();
static DATABASES: AtomicU64 = AtomicU64::new(0);

/// The test binary's server, started on first use and stopped when the
/// process exits.
pub fn shared() -> &'static PgServer {
    SHARED.get_or_init(|| {
        let server = PgServer::new();
        extern "C" fn stop_shared() {
            if let Some(server) = SHARED.get() {
                server.shut_down();
            }
        }
        // Statics are never dropped: an exit hook stops the server instead.
        // SAFETY: registers a plain function with no preconditions.
        unsafe { libc::atexit(stop_shared) };
        server
    })
}

impl PgServer {
    /// Creates a cluster in a new temporary directory and starts it.
    /// Panics (failing the test) with the reason if it cannot.
    pub fn new() -> PgServer {
        let bin_dir = find_bin_dir().unwrap_or_else(|e| panic!("{e}"));
        let run_as = if unsafe { libc::geteuid() } == 0 {
            Some(unprivileged_user())
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("tally-pg-")
            .tempdir_in("/tmp")
            .expect("creating a temporary directory under /tmp");
        // The server's user must reach and own its directory.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod of the server directory");
        if let Some(u) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(u.uid), Some(u.gid))
                .expect("chown of the server directory to the unprivileged user");
        }
        let stat_statements = bin_dir
            .parent()
            .is_some_and(|p| p.join("lib/pg_stat_statements.so").is_file());
        let mut server = PgServer {
            bin_dir,
            run_as,
            port: 0,
            stat_statements,
            state: Mutex::new(State {
                child: None,
                dir: Some(dir),
            }),
        };
        server.initdb();
        let mut last_error = String::new();
        for _ in 0..PORT_ATTEMPTS_MAX {
            server.port = free_port();
            match server.spawn_and_wait() {
                Ok(()) => return server,
                // Most likely another process took the port: try another.
                Err(e) => last_error = e,
            }
        }
        panic!("the private PostgreSQL server did not start: {last_error}");
    }

    fn dir(&self) -> PathBuf {
        self.state
            .lock()
            .dir
            .as_ref()
            .expect("server directory")
            .path()
            .to_path_buf()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir().join("postgres.log")
    }

    /// A command that runs `program` from the server's binaries, as the
    /// unprivileged user if we are root.
    fn command(&self, program: &str) -> Command {
        let path = self.bin_dir.join(program);
        let mut cmd = match self.run_as {
            None => Command::new(path),
            Some(u) => {
                if let Some(setpriv) = find_in_path("setpriv") {
                    let mut c = Command::new(setpriv);
                    c.arg(format!("--reuid={}", u.uid))
                        .arg(format!("--regid={}", u.gid))
                        .arg("--clear-groups")
                        .arg("--")
                        .arg(path);
                    c
                } else {
                    let name = user_name(u.uid);
                    let mut c = Command::new("runuser");
                    c.args(["-u", &name, "--"]).arg(path);
                    c
                }
            }
        };
        // Never inherit a cwd the unprivileged user cannot read.
        cmd.current_dir(self.dir());
        cmd
    }

    fn initdb(&self) {
        let out = self
            .command("initdb")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-A", "trust", "-U", SUPERUSER, "--no-sync"])
            .args(["--locale=C", "--encoding=UTF8"])
            .stdin(Stdio::null())
            .output()
            .expect("running initdb");
        assert!(
            out.status.success(),
            "initdb failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts `postgres` on the data directory and port, and waits until it
    /// accepts connections.
    fn spawn_and_wait(&self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("opening the server log");
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir())
            .args(["-c", "listen_addresses=127.0.0.1"])
            // Test data need not survive a power cut.
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off"])
            .arg("-c")
            .arg(format!("max_connections={CONNECTIONS_MAX}"));
        if self.stat_statements {
            cmd.args(["-c", "shared_preload_libraries=pg_stat_statements"]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log handle")))
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| format!("starting postgres: {e}"))?;
        self.state.lock().child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let exited = {
                let mut state = self.state.lock();
                let status = state
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                if status.is_some() {
                    state.child = None;
                }
                status
            };
            if let Some(status) = exited {
                return Err(format!(
                    "postgres exited ({status}) on port {}; its log:\n{}",
                    self.port,
                    self.log_since(log_start)
                ));
            }
            if self.connect("postgres").is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!(
                    "postgres did not accept connections within {READY_TIMEOUT:?}; its log:\n{}",
                    self.log_since(log_start)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_since(&self, start: u64) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(self.log_path()) {
            let _ = f.seek(SeekFrom::Start(start));
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection as the superuser to `database`.
    pub fn connect(&self, database: &str) -> Result<::postgres::Client, ::postgres::Error> {
        ::postgres::Client::connect(
            &format!(
                "host=127.0.0.1 port={} user={SUPERUSER} dbname={database} connect_timeout=2",
                self.port
            ),
            ::postgres::NoTls,
        )
    }

    /// The store URL of `database`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates an empty database of its own for one test; returns its name.
    pub fn create_database(&self) -> String {
        let name = format!(
            "t_{}_{}",
            std::process::id(),
            DATABASES.fetch_add(1, Ordering::Relaxed)
        );
        let mut client = self
            .connect("postgres")
            .unwrap_or_else(|e| panic!("connecting to the private server: {e}"));
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("creating database {name}: {e:?}"));
        name
    }

    /// Stops the server (fast shutdown; killed if it takes longer than
    /// [`STOP_TIMEOUT`]) and keeps its data directory and port for
    /// [`PgServer::start`].
    pub fn stop(&self) {
        let Some(mut child) = self.state.lock().child.take() else {
            return;
        };
        let pid = child.id() as libc::pid_t;
        // SIGINT asks for a fast shutdown: sessions are ended, then the
        // server writes a checkpoint and exits.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts the server again after [`PgServer::stop`], on the same data
    /// directory and port.
    pub fn start(&self) {
        if self.state.lock().child.is_some() {
            return;
        }
        if let Err(e) = self.spawn_and_wait() {
            panic!("restarting the private PostgreSQL server: {e}");
        }
    }

    /// Stops the server for good and removes its directory.
    fn shut_down(&self) {
        self.stop();
        let dir = self.state.lock().dir.take();
        drop(dir);
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.shut_down();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("finding a free loopback port")
        .port()
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// The directory holding both `initdb` and `postgres`.
fn find_bin_dir() -> Result<PathBuf, String> {
    let has_both = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(initdb) = find_in_path("initdb") {
        // PATH often holds symlinks (e.g. /usr/local/bin/initdb); the real
        // directory also holds `postgres` and leads to the libraries.
        let real = std::fs::canonicalize(&initdb).unwrap_or(initdb);
        if let Some(dir) = real.parent()
            && has_both(dir)
        {
            return Ok(dir.to_path_buf());
        }
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version: Vec<u32> = name
                .split('.')
                .map(|p| p.parse().ok())
                .collect::<Option<_>>()?;
            let bin = e.path().join("bin");
            has_both(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| MISSING_BINARIES.to_string())
}

fn lookup_user(name: &str) -> Option<RunAs> {
    let c = CString::new(name).ok()?;
    // SAFETY: getpwnam returns null or a pointer to a static record, read
    // at once; only called under the OnceLock in `unprivileged_user`.
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if pw.is_null() {
        return None;
    }
    let pw = unsafe { &*pw };
    Some(RunAs {
        uid: pw.pw_uid,
        gid: pw.pw_gid,
    })
}

fn user_name(uid: u32) -> String {
    UNPRIVILEGED_USERS
        .iter()
        .find(|n| lookup_user(n).is_some_and(|u| u.uid == uid))
        .map_or_else(|| uid.to_string(), |n| n.to_string())
}

/// The user to run the server as when we are root: `nobody`, else a
/// dedicated system user, created on first need.
fn unprivileged_user() -> RunAs {
    static USER: OnceLock<RunAs> = OnceLock::new();
    *USER.get_or_init(|| {
        if let Some(u) = UNPRIVILEGED_USERS.iter().find_map(|n| lookup_user(n)) {
            return u;
        }
        let name = UNPRIVILEGED_USERS[1];
        // Another test binary may create it at the same moment: its
        // "already exists" failure is fine, the lookup below decides.
        let _ = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ])
            .status();
        lookup_user(name).unwrap_or_else(|| {
            panic!(
                "tests run as root, and PostgreSQL refuses to run as root, but there is no \
                 `nobody` user and `useradd --system {name}` failed"
            )
        })
    })
}
