//! The shared store: where every node flushes its shard of every counter,
//! takes its epoch, heartbeats, and records idempotency keys that must hold
//! across nodes.
//!
//! The store keeps one row per (counter, node): the node's absolute
//! contribution and the [`Version`] `(epoch, lsn)` that wrote it. A node only
//! ever writes its own rows, so nodes never contend on a row. A stored row is
//! replaced only by a strictly higher version, which makes a repeated or
//! reordered flush harmless. A node takes a new epoch every time it starts
//! ([`Store::register`]); every write transaction checks, and keeps valid
//! until commit, that the epoch is still the node's current one
//! ([`Store::begin`]), so a zombie or a second process with the same node id
//! can never write after a newer process has registered.
//!
//! Two backends implement [`Store`]: `sqlite` (one file shared by the node
//! processes of one machine, the default; cargo feature `sqlite`) and
//! `postgres` (across machines; feature `postgres`). [`open`] picks one
//! from a URL; [`schema`] owns the tables and their versioned migrations;
//! `faulty` wraps a store to fail on demand in tests and `bench` times a
//! flush (both behind the `testkit` feature). `docs/design.md`, "Shared store", gives the
//! schema and the fencing argument.
//!
//! This module must never decide *what* to flush or when: that belongs to
//! the node. It must never be called from an async task either: both
//! backends block the calling thread on I/O (and the `postgres` crate runs
//! its own small runtime, which panics inside another one). Call it from a
//! dedicated thread or `tokio::task::spawn_blocking`.

#[cfg(feature = "testkit")]
pub mod bench;
#[cfg(any(test, feature = "testkit"))]
pub mod faulty;
#[cfg(feature = "postgres")]
pub mod pgtls;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod schema;
#[cfg(feature = "sqlite")]
pub mod sqlite;
pub mod url;

use std::collections::HashMap;
use std::sync::Arc;

pub use self::url::StoreUrl;

/// Largest epoch, lsn or time the store can hold: both backends keep them
/// in signed 64-bit columns. A value above it is refused with
/// [`StoreError::Invalid`], never wrapped.
pub const STORED_INT_MAX: u64 = i64::MAX as u64;

/// Who wrote a shard row: the writer's epoch, then its log sequence number.
/// Ordered lexicographically, so any write of a newer epoch outranks every
/// write of an older one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Version {
    pub epoch: u64,
    pub lsn: u64,
}

impl Version {
    pub const fn new(epoch: u64, lsn: u64) -> Version {
        Version { epoch, lsn }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "({}, {})", self.epoch, self.lsn)
    }
}

/// The store's replication, as its primary sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Replication {
    /// Standbys streaming from the primary.
    pub standbys: u32,
    /// Those that must have each commit before it is reported
    /// (synchronous); `None` when the store's user may not see it (grant
    /// it `pg_monitor`).
    pub synchronous_standbys: Option<u32>,
}

/// One node's shard of one counter, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardRow {
    pub counter: String,
    pub node_id: String,
    /// The node's absolute contribution to the counter.
    pub value: i64,
    pub version: Version,
    /// What the row's value was when the counter was last deleted
    /// ([`StoreTx::delete_counter`]); 0 if it never was. The row counts
    /// `value - base` towards the counter's value.
    pub base: i64,
}

impl ShardRow {
    /// What this row adds to the counter's value now.
    pub fn counted(&self) -> i64 {
        self.value.wrapping_sub(self.base)
    }
}

/// What [`StoreTx::delete_counter`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletedCounter {
    /// The counter's value the delete erased: the sum of its rows' counted
    /// values just before it.
    pub erased: i64,
    /// Every node's row of the counter just after it, each with
    /// `base == value`.
    pub rows: Vec<ShardRow>,
}

impl DeletedCounter {
    /// The delete of the rows `before` held just before it: their counted
    /// values are what it erased, and each row's base becomes its value.
    #[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
    pub(crate) fn of(before: Vec<ShardRow>) -> DeletedCounter {
        let erased = before
            .iter()
            .fold(0i64, |acc, r| acc.wrapping_add(r.counted()));
        let rows = before
            .into_iter()
            .map(|r| ShardRow { base: r.value, ..r })
            .collect();
        DeletedCounter { erased, rows }
    }
}

