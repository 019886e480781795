//! `replicated` increments against a store that fails on demand: an
//! increment the store did not commit is never reported applied and never
//! counted; one whose commit outcome is unknown is settled with the store
//! (kept if it committed, reverted if not), at run time and after a crash.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tally::cluster::{ClusterConfig, Stores};
use tally::store::faulty::{Fault, FaultyStore};
use tally::store::{self, Store};
use tally::{Config, Durability, Error, IncrementOptions, Node};

struct Env {
    _dir: tempfile::TempDir,
    data: std::path::PathBuf,
    url: String,
    faulty: Arc<FaultyStore>,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    let faulty = Arc::new(FaultyStore::new(store::open(&url).unwrap()));
    Env {
        data: dir.path().join("node"),
        _dir: dir,
        url,
        faulty,
    }
}

fn open(env: &Env, faulty: bool) -> Node {
    let mut c = Config::new(&env.data);
    c.node_id = Some("a".into());
    let mut cluster = ClusterConfig::new(&env.url);
    cluster.flush_interval = Duration::from_millis(10);
    cluster.refresh_interval = Duration::from_millis(10);
    cluster.fail_fast_window = Duration::from_millis(50);
    let stores = faulty.then(|| {
        let writer: Arc<dyn Store> = env.faulty.clone();
        Stores {
            writer,
            reader: store::open(&env.url).unwrap(),
        }
    });
    c.cluster = Some(cluster);
    // A dropped node's threads may hold it for a moment after the drop.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let opened = match &stores {
            Some(s) => Node::open_with_stores(c.clone(), s.clone()),
            None => Node::open(c.clone()),
        };
        match opened {
            Ok(node) => return node,
            Err(e) if e.to_string().contains("in use") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("open failed: {e}"),
        }
    }
}

fn replicated(key: &str) -> IncrementOptions<'_> {
    IncrementOptions {
        durability: Some(Durability::Replicated),
        idempotency_key: Some(key),
    }
}

fn stored_value(url: &str, counter: &str) -> i64 {
    store::open(url)
        .unwrap()
        .read_counter(counter)
        .unwrap()
        .iter()
        .map(|r| r.value)
        .sum()
}

/// Retries until the node gives a definite answer, as a client would.
async fn until_definite(node: &Node, name: &str, delta: i64, key: &str) -> (i64, bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match node.increment(name, delta, replicated(key)).await {
            Ok(o) => return (o.value, o.duplicate),
            Err(Error::Indeterminate(_) | Error::StoreUnavailable(_))
                if Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("no definite answer for {key}: {e}"),
        }
    }
}

// A store outage refuses replicated increments without applying them;
// local ones go on; once the store is back, the same key applies once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_refuses_replicated_without_applying() {
    let env = env();
    let node = open(&env, true);
    node.increment("c", 1, replicated("k0")).await.unwrap();
    env.faulty.set_fault(Some(Fault::Outage));
    let err = node.increment("c", 10, replicated("k1")).await.unwrap_err();
    assert!(matches!(err, Error::StoreUnavailable(_)), "{err}");
    assert_eq!(
        node.get("c").unwrap(),
        Some(1),
        "a refused increment was applied"
    );
    // Local writes do not need the store.
    node.increment("c", 100, IncrementOptions::default())
        .await
        .unwrap();
    assert!(node.replicated_unavailable().is_some());
    assert!(node.readiness().ready);
    env.faulty.set_fault(None);
    let (value, duplicate) = until_definite(&node, "c", 10, "k1").await;
    assert!(!duplicate);
    assert_eq!(value, 111);
    let (value, duplicate) = until_definite(&node, "c", 10, "k1").await;
    assert!(duplicate);
    assert_eq!(value, 111);
    node.shutdown().unwrap();
    assert_eq!(stored_value(&env.url, "c"), 111);
}

