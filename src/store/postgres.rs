//! The PostgreSQL backend: a store shared by nodes on several machines.
//!
//! Each [`PostgresStore`] holds one connection behind a mutex; a
//! transaction keeps the mutex until it ends. After a failure that breaks
//! the connection, it is dropped and the next call connects again (within
//! [`CONNECT_TIMEOUT`]), so a store outage ends by itself once the server
//! is back.
//!
//! Fencing: a write transaction starts by locking the node's row with
//! `SELECT ... FOR UPDATE` and comparing its epoch. A registration locks the
//! same row before bumping the epoch, so it waits until the transaction
//! ends: no write of an old epoch can commit after a newer epoch exists.
//!
//! Round trips: `BEGIN` and the lock travel together, and the statements
//! whose answers are not needed before the end (the shard upsert, the
//! node's versions) travel with the `COMMIT` (pipelining, in
//! `Conn::commit_with`), so a write transaction without idempotency keys
//! takes two round trips.
//!
//! A flush is one statement whatever its size (up to
//! [`STATEMENT_ROWS_MAX`] rows): the rows travel as arrays and are spread
//! by `UNNEST`, so there is no parameter-count limit and one round trip.
//!
//! Errors: an error before `COMMIT` is sent means nothing was written
//! ([`StoreError::Unavailable`]); a failure while committing leaves the
//! outcome unknown ([`StoreError::Indeterminate`]) unless the server said
//! it rolled back. It is tested against PostgreSQL only, and relies on
//! PostgreSQL's own functions (`txid_current`, `txid_status`) and views
//! (`pg_stat_replication`): other engines that speak its protocol are not
//! claimed.
//!
//! This module must never be called from inside a Tokio runtime: the
//! `postgres` crate blocks on a runtime of its own, which panics there.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};
use tokio_postgres::config::{Host, LoadBalanceHosts};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, Row, Statement};

use super::pgtls::{self, Connector};

use super::{
    DeletedCounter, KeyRow, NodeRow, Registration, ShardRow, Store, StoreError, StoreTx, Version,
    from_stored, not_registered, poisoned, schema, to_stored,
};

/// Longest wait for a connection to the server, unless the URL sets
/// `connect_timeout`. A store outage then fails a call in bounded time.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest time sent data may stay unacknowledged by the server's host
/// before the connection is declared broken (`TCP_USER_TIMEOUT`), unless
/// the URL sets `tcp_user_timeout`. Without it, a call to a server whose
/// host vanished would hang for the kernel's default of many minutes.
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest a call (a statement, `COMMIT`, or connecting) may take before
/// the connection is given up: dropped, never cancelled. A server that
/// stalls (a frozen host, or a primary that waits for a synchronous standby
/// that is gone) thus fails a call in bounded time; a `COMMIT` that times
/// out has an unknown outcome ([`StoreError::Indeterminate`]). The server is
/// never sent a cancel request: a cancelled wait for a synchronous standby
/// commits locally anyway, and reports success as a warning.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Most rows sent in one statement by [`StoreTx::upsert_shards`] or
/// [`StoreTx::insert_keys`]. A larger batch is sent as several statements
/// in the same transaction (still atomic). It bounds one message to a few
/// tens of megabytes, far below the server's 1 GB limit.
pub const STATEMENT_ROWS_MAX: usize = 100_000;

/// First pause before a migrator that lost a race tries again; doubled
/// at each attempt.
const MIGRATION_RETRY_DELAY: Duration = Duration::from_millis(20);

/// A store in a PostgreSQL database.
pub struct PostgresStore {
    /// One configuration per host of the URL, tried in order (see
    /// [`connect_first`]).
    hosts: Vec<Config>,
    /// TLS as the URL's `sslmode` and `sslrootcert` ask (see [`pgtls`]).
    tls: Connector,
    /// Runs this store's connection: a runtime of its own, driven only
    /// while a call blocks on it, so the store can be called from any
    /// thread that is not itself inside a runtime.
    runtime: Arc<tokio::runtime::Runtime>,
    /// `None` until the first call, and again after a failure broke the
    /// connection. A blocking mutex: every holder blocks on the server.
    conn: Mutex<Option<Conn>>,
    /// The transaction id of a commit whose outcome was left unknown
    /// (timed out or cut off): until the server says that transaction is
    /// no longer in progress, its effect may still appear, so
    /// [`Store::commit_settled`] says "not yet".
    unsettled_xid: Mutex<Option<i64>>,
}

