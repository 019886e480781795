//! The store's tables and their versioned migrations.
//!
//! Each migration has a number and one SQL script per backend. At open,
//! every migration above the version recorded in `tally_schema_version` is
//! applied, and its number recorded, in one transaction. A store whose
//! recorded version is above [`SCHEMA_VERSION`] was written by a newer
//! build: it is refused ([`check_known`]) rather than written with
//! assumptions that may no longer hold.
//!
//! Several nodes may start at once against a fresh store, so two migrators
//! can race. Every statement is idempotent (`IF NOT EXISTS`), and a
//! migrator that loses the race (a unique violation on the version row or
//! on the catalog) rolls back and tries again, then finds the work done.
//! The backends run the scripts; this module must never touch a connection.
//!
//! The SQL is plain (no advisory locks, no PL/pgSQL); it is tested on
//! SQLite and PostgreSQL only.

use super::StoreError;

/// The newest schema version this build knows.
pub const SCHEMA_VERSION: u64 = 5;

/// How many times a migrator that lost a race retries before giving up.
pub const MIGRATION_ATTEMPTS_MAX: u32 = 5;

/// Created before anything else, outside the numbered migrations.
pub const VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS tally_schema_version (
    version BIGINT PRIMARY KEY NOT NULL,
    applied_at_ms BIGINT NOT NULL
)";

/// Reads the recorded version (`NULL` when none is).
pub const SELECT_VERSION: &str = "SELECT MAX(version) FROM tally_schema_version";

/// One numbered step of the schema.
pub struct Migration {
    pub version: u64,
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

/// Every migration, in order. Never edit a released one: add the next.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sqlite: V1_SQLITE,
        postgres: V1_POSTGRES,
    },
    Migration {
        version: 2,
        sqlite: V2_SQLITE,
        postgres: V2_POSTGRES,
    },
    Migration {
        version: 3,
        sqlite: V3_SQLITE,
        postgres: V3_POSTGRES,
    },
    Migration {
        version: 4,
        sqlite: V4_SQLITE,
        postgres: V4_POSTGRES,
    },
    Migration {
        version: 5,
        sqlite: V5_SQLITE,
        postgres: V5_POSTGRES,
    },
];

