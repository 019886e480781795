//! The ready line: the one line `tally serve` prints on standard output
//! once the node has recovered and its listeners are bound. Supervisors,
//! scripts and tests wait for it and read the bound addresses from it, so
//! it is written and parsed here and nowhere else.
//!
//! ```
//! use tally::ready::ReadyLine;
//!
//! let line = ReadyLine {
//!     node_id: "node-1".into(),
//!     resp: Some("127.0.0.1:7379".parse().unwrap()),
//!     http: None,
//!     resp_tls: None,
//!     https: Some("127.0.0.1:7443".parse().unwrap()),
//! };
//! let text = line.to_string();
//! assert_eq!(
//!     text,
//!     "tally ready node_id=node-1 resp=127.0.0.1:7379 http=off resp_tls=off https=127.0.0.1:7443"
//! );
//! assert_eq!(ReadyLine::parse(&text), Some(line));
//! ```

use std::net::SocketAddr;

/// Every ready line starts with this.
pub const READY_LINE_PREFIX: &str = "tally ready ";

/// What a ready line says: the node id and the addresses the front ends
/// listen on (`None`: that front end is off).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyLine {
    pub node_id: String,
    pub resp: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    /// RESP over TLS.
    pub resp_tls: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
}

impl ReadyLine {
    /// Parses a line (trailing newline allowed); `None` if it is not a
    /// ready line or a field is missing or malformed.
    pub fn parse(line: &str) -> Option<ReadyLine> {
        let rest = line.trim_end().strip_prefix(READY_LINE_PREFIX)?;
        let field = |key: &str| {
            rest.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        };
        let addr = |key: &str| -> Option<Option<SocketAddr>> {
            match field(key)? {
                "off" => Some(None),
                a => a.parse().ok().map(Some),
            }
        };
        Some(ReadyLine {
            node_id: field("node_id")?.to_string(),
            resp: addr("resp")?,
            http: addr("http")?,
            // Absent from lines of builds without TLS ports: off.
            resp_tls: field("resp_tls").map_or(Some(None), |_| addr("resp_tls"))?,
            https: field("https").map_or(Some(None), |_| addr("https"))?,
        })
    }
}

impl std::fmt::Display for ReadyLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |a: Option<SocketAddr>| a.map_or("off".to_string(), |a| a.to_string());
        write!(
            f,
            "{READY_LINE_PREFIX}node_id={} resp={} http={} resp_tls={} https={}",
            self.node_id,
            show(self.resp),
            show(self.http),
            show(self.resp_tls),
            show(self.https)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines that are not whole ready lines are refused, not half-read.
    #[test]
    fn refuses_what_is_not_a_ready_line() {
        assert_eq!(ReadyLine::parse("tally ready node_id=x"), None);
        assert_eq!(ReadyLine::parse("ready node_id=x resp=off http=off"), None);
        assert_eq!(
            ReadyLine::parse("tally ready node_id=x resp=nowhere http=off"),
            None
        );
        let ok = ReadyLine::parse("tally ready node_id=x resp=off http=127.0.0.1:1\n").unwrap();
        assert_eq!(ok.http, Some("127.0.0.1:1".parse().unwrap()));
        assert_eq!(ok.resp, None);
        assert_eq!((ok.resp_tls, ok.https), (None, None));
        assert_eq!(
            ReadyLine::parse("tally ready node_id=x resp=off http=off resp_tls=bad https=off"),
            None
        );
    }
}
