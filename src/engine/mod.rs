//! The engine: one node's counters and their durability on its own disk,
//! knowing nothing of other nodes or of any store.
//!
//! [`table`] is the pure counter state, [`idempotency`] the keys seen,
//! [`journal`] the append-only, group-committed log, [`snapshot`] the
//! consistent cut that bounds it, [`recovery`] the rules that rebuild the
//! state at start, and [`storage`] the one seam to the file system.

pub mod deadlines;
pub mod idempotency;
pub mod journal;
pub mod recovery;
pub mod snapshot;
pub mod storage;
pub mod table;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use deadlines::{Deadlines, ExpireIf};
use idempotency::{IdempotencyKeys, Seen, now_ms};
use journal::{Journal, JournalConfig, Kind, Record, Urgency};
use recovery::{JOURNAL_DIR, RecoveryReport};
use storage::Storage;
use table::CounterTable;

/// An idempotency key as it is journaled: the key and when it expires, in
/// milliseconds since the Unix epoch.
pub type KeyExpiry<'a> = (&'a str, u64);

/// One change to the node's counters. Every change goes through
/// [`Engine::apply`], which journals it and applies it in one step under
/// the counter's shard lock, so the lsns of one counter increase in journal
/// order whatever kind of change assigned them.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    /// A client's increment at `memory` or `local` durability. With a key
    /// already seen, nothing is applied ([`Applied::Duplicate`]).
    Increment {
        name: &'a str,
        delta: i64,
        key: Option<KeyExpiry<'a>>,
        urgency: Urgency,
    },
    /// A `replicated` increment, applied inside the store transaction of
    /// `epoch` that will make it durable. With a key already seen, nothing
    /// is applied.
    Replicated {
        name: &'a str,
        delta: i64,
        key: Option<KeyExpiry<'a>>,
        epoch: u64,
    },
    /// Takes back replicated increment `of_lsn` (of `delta`), whose store
    /// transaction did not commit, and forgets its key.
    Revert {
        name: &'a str,
        delta: i64,
        of_lsn: u64,
        key: Option<KeyExpiry<'a>>,
    },
    /// Sets this node's shard of `name` to `value`, the store's newer
    /// version of it (after a lost or stale disk).
    Adopt { name: &'a str, value: i64 },
}

/// What [`Engine::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Applied and queued in the journal: the counter's new value, the lsn
    /// assigned, and the journal position just past the record (durable
    /// once the journal's durable position reaches it).
    New { value: i64, lsn: u64, end_pos: u64 },
    /// The key had been seen: nothing was applied. `value` is this node's
    /// shard of the counter now.
    Duplicate { value: i64 },
}

/// One node's counters, keys and journal. See the module docs.
pub struct Engine {
    data_dir: PathBuf,
    key_retention: Duration,
    storage: Arc<dyn Storage>,
    table: CounterTable,
    keys: IdempotencyKeys,
    /// Counters' expiries (used by a node without a store).
    deadlines: Deadlines,
    journal: Journal,
    /// Next lsn to assign; an atomic, not a lock, because it is bumped on
    /// every increment from every connection.
    next_lsn: AtomicU64,
    /// Journal position the newest snapshot covers.
    last_snapshot_pos: AtomicU64,
    /// One snapshot at a time.
    snapshot_lock: Mutex<()>,
    metrics: Arc<Metrics>,
}

impl Engine {
    /// Recovers the node's state from `config.data_dir` on `storage` and
    /// starts the journal writer. Returns the engine and what recovery
    /// found.
    pub fn open(
        config: &Config,
        storage: Arc<dyn Storage>,
        metrics: Arc<Metrics>,
    ) -> Result<(Engine, RecoveryReport)> {
        let dir = config.data_dir.clone();
        let table = CounterTable::with_limit(config.counters_max);
        let keys = IdempotencyKeys::new(config.idempotency_keys_max);
        let deadlines = Deadlines::default();
        let report = recovery::recover(
            storage.as_ref(),
            &dir,
            &table,
            &keys,
            &deadlines,
            config.recovery_mode,
            now_ms(),
        )?;
        metrics
            .recovery_ms
            .store(report.duration.as_millis() as u64, Ordering::Relaxed);
        metrics
            .recovery_records_replayed
            .store(report.records_applied, Ordering::Relaxed);
        let journal = Journal::start(
            storage.clone(),
            &dir.join(JOURNAL_DIR),
            report.end_pos,
            report.segments.clone(),
            JournalConfig {
                segment_bytes_max: config.segment_bytes_max,
                memory_sync_delay: config.memory_sync_delay,
                queue_bytes_max: config.journal_queue_bytes_max,
                idle_sync_grace: journal::IDLE_SYNC_GRACE,
            },
            metrics.clone(),
        )?;
        let snapshot_pos = report
            .snapshot
            .as_ref()
            .map_or(0, |(_, meta)| meta.covers_pos);
        let engine = Engine {
            data_dir: dir,
            key_retention: config.idempotency_retention,
            storage,
            table,
            keys,
            deadlines,
            journal,
            next_lsn: AtomicU64::new(report.next_lsn),
            last_snapshot_pos: AtomicU64::new(snapshot_pos),
            snapshot_lock: Mutex::new(()),
            metrics,
        };
        Ok((engine, report))
    }

