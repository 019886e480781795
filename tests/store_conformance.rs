//! The shared store's contract, proven on both backends.
//!
//! Every scenario is written once against `&dyn Store` (and, where it needs
//! several processes, against a [`Target`] that opens more handles on the
//! same store) and runs twice: on an SQLite file in a temporary directory
//! and on a database of its own in a private PostgreSQL server (see
//! `support/postgres.rs`). The tests at the end are about one backend only.

use tally_lab::testing as support;

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use tally::store::{self, KeyRow, ShardRow, Store, StoreError, StoreUrl, Version, bench, schema};

/// A fresh, empty store, and how to open more handles on it (each handle
/// has its own connection, as another node process would).
struct Target {
    url: String,
    backend: Backend,
}

enum Backend {
    Sqlite {
        /// Holds the database file; removed when the test ends.
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
    },
    Postgres(&'static support::postgres::PgServer, String),
}

impl Target {
    fn sqlite() -> Target {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("store.db");
        Target {
            url: format!("sqlite://{}", path.display()),
            backend: Backend::Sqlite { _dir: dir, path },
        }
    }

    fn postgres() -> Target {
        let server = support::postgres::shared();
        let db = server.create_database();
        Target {
            url: server.url(&db),
            backend: Backend::Postgres(server, db),
        }
    }

    fn open(&self) -> Arc<dyn Store> {
        store::open(&self.url).unwrap_or_else(|e| panic!("opening {}: {e}", self.url))
    }

    /// Runs SQL on the store's database directly, bypassing tally.
    fn raw_execute(&self, sql: &str) {
        match &self.backend {
            Backend::Sqlite { path, .. } => rusqlite::Connection::open(path)
                .and_then(|c| c.execute_batch(sql))
                .expect("raw SQLite statement"),
            Backend::Postgres(server, db) => server
                .connect(db)
                .and_then(|mut c| c.batch_execute(sql))
                .expect("raw PostgreSQL statement"),
        }
    }

    /// Reads one integer with SQL, bypassing tally.
    fn raw_i64(&self, sql: &str) -> i64 {
        match &self.backend {
            Backend::Sqlite { path, .. } => rusqlite::Connection::open(path)
                .and_then(|c| c.query_row(sql, [], |r| r.get(0)))
                .expect("raw SQLite query"),
            Backend::Postgres(server, db) => server
                .connect(db)
                .and_then(|mut c| c.query_one(sql, &[]))
                .map(|r| r.get(0))
                .expect("raw PostgreSQL query"),
        }
    }
}

fn v(epoch: u64, lsn: u64) -> Version {
    Version::new(epoch, lsn)
}

/// Commits `rows` for `node` in one transaction.
fn flush(s: &dyn Store, node: &str, epoch: u64, rows: &[(&str, i64, Version)]) {
    let mut tx = s.begin(node, epoch).expect("begin");
    tx.upsert_shards(rows).expect("upsert");
    tx.commit().expect("commit");
}

/// The node's shard as counter -> (value, version).
fn shard(s: &dyn Store, node: &str) -> BTreeMap<String, (i64, Version)> {
    s.load_shard(node)
        .expect("load_shard")
        .into_iter()
        .map(|r| {
            assert_eq!(r.node_id, node, "load_shard returned another node's row");
            (r.counter, (r.value, r.version))
        })
        .collect()
}

fn key_row(key: &str, node: &str, epoch: u64, counter: &str, expires_at_ms: u64) -> KeyRow {
    KeyRow {
        key: key.into(),
        node_id: node.into(),
        epoch,
        counter: counter.into(),
        expires_at_ms,
    }
}

fn insert_keys(s: &dyn Store, node: &str, epoch: u64, keys: &[KeyRow]) -> Vec<bool> {
    let mut tx = s.begin(node, epoch).expect("begin");
    let inserted = tx.insert_keys(keys).expect("insert_keys");
    tx.commit().expect("commit");
    inserted
}

// ---------------------------------------------------------------------
// Scenarios, each run on both backends (see `conformance!` at the end).

fn register_takes_epochs_one_two_three_per_node_id(t: &Target) {
    // Each registration of a node id takes the next epoch and reports the
    // row it replaced; other node ids count on their own.
    let s = t.open();
    let first = s.register("a", "10.0.0.1:6379", 1_000).unwrap();
    assert_eq!(first.epoch, 1);
    assert_eq!(first.previous, None);
    let second = s.register("a", "10.0.0.2:6379", 2_000).unwrap();
    assert_eq!(second.epoch, 2);
    let prev = second.previous.expect("the first registration's row");
    assert_eq!((prev.epoch, prev.address.as_str()), (1, "10.0.0.1:6379"));
    assert_eq!(prev.started_at_ms, 1_000);
    assert_eq!(s.register("a", "10.0.0.2:6379", 3_000).unwrap().epoch, 3);
    assert_eq!(s.register("b", "10.0.0.3:6379", 3_000).unwrap().epoch, 1);

    let nodes = s.nodes().unwrap();
    let summary: Vec<(&str, u64, &str, u64)> = nodes
        .iter()
        .map(|n| {
            (
                n.node_id.as_str(),
                n.epoch,
                n.address.as_str(),
                n.started_at_ms,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("a", 3, "10.0.0.2:6379", 3_000),
            ("b", 1, "10.0.0.3:6379", 3_000)
        ]
    );
}

fn concurrent_registrations_of_one_id_get_distinct_epochs(t: &Target) {
    // N processes registering one node id at the same moment get N
    // different epochs: no two of them can believe they hold the same one.
    const PROCESSES: usize = 8;
    let stores: Vec<Arc<dyn Store>> = (0..PROCESSES).map(|_| t.open()).collect();
    let barrier = Arc::new(Barrier::new(PROCESSES));
    let handles: Vec<_> = stores
        .into_iter()
        .map(|s| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                s.register("same", "addr", 1).expect("register").epoch
            })
        })
        .collect();
    let mut epochs: Vec<u64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    epochs.sort_unstable();
    assert_eq!(epochs, (1..=PROCESSES as u64).collect::<Vec<_>>());
}

fn superseded_epoch_cannot_begin_or_heartbeat(t: &Target) {
    // Once a newer epoch exists, the old one can neither start a write
    // transaction nor heartbeat; the current one can do both.
    let s = t.open();
    let old = s.register("n", "addr", 1).unwrap().epoch;
    let new = s.register("n", "addr", 2).unwrap().epoch;
    let fenced = StoreError::Fenced {
        node_id: "n".into(),
        ours: old,
        current: new,
    };
    assert_eq!(s.begin("n", old).err(), Some(fenced.clone()));
    assert_eq!(s.heartbeat("n", old, 3, 0), Err(fenced));
    s.heartbeat("n", new, 3, 0).unwrap();
    s.begin("n", new).unwrap().commit().unwrap();
    // A node the store holds no row for cannot write at all: to a process
    // that holds an epoch, the store has gone back in time.
    assert!(matches!(
        s.begin("stranger", 1).err(),
        Some(StoreError::Regressed(_))
    ));
    assert!(matches!(
        s.heartbeat("stranger", 1, 3, 0),
        Err(StoreError::Regressed(_))
    ));
}

