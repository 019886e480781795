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

use std::collections::HashMap;
use std::time::{Duration, Instant};

use compact_str::CompactString;
use parking_lot::RwLock;

use crate::store::{Store, StoreError, Version};

/// Rows read per store call while catching up on one node.
const PAGE_ROWS: usize = 10_000;
/// A failed refresh is logged at most this often.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Default)]
struct CacheState {
    /// Node ids, indexed by the small numbers stored per counter.
    nodes: Vec<String>,
    cursors: Vec<Version>,
    /// Counter name to (node index, that node's shard value).
    values: HashMap<CompactString, Vec<(u16, i64)>>,
    refreshed: Option<Instant>,
    /// The other nodes' rows as the last refresh read them: id, epoch and
    /// last heartbeat (Unix ms).
    peers: Vec<(String, u64, u64)>,
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

    /// Sum of the other nodes' shards of `name`, if any holds one.
    pub fn others(&self, name: &str) -> Option<i64> {
        let inner = self.inner.read();
        inner
            .values
            .get(name)
            .map(|v| v.iter().fold(0i64, |acc, (_, x)| acc.wrapping_add(*x)))
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
    /// heartbeat (Unix ms).
    pub fn peers(&self) -> Vec<(String, u64, u64)> {
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
                let index = match inner.nodes.iter().position(|n| *n == node.node_id) {
                    Some(i) => i,
                    None => {
                        inner.nodes.push(node.node_id.clone());
                        inner.cursors.push(Version::default());
                        inner.nodes.len() - 1
                    }
                };
                // A mark below what was read before: the store went back
                // (restored from an older copy, or an asynchronous
                // failover). Read the node's whole shard again; the node
                // rewrites it at a higher epoch once it notices.
                if node.flushed < inner.cursors[index] {
                    inner.cursors[index] = Version::default();
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
                for row in rows {
                    let slot = inner
                        .values
                        .entry(CompactString::from(row.counter.as_str()))
                        .or_default();
                    match slot.iter_mut().find(|(i, _)| *i as usize == index) {
                        Some(entry) => entry.1 = row.value,
                        None => slot.push((index as u16, row.value)),
                    }
                }
                if !full {
                    break;
                }
            }
            self.inner.write().cursors[index] = start.max(node.flushed);
        }
        let mut inner = self.inner.write();
        inner.peers = nodes
            .iter()
            .filter(|n| n.node_id != self.own)
            .map(|n| (n.node_id.clone(), n.epoch, n.heartbeat_at_ms))
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
