//! `INFO [section ...]`: the node's state as Redis-style `key:value` lines.
//!
//! Sections, in order: `server` (versions, node id, uptime), `clients`
//! (connections), `stats` (connections and commands served by this front
//! end), `tally` (this node's counters, idempotency keys, journal positions
//! and sync figures, snapshots, recovery, readiness), `cluster` (the shared
//! store and every node in it) and `keyspace` (`db0:keys=N`, the line tools
//! such as `redis-cli --stat` read). Each section starts with a `# Name`
//! line and sections are separated by an empty line, lines end in CRLF, as
//! in Redis. With no argument, or `all`, `everything` or `default`, every
//! section is sent; an unknown section adds nothing.
//!
//! Quantile lines (`journal_sync_p50_seconds` and the like) are left out
//! until the node has a sample to compute them from.
//!
//! # The cluster section
//!
//! `cluster_enabled` is always `0`. In Redis it means "this server speaks
//! the Redis Cluster protocol" (hash slots, `MOVED`, `CLUSTER SLOTS`), and
//! client libraries read it to switch to a cluster client, whose first
//! `CLUSTER` command tally would refuse. A tally node serves every key
//! itself, so to such a client it is a standalone server, with or without a
//! shared store. Whether the node runs with a store is
//! `tally_cluster_enabled:0|1`; with one, the section goes on with
//! `node_id`, `epoch`, `store`, `staleness_bound_ms`,
//! `last_refresh_age_ms`, `replicated_available`, `store_error` (only when
//! there is one) and one line per node of the cluster view:
//!
//! ```text
//! node_<id>:epoch=3,state=alive,flushed_lsn=120,flush_lag=0,address=127.0.0.1:7070
//! ```
//!
//! After the node lines come this node's own figures of its store
//! transactions (from the metrics module): `store_rounds`,
//! `store_round_p50_seconds` and `store_round_p99_seconds` (latency of a
//! committed transaction), `store_rows_flushed`,
//! `replicated_batch_p50_requests` and `replicated_batch_p99_requests`,
//! `store_indeterminate_commits`, `store_failed_calls` and `flush_lag` (lsns
//! applied here above the flushed mark). Quantiles are left out until
//! there is a sample.
//!
//! The view is read from the store on a blocking thread. If that read
//! fails, the section still answers, with `replicated_available:0` and the
//! error as `store_error`, and no node lines: `INFO` never fails because
//! the store does.
//!
//! On a node with a store, `db0:keys` counts the counters any node holds
//! (as `DBSIZE` does), while the `tally` section's `counters` counts this
//! node's shards.

use std::fmt::Write;

use super::super::frame::Frame;
use super::super::parse::Args;
use super::super::reply::ReplyError;
use super::super::server::Shared;
use super::Command;
use crate::cluster::{ClusterView, Liveness};

/// The Redis version whose RESP2 behaviour this front end follows,
/// reported as `redis_version` and in `HELLO`: clients read it to decide
/// which commands and reply forms to expect.
pub const REDIS_COMPAT_VERSION: &str = "7.0.0";

/// Every section, in the order they are sent (Redis's order where Redis
/// has the section: `cluster` before `keyspace`).
const SECTIONS: &[&str] = &["server", "clients", "stats", "tally", "cluster", "keyspace"];

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

/// What the `cluster` and `keyspace` sections need that may block on the
/// store, gathered before the text is written.
struct Gathered {
    /// `None` on a node without a store, or when `cluster` was not asked.
    cluster: Option<Result<ClusterView, String>>,
    /// Counters any node holds; `None` when `keyspace` was not asked.
    keys: Option<usize>,
}

impl Info {
    fn wants(&self, section: &str) -> bool {
        self.sections.iter().any(|s| s == section)
    }

    /// Gathers what may block (off the async threads), then writes the
    /// sections asked for.
    pub async fn run(self, shared: &Shared) -> Frame {
        let node = shared.node.clone();
        let want_cluster = self.wants("cluster");
        let want_keys = self.wants("keyspace");
        let gathered = if node.config().cluster.is_none() {
            // Nothing here touches a store: no need for a blocking thread.
            Gathered {
                cluster: None,
                keys: want_keys.then(|| node.counter_count()),
            }
        } else if want_cluster || want_keys {
            tokio::task::spawn_blocking(move || Gathered {
                cluster: want_cluster
                    .then(|| node.cluster_view())
                    .flatten()
                    .map(|view| view.map_err(|e| e.to_string())),
                keys: want_keys.then(|| node.counter_count()),
            })
            .await
            .unwrap_or_else(|e| Gathered {
                cluster: want_cluster.then(|| Err(format!("reading the cluster view failed: {e}"))),
                keys: None,
            })
        } else {
            Gathered {
                cluster: None,
                keys: None,
            }
        };
        self.render(shared, gathered)
    }

