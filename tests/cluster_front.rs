//! The HTTP and RESP front ends of nodes that share a store: global values
//! and per-node shards, reads straight from the store, the cluster view,
//! readiness, listing, and an idempotent `replicated` increment retried on
//! another node. Every test runs two or three nodes in this process, each
//! on its own temporary data directory with its own node id, sharing one
//! SQLite store file, each served over HTTP and RESP on loopback ports.
//!
//! Nodes run with the shared test timings (`FAST`): they flush and refresh every 20 ms, so a change on one node reaches the
//! others within about 40 ms; tests wait for it by polling with a deadline
//! (`tally_lab::testing::eventually`), never by sleeping a fixed time.

use std::path::Path;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tally::Config;
use tally_lab::testing::served::{ServedNode, shutdown_node};
use tally_lab::testing::{FAST, eventually};
use tempfile::TempDir;

/// One node, served over HTTP and RESP, with its data directory.
struct Member {
    served: ServedNode,
    dir: TempDir,
}

impl std::ops::Deref for Member {
    type Target = ServedNode;
    fn deref(&self) -> &ServedNode {
        &self.served
    }
}

impl Member {
    /// A node with id `id` on a new data directory, sharing the store in
    /// `store` (none when `None`), served on fresh loopback ports.
    async fn start(store: Option<&Path>, id: &str) -> Member {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, store, id, FAST.refresh_interval).await
    }

    async fn start_in(
        dir: TempDir,
        store: Option<&Path>,
        id: &str,
        refresh_interval: Duration,
    ) -> Member {
        let mut config = Config::new(dir.path());
        config.node_id = Some(id.to_string());
        config.cluster = store.map(|s| {
            let mut c = FAST.cluster_config(format!("sqlite://{}", s.join("store.db").display()));
            c.refresh_interval = refresh_interval;
            c
        });
        let served = ServedNode::open_config(config).await;
        Member { served, dir }
    }

    /// A node "stale" on the store in `store` whose cache refreshed once as
    /// it started and then not for an hour: returned once that refresh is a
    /// second old, so that nothing written from then on can be in its
    /// cache. Drop it with [`Member::abandon`].
    async fn start_stale(store: &Path) -> Member {
        let stale = Self::start_in(
            tempfile::tempdir().unwrap(),
            Some(store),
            "stale",
            Duration::from_secs(3600),
        )
        .await;
        eventually("the stale node's cache goes quiet", async || {
            let (_, view) = stale.get("/v1/cluster").await;
            match view["last_refresh_age_ms"].as_u64() {
                Some(age) if age >= 1000 => Ok(()),
                _ => Err(view.to_string()),
            }
        })
        .await;
        stale
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let response = reqwest::get(self.http_url(path)).await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("reply {status} to {path} is not JSON ({e}): {text}"));
        (status, body)
    }

    async fn increment(&self, name: &str, by: i64) -> Value {
        increment_with(self, name, json!({ "by": by })).await
    }

    async fn redis(&self) -> MultiplexedConnection {
        self.client().await
    }

    /// Stops both servers and shuts the node down; hands back its data
    /// directory.
    async fn stop(self) -> TempDir {
        shutdown_node(self.served.stop_serving().await).await;
        self.dir
    }

    /// Stops both servers and drops the node without shutting it down.
    /// For a node with a long refresh interval only: shutting down joins
    /// the cache thread, which sleeps a whole refresh interval at a time.
    async fn abandon(self) {
        drop(self.served.stop_serving().await);
    }
}

/// Waits until `path` on `member` answers 200 with `expected`.
async fn settle_on(member: &Member, path: &str, expected: &Value) {
    eventually(&format!("{path} on {}", member.id()), async || {
        let (status, body) = member.get(path).await;
        if status == StatusCode::OK && body == *expected {
            Ok(())
        } else {
            Err(format!("{status} {body}"))
        }
    })
    .await;
}

async fn query<T: redis::FromRedisValue>(con: &mut MultiplexedConnection, args: &[&str]) -> T {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(con)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

// After increments on each of three nodes, every node answers the global
// value and each node's shard, from its cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_value_and_shards_reach_every_node() {
    let store = tempfile::tempdir().unwrap();
    let a = Member::start(Some(store.path()), "a").await;
    let b = Member::start(Some(store.path()), "b").await;
    let c = Member::start(Some(store.path()), "c").await;
    assert_eq!(a.increment("hits", 1).await["value"], 1);
    b.increment("hits", 10).await;
    c.increment("hits", 100).await;
    let expected = json!({
        "name": "hits",
        "value": 111,
        "nodes": {"a": 1, "b": 10, "c": 100},
    });
    for m in [&a, &b, &c] {
        settle_on(m, "/v1/counters/hits", &expected).await;
    }
    // The reply to an increment is global too, once the others are known.
    assert_eq!(a.increment("hits", 1).await["value"], 112);
    for m in [a, b, c] {
        m.stop().await;
    }
}

