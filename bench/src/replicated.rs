//! Part 5, replicated: increments acknowledged only once the shared store
//! has committed them, from 50 concurrent clients, against the peer a
//! developer would otherwise use for durable counters: a PostgreSQL row per
//! counter, upserted.
//!
//! One private PostgreSQL server (default durability settings, see
//! [`crate::postgres`]) serves both sides in the same run:
//!
//! - PostgreSQL's own upsert, `INSERT INTO t(k, v) VALUES ($1, 1) ON
//!   CONFLICT (k) DO UPDATE SET v = t.v + 1`, driven by `pgbench` with a
//!   script file, on one hot row and on rows picked at random among 1,000;
//! - a `tally serve --durability replicated` node whose store is a database
//!   on that server, driven by `redis-benchmark -t incr` (INCR carries no
//!   level, so the node's default, `replicated`, applies) on one hot counter
//!   and with `-r 1,000`;
//! - the same with a node whose store is a SQLite file.
//!
//! Each round visits the systems in turn, starting one further along each
//! round, so that a change in background load touches all of them alike.
//! Afterwards every increment is accounted for: pgbench's rows must sum to
//! the transactions it reports (checked after each run), and each node's
//! counters, read back through RESP `GET` and `MGET`, and its rows in the
//! store must equal the INCRs redis-benchmark sent.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use tally_lab::process::{ChildGuard, READY_TIMEOUT, run_with_timeout};
use tally_lab::wire::resp::{Client, Reply};

use crate::parse::{self, PgbenchSummary};
use crate::postgres::{self, PgServer, SUPERUSER};
use crate::process;
use crate::table::{Table, ratio, thousands};
use crate::throughput::{BENCHMARK_KEY, fsync_latency, redis_benchmark, verdict};
use crate::writer::counter_name;

/// pgbench gets this long beyond its `-T` to connect and finish.
const PGBENCH_GRACE: Duration = Duration::from_secs(120);
/// pgbench threads (`-j`): one per core of the machine the brief names.
pub(crate) const PGBENCH_THREADS: u32 = 2;
/// The database of PostgreSQL's own upsert table.
const UPSERT_DATABASE: &str = "upsert";
/// The database that holds the tally node's store.
pub(crate) const STORE_DATABASE: &str = "tally_store";
/// "Many times PostgreSQL's single-row upsert rate" is read as at least
/// this many times.
const MANY_TIMES_RATIO: f64 = 5.0;
/// The durable-throughput targets for `replicated` with a PostgreSQL
/// store: one hot counter against PostgreSQL's hot-row upsert, and spread
/// over the counters against its upsert over as many rows.
const HOT_TARGET_RATIO: f64 = 15.0;
const SPREAD_TARGET_RATIO: f64 = 2.0;
/// The upsert, exactly as the brief states it.
pub(crate) const UPSERT: &str =
    "INSERT INTO t(k, v) VALUES (:k, 1) ON CONFLICT (k) DO UPDATE SET v = t.v + 1;";

pub struct Settings {
    /// INCRs per redis-benchmark run (`-n`).
    pub requests: u64,
    /// Concurrent clients on every system (`-c`).
    pub clients: u32,
    /// Length of each pgbench run (`-T`), in seconds.
    pub pgbench_seconds: u32,
    /// Counters (rows) in the spread runs (`-r`, `random(1, N)`).
    pub counters: u32,
    /// Times each system is run; the median is reported.
    pub rounds: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum System {
    PostgresUpsert,
    TallyPostgres,
    TallySqlite,
}

impl System {
    const ALL: [System; 3] = [
        System::PostgresUpsert,
        System::TallyPostgres,
        System::TallySqlite,
    ];

    fn label(self) -> &'static str {
        match self {
            System::PostgresUpsert => "postgres upsert (pgbench, one row per counter)",
            System::TallyPostgres => "tally replicated, PostgreSQL store",
            System::TallySqlite => "tally replicated, SQLite store",
        }
    }
}

/// One hot counter, or increments spread at random over many.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Keys {
    Hot,
    Spread,
}

impl Keys {
    pub(crate) const ALL: [Keys; 2] = [Keys::Hot, Keys::Spread];

    /// What a progress line calls the pattern.
    pub(crate) fn describe(self, s: &Settings) -> String {
        match self {
            Keys::Hot => "one hot counter".to_string(),
            Keys::Spread => format!("{} counters", thousands(s.counters.into())),
        }
    }

