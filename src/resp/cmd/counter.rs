//! The increment commands: Redis's `INCR`, `INCRBY`, `DECR`, `DECRBY`, and
//! tally's own `TALLY.INCRBY`, which adds an idempotency key and a
//! per-request durability level.
//!
//! ```text
//! TALLY.INCRBY key delta [IDEMPOTENCY idkey] [DURABILITY memory|local|replicated]
//! ```
//!
//! Options come in any order and any case. The reply is an array of two
//! integers: the counter's value after the request and `1` if the key had
//! been seen (nothing applied, the value is the current one) or `0`.
//!
//! This module parses the requests and shapes their replies; the pipeline
//! runs them against the node.

use crate::config::Durability;
use crate::node::{Consistency, IncrementOutcome};

use super::super::frame::Frame;
use super::super::parse::Args;
use super::super::reply::ReplyError;
use super::Command;

/// One increment request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Increment {
    pub name: String,
    pub delta: i64,
    pub idempotency_key: Option<String>,
    /// The level asked for; the node's default when `None`.
    pub durability: Option<Durability>,
    /// `store`: the reply's value is read from the store after the
    /// increment (`TALLY.INCRBY ... CONSISTENCY store`).
    pub consistency: Consistency,
    pub reply: ReplyShape,
}

/// How an increment's outcome is written back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyShape {
    /// `:value`, as Redis's `INCR` family answers.
    Value,
    /// `*2 :value :duplicate`, as `TALLY.INCRBY` answers.
    ValueAndDuplicate,
}

impl Increment {
    fn plain(name: String, delta: i64) -> Command {
        Command::Increment(Increment {
            name,
            delta,
            idempotency_key: None,
            durability: None,
            consistency: Consistency::Cache,
            reply: ReplyShape::Value,
        })
    }

    /// The reply for a successful outcome.
    pub fn reply(&self, outcome: IncrementOutcome) -> Frame {
        match self.reply {
            ReplyShape::Value => Frame::Integer(outcome.value),
            ReplyShape::ValueAndDuplicate => Frame::Array(vec![
                Frame::Integer(outcome.value),
                Frame::Integer(i64::from(outcome.duplicate)),
            ]),
        }
    }
}

pub fn parse_incr(args: &mut Args) -> Result<Command, ReplyError> {
    let name = args.next_name()?;
    args.finish()?;
    Ok(Increment::plain(name, 1))
}

pub fn parse_decr(args: &mut Args) -> Result<Command, ReplyError> {
    let name = args.next_name()?;
    args.finish()?;
    Ok(Increment::plain(name, -1))
}

pub fn parse_incrby(args: &mut Args) -> Result<Command, ReplyError> {
    let name = args.next_name()?;
    let delta = args.next_i64()?;
    args.finish()?;
    Ok(Increment::plain(name, delta))
}

pub fn parse_decrby(args: &mut Args) -> Result<Command, ReplyError> {
    let name = args.next_name()?;
    let delta = args.next_i64()?;
    args.finish()?;
    // -i64::MIN does not exist; Redis refuses it with these words.
    let delta = delta
        .checked_neg()
        .ok_or_else(|| ReplyError::err("decrement would overflow"))?;
    Ok(Increment::plain(name, delta))
}