/// Most deletes [`Store::deleted_since`] reads in one call.
pub const DELETES_PAGE_MAX: usize = 1_000;

/// A node's state as the store records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Registered by a process that has not stopped cleanly (it may be
    /// running, or have crashed: its heartbeat says which).
    Running,
    /// Its last process stopped cleanly, with its whole shard in the store.
    Stopped,
    /// Taken out of the cluster view for good (`tally node retire`); its
    /// rows still count. A process that registers the id again brings it
    /// back as running.
    Retired,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Running => "running",
            NodeState::Stopped => "stopped",
            NodeState::Retired => "retired",
        }
    }

    /// Parses a stored state; anything else can only come from a write
    /// outside tally.
    pub fn parse(s: &str) -> Result<NodeState, StoreError> {
        match s {
            "running" => Ok(NodeState::Running),
            "stopped" => Ok(NodeState::Stopped),
            "retired" => Ok(NodeState::Retired),
            other => Err(StoreError::Invalid(format!(
                "the store holds an unknown node state '{other}'; the tally tables were \
                 changed outside tally"
            ))),
        }
    }
}

/// The host name and process id a registration records, so that a second
/// process started with a running node's id can name the one it found.
pub fn this_process() -> (String, u32) {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at
    // most that many bytes and the result is read up to its first NUL.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let host = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    (host, std::process::id())
}

/// What the store knows about one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    pub node_id: String,
    /// The node's current epoch; only a process holding it may write.
    pub epoch: u64,
    /// Where the node serves clients, as it said when it registered.
    pub address: String,
    pub started_at_ms: u64,
    pub heartbeat_at_ms: u64,
    /// How far the node's flushes have reached ([`StoreTx::set_flushed`]).
    pub flushed: Version,
    /// The highest version of any row the node has committed
    /// ([`StoreTx::set_marks`]); `(0, 0)` when none is recorded.
    pub written: Version,
    /// The node's applied lsn as of its last heartbeat.
    pub applied_lsn: u64,
    pub state: NodeState,
    /// The host and process id of the process that last registered it
    /// (empty and 0 for a row written before schema version 4).
    pub host: String,
    pub pid: u32,
}

/// An idempotency key recorded in the store, and who recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    pub key: String,
    pub node_id: String,
    pub epoch: u64,
    pub counter: String,
    /// Unix milliseconds; the key may be purged at or after this time.
    pub expires_at_ms: u64,
}

/// Result of [`Store::register`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The epoch this process now holds; every earlier one is fenced.
    pub epoch: u64,
    /// The node's row as it was before this registration (`None` on the
    /// node id's first start): its last flushed version, applied lsn and
    /// heartbeat, which restore compares with the local state.
    pub previous: Option<NodeRow>,
}

/// Errors of the shared store. Each variant tells the caller what it may
/// assume about the operation that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// This node's epoch has been superseded: stop writing, for good.
    #[error(
        "node '{node_id}' is fenced: its epoch {ours} was superseded by epoch {current} \
         (another process registered the same node id); this process must stop writing"
    )]
    Fenced {
        node_id: String,
        ours: u64,
        current: u64,
    },

    /// The operation definitely did not take effect (connection refused,
    /// statement error before commit, rollback, busy timeout...). Retrying
    /// later is safe.
    #[error("store unavailable, nothing was written: {0}")]
    Unavailable(String),

    /// A commit was sent but its outcome is unknown (the connection broke
    /// while committing). The writes may or may not be in the store; a
    /// retry must be harmless either way (versions and keys make it so).
    #[error("store commit outcome unknown: {0}")]
    Indeterminate(String),

    /// The store is behind what this process committed to it: the node's
    /// row is missing, holds an older epoch than this process's, or records
    /// fewer of its writes than this process made. The store came back
    /// older (an asynchronous failover, a restored backup, an SQLite file
    /// copied back); nothing was written. The node must register again and
    /// write its shard anew (see `docs/design.md`, "Store regression").
    #[error("the store is behind what this node committed to it: {0}")]
    Regressed(String),

    /// Bad configuration, URL or schema (e.g. a newer schema version than
    /// this build knows), or a value the store cannot hold. Retrying does
    /// not help; the message says what to change.
    #[error("store misconfigured: {0}")]
    Invalid(String),
}

