//! The node: owns an [`Engine`] (this node's counters, keys and journal)
//! and, with a shared store, a [`Cluster`] started from it, and their
//! lifecycle (open, serve, shut down). The cluster is handed the engine and
//! knows nothing of the node.
//!
//! [`Node::open`] recovers before it returns, so a `Node` value is always a
//! recovered node; front ends start listening only after that, which is how
//! a node reports ready only after recovery.
//!
//! The increment path takes no global lock: the counter's shard lock (and
//! the key's, with an idempotency key) is held while the lsn is assigned and
//! the record is queued in the journal, then released before waiting for the
//! fsync. See `docs/design.md`, "Commit protocol".

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::cluster::{Cluster, ClusterView, Stores};
use crate::config::{Config, Durability};
use crate::engine::deadlines::ExpireIf;
use crate::engine::idempotency::{self, now_ms};
use crate::engine::journal::Urgency;
use crate::engine::recovery::RecoveryReport;
use crate::engine::storage::{FsStorage, Storage};
use crate::engine::table;
use crate::engine::{Applied, Change, Engine};
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// File in the data directory holding the node id.
pub const NODE_ID_FILE: &str = "node-id";
/// Lock file that keeps two processes off one data directory.
pub const LOCK_FILE: &str = "LOCK";
/// Longest node id, in bytes.
pub const NODE_ID_BYTES_MAX: usize = 64;
/// How often the background thread looks for work (snapshots, key expiry).
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(50);
/// First wait before registering again with a store that could not be
/// reached; doubles up to [`REGISTER_RETRY_MAX`].
const REGISTER_RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest wait between two registration attempts.
const REGISTER_RETRY_MAX: Duration = Duration::from_secs(5);
/// A node still waiting for its store says so in its log at most this often.
const REGISTER_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Longest wait of a node without a store between two looks at its
/// counters' expiries (it also wakes when an earlier one is set).
pub const EXPIRY_SWEEP_INTERVAL: Duration = Duration::from_millis(50);
/// Most expired counters one sweep deletes; the next sweep takes the rest.
pub const EXPIRIES_PER_SWEEP: usize = 1_000;
/// How often expired idempotency keys are purged.
const KEY_PURGE_INTERVAL: Duration = Duration::from_secs(60);
/// Wait after a failed snapshot before trying again.
const SNAPSHOT_RETRY_DELAY: Duration = Duration::from_secs(10);

/// Per-request options of [`Node::increment`].
#[derive(Debug, Clone, Copy, Default)]
pub struct IncrementOptions<'a> {
    /// Durability to acknowledge at; the node's default when `None`.
    pub durability: Option<Durability>,
    /// A key seen again within the retention window is not applied again.
    pub idempotency_key: Option<&'a str>,
}

/// Result of [`Node::increment`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IncrementOutcome {
    /// Value after the increment (for a duplicate: the current value).
    pub value: i64,
    /// The idempotency key had been seen: nothing was applied.
    pub duplicate: bool,
}

/// A counter's global value and its shards, by node id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterDetail {
    pub value: i64,
    pub shards: Vec<(String, i64)>,
}

/// Where a read takes the other nodes' shards from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// The node's cache, refreshed every refresh interval: no store call.
    Cache,
    /// The store, read for this request (blocking).
    Store,
}

/// Whether the node can make writes durable, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    pub reason: Option<String>,
}

/// Figures for `INFO` and `/metrics`.
#[derive(Debug, Clone)]
pub struct NodeStats {
    pub node_id: String,
    pub counters: usize,
    pub idempotency_keys: usize,
    pub next_lsn: u64,
    pub journal_end_pos: u64,
    pub journal_durable_pos: u64,
    pub journal_queued_bytes: usize,
    pub journal_segments: usize,
    pub journal_syncs: u64,
    pub journal_bytes_written: u64,
    pub journal_records_written: u64,
    pub sync_p50_s: Option<f64>,
    pub sync_p99_s: Option<f64>,
    pub batch_p50_records: Option<f64>,
    pub batch_p99_records: Option<f64>,
    pub snapshots_written: u64,
    pub last_snapshot_pos: u64,
    pub recovery_ms: u64,
    pub recovery_records_replayed: u64,
    pub uptime_s: u64,
    pub readiness: Readiness,
    pub default_durability: Durability,
    /// Store transactions committed, and their latency's quantiles.
    pub store_rounds: u64,
    pub store_round_p50_s: Option<f64>,
    pub store_round_p99_s: Option<f64>,
    pub store_rows_flushed: u64,
    pub replicated_batch_p50_requests: Option<f64>,
    pub replicated_batch_p99_requests: Option<f64>,
    pub store_indeterminate_commits: u64,
    pub store_errors: u64,
    /// Lsns applied on this node above its flushed mark (`None` without a
    /// store).
    pub flush_lag_lsns: Option<u64>,
}

/// Whether a node with a shared store has registered there. A node without
/// one is always [`Registration::NotNeeded`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    /// The node runs without a shared store.
    NotNeeded,
    /// Not yet: the store could not be reached (the reason); the node
    /// retries with back-off and serves nothing until it succeeds.
    Pending(String),
    /// Registered: the node has its epoch and has settled with the store.
    Done,
    /// Registration failed in a way retrying cannot mend (the reason); the
    /// node serves nothing and should be stopped.
    Failed(String),
}

/// What [`Node::open`] does when the shared store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreWait {
    /// Fail: `open` returns the error.
    FailFast,
    /// Open anyway after local recovery and keep registering in the
    /// background; until it succeeds the node refuses every request that
    /// needs its global state, and [`Node::readiness`] says why.
    Retry,
}

/// What every clone of a [`Node`] shares.
struct Shared {
    config: Config,
    node_id: String,
    engine: Arc<Engine>,
    /// The link to the shared store, set once the node has registered
    /// there (at open, or later by the registration thread).
    cluster: std::sync::OnceLock<Arc<Cluster>>,
    /// Where registration stands; watched by `tally serve`, which prints
    /// its ready line only once it is done.
    registration: tokio::sync::watch::Sender<Registration>,
    /// Store connections the caller built, reused by every attempt.
    stores: Option<Stores>,
    /// Retries registration while the store cannot be reached.
    registering: Mutex<Option<std::thread::JoinHandle<()>>>,
    metrics: Arc<Metrics>,
    /// A sample of which counters take the most increments.
    hot: crate::hot::HotCounters,
    shutting_down: AtomicBool,
    /// Stops the housekeeping thread.
    stop: (Mutex<bool>, Condvar),
    housekeeping: Mutex<Vec<std::thread::JoinHandle<()>>>,
    recovery: RecoveryReport,
    started: Instant,
    /// The data directory's exclusive lock, held until shutdown completes.
    lock: Mutex<Option<std::fs::File>>,
}