// `consistency=store` reads the other nodes' shards from the store: it
// sees a shard the node's cache cannot have yet (its refresh interval is an
// hour), while the default read does not; a bad value is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_consistency_reads_past_the_cache() {
    let store = tempfile::tempdir().unwrap();
    let stale = Member::start_stale(store.path()).await;
    let writer = Member::start(Some(store.path()), "writer").await;
    writer.increment("fresh", 5).await;
    stale
        .node
        .increment("fresh", 1, Default::default())
        .await
        .unwrap();

    let expected = json!({"name": "fresh", "value": 6, "nodes": {"stale": 1, "writer": 5}});
    settle_on(&stale, "/v1/counters/fresh?consistency=store", &expected).await;
    let (status, cached) = stale.get("/v1/counters/fresh").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        cached,
        json!({"name": "fresh", "value": 1, "nodes": {"stale": 1}})
    );
    let (status, explicit) = stale.get("/v1/counters/fresh?consistency=cache").await;
    assert_eq!((status, explicit), (StatusCode::OK, cached));

    // The same over RESP: TALLY.GET with CONSISTENCY store reads the
    // store; GET and TALLY.GET without it answer from the cache.
    let mut con = stale.redis().await;
    let fresh: Option<String> =
        query(&mut con, &["TALLY.GET", "fresh", "CONSISTENCY", "store"]).await;
    assert_eq!(fresh.as_deref(), Some("6"));
    let cached: Option<String> = query(&mut con, &["GET", "fresh"]).await;
    assert_eq!(cached.as_deref(), Some("1"));
    let cached: Option<String> = query(&mut con, &["TALLY.GET", "fresh"]).await;
    assert_eq!(cached.as_deref(), Some("1"));
    let bad: redis::RedisResult<Option<String>> = redis::cmd("TALLY.GET")
        .arg("fresh")
        .arg("CONSISTENCY")
        .arg("latest")
        .query_async(&mut con)
        .await;
    assert!(
        bad.unwrap_err()
            .to_string()
            .contains("CONSISTENCY must be cache")
    );

    // A counter only another node holds: 404 from the cache, found in the
    // store.
    writer.increment("elsewhere", 2).await;
    settle_on(
        &stale,
        "/v1/counters/elsewhere?consistency=store",
        &json!({"name": "elsewhere", "value": 2, "nodes": {"writer": 2}}),
    )
    .await;
    assert_eq!(
        stale.get("/v1/counters/elsewhere").await.0,
        StatusCode::NOT_FOUND
    );
    let elsewhere: Option<String> = query(
        &mut con,
        &["TALLY.GET", "elsewhere", "CONSISTENCY", "store"],
    )
    .await;
    assert_eq!(elsewhere.as_deref(), Some("2"));
    let nowhere: Option<String> = query(&mut con, &["TALLY.GET", "elsewhere"]).await;
    assert_eq!(nowhere, None);

    let (status, body) = stale.get("/v1/counters/fresh?consistency=latest").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body["error"],
        "query parameter 'consistency' must be cache or store, not 'latest'"
    );
    let (status, body) = stale.get("/v1/counters/fresh?consistncy=store").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"].as_str().unwrap().contains("consistncy"),
        "{body}"
    );
    writer.stop().await;
    stale.abandon().await;
}

// `/v1/cluster` lists every node alive with its epoch and address, from
// any node; a node that restarts comes back with the next epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_view_lists_every_node_alive() {
    let store = tempfile::tempdir().unwrap();
    let a = Member::start(Some(store.path()), "a").await;
    let b = Member::start(Some(store.path()), "b").await;
    let c = Member::start(Some(store.path()), "c").await;
    let addresses = [
        ("a", a.http.to_string()),
        ("b", b.http.to_string()),
        ("c", c.http.to_string()),
    ];
    let epochs_of = |view: &Value| -> Vec<(String, u64, String, String)> {
        view["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["node_id"].as_str().unwrap().to_string(),
                    n["epoch"].as_u64().unwrap(),
                    n["state"].as_str().unwrap().to_string(),
                    n["address"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let expected: Vec<_> = addresses
        .iter()
        .map(|(id, addr)| (id.to_string(), 1, "alive".to_string(), addr.clone()))
        .collect();
    for m in [&a, &b, &c] {
        // Alive means a heartbeat within three intervals: poll rather than
        // fail on one slow heartbeat.
        let view = eventually("every node alive", async || {
            let (status, view) = m.get("/v1/cluster").await;
            if status == StatusCode::OK && epochs_of(&view) == expected {
                Ok(view)
            } else {
                Err(format!("{status} {view}"))
            }
        })
        .await;
        assert_eq!(view["node_id"], m.id());
        assert_eq!(view["epoch"], 1);
        assert_eq!(view["store"], "sqlite");
        assert_eq!(view["staleness_bound_ms"], 40);
        assert_eq!(view["replicated_available"], true);
        assert_eq!(view["store_error"], Value::Null);
        for n in view["nodes"].as_array().unwrap() {
            for field in [
                "heartbeat_age_ms",
                "flushed_lsn",
                "applied_lsn",
                "flush_lag",
            ] {
                assert!(n[field].is_u64(), "{field} missing in {n}");
            }
        }
    }

    // Restarted on the same data directory: a new epoch, still alive.
    let dir = c.stop().await;
    let c = Member::start_in(dir, Some(store.path()), "c", FAST.refresh_interval).await;
    assert_eq!(c.get("/v1/cluster").await.1["epoch"], 2);
    eventually("c alive at epoch 2", async || {
        let (_, view) = a.get("/v1/cluster").await;
        let c_row = epochs_of(&view).into_iter().find(|n| n.0 == "c");
        match c_row {
            Some((_, 2, state, _)) if state == "alive" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    for m in [a, b, c] {
        m.stop().await;
    }
}

// `INFO cluster` names the store, this node's epoch and every node with its
// state; `INFO` includes the section; `cluster_enabled` stays 0 so that
// Redis clients never switch to the Redis Cluster protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_cluster_reports_the_store_and_every_node() {
    let store = tempfile::tempdir().unwrap();
    let a = Member::start(Some(store.path()), "a").await;
    let b = Member::start(Some(store.path()), "b").await;
    let mut con = a.redis().await;
    let info = eventually("both nodes alive", async || {
        let info: String = query(&mut con, &["INFO", "cluster"]).await;
        let alive = ["a", "b"]
            .iter()
            .all(|id| info.contains(&format!("\r\nnode_{id}:epoch=1,state=alive,")));
        if alive { Ok(info) } else { Err(info) }
    })
    .await;
    assert!(info.starts_with("# Cluster\r\n"), "{info}");
    for needle in [
        "\r\ncluster_enabled:0\r\n",
        "\r\ntally_cluster_enabled:1\r\n",
        "\r\nnode_id:a\r\n",
        "\r\nepoch:1\r\n",
        "\r\nstore:sqlite\r\n",
        "\r\nstaleness_bound_ms:40\r\n",
        "\r\nreplicated_available:1\r\n",
        &format!(
            "\r\nnode_a:epoch=1,state=alive,flushed_lsn=0,flush_lag=0,address={}\r\n",
            a.http
        ),
        "\r\nnode_b:epoch=1,state=alive,",
        &format!(",address={}\r\n", b.http),
    ] {
        assert!(
            info.contains(needle),
            "INFO cluster lacks {needle:?}:\n{info}"
        );
    }
    assert!(!info.contains("store_error"), "{info}");
    // One SQLite file is one copy: the view says what that means.
    assert!(
        info.contains("\r\nstore_warning:the store is one SQLite file"),
        "{info}"
    );
    assert!(!info.contains("store_standbys"), "{info}");
    assert!(!info.contains("# Server"), "{info}");
    for all in [&["INFO"][..], &["INFO", "all"], &["INFO", "everything"]] {
        let text: String = query(&mut con, all).await;
        let cluster = text.find("# Cluster\r\n").expect("the cluster section");
        let keyspace = text.find("# Keyspace\r\n").expect("the keyspace section");
        assert!(cluster < keyspace, "{text}");
        assert!(text.contains("\r\nnode_b:epoch=1,"), "{text}");
    }
    a.stop().await;
    b.stop().await;
}

// GET, MGET, EXISTS, INCR and DBSIZE over RESP see every node's shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp_reads_and_increments_are_global() {
    let store = tempfile::tempdir().unwrap();
    let a = Member::start(Some(store.path()), "a").await;
    let b = Member::start(Some(store.path()), "b").await;
    let mut con_a = a.redis().await;
    let mut con_b = b.redis().await;
    let _: i64 = query(&mut con_a, &["INCRBY", "g", "5"]).await;
    let _: i64 = query(&mut con_b, &["INCRBY", "g", "3"]).await;
    let _: i64 = query(&mut con_a, &["INCR", "only-a"]).await;
    for con in [&mut con_a, &mut con_b] {
        eventually("GET g is global", async || {
            let got: Option<String> = query(con, &["GET", "g"]).await;
            (got.as_deref() == Some("8"))
                .then_some(())
                .ok_or(format!("{got:?}"))
        })
        .await;
    }
    eventually("only-a reaches b", async || {
        let got: Vec<Option<String>> = query(&mut con_b, &["MGET", "g", "only-a", "none"]).await;
        let want = vec![Some("8".to_string()), Some("1".to_string()), None];
        (got == want).then_some(()).ok_or(format!("{got:?}"))
    })
    .await;
    let exists: i64 = query(&mut con_b, &["EXISTS", "g", "only-a", "none"]).await;
    assert_eq!(exists, 2);
    // b holds a shard of `g` only, but counts every counter the cluster holds.
    let dbsize: i64 = query(&mut con_b, &["DBSIZE"]).await;
    assert_eq!(dbsize, 2);
    let info: String = query(&mut con_b, &["INFO", "keyspace"]).await;
    assert!(info.contains("db0:keys=2,"), "{info}");
    let incr: i64 = query(&mut con_b, &["INCR", "g"]).await;
    assert_eq!(incr, 9);
    let incr: i64 = query(&mut con_b, &["INCR", "only-a"]).await;
    assert_eq!(incr, 2);
    a.stop().await;
    b.stop().await;
}

// `/readyz` says whether `replicated` writes can be made durable: yes with
// a reachable store, no (with the reason) without one; both are ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_replicated_capability() {
    let store = tempfile::tempdir().unwrap();
    let clustered = Member::start(Some(store.path()), "clustered").await;
    let alone = Member::start(None, "alone").await;
    let (status, body) = clustered.get("/readyz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"ready": true, "node_id": "clustered", "replicated": true})
    );
    let (status, body) = alone.get("/readyz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({
            "ready": true,
            "node_id": "alone",
            "replicated": false,
            "replicated_reason": "no shared store",
        })
    );
    clustered.stop().await;
    alone.stop().await;
}

