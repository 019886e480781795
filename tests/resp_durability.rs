//! What a RESP acknowledgement promises: an increment answered with its
//! value is durable (it survives a power cut even when its pipeline shared
//! one sync), a failed sync is never answered as a success, and a graceful
//! shutdown answers every increment it applied.

use tally_lab::testing::served as resp_support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use resp_support::{ServedNode, exchange, read_at_least, read_to_close, request};
use tally::engine::storage::{SimOp, SimStorage};
use tally::{Config, IncrementOptions, Node};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A node configuration on simulated storage where nothing is synced in
/// the background within a test's lifetime: only syncs someone waits for
/// happen, so a crash loses whatever no acknowledged request waited for.
fn sim_config() -> Config {
    let mut config = Config::new(Path::new("/sim/node"));
    config.memory_sync_delay = Duration::from_secs(3600);
    config
}

fn replies(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .split_terminator("\r\n")
        .map(str::to_string)
        .collect()
}

/// Sends `request` and reads until `lines` complete reply lines came.
async fn exchange_lines(s: &mut TcpStream, request: &[u8], lines: usize) -> Vec<String> {
    s.write_all(request).await.unwrap();
    let mut got = Vec::new();
    while replies(&got).len() < lines || !got.ends_with(b"\r\n") {
        let more = read_at_least(s, 1).await;
        assert!(!more.is_empty(), "closed after {:?}", replies(&got));
        got.extend(more);
    }
    replies(&got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_acknowledgements_survive_a_power_cut() {
    // Proves every increment of a pipeline answered with a value is on
    // disk when the reply arrives, both when the pipeline's last increment
    // succeeds and when it is refused (overflow) and cannot carry the sync.
    let sim = SimStorage::new();
    let server = ServedNode::open_on(Arc::new(sim.clone()), sim_config()).await;
    let mut s = server.raw().await;

    let mut pipeline = Vec::new();
    for _ in 0..100 {
        pipeline.extend(request(&[b"INCR", b"a"]));
    }
    pipeline.extend(request(&[
        b"TALLY.INCRBY",
        b"b",
        b"5",
        b"IDEMPOTENCY",
        b"k1",
    ]));
    pipeline.extend(request(&[b"INCRBY", b"a", b"1"]));
    let want: Vec<String> = (1..=100)
        .map(|i| format!(":{i}"))
        .chain(["*2", ":5", ":0", ":101"].map(String::from))
        .collect();
    assert_eq!(exchange_lines(&mut s, &pipeline, want.len()).await, want);

    let mut pipeline = Vec::new();
    for _ in 0..50 {
        pipeline.extend(request(&[b"INCR", b"c"]));
    }
    pipeline.extend(request(&[b"INCRBY", b"big", b"9223372036854775807"]));
    // Refused: the round's last increment cannot be the one that syncs.
    pipeline.extend(request(&[b"INCR", b"big"]));
    let got = exchange_lines(&mut s, &pipeline, 52).await;
    assert_eq!(got[49], ":50");
    assert_eq!(got[50], ":9223372036854775807");
    assert_eq!(got[51], "-ERR increment or decrement would overflow");

    // Power cut now: only what was synced survives.
    let rebooted = sim.crash(&[]);
    let node = Node::open_with_storage(sim_config(), Arc::new(rebooted)).unwrap();
    assert_eq!(node.get("a").unwrap(), Some(101));
    assert_eq!(node.get("b").unwrap(), Some(5));
    assert_eq!(node.get("c").unwrap(), Some(50));
    assert_eq!(node.get("big").unwrap(), Some(i64::MAX));
    let retry = IncrementOptions {
        idempotency_key: Some("k1"),
        ..Default::default()
    };
    assert!(node.increment("b", 5, retry).await.unwrap().duplicate);
    node.shutdown().unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_sync_never_acknowledges_a_pipelined_increment() {
    // Proves when the sync covering a pipeline fails, every increment in it
    // is answered INDETERMINATE (none with a value), and later ones are
    // refused UNAVAILABLE until restart.
    let sim = SimStorage::new();
    let server = ServedNode::open_on(Arc::new(sim.clone()), sim_config()).await;
    let mut s = server.raw().await;
    assert_eq!(
        exchange(&mut s, &request(&[b"INCR", b"x"]), 4).await,
        b":1\r\n"
    );

    let (_, syncs) = sim.op_counts();
    sim.fail_from(SimOp::Sync, syncs + 1);
    let mut pipeline = Vec::new();
    for _ in 0..20 {
        pipeline.extend(request(&[b"INCR", b"x"]));
    }
    let got = exchange_lines(&mut s, &pipeline, 20).await;
    assert_eq!(got.len(), 20);
    for reply in got {
        assert!(reply.starts_with("-INDETERMINATE "), "{reply}");
    }
    let after = exchange(&mut s, &request(&[b"INCR", b"x"]), 1).await;
    assert!(
        String::from_utf8_lossy(&after).starts_with("-UNAVAILABLE journal failed"),
        "{after:?}"
    );
    let node = server.stop_serving().await;
    assert!(node.shutdown().is_err(), "the failed journal is reported");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_answers_every_increment_it_applied() {
    // Proves a shutdown in the middle of a long pipeline neither applies an
    // increment without answering it nor answers one it did not apply, and
    // does not wait on idle connections.
    let dir = tempfile::tempdir().unwrap();
    let server = ServedNode::open(dir.path()).await;
    let _idle = server.raw().await;
    let mut s = server.raw().await;
    let mut pipeline = Vec::new();
    for _ in 0..5000 {
        pipeline.extend(request(&[b"INCR", b"n"]));
    }
    // The replies (7 bytes each at most) fit in the socket buffers, so the
    // whole pipeline can be written before any reply is read.
    s.write_all(&pipeline).await.unwrap();
    let first = read_at_least(&mut s, 1).await;
    let started = Instant::now();
    server.stop().await;
    assert!(started.elapsed() < Duration::from_secs(5));
    let mut got = first;
    got.extend(read_to_close(&mut s).await);
    let answered = replies(&got);
    for (i, reply) in answered.iter().enumerate() {
        assert_eq!(reply, &format!(":{}", i + 1));
    }

    let node = Node::open(Config::new(dir.path())).unwrap();
    assert_eq!(node.get("n").unwrap(), Some(answered.len() as i64));
    node.shutdown().unwrap();
}
