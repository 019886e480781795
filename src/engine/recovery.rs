//! Recovery: rebuilds the counter table and idempotency keys from the newest
//! snapshot and the journal after it, before the node takes any request.
//!
//! Rules (argued in `docs/design.md`, "Recovery"):
//! - The newest snapshot must verify; a bad one stops start-up (a snapshot is
//!   synced before it is renamed into place, so a crash cannot tear it).
//! - Segments wholly before the snapshot are leftovers and are removed.
//! - The remaining segments must form one unbroken stream of positions.
//! - A segment's records end where zeros run to the end of the file (the
//!   journal fills zeros ahead of its writes); that is no damage.
//! - A torn or corrupt record in the *last* segment is a crash artifact: the
//!   segment is cut there (and the cut made durable) and start-up goes on.
//! - A bad record anywhere else is refused with the file and byte offset,
//!   unless [`RecoveryMode::TruncateAtCorruption`] accepts the loss.
//! - A record is applied only if its lsn is newer than its counter's entry,
//!   so records already folded into the snapshot are not counted twice.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::RecoveryMode;
use crate::engine::deadlines::Deadlines;
use crate::engine::idempotency::{self, IdempotencyKeys};
use crate::engine::journal::Kind;
use crate::engine::journal::{self, Decoded, SEGMENT_HEADER_BYTES};
use crate::engine::snapshot::{self, Item, SnapshotMeta};
use crate::engine::storage::Storage;
use crate::engine::table::{CounterTable, ReplayOp, SHARDS, Update};
use crate::error::{Error, Result};
use compact_str::CompactString;

/// Name of the journal directory inside the data directory.
pub const JOURNAL_DIR: &str = "journal";

/// Where a torn tail was cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    pub path: PathBuf,
    /// Byte offset in the file where the bad record began.
    pub offset: u64,
    pub bytes_dropped: u64,
    pub reason: String,
}

/// A replicated increment found in the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingReplicated {
    pub name: String,
    pub delta: i64,
    pub lsn: u64,
    /// Store epoch of the node when it made the increment.
    pub epoch: u64,
    pub key: Option<(String, u64)>,
}

/// What recovery found and did.
#[derive(Debug, Clone)]
pub struct RecoveryReport {
    pub snapshot: Option<(PathBuf, SnapshotMeta)>,
    /// Segments kept, oldest first: (start position, path).
    pub segments: Vec<(u64, PathBuf)>,
    /// Journal position just past the last valid record.
    pub end_pos: u64,
    /// Lsn to assign next.
    pub next_lsn: u64,
    pub records_read: u64,
    pub records_applied: u64,
    /// A torn tail cut from the last segment, if any.
    pub torn_tail: Option<Cut>,
    /// Corruption accepted under `TruncateAtCorruption`, if any.
    pub accepted_corruption: Option<Cut>,
    /// Replicated increments in the journal that no revert takes back: a
    /// node with a store checks each against the store before it serves
    /// (was its transaction committed?).
    pub replicated: Vec<PendingReplicated>,
    /// The highest `(epoch, lsn)` the journal says the shared store
    /// committed of this node's rows (`settled` records), if any: every
    /// replicated increment at or below it did commit, whatever a store
    /// that came back older says.
    pub settled: Option<(u64, u64)>,
    pub duration: Duration,
}

fn io_err(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let context = format!("{what} {}", path.display());
    move |e| Error::io(context, e)
}

/// Most threads replaying one segment.
const REPLAY_THREADS_MAX: usize = 8;
/// Below this many records a segment is replayed on the calling thread:
/// starting threads would cost more than they save.
const REPLAY_PARALLEL_RECORDS_MIN: usize = 16_384;

/// A key operation found in the journal, in journal order.
struct KeyOp {
    key: CompactString,
    /// Expiry to restore, or `None` to forget the key (a revert).
    expiry: Option<u64>,
    /// The fingerprint of the increment that carried it.
    fingerprint: u64,
}

