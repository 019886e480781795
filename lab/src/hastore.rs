//! A local highly available store: three etcd members, Patroni managing
//! two or more PostgreSQL members in synchronous replication, and
//! optionally HAProxy routing to the primary, all private children in one
//! directory on free loopback ports.
//!
//! `tally cluster --store private-ha-postgres` and `tally chaos` need a
//! PostgreSQL store that survives the loss of its primary without losing a
//! committed row, and that they can break on purpose. [`HaStore::start`]
//! builds it; [`HaStore::kill9_primary_postgres`],
//! [`HaStore::freeze_primary`], [`HaStore::switchover`],
//! [`HaStore::kill9_etcd`] and [`HaStore::restart_etcd`] break it;
//! [`HaStore::primary`], [`HaStore::sync_standbys`] and the waits say what
//! it has become; [`HaStore::shutdown`] (or dropping it) stops everything.
//!
//! **Reaching the primary.** Nodes use one of two store URLs, both valid:
//! [`HaStore::store_url_multi_host`] lists every PostgreSQL member with
//! `target_session_attrs=read-write`, so the client tries each and keeps
//! the one that accepts writes; [`HaStore::store_url_haproxy`] names
//! HAProxy's port, behind which only the member whose Patroni answers
//! `OPTIONS /primary` with 200 is in service.
//!
//! **Replication.** Patroni runs with `synchronous_mode` and
//! `synchronous_mode_strict`: a commit returns only once a synchronous
//! standby has it, and with no standby the primary accepts no commit at
//! all rather than commit alone. Patroni only promotes a synchronous
//! standby, so an acknowledged commit survives a failover. The timings are
//! short ([`DCS_TTL_SECS`], [`DCS_LOOP_WAIT_SECS`], [`DCS_RETRY_TIMEOUT_SECS`]);
//! `primary_start_timeout` is 0, so a primary whose PostgreSQL crashes is
//! failed over at once instead of being restarted in place.
//!
//! **The DCS.** etcd 3.4 turns its v2 API off, so Patroni would use its
//! `etcd3` section ([`EtcdApi::V3`]). But Patroni before 3.0.3 has a bug
//! there (patroni/patroni#2689): a primary whose lease expired while it was
//! stopped may, when it runs again, overwrite the new leader's key and take
//! the leadership back, and the commits the new primary acknowledged in
//! between are rewound away. [`HaStore::freeze_primary`] can cause exactly
//! that (seen here with Debian 12's Patroni 3.0.2, in 3 of 7 freezes). So
//! the default is [`EtcdApi::V2`] (etcd with `--enable-v2`, Patroni's
//! `etcd` section, whose leader update is a compare-and-swap), which did
//! not (0 of 5 freezes by hand, 4 of 4 test runs).
//!
//! **Processes.** Every etcd member, every Patroni and HAProxy is a child
//! of this process, held by a [`ChildGuard`] in a process group of its own
//! and signalled only by its pid. PostgreSQL is the exception Patroni
//! makes: it starts each postmaster detached (its own session, re-parented
//! to init), so that a Patroni restart does not stop the database. A
//! postmaster is found through its data directory's `postmaster.pid`, then
//! held by a pidfd (`pidfd_open(2)`) and accepted only if the process the
//! pidfd refers to still runs with that data directory on its command
//! line; signals go through the pidfd, so they can only reach that
//! process. Nothing is looked up or signalled by name.
//!
//! **Ports.** One run of consecutive free loopback ports below the
//! kernel's ephemeral range ([`free_loopback_port_run`]), so that a member
//! restarted after many client connections finds its port free. All are
//! bound once [`HaStore::start`] returns; until then no other store of
//! this process starts, but another caller of [`free_loopback_port_run`]
//! could be offered the same run.
//!
//! **Root.** PostgreSQL refuses to run as root, so when this process is
//! root, etcd and Patroni (and the PostgreSQL it starts) run as the
//! unprivileged `nobody` (or `tally-postgres`) user, which owns their
//! directories; every directory above [`HaOptions::dir`] must let other
//! users pass (`o+x`), as `/tmp` does.
//!
//! **Files.** Under [`HaOptions::dir`]: `etcdN/` (data and `etcd.log`),
//! `pgN/` (`patroni.yml`, the data directory, and `patroni.log`, which
//! holds both Patroni's log and its PostgreSQL's, in time order), and
//! `haproxy.cfg` and `haproxy.log`. They are kept after a shutdown; errors
//! name the log to read.
//!
//! This module never runs anything it did not start and never touches a
//! directory other than the one it was given.

#![cfg(target_os = "linux")]

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::ports::free_loopback_port_run;
use crate::process::{ChildGuard, tail_lines};
use crate::wire::http;

/// Members of the etcd cluster: three, so that it keeps a quorum with
/// one member down.
pub const ETCD_MEMBERS: usize = 3;
/// PostgreSQL members unless the options say otherwise: a primary, a
/// synchronous standby, and one more to become the synchronous standby
/// when either is lost.
pub const POSTGRES_MEMBERS_DEFAULT: usize = 3;
/// Fewest PostgreSQL members: strict synchronous mode needs a standby.
pub const POSTGRES_MEMBERS_MIN: usize = 2;
/// Most PostgreSQL members: each is a Patroni and a PostgreSQL server.
pub const POSTGRES_MEMBERS_MAX: usize = 7;

/// Patroni's leader key lives this long without renewal (`ttl`). It must
/// exceed `loop_wait + 2 * retry_timeout`, so that a leader whose DCS
/// calls are retried still renews the key before it expires.
pub const DCS_TTL_SECS: u32 = 10;
/// Seconds between two runs of Patroni's HA loop (`loop_wait`).
pub const DCS_LOOP_WAIT_SECS: u32 = 1;
/// How long Patroni retries a DCS or PostgreSQL call (`retry_timeout`).
pub const DCS_RETRY_TIMEOUT_SECS: u32 = 4;
const _: () = assert!(DCS_TTL_SECS > DCS_LOOP_WAIT_SECS + 2 * DCS_RETRY_TIMEOUT_SECS);

/// How long [`HaStore::start`] waits for a primary with a synchronous
/// standby unless the options say otherwise: etcd's election, Patroni's
/// `initdb`, and a base backup per standby.
pub const READY_TIMEOUT_DEFAULT: Duration = Duration::from_secs(90);
/// How long an etcd member may take to report itself healthy.
pub const ETCD_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long HAProxy may take to route a connection to the primary.
pub const HAPROXY_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a Patroni may take to stop (it stops its PostgreSQL first)
/// before it is killed.
pub const PATRONI_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a PostgreSQL left running after its Patroni stopped may take
/// over its fast shutdown before it is killed, and how long a killed one
/// may take to exit.
pub const POSTGRES_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an etcd member may take to stop before it is killed.
pub const ETCD_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long HAProxy may take to stop before it is killed.
pub const HAPROXY_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a switchover may take, from the request to the candidate
/// answering as the primary. Patroni itself gives up after 20 s.
pub const SWITCHOVER_TIMEOUT: Duration = Duration::from_secs(60);
/// Most switchover requests [`HaStore::switchover`] sends when Patroni
/// answers that the candidate is not (or no longer) the synchronous
/// standby.
pub const SWITCHOVER_ATTEMPTS: u32 = 5;
/// How long one call to a Patroni REST API or an etcd health check may
/// take. A frozen member does not answer at all.
pub const REST_TIMEOUT: Duration = Duration::from_secs(2);
/// How often HAProxy checks each member's REST API (`OPTIONS /primary`).
pub const HAPROXY_CHECK_INTERVAL_MS: u64 = 250;
/// Consecutive connections through HAProxy that must each reach the
/// writable primary before [`HaStore::start`] returns: HAProxy starts with
/// every member in service until their checks fail and balances
/// connections over those in service, so one writable connection does not
/// show that the standbys are out.
pub const HAPROXY_ROUTED_STREAK: u32 = 10;
/// How long one connection attempt to PostgreSQL may take, in seconds
/// (libpq's `connect_timeout`).
pub const CONNECT_TIMEOUT_SECS: u32 = 5;
/// Largest answer read from a Patroni REST API or etcd.
pub const REST_RESPONSE_BYTES_MAX: usize = 64 * 1024;

