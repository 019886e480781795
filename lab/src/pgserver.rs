//! A private PostgreSQL server: its own cluster in a directory of its own,
//! its own loopback port, started and stopped by this process.
//!
//! The store tests, the benchmark and `tally chaos` each need a PostgreSQL
//! server that nobody else uses and that they may stop and start at will
//! (a store outage is one of the faults they inject). [`PgServer`] runs
//! `initdb` into a directory, starts `postgres` on a free `127.0.0.1` port
//! and waits until it accepts connections; [`PgServer::stop`] and
//! [`PgServer::start`] take it down and bring it back on the same data and
//! port; dropping it shuts it down.
//!
//! The binaries (`initdb`, `postgres`, and tools such as `pgbench` through
//! [`PgServer::program`]) are looked up in `PATH`, then in
//! `/usr/lib/postgresql/*/bin` (newest version first). If they are missing
//! the error names the Debian package to install.
//!
//! **Root.** PostgreSQL refuses to run as root. When this process runs as
//! root (as in CI containers), `initdb` and `postgres` run as the
//! unprivileged `nobody` user (or a `tally-postgres` system user, created
//! once, where there is no `nobody`) through `setpriv`, which execs the
//! server, so the child we hold is the postmaster itself. Where there is
//! no `setpriv`, the child drops to that user by itself between fork and
//! exec (supplementary groups cleared, then gid and uid set), to the same
//! effect. (Not `runuser`: it stays the server's parent and ignores
//! SIGINT, so a fast shutdown never reaches the server, and a SIGKILL of
//! `runuser` leaves the server running.)
//!
//! The server's directory is then owned by that user, mode 0755, and every
//! directory above it must be searchable by other users (`o+x`): `/tmp`
//! is, a directory made by [`tempfile`] (mode 0700) is not.
//! [`PgOptions::reachable_from`] names the caller's own directories that
//! may be opened up for it; any other that is closed is an error
//! ([`PgError::Unreachable`]).
//!
//! **Signals.** The postmaster is held by a [`ChildGuard`]: it is only ever
//! signalled by the process id of the child this process started and has
//! not yet reaped, so the signal can never reach another process; nothing
//! is looked up or signalled by name. It runs in a process group of its
//! own, so a Ctrl-C in the terminal does not reach it; only the signal of
//! its owner does. A stop is a fast shutdown (SIGINT: sessions are ended, a
//! checkpoint is written, the server exits), and SIGKILL after
//! [`STOP_TIMEOUT`].
//!
//! **Durability.** [`PgOptions::durable`] chooses between PostgreSQL's own
//! defaults (`fsync`, `synchronous_commit` and `full_page_writes` on: a
//! commit costs what it costs in production, for the benchmark) and all
//! three off (test data need not survive a power cut; tests run faster).
//! [`PgServer::settings`] reads the settings back from the server.
//!
//! The server listens on TCP only: it has no Unix-domain socket, whose path
//! (limited to 107 bytes) a deep directory could exceed. Authentication is
//! `trust` for [`SUPERUSER`] on loopback.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::process::{ChildGuard, RunError, run_with_timeout, tail_lines};

/// How long the server may take to accept connections after it starts
/// (crash recovery after a killed server happens before that).
pub const POSTGRES_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a fast shutdown (SIGINT) may take before the server is killed.
/// A durable server writes a checkpoint of its dirty buffers first.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `initdb` may take.
pub const INITDB_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `postgres --version` may take.
pub const VERSION_TIMEOUT: Duration = Duration::from_secs(10);
/// Fresh ports tried when another process took the one picked.
pub const PORT_ATTEMPTS_MAX: u32 = 5;
/// Connections the server accepts unless the options say otherwise:
/// PostgreSQL's own default.
pub const CONNECTIONS_MAX_DEFAULT: u32 = 100;
/// How long one connection attempt may take, in seconds (libpq's
/// `connect_timeout`).
pub const CONNECT_TIMEOUT_SECS: u32 = 5;
/// The server's superuser; authentication is `trust` on loopback.
pub const SUPERUSER: &str = "tally";
/// Longest a standby may take to become a primary once promoted.
const PROMOTE_TIMEOUT: Duration = Duration::from_secs(60);

