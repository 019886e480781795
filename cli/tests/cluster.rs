//! Cluster behaviour of real `tally serve` processes sharing one store.
//!
//! Every scenario starts node processes on one shared store, drives them
//! over RESP from several connections, and checks what every node reports
//! and what the store holds. Each scenario is written once, against a
//! [`Backend`], and runs twice (modules `on_sqlite` and `on_postgres` at the
//! end): on an SQLite file in a temporary directory, and on a database of
//! its own in a private PostgreSQL server (`support/postgres.rs`). The store
//! outage scenario stops the server under load, so it runs on PostgreSQL
//! only, on a server of its own.
//!
//! Nodes run with short flush, refresh and heartbeat intervals so that the
//! scenarios settle in a fraction of a second; every wait is bounded and
//! fails with what it last saw.

use tally_lab::testing as support;
use tally_lab::testing::process as common;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::TallyProcess;
use redis::aio::MultiplexedConnection;
use support::postgres::PgServer;
use tally::store::{self, Store};
use tally_lab::testing::{FAST, eventually_blocking};

/// Longest wait for any one reply: a node that hangs fails the test.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeat interval of the process that gets fenced, in milliseconds.
const FENCED_NODE_HEARTBEAT_INTERVAL_MS: &str = "2000";
/// Long enough for a node's flush rounds to end after its load stops.
const IDLE_AFTER_LOAD: Duration = Duration::from_millis(200);
/// Longest a fenced process may take to exit.
const FENCED_EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a `replicated` increment may take to be refused while the store
/// is down: failing fast means well under the client's own timeouts.
const OUTAGE_REPLY_MAX: Duration = Duration::from_secs(2);

/// Acknowledged sums, by counter name.
type Totals = BTreeMap<String, i64>;

/// Which kind of shared store a scenario runs on.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

/// A fresh, empty shared store for one scenario.
struct SharedStore {
    url: String,
    /// Holds the SQLite file; removed when the test ends.
    _dir: Option<tempfile::TempDir>,
    /// A server of the scenario's own, when it stops and starts it.
    server: Option<PgServer>,
    /// The test's own handle, to read what the store holds.
    reader: OnceLock<Arc<dyn Store>>,
}

