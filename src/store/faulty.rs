//! A store that fails on demand, for tests of what the node does when the
//! store is down or a commit's outcome is unknown.
//!
//! [`FaultyStore`] wraps any [`Store`] and passes every call through until
//! a [`Fault`] is set; the fault is read at each call, so a test can switch
//! it in the middle of a transaction. It must never be used outside tests:
//! it exists to make the failure cases of the contract happen at will.

use std::sync::Arc;

use parking_lot::Mutex;

use super::{KeyRow, NodeRow, Registration, ShardRow, Store, StoreError, StoreTx, Version};

/// What the wrapped store does wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Every call fails with [`StoreError::Unavailable`] and does nothing;
    /// an open transaction is rolled back at commit.
    Outage,
    /// Commits are not carried out, and report
    /// [`StoreError::Indeterminate`]: the connection died before the
    /// server got the commit.
    CommitLost,
    /// Commits are carried out, and report [`StoreError::Indeterminate`]:
    /// the connection died before the acknowledgement came back.
    CommitUnacknowledged,
    /// Commits wait until the fault is changed (a primary waiting for a
    /// standby, a frozen server), then behave as the new fault says; with
    /// no fault, as [`Fault::CommitLost`] (the wait was cut off).
    CommitHeld,
}

/// A [`Store`] with a switchable [`Fault`].
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    fault: Mutex<Option<Fault>>,
    /// Wakes commits held by [`Fault::CommitHeld`] when the fault changes.
    changed: parking_lot::Condvar,
    /// Commits held right now.
    held: std::sync::atomic::AtomicUsize,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn Store>) -> FaultyStore {
        FaultyStore {
            inner,
            fault: Mutex::new(None),
            changed: parking_lot::Condvar::new(),
            held: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Sets (or with `None`, clears) the fault for every later call.
    pub fn set_fault(&self, fault: Option<Fault>) {
        *self.fault.lock() = fault;
        self.changed.notify_all();
    }

    /// How many commits [`Fault::CommitHeld`] holds right now.
    pub fn commits_held(&self) -> usize {
        self.held.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn fault(&self) -> Option<Fault> {
        *self.fault.lock()
    }

    fn check(&self) -> Result<(), StoreError> {
        match self.fault() {
            Some(Fault::Outage) => Err(outage()),
            _ => Ok(()),
        }
    }
}

fn outage() -> StoreError {
    StoreError::Unavailable("injected fault: the store is down".into())
}

impl Store for FaultyStore {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn register_above(
        &self,
        node_id: &str,
        address: &str,
        now_ms: u64,
        floor: u64,
    ) -> Result<Registration, StoreError> {
        self.check()?;
        self.inner.register_above(node_id, address, now_ms, floor)
    }

    fn begin_at(
        &self,
        node_id: &str,
        epoch: u64,
        written: Version,
    ) -> Result<Box<dyn StoreTx + '_>, StoreError> {
        self.check()?;
        Ok(Box::new(FaultyTx {
            inner: self.inner.begin_at(node_id, epoch, written)?,
            store: self,
        }))
    }

    fn heartbeat_at(
        &self,
        node_id: &str,
        epoch: u64,
        written: Version,
        now_ms: u64,
        applied_lsn: u64,
    ) -> Result<(), StoreError> {
        self.check()?;
        self.inner
            .heartbeat_at(node_id, epoch, written, now_ms, applied_lsn)
    }

    fn load_shard(&self, node_id: &str) -> Result<Vec<ShardRow>, StoreError> {
        self.check()?;
        self.inner.load_shard(node_id)
    }

    fn changes_since(
        &self,
        node_id: &str,
        after: Version,
        limit: usize,
    ) -> Result<Vec<ShardRow>, StoreError> {
        self.check()?;
        self.inner.changes_since(node_id, after, limit)
    }

    fn read_counter(&self, counter: &str) -> Result<Vec<ShardRow>, StoreError> {
        self.check()?;
        self.inner.read_counter(counter)
    }

    fn set_node_state(
        &self,
        node_id: &str,
        epoch: u64,
        state: super::NodeState,
    ) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.set_node_state(node_id, epoch, state)
    }

    fn deleted_since(&self, after: u64, limit: usize) -> Result<Vec<(u64, ShardRow)>, StoreError> {
        self.check()?;
        self.inner.deleted_since(after, limit)
    }

    fn nodes(&self) -> Result<Vec<NodeRow>, StoreError> {
        self.check()?;
        self.inner.nodes()
    }

    fn key(&self, key: &str) -> Result<Option<KeyRow>, StoreError> {
        self.check()?;
        self.inner.key(key)
    }

    fn purge_expired_keys(&self, now_ms: u64, limit: usize) -> Result<u64, StoreError> {
        self.check()?;
        self.inner.purge_expired_keys(now_ms, limit)
    }

    fn expiry(&self, counter: &str) -> Result<Option<u64>, StoreError> {
        self.check()?;
        self.inner.expiry(counter)
    }

    fn set_expiry(
        &self,
        counter: &str,
        at_ms: u64,
        when: super::ExpireIf,
    ) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.set_expiry(counter, at_ms, when)
    }

    fn clear_expiry(&self, counter: &str) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.clear_expiry(counter)
    }

    fn due_expiries(&self, now_ms: u64, limit: usize) -> Result<Vec<(String, u64)>, StoreError> {
        self.check()?;
        self.inner.due_expiries(now_ms, limit)
    }

    fn commit_settled(&self) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.commit_settled()
    }

    fn replication(&self) -> Result<Option<super::Replication>, StoreError> {
        self.check()?;
        self.inner.replication()
    }
}

