//! Part 6, ha: `replicated` increments on a highly available PostgreSQL
//! store, what synchronous replication costs them, and how long they stop
//! when the store's primary dies.
//!
//! The store is [`tally_lab::hastore`]'s: three etcd members, three
//! Patroni-managed PostgreSQL members in strict synchronous replication (a
//! commit returns once the synchronous standby has it), and HAProxy routing
//! to the primary. Beside it runs one private PostgreSQL server as the
//! replicated part starts it ([`crate::postgres`]).
//!
//! **Increments per second.** The replicated part's drivers
//! ([`crate::replicated`]) on both stores, in the same run, rounds
//! interleaved: a `tally serve --durability replicated` node driven by
//! `redis-benchmark -t incr` (INCR carries no level, so the node's default,
//! `replicated`, applies), and PostgreSQL's own upsert under `pgbench`, on
//! one hot counter and over 1,000. On the HA store both go through HAProxy:
//! the node's store URL is [`HaStore::store_url_haproxy`], and pgbench
//! connects to HAProxy's port as the store's user. The ratio of each HA
//! figure to its single-server figure is the cost of synchronous
//! replication (and of the proxy hop). Every increment is accounted for as
//! in the replicated part.
//!
//! **Failover.** With the stack healthy (every member running, a
//! synchronous standby, HAProxy routing only to the primary), two clients run at once through HAProxy, each one
//! connection making one request at a time and pausing [`RETRY_PAUSE_MS`]
//! after a failure: a tally client sending `TALLY.INCRBY ... DURABILITY
//! replicated` to the node above (each increment with an idempotency key,
//! retried with the same key until acknowledged), and an upsert client
//! running the single-row upsert over a `postgres` connection that it opens
//! again after any error. Once both are acknowledged, the primary's
//! postmaster gets SIGKILL ([`HaStore::kill9_primary_postgres`]); the time
//! of death is taken when the kill returns. Measured from it:
//!
//! - promotion: when [`HaStore::wait_for_new_primary`], which polls every
//!   member's Patroni REST API, first sees another member answer as the
//!   primary: Patroni's promotion as observed from outside;
//! - each client's first failure after the death, when its outage began:
//!   the old primary's backends outlive their postmaster for a moment, so
//!   a request can still succeed on one just after the kill;
//! - each client's first success: the arrival of the reply to its first
//!   success after that failure, the end of its outage (for a client that
//!   never failed, its first success on a request sent after the death).
//!   One request is in flight at a time, so the figure can exceed the
//!   outage by at most one request's latency, never undercut it.
//!
//! The target is tally's first acknowledgement at most
//! [`TARGET_AFTER_PROMOTION_MS`] after the promotion; both that and tally's
//! first acknowledgement after the upsert client's are reported. Under
//! `synchronous_mode_strict` the promoted primary commits only once a
//! standby streams from it again and Patroni names it synchronous, so no
//! client commits at the promotion: the upsert client's first success is
//! when the store takes writes again, and what tally adds to it is tally's
//! own part of the outage. After each kill the
//! clients' counts are checked against the store: no acknowledged
//! increment may be missing after the failover, and none counted twice.
//!
//! Every server is a child of this process, stopped by its pid: the nodes
//! and the private server by their guards, the HA store by
//! [`HaStore::shutdown`]. The client loops are threads.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use tally_lab::hastore::{HaOptions, HaStore, STORE_DATABASE as HA_DATABASE, STORE_PASSWORD};
use tally_lab::hastore::{POSTGRES_MEMBERS_DEFAULT, STORE_USER};
use tally_lab::wire::resp::{Client, Reply};

use crate::postgres;
use crate::replicated::{
    self, Keys, Measured, Node, Notes, PGBENCH_THREADS, Pgbench, PgbenchTarget, STORE_DATABASE,
    UPSERT, fail, integer_or_zero, interleave,
};
use crate::table::{Table, ratio, thousands};
use crate::throughput::verdict;

/// How long the stack may take to have every member running again and a
/// synchronous standby, before a kill (the killed member rejoins by
/// `pg_rewind` or a fresh clone).
const HEALTHY_TIMEOUT_SECS: u64 = 180;
/// How long both failover clients may take to have increments
/// acknowledged before the kill.
const WARMUP_TIMEOUT_SECS: u64 = 30;
/// Increments each failover client must have acknowledged before the
/// kill: the route to the primary is warm and the rate steady.
const WARMUP_ACKS_MIN: u64 = 20;
/// How long Patroni may take to promote another member after the kill.
const PROMOTION_TIMEOUT_SECS: u64 = 60;
/// How long, after the death, each client may take to succeed again
/// before the round is a failure.
const RECOVERY_TIMEOUT_SECS: u64 = 120;
/// A failover client's pause after a failed request or connection.
const RETRY_PAUSE_MS: u64 = 10;
/// How long a failover client waits for one RESP reply (a `replicated`
/// increment waits for its store transaction, which tally bounds to
/// seconds) or one connection.
const RESP_REPLY_TIMEOUT_SECS: u64 = 30;
/// How long one PostgreSQL connection attempt of the upsert client may
/// take, in seconds (libpq's `connect_timeout`).
const POSTGRES_CONNECT_TIMEOUT_SECS: u64 = 5;
/// How long a stopped tally client goes on retrying an increment whose
/// outcome it does not know yet, so that the count can be checked exactly.
const DRAIN_TIMEOUT_SECS: u64 = 10;
/// How long a stopped client thread may take to end; one that takes longer
/// (blocked in a call) is left behind and the round is a failure.
const CLIENT_STOP_TIMEOUT_SECS: u64 = 30;
/// How often the main thread looks at the clients' progress. It only
/// decides when to stop waiting; the clients time their own replies.
const PROGRESS_POLL_MS: u64 = 20;
/// How often the wait for a healthy stack asks Patroni.
const HEALTH_POLL_MS: u64 = 200;
/// Longest error text a client keeps for the report, in characters.
const ERROR_TEXT_CHARS_MAX: usize = 300;
/// The target: tally acknowledges `replicated` increments again at most
/// this long after Patroni's promotion, and at most this long after the
/// store itself commits again (the upsert client's first success).
const TARGET_AFTER_PROMOTION_MS: i64 = 1_000;
/// The upsert client's table, in the HA store's database beside pgbench's
/// `t` and tally's tables.
const FAILOVER_TABLE: &str = "failover";
/// The upsert client's statement: pgbench's upsert, on its own table, one
/// row per round.
const FAILOVER_UPSERT: &str = "INSERT INTO failover(k, v) VALUES ($1, 1) \
     ON CONFLICT (k) DO UPDATE SET v = failover.v + 1";
