//! The SQLite backend: one database file shared by the node processes of
//! one machine, the default store.
//!
//! Each [`SqliteStore`] holds one connection behind a mutex; a transaction
//! keeps the mutex until it ends. Several processes share the file through
//! SQLite's own file locks: a write transaction starts with `BEGIN
//! IMMEDIATE`, which takes the database's write lock at once, so the epoch
//! check made at the start holds until commit (no registration can commit
//! in between). A writer that finds the lock taken waits up to
//! [`BUSY_TIMEOUT`], then fails with [`StoreError::Unavailable`].
//!
//! This module must never hold the write lock across anything but its own
//! statements: the caller's work happens before `begin` or after `commit`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, params};

use super::{
    DeletedCounter, KeyRow, NodeRow, Registration, ShardRow, Store, StoreError, StoreTx, Version,
    from_stored, not_registered, poisoned, schema, to_stored,
};

/// How long a statement waits for another process's write lock before it
/// fails with [`StoreError::Unavailable`]. Long enough to ride out another
/// node's flush, short enough that a `replicated` request fails fast.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between attempts to switch a fresh store to WAL (see `open`).
const WAL_SWITCH_RETRY: Duration = Duration::from_millis(10);

/// A store in one SQLite file.
pub struct SqliteStore {
    /// One connection: a std-style blocking mutex (not an async one)
    /// because every holder does blocking I/O and no holder awaits.
    conn: Mutex<Connection>,
    path: PathBuf,
}