/// The shared store, blocking. One transaction at a time per `Store` value:
/// while a [`StoreTx`] is open, other calls on the same value wait for it,
/// so never call the store from the thread that holds an open transaction.
/// Open a second `Store` for reads that must not wait behind flushes.
///
/// Call only from blocking threads, never from an async task (see the
/// module documentation).
/// Most expiries one [`Store::due_expiries`] returns.
pub const EXPIRIES_PAGE_MAX: usize = 1000;

pub use crate::engine::deadlines::ExpireIf;

/// The one statement of [`Store::set_expiry`] under `when`, parameters
/// `$1` counter and `$2` the time: the condition is judged by the store as
/// it writes. Both backends read the same SQL (SQLite with `?` for `$`).
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) fn set_expiry_sql(when: ExpireIf) -> &'static str {
    match when {
        ExpireIf::Always => {
            "INSERT INTO tally_expiries (counter, at_ms) VALUES ($1, $2) \
             ON CONFLICT (counter) DO UPDATE SET at_ms = EXCLUDED.at_ms"
        }
        ExpireIf::NoExpiry => {
            "INSERT INTO tally_expiries (counter, at_ms) VALUES ($1, $2) \
             ON CONFLICT (counter) DO NOTHING"
        }
        ExpireIf::HasExpiry => "UPDATE tally_expiries SET at_ms = $2 WHERE counter = $1",
        ExpireIf::Later => "UPDATE tally_expiries SET at_ms = $2 WHERE counter = $1 AND at_ms < $2",
        ExpireIf::Earlier => {
            "INSERT INTO tally_expiries (counter, at_ms) VALUES ($1, $2) \
             ON CONFLICT (counter) DO UPDATE SET at_ms = EXCLUDED.at_ms \
             WHERE tally_expiries.at_ms > EXCLUDED.at_ms"
        }
    }
}

#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) const EXPIRY_SQL: &str = "SELECT at_ms FROM tally_expiries WHERE counter = $1";
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) const CLEAR_EXPIRY_SQL: &str = "DELETE FROM tally_expiries WHERE counter = $1";
/// The expiry a sweeping delete names, taken away: no row, no delete.
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) const TAKE_EXPIRY_SQL: &str =
    "DELETE FROM tally_expiries WHERE counter = $1 AND at_ms = $2";
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) const DUE_EXPIRIES_SQL: &str = "SELECT counter, at_ms FROM tally_expiries \
     WHERE at_ms <= $1 ORDER BY at_ms, counter LIMIT $2";

pub trait Store: Send + Sync {
    /// `"sqlite"` or `"postgres"`.
    fn backend(&self) -> &'static str;

    /// Registers the node (inserting its row on first start) and atomically
    /// takes epoch = previous + 1. The row records this process
    /// ([`this_process`]) and the state running. Two processes registering one node id at
    /// once get two different epochs; the higher one wins every later
    /// [`Store::begin`].
    fn register(
        &self,
        node_id: &str,
        address: &str,
        now_ms: u64,
    ) -> Result<Registration, StoreError> {
        self.register_above(node_id, address, now_ms, 0)
    }

    /// [`Store::register`], taking an epoch above `floor` too: epoch =
    /// max(previous + 1, floor + 1). A node that finds the store behind it
    /// ([`StoreError::Regressed`]) registers again above the epoch it
    /// holds, so that no epoch is ever handed out twice even when the
    /// store has forgotten it.
    fn register_above(
        &self,
        node_id: &str,
        address: &str,
        now_ms: u64,
        floor: u64,
    ) -> Result<Registration, StoreError>;

