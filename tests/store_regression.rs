//! A store that goes back in time while nodes run: its tables are replaced
//! by an older copy of themselves (what a restored backup, an asynchronous
//! failover or an SQLite file copied back leaves), on SQLite and on
//! PostgreSQL. Every node notices, registers again above the epoch it
//! held, and writes its whole shard and its live `replicated` keys anew:
//! afterwards the store, each node's reads and `consistency=store` reads
//! give the exact totals, and a retry of a key the old copy had lost is
//! still recognised on another node. And the same with the nodes down
//! while the copy is put back (the usual way to restore a backup): at
//! restart they keep the `replicated` increments their journal knows
//! committed, instead of taking back what the older store lacks.

use tally_lab::testing as support;

use std::time::{Duration, Instant};

use tally::cluster::ClusterConfig;
use tally::node::Consistency;
use tally::store;
use tally::{Config, Durability, IncrementOptions, Node};

/// The tables tally keeps in the store, all copied and put back.
const TABLES: [&str; 3] = ["tally_nodes", "tally_shards", "tally_keys"];
/// Counters each phase increments on every node.
const COUNTERS: usize = 4;
/// Increments per counter, node and level in each phase.
const PER_COUNTER: usize = 5;
/// How long the nodes may take to notice and repair.
const REPAIR_TIMEOUT: Duration = Duration::from_secs(30);