/// The database tally uses, owned by [`STORE_USER`].
pub const STORE_DATABASE: &str = "tally";
/// The role tally connects as (password authentication, SCRAM).
pub const STORE_USER: &str = "tally";
/// [`STORE_USER`]'s password. A local test stack's; never a real one.
pub const STORE_PASSWORD: &str = "tally-local-ha";

/// Patroni's cluster name (`scope`), also PostgreSQL's `cluster_name`.
const SCOPE: &str = "tally-ha";
const SUPERUSER: &str = "postgres";
const SUPERUSER_PASSWORD: &str = "tally-local-ha-superuser";
const REPLICATION_USER: &str = "replicator";
const REPLICATION_PASSWORD: &str = "tally-local-ha-replication";
/// Unprivileged users tried, in order, when running as root.
const UNPRIVILEGED_USERS: [&str; 2] = ["nobody", "tally-postgres"];
/// Pause between two polls of any wait.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Lines of a log quoted in an error.
const LOG_TAIL_LINES: usize = 20;
/// PostgreSQL programs Patroni runs; the binary directory must hold all.
const POSTGRES_PROGRAMS: [&str; 7] = [
    "postgres",
    "pg_ctl",
    "initdb",
    "pg_controldata",
    "pg_basebackup",
    "pg_isready",
    "pg_rewind",
];

/// What can go wrong while starting, breaking, inspecting or stopping the
/// local HA store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HaError {
    /// A program the stack needs is not installed.
    #[error(
        "`{program}` is not installed: install the `{package}` Debian package \
         (apt-get install {package})"
    )]
    Missing {
        program: &'static str,
        package: &'static str,
    },
    /// The options cannot describe a stack.
    #[error("{0}")]
    Invalid(String),
    /// Running as root, and none of the unprivileged users exists.
    #[error(
        "running as root, and PostgreSQL refuses to run as root, but none of the users \
         {UNPRIVILEGED_USERS:?} exists: create one (useradd --system tally-postgres)"
    )]
    NoUnprivilegedUser,
    /// Running as root, the unprivileged user cannot pass through a
    /// directory above the stack's directory.
    #[error(
        "etcd and Patroni run as the unprivileged user {user}, who cannot pass through {} \
         (mode {mode:o}); give the HA store a directory other users can reach, such as \
         one under /tmp",
        .path.display()
    )]
    Unreachable {
        user: String,
        path: PathBuf,
        mode: u32,
    },
    /// A file, directory, process or signal failed; `what` names it.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A process of the stack exited by itself.
    #[error("{what} exited ({status}); read {}; it ends:\n{tail}", .log.display())]
    Exited {
        what: String,
        status: ExitStatus,
        log: PathBuf,
        tail: String,
    },
    /// Something the stack should have reached in time it did not reach.
    #[error(
        "{what} within {timeout:?}{}; read {}",
        if .state.is_empty() { String::new() } else { format!(" (last seen: {})", .state) },
        display_paths(.logs)
    )]
    Timeout {
        what: String,
        timeout: Duration,
        /// What the stack looked like at the end, if anything answered.
        state: String,
        logs: Vec<PathBuf>,
    },
    /// A Patroni REST call was answered with an error.
    #[error("Patroni refused {what}: HTTP {status}: {body}; read {}", .log.display())]
    Refused {
        what: String,
        status: u16,
        body: String,
        log: PathBuf,
    },
    /// A Patroni REST call had no usable answer.
    #[error("{what}: {detail}; read {}", .log.display())]
    Rest {
        what: String,
        detail: String,
        log: PathBuf,
    },
    /// A connection or statement failed; `what` names it.
    #[error("{what}: {source}")]
    Sql {
        what: String,
        #[source]
        source: postgres::Error,
    },
    /// The index is not below the number of members of that kind.
    #[error("no {kind} member {index}: there are {count}")]
    NoSuchMember {
        kind: &'static str,
        index: usize,
        count: usize,
    },
    /// No member is the primary right now (a failover is under way, or the
    /// DCS has lost its quorum).
    #[error("no PostgreSQL member is the primary; read {}", display_paths(.logs))]
    NoPrimary { logs: Vec<PathBuf> },
    /// More than one member answers as the primary.
    #[error("members {members:?} all answer as the primary; read {}", display_paths(.logs))]
    TwoPrimaries {
        members: Vec<String>,
        logs: Vec<PathBuf>,
    },
    /// The primary's PostgreSQL is not running, so there is nothing to
    /// kill or freeze.
    #[error("member {member}'s PostgreSQL is not running; read {}", .log.display())]
    PostgresNotRunning { member: String, log: PathBuf },
    /// [`HaStore::shutdown`] was called.
    #[error("the HA store was shut down")]
    ShutDown,
}

type Result<T> = std::result::Result<T, HaError>;

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HaError {
    let what = what.into();
    move |source| HaError::Io { what, source }
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Which etcd API Patroni uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EtcdApi {
    /// The v3 API (Patroni's `etcd3` section), etcd 3.4's only API by
    /// default. See the module documentation for the Patroni < 3.0.3 bug
    /// that [`HaStore::freeze_primary`] can set off with it.
    V3,
    /// The v2 API (etcd `--enable-v2`, Patroni's `etcd` section), whose
    /// leader-key update is a compare-and-swap. The default: the Patroni
    /// this stack runs (Debian bookworm's 3.0.2) can, with the v3 API, let a
    /// primary thawed after its lease ran out take the leader key back from
    /// the standby promoted meanwhile, rewinding away what that one
    /// acknowledged (fixed in Patroni 3.0.3).
    #[default]
    V2,
}

/// How to build the stack. [`HaOptions::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct HaOptions {
    /// Holds every member's directory, the configurations and the logs.
    /// Created if missing (with its parents); it must hold no earlier
    /// stack. Kept after the shutdown.
    pub dir: PathBuf,
    /// PostgreSQL members, each managed by its own Patroni, between
    /// [`POSTGRES_MEMBERS_MIN`] and [`POSTGRES_MEMBERS_MAX`].
    pub postgres_members: usize,
    /// Start HAProxy in front of the members (it must be installed).
    pub haproxy: bool,
    /// Which etcd API Patroni uses.
    pub etcd_api: EtcdApi,
    /// How long [`HaStore::start`] waits for a primary with a synchronous
    /// standby.
    pub ready_timeout: Duration,
}

impl HaOptions {
    /// [`POSTGRES_MEMBERS_DEFAULT`] members, HAProxy, the etcd API of [`EtcdApi::default`] and
    /// [`READY_TIMEOUT_DEFAULT`], in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> HaOptions {
        HaOptions {
            dir: dir.into(),
            postgres_members: POSTGRES_MEMBERS_DEFAULT,
            haproxy: true,
            etcd_api: EtcdApi::default(),
            ready_timeout: READY_TIMEOUT_DEFAULT,
        }
    }
}

/// One PostgreSQL member as Patroni's `GET /cluster` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    /// `pg1`, `pg2`, ...
    pub name: String,
    /// `leader`, `sync_standby`, `replica`, ...
    pub role: String,
    /// `running`, `starting`, `stopped`, ...
    pub state: String,
    pub timeline: Option<u64>,
}

/// What [`HaStore::kill9_primary_postgres`] killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Killed {
    /// The member that was the primary.
    pub member: usize,
    /// The postmaster's process id.
    pub pid: u32,
}

/// The user etcd and Patroni run as when we are root.
#[derive(Debug, Clone)]
struct RunAs {
    name: String,
    uid: u32,
    gid: u32,
}

