//! Where a server's time goes during a benchmark run: the CPU time its
//! process used and the context switches of its threads, read from
//! `/proc` before and after the run, and for tally the journal's syncs
//! (RESP `INFO tally`). Divided by the requests of the run, they say what
//! one request costs the server, which a throughput figure alone cannot:
//! on a machine whose cores the load generator shares, a server that
//! spends less per request may still post a lower rate if it makes its
//! clients wait longer.

use std::net::SocketAddr;

use anyhow::{Context as _, Result};

use tally_lab::wire::resp::Client;

/// What a process had used at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// User plus system CPU time of every thread, in seconds.
    pub cpu_s: f64,
    /// Voluntary plus involuntary context switches of its live threads.
    pub switches: u64,
    /// Journal syncs so far (tally only).
    pub syncs: Option<u64>,
}

/// Totals over runs, to divide by their requests.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cost {
    pub requests: u64,
    pub cpu_s: f64,
    pub switches: u64,
    pub syncs: Option<u64>,
}

impl Cost {
    /// Adds the run between `before` and `after` that served `requests`.
    pub fn add(&mut self, before: &Sample, after: &Sample, requests: u64) {
        self.requests += requests;
        self.cpu_s += (after.cpu_s - before.cpu_s).max(0.0);
        self.switches += after.switches.saturating_sub(before.switches);
        if let (Some(a), Some(b)) = (after.syncs, before.syncs) {
            self.syncs = Some(self.syncs.unwrap_or(0) + a.saturating_sub(b));
        }
    }

    /// Server CPU per request, in microseconds.
    pub fn cpu_us_per_request(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.cpu_s * 1e6 / self.requests as f64)
    }

    /// Context switches per request.
    pub fn switches_per_request(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.switches as f64 / self.requests as f64)
    }

    /// Requests acknowledged per journal sync (tally only).
    pub fn requests_per_sync(&self) -> Option<f64> {
        self.syncs
            .filter(|s| *s > 0)
            .map(|s| self.requests as f64 / s as f64)
    }
}

/// Samples process `pid`; with `tally_resp`, also its journal syncs.
pub fn sample(pid: u32, tally_resp: Option<SocketAddr>) -> Result<Sample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold
    // spaces: state is field 3, utime 14 and stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        Ok(fields
            .get(i - 3)
            .context("short /proc stat")?
            .parse::<u64>()? as f64)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu_s = (ticks(14)? + ticks(15)?) / hz;
    let mut switches = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(status) = std::fs::read_to_string(task?.path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        for line in status.lines() {
            if let Some(v) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                switches += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    let syncs = match tally_resp {
        Some(addr) => Some(journal_syncs(addr)?),
        None => None,
    };
    Ok(Sample {
        cpu_s,
        switches,
        syncs,
    })
}

fn journal_syncs(addr: SocketAddr) -> Result<u64> {
    let info = Client::connect(addr)?
        .command(&["INFO", "tally"])?
        .text()
        .map_err(|e| anyhow::anyhow!("INFO tally: {e:?}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("journal_syncs:"))
        .context("INFO tally has no journal_syncs")?
        .trim()
        .parse()
        .context("journal_syncs is not a number")
}
