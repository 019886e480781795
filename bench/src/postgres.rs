//! A private PostgreSQL server for the store parts: its own cluster in the
//! work directory, its own loopback port, stopped by its process id.
//!
//! The logic follows the store tests' private server (which is test
//! support, not a library, so it is repeated here) with one difference
//! that matters: the benchmark runs PostgreSQL with its default durability
//! settings (`fsync`, `synchronous_commit` and `full_page_writes` on), so
//! that a commit costs what it costs in production. [`PgServer::settings`]
//! reads them back from the server for the tables.
//!
//! The binaries (`initdb`, `postgres`, `pgbench`) are looked up in `PATH`,
//! then in `/usr/lib/postgresql/*/bin` (newest version first). PostgreSQL
//! refuses to run as root: when the benchmark runs as root, `initdb` and
//! `postgres` run as `nobody` (or a `tally-bench` system user, created once,
//! where there is no `nobody`) through `setpriv`, which execs the server,
//! so the process the guard holds is the postmaster itself.

use std::ffi::CString;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::process::{self, Guard, run_with_timeout, tail};

/// How long the server may take to accept connections after it starts.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `initdb` may take.
const INITDB_TIMEOUT: Duration = Duration::from_secs(120);
/// Fresh ports tried when another process took the one picked.
const PORT_ATTEMPTS_MAX: u32 = 5;
/// The server's superuser; authentication is `trust` on loopback.
pub const SUPERUSER: &str = "tally";
/// Connections the server accepts: 50 pgbench clients, or a tally node's
/// two, plus the benchmark's own.
const CONNECTIONS_MAX: u32 = 120;
/// Unprivileged users tried, in order, when running as root.
const UNPRIVILEGED_USERS: [&str; 2] = ["nobody", "tally-bench"];
/// How often the start loop looks again.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Settings read back from the server and printed with the figures.
const REPORTED_SETTINGS: [&str; 5] = [
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_sync_method",
    "shared_buffers",
];

const MISSING_BINARIES: &str = "PostgreSQL server binaries (initdb, postgres) were not found in \
     PATH or /usr/lib/postgresql/*/bin: install the `postgresql` Debian package \
     (apt-get install postgresql)";

/// A running private PostgreSQL server.
pub struct PgServer {
    /// The postmaster; its stop signal is SIGINT (fast shutdown: sessions
    /// are ended, a checkpoint is written, the server exits).
    guard: Guard,
    bin_dir: PathBuf,
    port: u16,
    version: String,
}

/// The uid and gid the server runs as when we are root.
#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