/// Unprivileged users tried, in order, when running as root; the last one
/// is created (as a system user) if none exists.
const UNPRIVILEGED_USERS: [&str; 2] = ["nobody", "tally-postgres"];
/// Where a server without a directory of the caller's gets a temporary
/// one. Not `$TMPDIR`, which may be private to the current user.
const TEMP_PARENT: &str = "/tmp";
/// Prefix of those temporary directories.
const TEMP_PREFIX: &str = "tally-pg-";
/// How often the start loop tries to connect.
const READY_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Lines of the server's log quoted in an error.
const LOG_TAIL_LINES: usize = 20;
/// Buffer for one `getpwnam_r` record; far more than a passwd line needs.
const PASSWD_BUFFER_BYTES: usize = 16 * 1024;
/// Settings read back from the server by [`PgServer::settings`].
const REPORTED_SETTINGS: [&str; 5] = [
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_sync_method",
    "shared_buffers",
];

/// What can go wrong while creating, starting, stopping or using a private
/// PostgreSQL server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    /// `initdb` or `postgres` is not installed.
    #[error(
        "PostgreSQL server binaries (initdb, postgres) were not found in PATH or \
         /usr/lib/postgresql/*/bin: install the `postgresql` Debian package \
         (apt-get install postgresql)"
    )]
    BinariesMissing,
    /// Running as root, no unprivileged user exists and none could be made.
    #[error(
        "running as root, and PostgreSQL refuses to run as root, but there is no \
         `nobody` user and `useradd --system {0}` failed"
    )]
    NoUnprivilegedUser(String),
    /// Running as root, the server's user cannot pass through a directory
    /// above the server's directory, and it is not the caller's to open.
    #[error(
        "PostgreSQL runs as the unprivileged user {user}, who cannot pass through {} \
         (mode {mode:o}); give the server a directory other users can reach",
        .path.display()
    )]
    Unreachable {
        user: String,
        path: PathBuf,
        mode: u32,
    },
    /// A file, directory or process could not be created; `what` names it.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// `initdb` or `postgres --version` failed; `output` is what it printed.
    #[error("{program} failed ({status}): {output}")]
    ProgramFailed {
        program: &'static str,
        status: ExitStatus,
        output: String,
    },
    /// `initdb` or `postgres --version` ran too long and was killed.
    #[error("{program} did not finish within {timeout:?} and was killed")]
    ProgramTimeout {
        program: &'static str,
        timeout: Duration,
    },
    /// The server exited or did not accept connections in time; the
    /// message quotes the end of its log.
    #[error("the private PostgreSQL server did not start: {0}")]
    NotStarted(String),
    /// The server did not finish its fast shutdown within [`STOP_TIMEOUT`]
    /// and was killed. It is down; [`PgServer::start`] recovers it.
    #[error("postgres did not exit within {0:?} of its fast-shutdown signal and was killed")]
    StopTimeout(Duration),
    /// The server exited with a failure status (at a stop, or earlier by
    /// itself). It is down.
    #[error("postgres exited with {0}")]
    Exited(ExitStatus),
    /// A connection or statement failed; `what` names it.
    #[error("{what}: {source}")]
    Sql {
        what: String,
        #[source]
        source: postgres::Error,
    },
    /// [`PgServer::shut_down`] was called: the directory is gone.
    #[error("the private PostgreSQL server was shut down for good")]
    ShutDown,
}

type Result<T> = std::result::Result<T, PgError>;

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PgError {
    let what = what.into();
    move |source| PgError::Io { what, source }
}

