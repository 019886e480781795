//! The cluster: this node's link to the shared store.
//!
//! A node with a store registers at start and takes a new epoch, restores
//! what the store knows better than its disk (a lost or stale data
//! directory), checks the replicated increments its journal holds against
//! the store, and only then reports ready. While it runs, one thread (the
//! committer, [`committer`]) owns every write to the store: it flushes the
//! node's changed shard rows, commits `replicated` increments in group
//! transactions, and heartbeats. Another ([`cache`]) keeps the other nodes'
//! shards, refreshed incrementally, so that reads return global values.
//!
//! This module must never write the store from any other thread than the
//! committer: per-node versions only grow because one thread writes them in
//! order, and the cache's per-node cursors rely on that.
//!
//! See `docs/design.md`, "Cluster", for the protocol and its argument.

pub mod cache;
pub mod committer;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tokio::sync::{oneshot, watch};

use crate::engine::idempotency::now_ms;
use crate::engine::recovery::RecoveryReport;
use crate::engine::{Change, Engine};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::store::{self, KeyRow, NodeRow, Store, StoreError, Version};

pub use cache::Cache;

/// Settings of a node's link to the shared store.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `sqlite://PATH` or `postgres://...`.
    pub store_url: String,
    /// Where this node serves clients (shown in the cluster view).
    pub address: String,
    /// Longest time a changed counter waits before it is flushed.
    pub flush_interval: Duration,
    /// How often the other nodes' shards are read from the store.
    pub refresh_interval: Duration,
    /// How often the node proves it is alive when it has nothing to flush.
    pub heartbeat_interval: Duration,
    /// Most `replicated` increments waiting for the committer; beyond it
    /// they are refused (nothing applied).
    pub replicated_queue_max: usize,
    /// Most `replicated` increments in one store transaction.
    pub replicated_batch_max: usize,
    /// Most shard rows in one store transaction; more wait for the next.
    pub flush_rows_max: usize,
    /// How long after a failed store call `replicated` increments are
    /// refused at once rather than queued.
    pub fail_fast_window: Duration,
    /// Start even if another process holds this node id and is alive
    /// (fencing it); without it such a start is refused (see
    /// `check_not_held` in this module).
    pub takeover: bool,
}

/// A writer and a reader connection to one store, built by the caller.
#[derive(Clone)]
pub struct Stores {
    pub writer: Arc<dyn Store>,
    pub reader: Arc<dyn Store>,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stores({})", self.writer.backend())
    }
}

impl ClusterConfig {
    pub fn new(store_url: impl Into<String>) -> Self {
        ClusterConfig {
            store_url: store_url.into(),
            address: String::new(),
            flush_interval: Duration::from_millis(100),
            refresh_interval: Duration::from_millis(100),
            heartbeat_interval: Duration::from_secs(1),
            replicated_queue_max: 100_000,
            replicated_batch_max: 10_000,
            flush_rows_max: 100_000,
            fail_fast_window: Duration::from_secs(1),
            takeover: false,
        }
    }
}

/// A `replicated` increment waiting for the committer.
pub(crate) struct ReplicatedRequest {
    pub name: String,
    pub delta: i64,
    pub key: Option<String>,
    /// Whether the request was a duplicate of one already applied.
    pub reply: oneshot::Sender<Result<bool>>,
}

/// Most deletes waiting for the committer; beyond it they are refused
/// (nothing deleted). Deletes are rare and each waits for one store round.
pub const DELETES_QUEUE_MAX: usize = 1_000;

/// A delete waiting for the committer.
pub(crate) struct DeleteRequest {
    pub name: String,
    /// The expiry this delete is the sweep of: done only if the counter
    /// still expires then (see [`crate::store::StoreTx::delete_counter`]).
    pub expiring: Option<u64>,
    /// The value erased, or `None` when no node had written the counter to
    /// the store.
    pub reply: oneshot::Sender<Result<Option<i64>>>,
}