// A node without a store answers the cluster routes about itself alone:
// `/v1/cluster` with `"store": null`, its own shard under `nodes`, and
// `tally_cluster_enabled:0` in `INFO cluster`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_without_a_store_reports_itself_alone() {
    let alone = Member::start(None, "alone").await;
    let (status, view) = alone.get("/v1/cluster").await;
    assert_eq!(status, StatusCode::OK);
    let me = &view["nodes"][0];
    assert_eq!(
        (
            &view["node_id"],
            &view["store"],
            &view["replicated_available"]
        ),
        (&json!("alone"), &Value::Null, &json!(false)),
        "{view}"
    );
    assert_eq!(view["nodes"].as_array().unwrap().len(), 1, "{view}");
    assert_eq!(
        (&me["node_id"], &me["state"]),
        (&json!("alone"), &json!("alive"))
    );
    assert_eq!(me["pid"], std::process::id());
    assert_eq!(view["hot_counters"], json!([]));
    alone.increment("x", 4).await;
    let expected = json!({"name": "x", "value": 4, "nodes": {"alone": 4}});
    for path in ["/v1/counters/x", "/v1/counters/x?consistency=store"] {
        assert_eq!(alone.get(path).await, (StatusCode::OK, expected.clone()));
    }
    let mut con = alone.redis().await;
    let info: String = query(&mut con, &["INFO", "cluster"]).await;
    assert_eq!(
        info,
        "# Cluster\r\ncluster_enabled:0\r\ntally_cluster_enabled:0\r\n"
    );
    alone.stop().await;
}

// Listing on one node includes counters only another node holds, with
// global values, in name order, page by page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_includes_counters_only_another_node_holds() {
    let store = tempfile::tempdir().unwrap();
    let a = Member::start(Some(store.path()), "a").await;
    let b = Member::start(Some(store.path()), "b").await;
    a.increment("p:a-only", 3).await;
    a.increment("p:both", 1).await;
    a.increment("q:elsewhere", 1).await;
    b.increment("p:b-only", 4).await;
    b.increment("p:both", 1).await;
    let all = json!([
        {"name": "p:a-only", "value": 3},
        {"name": "p:b-only", "value": 4},
        {"name": "p:both", "value": 2},
    ]);
    settle_on(
        &b,
        "/v1/counters?prefix=p:",
        &json!({"counters": all, "next_after": null}),
    )
    .await;
    // One at a time: the same counters, in the same order.
    let mut paged = Vec::new();
    let mut path = "/v1/counters?prefix=p:&limit=1".to_string();
    loop {
        let (status, page) = b.get(&path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        paged.extend(page["counters"].as_array().unwrap().iter().cloned());
        match page["next_after"].as_str() {
            Some(after) => path = format!("/v1/counters?prefix=p:&limit=1&after={after}"),
            None => break,
        }
        assert!(paged.len() <= 3, "paging does not end: {paged:?}");
    }
    assert_eq!(Value::Array(paged), all);
    // Without a prefix, the counter only `a` holds outside `p:` is listed
    // (once flushed: it may come in a later flush than the others).
    settle_on(
        &b,
        "/v1/counters?after=p:both",
        &json!({"counters": [{"name": "q:elsewhere", "value": 1}], "next_after": null}),
    )
    .await;
    a.stop().await;
    b.stop().await;
}

