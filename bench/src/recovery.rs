//! Part 2, recovery: how long `tally serve` takes from process start to its
//! ready line on a data directory with many counters and a long journal.
//!
//! Three cases on one data directory, in this order:
//! 1. a snapshot holding every counter, then the whole journal after it
//!    (written by the `write-journal` child, which ends like a crash);
//! 2. a snapshot covering all of that, then a short journal tail (the
//!    usual restart: snapshots keep the journal short);
//! 3. a snapshot and an empty journal (a restart after a graceful stop).
//!
//! Each case is started `runs` times; all but the last start end with
//! SIGKILL (a crash, which leaves the journal as it was), the last with
//! SIGTERM, whose final snapshot makes the next case's starting point. The
//! node's own figures come from its "recovered" log line. The files are in
//! the page cache (just written), so this measures recovery's CPU work, not
//! the disk's read speed. Before the first case, [`phases`] times each step
//! of recovery separately on the same directory.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use crate::parse::{self, Recovered};
use crate::phases::{self, Phases};
use tally_lab::process::run_with_timeout;

use crate::process;
use crate::table::{Table, thousands};
use crate::throughput::verdict;

/// Longest the writer child may take (10 million increments in-process run
/// at a few million per second).
const WRITE_TIMEOUT: Duration = Duration::from_secs(1800);
/// Longest a start may take to become ready here, even replaying a journal
/// of tens of millions of records slowly: far beyond
/// [`tally_lab::process::READY_TIMEOUT`], which is for a node on a small
/// directory.
const RECOVERY_READY_TIMEOUT: Duration = Duration::from_secs(600);
/// Keeps the started nodes from taking a snapshot of their own, which would
/// change what the next start has to replay.
const NO_AUTOMATIC_SNAPSHOT: &str = "4611686018427387904";
/// Replay rate the product aims for, records per second.
const REPLAY_RATE_TARGET: f64 = 10_000_000.0;
/// "Ready in about a second".
const READY_TARGET: Duration = Duration::from_secs(1);

pub struct Settings {
    pub counters: u64,
    /// Journal records after the snapshot in case 1.
    pub records: u64,
    /// Journal records after the snapshot in case 2.
    pub tail_records: u64,
    /// Starts per case; the median is reported.
    pub runs: u32,
}

struct Case {
    name: String,
    snapshot_bytes: u64,
    journal_bytes: u64,
    /// One per start: the node's figures and the time to its ready line.
    starts: Vec<(Recovered, Duration)>,
}

impl Case {
    /// The start with the median time to ready.
    fn median(&self) -> &(Recovered, Duration) {
        let mut order: Vec<usize> = (0..self.starts.len()).collect();
        order.sort_by_key(|&i| self.starts[i].1);
        &self.starts[order[order.len() / 2]]
    }
}

pub fn run(tally_bin: &Path, work: &Path, s: &Settings) -> (String, bool) {
    match run_cases(tally_bin, work, s) {
        Ok((cases, phases)) => {
            let (mut text, ok) = report(&cases, s);
            text.push('\n');
            text.push_str(&phases::render(&phases, cases[0].median().0.recovery_ms));
            (text, ok)
        }
        Err(e) => (format!("### Recovery\n\n- error: {e:#}\n"), false),
    }
}

fn run_cases(tally_bin: &Path, work: &Path, s: &Settings) -> Result<(Vec<Case>, Phases)> {
    let dir = work.join("recovery");
    let mut cases = Vec::new();

    eprintln!(
        "recovery: writing {} counters, a snapshot, then {} journal records ...",
        thousands(s.counters),
        thousands(s.records)
    );
    write_journal(&dir, s.counters, s.records, true)?;
    eprintln!("recovery: timing each recovery step in-process ...");
    let phases = phases::measure(&dir)?;
    cases.push(measure(
        tally_bin,
        &dir,
        format!(
            "1. snapshot of {} counters + {} journal records",
            short(s.counters),
            short(s.records)
        ),
        s.records,
        s,
    )?);

    eprintln!(
        "recovery: writing {} more records ...",
        thousands(s.tail_records)
    );
    write_journal(&dir, s.counters, s.tail_records, false)?;
    cases.push(measure(
        tally_bin,
        &dir,
        format!(
            "2. snapshot covering {} records + {} journal records",
            short(s.counters + s.records),
            short(s.tail_records)
        ),
        s.tail_records,
        s,
    )?);

    cases.push(measure(
        tally_bin,
        &dir,
        "3. snapshot only (after a graceful stop)".into(),
        0,
        s,
    )?);
    Ok((cases, phases))
}

