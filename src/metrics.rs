//! The node's own figures: every counter and histogram the node keeps about
//! itself lives here, and so does their OpenMetrics rendering.
//!
//! Recording is a relaxed atomic add, cheap enough for the increment path;
//! nothing here takes a lock.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::config::Durability;

/// A histogram with fixed bucket upper bounds.
pub struct Histogram {
    bounds: &'static [f64],
    counts: Box<[AtomicU64]>,
    /// Sum of observations, in millionths of the histogram's unit (rounded
    /// per observation), to keep sub-unit precision in an integer: a 40 µs
    /// fsync adds 40 to a sum in seconds, not 0.
    sum_micro: AtomicU64,
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
            sum_micro: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        self.observe_n(v, 1);
    }

    /// `n` observations of `v` at once.
    pub fn observe_n(&self, v: f64, n: u64) {
        let i = self.bounds.partition_point(|b| *b < v);
        self.counts[i].fetch_add(n, Relaxed);
        self.sum_micro
            .fetch_add((v * 1e6).round() as u64 * n, Relaxed);
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
        family_header(out, name, "histogram", help, unit);
        self.render_series(out, name, "");
    }

    /// The sample lines of one series of a histogram family; `labels` is
    /// empty or `k="v",` pairs, each followed by a comma.
    fn render_series(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Relaxed);
            match self.bounds.get(i) {
                Some(b) => {
                    let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{b}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let labels = labels.trim_end_matches(',');
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
        let _ = writeln!(
            out,
            "{name}_sum{braces} {}",
            self.sum_micro.load(Relaxed) as f64 / 1e6
        );
    }
}

fn family_header(out: &mut String, name: &str, kind: &str, help: &str, unit: &str) {
    let _ = writeln!(out, "# TYPE {name} {kind}");
    if !unit.is_empty() {
        let _ = writeln!(out, "# UNIT {name} {unit}");
    }
    let _ = writeln!(out, "# HELP {name} {help}");
}

/// The front end a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontEnd {
    Resp,
    Http,
}

impl FrontEnd {
    const ALL: [FrontEnd; 2] = [FrontEnd::Resp, FrontEnd::Http];

    fn name(self) -> &'static str {
        match self {
            FrontEnd::Resp => "resp",
            FrontEnd::Http => "http",
        }
    }
}

const LEVELS: [Durability; 3] = [
    Durability::Memory,
    Durability::Local,
    Durability::Replicated,
];

/// Latency of answered increments (errors included), per front end and
/// durability level: from when the request was read to when its answer
/// was ready (for pipelined RESP increments at `local`, after the round's
/// covering sync).
pub struct RequestLatency {
    by: [[Histogram; 3]; 2],
}

impl Default for RequestLatency {
    fn default() -> Self {
        let row = || std::array::from_fn(|_| Histogram::new(LATENCY_BOUNDS_S));
        RequestLatency { by: [row(), row()] }
    }
}

impl RequestLatency {
    /// Records `n` increments through `front_end` at `level` that took
    /// `elapsed`.
    pub fn observe(&self, front_end: FrontEnd, level: Durability, elapsed: Duration, n: u64) {
        let f = FrontEnd::ALL
            .iter()
            .position(|x| *x == front_end)
            .unwrap_or(0);
        let l = LEVELS.iter().position(|x| *x == level).unwrap_or(0);
        self.by[f][l].observe_n(elapsed.as_secs_f64(), n);
    }

    fn render(&self, out: &mut String) {
        let name = "tally_increment_seconds";
        family_header(
            out,
            name,
            "histogram",
            "Latency of answered increments, by front end and durability level, from the parsed request to its answer.",
            "seconds",
        );
        for (f, front_end) in FrontEnd::ALL.iter().enumerate() {
            for (l, level) in LEVELS.iter().enumerate() {
                let labels = format!("protocol=\"{}\",durability=\"{level}\",", front_end.name());
                self.by[f][l].render_series(out, name, &labels);
            }
        }
    }
}