    /// Starts a write transaction for this node. Fails with
    /// [`StoreError::Fenced`] unless `epoch` is the node's current epoch, and
    /// keeps that check valid until commit: a registration that would bump
    /// the epoch waits until the transaction ends (PostgreSQL: the node row
    /// is locked `FOR UPDATE`; SQLite: `BEGIN IMMEDIATE` takes the write
    /// lock). Dropping the transaction without committing rolls it back.
    fn begin(&self, node_id: &str, epoch: u64) -> Result<Box<dyn StoreTx + '_>, StoreError> {
        self.begin_at(node_id, epoch, Version::default())
    }

    /// [`Store::begin`] for a process that has committed rows up to version
    /// `written` ([`StoreTx::set_marks`]): fails with
    /// [`StoreError::Regressed`] if the node's row is missing, holds an
    /// epoch below `epoch`, or records a written version below `written`.
    fn begin_at(
        &self,
        node_id: &str,
        epoch: u64,
        written: Version,
    ) -> Result<Box<dyn StoreTx + '_>, StoreError>;

    /// Records that the node is alive and how far it has applied; fails with
    /// [`StoreError::Fenced`] if `epoch` has been superseded.
    fn heartbeat(
        &self,
        node_id: &str,
        epoch: u64,
        now_ms: u64,
        applied_lsn: u64,
    ) -> Result<(), StoreError> {
        self.heartbeat_at(node_id, epoch, Version::default(), now_ms, applied_lsn)
    }

    /// [`Store::heartbeat`], checking the store against `written` as
    /// [`Store::begin_at`] does ([`StoreError::Regressed`]), so that an idle
    /// node notices a store that went back.
    fn heartbeat_at(
        &self,
        node_id: &str,
        epoch: u64,
        written: Version,
        now_ms: u64,
        applied_lsn: u64,
    ) -> Result<(), StoreError>;

    /// Sets the node's recorded state, if its epoch is still `epoch` (a
    /// process that registered since owns the row); returns whether it
    /// did.
    fn set_node_state(
        &self,
        node_id: &str,
        epoch: u64,
        state: NodeState,
    ) -> Result<bool, StoreError>;

    /// Every stored row of `node_id`, in no particular order.
    fn load_shard(&self, node_id: &str) -> Result<Vec<ShardRow>, StoreError>;

    /// Rows of `node_id` whose version is greater than `after`, ordered by
    /// version (then counter name), at most `limit` of them, except that a
    /// page never ends between rows sharing one version: pass the last
    /// row's version as the next `after` and every row is visited once.
    fn changes_since(
        &self,
        node_id: &str,
        after: Version,
        limit: usize,
    ) -> Result<Vec<ShardRow>, StoreError>;

    /// Every node's shard of `counter`, in no particular order; the
    /// counter's global value is the sum of their counted values
    /// ([`ShardRow::counted`]).
    fn read_counter(&self, counter: &str) -> Result<Vec<ShardRow>, StoreError>;

    /// The rows of the counters deleted after delete sequence number
    /// `after` (at most `limit` deletes, in sequence order, every row of
    /// each), each with the sequence number of its counter's last delete.
    /// A delete changes rows' bases, not their versions, so
    /// [`Store::changes_since`] does not show it: this is how a reader
    /// learns it. Deletes commit in sequence order (each takes the deletes'
    /// lock until it commits), so a reader that moves its cursor to the
    /// last number read misses none.
    fn deleted_since(&self, after: u64, limit: usize) -> Result<Vec<(u64, ShardRow)>, StoreError>;

    /// Every registered node, ordered by node id.
    fn nodes(&self) -> Result<Vec<NodeRow>, StoreError>;

    /// The recorded idempotency key, if any (expired or not).
    fn key(&self, key: &str) -> Result<Option<KeyRow>, StoreError>;

    /// Deletes at most `limit` keys whose expiry is at or before `now_ms`,
    /// oldest first; returns how many were deleted.
    fn purge_expired_keys(&self, now_ms: u64, limit: usize) -> Result<u64, StoreError>;

    /// The unix time (ms) at which `counter` expires, if it has an expiry.
    fn expiry(&self, counter: &str) -> Result<Option<u64>, StoreError>;

    /// Sets `counter` to expire at `at_ms` (above 0) if `when` allows it,
    /// judged and written in one statement, so two nodes setting expiries
    /// at once are ordered by the store. Returns whether it was set. The
    /// store does not know whether the counter exists: the caller checks.
    fn set_expiry(&self, counter: &str, at_ms: u64, when: ExpireIf) -> Result<bool, StoreError>;

    /// Clears `counter`'s expiry; returns whether it had one.
    fn clear_expiry(&self, counter: &str) -> Result<bool, StoreError>;

    /// At most `limit` (capped at [`EXPIRIES_PAGE_MAX`]) counters whose
    /// expiry is at or before `now_ms`, earliest first, with their expiry.
    /// A node deletes each with [`StoreTx::delete_counter`], naming the
    /// expiry it read.
    fn due_expiries(&self, now_ms: u64, limit: usize) -> Result<Vec<(String, u64)>, StoreError>;

    /// Whether the last commit whose outcome this store left unknown
    /// ([`StoreError::Indeterminate`]) can no longer take effect: `false`
    /// while the server still has that transaction in progress (a primary
    /// waiting for a synchronous standby, say). Reading a row to learn
    /// whether the commit happened means something only once this is
    /// `true`. A store whose commits cannot outlive their call says `true`.
    fn commit_settled(&self) -> Result<bool, StoreError> {
        Ok(true)
    }

    /// How the store's own data is replicated, as its primary reports it;
    /// `None` for a backend without replication (one SQLite file).
    fn replication(&self) -> Result<Option<Replication>, StoreError> {
        Ok(None)
    }
}

