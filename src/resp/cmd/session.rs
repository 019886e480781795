//! The connection's own state and the commands that read or change it
//! (Redis's "connection" group): `PING`, `ECHO`, `SELECT`, `HELLO`, `AUTH`,
//! `CLIENT ID|GETNAME|SETNAME|SETINFO|INFO`, `QUIT`, `RESET`.
//!
//! tally has one keyspace, and answers these the way a Redis server in that
//! situation answers them: `SELECT 0` works and no other database exists;
//! `HELLO 3` switches the connection to RESP3 and `HELLO 2` (or `RESET`)
//! back to RESP2, any other version is refused with `NOPROTO`. Without
//! users (see [`crate::auth`]) `AUTH` behaves as in a Redis with no
//! password; with users, `AUTH [user] secret` and `HELLO ... AUTH user
//! secret` authenticate the connection (a lone secret is the `default`
//! user's), a failure is `WRONGPASS` after a pause that doubles with each
//! failure on the connection, and `RESET` forgets who the client was.
//! None of these touches the node.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::super::frame::{Frame, Protocol, parse_i64};
use super::super::parse::Args;
use super::super::reply::{NAME_ECHO_BYTES_MAX, ReplyError, printable};
use super::info::REDIS_COMPAT_VERSION;
use super::{Command, Context};
use crate::auth::Identity;

/// What the server remembers about one connection.
#[derive(Debug)]
pub struct Session {
    /// Unique among the server's connections, from 1 (`CLIENT ID`).
    pub id: u64,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub connected_at: Instant,
    name: Option<Bytes>,
    lib_name: Option<Bytes>,
    lib_ver: Option<Bytes>,
    /// The protocol replies are written in (`HELLO`).
    pub protocol: Protocol,
    /// Who the client proved to be; `None` before it authenticated (or
    /// on a node without users).
    pub identity: Option<Identity>,
    /// Failed authentication attempts on this connection.
    auth_failures: u32,
    /// How long to wait before the reply to a failed attempt; taken by
    /// the pipeline ([`Session::take_delay`]).
    delay: Option<Duration>,
}

/// Pause before answering the first failed authentication attempt of a
/// connection; each further failure doubles it.
pub const AUTH_FAILURE_DELAY_MIN: Duration = Duration::from_millis(100);
/// Longest pause before answering a failed authentication attempt.
pub const AUTH_FAILURE_DELAY_MAX: Duration = Duration::from_secs(5);

/// Redis's reply to a wrong user or secret.
pub const WRONGPASS: &str = "WRONGPASS invalid username-password pair or user is disabled.";

impl Session {
    pub fn new(id: u64, peer: SocketAddr, local: SocketAddr) -> Self {
        Session {
            id,
            peer,
            local,
            connected_at: Instant::now(),
            name: None,
            lib_name: None,
            lib_ver: None,
            protocol: Protocol::Resp2,
            identity: None,
            auth_failures: 0,
            delay: None,
        }
    }

    /// The pause owed before the reply just made, if it was to a failed
    /// authentication attempt.
    pub fn take_delay(&mut self) -> Option<Duration> {
        self.delay.take()
    }

    /// Records a failed attempt: counted, and answered after a pause.
    fn auth_failed(&mut self) -> ReplyError {
        self.auth_failures = self.auth_failures.saturating_add(1);
        let doublings = self.auth_failures.saturating_sub(1).min(16);
        self.delay = Some(
            AUTH_FAILURE_DELAY_MIN
                .saturating_mul(1 << doublings)
                .min(AUTH_FAILURE_DELAY_MAX),
        );
        ReplyError::raw(WRONGPASS)
    }

    /// The name set with `CLIENT SETNAME` or `HELLO ... SETNAME`.
    pub fn name(&self) -> Option<&Bytes> {
        self.name.as_ref()
    }

    fn set_name(&mut self, name: Bytes) {
        // An empty name removes the name, as in Redis.
        self.name = (!name.is_empty()).then_some(name);
    }
}