/// A running node. Cheap to clone; all clones share one node.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tally::Error> {
/// use tally::{Config, Durability, IncrementOptions, Node};
///
/// let dir = tempfile::tempdir().unwrap();
/// let node = Node::open(Config::new(dir.path()))?;
/// // Acknowledged only after an fsync covers it (the default, `local`).
/// let hits = node.increment("hits", 1, IncrementOptions::default()).await?;
/// assert_eq!(hits.value, 1);
/// // Retried with the same key: not applied twice.
/// let opts = IncrementOptions { idempotency_key: Some("req-42"), ..Default::default() };
/// node.increment("hits", 5, opts).await?;
/// let again = node.increment("hits", 5, opts).await?;
/// assert!(again.duplicate);
/// assert_eq!(node.get("hits")?, Some(6));
/// node.shutdown()?;
///
/// // Reopened, the node has every acknowledged increment and the key.
/// let node = Node::open(Config::new(dir.path()))?;
/// assert_eq!(node.get("hits")?, Some(6));
/// assert!(node.increment("hits", 5, opts).await?.duplicate);
/// # node.shutdown()?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Node {
    shared: Arc<Shared>,
}

impl Node {
    /// Opens the node on the real file system: locks the data directory,
    /// recovers, starts the journal writer. Returns once the node is ready.
    pub fn open(config: Config) -> Result<Node> {
        Self::open_on_disk(config, None, StoreWait::FailFast)
    }

    /// [`Node::open`] that does not fail when the shared store cannot be
    /// reached yet: it recovers locally, returns, and keeps registering in
    /// the background ([`StoreWait::Retry`]). Watch
    /// [`Node::registration`] to know when the node can serve.
    pub fn open_waiting_for_store(config: Config) -> Result<Node> {
        Self::open_on_disk(config, None, StoreWait::Retry)
    }

    /// Opens the node on any [`Storage`] (tests use the simulated one).
    pub fn open_with_storage(config: Config, storage: Arc<dyn Storage>) -> Result<Node> {
        Self::open_on(config, storage, None, None, StoreWait::FailFast)
    }

    /// Opens the node on the real file system with store connections the
    /// caller built, instead of opening `config.cluster`'s URL (tests wrap a
    /// real store in a fault-injecting one this way).
    pub fn open_with_stores(config: Config, stores: Stores) -> Result<Node> {
        Self::open_on_disk(config, Some(stores), StoreWait::FailFast)
    }

    /// On the real file system: creates and locks the data directory, then
    /// opens the node there.
    fn open_on_disk(config: Config, stores: Option<Stores>, wait: StoreWait) -> Result<Node> {
        crate::engine::storage::create_private_dir_all(&config.data_dir).map_err(|e| {
            Error::io(
                format!("creating data directory {}", config.data_dir.display()),
                e,
            )
        })?;
        let lock = lock_data_dir(&config.data_dir)?;
        Self::open_on(config, Arc::new(FsStorage), Some(lock), stores, wait)
    }

    fn open_on(
        config: Config,
        storage: Arc<dyn Storage>,
        lock: Option<std::fs::File>,
        stores: Option<Stores>,
        wait: StoreWait,
    ) -> Result<Node> {
        if config.durability == Durability::Replicated && config.cluster.is_none() {
            return Err(Error::InvalidConfig {
                field: "durability",
                reason: "replicated cannot be the default of a node without a shared store \
                         (Config::cluster); choose local or memory"
                    .into(),
            });
        }
        let dir = config.data_dir.clone();
        storage
            .create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let node_id = resolve_node_id(storage.as_ref(), &dir, config.node_id.as_deref())?;
        let metrics = Arc::new(Metrics::default());
        let (engine, report) = Engine::open(&config, storage, metrics.clone())?;
        let engine = Arc::new(engine);
        tracing::info!(
            node_id = %node_id,
            counters = engine.table().len(),
            idempotency_keys = engine.keys().len(),
            records_replayed = report.records_applied,
            torn_tail = report.torn_tail.is_some(),
            recovery_ms = report.duration.as_millis() as u64,
            "recovered"
        );
        let (registration, _) = tokio::sync::watch::channel(if config.cluster.is_some() {
            Registration::Pending("registering".into())
        } else {
            Registration::NotNeeded
        });
        let shared = Arc::new(Shared {
            config,
            node_id,
            engine,
            cluster: std::sync::OnceLock::new(),
            registration,
            stores,
            registering: Mutex::new(None),
            metrics,
            hot: crate::hot::HotCounters::default(),
            shutting_down: AtomicBool::new(false),
            stop: (Mutex::new(false), Condvar::new()),
            housekeeping: Mutex::new(Vec::new()),
            recovery: report,
            started: Instant::now(),
            lock: Mutex::new(lock),
        });
        let weak = Arc::downgrade(&shared);
        let handle = std::thread::Builder::new()
            .name("tally-housekeeping".into())
            .spawn(move || housekeeping_main(weak))
            .map_err(|e| Error::io("starting the housekeeping thread", e))?;
        shared.housekeeping.lock().push(handle);
        let weak = Arc::downgrade(&shared);
        let handle = std::thread::Builder::new()
            .name("tally-expiry".into())
            .spawn(move || expiry_main(weak))
            .map_err(|e| Error::io("starting the expiry thread", e))?;
        shared.housekeeping.lock().push(handle);
        if shared.config.cluster.is_some() {
            match (shared.register().map_err(retryable), wait) {
                (Ok(()), _) => {}
                (Err(Ok(reason)), StoreWait::Retry) => {
                    tracing::warn!(%reason, "shared store unreachable; recovered locally, registering again with back-off");
                    shared
                        .registration
                        .send_replace(Registration::Pending(reason));
                    let weak = Arc::downgrade(&shared);
                    let handle = std::thread::Builder::new()
                        .name("tally-register".into())
                        .spawn(move || registration_main(weak))
                        .map_err(|e| Error::io("starting the registration thread", e))?;
                    *shared.registering.lock() = Some(handle);
                }
                (Err(Ok(reason)), StoreWait::FailFast) => {
                    Node { shared }.abandon();
                    return Err(Error::StoreUnavailable(reason));
                }
                (Err(Err(e)), _) => {
                    Node { shared }.abandon();
                    return Err(e);
                }
            }
        }
        Ok(Node { shared })
    }

