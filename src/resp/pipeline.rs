//! Running one round of pipelined requests: in order, with the round's
//! increments sharing one journal sync, replies in request order.
//!
//! A client that pipelines sends many requests before reading a reply; the
//! connection hands this module every complete request it has buffered (up
//! to `resp_pipeline_depth_max`), and this module returns their replies.
//! Three properties hold:
//!
//! - **Order.** Requests run one after the other, in the order sent, so a
//!   `GET` sees the increments sent before it and two increments of one
//!   counter reply with consecutive values, as in Redis.
//! - **One sync per round.** Increments at `local` durability would each
//!   wait for an fsync. Instead, every such increment but the round's last
//!   is run at `memory` durability (applied and queued in the journal
//!   without waiting), and the last one, run at `local`, waits for a sync
//!   that covers every record queued before it: the journal is one
//!   sequence, and making a position durable makes everything before it
//!   durable. No reply is sent before that wait ends, so no client hears of
//!   an increment before it is as durable as it asked.
//! - **No false success.** If the last increment cannot cover the others
//!   (it was refused, say for overflow, before reaching the journal), a
//!   zero increment of a counter the round changed is made at `local` to
//!   cover them. If the covering sync fails, the increments that relied on
//!   it are answered `INDETERMINATE`, never `OK`.
//!
//! Requests at `memory` or `replicated` durability run as asked.

use crate::config::Durability;
use crate::error::Error;
use crate::node::IncrementOptions;

use super::cmd::{Command, Context};
use super::frame::Frame;
use super::reply::ReplyError;

/// Whether the connection goes on after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// The round ended with `QUIT`: close once the replies are sent.
    Quit,
}

/// Runs `frames` (drained) and appends one reply per request to `replies`.
///
/// Requests after a `QUIT` are not run, as Redis stops reading a client
/// that quits.
pub async fn run(frames: &mut Vec<Frame>, cx: &mut Context<'_>, replies: &mut Vec<Frame>) -> Flow {
    let mut commands: Vec<Result<Command, ReplyError>> =
        frames.drain(..).map(Command::from_frame).collect();
    let flow = match commands
        .iter()
        .position(|c| c.as_ref().is_ok_and(Command::is_quit))
    {
        Some(quit) => {
            commands.truncate(quit + 1);
            Flow::Quit
        }
        None => Flow::Continue,
    };
    cx.shared.stats.count_commands(commands.len());

    let node = cx.shared.node.clone();
    let default = node.config().durability;
    let wanted = |c: &Result<Command, ReplyError>| match c {
        Ok(Command::Increment(inc)) => Some(inc.durability.unwrap_or(default)),
        _ => None,
    };
    // The increment whose sync covers the round.
    let covering = commands
        .iter()
        .rposition(|c| wanted(c) == Some(Durability::Local));

    // Replies (by index in `replies`) of increments that rely on the
    // covering sync, and a counter one of them changed.
    let mut riders: Vec<usize> = Vec::new();
    let mut rider_name: Option<String> = None;
    let mut cover: Option<Result<(), Error>> = None;

    for (i, command) in commands.into_iter().enumerate() {
        let reply = match command {
            Err(e) => e.into_frame(),
            Ok(Command::Increment(inc)) => {
                let durability = inc.durability.unwrap_or(default);
                let rides = durability == Durability::Local && Some(i) != covering;
                let options = IncrementOptions {
                    durability: Some(if rides {
                        Durability::Memory
                    } else {
                        durability
                    }),
                    idempotency_key: inc.idempotency_key.as_deref(),
                };
                let result = node.increment(&inc.name, inc.delta, options).await;
                if Some(i) == covering {
                    cover = Some(result.as_ref().map(|_| ()).map_err(Error::clone));
                }
                match result {
                    Ok(outcome) => {
                        if rides {
                            riders.push(replies.len());
                            if !outcome.duplicate || rider_name.is_none() {
                                rider_name = Some(inc.name.clone());
                            }
                        }
                        inc.reply(outcome)
                    }
                    Err(e) => ReplyError::from(e).into_frame(),
                }
            }
            Ok(command) => command.apply(cx),
        };
        replies.push(reply);
    }

    if riders.is_empty() {
        return flow;
    }
    let covered = match cover {
        Some(Ok(())) => Ok(()),
        // Refused before reaching the journal: the journal is fine, but
        // nothing waited for it yet.
        Some(Err(
            Error::Overflow
            | Error::InvalidInput { .. }
            | Error::LimitExceeded(_)
            | Error::DurabilityUnavailable { .. },
        ))
        | None => {
            let name = rider_name.unwrap_or_default();
            let local = IncrementOptions {
                durability: Some(Durability::Local),
                idempotency_key: None,
            };
            node.increment(&name, 0, local).await.map(|_| ())
        }
        Some(Err(e)) => Err(e),
    };
    if let Err(e) = covered {
        tracing::debug!(error = %e, increments = riders.len(), "pipelined increments not confirmed durable");
        let uncertain = ReplyError::from(match e {
            Error::Indeterminate(reason) | Error::JournalFailed(reason) => {
                Error::Indeterminate(reason)
            }
            other => Error::Indeterminate(other.to_string().into()),
        })
        .into_frame();
        for i in riders {
            replies[i] = uncertain.clone();
        }
    }
    flow
}
