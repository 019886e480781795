//! tally-bench: measures tally against Redis and PostgreSQL on this
//! machine, in one run and one process tree, and prints one markdown table
//! per part:
//!
//! 1. throughput: `redis-benchmark -t incr` against tally (`local`,
//!    `memory`) and Redis (`appendfsync always`, `everysec`);
//! 2. recovery: time to ready with a million counters and a long journal;
//! 3. memory: bytes per counter against Redis;
//! 4. flush: shard rows per second a node's flush writes to the shared
//!    store, SQLite and PostgreSQL;
//! 5. replicated: `replicated` increments per second from 50 clients
//!    against PostgreSQL's own upsert of a row per counter;
//! 6. ha: the same on a highly available store (Patroni, a synchronous
//!    standby, HAProxy) against a single server, and the time from the
//!    primary's death to the first acknowledged `replicated` increment,
//!    tally's against an upsert client's;
//! 7. tls: the cost of TLS on INCR at `local` in tally (its RESP TLS port
//!    against its plaintext port) beside the same cost in Redis (its
//!    `tls-port` against its plaintext port).
//!
//! Run it with `cargo run --release -p tally-bench`; it builds the release
//! `tally` binary itself. Every server is a private child process on a
//! loopback port with its files in a temporary directory, stopped by its
//! process id when its part ends, even on failure.
//!
//! The exit status is non-zero when a part could not be measured; a target
//! that is not met is reported in the output, not as a failure.