/// PostgreSQL settings reported for the HA store.
const HA_SETTINGS: [&str; 4] = [
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "synchronous_standby_names",
];

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn millis(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub struct Settings {
    /// Sizes of the increments-per-second runs, the replicated part's.
    pub load: replicated::Settings,
    /// Primary kills; the median of each time is reported.
    pub failovers: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum System {
    TallySingle,
    TallyHa,
    UpsertSingle,
    UpsertHa,
}

impl System {
    const ALL: [System; 4] = [
        System::TallySingle,
        System::TallyHa,
        System::UpsertSingle,
        System::UpsertHa,
    ];

    fn name(self) -> &'static str {
        match self {
            System::TallySingle | System::TallyHa => "tally replicated",
            System::UpsertSingle | System::UpsertHa => "postgres upsert (pgbench)",
        }
    }

    fn store(self) -> &'static str {
        match self {
            System::TallySingle | System::UpsertSingle => "single server",
            System::TallyHa | System::UpsertHa => "HA store, via HAProxy",
        }
    }

    fn label(self) -> String {
        format!("{}, {}", self.name(), self.store())
    }

    /// The single-server system an HA system is compared with.
    fn single(self) -> Option<System> {
        match self {
            System::TallyHa => Some(System::TallySingle),
            System::UpsertHa => Some(System::UpsertSingle),
            _ => None,
        }
    }
}

pub fn run(tally_bin: &Path, work: &Path, s: &Settings) -> (String, bool) {
    let dir = work.join("ha");
    let mut measured = Measured::all(&System::ALL);
    let mut notes = Notes::new();
    let mut failovers = Failovers::default();

    let pg = match postgres::start(work, &dir.join("postgres")) {
        Ok(pg) => {
            match pg.settings() {
                Ok(settings) => notes.lines.push(format!(
                    "single server: PostgreSQL {}, {settings}",
                    pg.version()
                )),
                Err(e) => notes
                    .errors
                    .push(format!("reading the single server's settings: {e:#}")),
            }
            Some(pg)
        }
        Err(e) => {
            let e = format!("{e:#}");
            fail(&mut measured, System::UpsertSingle, &e);
            fail(&mut measured, System::TallySingle, &e);
            None
        }
    };
    eprintln!("ha: starting the HA store (etcd, Patroni, PostgreSQL, HAProxy) ...");
    let store = start_store(work, &dir.join("store"));
    let store = match store {
        Ok(store) => {
            match ha_settings(&store) {
                Ok(settings) => notes.lines.push(format!(
                    "HA store: {POSTGRES_MEMBERS_DEFAULT} PostgreSQL members managed by Patroni \
                     (synchronous_mode_strict), 3 etcd members, HAProxy; {settings}"
                )),
                Err(e) => notes
                    .errors
                    .push(format!("reading the HA store's settings: {e:#}")),
            }
            Some(store)
        }
        Err(e) => {
            let e = format!("{e:#}");
            fail(&mut measured, System::UpsertHa, &e);
            fail(&mut measured, System::TallyHa, &e);
            failovers.error = Some(format!("the HA store did not start: {e}"));
            None
        }
    };

    let mut pgbenches: Vec<(System, Pgbench)> = Vec::new();
    let mut nodes: Vec<(System, Node)> = Vec::new();
    if let Some(pg) = &pg {
        match Pgbench::prepare(pg, &dir.join("pgbench-single"), &s.load) {
            Ok(p) => pgbenches.push((System::UpsertSingle, p)),
            Err(e) => fail(&mut measured, System::UpsertSingle, &format!("{e:#}")),
        }
        match pg
            .create_named_database(STORE_DATABASE)
            .map_err(anyhow::Error::from)
            .and_then(|()| Node::start(tally_bin, &dir, "tally-single", &pg.url(STORE_DATABASE)))
        {
            Ok(n) => nodes.push((System::TallySingle, n)),
            Err(e) => fail(&mut measured, System::TallySingle, &format!("{e:#}")),
        }
    }
    if let Some(store) = &store {
        let program = pg
            .as_ref()
            .map_or_else(|| PathBuf::from("pgbench"), |pg| pg.program("pgbench"));
        match prepare_ha_pgbench(store, program, &dir.join("pgbench-ha"), &s.load) {
            Ok(p) => pgbenches.push((System::UpsertHa, p)),
            Err(e) => fail(&mut measured, System::UpsertHa, &format!("{e:#}")),
        }
        match haproxy_url(store).and_then(|url| Node::start(tally_bin, &dir, "tally-ha", &url)) {
            Ok(n) => nodes.push((System::TallyHa, n)),
            Err(e) => {
                fail(&mut measured, System::TallyHa, &format!("{e:#}"));
                failovers.error = Some(format!("no tally node on the HA store: {e:#}"));
            }
        }
    }

    let systems: Vec<System> = System::ALL
        .into_iter()
        .filter(|&sys| {
            pgbenches.iter().any(|(p, _)| *p == sys) || nodes.iter().any(|(n, _)| *n == sys)
        })
        .collect();
    interleave(
        "ha",
        &systems,
        System::label,
        &mut measured,
        &s.load,
        |system, keys, m| match pgbenches.iter_mut().find(|(p, _)| *p == system) {
            Some((_, p)) => p.run(keys, &s.load, m),
            None => nodes
                .iter_mut()
                .find(|(n, _)| *n == system)
                .expect("only started systems run")
                .1
                .run(keys, &s.load, m),
        },
    );
    // Their connections would only break in the failovers.
    drop(pgbenches);
    for (system, node) in &nodes {
        if let Err(e) = node.verify(*system, &system.label(), &s.load, &mut measured, &mut notes) {
            fail(&mut measured, *system, &format!("{e:#}"));
        }
    }

    if let (Some(store), Some((_, node))) = (
        &store,
        nodes.iter().find(|(sys, _)| *sys == System::TallyHa),
    ) {
        run_failovers(store, node.addr(), s.failovers, &mut failovers);
    }

    for (system, node) in nodes {
        if let Err(e) = node.stop() {
            fail(&mut measured, system, &format!("{e:#}"));
        }
    }
    if let Some(store) = store
        && let Err(e) = store.shutdown()
    {
        notes.errors.push(format!("stopping the HA store: {e}"));
    }
    if let Some(pg) = pg
        && let Err(e) = pg.stop()
    {
        notes.errors.push(format!("stopping postgres: {e:#}"));
    }
    let (load_text, load_ok) = report_load(&measured, &s.load, notes);
    let (failover_text, failover_ok) = report_failovers(&failovers, s.failovers);
    (
        format!("{load_text}\n{failover_text}"),
        load_ok && failover_ok,
    )
}

