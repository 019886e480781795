//! The benchmark's private PostgreSQL server: tally's own
//! [`tally_lab::pgserver`], in the work directory, with PostgreSQL's default
//! durability settings (`fsync`, `synchronous_commit` and
//! `full_page_writes` on), so that a commit costs what it costs in
//! production. [`PgServer::settings`] reads them back from the server for
//! the tables.
//!
//! When the benchmark runs as root the server runs as an unprivileged user,
//! who must pass through every directory above the server's: those within
//! the work directory are opened up for it, any other must already allow
//! it.

use std::path::Path;

use anyhow::Result;
use tally_lab::pgserver::{PgError, PgOptions};

pub use tally_lab::pgserver::{PgServer, SUPERUSER};

/// Connections the server accepts: 50 pgbench clients, or a tally node's
/// two, plus the benchmark's own.
const CONNECTIONS_MAX: u32 = 120;

/// Creates a cluster in `dir` (which must not hold one yet), somewhere
/// under the benchmark's own directory `work`, and starts it.
pub fn start(work: &Path, dir: &Path) -> Result<PgServer> {
    PgServer::new(PgOptions {
        durable: true,
        connections_max: CONNECTIONS_MAX,
        preload_stat_statements: false,
        dir: Some(dir.to_path_buf()),
        reachable_from: Some(work.to_path_buf()),
        ..PgOptions::default()
    })
    .map_err(|e| {
        let hint = matches!(e, PgError::Unreachable { .. });
        let e = anyhow::Error::from(e);
        if hint {
            e.context("give --work-dir a directory other users can pass through")
        } else {
            e
        }
    })
}