pub fn parse_tally_incrby(args: &mut Args) -> Result<Command, ReplyError> {
    let name = args.next_name()?;
    let delta = args.next_i64()?;
    let mut idempotency_key = None;
    let mut durability = None;
    let mut consistency = None;
    while args.remaining() > 0 {
        let option = args.next_bytes()?;
        // Every option takes a value; one given twice is as ambiguous as an
        // unknown one.
        if args.remaining() == 0 {
            return Err(ReplyError::syntax());
        }
        if option.eq_ignore_ascii_case(b"IDEMPOTENCY") && idempotency_key.is_none() {
            idempotency_key = Some(args.next_idempotency_key()?);
        } else if option.eq_ignore_ascii_case(b"DURABILITY") && durability.is_none() {
            let level = args.next_bytes()?;
            let level = std::str::from_utf8(&level).unwrap_or("\u{fffd}");
            durability = Some(level.parse::<Durability>()?);
        } else if option.eq_ignore_ascii_case(b"CONSISTENCY") && consistency.is_none() {
            let c = args.next_bytes()?;
            consistency = Some(if c.eq_ignore_ascii_case(b"store") {
                Consistency::Store
            } else if c.eq_ignore_ascii_case(b"cache") {
                Consistency::Cache
            } else {
                return Err(ReplyError::err(
                    "CONSISTENCY must be cache (this node's view) or store (read from the store \
                     after the increment)",
                ));
            });
        } else {
            return Err(ReplyError::syntax());
        }
    }
    Ok(Command::Increment(Increment {
        name,
        delta,
        idempotency_key,
        durability,
        consistency: consistency.unwrap_or(Consistency::Cache),
        reply: ReplyShape::ValueAndDuplicate,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn parse(args: &[&str]) -> Result<Increment, String> {
        let frame = Frame::Array(
            args.iter()
                .map(|a| Frame::Bulk(Bytes::copy_from_slice(a.as_bytes())))
                .collect(),
        );
        match Command::from_frame(frame) {
            Ok(Command::Increment(inc)) => Ok(inc),
            Ok(other) => panic!("not an increment: {other:?}"),
            Err(e) => Err(e.line().to_string()),
        }
    }

    #[test]
    fn redis_increments_carry_the_right_delta() {
        // Proves each Redis increment command maps to the delta Redis applies.
        assert_eq!(parse(&["INCR", "a"]).unwrap().delta, 1);
        assert_eq!(parse(&["DECR", "a"]).unwrap().delta, -1);
        assert_eq!(parse(&["INCRBY", "a", "-7"]).unwrap().delta, -7);
        assert_eq!(parse(&["DECRBY", "a", "7"]).unwrap().delta, -7);
        assert_eq!(
            parse(&["DECRBY", "a", "-9223372036854775807"])
                .unwrap()
                .delta,
            i64::MAX
        );
    }

    #[test]
    fn bad_deltas_get_redis_errors() {
        // Proves non-integers and the unnegatable i64::MIN are refused as Redis refuses them.
        for delta in ["abc", "1.5", "", "+1", "9223372036854775808"] {
            assert_eq!(
                parse(&["INCRBY", "a", delta]).unwrap_err(),
                "ERR value is not an integer or out of range"
            );
        }
        assert_eq!(
            parse(&["DECRBY", "a", "-9223372036854775808"]).unwrap_err(),
            "ERR decrement would overflow"
        );
    }

    #[test]
    fn tally_incrby_options_come_in_any_order_and_case() {
        // Proves options are recognised regardless of order and case.
        let a = parse(&[
            "tally.incrby",
            "a",
            "5",
            "durability",
            "MEMORY",
            "Idempotency",
            "req-1",
        ])
        .unwrap();
        let b = parse(&[
            "TALLY.INCRBY",
            "a",
            "5",
            "IDEMPOTENCY",
            "req-1",
            "DURABILITY",
            "memory",
        ])
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.idempotency_key.as_deref(), Some("req-1"));
        assert_eq!(a.durability, Some(Durability::Memory));
        let plain = parse(&["TALLY.INCRBY", "a", "5"]).unwrap();
        assert_eq!((plain.idempotency_key, plain.durability), (None, None));
    }

    #[test]
    fn tally_incrby_refuses_malformed_options() {
        // Proves unknown, repeated, valueless and invalid options are errors.
        let syntax = "ERR syntax error";
        assert_eq!(
            parse(&["TALLY.INCRBY", "a", "1", "FOO", "x"]).unwrap_err(),
            syntax
        );
        assert_eq!(
            parse(&["TALLY.INCRBY", "a", "1", "IDEMPOTENCY"]).unwrap_err(),
            syntax
        );
        assert_eq!(
            parse(&[
                "TALLY.INCRBY",
                "a",
                "1",
                "DURABILITY",
                "local",
                "DURABILITY",
                "local"
            ])
            .unwrap_err(),
            syntax
        );
        assert_eq!(
            parse(&["TALLY.INCRBY", "a", "1", "DURABILITY", "disk"]).unwrap_err(),
            "ERR durability is invalid: 'disk' is not one of memory, local, replicated"
        );
        assert_eq!(
            parse(&["TALLY.INCRBY", "a", "1", "IDEMPOTENCY", ""]).unwrap_err(),
            "ERR idempotency key is invalid: it is empty"
        );
        assert_eq!(
            parse(&["TALLY.INCRBY", "a"]).unwrap_err(),
            "ERR wrong number of arguments for 'tally.incrby' command"
        );
    }
}