fn a_store_behind_the_process_is_reported_as_regressed(t: &Target) {
    // The store refuses, as Regressed, a process whose epoch is above the
    // node row's (the registration was lost) or that committed more than
    // the row records (the writes were lost), in begin and heartbeat
    // alike; nothing is written. Registering above the held epoch then
    // gives an epoch never handed out before.
    let s = t.open();
    let e = s.register("n", "addr", 1).unwrap().epoch;
    let mut tx = s.begin_at("n", e, Version::default()).unwrap();
    tx.upsert_shards(&[("c", 5, v(e, 9))]).unwrap();
    tx.set_marks(v(e, 9), v(e, 9), 2).unwrap();
    tx.commit().unwrap();
    assert_eq!(s.nodes().unwrap()[0].written, v(e, 9));
    // What this process committed is there: it goes on.
    s.begin_at("n", e, v(e, 9)).unwrap().commit().unwrap();
    s.heartbeat_at("n", e, v(e, 9), 3, 9).unwrap();
    // The process committed up to lsn 12, the store knows 9.
    assert!(matches!(
        s.begin_at("n", e, v(e, 12)).err(),
        Some(StoreError::Regressed(_))
    ));
    assert!(matches!(
        s.heartbeat_at("n", e, v(e, 12), 4, 12),
        Err(StoreError::Regressed(_))
    ));
    assert_eq!(s.nodes().unwrap()[0].heartbeat_at_ms, 3, "nothing written");
    // The process holds a later epoch than the row (its registration lost).
    assert!(matches!(
        s.begin_at("n", e + 3, Version::default()).err(),
        Some(StoreError::Regressed(_))
    ));
    // A row with a later epoch still fences, whatever was written.
    let newer = s.register("n", "addr", 5).unwrap().epoch;
    assert!(matches!(
        s.begin_at("n", e, v(e, 12)).err(),
        Some(StoreError::Fenced { .. })
    ));
    // Registering above an epoch the store has forgotten skips it.
    let again = s.register_above("n", "addr", 6, newer + 10).unwrap();
    assert_eq!(again.epoch, newer + 11);
    assert_eq!(again.previous.map(|p| p.written), Some(v(e, 9)));
    let fresh = s.register_above("m", "addr", 6, 41).unwrap();
    assert_eq!((fresh.epoch, fresh.previous), (42, None));
    // The written version never lowers.
    let e2 = again.epoch;
    let mut tx = s.begin_at("n", e2, Version::default()).unwrap();
    tx.set_marks(v(e2, 1), v(e, 3), 7).unwrap();
    tx.commit().unwrap();
    let row = s
        .nodes()
        .unwrap()
        .into_iter()
        .find(|r| r.node_id == "n")
        .unwrap();
    assert_eq!((row.flushed, row.written), (v(e2, 1), v(e, 9)));
}

fn registration_waits_for_an_open_transaction_of_the_old_epoch(t: &Target) {
    // A registration cannot slip in between a transaction's epoch check and
    // its commit: it waits, the old epoch's write lands first, and from then
    // on the old epoch is fenced. No old-epoch write lands after a newer
    // epoch exists.
    let old_process = t.open();
    let new_process = t.open();
    let old = old_process.register("n", "addr", 1).unwrap().epoch;
    let mut tx = old_process.begin("n", old).unwrap();
    tx.upsert_shards(&[("c", 5, v(old, 1))]).unwrap();

    let (sent, registered) = mpsc::channel();
    let registrar = std::thread::spawn(move || {
        let epoch = new_process.register("n", "addr", 2).map(|r| r.epoch);
        sent.send(epoch).unwrap();
        new_process
    });
    // Well below the SQLite busy timeout, long enough for the registration
    // to reach the lock if it is going to.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        registered.try_recv().is_err(),
        "the registration finished while a transaction of the old epoch was open"
    );
    tx.commit().expect("the old epoch's transaction commits");
    let new = registered
        .recv_timeout(Duration::from_secs(30))
        .expect("the registration finishes once the transaction ends")
        .expect("register");
    assert_eq!(new, old + 1);
    let new_process = registrar.join().unwrap();

    assert_eq!(shard(new_process.as_ref(), "n")["c"], (5, v(old, 1)));
    assert!(matches!(
        old_process.begin("n", old).err(),
        Some(StoreError::Fenced { .. })
    ));
    flush(new_process.as_ref(), "n", new, &[("c", 6, v(new, 2))]);
    assert_eq!(shard(old_process.as_ref(), "n")["c"], (6, v(new, 2)));
}

fn upsert_replaces_a_row_only_with_a_higher_version(t: &Target) {
    // A stored row changes only for a strictly higher version: equal and
    // lower versions are ignored, a newer epoch beats any lsn.
    let s = t.open();
    let e1 = s.register("n", "addr", 1).unwrap().epoch;
    flush(s.as_ref(), "n", e1, &[("c", 10, v(e1, 5))]);
    assert_eq!(shard(s.as_ref(), "n")["c"], (10, v(e1, 5)));
    flush(s.as_ref(), "n", e1, &[("c", 99, v(e1, 5))]);
    flush(s.as_ref(), "n", e1, &[("c", 7, v(e1, 4))]);
    assert_eq!(shard(s.as_ref(), "n")["c"], (10, v(e1, 5)));
    flush(s.as_ref(), "n", e1, &[("c", 11, v(e1, 6))]);
    assert_eq!(shard(s.as_ref(), "n")["c"], (11, v(e1, 6)));

    let e2 = s.register("n", "addr", 2).unwrap().epoch;
    flush(s.as_ref(), "n", e2, &[("c", 12, v(e2, 1))]);
    assert_eq!(shard(s.as_ref(), "n")["c"], (12, v(e2, 1)));
    // A row of the old epoch, however high its lsn, is older.
    flush(s.as_ref(), "n", e2, &[("c", 100, v(e1, 1_000))]);
    assert_eq!(shard(s.as_ref(), "n")["c"], (12, v(e2, 1)));
}

fn repeated_and_reordered_batches_end_the_same(t: &Target) {
    // Flushing a batch twice changes nothing, and two batches applied in
    // either order leave the same rows.
    let s = t.open();
    let ea = s.register("a", "addr", 1).unwrap().epoch;
    let eb = s.register("b", "addr", 1).unwrap().epoch;
    assert_eq!(ea, eb);
    let older = [("x", 1, v(ea, 1)), ("y", 2, v(ea, 2)), ("z", 3, v(ea, 3))];
    let newer = [("x", 4, v(ea, 4)), ("y", 5, v(ea, 5)), ("w", 6, v(ea, 6))];

    flush(s.as_ref(), "a", ea, &older);
    flush(s.as_ref(), "a", ea, &newer);
    let once = shard(s.as_ref(), "a");
    flush(s.as_ref(), "a", ea, &newer);
    flush(s.as_ref(), "a", ea, &older);
    assert_eq!(
        shard(s.as_ref(), "a"),
        once,
        "repeating batches changed rows"
    );

    flush(s.as_ref(), "b", eb, &newer);
    flush(s.as_ref(), "b", eb, &older);
    assert_eq!(
        shard(s.as_ref(), "b"),
        once,
        "the order of batches mattered"
    );
    assert_eq!(once["z"], (3, v(ea, 3)));
    assert_eq!(once["x"], (4, v(ea, 4)));
}

fn a_batch_naming_a_counter_twice_keeps_the_higher_version(t: &Target) {
    // Within one batch, a counter named twice ends at its higher version,
    // whichever comes first.
    let s = t.open();
    let e = s.register("n", "addr", 1).unwrap().epoch;
    flush(
        s.as_ref(),
        "n",
        e,
        &[
            ("c", 1, v(e, 9)),
            ("d", 5, v(e, 1)),
            ("c", 2, v(e, 3)),
            ("d", 6, v(e, 2)),
        ],
    );
    let rows = shard(s.as_ref(), "n");
    assert_eq!(rows["c"], (1, v(e, 9)));
    assert_eq!(rows["d"], (6, v(e, 2)));
    assert_eq!(rows.len(), 2);
}

