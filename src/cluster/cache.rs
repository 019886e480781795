//! The other nodes' shards, kept in memory for global reads.
//!
//! Refreshed incrementally. Rows of one node do NOT reach the store in
//! version order: a flush sweeps the counter table shard by shard while
//! increments go on, so a later flush can carry a lower lsn than an earlier
//! one. What is ordered is the node's flushed version (its *mark*): a flush
//! raises it only when every change below it is in the store. So for each
//! other node the cache reads the node's mark first, then every row above
//! the version it has read up to, and then moves its cursor to that mark,
//! never past it. A row above the mark may be read twice; none is missed.
//! A mark that goes back (the store came back older) sends the cursor back
//! to the start, so the node's shard is read whole again.
//!
//! A delete sets every row's base to its value without changing its
//! version, so the row pages above do not show it: the cache also pages
//! through the store's deletes by their sequence number
//! ([`Store::deleted_since`]) and takes the rows of each deleted counter
//! again, this node's own included (its base is what this node's reads
//! take off its own shard). Every value kept is a row's counted value,
//! `value - base`, read with the row.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use compact_str::CompactString;
use parking_lot::RwLock;

use crate::store::{DELETES_PAGE_MAX, NodeState, ShardRow, Store, StoreError, Version};

/// Rows read per store call while catching up on one node.
const PAGE_ROWS: usize = 10_000;
/// A failed refresh is logged at most this often.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Default)]
struct CacheState {
    /// Node ids, indexed by the small numbers stored per counter.
    nodes: Vec<String>,
    cursors: Vec<Version>,
    /// Counter name to (node index, that node's counted shard value:
    /// value - base).
    values: HashMap<CompactString, Vec<(u16, i64)>>,
    /// This node's base of each counter deleted while it held a row of it
    /// (absent: 0).
    own_bases: HashMap<CompactString, i64>,
    /// The last delete sequence number read.
    deletes_cursor: u64,
    refreshed: Option<Instant>,
    /// The other nodes' rows as the last refresh read them: id, epoch,
    /// last heartbeat (Unix ms) and recorded state.
    peers: Vec<(String, u64, u64, NodeState)>,
}

impl CacheState {
    fn node_index(&mut self, node_id: &str) -> usize {
        match self.nodes.iter().position(|n| n == node_id) {
            Some(i) => i,
            None => {
                self.nodes.push(node_id.to_string());
                self.cursors.push(Version::default());
                self.nodes.len() - 1
            }
        }
    }

    fn set_value(&mut self, counter: &str, index: usize, counted: i64) {
        let slot = self.values.entry(CompactString::from(counter)).or_default();
        match slot.iter_mut().find(|(i, _)| *i as usize == index) {
            Some(entry) => entry.1 = counted,
            None => slot.push((index as u16, counted)),
        }
    }

    fn apply(&mut self, own: &str, row: &ShardRow) {
        if row.node_id == own {
            if row.base == 0 {
                self.own_bases.remove(row.counter.as_str());
            } else {
                self.own_bases
                    .insert(CompactString::from(row.counter.as_str()), row.base);
            }
        } else {
            let index = self.node_index(&row.node_id);
            self.set_value(&row.counter, index, row.counted());
        }
    }
}

/// See the module docs.
pub struct Cache {
    own: String,
    inner: RwLock<CacheState>,
}

impl Cache {
    pub fn new(own_node_id: &str) -> Cache {
        Cache {
            own: own_node_id.to_string(),
            inner: RwLock::new(CacheState::default()),
        }
    }

    /// What to add to this node's own shard of `name` for the counter's
    /// value: the other nodes' counted shards, less this node's base;
    /// `None` when neither is known.
    pub fn others(&self, name: &str) -> Option<i64> {
        let inner = self.inner.read();
        let sum = inner
            .values
            .get(name)
            .map(|v| v.iter().fold(0i64, |acc, (_, x)| acc.wrapping_add(*x)));
        match (sum, inner.own_bases.get(name)) {
            (None, None) => None,
            (s, b) => Some(s.unwrap_or(0).wrapping_sub(b.copied().unwrap_or(0))),
        }
    }

    /// This node's base of `name`: what its own shard held when the
    /// counter was last deleted (0 if never).
    pub fn own_base(&self, name: &str) -> i64 {
        self.inner.read().own_bases.get(name).copied().unwrap_or(0)
    }

    /// This node's base of every counter deleted while it held a row of
    /// it (a copy).
    pub fn own_bases(&self) -> HashMap<CompactString, i64> {
        self.inner.read().own_bases.clone()
    }