impl SharedStore {
    fn new(backend: Backend) -> SharedStore {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temporary directory");
                let url = format!("sqlite://{}", dir.path().join("store.db").display());
                SharedStore {
                    url,
                    _dir: Some(dir),
                    server: None,
                    reader: OnceLock::new(),
                }
            }
            Backend::Postgres => {
                let server = support::postgres::shared();
                let url = server.url(&server.create_database());
                SharedStore {
                    url,
                    _dir: None,
                    server: None,
                    reader: OnceLock::new(),
                }
            }
        }
    }

    /// A database on a PostgreSQL server that only this scenario uses.
    fn on_private_postgres() -> SharedStore {
        let server = PgServer::new();
        let url = server.url(&server.create_database());
        SharedStore {
            url,
            _dir: None,
            server: Some(server),
            reader: OnceLock::new(),
        }
    }

    fn server(&self) -> &PgServer {
        self.server.as_ref().expect("a private PostgreSQL server")
    }

    /// Call from the test thread, never from an async task (see the store
    /// module's docs).
    fn reader(&self) -> &dyn Store {
        self.reader
            .get_or_init(|| {
                store::open(&self.url)
                    .unwrap_or_else(|e| panic!("opening the shared store {}: {e}", self.url))
            })
            .as_ref()
    }

    /// Each node's stored shard of `counter`, by node id.
    fn shares(&self, counter: &str) -> BTreeMap<String, i64> {
        self.reader()
            .read_counter(counter)
            .unwrap_or_else(|e| panic!("reading counter '{counter}' from the store: {e}"))
            .into_iter()
            .map(|r| (r.node_id, r.value))
            .collect()
    }

    /// Starts a node process on this store.
    fn start_node(&self, node_id: &str, data_dir: &Path) -> TallyProcess {
        self.start_node_with(
            node_id,
            data_dir,
            &FAST.heartbeat_interval.as_millis().to_string(),
        )
    }

    /// [`SharedStore::start_node`] with another heartbeat interval.
    fn start_node_with(
        &self,
        node_id: &str,
        data_dir: &Path,
        heartbeat_interval_ms: &str,
    ) -> TallyProcess {
        let args = self.node_args(node_id, heartbeat_interval_ms, &[]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        TallyProcess::start(data_dir, &args)
    }

    /// The flags of a node process on this store.
    fn node_args(&self, node_id: &str, heartbeat_interval_ms: &str, extra: &[&str]) -> Vec<String> {
        let mut flags = FAST.serve_flags();
        let heartbeat = flags
            .iter()
            .position(|f| f == "--heartbeat-interval-ms")
            .expect("the timings include the heartbeat");
        flags[heartbeat + 1] = heartbeat_interval_ms.to_string();
        let mut args: Vec<String> = ["--store", &self.url, "--node-id", node_id]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(flags);
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Awaits `f`, failing the test if it takes longer than [`REPLY_TIMEOUT`].
async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(REPLY_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {REPLY_TIMEOUT:?}"))
}

async fn try_connect(url: &str) -> redis::RedisResult<MultiplexedConnection> {
    let client = redis::Client::open(url).expect("RESP url");
    within(
        &format!("connecting to {url}"),
        client.get_multiplexed_async_connection(),
    )
    .await
}

async fn connect(url: &str) -> MultiplexedConnection {
    try_connect(url)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
}

/// How durable an increment asks to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    /// Plain `INCRBY`: the node's default, `local`.
    Default,
    Local,
    Replicated,
}

/// One increment a client sends.
#[derive(Debug, Clone)]
struct Op {
    counter: String,
    delta: i64,
    level: Level,
    key: Option<String>,
}

impl Op {
    fn new(counter: &str, delta: i64, level: Level) -> Op {
        Op {
            counter: counter.to_string(),
            delta,
            level,
            key: None,
        }
    }

    fn keyed(mut self, key: impl Into<String>) -> Op {
        self.key = Some(key.into());
        self
    }
}

/// Sends one increment; returns the reply's value and whether the node
/// called it a duplicate. Plain `INCRBY` never reports one.
async fn send(conn: &mut MultiplexedConnection, op: &Op) -> redis::RedisResult<(i64, bool)> {
    if op.level == Level::Default {
        assert!(op.key.is_none(), "plain INCRBY takes no idempotency key");
        let value: i64 = within(
            "INCRBY",
            redis::cmd("INCRBY")
                .arg(&op.counter)
                .arg(op.delta)
                .query_async(conn),
        )
        .await?;
        return Ok((value, false));
    }
    let mut cmd = redis::cmd("TALLY.INCRBY");
    cmd.arg(&op.counter).arg(op.delta);
    if let Some(key) = &op.key {
        cmd.arg("IDEMPOTENCY").arg(key);
    }
    cmd.arg("DURABILITY").arg(match op.level {
        Level::Local => "local",
        _ => "replicated",
    });
    let (value, duplicate): (i64, i64) = within("TALLY.INCRBY", cmd.query_async(conn)).await?;
    Ok((value, duplicate == 1))
}

/// The error code of a RESP error reply (`UNAVAILABLE`, `INDETERMINATE`,
/// ...), or "" for a broken connection.
fn code(e: &redis::RedisError) -> &str {
    e.code().unwrap_or_default()
}

async fn get(conn: &mut MultiplexedConnection, counter: &str) -> i64 {
    let value: Option<i64> = within("GET", redis::cmd("GET").arg(counter).query_async(conn))
        .await
        .unwrap_or_else(|e| panic!("GET {counter}: {e}"));
    value.unwrap_or(0)
}

/// Sends `ops` in order on one new connection to `url`; every one must be
/// acknowledged, as a new increment. Returns the sums per counter.
async fn send_all(url: String, ops: Vec<Op>) -> Totals {
    let mut conn = connect(&url).await;
    let mut acked = Totals::new();
    for op in &ops {
        match send(&mut conn, op).await {
            Ok((_, false)) => *acked.entry(op.counter.clone()).or_default() += op.delta,
            Ok((_, true)) => panic!("{op:?} to {url} was answered as a duplicate"),
            Err(e) => panic!("{op:?} to {url} failed: {e}"),
        }
    }
    acked
}

/// Runs every plan at once, one connection each, and returns the
/// acknowledged sums by node id, then counter.
fn load(
    rt: &tokio::runtime::Runtime,
    plans: Vec<(&TallyProcess, Vec<Op>)>,
) -> BTreeMap<String, Totals> {
    let tasks: Vec<_> = plans
        .into_iter()
        .map(|(node, ops)| {
            (
                node.node_id.clone(),
                rt.spawn(send_all(node.resp_url(), ops)),
            )
        })
        .collect();
    let mut by_node: BTreeMap<String, Totals> = BTreeMap::new();
    for (node_id, task) in tasks {
        let acked = rt.block_on(task).expect("a load task failed");
        add(by_node.entry(node_id).or_default(), &acked);
    }
    by_node
}

fn add(into: &mut Totals, more: &Totals) {
    for (counter, delta) in more {
        *into.entry(counter.clone()).or_default() += delta;
    }
}

/// Merges acknowledged sums by node into `into`.
fn add_by_node(into: &mut BTreeMap<String, Totals>, more: &BTreeMap<String, Totals>) {
    for (node_id, totals) in more {
        add(into.entry(node_id.clone()).or_default(), totals);
    }
}

/// The cluster-wide sums.
fn global(by_node: &BTreeMap<String, Totals>) -> Totals {
    let mut out = Totals::new();
    for totals in by_node.values() {
        add(&mut out, totals);
    }
    out
}

/// Up to this many counters are read one `GET` each, as a client reads
/// one counter; more are read by `MGET`, in chunks of this many names.
const GET_COUNTERS_MAX: usize = 32;
const MGET_NAMES_MAX: usize = 500;

/// What every node reports for each counter of `expected`.
async fn values(nodes: &[&TallyProcess], expected: &Totals) -> BTreeMap<String, Totals> {
    let names: Vec<&String> = expected.keys().collect();
    let mut out = BTreeMap::new();
    for node in nodes {
        let mut conn = connect(&node.resp_url()).await;
        let mut seen = Totals::new();
        if names.len() <= GET_COUNTERS_MAX {
            for name in &names {
                seen.insert((*name).clone(), get(&mut conn, name).await);
            }
        } else {
            for chunk in names.chunks(MGET_NAMES_MAX) {
                let got: Vec<Option<i64>> =
                    within("MGET", redis::cmd("MGET").arg(chunk).query_async(&mut conn))
                        .await
                        .unwrap_or_else(|e| panic!("MGET on {}: {e}", node.node_id));
                assert_eq!(
                    got.len(),
                    chunk.len(),
                    "MGET answered another number of values"
                );
                for (name, value) in chunk.iter().zip(got) {
                    seen.insert((*name).clone(), value.unwrap_or(0));
                }
            }
        }
        out.insert(node.node_id.clone(), seen);
    }
    out
}

/// Added to a failed wait for values once the store is known to hold them:
/// a node then reads the other nodes' shards wrongly.
const CACHE_MISSED_ROWS: &str = ", although the store's rows already hold them: the \
     differing nodes' cache of the other nodes' shards missed rows";

/// Differences shown when a wait fails.
const DIFFERENCES_SHOWN_MAX: usize = 20;

/// Where `seen` differs from `expected`: (node, counter, seen, expected),
/// at most [`DIFFERENCES_SHOWN_MAX`] of them, and how many in all.
fn differences(seen: &BTreeMap<String, Totals>, expected: &Totals) -> (Vec<String>, usize) {
    let all: Vec<String> = seen
        .iter()
        .flat_map(|(node, values)| {
            expected.iter().filter_map(move |(counter, want)| {
                let got = values.get(counter).copied().unwrap_or(0);
                (got != *want).then(|| format!("{node} reports {counter} = {got}, expected {want}"))
            })
        })
        .collect();
    let n = all.len();
    (all.into_iter().take(DIFFERENCES_SHOWN_MAX).collect(), n)
}

/// Polls every node until each reports `expected` for every counter; fails
/// after `SETTLE_TIMEOUT`, showing what differed.
fn wait_for_values(rt: &tokio::runtime::Runtime, nodes: &[&TallyProcess], expected: &Totals) {
    wait_for_values_or(rt, nodes, expected, "");
}

/// [`wait_for_values`], with `context` added to the failure message (what
/// the scenario already established, which narrows the cause).
fn wait_for_values_or(
    rt: &tokio::runtime::Runtime,
    nodes: &[&TallyProcess],
    expected: &Totals,
    context: &str,
) {
    let what = format!(
        "the nodes report the acknowledged totals of {} counters on {} nodes{context}",
        expected.len(),
        nodes.len()
    );
    eventually_blocking(&what, || {
        let seen = rt.block_on(values(nodes, expected));
        let (shown, n) = differences(&seen, expected);
        if n == 0 {
            Ok(())
        } else {
            Err(format!("{n} differences:\n{}", shown.join("\n")))
        }
    })
}

/// The store's rows for the counters of `by_node`, by counter, then node,
/// leaving out zero shards (a node that never wrote a counter has no row).
fn stored_shares(
    store: &SharedStore,
    counters: &BTreeSet<String>,
) -> BTreeMap<String, BTreeMap<String, i64>> {
    counters
        .iter()
        .map(|c| {
            let mut shares = store.shares(c);
            shares.retain(|_, v| *v != 0);
            (c.clone(), shares)
        })
        .collect()
}

/// Polls the store until each node's row of each counter holds that node's
/// acknowledged sum; fails after `SETTLE_TIMEOUT`, showing what differed.
fn wait_for_shares(store: &SharedStore, by_node: &BTreeMap<String, Totals>) {
    let mut expected: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for (node_id, totals) in by_node {
        for (counter, v) in totals {
            let shares = expected.entry(counter.clone()).or_default();
            if *v != 0 {
                shares.insert(node_id.clone(), *v);
            }
        }
    }
    let counters: BTreeSet<String> = expected.keys().cloned().collect();
    eventually_blocking(
        "the store's shard rows equal each node's acknowledged sums",
        || {
            let seen = stored_shares(store, &counters);
            if seen == expected {
                Ok(())
            } else {
                Err(format!("expected: {expected:#?}\nstored: {seen:#?}"))
            }
        },
    )
}

/// Waits (bounded) for a process to exit on its own.
fn wait_for_exit(node: &mut TallyProcess, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = node.child.try_wait().expect("polling a child process") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(tally_lab::testing::POLL_INTERVAL);
    }
}