/// A node whose last heartbeat is older than this many heartbeat intervals
/// is shown as suspect: it has missed a few, which a pause or a slow store
/// round explains.
const SUSPECT_AFTER_HEARTBEATS: u64 = 3;
/// A node whose last heartbeat is older than this many heartbeat intervals
/// is shown as down.
const DOWN_AFTER_HEARTBEATS: u64 = 10;

/// A node's liveness as the cluster view shows it, from heartbeat age.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    Alive,
    Suspect,
    Down,
    /// Its last process stopped cleanly, its shard in the store.
    Stopped,
}

/// Refuses to start as `node_id` while another live process holds it:
/// registering would take a new epoch and fence that process (and, under a
/// supervisor on each of two hosts, each would fence the other in turn).
///
/// The node's row says which host and process registered it last and
/// whether it stopped cleanly. It is free when it has no row, stopped or
/// was retired, or when this very process registered it (a node reopened
/// in the same process). On this host, the process that registered it
/// holds it while it exists and either runs the same program as this one
/// or heartbeats (its heartbeat younger than `SUSPECT_AFTER_HEARTBEATS` of
/// this process's heartbeat intervals): a process id taken over by an
/// unrelated program does not. A process on another host cannot be asked:
/// a heartbeat older than that is free, and a younger one is watched for
/// as long as it may take to move; one that moves means a live holder.
fn check_not_held(store: &dyn Store, node_id: &str, heartbeat: Duration) -> Result<()> {
    let find = || -> Result<Option<NodeRow>> {
        Ok(store
            .nodes()
            .map_err(start_err)?
            .into_iter()
            .find(|n| n.node_id == node_id))
    };
    let Some(row) = find()? else {
        return Ok(());
    };
    if row.state != store::NodeState::Running {
        return Ok(());
    }
    let (host, pid) = store::this_process();
    let hb = heartbeat.as_millis() as u64;
    let fresh_for = SUSPECT_AFTER_HEARTBEATS * hb;
    let age = now_ms().saturating_sub(row.heartbeat_at_ms);
    if row.host == host {
        let held = row.pid != pid
            && process_exists(row.pid)
            && (same_program(row.pid) || age <= fresh_for);
        if !held {
            return Ok(());
        }
    } else if age > fresh_for {
        return Ok(());
    }
    let held = |how: &str| Error::InvalidConfig {
        field: "node_id",
        reason: format!(
            "node id '{node_id}' is held by a running process, pid {} on host '{}' (serving \
             {}), whose heartbeat {how}; stop that process, start this one with another node \
             id, or pass --takeover true to fence it and take the id over",
            row.pid, row.host, row.address
        ),
    };
    if row.host == host {
        return Err(held(&format!("is {age} ms old")));
    }
    let deadline = Instant::now() + Duration::from_millis(fresh_for.saturating_sub(age) + hb);
    while Instant::now() < deadline {
        std::thread::sleep(heartbeat / 4);
        if let Some(now) = find()?
            && (now.epoch != row.epoch || now.heartbeat_at_ms > row.heartbeat_at_ms)
            && now.state == store::NodeState::Running
        {
            return Err(held("moved while this process watched it"));
        }
    }
    Ok(())
}

/// Whether process `pid` runs the same program as this one (by its
/// command name, which survives an upgrade of the binary in place).
fn same_program(pid: u32) -> bool {
    let comm = |p: &str| std::fs::read_to_string(format!("/proc/{p}/comm")).ok();
    match (comm(&pid.to_string()), comm("self")) {
        (Some(theirs), Some(ours)) => theirs == ours,
        _ => false,
    }
}

