//! Error replies: the RESP error line for each way a command can fail, and
//! the prefix each library [`Error`] gets.
//!
//! The first word of a RESP error is its kind; clients branch on it. tally
//! uses Redis's words where Redis has them and two of its own where a
//! client must act differently:
//!
//! | prefix | errors | what the client should do |
//! | --- | --- | --- |
//! | `ERR` | bad arguments, [`Error::Overflow`], [`Error::InvalidInput`], [`Error::LimitExceeded`], and any other failure | fix the request; it was not applied |
//! | `UNAVAILABLE` | [`Error::JournalFailed`], [`Error::ShuttingDown`], [`Error::DurabilityUnavailable`] | not applied; retry later or on another node |
//! | `INDETERMINATE` | [`Error::Indeterminate`] | may or may not have been applied; retry with the same idempotency key |
//!
//! `NOPROTO` and `WRONGPASS` appear only where Redis sends them (`HELLO`,
//! `AUTH`).

use crate::error::{Error, Outcome};

use super::frame::Frame;

/// An error reply: the whole line after the `-`, prefix included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyError(String);

impl ReplyError {
    /// `-ERR <message>`
    pub fn err(message: impl std::fmt::Display) -> Self {
        ReplyError(format!("ERR {message}"))
    }

    /// An error with its own prefix, for example `NOPROTO ...`.
    pub fn raw(line: impl Into<String>) -> Self {
        ReplyError(line.into())
    }

    /// Redis's arity error; `command` is the lowercase name, `client|setname`
    /// for a subcommand.
    pub fn wrong_arity(command: &str) -> Self {
        ReplyError::err(format_args!(
            "wrong number of arguments for '{command}' command"
        ))
    }

    /// Redis's error for an argument that must be a 64-bit integer.
    pub fn not_integer() -> Self {
        ReplyError::err("value is not an integer or out of range")
    }

    /// Redis's error for an unknown option or misplaced argument.
    pub fn syntax() -> Self {
        ReplyError::err("syntax error")
    }

    /// Redis's error for an unknown subcommand of `command` (uppercase).
    pub fn unknown_subcommand(command: &str, sub: &[u8]) -> Self {
        ReplyError::err(format_args!(
            "unknown subcommand '{}'. Try {command} HELP.",
            printable(sub, NAME_ECHO_BYTES_MAX)
        ))
    }

    /// The error line, without the leading `-`.
    pub fn line(&self) -> &str {
        &self.0
    }

    pub fn into_frame(self) -> Frame {
        Frame::Error(self.0)
    }
}

/// Longest piece of a client's own bytes echoed back in an error (a
/// command name or argument), as Redis caps them: an error reply must stay
/// short whatever the client sent.
pub const NAME_ECHO_BYTES_MAX: usize = 128;

/// Client bytes made fit for an error line: at most `max` bytes, invalid
/// UTF-8 shown as U+FFFD. CR and LF are blanked when the frame is encoded.
pub fn printable(bytes: &[u8], max: usize) -> String {
    let cut = &bytes[..bytes.len().min(max)];
    String::from_utf8_lossy(cut).into_owned()
}

impl From<Error> for ReplyError {
    fn from(e: Error) -> Self {
        let prefix = match e.outcome() {
            Outcome::Refused => "ERR",
            Outcome::Unavailable => "UNAVAILABLE",
            Outcome::Unknown => "INDETERMINATE",
        };
        ReplyError(format!("{prefix} {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn each_library_error_gets_the_documented_prefix() {
        // Proves the prefix table in the module docs is what clients receive.
        let cases = [
            (Error::Overflow, "ERR increment or decrement would overflow"),
            (
                Error::InvalidInput {
                    what: "counter name",
                    reason: "it is empty".into(),
                },
                "ERR counter name is invalid: it is empty",
            ),
            (
                Error::LimitExceeded("too many counters".into()),
                "ERR too many counters",
            ),
            (
                Error::JournalFailed(Arc::from("disk gone")),
                "UNAVAILABLE journal failed, writes are refused until the node restarts: disk gone",
            ),
            (Error::ShuttingDown, "UNAVAILABLE node is shutting down"),
            (
                Error::DurabilityUnavailable {
                    level: "replicated",
                    reason: "no store".into(),
                },
                "UNAVAILABLE durability 'replicated' is not available: no store",
            ),
            (
                Error::Indeterminate(Arc::from("EIO")),
                "INDETERMINATE outcome unknown: the increment was written but its fsync failed (EIO); retry with the same idempotency key",
            ),
        ];
        for (error, line) in cases {
            assert_eq!(ReplyError::from(error).line(), line);
        }
    }

    #[test]
    fn echoed_client_bytes_are_capped() {
        // Proves an error never echoes more than the cap of a client's bytes.
        let long = vec![b'x'; 1000];
        assert_eq!(
            printable(&long, NAME_ECHO_BYTES_MAX).len(),
            NAME_ECHO_BYTES_MAX
        );
        assert_eq!(printable(b"a\xffb", 10), "a\u{fffd}b");
    }
}
