//! `wrk`, the HTTP load generator, driving tally's increment route:
//! `POST /v1/counters/{name}/increment` with an empty body (by 1) from a
//! fixed number of connections for a fixed time.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use tally_lab::process::run_with_timeout;

/// Threads of the load generator: one per core of the benchmark machine
/// would be ideal; two keeps it from taking more than the server.
const WRK_THREADS: u32 = 2;
/// Slack on top of the run's duration before it counts as hung.
const WRK_TIMEOUT_SLACK: Duration = Duration::from_secs(60);

/// One wrk run's figures.
#[derive(Debug, Clone)]
pub struct WrkRow {
    pub requests_per_s: f64,
    /// Responses received (all 2xx: a run with any other is an error).
    pub requests: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Median by requests/s, so that latencies belong to the same run.
pub fn median(runs: &[WrkRow]) -> Option<&WrkRow> {
    crate::parse::median_by_rate(runs, |r| r.requests_per_s)
}

/// Runs wrk against `addr` for `seconds` with `connections`, every request
/// incrementing `counter`; `script` is a file this writes the request into.
pub fn increment(
    addr: SocketAddr,
    counter: &str,
    connections: u32,
    seconds: u64,
    script: &Path,
) -> Result<WrkRow> {
    std::fs::write(
        script,
        "wrk.method = \"POST\"\nwrk.body = \"\"\nwrk.headers[\"Content-Length\"] = \"0\"\n",
    )
    .with_context(|| format!("writing {}", script.display()))?;
    let url = format!("http://{addr}/v1/counters/{counter}/increment");
    let mut command = Command::new("wrk");
    command
        .args(["-t", &WRK_THREADS.min(connections).to_string()])
        .args(["-c", &connections.to_string()])
        .args(["-d", &format!("{seconds}s")])
        .arg("--latency")
        .arg("-s")
        .arg(script)
        .arg(&url);
    let output = run_with_timeout(
        &mut command,
        "wrk",
        Duration::from_secs(seconds) + WRK_TIMEOUT_SLACK,
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    parse(&stdout)
}

/// Parses wrk's report (with `--latency`).
pub fn parse(out: &str) -> Result<WrkRow> {
    if let Some(line) = out.lines().find(|l| l.contains("Non-2xx or 3xx responses")) {
        bail!("wrk saw error responses: {}", line.trim());
    }
    if let Some(line) = out
        .lines()
        .find(|l| l.trim_start().starts_with("Socket errors"))
    {
        bail!("wrk saw socket errors: {}", line.trim());
    }
    let requests_per_s = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .context("wrk printed no Requests/sec")?
        .trim()
        .parse::<f64>()
        .context("Requests/sec is not a number")?;
    // "  123456 requests in 5.00s, 12.34MB read"
    let requests = out
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .context("wrk printed no request count")?
        .parse::<u64>()
        .context("the request count is not a number")?;
    let percentile = |p: &str| -> Result<f64> {
        let line = out
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with(p) && l[p.len()..].starts_with(char::is_whitespace))
            .with_context(|| format!("wrk printed no {p} latency"))?;
        duration_ms(line[p.len()..].trim())
    };
    Ok(WrkRow {
        requests_per_s,
        requests,
        p50_ms: percentile("50%")?,
        p99_ms: percentile("99%")?,
    })
}

/// wrk's durations: `635.00us`, `2.57ms`, `1.20s`, `3.00m`.
fn duration_ms(v: &str) -> Result<f64> {
    let split = v
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("no unit in {v:?}"))?;
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse().with_context(|| format!("bad number in {v:?}"))?;
    Ok(match unit {
        "us" => n / 1e3,
        "ms" => n,
        "s" => n * 1e3,
        "m" => n * 60e3,
        _ => bail!("unknown unit in {v:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // A report as wrk 4.1 prints it with --latency.
    const REPORT: &str = "Running 5s test @ http://127.0.0.1:1234/v1/counters/x/increment
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.05ms  512.00us   9.87ms   80.00%
    Req/Sec    24.01k     1.02k   26.00k    70.00%
  Latency Distribution
     50%  635.00us
     75%    1.20ms
     90%    1.80ms
     99%    2.57ms
  238904 requests in 5.00s, 20.05MB read
Requests/sec:  47780.80
Transfer/sec:      4.01MB
";

    #[test]
    fn parses_a_report() {
        let r = parse(REPORT).unwrap();
        assert_eq!(r.requests, 238_904);
        assert!((r.requests_per_s - 47_780.80).abs() < 1e-6);
        assert!((r.p50_ms - 0.635).abs() < 1e-9);
        assert!((r.p99_ms - 2.57).abs() < 1e-9);
    }

    #[test]
    fn error_responses_fail_the_run() {
        let bad = REPORT.replace(
            "Requests/sec",
            "  Non-2xx or 3xx responses: 12\nRequests/sec",
        );
        assert!(parse(&bad).is_err());
        let bad = REPORT.replace(
            "Requests/sec",
            "  Socket errors: connect 0, read 3, write 0, timeout 0\nRequests/sec",
        );
        assert!(parse(&bad).is_err());
    }
}