/// How to create a private server. `Default` is PostgreSQL's own
/// durability settings in a temporary directory.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// `true`: PostgreSQL's defaults (`fsync`, `synchronous_commit`,
    /// `full_page_writes` on). `false`: all three off, for tests.
    pub durable: bool,
    /// The server's `max_connections`.
    pub connections_max: u32,
    /// Load `pg_stat_statements` if its library is installed next to the
    /// server binaries ([`PgServer::stat_statements`] says whether it was).
    /// The extension still has to be created in a database to be read.
    pub preload_stat_statements: bool,
    /// The server's directory (data directory, log). `None`: a new
    /// temporary directory under `/tmp`, removed when the server is
    /// dropped. `Some`: created if missing, with its parents; it must not
    /// hold a cluster yet, and it is kept when the server is dropped. When
    /// running as root it is handed to the unprivileged user (mode 0755),
    /// and every directory above it must be searchable by other users, or
    /// lie within [`PgOptions::reachable_from`].
    pub dir: Option<PathBuf>,
    /// When running as root: a directory of the caller's own above
    /// [`PgOptions::dir`]. Directories from it down to `dir`'s parent that
    /// other users cannot pass through are given `o+x`; directories above
    /// it are never changed.
    pub reachable_from: Option<PathBuf>,
    /// Commits wait until a standby has the commit's WAL
    /// (`synchronous_standby_names = '*'`, given on the command line so
    /// that a standby cloned from this server does not inherit it).
    pub synchronous_standby: bool,
    /// `Some(port)`: instead of a new cluster, a streaming standby of the
    /// private server on that loopback port, cloned with `pg_basebackup`.
    pub standby_of: Option<u16>,
    /// `Some`: the server offers TLS (`ssl = on`) with this certificate
    /// and key; plaintext connections are still accepted.
    pub tls: Option<crate::pki::Issued>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            durable: true,
            connections_max: CONNECTIONS_MAX_DEFAULT,
            preload_stat_statements: false,
            dir: None,
            reachable_from: None,
            synchronous_standby: false,
            standby_of: None,
            tls: None,
        }
    }
}

/// A running (or stopped) private PostgreSQL server. Its methods take
/// `&self`, so one server can be shared between threads (one thread stops
/// and starts it while others use it).
pub struct PgServer {
    bin_dir: PathBuf,
    /// Runs the binaries as an unprivileged user when we are root.
    run_as: Option<RunAs>,
    /// Absolute; holds `data/` and `postgres.log`.
    dir: PathBuf,
    port: u16,
    durable: bool,
    connections_max: u32,
    stat_statements: bool,
    synchronous_standby: bool,
    /// The server offers TLS with `server.crt` and `server.key` in `dir`.
    tls: bool,
    version: String,
    state: Mutex<State>,
}

struct State {
    /// The postmaster, while it runs.
    child: Option<ChildGuard>,
    /// The temporary directory, when the server made its own; removing
    /// it is the last step of a shutdown.
    temp: Option<tempfile::TempDir>,
    shut_down: bool,
}

/// The user the binaries run as when we are root, and how we become it.
#[derive(Debug, Clone)]
struct RunAs {
    name: String,
    uid: u32,
    gid: u32,
    via: UserSwitch,
}

#[derive(Debug, Clone)]
enum UserSwitch {
    /// `setpriv --reuid --regid --clear-groups -- program`: execs it.
    Setpriv(PathBuf),
    /// The child itself clears its groups and sets its gid and uid before
    /// it execs the program ([`std::os::unix::process::CommandExt::uid`]).
    InChild,
}

/// Numbers the databases [`PgServer::create_database`] makes.
static DATABASES: AtomicU64 = AtomicU64::new(0);