    /// What the table's counters column says.
    pub(crate) fn counters(self, s: &Settings) -> String {
        match self {
            Keys::Hot => "1".to_string(),
            Keys::Spread => thousands(s.counters.into()),
        }
    }
}

/// One run's figures.
pub(crate) struct Run {
    pub(crate) requests_per_s: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
}

/// Every run of one system (of this part's, or another part's that reuses
/// these drivers) on one key pattern.
pub(crate) struct Measured<S> {
    pub(crate) system: S,
    pub(crate) keys: Keys,
    pub(crate) runs: Vec<Run>,
    /// Increments the clients were told succeeded, over every run.
    pub(crate) acknowledged: u64,
    /// Increments found afterwards (pgbench: after each run), if read.
    pub(crate) counted: Option<u64>,
    pub(crate) error: Option<String>,
}

impl<S: Copy> Measured<S> {
    /// One empty entry per system and key pattern, systems first.
    pub(crate) fn all(systems: &[S]) -> Vec<Measured<S>> {
        systems
            .iter()
            .flat_map(|&system| {
                Keys::ALL.iter().map(move |&keys| Measured {
                    system,
                    keys,
                    runs: Vec::new(),
                    acknowledged: 0,
                    counted: None,
                    error: None,
                })
            })
            .collect()
    }
}

impl<S> Measured<S> {
    /// The run with the median rate, so that its latencies belong to the
    /// same run as its rate.
    pub(crate) fn median(&self) -> Option<&Run> {
        let mut runs: Vec<&Run> = self.runs.iter().collect();
        runs.sort_by(|a, b| a.requests_per_s.total_cmp(&b.requests_per_s));
        runs.get(runs.len() / 2).copied()
    }

    pub(crate) fn ok(&self) -> Option<&Run> {
        self.error.is_none().then(|| self.median()).flatten()
    }
}

/// The entry of `system` on `keys`.
pub(crate) fn entry<S: PartialEq>(
    measured: &mut [Measured<S>],
    system: S,
    keys: Keys,
) -> &mut Measured<S> {
    measured
        .iter_mut()
        .find(|m| m.system == system && m.keys == keys)
        .expect("every pair is measured")
}

/// What the report says besides the table.
pub(crate) struct Notes {
    pub(crate) lines: Vec<String>,
    pub(crate) errors: Vec<String>,
}

impl Notes {
    pub(crate) fn new() -> Notes {
        Notes {
            lines: Vec::new(),
            errors: Vec::new(),
        }
    }
}

pub fn run(tally_bin: &Path, work: &Path, s: &Settings) -> (String, bool) {
    let dir = work.join("replicated");
    let mut measured = Measured::all(&System::ALL);
    let mut notes = Notes::new();
    match fsync_latency(work) {
        Ok((p50, p99)) => notes.lines.push(format!(
            "fdatasync of a 4 KiB append in the work directory: p50 {:.3} ms, p99 {:.3} ms",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        )),
        Err(e) => notes
            .lines
            .push(format!("fdatasync could not be timed: {e:#}")),
    }

    let pg = postgres::start(work, &dir.join("postgres"));
    let pg = match pg {
        Ok(pg) => {
            match pg.settings() {
                Ok(settings) => notes.lines.push(format!(
                    "PostgreSQL: {}, defaults as initdb leaves them: {settings}; \
                     one server for the upserts and the tally node's store",
                    pg.version()
                )),
                Err(e) => notes
                    .errors
                    .push(format!("reading the PostgreSQL settings: {e:#}")),
            }
            Some(pg)
        }
        Err(e) => {
            let e = format!("{e:#}");
            fail(&mut measured, System::PostgresUpsert, &e);
            fail(&mut measured, System::TallyPostgres, &e);
            None
        }
    };
    notes.lines.push(
        "SQLite store: one file in the work directory, journal_mode=WAL, synchronous=FULL".into(),
    );

    let mut pgbench = None;
    let mut nodes: Vec<(System, Node)> = Vec::new();
    if let Some(pg) = &pg {
        match Pgbench::prepare(pg, &dir.join("pgbench"), s) {
            Ok(p) => pgbench = Some(p),
            Err(e) => fail(&mut measured, System::PostgresUpsert, &format!("{e:#}")),
        }
        match pg
            .create_named_database(STORE_DATABASE)
            .map_err(anyhow::Error::from)
            .and_then(|()| Node::start(tally_bin, &dir, "tally-postgres", &pg.url(STORE_DATABASE)))
        {
            Ok(n) => nodes.push((System::TallyPostgres, n)),
            Err(e) => fail(&mut measured, System::TallyPostgres, &format!("{e:#}")),
        }
    }
    let sqlite_url = format!("sqlite://{}", dir.join("store.db").display());
    match Node::start(tally_bin, &dir, "tally-sqlite", &sqlite_url) {
        Ok(n) => nodes.push((System::TallySqlite, n)),
        Err(e) => fail(&mut measured, System::TallySqlite, &format!("{e:#}")),
    }

    let systems: Vec<System> = System::ALL
        .into_iter()
        .filter(|&sys| match sys {
            System::PostgresUpsert => pgbench.is_some(),
            _ => nodes.iter().any(|(n, _)| *n == sys),
        })
        .collect();
    interleave(
        "replicated",
        &systems,
        |sys| sys.label().to_string(),
        &mut measured,
        s,
        |system, keys, m| match system {
            System::PostgresUpsert => pgbench
                .as_mut()
                .expect("only prepared systems run")
                .run(keys, s, m),
            _ => nodes
                .iter_mut()
                .find(|(n, _)| *n == system)
                .expect("only started systems run")
                .1
                .run(keys, s, m),
        },
    );

    for (system, node) in nodes {
        let verified = node.verify(system, system.label(), s, &mut measured, &mut notes);
        let stopped = node.stop();
        if let Err(e) = verified.and(stopped) {
            fail(&mut measured, system, &format!("{e:#}"));
        }
    }
    drop(pgbench);
    if let Some(pg) = pg
        && let Err(e) = pg.stop()
    {
        notes.errors.push(format!("stopping postgres: {e:#}"));
    }
    report(&measured, s, notes)
}