fn stderr_of(node: &TallyProcess) -> String {
    std::fs::read_to_string(&node.stderr_path).unwrap_or_default()
}

/// Copies a directory tree (a node's data directory, at rest).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("creating the copy's directory");
    for entry in std::fs::read_dir(from).expect("reading the data directory") {
        let entry = entry.expect("a directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copying a data file");
        }
    }
}

/// A deterministic mix of increments for one connection: several counters,
/// positive and negative deltas, `local` (plain and explicit) and
/// `replicated`, some with idempotency keys unique to the run.
fn mixed_ops(node: usize, conn: usize, n: usize, counters: &[&str]) -> Vec<Op> {
    (0..n)
        .map(|i| {
            let counter = counters[(i + conn + node) % counters.len()];
            let magnitude = 1 + ((i * 7 + conn * 3 + node) % 5) as i64;
            let delta = if i % 7 == 3 { -magnitude } else { magnitude };
            let level = match (i + conn) % 3 {
                0 => Level::Replicated,
                1 => Level::Local,
                _ => Level::Default,
            };
            let op = Op::new(counter, delta, level);
            if level != Level::Default && i % 5 == 0 {
                op.keyed(format!("mixed-n{node}-c{conn}-{i}"))
            } else {
                op
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

/// Connections per node in the concurrent-load scenario.
const CONNECTIONS_PER_NODE: usize = 3;
/// Increments per connection in the concurrent-load scenario.
const OPS_PER_CONNECTION: usize = 120;

fn three_nodes_report_exact_global_totals(backend: Backend) {
    let rt = runtime();
    let store = SharedStore::new(backend);
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<TallyProcess> = (1..=3)
        .map(|i| store.start_node(&format!("n{i}"), &dir.path().join(format!("n{i}"))))
        .collect();
    let counters = ["requests", "errors", "tokens", "quota"];
    let mut plans = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for c in 0..CONNECTIONS_PER_NODE {
            plans.push((node, mixed_ops(n, c, OPS_PER_CONNECTION, &counters)));
        }
    }
    let by_node = load(&rt, plans);
    let expected = global(&by_node);
    assert_eq!(expected.len(), counters.len(), "every counter was written");
    wait_for_shares(&store, &by_node);
    let refs: Vec<&TallyProcess> = nodes.iter().collect();
    wait_for_values_or(&rt, &refs, &expected, CACHE_MISSED_ROWS);
}

/// Writers, and counters each creates with one increment, in the scenario
/// where many rows are flushed at once.
const FRESH_WRITERS: usize = 8;
const FRESH_COUNTERS_PER_WRITER: usize = 250;

fn other_nodes_read_every_flushed_row(backend: Backend) {
    let rt = runtime();
    let store = SharedStore::new(backend);
    let dir = tempfile::tempdir().unwrap();
    let writer = store.start_node("n1", &dir.path().join("n1"));
    let reader = store.start_node("n2", &dir.path().join("n2"));
    // Each counter is written once: a row the other node's cache misses is
    // never written again, so it would stay missed.
    let plans = (0..FRESH_WRITERS)
        .map(|w| {
            let ops = (0..FRESH_COUNTERS_PER_WRITER)
                .map(|i| Op::new(&format!("fresh-{w}-{i}"), 1 + (i % 3) as i64, Level::Local))
                .collect();
            (&writer, ops)
        })
        .collect();
    let by_node = load(&rt, plans);
    let expected = global(&by_node);
    assert_eq!(expected.len(), FRESH_WRITERS * FRESH_COUNTERS_PER_WRITER);
    // The store first (one read of the writer's whole shard), then the
    // other node's reads of it.
    eventually_blocking("the store holds n1's rows as acknowledged", || {
        let stored: Totals = store
            .reader()
            .load_shard("n1")
            .unwrap_or_else(|e| panic!("reading n1's shard from the store: {e}"))
            .into_iter()
            .map(|r| (r.counter, r.value))
            .collect();
        if stored == expected {
            return Ok(());
        }
        Err(format!(
            "{} of {} rows as acknowledged",
            expected
                .iter()
                .filter(|(c, v)| stored.get(*c) == Some(*v))
                .count(),
            expected.len()
        ))
    });
    wait_for_values_or(&rt, &[&writer, &reader], &expected, CACHE_MISSED_ROWS);
}

fn lost_disk_at_replicated_restores_before_ready(backend: Backend) {
    let rt = runtime();
    let store = SharedStore::new(backend);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n1");
    let mut victim = store.start_node("n1", &data);
    let other = store.start_node("n2", &dir.path().join("n2"));
    let counters = ["orders", "refunds", "credits"];
    let replicated = |conn: usize, n: usize| -> Vec<Op> {
        (0..n)
            .map(|i| {
                let op = Op::new(
                    counters[(i + conn) % counters.len()],
                    1 + (i % 4) as i64,
                    Level::Replicated,
                );
                if i % 2 == 0 {
                    op.keyed(format!("lost-disk-c{conn}-{i}"))
                } else {
                    op
                }
            })
            .collect()
    };
    let by_node = load(
        &rt,
        vec![
            (&victim, replicated(0, 40)),
            (&victim, replicated(1, 40)),
            (&victim, replicated(2, 40)),
            (&other, replicated(3, 30)),
        ],
    );
    let expected = global(&by_node);

    victim.kill9();
    std::fs::remove_dir_all(&data).expect("deleting the node's data directory");
    let restarted = store.start_node("n1", &data);
    // The first reads after the ready line, with no wait.
    let first = rt.block_on(values(&[&restarted], &expected));
    assert_eq!(
        first["n1"], expected,
        "a node restarted without its data directory served before restoring every \
         acknowledged replicated increment from the store"
    );

    // It keeps counting from there, and its new flushes reach the store
    // (its new writes outrank the rows it restored).
    let more = load(
        &rt,
        vec![(
            &restarted,
            vec![
                Op::new("orders", 7, Level::Local),
                Op::new("credits", 2, Level::Replicated),
            ],
        )],
    );
    let mut by_node = by_node;
    add_by_node(&mut by_node, &more);
    wait_for_shares(&store, &by_node);
    wait_for_values_or(
        &rt,
        &[&restarted, &other],
        &global(&by_node),
        CACHE_MISSED_ROWS,
    );
}

fn stale_disk_never_lowers_the_store(backend: Backend) {
    let rt = runtime();
    let store = SharedStore::new(backend);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n1");
    let old_copy = dir.path().join("n1-old");

    let mut node = store.start_node("n1", &data);
    let local = |counter: &str, n: usize| -> Vec<Op> {
        (0..n)
            .map(|i| Op::new(counter, 1 + (i % 3) as i64, Level::Local))
            .collect()
    };
    let mut by_node = load(&rt, vec![(&node, local("a", 60)), (&node, local("b", 60))]);
    wait_for_shares(&store, &by_node);
    let status = node.terminate();
    assert!(status.success(), "graceful shutdown exited with {status}");
    copy_dir(&data, &old_copy);

    // After the copy: more increments, at both levels and on a counter the
    // copy has never seen, all of them flushed.
    let node = store.start_node("n1", &data);
    let after_copy = load(
        &rt,
        vec![
            (&node, local("a", 40)),
            (&node, local("late", 20)),
            (
                &node,
                (0..15)
                    .map(|i| Op::new("b", 2 + i, Level::Replicated))
                    .collect(),
            ),
        ],
    );
    add_by_node(&mut by_node, &after_copy);
    wait_for_shares(&store, &by_node);
    let before = global(&by_node);
    let mut node = node;
    node.kill9();
    drop(node);

    std::fs::remove_dir_all(&data).expect("deleting the data directory");
    copy_dir(&old_copy, &data);
    let node = store.start_node("n1", &data);
    let first = rt.block_on(values(&[&node], &before));
    for (counter, value) in &first["n1"] {
        assert!(
            *value >= before[counter],
            "a node restarted from an old copy of its data directory reports {counter} = \
             {value}, lower than the {} it had acknowledged and flushed",
            before[counter]
        );
    }
    assert_eq!(
        first["n1"], before,
        "a node restarted from an old copy of its data directory must adopt the store's \
         newer shard"
    );

    // One more flush after the restart: whatever the node had to write
    // went out in it or before it. The rows it had flushed are not lower.
    let marker = load(&rt, vec![(&node, vec![Op::new("marker", 1, Level::Local)])]);
    add_by_node(&mut by_node, &marker);
    let counters: BTreeSet<String> = before.keys().cloned().collect();
    wait_for_shares(&store, &by_node);
    let stored = stored_shares(&store, &counters);
    for (counter, value) in &before {
        let row = stored[counter].get("n1").copied().unwrap_or(0);
        assert!(
            row >= *value,
            "the store's row of n1 for {counter} fell from {value} to {row} after the node \
             restarted from an old copy of its data directory"
        );
    }
    // And it counts on from the adopted values.
    let more = load(&rt, vec![(&node, vec![Op::new("a", 5, Level::Local)])]);
    add_by_node(&mut by_node, &more);
    wait_for_shares(&store, &by_node);
    wait_for_values(&rt, &[&node], &global(&by_node));
}

fn second_process_with_same_node_id_fences_the_first(backend: Backend) {
    let rt = runtime();
    let store = SharedStore::new(backend);
    let dir = tempfile::tempdir().unwrap();
    // An idle node learns it is fenced at its next heartbeat. The first
    // process heartbeats rarely, so that the increments sent to it right
    // after the second one starts reach it before it knows.
    let mut first = store.start_node_with(
        "n1",
        &dir.path().join("n1-first"),
        FENCED_NODE_HEARTBEAT_INTERVAL_MS,
    );
    let witness = store.start_node("n2", &dir.path().join("n2"));
    let ops = |counter: &str, level: Level, n: usize| -> Vec<Op> {
        (0..n)
            .map(|i| Op::new(counter, 1 + (i % 5) as i64, level))
            .collect()
    };

    // Local increments, flushed before the second process starts.
    let mut by_node = load(
        &rt,
        vec![
            (&first, ops("x", Level::Local, 50)),
            (&first, ops("y", Level::Local, 50)),
            (&witness, ops("x", Level::Local, 30)),
        ],
    );
    wait_for_shares(&store, &by_node);
    // Replicated increments: in the store once acknowledged.
    let replicated = load(
        &rt,
        vec![
            (&first, ops("x", Level::Replicated, 20)),
            (&first, ops("y", Level::Replicated, 20)),
        ],
    );
    add_by_node(&mut by_node, &replicated);
    // Let the first process finish its flush rounds (a replicated round
    // leaves its counters listed for one more flush), so that its next
    // store write is the rare heartbeat or the increments sent below.
    std::thread::sleep(IDLE_AFTER_LOAD);

    // Without --takeover a second process is refused, naming the holder,
    // and the first goes on.
    let fast_hb = FAST.heartbeat_interval.as_millis().to_string();
    let refused_dir = dir.path().join("n1-refused");
    let args = store.node_args("n1", &fast_hb, &[]);
    let mut refused_args: Vec<&str> = vec!["--data-dir", refused_dir.to_str().unwrap()];
    refused_args.extend(args.iter().map(String::as_str));
    let mut refused = TallyProcess::spawn_with(&refused_args, &[]);
    let status = refused.child.wait().unwrap();
    let said = refused.stderr();
    assert!(
        !status.success(),
        "a second process took a live node id:\n{said}"
    );
    assert!(
        said.contains(&format!("pid {}", first.pid())) && said.contains("--takeover"),
        "the refusal does not name the holder's pid and the way out:\n{said}"
    );
    assert!(
        rt.block_on(try_connect(&first.resp_url())).is_ok(),
        "the first process stopped after a refused start"
    );

    let takeover = store.node_args("n1", &fast_hb, &["--takeover", "true"]);
    let takeover: Vec<&str> = takeover.iter().map(String::as_str).collect();
    let second = TallyProcess::start(&dir.path().join("n1-second"), &takeover);

    // Replicated increments sent to the first process now must all be
    // refused: it can no longer commit anything to the store.
    let url = first.resp_url();
    let (answered_after, refused_after) = rt.block_on(async {
        let (mut answered, mut refused) = (Vec::new(), 0);
        // The first process may already have learnt and exited.
        let Ok(mut conn) = try_connect(&url).await else {
            return (answered, refused);
        };
        for i in 0..20 {
            let op = Op::new("x", 1000 + i, Level::Replicated);
            match send(&mut conn, &op).await {
                Ok((value, duplicate)) => answered.push(format!(
                    "{op:?} answered [{value}, {}]",
                    u8::from(duplicate)
                )),
                Err(e) if code(&e) == "UNAVAILABLE" => refused += 1,
                // The process exited: the connection is gone.
                Err(_) => break,
            }
        }
        (answered, refused)
    });
    assert!(
        answered_after.is_empty(),
        "the fenced process answered replicated increments with a success after a second \
         process took its node id; none carries an idempotency key, so a duplicate flag is \
         as false as an acknowledgement:\n{}",
        answered_after.join("\n")
    );

    let status = wait_for_exit(&mut first, FENCED_EXIT_TIMEOUT).unwrap_or_else(|| {
        panic!(
            "the first process still runs {FENCED_EXIT_TIMEOUT:?} after a second process \
             took its node id ({refused_after} replicated increments refused); stderr:\n{}",
            stderr_of(&first)
        )
    });
    assert!(
        !status.success(),
        "a fenced process must exit non-zero, got {status}"
    );
    assert!(
        stderr_of(&first).contains("fenced"),
        "the fenced process did not say why it stopped; stderr:\n{}",
        stderr_of(&first)
    );

    // The second process carries on from everything the first flushed or
    // replicated, counted once.
    let more = load(
        &rt,
        vec![
            (&second, ops("x", Level::Local, 30)),
            (&second, ops("y", Level::Replicated, 10)),
            (&witness, ops("y", Level::Replicated, 10)),
        ],
    );
    add_by_node(&mut by_node, &more);
    wait_for_shares(&store, &by_node);
    wait_for_values_or(
        &rt,
        &[&second, &witness],
        &global(&by_node),
        CACHE_MISSED_ROWS,
    );
}

/// Keys sent to both nodes at once in the concurrent part.
const CONCURRENT_KEYS: usize = 20;

fn same_key_on_two_nodes_applies_once(backend: Backend) {
    let rt = runtime();
    let store = SharedStore::new(backend);
    let dir = tempfile::tempdir().unwrap();
    let a = store.start_node("n1", &dir.path().join("n1"));
    let b = store.start_node("n2", &dir.path().join("n2"));
    let payment = |key: &str| Op::new("paid", 5, Level::Replicated).keyed(key);

    // One after the other: the first node applies, the second and a retry
    // on the first say duplicate.
    let replies = rt.block_on(async {
        let mut ca = connect(&a.resp_url()).await;
        let mut cb = connect(&b.resp_url()).await;
        let op = payment("order-1");
        let mut out = Vec::new();
        for to_a in [true, false, true] {
            let conn = if to_a { &mut ca } else { &mut cb };
            let (_, duplicate) = send(conn, &op)
                .await
                .unwrap_or_else(|e| panic!("{op:?}: {e}"));
            out.push(duplicate);
        }
        out
    });
    assert_eq!(
        replies,
        [false, true, true],
        "duplicate flags of one key sent to n1, then n2, then n1 again"
    );

    // Both at once, key after key: exactly one of each pair applies.
    let pairs = rt.block_on(async {
        let mut ca = connect(&a.resp_url()).await;
        let mut cb = connect(&b.resp_url()).await;
        let mut out = Vec::new();
        for i in 0..CONCURRENT_KEYS {
            let op = payment(&format!("order-c{i}"));
            let (ra, rb) = tokio::join!(send(&mut ca, &op), send(&mut cb, &op));
            let ra = ra.unwrap_or_else(|e| panic!("{op:?} to n1: {e}"));
            let rb = rb.unwrap_or_else(|e| panic!("{op:?} to n2: {e}"));
            out.push((op.key.clone().unwrap(), ra.1, rb.1));
        }
        out
    });
    for (key, dup_a, dup_b) in &pairs {
        assert!(
            dup_a != dup_b,
            "key {key} sent to both nodes at once: duplicate flags n1={dup_a} n2={dup_b}, \
             expected exactly one applied"
        );
    }

    let total = 5 * (1 + CONCURRENT_KEYS as i64);
    // Each applied increment committed with its key, before its reply.
    let stored: i64 = store.shares("paid").values().sum();
    assert_eq!(stored, total, "the store's rows of 'paid' sum to {stored}");
    let expected = Totals::from([("paid".to_string(), total)]);
    wait_for_values_or(&rt, &[&a, &b], &expected, CACHE_MISSED_ROWS);
}

/// Connections per node and level in the outage scenario.
const OUTAGE_CONNECTIONS: usize = 2;
/// Bound on requests per connection in the outage scenario.
const OUTAGE_REQUESTS_MAX: usize = 20_000;
/// Load before the store stops, and how long it stays down.
const LOAD_BEFORE_OUTAGE: Duration = Duration::from_millis(600);
const OUTAGE: Duration = Duration::from_millis(1500);
/// Longest wait for `replicated` to succeed again once the store is back.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a client retries an increment whose outcome was unknown.
const RETRY_TIMEOUT: Duration = Duration::from_secs(15);

/// One request of the outage scenario and what became of it.
struct Attempt {
    node: usize,
    op: Op,
    started: Instant,
    latency: Duration,
    /// The duplicate flag, or the error code and message.
    result: Result<bool, (String, String)>,
}

/// Milliseconds from `origin` to `at`, negative when `at` came first.
fn offset_ms(at: Instant, origin: Instant) -> i128 {
    if at >= origin {
        (at - origin).as_millis() as i128
    } else {
        -((origin - at).as_millis() as i128)
    }
}

/// Sends increments at one level until `stop` (bounded), recording each.
async fn outage_load(
    url: String,
    node: usize,
    conn_no: usize,
    level: Level,
    stop: Arc<AtomicBool>,
    store_back: Arc<AtomicBool>,
    replicated_since_back: Arc<AtomicUsize>,
) -> Vec<Attempt> {
    let mut conn = connect(&url).await;
    let mut out = Vec::new();
    for i in 0..OUTAGE_REQUESTS_MAX {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let counter = ["hits", "spend"][i % 2];
        let mut op = Op::new(counter, 1 + (i % 4) as i64, level);
        if level == Level::Replicated {
            op = op.keyed(format!("outage-n{node}-c{conn_no}-{i}"));
        }
        let back = store_back.load(Ordering::SeqCst);
        let started = Instant::now();
        let result = send(&mut conn, &op)
            .await
            .map(|(_, dup)| dup)
            .map_err(|e| (code(&e).to_string(), e.to_string()));
        let latency = started.elapsed();
        if result.is_ok() && back && level == Level::Replicated {
            replicated_since_back.fetch_add(1, Ordering::SeqCst);
        }
        let failed = result.is_err();
        out.push(Attempt {
            node,
            op,
            started,
            latency,
            result,
        });
        if failed {
            // Refusals come fast; do not spin on them.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    out
}

/// Retries an increment with the same idempotency key, through `url`, until
/// the answer is definite: applied, or a duplicate of the earlier attempt.
/// Either way the increment counts once.
async fn retry_until_definite(url: &str, op: &Op) {
    let mut conn = connect(url).await;
    let deadline = Instant::now() + RETRY_TIMEOUT;
    loop {
        match send(&mut conn, op).await {
            Ok(_) => return,
            Err(e) => assert!(
                Instant::now() < deadline,
                "{op:?} still has no definite answer after retrying for {RETRY_TIMEOUT:?}: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn store_outage_local_continues_replicated_fails_fast() {
    let rt = runtime();
    let store = SharedStore::on_private_postgres();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes: Vec<TallyProcess> = (1..=2)
        .map(|i| store.start_node(&format!("n{i}"), &dir.path().join(format!("n{i}"))))
        .collect();
    ride_through_store_fault(
        &rt,
        &mut nodes,
        || {
            store.server().stop();
            let down_at = Instant::now();
            std::thread::sleep(OUTAGE);
            let up_at = Instant::now();
            store.server().start();
            (down_at, up_at)
        },
        |counter| store.shares(counter),
    );
}

/// Sends `local` and `replicated` increments to every node while `fault`
/// takes the store away and brings it back (returning when it went down and
/// when it began to come back), then checks: no node exited; `local` was never refused and
/// was acknowledged while the store was down; no `replicated` increment was
/// acknowledged while it was down, each was refused at once as unavailable,
/// and none was falsely answered "duplicate"; after retrying every unknown
/// outcome with its key, the store's rows (read through `shares`) and every
/// node report exactly the acknowledged totals.
fn ride_through_store_fault(
    rt: &tokio::runtime::Runtime,
    nodes: &mut [TallyProcess],
    fault: impl FnOnce() -> (Instant, Instant),
    shares: impl Fn(&str) -> BTreeMap<String, i64>,
) {
    let urls: Vec<String> = nodes.iter().map(|n| n.resp_url()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let store_back = Arc::new(AtomicBool::new(false));
    let replicated_since_back = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (n, url) in urls.iter().enumerate() {
        for c in 0..OUTAGE_CONNECTIONS {
            for level in [Level::Local, Level::Replicated] {
                tasks.push(rt.spawn(outage_load(
                    url.clone(),
                    n,
                    c,
                    level,
                    stop.clone(),
                    store_back.clone(),
                    replicated_since_back.clone(),
                )));
            }
        }
    }

    std::thread::sleep(LOAD_BEFORE_OUTAGE);
    let (down_at, up_at) = fault();
    store_back.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + RECOVERY_TIMEOUT;
    while replicated_since_back.load(Ordering::SeqCst) < 2 * OUTAGE_CONNECTIONS
        && Instant::now() < deadline
    {
        std::thread::sleep(tally_lab::testing::POLL_INTERVAL);
    }
    stop.store(true, Ordering::SeqCst);
    let attempts: Vec<Attempt> = tasks
        .into_iter()
        .flat_map(|t| rt.block_on(t).expect("a load task failed"))
        .collect();
    assert!(
        replicated_since_back.load(Ordering::SeqCst) > 0,
        "no replicated increment succeeded within {RECOVERY_TIMEOUT:?} after the store came back"
    );
    for (node, process) in nodes.iter_mut().enumerate() {
        assert!(
            process.child.try_wait().unwrap().is_none(),
            "node {node} exited during the store outage; stderr:\n{}",
            stderr_of(process)
        );
    }

    // Local: never refused, and acknowledged all through the outage.
    let local: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.op.level == Level::Local)
        .collect();
    if let Some(a) = local.iter().find(|a| a.result.is_err()) {
        panic!(
            "a local increment failed ({:?}, sent {} ms from the store's stop): {:?}",
            a.op,
            offset_ms(a.started, down_at),
            a.result
        );
    }
    let local_during = local
        .iter()
        .filter(|a| a.started >= down_at && a.started + a.latency <= up_at)
        .count();
    assert!(
        local_during > 0,
        "no local increment was acknowledged while the store was down"
    );
    // Replicated: each carries a key of its own, so a reply that says
    // "duplicate" claims an earlier application that never happened.
    let false_duplicates: Vec<String> = attempts
        .iter()
        .filter(|a| a.result == Ok(true))
        .map(|a| {
            format!(
                "{:?} to node {} answered duplicate; sent {} ms from the store's stop",
                a.op,
                a.node,
                offset_ms(a.started, down_at)
            )
        })
        .collect();
    assert!(
        false_duplicates.is_empty(),
        "replicated increments with fresh idempotency keys were answered as duplicates \
         around the outage (a false success: nothing was applied):\n{}",
        false_duplicates.join("\n")
    );
    // Replicated: every request made while the store was down was refused,
    // at once, as not applied.
    let replicated: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.op.level == Level::Replicated)
        .collect();
    let replicated_during: Vec<&&Attempt> = replicated
        .iter()
        // Answered before the store began to come back: nothing could
        // commit then.
        .filter(|a| a.started >= down_at && a.started + a.latency < up_at)
        .collect();
    assert!(
        !replicated_during.is_empty(),
        "no replicated increment was tried while the store was down"
    );
    for a in &replicated_during {
        match &a.result {
            Ok(_) => panic!(
                "{:?} to node {} was acknowledged while the store was down (a false success)",
                a.op, a.node
            ),
            Err((code, message)) => assert_eq!(
                code, "UNAVAILABLE",
                "{:?} while the store was down: expected UNAVAILABLE, got {message}",
                a.op
            ),
        }
        assert!(
            a.latency < OUTAGE_REPLY_MAX,
            "{:?} took {:?} to be refused while the store was down",
            a.op,
            a.latency
        );
    }

    // A client retries what it could not know, with the same key.
    let mut by_node: BTreeMap<String, Totals> = BTreeMap::new();
    for a in &attempts {
        let counts = match &a.result {
            Ok(_) => true,
            Err((code, _)) if code == "INDETERMINATE" => {
                let other = &urls[(a.node + 1) % urls.len()];
                rt.block_on(retry_until_definite(other, &a.op));
                true
            }
            Err((code, message)) => {
                assert_eq!(
                    code, "UNAVAILABLE",
                    "{:?}: unexpected error {message}",
                    a.op
                );
                false
            }
        };
        if counts {
            let node_id = if a.op.level == Level::Replicated {
                // A retry may have landed on the other node: only the
                // global sum is checked for these.
                "replicated".to_string()
            } else {
                nodes[a.node].node_id.clone()
            };
            *by_node
                .entry(node_id)
                .or_default()
                .entry(a.op.counter.clone())
                .or_default() += a.op.delta;
        }
    }
    // The store first, then what each node reports from it.
    let expected = global(&by_node);
    eventually_blocking(
        "after the outage the store's rows sum to the acknowledged totals",
        || {
            let stored: Totals = expected
                .keys()
                .map(|c| (c.clone(), shares(c).values().sum()))
                .collect();
            if stored == expected {
                Ok(())
            } else {
                Err(format!("expected: {expected:?}\nstored: {stored:?}"))
            }
        },
    );
    let refs: Vec<&TallyProcess> = nodes.iter().collect();
    wait_for_values_or(rt, &refs, &expected, CACHE_MISSED_ROWS);
}

/// How long the synchronous standby stays down in the stall scenario:
/// longer than a store call's bound, so that commits time out.
const STALL: Duration = Duration::from_secs(8);
/// Longest a `replicated` increment may wait for its answer while commits
/// stall: one store call's bound (5 s) for the round it is in, one for the
/// round before it, and a margin.
const STALLED_REPLY_MAX: Duration = Duration::from_secs(13);

/// A synchronous primary and its standby, private to the test, and the
/// multi-host URL of one database on them.
fn primary_with_sync_standby() -> (
    tally_lab::pgserver::PgServer,
    tally_lab::pgserver::PgServer,
    String,
) {
    use tally_lab::pgserver::{PgOptions, PgServer as Server};
    let primary = Server::new(PgOptions {
        synchronous_standby: true,
        ..PgOptions::default()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let standby = Server::new(PgOptions {
        standby_of: Some(primary.port()),
        ..PgOptions::default()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let states = eventually_blocking("the primary has a synchronous standby", || {
        let rows = primary
            .connect("postgres")
            .map_err(|e| e.to_string())?
            .query("SELECT sync_state FROM pg_stat_replication", &[])
            .map_err(|e| e.to_string())?;
        let states: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        if states.iter().any(|s| s == "sync") {
            Ok(states)
        } else {
            Err(format!("replication states {states:?}"))
        }
    });
    assert_eq!(states, ["sync"]);
    let db = primary.create_database().unwrap_or_else(|e| panic!("{e}"));
    let url = format!(
        "postgres://{}@127.0.0.1:{},127.0.0.1:{}/{db}?target_session_attrs=read-write",
        tally_lab::pgserver::SUPERUSER,
        primary.port(),
        standby.port()
    );
    (primary, standby, url)
}

/// Two nodes on `url` with the test timings, in `dir`.
fn nodes_on(url: &str, dir: &Path) -> Vec<TallyProcess> {
    (1..=2)
        .map(|i| {
            let mut args: Vec<String> = [
                "--data-dir",
                dir.join(format!("n{i}")).to_str().unwrap(),
                "--store",
                url,
                "--node-id",
                &format!("n{i}"),
            ]
            .map(String::from)
            .to_vec();
            args.extend(FAST.serve_flags());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            TallyProcess::start_with(&args, &[])
        })
        .collect()
}

/// The rows of `counter` in the store at `url`, by node; the store is
/// opened for each read, so the URL leads to whichever server is primary.
fn shares_at(url: &str, counter: &str) -> BTreeMap<String, i64> {
    store::open(url)
        .unwrap_or_else(|e| panic!("opening {url}: {e}"))
        .read_counter(counter)
        .unwrap_or_else(|e| panic!("reading {counter}: {e}"))
        .into_iter()
        .map(|r| (r.node_id, r.value))
        .collect()
}

// Proves: nodes given a multi-host store URL (`target_session_attrs=
// read-write`) ride through a failover: the primary, which waits for a
// synchronous standby on every commit, is killed with SIGKILL under load and
// the standby promoted. `local` never stops; `replicated` is refused at once
// (or its outcome is unknown, settled by a retry with its key) until the
// nodes reach the new primary; nothing acknowledged is lost or counted
// twice, in the new primary's rows and on every node.
#[test]
fn multi_host_url_rides_through_a_failover() {
    let rt = runtime();
    let (primary, standby, url) = primary_with_sync_standby();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = nodes_on(&url, dir.path());
    let http = nodes[0].http.expect("HTTP is on");
    let view = cluster_view(http);
    assert_eq!(
        view["store_replication"],
        serde_json::json!({"standbys": 1, "synchronous_standbys": 1}),
        "{view}"
    );
    assert!(view["store_warning"].is_null(), "{view}");
    ride_through_store_fault(
        &rt,
        &mut nodes,
        || {
            primary.kill9().unwrap_or_else(|e| panic!("{e}"));
            let down_at = Instant::now();
            std::thread::sleep(OUTAGE);
            // The new primary may take writes before `promote` returns.
            let back_at = Instant::now();
            standby.promote().unwrap_or_else(|e| panic!("{e}"));
            (down_at, back_at)
        },
        |counter| shares_at(&url, counter),
    );
    // The promoted standby has no standby of its own: the view says that
    // `replicated` now rests on one server.
    let view = eventually_blocking("the view reports the lone new primary", || {
        let view = cluster_view(http);
        if view["store_replication"]["synchronous_standbys"] == 0 {
            Ok(view)
        } else {
            Err(view.to_string())
        }
    });
    assert!(
        view["store_warning"]
            .as_str()
            .is_some_and(|w| w.contains("no synchronous standby")),
        "{view}"
    );
}

/// `GET /v1/cluster` on a node's HTTP address, as JSON.
fn cluster_view(http: std::net::SocketAddr) -> serde_json::Value {
    let limits = tally_lab::wire::http::Limits {
        send_timeout: REPLY_TIMEOUT,
        read_timeout: REPLY_TIMEOUT,
        response_bytes_max: 1 << 20,
    };
    let reply = tally_lab::wire::http::request(http, "GET", "/v1/cluster", None, limits)
        .unwrap_or_else(|e| panic!("GET /v1/cluster: {e}"));
    serde_json::from_str(&reply.body)
        .unwrap_or_else(|e| panic!("/v1/cluster is not JSON ({e}): {}", reply.body))
}

// Proves: when the primary cannot commit (its synchronous standby is gone),
// no node waits for it without bound or reports a false success: every
// `replicated` increment is answered within a bounded time as unavailable
// or of unknown outcome, `local` goes on, and the cluster view names the
// stall; once the standby is back, the stalled commits finish, each unknown
// outcome is settled with the server before anything else is written, and
// after retrying the unknown ones with their keys, the store's rows and
// every node report exactly the acknowledged totals.
#[test]
fn stalled_commits_are_bounded_and_settled() {
    let rt = runtime();
    let (_primary, standby, url) = primary_with_sync_standby();
    let dir = tempfile::tempdir().unwrap();
    let nodes = nodes_on(&url, dir.path());
    let urls: Vec<String> = nodes.iter().map(|n| n.resp_url()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let store_back = Arc::new(AtomicBool::new(false));
    let replicated_since_back = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (n, node_url) in urls.iter().enumerate() {
        for level in [Level::Local, Level::Replicated] {
            tasks.push(rt.spawn(outage_load(
                node_url.clone(),
                n,
                0,
                level,
                stop.clone(),
                store_back.clone(),
                replicated_since_back.clone(),
            )));
        }
    }
    std::thread::sleep(LOAD_BEFORE_OUTAGE);
    standby.kill9().unwrap_or_else(|e| panic!("{e}"));
    let down_at = Instant::now();
    let http = nodes[0].http.expect("HTTP is on");
    let stalled = eventually_blocking("the cluster view names the stall", || {
        let limits = tally_lab::wire::http::Limits {
            send_timeout: REPLY_TIMEOUT,
            read_timeout: REPLY_TIMEOUT,
            response_bytes_max: 1 << 20,
        };
        let view = tally_lab::wire::http::request(http, "GET", "/v1/cluster", None, limits)
            .map_err(|e| e.to_string())?;
        let view: serde_json::Value =
            serde_json::from_str(&view.body).map_err(|e| e.to_string())?;
        if view["replicated_available"] == false {
            Ok(view["store_error"].to_string())
        } else {
            Err(view.to_string())
        }
    });
    std::thread::sleep(STALL.saturating_sub(down_at.elapsed()));
    let up_at = Instant::now();
    standby.start().unwrap_or_else(|e| panic!("{e}"));
    store_back.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + RECOVERY_TIMEOUT + STALL;
    while replicated_since_back.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
        std::thread::sleep(tally_lab::testing::POLL_INTERVAL);
    }
    stop.store(true, Ordering::SeqCst);
    let attempts: Vec<Attempt> = tasks
        .into_iter()
        .flat_map(|t| rt.block_on(t).expect("a load task failed"))
        .collect();
    assert!(
        stalled.contains("commit") || stalled.contains("answer"),
        "the cluster view's store error does not say commits stall: {stalled}"
    );
    assert!(
        replicated_since_back.load(Ordering::SeqCst) > 0,
        "no replicated increment succeeded after the standby came back"
    );
    let mut by_node: BTreeMap<String, Totals> = BTreeMap::new();
    let mut unknown = 0;
    for a in &attempts {
        if a.op.level == Level::Local {
            assert!(a.result.is_ok(), "a local increment failed: {:?}", a.result);
        } else {
            assert!(
                a.latency < STALLED_REPLY_MAX,
                "{:?} waited {:?} for its answer",
                a.op,
                a.latency
            );
            assert_ne!(a.result, Ok(true), "{:?} falsely answered duplicate", a.op);
            let replied = a.started + a.latency;
            if a.started >= down_at && replied < up_at {
                assert!(
                    a.result.is_err(),
                    "{:?} was acknowledged while the primary could not commit",
                    a.op
                );
            }
        }
        let counts = match &a.result {
            Ok(_) => true,
            Err((code, _)) if code == "INDETERMINATE" => {
                unknown += 1;
                rt.block_on(retry_until_definite(&urls[(a.node + 1) % 2], &a.op));
                true
            }
            Err((code, message)) => {
                assert_eq!(code, "UNAVAILABLE", "{:?}: {message}", a.op);
                false
            }
        };
        if counts {
            *by_node
                .entry("all".into())
                .or_default()
                .entry(a.op.counter.clone())
                .or_default() += a.op.delta;
        }
    }
    assert!(
        unknown > 0,
        "no commit was left with an unknown outcome by the stall"
    );
    let expected = global(&by_node);
    eventually_blocking("the store's rows sum to the acknowledged totals", || {
        let stored: Totals = expected
            .keys()
            .map(|c| (c.clone(), shares_at(&url, c).values().sum()))
            .collect();
        if stored == expected {
            Ok(())
        } else {
            Err(format!("expected: {expected:?}\nstored: {stored:?}"))
        }
    });
    let refs: Vec<&TallyProcess> = nodes.iter().collect();
    wait_for_values_or(&rt, &refs, &expected, CACHE_MISSED_ROWS);
}

// ---------------------------------------------------------------------------
// Each scenario on each store
// ---------------------------------------------------------------------------

mod on_sqlite {
    use super::Backend::Sqlite;

    // Concurrent writes on three nodes: every node reports the exact global totals.
    #[test]
    fn three_nodes_report_exact_global_totals() {
        super::three_nodes_report_exact_global_totals(Sqlite);
    }

    // Every row flushed under concurrent writes reaches the other nodes' reads.
    #[test]
    fn other_nodes_read_every_flushed_row() {
        super::other_nodes_read_every_flushed_row(Sqlite);
    }

    // Restarted without its disk, a node serves every replicated increment from its first read.
    #[test]
    fn lost_disk_at_replicated_restores_before_ready() {
        super::lost_disk_at_replicated_restores_before_ready(Sqlite);
    }

    // Restarted from an old disk image, a node adopts the store's newer shard and never lowers it.
    #[test]
    fn stale_disk_never_lowers_the_store() {
        super::stale_disk_never_lowers_the_store(Sqlite);
    }

    // A second process with one node id fences the first; every durable increment counts once.
    #[test]
    fn second_process_with_same_node_id_fences_the_first() {
        super::second_process_with_same_node_id_fences_the_first(Sqlite);
    }

    // One idempotency key at replicated, sent to two nodes in turn or at once, applies once.
    #[test]
    fn same_key_on_two_nodes_applies_once() {
        super::same_key_on_two_nodes_applies_once(Sqlite);
    }
}

mod on_postgres {
    use super::Backend::Postgres;

    // Concurrent writes on three nodes: every node reports the exact global totals.
    #[test]
    fn three_nodes_report_exact_global_totals() {
        super::three_nodes_report_exact_global_totals(Postgres);
    }

    // Every row flushed under concurrent writes reaches the other nodes' reads.
    #[test]
    fn other_nodes_read_every_flushed_row() {
        super::other_nodes_read_every_flushed_row(Postgres);
    }

    // Restarted without its disk, a node serves every replicated increment from its first read.
    #[test]
    fn lost_disk_at_replicated_restores_before_ready() {
        super::lost_disk_at_replicated_restores_before_ready(Postgres);
    }

    // Restarted from an old disk image, a node adopts the store's newer shard and never lowers it.
    #[test]
    fn stale_disk_never_lowers_the_store() {
        super::stale_disk_never_lowers_the_store(Postgres);
    }

    // A second process with one node id fences the first; every durable increment counts once.
    #[test]
    fn second_process_with_same_node_id_fences_the_first() {
        super::second_process_with_same_node_id_fences_the_first(Postgres);
    }

    // One idempotency key at replicated, sent to two nodes in turn or at once, applies once.
    #[test]
    fn same_key_on_two_nodes_applies_once() {
        super::same_key_on_two_nodes_applies_once(Postgres);
    }

    // Store down: local goes on, replicated fails fast and never falsely; exact totals after.
    #[test]
    fn store_outage_local_continues_replicated_fails_fast() {
        super::store_outage_local_continues_replicated_fails_fast();
    }
}

/// A blocking RESP command on a fresh connection to `addr`.
fn resp_command(addr: std::net::SocketAddr, args: &[&str]) -> tally_lab::wire::resp::Reply {
    tally_lab::wire::resp::Client::connect_with_timeout(addr, REPLY_TIMEOUT)
        .and_then(|mut c| c.command(args))
        .unwrap_or_else(|e| panic!("{args:?} to {addr}: {e}"))
}

/// Longest a node may take to notice that its store is back (its
/// registration back-off is at most 5 s) and print its ready line.
const REGISTERED_AFTER_OUTAGE_MAX: Duration = Duration::from_secs(20);
/// How long the test keeps the store down once the node waits for it:
/// long enough for several registration attempts to fail.
const OUTAGE_AT_START: Duration = Duration::from_secs(2);

// Proves: a node started while its PostgreSQL store is down does not exit.
// It recovers locally and, until it can register, answers `/readyz` with
// 503 naming the store, `PING` with `-LOADING` and increments with
// "unavailable" (nothing applied); once the store is back it registers,
// prints its ready line and serves every increment acknowledged before.
#[test]
fn node_started_during_store_outage_waits_for_the_store() {
    use tally_lab::wire::resp::Reply;
    let server = PgServer::new();
    let url = server.url(&server.create_database());
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap();
    let base = [
        "--data-dir",
        data_dir,
        "--store",
        url.as_str(),
        "--node-id",
        "n1",
    ];
    let mut first = TallyProcess::start_with(&base, &[]);
    for _ in 0..5 {
        resp_command(first.resp.unwrap(), &["INCR", "waited"]);
    }
    assert!(first.terminate().success(), "{}", stderr_of(&first));

    server.stop();
    let [http, resp] = [0, 1].map(|_| {
        format!(
            "127.0.0.1:{}",
            tally_lab::ports::free_loopback_port().unwrap()
        )
    });
    let mut args = base.to_vec();
    args.extend(["--http-addr", http.as_str(), "--resp-addr", resp.as_str()]);
    let mut starting = TallyProcess::spawn_with(&args, &[]);
    let (http, resp) = (http.parse().unwrap(), resp.parse().unwrap());
    let limits = tally_lab::wire::http::Limits {
        send_timeout: REPLY_TIMEOUT,
        read_timeout: REPLY_TIMEOUT,
        response_bytes_max: 64 * 1024,
    };
    let readyz = eventually_blocking("/readyz answers while the store is down", || {
        tally_lab::wire::http::request(http, "GET", "/readyz", None, limits)
            .map_err(|e| e.to_string())
    });
    assert_eq!(readyz.status, 503, "{readyz:?}");
    assert!(readyz.body.contains("shared store"), "{readyz:?}");
    match resp_command(resp, &["PING"]) {
        Reply::Error(e) => assert!(e.starts_with("LOADING "), "{e}"),
        other => panic!("PING answered {other:?} before the node registered"),
    }
    match resp_command(resp, &["INCR", "waited"]) {
        Reply::Error(e) => assert!(e.starts_with("UNAVAILABLE "), "{e}"),
        other => panic!("INCR answered {other:?} before the node registered"),
    }
    std::thread::sleep(OUTAGE_AT_START);
    assert!(
        starting.child.try_wait().unwrap().is_none(),
        "the node exited while the store was down:\n{}",
        starting.stderr()
    );
    assert!(!starting.is_ready(), "ready line before registering");

    server.start();
    let mut node = starting.wait_ready(REGISTERED_AFTER_OUTAGE_MAX);
    assert_eq!(resp_command(resp, &["GET", "waited"]).text().unwrap(), "5");
    assert_eq!(
        resp_command(resp, &["INCR", "waited"]).integer().unwrap(),
        6
    );
    assert_eq!(
        tally_lab::wire::http::status(http, "/readyz", REPLY_TIMEOUT),
        Some(200)
    );
    assert!(node.terminate().success(), "{}", stderr_of(&node));
}
