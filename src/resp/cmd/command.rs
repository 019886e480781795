//! `COMMAND`, `COMMAND COUNT|INFO|DOCS|LIST`: the command table as Redis
//! clients read it.
//!
//! Entries have Redis 7's ten fields (name, arity, flags, first key, last
//! key, key step, ACL categories, tips, key specs, subcommands); the last
//! three are empty. `COMMAND DOCS` answers an empty map: `redis-cli` asks
//! for it to show hints and does without them.

use bytes::Bytes;

use super::super::frame::Frame;
use super::super::parse::Args;
use super::super::reply::ReplyError;
use super::{COMMANDS, Command, Spec, lookup};

/// A `COMMAND` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Introspect {
    /// Every command's entry.
    All,
    Count,
    /// The entries of the named commands (all when none is named); nil for
    /// an unknown name.
    Info(Vec<Bytes>),
    Docs,
    List,
}

pub fn parse_command(args: &mut Args) -> Result<Command, ReplyError> {
    if args.remaining() == 0 {
        return Ok(Command::Command(Introspect::All));
    }
    let sub = args.next_bytes()?;
    let is = |name: &str| sub.eq_ignore_ascii_case(name.as_bytes());
    let introspect = if is("COUNT") {
        args.enter("command|count");
        args.finish()?;
        Introspect::Count
    } else if is("INFO") {
        let mut names = Vec::with_capacity(args.remaining());
        while args.remaining() > 0 {
            names.push(args.next_bytes()?);
        }
        Introspect::Info(names)
    } else if is("DOCS") {
        Introspect::Docs
    } else if is("LIST") {
        // `FILTERBY` is not supported; refusing it beats a wrong list.
        if args.remaining() > 0 {
            return Err(ReplyError::syntax());
        }
        Introspect::List
    } else {
        return Err(ReplyError::unknown_subcommand("COMMAND", &sub));
    };
    Ok(Command::Command(introspect))
}

impl Introspect {
    pub fn apply(self) -> Result<Frame, ReplyError> {
        Ok(match self {
            Introspect::All => Frame::Array(COMMANDS.iter().map(entry).collect()),
            Introspect::Info(names) if names.is_empty() => {
                Frame::Array(COMMANDS.iter().map(entry).collect())
            }
            Introspect::Info(names) => Frame::Array(
                names
                    .iter()
                    .map(|n| lookup(n).map_or(Frame::Null, entry))
                    .collect(),
            ),
            Introspect::Count => Frame::Integer(COMMANDS.len() as i64),
            // A map, empty: tally ships no command docs.
            Introspect::Docs => Frame::Map(vec![]),
            Introspect::List => {
                Frame::Array(COMMANDS.iter().map(|s| Frame::bulk(s.name)).collect())
            }
        })
    }
}

fn entry(spec: &Spec) -> Frame {
    // Flags and categories are sets in RESP3, arrays in RESP2, as Redis
    // sends them.
    let statuses =
        |words: &[&str]| Frame::Set(words.iter().map(|w| Frame::Simple(w.to_string())).collect());
    let (first, last, step) = spec.keys;
    Frame::Array(vec![
        Frame::bulk(spec.name),
        Frame::Integer(spec.arity),
        statuses(spec.flags),
        Frame::Integer(first),
        Frame::Integer(last),
        Frame::Integer(step),
        statuses(spec.categories),
        Frame::Array(vec![]),
        Frame::Array(vec![]),
        Frame::Array(vec![]),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Frame {
        let frame = Frame::Array(
            args.iter()
                .map(|a| Frame::Bulk(Bytes::copy_from_slice(a.as_bytes())))
                .collect(),
        );
        match Command::from_frame(frame) {
            Ok(Command::Command(i)) => i.apply().unwrap(),
            Ok(other) => panic!("not COMMAND: {other:?}"),
            Err(e) => e.into_frame(),
        }
    }

    #[test]
    fn command_info_describes_incr_as_redis_does() {
        // Proves an entry has Redis's shape, and unknown names get nil.
        let Frame::Array(entries) = run(&["COMMAND", "INFO", "INCR", "nosuch"]) else {
            panic!("not an array")
        };
        assert_eq!(entries[1], Frame::Null);
        let Frame::Array(incr) = &entries[0] else {
            panic!("entry not an array")
        };
        assert_eq!(incr.len(), 10);
        assert_eq!(incr[0], Frame::bulk("incr"));
        assert_eq!(incr[1], Frame::Integer(2));
        assert_eq!(
            &incr[3..6],
            &[Frame::Integer(1), Frame::Integer(1), Frame::Integer(1)]
        );
    }

    #[test]
    fn count_matches_the_listed_commands() {
        // Proves COMMAND COUNT, COMMAND and COMMAND LIST agree.
        let Frame::Integer(count) = run(&["COMMAND", "COUNT"]) else {
            panic!("not an integer")
        };
        let Frame::Array(all) = run(&["COMMAND"]) else {
            panic!("not an array")
        };
        let Frame::Array(list) = run(&["command", "list"]) else {
            panic!("not an array")
        };
        assert_eq!(count as usize, all.len());
        assert_eq!(count as usize, list.len());
        assert!(list.contains(&Frame::bulk("tally.incrby")));
        assert_eq!(
            run(&["COMMAND", "foo"]),
            Frame::Error("ERR unknown subcommand 'foo'. Try COMMAND HELP.".into())
        );
    }
}
