//! The development tools' clients of the wire protocols: one small HTTP/1.1
//! client ([`http`]) and one RESP client ([`resp`]), each bounded in time
//! and in the bytes it reads by limits its callers name, plaintext or, for
//! a secured cluster, TLS with credentials ([`access`]).
//!
//! They are clients of tally (and of Redis, for the benchmark) for tools
//! and tests only: the product's own front ends are in the library, and
//! nothing here is used to serve.

pub mod access;
pub mod http;
pub mod resp;
