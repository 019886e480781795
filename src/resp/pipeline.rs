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
//!   wait for an fsync. Instead, each is run at `memory` durability
//!   (applied and queued in the journal without waiting), and after the
//!   round [`Node::sync`](crate::Node::sync) waits once for a sync that
//!   covers every record queued so far. No reply is sent before that wait
//!   ends, so no client hears of an increment before it is as durable as it
//!   asked.
//! - **No false success.** If the covering sync fails, the increments that
//!   relied on it are answered `INDETERMINATE`, never with a value.
//!
//! Requests at `memory` or `replicated` durability run as asked.

use crate::config::Durability;
use crate::error::Error;
use crate::metrics::FrontEnd;
use crate::node::IncrementOptions;

use super::cmd::{Command, Context, command_name};
use super::frame::{Frame, Protocol};
use super::reply::ReplyError;

/// Whether the connection goes on after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// The round ended with `QUIT`: close once the replies are sent.
    Quit,
}

/// Runs `frames` (drained) and appends one reply per request to `replies`,
/// each with the protocol to write it in: the connection's protocol once
/// its request has run (`HELLO 3` is itself answered in RESP3, and the
/// requests after it in the same round too).
///
/// Requests after a `QUIT` are not run, as Redis stops reading a client
/// that quits.
pub async fn run(
    frames: &mut Vec<Frame>,
    cx: &mut Context<'_>,
    replies: &mut Vec<(Frame, Protocol)>,
) -> Flow {
    // The name is looked up again only for NOPERM, on a node with users;
    // without users no increment pays for a second lookup.
    let users = cx.shared.config.users.enabled();
    let mut commands: Vec<(&'static str, Result<Command, ReplyError>)> = frames
        .drain(..)
        .map(|f| {
            (
                if users { command_name(&f) } else { "" },
                Command::from_frame(f),
            )
        })
        .collect();
    let flow = match commands
        .iter()
        .position(|(_, c)| c.as_ref().is_ok_and(Command::is_quit))
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
    // Latency is measured from the round's start: what a client waits for
    // a reply once the server has its request.
    let round_start = std::time::Instant::now();
    let latency = &node.metrics().increment_latency;
    // Replies (by index in `replies`) of increments that wait for the
    // round's sync.
    let mut riders: Vec<usize> = Vec::new();
    for (name, command) in commands {
        // Refused before it runs: nothing is applied.
        let command = command.and_then(|c| {
            c.check_access(name, cx.session, cx.shared)?;
            Ok(c)
        });
        let reply = match command {
            Err(e) => e.into_frame(),
            Ok(Command::Increment(inc)) => {
                let durability = inc.durability.unwrap_or(default);
                let rides = durability == Durability::Local;
                let options = IncrementOptions {
                    durability: Some(if rides {
                        Durability::Memory
                    } else {
                        durability
                    }),
                    idempotency_key: inc.idempotency_key.as_deref(),
                };
                let mut result = node.increment(&inc.name, inc.delta, options).await;
                if inc.consistency == crate::node::Consistency::Store
                    && let Ok(outcome) = &mut result
                {
                    outcome.value = node.value_after(&inc.name, outcome.value).await;
                }
                if !(rides && result.is_ok()) {
                    latency.observe(FrontEnd::Resp, durability, round_start.elapsed(), 1);
                }
                match result {
                    Ok(outcome) => {
                        if rides {
                            riders.push(replies.len());
                        }
                        inc.reply(outcome)
                    }
                    Err(e) => ReplyError::from(e).into_frame(),
                }
            }
            Ok(command) => command.apply(cx).await,
        };
        if let Some(pause) = cx.session.take_delay() {
            node.metrics()
                .auth_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(pause).await;
        }
        replies.push((reply, cx.session.protocol));
    }
    if riders.is_empty() {
        return flow;
    }
    let synced = node.sync().await;
    latency.observe(
        FrontEnd::Resp,
        Durability::Local,
        round_start.elapsed(),
        riders.len() as u64,
    );
    if let Err(e) = synced {
        tracing::debug!(error = %e, increments = riders.len(), "pipelined increments not confirmed durable");
        let uncertain = ReplyError::from(match e {
            Error::Indeterminate(reason) | Error::JournalFailed(reason) => {
                Error::Indeterminate(reason)
            }
            other => Error::Indeterminate(other.to_string().into()),
        })
        .into_frame();
        for i in riders {
            replies[i].0 = uncertain.clone();
        }
    }
    flow
}