mod cost;
mod flush;
mod ha;
mod memory;
mod parse;
mod phases;
mod postgres;
mod process;
mod recovery;
mod replicated;
mod table;
mod throughput;
mod tls;
mod tools;
mod writer;
mod wrk;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "tally-bench",
    about = "Benchmarks tally against Redis and PostgreSQL on this machine and prints markdown tables",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Hidden>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Hidden {
    /// Fills a data directory for the recovery part, then exits as a crash
    /// would (used by the benchmark itself).
    #[command(hide = true)]
    WriteJournal(writer::WriteJournalArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    Throughput,
    Recovery,
    Memory,
    Flush,
    Replicated,
    Ha,
    Tls,
}

impl Part {
    const ALL: [Part; 7] = [
        Part::Throughput,
        Part::Recovery,
        Part::Memory,
        Part::Flush,
        Part::Replicated,
        Part::Ha,
        Part::Tls,
    ];
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Parts to run, comma-separated [default: all]
    #[arg(long, value_delimiter = ',')]
    part: Vec<Part>,
    /// Small sizes for a smoke run (seconds, not minutes); figures are not
    /// meant to be compared
    #[arg(long)]
    quick: bool,
    /// Requests per redis-benchmark run [default: 200000, --quick 20000]
    #[arg(long)]
    requests: Option<u64>,
    /// Parallel client connections (redis-benchmark, and pgbench in the
    /// replicated and ha parts)
    #[arg(long, default_value_t = 50)]
    clients: u32,
    /// Pipeline depth of the pipelined redis-benchmark run
    #[arg(long, default_value_t = 16)]
    pipeline: u32,
    /// Rounds of throughput runs (median reported) [default: 3, --quick 1]
    #[arg(long)]
    rounds: Option<u32>,
    /// Counters in the recovery part [default: 1000000, --quick 100000]
    #[arg(long)]
    counters: Option<u64>,
    /// Journal records after the snapshot in the recovery part
    /// [default: 10000000, --quick 1000000]
    #[arg(long)]
    journal_records: Option<u64>,
    /// Journal records after a covering snapshot in the recovery part
    /// [default: 100000, --quick 10000]
    #[arg(long)]
    tail_records: Option<u64>,
    /// Starts per recovery case (median reported) [default: 3, --quick 1]
    #[arg(long)]
    recovery_runs: Option<u32>,
    /// Counters in the memory part [default: 1000000, --quick 100000]
    #[arg(long)]
    memory_counters: Option<u64>,
    /// Shard rows written per measurement in the flush part
    /// [default: 1000000, --quick 100000]
    #[arg(long)]
    flush_rows: Option<usize>,
    /// INCRs per redis-benchmark run in the replicated and ha parts
    /// [default: 200000, --quick 20000]
    #[arg(long)]
    replicated_requests: Option<u64>,
    /// Seconds per pgbench run in the replicated and ha parts
    /// [default: 10, --quick 3]
    #[arg(long)]
    pgbench_seconds: Option<u32>,
    /// Rounds of the replicated part and of the ha part's increments per
    /// second (median reported) [default: 3, --quick 1]
    #[arg(long)]
    replicated_rounds: Option<u32>,
    /// Kills of the HA store's primary in the ha part (median reported)
    /// [default: 3, --quick 1]
    #[arg(long)]
    failovers: Option<u32>,
    /// Use this tally binary instead of building one
    #[arg(long)]
    tally_bin: Option<PathBuf>,
    /// Directory for the servers' temporary data; put it on the file system
    /// to measure [default: the system temporary directory]
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Hidden::WriteJournal(args)) => writer::main(args).map(|()| true),
        None => run(cli.run),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("tally-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Counters the spread runs of the replicated part use (`-r`).
const SPREAD_COUNTERS: u32 = 1_000;

/// Picks the full-size or the `--quick` default.
fn size<T>(given: Option<T>, quick: bool, full: T, small: T) -> T {
    given.unwrap_or(if quick { small } else { full })
}

/// Runs the chosen parts; `Ok(false)` if any of them failed.
fn run(args: RunArgs) -> Result<bool> {
    let parts = if args.part.is_empty() {
        Part::ALL.to_vec()
    } else {
        args.part.clone()
    };
    if cfg!(debug_assertions) {
        eprintln!(
            "warning: tally-bench is an unoptimised build; the recovery part's writer \
             will be slow. Use cargo run --release -p tally-bench"
        );
    }
    // Only the parts that start Redis need it; the others name its
    // version in the machine line when it is there.
    let redis_version = if parts.contains(&Part::Throughput)
        || parts.contains(&Part::Memory)
        || parts.contains(&Part::Tls)
    {
        tools::require("redis-server")?
    } else {
        tools::version(std::path::Path::new("redis-server")).unwrap_or_else(|_| "none".into())
    };
    if parts.contains(&Part::Throughput)
        || parts.contains(&Part::Replicated)
        || parts.contains(&Part::Ha)
        || parts.contains(&Part::Tls)
    {
        tools::require("redis-benchmark")?;
    }
    let tally_bin = match &args.tally_bin {
        Some(p) => p.clone(),
        None => tools::build_tally()?,
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix("tally-bench-");
    let work = match &args.work_dir {
        Some(d) => builder.tempdir_in(d),
        None => builder.tempdir(),
    }
    .context("creating the temporary work directory")?;

    println!("## tally-bench\n");
    let mut tally_version = tools::version(&tally_bin)?;
    if args.tally_bin.is_none() {
        tally_version.push_str(" (release build)");
    }
    println!("{}\n", machine_line(&redis_version, &tally_version));
    let mut all_ok = true;
    for part in parts {
        let (text, ok) = match part {
            Part::Throughput => throughput::run(
                &tally_bin,
                work.path(),
                &throughput::Settings {
                    requests: size(args.requests, args.quick, 200_000, 20_000),
                    clients: args.clients,
                    pipelines: vec![1, args.pipeline],
                    rounds: size(args.rounds, args.quick, 3, 1).max(1),
                    http_seconds: if args.quick { 2 } else { 5 },
                },
            ),
            Part::Recovery => recovery::run(
                &tally_bin,
                work.path(),
                &recovery::Settings {
                    counters: size(args.counters, args.quick, 1_000_000, 100_000),
                    records: size(args.journal_records, args.quick, 10_000_000, 1_000_000),
                    tail_records: size(args.tail_records, args.quick, 100_000, 10_000),
                    runs: size(args.recovery_runs, args.quick, 3, 1).max(1),
                },
            ),
            Part::Memory => memory::run(
                &tally_bin,
                work.path(),
                size(args.memory_counters, args.quick, 1_000_000, 100_000),
            ),
            Part::Flush => flush::run(
                work.path(),
                &flush::Settings {
                    rows: size(args.flush_rows, args.quick, 1_000_000, 100_000).max(1),
                    batch_rows: vec![1_000, 100_000],
                },
            ),
            Part::Replicated => {
                replicated::run(&tally_bin, work.path(), &replicated_settings(&args))
            }
            Part::Tls => tls::run(
                &tally_bin,
                work.path(),
                &tls::Settings {
                    requests: size(args.requests, args.quick, 200_000, 20_000),
                    clients: args.clients,
                    pipelines: vec![1, args.pipeline],
                    rounds: size(args.rounds, args.quick, 3, 1).max(1),
                },
            ),
            Part::Ha => ha::run(
                &tally_bin,
                work.path(),
                &ha::Settings {
                    load: replicated_settings(&args),
                    failovers: size(args.failovers, args.quick, 3, 1).max(1),
                },
            ),
        };
        println!("{text}");
        all_ok &= ok;
    }
    Ok(all_ok)
}

/// The sizes of the replicated part, which the ha part shares.
fn replicated_settings(args: &RunArgs) -> replicated::Settings {
    replicated::Settings {
        requests: size(args.replicated_requests, args.quick, 200_000, 20_000),
        clients: args.clients,
        pgbench_seconds: size(args.pgbench_seconds, args.quick, 10, 3).max(1),
        counters: SPREAD_COUNTERS,
        rounds: size(args.replicated_rounds, args.quick, 3, 1).max(1),
    }
}

/// One line saying what the figures were measured on.
fn machine_line(redis_version: &str, tally_version: &str) -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, m)| m.trim())
        })
        .unwrap_or("unknown CPU");
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = read("/proc/loadavg");
    let load = load.split_whitespace().next().unwrap_or("?");
    let kernel = read("/proc/sys/kernel/osrelease");
    let redis = redis_version
        .split_whitespace()
        .find_map(|w| w.strip_prefix("v="))
        .unwrap_or(redis_version);
    format!(
        "Measured on {cores} cores ({model}), Linux {}, load average {load} at start; \
         redis-server {redis}; {tally_version}.",
        kernel.trim(),
    )
}
