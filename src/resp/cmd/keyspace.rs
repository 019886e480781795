//! Reads of counters: `GET`, `MGET`, `EXISTS`, `DBSIZE`, and `TALLY.GET`
//! with a choice of where the other nodes' shards come from; and their
//! deletes, `DEL` and `GETDEL`.
//!
//! A counter's value is sent as Redis sends an integer stored in a string:
//! a bulk string of its decimal form, or nil for a counter never
//! incremented. These commands read the node's memory and change nothing.
//! On a node with a shared store values are global (this node's shard plus
//! the other nodes' from the cache), and `DBSIZE` counts the counters any
//! node holds.

use crate::Node;
use crate::node::Consistency;

use super::super::frame::Frame;
use super::super::parse::Args;
use super::super::reply::ReplyError;
use super::Command;

/// A read of the counter table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    Get(String),
    MGet(Vec<String>),
    /// How many of the names exist, a name given twice counting twice.
    Exists(Vec<String>),
    DbSize,
    /// `TALLY.GET name [CONSISTENCY cache|store]`: with `store`, the other
    /// nodes' shards are read from the store for this request, so the
    /// value includes every increment acknowledged anywhere before it.
    TallyGet(String, Consistency),
}

impl Read {
    /// Runs the read; `DBSIZE` on a node with a store scans the cache, so
    /// it runs on a blocking thread rather than hold up other connections.
    pub async fn run(self, node: &Node) -> Result<Frame, ReplyError> {
        if let Read::TallyGet(name, consistency) = self {
            // A store read blocks: not on a connection's thread.
            let node = node.clone();
            let detail = tokio::task::spawn_blocking(move || node.get_detail(&name, consistency))
                .await
                .map_err(|e| ReplyError::err(format_args!("reading the counter failed: {e}")))??;
            return Ok(detail.map_or(Frame::Null, |d| Frame::bulk_decimal(d.value)));
        }
        if self == Read::DbSize && node.config().cluster.is_some() {
            let node = node.clone();
            let count = tokio::task::spawn_blocking(move || node.counter_count())
                .await
                .map_err(|e| ReplyError::err(format_args!("counting counters failed: {e}")))?;
            return Ok(Frame::Integer(count as i64));
        }
        self.apply(node)
    }

    pub fn apply(self, node: &Node) -> Result<Frame, ReplyError> {
        let value = |name: &str| -> Result<Frame, ReplyError> {
            Ok(node.get(name)?.map_or(Frame::Null, Frame::bulk_decimal))
        };
        Ok(match self {
            Read::Get(name) => value(&name)?,
            Read::MGet(names) => Frame::Array(
                names
                    .iter()
                    .map(|n| value(n))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            Read::Exists(names) => {
                let mut found = 0;
                for name in &names {
                    if node.get(name)?.is_some() {
                        found += 1;
                    }
                }
                Frame::Integer(found)
            }
            Read::DbSize => Frame::Integer(node.counter_count() as i64),
            Read::TallyGet(name, _) => value(&name)?,
        })
    }
}

/// A delete of counters (see [`Node::delete`]): the counter is set to zero
/// for every node, durably, before the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delete {
    /// `DEL name [name ...]`: how many of the names held a value to erase.
    Del(Vec<String>),
    /// `GETDEL name`: the value erased, or nil if there was none.
    GetDel(String),
}

impl Delete {
    pub async fn run(self, node: &Node) -> Result<Frame, ReplyError> {
        match self {
            Delete::Del(names) => {
                let mut deleted = 0;
                for name in &names {
                    if node.delete(name).await?.is_some() {
                        deleted += 1;
                    }
                }
                Ok(Frame::Integer(deleted))
            }
            Delete::GetDel(name) => Ok(node
                .delete(&name)
                .await?
                .map_or(Frame::Null, Frame::bulk_decimal)),
        }
    }
}

pub fn parse_del(args: &mut Args) -> Result<Command, ReplyError> {
    Ok(Command::Delete(Delete::Del(args.rest_names()?)))
}

pub fn parse_getdel(args: &mut Args) -> Result<Command, ReplyError> {
    let name = args.next_name()?;
    args.finish()?;
    Ok(Command::Delete(Delete::GetDel(name)))
}

pub fn parse_get(args: &mut Args) -> Result<Command, ReplyError> {
    let name = args.next_name()?;
    args.finish()?;
    Ok(Command::Keyspace(Read::Get(name)))
}

pub fn parse_mget(args: &mut Args) -> Result<Command, ReplyError> {
    Ok(Command::Keyspace(Read::MGet(args.rest_names()?)))
}

pub fn parse_exists(args: &mut Args) -> Result<Command, ReplyError> {
    Ok(Command::Keyspace(Read::Exists(args.rest_names()?)))
}

pub fn parse_tally_get(args: &mut Args) -> Result<Command, ReplyError> {
    let name = args.next_name()?;
    let mut consistency = Consistency::Cache;
    if args.remaining() > 0 {
        let option = args.next_bytes()?;
        if !option.eq_ignore_ascii_case(b"CONSISTENCY") || args.remaining() != 1 {
            return Err(ReplyError::syntax());
        }
        let level = args.next_bytes()?;
        consistency = if level.eq_ignore_ascii_case(b"store") {
            Consistency::Store
        } else if level.eq_ignore_ascii_case(b"cache") {
            Consistency::Cache
        } else {
            return Err(ReplyError::err(
                "CONSISTENCY must be cache (this node's view) or store (read from the store)",
            ));
        };
    }
    args.finish()?;
    Ok(Command::Keyspace(Read::TallyGet(name, consistency)))
}

pub fn parse_dbsize(args: &mut Args) -> Result<Command, ReplyError> {
    args.finish()?;
    Ok(Command::Keyspace(Read::DbSize))
}
