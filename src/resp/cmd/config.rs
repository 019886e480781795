//! `CONFIG GET pattern [pattern ...]`: the few Redis parameters that have
//! a meaning for tally, matched with Redis's glob patterns, answered as a
//! flat array of name/value pairs.
//!
//! Tools ask for these to describe the server: `redis-benchmark` reads
//! `save` and `appendonly`, clients read `databases` or `maxclients`.
//! Answers are the tally behaviour that corresponds: one database, no
//! RDB-style save schedule, every acknowledged write journaled
//! (`appendonly yes`), idle connections never timed out. tally's own
//! settings come from flags, environment and its file, so `CONFIG SET`
//! knows no parameter, in Redis's words.

use super::super::frame::Frame;
use super::super::parse::Args;
use super::super::reply::{NAME_ECHO_BYTES_MAX, ReplyError, printable};
use super::super::server::Shared;
use super::Command;

/// A `CONFIG` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigCommand {
    /// The patterns of `CONFIG GET`.
    Get(Vec<Vec<u8>>),
}

pub fn parse_config(args: &mut Args) -> Result<Command, ReplyError> {
    let sub = args.next_bytes()?;
    if sub.eq_ignore_ascii_case(b"GET") {
        args.enter("config|get");
        if args.remaining() == 0 {
            return Err(args.wrong_arity());
        }
        let mut patterns = Vec::with_capacity(args.remaining());
        while args.remaining() > 0 {
            patterns.push(args.next_bytes()?.to_vec());
        }
        Ok(Command::Config(ConfigCommand::Get(patterns)))
    } else if sub.eq_ignore_ascii_case(b"SET") {
        let name = if args.remaining() > 0 {
            args.next_bytes()?
        } else {
            Default::default()
        };
        Err(ReplyError::err(format_args!(
            "Unknown option or number of arguments for CONFIG SET - '{}'",
            printable(&name, NAME_ECHO_BYTES_MAX)
        )))
    } else {
        Err(ReplyError::unknown_subcommand("CONFIG", &sub))
    }
}

impl ConfigCommand {
    pub fn apply(self, shared: &Shared) -> Result<Frame, ReplyError> {
        let ConfigCommand::Get(patterns) = self;
        let config = &shared.config;
        let parameters: [(&str, String); 6] = [
            ("save", String::new()),
            ("appendonly", "yes".into()),
            ("databases", "1".into()),
            ("maxclients", config.resp_connections_max.to_string()),
            ("proto-max-bulk-len", config.resp_bulk_bytes_max.to_string()),
            ("timeout", "0".into()),
        ];
        // A map: Redis's RESP3 reply, a flat array of pairs in RESP2.
        let mut reply = Vec::new();
        for (name, value) in parameters {
            if patterns.iter().any(|p| glob_match(p, name.as_bytes())) {
                reply.push((Frame::bulk(name), Frame::bulk(value)));
            }
        }
        Ok(Frame::Map(reply))
    }
}

/// Redis's glob matching (`stringmatchlen` without regard to case): `*`,
/// `?`, `[abc]`, `[^a-z]`, and `\` to take the next character literally.
///
/// Iterative, backtracking only to the latest `*`, so a pattern of many
/// stars costs time proportional to pattern times text, never exponential.
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let eq = |a: u8, b: u8| a.eq_ignore_ascii_case(&b);
    let (mut p, mut t) = (0, 0);
    // Where the latest `*` was, and the text position it now stands for.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        let step = match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
                continue;
            }
            Some(b'?') => Some(p + 1),
            Some(b'[') => match_class(pattern, p, text[t])
                .filter(|&(hit, _)| hit)
                .map(|(_, next)| next),
            Some(b'\\') if p + 1 < pattern.len() => eq(pattern[p + 1], text[t]).then_some(p + 2),
            Some(&c) => eq(c, text[t]).then_some(p + 1),
            None => None,
        };
        match (step, star) {
            (Some(next), _) => {
                p = next;
                t += 1;
            }
            (None, Some((star_p, star_t))) => {
                // Let the star swallow one more character and retry.
                p = star_p + 1;
                t = star_t + 1;
                star = Some((star_p, star_t + 1));
            }
            (None, None) => return false,
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&c| c == b'*')
}

/// Matches `c` against the class opening at `pattern[open] == b'['`.
/// Returns whether it matched and the position after the class.
fn match_class(pattern: &[u8], open: usize, c: u8) -> Option<(bool, usize)> {
    let mut i = open + 1;
    let negate = pattern.get(i) == Some(&b'^');
    if negate {
        i += 1;
    }
    let c = c.to_ascii_lowercase();
    let mut hit = false;
    loop {
        match pattern.get(i) {
            // An unclosed class ends with the pattern, as in Redis.
            None => break,
            Some(b']') => {
                i += 1;
                break;
            }
            Some(b'\\') if i + 1 < pattern.len() => {
                hit |= pattern[i + 1].to_ascii_lowercase() == c;
                i += 2;
            }
            Some(&lo) if pattern.get(i + 1) == Some(&b'-') && i + 2 < pattern.len() => {
                let (a, b) = (lo.to_ascii_lowercase(), pattern[i + 2].to_ascii_lowercase());
                let (a, b) = if a <= b { (a, b) } else { (b, a) };
                hit |= (a..=b).contains(&c);
                i += 3;
            }
            Some(&x) => {
                hit |= x.to_ascii_lowercase() == c;
                i += 1;
            }
        }
    }
    Some((hit != negate, i))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_as_redis_matches_them() {
        // Proves the glob syntax Redis clients use selects the right names.
        let cases: &[(&str, &str, bool)] = &[
            ("save", "save", true),
            ("SAVE", "save", true),
            ("*", "appendonly", true),
            ("append*", "appendonly", true),
            ("*only", "appendonly", true),
            ("a*d*y", "appendonly", true),
            ("a?pendonly", "appendonly", true),
            ("[ab]ppendonly", "appendonly", true),
            ("[^a]ppendonly", "appendonly", false),
            ("[x-z]ave", "save", false),
            ("[r-t]ave", "save", true),
            ("sav\\e", "save", true),
            ("save*x", "save", false),
            ("sav", "save", false),
            ("", "save", false),
            ("max*", "maxclients", true),
        ];
        for &(pattern, text, want) in cases {
            assert_eq!(
                glob_match(pattern.as_bytes(), text.as_bytes()),
                want,
                "{pattern} ~ {text}"
            );
        }
    }

    #[test]
    fn many_stars_stay_fast() {
        // Proves a hostile pattern of stars is matched without blowing up.
        let pattern = "*a".repeat(5_000);
        let started = std::time::Instant::now();
        assert!(!glob_match(pattern.as_bytes(), b"appendonly"));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }
}
