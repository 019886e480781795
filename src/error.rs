//! The library's typed errors.
//!
//! Every variant says what went wrong in words an operator or client can act
//! on. Front ends map them to protocol replies (`-ERR ...`, HTTP status plus a
//! JSON body); the binary wraps them in `anyhow` only at its edge.

use std::path::PathBuf;
use std::sync::Arc;

/// Errors returned by [`crate::Node`] and the storage modules.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The increment would take the counter outside the signed 64-bit range.
    /// Worded exactly as Redis words it so that clients recognise it.
    #[error("increment or decrement would overflow")]
    Overflow,

    /// A counter name or idempotency key broke a limit or was empty.
    #[error("{what} is invalid: {reason}")]
    InvalidInput { what: &'static str, reason: String },

    /// A setting of [`crate::Config`] (or [`crate::ServerConfig`]) is
    /// invalid; `field` names it. The `tally` binary names the flag.
    #[error("setting {field} is invalid: {reason}")]
    InvalidConfig { field: &'static str, reason: String },

    /// The request asked for a durability level this node cannot provide.
    /// It is refused rather than silently downgraded.
    #[error("durability '{level}' is not available: {reason}")]
    DurabilityUnavailable { level: &'static str, reason: String },

    /// The journal failed earlier (a write or fsync returned an error). The
    /// node acknowledges no more writes until it is restarted.
    #[error("journal failed, writes are refused until the node restarts: {0}")]
    JournalFailed(Arc<str>),

    /// The increment was applied in memory and written, but the fsync that
    /// would have made it durable failed: it may or may not survive a crash.
    /// Retry with the same idempotency key after the node has restarted.
    #[error(
        "outcome unknown: the increment was written but its fsync failed ({0}); retry with the same idempotency key"
    )]
    Indeterminate(Arc<str>),

    /// Another process registered this node id in the shared store: this
    /// process's epoch is superseded and it takes no more writes.
    #[error("fenced: {0}")]
    Fenced(String),

    /// A `replicated` increment was refused because the shared store could
    /// not commit it; nothing was applied. Safe to retry.
    #[error("shared store unavailable: {0}")]
    StoreUnavailable(String),

    /// The node is shutting down and takes no new writes.
    #[error("node is shutting down")]
    ShuttingDown,

    /// What the request names does not exist (a node id the store does
    /// not know).
    #[error("{0}")]
    NotFound(String),

    /// The request conflicts with the state of what it names (retiring a
    /// node that is running); the message says what must change first.
    #[error("{0}")]
    Conflict(String),

    /// A bounded resource is full; the message names the limit to raise.
    #[error("{0}")]
    LimitExceeded(String),

    /// Persistent data failed validation. `offset` is a byte offset in `path`.
    #[error("{path}: corrupt data at byte offset {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },

    /// An I/O operation failed; `context` says which one and on what.
    /// (The cause is part of the message, not a `source()`, so that error
    /// chains do not print it twice.)
    #[error("{context}: {cause}")]
    Io {
        context: String,
        cause: Arc<std::io::Error>,
    },
}

/// What a client may conclude from an error about its request: the one
/// classification both front ends answer with (RESP as the error prefix,
/// HTTP as the status class and the `"outcome"` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing was applied, and the same request would fail the same way
    /// here (bad input, a limit, overflow, a fault of this node's data).
    Refused,
    /// Nothing was applied; retrying may succeed, here later or on another
    /// node.
    Unavailable,
    /// It may or may not have been applied: retry with the same
    /// idempotency key.
    Unknown,
}

impl Error {
    /// See [`Outcome`]. The match has no wildcard on purpose: a new
    /// variant does not compile until someone decides what a client should
    /// make of it.
    pub fn outcome(&self) -> Outcome {
        match self {
            Error::Overflow
            | Error::InvalidInput { .. }
            | Error::InvalidConfig { .. }
            | Error::LimitExceeded(_)
            | Error::NotFound(_)
            | Error::Conflict(_)
            | Error::Corrupt { .. }
            | Error::Io { .. } => Outcome::Refused,
            Error::JournalFailed(_)
            | Error::ShuttingDown
            | Error::DurabilityUnavailable { .. }
            | Error::Fenced(_)
            | Error::StoreUnavailable(_) => Outcome::Unavailable,
            Error::Indeterminate(_) => Outcome::Unknown,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            cause: Arc::new(source),
        }
    }

    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidInput {
            what,
            reason: reason.into(),
        }
    }
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