    /// Journals and applies one change. See [`Change`] for each kind.
    ///
    /// Errors: [`Error::Overflow`], [`Error::LimitExceeded`] (too many
    /// counters or keys), [`Error::JournalFailed`], [`Error::ShuttingDown`];
    /// in every case nothing was applied.
    pub fn apply(&self, change: Change<'_>) -> Result<Applied> {
        match change {
            Change::Increment {
                name,
                delta,
                key,
                urgency,
            } => self.apply_keyed(name, delta, Kind::Increment, key, urgency),
            Change::Replicated {
                name,
                delta,
                key,
                epoch,
            } => self.apply_keyed(name, delta, Kind::Replicated { epoch }, key, Urgency::Later),
            Change::Revert {
                name,
                delta,
                of_lsn,
                key,
            } => {
                let negated = delta.checked_neg().ok_or(Error::Overflow)?;
                let applied = self.apply_journaled(
                    name,
                    negated,
                    Kind::Revert { of_lsn },
                    key,
                    Urgency::Later,
                )?;
                if let Some((k, _)) = key {
                    self.keys.remove(k);
                }
                Ok(applied)
            }
            Change::Adopt { name, value } => {
                // Recovery replays an adopt as clearing the expiry.
                let mut deadlines = self.deadlines.lock();
                deadlines.set(name, None);
                let (lsn, end_pos) =
                    self.journal_next(Kind::Adopt, name, value, None, Urgency::Later)?;
                self.table.replay_op(name, value, lsn, table::Update::Set)?;
                Ok(Applied::New {
                    value,
                    lsn,
                    end_pos,
                })
            }
        }
    }

    /// Sets counter `name` to zero: journaled as an `adopt` record of 0
    /// (recovery replays it as a set), under the counter's shard lock so
    /// that its lsn is ordered with the counter's increments, and synced
    /// with the journal's next sync (wait for the position returned).
    /// Returns the value the counter held and the journal position just
    /// past the record; `None`, and nothing journaled, if the counter does
    /// not exist.
    ///
    /// A delete also clears the counter's expiry: recovery replays an adopt
    /// record that way, and the map's lock is held across the append so
    /// that the journal orders it with the counter's expiry records.
    pub fn reset(&self, name: &str) -> Result<Option<(i64, u64)>> {
        table::validate_name(name)?;
        let mut deadlines = self.deadlines.lock();
        self.reset_locked(&mut deadlines, name)
    }

    fn reset_locked(
        &self,
        deadlines: &mut deadlines::Inner,
        name: &str,
    ) -> Result<Option<(i64, u64)>> {
        let mut end_pos = 0;
        let old = self.table.reset(name, || {
            let (lsn, pos) = self.journal_next(Kind::Adopt, name, 0, None, Urgency::Now)?;
            end_pos = pos;
            Ok(lsn)
        })?;
        if old.is_some() {
            deadlines.set(name, None);
        }
        Ok(old.map(|v| (v, end_pos)))
    }