/// Runs each of `systems` on each key pattern, `s.rounds` times, with
/// `run`. Each round visits the systems in turn, starting one further
/// along each round, so that a change in background load touches all of
/// them alike. A system's first error on a key pattern is kept and ends its
/// runs there. `part` and `label` name the runs in the progress lines.
pub(crate) fn interleave<S: Copy + PartialEq>(
    part: &str,
    systems: &[S],
    label: impl Fn(S) -> String,
    measured: &mut [Measured<S>],
    s: &Settings,
    mut run: impl FnMut(S, Keys, &mut Measured<S>) -> Result<()>,
) {
    for round in 0..s.rounds as usize {
        for i in 0..systems.len() {
            let system = systems[(i + round) % systems.len()];
            for keys in Keys::ALL {
                let m = entry(measured, system, keys);
                if m.error.is_some() {
                    continue;
                }
                eprintln!(
                    "{part}: round {}/{}, {}, {} ...",
                    round + 1,
                    s.rounds,
                    label(system),
                    keys.describe(s)
                );
                if let Err(e) = run(system, keys, m) {
                    m.error = Some(format!("{e:#}"));
                }
            }
        }
    }
}

/// Marks both key patterns of `system` as failed with `e`, keeping an
/// earlier error.
pub(crate) fn fail<S: PartialEq>(measured: &mut [Measured<S>], system: S, e: &str) {
    for m in measured.iter_mut().filter(|m| m.system == system) {
        m.error.get_or_insert_with(|| e.to_string());
    }
}

/// Where pgbench connects (a PostgreSQL server or a proxy in front of
/// one, on loopback), and as whom.
pub(crate) struct PgbenchTarget {
    pub(crate) port: u16,
    pub(crate) user: String,
    /// Given to pgbench as `PGPASSWORD`; `None` where the server trusts
    /// loopback connections.
    pub(crate) password: Option<String>,
    pub(crate) database: String,
}

/// PostgreSQL's upsert, driven by pgbench.
pub(crate) struct Pgbench {
    program: PathBuf,
    target: PgbenchTarget,
    dir: PathBuf,
    /// For emptying the table before a run and summing it after.
    client: ::postgres::Client,
    runs: u32,
}

impl Pgbench {
    /// Creates a database of its own on the private server, the table in
    /// it, and the two scripts.
    pub(crate) fn prepare(pg: &PgServer, dir: &Path, s: &Settings) -> Result<Pgbench> {
        pg.create_named_database(UPSERT_DATABASE)?;
        let client = pg.connect(UPSERT_DATABASE)?;
        let target = PgbenchTarget {
            port: pg.port(),
            user: SUPERUSER.to_string(),
            password: None,
            database: UPSERT_DATABASE.to_string(),
        };
        Pgbench::prepare_on(pg.program("pgbench"), target, client, dir, s)
    }

