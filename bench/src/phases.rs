//! Where recovery time goes: the steps of `tally::recovery::recover` timed
//! one at a time, in this process, on one thread, over a data directory the
//! node is not running on.
//!
//! Each journal segment is walked several times, each walk doing one more
//! step than the one before (checksums only; full decode; decode and
//! replay into the table), so the cost of a step is the difference between
//! two walks. The steps are the library's own public functions
//! (`snapshot::read`, `journal::decode`, `CounterTable::replay`), so the
//! figures stay true to what the node does as long as `recover` is built
//! from them.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use tally::journal::{self, Decoded, RECORD_FRAME_BYTES, SEGMENT_HEADER_BYTES};
use tally::snapshot::{self, Item};
use tally::table::CounterTable;

use crate::table::{Table, thousands};

pub struct Phases {
    pub counters: u64,
    /// Records read from the journal.
    pub records: u64,
    /// Records newer than the snapshot, and so applied; the rest sit in the
    /// first segment before the snapshot's position and are skipped by lsn.
    pub applied: u64,
    pub snapshot_load: Duration,
    pub file_read: Duration,
    pub checksum: Duration,
    pub decode: Duration,
    pub replay: Duration,
}

/// Times each recovery step over `data_dir` (newest snapshot, then every
/// journal segment in order).
pub fn measure(data_dir: &Path) -> Result<Phases> {
    let table = CounterTable::new();
    let mut snapshots: Vec<u64> = list(data_dir)?
        .iter()
        .filter_map(|n| snapshot::parse_file_name(n))
        .collect();
    snapshots.sort_unstable();
    let Some(&newest) = snapshots.last() else {
        bail!("no snapshot in {}", data_dir.display());
    };
    let started = Instant::now();
    let path = data_dir.join(snapshot::file_name(newest));
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    snapshot::read(&bytes, &path, |item| {
        if let Item::Counter(name, entry) = item {
            table.restore(name, entry);
        }
        Ok(())
    })?;
    let snapshot_load = started.elapsed();
    drop(bytes);

    let journal_dir = data_dir.join("journal");
    let mut segments: Vec<u64> = list(&journal_dir)?
        .iter()
        .filter_map(|n| journal::parse_segment_file_name(n))
        .collect();
    segments.sort_unstable();
    let mut p = Phases {
        counters: table.len() as u64,
        records: 0,
        applied: 0,
        snapshot_load,
        file_read: Duration::ZERO,
        checksum: Duration::ZERO,
        decode: Duration::ZERO,
        replay: Duration::ZERO,
    };
    let (mut crc_walk, mut decode_walk, mut replay_walk) =
        (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for start in segments {
        let path = journal_dir.join(journal::segment_file_name(start));
        let t = Instant::now();
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        p.file_read += t.elapsed();
        let body = bytes.get(SEGMENT_HEADER_BYTES..).unwrap_or_default();

        let t = Instant::now();
        let checked = checksum_walk(body)?;
        crc_walk += t.elapsed();

        let t = Instant::now();
        let decoded = walk_records(body, |_, _, _| Ok(()))?;
        decode_walk += t.elapsed();

        let t = Instant::now();
        let replayed = walk_records(body, |name, delta, lsn| {
            p.applied += u64::from(table.replay(name, delta, lsn)?);
            Ok(())
        })?;
        replay_walk += t.elapsed();

        if checked != decoded || decoded != replayed {
            bail!("walks of {} disagree on the record count", path.display());
        }
        p.records += replayed;
    }
    p.checksum = crc_walk;
    p.decode = decode_walk.saturating_sub(crc_walk);
    p.replay = replay_walk.saturating_sub(decode_walk);
    Ok(p)
}

fn list(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

/// Verifies every record's CRC-32C the way `journal::decode` does (length
/// prefix and payload, skipping the stored checksum) and nothing else.
fn checksum_walk(body: &[u8]) -> Result<u64> {
    let mut off = 0;
    let mut records = 0;
    while off + RECORD_FRAME_BYTES <= body.len() {
        let len = u32::from_le_bytes(body[off..off + 4].try_into()?) as usize;
        let end = off + RECORD_FRAME_BYTES + len;
        if end > body.len() {
            break;
        }
        let stored = u32::from_le_bytes(body[off + 4..off + 8].try_into()?);
        let crc = crc32c::crc32c_append(
            crc32c::crc32c(&body[off..off + 4]),
            &body[off + RECORD_FRAME_BYTES..end],
        );
        if crc != stored {
            bail!("checksum mismatch at offset {off}");
        }
        records += 1;
        off = end;
    }
    Ok(records)
}

/// Decodes every record with `journal::decode` and hands it to `apply`.
fn walk_records(body: &[u8], mut apply: impl FnMut(&str, i64, u64) -> Result<()>) -> Result<u64> {
    let mut off = 0;
    let mut records = 0;
    while off < body.len() {
        match journal::decode(&body[off..]) {
            Decoded::Record(r, used) => {
                apply(r.name, r.delta, r.lsn)?;
                records += 1;
                off += used;
            }
            Decoded::Incomplete => break,
            Decoded::Corrupt(reason) => bail!("corrupt record at offset {off}: {reason}"),
        }
    }
    Ok(records)
}

/// The breakdown as a table, with the node's own recovery time beside it.
pub fn render(p: &Phases, node_recovery_ms: u64) -> String {
    let total = p.snapshot_load + p.file_read + p.checksum + p.decode + p.replay;
    let mut out = format!(
        "#### Where recovery time goes: case 1 replayed in this process, one thread, step by step\n\n\
         {} counters from the snapshot; {} journal records read, {} applied (the rest precede \
         the snapshot in its segment and are skipped by lsn).\n\n",
        thousands(p.counters),
        thousands(p.records),
        thousands(p.applied)
    );
    let mut table = Table::new(&["step", "ms", "ns/record", "share"]);
    let rows = [
        (
            "load snapshot (read, verify, insert counters)",
            p.snapshot_load,
        ),
        ("read journal segment files", p.file_read),
        ("CRC-32C of records", p.checksum),
        ("decode records (framing, UTF-8)", p.decode),
        (
            "replay into the table (hash, shard lock, probe, apply)",
            p.replay,
        ),
        ("total", total),
    ];
    for (step, d) in rows {
        table.row(vec![
            step.into(),
            thousands(d.as_millis() as u64),
            format!("{:.0}", d.as_nanos() as f64 / p.records.max(1) as f64),
            format!(
                "{:.0}%",
                100.0 * d.as_secs_f64() / total.as_secs_f64().max(1e-9)
            ),
        ]);
    }
    out.push_str(&table.render());
    out.push_str(&format!(
        "\nThe node's own recovery of the same directory took {} ms.\n",
        thousands(node_recovery_ms)
    ));
    out
}