    /// Sets counter `name` to expire at the unix time `at_ms` (`None`:
    /// never, clearing its expiry), if `when` allows it: journaled as an
    /// expire record and synced with the journal's next sync (wait for the
    /// position returned). Returns whether the expiry changed and the
    /// journal position to wait for (0 if nothing was journaled); `None`,
    /// and nothing journaled, if the counter does not exist.
    pub fn set_expiry(
        &self,
        name: &str,
        at_ms: Option<u64>,
        when: ExpireIf,
    ) -> Result<Option<(bool, u64)>> {
        table::validate_name(name)?;
        let mut deadlines = self.deadlines.lock();
        if self.table.get(name).is_none() {
            return Ok(None);
        }
        let current = deadlines.get(name);
        let allowed = match at_ms {
            Some(at) => at > 0 && when.allows(current, at),
            None => current.is_some(),
        };
        if !allowed {
            return Ok(Some((false, 0)));
        }
        let kind = Kind::Expire {
            at_ms: at_ms.unwrap_or(0),
        };
        let (_, end_pos) = self.journal_next(kind, name, 0, None, Urgency::Now)?;
        deadlines.set(name, at_ms);
        Ok(Some((true, end_pos)))
    }

    /// Deletes counter `name` if it still expires at `at_ms` (the deadline
    /// read from [`Engine::deadlines`]): as [`Engine::reset`], which also
    /// clears the expiry. `None`, and nothing journaled, if its expiry has
    /// changed since.
    pub fn expire(&self, name: &str, at_ms: u64) -> Result<Option<(i64, u64)>> {
        let mut deadlines = self.deadlines.lock();
        if deadlines.get(name) != Some(at_ms) {
            return Ok(None);
        }
        let done = self.reset_locked(&mut deadlines, name)?;
        if done.is_none() {
            // No such counter (never the case: an expiry is set only on a
            // counter that exists, and counters are never removed).
            deadlines.set(name, None);
        }
        Ok(done)
    }

    /// Counters' expiries.
    pub fn deadlines(&self) -> &Deadlines {
        &self.deadlines
    }

    /// An increment that carries an optional key: the key is checked,
    /// room is made for it, the increment is applied and the key recorded,
    /// all under the key's lock, so two requests with one key never both
    /// apply.
    fn apply_keyed(
        &self,
        name: &str,
        delta: i64,
        kind: Kind,
        key: Option<KeyExpiry<'_>>,
        urgency: Urgency,
    ) -> Result<Applied> {
        let Some((k, expiry)) = key else {
            return self.apply_journaled(name, delta, kind, None, urgency);
        };
        let fingerprint = idempotency::fingerprint(name, delta);
        self.keys.with_key(k, now_ms(), |slot| {
            match slot.seen_as(fingerprint) {
                Seen::Same => {
                    return Ok(Applied::Duplicate {
                        value: self.table.get(name).map_or(0, |e| e.value),
                    });
                }
                Seen::Different => return Err(idempotency::reused_error(k)),
                Seen::No => {}
            }
            slot.check_room()?;
            let applied = self.apply_journaled(name, delta, kind, key, urgency)?;
            slot.insert(expiry, fingerprint);
            Ok(applied)
        })
    }

    /// Adds `delta` to `name`, assigning the lsn and queueing the record
    /// under the counter's shard lock.
    fn apply_journaled(
        &self,
        name: &str,
        delta: i64,
        kind: Kind,
        key: Option<KeyExpiry<'_>>,
        urgency: Urgency,
    ) -> Result<Applied> {
        let mut at = (0, 0);
        let value = self.table.increment(name, delta, |_| {
            at = self.journal_next(kind, name, delta, key, urgency)?;
            Ok(at.0)
        })?;
        Ok(Applied::New {
            value,
            lsn: at.0,
            end_pos: at.1,
        })
    }

    /// Assigns the next lsn to a record and queues it in the journal.
    /// Returns the lsn and the journal position just past the record.
    fn journal_next(
        &self,
        kind: Kind,
        name: &str,
        delta: i64,
        key: Option<KeyExpiry<'_>>,
        urgency: Urgency,
    ) -> Result<(u64, u64)> {
        let lsn = self.next_lsn.fetch_add(1, Ordering::SeqCst);
        let record = Record {
            kind,
            lsn,
            delta,
            name,
            key,
        };
        let pos = self.journal.append(&record, urgency)?;
        Ok((lsn, pos))
    }

    /// Journals that the shared store committed this node's rows up to
    /// `(epoch, lsn)` (a `settled` record, see [`Kind::Settled`]); `name`
    /// is a counter of that commit. Changes no counter and takes no lsn;
    /// synced with the journal's next sync, not waited for.
    pub fn journal_settled(&self, name: &str, epoch: u64, lsn: u64) -> Result<()> {
        let record = Record {
            kind: Kind::Settled { epoch },
            lsn,
            delta: 0,
            name,
            key: None,
        };
        self.journal.append(&record, Urgency::Later).map(|_| ())
    }

