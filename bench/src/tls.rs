//! Part 7, TLS: what TLS costs INCR at `local`, in tally and in Redis.
//!
//! One tally process serves its plaintext RESP port and its RESP TLS port,
//! one Redis process (`appendfsync always`, the same durability as
//! `local`) its plaintext port and its `tls-port`; both with a certificate
//! from a CA made for the run. `redis-benchmark -t incr` (with `--tls
//! --cacert` for the TLS ports) runs against the four in turn, rounds
//! interleaved. The figure that matters is each server's TLS throughput as
//! a fraction of its own plaintext throughput: the target is tally's
//! fraction at least Redis's, at every pipeline depth.
//!
//! Every run increments one key; at the end its value on each server must
//! equal the requests sent to that server over both ports.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

use tally_lab::pki::Ca;
use tally_lab::process::{ChildGuard, READY_TIMEOUT};
use tally_lab::wire::resp::Client;

use crate::parse::BenchmarkRow;
use crate::process;
use crate::table::{Table, ratio, thousands};
use crate::throughput::{BENCHMARK_KEY, redis_benchmark_tls, verdict};

pub struct Settings {
    /// Requests per redis-benchmark run (`-n`).
    pub requests: u64,
    /// Parallel connections (`-c`).
    pub clients: u32,
    /// Pipeline depths (`-P`).
    pub pipelines: Vec<u32>,
    /// Runs per port and depth; the median is reported.
    pub rounds: u32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Port {
    TallyPlain,
    TallyTls,
    RedisPlain,
    RedisTls,
}

impl Port {
    const ALL: [Port; 4] = [
        Port::TallyPlain,
        Port::TallyTls,
        Port::RedisPlain,
        Port::RedisTls,
    ];

    fn label(self) -> &'static str {
        match self {
            Port::TallyPlain => "tally local, plaintext",
            Port::TallyTls => "tally local, TLS",
            Port::RedisPlain => "redis always, plaintext",
            Port::RedisTls => "redis always, TLS (tls-port)",
        }
    }

    fn tls(self) -> bool {
        matches!(self, Port::TallyTls | Port::RedisTls)
    }

    /// The same server's plaintext port.
    fn plain(self) -> Port {
        match self {
            Port::TallyPlain | Port::TallyTls => Port::TallyPlain,
            Port::RedisPlain | Port::RedisTls => Port::RedisPlain,
        }
    }
}

struct Measured {
    port: Port,
    pipeline: u32,
    runs: Vec<BenchmarkRow>,
    error: Option<String>,
}

impl Measured {
    fn median(&self) -> Option<&BenchmarkRow> {
        BenchmarkRow::median(&self.runs)
    }
}

/// Both servers and their four ports.
struct Servers {
    tally: ChildGuard,
    redis: ChildGuard,
    addrs: Vec<(Port, SocketAddr)>,
    ca: PathBuf,
}

pub fn run(tally_bin: &Path, work: &Path, s: &Settings) -> (String, bool) {
    let mut measured: Vec<Measured> = Port::ALL
        .iter()
        .flat_map(|&port| {
            s.pipelines.iter().map(move |&pipeline| Measured {
                port,
                pipeline,
                runs: Vec::new(),
                error: None,
            })
        })
        .collect();
    let servers = match start(tally_bin, work) {
        Ok(servers) => servers,
        Err(e) => {
            return (
                format!("### TLS\n\n- error: starting the servers: {e:#}\n"),
                false,
            );
        }
    };
    for round in 0..s.rounds as usize {
        for i in 0..Port::ALL.len() {
            let (port, addr) = servers.addrs[(i + round) % Port::ALL.len()];
            for m in measured.iter_mut().filter(|m| m.port == port) {
                if m.error.is_some() {
                    continue;
                }
                eprintln!(
                    "tls: round {}/{}, {} -P {} ...",
                    round + 1,
                    s.rounds,
                    port.label(),
                    m.pipeline
                );
                let ca = port.tls().then_some(servers.ca.as_path());
                match redis_benchmark_tls(addr, s.clients, s.requests, m.pipeline, None, ca) {
                    Ok(row) => m.runs.push(row),
                    Err(e) => m.error = Some(format!("{e:#}")),
                }
            }
        }
    }
    let mut errors: Vec<String> = measured
        .iter()
        .filter_map(|m| {
            m.error
                .as_ref()
                .map(|e| format!("{} (-P {}): {e}", m.port.label(), m.pipeline))
        })
        .collect();
    if let Err(e) = verify_and_stop(servers, &measured, s) {
        errors.push(format!("{e:#}"));
    }
    report(&measured, s, &errors)
}

