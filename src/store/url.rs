//! Store URLs: which backend, and where.
//!
//! This module only parses; it must never open anything, and its messages
//! never repeat a PostgreSQL URL, which may hold a password.

use std::path::PathBuf;

use super::StoreError;

/// A parsed store URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `sqlite://PATH`: a relative (`sqlite://data/tally.db`) or absolute
    /// (`sqlite:///var/lib/tally.db`) path to the database file.
    Sqlite(PathBuf),
    /// `postgres://...` or `postgresql://...`, kept whole for the driver,
    /// which accepts every libpq URL parameter.
    Postgres(String),
}

const SQLITE_PREFIX: &str = "sqlite://";
const POSTGRES_PREFIXES: [&str; 2] = ["postgres://", "postgresql://"];
const USAGE: &str = "use sqlite://PATH or postgres://USER@HOST/DATABASE";

impl StoreUrl {
    pub fn parse(url: &str) -> Result<StoreUrl, StoreError> {
        if let Some(path) = url.strip_prefix(SQLITE_PREFIX) {
            if path.is_empty() {
                return Err(StoreError::Invalid(format!(
                    "store URL '{url}' names no file; {USAGE}"
                )));
            }
            // An in-memory database lives and dies with one connection: it
            // is neither shared between node processes nor durable.
            if path == ":memory:" || path.starts_with("file:") || path.contains('?') {
                return Err(StoreError::Invalid(format!(
                    "store URL '{url}': SQLite URIs, options and in-memory databases are not \
                     supported; give a file path: {USAGE}"
                )));
            }
            return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
        }
        if POSTGRES_PREFIXES.iter().any(|p| url.starts_with(p)) {
            return Ok(StoreUrl::Postgres(url.to_string()));
        }
        match url.split_once("://") {
            Some((scheme, _)) => Err(StoreError::Invalid(format!(
                "store URL scheme '{scheme}' is not supported; {USAGE}"
            ))),
            None if url.is_empty() => Err(StoreError::Invalid(format!(
                "the store URL is empty; {USAGE}"
            ))),
            // The text may be a mistyped URL holding a password: not echoed.
            None => Err(StoreError::Invalid(format!(
                "the store URL has no scheme; {USAGE}"
            ))),
        }
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn backend(&self) -> &'static str {
        match self {
            StoreUrl::Sqlite(_) => "sqlite",
            StoreUrl::Postgres(_) => "postgres",
        }
    }
}
