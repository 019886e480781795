//! Idempotency keys: which keys this node has applied, until when.
//!
//! Pure state, like the counter table: no I/O. Keys reach the journal inside
//! the increment record that carries them and reach snapshots with their
//! expiry, so a key and its expiry survive restarts.
//!
//! A key's check and its increment must be atomic, or two requests with the
//! same key could both be applied. The node holds the key's shard lock (via
//! [`IdempotencyKeys::with_key`]) across the check, the increment and the
//! insertion. Lock order: key shard, then counter shard, then journal queue.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use compact_str::CompactString;
use parking_lot::Mutex;

use crate::error::{Error, Result};

/// Longest idempotency key, in bytes.
pub const KEY_BYTES_MAX: usize = 128;

/// Number of independently locked shards.
const SHARDS: usize = 64;

/// A key's expiry and the fingerprint of the request it came with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    expiry_ms: u64,
    /// [`fingerprint`] of the first request's counter and delta; 0 when
    /// unknown (a key restored from a snapshot of version 1).
    fingerprint: u64,
}

type Map = hashbrown::HashMap<CompactString, Entry, foldhash::fast::RandomState>;

/// What a request's key says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Not seen (or expired): apply it.
    No,
    /// Seen with the same counter and delta (or with a fingerprint not
    /// known): a retry, not applied again.
    Same,
    /// Seen with another counter or delta: not a retry, refused.
    Different,
}

/// A stable 64-bit fingerprint of an increment's counter and delta,
/// persisted in snapshots, so it must never change between versions:
/// FNV-1a over the name, a 0xff separator (never in UTF-8) and the delta's
/// little-endian bytes. Never 0, which means "unknown".
pub fn fingerprint(name: &str, delta: i64) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    for b in name.bytes().chain([0xff]).chain(delta.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    h.max(1)
}

/// The refusal of a key reused with another counter or delta.
pub fn reused_error(key: &str) -> Error {
    Error::invalid(
        "idempotency key",
        format!(
            "'{key}' was first used with another counter or delta; a key names one \
             increment: use a new key for a different one"
        ),
    )
}

/// Checks an idempotency key against the rules.
pub fn validate_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::invalid("idempotency key", "it is empty"));
    }
    if key.len() > KEY_BYTES_MAX {
        return Err(Error::invalid(
            "idempotency key",
            format!(
                "it is {} bytes long; the limit is {KEY_BYTES_MAX} bytes",
                key.len()
            ),
        ));
    }
    Ok(())
}

/// Keys seen, each with the unix time in milliseconds when it expires.
pub struct IdempotencyKeys {
    shards: Box<[Mutex<Map>]>,
    hasher: foldhash::fast::FixedState,
    len: AtomicUsize,
    keys_max: usize,
}

/// A key's shard, locked; see [`IdempotencyKeys::with_key`].
pub struct KeySlot<'a> {
    map: parking_lot::MutexGuard<'a, Map>,
    len: &'a AtomicUsize,
    keys_max: usize,
    key: &'a str,
    now_ms: u64,
}

impl KeySlot<'_> {
    /// Whether the key was seen and has not expired.
    pub fn seen(&self) -> bool {
        self.map
            .get(self.key)
            .is_some_and(|e| e.expiry_ms > self.now_ms)
    }

    /// Whether the key was seen, and with the request of `fingerprint`.
    pub fn seen_as(&self, fingerprint: u64) -> Seen {
        match self.map.get(self.key) {
            Some(e) if e.expiry_ms > self.now_ms => {
                if e.fingerprint == 0 || e.fingerprint == fingerprint {
                    Seen::Same
                } else {
                    Seen::Different
                }
            }
            _ => Seen::No,
        }
    }

    /// Fails if recording one more key would break the limit.
    pub fn check_room(&self) -> Result<()> {
        if !self.map.contains_key(self.key) && self.len.load(Relaxed) >= self.keys_max {
            return Err(Error::LimitExceeded(format!(
                "the node holds {} idempotency keys, its limit (Config::idempotency_keys_max); \
                 raise it or shorten Config::idempotency_retention",
                self.keys_max
            )));
        }
        Ok(())
    }

    /// Records the key with its expiry and its request's fingerprint.
    pub fn insert(&mut self, expiry_ms: u64, fingerprint: u64) {
        let entry = Entry {
            expiry_ms,
            fingerprint,
        };
        if self
            .map
            .insert(CompactString::from(self.key), entry)
            .is_none()
        {
            self.len.fetch_add(1, Relaxed);
        }
    }
}

impl IdempotencyKeys {
    pub fn new(keys_max: usize) -> Self {
        IdempotencyKeys {
            shards: (0..SHARDS).map(|_| Mutex::new(Map::default())).collect(),
            hasher: foldhash::fast::FixedState::with_seed(0x1de4),
            len: AtomicUsize::new(0),
            keys_max,
        }
    }

