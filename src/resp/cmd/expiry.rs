//! Counters' expiries, as Redis spells them: `EXPIRE`, `PEXPIRE`,
//! `EXPIREAT`, `PEXPIREAT` (with one of `NX`, `XX`, `GT`, `LT`),
//! `PERSIST`, `TTL`, `PTTL`, `EXPIRETIME` and `PEXPIRETIME`.
//!
//! At its expiry a counter is deleted as by `DEL` (see [`Node::expire`]):
//! it then reads 0, as every deleted counter does, and has no expiry. An
//! expiry at or before now deletes the counter at once, as in Redis.

use crate::Node;
use crate::engine::deadlines::ExpireIf;
use crate::engine::idempotency::now_ms;

use super::super::frame::Frame;
use super::super::parse::Args;
use super::super::reply::ReplyError;
use super::Command;

/// A command on a counter's expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expiry {
    /// Sets the expiry to the unix time `at_ms`; replies 1 if set (or, for
    /// a time already past, if the counter was deleted), 0 if the counter
    /// does not exist or `when` refused.
    Set {
        name: String,
        at_ms: i64,
        when: ExpireIf,
    },
    /// Clears the expiry; 1 if there was one.
    Persist(String),
    /// What is left: -2 without the counter, -1 without an expiry.
    Ttl { name: String, millis: bool },
    /// The unix time of the expiry: -2 without the counter, -1 without one.
    ExpireTime { name: String, millis: bool },
}

impl Expiry {
    /// Whether the command changes anything (it needs the `write` role).
    pub fn writes(&self) -> bool {
        matches!(self, Expiry::Set { .. } | Expiry::Persist(_))
    }

    pub async fn run(self, node: &Node) -> Result<Frame, ReplyError> {
        let flag = |b: Option<bool>| Frame::Integer(i64::from(b == Some(true)));
        match self {
            Expiry::Set { name, at_ms, when } => {
                // A time at or before now (zero and negative ones too)
                // deletes the counter now.
                let at = u64::try_from(at_ms).unwrap_or(0).max(1);
                Ok(flag(node.expire(&name, Some(at), when).await?))
            }
            Expiry::Persist(name) => Ok(flag(node.expire(&name, None, ExpireIf::Always).await?)),
            Expiry::Ttl { name, millis } => Ok(Frame::Integer(match node.expiry(&name).await? {
                None => -2,
                Some(None) => -1,
                Some(Some(at)) => {
                    let left = at.saturating_sub(now_ms());
                    let left = if millis { left } else { (left + 500) / 1000 };
                    i64::try_from(left).unwrap_or(i64::MAX)
                }
            })),
            Expiry::ExpireTime { name, millis } => {
                Ok(Frame::Integer(match node.expiry(&name).await? {
                    None => -2,
                    Some(None) => -1,
                    Some(Some(at)) => {
                        let at = if millis { at } else { at / 1000 };
                        i64::try_from(at).unwrap_or(i64::MAX)
                    }
                }))
            }
        }
    }
}

/// How a time argument is read.
#[derive(Clone, Copy)]
enum Unit {
    /// Seconds from now (`EXPIRE`).
    Seconds,
    /// Milliseconds from now (`PEXPIRE`).
    Millis,
    /// A unix time in seconds (`EXPIREAT`).
    AtSeconds,
    /// A unix time in milliseconds (`PEXPIREAT`).
    AtMillis,
}

fn parse_set(args: &mut Args, unit: Unit, command: &str) -> Result<Command, ReplyError> {
    let name = args.next_name()?;
    let n = args.next_i64()?;
    let mut when = ExpireIf::Always;
    while args.remaining() > 0 {
        let option = args.next_bytes()?;
        let given = [
            ("NX", ExpireIf::NoExpiry),
            ("XX", ExpireIf::HasExpiry),
            ("GT", ExpireIf::Later),
            ("LT", ExpireIf::Earlier),
        ]
        .into_iter()
        .find(|(o, _)| option.eq_ignore_ascii_case(o.as_bytes()))
        .map(|(_, w)| w)
        .ok_or_else(|| {
            ReplyError::err(format_args!(
                "Unsupported option {}",
                String::from_utf8_lossy(&option)
            ))
        })?;
        if when != ExpireIf::Always && when != given {
            return Err(ReplyError::err(
                "NX, XX, GT and LT options at the same time are not compatible (tally takes one)",
            ));
        }
        when = given;
    }
    let invalid = || ReplyError::err(format_args!("invalid expire time in '{command}' command"));
    let at_ms = match unit {
        Unit::Seconds => n
            .checked_mul(1000)
            .and_then(|ms| ms.checked_add(now_ms() as i64)),
        Unit::Millis => n.checked_add(now_ms() as i64),
        Unit::AtSeconds => n.checked_mul(1000),
        Unit::AtMillis => Some(n),
    }
    .ok_or_else(invalid)?;
    Ok(Command::Expiry(Expiry::Set { name, at_ms, when }))
}

pub fn parse_expire(args: &mut Args) -> Result<Command, ReplyError> {
    parse_set(args, Unit::Seconds, "expire")
}

pub fn parse_pexpire(args: &mut Args) -> Result<Command, ReplyError> {
    parse_set(args, Unit::Millis, "pexpire")
}

pub fn parse_expireat(args: &mut Args) -> Result<Command, ReplyError> {
    parse_set(args, Unit::AtSeconds, "expireat")
}

pub fn parse_pexpireat(args: &mut Args) -> Result<Command, ReplyError> {
    parse_set(args, Unit::AtMillis, "pexpireat")
}

fn one_name(args: &mut Args) -> Result<String, ReplyError> {
    let name = args.next_name()?;
    args.finish()?;
    Ok(name)
}

pub fn parse_persist(args: &mut Args) -> Result<Command, ReplyError> {
    Ok(Command::Expiry(Expiry::Persist(one_name(args)?)))
}

pub fn parse_ttl(args: &mut Args) -> Result<Command, ReplyError> {
    let name = one_name(args)?;
    Ok(Command::Expiry(Expiry::Ttl {
        name,
        millis: false,
    }))
}

pub fn parse_pttl(args: &mut Args) -> Result<Command, ReplyError> {
    let name = one_name(args)?;
    Ok(Command::Expiry(Expiry::Ttl { name, millis: true }))
}

pub fn parse_expiretime(args: &mut Args) -> Result<Command, ReplyError> {
    let name = one_name(args)?;
    Ok(Command::Expiry(Expiry::ExpireTime {
        name,
        millis: false,
    }))
}

pub fn parse_pexpiretime(args: &mut Args) -> Result<Command, ReplyError> {
    let name = one_name(args)?;
    Ok(Command::Expiry(Expiry::ExpireTime { name, millis: true }))
}
