//! The counter table: counter name to signed 64-bit value, in memory.
//!
//! This module is pure state: it never does I/O. The journal, snapshots,
//! recovery and tests all drive the same small core through `increment`,
//! `replay` and `restore`.
//!
//! Every entry carries the log sequence number (lsn) of the last increment
//! applied to it. That number is what makes a snapshot a consistent cut
//! without stopping writers: recovery replays a journal record only if its
//! lsn is greater than the entry's lsn in the snapshot (see `docs/design.md`,
//! "Snapshots"). For that rule to hold, a counter's lsns must be assigned in
//! the order its increments are applied, which is why `increment` hands the
//! caller a closure that runs under the shard lock.
//!
//! The table is split into [`SHARDS`] independently locked shards so that
//! increments of different counters from many connections do not serialise
//! on one lock.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use compact_str::CompactString;
use parking_lot::Mutex;

use crate::error::{Error, Result};

/// Longest counter name, in bytes of UTF-8.
pub const NAME_BYTES_MAX: usize = 256;

/// Number of independently locked shards. A power of two well above the
/// number of cores, so that two hot counters rarely share a lock.
pub const SHARDS: usize = 256;

/// One counter's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub value: i64,
    /// Lsn of the last increment applied to this counter.
    pub lsn: u64,
}

/// One shard's counters: a dense vector of (name, entry) and a hash index
/// of 4-byte positions into it.
///
/// A plain hash map of (name, entry) would keep 40-byte slots at a load of
/// 44 to 87 percent; here the slack of the hash index costs 5 bytes a slot,
/// and the vector grows by a quarter at a time, so a counter costs about 50
/// to 60 bytes whatever the table's size. Names up to 24 bytes live inline.
#[derive(Default)]
struct Map {
    index: hashbrown::HashTable<u32>,
    entries: Vec<(CompactString, Entry)>,
    hasher: foldhash::fast::RandomState,
    /// Positions of entries changed since the shared store last took them
    /// (only while dirty tracking is on), each once: `dirty_bits` says
    /// which positions are listed.
    dirty: Vec<u32>,
    dirty_bits: Vec<u64>,
}

impl Map {
    fn hash(&self, name: &str) -> u64 {
        self.hasher.hash_one(name)
    }

    fn position(&self, name: &str) -> Option<usize> {
        let entries = &self.entries;
        self.index
            .find(self.hash(name), |&i| entries[i as usize].0 == name)
            .map(|&i| i as usize)
    }

    fn get(&self, name: &str) -> Option<&Entry> {
        self.position(name).map(|i| &self.entries[i].1)
    }

    fn get_mut(&mut self, name: &str) -> Option<&mut Entry> {
        self.position(name).map(|i| &mut self.entries[i].1)
    }

    /// Lists entry `i` as dirty (once).
    fn mark(&mut self, i: usize) {
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        if self.dirty_bits.len() <= word {
            self.dirty_bits.resize(word + 1, 0);
        }
        if self.dirty_bits[word] & bit == 0 {
            self.dirty_bits[word] |= bit;
            self.dirty.push(i as u32);
        }
    }

    fn clear_dirty(&mut self) {
        self.dirty.clear();
        self.dirty_bits.clear();
    }

    /// Inserts a counter that must not be present yet.
    fn insert_new(&mut self, name: &str, entry: Entry) {
        debug_assert!(self.position(name).is_none());
        if self.entries.len() == self.entries.capacity() {
            // Grow by a quarter, not the default doubling, to bound slack.
            self.entries.reserve_exact(self.entries.len() / 4 + 16);
        }
        let at = u32::try_from(self.entries.len()).expect("a shard holds under 2^32 counters");
        self.entries.push((CompactString::from(name), entry));
        let (entries, hasher) = (&self.entries, &self.hasher);
        self.index.insert_unique(hasher.hash_one(name), at, |&i| {
            hasher.hash_one(entries[i as usize].0.as_str())
        });
    }

