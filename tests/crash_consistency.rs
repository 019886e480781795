//! Crash consistency of the journal, snapshots and recovery, on the
//! simulated storage that tells written bytes from durable ones.
//!
//! Every test here checks the same property from a different angle: after a
//! power cut or an I/O error, recovery holds every acknowledged increment
//! exactly once, and nothing that was never attempted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tally::engine::deadlines::ExpireIf;
use tally::engine::storage::{SimOp, SimStorage, Storage};
use tally::{Config, Durability, Error, IncrementOptions, Node, RecoveryMode};

const DATA: &str = "/data";
const COUNTERS: u64 = 3;
const OPS: u64 = 36;

fn config() -> Config {
    let mut c = Config::new(DATA);
    c.node_id = Some("sim".into());
    // Small segments so that the workload rotates segments several times.
    c.segment_bytes_max = 200;
    // Snapshots only when the workload asks for one.
    c.snapshot_journal_bytes = u64::MAX;
    c
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    Acked,
    /// The node said the increment was not applied.
    Refused,
    /// The node could not say (`Error::Indeterminate`).
    Unknown,
}

#[derive(Debug, Clone)]
struct Op {
    counter: String,
    /// A distinct power of two per counter, so a value says exactly which
    /// increments it contains, and a double count shows up as a carry.
    delta: i64,
    key: Option<String>,
    outcome: Outcome,
}

fn op_plan(i: u64) -> (String, i64, Option<String>) {
    let counter = format!("c{}", i % COUNTERS);
    let delta = 1i64 << (i / COUNTERS);
    let key = i.is_multiple_of(2).then(|| format!("key-{i}"));
    (counter, delta, key)
}

/// Runs the deterministic workload: sequential `local` increments, some
/// with idempotency keys, and a snapshot at two points. Errors after a fault
/// are expected; every attempt is recorded with its outcome.
async fn workload(node: &Node) -> Vec<Op> {
    let mut ops = Vec::new();
    for i in 0..OPS {
        if i == 11 || i == 25 {
            let _ = node.snapshot();
        }
        let (counter, delta, key) = op_plan(i);
        let r = node
            .increment(
                &counter,
                delta,
                IncrementOptions {
                    durability: Some(Durability::Local),
                    idempotency_key: key.as_deref(),
                },
            )
            .await;
        let outcome = match r {
            Ok(o) => {
                assert!(!o.duplicate, "op {i} reported a duplicate on first send");
                Outcome::Acked
            }
            Err(Error::Indeterminate(_)) => Outcome::Unknown,
            Err(_) => Outcome::Refused,
        };
        ops.push(Op {
            counter,
            delta,
            key,
            outcome,
        });
    }
    ops
}

/// Checks a recovered node against the history: every acknowledged
/// increment is present, no refused one is, none is counted twice, and
/// every key agrees with whether its increment was applied.
async fn check_recovered(node: &Node, ops: &[Op], context: &str) {
    let mut by_counter: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in ops {
        by_counter.entry(&op.counter).or_default().push(op);
    }
    for (counter, ops) in &by_counter {
        let value = node.get(counter).unwrap().unwrap_or(0);
        let acked: i64 = ops
            .iter()
            .filter(|o| o.outcome == Outcome::Acked)
            .map(|o| o.delta)
            .sum();
        let possible: i64 = ops
            .iter()
            .filter(|o| o.outcome != Outcome::Refused)
            .map(|o| o.delta)
            .sum();
        assert_eq!(
            value & acked,
            acked,
            "{context}: {counter}={value:#b} lost acknowledged increments {acked:#b}"
        );
        assert_eq!(
            value & !possible,
            0,
            "{context}: {counter}={value:#b} holds increments never applied or counted twice (possible {possible:#b})"
        );
        for op in ops.iter().filter(|o| o.key.is_some()) {
            let applied = value & op.delta != 0;
            let again = node
                .increment(
                    counter,
                    op.delta,
                    IncrementOptions {
                        durability: Some(Durability::Memory),
                        idempotency_key: op.key.as_deref(),
                    },
                )
                .await
                .unwrap();
            assert_eq!(
                again.duplicate, applied,
                "{context}: key {:?} duplicate={} but increment applied={applied}",
                op.key, again.duplicate
            );
        }
    }
}

