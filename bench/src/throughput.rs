//! Part 1, throughput: `redis-benchmark -t incr` against tally at `local`
//! and `memory` and against Redis with `appendfsync always` and
//! `everysec`, each a private server started here on a free loopback port.
//!
//! redis-benchmark's INCR test without `-r` hits one key,
//! `counter:__rand_int__`: the hot-counter case. After each server's runs
//! the counter is read back and must equal the number of requests sent, so
//! a server that dropped or refused increments cannot post a good figure.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use crate::parse::{self, BenchmarkRow};
use crate::process::{self, Guard, run_with_timeout};
use crate::resp::Client;
use crate::table::{Table, ratio, thousands};

/// Longest one redis-benchmark run may take; at Redis `always` speed on a
/// slow disk 200,000 requests take well under a minute.
const BENCHMARK_TIMEOUT: Duration = Duration::from_secs(600);
/// How long tally may take to become ready on an empty data directory.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The key redis-benchmark's INCR test increments when `-r` is not given.
const BENCHMARK_KEY: &str = "counter:__rand_int__";
/// "Far beyond Redis with appendfsync always" is read as at least this
/// many times its throughput.
const FAR_BEYOND_RATIO: f64 = 3.0;

pub struct Settings {
    /// Requests per redis-benchmark run (`-n`).
    pub requests: u64,
    /// Parallel connections (`-c`).
    pub clients: u32,
    /// Pipeline depths to run (`-P`), 1 meaning no pipelining.
    pub pipelines: Vec<u32>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Server {
    TallyLocal,
    TallyMemory,
    RedisAlways,
    RedisEverysec,
}

impl Server {
    const ALL: [Server; 4] = [
        Server::TallyLocal,
        Server::TallyMemory,
        Server::RedisAlways,
        Server::RedisEverysec,
    ];

    fn label(self) -> &'static str {
        match self {
            Server::TallyLocal => "tally (local: fsync before ack)",
            Server::TallyMemory => "tally (memory: ack, then fsync within 100 ms)",
            Server::RedisAlways => "redis (appendfsync always)",
            Server::RedisEverysec => "redis (appendfsync everysec)",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Server::TallyLocal => "tally-local",
            Server::TallyMemory => "tally-memory",
            Server::RedisAlways => "redis-always",
            Server::RedisEverysec => "redis-everysec",
        }
    }
}

struct Measured {
    server: Server,
    pipeline: u32,
    result: Result<BenchmarkRow>,
}

/// Runs every server at every pipeline depth and returns the table and the
/// verdicts, or an error if any run failed (the table still shows the rest).
pub fn run(tally_bin: &Path, work: &Path, s: &Settings) -> (String, bool) {
    let mut measured = Vec::new();
    for server in Server::ALL {
        eprintln!("throughput: {} ...", server.label());
        match run_server(tally_bin, work, server, s) {
            Ok(rows) => measured.extend(rows),
            Err(e) => {
                for &pipeline in &s.pipelines {
                    measured.push(Measured {
                        server,
                        pipeline,
                        result: Err(anyhow::anyhow!("{e:#}")),
                    });
                }
            }
        }
    }
    report(&measured, s)
}

fn run_server(
    tally_bin: &Path,
    work: &Path,
    server: Server,
    s: &Settings,
) -> Result<Vec<Measured>> {
    let dir = work.join(format!("throughput-{}", server.slug()));
    let (guard, addr): (Guard, _) = match server {
        Server::TallyLocal | Server::TallyMemory => {
            let durability = if server == Server::TallyLocal {
                "local"
            } else {
                "memory"
            };
            let t = process::start_tally(tally_bin, &dir, true, durability, &[], READY_TIMEOUT)?;
            let addr = t.resp_addr.context("tally started without RESP")?;
            (t.guard, addr)
        }
        Server::RedisAlways | Server::RedisEverysec => {
            let fsync = if server == Server::RedisAlways {
                "always"
            } else {
                "everysec"
            };
            let r = process::start_redis(
                &dir,
                server.slug(),
                &["--appendonly", "yes", "--appendfsync", fsync],
            )?;
            (r.guard, r.addr)
        }
    };
    let mut rows = Vec::new();
    for &pipeline in &s.pipelines {
        let result = redis_benchmark(addr, s, pipeline);
        let failed = result.is_err();
        rows.push(Measured {
            server,
            pipeline,
            result,
        });
        if failed {
            break;
        }
    }
    if rows.iter().all(|m| m.result.is_ok()) {
        // Every INCR must have been applied exactly once.
        let expected = s.requests * rows.len() as u64;
        let value = Client::connect(addr)?
            .command(&["GET", BENCHMARK_KEY])?
            .text()?;
        if value != expected.to_string() {
            bail!(
                "{BENCHMARK_KEY} is {value} after the runs, expected {expected}: \
                 increments were lost or refused"
            );
        }
    }
    let name = guard.name().to_string();
    let status = guard.stop()?;
    if !status.success() {
        bail!("{name} exited with {status} at shutdown");
    }
    Ok(rows)
}