/// Starts the HA store in `dir`, under the benchmark's directory `work`.
/// As root, etcd and Patroni run as an unprivileged user, who must pass
/// through every directory above `dir`: those within `work` (a temporary
/// directory, mode 0700) are given `o+x`.
fn start_store(work: &Path, dir: &Path) -> Result<HaStore> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        let work = std::fs::canonicalize(work)?;
        let dir = std::fs::canonicalize(dir)?;
        for ancestor in dir.ancestors().skip(1) {
            if !ancestor.starts_with(&work) {
                break;
            }
            let mode = std::fs::metadata(ancestor)?.permissions().mode();
            if mode & 0o001 == 0 {
                std::fs::set_permissions(
                    ancestor,
                    std::fs::Permissions::from_mode((mode | 0o001) & 0o7777),
                )
                .with_context(|| format!("chmod o+x {}", ancestor.display()))?;
            }
        }
    }
    HaStore::start(HaOptions::new(dir)).context("starting the HA store")
}

fn haproxy_url(store: &HaStore) -> Result<String> {
    store
        .store_url_haproxy()
        .context("the HA store runs without HAProxy")
}

/// A connection to the HA store's database through HAProxy.
fn haproxy_config(store: &HaStore) -> Result<::postgres::Config> {
    let mut config: ::postgres::Config = haproxy_url(store)?
        .parse()
        .context("parsing HAProxy's store URL")?;
    config.connect_timeout(secs(POSTGRES_CONNECT_TIMEOUT_SECS));
    Ok(config)
}

/// The settings that decide what a commit costs on the HA store's
/// primary, read through HAProxy, and its synchronous standbys.
fn ha_settings(store: &HaStore) -> Result<String> {
    let mut client = haproxy_config(store)?
        .connect(::postgres::NoTls)
        .context("connecting to the HA store through HAProxy")?;
    let mut out = Vec::new();
    let version: String = client.query_one("SHOW server_version", &[])?.get(0);
    out.push(format!("PostgreSQL {version}"));
    for name in HA_SETTINGS {
        let value: String = client
            .query_one(&format!("SHOW {name}"), &[])
            .with_context(|| format!("SHOW {name}"))?
            .get(0);
        out.push(format!("{name}={value}"));
    }
    let sync = store.sync_standbys().len();
    out.push(format!("{sync} synchronous standby(s) at start"));
    Ok(out.join(", "))
}

/// pgbench on the HA store: its table in the store's database, reached
/// through HAProxy as the store's user.
fn prepare_ha_pgbench(
    store: &HaStore,
    program: PathBuf,
    dir: &Path,
    s: &replicated::Settings,
) -> Result<Pgbench> {
    let port = store
        .haproxy_addr()
        .context("the HA store runs without HAProxy")?
        .port();
    let client = haproxy_config(store)?
        .connect(::postgres::NoTls)
        .context("connecting to the HA store through HAProxy")?;
    let target = PgbenchTarget {
        port,
        user: STORE_USER.to_string(),
        password: Some(STORE_PASSWORD.to_string()),
        database: HA_DATABASE.to_string(),
    };
    Pgbench::prepare_on(program, target, client, dir, s)
}