    /// Where registration with the shared store stands; changes once it
    /// succeeds or fails for good.
    pub fn registration(&self) -> tokio::sync::watch::Receiver<Registration> {
        self.shared.registration.subscribe()
    }

    /// Why the node cannot serve yet, while it waits to register with its
    /// shared store (`None` once registered, or without a store).
    pub fn starting_reason(&self) -> Option<String> {
        self.cluster().err().map(|e| e.to_string())
    }

    /// The cluster, or why the node cannot serve requests that need it:
    /// `None` for a node without a store.
    fn cluster(&self) -> Result<Option<&Cluster>> {
        match self.shared.cluster.get() {
            Some(c) => Ok(Some(c)),
            None if self.shared.config.cluster.is_none() => Ok(None),
            None => Err(Error::StoreUnavailable(format!(
                "the node has not registered with the shared store yet ({}); \
                 nothing was applied",
                self.shared.registration_reason()
            ))),
        }
    }

    /// Stops the threads of a node that failed to open, without the final
    /// snapshot of a shutdown (nothing was served).
    fn abandon(self) {
        let shared = &*self.shared;
        shared.shutting_down.store(true, Ordering::Release);
        {
            let (lock, cv) = &shared.stop;
            *lock.lock() = true;
            cv.notify_all();
        }
        for h in std::mem::take(&mut *shared.housekeeping.lock()) {
            let _ = h.join();
        }
        shared.engine.journal().close();
    }

    /// The node's id.
    pub fn node_id(&self) -> &str {
        &self.shared.node_id
    }