fn redis_benchmark(
    addr: std::net::SocketAddr,
    s: &Settings,
    pipeline: u32,
) -> Result<BenchmarkRow> {
    let output = run_with_timeout(
        Command::new("redis-benchmark")
            .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
            .args(["-t", "incr", "--csv"])
            .args(["-c", &s.clients.to_string()])
            .args(["-n", &s.requests.to_string()])
            .args(["-P", &pipeline.to_string()]),
        "redis-benchmark",
        BENCHMARK_TIMEOUT,
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "redis-benchmark failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let rows = parse::redis_benchmark_csv(&stdout)?;
    rows.into_iter()
        .find(|r| r.test == "INCR")
        .context("redis-benchmark printed no INCR row")
}

fn rps(measured: &[Measured], server: Server, pipeline: u32) -> Option<f64> {
    measured
        .iter()
        .find(|m| m.server == server && m.pipeline == pipeline)
        .and_then(|m| m.result.as_ref().ok())
        .map(|r| r.requests_per_s)
}

fn report(measured: &[Measured], s: &Settings) -> (String, bool) {
    let mut out = format!(
        "### Throughput: redis-benchmark -t incr -c {} -n {}, one hot counter\n\n",
        s.clients,
        thousands(s.requests)
    );
    let mut table = Table::new(&[
        "server",
        "pipeline",
        "requests/s",
        "p50 ms",
        "p99 ms",
        "vs redis everysec",
        "vs redis always",
    ]);
    let mut errors = Vec::new();
    for m in measured {
        match &m.result {
            Ok(r) => table.row(vec![
                m.server.label().into(),
                m.pipeline.to_string(),
                thousands(r.requests_per_s.round() as u64),
                format!("{:.3}", r.p50_ms),
                format!("{:.3}", r.p99_ms),
                rps(measured, Server::RedisEverysec, m.pipeline)
                    .map_or("n/a".into(), |b| ratio(r.requests_per_s, b)),
                rps(measured, Server::RedisAlways, m.pipeline)
                    .map_or("n/a".into(), |b| ratio(r.requests_per_s, b)),
            ]),
            Err(e) => {
                table.row(vec![
                    m.server.label().into(),
                    m.pipeline.to_string(),
                    "failed".into(),
                    "".into(),
                    "".into(),
                    "".into(),
                    "".into(),
                ]);
                errors.push(format!("{} (-P {}): {e:#}", m.server.label(), m.pipeline));
            }
        }
    }
    out.push_str(&table.render());
    out.push('\n');
    for &p in &s.pipelines {
        let tally = rps(measured, Server::TallyLocal, p);
        let everysec = rps(measured, Server::RedisEverysec, p);
        let always = rps(measured, Server::RedisAlways, p);
        if let (Some(t), Some(e)) = (tally, everysec) {
            out.push_str(&format!(
                "- target, -P {p}: tally local >= redis everysec: {} ({})\n",
                verdict(t >= e),
                ratio(t, e)
            ));
        }
        if let (Some(t), Some(a)) = (tally, always) {
            out.push_str(&format!(
                "- target, -P {p}: tally local >= {FAR_BEYOND_RATIO}x redis always: {} ({})\n",
                verdict(t >= FAR_BEYOND_RATIO * a),
                ratio(t, a)
            ));
        }
    }
    for e in &errors {
        out.push_str(&format!("- error: {e}\n"));
    }
    (out, errors.is_empty())
}

pub fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}