/// Whether a process with this id exists on this host.
fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 sends nothing; it only checks the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Liveness from the node's recorded state, its heartbeat's age and the
/// heartbeat interval (ms).
fn liveness(state: store::NodeState, age_ms: u64, interval_ms: u64) -> Liveness {
    if state == store::NodeState::Stopped {
        Liveness::Stopped
    } else if age_ms <= SUSPECT_AFTER_HEARTBEATS * interval_ms {
        Liveness::Alive
    } else if age_ms <= DOWN_AFTER_HEARTBEATS * interval_ms {
        Liveness::Suspect
    } else {
        Liveness::Down
    }
}

impl Liveness {
    pub const ALL: [Liveness; 4] = [
        Liveness::Alive,
        Liveness::Suspect,
        Liveness::Down,
        Liveness::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Liveness::Alive => "alive",
            Liveness::Suspect => "suspect",
            Liveness::Down => "down",
            Liveness::Stopped => "stopped",
        }
    }
}

/// Another node as this one last saw it in the store.
#[derive(Debug, Clone)]
pub struct PeerState {
    pub node_id: String,
    pub epoch: u64,
    pub heartbeat_age_ms: u64,
    pub state: Liveness,
}

/// One node in the cluster view.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeView {
    pub node_id: String,
    pub epoch: u64,
    pub address: String,
    pub state: Liveness,
    /// The host and process id that registered it (empty and 0 when a
    /// build before schema version 4 did).
    pub host: String,
    pub pid: u32,
    /// Since its last registration (its current process's start).
    pub uptime_ms: u64,
    pub heartbeat_age_ms: u64,
    pub flushed_lsn: u64,
    pub applied_lsn: u64,
    /// Applied but not yet flushed, in lsns.
    pub flush_lag: u64,
}

/// What `GET /v1/cluster` and `INFO cluster` show.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterView {
    pub node_id: String,
    pub epoch: u64,
    pub store: &'static str,
    /// Reads of other nodes' shards may be this old, in milliseconds.
    pub staleness_bound_ms: u64,
    pub last_refresh_age_ms: Option<u64>,
    pub replicated_available: bool,
    pub store_error: Option<String>,
    /// The store's own replication, as its primary reports it (`None`
    /// for one SQLite file, or when it could not be read).
    pub store_replication: Option<store::Replication>,
    /// Set when `replicated` increments are acknowledged by a single
    /// server: what a reader should know about their durability.
    pub store_warning: Option<String>,
    pub nodes: Vec<NodeView>,
}

/// Mutable state shared by the committer and the request path.
#[derive(Default)]
pub(crate) struct State {
    /// Set when the last store call failed; cleared by the next success.
    pub store_error: Option<(String, Instant)>,
    /// Keys of `replicated` increments whose transaction's outcome is not
    /// known yet: a retry must not be told "duplicate" before it is.
    pub unresolved_keys: HashSet<String>,
    pub flushed: Version,
    /// The highest version of any row this process has committed, this
    /// epoch: the store must hold at least this much of the node's writes
    /// (`Store::begin_at`).
    pub written: Version,
}