/// A write transaction of one node, fenced by its epoch (see
/// [`Store::begin`]). After any method fails, the transaction can only be
/// dropped: [`StoreTx::commit`] refuses it, so that a batch is never
/// committed in part.
pub trait StoreTx {
    /// Inserts each key that is not present; returns, per key in order,
    /// whether it was inserted (false: it already existed, possibly from
    /// another node). Duplicate keys inside one call: the first wins, later
    /// ones report false. Every key must carry this transaction's node id
    /// and epoch. A key that has expired but is not yet purged still counts
    /// as present.
    fn insert_keys(&mut self, keys: &[KeyRow]) -> Result<Vec<bool>, StoreError>;

    /// Deletes the named keys that this node recorded; keys recorded by
    /// other nodes are left alone.
    fn delete_keys(&mut self, keys: &[&str]) -> Result<(), StoreError>;

    /// Upserts this node's rows `(counter, value, version)`; a stored row is
    /// replaced only by a strictly higher version. Repeating or reordering a
    /// batch changes nothing. A batch that names one counter twice keeps the
    /// higher version. A version whose epoch is above the transaction's is
    /// refused ([`StoreError::Invalid`]): it would outrank every later write.
    fn upsert_shards(&mut self, rows: &[(&str, i64, Version)]) -> Result<(), StoreError>;

    /// Records how far this node's flushes have reached; never lowers it.
    /// Also counts as a heartbeat at `now_ms` (a flush is proof of life);
    /// the heartbeat time never goes back either.
    fn set_flushed(&mut self, flushed: Version, now_ms: u64) -> Result<(), StoreError> {
        self.set_marks(flushed, Version::default(), now_ms)
    }

    /// [`StoreTx::set_flushed`], also raising the node's written version
    /// (the highest version of any row it has committed; never lowered).
    fn set_marks(
        &mut self,
        flushed: Version,
        written: Version,
        now_ms: u64,
    ) -> Result<(), StoreError>;

