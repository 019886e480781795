//! Commands: the table of every command the server knows, and the step
//! from a request frame to a typed [`Command`].
//!
//! The table ([`COMMANDS`]) is the single description of a command: its
//! name, its arity (checked here, before any command-specific parsing, the
//! way Redis checks it), the flags and key positions `COMMAND` reports, and
//! the function that parses its arguments. Each family lives in its own
//! module: [`counter`] (the increments), [`keyspace`] (reads of counters),
//! [`session`] (the connection's own state), [`info`], [`command`] and
//! [`config`] (introspection).
//!
//! Parsing never touches the node; running a command is done by the
//! pipeline, which needs to see every increment of a round before it runs
//! any of them.

pub mod command;
pub mod config;
pub mod counter;
pub mod expiry;
pub mod info;
pub mod keyspace;
pub mod session;

use bytes::Bytes;

use super::frame::Frame;
use super::parse::Args;
use super::reply::{NAME_ECHO_BYTES_MAX, ReplyError, printable};
use super::server::Shared;
use crate::auth::Role;

pub use session::Session;

/// A parsed request.
#[derive(Debug)]
pub enum Command {
    /// Changes a counter; run by the pipeline, which groups increments.
    Increment(counter::Increment),
    /// Reads counters.
    Keyspace(keyspace::Read),
    /// Deletes counters.
    Delete(keyspace::Delete),
    /// Sets, clears or reads counters' expiries.
    Expiry(expiry::Expiry),
    /// Reads or changes the connection's own state.
    Session(session::SessionCommand),
    Info(info::Info),
    Command(command::Introspect),
    Config(config::ConfigCommand),
}

/// What a command may use while it runs.
pub struct Context<'a> {
    pub session: &'a mut Session,
    pub shared: &'a Shared,
}

impl Command {
    /// Parses a request: finds the command, checks its arity, parses its
    /// arguments. Every failure is the error reply the client gets.
    pub fn from_frame(frame: Frame) -> Result<Command, ReplyError> {
        let Frame::Array(parts) = frame else {
            return Err(ReplyError::err("Protocol error: expected an array"));
        };
        let mut parts = parts.into_iter();
        let name = match parts.next() {
            Some(Frame::Bulk(name)) => name,
            _ => return Err(ReplyError::err("Protocol error: expected a command name")),
        };
        let Some(spec) = lookup(&name) else {
            let args: Vec<Bytes> = parts
                .filter_map(|f| match f {
                    Frame::Bulk(b) => Some(b),
                    _ => None,
                })
                .collect();
            return Err(unknown_command(&name, &args));
        };
        if !arity_ok(spec.arity, parts.len() + 1) {
            return Err(ReplyError::wrong_arity(spec.name));
        }
        let mut args = Args::new(spec.name, parts);
        (spec.parse)(&mut args)
    }

    /// The least role that may run this command, or `None` for the
    /// commands a client may send before it authenticates (`AUTH`,
    /// `HELLO`, `QUIT`, `RESET`, as in Redis).
    pub fn role(&self) -> Option<Role> {
        use session::SessionCommand as S;
        match self {
            Command::Increment(_) | Command::Delete(_) => Some(Role::Write),
            Command::Expiry(e) if e.writes() => Some(Role::Write),
            Command::Expiry(_) => Some(Role::Read),
            Command::Session(S::Auth(_) | S::Hello { .. } | S::Quit | S::Reset) => None,
            Command::Keyspace(_)
            | Command::Session(_)
            | Command::Info(_)
            | Command::Command(_)
            | Command::Config(_) => Some(Role::Read),
        }
    }

    /// Whether the connection may run this command, named `name`: with
    /// users, only after authenticating (`NOAUTH`), and only with a role
    /// that allows it (`NOPERM`, in Redis 7.0's words).
    pub fn check_access(
        &self,
        name: &str,
        session: &Session,
        shared: &Shared,
    ) -> Result<(), ReplyError> {
        if !shared.config.users.enabled() {
            return Ok(());
        }
        let Some(needed) = self.role() else {
            return Ok(());
        };
        match &session.identity {
            None => Err(ReplyError::raw("NOAUTH Authentication required.")),
            Some(identity) if identity.role < needed => Err(ReplyError::raw(format!(
                "NOPERM this user has no permissions to run the '{name}' command"
            ))),
            Some(_) => Ok(()),
        }
    }