fn last_segment(fs: &SimStorage) -> Option<PathBuf> {
    fs.paths()
        .into_iter()
        .filter(|p| p.parent() == Some(&Path::new(DATA).join("journal")))
        .max()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

// Cut power at every sync point of the workload, and at each cut also tear
// the unsynced tail of the last segment at every byte: recovery always
// holds every acknowledged increment exactly once.
#[test]
fn crash_consistency_at_every_sync_point_and_torn_byte() {
    let rt = runtime();
    let clean = SimStorage::new();
    let node = Node::open_with_storage(config(), Arc::new(clean.clone())).unwrap();
    let ops = rt.block_on(workload(&node));
    assert!(ops.iter().all(|o| o.outcome == Outcome::Acked));
    let (_, syncs_after_open) = clean.op_counts();
    node.shutdown().unwrap();
    assert!(
        syncs_after_open > OPS,
        "workload made {syncs_after_open} syncs"
    );

    let mut recoveries = 0;
    for cut in 1..=syncs_after_open + 1 {
        let fs = SimStorage::new();
        fs.fail_from(SimOp::Sync, cut);
        let Ok(node) = Node::open_with_storage(config(), Arc::new(fs.clone())) else {
            // The cut fell inside the first open: nothing was acknowledged.
            let after = fs.crash(&[]);
            let node = Node::open_with_storage(config(), Arc::new(after)).unwrap();
            assert_eq!(node.counter_count(), 0);
            continue;
        };
        let ops = rt.block_on(workload(&node));
        if cut <= syncs_after_open {
            assert!(
                ops.iter().any(|o| o.outcome != Outcome::Acked),
                "cut {cut}: a failed sync went unnoticed"
            );
        }
        let tail = last_segment(&fs);
        let unsynced = tail.as_ref().map_or(0, |p| fs.unsynced_len(p));
        for keep in 0..=unsynced {
            let keep_list: Vec<(PathBuf, usize)> = tail.iter().map(|p| (p.clone(), keep)).collect();
            let after = fs.crash(&keep_list);
            let recovered = Node::open_with_storage(config(), Arc::new(after))
                .unwrap_or_else(|e| panic!("cut {cut} keep {keep}: recovery failed: {e}"));
            rt.block_on(check_recovered(
                &recovered,
                &ops,
                &format!("cut {cut} keep {keep}/{unsynced}"),
            ));
            recoveries += 1;
        }
        drop(node);
    }
    assert!(recoveries > syncs_after_open as usize);
}

// A failed write or fsync is sticky: the node stops acknowledging, reports
// not-ready with the reason, and never acknowledges again until reopened.
#[test]
fn io_errors_are_sticky_and_never_acknowledged() {
    let rt = runtime();
    for (op, at) in [(SimOp::Write, 5), (SimOp::Sync, 9)] {
        let fs = SimStorage::new();
        let node = Node::open_with_storage(config(), Arc::new(fs.clone())).unwrap();
        let (w, s) = fs.op_counts();
        fs.fail_from(op, if op == SimOp::Write { w + at } else { s + at });
        let ops = rt.block_on(workload(&node));
        let first_bad = ops
            .iter()
            .position(|o| o.outcome != Outcome::Acked)
            .unwrap();
        assert!(
            ops[first_bad..].iter().all(|o| o.outcome != Outcome::Acked),
            "{op:?}: an increment was acknowledged after the journal failed"
        );
        let ready = node.readiness();
        assert!(!ready.ready);
        assert!(ready.reason.unwrap().contains("simulated I/O error"));
        // A process restart (no power cut: written bytes stay) recovers.
        drop(node);
        let reopened = Node::open_with_storage(config(), Arc::new(fs.crash(&[]))).unwrap();
        rt.block_on(check_recovered(&reopened, &ops, &format!("{op:?} at {at}")));
        assert!(reopened.readiness().ready);
    }
}

// A snapshot taken while increments are in flight is a consistent cut: after
// a power cut, each increment is in the snapshot or the journal, never both,
// never neither.
#[test]
fn snapshot_during_concurrent_increments_is_a_consistent_cut() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let fs = SimStorage::new();
    let node = Node::open_with_storage(config(), Arc::new(fs.clone())).unwrap();
    const TASKS: usize = 8;
    const PER_TASK: usize = 300;
    rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let node = node.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..PER_TASK {
                    let opts = IncrementOptions {
                        durability: Some(if i % 3 == 0 {
                            Durability::Memory
                        } else {
                            Durability::Local
                        }),
                        idempotency_key: None,
                    };
                    node.increment(&format!("hot{}", i % 4), (t + 1) as i64, opts)
                        .await
                        .unwrap();
                }
            }));
        }
        let snapper = {
            let node = node.clone();
            tokio::task::spawn_blocking(move || {
                for _ in 0..20 {
                    node.snapshot().unwrap();
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        for t in tasks {
            t.await.unwrap();
        }
        snapper.await.unwrap();
    });
    // Make the memory-level tail durable, then cut power.
    let end = node.stats().journal_end_pos;
    rt.block_on(async {
        node.increment("fence", 1, IncrementOptions::default())
            .await
            .unwrap()
    });
    assert!(node.stats().journal_durable_pos > end);
    let after = fs.crash(&[]);
    let recovered = Node::open_with_storage(config(), Arc::new(after)).unwrap();
    let per_counter: i64 = (1..=TASKS as i64).sum::<i64>() * (PER_TASK as i64 / 4);
    for c in 0..4 {
        assert_eq!(
            recovered.get(&format!("hot{c}")).unwrap(),
            Some(per_counter),
            "hot{c}"
        );
    }
    assert!(node.stats().snapshots_written >= 20);
}

// Memory-level increments reach the disk within the configured delay
// without anyone asking for a sync.
#[test]
fn memory_increments_are_synced_within_the_delay() {
    let rt = runtime();
    let fs = SimStorage::new();
    let mut c = config();
    c.memory_sync_delay = Duration::from_millis(50);
    let node = Node::open_with_storage(c.clone(), Arc::new(fs.clone())).unwrap();
    let opts = IncrementOptions {
        durability: Some(Durability::Memory),
        idempotency_key: Some("m1"),
    };
    rt.block_on(node.increment("m", 7, opts)).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let recovered = Node::open_with_storage(c, Arc::new(fs.crash(&[]))).unwrap();
    assert_eq!(recovered.get("m").unwrap(), Some(7));
    assert!(
        rt.block_on(recovered.increment("m", 7, opts))
            .unwrap()
            .duplicate
    );
}

fn segments(fs: &SimStorage) -> Vec<PathBuf> {
    let dir = Path::new(DATA).join("journal");
    let mut v: Vec<PathBuf> = fs
        .paths()
        .into_iter()
        .filter(|p| p.parent() == Some(&dir))
        .collect();
    v.sort();
    v
}

// Corruption that is not a torn tail stops start-up with the file and the
// byte offset; the documented mode accepts the loss deliberately.
#[test]
fn corruption_before_the_tail_is_refused_with_file_and_offset() {
    let rt = runtime();
    let fs = SimStorage::new();
    let node = Node::open_with_storage(config(), Arc::new(fs.clone())).unwrap();
    for i in 0..30 {
        rt.block_on(node.increment("x", 1 << (i % 20), IncrementOptions::default()))
            .unwrap();
    }
    drop(node);
    let segs = segments(&fs);
    assert!(segs.len() >= 3, "expected rotation, got {segs:?}");
    let victim = &segs[0];
    let mut bytes = fs.contents(victim).unwrap();
    let flip_at = 32 + 10;
    bytes[flip_at] ^= 0x40;
    fs.set_contents(victim, bytes);

    let err = match Node::open_with_storage(config(), Arc::new(fs.clone())) {
        Err(e) => e,
        Ok(_) => panic!("corruption in an early segment was accepted"),
    };
    match &err {
        Error::Corrupt { path, offset, .. } => {
            assert_eq!(path, victim);
            assert_eq!(*offset, 32, "offset names the start of the bad record");
        }
        other => panic!("unexpected error {other}"),
    }
    assert!(err.to_string().contains("truncate-at-corruption"));

    let mut lenient = config();
    lenient.recovery_mode = RecoveryMode::TruncateAtCorruption;
    let node = Node::open_with_storage(lenient, Arc::new(fs.clone())).unwrap();
    assert!(node.recovery_report().accepted_corruption.is_some());
    assert_eq!(
        node.get("x").unwrap(),
        None,
        "everything after the bad record is dropped"
    );
    // Once accepted, the journal is whole again and a strict open works.
    drop(node);
    Node::open_with_storage(config(), Arc::new(fs)).unwrap();
}

// A corrupt newest snapshot is refused, never silently skipped.
#[test]
fn corrupt_snapshot_is_refused() {
    let rt = runtime();
    let fs = SimStorage::new();
    let node = Node::open_with_storage(config(), Arc::new(fs.clone())).unwrap();
    rt.block_on(node.increment("x", 1, IncrementOptions::default()))
        .unwrap();
    let snap = node.snapshot().unwrap();
    drop(node);
    let mut bytes = fs.contents(&snap).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    fs.set_contents(&snap, bytes);
    match Node::open_with_storage(config(), Arc::new(fs)) {
        Err(Error::Corrupt { path, .. }) => assert_eq!(path, snap),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a corrupt snapshot was accepted"),
    }
}

// The stream of positions must be unbroken: a missing middle segment is a
// gap, refused rather than replayed around.
#[test]
fn missing_segment_is_a_gap_not_a_torn_tail() {
    let rt = runtime();
    let fs = SimStorage::new();
    let node = Node::open_with_storage(config(), Arc::new(fs.clone())).unwrap();
    for _ in 0..30 {
        rt.block_on(node.increment("x", 1, IncrementOptions::default()))
            .unwrap();
    }
    drop(node);
    let segs = segments(&fs);
    fs.remove(&segs[1]).unwrap();
    match Node::open_with_storage(config(), Arc::new(fs)) {
        Err(Error::Corrupt { reason, .. }) => assert!(reason.contains("gap"), "{reason}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a journal gap was accepted"),
    }
}

// Large segments are replayed by several threads (verify, bucket, apply):
// the result equals a sequential replay of the same records up to the first
// bad one, including records before the snapshot's position in the same
// segment and idempotency keys on either side of the cut.
#[test]
fn parallel_replay_matches_a_sequential_model_up_to_the_cut() {
    use tally::engine::journal::{self, Decoded};
    let rt = runtime();
    let fs = SimStorage::new();
    let mut c = config();
    c.segment_bytes_max = 64 << 20;
    let node = Node::open_with_storage(c.clone(), Arc::new(fs.clone())).unwrap();
    const RECORDS: u64 = 60_000;
    rt.block_on(async {
        for i in 0..RECORDS {
            if i == RECORDS / 3 {
                node.snapshot().unwrap();
            }
            let key = i.is_multiple_of(10).then(|| format!("pk-{i}"));
            let opts = IncrementOptions {
                durability: Some(Durability::Memory),
                idempotency_key: key.as_deref(),
            };
            node.increment(&format!("p{}", i % 997), (i % 7) as i64 - 2, opts)
                .await
                .unwrap();
        }
        node.sync().await.unwrap();
    });
    let seg = last_segment(&fs).unwrap();
    let mut bytes = fs.contents(&seg).unwrap();
    drop(node);

    // Frame the records, pick one about 70% in, and flip a bit in its delta.
    let mut offsets = Vec::new();
    let mut off = journal::SEGMENT_HEADER_BYTES;
    while let Ok(len) = journal::frame_len(&bytes[off..]) {
        offsets.push(off);
        off += len;
    }
    assert_eq!(offsets.len() as u64, RECORDS);
    let cut = offsets[offsets.len() * 7 / 10];
    bytes[cut + 8 + 10] ^= 0x01;
    fs.set_contents(&seg, bytes.clone());

    // The model: every record before the cut, applied in order.
    let mut model: BTreeMap<String, i64> = BTreeMap::new();
    let (mut key_before, mut key_after) = (None, None);
    for &o in &offsets {
        match journal::decode(&bytes[o..]) {
            Decoded::Record(r, _) if o < cut => {
                *model.entry(r.name.to_string()).or_default() += r.delta;
                if let Some((k, _)) = r.key {
                    key_before = Some((k.to_string(), r.name.to_string(), r.delta));
                }
            }
            Decoded::Record(r, _) => {
                if let (Some((k, _)), None) = (r.key, &key_after) {
                    key_after = Some((k.to_string(), r.name.to_string(), r.delta));
                }
            }
            _ => assert_eq!(o, cut, "only the flipped record is bad"),
        }
    }
    let recovered = Node::open_with_storage(c, Arc::new(fs)).unwrap();
    let torn = recovered.recovery_report().torn_tail.clone().unwrap();
    assert_eq!(torn.offset, cut as u64);
    assert_eq!(recovered.counter_count(), model.len());
    for (name, value) in &model {
        assert_eq!(recovered.get(name).unwrap(), Some(*value), "{name}");
    }
    // The same increment again: a retry of it.
    let resend = |(key, name, delta): (String, String, i64)| {
        rt.block_on(recovered.increment(
            &name,
            delta,
            IncrementOptions {
                durability: Some(Durability::Memory),
                idempotency_key: Some(&key),
            },
        ))
        .unwrap()
        .duplicate
    };
    assert!(
        resend(key_before.unwrap()),
        "a key before the cut is remembered"
    );
    assert!(
        !resend(key_after.unwrap()),
        "a key after the cut is forgotten"
    );
}

// `settled` records (the store committed this node's rows up to a
// version) change no counter; recovery reports the highest one, across
// segments, and a torn one is dropped like any torn record: what remains
// is the highest of those that reached the disk whole.
#[test]
fn settled_records_are_reported_and_change_nothing() {
    use tally::engine::Engine;
    use tally::metrics::Metrics;
    let fs = SimStorage::new();
    let storage: Arc<dyn Storage> = Arc::new(fs.clone());
    let metrics = Arc::new(Metrics::default());
    let (engine, report) = Engine::open(&config(), storage.clone(), metrics.clone()).unwrap();
    assert_eq!(report.settled, None);
    let increment = |engine: &Engine| {
        engine
            .apply(tally::engine::Change::Increment {
                name: "c",
                delta: 1,
                key: None,
                urgency: tally::engine::journal::Urgency::Now,
            })
            .unwrap();
    };
    let rt = runtime();
    for i in 0..20u64 {
        increment(&engine);
        // Out of order on purpose: recovery keeps the highest, not the last.
        let (epoch, lsn) = if i == 10 { (3, 5) } else { (2, i) };
        engine.journal_settled("c", epoch, lsn).unwrap();
        // One write per round, so that the small segments rotate.
        rt.block_on(engine.sync()).unwrap();
    }
    rt.block_on(engine.sync()).unwrap();
    drop(engine);
    let after = fs.crash(&[]);
    let (engine, report) =
        Engine::open(&config(), Arc::new(after), Arc::new(Metrics::default())).unwrap();
    assert_eq!(report.settled, Some((3, 5)));
    assert_eq!(engine.table().get("c").map(|e| e.value), Some(20));
    assert!(report.segments.len() > 1, "the records span segments");

    // Torn: the last settled record cut anywhere is dropped, the counter
    // unharmed.
    let fs = SimStorage::new();
    let (engine, _) = Engine::open(&config(), Arc::new(fs.clone()), metrics).unwrap();
    increment(&engine);
    rt.block_on(engine.sync()).unwrap();
    // Every later sync fails: the record is written, never synced.
    let (_, syncs) = fs.op_counts();
    fs.fail_from(SimOp::Sync, syncs + 1);
    engine.journal_settled("c", 1, 1).unwrap();
    assert!(
        rt.block_on(engine.sync()).is_err(),
        "the sync was made to fail"
    );
    let tail = last_segment(&fs).unwrap();
    let unsynced = fs.unsynced_len(&tail);
    drop(engine);
    assert!(unsynced > 0, "the settled record is written but not synced");
    for keep in 0..unsynced {
        let after = fs.crash(&[(tail.clone(), keep)]);
        let (engine, report) =
            Engine::open(&config(), Arc::new(after), Arc::new(Metrics::default())).unwrap();
        assert_eq!(report.settled, None, "keep {keep}");
        assert_eq!(engine.table().get("c").map(|e| e.value), Some(1));
    }
    let (_, whole) = Engine::open(
        &config(),
        Arc::new(fs.crash(&[(tail, unsynced)])),
        Arc::new(Metrics::default()),
    )
    .unwrap();
    assert_eq!(whole.settled, Some((1, 1)), "the whole record is kept");
}

// The commit path of a served node: runtime workers about to go idle sync
// the records of the requests they read (the runtime's park hook), and the
// writer thread syncs what they leave longer than the grace. Either way an
// acknowledgement means durable: after a power cut every acknowledged
// `local` increment is there, and the workers did take part.
#[test]
fn increments_synced_by_idle_workers_survive_a_power_cut() {
    let rt = tally::engine::journal::runtime_builder()
        .worker_threads(2)
        .build()
        .unwrap();
    let fs = SimStorage::new();
    let mut c = config();
    c.segment_bytes_max = 4096;
    let node = Node::open_with_storage(c.clone(), Arc::new(fs.clone())).unwrap();
    const TASKS: i64 = 16;
    const PER_TASK: i64 = 200;
    rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let node = node.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..PER_TASK {
                    node.increment(&format!("c{}", i % 5), t + 1, IncrementOptions::default())
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let by_workers = node
        .metrics()
        .journal_syncs_by_idle_worker
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(by_workers > 0, "no sync was made by an idle worker");
    drop(rt);
    let after = fs.crash(&[]);
    let reopened = Node::open_with_storage(c, Arc::new(after)).unwrap();
    let total: i64 = (0..5)
        .map(|k| reopened.get(&format!("c{k}")).unwrap().unwrap_or(0))
        .sum();
    // Each task adds its number PER_TASK times.
    assert_eq!(total, PER_TASK * TASKS * (TASKS + 1) / 2);
}

// A worker that never goes idle (a task that only yields) cannot hold an
// acknowledgement: the writer thread syncs the record after the grace.
#[test]
fn a_worker_that_never_idles_does_not_hold_acknowledgements() {
    let rt = tally::engine::journal::runtime_builder()
        .worker_threads(1)
        .build()
        .unwrap();
    let fs = SimStorage::new();
    let node = Node::open_with_storage(config(), Arc::new(fs.clone())).unwrap();
    rt.block_on(async {
        // Let the worker park once, so that the process knows workers sync.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spinner = {
            let stop = stop.clone();
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    tokio::task::yield_now().await;
                }
            })
        };
        let before = node
            .metrics()
            .journal_syncs_by_idle_worker
            .load(std::sync::atomic::Ordering::Relaxed);
        for _ in 0..20 {
            tokio::time::timeout(
                Duration::from_secs(10),
                node.increment("busy", 1, IncrementOptions::default()),
            )
            .await
            .expect("an acknowledgement waited for an idle worker")
            .unwrap();
        }
        let after = node
            .metrics()
            .journal_syncs_by_idle_worker
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(after, before, "the only worker never went idle");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        spinner.await.unwrap();
    });
    let reopened = Node::open_with_storage(config(), Arc::new(fs.crash(&[]))).unwrap();
    assert_eq!(reopened.get("busy").unwrap(), Some(20));
}