// A `replicated` increment retried with the same idempotency key on
// another node is recognised from the store and not applied again: the
// global value rises once and the second node holds no shard of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_retry_on_another_node_is_applied_once() {
    let store = tempfile::tempdir().unwrap();
    let a = Member::start(Some(store.path()), "a").await;
    let b = Member::start(Some(store.path()), "b").await;
    let mut con_a = a.redis().await;
    let mut con_b = b.redis().await;
    let request = [
        "TALLY.INCRBY",
        "billed",
        "7",
        "DURABILITY",
        "replicated",
        "IDEMPOTENCY",
        "req-1",
    ];
    let first: (i64, i64) = query(&mut con_a, &request).await;
    assert_eq!(first, (7, 0));
    let retry: (i64, i64) = query(&mut con_b, &request).await;
    assert_eq!(retry.1, 1, "the retry on b is a duplicate: {retry:?}");
    // Nothing was applied on b, at once: it holds no shard of the counter.
    let (_, detail) = b.get("/v1/counters/billed?consistency=store").await;
    assert_eq!(
        detail,
        json!({"name": "billed", "value": 7, "nodes": {"a": 7}})
    );
    let once = json!({"name": "billed", "value": 7, "nodes": {"a": 7}});
    for m in [&a, &b] {
        settle_on(m, "/v1/counters/billed", &once).await;
    }
    // Retried on b again, and on a: still duplicates, still counted once.
    let again: (i64, i64) = query(&mut con_b, &request).await;
    assert_eq!(again, (7, 1));
    let again: (i64, i64) = query(&mut con_a, &request).await;
    assert_eq!(again, (7, 1));
    assert_eq!(b.get("/v1/counters/billed").await.1, once);
    a.stop().await;
    b.stop().await;
}

// After concurrent increments on one node stop, every other node settles
// to exactly that node's shards. Fails in most runs today: the cache reads
// each node's rows above the highest version it has seen, but a flush
// transaction can write a counter whose lsn is below a version an earlier
// transaction already wrote (an increment that took its lsn while the
// committer was collecting changed counters past its table shard), so the
// cache skips that row until the counter changes again, while the store
// holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_settles_to_the_exact_shards_under_concurrent_writes() {
    const COUNTERS: u64 = 5000;
    const WRITERS: u64 = 8;
    const LOAD: Duration = Duration::from_secs(3);
    let store = tempfile::tempdir().unwrap();
    let a = Member::start(Some(store.path()), "a").await;
    let b = Member::start(Some(store.path()), "b").await;
    let until = Instant::now() + LOAD;
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let node = a.node.clone();
            tokio::spawn(async move {
                // A xorshift sequence per writer spreads the increments
                // over every counter and every table shard.
                let mut x = (w + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let options = tally::IncrementOptions {
                    durability: Some(tally::Durability::Memory),
                    ..Default::default()
                };
                while Instant::now() < until {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let name = format!("c{}", x % COUNTERS);
                    node.increment(&name, 1, options).await.unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    eventually("b's values equal a's shards", async || {
        let differing: Vec<String> = (0..COUNTERS)
            .map(|i| format!("c{i}"))
            .filter(|name| a.node.get(name).unwrap() != b.node.get(name).unwrap())
            .collect();
        if differing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} counters differ, e.g. {:?}",
                differing.len(),
                &differing[..1]
            ))
        }
    })
    .await;
    a.stop().await;
    b.stop().await;
}

/// The value of `key` in an `INFO` reply, parsed as a number.
fn info_number(info: &str, key: &str) -> Option<f64> {
    info.split("\r\n")
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.parse().ok())
}

/// The value of the unlabelled sample `name` in an OpenMetrics text.
fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

// The committer's figures (transactions, rows flushed, replicated batch
// sizes, flush lag) reach `INFO cluster` and `/metrics` as the node works:
// rows written count up, and the lag drops to zero once the flush settles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_figures_reach_info_and_metrics() {
    let store = tempfile::tempdir().unwrap();
    let a = Member::start(Some(store.path()), "a").await;
    for i in 0..5 {
        a.increment(&format!("figures:{i}"), 1).await;
    }
    let mut con = a.redis().await;
    let _: (i64, i64) = query(
        &mut con,
        &["TALLY.INCRBY", "figures:r", "1", "DURABILITY", "replicated"],
    )
    .await;
    eventually(
        "INFO cluster shows the flushed rows and no lag",
        async || {
            let info: String = query(&mut con, &["INFO", "cluster"]).await;
            let rows = info_number(&info, "store_rows_flushed").unwrap_or(0.0);
            let rounds = info_number(&info, "store_rounds").unwrap_or(0.0);
            let lag = info_number(&info, "flush_lag");
            let batch = info_number(&info, "replicated_batch_p50_requests");
            if rows >= 6.0 && rounds >= 1.0 && lag == Some(0.0) && batch >= Some(1.0) {
                Ok(())
            } else {
                Err(info)
            }
        },
    )
    .await;
    let info: String = query(&mut con, &["INFO", "cluster"]).await;
    assert_eq!(
        info_number(&info, "store_failed_calls"),
        Some(0.0),
        "{info}"
    );
    assert_eq!(
        info_number(&info, "store_indeterminate_commits"),
        Some(0.0),
        "{info}"
    );
    assert!(
        info_number(&info, "store_round_p99_seconds").is_some(),
        "{info}"
    );

    let text = reqwest::get(a.http_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metric_value(&text, "tally_store_rows_flushed_total") >= Some(6.0),
        "{text}"
    );
    assert!(
        metric_value(&text, "tally_store_round_seconds_count") >= Some(1.0),
        "{text}"
    );
    assert!(
        metric_value(&text, "tally_replicated_batch_requests_count") >= Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "tally_flush_lag_lsns"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "tally_store_errors_total"),
        Some(0.0),
        "{text}"
    );
    a.stop().await;
}

