//! Part 3, memory per counter: resident memory a server gains by holding N
//! distinct counters, per counter, for tally and for Redis.
//!
//! Each server is filled with the same keys (`counter:` and 12 digits, the
//! shape redis-benchmark's `counter:__rand_int__` takes with `-r`) by
//! pipelined INCRs, and the counters it then holds are counted with DBSIZE
//! rather than assumed. Redis also reports `used_memory` (bytes its
//! allocator handed out), which leaves out allocator slack; tally's
//! allocator figure is not visible from outside, so only RSS is compared.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use tally_lab::process::{ChildGuard, READY_TIMEOUT};
use tally_lab::wire::resp::{Client, Reply};

use crate::parse;
use crate::process;
use crate::table::{Table, ratio, thousands};
use crate::throughput::verdict;
use crate::writer::counter_name;

/// INCRs written before their replies are read.
const PIPELINE_COMMANDS: u64 = 1000;
/// Longest filling one server may take.
const FILL_TIMEOUT: Duration = Duration::from_secs(600);

struct Measured {
    label: &'static str,
    counters: u64,
    rss_empty: u64,
    rss_full: u64,
    /// Redis's `used_memory` before and after; `None` for tally.
    used_memory: Option<(u64, u64)>,
}

impl Measured {
    fn rss_per_counter(&self) -> f64 {
        self.rss_full.saturating_sub(self.rss_empty) as f64 / self.counters.max(1) as f64
    }
    fn allocated_per_counter(&self) -> Option<f64> {
        self.used_memory
            .map(|(empty, full)| full.saturating_sub(empty) as f64 / self.counters.max(1) as f64)
    }
}

pub fn run(tally_bin: &Path, work: &Path, counters: u64) -> (String, bool) {
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    eprintln!("memory: tally with {} counters ...", thousands(counters));
    match measure_tally(tally_bin, work, counters) {
        Ok(m) => rows.push(m),
        Err(e) => errors.push(format!("tally: {e:#}")),
    }
    eprintln!("memory: redis with {} counters ...", thousands(counters));
    match measure_redis(work, counters) {
        Ok(m) => rows.push(m),
        Err(e) => errors.push(format!("redis: {e:#}")),
    }
    report(&rows, &errors, counters)
}

fn measure_tally(tally_bin: &Path, work: &Path, counters: u64) -> Result<Measured> {
    let t = process::start_tally(
        tally_bin,
        &work.join("memory-tally"),
        true,
        "local",
        &[],
        READY_TIMEOUT,
    )?;
    let addr = t.resp_addr.context("tally started without RESP")?;
    let m = measure(&t.guard, addr, counters, "tally (local)", false)?;
    stop(t.guard)?;
    Ok(m)
}

fn measure_redis(work: &Path, counters: u64) -> Result<Measured> {
    let r = process::start_redis(
        &work.join("memory-redis"),
        "memory",
        &["--appendonly", "no"],
    )?;
    let m = measure(&r.guard, r.addr, counters, "redis (no persistence)", true)?;
    stop(r.guard)?;
    Ok(m)
}

fn stop(guard: ChildGuard) -> Result<()> {
    let name = guard.name().to_string();
    let status = process::stop(guard)?;
    if !status.success() {
        bail!("{name} exited with {status} at shutdown");
    }
    Ok(())
}

fn measure(
    guard: &ChildGuard,
    addr: SocketAddr,
    counters: u64,
    label: &'static str,
    redis: bool,
) -> Result<Measured> {
    let mut client = Client::connect(addr)?;
    let used_memory = |client: &mut Client| -> Result<u64> {
        let info = client.command(&["INFO", "memory"])?.text()?;
        parse::info_u64(&info, "used_memory")
    };
    let before = if redis {
        Some(used_memory(&mut client)?)
    } else {
        None
    };
    let rss_empty = process::rss_bytes(guard.pid())?;
    fill(&mut client, counters)?;
    let held = client.command(&["DBSIZE"])?.integer().context("DBSIZE")?;
    let rss_full = process::rss_bytes(guard.pid())?;
    let after = if redis {
        Some(used_memory(&mut client)?)
    } else {
        None
    };
    Ok(Measured {
        label,
        counters: u64::try_from(held).context("negative DBSIZE")?,
        rss_empty,
        rss_full,
        used_memory: before.zip(after),
    })
}

/// INCRs counters 0..n once each, [`PIPELINE_COMMANDS`] at a time; every
/// reply must be 1 (a new counter).
fn fill(client: &mut Client, n: u64) -> Result<()> {
    let deadline = Instant::now() + FILL_TIMEOUT;
    let mut next = 0;
    while next < n {
        if Instant::now() >= deadline {
            bail!(
                "filling took longer than {} s ({next} of {n} counters)",
                FILL_TIMEOUT.as_secs()
            );
        }
        let end = (next + PIPELINE_COMMANDS).min(n);
        for i in next..end {
            client.queue(&["INCR", &counter_name(i)])?;
        }
        client.flush()?;
        for i in next..end {
            match client.read_reply()? {
                Reply::Integer(1) => {}
                other => bail!("INCR {} answered {other:?}, expected 1", counter_name(i)),
            }
        }
        next = end;
    }
    Ok(())
}

fn report(rows: &[Measured], errors: &[String], counters: u64) -> (String, bool) {
    let mut out = format!(
        "### Memory per counter: {} counters named like counter:000000000001 (20 bytes)\n\n",
        thousands(counters)
    );
    let mut table = Table::new(&[
        "server",
        "counters (DBSIZE)",
        "RSS empty MB",
        "RSS full MB",
        "bytes/counter (RSS)",
        "bytes/counter (allocator)",
    ]);
    for m in rows {
        table.row(vec![
            m.label.into(),
            thousands(m.counters),
            format!("{:.1}", m.rss_empty as f64 / 1e6),
            format!("{:.1}", m.rss_full as f64 / 1e6),
            format!("{:.0}", m.rss_per_counter()),
            m.allocated_per_counter()
                .map_or("n/a".into(), |b| format!("{b:.0}")),
        ]);
    }
    out.push_str(&table.render());
    out.push('\n');
    if let [tally, redis] = rows {
        out.push_str(&format!(
            "- target: tally RSS per counter <= redis RSS per counter: {} ({:.0} vs {:.0} bytes, {})\n",
            verdict(tally.rss_per_counter() <= redis.rss_per_counter()),
            tally.rss_per_counter(),
            redis.rss_per_counter(),
            ratio(tally.rss_per_counter(), redis.rss_per_counter())
        ));
    }
    for e in errors {
        out.push_str(&format!("- error: {e}\n"));
    }
    (out, errors.is_empty())
}