// Version 1. Types: BIGINT for every epoch, lsn, value and unix-ms time
// (tally's u64s are stored as signed, see `STORED_INT_MAX`); TEXT for names.
//
// tally_nodes: one row per node id; `epoch` is the fencing token.
// tally_shards: one row per (counter, node); the index serves
//   `changes_since` (a node's rows in version order, counter last so that
//   rows sharing a version have a stable order).
// tally_keys: idempotency keys recorded with `replicated`; the expiry index
//   serves the purge.
//
// SQLite gets WITHOUT ROWID on the two tables keyed by text, so that each
// row is stored once, in its primary key's b-tree.
const V1_SQLITE: &str = "
CREATE TABLE IF NOT EXISTS tally_nodes (
    node_id TEXT PRIMARY KEY NOT NULL,
    epoch BIGINT NOT NULL,
    address TEXT NOT NULL,
    started_at_ms BIGINT NOT NULL,
    heartbeat_at_ms BIGINT NOT NULL,
    flushed_epoch BIGINT NOT NULL,
    flushed_lsn BIGINT NOT NULL,
    applied_lsn BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS tally_shards (
    counter TEXT NOT NULL,
    node_id TEXT NOT NULL,
    value BIGINT NOT NULL,
    epoch BIGINT NOT NULL,
    lsn BIGINT NOT NULL,
    PRIMARY KEY (counter, node_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tally_shards_by_version
    ON tally_shards (node_id, epoch, lsn, counter);
CREATE TABLE IF NOT EXISTS tally_keys (
    key TEXT PRIMARY KEY NOT NULL,
    node_id TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    counter TEXT NOT NULL,
    expires_at_ms BIGINT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tally_keys_by_expiry ON tally_keys (expires_at_ms);
";

const V1_POSTGRES: &str = "
CREATE TABLE IF NOT EXISTS tally_nodes (
    node_id TEXT PRIMARY KEY NOT NULL,
    epoch BIGINT NOT NULL,
    address TEXT NOT NULL,
    started_at_ms BIGINT NOT NULL,
    heartbeat_at_ms BIGINT NOT NULL,
    flushed_epoch BIGINT NOT NULL,
    flushed_lsn BIGINT NOT NULL,
    applied_lsn BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS tally_shards (
    counter TEXT NOT NULL,
    node_id TEXT NOT NULL,
    value BIGINT NOT NULL,
    epoch BIGINT NOT NULL,
    lsn BIGINT NOT NULL,
    PRIMARY KEY (counter, node_id)
);
CREATE INDEX IF NOT EXISTS tally_shards_by_version
    ON tally_shards (node_id, epoch, lsn, counter);
CREATE TABLE IF NOT EXISTS tally_keys (
    key TEXT PRIMARY KEY NOT NULL,
    node_id TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    counter TEXT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS tally_keys_by_expiry ON tally_keys (expires_at_ms);
";

// Version 2. tally_nodes gains the node's written version: the highest
// version of any row it has committed (its flushed mark trails it), so that
// a store that comes back older than what the node wrote is recognised
// (see `Store::begin_at`). Existing rows start at (0, 0): nothing is known
// to be written until the node's next commit.
//
// SQLite's ALTER TABLE has no IF NOT EXISTS; its migrations run under the
// database's write lock, so two migrators never race there.
const V2_SQLITE: &str = "
ALTER TABLE tally_nodes ADD COLUMN written_epoch BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tally_nodes ADD COLUMN written_lsn BIGINT NOT NULL DEFAULT 0;
";

const V2_POSTGRES: &str = "
ALTER TABLE tally_nodes ADD COLUMN IF NOT EXISTS written_epoch BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tally_nodes ADD COLUMN IF NOT EXISTS written_lsn BIGINT NOT NULL DEFAULT 0;
";

/// Records one applied migration.
// Version 3: deleting counters. A row counts `value - base`; a delete sets
// every row's base to its value and records itself in `tally_deletes`
// (one row per counter, its last delete) under a sequence number that
// readers page by.
const V3_SQLITE: &str = "
ALTER TABLE tally_shards ADD COLUMN base BIGINT NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS tally_deletes (
    counter TEXT PRIMARY KEY NOT NULL,
    seq BIGINT NOT NULL,
    node_id TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    deleted_at_ms BIGINT NOT NULL
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS tally_deletes_by_seq ON tally_deletes (seq);
";

const V3_POSTGRES: &str = "
ALTER TABLE tally_shards ADD COLUMN IF NOT EXISTS base BIGINT NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS tally_deletes (
    counter TEXT PRIMARY KEY NOT NULL,
    seq BIGINT NOT NULL,
    node_id TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    deleted_at_ms BIGINT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS tally_deletes_by_seq ON tally_deletes (seq);
";

// Version 4: node identity. A node's row says whether its last process
// stopped cleanly or was retired, and which host and process registered it.
const V4_SQLITE: &str = "
ALTER TABLE tally_nodes ADD COLUMN state TEXT NOT NULL DEFAULT 'running';
ALTER TABLE tally_nodes ADD COLUMN host TEXT NOT NULL DEFAULT '';
ALTER TABLE tally_nodes ADD COLUMN pid BIGINT NOT NULL DEFAULT 0;
";

const V4_POSTGRES: &str = "
ALTER TABLE tally_nodes ADD COLUMN IF NOT EXISTS state TEXT NOT NULL DEFAULT 'running';
ALTER TABLE tally_nodes ADD COLUMN IF NOT EXISTS host TEXT NOT NULL DEFAULT '';
ALTER TABLE tally_nodes ADD COLUMN IF NOT EXISTS pid BIGINT NOT NULL DEFAULT 0;
";

// Version 5: counters' expiries. One row per counter that has one; the
// index serves the sweep (the earliest first).
const V5_SQLITE: &str = "
CREATE TABLE IF NOT EXISTS tally_expiries (
    counter TEXT PRIMARY KEY NOT NULL,
    at_ms BIGINT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tally_expiries_by_time ON tally_expiries (at_ms, counter);
";

const V5_POSTGRES: &str = "
CREATE TABLE IF NOT EXISTS tally_expiries (
    counter TEXT PRIMARY KEY NOT NULL,
    at_ms BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS tally_expiries_by_time ON tally_expiries (at_ms, counter);
";

pub const INSERT_VERSION_SQLITE: &str =
    "INSERT INTO tally_schema_version (version, applied_at_ms) VALUES (?1, ?2)";
pub const INSERT_VERSION_POSTGRES: &str =
    "INSERT INTO tally_schema_version (version, applied_at_ms) VALUES ($1, $2)";

/// Refuses a store whose schema is newer than this build.
pub fn check_known(found: u64) -> Result<(), StoreError> {
    if found > SCHEMA_VERSION {
        return Err(StoreError::Invalid(format!(
            "the store's schema is version {found}, newer than version {SCHEMA_VERSION} which \
             this build of tally knows; upgrade tally on this node (a newer build has already \
             migrated the store)"
        )));
    }
    Ok(())
}

/// Migrations still to apply on a store at version `found`.
pub fn pending(found: u64) -> impl Iterator<Item = &'static Migration> {
    MIGRATIONS.iter().filter(move |m| m.version > found)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The migration list is numbered 1, 2, 3... up to SCHEMA_VERSION, so
    // no step is skipped or applied twice.
    #[test]
    fn migrations_are_numbered_without_gaps() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as u64 + 1);
        }
        assert_eq!(MIGRATIONS.last().map(|m| m.version), Some(SCHEMA_VERSION));
        assert_eq!(pending(0).count(), MIGRATIONS.len());
        assert_eq!(pending(SCHEMA_VERSION).count(), 0);
    }
}