impl PgServer {
    /// Creates a cluster as `options` say and starts it on a free loopback
    /// port (another is tried, up to [`PORT_ATTEMPTS_MAX`] in all, if the
    /// server cannot start on the one picked).
    pub fn new(options: PgOptions) -> Result<PgServer> {
        let bin_dir = find_bin_dir()?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let run_as = if unsafe { libc::geteuid() } == 0 {
            Some(unprivileged_user()?)
        } else {
            None
        };
        let (dir, temp) = match &options.dir {
            None => {
                let temp = tempfile::Builder::new()
                    .prefix(TEMP_PREFIX)
                    .tempdir_in(TEMP_PARENT)
                    .map_err(io_err(format!(
                        "creating a temporary directory under {TEMP_PARENT}"
                    )))?;
                (temp.path().to_path_buf(), Some(temp))
            }
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(io_err(format!("creating {}", dir.display())))?;
                let dir = std::fs::canonicalize(dir)
                    .map_err(io_err(format!("resolving {}", dir.display())))?;
                (dir, None)
            }
        };
        if let Some(u) = &run_as {
            let reachable_from = match &options.reachable_from {
                Some(r) => Some(
                    std::fs::canonicalize(r)
                        .map_err(io_err(format!("resolving {}", r.display())))?,
                ),
                None => None,
            };
            let_user_reach(&dir, reachable_from.as_deref(), u)?;
            std::os::unix::fs::chown(&dir, Some(u.uid), Some(u.gid)).map_err(io_err(format!(
                "handing {} to the unprivileged user {}",
                dir.display(),
                u.name
            )))?;
        }
        // The server's user must reach and own its directory.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .map_err(io_err(format!("chmod 0755 {}", dir.display())))?;
        let stat_statements = options.preload_stat_statements
            && bin_dir
                .parent()
                .is_some_and(|p| p.join("lib/pg_stat_statements.so").is_file());
        let mut server = PgServer {
            bin_dir,
            run_as,
            dir,
            port: 0,
            durable: options.durable,
            connections_max: options.connections_max,
            stat_statements,
            synchronous_standby: options.synchronous_standby,
            tls: options.tls.is_some(),
            version: String::new(),
            state: Mutex::new(State {
                child: None,
                temp,
                shut_down: false,
            }),
        };
        server.version = server.read_version()?;
        match options.standby_of {
            Some(primary_port) => server.clone_from(primary_port)?,
            None => server.initdb()?,
        }
        if let Some(issued) = &options.tls {
            server.install_tls(issued)?;
        }
        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS_MAX {
            server.port = crate::ports::free_loopback_port()
                .map_err(io_err("finding a free loopback port"))?;
            match server.spawn_and_wait() {
                Ok(()) => return Ok(server),
                // Most likely another process took the port: try another.
                Err(e @ PgError::NotStarted(_)) => last_error = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| PgError::NotStarted("no port was tried".into())))
    }

    /// The loopback port, the same for the server's whole life.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's directory (its `data/` directory and `postgres.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The server's log, appended to at every start.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// The server's `--version` line, e.g. `postgres (PostgreSQL) 15.18`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// A program from the server's binaries, e.g. `pgbench`. It may not be
    /// installed; running it tells.
    pub fn program(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// Whether `pg_stat_statements` is loaded (asked for, and installed).
    pub fn stat_statements(&self) -> bool {
        self.stat_statements
    }

    /// The store URL of `database`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }

    /// A connection as the superuser to `database`.
    pub fn connect(&self, database: &str) -> Result<postgres::Client> {
        postgres::Client::connect(
            &format!(
                "host=127.0.0.1 port={} user={SUPERUSER} dbname={database} \
                 connect_timeout={CONNECT_TIMEOUT_SECS}",
                self.port
            ),
            postgres::NoTls,
        )
        .map_err(|source| PgError::Sql {
            what: format!(
                "connecting to the private PostgreSQL server on port {}, database {database}",
                self.port
            ),
            source,
        })
    }

    /// Creates an empty database with a name of its own (unique in this
    /// process) and returns the name.
    pub fn create_database(&self) -> Result<String> {
        let name = format!(
            "t_{}_{}",
            std::process::id(),
            DATABASES.fetch_add(1, Ordering::Relaxed)
        );
        self.create_named_database(&name)?;
        Ok(name)
    }

    /// Creates an empty database named `name` (taken literally: it is
    /// quoted as an identifier).
    pub fn create_named_database(&self, name: &str) -> Result<()> {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        self.connect("postgres")?
            .batch_execute(&format!("CREATE DATABASE {quoted}"))
            .map_err(|source| PgError::Sql {
                what: format!("creating database {name}"),
                source,
            })
    }

    /// The settings that decide what a commit costs, as `name=value`
    /// pairs joined by commas, read from the server itself.
    pub fn settings(&self) -> Result<String> {
        let mut client = self.connect("postgres")?;
        let mut out = Vec::new();
        for name in REPORTED_SETTINGS {
            let row = client
                .query_one(&format!("SHOW {name}"), &[])
                .map_err(|source| PgError::Sql {
                    what: format!("SHOW {name}"),
                    source,
                })?;
            let value: String = row.get(0);
            out.push(format!("{name}={value}"));
        }
        Ok(out.join(", "))
    }

    /// Stops the server: fast shutdown, SIGKILL if it takes longer than
    /// [`STOP_TIMEOUT`] (that is [`PgError::StopTimeout`]). Its data
    /// directory and port are kept for [`PgServer::start`]. A stopped
    /// server is `Ok`. Whatever the result, the server is down after it.
    pub fn stop(&self) -> Result<()> {
        let child = self.state.lock().child.take();
        match child {
            Some(child) => stop_child(child),
            None => Ok(()),
        }
    }

    /// Starts the server again after [`PgServer::stop`], on the same data
    /// directory and port, and waits until it accepts connections. A
    /// running server is `Ok`.
    pub fn start(&self) -> Result<()> {
        {
            let mut state = self.state.lock();
            if state.shut_down {
                return Err(PgError::ShutDown);
            }
            if let Some(child) = state.child.as_mut() {
                match child.try_wait() {
                    Ok(None) => return Ok(()),
                    // It exited by itself: start it again below.
                    _ => state.child = None,
                }
            }
        }
        self.spawn_and_wait()
    }

    /// Stops the server for good and, if it made its directory, removes
    /// it. Dropping the server does this; this is for a server that is
    /// never dropped (a `static`). Later starts fail.
    pub fn shut_down(&self) -> Result<()> {
        let stopped = self.stop();
        let temp = {
            let mut state = self.state.lock();
            state.shut_down = true;
            state.temp.take()
        };
        if let Some(temp) = temp {
            let path = temp.path().to_path_buf();
            temp.close()
                .map_err(io_err(format!("removing {}", path.display())))?;
        }
        stopped
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// A command that runs `program` from the server's binaries, as the
    /// unprivileged user if we are root, in the server's directory (never
    /// a working directory that user cannot read).
    fn command(&self, program: &str) -> Command {
        let path = self.bin_dir.join(program);
        let mut cmd = match &self.run_as {
            None => Command::new(path),
            Some(u) => match &u.via {
                UserSwitch::Setpriv(setpriv) => {
                    let mut c = Command::new(setpriv);
                    c.arg(format!("--reuid={}", u.uid))
                        .arg(format!("--regid={}", u.gid))
                        .arg("--clear-groups")
                        .arg("--")
                        .arg(path);
                    c
                }
                UserSwitch::InChild => {
                    let mut c = Command::new(path);
                    // With a uid set and no groups given, the standard
                    // library also clears the supplementary groups.
                    c.uid(u.uid).gid(u.gid);
                    c
                }
            },
        };
        cmd.current_dir(&self.dir).stdin(Stdio::null());
        cmd
    }

    /// The first line of `postgres --version`.
    fn read_version(&self) -> Result<String> {
        let mut cmd = self.command("postgres");
        cmd.arg("--version");
        let out = run_bounded(&mut cmd, "postgres --version", VERSION_TIMEOUT)?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text.lines().next().unwrap_or_default().trim().to_string())
    }

    /// Writes the server's certificate and key where `postgres` reads
    /// them: owned by the server's user, the key readable by it only (the
    /// server refuses a key others can read).
    fn install_tls(&self, issued: &crate::pki::Issued) -> Result<()> {
        let files = issued
            .write(&self.dir, "server")
            .map_err(|e| PgError::NotStarted(format!("writing the TLS files: {e:#}")))?;
        if let Some(u) = &self.run_as {
            for f in [&files.cert, &files.key] {
                std::os::unix::fs::chown(f, Some(u.uid), Some(u.gid)).map_err(io_err(format!(
                    "handing {} to the unprivileged user {}",
                    f.display(),
                    u.name
                )))?;
            }
        }
        Ok(())
    }

    fn initdb(&self) -> Result<()> {
        let mut cmd = self.command("initdb");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-A", "trust", "-U", SUPERUSER])
            // Skips only initdb's own final sync of the new files; a
            // durable server syncs as it does by default.
            .arg("--no-sync")
            .args(["--locale=C", "--encoding=UTF8"]);
        run_bounded(&mut cmd, "initdb", INITDB_TIMEOUT).map(drop)
    }

    /// Clones the server on `primary_port` into the data directory as a
    /// streaming standby (`-R` writes `standby.signal` and the connection
    /// to the primary).
    fn clone_from(&self, primary_port: u16) -> Result<()> {
        let mut cmd = self.command("pg_basebackup");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-h", "127.0.0.1", "-p", &primary_port.to_string()])
            .args(["-U", SUPERUSER, "-R", "-X", "stream", "--no-sync"]);
        run_bounded(&mut cmd, "pg_basebackup", INITDB_TIMEOUT).map(drop)
    }

    /// `kill -9` of the postmaster: a crash, nothing shut down cleanly.
    /// The server can be started again with [`PgServer::start`].
    pub fn kill9(&self) -> Result<()> {
        let child = self.state.lock().child.take();
        if let Some(mut child) = child {
            child
                .kill()
                .map_err(io_err("killing postgres with SIGKILL"))?;
        }
        Ok(())
    }

    /// Promotes a standby to a primary and waits until it is one.
    pub fn promote(&self) -> Result<()> {
        let promoted: bool = self
            .connect("postgres")?
            .query_one(
                &format!("SELECT pg_promote(true, {})", PROMOTE_TIMEOUT.as_secs()),
                &[],
            )
            .map_err(|source| PgError::Sql {
                what: "promoting the standby (pg_promote)".into(),
                source,
            })?
            .get(0);
        if promoted {
            Ok(())
        } else {
            Err(PgError::NotStarted(format!(
                "the standby on port {} was not promoted within {PROMOTE_TIMEOUT:?}",
                self.port
            )))
        }
    }

    /// Starts `postgres` on the data directory and port and waits until it
    /// accepts connections. Any failure to come up is
    /// [`PgError::NotStarted`], and leaves no process behind.
    fn spawn_and_wait(&self) -> Result<()> {
        let log_path = self.log_path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err(format!("opening {}", log_path.display())))?;
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let log_err = log
            .try_clone()
            .map_err(io_err(format!("opening {}", log_path.display())))?;
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "unix_socket_directories="])
            .arg("-c")
            .arg(format!("max_connections={}", self.connections_max));
        if !self.durable {
            cmd.args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
                .args(["-c", "full_page_writes=off"]);
        }
        if self.stat_statements {
            cmd.args(["-c", "shared_preload_libraries=pg_stat_statements"]);
        }
        if self.synchronous_standby {
            cmd.args(["-c", "synchronous_standby_names=*"]);
        }
        if self.tls {
            cmd.args(["-c", "ssl=on"])
                .arg("-c")
                .arg(format!(
                    "ssl_cert_file={}",
                    self.dir.join("server.crt").display()
                ))
                .arg("-c")
                .arg(format!(
                    "ssl_key_file={}",
                    self.dir.join("server.key").display()
                ));
        }
        let child = ChildGuard::spawn(
            cmd.stdout(Stdio::from(log))
                .stderr(Stdio::from(log_err))
                // A process group of its own: a Ctrl-C in the terminal
                // reaches only its owner, which stops it after the nodes
                // that use it.
                .process_group(0),
            "postgres",
        )
        .map_err(io_err("starting postgres"))?;
        self.state.lock().child = Some(child);
        let deadline = Instant::now() + POSTGRES_START_TIMEOUT;
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
                return Err(PgError::NotStarted(format!(
                    "postgres exited ({status}) on port {}; its log ends:\n{}",
                    self.port,
                    self.log_since(log_start)
                )));
            }
            if self.connect("postgres").is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = self.stop();
                return Err(PgError::NotStarted(format!(
                    "postgres did not accept connections on port {} within \
                     {POSTGRES_START_TIMEOUT:?}; \
                     its log ends:\n{}",
                    self.port,
                    self.log_since(log_start)
                )));
            }
            std::thread::sleep(READY_POLL_INTERVAL);
        }
    }

    /// The last [`LOG_TAIL_LINES`] lines the log got after byte `start`.
    fn log_since(&self, start: u64) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(self.log_path()) {
            let _ = f.seek(SeekFrom::Start(start));
            let _ = f.read_to_string(&mut text);
        }
        tail_lines(&text, LOG_TAIL_LINES)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self.shut_down();
    }
}

