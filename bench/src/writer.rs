//! The journal writer: the hidden `write-journal` subcommand that fills a
//! data directory through the library, for the recovery benchmark.
//!
//! It runs as a child process of the benchmark because it must end the way
//! a crash does: `Node::shutdown` would write a final snapshot and leave no
//! journal to replay. Instead the last increment is made at `local`, whose
//! acknowledgement means an fsync covered it and every record before it
//! (the journal is one ordered stream), and the process then exits at once,
//! without dropping the node.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use tally::{Config, Durability, IncrementOptions, Node};

/// Increments run concurrently on this many tasks: enough to keep two
/// cores and the journal's queue busy.
const WRITER_TASKS: u64 = 4;

#[derive(Debug, Args)]
pub struct WriteJournalArgs {
    /// Data directory to write into (created, or reopened and appended to).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Counters named counter:000000000000 and up; the records cycle over
    /// them.
    #[arg(long)]
    pub counters: u64,
    /// First create every counter with one increment each, then snapshot.
    #[arg(long)]
    pub create_and_snapshot: bool,
    /// Journal records to write after that (the last one at `local`).
    #[arg(long)]
    pub records: u64,
}

/// Name of counter `i`, the same shape as redis-benchmark's
/// `counter:__rand_int__` keys with `-r`: "counter:" and 12 digits.
pub fn counter_name(i: u64) -> String {
    format!("counter:{i:012}")
}

/// Writes, then ends the process without shutting the node down.
pub fn main(args: WriteJournalArgs) -> Result<()> {
    if args.counters == 0 || args.records == 0 {
        bail!("--counters and --records must be at least 1");
    }
    let mut config = Config::new(&args.data_dir);
    config.durability = Durability::Memory;
    // No automatic snapshot: everything written here must stay in the
    // journal for recovery to replay.
    config.snapshot_journal_bytes = u64::MAX;
    let node = Node::open(config).context("opening the node")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    if args.create_and_snapshot {
        runtime.block_on(increments(&node, 0, args.counters, args.counters))?;
        node.snapshot().context("taking the snapshot")?;
    }
    let created_s = started.elapsed().as_secs_f64();
    // Everything but the last record at `memory`; the last at `local`.
    runtime.block_on(increments(&node, 0, args.records - 1, args.counters))?;
    let last = counter_name((args.records - 1) % args.counters);
    let local = IncrementOptions {
        durability: Some(Durability::Local),
        idempotency_key: None,
    };
    runtime
        .block_on(node.increment(&last, 1, local))
        .context("the final local increment")?;
    let total_s = started.elapsed().as_secs_f64();
    println!(
        "written counters={} records={} create_s={created_s:.3} total_s={total_s:.3}",
        args.counters, args.records
    );
    // Exit without dropping `node` or `runtime`: no shutdown, no final
    // snapshot, exactly what a crash right after the last ack leaves.
    std::process::exit(0)
}

/// Increments counters for record numbers `from..to`, record `i` going to
/// counter `i % counters`, on [`WRITER_TASKS`] tasks.
async fn increments(node: &Node, from: u64, to: u64, counters: u64) -> Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..WRITER_TASKS {
        let node = node.clone();
        tasks.spawn(async move {
            let mut i = from + task;
            while i < to {
                node.increment(&counter_name(i % counters), 1, IncrementOptions::default())
                    .await
                    .with_context(|| format!("increment {i}"))?;
                i += WRITER_TASKS;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}