/// A command about the connection itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionCommand {
    Ping(Option<Bytes>),
    Echo(Bytes),
    /// `SELECT 0`; other indexes are refused while parsing.
    Select,
    /// `HELLO [2|3] [AUTH user pass] [SETNAME name]`
    Hello {
        protocol: Option<Protocol>,
        auth: Option<Credentials>,
        set_name: Option<Bytes>,
    },
    /// `AUTH [user] secret`
    Auth(Credentials),
    Client(ClientCommand),
    Quit,
    Reset,
}

/// A user name (`None`: Redis's `default`) and a secret. Its `Debug` never
/// shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: Option<Bytes>,
    secret: Bytes,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// A `CLIENT` subcommand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientCommand {
    Id,
    GetName,
    SetName(Bytes),
    SetInfo { lib_version: bool, value: Bytes },
    Info,
}

impl SessionCommand {
    pub fn apply(self, cx: &mut Context<'_>) -> Result<Frame, ReplyError> {
        let users = &cx.shared.config.users;
        let session = &mut *cx.session;
        // As Redis answers while it loads its dataset: a health check that
        // expects +PONG keeps a node that cannot serve yet out of rotation.
        if let SessionCommand::Ping(_) = self
            && let Some(reason) = cx.shared.node.starting_reason()
        {
            return Err(ReplyError::raw(format!("LOADING {reason}")));
        }
        Ok(match self {
            SessionCommand::Ping(None) => Frame::Simple("PONG".into()),
            SessionCommand::Ping(Some(message)) | SessionCommand::Echo(message) => {
                Frame::Bulk(message)
            }
            SessionCommand::Select | SessionCommand::Quit => Frame::ok(),
            SessionCommand::Auth(credentials) => {
                if !users.enabled() {
                    return no_users_auth(credentials).map(|()| Frame::ok());
                }
                let user = credentials.user.as_deref().unwrap_or(b"default");
                match users.authenticate(user, &credentials.secret) {
                    Some(identity) => {
                        session.identity = Some(identity);
                        Frame::ok()
                    }
                    None => return Err(session.auth_failed()),
                }
            }
            SessionCommand::Hello {
                protocol,
                auth,
                set_name,
            } => {
                match auth {
                    Some(credentials) if users.enabled() => {
                        let user = credentials.user.as_deref().unwrap_or(b"default");
                        match users.authenticate(user, &credentials.secret) {
                            Some(identity) => session.identity = Some(identity),
                            None => return Err(session.auth_failed()),
                        }
                    }
                    Some(credentials) => no_users_auth(credentials)?,
                    None if users.enabled() && session.identity.is_none() => {
                        return Err(ReplyError::raw(
                            "NOAUTH HELLO must be called with the client already authenticated, \
                             otherwise the HELLO <proto> AUTH <user> <pass> option can be used to \
                             authenticate the client and select the RESP protocol version at the \
                             same time",
                        ));
                    }
                    None => {}
                }
                if let Some(protocol) = protocol {
                    session.protocol = protocol;
                }
                if let Some(name) = set_name {
                    session.set_name(name);
                }
                hello_reply(session.id, session.protocol)
            }
            SessionCommand::Reset => {
                session.name = None;
                session.lib_name = None;
                session.lib_ver = None;
                session.protocol = Protocol::Resp2;
                // As Redis: the connection is no longer authenticated.
                session.identity = None;
                Frame::Simple("RESET".into())
            }
            SessionCommand::Client(ClientCommand::Id) => Frame::Integer(session.id as i64),
            SessionCommand::Client(ClientCommand::GetName) => {
                session.name.clone().map_or(Frame::Null, Frame::Bulk)
            }
            SessionCommand::Client(ClientCommand::SetName(name)) => {
                session.set_name(name);
                Frame::ok()
            }
            SessionCommand::Client(ClientCommand::SetInfo { lib_version, value }) => {
                let slot = if lib_version {
                    &mut session.lib_ver
                } else {
                    &mut session.lib_name
                };
                *slot = (!value.is_empty()).then_some(value);
                Frame::ok()
            }
            SessionCommand::Client(ClientCommand::Info) => {
                Frame::Verbatim(client_info(session).into())
            }
        })
    }
}

