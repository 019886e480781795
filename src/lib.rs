//! tally: counters that stay exact and durable across restarts, crashes and
//! node failures.
//!
//! Each node journals increments locally with group-committed fsync, takes
//! snapshots to bound its journal, recovers before it reports ready, and
//! speaks RESP and HTTP/JSON. The library is the product: embed a [`Node`]
//! in a Rust service, or run the `tally` binary (crate `tally-cli`).
//!
//! Layers, each depending only on those before it:
//! - [`engine`]: one node's counters on its own disk: the counter table,
//!   idempotency keys, journal, snapshots, recovery and the storage seam.
//!   Knows nothing of other nodes.
//! - [`store`]: the shared store (SQLite, PostgreSQL) behind one trait.
//! - [`cluster`]: this node's link to the store (epoch, restore, committer,
//!   cache of other nodes' shards); handed an engine, never the node.
//! - [`node`]: owns an engine and, with a store, a cluster; the API.
//! - front ends `resp` and `http` (features of the same names), which
//!   serve a node; [`metrics`], [`config`], [`error`], [`shutdown`];
//!   [`inspect`] reads a data directory offline; [`ready`] is the line a
//!   served node prints once it is ready.
//!
//! Cargo features: `sqlite`, `postgres` (store backends), `resp`, `http`
//! (front ends), all on by default; `testkit` adds the test aids (simulated
//! storage, the fault-injecting store, the flush timer).

pub mod auth;
pub mod cluster;
pub mod config;
pub mod engine;
pub mod error;
pub mod hot;
#[cfg(feature = "http")]
pub mod http;
pub mod inspect;
pub mod labels;
#[cfg(any(feature = "resp", feature = "http"))]
pub mod listen;
pub mod metrics;
pub mod node;
pub mod ready;
#[cfg(feature = "resp")]
pub mod resp;
pub mod shutdown;
pub mod store;
#[cfg(feature = "tls")]
pub mod tls;

pub use config::{Config, Durability, RecoveryMode, ServerConfig};
pub use error::{Error, Outcome, Result};
pub use node::{CounterDetail, IncrementOptions, IncrementOutcome, Node, NodeStats, Readiness};