/// A connection and the statements prepared on it (they die with it).
struct Conn {
    client: Client,
    /// Drives the connection; aborted when the `Conn` is dropped, which
    /// closes the socket.
    driver: tokio::task::JoinHandle<()>,
    runtime: Arc<tokio::runtime::Runtime>,
    statements: HashMap<&'static str, Statement>,
    /// The connection's transaction state is unknown (a `ROLLBACK`
    /// failed, or a call timed out): it must not be used again.
    broken: bool,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Why a step failed: a driver error (with what was being done) or a
/// decision of ours (fenced, invalid value).
enum Fail {
    Pg(&'static str, tokio_postgres::Error),
    /// No answer within [`CALL_TIMEOUT`]; the connection is broken.
    TimedOut(&'static str),
    Store(StoreError),
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Fail {
        Fail::Store(e)
    }
}

/// Attaches what was being done to a driver error.
trait Context<T> {
    fn ctx(self, what: &'static str) -> Result<T, Fail>;
}

impl<T> Context<T> for Result<T, tokio_postgres::Error> {
    fn ctx(self, what: &'static str) -> Result<T, Fail> {
        self.map_err(|e| Fail::Pg(what, e))
    }
}

/// A driver error in words: the server's code and message when it sent
/// one, else the whole cause chain (the driver's own text is terse).
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        if let Some(detail) = db.detail() {
            s.push_str(" (");
            s.push_str(detail);
            s.push(')');
        }
        return s;
    }
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// Runs one call of a connection on its runtime, bounded by
/// [`CALL_TIMEOUT`].
fn bounded<T>(
    runtime: &tokio::runtime::Runtime,
    what: &'static str,
    call: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, Fail> {
    match runtime.block_on(async { tokio::time::timeout(CALL_TIMEOUT, call).await }) {
        Ok(result) => result.ctx(what),
        Err(_) => Err(Fail::TimedOut(what)),
    }
}

impl Conn {
    /// A call that timed out leaves the connection in an unknown state: it
    /// is marked broken, and its owner drops it, closing the socket.
    fn note<T>(&mut self, result: Result<T, Fail>) -> Result<T, Fail> {
        if let Err(Fail::TimedOut(_)) = &result {
            self.broken = true;
        }
        result
    }

    fn statement(&mut self, sql: &'static str, what: &'static str) -> Result<Statement, Fail> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let r = bounded(&self.runtime, what, self.client.prepare(sql));
        let s = self.note(r)?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }

    fn query(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
        what: &'static str,
    ) -> Result<Vec<Row>, Fail> {
        let stmt = self.statement(sql, what)?;
        let r = bounded(&self.runtime, what, self.client.query(&stmt, params));
        self.note(r)
    }

    fn query_one(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
        what: &'static str,
    ) -> Result<Row, Fail> {
        let stmt = self.statement(sql, what)?;
        let r = bounded(&self.runtime, what, self.client.query_one(&stmt, params));
        self.note(r)
    }

    fn execute(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
        what: &'static str,
    ) -> Result<u64, Fail> {
        let stmt = self.statement(sql, what)?;
        let r = bounded(&self.runtime, what, self.client.execute(&stmt, params));
        self.note(r)
    }

    fn batch(&mut self, sql: &str, what: &'static str) -> Result<(), Fail> {
        let r = bounded(&self.runtime, what, self.client.batch_execute(sql));
        self.note(r)
    }

    /// `BEGIN` and the lock of the node row (its epoch and written
    /// version, [`LOCK_NODE`]) in one round trip: the query is written
    /// behind the `BEGIN` before either answer is awaited.
    fn begin_locking_node(&mut self, node_id: &str) -> Result<Vec<Row>, Fail> {
        let what = "locking the node row";
        let statement = self.statement(LOCK_NODE, what)?;
        let client = &self.client;
        let params: [&(dyn ToSql + Sync); 1] = [&node_id];
        let r = bounded(&self.runtime, what, async {
            // Biased: polled in order, so BEGIN is written first.
            let (began, rows) = tokio::join!(
                biased;
                client.batch_execute("BEGIN"),
                client.query(&statement, &params)
            );
            began?;
            rows
        });
        self.note(r)
    }

    /// Ends a transaction that must not commit. If even that fails, the
    /// connection's state is unknown and it is marked broken.
    fn rollback(&mut self) {
        if self.batch("ROLLBACK", "rolling back").is_err() {
            self.broken = true;
        }
    }

    /// Sends `COMMIT` and says what a failure means.
    fn commit(&mut self, what: &str) -> Result<(), StoreError> {
        self.commit_with(&[], "", what)
    }

    /// Sends the `deferred` statements of the transaction and `COMMIT` in
    /// one round trip (pipelined: every request is written before any
    /// answer is awaited), and says what a failure means. PostgreSQL runs
    /// them in order; a statement the server refuses aborts the
    /// transaction, and the `COMMIT` after it then rolls back: a definite
    /// failure. A connection lost before every answer came back leaves
    /// the outcome unknown, as a lost `COMMIT` always has.
    fn commit_with(
        &mut self,
        deferred: &[Deferred],
        node_id: &str,
        what: &str,
    ) -> Result<(), StoreError> {
        // A connection already known to be closed never carried the
        // COMMIT: the server rolls back a transaction whose session ends.
        if self.client.is_closed() {
            return Err(StoreError::Unavailable(format!(
                "{what}: the connection to PostgreSQL was lost before commit; \
                 the transaction was rolled back"
            )));
        }
        let client = &self.client;
        // Each statement is written to the connection when first polled,
        // in order, and the COMMIT last. Their parameters (text, int8 and
        // arrays of them) cannot fail to encode, so a statement fails
        // before reaching the server only when the connection is gone, and
        // then so does the COMMIT: no COMMIT can go out without the
        // statements before it.
        let sent = bounded(&self.runtime, "committing", async {
            let mut statements: Vec<_> = deferred
                .iter()
                .map(|d| Box::pin(d.send(client, node_id)))
                .collect();
            let mut commit = Box::pin(client.batch_execute("COMMIT"));
            let mut results: Vec<Option<Result<u64, tokio_postgres::Error>>> =
                statements.iter().map(|_| None).collect();
            let mut committed = None;
            // Every poll visits the statements in order and the COMMIT
            // last, so the first one writes them in that order.
            std::future::poll_fn(|cx| {
                let mut waiting = false;
                for (statement, result) in statements.iter_mut().zip(results.iter_mut()) {
                    if result.is_none() {
                        match statement.as_mut().poll(cx) {
                            std::task::Poll::Ready(r) => *result = Some(r),
                            std::task::Poll::Pending => waiting = true,
                        }
                    }
                }
                if committed.is_none() {
                    match commit.as_mut().poll(cx) {
                        std::task::Poll::Ready(r) => committed = Some(r),
                        std::task::Poll::Pending => waiting = true,
                    }
                }
                if waiting {
                    std::task::Poll::Pending
                } else {
                    std::task::Poll::Ready(())
                }
            })
            .await;
            let results: Vec<_> = results.into_iter().flatten().collect();
            Ok::<_, tokio_postgres::Error>((results, committed.expect("polled to the end")))
        });
        let (results, committed) = match sent {
            Ok(answers) => answers,
            Err(Fail::TimedOut(_)) => {
                self.broken = true;
                return Err(StoreError::Indeterminate(format!(
                    "{what}: the server did not answer COMMIT within {CALL_TIMEOUT:?} \
                     (a stalled server, or a primary waiting for a synchronous standby); \
                     the connection was dropped"
                )));
            }
            // The block above never fails: every answer is in its result.
            Err(other) => return Err(into_store_error(other)),
        };
        let refused = deferred
            .iter()
            .zip(&results)
            .find_map(|(d, r)| r.as_ref().err().map(|e| (d.what(), e)));
        if let Some((statement, e)) = refused {
            if e.as_db_error().is_some() {
                // The transaction is aborted; the COMMIT behind it rolled
                // it back. The session is fine.
                return Err(StoreError::Unavailable(format!(
                    "{what}: the server refused {statement}: {}; the transaction was rolled back",
                    describe(e)
                )));
            }
            self.broken = true;
            return Err(StoreError::Indeterminate(format!(
                "{what}: the connection failed while {statement} and the commit were in \
                 flight: {}",
                describe(e)
            )));
        }
        match committed {
            Ok(()) => Ok(()),
            Err(e) => self.commit_failed(e, what),
        }
    }

    /// What a `COMMIT` the server answered with an error means.
    fn commit_failed(&mut self, e: tokio_postgres::Error, what: &str) -> Result<(), StoreError> {
        let rolled_back = e.as_db_error().is_some_and(|db| {
            let class = &db.code().code()[..2];
            // 40: transaction rollback (serialization failure, deadlock);
            // 23: a deferred constraint failed. The server reports these
            // instead of committing.
            class == "40" || class == "23"
        });
        if rolled_back {
            Err(StoreError::Unavailable(format!(
                "{what}: the server rolled back the commit: {}",
                describe(&e)
            )))
        } else {
            // Whatever state the session is in, it is not one to build on.
            self.broken = true;
            Err(StoreError::Indeterminate(format!(
                "{what}: the connection failed while committing: {}",
                describe(&e)
            )))
        }
    }
}

/// Whether a failure leaves the connection unusable.
fn breaks(fail: &Fail, conn: &Conn) -> bool {
    conn.broken
        || conn.client.is_closed()
        || matches!(fail, Fail::TimedOut(_))
        || matches!(fail, Fail::Pg(_, e) if e.as_db_error().is_none())
}

fn into_store_error(fail: Fail) -> StoreError {
    match fail {
        Fail::Store(e) => e,
        Fail::Pg(what, e) => StoreError::Unavailable(format!("{what}: {}", describe(&e))),
        // No COMMIT was sent: the transaction never commits.
        Fail::TimedOut(what) => StoreError::Unavailable(format!(
            "{what}: no answer within {CALL_TIMEOUT:?}; the connection was dropped"
        )),
    }
}

fn col<T: for<'a> tokio_postgres::types::FromSql<'a>>(
    row: &Row,
    i: usize,
    what: &'static str,
) -> Result<T, Fail> {
    row.try_get(i).ctx(what)
}

fn stored(row: &Row, i: usize, what: &'static str) -> Result<u64, Fail> {
    Ok(from_stored(col::<i64>(row, i, what)?, what)?)
}

fn decode_shard(row: &Row) -> Result<ShardRow, Fail> {
    Ok(ShardRow {
        counter: col(row, 0, "counter")?,
        node_id: col(row, 1, "node id")?,
        value: col(row, 2, "value")?,
        version: Version {
            epoch: stored(row, 3, "epoch")?,
            lsn: stored(row, 4, "lsn")?,
        },
        base: col(row, 5, "base")?,
    })
}

fn decode_node(row: &Row) -> Result<NodeRow, Fail> {
    Ok(NodeRow {
        node_id: col(row, 0, "node id")?,
        epoch: stored(row, 1, "epoch")?,
        address: col(row, 2, "address")?,
        started_at_ms: stored(row, 3, "start time")?,
        heartbeat_at_ms: stored(row, 4, "heartbeat time")?,
        flushed: Version {
            epoch: stored(row, 5, "flushed epoch")?,
            lsn: stored(row, 6, "flushed lsn")?,
        },
        applied_lsn: stored(row, 7, "applied lsn")?,
        written: Version {
            epoch: stored(row, 8, "written epoch")?,
            lsn: stored(row, 9, "written lsn")?,
        },
        state: super::NodeState::parse(&col::<String>(row, 10, "state")?)?,
        host: col(row, 11, "host")?,
        pid: u32::try_from(col::<i64>(row, 12, "pid")?).unwrap_or(0),
    })
}

fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

const INSERT_NODE: &str = "INSERT INTO tally_nodes (node_id, epoch, address, started_at_ms, \
     heartbeat_at_ms, flushed_epoch, flushed_lsn, applied_lsn, written_epoch, written_lsn, \
     state, host, pid) \
     VALUES ($1, $4, $2, $3, $3, 0, 0, 0, 0, 0, 'running', $5, $6) ON CONFLICT (node_id) DO NOTHING";
const SELECT_NODE_FOR_UPDATE: &str = "SELECT node_id, epoch, address, started_at_ms, \
     heartbeat_at_ms, flushed_epoch, flushed_lsn, applied_lsn, written_epoch, written_lsn, \
     state, host, pid FROM tally_nodes WHERE node_id = $1 FOR UPDATE";
const BUMP_EPOCH: &str = "UPDATE tally_nodes SET epoch = GREATEST(epoch + 1, $4), address = $2, \
     started_at_ms = $3, heartbeat_at_ms = $3, state = 'running', host = $5, pid = $6 \
     WHERE node_id = $1 RETURNING epoch";
const SET_STATE: &str = "UPDATE tally_nodes SET state = $3 WHERE node_id = $1 AND epoch = $2";
// `txid_current()` names the transaction, so that a commit whose outcome is
// left unknown can be asked about later (`txid_status`).
const LOCK_NODE: &str = "SELECT epoch, txid_current(), written_epoch, written_lsn FROM tally_nodes \
     WHERE node_id = $1 FOR UPDATE";
const TXID_STATUS: &str = "SELECT txid_status($1)";
// `sync_state` is NULL to a user that may not see other sessions' details.
const REPLICATION: &str = "SELECT count(*), \
     count(*) FILTER (WHERE sync_state IN ('sync', 'quorum')), \
     count(*) FILTER (WHERE sync_state IS NULL) \
     FROM pg_stat_replication";
const SELECT_EPOCH: &str =
    "SELECT epoch, written_epoch, written_lsn FROM tally_nodes WHERE node_id = $1";
const HEARTBEAT: &str = "UPDATE tally_nodes SET heartbeat_at_ms = $3, applied_lsn = $4 \
     WHERE node_id = $1 AND epoch = $2 AND (written_epoch, written_lsn) >= ($5::int8, $6::int8)";
const LOAD_SHARD: &str =
    "SELECT counter, node_id, value, epoch, lsn, base FROM tally_shards WHERE node_id = $1";
const CHANGES: &str = "SELECT counter, node_id, value, epoch, lsn, base FROM tally_shards \
     WHERE node_id = $1 AND (epoch, lsn) > ($2::int8, $3::int8) \
     ORDER BY epoch, lsn, counter LIMIT $4";
const CHANGES_TIES: &str = "SELECT counter, node_id, value, epoch, lsn, base FROM tally_shards \
     WHERE node_id = $1 AND epoch = $2 AND lsn = $3 AND counter > $4 ORDER BY counter";
const READ_COUNTER: &str =
    "SELECT counter, node_id, value, epoch, lsn, base FROM tally_shards WHERE counter = $1";
const DELETED_SINCE: &str = "SELECT s.counter, s.node_id, s.value, s.epoch, s.lsn, s.base, d.seq \
     FROM (SELECT counter, seq FROM tally_deletes WHERE seq > $1 ORDER BY seq LIMIT $2) AS d \
     JOIN tally_shards AS s ON s.counter = d.counter ORDER BY d.seq, s.node_id";
// Self-conflicting: one deleting transaction at a time, so that delete
// sequence numbers commit in order and a reader paging by them misses none.
const LOCK_DELETES: &str = "LOCK TABLE tally_deletes IN SHARE ROW EXCLUSIVE MODE";
const LOCK_COUNTER_ROWS: &str = "SELECT counter, node_id, value, epoch, lsn, base \
     FROM tally_shards WHERE counter = $1 ORDER BY node_id FOR UPDATE";
// Only the rows read (and locked) above: a row another node inserts
// meanwhile is not erased, as it was not counted in what was.
const SET_BASES: &str = "UPDATE tally_shards SET base = value \
     WHERE counter = $1 AND node_id = ANY($2::text[])";
const RECORD_DELETE: &str = "INSERT INTO tally_deletes (counter, seq, node_id, epoch, deleted_at_ms) \
     VALUES ($1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM tally_deletes), $2, $3, $4) \
     ON CONFLICT (counter) DO UPDATE SET seq = EXCLUDED.seq, node_id = EXCLUDED.node_id, \
     epoch = EXCLUDED.epoch, deleted_at_ms = EXCLUDED.deleted_at_ms";
const NODES: &str = "SELECT node_id, epoch, address, started_at_ms, heartbeat_at_ms, \
     flushed_epoch, flushed_lsn, applied_lsn, written_epoch, written_lsn, state, host, pid \
     FROM tally_nodes ORDER BY node_id";
const KEY: &str =
    "SELECT key, node_id, epoch, counter, expires_at_ms FROM tally_keys WHERE key = $1";
const PURGE_KEYS: &str = "DELETE FROM tally_keys WHERE key IN (SELECT key FROM tally_keys \
     WHERE expires_at_ms <= $1 ORDER BY expires_at_ms LIMIT $2)";
const UPSERT_SHARDS: &str = "INSERT INTO tally_shards (counter, node_id, value, epoch, lsn) \
     SELECT c, $1::text, v, e, l \
     FROM UNNEST($2::text[], $3::int8[], $4::int8[], $5::int8[]) AS t(c, v, e, l) \
     ON CONFLICT (counter, node_id) DO UPDATE \
     SET value = EXCLUDED.value, epoch = EXCLUDED.epoch, lsn = EXCLUDED.lsn \
     WHERE (tally_shards.epoch, tally_shards.lsn) < (EXCLUDED.epoch, EXCLUDED.lsn)";
const INSERT_KEYS: &str = "INSERT INTO tally_keys (key, node_id, epoch, counter, expires_at_ms) \
     SELECT k, $1::text, $2::int8, c, x \
     FROM UNNEST($3::text[], $4::text[], $5::int8[]) AS t(k, c, x) \
     ON CONFLICT (key) DO NOTHING RETURNING key";
const DELETE_KEYS: &str = "DELETE FROM tally_keys WHERE node_id = $1 AND key = ANY($2::text[])";
// Every SET expression reads the row as it was, so the comparison is made
// once against the old flushed version.
const SET_FLUSHED: &str = "UPDATE tally_nodes SET \
     flushed_epoch = CASE WHEN (flushed_epoch, flushed_lsn) < ($2::int8, $3::int8) \
         THEN $2::int8 ELSE flushed_epoch END, \
     flushed_lsn = CASE WHEN (flushed_epoch, flushed_lsn) < ($2::int8, $3::int8) \
         THEN $3::int8 ELSE flushed_lsn END, \
     written_epoch = CASE WHEN (written_epoch, written_lsn) < ($5::int8, $6::int8) \
         THEN $5::int8 ELSE written_epoch END, \
     written_lsn = CASE WHEN (written_epoch, written_lsn) < ($5::int8, $6::int8) \
         THEN $6::int8 ELSE written_lsn END, \
     heartbeat_at_ms = GREATEST(heartbeat_at_ms, $4::int8) \
     WHERE node_id = $1";

/// Splits a configuration naming several hosts (a multi-host URL) into one
/// configuration per host, each carrying every other setting, so that each
/// host's attempt can be bounded on its own: the client library tries the
/// hosts in turn but bounds only each socket connect, so a host that
/// accepts the connection and then never answers (a frozen server) would
/// hold the whole attempt, and the hosts after it would never be tried.
fn per_host(config: &Config) -> Result<Vec<Config>, StoreError> {
    let hosts = config.get_hosts();
    let addrs = config.get_hostaddrs();
    let ports = config.get_ports();
    let n = hosts.len().max(addrs.len());
    if n == 0 {
        return Err(StoreError::Invalid("PostgreSQL URL names no host".into()));
    }
    if !hosts.is_empty() && !addrs.is_empty() && hosts.len() != addrs.len() {
        return Err(StoreError::Invalid(format!(
            "PostgreSQL URL names {} hosts but {} hostaddrs",
            hosts.len(),
            addrs.len()
        )));
    }
    if ports.len() > 1 && ports.len() != n {
        return Err(StoreError::Invalid(format!(
            "PostgreSQL URL names {n} hosts but {} ports",
            ports.len()
        )));
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = Config::new();
        match hosts.get(i) {
            Some(Host::Tcp(h)) => {
                c.host(h);
            }
            #[cfg(unix)]
            Some(Host::Unix(path)) => {
                c.host_path(path);
            }
            None => {}
        }
        if let Some(a) = addrs.get(i) {
            c.hostaddr(*a);
        }
        if let Some(p) = ports.get(i).or(ports.first()) {
            c.port(*p);
        }
        if let Some(v) = config.get_user() {
            c.user(v);
        }
        if let Some(v) = config.get_password() {
            c.password(v);
        }
        if let Some(v) = config.get_dbname() {
            c.dbname(v);
        }
        if let Some(v) = config.get_options() {
            c.options(v);
        }
        if let Some(v) = config.get_application_name() {
            c.application_name(v);
        }
        if let Some(v) = config.get_connect_timeout() {
            c.connect_timeout(*v);
        }
        if let Some(v) = config.get_tcp_user_timeout() {
            c.tcp_user_timeout(*v);
        }
        c.keepalives(config.get_keepalives());
        c.keepalives_idle(config.get_keepalives_idle());
        if let Some(v) = config.get_keepalives_interval() {
            c.keepalives_interval(v);
        }
        if let Some(v) = config.get_keepalives_retries() {
            c.keepalives_retries(v);
        }
        c.ssl_mode(config.get_ssl_mode());
        c.ssl_negotiation(config.get_ssl_negotiation());
        c.channel_binding(config.get_channel_binding());
        c.target_session_attrs(config.get_target_session_attrs());
        out.push(c);
    }
    Ok(out)
}

/// Connects to the first host that accepts (and, with
/// `target_session_attrs=read-write`, is writable), trying them in the
/// URL's order (from a varying start with `load_balance_hosts=random`).
/// Each host gets at most [`CALL_TIMEOUT`], the startup exchange included.
async fn connect_first(
    hosts: &[Config],
    tls: &Connector,
) -> Result<
    (
        Client,
        tokio_postgres::Connection<tokio_postgres::Socket, pgtls::Stream>,
    ),
    StoreError,
> {
    let start =
        if hosts.first().map(Config::get_load_balance_hosts) == Some(LoadBalanceHosts::Random) {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos() as usize)
                % hosts.len()
        } else {
            0
        };
    let mut failures = Vec::with_capacity(hosts.len());
    for i in 0..hosts.len() {
        let config = &hosts[(start + i) % hosts.len()];
        let name = host_name(config);
        match tokio::time::timeout(CALL_TIMEOUT, config.connect(tls.clone())).await {
            Ok(Ok(pair)) => return Ok(pair),
            Ok(Err(e)) => failures.push(format!("{name}: {}{}", describe(&e), tls_hint(&e))),
            Err(_) => failures.push(format!("{name}: no answer within {CALL_TIMEOUT:?}")),
        }
    }
    Err(StoreError::Unavailable(format!(
        "connecting to PostgreSQL: {}",
        failures.join("; ")
    )))
}

/// What a TLS failure means, in the words of the URL's settings.
fn tls_hint(e: &tokio_postgres::Error) -> &'static str {
    let text = describe(e);
    if text.contains("UnknownIssuer") {
        " (the server's certificate is not signed by a CA in sslrootcert)"
    } else if text.contains("not valid for name") || text.contains("NotValidForName") {
        " (the server's certificate does not name this host; sslmode=verify-full checks it)"
    } else if text.contains("server does not support TLS") {
        " (sslmode asks for TLS; enable ssl on the server or lower sslmode)"
    } else {
        ""
    }
}

/// `host:port` of a one-host configuration, for messages.
fn host_name(config: &Config) -> String {
    let host = match (config.get_hostaddrs().first(), config.get_hosts().first()) {
        (Some(a), _) => a.to_string(),
        (None, Some(Host::Tcp(h))) => h.clone(),
        #[cfg(unix)]
        (None, Some(Host::Unix(p))) => p.display().to_string(),
        (None, None) => "?".into(),
    };
    format!(
        "{host}:{}",
        config.get_ports().first().copied().unwrap_or(5432)
    )
}

/// Parses a `postgres://` URL as [`PostgresStore::open`] does, refusing
/// what this build cannot do. The parser's message never includes the URL,
/// which may hold a password.
fn parse_url(url: &str) -> Result<(Config, Connector), StoreError> {
    let (url, tls) = pgtls::split_url(url)?;
    let config: Config = url
        .parse()
        .map_err(|e| StoreError::Invalid(format!("PostgreSQL URL is invalid: {e}")))?;
    per_host(&config)?;
    pgtls::check_hosts(&tls, &config)?;
    let connector = tls.connector()?;
    Ok((config, connector))
}

/// Checks a `postgres://` URL without connecting (see [`super::check_url`]).
pub fn check_url(url: &str) -> Result<(), StoreError> {
    parse_url(url).map(drop)
}

impl PostgresStore {
    /// Parses a `postgres://` URL, connects, and brings the schema up to
    /// date. The URL accepts libpq's parameters (`connect_timeout`,
    /// `application_name`, ...), and `sslmode`/`sslrootcert` as [`pgtls`] says.
    pub fn open(url: &str) -> Result<PostgresStore, StoreError> {
        let (mut config, tls) = parse_url(url)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("tally");
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable(format!("starting the store's runtime: {e}")))?;
        let hosts = per_host(&config)?;
        let store = PostgresStore {
            hosts,
            tls,
            runtime: Arc::new(runtime),
            conn: Mutex::new(None),
            unsettled_xid: Mutex::new(None),
        };
        {
            let mut guard = store.conn.lock();
            let conn = store.connected(&mut guard)?;
            if let Err(e) = migrate(conn) {
                *guard = None;
                return Err(e);
            }
        }
        Ok(store)
    }