    /// Inserts or replaces; returns whether the counter was new.
    fn upsert(&mut self, name: &str, entry: Entry) -> bool {
        match self.get_mut(name) {
            Some(e) => {
                *e = entry;
                false
            }
            None => {
                self.insert_new(name, entry);
                true
            }
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn reserve(&mut self, more: usize) {
        self.entries.reserve_exact(more);
        let (entries, hasher) = (&self.entries, &self.hasher);
        self.index
            .reserve(more, |&i| hasher.hash_one(entries[i as usize].0.as_str()));
    }

    fn iter(&self) -> impl Iterator<Item = (&CompactString, &Entry)> {
        self.entries.iter().map(|(n, e)| (n, e))
    }

    /// Heap bytes held, from capacities.
    fn heap_bytes(&self) -> usize {
        let spilled: usize = self
            .entries
            .iter()
            .filter(|(k, _)| k.is_heap_allocated())
            .map(|(k, _)| k.capacity())
            .sum();
        self.entries.capacity() * std::mem::size_of::<(CompactString, Entry)>()
            + self.index.capacity() * (std::mem::size_of::<u32>() + 1)
            + self.dirty.capacity() * 4
            + self.dirty_bits.capacity() * 8
            + spilled
    }
}

/// Counter name to value, sharded by name.
pub struct CounterTable {
    shards: Box<[Mutex<Map>]>,
    /// Whether changes are listed for the shared store (see
    /// [`CounterTable::take_dirty`]); off for a node without a store.
    track_dirty: std::sync::atomic::AtomicBool,
    /// Picks the shard. A hasher of its own, with its own seed, so that the
    /// shard index is not correlated with the bucket bits inside a shard.
    shard_hasher: foldhash::fast::FixedState,
    /// Number of counters, kept beside the shards so that the limit check
    /// on the increment path does not lock every shard.
    len: AtomicUsize,
    /// Most counters an increment may create (recovery is never refused).
    counters_max: usize,
}

impl Default for CounterTable {
    fn default() -> Self {
        Self::new()
    }
}

/// Checks a counter name against the naming rules.
pub fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid("counter name", "it is empty"));
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(Error::invalid(
            "counter name",
            format!(
                "it is {} bytes long; the limit is {NAME_BYTES_MAX} bytes",
                name.len()
            ),
        ));
    }
    Ok(())
}

impl CounterTable {
    pub fn new() -> Self {
        Self::with_limit(usize::MAX)
    }

    /// A table whose increments may create at most `counters_max` counters.
    pub fn with_limit(counters_max: usize) -> Self {
        CounterTable {
            shards: (0..SHARDS).map(|_| Mutex::new(Map::default())).collect(),
            track_dirty: std::sync::atomic::AtomicBool::new(false),
            shard_hasher: foldhash::fast::FixedState::with_seed(0x7a11_7a11),
            len: AtomicUsize::new(0),
            counters_max,
        }
    }

    /// Index of the shard holding `name`.
    pub fn shard_of(&self, name: &str) -> usize {
        (self.shard_hasher.hash_one(name) as usize) % SHARDS
    }

    /// Adds `delta` to `name`. `commit` runs under the shard lock with the
    /// new value, must assign and return the increment's lsn (and journal it),
    /// and may fail; on any error the table is left unchanged.
    pub fn increment<F>(&self, name: &str, delta: i64, commit: F) -> Result<i64>
    where
        F: FnOnce(i64) -> Result<u64>,
    {
        let mut shard = self.shards[self.shard_of(name)].lock();
        // One lookup: nothing removes entries, and `commit` cannot reach
        // this locked shard, so the position stays valid below.
        let found = shard.position(name);
        let existing = found.map(|i| shard.entries[i].1.value);
        if existing.is_none() && self.len.load(Relaxed) >= self.counters_max {
            return Err(Error::LimitExceeded(format!(
                "the node holds {} counters, its limit; refusing to create '{name}'",
                self.counters_max
            )));
        }
        let current = existing.unwrap_or(0);
        let value = current.checked_add(delta).ok_or(Error::Overflow)?;
        let lsn = commit(value)?;
        let at = match found {
            Some(i) => {
                let entry = &mut shard.entries[i].1;
                debug_assert!(lsn > entry.lsn, "lsns of one counter must increase");
                *entry = Entry { value, lsn };
                i
            }
            None => {
                shard.insert_new(name, Entry { value, lsn });
                self.len.fetch_add(1, Relaxed);
                shard.len() - 1
            }
        };
        if self.track_dirty.load(Relaxed) {
            shard.mark(at);
        }
        Ok(value)
    }

