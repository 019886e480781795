//! Parsers for what the benchmark reads from other programs: the CSV that
//! `redis-benchmark --csv` prints, pgbench's summary and per-transaction
//! log, Redis `INFO` text, tally's JSON log lines and `/proc/<pid>/status`.
//!
//! Pure functions over text, so the unit tests below can feed them output
//! captured from the real programs.

use anyhow::{Context as _, Result, anyhow, bail};

/// One row of `redis-benchmark --csv` output.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchmarkRow {
    /// The test name, e.g. `INCR`.
    pub test: String,
    pub requests_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl BenchmarkRow {
    /// The run with the median requests/s, so that its latencies belong
    /// to the same run as its rate.
    pub fn median(runs: &[BenchmarkRow]) -> Option<&BenchmarkRow> {
        median_by_rate(runs, |r| r.requests_per_s)
    }
}

/// The run with the median `rate` (the upper one of an even count), so
/// that the figures printed beside the rate come from the same run.
pub fn median_by_rate<T>(runs: &[T], rate: impl Fn(&T) -> f64) -> Option<&T> {
    let mut runs: Vec<&T> = runs.iter().collect();
    runs.sort_by(|a, b| rate(a).total_cmp(&rate(b)));
    runs.get(runs.len() / 2).copied()
}

/// Splits one CSV line of double-quoted fields. redis-benchmark quotes every
/// field and never puts a quote or comma inside one, but a bare field is
/// accepted too.
fn csv_fields(line: &str) -> Vec<String> {
    line.trim()
        .split(',')
        .map(|f| f.trim().trim_matches('"').to_string())
        .collect()
}

/// Parses `redis-benchmark --csv` output. Columns are found by their header
/// names (redis-benchmark 7 prints `test`, `rps`, `p50_latency_ms`,
/// `p99_latency_ms` among others), not by position, so that a version that
/// adds a column still parses; a version without latency columns is refused
/// with a message saying so.
pub fn redis_benchmark_csv(text: &str) -> Result<Vec<BenchmarkRow>> {
    let mut lines = text.lines().map(str::trim).filter(|l| l.starts_with('"'));
    let header = lines
        .next()
        .ok_or_else(|| anyhow!("redis-benchmark printed no CSV header; output was: {text:?}"))?;
    let header = csv_fields(header);
    let column = |name: &str| {
        header.iter().position(|h| h == name).ok_or_else(|| {
            anyhow!(
                "redis-benchmark CSV has no '{name}' column (header: {}); \
                 redis-benchmark 7 or later is needed for latency percentiles",
                header.join(",")
            )
        })
    };
    let (test, rps, p50, p99) = (
        column("test")?,
        column("rps")?,
        column("p50_latency_ms")?,
        column("p99_latency_ms")?,
    );
    let mut rows = Vec::new();
    for line in lines {
        let fields = csv_fields(line);
        let number = |i: usize, what: &str| -> Result<f64> {
            let field = fields
                .get(i)
                .ok_or_else(|| anyhow!("CSV row has no {what} field: {line}"))?;
            field
                .parse::<f64>()
                .with_context(|| format!("{what} '{field}' is not a number in row: {line}"))
        };
        rows.push(BenchmarkRow {
            test: fields.get(test).cloned().unwrap_or_default(),
            requests_per_s: number(rps, "rps")?,
            p50_ms: number(p50, "p50")?,
            p99_ms: number(p99, "p99")?,
        });
    }
    if rows.is_empty() {
        bail!("redis-benchmark printed a CSV header but no result row; output was: {text:?}");
    }
    Ok(rows)
}

/// What pgbench's summary says about a run.
#[derive(Debug, Clone, PartialEq)]
pub struct PgbenchSummary {
    /// "number of transactions actually processed".
    pub processed: u64,
    /// "number of failed transactions" (0 when the version does not print
    /// it: before PostgreSQL 15 a failure ended the client instead).
    pub failed: u64,
    /// "tps = ... (without initial connection time)".
    pub tps: f64,
}

/// Parses pgbench's summary (its standard output after a run).
pub fn pgbench_summary(text: &str) -> Result<PgbenchSummary> {
    let after = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(str::trim)
    };
    let processed = after("number of transactions actually processed:")
        .ok_or_else(|| anyhow!("pgbench printed no transaction count; output was: {text:?}"))?;
    // "12504", or "12504/20000" when a count of transactions was asked for.
    let processed = processed
        .split('/')
        .next()
        .unwrap_or_default()
        .parse()
        .with_context(|| format!("pgbench transaction count '{processed}' is not a number"))?;
    let failed = match after("number of failed transactions:") {
        Some(f) => {
            let n = f.split_whitespace().next().unwrap_or_default();
            n.parse()
                .with_context(|| format!("pgbench failure count '{f}' is not a number"))?
        }
        None => 0,
    };
    let tps = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("tps = "))
        // Older versions print an "including connections establishing"
        // line too; the figure without connection time is the one wanted.
        .find(|l| l.contains("without initial connection time") || l.contains("excluding"))
        .ok_or_else(|| anyhow!("pgbench printed no tps line; output was: {text:?}"))?;
    let tps = tps.split_whitespace().next().unwrap_or_default();
    let tps = tps
        .parse()
        .with_context(|| format!("pgbench tps '{tps}' is not a number"))?;
    Ok(PgbenchSummary {
        processed,
        failed,
        tps,
    })
}