impl std::fmt::Debug for PgServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgServer")
            .field("dir", &self.dir)
            .field("port", &self.port)
            .field("durable", &self.durable)
            .finish_non_exhaustive()
    }
}

/// Fast shutdown of `child` (SIGINT, by its pid), then SIGKILL after
/// [`STOP_TIMEOUT`]; always reaps it (its guard kills and reaps it on any
/// error).
fn stop_child(mut child: ChildGuard) -> Result<()> {
    let status = match child.try_wait() {
        Ok(Some(status)) => status,
        Ok(None) => match child.stop(libc::SIGINT, STOP_TIMEOUT) {
            Ok(Some(status)) => status,
            Ok(None) => return Err(PgError::StopTimeout(STOP_TIMEOUT)),
            Err(e) => return Err(io_err("stopping postgres")(e)),
        },
        Err(e) => return Err(io_err("waiting for postgres")(e)),
    };
    if status.success() {
        Ok(())
    } else {
        Err(PgError::Exited(status))
    }
}

/// Runs `cmd` to completion with its output captured, killing it (by pid)
/// if it runs longer than `timeout`. A failure status is an error quoting
/// the output.
fn run_bounded(cmd: &mut Command, program: &'static str, timeout: Duration) -> Result<Output> {
    let output = run_with_timeout(cmd, program, timeout).map_err(|e| match e {
        RunError::Timeout { .. } => PgError::ProgramTimeout { program, timeout },
        RunError::Start { source, .. } => io_err(format!("starting {program}"))(source),
        RunError::Wait { source, .. } => io_err(format!("waiting for {program}"))(source),
    })?;
    let status = output.status;
    if !status.success() {
        return Err(PgError::ProgramFailed {
            program,
            status,
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        });
    }
    Ok(output)
}

