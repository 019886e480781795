//! The journal: append-only segments of checksummed records, written by one
//! dedicated thread with group commit.
//!
//! Appenders encode their record into a shared queue under a short lock and
//! get back the journal position just past it. The writer thread takes the
//! whole queue, appends it to the current segment, calls `fdatasync` once,
//! and publishes the new durable position; every waiter whose position is
//! covered is released. While one sync runs, new records pile up in the
//! queue and the next sync covers them all: that is the group commit.
//!
//! A write or sync error is sticky. The journal records the reason, wakes
//! every waiter with it, refuses every later append, and the writer thread
//! exits. Nothing is retried: after a failed fsync the kernel may have
//! dropped the dirty pages, so a retry that "succeeds" proves nothing.
//!
//! Byte formats (segment header, record framing) are documented in
//! `docs/design.md`, section "Journal format", and implemented only here.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

use crate::engine::idempotency::KEY_BYTES_MAX;
use crate::engine::storage::{AppendFile, Storage};
use crate::engine::table::NAME_BYTES_MAX;
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// First eight bytes of every segment.
pub const SEGMENT_MAGIC: &[u8; 8] = b"TALLYJNL";
pub const SEGMENT_VERSION: u32 = 1;
/// Segment header length; records start at this offset.
pub const SEGMENT_HEADER_BYTES: usize = 32;
/// Record frame: CRC-32C (u32) of the rest of the record, then the payload
/// length (u32).
pub const RECORD_FRAME_BYTES: usize = 8;
/// Record kind byte: an increment.
pub const KIND_INCREMENT: u8 = 1;
/// Record kind byte: the counter's shard set to a value taken from the
/// shared store (a lost or stale disk).
pub const KIND_ADOPT: u8 = 2;
/// Record kind byte: an increment at `replicated` durability, applied
/// inside a store transaction whose outcome recovery must check.
pub const KIND_REPLICATED: u8 = 3;
/// Record kind byte: a replicated increment whose store transaction did
/// not commit, taken back.
pub const KIND_REVERT: u8 = 4;
/// Record kind byte: the shared store committed this node's rows up to a
/// version; no effect on any counter. Recovery keeps the highest, so that
/// a store found older than it at the next start does not make the node
/// take back replicated increments that did commit (see
/// `docs/design.md`, "Store regression").
pub const KIND_SETTLED: u8 = 5;
/// Record kind byte: the counter's expiry set (or cleared); no effect on
/// its value (see [`crate::engine::deadlines`]). Builds without expiries
/// stop reading a journal at the first one, as at any unknown kind.
pub const KIND_EXPIRE: u8 = 6;
/// Smallest payload: kind, lsn, delta, name length, key length.
const PAYLOAD_BYTES_MIN: usize = 1 + 8 + 8 + 2 + 2;
/// Largest valid payload (name, key with its expiry, and the kind's extra
/// u64). A length prefix above it is corruption, never an allocation.
pub const PAYLOAD_BYTES_MAX: usize = PAYLOAD_BYTES_MIN + NAME_BYTES_MAX + KEY_BYTES_MAX + 8 + 8;

/// What a record does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Adds `delta`.
    Increment,
    /// Sets the value to `delta` (the store's value for this node's shard).
    Adopt,
    /// Adds `delta`; made at `replicated` durability in store epoch `epoch`.
    Replicated { epoch: u64 },
    /// Adds `delta` (the negation of the reverted increment's) and forgets
    /// the key; takes back the replicated increment with lsn `of_lsn`.
    Revert { of_lsn: u64 },
    /// Changes nothing: the store committed this node's rows up to version
    /// `(epoch, lsn)`, lsn being the record's (not a new one); `name` is a
    /// counter of that commit and `delta` is 0.
    Settled { epoch: u64 },
    /// Sets the counter's expiry to the unix time `at_ms` (0: clears it);
    /// `delta` is 0 and the value is unchanged.
    Expire { at_ms: u64 },
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Increment => KIND_INCREMENT,
            Kind::Adopt => KIND_ADOPT,
            Kind::Replicated { .. } => KIND_REPLICATED,
            Kind::Revert { .. } => KIND_REVERT,
            Kind::Settled { .. } => KIND_SETTLED,
            Kind::Expire { .. } => KIND_EXPIRE,
        }
    }

    fn extra(self) -> Option<u64> {
        match self {
            Kind::Increment | Kind::Adopt => None,
            Kind::Replicated { epoch } => Some(epoch),
            Kind::Revert { of_lsn } => Some(of_lsn),
            Kind::Settled { epoch } => Some(epoch),
            Kind::Expire { at_ms } => Some(at_ms),
        }
    }
}