    /// The configuration the node runs with.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// What recovery found when the node opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.shared.recovery
    }

    /// Adds `delta` to counter `name` and returns the new value once the
    /// increment is as durable as asked.
    ///
    /// Errors: [`Error::InvalidInput`] for a bad name or key,
    /// [`Error::Overflow`], [`Error::DurabilityUnavailable`] for
    /// `replicated` without a store, [`Error::JournalFailed`] and
    /// [`Error::ShuttingDown`] (nothing applied), [`Error::Indeterminate`]
    /// (applied in memory, durability unknown), [`Error::LimitExceeded`].
    pub async fn increment(
        &self,
        name: &str,
        delta: i64,
        options: IncrementOptions<'_>,
    ) -> Result<IncrementOutcome> {
        let result = self.increment_checked(name, delta, options).await;
        let m = &self.shared.metrics;
        match &result {
            Ok(o) if o.duplicate => m.duplicates.fetch_add(1, Ordering::Relaxed),
            Ok(_) => m.increments.fetch_add(1, Ordering::Relaxed),
            Err(_) => m.increment_errors.fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    async fn increment_checked(
        &self,
        name: &str,
        delta: i64,
        options: IncrementOptions<'_>,
    ) -> Result<IncrementOutcome> {
        let shared = &*self.shared;
        let engine = &*shared.engine;
        table::validate_name(name)?;
        if let Some(key) = options.idempotency_key {
            idempotency::validate_key(key)?;
        }
        let durability = options.durability.unwrap_or(shared.config.durability);
        if shared.shutting_down.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let cluster = self.cluster()?;
        if let Some(c) = cluster
            && let Some(reason) = c.fenced_reason()
        {
            return Err(Error::Fenced(reason));
        }
        // A key this node has seen may belong to a `replicated` increment
        // whose store transaction is still open, or whose outcome is
        // unknown: it may yet be reverted, so a retry is not told
        // "duplicate" until it is settled. The committer marks the key
        // unresolved before it records it, so checking after finding the
        // key seen leaves no window.
        let unsettled = |key: Option<&str>| -> Result<()> {
            match (cluster, key) {
                (Some(c), Some(key)) if c.key_unresolved(key) => Err(Error::Indeterminate(
                    "an earlier attempt with this idempotency key has an unknown outcome \
                     that the node is still settling with the store; retry shortly"
                        .into(),
                )),
                _ => Ok(()),
            }
        };
        if durability == Durability::Replicated {
            let Some(c) = cluster else {
                return Err(Error::DurabilityUnavailable {
                    level: "replicated",
                    reason: "this node runs without a shared store".into(),
                });
            };
            let seen = options.idempotency_key.map(|key| {
                let fingerprint = idempotency::fingerprint(name, delta);
                engine
                    .keys()
                    .with_key(key, now_ms(), |slot| slot.seen_as(fingerprint))
            });
            if let (Some(key), Some(idempotency::Seen::Different)) = (options.idempotency_key, seen)
            {
                return Err(idempotency::reused_error(key));
            }
            if let (Some(key), Some(idempotency::Seen::Same)) = (options.idempotency_key, seen) {
                unsettled(Some(key))?;
                return Ok(IncrementOutcome {
                    value: self.duplicate_value(name).await,
                    duplicate: true,
                });
            }
            let duplicate = c.replicated(name, delta, options.idempotency_key).await?;
            let value = if duplicate {
                self.duplicate_value(name).await
            } else {
                self.global_value(name).unwrap_or(0)
            };
            return Ok(IncrementOutcome { value, duplicate });
        }
        engine.journal().reserve().await?;
        let urgency = match durability {
            Durability::Local => Urgency::Now,
            _ => Urgency::Later,
        };
        let key = options
            .idempotency_key
            .map(|k| (k, engine.key_expiry(now_ms())));
        let applied = engine.apply(Change::Increment {
            name,
            delta,
            key,
            urgency,
        })?;
        let (mut outcome, end_pos) = match applied {
            Applied::New {
                value,
                end_pos,
                lsn,
            } => {
                shared.hot.record(name, lsn);
                (
                    IncrementOutcome {
                        value,
                        duplicate: false,
                    },
                    end_pos,
                )
            }
            // The first request with this key may still be waiting for its
            // fsync; answer only once everything queued is durable.
            Applied::Duplicate { value } => {
                unsettled(options.idempotency_key)?;
                (
                    IncrementOutcome {
                        value,
                        duplicate: true,
                    },
                    engine.journal().end_pos(),
                )
            }
        };
        if urgency == Urgency::Now {
            if outcome.duplicate {
                engine.journal().request_sync();
            }
            engine.journal().wait_durable(end_pos).await?;
        }
        if let Some(others) = cluster.and_then(|c| c.cache.others(name)) {
            outcome.value = outcome.value.wrapping_add(others);
        }
        Ok(outcome)
    }

    /// Deletes counter `name`: sets it to zero for every node, durably, and
    /// returns the value erased (`None` if there was nothing to delete).
    /// Increments after it count from zero.
    ///
    /// Without a store, the counter is set to zero in the journal (synced
    /// before this returns). With one, the delete is a store transaction
    /// that first writes this node's shard of the counter and then records,
    /// for every node's row, its value at that moment as the row's base
    /// (see `docs/design.md`, "Deleting a counter"): everything this node
    /// acknowledged before is erased, and so is everything the other nodes
    /// had flushed; what they acknowledged in the last flush interval
    /// before it and flush after it survives it, as an increment that came
    /// after. A node's later flush can never bring the erased value back:
    /// it only raises the row's value, and only what lies above the base
    /// counts.
    ///
    /// Errors: [`Error::InvalidInput`], [`Error::ShuttingDown`],
    /// [`Error::Fenced`], [`Error::StoreUnavailable`] (nothing deleted),
    /// [`Error::Indeterminate`] (the store's commit outcome is unknown),
    /// [`Error::JournalFailed`], [`Error::LimitExceeded`].
    pub async fn delete(&self, name: &str) -> Result<Option<i64>> {
        table::validate_name(name)?;
        let shared = &*self.shared;
        if shared.shutting_down.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        if let Some(c) = self.cluster()? {
            // It refuses a fenced node itself, under its queue's lock.
            return c.delete(name, None).await;
        }
        let engine = &*shared.engine;
        engine.journal().reserve().await?;
        let Some((old, end_pos)) = engine.reset(name)? else {
            return Ok(None);
        };
        engine.journal().wait_durable(end_pos).await?;
        shared
            .metrics
            .counters_deleted
            .fetch_add(1, Ordering::Relaxed);
        Ok(Some(old))
    }

    /// Sets counter `name` to expire at the unix time `at_ms` (milliseconds),
    /// or clears its expiry (`None`), if `when` allows it. At its expiry the
    /// counter is deleted as by [`Node::delete`], by the first sweep after
    /// it: within [`EXPIRY_SWEEP_INTERVAL`] on a node without a store, and
    /// within a flush interval and a store round with one (any node's
    /// sweep; one of them deletes). An expiry already past deletes the
    /// counter now. A delete clears the expiry.
    ///
    /// Returns `None` if the counter does not exist (in this node's view),
    /// otherwise whether the expiry changed (for one already past: whether
    /// the counter was deleted; for `None`: whether it had one).
    ///
    /// Without a store the expiry is journaled and synced before this
    /// returns; with one it is a row of the store, written before this
    /// returns.
    ///
    /// Errors: those of [`Node::delete`].
    pub async fn expire(
        &self,
        name: &str,
        at_ms: Option<u64>,
        when: ExpireIf,
    ) -> Result<Option<bool>> {
        table::validate_name(name)?;
        if self.shared.shutting_down.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        if self.get(name)?.is_none() {
            return Ok(None);
        }
        if let Some(at) = at_ms
            && at <= now_ms()
        {
            let current = self.expiry(name).await?.flatten();
            if !when.allows(current, at) {
                return Ok(Some(false));
            }
            return self.delete(name).await.map(|d| Some(d.is_some()));
        }
        if let Some(c) = self.cluster()? {
            if let Some(reason) = c.fenced_reason() {
                return Err(Error::Fenced(reason));
            }
            let store = c.store.clone();
            let name = name.to_string();
            let changed = tokio::task::spawn_blocking(move || match at_ms {
                Some(at) => store.set_expiry(&name, at, when),
                None => store.clear_expiry(&name),
            })
            .await
            .map_err(|e| Error::StoreUnavailable(format!("setting an expiry failed: {e}")))?
            .map_err(crate::cluster::store_err)?;
            return Ok(Some(changed));
        }
        let engine = &*self.shared.engine;
        engine.journal().reserve().await?;
        let Some((changed, end_pos)) = engine.set_expiry(name, at_ms, when)? else {
            return Ok(None);
        };
        if changed {
            engine.journal().wait_durable(end_pos).await?;
        }
        Ok(Some(changed))
    }

    /// When counter `name` expires: `None` if it does not exist (in this
    /// node's view), `Some(None)` if it has no expiry. With a store, read
    /// from the store.
    ///
    /// Errors: [`Error::InvalidInput`], [`Error::StoreUnavailable`].
    pub async fn expiry(&self, name: &str) -> Result<Option<Option<u64>>> {
        table::validate_name(name)?;
        if self.get(name)?.is_none() {
            return Ok(None);
        }
        let Some(c) = self.cluster()? else {
            return Ok(Some(self.shared.engine.deadlines().get(name)));
        };
        let store = c.store.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || store.expiry(&name))
            .await
            .map_err(|e| Error::StoreUnavailable(format!("reading an expiry failed: {e}")))?
            .map_err(crate::cluster::store_err)
            .map(Some)
    }

    /// Takes node `id` out of the cluster view for good (blocking: call
    /// from a blocking thread). Allowed once the node has stopped cleanly,
    /// which it records when its whole shard is in the store; a node that
    /// is down without having stopped is refused unless `force` (its
    /// journal may hold increments it never flushed: retiring gives them
    /// up). Its rows keep counting; a process that registers the id again
    /// brings it back. Returns the node's last address.
    ///
    /// Errors: [`Error::DurabilityUnavailable`] without a store,
    /// [`Error::NotFound`], [`Error::Conflict`], [`Error::StoreUnavailable`].
    pub fn retire(&self, id: &str, force: bool) -> Result<String> {
        let Some(c) = self.cluster()? else {
            return Err(Error::DurabilityUnavailable {
                level: "cluster",
                reason: "this node runs without a shared store: there is no cluster to retire \
                         a node from"
                    .into(),
            });
        };
        c.retire(id, force).map(|row| row.address)
    }

    /// The counter's value with the other nodes' shards read from the
    /// store now ([`Consistency::Store`]), on a blocking thread; on a node
    /// without a store, its own value.
    pub async fn store_value(&self, name: &str) -> Result<Option<i64>> {
        let node = self.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || node.get_detail(&name, Consistency::Store))
            .await
            .map_err(|e| Error::StoreUnavailable(format!("reading the store failed: {e}")))
            .and_then(|r| r)
            .map(|d| d.map(|d| d.value))
    }

    /// The value a duplicate `replicated` increment answers: read from the
    /// store, so that it is never below what the first attempt answered on
    /// any node (that answer was its node's own committed shard plus the
    /// others' as its cache had them, all in the store by then), unless
    /// decrements or a delete came in between.
    async fn duplicate_value(&self, name: &str) -> i64 {
        self.value_after(name, 0).await
    }

    /// The value an increment answers when it asks for the store's: read
    /// from the store once the increment is done. The increment is applied
    /// whatever the read does, so a store that cannot be read must not
    /// turn its success into an error: the answer is then this node's
    /// view (or `fallback` when it has none), which may be older.
    pub async fn value_after(&self, name: &str, fallback: i64) -> i64 {
        match self.store_value(name).await {
            Ok(Some(v)) => v,
            Ok(None) => fallback,
            Err(e) => {
                tracing::debug!(error = %e, "reading a value from the store; answering this node's view");
                self.global_value(name).unwrap_or(fallback)
            }
        }
    }

    /// This node's shard plus the other nodes' (from the cache).
    fn global_value(&self, name: &str) -> Option<i64> {
        let local = self.shared.engine.table().get(name).map(|e| e.value);
        let others = self.shared.cluster.get().and_then(|c| c.cache.others(name));
        match (local, others) {
            (None, None) => None,
            (l, o) => Some(l.unwrap_or(0).wrapping_add(o.unwrap_or(0))),
        }
    }

    /// Waits until every increment applied so far is durable: a barrier.
    /// Callers that apply many increments at `memory` durability and then
    /// call `sync` get `local` durability for all of them with one wait
    /// (the RESP front end does this for each pipelined round). An error
    /// means the journal failed: the increments are applied in memory but
    /// their durability is unknown.
    pub async fn sync(&self) -> Result<()> {
        self.shared.engine.sync().await
    }

    /// Current value of a counter, `None` if it was never incremented. On
    /// a node with a store, the global value: this node's shard plus the
    /// other nodes' as last read from the store (at most the flush interval
    /// plus the refresh interval old).
    pub fn get(&self, name: &str) -> Result<Option<i64>> {
        table::validate_name(name)?;
        self.cluster()?;
        Ok(self.global_value(name))
    }

    /// A counter's global value and every node's shard of it; with
    /// [`Consistency::Store`], the other nodes' shards are read straight
    /// from the store (blocking: call from a blocking thread).
    pub fn get_detail(
        &self,
        name: &str,
        consistency: Consistency,
    ) -> Result<Option<CounterDetail>> {
        table::validate_name(name)?;
        let cluster = self.cluster()?;
        let own_base = cluster.map_or(0, |c| c.cache.own_base(name));
        let local = self.shared.engine.table().get(name).map(|e| e.value);
        let mut shards: Vec<(String, i64)> = Vec::new();
        if let Some(v) = local {
            shards.push((self.shared.node_id.clone(), v.wrapping_sub(own_base)));
        }
        if let Some(c) = cluster {
            let others = match consistency {
                Consistency::Store => c.read_from_store(name)?,
                Consistency::Cache => c.cache.breakdown(name),
            };
            shards.extend(
                others
                    .into_iter()
                    .filter(|(n, _)| *n != self.shared.node_id),
            );
        }
        if shards.is_empty() {
            return Ok(None);
        }
        shards.sort();
        let value = shards.iter().fold(0i64, |a, (_, v)| a.wrapping_add(*v));
        Ok(Some(CounterDetail { value, shards }))
    }

    /// The cluster view (blocking: it reads the store). `None` without a
    /// store.
    pub fn cluster_view(&self) -> Option<Result<ClusterView>> {
        let applied = self.shared.engine.applied_lsn();
        match self.cluster() {
            Ok(cluster) => cluster.map(|c| c.view(applied)),
            Err(e) => Some(Err(e)),
        }
    }

    /// How long since this node opened.
    pub fn uptime(&self) -> Duration {
        self.shared.started.elapsed()
    }

    /// The highest lsn this node has assigned: each change takes one.
    pub fn applied_lsn(&self) -> u64 {
        self.shared.engine.applied_lsn()
    }

    /// Up to `n` of this node's counters taking the most increments now,
    /// estimated from a sample (see [`crate::hot`]).
    pub fn hot_counters(&self, n: usize) -> Vec<crate::hot::HotCounter> {
        self.shared.hot.top(n)
    }

    /// Completes with the reason when this node is fenced (never, for a
    /// node without a store).
    pub fn fenced_signal(&self) -> Option<tokio::sync::watch::Receiver<Option<String>>> {
        self.shared.cluster.get().map(|c| c.fenced_signal())
    }

    /// The other nodes as this node's cache last read them (no store
    /// call); `None` without a store.
    pub fn peers(&self) -> Option<Vec<crate::cluster::PeerState>> {
        self.shared.cluster.get().map(|c| c.peers())
    }

    /// The epoch this process holds in the store; `None` without a store
    /// or before registering.
    pub fn epoch(&self) -> Option<u64> {
        self.shared
            .cluster
            .get()
            .map(|c| c.epoch())
            .filter(|e| *e > 0)
    }

    /// Why `replicated` increments cannot be made durable now (`None`
    /// when they can, or on a node without a store).
    pub fn replicated_unavailable(&self) -> Option<String> {
        self.shared
            .cluster
            .get()
            .and_then(|c| c.replicated_unavailable())
    }

    /// Up to `limit` counters with names starting with `prefix` and sorting
    /// after `after`, in name order, with their values. On a node with a
    /// store, every counter any node holds a shard of (this node's table
    /// plus the cache of the others'), with global values.
    ///
    /// Costs a scan of the table and, with a store, of the cache: call it
    /// from a blocking thread when the node holds many counters.
    pub fn list(&self, prefix: &str, after: Option<&str>, limit: usize) -> Vec<(String, i64)> {
        let Some(cluster) = self.shared.cluster.get().map(|c| &**c) else {
            return self.shared.engine.table().list(prefix, after, limit);
        };
        // The first `limit` names of the union are among the first `limit`
        // of each side, so the table's own page is enough from it.
        let mut names: Vec<String> = self
            .shared
            .engine
            .table()
            .list(prefix, after, limit)
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        names.extend(
            cluster
                .cache
                .names_with_prefix(prefix)
                .into_iter()
                .filter(|n| after.is_none_or(|a| n.as_str() > a)),
        );
        names.sort_unstable();
        names.dedup();
        names.truncate(limit);
        names
            .into_iter()
            .filter_map(|name| self.global_value(&name).map(|v| (name, v)))
            .collect()
    }

    /// Number of counters: on a node with a store, counters any node holds
    /// a shard of (as far as the cache knows), which costs a scan of the
    /// cache; without one, this node's, at no cost.
    pub fn counter_count(&self) -> usize {
        let own = self.shared.engine.table().len();
        let Some(cluster) = self.shared.cluster.get().map(|c| &**c) else {
            return own;
        };
        let others_only = cluster
            .cache
            .names_with_prefix("")
            .iter()
            .filter(|name| self.shared.engine.table().get(name).is_none())
            .count();
        own + others_only
    }

    /// Calls `f` with every counter of this node's shard, shard by shard
    /// (for `/metrics`): what this node's shard counts towards it (its
    /// value less its base, on a counter that was deleted).
    pub fn for_each_counter(&self, mut f: impl FnMut(&str, i64)) {
        // Taken once: only deleted counters have a base, so the map is
        // small, and a lookup per counter then takes no lock.
        let bases = self
            .shared
            .cluster
            .get()
            .map(|c| c.cache.own_bases())
            .unwrap_or_default();
        for shard in 0..table::SHARDS {
            self.shared
                .engine
                .table()
                .for_each_in_shard(shard, |name, e| {
                    let base = bases.get(name).copied().unwrap_or(0);
                    f(name, e.value.wrapping_sub(base))
                });
        }
    }

    /// Ready when the journal can make writes durable and the node is not
    /// shutting down.
    pub fn readiness(&self) -> Readiness {
        if let Err(e) = self.cluster() {
            return Readiness {
                ready: false,
                reason: Some(e.to_string()),
            };
        }
        if let Some(reason) = self.shared.cluster.get().and_then(|c| c.fenced_reason()) {
            return Readiness {
                ready: false,
                reason: Some(reason),
            };
        }
        if let Some(reason) = self.shared.engine.journal().failure() {
            return Readiness {
                ready: false,
                reason: Some(reason.to_string()),
            };
        }
        if self.shared.shutting_down.load(Ordering::Acquire) {
            return Readiness {
                ready: false,
                reason: Some("shutting down".into()),
            };
        }
        Readiness {
            ready: true,
            reason: None,
        }
    }

    /// The node's own metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Figures for `INFO` and `/metrics`.
    pub fn stats(&self) -> NodeStats {
        let shared = &*self.shared;
        let engine = &*shared.engine;
        let m = &shared.metrics;
        let journal = engine.journal();
        NodeStats {
            node_id: shared.node_id.clone(),
            counters: engine.table().len(),
            idempotency_keys: engine.keys().len(),
            next_lsn: engine.next_lsn(),
            journal_end_pos: journal.end_pos(),
            journal_durable_pos: journal.progress().durable_pos,
            journal_queued_bytes: journal.queued_bytes(),
            journal_segments: journal.segment_count(),
            journal_syncs: m.journal_syncs.load(Ordering::Relaxed),
            journal_bytes_written: m.journal_bytes_written.load(Ordering::Relaxed),
            journal_records_written: m.journal_records_written.load(Ordering::Relaxed),
            sync_p50_s: m.journal_sync_seconds.quantile_upper_bound(0.5),
            sync_p99_s: m.journal_sync_seconds.quantile_upper_bound(0.99),
            batch_p50_records: m.journal_batch_records.quantile_upper_bound(0.5),
            batch_p99_records: m.journal_batch_records.quantile_upper_bound(0.99),
            snapshots_written: m.snapshots_written.load(Ordering::Relaxed),
            last_snapshot_pos: engine.last_snapshot_pos(),
            recovery_ms: m.recovery_ms.load(Ordering::Relaxed),
            recovery_records_replayed: m.recovery_records_replayed.load(Ordering::Relaxed),
            uptime_s: shared.started.elapsed().as_secs(),
            readiness: self.readiness(),
            default_durability: shared.config.durability,
            store_rounds: m.store_round_seconds.count(),
            store_round_p50_s: m.store_round_seconds.quantile_upper_bound(0.5),
            store_round_p99_s: m.store_round_seconds.quantile_upper_bound(0.99),
            store_rows_flushed: m.store_rows_flushed.load(Ordering::Relaxed),
            replicated_batch_p50_requests: m.replicated_batch_requests.quantile_upper_bound(0.5),
            replicated_batch_p99_requests: m.replicated_batch_requests.quantile_upper_bound(0.99),
            store_indeterminate_commits: m.store_indeterminate_commits.load(Ordering::Relaxed),
            store_errors: m.store_errors.load(Ordering::Relaxed),
            flush_lag_lsns: shared
                .cluster
                .get()
                .map(|c| engine.applied_lsn().saturating_sub(c.flushed().lsn)),
        }
    }

    /// Takes a snapshot now and drops the journal segments it covers.
    /// Returns the snapshot's path.
    pub fn snapshot(&self) -> Result<PathBuf> {
        self.shared.snapshot()
    }

    /// Stops taking writes, makes everything queued durable, takes a final
    /// snapshot if the journal grew since the last one, and stops the
    /// node's threads. Idempotent; blocks until done.
    pub fn shutdown(&self) -> Result<()> {
        let shared = &*self.shared;
        if shared.shutting_down.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        {
            let (lock, cv) = &shared.stop;
            *lock.lock() = true;
            cv.notify_all();
        }
        for h in std::mem::take(&mut *shared.housekeeping.lock()) {
            let _ = h.join();
        }
        // The committer makes a last flush while the journal still runs.
        if let Some(h) = shared.registering.lock().take() {
            let _ = h.join();
        }
        if let Some(c) = shared.cluster.get() {
            c.stop();
        }
        let journal = shared.engine.journal();
        journal.close();
        if let Some(reason) = journal.failure() {
            return Err(Error::JournalFailed(reason));
        }
        // Not before registration settled the journal's replicated records
        // with the store (see `Shared::snapshot`); the journal keeps them.
        let settled = shared.cluster.get().is_some() || shared.config.cluster.is_none();
        if settled && journal.end_pos() > shared.engine.last_snapshot_pos() {
            shared.snapshot()?;
        }
        // Everything is durable: another process may now open the directory.
        shared.lock.lock().take();
        tracing::info!(node_id = %shared.node_id, "node shut down");
        Ok(())
    }
}