/// `HELLO`'s reply: Redis's map of the server's facts, in the protocol
/// now in effect (a flat array of field/value pairs in RESP2).
fn hello_reply(id: u64, protocol: Protocol) -> Frame {
    let field = |s: &'static str| Frame::bulk(s);
    Frame::Map(vec![
        (field("server"), field("tally")),
        (field("version"), field(REDIS_COMPAT_VERSION)),
        (field("proto"), Frame::Integer(protocol.version())),
        (field("id"), Frame::Integer(id as i64)),
        (field("mode"), field("standalone")),
        (field("role"), field("master")),
        (field("modules"), Frame::Array(vec![])),
    ])
}

/// `CLIENT INFO`'s line: the fields of Redis's that mean something here.
fn client_info(session: &Session) -> String {
    let text = |b: &Option<Bytes>| {
        b.as_deref()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default()
    };
    format!(
        "id={} addr={} laddr={} name={} age={} db=0 lib-name={} lib-ver={} resp={}\n",
        session.id,
        session.peer,
        session.local,
        text(&session.name),
        session.connected_at.elapsed().as_secs(),
        text(&session.lib_name),
        text(&session.lib_ver),
        session.protocol.version(),
    )
}

/// Redis accepts only printable ASCII without spaces in client names, so
/// that `CLIENT LIST` stays one line per client.
fn valid_client_attr(value: &[u8]) -> bool {
    value.iter().all(|&b| (b'!'..=b'~').contains(&b))
}

fn client_name(name: Bytes) -> Result<Bytes, ReplyError> {
    if valid_client_attr(&name) {
        Ok(name)
    } else {
        Err(ReplyError::err(
            "Client names cannot contain spaces, newlines or special characters.",
        ))
    }
}

pub fn parse_ping(args: &mut Args) -> Result<Command, ReplyError> {
    let message = if args.remaining() > 0 {
        Some(args.next_bytes()?)
    } else {
        None
    };
    args.finish()?;
    Ok(Command::Session(SessionCommand::Ping(message)))
}

pub fn parse_echo(args: &mut Args) -> Result<Command, ReplyError> {
    let message = args.next_bytes()?;
    args.finish()?;
    Ok(Command::Session(SessionCommand::Echo(message)))
}

pub fn parse_select(args: &mut Args) -> Result<Command, ReplyError> {
    let index = args.next_i64()?;
    args.finish()?;
    if index != 0 {
        return Err(ReplyError::err("DB index is out of range"));
    }
    Ok(Command::Session(SessionCommand::Select))
}

pub fn parse_hello(args: &mut Args) -> Result<Command, ReplyError> {
    let mut protocol = None;
    if args.remaining() > 0 {
        let version = parse_i64(&args.next_bytes()?)
            .ok_or_else(|| ReplyError::err("Protocol version is not an integer or out of range"))?;
        protocol = Some(match version {
            2 => Protocol::Resp2,
            3 => Protocol::Resp3,
            _ => return Err(ReplyError::raw("NOPROTO unsupported protocol version")),
        });
    }
    let mut set_name = None;
    let mut auth = None;
    while args.remaining() > 0 {
        let option = args.next_bytes()?;
        if option.eq_ignore_ascii_case(b"AUTH") && args.remaining() >= 2 {
            let user = args.next_bytes()?;
            let secret = args.next_bytes()?;
            auth = Some(Credentials {
                user: Some(user),
                secret,
            });
        } else if option.eq_ignore_ascii_case(b"SETNAME") && args.remaining() >= 1 {
            set_name = Some(client_name(args.next_bytes()?)?);
        } else {
            return Err(ReplyError::err(format_args!(
                "Syntax error in HELLO option '{}'",
                printable(&option, NAME_ECHO_BYTES_MAX)
            )));
        }
    }
    Ok(Command::Session(SessionCommand::Hello {
        protocol,
        auth,
        set_name,
    }))
}