/// What one failover client saw; shared between its thread and the main
/// thread, which sets the death.
///
/// A client's outage need not begin at the kill: the old primary's
/// backends outlive their postmaster for a moment, and a request can
/// still succeed on one just after the kill. So a client has
/// recovered at its first success after its first failure following the
/// death; one that never failed, at its first success after the death.
#[derive(Debug, Default)]
struct Progress {
    /// When the primary was killed; `None` before.
    death: Option<Instant>,
    /// Requests acknowledged, over the whole round.
    acknowledged: u64,
    /// Failed requests and connection attempts, over the whole round.
    errors: u64,
    /// Of those, the ones after the death.
    errors_after_death: u64,
    /// When the first failure after the death came: the client's outage
    /// began.
    first_failure_after_death: Option<Instant>,
    /// When the reply to the first success after that failure arrived: the
    /// outage ended.
    first_success_after_failure: Option<Instant>,
    /// When the reply to the first request sent after the death that
    /// succeeded arrived.
    first_success_after_death: Option<Instant>,
    /// When the last request that succeeded was sent.
    last_success_sent: Option<Instant>,
    /// Requests that may or may not have been applied: sent, and answered
    /// with an error or not at all, and never retried to a known outcome.
    open: u64,
    last_error: Option<String>,
}

impl Progress {
    fn succeeded(&mut self, sent: Instant, answered: Instant) {
        self.acknowledged += 1;
        self.last_success_sent = Some(sent);
        let Some(death) = self.death else {
            return;
        };
        if sent >= death && self.first_success_after_death.is_none() {
            self.first_success_after_death = Some(answered);
        }
        if self.first_failure_after_death.is_some() && self.first_success_after_failure.is_none() {
            self.first_success_after_failure = Some(answered);
        }
    }

    fn failed(&mut self, error: &str) {
        self.errors += 1;
        if self.death.is_some() {
            self.errors_after_death += 1;
            self.first_failure_after_death
                .get_or_insert_with(Instant::now);
        }
        self.last_error = Some(error.chars().take(ERROR_TEXT_CHARS_MAX).collect());
    }

    /// When the client succeeded again after the death, once that is
    /// known: the end of its outage; or, for a client that has not failed
    /// since the death and has since succeeded with a request sent after
    /// the promotion was seen (`promoted`), its first success after the
    /// death.
    fn recovered(&self, promoted: Instant) -> Option<Instant> {
        match self.first_failure_after_death {
            Some(_) => self.first_success_after_failure,
            None => self
                .last_success_sent
                .filter(|&sent| sent >= promoted)
                .and(self.first_success_after_death),
        }
    }
}

/// One failover client: its progress, its stop flag, and the channel its
/// thread signals on when it ends.
struct ClientHandle {
    name: &'static str,
    progress: Arc<Mutex<Progress>>,
    stop: Arc<AtomicBool>,
    done: mpsc::Receiver<()>,
}

impl ClientHandle {
    fn spawn(
        name: &'static str,
        body: impl FnOnce(&Mutex<Progress>, &AtomicBool) + Send + 'static,
    ) -> Result<ClientHandle> {
        let progress = Arc::new(Mutex::new(Progress::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, done) = mpsc::channel();
        let (p, st) = (Arc::clone(&progress), Arc::clone(&stop));
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                body(&p, &st);
                let _ = tx.send(());
            })
            .with_context(|| format!("starting the {name} thread"))?;
        Ok(ClientHandle {
            name,
            progress,
            stop,
            done,
        })
    }

    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the thread to stop and waits for it, up to
    /// [`CLIENT_STOP_TIMEOUT_SECS`].
    fn stop(&self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.done.recv_timeout(secs(CLIENT_STOP_TIMEOUT_SECS)) {
            Ok(()) => Ok(()),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bail!("the {} thread panicked", self.name)
            }
            Err(mpsc::RecvTimeoutError::Timeout) => bail!(
                "the {} thread did not stop within {CLIENT_STOP_TIMEOUT_SECS} s",
                self.name
            ),
        }
    }
}

/// The tally client's counter in round `round`.
fn failover_counter(round: u32) -> String {
    format!("ha:failover:{round}")
}

/// One RESP connection to the node, one `replicated` increment at a time.
/// Each increment has an idempotency key and is retried with it until it
/// is acknowledged (as applied or as a duplicate of an earlier attempt
/// that was), so that every key counts exactly once.
fn tally_client(addr: SocketAddr, round: u32, progress: &Mutex<Progress>, stop: &AtomicBool) {
    let counter = failover_counter(round);
    let lock = || progress.lock().unwrap_or_else(|e| e.into_inner());
    let mut client: Option<Client> = None;
    // The key of the increment under way, whose outcome is not known.
    let mut pending: Option<String> = None;
    let mut sequence = 0u64;
    let mut drain_deadline = None;
    loop {
        if stop.load(Ordering::Relaxed) {
            if pending.is_none() {
                break;
            }
            let deadline =
                *drain_deadline.get_or_insert_with(|| Instant::now() + secs(DRAIN_TIMEOUT_SECS));
            if Instant::now() >= deadline {
                break;
            }
        }
        let c = match &mut client {
            Some(c) => c,
            None => match Client::connect_with_timeout(addr, secs(RESP_REPLY_TIMEOUT_SECS)) {
                Ok(c) => client.insert(c),
                Err(e) => {
                    lock().failed(&e.to_string());
                    std::thread::sleep(millis(RETRY_PAUSE_MS));
                    continue;
                }
            },
        };
        let key = pending
            .get_or_insert_with(|| {
                sequence += 1;
                format!("ha-failover-{round}-{sequence}")
            })
            .clone();
        let sent = Instant::now();
        let reply = c.command(&[
            "TALLY.INCRBY",
            &counter,
            "1",
            "IDEMPOTENCY",
            &key,
            "DURABILITY",
            "replicated",
        ]);
        let answered = Instant::now();
        match reply {
            Ok(Reply::Array(Some(items)))
                if items.len() == 2 && items.iter().all(|i| matches!(i, Reply::Integer(_))) =>
            {
                pending = None;
                lock().succeeded(sent, answered);
            }
            Ok(Reply::Error(e)) => {
                lock().failed(&e);
                std::thread::sleep(millis(RETRY_PAUSE_MS));
            }
            Ok(other) => {
                lock().failed(&format!("unexpected reply {other:?}"));
                std::thread::sleep(millis(RETRY_PAUSE_MS));
            }
            Err(e) => {
                // A timed-out or broken connection cannot be read from
                // again: a late reply would answer the wrong request.
                client = None;
                lock().failed(&e.to_string());
                std::thread::sleep(millis(RETRY_PAUSE_MS));
            }
        }
    }
    lock().open = u64::from(pending.is_some());
}