    /// Deletes `counter` for every node: sets each row's base to its value
    /// (so the counter counts 0 from here on, and every later write of any
    /// node counts only what it adds past its row's value now) and records
    /// the delete with the next delete sequence number
    /// ([`Store::deleted_since`]). Rows this transaction upserted before
    /// are included: call it after [`StoreTx::upsert_shards`]. `None`, and
    /// nothing recorded, when no node holds a row of the counter.
    ///
    /// Deletes take the store's deletes lock until the transaction ends:
    /// two transactions deleting never run at once.
    ///
    /// A delete clears the counter's expiry. With `expiring` = `Some(at)`,
    /// the delete is that expiry's: it happens only if the counter still
    /// expires at `at`, and takes the expiry away in the same transaction,
    /// so that of several nodes sweeping one expiry, one deletes; `None`
    /// (and nothing done) otherwise.
    fn delete_counter(
        &mut self,
        counter: &str,
        now_ms: u64,
        expiring: Option<u64>,
    ) -> Result<Option<DeletedCounter>, StoreError>;

    /// Commits. [`StoreError::Indeterminate`] means the commit was sent and
    /// its outcome is unknown; ask [`Store::commit_settled`] before deciding
    /// it from the rows it wrote.
    fn commit(self: Box<Self>) -> Result<(), StoreError>;
}

/// Opens a store from a URL: `sqlite://PATH` (relative or absolute path;
/// `sqlite:///abs/path` too) or `postgres://...` / `postgresql://...`, and
/// brings its schema up to date (see [`schema`]).
pub fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    match StoreUrl::parse(url)? {
        #[cfg(feature = "sqlite")]
        StoreUrl::Sqlite(path) => Ok(Arc::new(sqlite::SqliteStore::open(&path)?)),
        #[cfg(feature = "postgres")]
        StoreUrl::Postgres(url) => Ok(Arc::new(postgres::PostgresStore::open(&url)?)),
        #[allow(unreachable_patterns)]
        other => Err(StoreError::Invalid(format!(
            "this build of tally has no {} store backend (cargo feature `{}`)",
            other.backend(),
            other.backend()
        ))),
    }
}

/// Checks a store URL as [`open`] would, without opening anything: the
/// scheme, and for PostgreSQL the whole URL as the driver parses it (hosts,
/// ports, parameters, TLS mode). For checking settings before anything is
/// written to disk.
pub fn check_url(url: &str) -> Result<(), StoreError> {
    match StoreUrl::parse(url)? {
        #[cfg(feature = "sqlite")]
        StoreUrl::Sqlite(_) => Ok(()),
        #[cfg(feature = "postgres")]
        StoreUrl::Postgres(url) => postgres::check_url(&url),
        #[allow(unreachable_patterns)]
        other => Err(StoreError::Invalid(format!(
            "this build of tally has no {} store backend (cargo feature `{}`)",
            other.backend(),
            other.backend()
        ))),
    }
}

/// Converts an epoch, lsn or time to the store's signed column type.
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) fn to_stored(value: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| {
        StoreError::Invalid(format!(
            "{what} {value} is above {STORED_INT_MAX}, the largest the store can hold"
        ))
    })
}

/// Converts a stored column back; a negative value can only come from a
/// write outside tally.
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) fn from_stored(value: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| {
        StoreError::Invalid(format!(
            "the store holds a negative {what} ({value}); the tally tables were changed outside tally"
        ))
    })
}

#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) fn not_registered(node_id: &str) -> StoreError {
    StoreError::Regressed(format!(
        "it holds no row for node '{node_id}' (register it before writing)"
    ))
}

/// What a write or heartbeat of `node_id` at `ours` (having written up to
/// `written`) meets in a store whose node row says `stored` epoch and
/// `stored_written`: `None` when it may go on.
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) fn check_node(
    node_id: &str,
    ours: u64,
    written: Version,
    stored: u64,
    stored_written: Version,
) -> Option<StoreError> {
    if stored > ours {
        return Some(StoreError::Fenced {
            node_id: node_id.to_string(),
            ours,
            current: stored,
        });
    }
    if stored < ours {
        return Some(StoreError::Regressed(format!(
            "the row of node '{node_id}' holds epoch {stored}, but this process registered \
             epoch {ours}"
        )));
    }
    if stored_written < written {
        return Some(StoreError::Regressed(format!(
            "it records the writes of node '{node_id}' up to version {stored_written}, but \
             this process committed up to {written}"
        )));
    }
    None
}

