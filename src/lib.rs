//! tally: counters that stay exact and durable across restarts, crashes and
//! node failures.
//!
//! Each node journals increments locally with group-committed fsync, takes
//! snapshots to bound its journal, recovers before it reports ready, and
//! speaks RESP and HTTP/JSON. The library is the product: embed a [`Node`]
//! in a Rust service, or run the `tally` binary.
//!
//! Modules, one concept each: [`table`] (pure counter state), [`idempotency`]
//! (keys seen), [`journal`], [`snapshot`], [`recovery`], [`storage`] (the
//! I/O seam), [`node`] (wiring and lifecycle), [`resp`] and [`http`] (front
//! ends), [`metrics`], [`config`].

pub mod chaos;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod error;
pub mod http;
pub mod idempotency;
pub mod inspect;
pub mod journal;
pub mod launcher;
pub mod metrics;
pub mod node;
pub mod pgserver;
pub mod recovery;
pub mod resp;
pub mod server;
pub mod shutdown;
pub mod snapshot;
pub mod storage;
pub mod store;
pub mod table;

pub use config::{Config, Durability, RecoveryMode, ServerConfig};
pub use error::{Error, Result};
pub use node::{CounterDetail, IncrementOptions, IncrementOutcome, Node, NodeStats, Readiness};