// A commit lost on the way (outcome unknown) is answered INDETERMINATE, then
// found not committed and reverted; the retry with the same key applies it
// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_commit_is_reverted_and_the_retry_applies_once() {
    let env = env();
    let node = open(&env, true);
    env.faulty.set_fault(Some(Fault::CommitLost));
    let err = node.increment("c", 5, replicated("k")).await.unwrap_err();
    assert!(matches!(err, Error::Indeterminate(_)), "{err}");
    env.faulty.set_fault(None);
    let (value, duplicate) = until_definite(&node, "c", 5, "k").await;
    assert!(!duplicate, "the lost attempt was counted");
    assert_eq!(value, 5);
    node.shutdown().unwrap();
    assert_eq!(stored_value(&env.url, "c"), 5);
}

// While a replicated increment's store transaction is still open (its
// commit held, as by a primary waiting for a standby), a retry with its key
// on the same node is answered "outcome unknown", never "duplicate": the
// increment may yet be reverted. Here it is (the held commit is cut off and
// never lands), and the retry then applies it exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_while_the_commit_is_open_is_not_a_duplicate() {
    let env = env();
    let node = open(&env, true);
    env.faulty.set_fault(Some(Fault::CommitHeld));
    let first = tokio::spawn({
        let node = node.clone();
        async move { node.increment("open", 5, replicated("k-open")).await }
    });
    tally_lab::testing::eventually("the first attempt's commit is held", async || {
        match env.faulty.commits_held() {
            0 => Err("no commit held yet".to_string()),
            _ => Ok(()),
        }
    })
    .await;
    let retry = node.increment("open", 5, replicated("k-open")).await;
    assert!(
        matches!(retry, Err(Error::Indeterminate(_))),
        "a retry during the open commit was answered {retry:?}"
    );
    env.faulty.set_fault(None);
    let first = first.await.unwrap();
    assert!(matches!(first, Err(Error::Indeterminate(_))), "{first:?}");
    let (value, duplicate) = until_definite(&node, "open", 5, "k-open").await;
    assert!(!duplicate, "the cut-off attempt was counted");
    assert_eq!(value, 5);
    node.shutdown().unwrap();
    assert_eq!(stored_value(&env.url, "open"), 5);
}

// A commit that landed but whose acknowledgement was lost is found
// committed: the retry is a duplicate and the increment counts once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_commit_is_kept_and_the_retry_is_a_duplicate() {
    let env = env();
    let node = open(&env, true);
    env.faulty.set_fault(Some(Fault::CommitUnacknowledged));
    let err = node.increment("c", 5, replicated("k")).await.unwrap_err();
    assert!(matches!(err, Error::Indeterminate(_)), "{err}");
    env.faulty.set_fault(None);
    let (value, duplicate) = until_definite(&node, "c", 5, "k").await;
    assert!(duplicate, "the committed attempt was applied again");
    assert_eq!(value, 5);
    node.shutdown().unwrap();
    assert_eq!(stored_value(&env.url, "c"), 5);
}

// A crash while a replicated increment's outcome is unknown: at restart the
// journal's replicated record is checked against the store, and kept or
// reverted to match it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_settles_replicated_records_with_the_store() {
    for (fault, committed) in [
        (Fault::CommitLost, false),
        (Fault::CommitUnacknowledged, true),
    ] {
        let env = env();
        let node = open(&env, true);
        node.increment("c", 1, replicated("k0")).await.unwrap();
        env.faulty.set_fault(Some(fault));
        let err = node.increment("c", 5, replicated("k")).await.unwrap_err();
        assert!(matches!(err, Error::Indeterminate(_)), "{err}");
        // The store stays unreachable for this process until it is gone.
        env.faulty.set_fault(Some(Fault::Outage));
        node.sync().await.unwrap();
        drop(node);

        let node = open(&env, false);
        let expected = if committed { 6 } else { 1 };
        assert_eq!(node.get("c").unwrap(), Some(expected), "{fault:?}");
        let (value, duplicate) = until_definite(&node, "c", 5, "k").await;
        assert_eq!(duplicate, committed, "{fault:?}");
        assert_eq!(value, 6, "{fault:?}");
        node.shutdown().unwrap();
        assert_eq!(stored_value(&env.url, "c"), 6, "{fault:?}");
    }
}