enum Backend {
    Sqlite {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
    },
    Postgres(&'static support::postgres::PgServer, String),
}

struct Target {
    url: String,
    backend: Backend,
}

impl Target {
    fn sqlite() -> Target {
        let dir = tempfile::tempdir().unwrap();
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

    /// Runs SQL on the store's database directly, bypassing tally.
    fn raw(&self, sql: &str) {
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

    /// Keeps a copy of every tally table in the same database.
    fn copy_tables(&self) {
        let sql: String = TABLES
            .iter()
            .map(|t| format!("CREATE TABLE old_{t} AS SELECT * FROM {t};"))
            .collect();
        self.raw(&sql);
    }

    /// Puts the copy back in place of the tables, in one transaction.
    fn put_copy_back(&self) {
        let mut sql = String::from("BEGIN;");
        for t in TABLES {
            sql.push_str(&format!(
                "DELETE FROM {t}; INSERT INTO {t} SELECT * FROM old_{t};"
            ));
        }
        sql.push_str("COMMIT;");
        self.raw(&sql);
    }

    fn stored_total(&self, counter: &str) -> i64 {
        store::open(&self.url)
            .unwrap()
            .read_counter(counter)
            .unwrap()
            .iter()
            .map(|r| r.value)
            .sum()
    }
}

fn open_node(dir: &std::path::Path, id: &str, url: &str) -> Node {
    let mut c = Config::new(dir.join(id));
    c.node_id = Some(id.into());
    let mut cluster = ClusterConfig::new(url);
    cluster.flush_interval = Duration::from_millis(20);
    cluster.refresh_interval = Duration::from_millis(20);
    cluster.heartbeat_interval = Duration::from_millis(50);
    cluster.fail_fast_window = Duration::from_millis(20);
    c.cluster = Some(cluster);
    // A dropped node's threads may hold its directory for a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Node::open(c.clone()) {
            Ok(node) => return node,
            Err(e) if e.to_string().contains("in use") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("opening node {id}: {e}"),
        }
    }
}

fn repaired(node: &Node) -> u64 {
    node.metrics()
        .store_regressions_repaired
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// A retry, on another node, of a key recorded in phase two is a
/// duplicate: the key is in the store.
async fn phase_two_keys_are_known(nodes: &[(&str, &Node)]) {
    for (i, (retry_on, _)) in nodes.iter().enumerate() {
        let recorded_by = nodes[(i + 1) % nodes.len()].0;
        let key = format!("two-{recorded_by}-0-0");
        let node = nodes[i].1;
        let retried = node
            .increment(
                &counter("r", 0),
                1,
                IncrementOptions {
                    durability: Some(Durability::Replicated),
                    idempotency_key: Some(&key),
                },
            )
            .await
            .unwrap();
        assert!(
            retried.duplicate,
            "the retry of {key} on node {retry_on} was counted again"
        );
    }
}

fn counter(level: &str, i: usize) -> String {
    format!("{level}-{i}")
}

/// Runs one phase: on every node, `PER_COUNTER` increments of each counter
/// at `replicated` (each with a key naming the phase) and at `local`.
async fn phase(nodes: &[(&str, &Node)], name: &str) {
    for (id, node) in nodes {
        for i in 0..COUNTERS {
            for n in 0..PER_COUNTER {
                let key = format!("{name}-{id}-{i}-{n}");
                let applied = node
                    .increment(
                        &counter("r", i),
                        1,
                        IncrementOptions {
                            durability: Some(Durability::Replicated),
                            idempotency_key: Some(&key),
                        },
                    )
                    .await
                    .unwrap_or_else(|e| panic!("replicated {key}: {e}"));
                assert!(!applied.duplicate, "{key} was new");
                node.increment(
                    &counter("l", i),
                    1,
                    IncrementOptions {
                        durability: Some(Durability::Local),
                        idempotency_key: None,
                    },
                )
                .await
                .unwrap();
            }
        }
    }
}

/// Waits until `check` holds, or fails with what it last said.
async fn eventually(what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + REPAIR_TIMEOUT;
    loop {
        // The checks read the store, which blocks (and PostgreSQL's runs
        // a runtime of its own): never on an async worker as such.
        match tokio::task::block_in_place(&mut check) {
            Ok(()) => return,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{what} within {REPAIR_TIMEOUT:?}: {e}"),
        }
    }
}

/// Every counter, in the store and as each node reads it, is `expected`.
fn exact(t: &Target, nodes: &[(&str, &Node)], expected: i64) -> Result<(), String> {
    for level in ["r", "l"] {
        for i in 0..COUNTERS {
            let name = counter(level, i);
            let stored = t.stored_total(&name);
            if stored != expected {
                return Err(format!("the store holds {name} = {stored}, not {expected}"));
            }
            for (id, node) in nodes {
                let read = node.get(&name).unwrap();
                if read != Some(expected) {
                    return Err(format!("node {id} reads {name} = {read:?}"));
                }
                let detail = node.get_detail(&name, Consistency::Store).unwrap();
                let value = detail.map(|d| d.value);
                if value != Some(expected) {
                    return Err(format!(
                        "node {id} reads {name} = {value:?} with consistency=store"
                    ));
                }
            }
        }
    }
    Ok(())
}

async fn store_goes_back_in_time(t: Target) {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = tokio::task::block_in_place(|| {
        (
            open_node(dir.path(), "a", &t.url),
            open_node(dir.path(), "b", &t.url),
        )
    });
    let nodes = [("a", &a), ("b", &b)];
    let per_phase = (nodes.len() * PER_COUNTER) as i64;

    phase(&nodes, "one").await;
    eventually("phase one flushed", || exact(&t, &nodes, per_phase)).await;
    tokio::task::block_in_place(|| t.copy_tables());
    phase(&nodes, "two").await;
    eventually("phase two flushed", || exact(&t, &nodes, 2 * per_phase)).await;
    let epoch = |n: &Node| tokio::task::block_in_place(|| n.cluster_view().unwrap().unwrap().epoch);
    let epochs: Vec<u64> = nodes.iter().map(|(_, n)| epoch(n)).collect();

    // The store forgets phase two: its rows, its keys and the nodes'
    // marks.
    tokio::task::block_in_place(|| t.put_copy_back());
    assert_eq!(
        tokio::task::block_in_place(|| t.stored_total(&counter("r", 0))),
        per_phase,
        "the copy put back holds phase one only"
    );

    // Idle nodes notice through their heartbeats and rebuild the store.
    eventually("the store repaired", || {
        for (id, node) in &nodes {
            if repaired(node) == 0 {
                return Err(format!("node {id} has not repaired"));
            }
        }
        exact(&t, &nodes, 2 * per_phase)
    })
    .await;
    for ((id, node), before) in nodes.iter().zip(&epochs) {
        let after = epoch(node);
        assert!(after > *before, "node {id}: epoch {before} then {after}");
    }

    // Phase two's keys are in the store again.
    phase_two_keys_are_known(&nodes).await;

    // And the nodes go on as before.
    phase(&nodes, "three").await;
    eventually("phase three flushed", || exact(&t, &nodes, 3 * per_phase)).await;
    // Dropped here too: a PostgreSQL store's runtime may not be dropped
    // on an async worker.
    tokio::task::block_in_place(move || {
        for n in [a, b] {
            n.shutdown().unwrap();
        }
    });
}

async fn store_goes_back_while_nodes_are_down(t: Target) {
    let dir = tempfile::tempdir().unwrap();
    let url = t.url.clone();
    let open_both = || {
        tokio::task::block_in_place(|| {
            (
                open_node(dir.path(), "a", &url),
                open_node(dir.path(), "b", &url),
            )
        })
    };
    let (a, b) = open_both();
    let per_phase = (2 * PER_COUNTER) as i64;
    {
        let nodes = [("a", &a), ("b", &b)];
        phase(&nodes, "one").await;
        eventually("phase one flushed", || exact(&t, &nodes, per_phase)).await;
        tokio::task::block_in_place(|| t.copy_tables());
        phase(&nodes, "two").await;
        eventually("phase two flushed", || exact(&t, &nodes, 2 * per_phase)).await;
        for (_, n) in nodes {
            n.sync().await.unwrap();
        }
    }
    // Both crash (no shutdown, no snapshot: phase two's replicated
    // increments are in the journals' tails), and the store is restored
    // from the copy while they are down.
    tokio::task::block_in_place(|| {
        drop(a);
        drop(b);
        t.put_copy_back();
    });
    let (a, b) = open_both();
    let nodes = [("a", &a), ("b", &b)];
    for (id, node) in &nodes {
        assert_eq!(repaired(node), 1, "node {id} saw the store behind it");
    }
    eventually("the store rebuilt after the restart", || {
        exact(&t, &nodes, 2 * per_phase)
    })
    .await;
    phase_two_keys_are_known(&nodes).await;
    phase(&nodes, "three").await;
    eventually("phase three flushed", || exact(&t, &nodes, 3 * per_phase)).await;
    tokio::task::block_in_place(move || {
        for n in [a, b] {
            n.shutdown().unwrap();
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_restored_while_the_nodes_are_down_is_repaired() {
    store_goes_back_while_nodes_are_down(Target::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_restored_while_the_nodes_are_down_is_repaired() {
    store_goes_back_while_nodes_are_down(tokio::task::block_in_place(Target::postgres)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_restored_from_an_older_copy_is_repaired() {
    store_goes_back_in_time(Target::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_restored_from_an_older_copy_is_repaired() {
    store_goes_back_in_time(tokio::task::block_in_place(Target::postgres)).await;
}