/// One journal record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub kind: Kind,
    pub lsn: u64,
    pub delta: i64,
    pub name: &'a str,
    /// Idempotency key and the unix time (ms) at which it expires.
    pub key: Option<(&'a str, u64)>,
}

impl Record<'_> {
    /// Appends the framed record to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        debug_assert!(self.name.len() <= NAME_BYTES_MAX);
        let key_len = self.key.map_or(0, |(k, _)| k.len());
        debug_assert!(key_len <= KEY_BYTES_MAX);
        let extra = self.kind.extra();
        let payload_len = PAYLOAD_BYTES_MIN
            + self.name.len()
            + key_len
            + if self.key.is_some() { 8 } else { 0 }
            + if extra.is_some() { 8 } else { 0 };
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&(payload_len as u32).to_le_bytes());
        out.push(self.kind.byte());
        out.extend_from_slice(&self.lsn.to_le_bytes());
        out.extend_from_slice(&self.delta.to_le_bytes());
        out.extend_from_slice(&(self.name.len() as u16).to_le_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(&(key_len as u16).to_le_bytes());
        if let Some((key, expiry_ms)) = self.key {
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(&expiry_ms.to_le_bytes());
        }
        if let Some(x) = extra {
            out.extend_from_slice(&x.to_le_bytes());
        }
        let crc = crc32c::crc32c(&out[start + 4..]);
        out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(out.len() - start, RECORD_FRAME_BYTES + payload_len);
    }
}

/// What [`decode`] found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A valid record and the bytes it takes.
    Record(Record<'a>, usize),
    /// The buffer ends inside the record (a torn write, or the end).
    Incomplete,
    /// The bytes are not a valid record.
    Corrupt(String),
}

fn le_u16(b: &[u8]) -> usize {
    u16::from_le_bytes([b[0], b[1]]) as usize
}
fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap())
}
fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

/// Decodes the record at the start of `buf`, verifying its checksum.
pub fn decode(buf: &[u8]) -> Decoded<'_> {
    if buf.len() < RECORD_FRAME_BYTES {
        return Decoded::Incomplete;
    }
    let len = le_u32(&buf[4..]) as usize;
    if !(PAYLOAD_BYTES_MIN..=PAYLOAD_BYTES_MAX).contains(&len) {
        return Decoded::Corrupt(format!("record length {len} is out of range"));
    }
    if buf.len() < RECORD_FRAME_BYTES + len {
        return Decoded::Incomplete;
    }
    let payload = &buf[RECORD_FRAME_BYTES..RECORD_FRAME_BYTES + len];
    if crc32c::crc32c(&buf[4..RECORD_FRAME_BYTES + len]) != le_u32(buf) {
        return Decoded::Corrupt("record checksum mismatch".into());
    }
    let kind_byte = payload[0];
    if !(KIND_INCREMENT..=KIND_EXPIRE).contains(&kind_byte) {
        return Decoded::Corrupt(format!("unknown record kind {kind_byte}"));
    }
    let lsn = le_u64(&payload[1..]);
    let delta = le_u64(&payload[9..]) as i64;
    let name_len = le_u16(&payload[17..]);
    let rest = &payload[19..];
    if name_len == 0 || name_len > NAME_BYTES_MAX || rest.len() < name_len + 2 {
        return Decoded::Corrupt(format!("name length {name_len} does not fit the record"));
    }
    let Ok(name) = std::str::from_utf8(&rest[..name_len]) else {
        return Decoded::Corrupt("counter name is not UTF-8".into());
    };
    let key_len = le_u16(&rest[name_len..]);
    let rest = &rest[name_len + 2..];
    let extra_len = if matches!(
        kind_byte,
        KIND_REPLICATED | KIND_REVERT | KIND_SETTLED | KIND_EXPIRE
    ) {
        8
    } else {
        0
    };
    let key_bytes = if key_len == 0 { 0 } else { key_len + 8 };
    if key_len > KEY_BYTES_MAX || rest.len() != key_bytes + extra_len {
        return Decoded::Corrupt(format!("key length {key_len} does not fit the record"));
    }
    let key = if key_len == 0 {
        None
    } else {
        let Ok(key) = std::str::from_utf8(&rest[..key_len]) else {
            return Decoded::Corrupt("idempotency key is not UTF-8".into());
        };
        Some((key, le_u64(&rest[key_len..])))
    };
    let extra = (extra_len > 0).then(|| le_u64(&rest[key_bytes..]));
    let kind = match (kind_byte, extra) {
        (KIND_INCREMENT, _) => Kind::Increment,
        (KIND_ADOPT, _) => Kind::Adopt,
        (KIND_REPLICATED, Some(epoch)) => Kind::Replicated { epoch },
        (KIND_SETTLED, Some(epoch)) => Kind::Settled { epoch },
        (KIND_EXPIRE, Some(at_ms)) => Kind::Expire { at_ms },
        (_, Some(of_lsn)) => Kind::Revert { of_lsn },
        _ => unreachable!("kind checked above"),
    };
    Decoded::Record(
        Record {
            kind,
            lsn,
            delta,
            name,
            key,
        },
        RECORD_FRAME_BYTES + len,
    )
}