const SHARD_COLUMNS: &str = "counter, node_id, value, epoch, lsn, base";
const NODE_COLUMNS: &str = "node_id, epoch, address, started_at_ms, heartbeat_at_ms, \
                            flushed_epoch, flushed_lsn, applied_lsn, written_epoch, written_lsn, \
                            state, host, pid";

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path` and brings
    /// its schema up to date.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let shown = path.display();
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| StoreError::Invalid(format!("opening SQLite store {shown}: {e}")))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| unavailable(&format!("configuring SQLite store {shown}"), e))?;
        // WAL lets readers (other nodes catching up) run while one node
        // writes, and makes a commit one append to the log.
        //
        // Switching a fresh file to WAL takes an exclusive lock, and SQLite
        // answers BUSY at once, without its busy handler, when several
        // processes race to do it (nodes started together). So the switch
        // is retried here, within the same bound as any other wait.
        // Each attempt waits only briefly, so that a wait that would never
        // end (two connections each needing the other's lock) is retried
        // too; the whole switch is bounded by BUSY_TIMEOUT.
        conn.busy_timeout(WAL_SWITCH_RETRY * 10)
            .map_err(|e| unavailable(&format!("configuring SQLite store {shown}"), e))?;
        let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
        let mode: String = loop {
            match conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0)) {
                Ok(mode) => break mode,
                Err(e)
                    if matches!(
                        e.sqlite_error_code(),
                        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
                    ) && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(WAL_SWITCH_RETRY);
                }
                Err(e) => return Err(setup_error(&format!("setting WAL mode on {shown}"), e)),
            }
        };
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| unavailable(&format!("configuring SQLite store {shown}"), e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Invalid(format!(
                "SQLite store {shown} cannot use write-ahead logging (journal mode is '{mode}'); \
                 put it on a local file system"
            )));
        }
        // FULL syncs the log at every commit. The store is the durability of
        // `replicated`: a request is acknowledged once its flush commits,
        // so a commit must survive a power cut, which NORMAL does not
        // promise in WAL mode.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(|e| unavailable(&format!("setting synchronous=FULL on {shown}"), e))?;
        migrate(&conn).map_err(|e| match e {
            StoreError::Unavailable(m) => {
                StoreError::Unavailable(format!("migrating SQLite store {shown}: {m}"))
            }
            other => other,
        })?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Applies pending migrations under the write lock, so two processes
/// opening a fresh file at once apply them once.
fn migrate(conn: &Connection) -> Result<(), StoreError> {
    conn.execute_batch(schema::VERSION_TABLE)
        .map_err(|e| unavailable("creating the schema version table", e))?;
    conn.execute_batch("BEGIN IMMEDIATE")
        .map_err(|e| unavailable("starting the migration", e))?;
    let result = (|| {
        let found: Option<i64> = conn
            .query_row(schema::SELECT_VERSION, [], |r| r.get(0))
            .map_err(|e| unavailable("reading the schema version", e))?;
        let found = from_stored(found.unwrap_or(0), "schema version")?;
        schema::check_known(found)?;
        for m in schema::pending(found) {
            conn.execute_batch(m.sqlite)
                .map_err(|e| unavailable(&format!("applying migration {}", m.version), e))?;
            conn.execute(
                schema::INSERT_VERSION_SQLITE,
                params![
                    to_stored(m.version, "schema version")?,
                    to_stored(crate::engine::idempotency::now_ms(), "time")?
                ],
            )
            .map_err(|e| unavailable(&format!("recording migration {}", m.version), e))?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => commit_open(conn, "committing the migration"),
        Err(e) => {
            rollback(conn);
            Err(e)
        }
    }
}

/// Maps an error met while opening: a file that is not an SQLite database
/// is a configuration mistake, not an outage.
fn setup_error(context: &str, e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => StoreError::Invalid(format!(
            "{context}: the file is not an SQLite database; check the store URL"
        )),
        _ => unavailable(context, e),
    }
}

/// Maps an error of a statement that did not commit anything.
fn unavailable(context: &str, e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            StoreError::Unavailable(format!(
                "{context}: the SQLite store stayed locked by another process for more than \
                 {BUSY_TIMEOUT:?}"
            ))
        }
        _ => StoreError::Unavailable(format!("{context}: {e}")),
    }
}

/// Commits the open transaction. Only a busy or locked database is known
/// to leave nothing committed; any other failure of `COMMIT` (an I/O error
/// while the log was written or synced) may have left a complete commit
/// record on disk, so its outcome is unknown.
fn commit_open(conn: &Connection, context: &str) -> Result<(), StoreError> {
    match conn.execute_batch("COMMIT") {
        Ok(()) => Ok(()),
        Err(e) => {
            rollback(conn);
            match e.sqlite_error_code() {
                Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
                    Err(unavailable(context, e))
                }
                _ => Err(StoreError::Indeterminate(format!("{context}: {e}"))),
            }
        }
    }
}

/// Rolls back the open transaction, if one is still open. A failure is
/// ignored: SQLite rolls back on its own when it cannot go on, and an
/// unfinished transaction is never committed.
fn rollback(conn: &Connection) {
    if !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
}

type RawShard = (String, String, i64, i64, i64, i64);

fn shard_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawShard> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
    ))
}

fn decode_shard(
    (counter, node_id, value, epoch, lsn, base): RawShard,
) -> Result<ShardRow, StoreError> {
    Ok(ShardRow {
        counter,
        node_id,
        value,
        version: Version {
            epoch: from_stored(epoch, "epoch")?,
            lsn: from_stored(lsn, "lsn")?,
        },
        base,
    })
}

type RawNode = (
    (String, i64, String, i64, i64, i64, i64, i64, i64, i64),
    (String, String, i64),
);

fn node_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawNode> {
    Ok((
        (
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
            r.get(7)?,
            r.get(8)?,
            r.get(9)?,
        ),
        (r.get(10)?, r.get(11)?, r.get(12)?),
    ))
}

fn decode_node(raw: RawNode) -> Result<NodeRow, StoreError> {
    let (
        (node_id, epoch, address, started, heartbeat, f_epoch, f_lsn, applied, w_epoch, w_lsn),
        (state, host, pid),
    ) = raw;
    Ok(NodeRow {
        node_id,
        epoch: from_stored(epoch, "epoch")?,
        address,
        started_at_ms: from_stored(started, "start time")?,
        heartbeat_at_ms: from_stored(heartbeat, "heartbeat time")?,
        flushed: Version {
            epoch: from_stored(f_epoch, "flushed epoch")?,
            lsn: from_stored(f_lsn, "flushed lsn")?,
        },
        applied_lsn: from_stored(applied, "applied lsn")?,
        written: Version {
            epoch: from_stored(w_epoch, "written epoch")?,
            lsn: from_stored(w_lsn, "written lsn")?,
        },
        state: super::NodeState::parse(&state)?,
        host,
        pid: u32::try_from(pid).unwrap_or(0),
    })
}

fn select_shards(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    context: &str,
) -> Result<Vec<ShardRow>, StoreError> {
    let mut stmt = conn
        .prepare_cached(sql)
        .map_err(|e| unavailable(context, e))?;
    let raw = stmt
        .query_map(params, shard_row)
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(|e| unavailable(context, e))?;
    raw.into_iter().map(decode_shard).collect()
}

/// Checks the node's row against a process at `ours` that has written up
/// to `written` (see [`super::check_node`]); a missing row is a regression.
fn check_row(
    conn: &Connection,
    node_id: &str,
    ours: u64,
    written: Version,
) -> Result<(), StoreError> {
    let row: Option<(i64, i64, i64)> = conn
        .prepare_cached(
            "SELECT epoch, written_epoch, written_lsn FROM tally_nodes WHERE node_id = ?1",
        )
        .and_then(|mut s| {
            s.query_row([node_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()
        })
        .map_err(|e| unavailable("reading the node's epoch", e))?;
    let Some((epoch, w_epoch, w_lsn)) = row else {
        return Err(not_registered(node_id));
    };
    let stored_written = Version::new(
        from_stored(w_epoch, "written epoch")?,
        from_stored(w_lsn, "written lsn")?,
    );
    match super::check_node(
        node_id,
        ours,
        written,
        from_stored(epoch, "epoch")?,
        stored_written,
    ) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
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
        let conn = self.conn.lock();
        conn.execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| unavailable("starting the registration", e))?;
        let result = (|| {
            let previous = conn
                .prepare_cached(&format!(
                    "SELECT {NODE_COLUMNS} FROM tally_nodes WHERE node_id = ?1"
                ))
                .and_then(|mut s| s.query_row([node_id], node_row).optional())
                .map_err(|e| unavailable("reading the node row", e))?
                .map(decode_node)
                .transpose()?;
            let epoch = match &previous {
                Some(p) => {
                    let epoch = (p.epoch + 1).max(first);
                    let stored = to_stored(epoch, "epoch")?;
                    conn.prepare_cached(
                        "UPDATE tally_nodes SET epoch = ?2, address = ?3, started_at_ms = ?4, \
                         heartbeat_at_ms = ?4, state = 'running', host = ?5, pid = ?6 \
                         WHERE node_id = ?1",
                    )
                    .and_then(|mut s| s.execute(params![node_id, stored, address, now, host, pid]))
                    .map_err(|e| unavailable("taking the next epoch", e))?;
                    epoch
                }
                None => {
                    conn.prepare_cached(&format!(
                        "INSERT INTO tally_nodes ({NODE_COLUMNS}) \
                         VALUES (?1, ?4, ?2, ?3, ?3, 0, 0, 0, 0, 0, 'running', ?5, ?6)"
                    ))
                    .and_then(|mut s| {
                        s.execute(params![node_id, address, now, first_stored, host, pid])
                    })
                    .map_err(|e| unavailable("inserting the node row", e))?;
                    first
                }
            };
            Ok(Registration { epoch, previous })
        })();
        match result {
            Ok(reg) => commit_open(&conn, "committing the registration").map(|()| reg),
            Err(e) => {
                rollback(&conn);
                Err(e)
            }
        }
    }

    fn begin_at(
        &self,
        node_id: &str,
        epoch: u64,
        written: Version,
    ) -> Result<Box<dyn StoreTx + '_>, StoreError> {
        let conn = self.conn.lock();
        conn.execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| unavailable("starting a write transaction", e))?;
        if let Err(e) = check_row(&conn, node_id, epoch, written) {
            rollback(&conn);
            return Err(e);
        }
        Ok(Box::new(SqliteTx {
            conn,
            node_id: node_id.to_string(),
            epoch,
            failed: false,
            finished: false,
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
        let conn = self.conn.lock();
        let changed = conn
            .prepare_cached(
                "UPDATE tally_nodes SET heartbeat_at_ms = ?3, applied_lsn = ?4 \
                 WHERE node_id = ?1 AND epoch = ?2 AND (written_epoch, written_lsn) >= (?5, ?6)",
            )
            .map_err(|e| unavailable("heartbeat", e))?
            .execute(params![
                node_id,
                to_stored(epoch, "epoch")?,
                to_stored(now_ms, "time")?,
                to_stored(applied_lsn, "applied lsn")?,
                to_stored(written.epoch, "epoch")?,
                to_stored(written.lsn, "lsn")?
            ])
            .map_err(|e| unavailable("heartbeat", e))?;
        if changed == 1 {
            return Ok(());
        }
        check_row(&conn, node_id, epoch, written)?;
        Err(StoreError::Unavailable(
            "the heartbeat changed no row, yet the node's row allows it".into(),
        ))
    }

    fn set_node_state(
        &self,
        node_id: &str,
        epoch: u64,
        state: super::NodeState,
    ) -> Result<bool, StoreError> {
        let epoch = to_stored(epoch, "epoch")?;
        let conn = self.conn.lock();
        let n = conn
            .prepare_cached("UPDATE tally_nodes SET state = ?3 WHERE node_id = ?1 AND epoch = ?2")
            .and_then(|mut s| s.execute(params![node_id, epoch, state.as_str()]))
            .map_err(|e| unavailable("recording the node's state", e))?;
        Ok(n == 1)
    }

    fn load_shard(&self, node_id: &str) -> Result<Vec<ShardRow>, StoreError> {
        let conn = self.conn.lock();
        select_shards(
            &conn,
            &format!("SELECT {SHARD_COLUMNS} FROM tally_shards WHERE node_id = ?1"),
            [node_id],
            "loading the shard",
        )
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
        let conn = self.conn.lock();
        let mut rows = select_shards(
            &conn,
            &format!(
                "SELECT {SHARD_COLUMNS} FROM tally_shards \
                 WHERE node_id = ?1 AND (epoch, lsn) > (?2, ?3) \
                 ORDER BY epoch, lsn, counter LIMIT ?4"
            ),
            params![
                node_id,
                to_stored(after.epoch, "epoch")?,
                to_stored(after.lsn, "lsn")?,
                i64::try_from(limit).unwrap_or(i64::MAX)
            ],
            "reading changes",
        )?;
        // A page must not end between rows sharing one version, or the
        // next page (which starts above that version) would skip the rest.
        if rows.len() == limit
            && let Some(last) = rows.last()
        {
            let ties = select_shards(
                &conn,
                &format!(
                    "SELECT {SHARD_COLUMNS} FROM tally_shards \
                     WHERE node_id = ?1 AND epoch = ?2 AND lsn = ?3 AND counter > ?4 \
                     ORDER BY counter"
                ),
                params![
                    node_id,
                    to_stored(last.version.epoch, "epoch")?,
                    to_stored(last.version.lsn, "lsn")?,
                    last.counter
                ],
                "reading changes",
            )?;
            rows.extend(ties);
        }
        Ok(rows)
    }

    fn read_counter(&self, counter: &str) -> Result<Vec<ShardRow>, StoreError> {
        let conn = self.conn.lock();
        select_shards(
            &conn,
            &format!("SELECT {SHARD_COLUMNS} FROM tally_shards WHERE counter = ?1"),
            [counter],
            "reading a counter",
        )
    }

    fn deleted_since(&self, after: u64, limit: usize) -> Result<Vec<(u64, ShardRow)>, StoreError> {
        let limit = limit.min(super::DELETES_PAGE_MAX);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let conn = self.conn.lock();
        let what = "reading deletes";
        let mut stmt = conn
            .prepare_cached(
                "SELECT d.seq, s.counter, s.node_id, s.value, s.epoch, s.lsn, s.base \
                 FROM (SELECT counter, seq FROM tally_deletes WHERE seq > ?1 \
                       ORDER BY seq LIMIT ?2) AS d \
                 JOIN tally_shards AS s ON s.counter = d.counter \
                 ORDER BY d.seq, s.node_id",
            )
            .map_err(|e| unavailable(what, e))?;
        let raw = stmt
            .query_map(
                params![
                    to_stored(after, "delete sequence number")?,
                    i64::try_from(limit).unwrap_or(i64::MAX)
                ],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        (
                            r.get(1)?,
                            r.get(2)?,
                            r.get(3)?,
                            r.get(4)?,
                            r.get(5)?,
                            r.get(6)?,
                        ),
                    ))
                },
            )
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<(i64, RawShard)>>>())
            .map_err(|e| unavailable(what, e))?;
        raw.into_iter()
            .map(|(seq, row)| {
                Ok((
                    from_stored(seq, "delete sequence number")?,
                    decode_shard(row)?,
                ))
            })
            .collect()
    }

    fn nodes(&self) -> Result<Vec<NodeRow>, StoreError> {
        let conn = self.conn.lock();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {NODE_COLUMNS} FROM tally_nodes ORDER BY node_id"
            ))
            .map_err(|e| unavailable("listing nodes", e))?;
        let raw = stmt
            .query_map([], node_row)
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| unavailable("listing nodes", e))?;
        raw.into_iter().map(decode_node).collect()
    }

    fn key(&self, key: &str) -> Result<Option<KeyRow>, StoreError> {
        let conn = self.conn.lock();
        let raw: Option<(String, String, i64, String, i64)> = conn
            .prepare_cached(
                "SELECT key, node_id, epoch, counter, expires_at_ms FROM tally_keys \
                 WHERE key = ?1",
            )
            .and_then(|mut s| {
                s.query_row([key], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })
                .optional()
            })
            .map_err(|e| unavailable("reading a key", e))?;
        raw.map(|(key, node_id, epoch, counter, expires)| {
            Ok(KeyRow {
                key,
                node_id,
                epoch: from_stored(epoch, "epoch")?,
                counter,
                expires_at_ms: from_stored(expires, "key expiry")?,
            })
        })
        .transpose()
    }

    fn purge_expired_keys(&self, now_ms: u64, limit: usize) -> Result<u64, StoreError> {
        if limit == 0 {
            return Ok(0);
        }
        let now = to_stored(now_ms, "time")?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let conn = self.conn.lock();
        let deleted = conn
            .prepare_cached(
                "DELETE FROM tally_keys WHERE key IN (SELECT key FROM tally_keys \
                 WHERE expires_at_ms <= ?1 ORDER BY expires_at_ms LIMIT ?2)",
            )
            .and_then(|mut s| s.execute(params![now, limit]))
            .map_err(|e| unavailable("purging expired keys", e))?;
        Ok(deleted as u64)
    }

    fn expiry(&self, counter: &str) -> Result<Option<u64>, StoreError> {
        let conn = self.conn.lock();
        let at: Option<i64> = conn
            .prepare_cached(&sqlite_sql(super::EXPIRY_SQL))
            .and_then(|mut s| s.query_row([counter], |r| r.get(0)).optional())
            .map_err(|e| unavailable("reading an expiry", e))?;
        at.map(|at| from_stored(at, "expiry")).transpose()
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
        let conn = self.conn.lock();
        let changed = conn
            .prepare_cached(&sqlite_sql(super::set_expiry_sql(when)))
            .and_then(|mut s| s.execute(params![counter, at]))
            .map_err(|e| unavailable("setting an expiry", e))?;
        Ok(changed > 0)
    }

    fn clear_expiry(&self, counter: &str) -> Result<bool, StoreError> {
        let conn = self.conn.lock();
        let changed = conn
            .prepare_cached(&sqlite_sql(super::CLEAR_EXPIRY_SQL))
            .and_then(|mut s| s.execute([counter]))
            .map_err(|e| unavailable("clearing an expiry", e))?;
        Ok(changed > 0)
    }

    fn due_expiries(&self, now_ms: u64, limit: usize) -> Result<Vec<(String, u64)>, StoreError> {
        let limit = limit.min(super::EXPIRIES_PAGE_MAX);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let now = to_stored(now_ms, "time")?;
        let conn = self.conn.lock();
        let raw: Vec<(String, i64)> = conn
            .prepare_cached(&sqlite_sql(super::DUE_EXPIRIES_SQL))
            .and_then(|mut s| {
                s.query_map(params![now, limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect()
            })
            .map_err(|e| unavailable("reading expiries", e))?;
        raw.into_iter()
            .map(|(c, at)| Ok((c, from_stored(at, "expiry")?)))
            .collect()
    }
}

/// A statement shared with PostgreSQL, its `$n` parameters written `?n`.
fn sqlite_sql(sql: &str) -> String {
    sql.replace('$', "?")
}

/// An open `BEGIN IMMEDIATE` transaction; holds the store's connection
/// (and the database's write lock) until it ends.
struct SqliteTx<'a> {
    conn: MutexGuard<'a, Connection>,
    node_id: String,
    epoch: u64,
    /// A statement failed: the transaction may hold part of a batch and
    /// must never commit.
    failed: bool,
    finished: bool,
}

impl SqliteTx<'_> {
    /// Runs one step; any failure poisons the transaction.
    fn step<T>(
        &mut self,
        f: impl FnOnce(&Connection, &str, u64) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if self.failed {
            return Err(poisoned());
        }
        let result = f(&self.conn, &self.node_id, self.epoch);
        self.failed = result.is_err();
        result
    }
}

impl StoreTx for SqliteTx<'_> {
    fn insert_keys(&mut self, keys: &[KeyRow]) -> Result<Vec<bool>, StoreError> {
        self.step(|conn, node_id, epoch| {
            super::check_key_rows(node_id, epoch, keys)?;
            let mut stmt = conn
                .prepare_cached(
                    "INSERT INTO tally_keys (key, node_id, epoch, counter, expires_at_ms) \
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (key) DO NOTHING",
                )
                .map_err(|e| unavailable("inserting keys", e))?;
            let epoch = to_stored(epoch, "epoch")?;
            let mut inserted = Vec::with_capacity(keys.len());
            for k in keys {
                // Row by row in key order, so a key repeated in the batch
                // finds its first occurrence already there.
                let n = stmt
                    .execute(params![
                        k.key,
                        node_id,
                        epoch,
                        k.counter,
                        to_stored(k.expires_at_ms, "key expiry")?
                    ])
                    .map_err(|e| unavailable("inserting keys", e))?;
                inserted.push(n == 1);
            }
            Ok(inserted)
        })
    }

    fn delete_keys(&mut self, keys: &[&str]) -> Result<(), StoreError> {
        self.step(|conn, node_id, _| {
            let mut stmt = conn
                .prepare_cached("DELETE FROM tally_keys WHERE key = ?1 AND node_id = ?2")
                .map_err(|e| unavailable("deleting keys", e))?;
            for key in keys {
                stmt.execute(params![key, node_id])
                    .map_err(|e| unavailable("deleting keys", e))?;
            }
            Ok(())
        })
    }

    fn upsert_shards(&mut self, rows: &[(&str, i64, Version)]) -> Result<(), StoreError> {
        self.step(|conn, node_id, epoch| {
            super::check_shard_rows(node_id, epoch, rows)?;
            // Row by row: a counter named twice meets its earlier row and
            // the version guard keeps the higher, so no deduplication.
            let mut stmt = conn
                .prepare_cached(
                    "INSERT INTO tally_shards (counter, node_id, value, epoch, lsn) \
                     VALUES (?1, ?2, ?3, ?4, ?5) \
                     ON CONFLICT (counter, node_id) DO UPDATE \
                     SET value = excluded.value, epoch = excluded.epoch, lsn = excluded.lsn \
                     WHERE (tally_shards.epoch, tally_shards.lsn) < (excluded.epoch, excluded.lsn)",
                )
                .map_err(|e| unavailable("upserting shards", e))?;
            for &(counter, value, version) in rows {
                // Checked above: both fit.
                let (e, l) = (version.epoch as i64, version.lsn as i64);
                stmt.execute(params![counter, node_id, value, e, l])
                    .map_err(|e| unavailable("upserting shards", e))?;
            }
            Ok(())
        })
    }

    fn set_marks(
        &mut self,
        flushed: Version,
        written: Version,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let (epoch, lsn) = (
            to_stored(flushed.epoch, "epoch")?,
            to_stored(flushed.lsn, "lsn")?,
        );
        let (w_epoch, w_lsn) = (
            to_stored(written.epoch, "epoch")?,
            to_stored(written.lsn, "lsn")?,
        );
        let now = to_stored(now_ms, "time")?;
        self.step(|conn, node_id, _| {
            // Every SET expression reads the row as it was, so each
            // comparison is made once against the old version.
            conn.prepare_cached(
                "UPDATE tally_nodes SET \
                 flushed_epoch = CASE WHEN (flushed_epoch, flushed_lsn) < (?2, ?3) \
                     THEN ?2 ELSE flushed_epoch END, \
                 flushed_lsn = CASE WHEN (flushed_epoch, flushed_lsn) < (?2, ?3) \
                     THEN ?3 ELSE flushed_lsn END, \
                 written_epoch = CASE WHEN (written_epoch, written_lsn) < (?5, ?6) \
                     THEN ?5 ELSE written_epoch END, \
                 written_lsn = CASE WHEN (written_epoch, written_lsn) < (?5, ?6) \
                     THEN ?6 ELSE written_lsn END, \
                 heartbeat_at_ms = MAX(heartbeat_at_ms, ?4) \
                 WHERE node_id = ?1",
            )
            .and_then(|mut s| s.execute(params![node_id, epoch, lsn, now, w_epoch, w_lsn]))
            .map_err(|e| unavailable("recording the flushed version", e))?;
            Ok(())
        })
    }

    fn delete_counter(
        &mut self,
        counter: &str,
        now_ms: u64,
        expiring: Option<u64>,
    ) -> Result<Option<DeletedCounter>, StoreError> {
        let now = to_stored(now_ms, "time")?;
        let expiring = expiring.map(|at| to_stored(at, "expiry")).transpose()?;
        self.step(|conn, node_id, epoch| {
            let what = "deleting a counter";
            let epoch = to_stored(epoch, "epoch")?;
            // The transaction holds the database's write lock: nothing
            // changes the rows between these statements.
            let cleared = match expiring {
                Some(at) => conn
                    .prepare_cached(&sqlite_sql(super::TAKE_EXPIRY_SQL))
                    .and_then(|mut s| s.execute(params![counter, at])),
                None => conn
                    .prepare_cached(&sqlite_sql(super::CLEAR_EXPIRY_SQL))
                    .and_then(|mut s| s.execute([counter])),
            }
            .map_err(|e| unavailable(what, e))?;
            if expiring.is_some() && cleared == 0 {
                return Ok(None);
            }
            let before = select_shards(
                conn,
                &format!("SELECT {SHARD_COLUMNS} FROM tally_shards WHERE counter = ?1"),
                [counter],
                what,
            )?;
            if before.is_empty() {
                return Ok(None);
            }
            conn.prepare_cached("UPDATE tally_shards SET base = value WHERE counter = ?1")
                .and_then(|mut s| s.execute([counter]))
                .map_err(|e| unavailable(what, e))?;
            conn.prepare_cached(
                "INSERT INTO tally_deletes (counter, seq, node_id, epoch, deleted_at_ms) \
                 VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM tally_deletes), ?2, ?3, ?4) \
                 ON CONFLICT (counter) DO UPDATE SET seq = excluded.seq, \
                 node_id = excluded.node_id, epoch = excluded.epoch, \
                 deleted_at_ms = excluded.deleted_at_ms",
            )
            .and_then(|mut s| s.execute(params![counter, node_id, epoch, now]))
            .map_err(|e| unavailable(what, e))?;
            Ok(Some(DeletedCounter::of(before)))
        })
    }

    fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        self.finished = true;
        if self.failed {
            rollback(&self.conn);
            return Err(poisoned());
        }
        commit_open(&self.conn, "committing")
    }
}

impl Drop for SqliteTx<'_> {
    fn drop(&mut self) {
        if !self.finished {
            rollback(&self.conn);
        }
    }
}