/// Transaction latencies, in microseconds, from a pgbench per-transaction
/// log (`-l`): lines `client_id transaction_no time script_no time_epoch
/// time_us ...`, where `time` is the latency. A failed transaction has
/// `failed` (or `skipped`) in that field and is left out.
pub fn pgbench_log_latencies_us(text: &str, out: &mut Vec<u64>) -> Result<()> {
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let field = line
            .split_whitespace()
            .nth(2)
            .ok_or_else(|| anyhow!("pgbench log line has no latency field: {line}"))?;
        if field == "failed" || field == "skipped" {
            continue;
        }
        out.push(
            field
                .parse()
                .with_context(|| format!("pgbench log latency '{field}' is not a number"))?,
        );
    }
    Ok(())
}

/// The `q`-quantile (0 to 1) of sorted `values`, nearest rank.
pub fn quantile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Value of `field` in Redis `INFO` text (`field:value` lines, CRLF or LF).
pub fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        let (name, value) = line.trim_end_matches('\r').split_once(':')?;
        (name == field).then_some(value)
    })
}

/// An `INFO` field that must be an unsigned integer.
pub fn info_u64(info: &str, field: &str) -> Result<u64> {
    let value = info_field(info, field).ok_or_else(|| anyhow!("INFO has no '{field}' field"))?;
    value
        .parse()
        .with_context(|| format!("INFO field {field} is '{value}', not an integer"))
}

/// Resident set size in bytes from the text of `/proc/<pid>/status`.
pub fn proc_status_rss_bytes(status: &str) -> Result<u64> {
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow!("/proc status has no VmRSS line"))?;
    let mut words = line["VmRSS:".len()..].split_whitespace();
    let (Some(n), Some("kB")) = (words.next(), words.next()) else {
        bail!("unexpected VmRSS line: {line}");
    };
    Ok(n.parse::<u64>()
        .with_context(|| format!("VmRSS line: {line}"))?
        * 1024)
}

/// What a node's "recovered" log line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    pub counters: u64,
    pub records_replayed: u64,
    pub recovery_ms: u64,
}