    /// Creates the table through `client`, a connection to `target`'s
    /// database (which must not hold a table `t` yet), and the two scripts
    /// in `dir`.
    pub(crate) fn prepare_on(
        program: PathBuf,
        target: PgbenchTarget,
        mut client: ::postgres::Client,
        dir: &Path,
        s: &Settings,
    ) -> Result<Pgbench> {
        crate::tools::version(&program).context(
            "pgbench is needed and did not run; it comes with the PostgreSQL server package",
        )?;
        std::fs::create_dir_all(dir)?;
        client
            .batch_execute("CREATE TABLE t (k integer PRIMARY KEY, v bigint NOT NULL)")
            .context("creating the upsert table")?;
        std::fs::write(dir.join("hot.sql"), format!("\\set k 1\n{UPSERT}\n"))?;
        std::fs::write(
            dir.join("spread.sql"),
            format!("\\set k random(1, {})\n{UPSERT}\n", s.counters),
        )?;
        Ok(Pgbench {
            program,
            target,
            dir: dir.to_path_buf(),
            client,
            runs: 0,
        })
    }

    pub(crate) fn run<S>(&mut self, keys: Keys, s: &Settings, m: &mut Measured<S>) -> Result<()> {
        self.client
            .batch_execute("TRUNCATE t")
            .context("emptying the upsert table")?;
        self.runs += 1;
        let script = match keys {
            Keys::Hot => "hot",
            Keys::Spread => "spread",
        };
        let log_dir = self.dir.join(format!("log-{}", self.runs));
        std::fs::create_dir_all(&log_dir)?;
        let mut command = Command::new(&self.program);
        if let Some(password) = &self.target.password {
            command.env("PGPASSWORD", password);
        }
        let output = run_with_timeout(
            command
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.target.port.to_string(),
                    "-U",
                    &self.target.user,
                ])
                // No vacuum of pgbench's own tables (there are none); the
                // statement is prepared once per connection, the fastest
                // way pgbench can send it.
                .args(["-n", "-M", "prepared"])
                .args(["-c", &s.clients.to_string()])
                .args(["-j", &PGBENCH_THREADS.min(s.clients).to_string()])
                .args(["-T", &s.pgbench_seconds.to_string()])
                .arg("-f")
                .arg(self.dir.join(format!("{script}.sql")))
                .arg("-l")
                .arg(format!("--log-prefix={}", log_dir.join(script).display()))
                .arg(&self.target.database)
                .current_dir(&log_dir),
            "pgbench",
            Duration::from_secs(s.pgbench_seconds.into()) + PGBENCH_GRACE,
        )?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!(
                "pgbench failed ({}): {}{}",
                output.status,
                stdout.trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let PgbenchSummary {
            processed,
            failed,
            tps,
        } = parse::pgbench_summary(&stdout)?;
        if failed > 0 {
            bail!("{failed} of pgbench's upserts failed");
        }
        let row = self
            .client
            .query_one("SELECT coalesce(sum(v), 0)::bigint FROM t", &[])
            .context("summing the upsert table")?;
        let sum: i64 = row.get(0);
        let sum = u64::try_from(sum).context("the upsert table sums to a negative number")?;
        // pgbench counts a transaction once its reply arrived, so every
        // counted one must be in the table.
        if sum < processed {
            bail!("the upsert table sums to {sum} after {processed} acknowledged upserts");
        }
        m.acknowledged += processed;
        *m.counted.get_or_insert(0) += sum;

        let mut latencies_us = Vec::new();
        for entry in std::fs::read_dir(&log_dir)? {
            let path = entry?.path();
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            parse::pgbench_log_latencies_us(&text, &mut latencies_us)?;
        }
        std::fs::remove_dir_all(&log_dir)?;
        if latencies_us.len() as u64 != processed {
            bail!(
                "pgbench logged {} transactions but reports {processed}",
                latencies_us.len()
            );
        }
        latencies_us.sort_unstable();
        let ms = |q| parse::quantile(&latencies_us, q).map_or(f64::NAN, |us| us as f64 / 1e3);
        m.runs.push(Run {
            requests_per_s: tps,
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
        });
        Ok(())
    }
}

/// A `tally serve --durability replicated` node with a store.
pub(crate) struct Node {
    guard: ChildGuard,
    addr: SocketAddr,
    store_url: String,
}

