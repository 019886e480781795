//! Part 1, throughput: `redis-benchmark -t incr` against tally at `local`
//! and `memory` and against Redis with `appendfsync always` and
//! `everysec`, each a private server started here on a free loopback port.
//!
//! redis-benchmark's INCR test without `-r` hits one key,
//! `counter:__rand_int__`: the hot-counter case. After each server's runs
//! the counter is read back and must equal the number of requests sent, so
//! a server that dropped or refused increments cannot post a good figure.
//!
//! tally's levels are also driven over HTTP, `POST
//! /v1/counters/{name}/increment` from as many connections with `wrk`, and
//! printed beside their RESP figure (Redis has no HTTP front end).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use tally_lab::process::{ChildGuard, READY_TIMEOUT, run_with_timeout};
use tally_lab::wire::resp::Client;

use crate::cost::{self, Cost};
use crate::parse::{self, BenchmarkRow};
use crate::process;
use crate::table::{Table, ratio, thousands};
use crate::wrk::{self, WrkRow};

/// Longest one redis-benchmark run may take; at Redis `always` speed on a
/// slow disk 200,000 requests take well under a minute.
const BENCHMARK_TIMEOUT: Duration = Duration::from_secs(600);
/// The key redis-benchmark's INCR test increments when `-r` is not given.
pub const BENCHMARK_KEY: &str = "counter:__rand_int__";
/// The counter the HTTP runs increment.
const HTTP_KEY: &str = "http-hot";
/// "Far beyond Redis with appendfsync always" is read as at least this
/// many times its throughput.
const FAR_BEYOND_RATIO: f64 = 3.0;
/// Durable increments' target against Redis `always`, the same durability.
const ALWAYS_RATIO: f64 = 1.5;
/// Durable increments' target against tally's own `memory` level: waiting
/// for the fsync may cost at most the rest.
const MEMORY_RATIO: f64 = 0.9;
/// Appends timed to measure what one fdatasync costs in the work directory.
const FSYNC_SAMPLES: usize = 200;
/// Bytes per timed append: about one group-committed batch of INCRs.
const FSYNC_APPEND_BYTES: usize = 4096;