/// `/metrics` text of `member`.
async fn metrics_text(member: &Member) -> String {
    reqwest::get(member.http_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

// The system's own figures in `/metrics`: increment latency counted per
// front end and level (pipelined RESP increments at `local` included, once
// each), the limits, the epoch, `replicated` availability, and each peer's
// liveness as this node reads it from the store: alive while it runs, stopped
// once it has stopped cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_figures_reach_metrics() {
    let store = tempfile::tempdir().unwrap();
    let a = Member::start(Some(store.path()), "a").await;
    let b = Member::start(Some(store.path()), "b").await;
    // HTTP: 3 at the default level (local), 2 at replicated.
    for _ in 0..3 {
        a.increment("sys:h", 1).await;
    }
    for _ in 0..2 {
        let r = reqwest::Client::new()
            .post(a.http_url("/v1/counters/sys:h/increment"))
            .body(json!({ "by": 1, "durability": "replicated" }).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    // RESP: a pipeline of 4 local INCRs (one covering sync), 1 at memory.
    let mut con = a.redis().await;
    let mut pipe = redis::pipe();
    for _ in 0..4 {
        pipe.cmd("INCR").arg("sys:r");
    }
    let _: Vec<i64> = pipe.query_async(&mut con).await.unwrap();
    let _: (i64, i64) = query(
        &mut con,
        &["TALLY.INCRBY", "sys:r", "1", "DURABILITY", "memory"],
    )
    .await;

    let count = |text: &str, protocol: &str, level: &str| {
        metric_value(
            text,
            &format!(
                "tally_increment_seconds_count{{protocol=\"{protocol}\",durability=\"{level}\"}}"
            ),
        )
    };
    let text = metrics_text(&a).await;
    assert_eq!(count(&text, "http", "local"), Some(3.0), "{text}");
    assert_eq!(count(&text, "http", "replicated"), Some(2.0), "{text}");
    assert_eq!(count(&text, "resp", "local"), Some(4.0), "{text}");
    assert_eq!(count(&text, "resp", "memory"), Some(1.0), "{text}");
    assert_eq!(count(&text, "resp", "replicated"), Some(0.0), "{text}");
    assert!(
        text.contains(
            "tally_increment_seconds_bucket{protocol=\"resp\",durability=\"local\",le=\"+Inf\"} 4"
        ),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "tally_idempotency_keys_max"),
        Some(a.node.config().idempotency_keys_max as f64)
    );
    assert_eq!(metric_value(&text, "tally_replicated_available"), Some(1.0));
    assert!(metric_value(&text, "tally_epoch") >= Some(1.0), "{text}");

    let state = |text: &str, s: &str| {
        metric_value(
            text,
            &format!("tally_peer_state{{node_id=\"b\",state=\"{s}\"}}"),
        )
    };
    eventually("b alive in a's metrics", async || {
        let text = metrics_text(&a).await;
        if state(&text, "alive") == Some(1.0) && state(&text, "down") == Some(0.0) {
            Ok(())
        } else {
            Err(text)
        }
    })
    .await;
    // A clean stop is not an outage: b shows as stopped, not down.
    b.stop().await;
    eventually("b stopped in a's metrics", async || {
        let text = metrics_text(&a).await;
        let age = metric_value(&text, "tally_peer_heartbeat_age_seconds{node_id=\"b\"}");
        if state(&text, "stopped") == Some(1.0)
            && state(&text, "down") == Some(0.0)
            && state(&text, "alive") == Some(0.0)
            && age > Some(0.0)
        {
            Ok(())
        } else {
            Err(text)
        }
    })
    .await;
    a.stop().await;
}

// The same rule at `replicated`: a key reused with another delta is
// refused on the node that applied it, and nothing is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_key_reused_for_another_increment_is_refused() {
    let store = tempfile::tempdir().unwrap();
    let a = Member::start(Some(store.path()), "a").await;
    let post = async |by: i64| {
        let r = reqwest::Client::new()
            .post(a.http_url("/v1/counters/rk/increment"))
            .body(
                json!({ "by": by, "idempotency_key": "rk-1", "durability": "replicated" })
                    .to_string(),
            )
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json::<Value>().await.unwrap())
    };
    assert_eq!(post(2).await.0, StatusCode::OK);
    let (status, body) = post(2).await;
    assert_eq!((status, &body["duplicate"]), (StatusCode::OK, &json!(true)));
    let (status, body) = post(3).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("first used with another counter or delta"),
        "{body}"
    );
    assert_eq!(a.node.get("rk").unwrap(), Some(2));
    a.stop().await;
}

/// `DELETE /v1/counters/{name}` (or `POST .../reset`) through `member`:
/// (deleted, erased).
async fn delete_over_http(member: &Member, name: &str, reset: bool) -> (bool, i64) {
    let client = reqwest::Client::new();
    let request = if reset {
        client.post(member.http_url(&format!("/v1/counters/{name}/reset")))
    } else {
        client.delete(member.http_url(&format!("/v1/counters/{name}")))
    };
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["name"], name);
    (
        body["deleted"].as_bool().unwrap(),
        body["erased"].as_i64().unwrap(),
    )
}