    /// Sets an existing counter to zero. `commit` runs under the shard lock,
    /// must assign and return the change's lsn (and journal it), and may
    /// fail, leaving the table unchanged. Returns the value the counter
    /// held, or `None` (and `commit` is not called) if it does not exist.
    pub fn reset<F>(&self, name: &str, commit: F) -> Result<Option<i64>>
    where
        F: FnOnce() -> Result<u64>,
    {
        let mut shard = self.shards[self.shard_of(name)].lock();
        let Some(at) = shard.position(name) else {
            return Ok(None);
        };
        let old = shard.entries[at].1.value;
        let lsn = commit()?;
        let entry = &mut shard.entries[at].1;
        debug_assert!(lsn > entry.lsn, "lsns of one counter must increase");
        *entry = Entry { value: 0, lsn };
        if self.track_dirty.load(Relaxed) {
            shard.mark(at);
        }
        Ok(Some(old))
    }

    /// Applies a journaled increment during recovery: only if `lsn` is newer
    /// than the entry's, so that a record already folded into the snapshot
    /// is not counted twice. Returns whether it was applied.
    pub fn replay(&self, name: &str, delta: i64, lsn: u64) -> Result<bool> {
        self.replay_op(name, delta, lsn, Update::Add)
    }

    /// [`CounterTable::replay`] of an add or a set.
    pub fn replay_op(&self, name: &str, delta: i64, lsn: u64, update: Update) -> Result<bool> {
        let mut shard = self.shards[self.shard_of(name)].lock();
        let (applied, inserted) = replay_into(&mut shard, name, delta, lsn, update)?;
        if applied && self.track_dirty.load(Relaxed) {
            let at = shard.position(name).expect("just replayed");
            shard.mark(at);
        }
        if inserted {
            self.len.fetch_add(1, Relaxed);
        }
        Ok(applied)
    }