/// Runs the `write-journal` child (this same program) on `dir`.
fn write_journal(dir: &Path, counters: u64, records: u64, create: bool) -> Result<()> {
    let exe = std::env::current_exe().context("locating this program")?;
    let mut command = Command::new(exe);
    command
        .arg("write-journal")
        .arg("--data-dir")
        .arg(dir)
        .args(["--counters", &counters.to_string()])
        .args(["--records", &records.to_string()]);
    if create {
        command.arg("--create-and-snapshot");
    }
    let output = run_with_timeout(&mut command, "write-journal", WRITE_TIMEOUT)?;
    if !output.status.success() {
        bail!(
            "write-journal failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    eprintln!("  {}", String::from_utf8_lossy(&output.stdout).trim());
    Ok(())
}

fn measure(
    tally_bin: &Path,
    dir: &Path,
    name: String,
    expected_records: u64,
    s: &Settings,
) -> Result<Case> {
    eprintln!("recovery: {name} ...");
    let (snapshot_bytes, journal_bytes) = sizes(dir)?;
    let mut starts = Vec::new();
    for run in 0..s.runs {
        let mut tally = process::start_tally(
            tally_bin,
            dir,
            false,
            "local",
            &["--snapshot-journal-bytes", NO_AUTOMATIC_SNAPSHOT],
            RECOVERY_READY_TIMEOUT,
        )?;
        let log = std::fs::read_to_string(&tally.log_path)?;
        let recovered = parse::recovered_log_line(&log)?;
        if recovered.counters != s.counters || recovered.records_replayed != expected_records {
            bail!(
                "{name}: recovered {} counters and replayed {} records, expected {} and {}",
                recovered.counters,
                recovered.records_replayed,
                s.counters,
                expected_records
            );
        }
        starts.push((recovered, tally.ready_after));
        if run + 1 < s.runs {
            tally.guard.kill().context("killing tally serve")?;
        } else {
            let status = process::stop(tally.guard)?;
            if !status.success() {
                bail!("tally serve exited with {status} at shutdown");
            }
        }
    }
    Ok(Case {
        name,
        snapshot_bytes,
        journal_bytes,
        starts,
    })
}

/// Bytes in snapshot files and in journal segments under `dir`.
fn sizes(dir: &Path) -> Result<(u64, u64)> {
    let sum = |d: &Path, suffix: &str| -> Result<u64> {
        let mut total = 0;
        for entry in std::fs::read_dir(d).with_context(|| format!("listing {}", d.display()))? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().ends_with(suffix) {
                total += entry.metadata()?.len();
            }
        }
        Ok(total)
    };
    Ok((sum(dir, ".snap")?, sum(&dir.join("journal"), ".jnl")?))
}

/// 1000000 -> "1M", 1100000 -> "1.1M", 100000 -> "100k".
fn short(n: u64) -> String {
    match n {
        n if n >= 1_000_000 && n % 100_000 == 0 => {
            let tenths = n / 100_000;
            if tenths % 10 == 0 {
                format!("{}M", tenths / 10)
            } else {
                format!("{}.{}M", tenths / 10, tenths % 10)
            }
        }
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => thousands(n),
    }
}

fn mb(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1e6)
}

fn report(cases: &[Case], s: &Settings) -> (String, bool) {
    let mut out = format!(
        "### Recovery: {} counters, `tally serve` start to ready line (median of {} starts)\n\n",
        thousands(s.counters),
        s.runs
    );
    let mut table = Table::new(&[
        "case",
        "records replayed",
        "snapshot MB",
        "journal MB",
        "recovery ms",
        "ready ms",
        "replay rate (records/s)",
    ]);
    for c in cases {
        let (r, ready) = c.median();
        table.row(vec![
            c.name.clone(),
            thousands(r.records_replayed),
            mb(c.snapshot_bytes),
            mb(c.journal_bytes),
            thousands(r.recovery_ms),
            thousands(ready.as_millis() as u64),
            replay_rate(r).map_or("n/a".into(), |x| thousands(x as u64)),
        ]);
    }
    out.push_str(&table.render());
    out.push_str(
        "\nrecovery ms is the node's own figure (snapshot load, journal read, checksums, \
         replay); ready ms adds process start and listening; replay rate is records \
         replayed / recovery ms, snapshot load included. Files were in the page cache.\n\n",
    );
    let (full, tail, empty) = (cases[0].median(), cases[1].median(), cases[2].median());
    // Case 3 loads the same snapshot size with nothing to replay: taking its
    // time away from case 1 leaves the journal replay alone.
    let replay_only_ms = full.0.recovery_ms.saturating_sub(empty.0.recovery_ms);
    if replay_only_ms > 0 {
        out.push_str(&format!(
            "- journal replay alone (case 1 minus case 3): {} records in {} ms = {} records/s\n",
            thousands(full.0.records_replayed),
            thousands(replay_only_ms),
            thousands((full.0.records_replayed as f64 * 1000.0 / replay_only_ms as f64) as u64)
        ));
    }
    let rate = replay_rate(&full.0).unwrap_or(0.0);
    out.push_str(&format!(
        "- target: replay >= {} records/s: {} ({} records/s in case 1, snapshot load included)\n",
        thousands(REPLAY_RATE_TARGET as u64),
        verdict(rate >= REPLAY_RATE_TARGET),
        thousands(rate as u64)
    ));
    for (label, (_, ready)) in [
        ("case 1 (long journal)", full),
        ("case 2 (short tail)", tail),
    ] {
        out.push_str(&format!(
            "- target: ready within {} s, {label}: {} ({} ms)\n",
            READY_TARGET.as_secs(),
            verdict(*ready <= READY_TARGET),
            thousands(ready.as_millis() as u64)
        ));
    }
    (out, true)
}

fn replay_rate(r: &Recovered) -> Option<f64> {
    (r.records_replayed > 0)
        .then(|| r.records_replayed as f64 * 1000.0 / r.recovery_ms.max(1) as f64)
}

#[cfg(test)]
mod tests {
    // Case labels give sizes the short way people say them.
    #[test]
    fn sizes_are_shortened_for_labels() {
        assert_eq!(super::short(1_000_000), "1M");
        assert_eq!(super::short(11_000_000), "11M");
        assert_eq!(super::short(1_100_000), "1.1M");
        assert_eq!(super::short(100_000), "100k");
        assert_eq!(super::short(1_234), "1,234");
    }
}