pub struct Settings {
    /// Requests per redis-benchmark run (`-n`).
    pub requests: u64,
    /// Parallel connections (`-c`).
    pub clients: u32,
    /// Pipeline depths to run (`-P`), 1 meaning no pipelining.
    pub pipelines: Vec<u32>,
    /// Times every server is run at every depth; the median is reported.
    pub rounds: u32,
    /// Duration of each HTTP (wrk) run.
    pub http_seconds: u64,
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

/// Every run of one server at one pipeline depth.
struct Measured {
    server: Server,
    pipeline: u32,
    runs: Vec<BenchmarkRow>,
    error: Option<String>,
    /// What the server spent on those runs.
    cost: Cost,
}

impl Measured {
    /// The run with the median requests/s, so that its latencies belong
    /// to the same run as its rate.
    fn median(&self) -> Option<&BenchmarkRow> {
        BenchmarkRow::median(&self.runs)
    }
}

/// Every HTTP run of one tally level.
struct HttpMeasured {
    server: Server,
    runs: Vec<WrkRow>,
    error: Option<String>,
}

/// A server under test, running for the whole part.
struct Running {
    server: Server,
    guard: ChildGuard,
    addr: SocketAddr,
    /// tally's HTTP front end.
    http: Option<SocketAddr>,
    /// redis-benchmark runs that completed, each adding `requests`.
    runs_done: u64,
    /// wrk runs that completed and the responses they counted. A run cut
    /// at its end may leave up to one request per connection applied but
    /// unanswered, so the counter may exceed the responses by that much.
    http_runs: u64,
    http_responses: u64,
}

/// Runs every server at every pipeline depth, `rounds` times, and returns
/// the table with the verdicts and whether every run succeeded.
///
/// All servers run side by side for the whole part and each round visits
/// them in turn (starting one further along each round), so that a change
/// in background load over the part touches every server alike instead of
/// whichever happened to run at that moment.
pub fn run(tally_bin: &Path, work: &Path, s: &Settings) -> (String, bool) {
    let mut measured: Vec<Measured> = Server::ALL
        .iter()
        .flat_map(|&server| {
            s.pipelines.iter().map(move |&pipeline| Measured {
                server,
                pipeline,
                runs: Vec::new(),
                error: None,
                cost: Cost::default(),
            })
        })
        .collect();
    // Both durable servers wait for fdatasync, so its cost bounds them and
    // explains the ratios: on a disk that syncs in microseconds, always and
    // everysec differ little, and nothing can be far beyond always.
    let fsync = fsync_latency(work).map_err(|e| format!("{e:#}"));
    let fsync_zeros = fsync_latency_over_zeros(work).map_err(|e| format!("{e:#}"));
    let mut running = Vec::new();
    for server in Server::ALL {
        match start(tally_bin, work, server) {
            Ok(r) => running.push(r),
            Err(e) => fail(&mut measured, server, format!("{e:#}")),
        }
    }
    let mut http: Vec<HttpMeasured> = [Server::TallyLocal, Server::TallyMemory]
        .into_iter()
        .map(|server| HttpMeasured {
            server,
            runs: Vec::new(),
            error: None,
        })
        .collect();
    for h in &mut http {
        if !running.iter().any(|r| r.server == h.server) {
            h.error = Some("the server did not start".into());
        }
    }
    let script = work.join("wrk-increment.lua");
    let servers = running.len();
    for round in 0..s.rounds as usize {
        for i in 0..servers {
            let r = &mut running[(i + round) % servers];
            for m in measured.iter_mut().filter(|m| m.server == r.server) {
                if m.error.is_some() {
                    continue;
                }
                eprintln!(
                    "throughput: round {}/{}, {} -P {} ...",
                    round + 1,
                    s.rounds,
                    r.server.label(),
                    m.pipeline
                );
                let tally = matches!(r.server, Server::TallyLocal | Server::TallyMemory);
                let probe = || cost::sample(r.guard.pid(), tally.then_some(r.addr));
                let before = probe();
                match redis_benchmark(r.addr, s.clients, s.requests, m.pipeline, None) {
                    Ok(row) => {
                        m.runs.push(row);
                        r.runs_done += 1;
                        match (before, probe()) {
                            (Ok(b), Ok(a)) => m.cost.add(&b, &a, s.requests),
                            (Err(e), _) | (_, Err(e)) => {
                                eprintln!("throughput: could not measure the server's costs: {e:#}")
                            }
                        }
                    }
                    Err(e) => m.error = Some(format!("{e:#}")),
                }
            }
            let Some(addr) = r.http else { continue };
            for h in http
                .iter_mut()
                .filter(|h| h.server == r.server && h.error.is_none())
            {
                eprintln!(
                    "throughput: round {}/{}, {} over HTTP ...",
                    round + 1,
                    s.rounds,
                    r.server.label()
                );
                match wrk::increment(addr, HTTP_KEY, s.clients, s.http_seconds, &script) {
                    Ok(row) => {
                        r.http_runs += 1;
                        r.http_responses += row.requests;
                        h.runs.push(row);
                    }
                    Err(e) => h.error = Some(format!("{e:#}")),
                }
            }
        }
    }
    for r in running {
        let server = r.server;
        if let Err(e) = verify_and_stop(r, s) {
            fail(&mut measured, server, format!("{e:#}"));
            for h in http.iter_mut().filter(|h| h.server == server) {
                h.error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    let (mut out, ok) = report(&measured, s, fsync, fsync_zeros);
    let (http_out, http_ok) = report_http(&measured, &http, s);
    out.push('\n');
    out.push_str(&http_out);
    (out, ok && http_ok)
}

/// p50 and p99 of appending [`FSYNC_APPEND_BYTES`] to a file in `dir` and
/// calling fdatasync, over [`FSYNC_SAMPLES`] appends.
pub fn fsync_latency(dir: &Path) -> Result<(Duration, Duration)> {
    fsync_probe(dir, false)
}

/// [`fsync_latency`] of writes over zeros written and synced beforehand,
/// as tally's journal writes (its segments are filled with zeros ahead):
/// the fdatasync then has no size change to commit.
pub fn fsync_latency_over_zeros(dir: &Path) -> Result<(Duration, Duration)> {
    fsync_probe(dir, true)
}

fn fsync_probe(dir: &Path, over_zeros: bool) -> Result<(Duration, Duration)> {
    use std::io::Write as _;
    use std::os::unix::fs::FileExt as _;
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path)?;
    if over_zeros {
        file.write_all(&vec![0; FSYNC_APPEND_BYTES * FSYNC_SAMPLES])?;
        file.sync_all()?;
    }
    let block = vec![0x5a; FSYNC_APPEND_BYTES];
    let mut samples = Vec::with_capacity(FSYNC_SAMPLES);
    for i in 0..FSYNC_SAMPLES {
        let started = std::time::Instant::now();
        file.write_all_at(&block, (i * FSYNC_APPEND_BYTES) as u64)?;
        file.sync_data()?;
        samples.push(started.elapsed());
    }
    drop(file);
    std::fs::remove_file(&path)?;
    samples.sort_unstable();
    Ok((
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
    ))
}

/// Marks every depth of `server` as failed with `e`, keeping an earlier error.
fn fail(measured: &mut [Measured], server: Server, e: String) {
    for m in measured.iter_mut().filter(|m| m.server == server) {
        m.error.get_or_insert_with(|| e.clone());
    }
}

fn start(tally_bin: &Path, work: &Path, server: Server) -> Result<Running> {
    let dir = work.join(format!("throughput-{}", server.slug()));
    let (guard, addr, http) = match server {
        Server::TallyLocal | Server::TallyMemory => {
            let durability = if server == Server::TallyLocal {
                "local"
            } else {
                "memory"
            };
            // Given explicitly so the label "fsync within 100 ms" stays true.
            let args = [
                "--memory-sync-delay-ms",
                "100",
                "--http-addr",
                "127.0.0.1:0",
            ];
            let t = process::start_tally(tally_bin, &dir, true, durability, &args, READY_TIMEOUT)?;
            let addr = t.resp_addr.context("tally started without RESP")?;
            let http = t.http_addr.context("tally started without HTTP")?;
            (t.guard, addr, Some(http))
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
            (r.guard, r.addr, None)
        }
    };
    Ok(Running {
        server,
        guard,
        addr,
        http,
        runs_done: 0,
        http_runs: 0,
        http_responses: 0,
    })
}

/// Checks that every INCR sent was applied exactly once, then stops the
/// server gracefully.
fn verify_and_stop(r: Running, s: &Settings) -> Result<()> {
    let expected = s.requests * r.runs_done;
    let value = Client::connect(r.addr)?
        .command(&["GET", BENCHMARK_KEY])?
        .text()
        .unwrap_or_else(|_| "nil".into());
    if r.runs_done > 0 && value != expected.to_string() {
        bail!(
            "{BENCHMARK_KEY} is {value} after {} runs, expected {expected}: \
             increments were lost or refused",
            r.runs_done
        );
    }
    if r.http_runs > 0 {
        let value: u64 = Client::connect(r.addr)?
            .command(&["GET", HTTP_KEY])?
            .text()
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let most = r.http_responses + u64::from(s.clients) * r.http_runs;
        if value < r.http_responses || value > most {
            bail!(
                "{HTTP_KEY} is {value} after {} HTTP runs that got {} responses: expected \
                 between that and {most} (requests cut at the end of a run may be applied \
                 unanswered)",
                r.http_runs,
                r.http_responses
            );
        }
    }
    let name = r.guard.name().to_string();
    let status = process::stop(r.guard)?;
    if !status.success() {
        bail!("{name} exited with {status} at shutdown");
    }
    Ok(())
}

/// One `redis-benchmark -t incr` run: `requests` INCRs from `clients`
/// connections, `pipeline` deep, on the one key `counter:__rand_int__` or,
/// with `key_space`, spread at random over `counter:000000000000` up to
/// that many keys (`-r`).
pub fn redis_benchmark(
    addr: SocketAddr,
    clients: u32,
    requests: u64,
    pipeline: u32,
    key_space: Option<u32>,
) -> Result<BenchmarkRow> {
    redis_benchmark_tls(addr, clients, requests, pipeline, key_space, None)
}

/// [`redis_benchmark`] over TLS, trusting the CA file `tls_ca`, when given.
pub fn redis_benchmark_tls(
    addr: SocketAddr,
    clients: u32,
    requests: u64,
    pipeline: u32,
    key_space: Option<u32>,
    tls_ca: Option<&Path>,
) -> Result<BenchmarkRow> {
    let mut command = Command::new("redis-benchmark");
    command.args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()]);
    if let Some(ca) = tls_ca {
        command.arg("--tls").arg("--cacert").arg(ca);
    }
    command
        .args(["-t", "incr", "--csv"])
        .args(["-c", &clients.to_string()])
        .args(["-n", &requests.to_string()])
        .args(["-P", &pipeline.to_string()]);
    if let Some(keys) = key_space {
        command.args(["-r", &keys.to_string()]);
    }
    let output = run_with_timeout(&mut command, "redis-benchmark", BENCHMARK_TIMEOUT)?;
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

/// Median requests/s of a server at a depth, if all its runs succeeded.
fn rps(measured: &[Measured], server: Server, pipeline: u32) -> Option<f64> {
    measured
        .iter()
        .find(|m| m.server == server && m.pipeline == pipeline)
        .filter(|m| m.error.is_none())
        .and_then(Measured::median)
        .map(|r| r.requests_per_s)
}

fn report(
    measured: &[Measured],
    s: &Settings,
    fsync: std::result::Result<(Duration, Duration), String>,
    fsync_zeros: std::result::Result<(Duration, Duration), String>,
) -> (String, bool) {
    let mut out = format!(
        "### Throughput: redis-benchmark -t incr -c {} -n {}, one hot counter \
         (median of {} rounds, servers interleaved)\n\n",
        s.clients,
        thousands(s.requests),
        s.rounds
    );
    let mut table = Table::new(&[
        "server",
        "pipeline",
        "requests/s",
        "p50 ms",
        "p99 ms",
        "vs redis everysec",
        "vs redis always",
        "server CPU µs/req",
        "switches/req",
        "req/fsync",
    ]);
    let mut errors = Vec::new();
    for m in measured {
        match (&m.error, m.median()) {
            (None, Some(r)) => table.row(vec![
                m.server.label().into(),
                m.pipeline.to_string(),
                thousands(r.requests_per_s.round() as u64),
                format!("{:.3}", r.p50_ms),
                format!("{:.3}", r.p99_ms),
                rps(measured, Server::RedisEverysec, m.pipeline)
                    .map_or("n/a".into(), |b| ratio(r.requests_per_s, b)),
                rps(measured, Server::RedisAlways, m.pipeline)
                    .map_or("n/a".into(), |b| ratio(r.requests_per_s, b)),
                m.cost
                    .cpu_us_per_request()
                    .map_or("n/a".into(), |v| format!("{v:.2}")),
                m.cost
                    .switches_per_request()
                    .map_or("n/a".into(), |v| format!("{v:.3}")),
                m.cost
                    .requests_per_sync()
                    .map_or("".into(), |v| format!("{v:.1}")),
            ]),
            (error, _) => {
                table.row(vec![
                    m.server.label().into(),
                    m.pipeline.to_string(),
                    "failed".into(),
                    "".into(),
                    "".into(),
                    "".into(),
                    "".into(),
                    "".into(),
                    "".into(),
                    "".into(),
                ]);
                let e = error.as_deref().unwrap_or("no run completed");
                errors.push(format!("{} (-P {}): {e}", m.server.label(), m.pipeline));
            }
        }
    }
    out.push_str(&table.render());
    out.push('\n');
    for (what, probe) in [
        ("append", &fsync),
        (
            "write over zeros already synced (as tally's journal)",
            &fsync_zeros,
        ),
    ] {
        match probe {
            Ok((p50, p99)) => out.push_str(&format!(
                "- fdatasync of a {} KiB {what} in the servers' directory: p50 {:.3} ms, p99 {:.3} ms\n",
                FSYNC_APPEND_BYTES / 1024,
                p50.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3
            )),
            Err(e) => out.push_str(&format!("- fdatasync ({what}) could not be timed: {e}\n")),
        }
    }
    let fsync_p50 = fsync_zeros.as_ref().ok().map(|(p50, _)| p50.as_secs_f64());
    for &p in &s.pipelines {
        let tally = rps(measured, Server::TallyLocal, p);
        let memory = rps(measured, Server::TallyMemory, p);
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
                "- target, -P {p}: tally local >= {ALWAYS_RATIO}x redis always: {} ({})\n",
                verdict(t >= ALWAYS_RATIO * a),
                ratio(t, a)
            ));
            out.push_str(&format!(
                "- target, -P {p}: tally local >= {FAR_BEYOND_RATIO}x redis always: {} ({})\n",
                verdict(t >= FAR_BEYOND_RATIO * a),
                ratio(t, a)
            ));
        }
        if let (Some(t), Some(m)) = (tally, memory) {
            out.push_str(&format!(
                "- target, -P {p}: tally local >= {MEMORY_RATIO}x tally memory: {} ({})\n",
                verdict(t >= MEMORY_RATIO * m),
                ratio(t, m)
            ));
            // Where the rest goes. The benchmark is a closed loop: each of
            // its clients * depth requests in flight waits for its reply
            // before the next is sent, so a wait added to every request
            // lowers the rate even with CPU to spare. A `local` request
            // waits for at least one fdatasync that starts after it
            // arrives, on average more (the sync running when it arrives
            // first); `memory` does not wait.
            let cost = |server| {
                measured
                    .iter()
                    .find(|x| x.server == server && x.pipeline == p)
                    .map(|x| x.cost)
            };
            if let (Some(fsync), Some(lc), Some(mc)) = (
                fsync_p50,
                cost(Server::TallyLocal),
                cost(Server::TallyMemory),
            ) {
                let in_flight = (s.clients * p) as f64;
                let bound = in_flight / (in_flight / m + fsync);
                let cpu = |c: Cost| c.cpu_us_per_request().unwrap_or(f64::NAN);
                out.push_str(&format!(
                    "- where the time goes, -P {p}: {} requests in flight; at memory each \
                     round trip takes {:.3} ms; one fdatasync more per request (p50 {:.3} ms) \
                     bounds local at {}/s ({} memory), measured {}/s with {} requests per \
                     fdatasync; the server spends {:.2} µs of CPU per local request against \
                     {:.2} at memory\n",
                    in_flight,
                    in_flight / m * 1e3,
                    fsync * 1e3,
                    thousands(bound.round() as u64),
                    ratio(bound, m),
                    thousands(t.round() as u64),
                    lc.requests_per_sync()
                        .map_or("n/a".into(), |v| format!("{v:.1}")),
                    cpu(lc),
                    cpu(mc),
                ));
            }
        }
    }
    for e in &errors {
        out.push_str(&format!("- error: {e}\n"));
    }
    (out, errors.is_empty())
}

