//! The RESP (Redis protocol) front end: `redis-cli`, `redis-benchmark` and
//! Redis client libraries talk to a node as they would to Redis.
//!
//! Laid out one concept per module: [`frame`] (RESP2/RESP3 values and the
//! incremental request parser), [`connection`] (buffers, frame timeout,
//! closing), [`parse`] (a cursor over a request's arguments), [`cmd`] (the
//! command table and one module per command family), [`pipeline`] (running
//! a round of pipelined requests with one journal sync), [`reply`] (error
//! prefixes) and [`server`] (listener, connection limit, shutdown). The
//! entry point is [`serve`].
//!
//! # Dialect
//!
//! RESP2, and RESP3 on a connection that sends `HELLO 3` (maps, `_` nulls,
//! verbatim strings and sets where Redis 7 sends them; `HELLO 2` or `RESET`
//! switch back), with Redis 7's replies for `PING`, `ECHO`, `INCR`, `INCRBY`,
//! `DECR`, `DECRBY`, `GET`, `MGET`, `EXISTS`, `DBSIZE`, `INFO`, `COMMAND`,
//! `CONFIG GET`, `CLIENT`, `SELECT`, `HELLO`, `AUTH`, `QUIT` and `RESET`,
//! plus tally's own
//!
//! ```text
//! TALLY.INCRBY key delta [IDEMPOTENCY idkey] [DURABILITY memory|local|replicated]
//! ```
//!
//! which replies `[value, duplicate]` (see [`cmd::counter`]). A counter's
//! name is its key: UTF-8, 1 to 256 bytes; other keys get an `ERR`.
//! `INCR` and its siblings use the node's default durability.
//!
//! # Errors
//!
//! A command's failure is an error reply and the connection goes on; the
//! first word tells the client what to do: `ERR` (not applied, fix the
//! request), `UNAVAILABLE` (not applied, retry later or elsewhere),
//! `INDETERMINATE` (may have been applied; retry with the same idempotency
//! key). The table is in [`reply`].
//!
//! A request that breaks the protocol or a limit (`resp_bulk_bytes_max`,
//! `resp_array_len_max`, `resp_inline_bytes_max`, `frame_timeout`) gets
//! `-ERR Protocol error: ...` and its connection is closed, since RESP
//! cannot resynchronise; other connections are not affected.

pub mod cmd;
pub mod connection;
pub mod frame;
pub mod parse;
pub mod pipeline;
pub mod reply;
pub mod server;

pub use crate::listen::Listeners;
pub use frame::{Frame, Limits, ProtocolError};
pub use server::{serve, serve_on};
