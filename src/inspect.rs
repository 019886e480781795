//! `tally inspect`: reads a data directory without changing it, verifies
//! every checksum, and reports what the snapshot and journal hold.
//!
//! Unlike recovery it never truncates or removes anything, so it is safe to
//! run on the data directory of a stopped node before deciding whether to
//! start it with `--recovery-mode truncate-at-corruption`.

use std::fmt::Write as _;
use std::path::Path;

use crate::engine::journal::{self, Decoded, SEGMENT_HEADER_BYTES};
use crate::engine::recovery::JOURNAL_DIR;
use crate::engine::snapshot;
use crate::engine::storage::{FsStorage, Storage};
use crate::error::Result;

/// One file's verdict.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FileReport {
    pub file: String,
    pub bytes: u64,
    /// `ok`, `torn-tail` (last segment only: a crash artifact recovery cuts)
    /// or `corrupt`.
    pub status: &'static str,
    pub detail: Option<String>,
    pub start_pos: Option<u64>,
    pub records: u64,
    pub first_lsn: Option<u64>,
    pub last_lsn: Option<u64>,
    pub counters: Option<u64>,
    pub idempotency_keys: Option<u64>,
}

/// Everything `tally inspect` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InspectReport {
    pub data_dir: String,
    pub node_id: Option<String>,
    pub snapshots: Vec<FileReport>,
    pub segments: Vec<FileReport>,
    pub journal_records: u64,
    pub journal_bytes: u64,
    /// Whether a node would start from this directory in strict mode.
    pub healthy: bool,
}

/// Inspects `data_dir` on the real file system.
pub fn inspect(data_dir: &Path) -> Result<InspectReport> {
    inspect_with(&FsStorage, data_dir)
}

/// Inspects `data_dir` through any storage.
pub fn inspect_with(storage: &dyn Storage, data_dir: &Path) -> Result<InspectReport> {
    let io = |what: &str, p: &Path| {
        let what = format!("{what} {}", p.display());
        move |e| crate::Error::io(what, e)
    };
    let names = storage.list(data_dir).map_err(io("listing", data_dir))?;
    let node_id = names
        .iter()
        .any(|n| n == crate::node::NODE_ID_FILE)
        .then(|| storage.read(&data_dir.join(crate::node::NODE_ID_FILE)).ok())
        .flatten()
        .map(|b| String::from_utf8_lossy(&b).trim().to_string());
    let mut healthy = true;

    let mut snaps: Vec<u64> = names
        .iter()
        .filter_map(|n| snapshot::parse_file_name(n))
        .collect();
    snaps.sort_unstable();
    let mut snapshots = Vec::new();
    for (i, pos) in snaps.iter().enumerate() {
        let path = data_dir.join(snapshot::file_name(*pos));
        let bytes = storage.read(&path).map_err(io("reading", &path))?;
        let mut r = FileReport {
            file: path.display().to_string(),
            bytes: bytes.len() as u64,
            status: "ok",
            detail: None,
            start_pos: Some(*pos),
            records: 0,
            first_lsn: None,
            last_lsn: None,
            counters: None,
            idempotency_keys: None,
        };
        match snapshot::read(&bytes, &path, |_| Ok(())) {
            Ok(meta) => {
                r.counters = Some(meta.counters);
                r.idempotency_keys = Some(meta.keys);
                r.last_lsn = meta.next_lsn.checked_sub(1);
            }
            Err(e) => {
                r.status = "corrupt";
                r.detail = Some(e.to_string());
                // Only the newest snapshot matters to recovery.
                if i + 1 == snaps.len() {
                    healthy = false;
                }
            }
        }
        snapshots.push(r);
    }

    let journal_dir = data_dir.join(JOURNAL_DIR);
    let mut segs: Vec<u64> = storage
        .list(&journal_dir)
        .unwrap_or_default()
        .iter()
        .filter_map(|n| journal::parse_segment_file_name(n))
        .collect();
    segs.sort_unstable();
    let mut segments = Vec::new();
    let (mut journal_records, mut journal_bytes) = (0u64, 0u64);
    let mut expected: Option<u64> = None;
    for (i, start) in segs.iter().enumerate() {
        let last = i + 1 == segs.len();
        let path = journal_dir.join(journal::segment_file_name(*start));
        let bytes = storage.read(&path).map_err(io("reading", &path))?;
        journal_bytes += bytes.len() as u64;
        let mut r = FileReport {
            file: path.display().to_string(),
            bytes: bytes.len() as u64,
            status: "ok",
            detail: None,
            start_pos: Some(*start),
            records: 0,
            first_lsn: None,
            last_lsn: None,
            counters: None,
            idempotency_keys: None,
        };
        match journal::parse_segment_header(&bytes) {
            Err(e) => {
                r.status = if last
                    && (bytes.len() <= SEGMENT_HEADER_BYTES
                        || journal::is_zero_tail(&bytes[SEGMENT_HEADER_BYTES..]))
                {
                    "torn-tail"
                } else {
                    healthy = false;
                    "corrupt"
                };
                r.detail = Some(format!("offset 0: {e}"));
            }
            Ok(header_start) => {
                if header_start != *start {
                    healthy = false;
                    r.status = "corrupt";
                    r.detail = Some(format!("header says start {header_start}"));
                }
                if let Some(exp) = expected
                    && exp != *start
                {
                    r.detail = Some(format!(
                        "gap or overlap: previous segment ends at {exp}, this one starts at {start}"
                    ));
                }
                let mut off = SEGMENT_HEADER_BYTES;
                while off < bytes.len() {
                    match journal::decode(&bytes[off..]) {
                        Decoded::Record(rec, used) => {
                            r.records += 1;
                            r.first_lsn.get_or_insert(rec.lsn);
                            r.last_lsn = Some(rec.lsn);
                            off += used;
                        }
                        Decoded::Incomplete | Decoded::Corrupt(_)
                            if journal::is_zero_tail(&bytes[off..]) =>
                        {
                            r.detail = Some(format!(
                                "records end at offset {off}; {} bytes of zeros filled ahead after them",
                                bytes.len() - off
                            ));
                            break;
                        }
                        Decoded::Incomplete | Decoded::Corrupt(_) => {
                            let why = match journal::decode(&bytes[off..]) {
                                Decoded::Corrupt(reason) => reason,
                                _ => "record is cut short".into(),
                            };
                            r.detail = Some(format!(
                                "offset {off}: {why} ({} bytes after it)",
                                bytes.len() - off
                            ));
                            r.status = if last {
                                "torn-tail"
                            } else {
                                healthy = false;
                                "corrupt"
                            };
                            break;
                        }
                    }
                }
                expected = Some(start + (off - SEGMENT_HEADER_BYTES) as u64);
            }
        }
        journal_records += r.records;
        segments.push(r);
    }
    Ok(InspectReport {
        data_dir: data_dir.display().to_string(),
        node_id,
        snapshots,
        segments,
        journal_records,
        journal_bytes,
        healthy,
    })
}