    fn render(self, shared: &Shared, gathered: Gathered) -> Frame {
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
                "cluster" => {
                    lines.header("Cluster");
                    // Never 1: see the module documentation.
                    lines.field("cluster_enabled", 0);
                    let store = shared.node.config().cluster.is_some();
                    lines.field("tally_cluster_enabled", u8::from(store));
                    if store {
                        cluster_fields(&mut lines, &stats.node_id, gathered.cluster.as_ref());
                        store_fields(&mut lines, &stats);
                    }
                }
                "keyspace" => {
                    lines.header("Keyspace");
                    let keys = gathered.keys.unwrap_or(stats.counters);
                    // Redis lists only databases that hold keys.
                    if keys > 0 {
                        lines.field("db0", format_args!("keys={keys},expires=0,avg_ttl=0"));
                    }
                }
                _ => {}
            }
        }
        // Text for a person: a verbatim string in RESP3, as Redis sends it.
        Frame::Verbatim(text.into())
    }
}

/// The cluster section's lines after `tally_cluster_enabled:1`.
fn cluster_fields(
    lines: &mut Lines<'_>,
    node_id: &str,
    view: Option<&Result<ClusterView, String>>,
) {
    match view {
        Some(Ok(view)) => {
            lines.field("node_id", &view.node_id);
            lines.field("epoch", view.epoch);
            lines.field("store", view.store);
            lines.field("staleness_bound_ms", view.staleness_bound_ms);
            if let Some(age) = view.last_refresh_age_ms {
                lines.field("last_refresh_age_ms", age);
            }
            lines.field("replicated_available", u8::from(view.replicated_available));
            if let Some(error) = &view.store_error {
                lines.field("store_error", error);
            }
            if let Some(r) = &view.store_replication {
                lines.field("store_standbys", r.standbys);
                if let Some(n) = r.synchronous_standbys {
                    lines.field("store_synchronous_standbys", n);
                }
            }
            if let Some(warning) = &view.store_warning {
                lines.field("store_warning", warning);
            }
            for n in &view.nodes {
                // The value is a comma-separated list: the address, which
                // the node chose, goes last so that nothing follows it.
                lines.field(
                    &format!("node_{}", n.node_id),
                    format_args!(
                        "epoch={},state={},flushed_lsn={},flush_lag={},address={}",
                        n.epoch,
                        liveness(n.state),
                        n.flushed_lsn,
                        n.flush_lag,
                        n.address
                    ),
                );
            }
        }
        Some(Err(error)) => {
            lines.field("node_id", node_id);
            lines.field("replicated_available", 0);
            lines.field("store_error", error);
        }
        // Only when the section was not asked for.
        None => {}
    }
}

/// This node's figures of its store transactions, after the cluster view.
fn store_fields(lines: &mut Lines<'_>, stats: &crate::NodeStats) {
    lines.field("store_rounds", stats.store_rounds);
    lines.optional("store_round_p50_seconds", stats.store_round_p50_s);
    lines.optional("store_round_p99_seconds", stats.store_round_p99_s);
    lines.field("store_rows_flushed", stats.store_rows_flushed);
    lines.optional(
        "replicated_batch_p50_requests",
        stats.replicated_batch_p50_requests,
    );
    lines.optional(
        "replicated_batch_p99_requests",
        stats.replicated_batch_p99_requests,
    );
    lines.field(
        "store_indeterminate_commits",
        stats.store_indeterminate_commits,
    );
    lines.field("store_failed_calls", stats.store_errors);
    if let Some(lag) = stats.flush_lag_lsns {
        lines.field("flush_lag", lag);
    }
}

/// A node's state as the HTTP cluster view spells it.
fn liveness(state: Liveness) -> &'static str {
    match state {
        Liveness::Alive => "alive",
        Liveness::Suspect => "suspect",
        Liveness::Down => "down",
        Liveness::Stopped => "stopped",
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