/// The node's link to the store. See the module docs.
pub struct Cluster {
    pub(crate) config: ClusterConfig,
    pub(crate) node_id: String,
    /// The epoch this process holds; changed only by the committer, when it
    /// registers again after finding the store behind it (see
    /// `committer::repair`).
    pub(crate) epoch: std::sync::atomic::AtomicU64,
    /// Written only by the committer thread.
    pub(crate) store: Arc<dyn Store>,
    /// A second connection for reads (cache refresh, cluster view,
    /// `consistency=store`), so that reads never wait behind a flush.
    pub(crate) reader: Arc<dyn Store>,
    pub(crate) queue: Mutex<VecDeque<ReplicatedRequest>>,
    /// Deletes waiting for the committer. Taken with `queue` held (queue
    /// first), so that the committer's wait on `queue` misses none.
    pub(crate) deletes: Mutex<Vec<DeleteRequest>>,
    /// Wakes the committer: a replicated request arrived, or stop.
    pub(crate) wake: Condvar,
    pub(crate) state: Mutex<State>,
    /// True from the moment the committer applies replicated increments
    /// until their transaction's outcome is known. A snapshot holds this
    /// lock while it runs and is postponed while it is true, so that it
    /// never captures a replicated increment whose fate is open (its
    /// journal record, which recovery checks against the store, could be
    /// dropped with the segments the snapshot covers). See
    /// [`Cluster::snapshot_gate`].
    pub(crate) replication_open: Mutex<bool>,
    /// The live keys of the journal's replicated increments that committed,
    /// taken by the committer when it starts: it remembers them (see
    /// `committer::repair`) and, when `true` (the store was found behind
    /// at start), writes them again at once.
    pub(crate) recovered_keys: Mutex<Option<(Vec<store::KeyRow>, bool)>>,
    /// Fires with the reason once this node's epoch is superseded.
    pub(crate) fenced: watch::Sender<Option<String>>,
    pub(crate) cache: Cache,
    pub(crate) stop: std::sync::atomic::AtomicBool,
    /// The cache thread waits on this between refreshes, so that stop
    /// wakes it at once.
    pub(crate) idle: (Mutex<()>, Condvar),
    pub(crate) threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// The node's metrics, where the committer records its rounds.
    pub(crate) metrics: Arc<Metrics>,
}

pub(crate) fn store_err(e: StoreError) -> Error {
    match e {
        StoreError::Fenced { .. } => Error::Fenced(e.to_string()),
        StoreError::Indeterminate(m) => Error::Indeterminate(m.into()),
        other => Error::StoreUnavailable(other.to_string()),
    }
}

/// [`store_err`] for start-up, where a misconfigured store (a bad URL, a
/// schema newer than this build) is a setting to change, not an outage to
/// wait out.
fn start_err(e: StoreError) -> Error {
    match e {
        StoreError::Invalid(reason) => Error::InvalidConfig {
            field: "cluster",
            reason,
        },
        other => store_err(other),
    }
}