    /// When a key recorded now expires.
    pub fn key_expiry(&self, now_ms: u64) -> u64 {
        now_ms.saturating_add(self.key_retention.as_millis() as u64)
    }

    /// The counter table (read it; change it only through [`Engine::apply`]).
    pub fn table(&self) -> &CounterTable {
        &self.table
    }

    /// The idempotency keys this node has seen.
    pub fn keys(&self) -> &IdempotencyKeys {
        &self.keys
    }

    /// The journal (its positions, progress and failure).
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// The lsn the next change will get.
    pub fn next_lsn(&self) -> u64 {
        self.next_lsn.load(Ordering::SeqCst)
    }

    /// The highest lsn assigned so far (0 before the first).
    pub fn applied_lsn(&self) -> u64 {
        self.next_lsn().saturating_sub(1)
    }

    /// Makes sure no lsn up to `lsn` is ever assigned again (a stale or
    /// lost disk recovers a lower next lsn than the node had reached).
    pub fn skip_lsns_through(&self, lsn: u64) {
        self.next_lsn.fetch_max(lsn + 1, Ordering::SeqCst);
    }

    /// Waits until everything queued so far is durable: a barrier.
    pub async fn sync(&self) -> Result<()> {
        let pos = self.journal.end_pos();
        self.journal.request_sync();
        self.journal.wait_durable(pos).await
    }

    /// [`Engine::sync`] for a blocking thread.
    pub fn sync_blocking(&self) -> Result<()> {
        self.journal.wait_durable_blocking(self.journal.end_pos())
    }

    /// Journal bytes written since the newest snapshot.
    pub fn journal_bytes_since_snapshot(&self) -> u64 {
        self.journal
            .end_pos()
            .saturating_sub(self.last_snapshot_pos.load(Ordering::Acquire))
    }

    /// Journal position the newest snapshot covers.
    pub fn last_snapshot_pos(&self) -> u64 {
        self.last_snapshot_pos.load(Ordering::Acquire)
    }

    /// Forgets idempotency keys past their retention; returns how many.
    pub fn purge_expired_keys(&self) -> usize {
        self.keys.purge_expired(now_ms())
    }

    /// Takes a snapshot now and drops the journal segments and older
    /// snapshots it covers. Returns the snapshot's path. The caller makes
    /// sure no change whose fate is open is captured (see
    /// `Node::snapshot`).
    pub fn snapshot(&self) -> Result<PathBuf> {
        let _one_at_a_time = self.snapshot_lock.lock();
        let started = Instant::now();
        let covers = self.journal.end_pos();
        let dir = &self.data_dir;
        let (path, meta) = snapshot::write(
            self.storage.as_ref(),
            dir,
            covers,
            &self.table,
            &self.keys,
            &self.deadlines,
            &self.next_lsn,
            now_ms(),
        )?;
        // The new snapshot is durable: older snapshots and the segments it
        // covers are no longer needed.
        let names = self
            .storage
            .list(dir)
            .map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
        for old in names
            .iter()
            .filter_map(|n| snapshot::parse_file_name(n))
            .filter(|&p| p < covers)
        {
            let p = dir.join(snapshot::file_name(old));
            self.storage
                .remove(&p)
                .map_err(|e| Error::io(format!("removing {}", p.display()), e))?;
        }
        let removed = self.journal.remove_segments_before(covers)?;
        let before = self.last_snapshot_pos.swap(covers, Ordering::AcqRel);
        debug_assert!(before <= covers, "snapshots cover ever more of the journal");
        let ms = started.elapsed().as_millis() as u64;
        self.metrics
            .snapshots_written
            .fetch_add(1, Ordering::Relaxed);
        self.metrics.snapshot_last_ms.store(ms, Ordering::Relaxed);
        tracing::info!(
            path = %path.display(),
            counters = meta.counters,
            keys = meta.keys,
            bytes = meta.bytes,
            segments_removed = removed,
            ms,
            "snapshot written"
        );
        Ok(path)
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The storage the engine runs on.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Without an explicit shutdown, what is queued is still synced.
        self.journal.close();
    }
}