    /// Takes rows read from the store (a delete's, or a counter read
    /// whole): each node's counted value, and this node's base.
    pub fn apply_rows(&self, rows: &[ShardRow]) {
        let mut inner = self.inner.write();
        for row in rows {
            inner.apply(&self.own, row);
        }
    }

    /// The other nodes' shards of `name`, by node id.
    pub fn breakdown(&self, name: &str) -> Vec<(String, i64)> {
        let inner = self.inner.read();
        inner.values.get(name).map_or_else(Vec::new, |v| {
            v.iter()
                .map(|(i, x)| (inner.nodes[*i as usize].clone(), *x))
                .collect()
        })
    }

    /// Names of counters some other node holds a shard of, with a prefix.
    pub fn names_with_prefix(&self, prefix: &str) -> Vec<String> {
        self.inner
            .read()
            .values
            .keys()
            .filter(|k| k.starts_with(prefix))
            .map(|k| k.to_string())
            .collect()
    }

    /// The other nodes as the last refresh read them: id, epoch, last
    /// heartbeat (Unix ms), recorded state.
    pub fn peers(&self) -> Vec<(String, u64, u64, NodeState)> {
        self.inner.read().peers.clone()
    }

    pub fn last_refresh_age(&self) -> Option<Duration> {
        self.inner.read().refreshed.map(|t| t.elapsed())
    }

    /// Reads every other node's rows changed since the last refresh.
    pub fn refresh(&self, store: &dyn Store) -> Result<(), StoreError> {
        // The marks are read before the rows: every row at or below a mark
        // was committed with or before it, so the row queries see it.
        let nodes = store.nodes()?;
        for node in nodes.iter().filter(|n| n.node_id != self.own) {
            let (index, mut cursor) = {
                let mut inner = self.inner.write();
                let index = inner.node_index(&node.node_id);
                // A mark below what was read before: the store went back
                // (restored from an older copy, or an asynchronous
                // failover). Read the node's whole shard again; the node
                // rewrites it at a higher epoch once it notices.
                if node.flushed < inner.cursors[index] {
                    inner.cursors[index] = Version::default();
                    // The deletes may have gone back with it, and their
                    // sequence numbers be handed out again: read them all.
                    inner.deletes_cursor = 0;
                }
                (index, inner.cursors[index])
            };
            let start = cursor;
            loop {
                let rows = store.changes_since(&node.node_id, cursor, PAGE_ROWS)?;
                let Some(last) = rows.last() else { break };
                // Paging within this refresh follows the rows; the cursor
                // kept for the next one is the mark (below).
                cursor = last.version;
                let full = rows.len() >= PAGE_ROWS;
                let mut inner = self.inner.write();
                for row in &rows {
                    inner.set_value(&row.counter, index, row.counted());
                }
                if !full {
                    break;
                }
            }
            self.inner.write().cursors[index] = start.max(node.flushed);
        }
        // Deletes since the last refresh: each deleted counter's rows
        // again, with their new bases.
        let mut after = self.inner.read().deletes_cursor;
        loop {
            let rows = store.deleted_since(after, DELETES_PAGE_MAX)?;
            let Some(&(last, _)) = rows.last() else { break };
            let mut inner = self.inner.write();
            for (_, row) in &rows {
                inner.apply(&self.own, row);
            }
            inner.deletes_cursor = last;
            after = last;
            let deletes = rows.windows(2).filter(|w| w[0].0 != w[1].0).count() + 1;
            if deletes < DELETES_PAGE_MAX {
                break;
            }
        }
        let mut inner = self.inner.write();
        inner.peers = nodes
            .iter()
            .filter(|n| n.node_id != self.own)
            .map(|n| (n.node_id.clone(), n.epoch, n.heartbeat_at_ms, n.state))
            .collect();
        inner.refreshed = Some(Instant::now());
        Ok(())
    }
}

/// The cache thread: refreshes every `refresh_interval` until stopped.
pub(crate) fn run(cluster: std::sync::Arc<super::Cluster>) {
    let mut last_error_log: Option<Instant> = None;
    loop {
        if cluster.stop.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if let Err(e) = cluster.cache.refresh(cluster.reader.as_ref())
            && last_error_log.is_none_or(|t| t.elapsed() >= ERROR_LOG_INTERVAL)
        {
            tracing::warn!(error = %e, "refreshing other nodes' shards failed; reads use the last values");
            last_error_log = Some(Instant::now());
        }
        let mut guard = cluster.idle.0.lock();
        if !cluster.stop.load(std::sync::atomic::Ordering::SeqCst) {
            cluster
                .idle
                .1
                .wait_for(&mut guard, cluster.config.refresh_interval);
        }
    }
}