/// Length of the record framed at the start of `buf`, checking only its
/// length field (recovery frames a segment first, then verifies the records
/// in parallel with [`decode`]).
pub fn frame_len(buf: &[u8]) -> std::result::Result<usize, String> {
    if buf.len() < RECORD_FRAME_BYTES {
        return Err("record is cut short".into());
    }
    let len = le_u32(&buf[4..]) as usize;
    if !(PAYLOAD_BYTES_MIN..=PAYLOAD_BYTES_MAX).contains(&len) {
        return Err(format!("record length {len} is out of range"));
    }
    if buf.len() < RECORD_FRAME_BYTES + len {
        return Err("record is cut short".into());
    }
    Ok(RECORD_FRAME_BYTES + len)
}

/// Whether `rest`, what follows a segment's last whole record, is zeros
/// filled ahead ([`ZERO_AHEAD_BYTES`]): the clean end of the segment's
/// records, not a torn or corrupt one. A record never starts with eight
/// zero bytes, since its length field cannot be 0.
pub fn is_zero_tail(rest: &[u8]) -> bool {
    rest.iter().all(|b| *b == 0)
}

/// Encodes a segment header for a segment starting at journal position
/// `start_pos`.
pub fn segment_header(start_pos: u64) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut h = [0u8; SEGMENT_HEADER_BYTES];
    h[..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&start_pos.to_le_bytes());
    let crc = crc32c::crc32c(&h[..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Parses a segment header; returns the segment's start position.
pub fn parse_segment_header(bytes: &[u8]) -> std::result::Result<u64, String> {
    if bytes.len() < SEGMENT_HEADER_BYTES {
        return Err(format!(
            "segment is {} bytes, shorter than its {SEGMENT_HEADER_BYTES}-byte header",
            bytes.len()
        ));
    }
    if &bytes[..8] != SEGMENT_MAGIC {
        return Err("segment magic is wrong".into());
    }
    if crc32c::crc32c(&bytes[..24]) != le_u32(&bytes[24..]) {
        return Err("segment header checksum mismatch".into());
    }
    let version = le_u32(&bytes[8..]);
    if version != SEGMENT_VERSION {
        return Err(format!("segment format version {version} is not supported"));
    }
    Ok(le_u64(&bytes[16..]))
}

/// File name of the segment starting at `start_pos`: names sort by position.
pub fn segment_file_name(start_pos: u64) -> String {
    format!("{start_pos:020}.jnl")
}

/// Start position encoded in a segment file name, if it is one.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".jnl")?;
    (digits.len() == 20).then(|| digits.parse().ok())?
}

/// How soon a record appended to the journal must be synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    /// Someone waits for it: the writer syncs as soon as it can.
    Now,
    /// Nobody waits: synced within the memory delay, or with the next
    /// batch someone waits for.
    Later,
}

/// Settings of the journal writer.
#[derive(Debug, Clone)]
pub struct JournalConfig {
    pub segment_bytes_max: u64,
    pub memory_sync_delay: Duration,
    pub queue_bytes_max: usize,
    /// How long the writer thread leaves an urgent record to a runtime
    /// worker about to go idle (see [`runtime_builder`]) before syncing it
    /// itself. Applies only in a process whose runtime calls the hook.
    pub idle_sync_grace: Duration,
}

/// Default of [`JournalConfig::idle_sync_grace`]: short, because workers
/// that stay busy (TLS records to decrypt and encrypt, a flood of
/// requests) leave the sync to the writer thread, and every microsecond of
/// grace is then added to each acknowledgement. With 200 µs, TLS at
/// `local` kept 75% of its plaintext rate without pipelining where Redis
/// kept 78 to 83%; with 50 µs, 83 to 94% where Redis kept 69 to 78% (the
/// benchmark's tls part, two runs each).
pub const IDLE_SYNC_GRACE: Duration = Duration::from_micros(50);

/// Journals whose urgent records a worker about to park may sync. Weak, so
/// that a journal dropped without close does not stay alive here.
static IDLE_SYNCED: Mutex<Vec<std::sync::Weak<Shared>>> = Mutex::new(Vec::new());