/// The programs the stack runs.
#[derive(Debug)]
struct Programs {
    etcd: PathBuf,
    patroni: PathBuf,
    haproxy: Option<PathBuf>,
    postgres_bin: PathBuf,
}

#[derive(Debug)]
struct EtcdMember {
    name: String,
    client_port: u16,
    peer_port: u16,
    /// Holds `data/` and `etcd.log`.
    dir: PathBuf,
    /// The running process; `None` once killed or stopped.
    child: Mutex<Option<ChildGuard>>,
}

#[derive(Debug)]
struct PgMember {
    name: String,
    /// Patroni's REST API.
    rest_port: u16,
    postgres_port: u16,
    /// Holds `patroni.yml`, `patroni.log`, `pgpass` and `data/`.
    dir: PathBuf,
    /// Patroni; `None` once stopped.
    child: Mutex<Option<ChildGuard>>,
}

impl PgMember {
    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("patroni.log")
    }

    fn rest_addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.rest_port).into()
    }
}

/// A running local HA store. Its methods take `&self`, so one store can be
/// shared between threads (a fault thread breaks it while others use it).
/// Dropping it stops every process it started.
#[derive(Debug)]
pub struct HaStore {
    /// Absolute.
    dir: PathBuf,
    programs: Programs,
    run_as: Option<RunAs>,
    etcd_api: EtcdApi,
    etcd: Vec<EtcdMember>,
    members: Vec<PgMember>,
    haproxy_port: Option<u16>,
    haproxy: Mutex<Option<ChildGuard>>,
    /// Set by the first shutdown; later faults are refused.
    shut_down: Mutex<bool>,
}

impl HaStore {
    /// Builds the stack as `options` say and waits until there is a
    /// primary with a synchronous standby, the store's role and database
    /// exist, and (if asked for) HAProxy routes to the primary. On any
    /// error everything started so far is stopped.
    pub fn start(options: HaOptions) -> Result<HaStore> {
        let n = options.postgres_members;
        if !(POSTGRES_MEMBERS_MIN..=POSTGRES_MEMBERS_MAX).contains(&n) {
            return Err(HaError::Invalid(format!(
                "{n} PostgreSQL members asked for; the HA store runs between \
                 {POSTGRES_MEMBERS_MIN} and {POSTGRES_MEMBERS_MAX}"
            )));
        }
        let programs = find_programs(options.haproxy)?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let run_as = if unsafe { libc::geteuid() } == 0 {
            Some(unprivileged_user()?)
        } else {
            None
        };
        let dir = prepare_dir(&options.dir, run_as.as_ref())?;

        // A run of free ports is only free until someone binds it, and two
        // stores of one process would be offered the same run: one store
        // starts at a time, and its ports are all bound when it is up.
        static STARTING: Mutex<()> = Mutex::new(());
        let _starting = STARTING.lock();
        // One run of consecutive ports below the ephemeral range, so that
        // a restarted member finds its port free even after many client
        // connections: etcd client and peer, Patroni REST and PostgreSQL,
        // HAProxy.
        let count = 2 * ETCD_MEMBERS + 2 * n + usize::from(options.haproxy);
        let base =
            free_loopback_port_run(count as u16).map_err(io_err("finding free loopback ports"))?;
        let mut next = base;
        let mut take = || {
            next += 1;
            next - 1
        };
        let etcd = (1..=ETCD_MEMBERS)
            .map(|i| EtcdMember {
                name: format!("etcd{i}"),
                client_port: take(),
                peer_port: take(),
                dir: dir.join(format!("etcd{i}")),
                child: Mutex::new(None),
            })
            .collect();
        let members = (1..=n)
            .map(|i| PgMember {
                name: format!("pg{i}"),
                rest_port: take(),
                postgres_port: take(),
                dir: dir.join(format!("pg{i}")),
                child: Mutex::new(None),
            })
            .collect();
        let haproxy_port = options.haproxy.then(&mut take);
        let store = HaStore {
            dir,
            programs,
            run_as,
            etcd_api: options.etcd_api,
            etcd,
            members,
            haproxy_port,
            haproxy: Mutex::new(None),
            shut_down: Mutex::new(false),
        };
        // From here on, an early return drops `store`, which stops what
        // was started.
        for i in 0..ETCD_MEMBERS {
            store.make_member_dir(&store.etcd[i].dir)?;
            let child = store.spawn_etcd(i, "new")?;
            *store.etcd[i].child.lock() = Some(child);
        }
        for i in 0..ETCD_MEMBERS {
            store.wait_etcd_healthy(i, ETCD_START_TIMEOUT)?;
        }
        for i in 0..n {
            store.make_member_dir(&store.members[i].dir)?;
            store.write_patroni_config(i)?;
            let child = store.spawn_patroni(i)?;
            *store.members[i].child.lock() = Some(child);
        }
        let (primary, _) = store.wait_for_sync(options.ready_timeout)?;
        store.create_store_database(primary)?;
        if options.haproxy {
            store.start_haproxy()?;
        }
        Ok(store)
    }

    /// The stack's directory (absolute).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How many PostgreSQL members there are.
    pub fn postgres_members(&self) -> usize {
        self.members.len()
    }

    /// Member `member`'s name as Patroni knows it (`pg1` for member 0).
    pub fn member_name(&self, member: usize) -> Result<&str> {
        Ok(&self.member(member)?.name)
    }

    /// Member `member`'s PostgreSQL address.
    pub fn postgres_addr(&self, member: usize) -> Result<SocketAddr> {
        Ok(([127, 0, 0, 1], self.member(member)?.postgres_port).into())
    }

    /// Member `member`'s Patroni REST API address.
    pub fn rest_addr(&self, member: usize) -> Result<SocketAddr> {
        Ok(self.member(member)?.rest_addr())
    }

    /// Member `member`'s log: Patroni's, with its PostgreSQL's.
    pub fn patroni_log_path(&self, member: usize) -> Result<PathBuf> {
        Ok(self.member(member)?.log_path())
    }

    /// etcd member `member`'s client address.
    pub fn etcd_client_addr(&self, member: usize) -> Result<SocketAddr> {
        Ok(([127, 0, 0, 1], self.etcd_member(member)?.client_port).into())
    }

    /// etcd member `member`'s log.
    pub fn etcd_log_path(&self, member: usize) -> Result<PathBuf> {
        Ok(self.etcd_member(member)?.dir.join("etcd.log"))
    }

    /// HAProxy's address, if it runs.
    pub fn haproxy_addr(&self) -> Option<SocketAddr> {
        self.haproxy_port.map(|p| ([127, 0, 0, 1], p).into())
    }

    /// HAProxy's log, if it runs.
    pub fn haproxy_log_path(&self) -> Option<PathBuf> {
        self.haproxy_port.map(|_| self.dir.join("haproxy.log"))
    }

