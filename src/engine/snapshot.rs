//! Snapshots: the whole counter table and the live idempotency keys, written
//! to one checksummed file so that the journal before it can be dropped.
//!
//! A snapshot is written to `snapshot.tmp`, synced, read back and verified,
//! renamed to `snapshot-<covers_pos>.snap`, and the directory synced; only
//! then are older snapshots and the journal segments it covers removed.
//! A crash at any step leaves either the old snapshot with its journal, or
//! the new one (see `docs/design.md`, "Snapshots", for the argument).
//!
//! The table is copied shard by shard while writers go on. That is still a
//! consistent cut because every entry carries the lsn of its last increment
//! and recovery replays only records newer than it: an increment is then in
//! the snapshot or replayed from the journal, never both, never neither.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::engine::deadlines::Deadlines;
use crate::engine::idempotency::IdempotencyKeys;
use crate::engine::storage::Storage;
use crate::engine::table::{CounterTable, Entry, SHARDS};
use crate::error::{Error, Result};

pub const SNAPSHOT_MAGIC: &[u8; 8] = b"TALLYSNP";
pub const SNAPSHOT_END_MAGIC: &[u8; 8] = b"TALLYEND";
/// Version 2 added the fingerprint to every key (`TAG_KEY_FP`); version 1
/// snapshots (keys without one, `TAG_KEY`) are still read. Version 3 added
/// counters' expiries (`TAG_DEADLINE`).
pub const SNAPSHOT_VERSION: u32 = 3;
/// The oldest version still read.
const SNAPSHOT_VERSION_MIN: u32 = 1;
const HEADER_BYTES: usize = 32;
/// next_lsn, counters, keys, crc, end magic.
const TRAILER_BYTES: usize = 8 + 8 + 8 + 4 + 8;
const TAG_END: u8 = 0;
const TAG_COUNTER: u8 = 1;
/// A key and its expiry (version 1).
const TAG_KEY: u8 = 2;
/// A key, its expiry and its request's fingerprint (version 2).
const TAG_KEY_FP: u8 = 3;
/// A counter's expiry: its name and the unix time (ms) it is deleted at
/// (version 3).
const TAG_DEADLINE: u8 = 4;
/// The writer hands the file this many bytes at a time.
const WRITE_CHUNK_BYTES: usize = 1 << 20;
pub const TEMP_FILE_NAME: &str = "snapshot.tmp";

/// File name of the snapshot covering the journal up to `covers_pos`.
pub fn file_name(covers_pos: u64) -> String {
    format!("snapshot-{covers_pos:020}.snap")
}

/// `covers_pos` of a snapshot file name, if it is one.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("snapshot-")?.strip_suffix(".snap")?;
    (digits.len() == 20).then(|| digits.parse().ok())?
}

/// What a snapshot holds besides its entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// Every journal record before this position is folded into the snapshot.
    pub covers_pos: u64,
    /// Higher than every lsn in the snapshot.
    pub next_lsn: u64,
    pub written_at_ms: u64,
    pub counters: u64,
    pub keys: u64,
    pub bytes: u64,
}