/// Set the first time a park hook of [`runtime_builder`] runs: from then on the writer
/// thread gives workers [`JournalConfig::idle_sync_grace`] to sync first.
static PARK_HOOK_SEEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

thread_local! {
    /// Whether this worker thread is counted as running tasks in its
    /// runtime's count (see [`runtime_builder`]).
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

/// The park hook of the commit path (`on_thread_park`): when the last busy
/// worker of the runtime is about to sleep, every task that could run has
/// run, so every request waiting on a connection has been read and has
/// queued its record; it syncs them now, as Redis syncs its append-only
/// file before it waits for events again. The acknowledgements then need
/// no hop to the writer thread and back, and the batch holds every request
/// read since the last sync (a worker that synced as soon as it alone went
/// idle, while the other still read requests, made about 12% more syncs
/// for the same requests). If another thread is syncing, it returns at
/// once. `active` counts the runtime's workers running tasks. See
/// `docs/design.md`, "Group commit".
fn on_park(active: &AtomicUsize) {
    PARK_HOOK_SEEN.store(true, Relaxed);
    let still_active = if COUNTED.with(|c| c.replace(false)) {
        active.fetch_sub(1, AcqRel) - 1
    } else {
        active.load(Acquire)
    };
    if still_active > 0 {
        // A worker still running tasks may queue more records: the last
        // one to go idle syncs them all, or the writer thread after the
        // grace.
        return;
    }
    // Only the journals with an urgent record are taken out of the list
    // (usually none or one, so nothing is allocated on most parks); the
    // list's lock is not held across a sync.
    let urgent: Vec<Arc<Shared>> = IDLE_SYNCED
        .lock()
        .iter()
        .filter_map(std::sync::Weak::upgrade)
        .filter(|shared| shared.queue.lock().urgent)
        .collect();
    for shared in urgent {
        if let Some(mut committer) = shared.commit.try_lock() {
            committer.commit(&shared, CommitBy::IdleWorker);
        }
    }
}

/// The hook paired with [`on_park`] (`on_thread_unpark`): counts the
/// worker as running tasks.
fn on_unpark(active: &AtomicUsize) {
    if !COUNTED.with(|c| c.replace(true)) {
        active.fetch_add(1, AcqRel);
    }
}

/// A tokio multi-thread runtime builder with the journal's park hooks
/// installed: what a process serving `local` increments should run on.
/// Workers about to go idle then sync the journal (see `docs/design.md`,
/// "Group commit"); in a runtime without them, the writer thread does
/// every sync.
pub fn runtime_builder() -> tokio::runtime::Builder {
    // Per runtime: a runtime shut down with a worker counted as busy must
    // not stop the workers of another from syncing.
    let active = Arc::new(AtomicUsize::new(0));
    let unparked = active.clone();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder
        .enable_all()
        .on_thread_park(move || on_park(&active))
        .on_thread_unpark(move || on_unpark(&unparked));
    builder
}

/// What the writer has made durable, published to waiters.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Every record ending at or before this journal position is durable.
    pub durable_pos: u64,
    /// Set once a write or sync failed; never cleared.
    pub failed: Option<Arc<str>>,
}

struct Queue {
    /// Encoded records not yet taken by the writer.
    buf: Vec<u8>,
    records: u64,
    /// Journal position just past the last byte in `buf`.
    end_pos: u64,
    /// A waiter needs the next sync now (a `local` increment).
    urgent: bool,
    /// When `urgent` was last set; bounds the idle-sync grace.
    urgent_since: Option<Instant>,
    /// When the oldest record in `buf` was queued; bounds `memory` delay.
    oldest: Option<Instant>,
    failed: Option<Arc<str>>,
    closing: bool,
}

struct Segment {
    start_pos: u64,
    path: PathBuf,
}

struct Shared {
    queue: Mutex<Queue>,
    /// The open segment and the write buffer. Whoever holds it takes the
    /// queue, writes it and syncs it: the writer thread or an idle worker.
    /// Held across the whole round, so batches reach the file in order.
    commit: Mutex<Committer>,
    /// Wakes the writer: records arrived, someone became urgent, or close.
    wake_writer: Condvar,
    progress: watch::Sender<Progress>,
    /// Live segments, oldest first. The writer pushes; snapshots trim.
    segments: Mutex<Vec<Segment>>,
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    config: JournalConfig,
    metrics: Arc<Metrics>,
}

