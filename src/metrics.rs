//! The node's own figures: every counter and histogram the node keeps about
//! itself lives here, and so does their OpenMetrics rendering.
//!
//! Recording is a relaxed atomic add, cheap enough for the increment path;
//! nothing here takes a lock.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A histogram with fixed bucket upper bounds.
pub struct Histogram {
    bounds: &'static [f64],
    counts: Box<[AtomicU64]>,
    /// Sum of observations, in the histogram's unit times 1000, to keep
    /// sub-unit precision in an integer.
    sum_milli: AtomicU64,
}

/// fsync latency buckets, in seconds.
pub const LATENCY_BOUNDS_S: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
/// Group-commit batch size buckets, in records.
pub const BATCH_BOUNDS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_milli: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        let i = self.bounds.partition_point(|b| *b < v);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_milli.fetch_add((v * 1000.0) as u64, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// Upper bound of the bucket holding quantile `q` (0..=1); `None` when
    /// empty. Coarse by design: it is for `INFO`, not for benchmarks.
    pub fn quantile_upper_bound(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c.load(Relaxed);
            if seen >= rank {
                return Some(self.bounds.get(i).copied().unwrap_or(f64::INFINITY));
            }
        }
        None
    }

    fn render(&self, out: &mut String, name: &str, help: &str, unit: &str) {
        let _ = writeln!(out, "# TYPE {name} histogram");
        if !unit.is_empty() {
            let _ = writeln!(out, "# UNIT {name} {unit}");
        }
        let _ = writeln!(out, "# HELP {name} {help}");
        let mut cumulative = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Relaxed);
            match self.bounds.get(i) {
                Some(b) => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let _ = writeln!(out, "{name}_count {cumulative}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_milli.load(Relaxed) as f64 / 1000.0
        );
    }
}

/// Figures the node keeps about itself.
pub struct Metrics {
    pub journal_bytes_written: AtomicU64,
    pub journal_records_written: AtomicU64,
    pub journal_syncs: AtomicU64,
    pub journal_sync_seconds: Histogram,
    pub journal_batch_records: Histogram,
    pub journal_segments_created: AtomicU64,
    pub snapshots_written: AtomicU64,
    pub snapshot_last_ms: AtomicU64,
    pub recovery_ms: AtomicU64,
    pub recovery_records_replayed: AtomicU64,
    pub increments: AtomicU64,
    pub increment_errors: AtomicU64,
    pub duplicates: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            journal_bytes_written: AtomicU64::new(0),
            journal_records_written: AtomicU64::new(0),
            journal_syncs: AtomicU64::new(0),
            journal_sync_seconds: Histogram::new(LATENCY_BOUNDS_S),
            journal_batch_records: Histogram::new(BATCH_BOUNDS),
            journal_segments_created: AtomicU64::new(0),
            snapshots_written: AtomicU64::new(0),
            snapshot_last_ms: AtomicU64::new(0),
            recovery_ms: AtomicU64::new(0),
            recovery_records_replayed: AtomicU64::new(0),
            increments: AtomicU64::new(0),
            increment_errors: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
        }
    }
}

/// Escapes a label value for the OpenMetrics text format.
pub fn escape_label(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

impl Metrics {
    /// Appends the node's own figures in OpenMetrics text format (without
    /// the closing `# EOF`).
    pub fn render(&self, out: &mut String) {
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "{name}_total {v}");
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "{name} {v}");
        };
        counter(
            out,
            "tally_journal_bytes",
            "Bytes appended to the journal.",
            self.journal_bytes_written.load(Relaxed),
        );
        counter(
            out,
            "tally_journal_records",
            "Records appended to the journal.",
            self.journal_records_written.load(Relaxed),
        );
        counter(
            out,
            "tally_journal_syncs",
            "fdatasync calls made by the journal writer.",
            self.journal_syncs.load(Relaxed),
        );
        self.journal_sync_seconds.render(
            out,
            "tally_journal_sync_seconds",
            "Latency of one journal write plus fdatasync.",
            "seconds",
        );
        self.journal_batch_records.render(
            out,
            "tally_journal_batch_records",
            "Records made durable by one group commit.",
            "",
        );
        counter(
            out,
            "tally_journal_segments_created",
            "Journal segments created.",
            self.journal_segments_created.load(Relaxed),
        );
        counter(
            out,
            "tally_snapshots",
            "Snapshots written.",
            self.snapshots_written.load(Relaxed),
        );
        gauge(
            out,
            "tally_snapshot_last_duration_seconds",
            "Time the last snapshot took.",
            self.snapshot_last_ms.load(Relaxed) as f64 / 1000.0,
        );
        gauge(
            out,
            "tally_recovery_duration_seconds",
            "Time the last start-up recovery took.",
            self.recovery_ms.load(Relaxed) as f64 / 1000.0,
        );
        gauge(
            out,
            "tally_recovery_records_replayed",
            "Journal records replayed by the last recovery.",
            self.recovery_records_replayed.load(Relaxed) as f64,
        );
        counter(
            out,
            "tally_increments",
            "Increments acknowledged.",
            self.increments.load(Relaxed),
        );
        counter(
            out,
            "tally_increment_errors",
            "Increments answered with an error.",
            self.increment_errors.load(Relaxed),
        );
        counter(
            out,
            "tally_idempotent_duplicates",
            "Increments not applied because their idempotency key was seen.",
            self.duplicates.load(Relaxed),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Quantiles land in the right bucket and rendering is cumulative.
    #[test]
    fn histogram_buckets_and_quantiles() {
        let h = Histogram::new(BATCH_BOUNDS);
        for v in [1.0, 1.0, 3.0, 100.0] {
            h.observe(v);
        }
        assert_eq!(h.count(), 4);
        assert_eq!(h.quantile_upper_bound(0.5), Some(1.0));
        assert_eq!(h.quantile_upper_bound(0.75), Some(4.0));
        assert_eq!(h.quantile_upper_bound(1.0), Some(128.0));
        let mut s = String::new();
        h.render(&mut s, "x", "help", "");
        assert!(s.contains("x_bucket{le=\"2\"} 2\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 4\n"), "{s}");
    }
}
