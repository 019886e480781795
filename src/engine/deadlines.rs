//! Counter expiries: the unix time (ms) at which a counter is deleted, for
//! counters used as windows (`EXPIRE`, `TTL`).
//!
//! On a node without a store the expiries live here, journaled
//! ([`crate::engine::journal::Kind::Expire`]) and carried by snapshots; a
//! node with a store keeps them in the store instead (see
//! `docs/design.md`, "Expiring a counter"). Reaching a deadline deletes
//! the counter exactly as `DEL` does; the node's sweeper does it.
//!
//! One lock guards the whole map. Setting, clearing and taking an expiry
//! hold it across the journal append, and so does a delete (which clears
//! the counter's expiry), so the journal order of a counter's expiry
//! records and deletes is the order in which they changed this map:
//! recovery replays them in journal order and ends in the same state.

use std::collections::{BTreeSet, HashMap};

use compact_str::CompactString;
use parking_lot::{Mutex, MutexGuard};

/// Which expiries [`ExpireIf`] lets a new deadline replace, as Redis's
/// `EXPIRE` options `NX`, `XX`, `GT` and `LT`. A counter without an expiry
/// counts as expiring never (so `Later` never sets one, `Earlier` always
/// does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpireIf {
    /// Always set.
    #[default]
    Always,
    /// Only if the counter has no expiry (`NX`).
    NoExpiry,
    /// Only if it has one (`XX`).
    HasExpiry,
    /// Only if the new deadline is later than the current one (`GT`).
    Later,
    /// Only if it is earlier than the current one (`LT`).
    Earlier,
}

impl ExpireIf {
    /// Whether a counter whose expiry is `current` takes deadline `at_ms`.
    pub fn allows(self, current: Option<u64>, at_ms: u64) -> bool {
        match (self, current) {
            (ExpireIf::Always, _) => true,
            (ExpireIf::NoExpiry, c) => c.is_none(),
            (ExpireIf::HasExpiry, c) => c.is_some(),
            (ExpireIf::Later, Some(c)) => at_ms > c,
            (ExpireIf::Later, None) => false,
            (ExpireIf::Earlier, Some(c)) => at_ms < c,
            (ExpireIf::Earlier, None) => true,
        }
    }
}

/// Counters' deadlines, by name and in time order.
#[derive(Default)]
pub struct Deadlines {
    inner: Mutex<Inner>,
}

/// The map under its lock; see [`Deadlines::lock`].
#[derive(Default)]
pub struct Inner {
    by_name: HashMap<CompactString, u64>,
    by_time: BTreeSet<(u64, CompactString)>,
}

impl Deadlines {
    /// Takes the lock, for a change that must be journaled in order with
    /// the map's changes (see the module docs).
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    /// The deadline of `name`, if it has one.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.inner.lock().get(name)
    }

    /// The earliest deadline, if any.
    pub fn next(&self) -> Option<u64> {
        self.inner.lock().by_time.first().map(|(at, _)| *at)
    }

    /// At most `limit` counters whose deadline is at or before `now_ms`,
    /// earliest first, with their deadlines.
    pub fn due(&self, now_ms: u64, limit: usize) -> Vec<(String, u64)> {
        self.inner
            .lock()
            .by_time
            .iter()
            .take_while(|(at, _)| *at <= now_ms)
            .take(limit)
            .map(|(at, name)| (name.to_string(), *at))
            .collect()
    }

    /// Every deadline, in time order (for a snapshot).
    pub fn all(&self) -> Vec<(CompactString, u64)> {
        self.inner
            .lock()
            .by_time
            .iter()
            .map(|(at, name)| (name.clone(), *at))
            .collect()
    }
}

impl Inner {
    pub fn get(&self, name: &str) -> Option<u64> {
        self.by_name.get(name).copied()
    }

    /// Sets (`Some`) or clears (`None`) the deadline of `name`; returns the
    /// one it replaced.
    pub fn set(&mut self, name: &str, at_ms: Option<u64>) -> Option<u64> {
        let old = match at_ms {
            Some(at) => self.by_name.insert(CompactString::from(name), at),
            None => self.by_name.remove(name),
        };
        if let Some(old) = old {
            self.by_time.remove(&(old, CompactString::from(name)));
        }
        if let Some(at) = at_ms {
            self.by_time.insert((at, CompactString::from(name)));
        }
        old
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_are_kept_by_name_and_taken_in_time_order() {
        let d = Deadlines::default();
        let mut m = d.lock();
        assert_eq!(m.set("a", Some(30)), None);
        assert_eq!(m.set("b", Some(10)), None);
        assert_eq!(m.set("c", Some(20)), None);
        assert_eq!(m.set("a", Some(5)), Some(30));
        assert_eq!(m.set("c", None), Some(20));
        assert_eq!(m.set("c", None), None);
        drop(m);
        assert_eq!(d.next(), Some(5));
        assert_eq!(d.due(10, 10), vec![("a".into(), 5), ("b".into(), 10)]);
        assert_eq!(d.due(10, 1), vec![("a".into(), 5)]);
        assert_eq!(d.due(4, 10), vec![]);
        assert_eq!(d.get("a"), Some(5));
        assert_eq!(d.get("c"), None);
    }

    // The Redis rules: NX only without an expiry, XX only with one, GT
    // only later (never on a counter without one: that one never expires),
    // LT only earlier (always on a counter without one).
    #[test]
    fn conditions_follow_the_redis_options() {
        use ExpireIf::*;
        let cases = [
            (Always, None, true),
            (Always, Some(9), true),
            (NoExpiry, None, true),
            (NoExpiry, Some(9), false),
            (HasExpiry, None, false),
            (HasExpiry, Some(9), true),
            (Later, None, false),
            (Later, Some(9), true),
            (Later, Some(10), false),
            (Earlier, None, true),
            (Earlier, Some(11), true),
            (Earlier, Some(10), false),
        ];
        for (when, current, expected) in cases {
            assert_eq!(when.allows(current, 10), expected, "{when:?} {current:?}");
        }
    }
}