struct FaultyTx<'a> {
    inner: Box<dyn StoreTx + 'a>,
    store: &'a FaultyStore,
}

impl StoreTx for FaultyTx<'_> {
    fn insert_keys(&mut self, keys: &[KeyRow]) -> Result<Vec<bool>, StoreError> {
        self.store.check()?;
        self.inner.insert_keys(keys)
    }

    fn delete_keys(&mut self, keys: &[&str]) -> Result<(), StoreError> {
        self.store.check()?;
        self.inner.delete_keys(keys)
    }

    fn upsert_shards(&mut self, rows: &[(&str, i64, Version)]) -> Result<(), StoreError> {
        self.store.check()?;
        self.inner.upsert_shards(rows)
    }

    fn set_marks(
        &mut self,
        flushed: Version,
        written: Version,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.store.check()?;
        self.inner.set_marks(flushed, written, now_ms)
    }

    fn delete_counter(
        &mut self,
        counter: &str,
        now_ms: u64,
        expiring: Option<u64>,
    ) -> Result<Option<super::DeletedCounter>, StoreError> {
        self.store.check()?;
        self.inner.delete_counter(counter, now_ms, expiring)
    }

    fn commit(self: Box<Self>) -> Result<(), StoreError> {
        let mut fault = self.store.fault.lock();
        if *fault == Some(Fault::CommitHeld) {
            let held = &self.store.held;
            held.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            while *fault == Some(Fault::CommitHeld) {
                self.store.changed.wait(&mut fault);
            }
            held.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            if fault.is_none() {
                // Dropping the inner transaction rolls it back.
                return Err(StoreError::Indeterminate(
                    "injected fault: a held commit was cut off".into(),
                ));
            }
        }
        drop(fault);
        // Dropping the inner transaction rolls it back.
        match self.store.fault() {
            Some(Fault::Outage) => Err(outage()),
            Some(Fault::CommitLost | Fault::CommitHeld) => Err(StoreError::Indeterminate(
                "injected fault: the commit was lost on the way".into(),
            )),
            Some(Fault::CommitUnacknowledged) => {
                self.inner.commit()?;
                Err(StoreError::Indeterminate(
                    "injected fault: the commit's acknowledgement was lost".into(),
                ))
            }
            None => self.inner.commit(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;

    fn store() -> (tempfile::TempDir, FaultyStore) {
        let dir = tempfile::tempdir().unwrap();
        let inner = SqliteStore::open(&dir.path().join("store.db")).unwrap();
        (dir, FaultyStore::new(Arc::new(inner)))
    }

    fn value(s: &FaultyStore) -> Option<i64> {
        s.load_shard("n").unwrap().first().map(|r| r.value)
    }

    // Each fault has the effect its name promises: an outage writes nothing
    // and fails every call, a lost commit writes nothing, an
    // unacknowledged commit writes; both commit faults report Indeterminate.
    #[test]
    fn injected_faults_do_what_they_say() {
        let (_dir, s) = store();
        let e = s.register("n", "addr", 1).unwrap().epoch;
        let write = |value: i64, lsn: u64| {
            let mut tx = s.begin("n", e)?;
            tx.upsert_shards(&[("c", value, Version::new(e, lsn))])?;
            tx.commit()
        };

        s.set_fault(Some(Fault::Outage));
        assert!(matches!(write(1, 1), Err(StoreError::Unavailable(_))));
        assert!(matches!(s.nodes(), Err(StoreError::Unavailable(_))));
        s.set_fault(None);
        assert_eq!(value(&s), None);

        s.set_fault(Some(Fault::CommitLost));
        assert!(matches!(write(2, 2), Err(StoreError::Indeterminate(_))));
        s.set_fault(None);
        assert_eq!(value(&s), None);

        s.set_fault(Some(Fault::CommitUnacknowledged));
        assert!(matches!(write(3, 3), Err(StoreError::Indeterminate(_))));
        s.set_fault(None);
        assert_eq!(value(&s), Some(3));

        // An outage that starts inside a transaction rolls it back.
        let mut tx = s.begin("n", e).unwrap();
        tx.upsert_shards(&[("c", 4, Version::new(e, 4))]).unwrap();
        s.set_fault(Some(Fault::Outage));
        assert!(matches!(tx.commit(), Err(StoreError::Unavailable(_))));
        s.set_fault(None);
        assert_eq!(value(&s), Some(3));
        write(5, 5).unwrap();
        assert_eq!(value(&s), Some(5));
    }
}