    /// The store URL that lists every PostgreSQL member; the client keeps
    /// the one that accepts writes (`target_session_attrs=read-write`).
    pub fn store_url_multi_host(&self) -> String {
        let hosts = self
            .members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.postgres_port))
            .collect::<Vec<_>>()
            .join(",");
        format!(
            "postgres://{STORE_USER}:{STORE_PASSWORD}@{hosts}/{STORE_DATABASE}\
             ?target_session_attrs=read-write"
        )
    }

    /// The store URL through HAProxy, which routes to the primary; `None`
    /// when HAProxy does not run.
    pub fn store_url_haproxy(&self) -> Option<String> {
        self.haproxy_port.map(|p| {
            format!("postgres://{STORE_USER}:{STORE_PASSWORD}@127.0.0.1:{p}/{STORE_DATABASE}")
        })
    }

    /// The member that is the primary now: its Patroni holds the leader
    /// key and its PostgreSQL runs as the primary. `None` while there is
    /// none (during a failover). Each member is asked on its own REST API,
    /// so a frozen member costs up to [`REST_TIMEOUT`].
    pub fn primary(&self) -> Result<Option<usize>> {
        let primaries: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.answers_as_primary(i))
            .collect();
        match primaries.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(*one)),
            more => Err(HaError::TwoPrimaries {
                members: more.iter().map(|&i| self.members[i].name.clone()).collect(),
                logs: self.patroni_logs(),
            }),
        }
    }

    /// The members that are synchronous standbys now, by their own REST
    /// API (`GET /sync`).
    pub fn sync_standbys(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&i| {
                self.rest(i, "GET", "/sync", None, REST_TIMEOUT)
                    .is_ok_and(|r| r.status == 200)
            })
            .collect()
    }

    /// The cluster as Patroni's DCS sees it (`GET /cluster` of the first
    /// member that answers).
    pub fn cluster_status(&self) -> Result<Vec<MemberStatus>> {
        let mut last = None;
        for i in 0..self.members.len() {
            match self.rest(i, "GET", "/cluster", None, REST_TIMEOUT) {
                Ok(r) if r.status == 200 => return parse_cluster(&r.body),
                Ok(r) => last = Some(format!("HTTP {}", r.status)),
                Err(e) => last = Some(e.to_string()),
            }
        }
        Err(HaError::Rest {
            what: "no Patroni answered GET /cluster".into(),
            detail: last.unwrap_or_default(),
            log: self.members[0].log_path(),
        })
    }

    /// Waits up to `timeout` for a primary.
    pub fn wait_for_primary(&self, timeout: Duration) -> Result<usize> {
        self.wait_for(timeout, "no primary appeared", |s| {
            Ok(s.primary().ok().flatten())
        })
    }

    /// Waits up to `timeout` for the store to recover from
    /// [`HaStore::kill9_primary_postgres`]: another member answers as the
    /// primary (a failover), or the killed member does from a new
    /// postmaster (Patroni restarted it in place, which it does when it
    /// judges no standby fit to take over). Returns the primary.
    pub fn wait_after_kill(&self, killed: Killed, timeout: Duration) -> Result<usize> {
        let what = format!(
            "no primary after {}'s postmaster was killed",
            self.member(killed.member)?.name
        );
        self.wait_for(timeout, &what, |s| {
            Ok(s.primary().ok().flatten().filter(|&p| {
                p != killed.member
                    || Postmaster::find(&s.members[p].data_dir())
                        .is_some_and(|pm| pm.process.pid != killed.pid)
            }))
        })
    }

    /// Waits up to `timeout` for a primary other than `old`: the end of a
    /// failover away from `old`.
    pub fn wait_for_new_primary(&self, old: usize, timeout: Duration) -> Result<usize> {
        let what = format!("no primary other than {} appeared", self.member(old)?.name);
        self.wait_for(timeout, &what, |s| {
            Ok(s.primary().ok().flatten().filter(|&p| p != old))
        })
    }

    /// Waits up to `timeout` for a primary with at least one synchronous
    /// standby, the state in which commits are accepted; returns both.
    pub fn wait_for_sync(&self, timeout: Duration) -> Result<(usize, Vec<usize>)> {
        self.wait_for(
            timeout,
            "no primary with a synchronous standby appeared",
            |s| {
                let Some(p) = s.primary().ok().flatten() else {
                    return Ok(None);
                };
                let syncs: Vec<usize> = s.sync_standbys().into_iter().filter(|&i| i != p).collect();
                Ok((!syncs.is_empty()).then_some((p, syncs)))
            },
        )
    }

    /// Kills the primary's postmaster with SIGKILL, as a crash would, and
    /// returns at once. Its backends exit when they notice; Patroni, with
    /// `primary_start_timeout` 0, fails over to the synchronous standby
    /// (wait with [`HaStore::wait_for_new_primary`]) and brings the old
    /// member back as a standby.
    pub fn kill9_primary_postgres(&self) -> Result<Killed> {
        self.refuse_after_shutdown()?;
        let member = self.primary()?.ok_or_else(|| HaError::NoPrimary {
            logs: self.patroni_logs(),
        })?;
        let m = &self.members[member];
        let postmaster =
            Postmaster::find(&m.data_dir()).ok_or_else(|| HaError::PostgresNotRunning {
                member: m.name.clone(),
                log: m.log_path(),
            })?;
        postmaster
            .process
            .signal(libc::SIGKILL)
            .map_err(io_err(format!("killing {}'s postmaster", m.name)))?;
        Ok(Killed {
            member,
            pid: postmaster.process.pid,
        })
    }

    /// Freezes the primary as a stalled machine would be: SIGSTOP to its
    /// Patroni, its postmaster and every child of the postmaster; after
    /// `duration`, SIGCONT to all of them (also if this thread unwinds).
    /// Blocks for `duration`; returns the member that was frozen. Longer
    /// than [`DCS_TTL_SECS`], the leader key expires and the synchronous
    /// standby is promoted; the old primary, once it runs again, is
    /// demoted (but see the module documentation on [`EtcdApi::V3`] with
    /// Patroni before 3.0.3).
    pub fn freeze_primary(&self, duration: Duration) -> Result<usize> {
        self.refuse_after_shutdown()?;
        let member = self.primary()?.ok_or_else(|| HaError::NoPrimary {
            logs: self.patroni_logs(),
        })?;
        let m = &self.members[member];
        let mut frozen = Frozen {
            store: self,
            member,
            patroni: false,
            postgres: Vec::new(),
        };
        // Patroni first, so that it does not act on its PostgreSQL's
        // stop; the postmaster before its children, so that it forks no
        // child after they are listed.
        if let Some(patroni) = m.child.lock().as_mut() {
            patroni
                .signal(libc::SIGSTOP)
                .map_err(io_err(format!("stopping {}'s Patroni", m.name)))?;
            frozen.patroni = true;
        }
        if let Some(postmaster) = Postmaster::find(&m.data_dir()) {
            postmaster
                .process
                .signal(libc::SIGSTOP)
                .map_err(io_err(format!("stopping {}'s postmaster", m.name)))?;
            let children = postmaster.children();
            frozen.postgres.push(postmaster.process);
            for child in children {
                // One that exited in between is simply not stopped.
                if child.signal(libc::SIGSTOP).is_ok() {
                    frozen.postgres.push(child);
                }
            }
        }
        std::thread::sleep(duration);
        drop(frozen);
        Ok(member)
    }

    /// A planned switchover through the primary's Patroni
    /// (`POST /switchover` with the leader and the candidate), to
    /// `candidate` or, if `None`, to a synchronous standby (strict
    /// synchronous mode allows no other). Waits until the candidate is the
    /// primary, up to [`SWITCHOVER_TIMEOUT`]; returns it.
    pub fn switchover(&self, candidate: Option<usize>) -> Result<usize> {
        self.refuse_after_shutdown()?;
        let started = Instant::now();
        let mut attempt = 1;
        loop {
            let (primary, syncs) = self.wait_for_sync(SWITCHOVER_TIMEOUT)?;
            let candidate = match candidate {
                Some(c) => {
                    self.member(c)?;
                    c
                }
                // Patroni accepts only the synchronous standby its DCS
                // names, which can lag what the members themselves say
                // for a moment after a change.
                None => self.dcs_sync_standby().unwrap_or(syncs[0]),
            };
            let leader = &self.members[primary];
            let body = json!({
                "leader": leader.name,
                "candidate": self.members[candidate].name,
            })
            .to_string();
            let what = format!(
                "the switchover from {} to {}",
                leader.name, self.members[candidate].name
            );
            let response = self
                .rest(
                    primary,
                    "POST",
                    "/switchover",
                    Some(&body),
                    SWITCHOVER_TIMEOUT,
                )
                .map_err(|e| HaError::Rest {
                    what: what.clone(),
                    detail: e.to_string(),
                    log: leader.log_path(),
                })?;
            // 412: the DCS named another synchronous standby by the time
            // the request arrived; ask again.
            if response.status == 412
                && attempt < SWITCHOVER_ATTEMPTS
                && started.elapsed() < SWITCHOVER_TIMEOUT
            {
                attempt += 1;
                std::thread::sleep(POLL_INTERVAL * 5);
                continue;
            }
            if response.status != 200 {
                return Err(HaError::Refused {
                    what,
                    status: response.status,
                    body: response.body.trim().to_string(),
                    log: leader.log_path(),
                });
            }
            let left = SWITCHOVER_TIMEOUT.saturating_sub(started.elapsed());
            return self.wait_for(left, &format!("{what} did not complete"), |s| {
                Ok(s.primary().ok().flatten().filter(|&p| p == candidate))
            });
        }
    }

    /// The member the DCS names as the synchronous standby (`GET /cluster`),
    /// if one answers and names one.
    fn dcs_sync_standby(&self) -> Option<usize> {
        let members = self.cluster_status().ok()?;
        let name = members
            .iter()
            .find(|m| m.role == "sync_standby")?
            .name
            .clone();
        self.members.iter().position(|m| m.name == name)
    }

    /// Kills etcd member `member` with SIGKILL; returns its pid. The other
    /// two keep the quorum. A killed member stays down until
    /// [`HaStore::restart_etcd`].
    pub fn kill9_etcd(&self, member: usize) -> Result<Option<u32>> {
        self.refuse_after_shutdown()?;
        let e = self.etcd_member(member)?;
        let Some(mut child) = e.child.lock().take() else {
            return Ok(None);
        };
        let pid = child.pid();
        child
            .kill()
            .map_err(io_err(format!("killing {}", e.name)))?;
        Ok(Some(pid))
    }

    /// Starts etcd member `member` again on its data and ports (stopping
    /// it first if it runs) and waits until it is healthy, up to
    /// [`ETCD_START_TIMEOUT`].
    pub fn restart_etcd(&self, member: usize) -> Result<()> {
        self.refuse_after_shutdown()?;
        let e = self.etcd_member(member)?;
        {
            let mut slot = e.child.lock();
            if let Some(mut child) = slot.take() {
                child
                    .stop(libc::SIGTERM, ETCD_STOP_TIMEOUT)
                    .map_err(io_err(format!("stopping {}", e.name)))?;
            }
            *slot = Some(self.spawn_etcd(member, "existing")?);
        }
        self.wait_etcd_healthy(member, ETCD_START_TIMEOUT)
    }

    /// Stops everything by pid: HAProxy; every Patroni (SIGTERM: each
    /// stops its PostgreSQL, then exits), killed after
    /// [`PATRONI_STOP_TIMEOUT`]; any postmaster still running (fast
    /// shutdown, then SIGKILL to it and its children); then etcd, last,
    /// since Patroni needs it to stop cleanly. The directory is kept.
    /// Later calls do nothing; dropping the store calls it.
    pub fn shutdown(&self) -> Result<()> {
        {
            let mut done = self.shut_down.lock();
            if *done {
                return Ok(());
            }
            *done = true;
        }
        let mut first_error = None;
        let mut note = |r: Result<()>| {
            if let Err(e) = r
                && first_error.is_none()
            {
                first_error = Some(e);
            }
        };
        if let Some(mut h) = self.haproxy.lock().take() {
            note(
                h.stop(libc::SIGTERM, HAPROXY_STOP_TIMEOUT)
                    .map(drop)
                    .map_err(io_err("stopping HAProxy")),
            );
        }
        let mut patronis: Vec<(usize, ChildGuard)> = self
            .members
            .iter()
            .enumerate()
            .filter_map(|(i, m)| m.child.lock().take().map(|c| (i, c)))
            .collect();
        // All are told at once and then waited for, so that they stop side
        // by side. A stopped (frozen) one handles SIGTERM once it runs.
        for (i, c) in &mut patronis {
            let name = &self.members[*i].name;
            note(
                c.signal(libc::SIGTERM)
                    .and_then(|()| c.signal(libc::SIGCONT))
                    .map_err(io_err(format!("stopping {name}'s Patroni"))),
            );
        }
        for (i, mut c) in patronis {
            let name = &self.members[i].name;
            note(
                c.wait_or_kill(PATRONI_STOP_TIMEOUT)
                    .map(drop)
                    .map_err(io_err(format!("waiting for {name}'s Patroni"))),
            );
        }
        for m in &self.members {
            note(stop_leftover_postgres(m));
        }
        // One after another: a leader that stops hands its leadership to
        // a peer, and waits seconds for it if that peer is stopping too.
        for e in &self.etcd {
            if let Some(mut c) = e.child.lock().take() {
                note(
                    c.stop(libc::SIGTERM, ETCD_STOP_TIMEOUT)
                        .map(drop)
                        .map_err(io_err(format!("stopping {}", e.name))),
                );
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn refuse_after_shutdown(&self) -> Result<()> {
        if *self.shut_down.lock() {
            Err(HaError::ShutDown)
        } else {
            Ok(())
        }
    }

    fn member(&self, member: usize) -> Result<&PgMember> {
        self.members.get(member).ok_or(HaError::NoSuchMember {
            kind: "PostgreSQL",
            index: member,
            count: self.members.len(),
        })
    }

    fn etcd_member(&self, member: usize) -> Result<&EtcdMember> {
        self.etcd.get(member).ok_or(HaError::NoSuchMember {
            kind: "etcd",
            index: member,
            count: self.etcd.len(),
        })
    }

    fn patroni_logs(&self) -> Vec<PathBuf> {
        self.members.iter().map(PgMember::log_path).collect()
    }

    /// Creates `dir` for a member, owned by the user it runs as, which
    /// alone may enter it (PostgreSQL insists on that for its data).
    fn make_member_dir(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        if let Some(u) = &self.run_as {
            std::os::unix::fs::chown(dir, Some(u.uid), Some(u.gid)).map_err(io_err(format!(
                "handing {} to the unprivileged user {}",
                dir.display(),
                u.name
            )))?;
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err(format!("chmod 0700 {}", dir.display())))
    }

    /// A command for `program` as the user the stack runs as, in `dir`,
    /// with a clean environment (Patroni reads `PATRONI_*` variables) and
    /// in a process group of its own, so that a Ctrl-C in the terminal
    /// reaches only this process, which stops the stack in order.
    fn command(&self, program: &Path, dir: &Path, log: &Path) -> Result<Command> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io_err(format!("opening {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(io_err(format!("opening {}", log.display())))?;
        let mut cmd = Command::new(program);
        cmd.current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0);
        if let Some(u) = &self.run_as {
            // With a uid set and no groups given, the standard library
            // also clears the supplementary groups.
            cmd.uid(u.uid).gid(u.gid);
        }
        Ok(cmd)
    }

    fn spawn_etcd(&self, i: usize, cluster_state: &str) -> Result<ChildGuard> {
        let e = &self.etcd[i];
        let initial_cluster = self
            .etcd
            .iter()
            .map(|p| format!("{}=http://127.0.0.1:{}", p.name, p.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let client = format!("http://127.0.0.1:{}", e.client_port);
        let peer = format!("http://127.0.0.1:{}", e.peer_port);
        let mut cmd = self.command(&self.programs.etcd, &e.dir, &e.dir.join("etcd.log"))?;
        cmd.arg("--name")
            .arg(&e.name)
            .arg("--data-dir")
            .arg(e.dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial_cluster])
            .args(["--initial-cluster-state", cluster_state])
            // Unique per stack: members of two stacks never join up.
            .arg("--initial-cluster-token")
            .arg(format!("{SCOPE}-{}", self.etcd[0].client_port))
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .arg(format!("--enable-v2={}", self.etcd_api == EtcdApi::V2));
        ChildGuard::spawn(&mut cmd, e.name.clone()).map_err(io_err(format!(
            "starting {} ({})",
            e.name,
            self.programs.etcd.display()
        )))
    }

    fn wait_etcd_healthy(&self, i: usize, timeout: Duration) -> Result<()> {
        let e = &self.etcd[i];
        let addr: SocketAddr = ([127, 0, 0, 1], e.client_port).into();
        let log = e.dir.join("etcd.log");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = e.child.lock().as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(HaError::Exited {
                    what: e.name.clone(),
                    status,
                    tail: log_tail(&log),
                    log,
                });
            }
            let healthy = http::request(addr, "GET", "/health", None, rest_limits(REST_TIMEOUT))
                .is_ok_and(|r| r.status == 200 && r.body.contains("\"true\""));
            if healthy {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(HaError::Timeout {
                    what: format!("{} did not report itself healthy", e.name),
                    timeout,
                    state: String::new(),
                    logs: vec![log],
                });
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Patroni's configuration for member `i`. JSON is YAML, and
    /// serde_json quotes every path and password correctly.
    fn patroni_config(&self, i: usize) -> Value {
        let m = &self.members[i];
        let etcd_hosts: Vec<String> = self
            .etcd
            .iter()
            .map(|e| format!("127.0.0.1:{}", e.client_port))
            .collect();
        let dcs_section = match self.etcd_api {
            EtcdApi::V3 => "etcd3",
            EtcdApi::V2 => "etcd",
        };
        let rest = format!("127.0.0.1:{}", m.rest_port);
        let postgres = format!("127.0.0.1:{}", m.postgres_port);
        let hba = [
            "host all all 127.0.0.1/32 scram-sha-256".to_string(),
            format!("host replication {REPLICATION_USER} 127.0.0.1/32 scram-sha-256"),
        ];
        let mut config = json!({
            "scope": SCOPE,
            "name": m.name,
            "log": { "level": "INFO" },
            "restapi": { "listen": rest, "connect_address": rest },
            "bootstrap": {
                "dcs": {
                    "ttl": DCS_TTL_SECS,
                    "loop_wait": DCS_LOOP_WAIT_SECS,
                    "retry_timeout": DCS_RETRY_TIMEOUT_SECS,
                    // A crashed primary is failed over at once, not
                    // restarted in place first.
                    "primary_start_timeout": 0,
                    "synchronous_mode": true,
                    "synchronous_mode_strict": true,
                    "postgresql": {
                        "use_slots": true,
                        // A former primary rejoins as a standby by
                        // rewinding its divergent WAL (Patroni turns
                        // wal_log_hints on); if it cannot, it is cloned
                        // afresh, which is right for a local stack.
                        "use_pg_rewind": true,
                        "remove_data_directory_on_rewind_failure": true,
                        "remove_data_directory_on_diverged_timelines": true,
                    },
                },
                "initdb": [
                    { "encoding": "UTF8" },
                    { "locale": "C" },
                    { "auth": "scram-sha-256" },
                ],
            },
            "postgresql": {
                "listen": postgres,
                "connect_address": postgres,
                "data_dir": m.data_dir(),
                "bin_dir": self.programs.postgres_bin,
                "pgpass": m.dir.join("pgpass"),
                "authentication": {
                    "superuser": { "username": SUPERUSER, "password": SUPERUSER_PASSWORD },
                    "replication": {
                        "username": REPLICATION_USER,
                        "password": REPLICATION_PASSWORD,
                    },
                },
                "parameters": {
                    // TCP only: a Unix-domain socket's path is limited to
                    // 107 bytes, which a deep directory could exceed, and
                    // the system's socket directory is not ours.
                    "unix_socket_directories": "",
                    // After a failover a standby reaches the new primary
                    // at its next attempt to stream; PostgreSQL's default
                    // pause between attempts (5 s) is most of the time
                    // writes wait for a synchronous standby again
                    // (synchronous_mode_strict).
                    "wal_retrieve_retry_interval": "500ms",
                },
                "pg_hba": hba,
            },
            // Never arm the machine's hardware watchdog.
            "watchdog": { "mode": "off" },
        });
        config[dcs_section] = json!({ "hosts": etcd_hosts });
        config
    }

    fn write_patroni_config(&self, i: usize) -> Result<()> {
        let m = &self.members[i];
        let path = m.dir.join("patroni.yml");
        let text = serde_json::to_string_pretty(&self.patroni_config(i))
            .map_err(|e| HaError::Invalid(format!("Patroni's configuration: {e}")))?;
        std::fs::write(&path, text).map_err(io_err(format!("writing {}", path.display())))?;
        if let Some(u) = &self.run_as {
            std::os::unix::fs::chown(&path, Some(u.uid), Some(u.gid)).map_err(io_err(format!(
                "handing {} to {}",
                path.display(),
                u.name
            )))?;
        }
        Ok(())
    }

    fn spawn_patroni(&self, i: usize) -> Result<ChildGuard> {
        let m = &self.members[i];
        let mut cmd = self.command(&self.programs.patroni, &m.dir, &m.log_path())?;
        cmd.arg(m.dir.join("patroni.yml"));
        ChildGuard::spawn(&mut cmd, format!("patroni-{}", m.name)).map_err(io_err(format!(
            "starting {}'s Patroni ({})",
            m.name,
            self.programs.patroni.display()
        )))
    }

    /// One call to member `i`'s REST API.
    fn rest(
        &self,
        i: usize,
        method: &str,
        path: &str,
        body: Option<&str>,
        read_timeout: Duration,
    ) -> std::result::Result<http::Response, http::HttpError> {
        let limits = http::Limits {
            read_timeout,
            ..rest_limits(REST_TIMEOUT)
        };
        http::request(self.members[i].rest_addr(), method, path, body, limits)
    }

    /// Whether member `i`'s Patroni answers `GET /primary` with 200 and
    /// says its PostgreSQL runs as the primary. (Patroni answers 200 as
    /// long as it holds the leader key, even for a moment after its
    /// PostgreSQL died; the body says whether it runs.)
    fn answers_as_primary(&self, i: usize) -> bool {
        let Ok(r) = self.rest(i, "GET", "/primary", None, REST_TIMEOUT) else {
            return false;
        };
        if r.status != 200 {
            return false;
        }
        let Ok(body) = serde_json::from_str::<Value>(&r.body) else {
            return false;
        };
        body["state"] == "running" && matches!(body["role"].as_str(), Some("master" | "primary"))
    }

    /// Polls `check` until it gives a value, a process of the stack exits,
    /// or `timeout` passes; `what` says what did not happen then.
    fn wait_for<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut check: impl FnMut(&HaStore) -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            self.refuse_after_shutdown()?;
            if let Some(v) = check(self)? {
                return Ok(v);
            }
            self.check_children()?;
            if Instant::now() >= deadline {
                let state = match self.cluster_status() {
                    Ok(members) => members
                        .iter()
                        .map(|m| format!("{} {} {}", m.name, m.role, m.state))
                        .collect::<Vec<_>>()
                        .join(", "),
                    Err(_) => String::new(),
                };
                return Err(HaError::Timeout {
                    what: what.to_string(),
                    timeout,
                    state,
                    logs: self.patroni_logs(),
                });
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// An error naming the log of the first Patroni or etcd that exited by
    /// itself.
    fn check_children(&self) -> Result<()> {
        let exited = |child: &mut Option<ChildGuard>| {
            child.as_mut().and_then(|c| c.try_wait().ok().flatten())
        };
        for m in &self.members {
            if let Some(status) = exited(&mut m.child.lock()) {
                let log = m.log_path();
                return Err(HaError::Exited {
                    what: format!("{}'s Patroni", m.name),
                    status,
                    tail: log_tail(&log),
                    log,
                });
            }
        }
        for e in &self.etcd {
            if let Some(status) = exited(&mut e.child.lock()) {
                let log = e.dir.join("etcd.log");
                return Err(HaError::Exited {
                    what: e.name.clone(),
                    status,
                    tail: log_tail(&log),
                    log,
                });
            }
        }
        Ok(())
    }

    /// Creates [`STORE_USER`] and [`STORE_DATABASE`] on the primary. (Each
    /// statement commits only once the synchronous standby has it.)
    fn create_store_database(&self, primary: usize) -> Result<()> {
        let m = &self.members[primary];
        let sql_err = |what: String| move |source| HaError::Sql { what, source };
        let mut client = postgres::Client::connect(
            &format!(
                "host=127.0.0.1 port={} user={SUPERUSER} password={SUPERUSER_PASSWORD} \
                 dbname=postgres connect_timeout={CONNECT_TIMEOUT_SECS}",
                m.postgres_port
            ),
            postgres::NoTls,
        )
        .map_err(sql_err(format!(
            "connecting to {}'s PostgreSQL as {SUPERUSER} (read {})",
            m.name,
            m.log_path().display()
        )))?;
        client
            .batch_execute(&format!(
                // pg_monitor: the nodes read how many synchronous standbys
                // the primary has, for their cluster view.
                "CREATE ROLE {STORE_USER} LOGIN PASSWORD '{STORE_PASSWORD}' IN ROLE pg_monitor"
            ))
            .map_err(sql_err(format!("creating the role {STORE_USER}")))?;
        // CREATE DATABASE refuses to run inside a transaction block, so
        // it is a statement of its own.
        client
            .batch_execute(&format!(
                "CREATE DATABASE {STORE_DATABASE} OWNER {STORE_USER}"
            ))
            .map_err(sql_err(format!("creating the database {STORE_DATABASE}")))
    }

    fn start_haproxy(&self) -> Result<()> {
        let (Some(program), Some(port)) = (&self.programs.haproxy, self.haproxy_port) else {
            return Ok(());
        };
        let path = self.dir.join("haproxy.cfg");
        std::fs::write(&path, haproxy_config(port, &self.members))
            .map_err(io_err(format!("writing {}", path.display())))?;
        let log = self.dir.join("haproxy.log");
        let out = File::create(&log).map_err(io_err(format!("creating {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(io_err(format!("opening {}", log.display())))?;
        let child = ChildGuard::spawn(
            Command::new(program)
                .arg("-f")
                .arg(&path)
                .arg("-db")
                .stdin(Stdio::null())
                .stdout(Stdio::from(out))
                .stderr(Stdio::from(err))
                .process_group(0),
            "haproxy",
        )
        .map_err(io_err(format!("starting {}", program.display())))?;
        *self.haproxy.lock() = Some(child);
        self.wait_routed(HAPROXY_START_TIMEOUT)
    }

    /// Waits up to `timeout` until [`HAPROXY_ROUTED_STREAK`] connections in
    /// a row through HAProxy reach the writable primary: every standby is
    /// out of service. A no-op without HAProxy.
    pub fn wait_routed(&self, timeout: Duration) -> Result<()> {
        let Some(url) = self.store_url_haproxy() else {
            return Ok(());
        };
        let log = self.dir.join("haproxy.log");
        let mut config: postgres::Config = url.parse().map_err(|source| HaError::Sql {
            what: "parsing HAProxy's store URL".into(),
            source,
        })?;
        config.connect_timeout(Duration::from_secs(CONNECT_TIMEOUT_SECS.into()));
        let deadline = Instant::now() + timeout;
        let mut streak = 0;
        loop {
            if let Some(h) = self.haproxy.lock().as_mut()
                && let Ok(Some(status)) = h.try_wait()
            {
                return Err(HaError::Exited {
                    what: "HAProxy".into(),
                    status,
                    tail: log_tail(&log),
                    log,
                });
            }
            let writable = config
                .connect(postgres::NoTls)
                .and_then(|mut c| c.query_one("SELECT pg_is_in_recovery()", &[]))
                .is_ok_and(|row| !row.get::<_, bool>(0));
            if writable {
                streak += 1;
                if streak >= HAPROXY_ROUTED_STREAK {
                    return Ok(());
                }
                continue;
            }
            streak = 0;
            if Instant::now() >= deadline {
                return Err(HaError::Timeout {
                    what: format!(
                        "HAProxy did not route {HAPROXY_ROUTED_STREAK} connections in a row to \
                         the primary"
                    ),
                    timeout,
                    state: String::new(),
                    logs: vec![log],
                });
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for HaStore {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(error = %e, dir = %self.dir.display(), "stopping the HA store");
        }
    }
}

/// The processes [`HaStore::freeze_primary`] stopped; dropping it resumes
/// them, PostgreSQL first, so that Patroni finds it running.
struct Frozen<'a> {
    store: &'a HaStore,
    member: usize,
    patroni: bool,
    postgres: Vec<PidFd>,
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        for p in self.postgres.iter().rev() {
            let _ = p.signal(libc::SIGCONT);
        }
        if self.patroni
            && let Some(patroni) = self.store.members[self.member].child.lock().as_mut()
        {
            let _ = patroni.signal(libc::SIGCONT);
        }
    }
}

/// HAProxy's configuration: one TCP frontend, each member a server that is
/// in service while its Patroni answers `OPTIONS /primary` with 200.
fn haproxy_config(port: u16, members: &[PgMember]) -> String {
    let mut s = format!(
        "# Generated by tally_lab::hastore.
global
    maxconn 1000

defaults
    mode tcp
    # A connection refused by a member (its PostgreSQL just died) fails
    # at once instead of being retried on it after a pause of the connect
    # timeout: the client reconnects, and by then the member is out of
    # service or the primary again.
    timeout connect 1s
    retries 0
    timeout client 1h
    timeout server 1h
    timeout check {REST_TIMEOUT_MS}ms
    # A member that fails two checks leaves service and its sessions are
    # closed, so that clients reconnect to the new primary.
    default-server inter {HAPROXY_CHECK_INTERVAL_MS}ms fall 2 rise 2 on-marked-down shutdown-sessions

listen postgres_primary
    bind 127.0.0.1:{port}
    option httpchk OPTIONS /primary
    http-check expect status 200
",
        REST_TIMEOUT_MS = REST_TIMEOUT.as_millis(),
    );
    for m in members {
        let _ = writeln!(
            s,
            "    server {} 127.0.0.1:{} check port {}",
            m.name, m.postgres_port, m.rest_port
        );
    }
    s
}

fn rest_limits(timeout: Duration) -> http::Limits {
    http::Limits {
        send_timeout: timeout,
        read_timeout: timeout,
        response_bytes_max: REST_RESPONSE_BYTES_MAX,
    }
}

/// Reads `GET /cluster`'s answer.
fn parse_cluster(body: &str) -> Result<Vec<MemberStatus>> {
    let v: Value = serde_json::from_str(body)
        .map_err(|e| HaError::Invalid(format!("Patroni's GET /cluster answer: {e}")))?;
    let text = |m: &Value, k: &str| m[k].as_str().unwrap_or_default().to_string();
    Ok(v["members"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|m| MemberStatus {
            name: text(m, "name"),
            role: text(m, "role"),
            state: text(m, "state"),
            timeline: m["timeline"].as_u64(),
        })
        .collect())
}

fn log_tail(path: &Path) -> String {
    tail_lines(
        &std::fs::read_to_string(path).unwrap_or_default(),
        LOG_TAIL_LINES,
    )
}

/// A process that is not our child, held by a pidfd: signals sent through
/// it reach that process or none, never one that reused its pid.
#[derive(Debug)]
struct PidFd {
    pid: u32,
    fd: OwnedFd,
}

impl PidFd {
    /// `None` if no process has that pid.
    fn open(pid: u32) -> std::io::Result<Option<PidFd>> {
        let raw = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new file
        // descriptor or -1; no memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw, 0) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ESRCH) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        let fd = i32::try_from(fd).map_err(std::io::Error::other)?;
        // SAFETY: the descriptor was just returned to us and is owned by
        // nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Some(PidFd { pid, fd }))
    }

    /// Sends `signal`; `Ok(false)` if the process has exited.
    fn signal(&self, signal: libc::c_int) -> std::io::Result<bool> {
        // SAFETY: a pidfd we own, a signal number, no siginfo, no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            Ok(false)
        } else {
            Err(e)
        }
    }

    fn alive(&self) -> bool {
        self.signal(0).unwrap_or(false)
    }

    /// Waits up to `timeout` for the process to exit (a pidfd becomes
    /// readable then); whether it did.
    fn wait_exit(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd, its count, and a timeout.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        rc > 0 || !self.alive()
    }
}

/// A member's running postmaster.
struct Postmaster {
    process: PidFd,
}

impl Postmaster {
    /// The postmaster `data_dir`'s `postmaster.pid` names, if that process
    /// runs with `data_dir` on its command line (a stale file may name a
    /// pid that another process has since taken). The pidfd is opened
    /// before the command line is read and checked alive after, so the
    /// command line read is that of the process the pidfd holds.
    fn find(data_dir: &Path) -> Option<Postmaster> {
        let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
        let pid: u32 = text.lines().next()?.trim().parse().ok()?;
        let process = PidFd::open(pid).ok()??;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let names_dir = cmdline
            .split(|&b| b == 0)
            .any(|arg| arg == data_dir.as_os_str().as_bytes());
        (names_dir && process.alive()).then_some(Postmaster { process })
    }

    /// The postmaster's children now (backends, walsenders, the
    /// checkpointer, ...), each held by a pidfd and checked, after it was
    /// opened, to be a child of this postmaster still.
    fn children(&self) -> Vec<PidFd> {
        let parent = self.process.pid;
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| parent_of(pid) == Some(parent))
            .filter_map(|pid| {
                let child = PidFd::open(pid).ok()??;
                (parent_of(pid) == Some(parent) && child.alive()).then_some(child)
            })
            .collect()
    }
}

/// The parent pid of `pid`, from `/proc/<pid>/stat` (the field after the
/// state, which follows the command name in parentheses; the name may hold
/// spaces and parentheses, so the last `)` ends it).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// Stops member `m`'s postmaster if it still runs after its Patroni
/// stopped (Patroni was killed, or did not stop it): fast shutdown, then
/// SIGKILL to it and its children.
fn stop_leftover_postgres(m: &PgMember) -> Result<()> {
    let Some(postmaster) = Postmaster::find(&m.data_dir()) else {
        return Ok(());
    };
    let what = format!("stopping {}'s leftover postmaster", m.name);
    postmaster
        .process
        .signal(libc::SIGCONT)
        .and_then(|_| postmaster.process.signal(libc::SIGINT))
        .map_err(io_err(what.clone()))?;
    if postmaster.process.wait_exit(POSTGRES_STOP_TIMEOUT) {
        return Ok(());
    }
    let children = postmaster.children();
    postmaster
        .process
        .signal(libc::SIGKILL)
        .map_err(io_err(what.clone()))?;
    for c in &children {
        let _ = c.signal(libc::SIGKILL);
    }
    if postmaster.process.wait_exit(POSTGRES_STOP_TIMEOUT) {
        Ok(())
    } else {
        Err(HaError::Timeout {
            what: format!("{}'s postmaster did not exit after SIGKILL", m.name),
            timeout: POSTGRES_STOP_TIMEOUT,
            state: String::new(),
            logs: vec![m.log_path()],
        })
    }
}

/// Creates the stack's directory (which must hold no earlier stack), makes
/// it enterable by the unprivileged user, and checks that user can reach
/// it. Returns it absolute.
fn prepare_dir(dir: &Path, run_as: Option<&RunAs>) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let dir = std::fs::canonicalize(dir).map_err(io_err(format!("resolving {}", dir.display())))?;
    if dir.join("etcd1").exists() || dir.join("pg1").exists() {
        return Err(HaError::Invalid(format!(
            "{} already holds an HA store; give an empty directory",
            dir.display()
        )));
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
        .map_err(io_err(format!("chmod 0755 {}", dir.display())))?;
    if let Some(u) = run_as {
        for ancestor in dir.ancestors().skip(1) {
            let mode = std::fs::metadata(ancestor)
                .map_err(io_err(format!("reading {}", ancestor.display())))?
                .permissions()
                .mode();
            if mode & 0o001 == 0 {
                return Err(HaError::Unreachable {
                    user: u.name.clone(),
                    path: ancestor.to_path_buf(),
                    mode: mode & 0o7777,
                });
            }
        }
    }
    Ok(dir)
}

/// etcd, Patroni, HAProxy (if wanted) and the PostgreSQL binaries; the
/// first one missing is an error naming its Debian package.
fn find_programs(haproxy: bool) -> Result<Programs> {
    let need = |program: &'static str, package: &'static str| {
        crate::pgserver::find_in_path(program).ok_or(HaError::Missing { program, package })
    };
    let etcd = need("etcd", "etcd-server")?;
    let patroni = need("patroni", "patroni")?;
    let haproxy = if haproxy {
        Some(need("haproxy", "haproxy")?)
    } else {
        None
    };
    let postgres_bin =
        crate::pgserver::postgres_bin_dir(&POSTGRES_PROGRAMS).ok_or(HaError::Missing {
            program: "postgres",
            package: "postgresql",
        })?;
    Ok(Programs {
        etcd,
        patroni,
        haproxy,
        postgres_bin,
    })
}

fn unprivileged_user() -> Result<RunAs> {
    UNPRIVILEGED_USERS
        .iter()
        .find_map(|&name| {
            crate::pgserver::lookup_user(name).map(|(uid, gid)| RunAs {
                name: name.to_string(),
                uid,
                gid,
            })
        })
        .ok_or(HaError::NoUnprivilegedUser)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A missing program names the Debian package that has it.
    #[test]
    fn missing_programs_name_their_package() {
        let e = HaError::Missing {
            program: "etcd",
            package: "etcd-server",
        }
        .to_string();
        assert!(e.contains("`etcd-server` Debian package"), "{e}");
    }

    // The parent pid is read after the command name, whatever it holds.
    #[test]
    fn parents_are_read_from_proc() {
        let me = std::process::id();
        // SAFETY: getppid has no preconditions and cannot fail.
        let parent = unsafe { libc::getppid() } as u32;
        assert_eq!(parent_of(me), Some(parent));
        assert_eq!(parent_of(u32::MAX), None);
    }

    // A pidfd signals its own process and sees it exit.
    #[test]
    fn pidfds_follow_their_process() {
        let mut child = ChildGuard::spawn(Command::new("sleep").arg("600"), "sleep").unwrap();
        let fd = PidFd::open(child.pid()).unwrap().unwrap();
        assert!(fd.alive());
        assert!(!fd.wait_exit(Duration::from_millis(10)));
        assert!(fd.signal(libc::SIGKILL).unwrap());
        assert!(fd.wait_exit(Duration::from_secs(10)));
        child.wait().unwrap();
        assert!(!fd.signal(0).unwrap());
    }

    // GET /cluster's answer is read member by member.
    #[test]
    fn cluster_answers_are_read() {
        let body = r#"{"members": [
            {"name": "pg1", "role": "leader", "state": "running", "timeline": 3},
            {"name": "pg2", "role": "sync_standby", "state": "streaming", "lag": 0}]}"#;
        let members = parse_cluster(body).unwrap();
        assert_eq!(members.len(), 2);
        assert_eq!(members[0].role, "leader");
        assert_eq!(members[0].timeline, Some(3));
        assert_eq!(members[1].state, "streaming");
        assert_eq!(members[1].timeline, None);
    }
}