fn a_version_from_a_later_epoch_is_refused_and_nothing_commits(t: &Target) {
    // A row versioned above the writer's epoch would outrank every later
    // write: it is refused, and the failed transaction cannot commit the
    // part of the work done before the failure.
    let s = t.open();
    let e = s.register("n", "addr", 1).unwrap().epoch;
    let mut tx = s.begin("n", e).unwrap();
    tx.upsert_shards(&[("ok", 1, v(e, 1))]).unwrap();
    assert!(matches!(
        tx.upsert_shards(&[("bad", 1, v(e + 1, 1))]),
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        tx.upsert_shards(&[("later", 1, v(e, 2))]),
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(tx.commit(), Err(StoreError::Unavailable(_))));
    assert!(shard(s.as_ref(), "n").is_empty());
    // The store is usable again at once.
    flush(s.as_ref(), "n", e, &[("ok", 1, v(e, 1))]);
    assert_eq!(shard(s.as_ref(), "n").len(), 1);
}

fn dropping_a_transaction_rolls_it_back(t: &Target) {
    // A transaction dropped without commit leaves nothing behind and does
    // not block the next one.
    let s = t.open();
    let e = s.register("n", "addr", 1).unwrap().epoch;
    {
        let mut tx = s.begin("n", e).unwrap();
        tx.upsert_shards(&[("c", 1, v(e, 1))]).unwrap();
        tx.set_flushed(v(e, 1), 5).unwrap();
    }
    assert!(shard(s.as_ref(), "n").is_empty());
    assert_eq!(s.nodes().unwrap()[0].flushed, Version::default());
    flush(s.as_ref(), "n", e, &[("c", 2, v(e, 2))]);
    assert_eq!(shard(s.as_ref(), "n")["c"], (2, v(e, 2)));
}

/// Writes 40 counters for node `n`, each at its own lsn, in shuffled order
/// and two batches; returns the rows sorted by version.
fn write_shuffled(s: &dyn Store, e: u64) -> Vec<(String, i64, Version)> {
    let mut rows: Vec<(String, i64, Version)> = (0..40u64)
        .map(|i| {
            // A fixed permutation of 1..=40 (7 is coprime with 40).
            let lsn = (i * 7) % 40 + 1;
            (format!("c{i:02}"), i as i64 * 10, v(e, lsn))
        })
        .collect();
    for half in rows.chunks(20) {
        let batch: Vec<(&str, i64, Version)> = half
            .iter()
            .map(|(c, x, ver)| (c.as_str(), *x, *ver))
            .collect();
        flush(s, "n", e, &batch);
    }
    rows.sort_by_key(|r| r.2);
    rows
}

fn changes_since_returns_rows_above_the_cursor_in_order(t: &Target) {
    // changes_since returns exactly this node's rows above the cursor, in
    // version order, at most `limit` of them.
    let s = t.open();
    let e = s.register("n", "addr", 1).unwrap().epoch;
    let other = s.register("other", "addr", 1).unwrap().epoch;
    flush(s.as_ref(), "other", other, &[("c00", 1, v(other, 100))]);
    let expected = write_shuffled(s.as_ref(), e);
    let as_tuples = |rows: Vec<ShardRow>| -> Vec<(String, i64, Version)> {
        rows.into_iter()
            .map(|r| {
                assert_eq!(r.node_id, "n");
                (r.counter, r.value, r.version)
            })
            .collect()
    };

    let all = as_tuples(s.changes_since("n", Version::default(), 1_000).unwrap());
    assert_eq!(all, expected);
    let page = as_tuples(s.changes_since("n", v(e, 20), 10).unwrap());
    assert_eq!(page, expected[20..30].to_vec());
    let tail = as_tuples(s.changes_since("n", v(e, 35), 10).unwrap());
    assert_eq!(tail, expected[35..].to_vec());
    assert!(s.changes_since("n", v(e, 40), 10).unwrap().is_empty());
    assert!(s.changes_since("n", v(e + 1, 0), 10).unwrap().is_empty());
    assert!(
        s.changes_since("n", Version::default(), 0)
            .unwrap()
            .is_empty()
    );
}

fn walking_changes_since_visits_every_row_once(t: &Target) {
    // Paging with the last row's version as the cursor visits every row
    // exactly once, even where rows share a version and a page boundary
    // falls among them.
    let s = t.open();
    let e = s.register("n", "addr", 1).unwrap().epoch;
    let mut expected = write_shuffled(s.as_ref(), e);
    // Five counters written at one version, as a flush that stamps a whole
    // batch with one version would.
    let shared: Vec<(String, i64, Version)> =
        (0..5).map(|i| (format!("same{i}"), i, v(e, 50))).collect();
    let batch: Vec<(&str, i64, Version)> = shared
        .iter()
        .map(|(c, x, ver)| (c.as_str(), *x, *ver))
        .collect();
    flush(s.as_ref(), "n", e, &batch);
    expected.extend(shared);

    for limit in [1, 3, 7, 100] {
        let mut seen: Vec<(String, i64, Version)> = Vec::new();
        let mut cursor = Version::default();
        loop {
            let page = s.changes_since("n", cursor, limit).unwrap();
            let Some(last) = page.last() else { break };
            cursor = last.version;
            // Only a run of rows sharing the last version may go past the
            // limit.
            let beyond = page.len().saturating_sub(limit);
            assert!(
                page[page.len() - 1 - beyond..]
                    .iter()
                    .all(|r| r.version == cursor),
                "a page went past its limit of {limit} with rows of other versions"
            );
            seen.extend(page.into_iter().map(|r| (r.counter, r.value, r.version)));
        }
        let mut want = expected.clone();
        want.sort();
        seen.sort();
        assert_eq!(seen, want, "walking with limit {limit}");
    }
}

fn load_shard_and_read_counter_return_the_right_rows(t: &Target) {
    // load_shard returns one node's rows, read_counter one counter's rows
    // across nodes, so the counter's global value is their sum.
    let s = t.open();
    let ea = s.register("a", "addr", 1).unwrap().epoch;
    let eb = s.register("b", "addr", 1).unwrap().epoch;
    flush(
        s.as_ref(),
        "a",
        ea,
        &[("hits", 3, v(ea, 1)), ("errs", -2, v(ea, 2))],
    );
    flush(s.as_ref(), "b", eb, &[("hits", 4, v(eb, 7))]);

    let a = shard(s.as_ref(), "a");
    assert_eq!(a.len(), 2);
    assert_eq!(a["errs"], (-2, v(ea, 2)));
    assert!(shard(s.as_ref(), "nobody").is_empty());

    let mut hits = s.read_counter("hits").unwrap();
    hits.sort_by(|x, y| x.node_id.cmp(&y.node_id));
    let hits: Vec<(&str, i64)> = hits.iter().map(|r| (r.node_id.as_str(), r.value)).collect();
    assert_eq!(hits, vec![("a", 3), ("b", 4)]);
    assert_eq!(hits.iter().map(|h| h.1).sum::<i64>(), 7);
    assert!(s.read_counter("missing").unwrap().is_empty());
}

fn keys_are_recorded_once_across_nodes_and_within_a_batch(t: &Target) {
    // A key is inserted once: a repeat within one call, or from another
    // node, reports false, and key() names the node that recorded it.
    let s = t.open();
    let ea = s.register("a", "addr", 1).unwrap().epoch;
    let eb = s.register("b", "addr", 1).unwrap().epoch;
    let inserted = insert_keys(
        s.as_ref(),
        "a",
        ea,
        &[
            key_row("k1", "a", ea, "hits", 9_000),
            key_row("k2", "a", ea, "errs", 9_000),
            key_row("k1", "a", ea, "other", 9_500),
        ],
    );
    assert_eq!(inserted, vec![true, true, false]);
    let inserted = insert_keys(
        s.as_ref(),
        "b",
        eb,
        &[
            key_row("k2", "b", eb, "hits", 9_000),
            key_row("k3", "b", eb, "hits", 9_000),
        ],
    );
    assert_eq!(inserted, vec![false, true]);

    assert_eq!(
        s.key("k1").unwrap(),
        Some(key_row("k1", "a", ea, "hits", 9_000))
    );
    assert_eq!(
        s.key("k2").unwrap(),
        Some(key_row("k2", "a", ea, "errs", 9_000))
    );
    assert_eq!(
        s.key("k3").unwrap(),
        Some(key_row("k3", "b", eb, "hits", 9_000))
    );
    assert_eq!(s.key("k4").unwrap(), None);

    // A key must carry the writer's node id and epoch.
    let mut tx = s.begin("a", ea).unwrap();
    assert!(matches!(
        tx.insert_keys(&[key_row("k5", "b", eb, "hits", 9_000)]),
        Err(StoreError::Invalid(_))
    ));
    drop(tx);
    assert_eq!(s.key("k5").unwrap(), None);
}

fn keys_and_shards_commit_together(t: &Target) {
    // Keys and the rows they guard commit in one transaction, or neither.
    let s = t.open();
    let e = s.register("n", "addr", 1).unwrap().epoch;
    {
        let mut tx = s.begin("n", e).unwrap();
        tx.insert_keys(&[key_row("k", "n", e, "c", 9_000)]).unwrap();
        tx.upsert_shards(&[("c", 1, v(e, 1))]).unwrap();
    }
    assert_eq!(s.key("k").unwrap(), None);
    assert!(shard(s.as_ref(), "n").is_empty());
    let mut tx = s.begin("n", e).unwrap();
    assert_eq!(
        tx.insert_keys(&[key_row("k", "n", e, "c", 9_000)]).unwrap(),
        vec![true]
    );
    tx.upsert_shards(&[("c", 1, v(e, 1))]).unwrap();
    tx.commit().unwrap();
    assert!(s.key("k").unwrap().is_some());
    assert_eq!(shard(s.as_ref(), "n")["c"], (1, v(e, 1)));
}

fn expired_keys_are_purged_oldest_first_then_insertable_again(t: &Target) {
    // Purging removes only keys expired at `now`, oldest first, at most
    // `limit` per call; a purged key can be recorded again.
    let s = t.open();
    let ea = s.register("a", "addr", 1).unwrap().epoch;
    let eb = s.register("b", "addr", 1).unwrap().epoch;
    insert_keys(
        s.as_ref(),
        "a",
        ea,
        &[
            key_row("k3", "a", ea, "c", 3_000),
            key_row("k1", "a", ea, "c", 1_000),
            key_row("k2", "a", ea, "c", 2_000),
        ],
    );
    assert_eq!(s.purge_expired_keys(999, 10).unwrap(), 0);
    assert_eq!(s.purge_expired_keys(1_000, 10).unwrap(), 1);
    assert_eq!(s.key("k1").unwrap(), None);
    assert!(s.key("k2").unwrap().is_some());
    assert_eq!(s.purge_expired_keys(5_000, 0).unwrap(), 0);
    assert_eq!(s.purge_expired_keys(5_000, 1).unwrap(), 1);
    assert_eq!(s.key("k2").unwrap(), None, "the oldest goes first");
    assert!(s.key("k3").unwrap().is_some());
    assert_eq!(s.purge_expired_keys(5_000, 10).unwrap(), 1);
    assert_eq!(s.key("k3").unwrap(), None);

    let again = insert_keys(s.as_ref(), "b", eb, &[key_row("k1", "b", eb, "c", 9_000)]);
    assert_eq!(again, vec![true]);
    assert_eq!(s.key("k1").unwrap().map(|k| k.node_id), Some("b".into()));
}

fn delete_keys_removes_only_this_nodes_keys(t: &Target) {
    // A node deletes the keys it recorded, never another node's.
    let s = t.open();
    let ea = s.register("a", "addr", 1).unwrap().epoch;
    let eb = s.register("b", "addr", 1).unwrap().epoch;
    insert_keys(s.as_ref(), "a", ea, &[key_row("ka", "a", ea, "c", 9_000)]);
    insert_keys(s.as_ref(), "b", eb, &[key_row("kb", "b", eb, "c", 9_000)]);
    let mut tx = s.begin("a", ea).unwrap();
    tx.delete_keys(&["ka", "kb", "absent"]).unwrap();
    tx.commit().unwrap();
    assert_eq!(s.key("ka").unwrap(), None);
    assert!(s.key("kb").unwrap().is_some());
}

fn set_flushed_never_lowers(t: &Target) {
    // The flushed version and heartbeat time only move forward, and the
    // next registration reports them as the previous row.
    let s = t.open();
    let e = s.register("n", "addr", 1).unwrap().epoch;
    let set = |flushed: Version, now_ms: u64| {
        let mut tx = s.begin("n", e).unwrap();
        tx.set_flushed(flushed, now_ms).unwrap();
        tx.commit().unwrap();
        let row = s.nodes().unwrap().remove(0);
        (row.flushed, row.heartbeat_at_ms)
    };
    assert_eq!(set(v(e, 10), 100), (v(e, 10), 100));
    assert_eq!(set(v(e, 5), 50), (v(e, 10), 100));
    assert_eq!(set(v(e, 10), 60), (v(e, 10), 100));
    assert_eq!(set(v(e, 11), 200), (v(e, 11), 200));
    let again = s.register("n", "addr", 300).unwrap();
    assert_eq!(again.previous.map(|p| p.flushed), Some(v(e, 11)));
    assert_eq!(again.epoch, e + 1);
    let e2 = again.epoch;
    let mut tx = s.begin("n", e2).unwrap();
    tx.set_flushed(v(e2, 1), 400).unwrap();
    tx.commit().unwrap();
    assert_eq!(s.nodes().unwrap()[0].flushed, v(e2, 1));
}

fn heartbeat_records_time_and_applied_lsn(t: &Target) {
    // A heartbeat stores the time and applied lsn, and the next
    // registration reports them as the previous row.
    let s = t.open();
    let e = s.register("n", "addr", 1).unwrap().epoch;
    s.heartbeat("n", e, 777, 42).unwrap();
    let row = s.nodes().unwrap().remove(0);
    assert_eq!((row.heartbeat_at_ms, row.applied_lsn), (777, 42));
    let again = s.register("n", "addr", 900).unwrap();
    let prev = again.previous.unwrap();
    assert_eq!((prev.heartbeat_at_ms, prev.applied_lsn), (777, 42));
    let row = s.nodes().unwrap().remove(0);
    assert_eq!((row.started_at_ms, row.heartbeat_at_ms), (900, 900));
}

fn values_the_store_cannot_hold_are_refused(t: &Target) {
    // Epochs, lsns and times above i64::MAX are refused, never wrapped
    // into negative numbers that would sort first.
    let s = t.open();
    let e = s.register("n", "addr", 1).unwrap().epoch;
    let huge = store::STORED_INT_MAX + 1;
    assert!(matches!(
        s.register("n", "addr", huge),
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        s.heartbeat("n", e, 1, huge),
        Err(StoreError::Invalid(_))
    ));
    let mut tx = s.begin("n", e).unwrap();
    assert!(matches!(
        tx.upsert_shards(&[("c", 1, v(e, huge))]),
        Err(StoreError::Invalid(_))
    ));
}

fn a_large_flush_commits_whole(t: &Target) {
    // A 100,000-row flush in one transaction commits and reads back whole.
    const ROWS: usize = 100_000;
    let s = t.open();
    let m = bench::measure_flush(s.as_ref(), "big", ROWS, ROWS).unwrap();
    eprintln!(
        "{}: flushed {} rows in {} transaction(s) in {:?}: {:.0} rows/s",
        s.backend(),
        m.rows,
        m.batches,
        m.elapsed,
        m.rows_per_s()
    );
    assert_eq!(m.batches, 1);
    let rows = s.load_shard("big").unwrap();
    assert_eq!(rows.len(), ROWS);
    assert!(rows.iter().all(|r| r.value as u64 == r.version.lsn));
    assert_eq!(s.nodes().unwrap()[0].flushed.lsn, ROWS as u64);
}

fn a_schema_newer_than_the_build_is_refused(t: &Target) {
    // A store migrated by a newer build is refused with a clear message
    // instead of being written with outdated assumptions.
    drop(t.open());
    t.raw_execute(&format!(
        "INSERT INTO tally_schema_version (version, applied_at_ms) VALUES ({}, 0)",
        schema::SCHEMA_VERSION + 1
    ));
    match store::open(&t.url) {
        Err(StoreError::Invalid(msg)) => {
            assert!(msg.contains("newer"), "unclear message: {msg}");
            assert!(msg.contains("upgrade tally"), "unclear message: {msg}");
        }
        Err(e) => panic!("expected Invalid, got {e:?}"),
        Ok(_) => panic!("a store with a newer schema was opened"),
    }
}

fn a_version_one_store_is_migrated_in_place(t: &Target) {
    // A store written by a build that knew schema version 1 keeps its
    // rows: opening it adds the written version (as (0, 0), nothing known
    // to be written) and the node registers on.
    let v1 = &schema::MIGRATIONS[0];
    assert_eq!(v1.version, 1);
    let script = match t.backend {
        Backend::Sqlite { .. } => v1.sqlite,
        Backend::Postgres(..) => v1.postgres,
    };
    t.raw_execute(&format!(
        "{}; {script}; INSERT INTO tally_schema_version (version, applied_at_ms) VALUES (1, 0); \
         INSERT INTO tally_nodes (node_id, epoch, address, started_at_ms, heartbeat_at_ms, \
         flushed_epoch, flushed_lsn, applied_lsn) VALUES ('n', 4, 'addr', 1, 1, 4, 9, 9); \
         INSERT INTO tally_shards (counter, node_id, value, epoch, lsn) VALUES ('c', 'n', 7, 4, 9);",
        schema::VERSION_TABLE
    ));
    let s = t.open();
    assert_eq!(
        t.raw_i64("SELECT MAX(version) FROM tally_schema_version"),
        schema::SCHEMA_VERSION as i64
    );
    let row = s.nodes().unwrap().remove(0);
    assert_eq!((row.epoch, row.flushed, row.written), (4, v(4, 9), v(0, 0)));
    assert_eq!((row.state, row.pid), (store::NodeState::Running, 0));
    assert_eq!(shard(s.as_ref(), "n")["c"], (7, v(4, 9)));
    let e = s.register("n", "addr", 2).unwrap().epoch;
    assert_eq!(e, 5);
    flush(s.as_ref(), "n", e, &[("c", 8, v(e, 1))]);
    assert_eq!(shard(s.as_ref(), "n")["c"], (8, v(e, 1)));
}

fn racing_migrators_on_a_fresh_store_all_succeed(t: &Target) {
    // Several nodes starting at once against an empty store all open it,
    // and each migration is recorded once.
    const PROCESSES: usize = 6;
    let barrier = Arc::new(Barrier::new(PROCESSES));
    let handles: Vec<_> = (0..PROCESSES)
        .map(|_| {
            let barrier = barrier.clone();
            let url = t.url.clone();
            std::thread::spawn(move || {
                barrier.wait();
                store::open(&url).map(|_| ())
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap().expect("a racing migrator failed");
    }
    assert_eq!(
        t.raw_i64("SELECT COUNT(*) FROM tally_schema_version"),
        schema::SCHEMA_VERSION as i64
    );
    assert_eq!(
        t.raw_i64("SELECT MAX(version) FROM tally_schema_version"),
        schema::SCHEMA_VERSION as i64
    );
}

/// The counter's value as the store says: the sum of its rows' counted
/// values.
fn counted(s: &dyn Store, counter: &str) -> i64 {
    s.read_counter(counter)
        .expect("read_counter")
        .iter()
        .map(ShardRow::counted)
        .sum()
}

/// Deletes `counter` as `node` in a transaction of its own.
fn delete(s: &dyn Store, node: &str, epoch: u64, counter: &str) -> Option<store::DeletedCounter> {
    let mut tx = s.begin(node, epoch).expect("begin");
    let d = tx
        .delete_counter(counter, 1_000, None)
        .expect("delete_counter");
    tx.commit().expect("commit");
    d
}

fn a_delete_erases_every_row_and_later_writes_count_from_there(t: &Target) {
    // Two nodes hold rows; a delete by one erases both, reports the sum,
    // and each node's later writes count only what they add. A write of
    // an older version (a zombie flush) changes nothing.
    let s = t.open();
    let (a, b) = (
        s.register("a", "x", 1).unwrap().epoch,
        s.register("b", "x", 1).unwrap().epoch,
    );
    flush(
        s.as_ref(),
        "a",
        a,
        &[("c", 5, v(a, 3)), ("other", 9, v(a, 4))],
    );
    flush(s.as_ref(), "b", b, &[("c", -2, v(b, 7))]);
    assert_eq!(counted(s.as_ref(), "c"), 3);
    let d = delete(s.as_ref(), "a", a, "c").expect("rows to delete");
    assert_eq!(d.erased, 3);
    let mut rows: Vec<(String, i64, i64)> = d
        .rows
        .iter()
        .map(|r| (r.node_id.clone(), r.value, r.base))
        .collect();
    rows.sort();
    assert_eq!(rows, vec![("a".into(), 5, 5), ("b".into(), -2, -2)]);
    assert_eq!(counted(s.as_ref(), "c"), 0);
    assert_eq!(counted(s.as_ref(), "other"), 9, "only the named counter");
    // Later flushes: b adds 4 past its row's value; a's zombie write of
    // an older version is ignored.
    flush(s.as_ref(), "b", b, &[("c", 2, v(b, 8))]);
    flush(s.as_ref(), "a", a, &[("c", 1, v(a, 2))]);
    assert_eq!(counted(s.as_ref(), "c"), 4);
    // The base survives a new epoch of the node and its restored shard.
    let a2 = s.register("a", "x", 2).unwrap().epoch;
    let own: Vec<ShardRow> = s.load_shard("a").unwrap();
    let c = own.iter().find(|r| r.counter == "c").unwrap();
    assert_eq!((c.value, c.base), (5, 5));
    flush(s.as_ref(), "a", a2, &[("c", 6, v(a2, 1))]);
    assert_eq!(counted(s.as_ref(), "c"), 5);
    // Deleting a counter no node holds erases nothing and records nothing.
    assert_eq!(delete(s.as_ref(), "a", a2, "never"), None);
    assert_eq!(
        s.deleted_since(0, 10).unwrap().len(),
        2,
        "the two rows of c"
    );
}

fn deletes_are_read_back_in_sequence_with_every_row(t: &Target) {
    // deleted_since pages through deletes in order, each with every row of
    // its counter; deleting a counter again moves it to the end.
    let s = t.open();
    let a = s.register("a", "x", 1).unwrap().epoch;
    let b = s.register("b", "x", 1).unwrap().epoch;
    for (i, c) in ["c1", "c2", "c3"].iter().enumerate() {
        flush(s.as_ref(), "a", a, &[(c, 10, v(a, i as u64 + 1))]);
        flush(s.as_ref(), "b", b, &[(c, 20, v(b, i as u64 + 1))]);
    }
    for c in ["c1", "c2", "c3"] {
        delete(s.as_ref(), "b", b, c).unwrap();
    }
    let all = s.deleted_since(0, 10).unwrap();
    let order: Vec<(u64, &str, &str)> = all
        .iter()
        .map(|(seq, r)| (*seq, r.counter.as_str(), r.node_id.as_str()))
        .collect();
    assert_eq!(order.len(), 6);
    assert!(
        order.windows(2).all(|w| w[0].0 <= w[1].0),
        "in sequence order: {order:?}"
    );
    assert_eq!(
        order.iter().map(|o| o.1).collect::<Vec<_>>(),
        vec!["c1", "c1", "c2", "c2", "c3", "c3"]
    );
    assert!(
        all.iter()
            .all(|(_, r)| r.base == r.value && r.counted() == 0)
    );
    // A page of one delete holds both its rows; the next starts after it.
    let first = s.deleted_since(0, 1).unwrap();
    assert_eq!(first.len(), 2);
    let next = s.deleted_since(first[0].0, 1).unwrap();
    assert_eq!(
        next.iter()
            .map(|(_, r)| r.counter.as_str())
            .collect::<Vec<_>>(),
        vec!["c2", "c2"]
    );
    // Deleted again: c1 comes last, once.
    flush(s.as_ref(), "a", a, &[("c1", 15, v(a, 9))]);
    delete(s.as_ref(), "a", a, "c1").unwrap();
    let last_seq = all.last().unwrap().0;
    let again = s.deleted_since(last_seq, 10).unwrap();
    assert_eq!(again.len(), 2);
    assert!(
        again
            .iter()
            .all(|(seq, r)| r.counter == "c1" && *seq > last_seq)
    );
    assert_eq!(
        s.deleted_since(0, 10).unwrap().len(),
        6,
        "one entry per counter"
    );
}

fn a_delete_in_a_failed_transaction_changes_nothing(t: &Target) {
    // A transaction that deletes and is then dropped leaves every base and
    // the deletes as they were; a fenced node cannot delete.
    let s = t.open();
    let a = s.register("a", "x", 1).unwrap().epoch;
    flush(s.as_ref(), "a", a, &[("c", 5, v(a, 1))]);
    {
        let mut tx = s.begin("a", a).unwrap();
        assert!(tx.delete_counter("c", 1, None).unwrap().is_some());
    }
    assert_eq!(counted(s.as_ref(), "c"), 5);
    assert!(s.deleted_since(0, 10).unwrap().is_empty());
    let _newer = s.register("a", "x", 2).unwrap();
    assert!(matches!(s.begin("a", a), Err(StoreError::Fenced { .. })));
    assert_eq!(counted(s.as_ref(), "c"), 5);
}

fn a_delete_waits_for_a_flush_of_the_counter_and_counts_it(t: &Target) {
    // A flush of another node holding the counter's row commits first or
    // after, never half: the erased value and what is left always add up
    // to what the rows held.
    let s = t.open();
    let other = t.open();
    let a = s.register("a", "x", 1).unwrap().epoch;
    let b = other.register("b", "x", 1).unwrap().epoch;
    flush(s.as_ref(), "a", a, &[("c", 1, v(a, 1))]);
    flush(other.as_ref(), "b", b, &[("c", 1, v(b, 1))]);
    let (tx_done, rx_done) = mpsc::channel();
    let writer = {
        let other = other.clone();
        std::thread::spawn(move || {
            for lsn in 2..=200u64 {
                flush(other.as_ref(), "b", b, &[("c", lsn as i64, v(b, lsn))]);
            }
            tx_done.send(()).unwrap();
        })
    };
    let mut erased = 0;
    for _ in 0..20 {
        if let Some(d) = delete(s.as_ref(), "a", a, "c") {
            erased += d.erased;
        }
        if rx_done.try_recv().is_ok() {
            break;
        }
    }
    writer.join().unwrap();
    // b's row ends at 200, a's at 1: every unit is either erased or left.
    assert_eq!(erased + counted(s.as_ref(), "c"), 201);
}

fn a_node_row_records_its_process_and_state(t: &Target) {
    // Registering records this process and the state running; the state
    // changes only for the epoch that holds the row, and a new
    // registration makes it running again.
    let s = t.open();
    let e = s.register("n", "addr", 1).unwrap().epoch;
    let row = s.nodes().unwrap().remove(0);
    let (host, pid) = store::this_process();
    assert_eq!(
        (row.state, row.host.as_str(), row.pid),
        (store::NodeState::Running, host.as_str(), pid)
    );
    assert!(
        !s.set_node_state("n", e + 1, store::NodeState::Stopped)
            .unwrap()
    );
    assert!(
        !s.set_node_state("other", e, store::NodeState::Stopped)
            .unwrap()
    );
    assert!(s.set_node_state("n", e, store::NodeState::Stopped).unwrap());
    assert_eq!(s.nodes().unwrap()[0].state, store::NodeState::Stopped);
    assert!(s.set_node_state("n", e, store::NodeState::Retired).unwrap());
    assert_eq!(s.nodes().unwrap()[0].state, store::NodeState::Retired);
    s.register("n", "addr", 2).unwrap();
    assert_eq!(s.nodes().unwrap()[0].state, store::NodeState::Running);
}

fn expiries_are_set_under_their_condition_and_read_back(t: &Target) {
    // The Redis options, judged by the store: NX only without an expiry,
    // XX only with one, GT only later (never without one), LT only
    // earlier (always without one).
    use store::ExpireIf::*;
    let s = t.open();
    assert_eq!(s.expiry("c").unwrap(), None);
    assert!(!s.set_expiry("c", 500, HasExpiry).unwrap());
    assert!(!s.set_expiry("c", 500, Later).unwrap());
    assert_eq!(s.expiry("c").unwrap(), None);
    assert!(s.set_expiry("c", 500, NoExpiry).unwrap());
    assert!(!s.set_expiry("c", 400, NoExpiry).unwrap());
    assert_eq!(s.expiry("c").unwrap(), Some(500));
    assert!(!s.set_expiry("c", 400, Later).unwrap());
    assert!(s.set_expiry("c", 600, Later).unwrap());
    assert!(!s.set_expiry("c", 700, Earlier).unwrap());
    assert!(s.set_expiry("c", 300, Earlier).unwrap());
    assert_eq!(s.expiry("c").unwrap(), Some(300));
    assert!(s.set_expiry("c", 350, HasExpiry).unwrap());
    assert!(s.set_expiry("c", 900, Always).unwrap());
    assert_eq!(s.expiry("c").unwrap(), Some(900));
    assert!(s.clear_expiry("c").unwrap());
    assert!(!s.clear_expiry("c").unwrap());
    assert_eq!(s.expiry("c").unwrap(), None);
    assert!(s.set_expiry("d", 100, Earlier).unwrap());
    assert_eq!(s.expiry("d").unwrap(), Some(100));
    assert!(matches!(
        s.set_expiry("d", 0, Always),
        Err(StoreError::Invalid(_))
    ));
}

/// Deletes `counter` as `node`, as the sweep of the expiry `at`.
fn expire(s: &dyn Store, node: &str, epoch: u64, counter: &str, at: u64) -> Option<i64> {
    let mut tx = s.begin(node, epoch).expect("begin");
    let d = tx
        .delete_counter(counter, 1_000, Some(at))
        .expect("delete_counter");
    tx.commit().expect("commit");
    d.map(|d| d.erased)
}

fn an_expiry_is_swept_once_and_only_while_it_stands(t: &Target) {
    let s = t.open();
    let a = s.register("a", "x", 1).unwrap().epoch;
    let b = s.register("b", "x", 1).unwrap().epoch;
    flush(
        s.as_ref(),
        "a",
        a,
        &[("w", 5, v(a, 1)), ("x", 7, v(a, 2)), ("y", 1, v(a, 3))],
    );
    flush(s.as_ref(), "b", b, &[("w", 3, v(b, 1))]);
    for (c, at) in [("w", 200), ("x", 100), ("y", 5_000)] {
        assert!(s.set_expiry(c, at, store::ExpireIf::Always).unwrap());
    }
    // Due ones, earliest first, paged.
    let due = |now, limit| s.due_expiries(now, limit).unwrap();
    assert_eq!(due(1_000, 10), vec![("x".into(), 100), ("w".into(), 200)]);
    assert_eq!(due(1_000, 1), vec![("x".into(), 100)]);
    assert_eq!(due(50, 10), vec![]);
    // A sweep naming an expiry the counter no longer has changes nothing.
    assert_eq!(expire(s.as_ref(), "a", a, "w", 199), None);
    assert_eq!(counted(s.as_ref(), "w"), 8);
    assert_eq!(s.expiry("w").unwrap(), Some(200));
    // The right one deletes, and takes the expiry with it...
    assert_eq!(expire(s.as_ref(), "b", b, "w", 200), Some(8));
    assert_eq!(counted(s.as_ref(), "w"), 0);
    assert_eq!(s.expiry("w").unwrap(), None);
    // ...so a second node sweeping the same expiry erases nothing more:
    // what b added since stays.
    flush(s.as_ref(), "b", b, &[("w", 5, v(b, 2))]);
    assert_eq!(expire(s.as_ref(), "a", a, "w", 200), None);
    assert_eq!(counted(s.as_ref(), "w"), 2);
    // A plain delete clears the counter's expiry.
    assert_eq!(delete(s.as_ref(), "a", a, "y").map(|d| d.erased), Some(1));
    assert_eq!(s.expiry("y").unwrap(), None);
    assert_eq!(due(10_000, 10), vec![("x".into(), 100)]);

    // Two nodes sweeping one expiry at once, each on its own connection:
    // exactly one deletes.
    let erased: Vec<Option<i64>> = std::thread::scope(|scope| {
        let barrier = Arc::new(Barrier::new(2));
        let handles: Vec<_> = [("a", a), ("b", b)]
            .into_iter()
            .map(|(node, epoch)| {
                let store = t.open();
                let barrier = barrier.clone();
                scope.spawn(move || {
                    barrier.wait();
                    expire(store.as_ref(), node, epoch, "x", 100)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut erased: Vec<Option<i64>> = erased;
    erased.sort();
    assert_eq!(erased, vec![None, Some(7)]);
    assert_eq!(counted(s.as_ref(), "x"), 0);
    assert_eq!(due(10_000, 10), vec![]);
}

/// Runs each scenario on both backends, as `sqlite::NAME` and
/// `postgres::NAME`.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $name() { super::$name(&super::Target::sqlite()) } )*
        }
        mod postgres {
            $( #[test] fn $name() { super::$name(&super::Target::postgres()) } )*
        }
    };
}

conformance!(
    register_takes_epochs_one_two_three_per_node_id,
    concurrent_registrations_of_one_id_get_distinct_epochs,
    superseded_epoch_cannot_begin_or_heartbeat,
    a_store_behind_the_process_is_reported_as_regressed,
    a_version_one_store_is_migrated_in_place,
    registration_waits_for_an_open_transaction_of_the_old_epoch,
    upsert_replaces_a_row_only_with_a_higher_version,
    repeated_and_reordered_batches_end_the_same,
    a_batch_naming_a_counter_twice_keeps_the_higher_version,
    a_version_from_a_later_epoch_is_refused_and_nothing_commits,
    dropping_a_transaction_rolls_it_back,
    changes_since_returns_rows_above_the_cursor_in_order,
    walking_changes_since_visits_every_row_once,
    load_shard_and_read_counter_return_the_right_rows,
    keys_are_recorded_once_across_nodes_and_within_a_batch,
    keys_and_shards_commit_together,
    expired_keys_are_purged_oldest_first_then_insertable_again,
    delete_keys_removes_only_this_nodes_keys,
    set_flushed_never_lowers,
    heartbeat_records_time_and_applied_lsn,
    values_the_store_cannot_hold_are_refused,
    a_large_flush_commits_whole,
    a_schema_newer_than_the_build_is_refused,
    racing_migrators_on_a_fresh_store_all_succeed,
    a_delete_erases_every_row_and_later_writes_count_from_there,
    deletes_are_read_back_in_sequence_with_every_row,
    a_delete_in_a_failed_transaction_changes_nothing,
    a_delete_waits_for_a_flush_of_the_counter_and_counts_it,
    a_node_row_records_its_process_and_state,
    expiries_are_set_under_their_condition_and_read_back,
    an_expiry_is_swept_once_and_only_while_it_stands,
);

// ---------------------------------------------------------------------
// URLs.

fn invalid_message(url: &str) -> String {
    match store::open(url) {
        Err(StoreError::Invalid(msg)) => msg,
        Err(e) => panic!("{url}: expected Invalid, got {e:?}"),
        Ok(_) => panic!("{url}: opened"),
    }
}

#[test]
fn open_refuses_bad_urls_with_clear_messages() {
    // Every malformed URL is Invalid (not Unavailable: retrying cannot
    // help), says what is wrong and what a good URL looks like, and never
    // repeats a password.
    assert!(invalid_message("").contains("empty"));
    let msg = invalid_message("mysql://db/tally");
    assert!(
        msg.contains("'mysql'") && msg.contains("sqlite://PATH"),
        "{msg}"
    );
    assert!(invalid_message("store.db").contains("no scheme"));
    assert!(invalid_message("sqlite://").contains("names no file"));
    assert!(invalid_message("sqlite://:memory:").contains("in-memory"));
    let msg = invalid_message("postgres://tally:s3cret@db:notaport/tally");
    assert!(msg.contains("PostgreSQL URL is invalid"), "{msg}");
    assert!(!msg.contains("s3cret"), "the password leaked: {msg}");
    // TLS that cannot be checked as asked is refused before connecting.
    let msg = invalid_message("postgresql://tally@db/tally?sslmode=verify-full");
    assert!(msg.contains("needs sslrootcert"), "{msg}");
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no/such/dir/store.db");
    let msg = invalid_message(&format!("sqlite://{}", missing.display()));
    assert!(msg.contains("no/such/dir"), "{msg}");
}

#[test]
fn sqlite_urls_take_relative_and_absolute_paths() {
    // `sqlite://rel/path` is relative to the working directory and
    // `sqlite:///abs/path` absolute; both PostgreSQL schemes are accepted.
    assert_eq!(
        StoreUrl::parse("sqlite://data/tally.db").unwrap(),
        StoreUrl::Sqlite("data/tally.db".into())
    );
    assert_eq!(
        StoreUrl::parse("sqlite:///var/lib/tally.db").unwrap(),
        StoreUrl::Sqlite("/var/lib/tally.db".into())
    );
    for url in ["postgres://u@h/db", "postgresql://u@h/db"] {
        assert_eq!(
            StoreUrl::parse(url).unwrap(),
            StoreUrl::Postgres(url.into())
        );
    }
}

// ---------------------------------------------------------------------
// SQLite only.

#[test]
fn sqlite_write_lock_held_too_long_is_unavailable() {
    // A writer that waits longer than the busy timeout for another
    // process's write lock fails with Unavailable, not a hang, and writes
    // nothing.
    let t = Target::sqlite();
    let holder = t.open();
    let waiter = t.open();
    let e = holder.register("a", "addr", 1).unwrap().epoch;
    let eb = waiter.register("b", "addr", 1).unwrap().epoch;
    let tx = holder.begin("a", e).unwrap();
    let started = std::time::Instant::now();
    assert!(matches!(
        waiter.begin("b", eb).err(),
        Some(StoreError::Unavailable(_))
    ));
    assert!(started.elapsed() >= store::sqlite::BUSY_TIMEOUT);
    tx.commit().unwrap();
    waiter.begin("b", eb).unwrap().commit().unwrap();
}

#[test]
fn sqlite_file_that_is_not_a_database_is_invalid() {
    // Pointing the store at some other file is a configuration mistake
    // (Invalid), not an outage to wait out, and the file is left alone.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    let text = "not a database, but some notes that matter to someone\n".repeat(100);
    std::fs::write(&path, &text).unwrap();
    let msg = invalid_message(&format!("sqlite://{}", path.display()));
    assert!(msg.contains("not an SQLite database"), "{msg}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
}

// ---------------------------------------------------------------------
// PostgreSQL only.

#[test]
fn postgres_flush_is_one_statement() {
    // A 100,000-row flush reaches the server as one INSERT statement.
    const ROWS: usize = 100_000;
    let t = Target::postgres();
    let Backend::Postgres(server, db) = &t.backend else {
        unreachable!()
    };
    assert!(
        server.stat_statements,
        "pg_stat_statements is not installed next to the server binaries; it ships with the \
         `postgresql` Debian package"
    );
    let s = t.open();
    let mut stats = server.connect(db).unwrap();
    stats
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .unwrap();
    bench::measure_flush(s.as_ref(), "big", ROWS, ROWS).unwrap();
    let row = stats
        .query_one(
            "SELECT SUM(calls)::int8, SUM(rows)::int8 FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND query LIKE 'INSERT INTO tally_shards%'",
            &[],
        )
        .unwrap();
    let (calls, rows): (Option<i64>, Option<i64>) = (row.get(0), row.get(1));
    assert_eq!(calls, Some(1), "statements sent for one flush");
    assert_eq!(rows, Some(ROWS as i64));
}

#[test]
fn postgres_outage_is_unavailable_then_the_same_store_recovers() {
    // With the server down every call fails fast with Unavailable; once it
    // is back, the same store object reconnects and works.
    let server = support::postgres::PgServer::new();
    let db = server.create_database();
    let s = store::open(&server.url(&db)).unwrap();
    let e = s.register("n", "addr", 1).unwrap().epoch;
    flush(s.as_ref(), "n", e, &[("c", 1, v(e, 1))]);

    server.stop();
    assert!(matches!(s.nodes(), Err(StoreError::Unavailable(_))));
    assert!(matches!(
        s.begin("n", e).err(),
        Some(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        s.register("n", "addr", 2),
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        s.heartbeat("n", e, 2, 0),
        Err(StoreError::Unavailable(_))
    ));

    server.start();
    assert_eq!(shard(s.as_ref(), "n")["c"], (1, v(e, 1)));
    flush(s.as_ref(), "n", e, &[("c", 2, v(e, 2))]);
    assert_eq!(shard(s.as_ref(), "n")["c"], (2, v(e, 2)));
}

#[test]
fn postgres_statement_refused_with_the_commit_rolls_back() {
    // The upsert and the versions travel with the COMMIT in one round
    // trip. A row the server refuses there (PostgreSQL text cannot hold a
    // NUL byte; SQLite's can, so this is PostgreSQL only) aborts the
    // transaction: the commit reports a definite failure, nothing of the
    // transaction is written, the flushed version does not move, and the
    // store works again at once.
    let t = Target::postgres();
    let s = t.open();
    let e = s.register("n", "addr", 1).unwrap().epoch;
    flush(s.as_ref(), "n", e, &[("c", 1, v(e, 1))]);
    let mut tx = s.begin("n", e).unwrap();
    tx.upsert_shards(&[("c", 2, v(e, 2)), ("bad\0name", 1, v(e, 3))])
        .unwrap();
    tx.set_flushed(v(e, 3), 5).unwrap();
    match tx.commit() {
        Err(StoreError::Unavailable(m)) => {
            assert!(m.contains("upserting shards"), "{m}");
            assert!(m.contains("rolled back"), "{m}");
        }
        other => panic!("a refused upsert committed or was unknown: {other:?}"),
    }
    assert_eq!(shard(s.as_ref(), "n")["c"], (1, v(e, 1)));
    assert_eq!(s.nodes().unwrap()[0].flushed, Version::default());
    flush(s.as_ref(), "n", e, &[("c", 3, v(e, 4))]);
    assert_eq!(shard(s.as_ref(), "n")["c"], (3, v(e, 4)));
}

#[test]
fn postgres_commit_during_an_outage_is_never_reported_as_done() {
    // A commit that meets a dead server is reported as failed or unknown,
    // never as done, and the store works again once the server is back.
    let server = support::postgres::PgServer::new();
    let db = server.create_database();
    let s = store::open(&server.url(&db)).unwrap();
    let e = s.register("n", "addr", 1).unwrap().epoch;
    let mut tx = s.begin("n", e).unwrap();
    tx.upsert_shards(&[("c", 1, v(e, 1))]).unwrap();
    server.stop();
    match tx.commit() {
        Err(StoreError::Unavailable(_) | StoreError::Indeterminate(_)) => {}
        other => panic!("commit against a stopped server returned {other:?}"),
    }
    server.start();
    flush(s.as_ref(), "n", e, &[("c", 2, v(e, 2))]);
    assert_eq!(shard(s.as_ref(), "n")["c"], (2, v(e, 2)));
}

#[test]
fn postgres_multi_host_url_skips_a_host_that_never_answers() {
    // The first host of a multi-host URL accepts connections and then
    // says nothing (a frozen server: the kernel completes the handshake
    // for a stopped process). Each host's attempt is bounded on its own,
    // so the store connects to the second host instead of waiting on the
    // first for ever, and says which hosts it tried when none answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let server = support::postgres::shared();
    let db = server.create_database();
    let url = server.url(&db);
    let multi = url.replacen(
        &format!("127.0.0.1:{}", server.port()),
        &format!("127.0.0.1:{silent_port},127.0.0.1:{}", server.port()),
        1,
    );
    assert_ne!(multi, url, "the URL names the server as 127.0.0.1:PORT");
    let started = std::time::Instant::now();
    let s = store::open(&format!("{multi}?target_session_attrs=read-write")).unwrap();
    let waited = started.elapsed();
    assert!(
        waited < tally::store::postgres::CALL_TIMEOUT * 2,
        "connecting took {waited:?}"
    );
    let e = s.register("n", "addr", 1).unwrap().epoch;
    flush(s.as_ref(), "n", e, &[("c", 7, v(e, 1))]);
    assert_eq!(shard(s.as_ref(), "n")["c"], (7, v(e, 1)));

    // Only the silent host: the attempt ends, naming it.
    let only = url.replacen(
        &format!("127.0.0.1:{}", server.port()),
        &format!("127.0.0.1:{silent_port}"),
        1,
    );
    match store::open(&only) {
        Err(StoreError::Unavailable(msg)) => {
            assert!(msg.contains(&silent_port.to_string()), "{msg}");
            assert!(msg.contains("no answer"), "{msg}");
        }
        Err(other) => panic!("a silent host gave {other:?}"),
        Ok(_) => panic!("a silent host gave a store"),
    }
    drop(silent);
}