    /// The open connection, connecting first if there is none (or the
    /// last one broke).
    fn connected<'g>(
        &self,
        guard: &'g mut MutexGuard<'_, Option<Conn>>,
    ) -> Result<&'g mut Conn, StoreError> {
        if guard
            .as_ref()
            .is_some_and(|c| c.broken || c.client.is_closed())
        {
            **guard = None;
        }
        if guard.is_none() {
            let (client, connection) = self
                .runtime
                .block_on(connect_first(&self.hosts, &self.tls))?;
            let driver = self.runtime.spawn(async move {
                let _ = connection.await;
            });
            **guard = Some(Conn {
                client,
                driver,
                runtime: self.runtime.clone(),
                statements: HashMap::new(),
                broken: false,
            });
        }
        Ok(guard.as_mut().expect("connected above"))
    }

    /// Runs `f` on the connection, outside any transaction (each statement
    /// commits on its own), and drops the connection if `f` broke it.
    fn call<T>(&self, f: impl FnOnce(&mut Conn) -> Result<T, Fail>) -> Result<T, StoreError> {
        let mut guard = self.conn.lock();
        let conn = self.connected(&mut guard)?;
        match f(conn) {
            Ok(v) => Ok(v),
            Err(fail) => {
                if breaks(&fail, conn) {
                    *guard = None;
                }
                Err(into_store_error(fail))
            }
        }
    }

    /// Runs `f` in a transaction and commits it.
    fn call_in_tx<T>(
        &self,
        what: &'static str,
        f: impl FnOnce(&mut Conn) -> Result<T, Fail>,
    ) -> Result<T, StoreError> {
        self.call(|c| {
            c.batch("BEGIN", what)?;
            match f(c) {
                Ok(v) => {
                    c.commit(what)?;
                    Ok(v)
                }
                Err(fail) => {
                    c.rollback();
                    Err(fail)
                }
            }
        })
    }
}