impl Cluster {
    /// The epoch this process holds now.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Connects to the store, takes a new epoch, restores from the store
    /// what it knows better than the local disk, settles the replicated
    /// increments the journal holds, and starts the committer and cache
    /// threads. The node is ready when this returns.
    /// `stores`, when given, are used instead of opening
    /// `config.store_url`.
    pub(crate) fn start(
        engine: &Arc<Engine>,
        node_id: &str,
        config: ClusterConfig,
        stores: Option<Stores>,
        recovered: &RecoveryReport,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Cluster>> {
        let (store, reader) = match stores {
            Some(s) => (s.writer, s.reader),
            None => (
                store::open(&config.store_url).map_err(start_err)?,
                store::open(&config.store_url).map_err(start_err)?,
            ),
        };
        let node_id = node_id.to_string();
        if !config.takeover {
            check_not_held(store.as_ref(), &node_id, config.heartbeat_interval)?;
        }
        // What the journal says the store committed of this node's rows.
        let settled = recovered.settled.map(|(e, l)| Version::new(e, l));
        // Above every epoch the journal knows, even if the store has
        // forgotten it (it came back older): no epoch is handed out twice.
        let registration = store
            .register_above(
                &node_id,
                &config.address,
                now_ms(),
                settled.map_or(0, |s| s.epoch),
            )
            .map_err(start_err)?;
        let epoch = registration.epoch;
        let rows = store.load_shard(&node_id).map_err(start_err)?;
        let stored: HashMap<&str, (i64, Version)> = rows
            .iter()
            .map(|r| (r.counter.as_str(), (r.value, r.version)))
            .collect();

        // Never reuse an lsn the store has seen: a stale or lost disk
        // recovers a lower next lsn than the node had reached.
        let store_max = rows
            .iter()
            .map(|r| r.version.lsn)
            .chain(registration.previous.as_ref().map(|p| p.flushed.lsn))
            .max()
            .unwrap_or(0);
        engine.skip_lsns_through(store_max);

        // Replicated increments whose transaction did not commit are taken
        // back: their effect is not in the store's row for the counter. One
        // at or below the journal's settled version did commit: if the
        // store lacks it, the store came back older (§12.8 of the design),
        // and the increment is kept and written again like the rest.
        let mut reverted = 0;
        let mut lost_by_store = 0;
        let mut committed_keys: Vec<KeyRow> = Vec::new();
        let now = now_ms();
        for p in &recovered.replicated {
            let version = Version::new(p.epoch, p.lsn);
            let witnessed = stored
                .get(p.name.as_str())
                .is_some_and(|(_, v)| *v >= version);
            let known = settled.is_some_and(|s| version <= s);
            if known && !witnessed {
                lost_by_store += 1;
            }
            if witnessed || known {
                if let Some((key, expiry)) = &p.key
                    && *expiry > now
                {
                    committed_keys.push(KeyRow {
                        key: key.clone(),
                        node_id: node_id.clone(),
                        epoch,
                        counter: p.name.clone(),
                        expires_at_ms: *expiry,
                    });
                }
            } else {
                engine.apply(Change::Revert {
                    name: &p.name,
                    delta: p.delta,
                    of_lsn: p.lsn,
                    key: p.key.as_ref().map(|(k, e)| (k.as_str(), *e)),
                })?;
                reverted += 1;
            }
        }
        let behind = lost_by_store > 0
            || settled
                .is_some_and(|s| registration.previous.as_ref().is_none_or(|p| p.written < s));
        if behind {
            metrics
                .store_regressions_repaired
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                node_id = %node_id,
                epoch,
                kept = lost_by_store,
                keys = committed_keys.len(),
                "the store is behind what this node committed before it stopped (restored from \
                 an older copy, or an asynchronous failover); keeping the replicated increments \
                 the journal knows committed and writing the shard and their keys again"
            );
        }

        // Where the store knows a newer shard (lost or stale disk), the
        // store wins: adopt it, journaled, with a new, higher lsn.
        let mut adopted = 0;
        for row in &rows {
            let local_lsn = engine.table().get(&row.counter).map_or(0, |e| e.lsn);
            if row.version.lsn > local_lsn {
                engine.apply(Change::Adopt {
                    name: &row.counter,
                    value: row.value,
                })?;
                adopted += 1;
            }
        }
        // Everything the store does not hold at its latest is to flush.
        engine.table().track_dirty_from(|name, entry| {
            stored.get(name).is_none_or(|(_, v)| entry.lsn > v.lsn)
        });
        // Adopted and reverted records must be durable before the node
        // serves: the store is ahead of the disk until they are.
        engine.sync_blocking()?;
        tracing::info!(
            node_id = %node_id,
            epoch,
            store = store.backend(),
            stored_rows = rows.len(),
            adopted,
            reverted,
            "registered with the shared store"
        );

        let (fenced, _) = watch::channel(None);
        let cluster = Cluster {
            cache: Cache::new(&node_id),
            config,
            node_id,
            epoch: std::sync::atomic::AtomicU64::new(epoch),
            store,
            reader,
            queue: Mutex::new(VecDeque::new()),
            deletes: Mutex::new(Vec::new()),
            wake: Condvar::new(),
            state: Mutex::new(State {
                flushed: registration
                    .previous
                    .map_or_else(Version::default, |p| p.flushed),
                ..State::default()
            }),
            replication_open: Mutex::new(false),
            recovered_keys: Mutex::new(Some((committed_keys, behind))),
            fenced,
            stop: std::sync::atomic::AtomicBool::new(false),
            idle: (Mutex::new(()), Condvar::new()),
            threads: Mutex::new(Vec::new()),
            metrics,
        };
        // This node's bases (what its shard held when a counter was
        // deleted) come with its rows: its reads are right from the first
        // request on, even if the first refresh below fails.
        cluster.cache.apply_rows(&rows);
        // Reads are global from the first request on. The engine has been
        // changed above (reverts, adoptions), so from here on nothing may
        // fail in a way that makes the caller register again: a failed first
        // refresh is left to the cache thread.
        if let Err(e) = cluster.cache.refresh(cluster.reader.as_ref()) {
            tracing::warn!(error = %e, "first read of the other nodes' shards failed; the cache thread retries");
        }
        let cluster = Arc::new(cluster);
        // The committer holds the engine weakly, so that dropping the node
        // (a crash in tests, or an embedder that never calls shutdown)
        // frees the engine at once.
        let (me, weak) = (cluster.clone(), Arc::downgrade(engine));
        let committer = std::thread::Builder::new()
            .name("tally-committer".into())
            .spawn(move || committer::run(me, weak))
            .map_err(|e| Error::io("starting the committer thread", e))?;
        let me = cluster.clone();
        let refresher = std::thread::Builder::new()
            .name("tally-cache".into())
            .spawn(move || cache::run(me))
            .map_err(|e| Error::io("starting the cache thread", e))?;
        cluster.threads.lock().extend([committer, refresher]);
        Ok(cluster)
    }