    /// Whether this is `QUIT`: the connection closes after its reply.
    pub fn is_quit(&self) -> bool {
        matches!(self, Command::Session(session::SessionCommand::Quit))
    }

    /// Runs a command that is not an increment. Async because a few
    /// commands (`INFO cluster`, `DBSIZE` on a node with a store) read the
    /// store or scan the cache, which they do on a blocking thread.
    pub async fn apply(self, cx: &mut Context<'_>) -> Frame {
        let result = match self {
            Command::Increment(_) => Err(ReplyError::err(
                "increments are run by the pipeline, not one by one",
            )),
            Command::Keyspace(read) => read.run(&cx.shared.node).await,
            Command::Delete(delete) => delete.run(&cx.shared.node).await,
            Command::Expiry(expiry) => expiry.run(&cx.shared.node).await,
            Command::Session(cmd) => cmd.apply(cx),
            Command::Info(info) => Ok(info.run(cx.shared).await),
            Command::Command(introspect) => introspect.apply(),
            Command::Config(config) => config.apply(cx.shared),
        };
        result.unwrap_or_else(ReplyError::into_frame)
    }
}

/// The lowercase name of the command a request frame names, if the
/// server knows it (for `NOPERM`).
pub fn command_name(frame: &Frame) -> &'static str {
    match frame {
        Frame::Array(parts) => match parts.first() {
            Some(Frame::Bulk(name)) => lookup(name).map_or("", |spec| spec.name),
            _ => "",
        },
        _ => "",
    }
}

/// One command as the server knows it.
pub struct Spec {
    /// Lowercase name, as `COMMAND` and error messages show it.
    pub name: &'static str,
    /// Arguments including the name: `n` means exactly `n`, `-n` at least `n`.
    pub arity: i64,
    /// Redis command flags, for `COMMAND`.
    pub flags: &'static [&'static str],
    /// Redis ACL categories, for `COMMAND`.
    pub categories: &'static [&'static str],
    /// First key argument, last key argument (`-1`: the last argument) and
    /// step, for `COMMAND`; all zero when the command takes no key.
    pub keys: (i64, i64, i64),
    parse: fn(&mut Args) -> Result<Command, ReplyError>,
}

const WRITE: &[&str] = &["write", "denyoom", "fast"];
const READ: &[&str] = &["readonly", "fast"];
const CONN: &[&str] = &["noscript", "loading", "stale", "fast"];
const ADMIN: &[&str] = &["loading", "stale"];
const ONE_KEY: (i64, i64, i64) = (1, 1, 1);
const ALL_KEYS: (i64, i64, i64) = (1, -1, 1);
const NO_KEY: (i64, i64, i64) = (0, 0, 0);