/// Whether a migration failed only because another migrator got there
/// first (or the engine asks for a retry): try again and find it done.
fn lost_race(fail: &Fail) -> bool {
    let Fail::Pg(_, e) = fail else { return false };
    let Some(code) = e.code() else { return false };
    [
        SqlState::UNIQUE_VIOLATION,
        SqlState::DUPLICATE_TABLE,
        SqlState::DUPLICATE_OBJECT,
        SqlState::T_R_SERIALIZATION_FAILURE,
        SqlState::T_R_DEADLOCK_DETECTED,
        // "tuple concurrently updated", from racing catalog changes.
        SqlState::INTERNAL_ERROR,
    ]
    .contains(code)
}

fn migrate(conn: &mut Conn) -> Result<(), StoreError> {
    let mut delay = MIGRATION_RETRY_DELAY;
    for attempt in 1..=schema::MIGRATION_ATTEMPTS_MAX {
        let result = migrate_once(conn);
        match result {
            Ok(()) => return Ok(()),
            Err(fail) => {
                conn.rollback();
                if conn.broken || conn.client.is_closed() {
                    return Err(into_store_error(fail));
                }
                if !(lost_race(&fail) && attempt < schema::MIGRATION_ATTEMPTS_MAX) {
                    return Err(match into_store_error(fail) {
                        StoreError::Unavailable(m) => {
                            StoreError::Unavailable(format!("migrating the schema: {m}"))
                        }
                        other => other,
                    });
                }
                std::thread::sleep(delay);
                delay *= 2;
            }
        }
    }
    unreachable!("the last attempt returns")
}

