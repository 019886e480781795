//! A cursor over one request's arguments that turns each into the type a
//! command needs, failing with Redis's wording.
//!
//! Counter names and idempotency keys are binary-safe on the wire but tally
//! names are UTF-8 and bounded; this is where a name that breaks those
//! rules gets its error, before a command runs.

use bytes::Bytes;

use crate::engine::{idempotency, table};
use crate::error::Error;

use super::frame::{Frame, parse_i64};
use super::reply::ReplyError;

/// The arguments of one request after the command name.
#[derive(Debug)]
pub struct Args {
    /// Lowercase command name for arity errors (`client|setname` for a
    /// subcommand).
    command: &'static str,
    parts: std::vec::IntoIter<Frame>,
}

impl Args {
    pub fn new(command: &'static str, parts: std::vec::IntoIter<Frame>) -> Self {
        Args { command, parts }
    }

    /// Names the subcommand being parsed, for its arity errors.
    pub fn enter(&mut self, subcommand: &'static str) {
        self.command = subcommand;
    }

    /// Arguments not consumed yet.
    pub fn remaining(&self) -> usize {
        self.parts.len()
    }

    /// The arity error of the current command.
    pub fn wrong_arity(&self) -> ReplyError {
        ReplyError::wrong_arity(self.command)
    }

    /// The next argument as raw bytes.
    pub fn next_bytes(&mut self) -> Result<Bytes, ReplyError> {
        match self.parts.next() {
            Some(Frame::Bulk(b)) => Ok(b),
            // The parser builds requests from bulk strings only.
            Some(_) => Err(ReplyError::err("Protocol error: expected a bulk string")),
            None => Err(self.wrong_arity()),
        }
    }

    /// The next argument as a signed 64-bit integer.
    pub fn next_i64(&mut self) -> Result<i64, ReplyError> {
        parse_i64(&self.next_bytes()?).ok_or_else(ReplyError::not_integer)
    }

    /// The next argument as a counter name: UTF-8 and within the name rules.
    pub fn next_name(&mut self) -> Result<String, ReplyError> {
        let name = utf8(self.next_bytes()?, "counter name")?;
        table::validate_name(&name)?;
        Ok(name)
    }

    /// The next argument as an idempotency key: UTF-8 and within the key rules.
    pub fn next_idempotency_key(&mut self) -> Result<String, ReplyError> {
        let key = utf8(self.next_bytes()?, "idempotency key")?;
        idempotency::validate_key(&key)?;
        Ok(key)
    }

    /// Every remaining argument as counter names.
    pub fn rest_names(&mut self) -> Result<Vec<String>, ReplyError> {
        let mut names = Vec::with_capacity(self.remaining());
        while self.remaining() > 0 {
            names.push(self.next_name()?);
        }
        Ok(names)
    }

    /// Fails if arguments are left over.
    pub fn finish(&self) -> Result<(), ReplyError> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(self.wrong_arity())
        }
    }
}

fn utf8(bytes: Bytes, what: &'static str) -> Result<String, ReplyError> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| Error::invalid(what, "it is not valid UTF-8").into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(parts: &[&[u8]]) -> Args {
        let frames: Vec<Frame> = parts
            .iter()
            .map(|p| Frame::Bulk(Bytes::copy_from_slice(p)))
            .collect();
        Args::new("incrby", frames.into_iter())
    }

    #[test]
    fn names_must_be_utf8_and_within_the_limit() {
        // Proves a name tally cannot store is refused with a clear error.
        let too_long = vec![b'n'; table::NAME_BYTES_MAX + 1];
        let mut a = args(&[b"\xff\xfe", &too_long, b"", b"ok"]);
        assert_eq!(
            a.next_name().unwrap_err().line(),
            "ERR counter name is invalid: it is not valid UTF-8"
        );
        assert_eq!(
            a.next_name().unwrap_err().line(),
            "ERR counter name is invalid: it is 257 bytes long; the limit is 256 bytes"
        );
        assert_eq!(
            a.next_name().unwrap_err().line(),
            "ERR counter name is invalid: it is empty"
        );
        assert_eq!(a.next_name().unwrap(), "ok");
    }

    #[test]
    fn missing_and_extra_arguments_are_arity_errors() {
        // Proves running out of or leaving arguments names the command.
        let mut a = args(&[b"1", b"2"]);
        assert_eq!(a.next_i64().unwrap(), 1);
        assert_eq!(
            a.finish().unwrap_err().line(),
            "ERR wrong number of arguments for 'incrby' command"
        );
        a.next_bytes().unwrap();
        assert_eq!(
            a.next_bytes().unwrap_err().line(),
            "ERR wrong number of arguments for 'incrby' command"
        );
    }
}