// Segments are filled with zeros ahead of their records. A power cut at
// any point of a write over those zeros, torn at any byte, recovers to a
// prefix of the batch; the zeros after the last record are no damage, in
// the last segment or an earlier one, and the recovered node goes on
// writing exactly.
#[test]
fn zeros_filled_ahead_are_the_clean_end_of_a_segment() {
    let rt = runtime();
    let fs = SimStorage::new();
    let mut c = config();
    c.segment_bytes_max = 1 << 16;
    let node = Node::open_with_storage(c.clone(), Arc::new(fs.clone())).unwrap();
    rt.block_on(async {
        for _ in 0..10 {
            node.increment("z", 1, IncrementOptions::default())
                .await
                .unwrap();
        }
    });
    let tail = last_segment(&fs).unwrap();
    let bytes = fs.contents(&tail).unwrap();
    assert!(
        bytes.len() as u64 >= c.segment_bytes_max,
        "the segment is filled ahead: {} bytes",
        bytes.len()
    );
    assert!(bytes.ends_with(&[0u8; 1024]), "with zeros");
    // The next write fails to sync: it sits over the zeros, unsynced.
    let (_, syncs) = fs.op_counts();
    fs.fail_from(SimOp::Sync, syncs + 1);
    let failed = rt.block_on(node.increment("z", 100, IncrementOptions::default()));
    assert!(failed.is_err(), "the sync was made to fail");
    let unsynced = fs.unsynced_len(&tail);
    assert!(
        unsynced > 0 && unsynced < 200,
        "one record over zeros: {unsynced}"
    );
    drop(node);
    for keep in 0..=unsynced {
        let after = fs.crash(&[(tail.clone(), keep)]);
        let reopened = Node::open_with_storage(c.clone(), Arc::new(after.clone()))
            .unwrap_or_else(|e| panic!("keep {keep}: {e}"));
        let v = reopened.get("z").unwrap();
        // Whole or not at all.
        let whole = if keep == unsynced { 110 } else { 10 };
        assert_eq!(v, Some(whole), "keep {keep}");
        // Writing on: the old segment, now not the last, keeps its zero
        // tail; a second recovery reads past it to the new records.
        rt.block_on(reopened.increment("z", 1000, IncrementOptions::default()))
            .unwrap();
        drop(reopened);
        let again = Node::open_with_storage(c.clone(), Arc::new(after.crash(&[]))).unwrap();
        assert_eq!(
            again.get("z").unwrap(),
            Some(whole + 1000),
            "keep {keep}, second start"
        );
    }
}