/// Figures the node keeps about itself.
pub struct Metrics {
    pub journal_bytes_written: AtomicU64,
    pub journal_records_written: AtomicU64,
    pub journal_syncs: AtomicU64,
    pub journal_syncs_by_idle_worker: AtomicU64,
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
    /// Counters this node deleted (set to zero for every node).
    pub counters_deleted: AtomicU64,
    /// Counters this node deleted because their expiry had come.
    pub counters_expired: AtomicU64,
    /// Latency of one committed store transaction (a flush, with or without
    /// replicated increments).
    pub store_round_seconds: Histogram,
    /// Shard rows written to the store by committed transactions.
    pub store_rows_flushed: AtomicU64,
    /// `replicated` increments carried by one store transaction.
    pub replicated_batch_requests: Histogram,
    /// Commits whose outcome the store left unknown (settled afterwards).
    pub store_indeterminate_commits: AtomicU64,
    /// Store calls that failed (the node retries with back-off).
    pub store_errors: AtomicU64,
    /// Times the store was found behind what this node had committed, and
    /// the node registered again and wrote its shard anew.
    pub store_regressions_repaired: AtomicU64,
    /// Failed authentication attempts (RESP `AUTH`/`HELLO`, HTTP tokens).
    pub auth_failures: AtomicU64,
    /// Increment latency per front end and level.
    pub increment_latency: RequestLatency,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            journal_bytes_written: AtomicU64::new(0),
            journal_records_written: AtomicU64::new(0),
            journal_syncs: AtomicU64::new(0),
            journal_syncs_by_idle_worker: AtomicU64::new(0),
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
            counters_deleted: AtomicU64::new(0),
            counters_expired: AtomicU64::new(0),
            store_round_seconds: Histogram::new(LATENCY_BOUNDS_S),
            store_rows_flushed: AtomicU64::new(0),
            replicated_batch_requests: Histogram::new(BATCH_BOUNDS),
            store_indeterminate_commits: AtomicU64::new(0),
            store_errors: AtomicU64::new(0),
            store_regressions_repaired: AtomicU64::new(0),
            auth_failures: AtomicU64::new(0),
            increment_latency: RequestLatency::default(),
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
            "Journal fdatasync calls.",
            self.journal_syncs.load(Relaxed),
        );
        counter(
            out,
            "tally_journal_syncs_by_idle_worker",
            "Journal fdatasync calls made by the last runtime worker to go idle rather than by the journal's writer thread.",
            self.journal_syncs_by_idle_worker.load(Relaxed),
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
        counter(
            out,
            "tally_counters_deleted",
            "Counters deleted (set to zero for every node) through this node.",
            self.counters_deleted.load(Relaxed),
        );
        counter(
            out,
            "tally_counters_expired",
            "Counters deleted through this node because their expiry had come (also counted as deleted).",
            self.counters_expired.load(Relaxed),
        );
        self.store_round_seconds.render(
            out,
            "tally_store_round_seconds",
            "Latency of one committed store transaction (flush and replicated increments).",
            "seconds",
        );
        counter(
            out,
            "tally_store_rows_flushed",
            "Shard rows written to the shared store.",
            self.store_rows_flushed.load(Relaxed),
        );
        self.replicated_batch_requests.render(
            out,
            "tally_replicated_batch_requests",
            "Replicated increments carried by one store transaction.",
            "",
        );
        counter(
            out,
            "tally_store_indeterminate_commits",
            "Store commits whose outcome was unknown and settled afterwards.",
            self.store_indeterminate_commits.load(Relaxed),
        );
        counter(
            out,
            "tally_store_errors",
            "Store calls that failed.",
            self.store_errors.load(Relaxed),
        );
        counter(
            out,
            "tally_store_regressions_repaired",
            "Times the store came back older than what this node had committed, and the node wrote its shard and live replicated keys again.",
            self.store_regressions_repaired.load(Relaxed),
        );
        counter(
            out,
            "tally_auth_failures",
            "Failed authentication attempts: RESP AUTH or HELLO with a wrong user or secret, HTTP requests with a bad bearer token.",
            self.auth_failures.load(Relaxed),
        );
        self.increment_latency.render(out);
    }
}