/// What every call on a transaction returns after one of its steps failed.
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) fn poisoned() -> StoreError {
    StoreError::Unavailable(
        "an earlier step of this transaction failed, so it was not committed; \
         drop it and start a new one"
            .into(),
    )
}

/// Checks rows bound for [`StoreTx::upsert_shards`] against the
/// transaction's epoch.
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) fn check_shard_rows(
    node_id: &str,
    epoch: u64,
    rows: &[(&str, i64, Version)],
) -> Result<(), StoreError> {
    for &(counter, _, version) in rows {
        if version.epoch > epoch {
            return Err(StoreError::Invalid(format!(
                "node '{node_id}' at epoch {epoch} tried to write counter '{counter}' \
                 at version {version}, from a later epoch"
            )));
        }
        to_stored(version.epoch, "epoch")?;
        to_stored(version.lsn, "lsn")?;
    }
    Ok(())
}

/// Checks keys bound for [`StoreTx::insert_keys`]: each must be this
/// transaction's, so a key's recorded owner is always the writer.
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) fn check_key_rows(node_id: &str, epoch: u64, keys: &[KeyRow]) -> Result<(), StoreError> {
    for k in keys {
        if k.node_id != node_id || k.epoch != epoch {
            return Err(StoreError::Invalid(format!(
                "key '{}' names node '{}' epoch {}, but the transaction belongs to node \
                 '{node_id}' epoch {epoch}",
                k.key, k.node_id, k.epoch
            )));
        }
        to_stored(k.expires_at_ms, "key expiry")?;
    }
    Ok(())
}

/// Keeps, for each counter named in `rows`, only its highest version (the
/// first of equal ones), in order of first appearance. PostgreSQL refuses to
/// update one row twice in one statement, so a batch is deduplicated before
/// it is sent.
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) fn dedupe_shard_rows<'a>(
    rows: &[(&'a str, i64, Version)],
) -> Vec<(&'a str, i64, Version)> {
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(rows.len());
    let mut out: Vec<(&str, i64, Version)> = Vec::with_capacity(rows.len());
    for &row in rows {
        match index.get(row.0) {
            Some(&i) => {
                if row.2 > out[i].2 {
                    out[i] = row;
                }
            }
            None => {
                index.insert(row.0, out.len());
                out.push(row);
            }
        }
    }
    out
}

/// For each key, whether it is the first occurrence of that key in `keys`.
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) fn first_occurrences(keys: &[KeyRow]) -> Vec<bool> {
    let mut seen = std::collections::HashSet::with_capacity(keys.len());
    keys.iter().map(|k| seen.insert(k.key.as_str())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // A batch naming one counter several times keeps its highest version
    // wherever it appears, and keeps the other counters in order.
    #[test]
    fn dedupe_keeps_the_highest_version_per_counter() {
        let rows = [
            ("a", 1, Version::new(1, 5)),
            ("b", 2, Version::new(1, 6)),
            ("a", 3, Version::new(1, 9)),
            ("a", 4, Version::new(1, 7)),
            ("b", 5, Version::new(1, 6)),
        ];
        let out = dedupe_shard_rows(&rows);
        assert_eq!(
            out,
            vec![("a", 3, Version::new(1, 9)), ("b", 2, Version::new(1, 6))]
        );
    }

    // Versions order by epoch first: any write of a newer epoch outranks
    // every write of an older one, whatever the lsns.
    #[test]
    fn versions_order_by_epoch_then_lsn() {
        assert!(Version::new(2, 0) > Version::new(1, u64::MAX));
        assert!(Version::new(1, 2) > Version::new(1, 1));
        assert_eq!(Version::default(), Version::new(0, 0));
    }

    // Values the signed columns cannot hold are refused, not wrapped.
    #[test]
    fn values_above_the_stored_limit_are_refused() {
        assert_eq!(to_stored(STORED_INT_MAX, "lsn"), Ok(i64::MAX));
        assert!(matches!(
            to_stored(STORED_INT_MAX + 1, "lsn"),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            from_stored(-1, "lsn"),
            Err(StoreError::Invalid(_))
        ));
    }
}