/// What one thread found in its run of a segment's records. Kept from
/// segment to segment so that the buckets' memory is reused.
#[derive(Default)]
struct Chunk {
    /// One bucket per table shard, in journal order.
    buckets: Vec<Vec<ReplayOp>>,
    keys: Vec<KeyOp>,
    replicated: Vec<PendingReplicated>,
    reverted: Vec<u64>,
    settled: Option<(u64, u64)>,
    /// Counters' expiries set (`Some`) or cleared (`None`: an expire
    /// record of 0, or an adopt, which a delete writes), in journal order.
    deadlines: Vec<(CompactString, Option<u64>)>,
    max_lsn: u64,
    read: u64,
    /// Index (in the segment's record list) and reason of the first record
    /// that failed verification; the chunk stops there.
    bad: Option<(usize, String)>,
}

/// What replaying one segment found.
struct SegmentReplay {
    /// File offset just past the last valid record.
    end: usize,
    /// File offset and reason of the first bad record, if any.
    bad: Option<(usize, String)>,
    read: u64,
    applied: u64,
    max_lsn: u64,
    settled: Option<(u64, u64)>,
}

/// Verifies and replays one segment (`bytes`, header included, starting at
/// journal position `start`). Records before `covers` are verified but not
/// applied: the snapshot holds them.
///
/// Three steps. Framing walks the length fields alone, which is cheap and
/// inherently sequential. Then each thread verifies the checksums of a
/// contiguous run of records, decodes them, and sorts them into one bucket
/// per table shard. Then each thread applies the buckets of its own
/// partition of the table, taking the runs in journal order, so that a
/// counter's records are applied in the order they were written. Keys and
/// records after the first bad record are dropped before anything is
/// applied.
#[allow(clippy::too_many_arguments)]
fn replay_segment(
    scratch: &mut Vec<Chunk>,
    pending: &mut Vec<PendingReplicated>,
    reverted: &mut Vec<u64>,
    table: &CounterTable,
    keys: &IdempotencyKeys,
    deadlines: &Deadlines,
    bytes: &[u8],
    start: u64,
    covers: u64,
    path: &Path,
    now_ms: u64,
) -> Result<SegmentReplay> {
    let mut offsets: Vec<usize> = Vec::with_capacity(bytes.len() / 48);
    let mut off = SEGMENT_HEADER_BYTES;
    let mut frame_bad = None;
    while off < bytes.len() {
        match journal::frame_len(&bytes[off..]) {
            Ok(len) => {
                offsets.push(off);
                off += len;
            }
            Err(reason) => {
                frame_bad = Some((off, reason));
                break;
            }
        }
    }
    let framed_end = off;
    // Records at file offsets below this are in the snapshot.
    let first_applied_off = covers
        .saturating_sub(start)
        .saturating_add(SEGMENT_HEADER_BYTES as u64);

    let threads = if offsets.len() < REPLAY_PARALLEL_RECORDS_MIN {
        1
    } else {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, REPLAY_THREADS_MAX)
    };
    scratch.resize_with(threads, Chunk::default);
    let run = |t: usize, chunk: &mut Chunk| {
        let lo = offsets.len() * t / threads;
        let hi = offsets.len() * (t + 1) / threads;
        chunk.buckets.resize_with(SHARDS, Vec::new);
        chunk.buckets.iter_mut().for_each(Vec::clear);
        chunk.keys.clear();
        chunk.replicated.clear();
        chunk.reverted.clear();
        chunk.settled = None;
        chunk.deadlines.clear();
        chunk.max_lsn = 0;
        chunk.read = 0;
        chunk.bad = None;
        for (i, &o) in offsets.iter().enumerate().take(hi).skip(lo) {
            match journal::decode(&bytes[o..]) {
                Decoded::Record(r, _) => {
                    chunk.read += 1;
                    chunk.max_lsn = chunk.max_lsn.max(r.lsn);
                    match r.kind {
                        Kind::Replicated { epoch } => chunk.replicated.push(PendingReplicated {
                            name: r.name.to_string(),
                            delta: r.delta,
                            lsn: r.lsn,
                            epoch,
                            key: r.key.map(|(k, e)| (k.to_string(), e)),
                        }),
                        Kind::Revert { of_lsn } => chunk.reverted.push(of_lsn),
                        // A fact about the store, not a change: never
                        // replayed into the table.
                        Kind::Settled { epoch } => {
                            chunk.settled = chunk.settled.max(Some((epoch, r.lsn)));
                            continue;
                        }
                        // Changes the expiry, never the value. Replayed
                        // from the snapshot's position on, in journal
                        // order, whatever the snapshot holds: the last
                        // record of a counter decides, as it did in memory.
                        Kind::Expire { at_ms } => {
                            if o as u64 >= first_applied_off {
                                chunk.deadlines.push((
                                    CompactString::from(r.name),
                                    (at_ms > 0).then_some(at_ms),
                                ));
                            }
                            continue;
                        }
                        Kind::Adopt => {
                            if o as u64 >= first_applied_off {
                                chunk.deadlines.push((CompactString::from(r.name), None));
                            }
                        }
                        Kind::Increment => {}
                    }
                    if let Some((key, expiry)) = r.key {
                        let forget = matches!(r.kind, Kind::Revert { .. });
                        chunk.keys.push(KeyOp {
                            key: CompactString::from(key),
                            expiry: (!forget).then_some(expiry),
                            fingerprint: idempotency::fingerprint(r.name, r.delta),
                        });
                    }
                    if o as u64 >= first_applied_off {
                        chunk.buckets[table.shard_of(r.name)].push(ReplayOp {
                            name: CompactString::from(r.name),
                            delta: r.delta,
                            lsn: r.lsn,
                            update: if r.kind == Kind::Adopt {
                                Update::Set
                            } else {
                                Update::Add
                            },
                        });
                    }
                }
                Decoded::Incomplete => unreachable!("framing saw the whole record"),
                Decoded::Corrupt(reason) => {
                    chunk.bad = Some((i, reason));
                    break;
                }
            }
        }
    };
    if threads == 1 {
        run(0, &mut scratch[0]);
    } else {
        std::thread::scope(|s| {
            for (t, chunk) in scratch.iter_mut().enumerate() {
                s.spawn(move || run(t, chunk));
            }
        });
    }
    let mut chunks: &mut [Chunk] = &mut scratch[..];
    // Everything after the first bad record is dropped.
    let mut bad = frame_bad;
    if let Some(t) = chunks.iter().position(|c| c.bad.is_some()) {
        let (i, reason) = chunks[t].bad.take().expect("chunk t is bad");
        bad = Some((offsets[i], reason));
        chunks = &mut chunks[..t + 1];
    }
    let chunks: &[Chunk] = chunks;
    let end = bad.as_ref().map_or(framed_end, |(o, _)| *o);
    let mut result = SegmentReplay {
        end,
        bad,
        read: chunks.iter().map(|c| c.read).sum(),
        applied: 0,
        max_lsn: chunks.iter().map(|c| c.max_lsn).max().unwrap_or(0),
        settled: chunks.iter().filter_map(|c| c.settled).max(),
    };
    for chunk in chunks {
        for op in &chunk.keys {
            match op.expiry {
                Some(expiry) => keys.restore(&op.key, expiry, op.fingerprint, now_ms),
                None => keys.remove(&op.key),
            }
        }
        pending.extend(chunk.replicated.iter().cloned());
        reverted.extend(chunk.reverted.iter().copied());
        if !chunk.deadlines.is_empty() {
            let mut d = deadlines.lock();
            for (name, at_ms) in &chunk.deadlines {
                d.set(name, *at_ms);
            }
        }
    }

    let apply = |part: usize| -> std::result::Result<u64, (String, u64)> {
        let mut partition = table.partition(part, threads);
        let mut applied = 0;
        for shard in partition.shards() {
            for chunk in chunks {
                applied += partition.replay_shard(shard, &chunk.buckets[shard])?;
            }
        }
        Ok(applied)
    };
    let applied: std::result::Result<u64, (String, u64)> = if threads == 1 {
        apply(0)
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads).map(|p| s.spawn(move || apply(p))).collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("replay thread panicked"))
                .sum()
        })
    };
    match applied {
        Ok(n) => result.applied = n,
        Err((name, lsn)) => {
            // Rare: find the offending record's offset for the message.
            let offset = offsets
                .iter()
                .find(|&&o| {
                    matches!(journal::decode(&bytes[o..]),
                        Decoded::Record(r, _) if r.name == name && r.lsn == lsn)
                })
                .copied()
                .unwrap_or(0);
            return Err(Error::Corrupt {
                path: path.to_path_buf(),
                offset: offset as u64,
                reason: format!("replaying this record overflows counter '{name}'"),
            });
        }
    }
    Ok(result)
}