/// One `postgres` connection through HAProxy, one single-row upsert at a
/// time (autocommit); after an error the connection is dropped and opened
/// again.
fn upsert_client(
    config: ::postgres::Config,
    round: u32,
    progress: &Mutex<Progress>,
    stop: &AtomicBool,
) {
    let lock = || progress.lock().unwrap_or_else(|e| e.into_inner());
    let k = i32::try_from(round).unwrap_or(i32::MAX);
    let mut connection: Option<(::postgres::Client, ::postgres::Statement)> = None;
    while !stop.load(Ordering::Relaxed) {
        let (client, statement) = match &mut connection {
            Some(c) => c,
            None => {
                let opened = config.connect(::postgres::NoTls).and_then(|mut c| {
                    let statement = c.prepare(FAILOVER_UPSERT)?;
                    Ok((c, statement))
                });
                match opened {
                    Ok(c) => connection.insert(c),
                    Err(e) => {
                        lock().failed(&format!("{e:#}"));
                        std::thread::sleep(millis(RETRY_PAUSE_MS));
                        continue;
                    }
                }
            }
        };
        let sent = Instant::now();
        let result = client.execute(&*statement, &[&k]);
        let answered = Instant::now();
        match result {
            Ok(1) => lock().succeeded(sent, answered),
            Ok(n) => {
                lock().failed(&format!("the upsert touched {n} rows"));
                std::thread::sleep(millis(RETRY_PAUSE_MS));
            }
            Err(e) => {
                // The statement was sent: it may have committed.
                connection = None;
                let mut p = lock();
                p.open += 1;
                p.failed(&format!("{e:#}"));
                drop(p);
                std::thread::sleep(millis(RETRY_PAUSE_MS));
            }
        }
    }
}

/// One kill of the primary, as measured.
struct Failover {
    killed: String,
    promoted: String,
    promotion: Duration,
    /// The tally client's first failure after the death, if it failed.
    tally_failure: Option<Duration>,
    /// The tally client's recovery (see [`Progress::recovered`]).
    tally_first: Duration,
    upsert_failure: Option<Duration>,
    upsert_first: Duration,
    tally_errors: u64,
    upsert_errors: u64,
}

impl Failover {
    /// tally's first acknowledgement after the promotion, in ms (negative
    /// if it came before the promotion was seen).
    fn tally_after_promotion_ms(&self) -> i64 {
        self.tally_first.as_millis() as i64 - self.promotion.as_millis() as i64
    }

    /// tally's first acknowledgement after the upsert client's first
    /// success, in ms: what tally adds to the store's own outage for
    /// writes through the same route (negative if it came first).
    fn tally_after_upsert_ms(&self) -> i64 {
        self.tally_first.as_millis() as i64 - self.upsert_first.as_millis() as i64
    }
}

#[derive(Default)]
struct Failovers {
    rounds: Vec<Failover>,
    /// What each round's clients acknowledged and what the store holds.
    accounting: Vec<String>,
    error: Option<String>,
}

/// Kills the primary `count` times with both clients running; stops at
/// the first round that fails.
fn run_failovers(store: &HaStore, node: SocketAddr, count: u32, out: &mut Failovers) {
    let setup = haproxy_config(store).and_then(|config| {
        config
            .connect(::postgres::NoTls)?
            .batch_execute(&format!(
                "CREATE TABLE {FAILOVER_TABLE} (k integer PRIMARY KEY, v bigint NOT NULL)"
            ))
            .context("creating the upsert client's table")?;
        Ok(config)
    });
    let config = match setup {
        Ok(c) => c,
        Err(e) => {
            out.error = Some(format!("{e:#}"));
            return;
        }
    };
    for round in 1..=count {
        eprintln!("ha: failover {round}/{count}: waiting for a healthy store ...");
        match failover_round(store, node, &config, round) {
            Ok((f, accounting)) => {
                eprintln!(
                    "ha: failover {round}/{count}: promotion {} ms, tally {} ms, upsert {} ms",
                    f.promotion.as_millis(),
                    f.tally_first.as_millis(),
                    f.upsert_first.as_millis()
                );
                out.rounds.push(f);
                out.accounting.push(accounting);
            }
            Err(e) => {
                out.error = Some(format!("round {round}: {e:#}"));
                return;
            }
        }
    }
}

fn failover_round(
    store: &HaStore,
    node: SocketAddr,
    config: &::postgres::Config,
    round: u32,
) -> Result<(Failover, String)> {
    wait_healthy(store, secs(HEALTHY_TIMEOUT_SECS))?;
    let tally = ClientHandle::spawn("tally client", move |p, stop| {
        tally_client(node, round, p, stop)
    })?;
    let upsert_config = config.clone();
    let upsert = match ClientHandle::spawn("upsert client", move |p, stop| {
        upsert_client(upsert_config, round, p, stop)
    }) {
        Ok(u) => u,
        Err(e) => {
            let _ = tally.stop();
            return Err(e);
        }
    };
    let clients = [&tally, &upsert];
    let measured = kill_and_measure(store, &clients);
    let stopped: Vec<Result<()>> = clients.iter().map(|c| c.stop()).collect();
    let Measurement {
        killed,
        promoted,
        death,
        promoted_at,
    } = measured?;
    for s in stopped {
        s?;
    }
    let first = |c: &ClientHandle| -> Result<Duration> {
        c.progress()
            .recovered(promoted_at)
            .map(|t| t.duration_since(death))
            .with_context(|| format!("the {} never succeeded after the kill", c.name))
    };
    let failure = |c: &ClientHandle| {
        c.progress()
            .first_failure_after_death
            .map(|t| t.duration_since(death))
    };
    let failover = Failover {
        killed: store.member_name(killed)?.to_string(),
        promoted: store.member_name(promoted)?.to_string(),
        promotion: promoted_at.duration_since(death),
        tally_failure: failure(&tally),
        tally_first: first(&tally)?,
        upsert_failure: failure(&upsert),
        upsert_first: first(&upsert)?,
        tally_errors: tally.progress().errors_after_death,
        upsert_errors: upsert.progress().errors_after_death,
    };
    let accounting = account(store, node, config, round, &tally, &upsert)?;
    Ok((failover, accounting))
}