/// The journal of one node. See the module docs.
pub struct Journal {
    shared: Arc<Shared>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Zeros kept written ahead of the journal's append position, so that most
/// syncs only overwrite blocks the file already has: an `fdatasync` that
/// does not change the file's size or block map has no metadata to
/// commit, which on ext4 saves a journal commit per sync (about a quarter
/// of its time on the machine the benchmarks ran on). Recovery reads a
/// run of zeros to the end of a segment as the end of its records.
pub const ZERO_AHEAD_BYTES: u64 = 1 << 20;

/// How far to zero-fill a segment whose records will end at `end`: a
/// [`ZERO_AHEAD_BYTES`] margin past it, not beyond the segment's size
/// unless the records themselves go beyond it.
fn zero_fill_target(end: u64, segment_bytes_max: u64) -> u64 {
    let segment_end = SEGMENT_HEADER_BYTES as u64 + segment_bytes_max;
    (end + ZERO_AHEAD_BYTES).min(segment_end.max(end))
}

/// Creates segment `start_pos` in `dir` durably: header written, zeros
/// filled ahead, both synced, then the directory synced so the name
/// survives a crash. Returns the file, its path and its length.
fn create_segment(
    storage: &dyn Storage,
    dir: &Path,
    start_pos: u64,
    segment_bytes_max: u64,
) -> std::io::Result<(Box<dyn AppendFile>, PathBuf, u64)> {
    let path = dir.join(segment_file_name(start_pos));
    let mut file = storage.create(&path)?;
    file.append(&segment_header(start_pos))?;
    let len = zero_fill_target(SEGMENT_HEADER_BYTES as u64, segment_bytes_max);
    file.zero_fill_to(len)?;
    file.sync()?;
    storage.sync_dir(dir)?;
    Ok((file, path, len))
}

impl Journal {
    /// Starts the journal after recovery: opens a fresh segment at
    /// `end_pos` (recovery has already cut any torn tail, so the stream is
    /// whole up to there) and starts the writer thread. `existing` lists
    /// the segments recovery kept, oldest first, as (start position, path).
    pub fn start(
        storage: Arc<dyn Storage>,
        dir: &Path,
        end_pos: u64,
        existing: Vec<(u64, PathBuf)>,
        config: JournalConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Journal> {
        let (file, path, file_len) =
            create_segment(storage.as_ref(), dir, end_pos, config.segment_bytes_max).map_err(
                |e| Error::io(format!("creating journal segment in {}", dir.display()), e),
            )?;
        metrics.journal_segments_created.fetch_add(1, Relaxed);
        let mut segments: Vec<Segment> = existing
            .into_iter()
            .filter(|(start, _)| *start != end_pos)
            .map(|(start_pos, path)| Segment { start_pos, path })
            .collect();
        segments.push(Segment {
            start_pos: end_pos,
            path,
        });
        let (progress, _) = watch::channel(Progress {
            durable_pos: end_pos,
            failed: None,
        });
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                buf: Vec::with_capacity(1 << 16),
                records: 0,
                end_pos,
                urgent: false,
                urgent_since: None,
                oldest: None,
                failed: None,
                closing: false,
            }),
            commit: Mutex::new(Committer {
                file,
                file_len,
                segment_bytes: 0,
                batch: Vec::with_capacity(1 << 16),
            }),
            wake_writer: Condvar::new(),
            progress,
            segments: Mutex::new(segments),
            storage,
            dir: dir.to_path_buf(),
            config,
            metrics,
        });
        let writer_shared = shared.clone();
        IDLE_SYNCED.lock().push(Arc::downgrade(&shared));
        let writer = std::thread::Builder::new()
            .name("tally-journal".into())
            .spawn(move || writer_main(writer_shared))
            .map_err(|e| Error::io("starting the journal writer thread", e))?;
        Ok(Journal {
            shared,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Queues `record`; returns the journal position just past it.
    /// [`Urgency::Now`] asks for a sync as soon as possible (someone will
    /// wait for it); [`Urgency::Later`] lets the record be synced within the
    /// memory delay.
    pub fn append(&self, record: &Record<'_>, urgency: Urgency) -> Result<u64> {
        let mut q = self.shared.queue.lock();
        if let Some(reason) = &q.failed {
            return Err(Error::JournalFailed(reason.clone()));
        }
        if q.closing {
            return Err(Error::ShuttingDown);
        }
        let before = q.buf.len();
        record.encode(&mut q.buf);
        q.end_pos += (q.buf.len() - before) as u64;
        q.records += 1;
        let mut wake = false;
        if q.oldest.is_none() {
            q.oldest = Some(Instant::now());
            wake = true;
        }
        if urgency == Urgency::Now && !q.urgent {
            q.urgent = true;
            q.urgent_since = Some(Instant::now());
            wake = true;
        }
        let end = q.end_pos;
        drop(q);
        if wake {
            self.shared.wake_writer.notify_one();
        }
        Ok(end)
    }

    /// Waits while the queue holds more than its limit (back-pressure).
    /// Call before taking any lock that `append` will run under.
    pub async fn reserve(&self) -> Result<()> {
        loop {
            let full_at = {
                let q = self.shared.queue.lock();
                if let Some(reason) = &q.failed {
                    return Err(Error::JournalFailed(reason.clone()));
                }
                if q.buf.len() < self.shared.config.queue_bytes_max {
                    return Ok(());
                }
                q.end_pos
            };
            // The queue drains when the writer takes it; wait for progress.
            let mut rx = self.shared.progress.subscribe();
            let _ = rx
                .wait_for(|p| p.durable_pos >= full_at || p.failed.is_some())
                .await;
        }
    }

    /// Waits until every record up to `pos` is durable. An error means the
    /// journal failed first: records before `pos` may or may not be durable.
    pub async fn wait_durable(&self, pos: u64) -> Result<()> {
        let mut rx = self.shared.progress.subscribe();
        let p = match rx
            .wait_for(|p| p.durable_pos >= pos || p.failed.is_some())
            .await
        {
            Ok(p) => p.clone(),
            Err(_) => return Err(Error::ShuttingDown),
        };
        if p.durable_pos >= pos {
            Ok(())
        } else {
            Err(Error::Indeterminate(
                p.failed.unwrap_or_else(|| "journal closed".into()),
            ))
        }
    }

    /// Blocking form of [`Journal::wait_durable`] for threads outside a runtime.
    /// It polls, so that it works inside or outside an async runtime; it
    /// is for start-up, not for the increment path.
    pub fn wait_durable_blocking(&self, pos: u64) -> Result<()> {
        self.request_sync();
        loop {
            let p = self.progress();
            if p.durable_pos >= pos {
                return Ok(());
            }
            if let Some(reason) = p.failed {
                return Err(Error::Indeterminate(reason));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Makes the writer sync what is queued now without waiting for the
    /// memory delay.
    pub fn request_sync(&self) {
        let mut q = self.shared.queue.lock();
        if !q.buf.is_empty() && !q.urgent {
            q.urgent = true;
            q.urgent_since = Some(Instant::now());
            drop(q);
            self.shared.wake_writer.notify_one();
        }
    }

    /// Journal position just past the last queued record.
    pub fn end_pos(&self) -> u64 {
        self.shared.queue.lock().end_pos
    }

    /// The latest published progress.
    pub fn progress(&self) -> Progress {
        self.shared.progress.borrow().clone()
    }

    /// Why the journal failed, if it did.
    pub fn failure(&self) -> Option<Arc<str>> {
        self.shared.queue.lock().failed.clone()
    }

    /// Bytes waiting in the queue.
    pub fn queued_bytes(&self) -> usize {
        self.shared.queue.lock().buf.len()
    }

    /// Number of live segment files.
    pub fn segment_count(&self) -> usize {
        self.shared.segments.lock().len()
    }

    /// Removes every segment that ends at or before `pos` (a snapshot now
    /// covers it), then syncs the directory. Returns how many were removed.
    pub fn remove_segments_before(&self, pos: u64) -> Result<usize> {
        let doomed: Vec<PathBuf> = {
            let mut segs = self.shared.segments.lock();
            let keep_from = segs
                .windows(2)
                .position(|w| w[1].start_pos > pos)
                .unwrap_or(segs.len().saturating_sub(1));
            segs.drain(..keep_from).map(|s| s.path).collect()
        };
        for path in &doomed {
            self.shared
                .storage
                .remove(path)
                .map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
        }
        if !doomed.is_empty() {
            self.shared
                .storage
                .sync_dir(&self.shared.dir)
                .map_err(|e| Error::io(format!("syncing {}", self.shared.dir.display()), e))?;
        }
        Ok(doomed.len())
    }

    /// Stops taking records, syncs what is queued and stops the writer.
    /// Idempotent.
    pub fn close(&self) {
        {
            let mut q = self.shared.queue.lock();
            q.closing = true;
        }
        self.shared.wake_writer.notify_one();
        if let Some(handle) = self.writer.lock().take() {
            let _ = handle.join();
        }
        IDLE_SYNCED.lock().retain(|w| {
            w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), Arc::as_ptr(&self.shared))
        });
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.close();
    }
}

/// Who ran a commit round, for the metrics.
#[derive(Clone, Copy, PartialEq, Eq)]
enum CommitBy {
    WriterThread,
    IdleWorker,
}

/// The write side of the journal, behind [`Shared::commit`].
struct Committer {
    file: Box<dyn AppendFile>,
    /// The file's length, zeros filled ahead included.
    file_len: u64,
    /// Record bytes in the current segment (after its header).
    segment_bytes: u64,
    batch: Vec<u8>,
}

impl Committer {
    /// One commit round: takes everything queued, appends it (to a new
    /// segment first if the current one is full), syncs it, and publishes
    /// the new durable position. Does nothing if the queue is empty or the
    /// journal has failed. On an error, fails the journal for good.
    fn commit(&mut self, shared: &Shared, by: CommitBy) {
        let (end_pos, records) = {
            let mut q = shared.queue.lock();
            if q.failed.is_some() || q.buf.is_empty() {
                return;
            }
            std::mem::swap(&mut q.buf, &mut self.batch);
            q.urgent = false;
            q.urgent_since = None;
            q.oldest = None;
            (q.end_pos, std::mem::take(&mut q.records))
        };
        let started = Instant::now();
        let result = (|| -> std::io::Result<()> {
            if self.segment_bytes > 0
                && self.segment_bytes + self.batch.len() as u64 > shared.config.segment_bytes_max
            {
                let start = end_pos - self.batch.len() as u64;
                let (new_file, path, len) = create_segment(
                    shared.storage.as_ref(),
                    &shared.dir,
                    start,
                    shared.config.segment_bytes_max,
                )?;
                self.file = new_file;
                self.file_len = len;
                self.segment_bytes = 0;
                shared.segments.lock().push(Segment {
                    start_pos: start,
                    path,
                });
                shared
                    .metrics
                    .journal_segments_created
                    .fetch_add(1, Relaxed);
            }
            let end = SEGMENT_HEADER_BYTES as u64 + self.segment_bytes + self.batch.len() as u64;
            if end > self.file_len {
                let len = zero_fill_target(end, shared.config.segment_bytes_max);
                self.file.zero_fill_to(len)?;
                self.file_len = len;
            }
            self.file.append(&self.batch)?;
            self.file.sync()
        })();
        if let Err(e) = result {
            let reason: Arc<str> = format!("journal write or fdatasync failed: {e}").into();
            tracing::error!(error = %e, "journal failed; the node stops acknowledging writes");
            shared.queue.lock().failed = Some(reason.clone());
            shared.progress.send_modify(|p| p.failed = Some(reason));
            // The writer thread may be waiting for a grace that will never
            // end in a sync: let it see the failure and exit.
            shared.wake_writer.notify_one();
            return;
        }
        self.segment_bytes += self.batch.len() as u64;
        let m = &shared.metrics;
        m.journal_syncs.fetch_add(1, Relaxed);
        if by == CommitBy::IdleWorker {
            m.journal_syncs_by_idle_worker.fetch_add(1, Relaxed);
        }
        m.journal_bytes_written
            .fetch_add(self.batch.len() as u64, Relaxed);
        m.journal_records_written.fetch_add(records, Relaxed);
        m.journal_sync_seconds
            .observe(started.elapsed().as_secs_f64());
        m.journal_batch_records.observe(records as f64);
        shared.progress.send_modify(|p| p.durable_pos = end_pos);
        self.batch.clear();
    }
}

fn writer_main(shared: Arc<Shared>) {
    loop {
        {
            let mut q = shared.queue.lock();
            loop {
                if q.failed.is_some() {
                    return;
                }
                if q.buf.is_empty() {
                    if q.closing {
                        return;
                    }
                    shared.wake_writer.wait(&mut q);
                    continue;
                }
                if q.closing {
                    break;
                }
                if q.urgent {
                    // Where workers sync when they go idle, leave them the
                    // grace; a worker kept busy past it gets help here.
                    if !PARK_HOOK_SEEN.load(Relaxed) {
                        break;
                    }
                    let since = q.urgent_since.expect("an urgent queue has a time");
                    let deadline = since + shared.config.idle_sync_grace;
                    if Instant::now() >= deadline {
                        break;
                    }
                    shared.wake_writer.wait_until(&mut q, deadline);
                    continue;
                }
                let deadline = q.oldest.expect("a non-empty queue has an oldest record")
                    + shared.config.memory_sync_delay;
                if Instant::now() >= deadline {
                    break;
                }
                shared.wake_writer.wait_until(&mut q, deadline);
            }
        }
        shared.commit.lock().commit(&shared, CommitBy::WriterThread);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec(name: &'static str, key: Option<(&'static str, u64)>) -> Record<'static> {
        Record {
            kind: Kind::Increment,
            lsn: 42,
            delta: -7,
            name,
            key,
        }
    }

    // Encoding then decoding gives back the record, with and without a key.
    #[test]
    fn records_round_trip() {
        let kinds = [
            Kind::Increment,
            Kind::Adopt,
            Kind::Replicated { epoch: 7 },
            Kind::Revert { of_lsn: 41 },
            Kind::Settled { epoch: 9 },
            Kind::Expire {
                at_ms: 1_800_000_000_000,
            },
            Kind::Expire { at_ms: 0 },
        ];
        let mut all = Vec::new();
        for kind in kinds {
            all.push(Record {
                kind,
                ..rec("hits", None)
            });
            all.push(Record {
                kind,
                ..rec("héllo", Some(("k-1", 99)))
            });
        }
        for r in all {
            let mut buf = Vec::new();
            r.encode(&mut buf);
            assert_eq!(decode(&buf), Decoded::Record(r, buf.len()));
        }
    }

    // Every strict prefix of a record is Incomplete; any single flipped bit
    // is detected, never decoded as a different record.
    #[test]
    fn torn_and_flipped_records_are_detected() {
        let mut buf = Vec::new();
        rec("counter", Some(("key", 5))).encode(&mut buf);
        for cut in 0..buf.len() {
            assert!(
                matches!(
                    decode(&buf[..cut]),
                    Decoded::Incomplete | Decoded::Corrupt(_)
                ),
                "prefix {cut}"
            );
        }
        for byte in 0..buf.len() {
            for bit in 0..8 {
                let mut b = buf.clone();
                b[byte] ^= 1 << bit;
                assert!(
                    !matches!(decode(&b), Decoded::Record(..)),
                    "flip at byte {byte} bit {bit} went unnoticed"
                );
            }
        }
    }

    // The largest record the node can write (longest name and key, a kind
    // with its extra field) is exactly the largest length decode accepts.
    #[test]
    fn largest_record_is_the_payload_limit() {
        let name = "n".repeat(NAME_BYTES_MAX);
        let key = "k".repeat(KEY_BYTES_MAX);
        let r = Record {
            kind: Kind::Replicated { epoch: u64::MAX },
            lsn: u64::MAX,
            delta: i64::MIN,
            name: &name,
            key: Some((&key, u64::MAX)),
        };
        let mut buf = Vec::new();
        r.encode(&mut buf);
        assert_eq!(buf.len(), RECORD_FRAME_BYTES + PAYLOAD_BYTES_MAX);
        assert_eq!(PAYLOAD_BYTES_MAX, 421, "docs/design.md states this figure");
        assert_eq!(decode(&buf), Decoded::Record(r, buf.len()));
    }

    // A huge length prefix is rejected as corruption without allocating.
    #[test]
    fn huge_length_prefix_is_corrupt() {
        let mut buf = vec![0, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f];
        buf.extend_from_slice(&[0; 16]);
        assert!(matches!(decode(&buf), Decoded::Corrupt(_)));
    }

    #[test]
    fn segment_names_and_headers_round_trip() {
        assert_eq!(parse_segment_file_name(&segment_file_name(123)), Some(123));
        assert_eq!(parse_segment_file_name("123.jnl"), None);
        assert_eq!(parse_segment_header(&segment_header(77)), Ok(77));
        let mut h = segment_header(77);
        h[17] ^= 1;
        assert!(parse_segment_header(&h).is_err());
    }

    proptest! {
        // A stream of arbitrary records decodes back to the same sequence.
        #[test]
        fn record_streams_round_trip(items in proptest::collection::vec(
            ("[a-zA-Z0-9é:_-]{1,40}", any::<i64>(), any::<u64>(),
             proptest::option::of(("[a-z0-9-]{1,36}", any::<u64>()))), 0..50)) {
            let mut buf = Vec::new();
            for (name, delta, lsn, key) in &items {
                Record { kind: Kind::Increment, lsn: *lsn, delta: *delta, name, key: key.as_ref().map(|(k, e)| (k.as_str(), *e)) }
                    .encode(&mut buf);
            }
            let mut at = 0;
            for (name, delta, lsn, key) in &items {
                match decode(&buf[at..]) {
                    Decoded::Record(r, used) => {
                        prop_assert_eq!(r.name, name.as_str());
                        prop_assert_eq!(r.delta, *delta);
                        prop_assert_eq!(r.lsn, *lsn);
                        prop_assert_eq!(r.key, key.as_ref().map(|(k, e)| (k.as_str(), *e)));
                        at += used;
                    }
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
            }
            prop_assert_eq!(at, buf.len());
        }
    }
}
