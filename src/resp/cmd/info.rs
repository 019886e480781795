//! `INFO [section ...]`: the node's state as Redis-style `key:value` lines.
//!
//! Sections, in order: `server` (versions, node id, uptime), `clients`
//! (connections), `stats` (connections and commands served by this front
//! end), `tally` (counters, idempotency keys, journal positions and sync
//! figures, snapshots, recovery, readiness) and `keyspace` (`db0:keys=N`,
//! the line tools such as `redis-cli --stat` read). Each section starts
//! with a `# Name` line and sections are separated by an empty line, lines
//! end in CRLF, as in Redis. With no argument, or `all`, `everything` or
//! `default`, every section is sent; an unknown section adds nothing.
//!
//! Quantile lines (`journal_sync_p50_seconds` and the like) are left out
//! until the node has a sample to compute them from.

use std::fmt::Write;

use super::super::frame::Frame;
use super::super::parse::Args;
use super::super::reply::ReplyError;
use super::super::server::Shared;
use super::Command;

/// The Redis version whose RESP2 behaviour this front end follows,
/// reported as `redis_version` and in `HELLO`: clients read it to decide
/// which commands and reply forms to expect.
pub const REDIS_COMPAT_VERSION: &str = "7.0.0";

const SECTIONS: &[&str] = &["server", "clients", "stats", "tally", "keyspace"];

/// An `INFO` request: the sections asked for, lowercase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    sections: Vec<String>,
}

pub fn parse_info(args: &mut Args) -> Result<Command, ReplyError> {
    let mut sections = Vec::new();
    while args.remaining() > 0 {
        let name = args.next_bytes()?;
        let name = String::from_utf8_lossy(&name).to_ascii_lowercase();
        if matches!(name.as_str(), "all" | "everything" | "default") {
            sections.extend(SECTIONS.iter().map(|s| s.to_string()));
        } else {
            sections.push(name);
        }
    }
    if sections.is_empty() {
        sections.extend(SECTIONS.iter().map(|s| s.to_string()));
    }
    Ok(Command::Info(Info { sections }))
}

impl Info {
    pub fn apply(self, shared: &Shared) -> Frame {
        let stats = shared.node.stats();
        let mut text = String::new();
        for &section in SECTIONS {
            if !self.sections.iter().any(|s| s == section) {
                continue;
            }
            if !text.is_empty() {
                text.push_str("\r\n");
            }
            let mut lines = Lines(&mut text);
            match section {
                "server" => {
                    lines.header("Server");
                    lines.field("tally_version", env!("CARGO_PKG_VERSION"));
                    lines.field("redis_version", REDIS_COMPAT_VERSION);
                    lines.field("redis_mode", "standalone");
                    lines.field("node_id", &stats.node_id);
                    lines.field("process_id", std::process::id());
                    lines.field("tcp_port", shared.local_addr.port());
                    lines.field("uptime_in_seconds", stats.uptime_s);
                    lines.field("uptime_in_days", stats.uptime_s / 86_400);
                }
                "clients" => {
                    lines.header("Clients");
                    lines.field("connected_clients", shared.connected_clients());
                    lines.field("maxclients", shared.config.resp_connections_max);
                }
                "stats" => {
                    let s = &shared.stats;
                    lines.header("Stats");
                    lines.field("total_connections_received", s.connections_received());
                    lines.field("total_commands_processed", s.commands_processed());
                    lines.field("rejected_connections", s.connections_rejected());
                }
                "tally" => {
                    lines.header("Tally");
                    lines.field("counters", stats.counters);
                    lines.field("idempotency_keys", stats.idempotency_keys);
                    lines.field("default_durability", stats.default_durability);
                    lines.field("next_lsn", stats.next_lsn);
                    lines.field("journal_end_pos", stats.journal_end_pos);
                    lines.field("journal_durable_pos", stats.journal_durable_pos);
                    lines.field("journal_queued_bytes", stats.journal_queued_bytes);
                    lines.field("journal_segments", stats.journal_segments);
                    lines.field("journal_syncs", stats.journal_syncs);
                    lines.field("journal_bytes_written", stats.journal_bytes_written);
                    lines.field("journal_records_written", stats.journal_records_written);
                    lines.optional("journal_sync_p50_seconds", stats.sync_p50_s);
                    lines.optional("journal_sync_p99_seconds", stats.sync_p99_s);
                    lines.optional("journal_batch_p50_records", stats.batch_p50_records);
                    lines.optional("journal_batch_p99_records", stats.batch_p99_records);
                    lines.field("snapshots_written", stats.snapshots_written);
                    lines.field("last_snapshot_pos", stats.last_snapshot_pos);
                    lines.field("recovery_ms", stats.recovery_ms);
                    lines.field("recovery_records_replayed", stats.recovery_records_replayed);
                    lines.field("ready", u8::from(stats.readiness.ready));
                    if let Some(reason) = &stats.readiness.reason {
                        lines.field("ready_reason", reason);
                    }
                }
                "keyspace" => {
                    lines.header("Keyspace");
                    // Redis lists only databases that hold keys.
                    if stats.counters > 0 {
                        lines.field(
                            "db0",
                            format_args!("keys={},expires=0,avg_ttl=0", stats.counters),
                        );
                    }
                }
                _ => {}
            }
        }
        Frame::bulk(text)
    }
}

struct Lines<'a>(&'a mut String);

impl Lines<'_> {
    fn header(&mut self, name: &str) {
        let _ = write!(self.0, "# {name}\r\n");
    }

    fn field(&mut self, key: &str, value: impl std::fmt::Display) {
        // A value must stay on its line: a reason string could hold a newline.
        let value = value.to_string().replace(['\r', '\n'], " ");
        let _ = write!(self.0, "{key}:{value}\r\n");
    }

    fn optional(&mut self, key: &str, value: Option<f64>) {
        if let Some(v) = value {
            self.field(key, v);
        }
    }
}
