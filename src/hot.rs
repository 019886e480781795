//! The hottest counters of a node: which counters take the most increments
//! now, for `tally status` and the dashboard.
//!
//! Counting every increment of every counter would cost a map entry per
//! counter and a lock per increment. Instead one increment in
//! [`SAMPLE_EVERY`] is sampled (picked by its lsn, which every increment
//! has anyway, so sampling costs no shared counter), and the samples go
//! into a Space-Saving summary of at most [`TRACKED_MAX`] counters
//! (Metwally, Agrawal and El Abbadi, 2005): a counter not tracked replaces
//! the one with the fewest samples and inherits its count, so every counter
//! whose share of the increments is above 1/`TRACKED_MAX` is tracked, with
//! its count overestimated by at most the smallest count. Counts are kept
//! per window of [`WINDOW`]; rates come from the last complete window.

use std::time::{Duration, Instant};

use compact_str::CompactString;
use parking_lot::Mutex;

/// One increment in this many is sampled.
pub const SAMPLE_EVERY: u64 = 64;
/// Most counters the summary tracks.
pub const TRACKED_MAX: usize = 64;
/// Rates are over windows this long.
pub const WINDOW: Duration = Duration::from_secs(10);

/// A hot counter: its name and about how many increments per second it
/// took in the last complete window.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HotCounter {
    pub name: String,
    pub increments_per_second: f64,
}

struct Window {
    started: Instant,
    /// (name, samples), unordered.
    counts: Vec<(CompactString, u64)>,
}

/// A complete window: how long it lasted and its counts.
type Done = (Duration, Vec<(CompactString, u64)>);

/// See the module docs.
pub struct HotCounters {
    inner: Mutex<(Window, Option<Done>)>,
}

impl Default for HotCounters {
    fn default() -> Self {
        HotCounters {
            inner: Mutex::new((
                Window {
                    started: Instant::now(),
                    counts: Vec::with_capacity(TRACKED_MAX),
                },
                None,
            )),
        }
    }
}

impl HotCounters {
    /// Records the increment with lsn `lsn` to `name` if it is sampled.
    pub fn record(&self, name: &str, lsn: u64) {
        if !lsn.is_multiple_of(SAMPLE_EVERY) {
            return;
        }
        let mut inner = self.inner.lock();
        let (window, previous) = &mut *inner;
        let age = window.started.elapsed();
        if age >= WINDOW {
            let done = std::mem::replace(&mut window.counts, Vec::with_capacity(TRACKED_MAX));
            *previous = Some((age, done));
            window.started = Instant::now();
        }
        let counts = &mut window.counts;
        if let Some(slot) = counts.iter_mut().find(|(n, _)| n == name) {
            slot.1 += 1;
        } else if counts.len() < TRACKED_MAX {
            counts.push((CompactString::from(name), 1));
        } else if let Some(min) = counts.iter_mut().min_by_key(|(_, c)| *c) {
            *min = (CompactString::from(name), min.1 + 1);
        }
    }

    /// Up to `n` counters with the most increments per second, most first:
    /// from the last complete window, or from the current one while there
    /// is none yet.
    pub fn top(&self, n: usize) -> Vec<HotCounter> {
        let inner = self.inner.lock();
        let (window, previous) = &*inner;
        let (span, counts) = match previous {
            // A complete window long past is stale: nothing is hot now.
            Some(_) if window.started.elapsed() >= WINDOW => return Vec::new(),
            Some((span, counts)) => (*span, counts),
            None => (window.started.elapsed(), &window.counts),
        };
        let secs = span.as_secs_f64().max(0.001);
        let mut out: Vec<HotCounter> = counts
            .iter()
            .map(|(name, c)| HotCounter {
                name: name.to_string(),
                increments_per_second: (*c * SAMPLE_EVERY) as f64 / secs,
            })
            .collect();
        out.sort_by(|a, b| {
            b.increments_per_second
                .total_cmp(&a.increments_per_second)
                .then_with(|| a.name.cmp(&b.name))
        });
        out.truncate(n);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A counter taking most increments comes first, a rare one is
    // outranked, and only sampled lsns count.
    #[test]
    fn the_busiest_counter_comes_first() {
        let hot = HotCounters::default();
        for i in 0..10_000u64 {
            let name = match i % 10 {
                0..=6 => "busy",
                7 | 8 => "warm",
                _ => "cold",
            };
            hot.record(name, i * SAMPLE_EVERY);
            // Not a sampled lsn: never counted.
            hot.record("ghost", i * SAMPLE_EVERY + 1);
        }
        let top = hot.top(3);
        assert_eq!(top.len(), 3, "{top:?}");
        assert_eq!(top[0].name, "busy");
        assert_eq!(top[1].name, "warm");
        assert!(top[0].increments_per_second > top[1].increments_per_second);
        assert!(top[1].increments_per_second > top[2].increments_per_second);
        assert!(hot.top(10).iter().all(|h| h.name != "ghost"));
    }

    // More distinct counters than tracked: the summary stays bounded and a
    // counter with most of the increments is still found.
    #[test]
    fn a_heavy_hitter_survives_many_rare_counters() {
        let hot = HotCounters::default();
        for i in 0..100_000u64 {
            let name = if i % 2 == 0 {
                "heavy".to_string()
            } else {
                format!("rare-{i}")
            };
            hot.record(&name, i * SAMPLE_EVERY);
        }
        let top = hot.top(TRACKED_MAX * 2);
        assert!(top.len() <= TRACKED_MAX);
        assert_eq!(top[0].name, "heavy");
    }
}