// A process that dies before its sync returns leaves records in the page
// cache. The next start reads and applies them; it must make them durable
// before it writes on, or a later power cut would take them back (values
// going down after being served) and leave a segment shorter than where
// its successor starts (a journal gap that refuses every later start).
#[test]
fn records_recovered_from_the_page_cache_are_made_durable() {
    let rt = runtime();
    let fs = SimStorage::new();
    let node = Node::open_with_storage(config(), Arc::new(fs.clone())).unwrap();
    rt.block_on(async {
        node.increment("p", 1, IncrementOptions::default())
            .await
            .unwrap();
    });
    let (_, syncs) = fs.op_counts();
    fs.fail_from(SimOp::Sync, syncs + 1);
    assert!(
        rt.block_on(node.increment("p", 2, IncrementOptions::default()))
            .is_err()
    );
    assert!(fs.unsynced_len(&last_segment(&fs).unwrap()) > 0);
    drop(node);
    // The process died; the machine did not.
    let restarted = fs.process_crash();
    let node = Node::open_with_storage(config(), Arc::new(restarted.clone())).unwrap();
    assert_eq!(node.get("p").unwrap(), Some(3), "the page cache held it");
    rt.block_on(async {
        for _ in 0..5 {
            node.increment("p", 4, IncrementOptions::default())
                .await
                .unwrap();
        }
    });
    drop(node);
    // Now the machine loses power.
    let after = restarted.crash(&[]);
    let node = Node::open_with_storage(config(), Arc::new(after))
        .unwrap_or_else(|e| panic!("start after the power cut: {e}"));
    assert_eq!(
        node.get("p").unwrap(),
        Some(23),
        "served values never go back"
    );
}