impl Shared {
    /// One attempt to register with the store and settle with it (see
    /// `Cluster::start`); on success the node serves.
    fn register(&self) -> Result<()> {
        let cluster_config = self
            .config
            .cluster
            .clone()
            .ok_or_else(|| Error::InvalidConfig {
                field: "cluster",
                reason: "registering needs a shared store".into(),
            })?;
        let cluster = Cluster::start(
            &self.engine,
            &self.node_id,
            cluster_config,
            self.stores.clone(),
            &self.recovery,
            self.metrics.clone(),
        )
        // A journal that failed while settling is not a store outage: never
        // worth another attempt.
        .map_err(|e| match self.engine.journal().failure() {
            Some(reason) => Error::JournalFailed(reason),
            None => e,
        })?;
        if self.cluster.set(cluster).is_err() {
            return Err(Error::InvalidConfig {
                field: "cluster",
                reason: "the node registered twice".into(),
            });
        }
        self.registration.send_replace(Registration::Done);
        Ok(())
    }

    /// Why the node is not registered (for errors and readiness).
    fn registration_reason(&self) -> String {
        match &*self.registration.borrow() {
            Registration::Pending(reason) => {
                format!("waiting for the shared store: {reason}")
            }
            Registration::Failed(reason) => format!("registration failed: {reason}"),
            Registration::NotNeeded | Registration::Done => "registering".into(),
        }
    }