/// What the main thread saw of one kill.
struct Measurement {
    killed: usize,
    promoted: usize,
    /// When the kill returned.
    death: Instant,
    /// When another member was first seen as the primary.
    promoted_at: Instant,
}

/// Waits for both clients to warm up, kills the primary, waits for the
/// promotion and for both clients to succeed again.
fn kill_and_measure(store: &HaStore, clients: &[&ClientHandle]) -> Result<Measurement> {
    let deadline = Instant::now() + secs(WARMUP_TIMEOUT_SECS);
    while clients
        .iter()
        .any(|c| c.progress().acknowledged < WARMUP_ACKS_MIN)
    {
        if Instant::now() >= deadline {
            let states: Vec<String> = clients
                .iter()
                .map(|c| {
                    let p = c.progress();
                    format!(
                        "{}: {} acknowledged, last error {:?}",
                        c.name, p.acknowledged, p.last_error
                    )
                })
                .collect();
            bail!(
                "the clients did not have {WARMUP_ACKS_MIN} increments acknowledged each within \
                 {WARMUP_TIMEOUT_SECS} s before the kill ({})",
                states.join("; ")
            );
        }
        std::thread::sleep(millis(PROGRESS_POLL_MS));
    }
    eprintln!("ha: killing the primary's postmaster ...");
    let killed = store
        .kill9_primary_postgres()
        .context("killing the primary")?;
    let death = Instant::now();
    for c in clients {
        c.progress().death = Some(death);
    }
    let promoted = store
        .wait_for_new_primary(killed.member, secs(PROMOTION_TIMEOUT_SECS))
        .context("waiting for Patroni's promotion")?;
    let promoted_at = Instant::now();
    let deadline = death + secs(RECOVERY_TIMEOUT_SECS);
    while clients
        .iter()
        .any(|c| c.progress().recovered(promoted_at).is_none())
    {
        if Instant::now() >= deadline {
            let states: Vec<String> = clients
                .iter()
                .filter(|c| c.progress().recovered(promoted_at).is_none())
                .map(|c| format!("{}: last error {:?}", c.name, c.progress().last_error))
                .collect();
            bail!(
                "not every client succeeded within {RECOVERY_TIMEOUT_SECS} s of the kill ({})",
                states.join("; ")
            );
        }
        std::thread::sleep(millis(PROGRESS_POLL_MS));
    }
    Ok(Measurement {
        killed: killed.member,
        promoted,
        death,
        promoted_at,
    })
}

/// Waits until every PostgreSQL member runs, one is the leader and one a
/// synchronous standby (Patroni's view), and the primary answers with a
/// synchronous standby (the members' own).
fn wait_healthy(store: &HaStore, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match store.cluster_status() {
            Ok(members) => {
                let running = members
                    .iter()
                    .filter(|m| m.state == "running" || m.state == "streaming")
                    .count();
                let leaders = members.iter().filter(|m| m.role == "leader").count();
                let syncs = members.iter().filter(|m| m.role == "sync_standby").count();
                if members.len() == store.postgres_members()
                    && running == members.len()
                    && leaders == 1
                    && syncs >= 1
                {
                    store.wait_for_sync(deadline.saturating_duration_since(Instant::now()))?;
                    store.wait_routed(deadline.saturating_duration_since(Instant::now()))?;
                    return Ok(());
                }
                members
                    .iter()
                    .map(|m| format!("{} {} {}", m.name, m.role, m.state))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            bail!(
                "the HA store was not healthy (every member running, a synchronous standby) \
                 within {} s; last seen: {last}",
                timeout.as_secs()
            );
        }
        std::thread::sleep(millis(HEALTH_POLL_MS));
    }
}

/// Checks what each client was told against what the store holds: the
/// tally counter (through the node and from the store's rows) and the
/// upsert client's row. Returns a line for the report.
fn account(
    store: &HaStore,
    node: SocketAddr,
    config: &::postgres::Config,
    round: u32,
    tally: &ClientHandle,
    upsert: &ClientHandle,
) -> Result<String> {
    let counter = failover_counter(round);
    let (tally_acked, tally_open) = {
        let p = tally.progress();
        (p.acknowledged, p.open)
    };
    let (upsert_acked, upsert_open) = {
        let p = upsert.progress();
        (p.acknowledged, p.open)
    };
    let read = integer_or_zero(
        Client::connect(node)
            .and_then(|mut c| c.command(&["GET", &counter]))
            .context("reading the failover counter back through RESP")?,
    )?;
    let stored: i64 = tally::store::open(&haproxy_url(store)?)
        .context("opening the HA store")?
        .read_counter(&counter)
        .with_context(|| format!("reading {counter} from the HA store"))?
        .iter()
        .map(|r| r.value)
        .sum();
    let row: i64 = config
        .connect(::postgres::NoTls)
        .and_then(|mut c| {
            c.query_opt(
                &format!("SELECT v FROM {FAILOVER_TABLE} WHERE k = $1"),
                &[&i32::try_from(round).unwrap_or(i32::MAX)],
            )
        })
        .context("reading the upsert client's row")?
        .map_or(0, |r| r.get(0));
    let within =
        |found: i64, acked: u64, open: u64| found >= acked as i64 && found <= (acked + open) as i64;
    let line = format!(
        "failover {round}: tally acknowledged {} replicated increments ({tally_open} left \
         unknown), read back {}, the HA store's rows hold {}; the upsert client was \
         acknowledged {} upserts ({upsert_open} failed after sending), its row holds {}",
        thousands(tally_acked),
        thousands(read),
        stored,
        thousands(upsert_acked),
        row
    );
    if !within(read as i64, tally_acked, tally_open)
        || !within(stored, tally_acked, tally_open)
        || !within(row, upsert_acked, upsert_open)
    {
        bail!("increments were lost or counted twice across the failover: {line}");
    }
    Ok(line)
}