impl Node {
    /// Starts a node with its data in `dir/name` and its log beside it.
    pub(crate) fn start(tally_bin: &Path, dir: &Path, name: &str, store_url: &str) -> Result<Node> {
        let t = process::start_tally(
            tally_bin,
            &dir.join(name),
            true,
            "replicated",
            &["--store", store_url],
            READY_TIMEOUT,
        )?;
        let addr = t.resp_addr.context("tally started without RESP")?;
        Ok(Node {
            guard: t.guard,
            addr,
            store_url: store_url.to_string(),
        })
    }

    /// The node's RESP address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub(crate) fn run<S>(&mut self, keys: Keys, s: &Settings, m: &mut Measured<S>) -> Result<()> {
        let space = match keys {
            Keys::Hot => None,
            Keys::Spread => Some(s.counters),
        };
        let row = redis_benchmark(self.addr, s.clients, s.requests, 1, space)?;
        m.acknowledged += s.requests;
        m.runs.push(Run {
            requests_per_s: row.requests_per_s,
            p50_ms: row.p50_ms,
            p99_ms: row.p99_ms,
        });
        Ok(())
    }

    /// Reads every counter back through RESP and from the store and
    /// checks both against the INCRs sent as `system`, named `label` in the
    /// notes.
    pub(crate) fn verify<S: Copy + PartialEq>(
        &self,
        system: S,
        label: &str,
        s: &Settings,
        measured: &mut [Measured<S>],
        notes: &mut Notes,
    ) -> Result<()> {
        let mut client = Client::connect(self.addr)?;
        let hot = integer_or_zero(client.command(&["GET", BENCHMARK_KEY])?)?;
        let names: Vec<String> = (0..u64::from(s.counters)).map(counter_name).collect();
        let mut args = vec!["MGET"];
        args.extend(names.iter().map(String::as_str));
        let spread = match client.command(&args)? {
            Reply::Array(Some(items)) if items.len() == names.len() => items
                .into_iter()
                .map(integer_or_zero)
                .sum::<Result<u64>>()?,
            other => bail!("MGET of {} counters answered {other:?}", names.len()),
        };

        // The store is read with a connection of our own: what it holds
        // is what survives the node's disk.
        let store = tally::store::open(&self.store_url).context("opening the node's store")?;
        let stored = |name: &str| -> Result<i64> {
            Ok(store
                .read_counter(name)
                .with_context(|| format!("reading {name} from the store"))?
                .iter()
                .map(|r| r.value)
                .sum())
        };
        let hot_stored = stored(BENCHMARK_KEY)?;
        let mut spread_stored = 0;
        for name in &names {
            spread_stored += stored(name)?;
        }
        drop(store);

        let mut mismatches = Vec::new();
        for (keys, read, in_store) in [
            (Keys::Hot, hot, hot_stored),
            (Keys::Spread, spread, spread_stored),
        ] {
            let m = entry(measured, system, keys);
            m.counted = Some(read);
            if read != m.acknowledged || in_store != m.acknowledged as i64 {
                mismatches.push(format!(
                    "{keys:?}: {} acknowledged, {read} read back, {in_store} in the store",
                    m.acknowledged
                ));
            }
        }
        notes.lines.push(format!(
            "{}: read back through RESP, the hot counter is {} and the {} counters sum to {}; \
             the store's rows hold {} and {}",
            label,
            thousands(hot),
            thousands(s.counters.into()),
            thousands(spread),
            thousands(hot_stored.max(0) as u64),
            thousands(spread_stored.max(0) as u64),
        ));
        if !mismatches.is_empty() {
            bail!(
                "increments were lost, refused or counted twice: {}",
                mismatches.join("; ")
            );
        }
        Ok(())
    }

    /// Stops the node gracefully; an unclean exit is an error.
    pub(crate) fn stop(self) -> Result<()> {
        let name = self.guard.name().to_string();
        let status = process::stop(self.guard)?;
        if !status.success() {
            bail!("{name} exited with {status} at shutdown");
        }
        Ok(())
    }
}

/// A counter's value from a GET reply; a counter never incremented (nil)
/// is 0.
pub(crate) fn integer_or_zero(reply: Reply) -> Result<u64> {
    match reply {
        Reply::Bulk(None) => Ok(0),
        other => {
            let text = other.text()?;
            text.parse()
                .with_context(|| format!("counter value '{text}' is not a count"))
        }
    }
}