/// One step of [`reset_workload`]: add `Some(delta)`, or reset (`None`).
const RESET_PLAN: [Option<i64>; 9] = [
    Some(1),
    Some(2),
    None,
    Some(4),
    Some(8),
    None,
    None,
    Some(16),
    Some(32),
];

/// Increments and resets of one counter, each `local`, a snapshot after
/// the first reset; returns how many steps were attempted and how many,
/// from the first, were acknowledged without a break.
async fn reset_workload(node: &Node) -> (usize, usize) {
    let mut acked = 0;
    for (i, step) in RESET_PLAN.iter().enumerate() {
        if i == 3 {
            let _ = node.snapshot();
        }
        let ok = match step {
            Some(delta) => node
                .increment("c", *delta, IncrementOptions::default())
                .await
                .is_ok(),
            None => node.delete("c").await.is_ok(),
        };
        if !ok {
            return (i + 1, acked);
        }
        acked = i + 1;
    }
    (RESET_PLAN.len(), acked)
}

/// The counter's value after the first `steps` steps of [`RESET_PLAN`].
fn reset_model(steps: usize) -> i64 {
    RESET_PLAN[..steps]
        .iter()
        .fold(0, |v, s| s.map_or(0, |d| v + d))
}

// A reset (a delete on a node without a store) is journaled like an
// increment: cut power at every sync point and tear the unsynced tail at
// every byte, and the counter always recovers to the state after a prefix
// of its history that holds every acknowledged step, reset or increment.
#[test]
fn resets_survive_a_power_cut_at_every_sync_point() {
    let rt = runtime();
    let clean = SimStorage::new();
    let node = Node::open_with_storage(config(), Arc::new(clean.clone())).unwrap();
    assert_eq!(rt.block_on(reset_workload(&node)), (9, 9));
    assert_eq!(node.get("c").unwrap(), Some(reset_model(9)));
    let (_, syncs) = clean.op_counts();
    node.shutdown().unwrap();
    power_cut_at_every_sync_point(
        syncs,
        |node| rt.block_on(reset_workload(node)),
        |node| node.get("c").unwrap().unwrap_or(0),
        reset_model,
    );
}