impl InspectReport {
    /// A table for people.
    pub fn render_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "data dir   {}", self.data_dir);
        let _ = writeln!(
            s,
            "node id    {}",
            self.node_id.as_deref().unwrap_or("(none)")
        );
        let _ = writeln!(s, "\nsnapshots");
        if self.snapshots.is_empty() {
            let _ = writeln!(s, "  (none)");
        }
        for r in &self.snapshots {
            let _ = writeln!(
                s,
                "  {:<9} covers_pos={:<12} counters={:<10} keys={:<8} bytes={:<10} {}",
                r.status,
                r.start_pos.unwrap_or(0),
                r.counters.map_or("-".into(), |c| c.to_string()),
                r.idempotency_keys.map_or("-".into(), |c| c.to_string()),
                r.bytes,
                r.file
            );
            if let Some(d) = &r.detail {
                let _ = writeln!(s, "            {d}");
            }
        }
        let _ = writeln!(s, "\njournal segments");
        if self.segments.is_empty() {
            let _ = writeln!(s, "  (none)");
        }
        for r in &self.segments {
            let lsns = match (r.first_lsn, r.last_lsn) {
                (Some(a), Some(b)) => format!("{a}..={b}"),
                _ => "-".into(),
            };
            let _ = writeln!(
                s,
                "  {:<9} start_pos={:<12} records={:<10} lsn={:<20} bytes={:<10} {}",
                r.status,
                r.start_pos.unwrap_or(0),
                r.records,
                lsns,
                r.bytes,
                r.file
            );
            if let Some(d) = &r.detail {
                let _ = writeln!(s, "            {d}");
            }
        }
        let _ = writeln!(
            s,
            "\ntotal      {} journal records in {} bytes; checksums {}",
            self.journal_records,
            self.journal_bytes,
            if self.healthy {
                "verified, no corruption recovery would refuse"
            } else {
                "FAILED: strict recovery would refuse this directory"
            }
        );
        s
    }
}