    /// Queues a `replicated` increment and waits for its transaction.
    pub(crate) async fn replicated(
        &self,
        name: &str,
        delta: i64,
        key: Option<&str>,
    ) -> Result<bool> {
        {
            let state = self.state.lock();
            if let Some((reason, at)) = &state.store_error
                && at.elapsed() < self.config.fail_fast_window
            {
                return Err(Error::StoreUnavailable(format!(
                    "the shared store failed {} ms ago ({reason}); nothing was applied",
                    at.elapsed().as_millis()
                )));
            }
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut queue = self.queue.lock();
            // Checked under the queue lock: once fenced, the committer
            // drains the queue under this lock and exits, so a request is
            // either drained and answered or refused here, never left
            // waiting for a committer that is gone.
            if let Some(reason) = self.fenced_reason() {
                return Err(Error::Fenced(reason));
            }
            if queue.len() >= self.config.replicated_queue_max {
                return Err(Error::LimitExceeded(format!(
                    "{} replicated increments are already waiting for the store; nothing was applied",
                    queue.len()
                )));
            }
            queue.push_back(ReplicatedRequest {
                name: name.to_string(),
                delta,
                key: key.map(str::to_string),
                reply: tx,
            });
        }
        self.wake.notify_one();
        rx.await.unwrap_or(Err(Error::ShuttingDown))
    }

    /// Queues a delete of `name` for every node and waits for its store
    /// transaction, which first writes this node's own shard of it (so
    /// that what this node acknowledged before is erased too). Returns the
    /// value erased, `None` if no node had the counter in the store.
    pub(crate) async fn delete(&self, name: &str, expiring: Option<u64>) -> Result<Option<i64>> {
        let rx = self.queue_delete(name, expiring)?;
        rx.await.unwrap_or(Err(Error::ShuttingDown))
    }

    /// Queues a delete for the committer's next round; the receiver gets
    /// its outcome.
    pub(crate) fn queue_delete(
        &self,
        name: &str,
        expiring: Option<u64>,
    ) -> Result<oneshot::Receiver<Result<Option<i64>>>> {
        let (tx, rx) = oneshot::channel();
        {
            let _queue = self.queue.lock();
            // Under the queue lock, as for replicated increments: once
            // fenced, the committer drains under it and exits.
            if let Some(reason) = self.fenced_reason() {
                return Err(Error::Fenced(reason));
            }
            let mut deletes = self.deletes.lock();
            if deletes.len() >= DELETES_QUEUE_MAX {
                return Err(Error::LimitExceeded(format!(
                    "{} deletes are already waiting for the store; nothing was deleted",
                    deletes.len()
                )));
            }
            deletes.push(DeleteRequest {
                name: name.to_string(),
                expiring,
                reply: tx,
            });
        }
        self.wake.notify_one();
        Ok(rx)
    }