    /// Locks every shard whose index is `part` modulo `parts`, for the life
    /// of the returned [`Partition`]. Recovery replays the journal with one
    /// partition per thread: no lock or atomic per record, and the threads
    /// never touch the same shard.
    pub fn partition(&self, part: usize, parts: usize) -> Partition<'_> {
        assert!(part < parts && parts <= SHARDS);
        Partition {
            table: self,
            part,
            parts,
            guards: (part..SHARDS)
                .step_by(parts)
                .map(|i| self.shards[i].lock())
                .collect(),
            inserted: 0,
        }
    }

    /// Makes room for about `counters` counters in all, spread evenly, so
    /// that loading a snapshot does not rehash every shard several times.
    pub fn reserve(&self, counters: usize) {
        let per_shard = counters.div_ceil(SHARDS);
        for shard in self.shards.iter() {
            let mut map = shard.lock();
            let more = per_shard.saturating_sub(map.len());
            map.reserve(more);
        }
    }

    /// Sets a counter's entry outright (loading a snapshot).
    pub fn restore(&self, name: &str, entry: Entry) {
        if self.shards[self.shard_of(name)].lock().upsert(name, entry) {
            self.len.fetch_add(1, Relaxed);
        }
    }

    pub fn get(&self, name: &str) -> Option<Entry> {
        self.shards[self.shard_of(name)].lock().get(name).copied()
    }

    /// Number of counters.
    pub fn len(&self) -> usize {
        self.len.load(Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f` with every entry of shard `index`, under that shard's lock.
    /// Snapshots copy the table shard by shard this way; writers to other
    /// shards are not held up.
    pub fn for_each_in_shard(&self, index: usize, mut f: impl FnMut(&str, Entry)) {
        let shard = self.shards[index].lock();
        for (name, entry) in shard.iter() {
            f(name, *entry);
        }
    }

    /// Up to `limit` counters whose names start with `prefix` and sort after
    /// `after`, in name order. Costs a scan of the whole table.
    pub fn list(&self, prefix: &str, after: Option<&str>, limit: usize) -> Vec<(String, i64)> {
        let mut found: Vec<(String, i64)> = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock();
            for (name, entry) in shard.iter() {
                if name.starts_with(prefix) && after.is_none_or(|a| name.as_str() > a) {
                    found.push((name.to_string(), entry.value));
                }
            }
        }
        found.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        found.truncate(limit);
        found
    }

    /// Turns listing of changed counters on (for a node with a shared
    /// store) and lists exactly the counters for which `dirty` is true.
    pub fn track_dirty_from(&self, dirty: impl Fn(&str, Entry) -> bool) {
        self.track_dirty.store(true, Relaxed);
        for shard in self.shards.iter() {
            let mut map = shard.lock();
            map.clear_dirty();
            for i in 0..map.len() {
                let (name, entry) = &map.entries[i];
                if dirty(name, *entry) {
                    map.mark(i);
                }
            }
        }
    }

    /// Moves up to `max` changed counters (name, value, lsn) into `out`
    /// and unlists them; the rest stay listed for the next call. Each
    /// shard is read under its lock, so a taken entry is exactly the state
    /// of that counter at the moment it was taken.
    pub fn take_dirty(&self, max: usize, out: &mut Vec<(CompactString, i64, u64)>) {
        for shard in self.shards.iter() {
            if out.len() >= max {
                return;
            }
            let mut map = shard.lock();
            let Map {
                dirty,
                dirty_bits,
                entries,
                ..
            } = &mut *map;
            let n = dirty.len().min(max - out.len());
            let from = dirty.len() - n;
            for i in dirty.drain(from..) {
                let i = i as usize;
                dirty_bits[i / 64] &= !(1u64 << (i % 64));
                let (name, entry) = &entries[i];
                out.push((name.clone(), entry.value, entry.lsn));
            }
        }
    }

    /// Unlists `name` if its entry still carries `lsn` (the version just
    /// written to the store), so that the next flush does not write the
    /// same row again. A change since then keeps it listed.
    pub fn unlist_if_unchanged(&self, name: &str, lsn: u64) {
        let mut map = self.shards[self.shard_of(name)].lock();
        let Some(i) = map.position(name) else { return };
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        let listed = map.dirty_bits.get(word).is_some_and(|w| w & bit != 0);
        if listed && map.entries[i].1.lsn == lsn {
            map.dirty_bits[word] &= !bit;
            if let Some(at) = map.dirty.iter().position(|&d| d as usize == i) {
                map.dirty.swap_remove(at);
            }
        }
    }

    /// Number of counters listed as changed.
    pub fn dirty_count(&self) -> usize {
        self.shards.iter().map(|s| s.lock().dirty.len()).sum()
    }

    /// Bytes of heap the table holds, from its capacities.
    pub fn heap_bytes(&self) -> usize {
        self.shards.iter().map(|s| s.lock().heap_bytes()).sum()
    }
}

/// A journal record as the table replays it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayOp {
    pub name: CompactString,
    /// The delta to add, or with `set`, the value to set.
    pub delta: i64,
    pub lsn: u64,
    /// Whether `delta` is added or is the new value.
    pub update: Update,
}

/// How a replayed record changes its counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    /// `delta` is added (an increment, a replicated one, a revert).
    Add,
    /// `delta` is the new value (a shard adopted from the store).
    Set,
}

/// The replay rule shared by [`CounterTable::replay`] and [`Partition`]:
/// returns (applied, inserted).
fn replay_into(
    map: &mut Map,
    name: &str,
    delta: i64,
    lsn: u64,
    update: Update,
) -> Result<(bool, bool)> {
    match map.get_mut(name) {
        Some(entry) if entry.lsn >= lsn => Ok((false, false)),
        Some(entry) => {
            entry.value = match update {
                Update::Set => delta,
                Update::Add => entry.value.checked_add(delta).ok_or(Error::Overflow)?,
            };
            entry.lsn = lsn;
            Ok((true, false))
        }
        None => {
            map.insert_new(name, Entry { value: delta, lsn });
            Ok((true, true))
        }
    }
}

/// Exclusive hold on a subset of the shards; see [`CounterTable::partition`].
pub struct Partition<'a> {
    table: &'a CounterTable,
    part: usize,
    parts: usize,
    guards: Vec<parking_lot::MutexGuard<'a, Map>>,
    inserted: usize,
}

impl Partition<'_> {
    /// Replays `records` (in journal order, all of counters in `shard`,
    /// which must belong to this partition). Recovery sorts a segment's
    /// records into one bucket per shard first and applies them shard by
    /// shard, so that each shard's map stays in cache while its records are
    /// applied; replaying in journal order would miss the cache on nearly
    /// every record of a large table. Returns how many were applied, or the
    /// name and lsn of a record that overflowed its counter.
    pub fn replay_shard(
        &mut self,
        shard: usize,
        records: &[ReplayOp],
    ) -> std::result::Result<u64, (String, u64)> {
        assert_eq!(shard % self.parts, self.part, "shard outside the partition");
        let map = &mut self.guards[shard / self.parts];
        let mut applied = 0;
        for op in records {
            debug_assert_eq!(self.table.shard_of(&op.name), shard);
            let (a, inserted) = replay_into(map, &op.name, op.delta, op.lsn, op.update)
                .map_err(|_| (op.name.to_string(), op.lsn))?;
            applied += u64::from(a);
            self.inserted += usize::from(inserted);
        }
        Ok(applied)
    }

    /// Shards of this partition.
    pub fn shards(&self) -> impl Iterator<Item = usize> + use<> {
        (self.part..SHARDS).step_by(self.parts)
    }
}

impl Drop for Partition<'_> {
    fn drop(&mut self) {
        self.table.len.fetch_add(self.inserted, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    // Overflow is refused with Redis's wording and leaves the value alone.
    #[test]
    fn overflow_is_an_error_not_a_wrap() {
        let t = CounterTable::new();
        let mut lsn = 0;
        let mut next = || {
            lsn += 1;
            Ok(lsn)
        };
        t.increment("c", i64::MAX, |_| next()).unwrap();
        let err = t.increment("c", 1, |_| next()).unwrap_err();
        assert_eq!(err.to_string(), "increment or decrement would overflow");
        assert_eq!(t.get("c").unwrap().value, i64::MAX);
        t.increment("d", i64::MIN, |_| next()).unwrap();
        assert!(matches!(
            t.increment("d", -1, |_| next()),
            Err(Error::Overflow)
        ));
    }

    // A failing commit (journal refused the record) leaves no trace.
    #[test]
    fn failed_commit_changes_nothing() {
        let t = CounterTable::new();
        let r = t.increment("x", 5, |_| Err(Error::ShuttingDown));
        assert!(r.is_err());
        assert!(t.get("x").is_none());
        assert_eq!(t.len(), 0);
    }

    // Replay skips records at or below the entry's lsn: exactly-once restore.
    #[test]
    fn replay_skips_records_already_in_the_entry() {
        let t = CounterTable::new();
        t.restore("c", Entry { value: 10, lsn: 7 });
        assert!(!t.replay("c", 3, 7).unwrap());
        assert!(!t.replay("c", 3, 2).unwrap());
        assert!(t.replay("c", 3, 8).unwrap());
        assert_eq!(t.get("c").unwrap(), Entry { value: 13, lsn: 8 });
    }

    // Replaying bucketed records through partitions gives the same table
    // as replaying one record at a time.
    #[test]
    fn partitions_replay_like_the_plain_rule() {
        let one = CounterTable::new();
        let split = CounterTable::new();
        let records: Vec<(String, i64, u64)> = (0..5000u64)
            .map(|i| (format!("c{}", i % 700), (i % 13) as i64 - 6, i + 1))
            .collect();
        for (n, d, l) in &records {
            one.replay(n, *d, *l).unwrap();
        }
        let mut buckets: Vec<Vec<ReplayOp>> = vec![Vec::new(); SHARDS];
        for (n, d, l) in &records {
            buckets[split.shard_of(n)].push(ReplayOp {
                name: CompactString::from(n.as_str()),
                delta: *d,
                lsn: *l,
                update: Update::Add,
            });
        }
        let parts = 3;
        let mut applied = 0;
        for part in 0..parts {
            let mut p = split.partition(part, parts);
            for shard in p.shards() {
                applied += p.replay_shard(shard, &buckets[shard]).unwrap();
            }
        }
        assert_eq!(applied, records.len() as u64);
        assert_eq!(split.len(), one.len());
        for i in 0..700 {
            let name = format!("c{i}");
            assert_eq!(split.get(&name), one.get(&name));
        }
    }

    // A counter costs a bounded number of heap bytes at every table size:
    // the index's slack is 5 bytes a slot and the vectors grow by a quarter.
    #[test]
    fn heap_per_counter_is_bounded_at_every_size() {
        let t = CounterTable::new();
        let mut worst: f64 = 0.0;
        for i in 0..300_000u64 {
            t.replay(&format!("counter:{i:012}"), 1, i + 1).unwrap();
            if i % 9_973 == 0 && i > 20_000 {
                worst = worst.max(t.heap_bytes() as f64 / t.len() as f64);
            }
        }
        // 40-byte entries at up to 25% vector slack, plus the index.
        assert!(worst < 64.0, "worst heap bytes per counter {worst:.1}");
    }

    // With tracking on, every change lists its counter once; taking the
    // list in pieces yields each changed counter exactly once, at its
    // latest value.
    #[test]
    fn changed_counters_are_listed_once_until_taken() {
        let t = CounterTable::new();
        t.replay("old", 1, 1).unwrap();
        t.track_dirty_from(|name, _| name == "old");
        let mut lsn = 1;
        for i in 0..1000 {
            lsn += 1;
            t.increment(&format!("c{}", i % 100), 1, |_| Ok(lsn))
                .unwrap();
        }
        assert_eq!(t.dirty_count(), 101);
        let mut out = Vec::new();
        t.take_dirty(60, &mut out);
        assert_eq!(out.len(), 60);
        t.take_dirty(usize::MAX, &mut out);
        assert_eq!(out.len(), 101);
        let names: std::collections::BTreeSet<_> = out.iter().map(|r| r.0.to_string()).collect();
        assert_eq!(names.len(), 101, "a counter was taken twice");
        assert!(out.iter().all(|r| r.0 == "old" || r.1 == 10));
        assert_eq!(t.dirty_count(), 0);
        lsn += 1;
        t.increment("c5", 1, |_| Ok(lsn)).unwrap();
        out.clear();
        t.take_dirty(usize::MAX, &mut out);
        assert_eq!(out, vec![(CompactString::from("c5"), 11, lsn)]);
        // Unlisting applies only while the entry is unchanged.
        t.increment("c6", 1, |_| Ok(lsn + 1)).unwrap();
        t.unlist_if_unchanged("c6", lsn);
        assert_eq!(t.dirty_count(), 1, "a changed entry stays listed");
        t.unlist_if_unchanged("c6", lsn + 1);
        assert_eq!(t.dirty_count(), 0);
    }

    // The counter limit refuses new counters only, never existing ones.
    #[test]
    fn counter_limit_refuses_only_new_counters() {
        let t = CounterTable::with_limit(2);
        let mut lsn = 0;
        let mut next = || {
            lsn += 1;
            Ok(lsn)
        };
        t.increment("a", 1, |_| next()).unwrap();
        t.increment("b", 1, |_| next()).unwrap();
        assert!(matches!(
            t.increment("c", 1, |_| next()),
            Err(Error::LimitExceeded(_))
        ));
        assert_eq!(t.increment("a", 1, |_| next()).unwrap(), 2);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn names_are_bounded_and_non_empty() {
        assert!(validate_name("").is_err());
        assert!(validate_name(&"a".repeat(NAME_BYTES_MAX)).is_ok());
        assert!(validate_name(&"a".repeat(NAME_BYTES_MAX + 1)).is_err());
    }

    proptest! {
        // The table agrees with a BTreeMap model under any sequence of
        // increments, including ones that overflow, and listing is ordered.
        #[test]
        fn table_matches_model(ops in proptest::collection::vec(
            (0u8..20, prop_oneof![any::<i64>(), -1000i64..1000]), 0..400)) {
            let t = CounterTable::new();
            let mut model: BTreeMap<String, i64> = BTreeMap::new();
            let mut lsn = 0u64;
            for (k, d) in ops {
                let name = format!("k{k}");
                let cur = model.get(&name).copied().unwrap_or(0);
                let r = t.increment(&name, d, |_| { lsn += 1; Ok(lsn) });
                match cur.checked_add(d) {
                    Some(v) => { prop_assert_eq!(r.unwrap(), v); model.insert(name, v); }
                    None => prop_assert!(matches!(r, Err(Error::Overflow))),
                }
            }
            prop_assert_eq!(t.len(), model.len());
            for (k, v) in &model {
                prop_assert_eq!(t.get(k).unwrap().value, *v);
            }
            let listed = t.list("k1", None, usize::MAX);
            let expected: Vec<(String, i64)> = model.iter()
                .filter(|(k, _)| k.starts_with("k1"))
                .map(|(k, v)| (k.clone(), *v)).collect();
            prop_assert_eq!(listed, expected);
        }
    }
}