    fn shard(&self, key: &str) -> &Mutex<Map> {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    /// Locks `key`'s shard and hands `f` a slot to check and record it.
    pub fn with_key<R>(&self, key: &str, now_ms: u64, f: impl FnOnce(&mut KeySlot<'_>) -> R) -> R {
        let mut slot = KeySlot {
            map: self.shard(key).lock(),
            len: &self.len,
            keys_max: self.keys_max,
            key,
            now_ms,
        };
        f(&mut slot)
    }

    /// Records a key seen in the journal or a snapshot, keeping the later
    /// expiry if it is already known, and a known fingerprint over an
    /// unknown one. Expired keys are skipped.
    pub fn restore(&self, key: &str, expiry_ms: u64, fingerprint: u64, now_ms: u64) {
        if expiry_ms <= now_ms {
            return;
        }
        let mut map = self.shard(key).lock();
        match map.get_mut(key) {
            Some(e) => {
                e.expiry_ms = e.expiry_ms.max(expiry_ms);
                if e.fingerprint == 0 {
                    e.fingerprint = fingerprint;
                }
            }
            None => {
                map.insert(
                    CompactString::from(key),
                    Entry {
                        expiry_ms,
                        fingerprint,
                    },
                );
                self.len.fetch_add(1, Relaxed);
            }
        }
    }

    /// Forgets a key (its increment was taken back).
    pub fn remove(&self, key: &str) {
        if self.shard(key).lock().remove(key).is_some() {
            self.len.fetch_sub(1, Relaxed);
        }
    }

    /// Drops expired keys; returns how many.
    pub fn purge_expired(&self, now_ms: u64) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut map = shard.lock();
            let before = map.len();
            map.retain(|_, e| e.expiry_ms > now_ms);
            removed += before - map.len();
        }
        self.len.fetch_sub(removed, Relaxed);
        removed
    }

    pub fn len(&self) -> usize {
        self.len.load(Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f` with every live key of shard `index`, its expiry and its
    /// fingerprint (for snapshots).
    pub fn for_each_in_shard(&self, index: usize, now_ms: u64, mut f: impl FnMut(&str, u64, u64)) {
        let map = self.shards[index].lock();
        for (k, e) in map.iter() {
            if e.expiry_ms > now_ms {
                f(k, e.expiry_ms, e.fingerprint);
            }
        }
    }

    pub const SHARDS: usize = SHARDS;
}

/// Milliseconds since the unix epoch, by the wall clock (key expiry must
/// mean the same thing after a restart, so a monotonic clock will not do).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A key reused with another counter or delta is told apart from a
    // retry; one whose fingerprint is unknown (an old snapshot) is taken
    // for a retry, as before.
    #[test]
    fn a_key_knows_its_request() {
        let keys = IdempotencyKeys::new(10);
        let fp = fingerprint("c", 5);
        assert_ne!(fp, fingerprint("c", 6));
        assert_ne!(fp, fingerprint("d", 5));
        // The separator keeps "c" + 0x35.. apart from a name with those bytes.
        assert_ne!(fingerprint("c", 0x35), fingerprint("c5", 0));
        keys.with_key("k", 100, |s| {
            assert_eq!(s.seen_as(fp), Seen::No);
            s.insert(200, fp);
        });
        assert_eq!(keys.with_key("k", 150, |s| s.seen_as(fp)), Seen::Same);
        assert_eq!(
            keys.with_key("k", 150, |s| s.seen_as(fingerprint("c", 6))),
            Seen::Different
        );
        assert_eq!(keys.with_key("k", 250, |s| s.seen_as(fp)), Seen::No);
        keys.restore("old", 300, 0, 100);
        assert_eq!(keys.with_key("old", 150, |s| s.seen_as(fp)), Seen::Same);
        // A later restore with the fingerprint fills it in.
        keys.restore("old", 300, fp, 100);
        assert_eq!(
            keys.with_key("old", 150, |s| s.seen_as(fingerprint("x", 1))),
            Seen::Different
        );
        // Stable across builds: the value is part of the snapshot format.
        assert_eq!(fingerprint("", 0), 0x2032_dd64_3620_252e);
    }

    // A key is seen until it expires; the limit refuses new keys only.
    #[test]
    fn keys_expire_and_are_bounded() {
        let keys = IdempotencyKeys::new(1);
        keys.with_key("a", 100, |s| {
            assert!(!s.seen());
            s.check_room().unwrap();
            s.insert(200, fingerprint("c", 1));
        });
        assert!(keys.with_key("a", 150, |s| s.seen()));
        assert!(!keys.with_key("a", 200, |s| s.seen()));
        assert!(keys.with_key("b", 150, |s| s.check_room()).is_err());
        assert!(keys.with_key("a", 150, |s| s.check_room()).is_ok());
        assert_eq!(keys.purge_expired(250), 1);
        assert_eq!(keys.len(), 0);
        keys.restore("c", 10, 1, 20);
        assert_eq!(keys.len(), 0, "expired keys are not restored");
    }
}