/// Renders everything `/metrics` shows about `node` in OpenMetrics text
/// format: the node's own figures, gauges of its state, and the value of
/// every counter as `tally_counter_value{name="..."}`, ending with `# EOF`.
///
/// Visits every counter, one table shard at a time: call it off any thread
/// that serves latency-sensitive work.
pub fn render_openmetrics(node: &crate::Node) -> String {
    let stats = node.stats();
    // Room for the node's figures plus a line per counter of a typical name.
    let mut out = String::with_capacity(8192 + stats.counters * 48);
    node.metrics().render(&mut out);
    let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
        let _ = writeln!(out, "# TYPE {name} gauge");
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "{name} {v}");
    };
    gauge(
        &mut out,
        "tally_counters",
        "Counters this node holds.",
        stats.counters as u64,
    );
    gauge(
        &mut out,
        "tally_idempotency_keys",
        "Idempotency keys this node remembers.",
        stats.idempotency_keys as u64,
    );
    gauge(
        &mut out,
        "tally_journal_queued_bytes",
        "Encoded records waiting for the journal writer.",
        stats.journal_queued_bytes as u64,
    );
    gauge(
        &mut out,
        "tally_journal_durable_position_bytes",
        "Journal position up to which every record is durable.",
        stats.journal_durable_pos,
    );
    gauge(
        &mut out,
        "tally_ready",
        "1 when the node can make writes durable, 0 when not (shutting down, journal failed).",
        u64::from(stats.readiness.ready),
    );
    let config = node.config();
    gauge(
        &mut out,
        "tally_idempotency_keys_max",
        "Most idempotency keys this node holds (--idempotency-keys-max); new keys are refused beyond it.",
        config.idempotency_keys_max as u64,
    );
    gauge(
        &mut out,
        "tally_counters_max",
        "Most counters this node holds; new counters are refused beyond it.",
        config.counters_max as u64,
    );
    if let Some(lag) = stats.flush_lag_lsns {
        gauge(
            &mut out,
            "tally_flush_lag_lsns",
            "Changes applied on this node but not yet known to be in the shared store.",
            lag,
        );
        gauge(
            &mut out,
            "tally_replicated_available",
            "1 when replicated increments can be made durable now (the store is reachable and this process is not fenced), 0 when not.",
            u64::from(node.replicated_unavailable().is_none()),
        );
    }
    if let Some(epoch) = node.epoch() {
        gauge(
            &mut out,
            "tally_epoch",
            "The epoch this process holds in the shared store (new at every start).",
            epoch,
        );
    }
    if let Some(peers) = node.peers() {
        out.push_str("# TYPE tally_peer_state gauge\n");
        out.push_str(
            "# HELP tally_peer_state Each other node's liveness as this node last read it from the store: 1 for its state, 0 for the others.\n",
        );
        for p in &peers {
            for state in crate::cluster::Liveness::ALL {
                out.push_str("tally_peer_state{node_id=\"");
                escape_label(&p.node_id, &mut out);
                let _ = writeln!(
                    out,
                    "\",state=\"{}\"}} {}",
                    state.as_str(),
                    u64::from(p.state == state)
                );
            }
        }
        out.push_str("# TYPE tally_peer_heartbeat_age_seconds gauge\n");
        out.push_str(
            "# UNIT tally_peer_heartbeat_age_seconds seconds\n# HELP tally_peer_heartbeat_age_seconds Age of each other node's last heartbeat.\n",
        );
        for p in &peers {
            out.push_str("tally_peer_heartbeat_age_seconds{node_id=\"");
            escape_label(&p.node_id, &mut out);
            let _ = writeln!(out, "\"}} {}", p.heartbeat_age_ms as f64 / 1000.0);
        }
    }
    out.push_str("# TYPE tally_node info\n# HELP tally_node The node's identity.\n");
    out.push_str("tally_node_info{node_id=\"");
    escape_label(&stats.node_id, &mut out);
    out.push_str("\"} 1\n");
    // A gauge, not a counter: increments may be negative.
    out.push_str("# TYPE tally_counter_value gauge\n");
    out.push_str("# HELP tally_counter_value Value of each counter on this node.\n");
    node.for_each_counter(|name, value| {
        out.push_str("tally_counter_value{name=\"");
        escape_label(name, &mut out);
        let _ = writeln!(out, "\"}} {value}");
    });
    out.push_str("# EOF\n");
    out
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

    // Every counter appears once with its label escaped, the node's gauges
    // are present, and the exposition ends with `# EOF`.
    #[tokio::test]
    async fn openmetrics_lists_every_counter_escaped() {
        let dir = tempfile::tempdir().unwrap();
        let node = crate::Node::open(crate::Config::new(dir.path())).unwrap();
        let opts = crate::IncrementOptions::default();
        node.increment("plain", 3, opts).await.unwrap();
        node.increment("q\"b\\n\n", -2, opts).await.unwrap();
        let text = render_openmetrics(&node);
        assert!(text.ends_with("\n# EOF\n"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1);
        assert!(
            text.contains("tally_counter_value{name=\"plain\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("tally_counter_value{name=\"q\\\"b\\\\n\\n\"} -2\n"),
            "{text}"
        );
        assert!(text.contains("tally_counters 2\n"), "{text}");
        assert!(text.contains("tally_ready 1\n"), "{text}");
        assert!(text.contains("tally_increments_total 2\n"), "{text}");
        node.shutdown().unwrap();
    }
}