/// Every command the server answers.
pub const COMMANDS: &[Spec] = &[
    Spec {
        name: "incr",
        arity: 2,
        flags: WRITE,
        categories: &["@write", "@string", "@fast"],
        keys: ONE_KEY,
        parse: counter::parse_incr,
    },
    Spec {
        name: "incrby",
        arity: 3,
        flags: WRITE,
        categories: &["@write", "@string", "@fast"],
        keys: ONE_KEY,
        parse: counter::parse_incrby,
    },
    Spec {
        name: "decr",
        arity: 2,
        flags: WRITE,
        categories: &["@write", "@string", "@fast"],
        keys: ONE_KEY,
        parse: counter::parse_decr,
    },
    Spec {
        name: "decrby",
        arity: 3,
        flags: WRITE,
        categories: &["@write", "@string", "@fast"],
        keys: ONE_KEY,
        parse: counter::parse_decrby,
    },
    Spec {
        name: "tally.incrby",
        arity: -3,
        flags: WRITE,
        categories: &["@write", "@fast"],
        keys: ONE_KEY,
        parse: counter::parse_tally_incrby,
    },
    Spec {
        name: "get",
        arity: 2,
        flags: READ,
        categories: &["@read", "@string", "@fast"],
        keys: ONE_KEY,
        parse: keyspace::parse_get,
    },
    Spec {
        name: "tally.get",
        arity: -2,
        flags: READ,
        categories: &["@read", "@fast"],
        keys: ONE_KEY,
        parse: keyspace::parse_tally_get,
    },
    Spec {
        name: "mget",
        arity: -2,
        flags: READ,
        categories: &["@read", "@string", "@fast"],
        keys: ALL_KEYS,
        parse: keyspace::parse_mget,
    },
    Spec {
        name: "exists",
        arity: -2,
        flags: READ,
        categories: &["@keyspace", "@read", "@fast"],
        keys: ALL_KEYS,
        parse: keyspace::parse_exists,
    },
    Spec {
        name: "del",
        arity: -2,
        flags: &["write"],
        categories: &["@keyspace", "@write", "@slow"],
        keys: ALL_KEYS,
        parse: keyspace::parse_del,
    },
    Spec {
        name: "getdel",
        arity: 2,
        flags: &["write", "fast"],
        categories: &["@write", "@string", "@fast"],
        keys: ONE_KEY,
        parse: keyspace::parse_getdel,
    },
    Spec {
        name: "expire",
        arity: -3,
        flags: &["write", "fast"],
        categories: &["@keyspace", "@write", "@fast"],
        keys: ONE_KEY,
        parse: expiry::parse_expire,
    },
    Spec {
        name: "pexpire",
        arity: -3,
        flags: &["write", "fast"],
        categories: &["@keyspace", "@write", "@fast"],
        keys: ONE_KEY,
        parse: expiry::parse_pexpire,
    },
    Spec {
        name: "expireat",
        arity: -3,
        flags: &["write", "fast"],
        categories: &["@keyspace", "@write", "@fast"],
        keys: ONE_KEY,
        parse: expiry::parse_expireat,
    },
    Spec {
        name: "pexpireat",
        arity: -3,
        flags: &["write", "fast"],
        categories: &["@keyspace", "@write", "@fast"],
        keys: ONE_KEY,
        parse: expiry::parse_pexpireat,
    },
    Spec {
        name: "persist",
        arity: 2,
        flags: &["write", "fast"],
        categories: &["@keyspace", "@write", "@fast"],
        keys: ONE_KEY,
        parse: expiry::parse_persist,
    },
    Spec {
        name: "ttl",
        arity: 2,
        flags: READ,
        categories: &["@keyspace", "@read", "@fast"],
        keys: ONE_KEY,
        parse: expiry::parse_ttl,
    },
    Spec {
        name: "pttl",
        arity: 2,
        flags: READ,
        categories: &["@keyspace", "@read", "@fast"],
        keys: ONE_KEY,
        parse: expiry::parse_pttl,
    },
    Spec {
        name: "expiretime",
        arity: 2,
        flags: READ,
        categories: &["@keyspace", "@read", "@fast"],
        keys: ONE_KEY,
        parse: expiry::parse_expiretime,
    },
    Spec {
        name: "pexpiretime",
        arity: 2,
        flags: READ,
        categories: &["@keyspace", "@read", "@fast"],
        keys: ONE_KEY,
        parse: expiry::parse_pexpiretime,
    },
    Spec {
        name: "dbsize",
        arity: 1,
        flags: READ,
        categories: &["@keyspace", "@read", "@fast"],
        keys: NO_KEY,
        parse: keyspace::parse_dbsize,
    },
    Spec {
        name: "ping",
        arity: -1,
        flags: &["fast"],
        categories: &["@fast", "@connection"],
        keys: NO_KEY,
        parse: session::parse_ping,
    },
    Spec {
        name: "echo",
        arity: 2,
        flags: &["fast"],
        categories: &["@fast", "@connection"],
        keys: NO_KEY,
        parse: session::parse_echo,
    },
    Spec {
        name: "select",
        arity: 2,
        flags: CONN,
        categories: &["@fast", "@connection"],
        keys: NO_KEY,
        parse: session::parse_select,
    },
    Spec {
        name: "hello",
        arity: -1,
        flags: CONN,
        categories: &["@fast", "@connection"],
        keys: NO_KEY,
        parse: session::parse_hello,
    },
    Spec {
        name: "auth",
        arity: -2,
        flags: CONN,
        categories: &["@fast", "@connection"],
        keys: NO_KEY,
        parse: session::parse_auth,
    },
    Spec {
        name: "client",
        arity: -2,
        flags: &[],
        categories: &["@slow", "@connection"],
        keys: NO_KEY,
        parse: session::parse_client,
    },
    Spec {
        name: "quit",
        arity: -1,
        flags: CONN,
        categories: &["@fast", "@connection"],
        keys: NO_KEY,
        parse: session::parse_quit,
    },
    Spec {
        name: "reset",
        arity: 1,
        flags: CONN,
        categories: &["@fast", "@connection"],
        keys: NO_KEY,
        parse: session::parse_reset,
    },
    Spec {
        name: "info",
        arity: -1,
        flags: ADMIN,
        categories: &["@slow", "@dangerous"],
        keys: NO_KEY,
        parse: info::parse_info,
    },
    Spec {
        name: "command",
        arity: -1,
        flags: ADMIN,
        categories: &["@slow", "@connection"],
        keys: NO_KEY,
        parse: command::parse_command,
    },
    Spec {
        name: "config",
        arity: -2,
        flags: &[],
        categories: &["@slow"],
        keys: NO_KEY,
        parse: config::parse_config,
    },
];