/// Runs `workload` (returning how many steps it attempted and how many,
/// from the first, were acknowledged) on a node whose storage fails from
/// its `cut`-th sync on, for every cut up to `syncs + 1`, then recovers
/// with the unsynced tail of the last segment torn at every byte: the
/// state read by `state` must be `model` of some number of steps between
/// the acknowledged and the attempted ones.
fn power_cut_at_every_sync_point<S: PartialEq + std::fmt::Debug>(
    syncs: u64,
    workload: impl Fn(&Node) -> (usize, usize),
    state: impl Fn(&Node) -> S,
    model: impl Fn(usize) -> S,
) {
    let mut recoveries = 0;
    for cut in 1..=syncs + 1 {
        let fs = SimStorage::new();
        fs.fail_from(SimOp::Sync, cut);
        let Ok(node) = Node::open_with_storage(config(), Arc::new(fs.clone())) else {
            continue;
        };
        let (attempted, acked) = workload(&node);
        let tail = last_segment(&fs);
        let unsynced = tail.as_ref().map_or(0, |p| fs.unsynced_len(p));
        for keep in 0..=unsynced {
            let keep_list: Vec<(PathBuf, usize)> = tail.iter().map(|p| (p.clone(), keep)).collect();
            let recovered = Node::open_with_storage(config(), Arc::new(fs.crash(&keep_list)))
                .unwrap_or_else(|e| panic!("cut {cut} keep {keep}: recovery failed: {e}"));
            let got = state(&recovered);
            let possible: Vec<S> = (acked..=attempted).map(&model).collect();
            assert!(
                possible.contains(&got),
                "cut {cut} keep {keep}/{unsynced}: recovered {got:?}, but after {acked} \
                 acknowledged of {attempted} attempted steps it can only be one of {possible:?}"
            );
            recoveries += 1;
        }
        drop(node);
    }
    assert!(recoveries as u64 > syncs);
}