    /// How far this node's flushes are known to have reached.
    pub(crate) fn flushed(&self) -> Version {
        self.state.lock().flushed
    }

    /// Whether a key's earlier replicated attempt is still unresolved.
    pub(crate) fn key_unresolved(&self, key: &str) -> bool {
        self.state.lock().unresolved_keys.contains(key)
    }

    pub(crate) fn fenced_reason(&self) -> Option<String> {
        self.fenced.borrow().clone()
    }

    /// Completes when the node is fenced, with the reason.
    pub fn fenced_signal(&self) -> watch::Receiver<Option<String>> {
        self.fenced.subscribe()
    }

    /// Why `replicated` increments cannot be made durable now, if so.
    pub(crate) fn replicated_unavailable(&self) -> Option<String> {
        if let Some(reason) = self.fenced_reason() {
            return Some(reason);
        }
        self.state
            .lock()
            .store_error
            .as_ref()
            .map(|(reason, _)| format!("shared store unreachable: {reason}"))
    }

    /// The other nodes as this node's cache last read them from the store,
    /// with their liveness now (no store call: the heartbeats age while the
    /// store cannot be read).
    pub(crate) fn peers(&self) -> Vec<PeerState> {
        let now = now_ms();
        let hb = self.config.heartbeat_interval.as_millis() as u64;
        self.cache
            .peers()
            .into_iter()
            .filter(|(_, _, _, state)| *state != store::NodeState::Retired)
            .map(|(node_id, epoch, heartbeat_at_ms, state)| {
                let age = now.saturating_sub(heartbeat_at_ms);
                PeerState {
                    node_id,
                    epoch,
                    heartbeat_age_ms: age,
                    state: liveness(state, age, hb),
                }
            })
            .collect()
    }

    /// The cluster view, read from the store.
    pub(crate) fn view(&self, applied_lsn: u64) -> Result<ClusterView> {
        let nodes = self.reader.nodes().map_err(store_err)?;
        let now = now_ms();
        let hb = self.config.heartbeat_interval.as_millis() as u64;
        let view_of = |n: &NodeRow| {
            let age = now.saturating_sub(n.heartbeat_at_ms);
            let applied = if n.node_id == self.node_id {
                applied_lsn
            } else {
                n.applied_lsn
            };
            NodeView {
                node_id: n.node_id.clone(),
                epoch: n.epoch,
                address: n.address.clone(),
                state: liveness(n.state, age, hb),
                host: n.host.clone(),
                pid: n.pid,
                uptime_ms: now.saturating_sub(n.started_at_ms),
                heartbeat_age_ms: age,
                flushed_lsn: n.flushed.lsn,
                applied_lsn: applied,
                flush_lag: applied.saturating_sub(n.flushed.lsn),
            }
        };
        let store_error = self.replicated_unavailable();
        let replication = self.reader.replication().map_err(store_err)?;
        let store_warning = match replication {
            None => Some(
                "the store is one SQLite file: replicated increments survive the loss of a \
                 node's disk, not of the machine that holds the file"
                    .to_string(),
            ),
            Some(store::Replication {
                synchronous_standbys: Some(0),
                ..
            }) => Some(
                "the store has no synchronous standby: replicated increments are acknowledged \
                 by a single database server"
                    .to_string(),
            ),
            Some(_) => None,
        };
        Ok(ClusterView {
            node_id: self.node_id.clone(),
            epoch: self.epoch(),
            store: self.store.backend(),
            staleness_bound_ms: (self.config.flush_interval + self.config.refresh_interval)
                .as_millis() as u64,
            last_refresh_age_ms: self.cache.last_refresh_age().map(|d| d.as_millis() as u64),
            replicated_available: store_error.is_none(),
            store_error,
            store_replication: replication,
            store_warning,
            // A retired node's rows still count; it is no longer shown.
            nodes: nodes
                .iter()
                .filter(|n| n.state != store::NodeState::Retired)
                .map(view_of)
                .collect(),
        })
    }

