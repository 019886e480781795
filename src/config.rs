//! Configuration: the node's settings, the front ends' settings and their
//! named limits, with their defaults. Plain data: the `tally` binary fills
//! it from flags, environment variables and a TOML file.
//!
//! This module only describes settings; it opens no files and starts
//! nothing.
//!
//! Errors about a setting name its field, never a command-line flag: an
//! [`Error::InvalidConfig`] carries the field's name (`durability`), and
//! free-text messages write it qualified (`Config::recovery_mode`). The
//! binary maps both to its flags, so the library keeps one vocabulary for
//! embedders and the binary's users still read the flag they can change.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::error::{Error, Result};

/// How durable an increment must be before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Durability {
    /// Acknowledged at once; journaled in the background within
    /// [`Config::memory_sync_delay`]. A crash may lose it.
    Memory,
    /// Acknowledged after an fsync of the node's journal covers it.
    #[default]
    Local,
    /// Acknowledged after the shared store has committed it. Needs a store;
    /// without one it is refused, never downgraded.
    Replicated,
}

impl Durability {
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Memory => "memory",
            Durability::Local => "local",
            Durability::Replicated => "replicated",
        }
    }
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Durability {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "memory" => Ok(Durability::Memory),
            "local" => Ok(Durability::Local),
            "replicated" => Ok(Durability::Replicated),
            _ => Err(Error::invalid(
                "durability",
                format!("'{s}' is not one of memory, local, replicated"),
            )),
        }
    }
}

/// What recovery does when it finds a bad record that is not a torn tail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecoveryMode {
    /// A torn or corrupt record at the end of the last journal segment is
    /// truncated (a crash artifact); corruption anywhere else stops start-up
    /// with an error naming the file and byte offset.
    #[default]
    Strict,
    /// Corruption anywhere in the journal is accepted deliberately: the
    /// journal is cut at the first bad record and every record after it is
    /// dropped. Use only after reading the error `Strict` gave.
    TruncateAtCorruption,
}

impl RecoveryMode {
    /// The name [`FromStr`] accepts.
    pub fn as_str(self) -> &'static str {
        match self {
            RecoveryMode::Strict => "strict",
            RecoveryMode::TruncateAtCorruption => "truncate-at-corruption",
        }
    }
}

impl std::fmt::Display for RecoveryMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RecoveryMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "strict" => Ok(RecoveryMode::Strict),
            "truncate-at-corruption" => Ok(RecoveryMode::TruncateAtCorruption),
            _ => Err(Error::invalid(
                "recovery mode",
                format!("'{s}' is not one of strict, truncate-at-corruption"),
            )),
        }
    }
}

/// Settings of one node: storage, durability and the limits of its state.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory holding the node id, the journal and snapshots.
    pub data_dir: PathBuf,
    /// Node id; when `None` the id persisted in the data directory is used,
    /// or a new one is made and persisted on first start.
    pub node_id: Option<String>,
    /// Durability of requests that do not ask for one.
    pub durability: Durability,
    /// Longest time a `memory` increment waits before a background sync.
    pub memory_sync_delay: Duration,
    /// A journal segment is closed and a new one started past this size.
    pub segment_bytes_max: u64,
    /// A snapshot is taken once this many journal bytes were written since
    /// the previous one.
    pub snapshot_journal_bytes: u64,
    /// Encoded records waiting for the journal writer; appenders wait while
    /// the queue is above this size (back-pressure, not an error).
    pub journal_queue_bytes_max: usize,
    /// How long an idempotency key is remembered.
    pub idempotency_retention: Duration,
    /// Most idempotency keys held at once; a new key beyond it is refused.
    pub idempotency_keys_max: usize,
    /// Most counters held; an increment creating one more is refused.
    pub counters_max: usize,
    /// What recovery does with corruption that is not a torn tail.
    pub recovery_mode: RecoveryMode,
    /// The shared store and how this node uses it; `None` runs alone.
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

impl Config {
    /// Defaults for a node whose data lives in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Config {
            data_dir: data_dir.into(),
            node_id: None,
            durability: Durability::Local,
            memory_sync_delay: Duration::from_millis(100),
            segment_bytes_max: 64 << 20,
            snapshot_journal_bytes: 256 << 20,
            journal_queue_bytes_max: 64 << 20,
            idempotency_retention: Duration::from_secs(24 * 3600),
            idempotency_keys_max: 10_000_000,
            counters_max: 50_000_000,
            recovery_mode: RecoveryMode::Strict,
            cluster: None,
        }
    }
}

/// Where a TLS server's certificate, key and client CA are. Paths, never
/// contents: the files are read again on every reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// The private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// With a CA file, every client must present a certificate that chains
    /// to it (mutual TLS); without, clients present none.
    pub client_ca: Option<PathBuf>,
}

/// Settings and named limits of the RESP and HTTP front ends.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// RESP listen address; `None` disables the RESP front end.
    pub resp_addr: Option<SocketAddr>,
    /// HTTP listen address; `None` disables the HTTP front end.
    pub http_addr: Option<SocketAddr>,
    /// RESP over TLS listen address (needs `tls`); `None`: no TLS port.
    pub resp_tls_addr: Option<SocketAddr>,
    /// HTTPS listen address (needs `tls`); `None`: no HTTPS.
    pub https_addr: Option<SocketAddr>,
    /// The certificate, key and optional client CA of the TLS ports.
    pub tls: Option<TlsFiles>,
    /// Most open RESP connections; further ones get `-ERR max number of clients reached`.
    pub resp_connections_max: usize,
    /// Most open HTTP connections; further ones are closed at accept.
    pub http_connections_max: usize,
    /// Largest RESP bulk string (a command argument).
    pub resp_bulk_bytes_max: usize,
    /// Largest RESP array (arguments in one command).
    pub resp_array_len_max: usize,
    /// Largest inline command line.
    pub resp_inline_bytes_max: usize,
    /// Most commands read ahead from one connection before their replies
    /// are written (pipeline depth).
    pub resp_pipeline_depth_max: usize,
    /// A client that leaves a frame unfinished this long is disconnected.
    pub frame_timeout: Duration,
    /// Largest HTTP request body.
    pub http_body_bytes_max: usize,
    /// Most increments in one `POST /v1/increments`.
    pub http_batch_len_max: usize,
    /// Largest page of `GET /v1/counters`.
    pub http_page_len_max: usize,
    /// Who may connect and what each may do; none (the default) means
    /// every client may do everything (see [`crate::auth`]).
    pub users: crate::auth::Users,
    /// With users: whether `GET /metrics` stays open to clients without
    /// credentials (scrapers that cannot send any).
    pub metrics_without_auth: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            resp_addr: Some(([127, 0, 0, 1], 7379).into()),
            http_addr: Some(([127, 0, 0, 1], 7070).into()),
            resp_tls_addr: None,
            https_addr: None,
            tls: None,
            resp_connections_max: 10_000,
            http_connections_max: 10_000,
            resp_bulk_bytes_max: 64 * 1024,
            resp_array_len_max: 4096,
            resp_inline_bytes_max: 64 * 1024,
            resp_pipeline_depth_max: 1024,
            frame_timeout: Duration::from_secs(30),
            http_body_bytes_max: 1 << 20,
            http_batch_len_max: 1000,
            http_page_len_max: 1000,
            users: crate::auth::Users::none(),
            metrics_without_auth: false,
        }
    }
}