pub fn parse_auth(args: &mut Args) -> Result<Command, ReplyError> {
    let credentials = match args.remaining() {
        1 => Credentials {
            user: None,
            secret: args.next_bytes()?,
        },
        2 => Credentials {
            user: Some(args.next_bytes()?),
            secret: args.next_bytes()?,
        },
        _ => return Err(ReplyError::syntax()),
    };
    Ok(Command::Session(SessionCommand::Auth(credentials)))
}

/// `AUTH` on a node without users, as Redis answers it with no password
/// configured: only the `default` user exists, and it takes any secret;
/// a lone secret is a configuration mistake worth saying.
fn no_users_auth(credentials: Credentials) -> Result<(), ReplyError> {
    match credentials.user.as_deref() {
        None => Err(ReplyError::err(
            "AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
        )),
        Some(b"default") => Ok(()),
        Some(_) => Err(ReplyError::raw(WRONGPASS)),
    }
}

pub fn parse_client(args: &mut Args) -> Result<Command, ReplyError> {
    let sub = args.next_bytes()?;
    let is = |name: &str| sub.eq_ignore_ascii_case(name.as_bytes());
    let command = if is("ID") {
        args.enter("client|id");
        ClientCommand::Id
    } else if is("GETNAME") {
        args.enter("client|getname");
        ClientCommand::GetName
    } else if is("INFO") {
        args.enter("client|info");
        ClientCommand::Info
    } else if is("SETNAME") {
        args.enter("client|setname");
        ClientCommand::SetName(client_name(args.next_bytes()?)?)
    } else if is("SETINFO") {
        args.enter("client|setinfo");
        let attr = args.next_bytes()?;
        let value = args.next_bytes()?;
        let lib_version = if attr.eq_ignore_ascii_case(b"LIB-VER") {
            true
        } else if attr.eq_ignore_ascii_case(b"LIB-NAME") {
            false
        } else {
            return Err(ReplyError::err(format_args!(
                "Unrecognized option '{}'",
                printable(&attr, NAME_ECHO_BYTES_MAX)
            )));
        };
        if !valid_client_attr(&value) {
            return Err(ReplyError::err(format_args!(
                "{} cannot contain spaces, newlines or special characters.",
                printable(&attr, NAME_ECHO_BYTES_MAX)
            )));
        }
        ClientCommand::SetInfo { lib_version, value }
    } else {
        return Err(ReplyError::unknown_subcommand("CLIENT", &sub));
    };
    args.finish()?;
    Ok(Command::Session(SessionCommand::Client(command)))
}

pub fn parse_quit(_args: &mut Args) -> Result<Command, ReplyError> {
    // Redis ignores anything after QUIT.
    Ok(Command::Session(SessionCommand::Quit))
}