fn migrate_once(c: &mut Conn) -> Result<(), Fail> {
    c.batch("BEGIN", "starting the migration")?;
    c.batch(schema::VERSION_TABLE, "creating the schema version table")?;
    let found: Option<i64> = col(
        &c.query_one(schema::SELECT_VERSION, &[], "reading the schema version")?,
        0,
        "schema version",
    )?;
    let found = from_stored(found.unwrap_or(0), "schema version")?;
    schema::check_known(found)?;
    for m in schema::pending(found) {
        c.batch(m.postgres, "applying a migration")?;
        let version = to_stored(m.version, "schema version")?;
        let now = to_stored(crate::engine::idempotency::now_ms(), "time")?;
        c.execute(
            schema::INSERT_VERSION_POSTGRES,
            &[&version, &now],
            "recording a migration",
        )?;
    }
    c.batch("COMMIT", "committing the migration")
}

/// Why a write or heartbeat of a process at `ours` that has written up to
/// `written` may not go on (see [`super::check_node`]); a missing row is a
/// regression.
fn why_refused(
    c: &mut Conn,
    node_id: &str,
    ours: u64,
    written: Version,
) -> Result<StoreError, Fail> {
    let rows = c.query(SELECT_EPOCH, &[&node_id], "reading the node's epoch")?;
    let Some(row) = rows.first() else {
        return Ok(not_registered(node_id));
    };
    Ok(
        node_refusal(node_id, ours, written, row, 0, 1)?.unwrap_or_else(|| {
            StoreError::Unavailable("the node's row changed while it was being written".into())
        }),
    )
}