/// Checks that `user` can pass through every directory above `dir`,
/// giving `o+x` to those within `reachable_from` (the caller's own). Both
/// paths are absolute.
fn let_user_reach(dir: &Path, reachable_from: Option<&Path>, user: &RunAs) -> Result<()> {
    for ancestor in dir.ancestors().skip(1) {
        let mode = std::fs::metadata(ancestor)
            .map_err(io_err(format!("reading {}", ancestor.display())))?
            .permissions()
            .mode();
        if mode & 0o001 != 0 {
            continue;
        }
        if !reachable_from.is_some_and(|r| ancestor.starts_with(r)) {
            return Err(PgError::Unreachable {
                user: user.name.clone(),
                path: ancestor.to_path_buf(),
                mode: mode & 0o7777,
            });
        }
        std::fs::set_permissions(ancestor, std::fs::Permissions::from_mode(mode | 0o001)).map_err(
            io_err(format!(
                "letting the server's user pass through {}",
                ancestor.display()
            )),
        )?;
    }
    Ok(())
}

pub(crate) fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// The directory holding both `initdb` and `postgres`.
fn find_bin_dir() -> Result<PathBuf> {
    postgres_bin_dir(&["initdb", "postgres"]).ok_or(PgError::BinariesMissing)
}

/// The directory of PostgreSQL programs that holds every one of
/// `programs`: the one the first of them on `PATH` resolves into, else the
/// newest `/usr/lib/postgresql/*/bin`.
pub(crate) fn postgres_bin_dir(programs: &[&str]) -> Option<PathBuf> {
    let complete = |d: &Path| programs.iter().all(|p| d.join(p).is_file());
    if let Some(first) = programs.first().and_then(|p| find_in_path(p)) {
        // PATH often holds symlinks (e.g. /usr/local/bin/initdb); the real
        // directory also holds the other programs, and leads to the
        // libraries.
        let real = std::fs::canonicalize(&first).unwrap_or(first);
        if let Some(dir) = real.parent()
            && complete(dir)
        {
            return Some(dir.to_path_buf());
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
            complete(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// `name`'s uid and gid, if the user exists.
pub(crate) fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let c = CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; PASSWD_BUFFER_BYTES];
    // SAFETY: passwd is plain data; all-zero is a valid value to overwrite.
    let mut record: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call, and `buf.len()` is the
    // buffer's size; getpwnam_r (unlike getpwnam) is thread-safe.
    let rc = unsafe {
        libc::getpwnam_r(
            c.as_ptr(),
            &mut record,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    (rc == 0 && !found.is_null()).then_some((record.pw_uid, record.pw_gid))
}

/// The user to run the server as when we are root: `nobody`, else a
/// dedicated system user, created on first need; and how to become it.
fn unprivileged_user() -> Result<RunAs> {
    /// Serialises the creation of the fallback user within this process.
    static CREATING: Mutex<()> = Mutex::new(());
    let via = match find_in_path("setpriv") {
        Some(p) => UserSwitch::Setpriv(p),
        None => UserSwitch::InChild,
    };
    let found = |name: &str| {
        lookup_user(name).map(|(uid, gid)| RunAs {
            name: name.to_string(),
            uid,
            gid,
            via: via.clone(),
        })
    };
    if let Some(u) = UNPRIVILEGED_USERS.iter().find_map(|n| found(n)) {
        return Ok(u);
    }
    let _creating = CREATING.lock();
    let name = UNPRIVILEGED_USERS[UNPRIVILEGED_USERS.len() - 1];
    if let Some(u) = found(name) {
        return Ok(u);
    }
    // Another process may create it at the same moment: its "already
    // exists" failure is fine, the lookup below decides.
    let _ = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ])
        .stdin(Stdio::null())
        .status();
    found(name).ok_or_else(|| PgError::NoUnprivilegedUser(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    // A missing server names the package that has it.
    #[test]
    fn missing_binaries_name_the_package() {
        let e = PgError::BinariesMissing.to_string();
        assert!(e.contains("`postgresql` Debian package"), "{e}");
    }

    // root exists everywhere; a user that cannot exist is not found.
    #[test]
    fn users_are_looked_up() {
        assert_eq!(lookup_user("root"), Some((0, 0)));
        assert_eq!(lookup_user("no such user"), None);
        assert_eq!(lookup_user("nul\0in name"), None);
    }
}