/// Recovers `table`, `keys` and `deadlines` (all empty) from `data_dir`.
#[allow(clippy::too_many_arguments)]
pub fn recover(
    storage: &dyn Storage,
    data_dir: &Path,
    table: &CounterTable,
    keys: &IdempotencyKeys,
    deadlines: &Deadlines,
    mode: RecoveryMode,
    now_ms: u64,
) -> Result<RecoveryReport> {
    let started = Instant::now();
    let journal_dir = data_dir.join(JOURNAL_DIR);
    storage
        .create_dir_all(&journal_dir)
        .map_err(io_err("creating", &journal_dir))?;
    let names = storage
        .list(data_dir)
        .map_err(io_err("listing", data_dir))?;

    // A temporary snapshot is an unfinished write: never valid, remove it.
    if names.iter().any(|n| n == snapshot::TEMP_FILE_NAME) {
        let tmp = data_dir.join(snapshot::TEMP_FILE_NAME);
        storage.remove(&tmp).map_err(io_err("removing", &tmp))?;
    }

    let mut snapshots: Vec<u64> = names
        .iter()
        .filter_map(|n| snapshot::parse_file_name(n))
        .collect();
    snapshots.sort_unstable();
    let mut report = RecoveryReport {
        snapshot: None,
        segments: Vec::new(),
        end_pos: 0,
        next_lsn: 1,
        records_read: 0,
        records_applied: 0,
        torn_tail: None,
        accepted_corruption: None,
        replicated: Vec::new(),
        settled: None,
        duration: Duration::ZERO,
    };
    if let Some(&newest) = snapshots.last() {
        let path = data_dir.join(snapshot::file_name(newest));
        let bytes = storage.read(&path).map_err(io_err("reading", &path))?;
        if let Some(n) = snapshot::counter_count_hint(&bytes) {
            // A hint only: capped, since the trailer is not verified yet.
            table.reserve((n as usize).min(bytes.len() / 19));
        }
        let meta = snapshot::read(&bytes, &path, |item| {
            match item {
                Item::Counter(name, entry) => table.restore(name, entry),
                Item::Key(key, expiry, fingerprint) => {
                    keys.restore(key, expiry, fingerprint, now_ms)
                }
                Item::Deadline(name, at_ms) => {
                    deadlines.lock().set(name, Some(at_ms));
                }
            }
            Ok(())
        })?;
        if meta.covers_pos != newest {
            return Err(Error::Corrupt {
                path,
                offset: 16,
                reason: format!(
                    "snapshot covers position {} but its name says {newest}",
                    meta.covers_pos
                ),
            });
        }
        report.end_pos = meta.covers_pos;
        report.next_lsn = meta.next_lsn;
        for old in &snapshots[..snapshots.len() - 1] {
            let p = data_dir.join(snapshot::file_name(*old));
            storage.remove(&p).map_err(io_err("removing", &p))?;
        }
        report.snapshot = Some((path, meta));
    }
    let covers = report.end_pos;

    let mut segments: Vec<u64> = storage
        .list(&journal_dir)
        .map_err(io_err("listing", &journal_dir))?
        .iter()
        .filter_map(|n| journal::parse_segment_file_name(n))
        .collect();
    segments.sort_unstable();
    // Segments that end at or before the snapshot's position are leftovers
    // of a crash between a snapshot and the removal of what it covers.
    let first = segments.iter().rposition(|&s| s <= covers).unwrap_or(0);
    for &s in &segments[..first] {
        let p = journal_dir.join(journal::segment_file_name(s));
        storage.remove(&p).map_err(io_err("removing", &p))?;
    }
    let segments = &segments[first..];

    let mut expected = covers;
    let mut buf = Vec::new();
    let mut scratch = Vec::new();
    let mut reverted: Vec<u64> = Vec::new();
    for (i, &start) in segments.iter().enumerate() {
        let path = journal_dir.join(journal::segment_file_name(start));
        let last = i + 1 == segments.len();
        storage
            .read_into(&path, &mut buf)
            .map_err(io_err("reading", &path))?;
        let bytes = &buf[..];
        let header_start = match journal::parse_segment_header(bytes) {
            Ok(s) => s,
            // A segment is created, its header and zeros synced, before any
            // record is written to it; a last segment with a bad header and
            // nothing but zeros after it is a creation cut short by a crash.
            Err(_)
                if last
                    && (bytes.len() <= SEGMENT_HEADER_BYTES
                        || journal::is_zero_tail(&bytes[SEGMENT_HEADER_BYTES..])) =>
            {
                storage.remove(&path).map_err(io_err("removing", &path))?;
                storage
                    .sync_dir(&journal_dir)
                    .map_err(io_err("syncing", &journal_dir))?;
                break;
            }
            Err(reason) => {
                return Err(Error::Corrupt {
                    path,
                    offset: 0,
                    reason,
                });
            }
        };
        if header_start != start {
            return Err(Error::Corrupt {
                path,
                offset: 16,
                reason: format!(
                    "segment header says it starts at {header_start}, its name says {start}"
                ),
            });
        }
        // The first segment may start before the snapshot position; every
        // other one must start exactly where the previous one ended.
        if (i == 0 && start > covers) || (i > 0 && start != expected) {
            return Err(Error::Corrupt {
                path,
                offset: 0,
                reason: format!(
                    "journal gap: this segment starts at position {start}, expected {expected}"
                ),
            });
        }
        let replayed = replay_segment(
            &mut scratch,
            &mut report.replicated,
            &mut reverted,
            table,
            keys,
            deadlines,
            bytes,
            start,
            covers,
            &path,
            now_ms,
        )?;
        report.records_read += replayed.read;
        report.records_applied += replayed.applied;
        report.next_lsn = report.next_lsn.max(replayed.max_lsn + 1);
        report.settled = report.settled.max(replayed.settled);
        let off = replayed.end;
        // Zeros filled ahead of the last record are the clean end of the
        // segment's records, in any segment.
        let bad = replayed
            .bad
            .map(|(_, reason)| reason)
            .filter(|_| !journal::is_zero_tail(&bytes[off..]));
        expected = start + (off - SEGMENT_HEADER_BYTES) as u64;
        report.segments.push((start, path.clone()));
        if last && bad.is_none() {
            // The last segment's records may still be only in the page
            // cache (a process that crashed before its sync returned).
            // The journal goes on in a new segment, and every segment but
            // the last must be durable: cut it at its records' end (the
            // zeros filled ahead go) and make that durable.
            storage
                .truncate(&path, off as u64)
                .map_err(io_err("truncating", &path))?;
        }
        if let Some(reason) = bad {
            let cut = Cut {
                path: path.clone(),
                offset: off as u64,
                bytes_dropped: (bytes.len() - off) as u64,
                reason: reason.clone(),
            };
            if last {
                tracing::warn!(path = %path.display(), offset = off, bytes = cut.bytes_dropped, %reason,
                    "cutting a torn journal tail (a crash artifact)");
                storage
                    .truncate(&path, off as u64)
                    .map_err(io_err("truncating", &path))?;
                report.torn_tail = Some(cut);
            } else if mode == RecoveryMode::TruncateAtCorruption {
                tracing::warn!(path = %path.display(), offset = off, %reason,
                    "accepting journal corruption: dropping every record from here on");
                storage
                    .truncate(&path, off as u64)
                    .map_err(io_err("truncating", &path))?;
                for &later in &segments[i + 1..] {
                    let p = journal_dir.join(journal::segment_file_name(later));
                    storage.remove(&p).map_err(io_err("removing", &p))?;
                }
                storage
                    .sync_dir(&journal_dir)
                    .map_err(io_err("syncing", &journal_dir))?;
                report.accepted_corruption = Some(cut);
                break;
            } else {
                return Err(Error::Corrupt {
                    path,
                    offset: off as u64,
                    reason: format!(
                        "{reason}; this is not the end of the journal, so it is not a torn write. \
                         Set Config::recovery_mode to truncate-at-corruption to drop every \
                         record from here on"
                    ),
                });
            }
        }
    }
    report.end_pos = expected;
    if !reverted.is_empty() {
        let reverted: std::collections::HashSet<u64> = reverted.into_iter().collect();
        report.replicated.retain(|p| !reverted.contains(&p.lsn));
    }
    report.duration = started.elapsed();
    Ok(report)
}