/// The HTTP table: each tally level over HTTP beside its RESP figure.
fn report_http(measured: &[Measured], http: &[HttpMeasured], s: &Settings) -> (String, bool) {
    let mut out = format!(
        "### Throughput over HTTP: wrk -c {} -d {}s POST /v1/counters/{{name}}/increment, one hot \
         counter (median of {} rounds, beside the RESP rows above)\n\n",
        s.clients, s.http_seconds, s.rounds
    );
    let mut table = Table::new(&[
        "server",
        "requests/s",
        "p50 ms",
        "p99 ms",
        "vs the same over RESP (-P 1)",
    ]);
    let mut errors = Vec::new();
    for h in http {
        match (&h.error, wrk::median(&h.runs)) {
            (None, Some(r)) => table.row(vec![
                format!("{} over HTTP", h.server.label()),
                thousands(r.requests_per_s.round() as u64),
                format!("{:.3}", r.p50_ms),
                format!("{:.3}", r.p99_ms),
                rps(measured, h.server, 1).map_or("n/a".into(), |b| ratio(r.requests_per_s, b)),
            ]),
            (error, _) => {
                table.row(vec![
                    format!("{} over HTTP", h.server.label()),
                    "failed".into(),
                    "".into(),
                    "".into(),
                    "".into(),
                ]);
                let e = error.as_deref().unwrap_or("no run completed");
                errors.push(format!("{} over HTTP: {e}", h.server.label()));
            }
        }
    }
    out.push_str(&table.render());
    out.push('\n');
    let local = http
        .iter()
        .find(|h| h.server == Server::TallyLocal && h.error.is_none())
        .and_then(|h| wrk::median(&h.runs));
    let memory = http
        .iter()
        .find(|h| h.server == Server::TallyMemory && h.error.is_none())
        .and_then(|h| wrk::median(&h.runs));
    if let (Some(l), Some(m)) = (local, memory) {
        out.push_str(&format!(
            "- target, HTTP: tally local >= {MEMORY_RATIO}x tally memory: {} ({})\n",
            verdict(l.requests_per_s >= MEMORY_RATIO * m.requests_per_s),
            ratio(l.requests_per_s, m.requests_per_s)
        ));
    }
    for e in &errors {
        out.push_str(&format!("- error: {e}\n"));
    }
    (out, errors.is_empty())
}

pub fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}
