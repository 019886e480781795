//! Recovery: rebuilds the counter table and idempotency keys from the newest
//! snapshot and the journal after it, before the node takes any request.
//!
//! Rules (argued in `docs/design.md`, "Recovery"):
//! - The newest snapshot must verify; a bad one stops start-up (a snapshot is
//!   synced before it is renamed into place, so a crash cannot tear it).
//! - Segments wholly before the snapshot are leftovers and are removed.
//! - The remaining segments must form one unbroken stream of positions.
//! - A torn or corrupt record in the *last* segment is a crash artifact: the
//!   segment is cut there (and the cut made durable) and start-up goes on.
//! - A bad record anywhere else is refused with the file and byte offset,
//!   unless [`RecoveryMode::TruncateAtCorruption`] accepts the loss.
//! - A record is applied only if its lsn is newer than its counter's entry,
//!   so records already folded into the snapshot are not counted twice.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::RecoveryMode;
use crate::error::{Error, Result};
use crate::idempotency::IdempotencyKeys;
use crate::journal::{self, Decoded, SEGMENT_HEADER_BYTES};
use crate::snapshot::{self, Item, SnapshotMeta};
use crate::storage::Storage;
use crate::table::CounterTable;

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
    pub duration: Duration,
}

fn io_err(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let context = format!("{what} {}", path.display());
    move |e| Error::io(context, e)
}

/// Most threads replaying one segment.
const REPLAY_THREADS_MAX: usize = 8;

/// Applies every record of `segment` (already verified, header included)
/// to `table`, one thread per table partition. Returns how many applied.
fn replay_parallel(table: &CounterTable, segment: &[u8], path: &Path) -> Result<u64> {
    let parts = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, REPLAY_THREADS_MAX);
    let replay_part = |part: usize| -> Result<u64> {
        let mut partition = table.partition(part, parts);
        let records = journal::RecordIter::new(&segment[SEGMENT_HEADER_BYTES..]);
        partition
            .replay_batch(records.map(|r| (r.name, r.delta, r.lsn)))
            .map_err(|index| {
                let offset = journal::RecordIter::new(&segment[SEGMENT_HEADER_BYTES..])
                    .offsets()
                    .nth(index)
                    .map_or(0, |o| o + SEGMENT_HEADER_BYTES);
                Error::Corrupt {
                    path: path.to_path_buf(),
                    offset: offset as u64,
                    reason: "replaying this record overflows its counter".into(),
                }
            })
    };
    if parts == 1 {
        return replay_part(0);
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..parts)
            .map(|p| s.spawn(move || replay_part(p)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("replay thread panicked"))
            .sum()
    })
}

/// Recovers `table` and `keys` (both empty) from `data_dir`.
pub fn recover(
    storage: &dyn Storage,
    data_dir: &Path,
    table: &CounterTable,
    keys: &IdempotencyKeys,
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
        duration: Duration::ZERO,
    };
    if let Some(&newest) = snapshots.last() {
        let path = data_dir.join(snapshot::file_name(newest));
        let bytes = storage.read(&path).map_err(io_err("reading", &path))?;
        let meta = snapshot::read(&bytes, &path, |item| {
            match item {
                Item::Counter(name, entry) => table.restore(name, entry),
                Item::Key(key, expiry) => keys.restore(key, expiry, now_ms),
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
    for (i, &start) in segments.iter().enumerate() {
        let path = journal_dir.join(journal::segment_file_name(start));
        let last = i + 1 == segments.len();
        let bytes = storage.read(&path).map_err(io_err("reading", &path))?;
        let header_start = match journal::parse_segment_header(&bytes) {
            Ok(s) => s,
            // A segment is created and its header synced before any record
            // is written to it; a last segment with a bad header and nothing
            // after it is a creation cut short by a crash.
            Err(_) if last && bytes.len() <= SEGMENT_HEADER_BYTES => {
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
        // Pass 1, sequential: verify every record up to the first bad one,
        // restore idempotency keys, and raise next_lsn.
        let mut off = SEGMENT_HEADER_BYTES;
        let mut bad: Option<String> = None;
        while off < bytes.len() {
            match journal::decode(&bytes[off..]) {
                Decoded::Record(r, used) => {
                    report.records_read += 1;
                    if let Some((key, expiry)) = r.key {
                        keys.restore(key, expiry, now_ms);
                    }
                    report.next_lsn = report.next_lsn.max(r.lsn + 1);
                    off += used;
                }
                Decoded::Incomplete => {
                    bad = Some("record is cut short".into());
                    break;
                }
                Decoded::Corrupt(reason) => {
                    bad = Some(reason);
                    break;
                }
            }
        }
        // Pass 2, one thread per partition of the table: apply the verified
        // records. Records already in the snapshot carry an lsn at or below
        // their entry's and are skipped by the replay rule.
        report.records_applied += replay_parallel(table, &bytes[..off], &path)?;
        expected = start + (off - SEGMENT_HEADER_BYTES) as u64;
        report.segments.push((start, path.clone()));
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
                         Start with --recovery-mode truncate-at-corruption to drop every record \
                         from here on"
                    ),
                });
            }
        }
    }
    report.end_pos = expected;
    report.duration = started.elapsed();
    Ok(report)
}
