//! Development tools for tally, beside the product and not in it.
//!
//! - [`launcher`]: `tally cluster`, N nodes on one store behind a generated
//!   HAProxy configuration, supervised and restarted;
//! - [`control`]: the launcher's loopback control endpoint and its client;
//! - [`chaos`]: `tally chaos`, the fault test and its checker;
//! - [`pgserver`]: a private PostgreSQL server in a directory of its own;
//! - [`hastore`]: a local HA store: etcd, Patroni, synchronous PostgreSQL;
//! - [`process`]: the one guard for every child process, and the wait for
//!   a node's ready line;
//! - [`pki`]: a private CA and certificates for local clusters and tests;
//! - [`ports`]: free loopback ports;
//! - [`secrets`]: the CA, certificates and users of a secured local cluster;
//! - [`wire`]: the HTTP and RESP clients the tools and tests speak with;
//! - [`testing`]: the harnesses the test suites share.
//!
//! Nothing here is needed to run a node: the library (`tally`) never
//! depends on this crate.

pub mod chaos;
pub mod control;
pub mod hastore;
pub mod launcher;
pub mod pgserver;
pub mod pki;
pub mod ports;
pub mod process;
pub mod redis_server;
pub mod secrets;
pub mod testing;
pub mod wire;