/// [`super::check_node`] on a row holding the epoch at column `epoch_col`
/// and the written version at `written_col` and the next.
fn node_refusal(
    node_id: &str,
    ours: u64,
    written: Version,
    row: &Row,
    epoch_col: usize,
    written_col: usize,
) -> Result<Option<StoreError>, Fail> {
    let stored_written = Version::new(
        stored(row, written_col, "written epoch")?,
        stored(row, written_col + 1, "written lsn")?,
    );
    Ok(super::check_node(
        node_id,
        ours,
        written,
        stored(row, epoch_col, "epoch")?,
        stored_written,
    ))
}

impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn register_above(
        &self,
        node_id: &str,
        address: &str,
        now_ms: u64,
        floor: u64,
    ) -> Result<Registration, StoreError> {
        let now = to_stored(now_ms, "time")?;
        let first = floor.checked_add(1).ok_or_else(|| {
            StoreError::Invalid(format!("epoch floor {floor} leaves no epoch above it"))
        })?;
        let first_stored = to_stored(first, "epoch")?;
        let (host, pid) = super::this_process();
        let pid = i64::from(pid);
        self.call_in_tx("registering the node", |c| {
            // First start: the insert creates the row at epoch 1. A
            // concurrent first start waits for this insert's transaction,
            // then finds the row and bumps it below.
            let inserted = c.execute(
                INSERT_NODE,
                &[&node_id, &address, &now, &first_stored, &host, &pid],
                "registering",
            )?;
            if inserted == 1 {
                return Ok(Registration {
                    epoch: first,
                    previous: None,
                });
            }
            // The lock makes the read and the bump one step, and waits for
            // any write transaction of the old epoch to end.
            let rows = c.query(SELECT_NODE_FOR_UPDATE, &[&node_id], "registering")?;
            let previous = decode_node(rows.first().ok_or_else(|| {
                Fail::Store(StoreError::Unavailable(
                    "the node row vanished during registration".into(),
                ))
            })?)?;
            let rows = c.query(
                BUMP_EPOCH,
                &[&node_id, &address, &now, &first_stored, &host, &pid],
                "taking an epoch",
            )?;
            let epoch = stored(
                rows.first().ok_or_else(|| {
                    Fail::Store(StoreError::Unavailable(
                        "the node row vanished during registration".into(),
                    ))
                })?,
                0,
                "epoch",
            )?;
            Ok(Registration {
                epoch,
                previous: Some(previous),
            })
        })
    }

    fn begin_at(
        &self,
        node_id: &str,
        epoch: u64,
        written: Version,
    ) -> Result<Box<dyn StoreTx + '_>, StoreError> {
        to_stored(epoch, "epoch")?;
        let mut guard = self.conn.lock();
        let conn = self.connected(&mut guard)?;
        let checked = (|| {
            let rows = conn.begin_locking_node(node_id)?;
            let Some(row) = rows.first() else {
                return Err(Fail::Store(not_registered(node_id)));
            };
            if let Some(refused) = node_refusal(node_id, epoch, written, row, 0, 2)? {
                return Err(Fail::Store(refused));
            }
            col::<i64>(row, 1, "transaction id")
        })();
        let xid = match checked {
            Ok(xid) => xid,
            Err(fail) => {
                conn.rollback();
                if breaks(&fail, conn) {
                    *guard = None;
                }
                return Err(into_store_error(fail));
            }
        };
        Ok(Box::new(PgTx {
            guard,
            unsettled_xid: &self.unsettled_xid,
            xid,
            node_id: node_id.to_string(),
            epoch,
            failed: false,
            finished: false,
            deferred: Vec::new(),
        }))
    }

    fn replication(&self) -> Result<Option<super::Replication>, StoreError> {
        self.call(|c| {
            let row = c.query_one(REPLICATION, &[], "reading the replication state")?;
            let count = |i: usize| -> Result<u32, Fail> {
                let n: i64 = col(&row, i, "replication count")?;
                Ok(u32::try_from(n).unwrap_or(u32::MAX))
            };
            let (standbys, synchronous, hidden) = (count(0)?, count(1)?, count(2)?);
            Ok(Some(super::Replication {
                standbys,
                synchronous_standbys: (hidden == 0).then_some(synchronous),
            }))
        })
    }

    fn commit_settled(&self) -> Result<bool, StoreError> {
        let Some(xid) = *self.unsettled_xid.lock() else {
            return Ok(true);
        };
        let status =
            self.call(
                |c| match c.query_one(TXID_STATUS, &[&xid], "asking about a commit") {
                    Ok(row) => Ok(col::<Option<String>>(&row, 0, "transaction status")?),
                    // A transaction id beyond this server's: it never saw the
                    // transaction (it is a promoted standby the commit never
                    // reached), so its effect can never appear here.
                    Err(Fail::Pg(_, e)) if e.code() == Some(&SqlState::INVALID_PARAMETER_VALUE) => {
                        Ok(Some("unknown to this server".into()))
                    }
                    Err(fail) => Err(fail),
                },
            )?;
        // `None`: too old for the server to remember, so long finished.
        let settled = status.as_deref() != Some("in progress");
        if settled {
            *self.unsettled_xid.lock() = None;
        } else {
            tracing::info!(
                xid,
                "a commit whose outcome is unknown is still in progress on the server"
            );
        }
        Ok(settled)
    }

    fn heartbeat_at(
        &self,
        node_id: &str,
        epoch: u64,
        written: Version,
        now_ms: u64,
        applied_lsn: u64,
    ) -> Result<(), StoreError> {
        let ours = to_stored(epoch, "epoch")?;
        let now = to_stored(now_ms, "time")?;
        let applied = to_stored(applied_lsn, "applied lsn")?;
        let (w_epoch, w_lsn) = (
            to_stored(written.epoch, "epoch")?,
            to_stored(written.lsn, "lsn")?,
        );
        self.call(|c| {
            let changed = c.execute(
                HEARTBEAT,
                &[&node_id, &ours, &now, &applied, &w_epoch, &w_lsn],
                "heartbeat",
            )?;
            if changed == 1 {
                return Ok(());
            }
            Err(Fail::Store(why_refused(c, node_id, epoch, written)?))
        })
    }

    fn set_node_state(
        &self,
        node_id: &str,
        epoch: u64,
        state: super::NodeState,
    ) -> Result<bool, StoreError> {
        let epoch = to_stored(epoch, "epoch")?;
        self.call(|c| {
            let n = c.execute(
                SET_STATE,
                &[&node_id, &epoch, &state.as_str()],
                "recording the node's state",
            )?;
            Ok(n == 1)
        })
    }

    fn load_shard(&self, node_id: &str) -> Result<Vec<ShardRow>, StoreError> {
        self.call(|c| {
            c.query(LOAD_SHARD, &[&node_id], "loading the shard")?
                .iter()
                .map(decode_shard)
                .collect()
        })
    }

    fn changes_since(
        &self,
        node_id: &str,
        after: Version,
        limit: usize,
    ) -> Result<Vec<ShardRow>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let epoch = to_stored(after.epoch, "epoch")?;
        let lsn = to_stored(after.lsn, "lsn")?;
        self.call(|c| {
            let mut rows = c
                .query(
                    CHANGES,
                    &[&node_id, &epoch, &lsn, &limit_param(limit)],
                    "reading changes",
                )?
                .iter()
                .map(decode_shard)
                .collect::<Result<Vec<_>, _>>()?;
            // A page must not end between rows sharing one version, or the
            // next page (which starts above that version) would skip the
            // rest of them.
            if rows.len() == limit
                && let Some(last) = rows.last()
            {
                let (e, l) = (last.version.epoch as i64, last.version.lsn as i64);
                let counter = last.counter.clone();
                let ties = c.query(
                    CHANGES_TIES,
                    &[&node_id, &e, &l, &counter],
                    "reading changes",
                )?;
                for row in &ties {
                    rows.push(decode_shard(row)?);
                }
            }
            Ok(rows)
        })
    }

    fn read_counter(&self, counter: &str) -> Result<Vec<ShardRow>, StoreError> {
        self.call(|c| {
            c.query(READ_COUNTER, &[&counter], "reading a counter")?
                .iter()
                .map(decode_shard)
                .collect()
        })
    }

    fn deleted_since(&self, after: u64, limit: usize) -> Result<Vec<(u64, ShardRow)>, StoreError> {
        let limit = limit.min(super::DELETES_PAGE_MAX);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let after = to_stored(after, "delete sequence number")?;
        let limit = limit as i64;
        self.call(|c| {
            c.query(DELETED_SINCE, &[&after, &limit], "reading deletes")?
                .iter()
                .map(|row| {
                    Ok((
                        stored(row, 6, "delete sequence number")?,
                        decode_shard(row)?,
                    ))
                })
                .collect()
        })
    }

    fn nodes(&self) -> Result<Vec<NodeRow>, StoreError> {
        self.call(|c| {
            c.query(NODES, &[], "listing nodes")?
                .iter()
                .map(decode_node)
                .collect()
        })
    }

    fn key(&self, key: &str) -> Result<Option<KeyRow>, StoreError> {
        self.call(|c| {
            let rows = c.query(KEY, &[&key], "reading a key")?;
            rows.first()
                .map(|row| {
                    Ok(KeyRow {
                        key: col(row, 0, "key")?,
                        node_id: col(row, 1, "node id")?,
                        epoch: stored(row, 2, "epoch")?,
                        counter: col(row, 3, "counter")?,
                        expires_at_ms: stored(row, 4, "key expiry")?,
                    })
                })
                .transpose()
        })
    }

    fn purge_expired_keys(&self, now_ms: u64, limit: usize) -> Result<u64, StoreError> {
        if limit == 0 {
            return Ok(0);
        }
        let now = to_stored(now_ms, "time")?;
        self.call(|c| {
            c.execute(
                PURGE_KEYS,
                &[&now, &limit_param(limit)],
                "purging expired keys",
            )
        })
    }

    fn expiry(&self, counter: &str) -> Result<Option<u64>, StoreError> {
        self.call(|c| {
            c.query(super::EXPIRY_SQL, &[&counter], "reading an expiry")?
                .first()
                .map(|row| stored(row, 0, "expiry"))
                .transpose()
        })
    }

    fn set_expiry(
        &self,
        counter: &str,
        at_ms: u64,
        when: super::ExpireIf,
    ) -> Result<bool, StoreError> {
        if at_ms == 0 {
            return Err(StoreError::Invalid("an expiry must be above 0".into()));
        }
        let at = to_stored(at_ms, "expiry")?;
        self.call(|c| {
            c.execute(
                super::set_expiry_sql(when),
                &[&counter, &at],
                "setting an expiry",
            )
            .map(|n| n > 0)
        })
    }

    fn clear_expiry(&self, counter: &str) -> Result<bool, StoreError> {
        self.call(|c| {
            c.execute(super::CLEAR_EXPIRY_SQL, &[&counter], "clearing an expiry")
                .map(|n| n > 0)
        })
    }

    fn due_expiries(&self, now_ms: u64, limit: usize) -> Result<Vec<(String, u64)>, StoreError> {
        let limit = limit.min(super::EXPIRIES_PAGE_MAX);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let now = to_stored(now_ms, "time")?;
        self.call(|c| {
            c.query(
                super::DUE_EXPIRIES_SQL,
                &[&now, &limit_param(limit)],
                "reading expiries",
            )?
            .iter()
            .map(|row| Ok((col(row, 0, "counter")?, stored(row, 1, "expiry")?)))
            .collect()
        })
    }
}