/// One item of a snapshot body.
pub enum Item<'a> {
    Counter(&'a str, Entry),
    /// A key, its expiry, and its request's fingerprint (0: unknown).
    Key(&'a str, u64, u64),
    /// A counter and the unix time (ms) at which it expires.
    Deadline(&'a str, u64),
}

/// Writes a snapshot of `table`, `keys` and `deadlines` covering the
/// journal up to `covers_pos` into `dir`, durably. `next_lsn` is read after
/// the copy so that it exceeds every lsn copied. Returns the snapshot's
/// path and meta.
#[allow(clippy::too_many_arguments)]
pub fn write(
    storage: &dyn Storage,
    dir: &Path,
    covers_pos: u64,
    table: &CounterTable,
    keys: &IdempotencyKeys,
    deadlines: &Deadlines,
    next_lsn: &AtomicU64,
    now_ms: u64,
) -> Result<(PathBuf, SnapshotMeta)> {
    let tmp = dir.join(TEMP_FILE_NAME);
    let io = |what: &str| {
        let what = format!("{what} {}", tmp.display());
        move |e| Error::io(what, e)
    };
    let mut file = storage.create(&tmp).map_err(io("creating"))?;
    let mut buf = Vec::with_capacity(WRITE_CHUNK_BYTES + 1024);
    buf.extend_from_slice(SNAPSHOT_MAGIC);
    buf.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&covers_pos.to_le_bytes());
    buf.extend_from_slice(&now_ms.to_le_bytes());
    let mut crc = 0u32;
    let (mut counters, mut key_count) = (0u64, 0u64);
    let mut flush = |buf: &mut Vec<u8>, crc: &mut u32, force: bool| -> Result<()> {
        if force || buf.len() >= WRITE_CHUNK_BYTES {
            *crc = crc32c::crc32c_append(*crc, buf);
            file.append(buf).map_err(io("writing"))?;
            buf.clear();
        }
        Ok(())
    };
    for shard in 0..SHARDS {
        table.for_each_in_shard(shard, |name, e| {
            buf.push(TAG_COUNTER);
            buf.extend_from_slice(&(name.len() as u16).to_le_bytes());
            buf.extend_from_slice(name.as_bytes());
            buf.extend_from_slice(&e.value.to_le_bytes());
            buf.extend_from_slice(&e.lsn.to_le_bytes());
            counters += 1;
        });
        flush(&mut buf, &mut crc, false)?;
    }
    for shard in 0..IdempotencyKeys::SHARDS {
        keys.for_each_in_shard(shard, now_ms, |key, expiry, fingerprint| {
            buf.push(TAG_KEY_FP);
            buf.extend_from_slice(&(key.len() as u16).to_le_bytes());
            buf.extend_from_slice(key.as_bytes());
            buf.extend_from_slice(&expiry.to_le_bytes());
            buf.extend_from_slice(&fingerprint.to_le_bytes());
            key_count += 1;
        });
        flush(&mut buf, &mut crc, false)?;
    }
    // Copied after `covers_pos` was taken: every expiry record before it
    // changed the map before its writer let go of the map's lock, so the
    // copy holds it (see the module docs of `deadlines`).
    for (name, at_ms) in deadlines.all() {
        buf.push(TAG_DEADLINE);
        buf.extend_from_slice(&(name.len() as u16).to_le_bytes());
        buf.extend_from_slice(name.as_bytes());
        buf.extend_from_slice(&at_ms.to_le_bytes());
        flush(&mut buf, &mut crc, false)?;
    }
    let next = next_lsn.load(Ordering::SeqCst);
    buf.push(TAG_END);
    buf.extend_from_slice(&next.to_le_bytes());
    buf.extend_from_slice(&counters.to_le_bytes());
    buf.extend_from_slice(&key_count.to_le_bytes());
    let crc_final = crc32c::crc32c_append(crc, &buf);
    buf.extend_from_slice(&crc_final.to_le_bytes());
    buf.extend_from_slice(SNAPSHOT_END_MAGIC);
    file.append(&buf).map_err(io("writing"))?;
    file.sync().map_err(io("syncing"))?;
    drop(file);

    // Read it back and verify before it replaces anything: a snapshot that
    // does not parse must never be the one recovery depends on.
    let written = storage.read(&tmp).map_err(io("reading back"))?;
    let meta = read(&written, &tmp, |_| Ok(()))?;
    assert_eq!(
        (meta.counters, meta.keys, meta.covers_pos),
        (counters, key_count, covers_pos),
        "snapshot read back differs from what was written"
    );

    let path = dir.join(file_name(covers_pos));
    storage.rename(&tmp, &path).map_err(|e| {
        Error::io(
            format!("renaming {} to {}", tmp.display(), path.display()),
            e,
        )
    })?;
    storage
        .sync_dir(dir)
        .map_err(|e| Error::io(format!("syncing directory {}", dir.display()), e))?;
    Ok((path, meta))
}

/// The counter count a snapshot's trailer claims, unverified: a sizing
/// hint read before [`read`] verifies the file.
pub fn counter_count_hint(bytes: &[u8]) -> Option<u64> {
    let at = bytes.len().checked_sub(8 + 4 + 24)? + 8;
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// Verifies a snapshot's checksum and structure, then calls `visit` with
/// every item. Errors name `path` and the byte offset of the problem.
pub fn read(
    bytes: &[u8],
    path: &Path,
    mut visit: impl FnMut(Item<'_>) -> Result<()>,
) -> Result<SnapshotMeta> {
    let corrupt = |offset: usize, reason: &str| Error::Corrupt {
        path: path.to_path_buf(),
        offset: offset as u64,
        reason: reason.to_string(),
    };
    if bytes.len() < HEADER_BYTES + 1 + TRAILER_BYTES {
        return Err(corrupt(0, "file is too short to be a snapshot"));
    }
    if &bytes[..8] != SNAPSHOT_MAGIC {
        return Err(corrupt(0, "snapshot magic is wrong"));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
    if !(SNAPSHOT_VERSION_MIN..=SNAPSHOT_VERSION).contains(&version) {
        return Err(corrupt(
            8,
            &format!("snapshot version {version} is not supported"),
        ));
    }
    let end_magic_at = bytes.len() - 8;
    if &bytes[end_magic_at..] != SNAPSHOT_END_MAGIC {
        return Err(corrupt(
            end_magic_at,
            "snapshot end magic is missing (truncated file?)",
        ));
    }
    let crc_at = end_magic_at - 4;
    let stored = u32::from_le_bytes(bytes[crc_at..end_magic_at].try_into().unwrap());
    if crc32c::crc32c(&bytes[..crc_at]) != stored {
        return Err(corrupt(crc_at, "snapshot checksum mismatch"));
    }
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
    let covers_pos = u64_at(16);
    let written_at_ms = u64_at(24);
    let trailer_at = crc_at - 24;
    let (next_lsn, counters, keys) = (
        u64_at(trailer_at),
        u64_at(trailer_at + 8),
        u64_at(trailer_at + 16),
    );

    let body = &bytes[..trailer_at];
    let mut at = HEADER_BYTES;
    let (mut seen_counters, mut seen_keys) = (0u64, 0u64);
    loop {
        let Some(&tag) = body.get(at) else {
            return Err(corrupt(at, "snapshot body ends without an end tag"));
        };
        at += 1;
        if tag == TAG_END {
            break;
        }
        let len = body
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
            .ok_or_else(|| corrupt(at, "item length runs past the body"))?;
        at += 2;
        let fixed = match tag {
            TAG_COUNTER | TAG_KEY_FP => 16,
            _ => 8,
        };
        let item = body
            .get(at..at + len + fixed)
            .ok_or_else(|| corrupt(at, "item runs past the body"))?;
        let text =
            std::str::from_utf8(&item[..len]).map_err(|_| corrupt(at, "name is not UTF-8"))?;
        let n1 = u64::from_le_bytes(item[len..len + 8].try_into().unwrap());
        match tag {
            TAG_COUNTER => {
                let lsn = u64::from_le_bytes(item[len + 8..len + 16].try_into().unwrap());
                if lsn >= next_lsn {
                    return Err(corrupt(
                        at,
                        "counter lsn is not below the snapshot's next lsn",
                    ));
                }
                visit(Item::Counter(
                    text,
                    Entry {
                        value: n1 as i64,
                        lsn,
                    },
                ))?;
                seen_counters += 1;
            }
            TAG_KEY => {
                visit(Item::Key(text, n1, 0))?;
                seen_keys += 1;
            }
            TAG_KEY_FP if version >= 2 => {
                let fingerprint = u64::from_le_bytes(item[len + 8..len + 16].try_into().unwrap());
                visit(Item::Key(text, n1, fingerprint))?;
                seen_keys += 1;
            }
            TAG_DEADLINE if version >= 3 => visit(Item::Deadline(text, n1))?,
            _ => return Err(corrupt(at - 3, &format!("unknown item tag {tag}"))),
        }
        at += len + fixed;
    }
    if at != trailer_at || seen_counters != counters || seen_keys != keys {
        return Err(corrupt(at, "snapshot item counts do not match its trailer"));
    }
    Ok(SnapshotMeta {
        covers_pos,
        next_lsn,
        written_at_ms,
        counters,
        keys,
        bytes: bytes.len() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot body as version 1 wrote it: one key, without a
    /// fingerprint.
    fn version_1_with_a_key(key: &str, expiry: u64) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(SNAPSHOT_MAGIC);
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&0u64.to_le_bytes()); // covers_pos
        b.extend_from_slice(&0u64.to_le_bytes()); // written_at_ms
        b.push(TAG_KEY);
        b.extend_from_slice(&(key.len() as u16).to_le_bytes());
        b.extend_from_slice(key.as_bytes());
        b.extend_from_slice(&expiry.to_le_bytes());
        b.push(TAG_END);
        b.extend_from_slice(&1u64.to_le_bytes()); // next_lsn
        b.extend_from_slice(&0u64.to_le_bytes()); // counters
        b.extend_from_slice(&1u64.to_le_bytes()); // keys
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b.extend_from_slice(SNAPSHOT_END_MAGIC);
        b
    }

    // Snapshots written before keys carried fingerprints still load: their
    // keys come back with the fingerprint unknown (0), which is taken for a
    // retry, as it always was. A fingerprinted key in a version 1 file is
    // corruption, not something to guess at.
    #[test]
    fn version_1_snapshots_load_with_unknown_fingerprints() {
        let bytes = version_1_with_a_key("k", 99);
        let mut keys = Vec::new();
        let meta = read(&bytes, Path::new("v1.snap"), |item| {
            if let Item::Key(k, expiry, fp) = item {
                keys.push((k.to_string(), expiry, fp));
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(meta.keys, 1);
        assert_eq!(keys, vec![("k".to_string(), 99, 0)]);

        let mut forged = version_1_with_a_key("k", 99);
        let tag_at = HEADER_BYTES;
        forged[tag_at] = TAG_KEY_FP;
        let crc_at = forged.len() - 12;
        let crc = crc32c::crc32c(&forged[..crc_at]);
        forged[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
        assert!(read(&forged, Path::new("v1.snap"), |_| Ok(())).is_err());
    }
}