/// The counter's value read straight from the store through `member`.
async fn store_value(member: &Member, name: &str) -> i64 {
    let (status, body) = member
        .get(&format!("/v1/counters/{name}?consistency=store"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["value"].as_i64().unwrap()
}

// A delete through one node sets the counter to zero on every node, with
// every node's shard reset (over RESP DEL and GETDEL, HTTP DELETE and
// reset); increments after it count from zero, and a node restarted on its
// data directory, or on an empty one (its disk lost), still reads zero
// plus what came after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_reaches_every_node_and_later_increments_count_from_zero() {
    let store = tempfile::tempdir().unwrap();
    let a = Member::start(Some(store.path()), "a").await;
    let b = Member::start(Some(store.path()), "b").await;
    let c = Member::start(Some(store.path()), "c").await;
    a.increment("hits", 1).await;
    b.increment("hits", 10).await;
    c.increment("hits", 100).await;
    let all = json!({"name": "hits", "value": 111, "nodes": {"a": 1, "b": 10, "c": 100}});
    settle_on(&a, "/v1/counters/hits", &all).await;
    let mut con = a.redis().await;
    // Everything a had acknowledged and every flushed shard is erased.
    assert_eq!(query::<i64>(&mut con, &["DEL", "hits", "never"]).await, 1);
    let zero = json!({"name": "hits", "value": 0, "nodes": {"a": 0, "b": 0, "c": 0}});
    for m in [&a, &b, &c] {
        settle_on(m, "/v1/counters/hits", &zero).await;
    }
    assert_eq!(store_value(&c, "hits").await, 0);
    // Increments after the delete count from zero, on every node.
    assert_eq!(b.increment("hits", 2).await["value"], 2);
    let two = json!({"name": "hits", "value": 2, "nodes": {"a": 0, "b": 2, "c": 0}});
    for m in [&a, &b, &c] {
        settle_on(m, "/v1/counters/hits", &two).await;
    }
    assert_eq!(delete_over_http(&c, "hits", false).await, (true, 2));
    settle_on(&b, "/v1/counters/hits", &zero).await;
    c.increment("hits", 7).await;
    let mut con_b = b.redis().await;
    eventually("b sees c's 7", async || {
        match query::<Option<String>>(&mut con_b, &["GET", "hits"]).await {
            Some(v) if v == "7" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(
        query::<Option<String>>(&mut con_b, &["GETDEL", "hits"]).await,
        Some("7".to_string())
    );
    assert_eq!(
        query::<Option<String>>(&mut con_b, &["GETDEL", "none"]).await,
        None
    );
    a.increment("hits", 3).await;
    assert_eq!(delete_over_http(&a, "hits", true).await, (true, 3));
    a.increment("hits", 4).await;
    let four = json!({"name": "hits", "value": 4, "nodes": {"a": 4, "b": 0, "c": 0}});
    settle_on(&c, "/v1/counters/hits", &four).await;
    // b restarted on its directory, and c on an empty one with its id:
    // the bases come back from the store with the rows.
    let b_dir = b.stop().await;
    let b = Member::start_in(b_dir, Some(store.path()), "b", FAST.refresh_interval).await;
    settle_on(&b, "/v1/counters/hits", &four).await;
    let _lost = c.stop().await;
    let c = Member::start(Some(store.path()), "c").await;
    settle_on(&c, "/v1/counters/hits", &four).await;
    assert_eq!(c.increment("hits", 1).await["value"], 5);
    for m in [a, b, c] {
        m.stop().await;
    }
}

// Deletes while two other nodes increment the same counter at full speed:
// every acknowledged increment is either erased by exactly one delete or
// in the final value, never both and never neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_under_concurrent_increments_lose_and_double_count_nothing() {
    const LOAD: Duration = Duration::from_secs(3);
    const DELETES: usize = 15;
    let store = tempfile::tempdir().unwrap();
    let a = Member::start(Some(store.path()), "a").await;
    let b = Member::start(Some(store.path()), "b").await;
    let c = Member::start(Some(store.path()), "c").await;
    let until = Instant::now() + LOAD;
    let writers: Vec<_> = [&a, &b, &c]
        .into_iter()
        .flat_map(|m| (0..2).map(move |_| m.node.clone()))
        .map(|node| {
            tokio::spawn(async move {
                let mut acknowledged = 0i64;
                let mut by = 0;
                while Instant::now() < until {
                    by = by % 5 + 1;
                    node.increment("hot", by, tally::IncrementOptions::default())
                        .await
                        .unwrap();
                    acknowledged += by;
                }
                acknowledged
            })
        })
        .collect();
    let mut erased = 0i64;
    let mut deletes = 0;
    while deletes < DELETES {
        tokio::time::sleep(LOAD / (DELETES as u32 + 1)).await;
        if let Some(e) = a.node.delete("hot").await.unwrap() {
            erased += e;
        }
        deletes += 1;
    }
    let mut acknowledged = 0;
    for w in writers {
        acknowledged += w.await.unwrap();
    }
    assert!(
        erased > 0,
        "no delete erased anything of the {acknowledged} acknowledged"
    );
    // Every node flushes what it acknowledged; then the store, and every
    // node's own view, hold exactly what no delete erased.
    let left = acknowledged - erased;
    eventually("the store holds what no delete erased", async || {
        let v = store_value(&b, "hot").await;
        if v == left {
            Ok(())
        } else {
            Err(format!("{v}, expected {left}"))
        }
    })
    .await;
    for m in [&a, &b, &c] {
        eventually(&format!("{} reads what is left", m.id()), async || match m
            .node
            .get("hot")
            .unwrap()
        {
            Some(v) if v == left => Ok(()),
            other => Err(format!("{other:?}, expected {left}")),
        })
        .await;
    }
    for m in [a, b, c] {
        m.stop().await;
    }
}

/// `POST /v1/nodes/{id}/retire` through `member`: the status and the body.
async fn retire(member: &Member, id: &str, force: bool) -> (StatusCode, Value) {
    let response = reqwest::Client::new()
        .post(member.http_url(&format!("/v1/nodes/{id}/retire?force={force}")))
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

/// The state `member`'s cluster view gives node `id` (`None`: not listed).
async fn state_of(member: &Member, id: &str) -> Option<String> {
    let (_, view) = member.get("/v1/cluster").await;
    view["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == id)
        .map(|n| n["state"].as_str().unwrap().to_string())
}

// A node that stops cleanly shows as stopped (not down) once its shard is
// in the store, and can then be retired: it leaves the cluster view while
// its shard keeps counting. A running node, the node asked and an unknown
// id are refused; a retired id started again comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_nodes_show_as_stopped_and_only_they_retire_without_force() {
    let store = tempfile::tempdir().unwrap();
    let a = Member::start(Some(store.path()), "a").await;
    let b = Member::start(Some(store.path()), "b").await;
    let c = Member::start(Some(store.path()), "c").await;
    let (_, view) = a.get("/v1/cluster").await;
    let me = view["nodes"][0].clone();
    assert_eq!(me["node_id"], "a");
    assert_eq!(me["pid"], std::process::id(), "{view}");
    assert!(me["uptime_ms"].as_u64().is_some(), "{view}");
    b.increment("kept", 5).await;
    c.increment("kept", 1).await;

    let (status, body) = retire(&a, "b", false).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(error_text(&body).contains("is running"), "{body}");
    let (status, body) = retire(&a, "a", false).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = retire(&a, "nobody", false).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    let b_dir = b.stop().await;
    eventually("b shows as stopped", async || {
        match state_of(&a, "b").await {
            Some(s) if s == "stopped" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let (status, body) = retire(&a, "b", false).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["retired"], true);
    assert_eq!(
        state_of(&a, "b").await,
        None,
        "a retired node is not listed"
    );
    assert_eq!(state_of(&c, "b").await, None);
    // Its shard still counts.
    settle_on(
        &c,
        "/v1/counters/kept",
        &json!({"name": "kept", "value": 6, "nodes": {"b": 5, "c": 1}}),
    )
    .await;
    assert_eq!(retire(&c, "b", false).await.0, StatusCode::OK, "idempotent");

    // A node down without having stopped needs force: tested with a
    // process killed with -9 (cli/tests/operations.rs).

    // b started again on its directory comes back, alive.
    let b = Member::start_in(b_dir, Some(store.path()), "b", FAST.refresh_interval).await;
    eventually("b is back", async || match state_of(&a, "b").await {
        Some(s) if s == "alive" => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .await;
    for m in [a, b, c] {
        m.stop().await;
    }
}

fn error_text(body: &Value) -> &str {
    body["error"].as_str().unwrap_or("")
}

/// `POST /v1/counters/{name}/increment` with `body` through `member`.
async fn increment_with(member: &Member, name: &str, body: Value) -> Value {
    let response = reqwest::Client::new()
        .post(member.http_url(&format!("/v1/counters/{name}/increment")))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

// Honest values on a node whose cache is an hour stale: an increment's
// reply is that node's view unless it asks for `consistency: store`, which
// reads the other shards from the store after the increment (HTTP and
// RESP); and a duplicate `replicated` increment answers from the store, so
// never below what the first attempt answered on a fresher node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_totals_and_duplicates_never_answer_below_the_first_reply() {
    let store = tempfile::tempdir().unwrap();
    let stale = Member::start_stale(store.path()).await;
    let fresh = Member::start(Some(store.path()), "fresh").await;
    fresh.increment("total", 10).await;
    settle_on(
        &stale,
        "/v1/counters/total?consistency=store",
        &json!({"name": "total", "value": 10, "nodes": {"fresh": 10}}),
    )
    .await;
    // This node's view: its own shard only.
    let plain = increment_with(
        &stale,
        "total",
        json!({"by": 1, "durability": "replicated"}),
    )
    .await;
    assert_eq!(plain["value"], 1, "{plain}");
    let total = increment_with(
        &stale,
        "total",
        json!({"by": 1, "durability": "replicated", "consistency": "store"}),
    )
    .await;
    assert_eq!(total["value"], 12, "{total}");
    let mut con = stale.redis().await;
    let reply: (i64, i64) = query(
        &mut con,
        &[
            "TALLY.INCRBY",
            "total",
            "1",
            "DURABILITY",
            "local",
            "CONSISTENCY",
            "store",
        ],
    )
    .await;
    assert_eq!(reply, (13, 0));

    // The first attempt answers on the fresh node, which sees everything;
    // its retry on the stale node is a duplicate and answers no less.
    let keyed = json!({"by": 5, "durability": "replicated", "idempotency_key": "once"});
    let first = eventually("the fresh node sees the stale node's 3", async || {
        let (_, v) = fresh.get("/v1/counters/total").await;
        if v["value"] == 13 {
            Ok(())
        } else {
            Err(v.to_string())
        }
    });
    first.await;
    let first = increment_with(&fresh, "total", keyed.clone()).await;
    assert_eq!(
        (&first["value"], &first["duplicate"]),
        (&json!(18), &json!(false))
    );
    let retry = increment_with(&stale, "total", keyed).await;
    assert_eq!(retry["duplicate"], true, "{retry}");
    assert_eq!(
        retry["value"], 18,
        "a duplicate answered below the first reply: {retry}"
    );
    // Bad consistency values are refused, naming the field or option.
    let response = reqwest::Client::new()
        .post(stale.http_url("/v1/counters/total/increment"))
        .body(r#"{"consistency": "fresh"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let err = redis::cmd("TALLY.INCRBY")
        .arg(&["total", "1", "CONSISTENCY", "fresh"])
        .query_async::<redis::Value>(&mut con)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("CONSISTENCY must be"), "{err}");
    stale.abandon().await;
    fresh.stop().await;
}

/// How many counters `member` deleted because their expiry had come.
fn expired_by(member: &Member) -> u64 {
    member
        .node
        .metrics()
        .counters_expired
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// `PUT /v1/counters/{name}/expiry` with `body` through `member`.
async fn put_expiry(member: &Member, name: &str, body: Value) -> (StatusCode, Value) {
    let response = reqwest::Client::new()
        .put(member.http_url(&format!("/v1/counters/{name}/expiry")))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

// An expiry set through one node deletes the counter for every node once
// its time has come, exactly once however many nodes sweep it; the
// counter then reads 0 with no expiry, and increments after it count from
// zero. RESP and HTTP agree on what is set, and a counter no node knows
// gets no expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_deletes_the_counter_once_for_every_node() {
    let store = tempfile::tempdir().unwrap();
    let a = Member::start(Some(store.path()), "a").await;
    let b = Member::start(Some(store.path()), "b").await;
    let c = Member::start(Some(store.path()), "c").await;
    a.increment("w", 3).await;
    b.increment("w", 4).await;
    let seven = json!({"name": "w", "value": 7, "nodes": {"a": 3, "b": 4}});
    settle_on(&c, "/v1/counters/w", &seven).await;
    let mut con_b = b.redis().await;
    let mut con_c = c.redis().await;
    assert_eq!(query::<i64>(&mut con_b, &["EXPIRE", "w", "60"]).await, 1);
    // Read from the store on any node.
    let ttl: i64 = query(&mut con_c, &["TTL", "w"]).await;
    assert_eq!(ttl, 60);
    assert_eq!(
        query::<i64>(&mut con_c, &["EXPIRE", "w", "90", "NX"]).await,
        0
    );
    assert_eq!(
        query::<i64>(&mut con_c, &["EXPIRE", "w", "30", "GT"]).await,
        0
    );
    assert_eq!(query::<i64>(&mut con_c, &["PERSIST", "w"]).await, 1);
    assert_eq!(query::<i64>(&mut con_b, &["TTL", "w"]).await, -1);
    assert_eq!(query::<i64>(&mut con_b, &["TTL", "nobody"]).await, -2);
    assert_eq!(
        query::<i64>(&mut con_b, &["EXPIRE", "nobody", "5"]).await,
        0
    );
    let (status, body) = put_expiry(&a, "nobody", json!({"in_ms": 5000})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = put_expiry(&a, "w", json!({"in_ms": 5000, "at_ms": 1})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = put_expiry(&a, "w", json!({"in_ms": 300, "when": "no_expiry"})).await;
    assert_eq!((status, &body["changed"]), (StatusCode::OK, &json!(true)));
    let (_, expiry) = b.get("/v1/counters/w/expiry").await;
    let ttl_ms = expiry["ttl_ms"].as_u64().expect("an expiry");
    assert!(ttl_ms > 0 && ttl_ms <= 300, "{expiry}");

    // The time comes: every node reads 0, and one node deleted it.
    let zero = json!({"name": "w", "value": 0, "nodes": {"a": 0, "b": 0}});
    for m in [&a, &b, &c] {
        settle_on(m, "/v1/counters/w", &zero).await;
    }
    let zero = json!({"name": "w", "value": 0, "nodes": {"a": 0, "b": 0, "c": 0}});
    assert_eq!(query::<i64>(&mut con_c, &["PTTL", "w"]).await, -1);
    let expired = || expired_by(&a) + expired_by(&b) + expired_by(&c);
    assert_eq!(expired(), 1, "one node deletes an expiry all three sweep");
    assert_eq!(c.increment("w", 5).await["value"], 5);
    let five = json!({"name": "w", "value": 5, "nodes": {"a": 0, "b": 0, "c": 5}});
    settle_on(&a, "/v1/counters/w", &five).await;

    // Windows, one after another, set through different nodes: each is
    // deleted exactly once, and what is added after counts from zero.
    for (round, m) in [&a, &b, &c, &a].into_iter().enumerate() {
        let mut con = m.redis().await;
        let _: i64 = query(&mut con, &["INCRBY", "w", "2"]).await;
        assert_eq!(
            query::<i64>(&mut con, &["PEXPIRE", "w", "100", "NX"]).await,
            1
        );
        for n in [&a, &b, &c] {
            settle_on(n, "/v1/counters/w", &zero).await;
        }
        assert_eq!(expired(), 2 + round as u64);
    }
    // An expiry in the past deletes at once, through the node asked; a
    // delete clears an expiry.
    b.increment("w", 9).await;
    assert_eq!(query::<i64>(&mut con_b, &["PEXPIRE", "w", "-5"]).await, 1);
    assert_eq!(
        query::<Option<String>>(&mut con_b, &["GET", "w"])
            .await
            .as_deref(),
        Some("0")
    );
    b.increment("w", 1).await;
    assert_eq!(query::<i64>(&mut con_b, &["EXPIRE", "w", "100"]).await, 1);
    assert!(delete_over_http(&a, "w", false).await.0);
    assert_eq!(query::<i64>(&mut con_b, &["TTL", "w"]).await, -1);
    for m in [a, b, c] {
        m.stop().await;
    }
}

// On a node without a store, an expiry is journaled: it outlives a
// restart (and a snapshot), then deletes the counter when its time comes;
// `PERSIST` and a delete clear it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_without_a_store_outlives_a_restart_and_then_deletes() {
    let solo = Member::start(None, "solo").await;
    solo.increment("w", 5).await;
    solo.increment("kept", 1).await;
    let mut con = solo.redis().await;
    assert_eq!(query::<i64>(&mut con, &["PEXPIRE", "w", "1500"]).await, 1);
    assert_eq!(query::<i64>(&mut con, &["EXPIRE", "kept", "1"]).await, 1);
    assert_eq!(query::<i64>(&mut con, &["PERSIST", "kept"]).await, 1);
    assert_eq!(query::<i64>(&mut con, &["PERSIST", "kept"]).await, 0);
    solo.node.snapshot().unwrap();
    let dir = solo.stop().await;
    let solo = Member::start_in(dir, None, "solo", FAST.refresh_interval).await;
    let mut con = solo.redis().await;
    let left: i64 = query(&mut con, &["PTTL", "w"]).await;
    assert!(left > 0 && left <= 1500, "PTTL after the restart: {left}");
    assert_eq!(query::<i64>(&mut con, &["TTL", "kept"]).await, -1);
    eventually("w expires", async || {
        match query::<Option<String>>(&mut con, &["GET", "w"]).await {
            Some(v) if v == "0" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(query::<i64>(&mut con, &["TTL", "w"]).await, -1);
    assert_eq!(expired_by(&solo), 1);
    assert_eq!(query::<i64>(&mut con, &["INCR", "w"]).await, 1);
    assert_eq!(
        query::<Option<String>>(&mut con, &["GET", "kept"])
            .await
            .as_deref(),
        Some("1")
    );
    assert_eq!(query::<i64>(&mut con, &["EXPIRE", "w", "100"]).await, 1);
    assert_eq!(query::<i64>(&mut con, &["DEL", "w"]).await, 1);
    assert_eq!(query::<i64>(&mut con, &["TTL", "w"]).await, -1);
    // After a restart the delete still cleared it.
    let dir = solo.stop().await;
    let solo = Member::start_in(dir, None, "solo", FAST.refresh_interval).await;
    let mut con = solo.redis().await;
    assert_eq!(query::<i64>(&mut con, &["TTL", "w"]).await, -1);
    solo.stop().await;
}