    /// A snapshot, never while a replicated transaction's outcome is open
    /// (see `Cluster::snapshot_gate`): the gate is held for the whole
    /// snapshot.
    fn snapshot(&self) -> Result<PathBuf> {
        let _gate = match self.cluster.get() {
            Some(c) => Some(c.snapshot_gate()?),
            // Not registered yet: the journal may hold replicated records
            // that registration has still to settle with the store.
            None if self.config.cluster.is_some() => {
                return Err(Error::LimitExceeded(
                    "snapshot postponed: the node has not registered with the shared store yet"
                        .into(),
                ));
            }
            None => None,
        };
        self.engine.snapshot()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Without an explicit shutdown: the cluster's threads stop at their
        // next look (they hold the engine weakly), and the engine syncs
        // what is queued when the last reference goes.
        if let Some(c) = self.cluster.get() {
            c.signal_stop();
        }
    }
}

/// Whether a failed registration is worth trying again: `Ok(reason)` for a
/// store that could not be reached or whose commit outcome is unknown
/// (registering again only takes another epoch), `Err` for anything else.
fn retryable(e: Error) -> std::result::Result<String, Error> {
    match e {
        Error::StoreUnavailable(reason) => Ok(reason),
        Error::Indeterminate(reason) => Ok(reason.to_string()),
        other => Err(other),
    }
}