fn start(tally_bin: &Path, work: &Path) -> Result<Servers> {
    let dir = work.join("tls");
    std::fs::create_dir_all(&dir)?;
    let ca = Ca::new("tally-bench CA")?;
    let ca_path = dir.join("ca.crt");
    ca.write_cert(&ca_path)?;
    let files = ca
        .server(&["localhost", "127.0.0.1"])?
        .write(&dir, "server")?;
    let (cert, key) = (
        files.cert.display().to_string(),
        files.key.display().to_string(),
    );
    let tally = process::start_tally(
        tally_bin,
        &dir.join("tally"),
        true,
        "local",
        &[
            "--resp-tls-addr",
            "127.0.0.1:0",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
        READY_TIMEOUT,
    )?;
    let tally_plain = tally.resp_addr.context("tally started without RESP")?;
    let tally_tls = tally
        .resp_tls_addr
        .context("tally started without its RESP TLS port")?;
    let tls_port = tally_lab::ports::free_loopback_port()?.to_string();
    let redis = process::start_redis(
        &dir.join("redis"),
        "redis-always-tls",
        &[
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--tls-port",
            &tls_port,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca_path.display().to_string(),
            "--tls-auth-clients",
            "no",
        ],
    )?;
    let redis_tls: SocketAddr = ([127, 0, 0, 1], tls_port.parse::<u16>()?).into();
    Ok(Servers {
        addrs: vec![
            (Port::TallyPlain, tally_plain),
            (Port::TallyTls, tally_tls),
            (Port::RedisPlain, redis.addr),
            (Port::RedisTls, redis_tls),
        ],
        tally: tally.guard,
        redis: redis.guard,
        ca: ca_path,
    })
}

/// Every INCR sent to a server, over either port, must be in its key.
fn verify_and_stop(servers: Servers, measured: &[Measured], s: &Settings) -> Result<()> {
    let runs = |plain: Port| -> u64 {
        measured
            .iter()
            .filter(|m| m.port.plain() == plain)
            .map(|m| m.runs.len() as u64)
            .sum()
    };
    let mut problems = Vec::new();
    for (plain, name) in [(Port::TallyPlain, "tally"), (Port::RedisPlain, "redis")] {
        let addr = servers
            .addrs
            .iter()
            .find(|(p, _)| *p == plain)
            .map(|(_, a)| *a)
            .expect("every port has an address");
        let expected = runs(plain) * s.requests;
        let value = Client::connect(addr)?
            .command(&["GET", BENCHMARK_KEY])?
            .text()
            .unwrap_or_else(|_| "0".into());
        if value != expected.to_string() {
            problems.push(format!(
                "{name}: {BENCHMARK_KEY} is {value}, expected {expected}"
            ));
        }
    }
    for guard in [servers.tally, servers.redis] {
        let name = guard.name().to_string();
        let status = process::stop(guard)?;
        if !status.success() {
            problems.push(format!("{name} exited with {status} at shutdown"));
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(())
}

fn median(measured: &[Measured], port: Port, pipeline: u32) -> Option<&BenchmarkRow> {
    measured
        .iter()
        .find(|m| m.port == port && m.pipeline == pipeline && m.error.is_none())
        .and_then(Measured::median)
}

fn report(measured: &[Measured], s: &Settings, errors: &[String]) -> (String, bool) {
    let mut out = format!(
        "### TLS: redis-benchmark -t incr -c {} -n {}, one hot counter, fsync before every \
         acknowledgement (median of {} rounds, ports interleaved)\n\n",
        s.clients,
        thousands(s.requests),
        s.rounds
    );
    let mut table = Table::new(&[
        "server and port",
        "pipeline",
        "requests/s",
        "p50 ms",
        "p99 ms",
        "vs its plaintext",
        "p99 vs its plaintext",
    ]);
    for m in measured {
        let Some(r) = median(measured, m.port, m.pipeline) else {
            table.row(vec![
                m.port.label().into(),
                m.pipeline.to_string(),
                "failed".into(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ]);
            continue;
        };
        let plain = median(measured, m.port.plain(), m.pipeline);
        table.row(vec![
            m.port.label().into(),
            m.pipeline.to_string(),
            thousands(r.requests_per_s.round() as u64),
            format!("{:.3}", r.p50_ms),
            format!("{:.3}", r.p99_ms),
            plain.map_or("n/a".into(), |p| ratio(r.requests_per_s, p.requests_per_s)),
            plain.map_or("n/a".into(), |p| ratio(r.p99_ms, p.p99_ms)),
        ]);
    }
    out.push_str(&table.render());
    out.push('\n');
    for &p in &s.pipelines {
        let fraction = |tls: Port| {
            Some(
                median(measured, tls, p)?.requests_per_s
                    / median(measured, tls.plain(), p)?.requests_per_s,
            )
        };
        // What TLS adds to each request's share of the server's time.
        let added_us = |tls: Port| {
            Some(
                1e6 / median(measured, tls, p)?.requests_per_s
                    - 1e6 / median(measured, tls.plain(), p)?.requests_per_s,
            )
        };
        if let (Some(t), Some(r)) = (fraction(Port::TallyTls), fraction(Port::RedisTls)) {
            out.push_str(&format!(
                "- target, -P {p}: TLS costs tally no more throughput than it costs Redis: {} \
                 (tally keeps {:.0}% of its plaintext rate over TLS, Redis {:.0}%)\n",
                verdict(t >= r),
                t * 100.0,
                r * 100.0
            ));
        }
        if let (Some(t), Some(r)) = (added_us(Port::TallyTls), added_us(Port::RedisTls)) {
            out.push_str(&format!(
                "- -P {p}: TLS adds {t:.2} µs per request to tally, {r:.2} µs to Redis\n"
            ));
        }
    }
    for e in errors {
        out.push_str(&format!("- error: {e}\n"));
    }
    (out, errors.is_empty())
}