pub fn parse_reset(args: &mut Args) -> Result<Command, ReplyError> {
    args.finish()?;
    Ok(Command::Session(SessionCommand::Reset))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<SessionCommand, String> {
        let frame = Frame::Array(
            args.iter()
                .map(|a| Frame::Bulk(Bytes::copy_from_slice(a.as_bytes())))
                .collect(),
        );
        match Command::from_frame(frame) {
            Ok(Command::Session(cmd)) => Ok(cmd),
            Ok(other) => panic!("not a session command: {other:?}"),
            Err(e) => Err(e.line().to_string()),
        }
    }

    #[test]
    fn only_database_zero_exists() {
        // Proves SELECT accepts 0 and refuses every other index as Redis words it.
        assert_eq!(parse(&["SELECT", "0"]), Ok(SessionCommand::Select));
        assert_eq!(
            parse(&["SELECT", "1"]).unwrap_err(),
            "ERR DB index is out of range"
        );
        assert_eq!(
            parse(&["SELECT", "x"]).unwrap_err(),
            "ERR value is not an integer or out of range"
        );
    }

    #[test]
    fn hello_negotiates_resp2_and_resp3_only() {
        // Proves HELLO takes versions 2 and 3, keeps the current one when
        // none is given, carries AUTH's credentials to be checked when it
        // runs, and refuses other versions with NOPROTO as Redis does.
        assert_eq!(
            parse(&["HELLO"]),
            Ok(SessionCommand::Hello {
                protocol: None,
                auth: None,
                set_name: None
            })
        );
        assert_eq!(
            parse(&["HELLO", "2", "AUTH", "default", "pw", "SETNAME", "app"]),
            Ok(SessionCommand::Hello {
                protocol: Some(Protocol::Resp2),
                auth: Some(Credentials {
                    user: Some(Bytes::from_static(b"default")),
                    secret: Bytes::from_static(b"pw"),
                }),
                set_name: Some(Bytes::from_static(b"app"))
            })
        );
        assert_eq!(
            parse(&["HELLO", "3"]),
            Ok(SessionCommand::Hello {
                protocol: Some(Protocol::Resp3),
                auth: None,
                set_name: None
            })
        );
        for version in ["1", "4", "-3"] {
            assert_eq!(
                parse(&["HELLO", version]).unwrap_err(),
                "NOPROTO unsupported protocol version"
            );
        }
        assert_eq!(
            parse(&["HELLO", "x"]).unwrap_err(),
            "ERR Protocol version is not an integer or out of range"
        );
        assert_eq!(
            parse(&["HELLO", "2", "foo"]).unwrap_err(),
            "ERR Syntax error in HELLO option 'foo'"
        );
        // Without users, only `default` exists (any secret), as in Redis.
        let of = |user: Option<&'static [u8]>| Credentials {
            user: user.map(Bytes::from_static),
            secret: Bytes::from_static(b"pw"),
        };
        assert_eq!(no_users_auth(of(Some(b"default"))), Ok(()));
        assert_eq!(
            no_users_auth(of(Some(b"bob"))).unwrap_err().line(),
            WRONGPASS
        );
        assert!(
            no_users_auth(of(None))
                .unwrap_err()
                .line()
                .starts_with("ERR AUTH <password> called without any password configured")
        );
        // Credentials never show their secret.
        assert!(!format!("{:?}", of(None)).contains("pw"));
    }

    // Each failed attempt on a connection doubles the pause before its
    // reply, up to the maximum.
    #[test]
    fn failed_attempts_are_answered_ever_more_slowly() {
        let mut session = Session::new(1, ([127, 0, 0, 1], 1).into(), ([127, 0, 0, 1], 2).into());
        let mut pauses = Vec::new();
        for _ in 0..8 {
            assert_eq!(session.auth_failed().line(), WRONGPASS);
            pauses.push(session.take_delay().unwrap());
            assert_eq!(session.take_delay(), None);
        }
        assert_eq!(pauses[0], AUTH_FAILURE_DELAY_MIN);
        assert_eq!(pauses[1], AUTH_FAILURE_DELAY_MIN * 2);
        assert_eq!(pauses[7], AUTH_FAILURE_DELAY_MAX);
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn client_subcommands_check_their_own_arity_and_names() {
        // Proves CLIENT subcommands report arity and bad names as Redis does.
        assert_eq!(
            parse(&["CLIENT", "SETNAME"]).unwrap_err(),
            "ERR wrong number of arguments for 'client|setname' command"
        );
        assert_eq!(
            parse(&["CLIENT", "SETNAME", "a b"]).unwrap_err(),
            "ERR Client names cannot contain spaces, newlines or special characters."
        );
        assert_eq!(
            parse(&["CLIENT", "foo"]).unwrap_err(),
            "ERR unknown subcommand 'foo'. Try CLIENT HELP."
        );
        assert_eq!(
            parse(&["client", "setinfo", "LIB-NAME", "redis-rs"]),
            Ok(SessionCommand::Client(ClientCommand::SetInfo {
                lib_version: false,
                value: Bytes::from_static(b"redis-rs")
            }))
        );
        assert_eq!(
            parse(&["CLIENT", "SETINFO", "color", "x"]).unwrap_err(),
            "ERR Unrecognized option 'color'"
        );
    }
}