/// The median of `values` (the upper one of an even count).
fn median(mut values: Vec<i64>) -> Option<i64> {
    values.sort_unstable();
    values.get(values.len() / 2).copied()
}

fn report_load(
    measured: &[Measured<System>],
    s: &replicated::Settings,
    notes: Notes,
) -> (String, bool) {
    let mut out = format!(
        "### HA store: replicated increments on the HA store against a single server, \
         {} clients, tally `redis-benchmark -t incr -n {}` and PostgreSQL's upsert \
         `pgbench -T {}` (median of {} rounds, systems interleaved)\n\n",
        s.clients,
        thousands(s.requests),
        s.pgbench_seconds,
        s.rounds
    );
    let rate = |system, keys| {
        measured
            .iter()
            .find(|m| m.system == system && m.keys == keys)
            .and_then(Measured::ok)
            .map(|r| r.requests_per_s)
    };
    let mut table = Table::new(&[
        "system",
        "store",
        "counters",
        "requests/s",
        "p50 ms",
        "p99 ms",
        "HA / single server",
        "acknowledged",
        "counted",
    ]);
    let mut errors = notes.errors;
    for keys in Keys::ALL {
        for system in System::ALL {
            let m = measured
                .iter()
                .find(|m| m.system == system && m.keys == keys)
                .expect("every pair is measured");
            let counted = m.counted.map_or("n/a".into(), thousands);
            match (&m.error, m.median()) {
                (None, Some(r)) => table.row(vec![
                    system.name().into(),
                    system.store().into(),
                    keys.counters(s),
                    thousands(r.requests_per_s.round() as u64),
                    format!("{:.3}", r.p50_ms),
                    format!("{:.3}", r.p99_ms),
                    system
                        .single()
                        .and_then(|single| rate(single, keys))
                        .map_or(String::new(), |b| ratio(r.requests_per_s, b)),
                    thousands(m.acknowledged),
                    counted,
                ]),
                (error, _) => {
                    table.row(vec![
                        system.name().into(),
                        system.store().into(),
                        keys.counters(s),
                        "failed".into(),
                        "".into(),
                        "".into(),
                        "".into(),
                        thousands(m.acknowledged),
                        counted,
                    ]);
                    let e = error.as_deref().unwrap_or("no run completed");
                    errors.push(format!("{} ({keys:?}): {e}", system.label()));
                }
            }
        }
    }
    out.push_str(&table.render());
    out.push('\n');
    out.push_str(&format!(
        "Both stores serve both sides. tally: one `tally serve --durability replicated` node \
         per store (on the HA store, its store URL is HAProxy's); each INCR is acknowledged \
         after the store transaction that holds it commits, on the HA store once the \
         synchronous standby has it. postgres: `{UPSERT}` under `pgbench -n -M prepared -c {} \
         -j {}`, on the HA store through HAProxy as the store's user. HA / single server: the \
         HA figure over the same system's on the single server, the cost of synchronous \
         replication and the proxy hop. acknowledged and counted as in the replicated part.\n\n",
        s.clients,
        PGBENCH_THREADS.min(s.clients),
    ));
    for n in &notes.lines {
        out.push_str(&format!("- {n}\n"));
    }
    for keys in Keys::ALL {
        let cost = |system: System| {
            let single = system.single().expect("an HA system");
            match (rate(system, keys), rate(single, keys)) {
                (Some(h), Some(b)) => ratio(h, b),
                _ => "n/a".into(),
            }
        };
        out.push_str(&format!(
            "- synchronous replication, {}: tally replicated on the HA store at {} of the \
             single server; postgres upsert at {}\n",
            keys.describe(s),
            cost(System::TallyHa),
            cost(System::UpsertHa),
        ));
    }
    for e in &errors {
        out.push_str(&format!("- error: {e}\n"));
    }
    (out, errors.is_empty())
}