/// The command named `name`, compared without regard to ASCII case.
pub fn lookup(name: &[u8]) -> Option<&'static Spec> {
    COMMANDS
        .iter()
        .find(|spec| spec.name.as_bytes().eq_ignore_ascii_case(name))
}

/// Whether `argc` arguments (the name included) satisfy `arity`.
pub fn arity_ok(arity: i64, argc: usize) -> bool {
    let argc = argc as i64;
    if arity >= 0 {
        argc == arity
    } else {
        argc >= -arity
    }
}

/// Redis's reply to an unknown command: the name and the first arguments,
/// each cut so that the whole stays short.
fn unknown_command(name: &[u8], args: &[Bytes]) -> ReplyError {
    let mut shown = String::new();
    for arg in args {
        if shown.len() >= NAME_ECHO_BYTES_MAX {
            break;
        }
        let room = NAME_ECHO_BYTES_MAX - shown.len();
        shown.push_str(&format!("'{}' ", printable(arg, room)));
    }
    ReplyError::err(format_args!(
        "unknown command '{}', with args beginning with: {shown}",
        printable(name, NAME_ECHO_BYTES_MAX)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, ReplyError> {
        Command::from_frame(Frame::Array(
            args.iter()
                .map(|a| Frame::Bulk(Bytes::copy_from_slice(a.as_bytes())))
                .collect(),
        ))
    }

    fn error_of(args: &[&str]) -> String {
        parse(args).unwrap_err().line().to_string()
    }

    #[test]
    fn unknown_commands_are_named_as_redis_names_them() {
        // Proves the unknown-command reply matches Redis, arguments and cap included.
        assert_eq!(
            error_of(&["foo", "a", "b"]),
            "ERR unknown command 'foo', with args beginning with: 'a' 'b' "
        );
        assert_eq!(
            error_of(&["foo"]),
            "ERR unknown command 'foo', with args beginning with: "
        );
        let long = "x".repeat(300);
        let line = error_of(&[&long, &long, &long]);
        assert!(line.len() < 2 * NAME_ECHO_BYTES_MAX + 100, "{line}");
    }

    #[test]
    fn command_names_are_case_insensitive_and_arity_is_checked_first() {
        // Proves lookup ignores case and a wrong argument count names the command.
        assert!(matches!(parse(&["InCr", "a"]), Ok(Command::Increment(_))));
        assert_eq!(
            error_of(&["INCRBY", "a"]),
            "ERR wrong number of arguments for 'incrby' command"
        );
        assert_eq!(
            error_of(&["GET"]),
            "ERR wrong number of arguments for 'get' command"
        );
        assert_eq!(
            error_of(&["PING", "a", "b"]),
            "ERR wrong number of arguments for 'ping' command"
        );
        assert_eq!(
            error_of(&["DBSIZE", "x"]),
            "ERR wrong number of arguments for 'dbsize' command"
        );
    }

    #[test]
    fn every_command_name_is_lowercase_and_unique() {
        // Proves the table has no shadowed entry and matches COMMAND's form.
        for (i, spec) in COMMANDS.iter().enumerate() {
            assert_eq!(spec.name, spec.name.to_ascii_lowercase());
            assert!(
                COMMANDS[i + 1..].iter().all(|s| s.name != spec.name),
                "{} twice",
                spec.name
            );
        }
    }
}