/// A statement of a write transaction whose answer is not needed before
/// the commit: sent with the `COMMIT`, in the same round trip
/// ([`Conn::commit_with`]). Its rows were checked when it was queued.
enum Deferred {
    Upsert {
        statement: Statement,
        counters: Vec<String>,
        values: Vec<i64>,
        epochs: Vec<i64>,
        lsns: Vec<i64>,
    },
    Marks {
        statement: Statement,
        flushed: (i64, i64),
        written: (i64, i64),
        now_ms: i64,
    },
}

impl Deferred {
    /// What the statement does, for errors.
    fn what(&self) -> &'static str {
        match self {
            Deferred::Upsert { .. } => "upserting shards",
            Deferred::Marks { .. } => "recording the flushed version",
        }
    }

    /// Sends the statement (when first polled) and waits for its answer.
    async fn send(&self, client: &Client, node_id: &str) -> Result<u64, tokio_postgres::Error> {
        match self {
            Deferred::Upsert {
                statement,
                counters,
                values,
                epochs,
                lsns,
            } => {
                client
                    .execute(statement, &[&node_id, counters, values, epochs, lsns])
                    .await
            }
            Deferred::Marks {
                statement,
                flushed,
                written,
                now_ms,
            } => {
                client
                    .execute(
                        statement,
                        &[
                            &node_id, &flushed.0, &flushed.1, now_ms, &written.0, &written.1,
                        ],
                    )
                    .await
            }
        }
    }
}

/// An open transaction whose node row is locked `FOR UPDATE`; holds the
/// store's connection until it ends.
struct PgTx<'a> {
    guard: MutexGuard<'a, Option<Conn>>,
    /// The store's record of a commit left unknown; set from `xid` when
    /// this transaction's commit is.
    unsettled_xid: &'a Mutex<Option<i64>>,
    /// This transaction's id on the server.
    xid: i64,
    node_id: String,
    epoch: u64,
    /// A statement failed: the transaction must never commit.
    failed: bool,
    finished: bool,
    /// Statements to send with the `COMMIT`.
    deferred: Vec<Deferred>,
}