/// Finds the node's "recovered" event among `tally serve --log-format json`
/// lines (one JSON object per line, the event's fields under `fields`).
pub fn recovered_log_line(log: &str) -> Result<Recovered> {
    for line in log.lines().filter(|l| l.contains("\"recovered\"")) {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let fields = &value["fields"];
        if fields["message"] != "recovered" {
            continue;
        }
        let number = |name: &str| {
            fields[name]
                .as_u64()
                .ok_or_else(|| anyhow!("the 'recovered' log line has no number '{name}': {line}"))
        };
        return Ok(Recovered {
            counters: number("counters")?,
            records_replayed: number("records_replayed")?,
            recovery_ms: number("recovery_ms")?,
        });
    }
    bail!("the node's log has no 'recovered' line")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `redis-benchmark -t incr -c 50 -n 20000 --csv` from redis-benchmark
    /// 7.0.15, byte for byte.
    const REDIS_BENCHMARK_CSV: &str = include_str!("../tests/data/redis-benchmark-7.0-incr.csv");
    /// `INFO memory` from redis-server 7.0.15 as it arrives, with CRLF.
    const INFO_MEMORY: &str = include_str!("../tests/data/redis-7.0-info-memory.txt");
    /// `/proc/<pid>/status` of a Linux 6 process.
    const PROC_STATUS: &str = include_str!("../tests/data/proc-status.txt");
    /// stderr of `tally serve --log-format json` up to its ready line.
    const TALLY_LOG: &str = include_str!("../tests/data/tally-serve-log.jsonl");
    /// Standard output of `pgbench -n -M prepared -c 50 -j 2 -T 5 -f
    /// hot-row.sql` from pgbench 15.18 (the script's path shortened).
    const PGBENCH_OUTPUT: &str = include_str!("../tests/data/pgbench-15-hot-row.txt");
    /// Lines from the per-transaction logs (`-l`) of that run.
    const PGBENCH_LOG: &str = include_str!("../tests/data/pgbench-15-log.txt");

    // pgbench 15's summary gives the count, the failures and the rate.
    #[test]
    fn pgbench_summary_is_parsed() {
        assert_eq!(
            pgbench_summary(PGBENCH_OUTPUT).unwrap(),
            PgbenchSummary {
                processed: 12504,
                failed: 0,
                tps: 2505.686088,
            }
        );
        // Before version 15 there is no failure line and tps comes twice.
        let old = "number of transactions actually processed: 100/100\n\
                   tps = 90.5 (including connections establishing)\n\
                   tps = 95.25 (excluding connections establishing)\n";
        let s = pgbench_summary(old).unwrap();
        assert_eq!((s.processed, s.failed, s.tps), (100, 0, 95.25));
        assert!(pgbench_summary("pgbench: error: connection refused").is_err());
    }

    // Latencies are the third field of each log line; failed ones are
    // skipped, and quantiles are taken by nearest rank.
    #[test]
    fn pgbench_log_latencies_are_parsed() {
        let mut us = Vec::new();
        pgbench_log_latencies_us(PGBENCH_LOG, &mut us).unwrap();
        assert_eq!(us, vec![23901, 23269, 22793, 21609, 20939]);
        pgbench_log_latencies_us("3 7 failed 0 1795230080 420201\n", &mut us).unwrap();
        assert_eq!(us.len(), 5);
        assert!(pgbench_log_latencies_us("3 7\n", &mut us).is_err());
        us.sort_unstable();
        assert_eq!(quantile(&us, 0.5), Some(22793));
        assert_eq!(quantile(&us, 0.99), Some(23901));
        assert_eq!(quantile(&us, 0.0), Some(20939));
        assert_eq!(quantile(&[], 0.5), None);
    }

    // Real redis-benchmark 7 CSV gives requests/s and latency percentiles.
    #[test]
    fn redis_benchmark_csv_is_parsed() {
        let rows = redis_benchmark_csv(REDIS_BENCHMARK_CSV).unwrap();
        assert_eq!(
            rows,
            vec![BenchmarkRow {
                test: "INCR".into(),
                requests_per_s: 37807.18,
                p50_ms: 0.831,
                p99_ms: 2.303,
            }]
        );
    }

    // Progress lines (carriage-return updates) and warnings around the CSV
    // are ignored; columns are found by name, not position.
    #[test]
    fn redis_benchmark_csv_ignores_noise_and_column_order() {
        let text = "WARNING: Could not fetch server CONFIG\r\n\
                    INCR: rps=0.0 (overall: nan) avg_msec=nan (overall: nan)\r\n\
                    \"rps\",\"test\",\"p99_latency_ms\",\"p50_latency_ms\"\n\
                    \"1000.50\",\"INCR\",\"2.5\",\"0.5\"\n";
        let rows = redis_benchmark_csv(text).unwrap();
        assert_eq!(rows[0].requests_per_s, 1000.5);
        assert_eq!(rows[0].p50_ms, 0.5);
        assert_eq!(rows[0].p99_ms, 2.5);
    }

    // Output without percentiles (redis-benchmark 6) or without a result
    // row is an error that says what is missing, never a zero.
    #[test]
    fn redis_benchmark_csv_without_percentiles_or_rows_is_an_error() {
        let old = "\"INCR\",\"37807.18\"\n";
        assert!(redis_benchmark_csv(old).is_err());
        let header_only = REDIS_BENCHMARK_CSV.lines().next().unwrap();
        let e = redis_benchmark_csv(header_only).unwrap_err().to_string();
        assert!(e.contains("no result row"), "{e}");
        let e = redis_benchmark_csv("").unwrap_err().to_string();
        assert!(e.contains("no CSV header"), "{e}");
    }

    // INFO fields are read from real CRLF-terminated INFO text.
    #[test]
    fn info_fields_are_parsed() {
        assert_eq!(info_u64(INFO_MEMORY, "used_memory").unwrap(), 964_432);
        assert_eq!(
            info_u64(INFO_MEMORY, "used_memory_rss").unwrap(),
            13_189_120
        );
        assert_eq!(
            info_field(INFO_MEMORY, "used_memory_human"),
            Some("941.83K")
        );
        assert_eq!(
            info_field(INFO_MEMORY, "mem_allocator"),
            Some("jemalloc-5.3.0")
        );
        assert!(info_u64(INFO_MEMORY, "no_such_field").is_err());
        assert!(info_u64(INFO_MEMORY, "used_memory_human").is_err());
    }

    // VmRSS is reported in kB and converted to bytes.
    #[test]
    fn proc_status_rss_is_parsed() {
        let rss = proc_status_rss_bytes(PROC_STATUS).unwrap();
        assert_eq!(rss, 1732 * 1024);
        assert!(proc_status_rss_bytes("Name:\tx\n").is_err());
    }

    // The "recovered" event is found among the node's other log lines.
    #[test]
    fn recovered_log_line_is_parsed() {
        let r = recovered_log_line(TALLY_LOG).unwrap();
        assert_eq!(
            r,
            Recovered {
                counters: 3,
                records_replayed: 7,
                recovery_ms: 0,
            }
        );
        assert!(recovered_log_line("{\"fields\":{\"message\":\"ready\"}}\n").is_err());
    }
}