impl PgServer {
    /// Creates a cluster in `dir` (which must not exist), somewhere under
    /// the benchmark's own directory `work`, and starts it.
    pub fn start(work: &Path, dir: &Path) -> Result<PgServer> {
        let bin_dir = find_bin_dir()?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let run_as = if unsafe { libc::geteuid() } == 0 {
            Some(unprivileged_user()?)
        } else {
            None
        };
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        if let Some(u) = run_as {
            let_others_reach(work, dir)?;
            std::os::unix::fs::chown(dir, Some(u.uid), Some(u.gid))
                .context("handing the server directory to the unprivileged user")?;
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        let version = crate::tools::version(&bin_dir.join("postgres"))?;

        let data_dir = dir.join("data");
        let output = run_with_timeout(
            command(&bin_dir, run_as, dir, "initdb")?
                .arg("-D")
                .arg(&data_dir)
                .args(["-A", "trust", "-U", SUPERUSER])
                // Skips only initdb's own final sync of the new files; the
                // server below syncs as it does by default.
                .arg("--no-sync")
                .args(["--locale=C", "--encoding=UTF8"]),
            "initdb",
            INITDB_TIMEOUT,
        )?;
        if !output.status.success() {
            bail!(
                "initdb failed ({}): {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }

        let log_path = dir.join("postgres.log");
        let mut last_error = anyhow!("no attempt made");
        for _ in 0..PORT_ATTEMPTS_MAX {
            let port = process::free_port()?;
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .with_context(|| format!("opening {}", log_path.display()))?;
            let log_start = log.metadata()?.len();
            let child = command(&bin_dir, run_as, dir, "postgres")?
                .arg("-D")
                .arg(&data_dir)
                .args(["-p", &port.to_string()])
                .arg("-k")
                .arg(dir)
                .args(["-c", "listen_addresses=127.0.0.1"])
                .arg("-c")
                .arg(format!("max_connections={CONNECTIONS_MAX}"))
                .stdin(Stdio::null())
                .stdout(Stdio::from(log.try_clone()?))
                .stderr(Stdio::from(log))
                .spawn()
                .context("starting postgres")?;
            let guard = Guard::new(child, "postgres").with_stop_signal(libc::SIGINT);
            let mut server = PgServer {
                guard,
                bin_dir: bin_dir.clone(),
                port,
                version: version.clone(),
            };
            match server.wait_ready() {
                Ok(()) => return Ok(server),
                Err(e) => {
                    let log = std::fs::read(&log_path).unwrap_or_default();
                    let log = String::from_utf8_lossy(&log[log_start as usize..]).into_owned();
                    // Most likely another process took the port: try another.
                    last_error = e.context(format!("its log ends:\n{}", tail(&log, 20)));
                }
            }
        }
        Err(last_error.context("the private PostgreSQL server did not start"))
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.guard.exited()? {
                bail!("postgres exited ({status}) on port {}", self.port);
            }
            if self.connect("postgres").is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "postgres did not accept connections within {} s",
                    READY_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's `--version` line, e.g. `postgres (PostgreSQL) 15.18`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// A program from the server's binaries (`pgbench`).
    pub fn program(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// A connection as the superuser to `database`.
    pub fn connect(&self, database: &str) -> Result<::postgres::Client> {
        ::postgres::Client::connect(
            &format!(
                "host=127.0.0.1 port={} user={SUPERUSER} dbname={database} connect_timeout=5",
                self.port
            ),
            ::postgres::NoTls,
        )
        .with_context(|| {
            format!("connecting to the private PostgreSQL server, database {database}")
        })
    }

    /// The store URL of `database`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates an empty database named `name`.
    pub fn create_database(&self, name: &str) -> Result<()> {
        self.connect("postgres")?
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .with_context(|| format!("creating database {name}"))
    }

    /// The durability settings the server runs with, as `name=value`
    /// pairs joined by commas, read from the server itself.
    pub fn settings(&self) -> Result<String> {
        let mut client = self.connect("postgres")?;
        let mut out = Vec::new();
        for name in REPORTED_SETTINGS {
            let row = client
                .query_one(&format!("SHOW {name}"), &[])
                .with_context(|| format!("SHOW {name}"))?;
            let value: String = row.get(0);
            out.push(format!("{name}={value}"));
        }
        Ok(out.join(", "))
    }

    /// Fast shutdown, waited for.
    pub fn stop(self) -> Result<()> {
        let status = self.guard.stop()?;
        if !status.success() {
            bail!("postgres exited with {status} at shutdown");
        }
        Ok(())
    }
}

/// Makes every directory from `work` down to `dir`'s parent searchable by
/// other users (the server's user must pass through them), and checks that
/// the directories above `work`, which are not the benchmark's to change,
/// already are.
fn let_others_reach(work: &Path, dir: &Path) -> Result<()> {
    for ancestor in dir.ancestors().skip(1) {
        let mode = std::fs::metadata(ancestor)?.permissions().mode();
        if mode & 0o001 != 0 {
            continue;
        }
        if !ancestor.starts_with(work) {
            bail!(
                "PostgreSQL runs as an unprivileged user, who cannot pass through {} \
                 (mode {:o}); give --work-dir a directory other users can reach",
                ancestor.display(),
                mode & 0o7777
            );
        }
        std::fs::set_permissions(ancestor, std::fs::Permissions::from_mode(mode | 0o011))
            .with_context(|| format!("letting the server reach {}", ancestor.display()))?;
    }
    Ok(())
}

/// A command that runs `program` from the server's binaries, as the
/// unprivileged user if we are root, in `dir` (never a working directory
/// that user cannot read).
fn command(bin_dir: &Path, run_as: Option<RunAs>, dir: &Path, program: &str) -> Result<Command> {
    let path = bin_dir.join(program);
    let mut cmd = match run_as {
        None => Command::new(path),
        Some(u) => {
            let setpriv = find_in_path("setpriv").ok_or_else(|| {
                anyhow!(
                    "running as root, PostgreSQL must run as an unprivileged user, and that \
                     needs setpriv (Debian package util-linux)"
                )
            })?;
            let mut c = Command::new(setpriv);
            c.arg(format!("--reuid={}", u.uid))
                .arg(format!("--regid={}", u.gid))
                .arg("--clear-groups")
                .arg("--")
                .arg(path);
            c
        }
    };
    cmd.current_dir(dir);
    Ok(cmd)
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// The directory holding both `initdb` and `postgres`.
fn find_bin_dir() -> Result<PathBuf> {
    let has_both = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(initdb) = find_in_path("initdb") {
        // PATH often holds symlinks (e.g. /usr/local/bin/initdb); the real
        // directory also holds `postgres` and `pgbench`.
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
        .ok_or_else(|| anyhow!(MISSING_BINARIES))
}

fn lookup_user(name: &str) -> Option<RunAs> {
    let c = CString::new(name).ok()?;
    // SAFETY: getpwnam returns null or a pointer to a static record, which
    // is copied at once; the benchmark looks users up from one thread.
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

/// The user to run the server as when we are root: `nobody`, else a
/// dedicated system user, created on first need.
fn unprivileged_user() -> Result<RunAs> {
    if let Some(u) = UNPRIVILEGED_USERS.iter().find_map(|n| lookup_user(n)) {
        return Ok(u);
    }
    let name = UNPRIVILEGED_USERS[1];
    let _ = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ])
        .status();
    lookup_user(name).ok_or_else(|| {
        anyhow!(
            "running as root, and PostgreSQL refuses to run as root, but there is no \
             `nobody` user and `useradd --system {name}` failed"
        )
    })
}