/// One step of [`expiry_workload`] on counter `w`.
#[derive(Debug, Clone, Copy)]
enum ExpiryStep {
    Add(i64),
    /// Expire at this unix time (ms), far in the future: never reached.
    ExpireAt(u64),
    Persist,
    Delete,
}

const FAR: u64 = 4_000_000_000_000;

const EXPIRY_PLAN: [ExpiryStep; 10] = [
    ExpiryStep::Add(1),
    ExpiryStep::ExpireAt(FAR + 1),
    ExpiryStep::Add(2),
    ExpiryStep::ExpireAt(FAR + 2),
    ExpiryStep::Persist,
    ExpiryStep::ExpireAt(FAR + 3),
    ExpiryStep::Delete,
    ExpiryStep::Add(4),
    ExpiryStep::ExpireAt(FAR + 4),
    ExpiryStep::Add(8),
];

/// The steps of [`EXPIRY_PLAN`], each acknowledged before the next, a
/// snapshot after the fourth; returns how many steps were attempted and
/// how many, from the first, were acknowledged without a break.
async fn expiry_workload(node: &Node) -> (usize, usize) {
    let mut acked = 0;
    for (i, step) in EXPIRY_PLAN.iter().enumerate() {
        if i == 4 {
            let _ = node.snapshot();
        }
        let ok = match *step {
            ExpiryStep::Add(delta) => node
                .increment("w", delta, IncrementOptions::default())
                .await
                .is_ok(),
            ExpiryStep::ExpireAt(at) => node
                .expire("w", Some(at), ExpireIf::Always)
                .await
                .is_ok_and(|changed| changed == Some(true)),
            ExpiryStep::Persist => node
                .expire("w", None, ExpireIf::Always)
                .await
                .is_ok_and(|changed| changed == Some(true)),
            ExpiryStep::Delete => node.delete("w").await.is_ok(),
        };
        if !ok {
            return (i + 1, acked);
        }
        acked = i + 1;
    }
    (EXPIRY_PLAN.len(), acked)
}