/// Registers with a store that could not be reached at open, with back-off,
/// until it succeeds, fails for good, or the node stops.
fn registration_main(shared: std::sync::Weak<Shared>) {
    let mut backoff = REGISTER_RETRY_MIN;
    let mut last_log = Instant::now();
    loop {
        {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let (lock, cv) = &shared.stop;
            let mut stop = lock.lock();
            if !*stop {
                cv.wait_for(&mut stop, backoff);
            }
            if *stop {
                return;
            }
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match shared.register().map_err(retryable) {
            Ok(()) => {
                tracing::info!(node_id = %shared.node_id, "registered with the shared store; serving");
                return;
            }
            Err(Ok(reason)) => {
                if last_log.elapsed() >= REGISTER_LOG_INTERVAL {
                    tracing::warn!(%reason, "still waiting for the shared store");
                    last_log = Instant::now();
                }
                shared
                    .registration
                    .send_replace(Registration::Pending(reason));
                backoff = (backoff * 2).min(REGISTER_RETRY_MAX);
            }
            Err(Err(e)) => {
                tracing::error!(error = %e, "registering with the shared store failed; the node cannot serve");
                shared
                    .registration
                    .send_replace(Registration::Failed(e.to_string()));
                return;
            }
        }
    }
}

fn housekeeping_main(shared: std::sync::Weak<Shared>) {
    let mut last_purge = Instant::now();
    let mut retry_snapshot_at: Option<Instant> = None;
    loop {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        {
            let (lock, cv) = &shared.stop;
            let mut stop = lock.lock();
            if *stop {
                return;
            }
            cv.wait_for(&mut stop, HOUSEKEEPING_INTERVAL);
            if *stop {
                return;
            }
        }
        let engine = &*shared.engine;
        if engine.journal_bytes_since_snapshot() >= shared.config.snapshot_journal_bytes
            && retry_snapshot_at.is_none_or(|t| Instant::now() >= t)
            && engine.journal().failure().is_none()
        {
            match shared.snapshot() {
                Ok(_) => retry_snapshot_at = None,
                Err(e) => {
                    tracing::error!(error = %e, "snapshot failed; the journal keeps everything, retrying later");
                    retry_snapshot_at = Some(Instant::now() + SNAPSHOT_RETRY_DELAY);
                }
            }
        }
        if last_purge.elapsed() >= KEY_PURGE_INTERVAL {
            let n = engine.purge_expired_keys();
            if n > 0 {
                tracing::debug!(keys = n, "expired idempotency keys purged");
            }
            last_purge = Instant::now();
        }
    }
}
/// The thread that deletes counters whose expiry has come: from the
/// engine's expiries on a node without a store, from the store's with one.
///
/// It sleeps without holding the node (at most [`EXPIRY_SWEEP_INTERVAL`]
/// at a time), and holds it only while it sweeps: with the housekeeping
/// thread also taking the node in turns, two threads holding it in
/// alternation would keep a node dropped without a shutdown (and its data
/// directory's lock) alive for ever.
fn expiry_main(shared: std::sync::Weak<Shared>) {
    let mut last_store_sweep = Instant::now();
    loop {
        let wait = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            if *shared.stop.0.lock() {
                return;
            }
            match (shared.cluster.get(), shared.config.cluster.is_some()) {
                (Some(c), _) => c
                    .config
                    .flush_interval
                    .saturating_sub(last_store_sweep.elapsed()),
                (None, true) => EXPIRY_SWEEP_INTERVAL,
                (None, false) => shared
                    .engine
                    .deadlines()
                    .next()
                    .map_or(EXPIRY_SWEEP_INTERVAL, |at| {
                        Duration::from_millis(at.saturating_sub(now_ms()))
                    }),
            }
            .min(EXPIRY_SWEEP_INTERVAL)
        };
        std::thread::sleep(wait);
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if *shared.stop.0.lock() {
            return;
        }
        match (shared.cluster.get(), shared.config.cluster.is_some()) {
            (Some(c), _) if last_store_sweep.elapsed() >= c.config.flush_interval => {
                sweep_store(c);
                last_store_sweep = Instant::now();
            }
            (Some(_), _) | (None, true) => {}
            (None, false) => sweep_engine(&shared),
        }
    }
}