fn report_failovers(f: &Failovers, asked: u32) -> (String, bool) {
    let mut out = format!(
        "### HA store failover: `kill -9` of the primary's postmaster under a steady stream \
         of increments ({} of {asked} rounds, median last)\n\n",
        f.rounds.len()
    );
    let ms = |d: Duration| d.as_millis() as i64;
    let or_none = |d: Option<Duration>| d.map_or("none".into(), |d| ms(d).to_string());
    let mut table = Table::new(&[
        "round",
        "primary",
        "promotion ms",
        "tally first failure ms",
        "tally first replicated ack ms",
        "upsert first failure ms",
        "upsert client first success ms",
        "tally - promotion ms",
        "tally - upsert ms",
        "tally errors",
        "upsert errors",
    ]);
    for (i, r) in f.rounds.iter().enumerate() {
        table.row(vec![
            (i + 1).to_string(),
            format!("{} -> {}", r.killed, r.promoted),
            ms(r.promotion).to_string(),
            or_none(r.tally_failure),
            ms(r.tally_first).to_string(),
            or_none(r.upsert_failure),
            ms(r.upsert_first).to_string(),
            r.tally_after_promotion_ms().to_string(),
            r.tally_after_upsert_ms().to_string(),
            thousands(r.tally_errors),
            thousands(r.upsert_errors),
        ]);
    }
    let column = |get: &dyn Fn(&Failover) -> i64| median(f.rounds.iter().map(get).collect());
    let promotion = column(&|r| ms(r.promotion));
    let tally = column(&|r| ms(r.tally_first));
    let upsert = column(&|r| ms(r.upsert_first));
    let after = column(&|r| r.tally_after_promotion_ms());
    let over_upsert = column(&|r| r.tally_after_upsert_ms());
    let show = |v: Option<i64>| v.map_or("n/a".into(), |v| v.to_string());
    if !f.rounds.is_empty() {
        table.row(vec![
            "median".into(),
            String::new(),
            show(promotion),
            String::new(),
            show(tally),
            String::new(),
            show(upsert),
            show(after),
            show(over_upsert),
            String::new(),
            String::new(),
        ]);
    }
    out.push_str(&table.render());
    out.push('\n');
    out.push_str(&format!(
        "Times in ms from the kill (taken when `kill` returned). promotion: when \
         `HaStore::wait_for_new_primary`, polling each member's Patroni REST API, first saw \
         another member answer as the primary. tally: `TALLY.INCRBY ... DURABILITY replicated` \
         with an idempotency key, one at a time on one RESP connection to a node whose store URL \
         is HAProxy's; upsert client: the single-row upsert, one at a time (autocommit) on one \
         `postgres` connection through HAProxy, opened again after an error. Both pause \
         {RETRY_PAUSE_MS} ms after a failure. first failure: a client's first failed request or \
         connection after the kill (the old primary's backends outlive their postmaster for a \
         moment, so a request can still succeed just after the kill). first success: the \
         reply to the first success after that failure, the end of the client's outage (for a \
         client that never failed, its first success after the kill). errors: failed requests \
         and connection attempts after the kill. The promoted primary commits only once a \
         standby streams from it again and Patroni names it synchronous \
         (`synchronous_mode_strict`), so the upsert client's first success, not the \
         promotion, is when the store takes writes again.\n\n"
    ));
    for line in &f.accounting {
        out.push_str(&format!("- {line}\n"));
    }
    let mut ok = true;
    if let Some(after) = after {
        let met = f
            .rounds
            .iter()
            .filter(|r| r.tally_after_promotion_ms() <= TARGET_AFTER_PROMOTION_MS)
            .count();
        out.push_str(&format!(
            "- target: tally unavailable for replicated no longer than the promotion plus \
             {TARGET_AFTER_PROMOTION_MS} ms: {} (median {after} ms after the promotion; met in \
             {met} of {} rounds)\n",
            verdict(after <= TARGET_AFTER_PROMOTION_MS),
            f.rounds.len()
        ));
    }
    if let Some(over) = over_upsert {
        let met = f
            .rounds
            .iter()
            .filter(|r| r.tally_after_upsert_ms() <= TARGET_AFTER_PROMOTION_MS)
            .count();
        out.push_str(&format!(
            "- target: tally unavailable for replicated no longer than the store itself takes \
             no writes (the upsert client's outage through the same route) plus \
             {TARGET_AFTER_PROMOTION_MS} ms: {} (median {over} ms after the upsert client; met \
             in {met} of {} rounds)\n",
            verdict(over <= TARGET_AFTER_PROMOTION_MS),
            f.rounds.len()
        ));
    }
    if let Some(e) = &f.error {
        out.push_str(&format!("- error: {e}\n"));
        ok = false;
    }
    (out, ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A client recovers at its first success after its first failure
    // since the death; successes before that failure (the old primary's
    // surviving backends) do not end an outage that has not begun.
    #[test]
    fn recovery_is_the_first_success_after_a_failure_since_the_death() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let promoted = at(1_000);
        let mut p = Progress::default();
        p.succeeded(at(0), at(1));
        p.failed("before the death");
        p.death = Some(at(10));
        p.succeeded(at(9), at(12));
        assert_eq!(p.first_success_after_death, None);
        p.succeeded(at(20), at(30));
        assert_eq!(p.first_success_after_death, Some(at(30)));
        assert_eq!(
            p.recovered(promoted),
            None,
            "no failure yet, nothing after the promotion"
        );
        p.failed("refused");
        assert_eq!(p.recovered(promoted), None);
        p.succeeded(at(1_500), at(1_510));
        p.succeeded(at(1_520), at(1_530));
        assert_eq!(p.recovered(promoted), Some(at(1_510)));
        assert_eq!((p.acknowledged, p.errors, p.errors_after_death), (5, 2, 1));
    }

    // A client that never failed after the death recovered at its first
    // success after it, once it has succeeded after the promotion too.
    #[test]
    fn an_uninterrupted_client_recovers_at_its_first_success() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let mut p = Progress {
            death: Some(at(10)),
            ..Progress::default()
        };
        p.succeeded(at(20), at(25));
        assert_eq!(p.recovered(at(100)), None);
        p.succeeded(at(120), at(125));
        assert_eq!(p.recovered(at(100)), Some(at(25)));
    }

    #[test]
    fn median_takes_the_middle_value() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3]), Some(3));
        assert_eq!(median(vec![5, -1, 2]), Some(2));
        assert_eq!(median(vec![4, 1, 3, 2]), Some(3));
    }
}