impl PgTx<'_> {
    /// Runs one step; any failure poisons the transaction, and a failure
    /// that broke the connection drops it (the server then rolls back).
    fn step<T>(
        &mut self,
        f: impl FnOnce(&mut Conn, &str, u64) -> Result<T, Fail>,
    ) -> Result<T, StoreError> {
        if self.failed {
            return Err(poisoned());
        }
        let Some(conn) = self.guard.as_mut() else {
            self.failed = true;
            return Err(poisoned());
        };
        match f(conn, &self.node_id, self.epoch) {
            Ok(v) => Ok(v),
            Err(fail) => {
                self.failed = true;
                if breaks(&fail, conn) {
                    *self.guard = None;
                }
                Err(into_store_error(fail))
            }
        }
    }
}

impl StoreTx for PgTx<'_> {
    fn insert_keys(&mut self, keys: &[KeyRow]) -> Result<Vec<bool>, StoreError> {
        self.step(|c, node_id, epoch| {
            super::check_key_rows(node_id, epoch, keys)?;
            let epoch = to_stored(epoch, "epoch")?;
            let first = super::first_occurrences(keys);
            let mut inserted: HashSet<String> = HashSet::with_capacity(keys.len());
            // Only first occurrences are sent: a key repeated in one
            // statement is not a conflict PostgreSQL reports the same way
            // on every engine, and the first one wins anyway.
            let unique: Vec<&KeyRow> = keys
                .iter()
                .zip(&first)
                .filter_map(|(k, &f)| f.then_some(k))
                .collect();
            for chunk in unique.chunks(STATEMENT_ROWS_MAX) {
                let names: Vec<&str> = chunk.iter().map(|k| k.key.as_str()).collect();
                let counters: Vec<&str> = chunk.iter().map(|k| k.counter.as_str()).collect();
                let expiries: Vec<i64> = chunk
                    .iter()
                    .map(|k| k.expires_at_ms as i64) // checked above
                    .collect();
                let rows = c.query(
                    INSERT_KEYS,
                    &[&node_id, &epoch, &names, &counters, &expiries],
                    "inserting keys",
                )?;
                for row in &rows {
                    inserted.insert(col(row, 0, "key")?);
                }
            }
            Ok(keys
                .iter()
                .zip(first)
                .map(|(k, f)| f && inserted.contains(&k.key))
                .collect())
        })
    }

    fn delete_keys(&mut self, keys: &[&str]) -> Result<(), StoreError> {
        self.step(|c, node_id, _| {
            for chunk in keys.chunks(STATEMENT_ROWS_MAX) {
                c.execute(DELETE_KEYS, &[&node_id, &chunk], "deleting keys")?;
            }
            Ok(())
        })
    }

    fn upsert_shards(&mut self, rows: &[(&str, i64, Version)]) -> Result<(), StoreError> {
        let statements = self.step(|c, node_id, epoch| {
            super::check_shard_rows(node_id, epoch, rows)?;
            // PostgreSQL refuses to update one row twice in a statement.
            let rows = super::dedupe_shard_rows(rows);
            let statement = c.statement(UPSERT_SHARDS, "preparing the shard upsert")?;
            Ok(rows
                .chunks(STATEMENT_ROWS_MAX)
                .map(|chunk| Deferred::Upsert {
                    statement: statement.clone(),
                    counters: chunk.iter().map(|r| r.0.to_string()).collect(),
                    values: chunk.iter().map(|r| r.1).collect(),
                    // Checked above: both fit.
                    epochs: chunk.iter().map(|r| r.2.epoch as i64).collect(),
                    lsns: chunk.iter().map(|r| r.2.lsn as i64).collect(),
                })
                .collect::<Vec<_>>())
        })?;
        // Sent with the COMMIT: nothing here needs the rows written yet.
        self.deferred.extend(statements);
        Ok(())
    }

    fn set_marks(
        &mut self,
        flushed: Version,
        written: Version,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let epoch = to_stored(flushed.epoch, "epoch")?;
        let lsn = to_stored(flushed.lsn, "lsn")?;
        let w_epoch = to_stored(written.epoch, "epoch")?;
        let w_lsn = to_stored(written.lsn, "lsn")?;
        let now = to_stored(now_ms, "time")?;
        let statement = self
            .step(|c, _, _| c.statement(SET_FLUSHED, "preparing the flushed version's update"))?;
        // Sent with the COMMIT.
        self.deferred.push(Deferred::Marks {
            statement,
            flushed: (epoch, lsn),
            written: (w_epoch, w_lsn),
            now_ms: now,
        });
        Ok(())
    }

    fn delete_counter(
        &mut self,
        counter: &str,
        now_ms: u64,
        expiring: Option<u64>,
    ) -> Result<Option<DeletedCounter>, StoreError> {
        let now = to_stored(now_ms, "time")?;
        let expiring = expiring.map(|at| to_stored(at, "expiry")).transpose()?;
        // The rows this transaction upserted must be in the counter's rows
        // the delete reads: the deferred statements go first.
        let deferred = std::mem::take(&mut self.deferred);
        self.step(|c, node_id, epoch| {
            let what = "deleting a counter";
            for d in &deferred {
                let r = bounded(&c.runtime, d.what(), d.send(&c.client, node_id));
                c.note(r)?;
            }
            c.execute(LOCK_DELETES, &[], what)?;
            // After the deletes' lock, always: an expiry's row is only ever
            // locked by a delete holding it, or by one statement that
            // takes no other lock (`set_expiry`), so no two transactions
            // wait on each other. Of two nodes sweeping one expiry, the
            // second finds its row gone here.
            let cleared = match expiring {
                Some(at) => c.execute(super::TAKE_EXPIRY_SQL, &[&counter, &at], what)?,
                None => c.execute(super::CLEAR_EXPIRY_SQL, &[&counter], what)?,
            };
            if expiring.is_some() && cleared == 0 {
                return Ok(None);
            }
            let before = c
                .query(LOCK_COUNTER_ROWS, &[&counter], what)?
                .iter()
                .map(decode_shard)
                .collect::<Result<Vec<ShardRow>, Fail>>()?;
            if before.is_empty() {
                return Ok(None);
            }
            let nodes: Vec<&str> = before.iter().map(|r| r.node_id.as_str()).collect();
            c.execute(SET_BASES, &[&counter, &nodes], what)?;
            let epoch = to_stored(epoch, "epoch")?;
            c.execute(RECORD_DELETE, &[&counter, &node_id, &epoch, &now], what)?;
            Ok(Some(DeletedCounter::of(before)))
        })
    }

    fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        self.finished = true;
        let failed = self.failed;
        let Some(conn) = self.guard.as_mut() else {
            return Err(poisoned());
        };
        if failed {
            conn.rollback();
            if conn.broken {
                *self.guard = None;
            }
            return Err(poisoned());
        }
        let deferred = std::mem::take(&mut self.deferred);
        let result = conn.commit_with(&deferred, &self.node_id, "committing");
        if let Err(StoreError::Indeterminate(_)) = &result {
            *self.unsettled_xid.lock() = Some(self.xid);
        }
        if result.is_err() && (conn.broken || conn.client.is_closed()) {
            *self.guard = None;
        }
        result
    }
}

impl Drop for PgTx<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Some(conn) = self.guard.as_mut() {
            conn.rollback();
            if conn.broken || conn.client.is_closed() {
                *self.guard = None;
            }
        }
    }
}