/// Deletes the counters of this node's engine whose expiry has come.
fn sweep_engine(shared: &Shared) {
    let engine = &*shared.engine;
    let due = engine.deadlines().due(now_ms(), EXPIRIES_PER_SWEEP);
    let mut expired = 0;
    for (name, at) in due {
        match engine.expire(&name, at) {
            Ok(Some(_)) => expired += 1,
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(counter = %name, error = %e, "deleting an expired counter failed; trying again");
                break;
            }
        }
    }
    if expired > 0 {
        if let Err(e) = engine.sync_blocking() {
            tracing::warn!(error = %e, "syncing the deletes of expired counters failed");
            return;
        }
        let m = &shared.metrics;
        m.counters_deleted.fetch_add(expired, Ordering::Relaxed);
        m.counters_expired.fetch_add(expired, Ordering::Relaxed);
    }
}

/// Queues the delete of every counter whose expiry in the store has come,
/// and waits for their outcome. Every node sweeps: each delete names the
/// expiry it read, and only the first to commit deletes.
fn sweep_store(c: &Cluster) {
    if c.fenced_reason().is_some() {
        return;
    }
    let due = match c.store.due_expiries(now_ms(), EXPIRIES_PER_SWEEP) {
        Ok(due) => due,
        Err(e) => {
            tracing::debug!(error = %e, "reading expiries from the store failed; trying again");
            return;
        }
    };
    let mut waiting = Vec::with_capacity(due.len());
    for (name, at) in due {
        match c.queue_delete(&name, Some(at)) {
            Ok(rx) => waiting.push((name, rx)),
            Err(e) => {
                tracing::debug!(counter = %name, error = %e, "deleting an expired counter must wait");
                break;
            }
        }
    }
    for (name, rx) in waiting {
        match rx.blocking_recv() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(counter = %name, error = %e, "deleting an expired counter failed; trying again")
            }
            Err(_) => return,
        }
    }
}

/// Takes an exclusive `flock` on the data directory's lock file, so that
/// two processes never write one journal.
fn lock_data_dir(dir: &Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(crate::engine::storage::FILE_MODE)
        .open(&path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    // SAFETY: flock on a descriptor we own, for the life of `file`.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(Error::io(
            format!(
                "data directory {} is in use by another tally process (lock on {})",
                dir.display(),
                path.display()
            ),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(file)
}

fn validate_node_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= NODE_ID_BYTES_MAX
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "node id",
            format!(
                "'{id}' must be 1 to {NODE_ID_BYTES_MAX} characters of letters, digits, '-', '_' or '.'"
            ),
        ))
    }
}

/// Reads the node id persisted in `dir`, or persists `wanted` (or a new
/// random id) on first start. A data directory belongs to one node id: a
/// different `wanted` is refused, since counting one node's journal under
/// another id would double-count it in a cluster.
fn resolve_node_id(storage: &dyn Storage, dir: &Path, wanted: Option<&str>) -> Result<String> {
    let path = dir.join(NODE_ID_FILE);
    let names = storage
        .list(dir)
        .map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
    if names.iter().any(|n| n == NODE_ID_FILE) {
        let bytes = storage
            .read(&path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let id = String::from_utf8_lossy(&bytes).trim().to_string();
        validate_node_id(&id).map_err(|_| Error::Corrupt {
            path: path.clone(),
            offset: 0,
            reason: format!("'{id}' is not a valid node id"),
        })?;
        if let Some(w) = wanted
            && w != id
        {
            return Err(Error::invalid(
                "node id",
                format!(
                    "the data directory {} belongs to node '{id}', not '{w}'; \
                     use another data directory for a different node",
                    dir.display()
                ),
            ));
        }
        return Ok(id);
    }
    let id = match wanted {
        Some(w) => w.to_string(),
        None => random_node_id(),
    };
    validate_node_id(&id)?;
    let tmp = dir.join("node-id.tmp");
    let io = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |e| Error::io(what, e)
    };
    let mut f = storage.create(&tmp).map_err(io("writing"))?;
    f.append(format!("{id}\n").as_bytes())
        .map_err(io("writing"))?;
    f.sync().map_err(io("syncing"))?;
    storage.rename(&tmp, &path).map_err(io("renaming"))?;
    storage
        .sync_dir(dir)
        .map_err(io("syncing the directory of"))?;
    Ok(id)
}

fn random_node_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    format!("node-{:08x}", h.finish() as u32)
}