fn report(measured: &[Measured<System>], s: &Settings, notes: Notes) -> (String, bool) {
    let mut out = format!(
        "### Replicated increments: {} clients, tally `redis-benchmark -t incr -n {}` against \
         PostgreSQL's upsert `pgbench -T {}`, one PostgreSQL server (median of {} rounds, \
         systems interleaved)\n\n",
        s.clients,
        thousands(s.requests),
        s.pgbench_seconds,
        s.rounds
    );
    let base = measured
        .iter()
        .find(|m| m.system == System::PostgresUpsert && m.keys == Keys::Hot)
        .and_then(Measured::ok)
        .map(|r| r.requests_per_s);
    let mut table = Table::new(&[
        "system",
        "counters",
        "requests/s",
        "p50 ms",
        "p99 ms",
        "vs postgres hot-row upsert",
        "acknowledged",
        "counted",
    ]);
    let mut errors = notes.errors;
    for m in measured {
        let counters = m.keys.counters(s);
        let counted = m.counted.map_or("n/a".into(), thousands);
        match (&m.error, m.median()) {
            (None, Some(r)) => table.row(vec![
                m.system.label().into(),
                counters,
                thousands(r.requests_per_s.round() as u64),
                format!("{:.3}", r.p50_ms),
                format!("{:.3}", r.p99_ms),
                base.map_or("n/a".into(), |b| ratio(r.requests_per_s, b)),
                thousands(m.acknowledged),
                counted,
            ]),
            (error, _) => {
                table.row(vec![
                    m.system.label().into(),
                    counters,
                    "failed".into(),
                    "".into(),
                    "".into(),
                    "".into(),
                    thousands(m.acknowledged),
                    counted,
                ]);
                let e = error.as_deref().unwrap_or("no run completed");
                errors.push(format!("{} ({:?}): {e}", m.system.label(), m.keys));
            }
        }
    }
    out.push_str(&table.render());
    out.push('\n');
    out.push_str(&format!(
        "postgres runs `{UPSERT}` with `\\set k 1` (hot row) or `\\set k random(1, {})`, \
         `pgbench -n -M prepared -c {} -j {}`; its latencies come from pgbench's \
         per-transaction log. tally's INCRs carry no durability, so the node's default \
         (`--durability replicated`) applies: each is acknowledged after the store \
         transaction that holds it commits. acknowledged: increments the clients were told \
         succeeded, over all rounds; counted: read back afterwards (postgres: sum of the \
         table after each run; tally: RESP GET and MGET).\n\n",
        s.counters,
        s.clients,
        PGBENCH_THREADS.min(s.clients),
    ));
    for n in &notes.lines {
        out.push_str(&format!("- {n}\n"));
    }
    let rate = |system, keys| {
        measured
            .iter()
            .find(|m| m.system == system && m.keys == keys)
            .and_then(Measured::ok)
            .map(|r| r.requests_per_s)
    };
    if let Some(b) = base {
        for system in [System::TallyPostgres, System::TallySqlite] {
            if let Some(t) = rate(system, Keys::Hot) {
                out.push_str(&format!(
                    "- target: {}, one hot counter >= {MANY_TIMES_RATIO}x postgres hot-row \
                     upsert: {} ({})\n",
                    system.label(),
                    verdict(t >= MANY_TIMES_RATIO * b),
                    ratio(t, b)
                ));
            }
        }
        if let Some(t) = rate(System::TallyPostgres, Keys::Hot) {
            out.push_str(&format!(
                "- target: tally replicated, PostgreSQL store, one hot counter >= \
                 {HOT_TARGET_RATIO}x postgres hot-row upsert: {} ({})\n",
                verdict(t >= HOT_TARGET_RATIO * b),
                ratio(t, b)
            ));
        }
    }
    if let (Some(t), Some(p)) = (
        rate(System::TallyPostgres, Keys::Spread),
        rate(System::PostgresUpsert, Keys::Spread),
    ) {
        out.push_str(&format!(
            "- target: over {} counters, tally replicated (PostgreSQL store) >= \
             {SPREAD_TARGET_RATIO}x postgres upserting {} rows: {} ({})\n",
            thousands(s.counters.into()),
            thousands(s.counters.into()),
            verdict(t >= SPREAD_TARGET_RATIO * p),
            ratio(t, p)
        ));
    }
    for e in &errors {
        out.push_str(&format!("- error: {e}\n"));
    }
    (out, errors.is_empty())
}