    /// Every node's shard of `name`, read straight from the store.
    /// Takes node `id` out of the cluster view for good (blocking: it
    /// reads and writes the store). Allowed for a node that stopped
    /// cleanly (its whole shard is in the store); a node that is down is
    /// refused unless `force`, since its journal may hold increments it
    /// never flushed, which retiring gives up; a running node, and this
    /// node, are refused. Its rows keep counting. Returns the row as it
    /// was.
    pub(crate) fn retire(&self, id: &str, force: bool) -> Result<NodeRow> {
        if id == self.node_id {
            return Err(Error::Conflict(format!(
                "node '{id}' cannot retire itself: stop it, then retire it through another node"
            )));
        }
        let row = self
            .reader
            .nodes()
            .map_err(store_err)?
            .into_iter()
            .find(|n| n.node_id == id)
            .ok_or_else(|| Error::NotFound(format!("no node '{id}' in the store")))?;
        let hb = self.config.heartbeat_interval.as_millis() as u64;
        let age = now_ms().saturating_sub(row.heartbeat_at_ms);
        match (row.state, liveness(row.state, age, hb)) {
            (store::NodeState::Retired, _) => return Ok(row),
            (_, Liveness::Stopped) => {}
            (_, Liveness::Alive | Liveness::Suspect) => {
                return Err(Error::Conflict(format!(
                    "node '{id}' is running (heartbeat {age} ms ago, pid {} on host '{}'): \
                     stop it first; it records itself as stopped once its shard is flushed",
                    row.pid, row.host
                )));
            }
            (_, Liveness::Down) if !force => {
                let lag = row.applied_lsn.saturating_sub(row.flushed.lsn);
                return Err(Error::Conflict(format!(
                    "node '{id}' is down (heartbeat {age} ms ago) without having stopped \
                     cleanly: its journal may hold increments not in the store ({lag} changes \
                     applied past its flushed mark at its last heartbeat); start it again so \
                     that it flushes and stops cleanly, or retire it with force to give them up"
                )));
            }
            (_, Liveness::Down) => {}
        }
        let done = self
            .reader
            .set_node_state(id, row.epoch, store::NodeState::Retired)
            .map_err(store_err)?;
        if !done {
            return Err(Error::Conflict(format!(
                "node '{id}' registered again while it was being retired; nothing was changed"
            )));
        }
        Ok(row)
    }

    /// Every node's counted shard of `name` (value less base), read
    /// straight from the store.
    pub(crate) fn read_from_store(&self, name: &str) -> Result<Vec<(String, i64)>> {
        let rows = self.reader.read_counter(name).map_err(store_err)?;
        Ok(rows
            .into_iter()
            .map(|r| (r.node_id.clone(), r.counted()))
            .collect())
    }

    /// Held by a snapshot for as long as it runs; refused while a
    /// replicated transaction's outcome is open (see `replication_open`).
    pub(crate) fn snapshot_gate(&self) -> Result<parking_lot::MutexGuard<'_, bool>> {
        let open = self.replication_open.lock();
        if *open {
            return Err(Error::LimitExceeded(
                "snapshot postponed: a replicated transaction's outcome is not settled yet".into(),
            ));
        }
        Ok(open)
    }

    /// Tells the threads to stop at their next look, without waiting.
    pub(crate) fn signal_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake.notify_all();
        let _guard = self.idle.0.lock();
        self.idle.1.notify_all();
    }

    /// Stops the threads; the committer makes a last flush first.
    pub(crate) fn stop(&self) {
        self.signal_stop();
        let threads: Vec<_> = self.threads.lock().drain(..).collect();
        for t in threads {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}
