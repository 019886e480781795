//! Where recovery time goes: recovery run in this process with the
//! library's own `tally::engine::recovery::recover`, beside the steps it is made
//! of, each timed alone over the same data directory (which no node is
//! running on): loading the snapshot, reading the segment files, checking
//! CRCs, decoding records. Whatever recovery spends beyond those steps is
//! applying the records to the counter table, however the library does it
//! (in parallel or not), so the breakdown stays true when the library's
//! replay strategy changes.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use tally::RecoveryMode;
use tally::engine::idempotency::{IdempotencyKeys, now_ms};
use tally::engine::journal::{self, Decoded, SEGMENT_HEADER_BYTES};
use tally::engine::snapshot::{self, Item};
use tally::engine::storage::FsStorage;
use tally::engine::table::CounterTable;

use crate::table::{Table, thousands};

/// The library's default limit on idempotency keys; the benchmark's
/// journal holds none.
const IDEMPOTENCY_KEYS_MAX: usize = 10_000_000;

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
    /// Recovery's whole time, as `recover` reports it.
    pub recovery: Duration,
}

impl Phases {
    /// Recovery's time beyond the separately timed steps: applying records
    /// to the table.
    pub fn apply(&self) -> Duration {
        self.recovery
            .saturating_sub(self.snapshot_load + self.file_read + self.checksum + self.decode)
    }
}

/// Times recovery of `data_dir` and each of its steps.
pub fn measure(data_dir: &Path) -> Result<Phases> {
    let (counters, snapshot_load) = time_snapshot_load(data_dir)?;
    let journal_dir = data_dir.join("journal");
    let mut segments: Vec<u64> = list(&journal_dir)?
        .iter()
        .filter_map(|n| journal::parse_segment_file_name(n))
        .collect();
    segments.sort_unstable();
    let (mut file_read, mut checksum, mut decode, mut records) =
        (Duration::ZERO, Duration::ZERO, Duration::ZERO, 0);
    for start in segments {
        let path = journal_dir.join(journal::segment_file_name(start));
        let t = Instant::now();
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        file_read += t.elapsed();
        let body = bytes.get(SEGMENT_HEADER_BYTES..).unwrap_or_default();

        let t = Instant::now();
        let checked = checksum_walk(body)?;
        let checksum_segment = t.elapsed();
        checksum += checksum_segment;

        // `decode` verifies the CRC too: its own work is the difference.
        let t = Instant::now();
        let decoded = decode_walk(body)?;
        decode += t.elapsed().saturating_sub(checksum_segment);

        if checked != decoded {
            bail!("walks of {} disagree on the record count", path.display());
        }
        records += decoded;
    }

    let table = CounterTable::new();
    let keys = IdempotencyKeys::new(IDEMPOTENCY_KEYS_MAX);
    let report = tally::engine::recovery::recover(
        &FsStorage,
        data_dir,
        &table,
        &keys,
        &Default::default(),
        RecoveryMode::Strict,
        now_ms(),
    )?;
    if report.records_read != records {
        bail!(
            "recovery read {} records, the step walks {records}",
            report.records_read
        );
    }
    Ok(Phases {
        counters,
        records,
        applied: report.records_applied,
        snapshot_load,
        file_read,
        checksum,
        decode,
        recovery: report.duration,
    })
}

/// Loads the newest snapshot into a table of its own and drops it.
fn time_snapshot_load(data_dir: &Path) -> Result<(u64, Duration)> {
    let mut snapshots: Vec<u64> = list(data_dir)?
        .iter()
        .filter_map(|n| snapshot::parse_file_name(n))
        .collect();
    snapshots.sort_unstable();
    let Some(&newest) = snapshots.last() else {
        bail!("no snapshot in {}", data_dir.display());
    };
    let table = CounterTable::new();
    let started = Instant::now();
    let path = data_dir.join(snapshot::file_name(newest));
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    snapshot::read(&bytes, &path, |item| {
        if let Item::Counter(name, entry) = item {
            table.restore(name, entry);
        }
        Ok(())
    })?;
    Ok((table.len() as u64, started.elapsed()))
}

fn list(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

/// Verifies every record's CRC-32C the way `journal::decode` does (the
/// stored checksum first, then the length and payload it covers) and
/// nothing else.
fn checksum_walk(body: &[u8]) -> Result<u64> {
    let mut off = 0;
    let mut records = 0;
    while let Ok(used) = journal::frame_len(&body[off..]) {
        let end = off + used;
        let stored = u32::from_le_bytes(body[off..off + 4].try_into()?);
        if crc32c::crc32c(&body[off + 4..end]) != stored {
            bail!("checksum mismatch at offset {off}");
        }
        records += 1;
        off = end;
    }
    Ok(records)
}

/// Decodes every record with `journal::decode`, as recovery's first pass
/// does, and counts them.
fn decode_walk(body: &[u8]) -> Result<u64> {
    let mut off = 0;
    let mut records = 0;
    while off < body.len() {
        match journal::decode(&body[off..]) {
            Decoded::Record(r, used) => {
                std::hint::black_box(r);
                records += 1;
                off += used;
            }
            Decoded::Incomplete => break,
            // Zeros filled ahead of the records: their end, as recovery
            // reads it.
            Decoded::Corrupt(_) if journal::is_zero_tail(&body[off..]) => break,
            Decoded::Corrupt(reason) => bail!("corrupt record at offset {off}: {reason}"),
        }
    }
    Ok(records)
}

/// The breakdown as a table, with the node's own recovery time beside it.
pub fn render(p: &Phases, node_recovery_ms: u64) -> String {
    let mut out = format!(
        "#### Where recovery time goes: case 1 recovered in this process, each step also timed alone\n\n\
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
            "apply records to the table (the rest of recovery)",
            p.apply(),
        ),
        ("recovery (tally::engine::recovery::recover)", p.recovery),
    ];
    for (step, d) in rows {
        table.row(vec![
            step.into(),
            thousands(d.as_millis() as u64),
            format!("{:.0}", d.as_nanos() as f64 / p.records.max(1) as f64),
            format!(
                "{:.0}%",
                100.0 * d.as_secs_f64() / p.recovery.as_secs_f64().max(1e-9)
            ),
        ]);
    }
    out.push_str(&table.render());
    out.push_str(&format!(
        "\nThe node's own recovery of the same directory (`tally serve`, median) took {} ms.\n",
        thousands(node_recovery_ms)
    ));
    out
}