/// Counter `w`'s value and expiry after the first `steps` steps.
fn expiry_model(steps: usize) -> (i64, Option<u64>) {
    EXPIRY_PLAN[..steps]
        .iter()
        .fold((0, None), |(v, at), s| match *s {
            ExpiryStep::Add(d) => (v + d, at),
            ExpiryStep::ExpireAt(t) => (v, Some(t)),
            ExpiryStep::Persist => (v, None),
            ExpiryStep::Delete => (0, None),
        })
}

// A counter's expiry is journaled (and carried by snapshots) like its
// value: cut power at every sync point and tear the unsynced tail at every
// byte, and the counter recovers to the value and expiry after a prefix of
// its history that holds every acknowledged step (a delete clearing the
// expiry included).
#[test]
fn expiries_survive_a_power_cut_at_every_sync_point() {
    let rt = runtime();
    let clean = SimStorage::new();
    let node = Node::open_with_storage(config(), Arc::new(clean.clone())).unwrap();
    assert_eq!(rt.block_on(expiry_workload(&node)), (10, 10));
    let got = (
        node.get("w").unwrap().unwrap(),
        rt.block_on(node.expiry("w")).unwrap().unwrap(),
    );
    assert_eq!(got, expiry_model(10));
    let (_, syncs) = clean.op_counts();
    node.shutdown().unwrap();
    let reopened = Node::open_with_storage(config(), Arc::new(clean.crash(&[]))).unwrap();
    assert_eq!(
        rt.block_on(reopened.expiry("w")).unwrap().unwrap(),
        Some(FAR + 4),
        "the expiry outlives a clean restart from the snapshot and journal"
    );
    drop(reopened);
    power_cut_at_every_sync_point(
        syncs,
        |node| rt.block_on(expiry_workload(node)),
        |node| {
            (
                node.get("w").unwrap().unwrap_or(0),
                rt.block_on(node.expiry("w")).unwrap().flatten(),
            )
        },
        expiry_model,
    );
}
