//! Command-line flags and their environment-variable equivalents, merged
//! with an optional TOML file into the library's configuration.
//!
//! Precedence: flag, then environment variable (`TALLY_*`), then the TOML
//! file named by `--config`, then the default.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use tally::Result;
use tally::config::{Config, Durability, RecoveryMode, ServerConfig};

/// Durable, exact counters for services that run on several nodes.
#[derive(Debug, Parser)]
#[command(name = "tally", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node: recover, then serve RESP and HTTP until SIGTERM/SIGINT.
    Serve(Box<ServeArgs>),
    /// Run a local cluster for development and tests: N nodes on one
    /// store, HAProxy in front, and a supervisor that restarts a node that
    /// dies. Runs until SIGINT/SIGTERM, then stops everything.
    Cluster(Box<ClusterArgs>),
    /// Fault test: start a local cluster behind HAProxy, send increments
    /// through it while killing, restarting, pausing and wiping nodes, then
    /// check that no acknowledged increment was lost or counted twice.
    /// Exits 1 on any violation.
    Chaos(Box<ChaosArgs>),
    /// Verify every checksum in a data directory and print what it holds.
    /// Changes nothing. Exits 1 if strict recovery would refuse it.
    Inspect {
        /// The node's data directory.
        data_dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Flags of `tally cluster`.
#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// How many nodes
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Directory for every node's data, the SQLite store, the generated
    /// HAProxy configuration and the logs
    #[arg(long, default_value = "tally-cluster")]
    pub dir: PathBuf,
    /// Shared store [default: sqlite://DIR/store.db]
    #[arg(long)]
    pub store: Option<String>,
    /// Load balancer's HTTP address
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub http_addr: std::net::SocketAddr,
    /// Load balancer's RESP address
    #[arg(long, default_value = "127.0.0.1:7379")]
    pub resp_addr: std::net::SocketAddr,
    /// First node's RESP port; node i listens on this + i - 1
    #[arg(long, default_value_t = 7381)]
    pub node_resp_port: u16,
    /// First node's HTTP port; node i listens on this + i - 1
    #[arg(long, default_value_t = 7071)]
    pub node_http_port: u16,
    /// Run the nodes without HAProxy in front of them
    #[arg(long)]
    pub no_haproxy: bool,
    /// Loopback address of the control endpoint, through which
    /// `tally chaos --attach` kills, restarts, pauses and wipes nodes
    #[arg(long, default_value = tally_lab::control::DEFAULT_CONTROL_ADDR)]
    pub control_addr: std::net::SocketAddr,
    /// Do not serve the control endpoint
    #[arg(long)]
    pub no_control: bool,
}

impl ClusterArgs {
    /// The launcher's configuration for these flags.
    pub fn config(self) -> tally_lab::launcher::LocalClusterConfig {
        tally_lab::launcher::LocalClusterConfig {
            nodes: self.nodes,
            base_dir: self.dir,
            store: self.store,
            resp_port_base: self.node_resp_port,
            http_port_base: self.node_http_port,
            lb_http: self.http_addr,
            lb_resp: self.resp_addr,
            haproxy: !self.no_haproxy,
            ..Default::default()
        }
    }
}

/// Most concurrent clients `tally chaos` runs.
pub const CHAOS_CLIENTS_MAX: usize = 512;

/// Flags of `tally chaos`.
#[derive(Debug, Args)]
pub struct ChaosArgs {
    /// How long to send load and inject faults, e.g. 60s or 10m
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Shared store of the cluster it starts [default: sqlite://DIR/store.db];
    /// `private-postgres` starts a PostgreSQL server of the run's own in
    /// DIR/postgres, which the store fault stops and starts
    #[arg(long, conflicts_with = "attach")]
    pub store: Option<String>,
    /// Drive the cluster that `tally cluster` runs, through its control
    /// endpoint (e.g. 127.0.0.1:7069), instead of starting one
    #[arg(long)]
    pub attach: Option<std::net::SocketAddr>,
    /// Fault kinds to inject, each at least once: any of kill9, restart,
    /// pause, wipe, store
    #[arg(long, value_delimiter = ',', default_value = "kill9,restart,pause,wipe,store",
          value_parser = parse_fault)]
    pub faults: Vec<tally_lab::chaos::Fault>,
    /// Shell command that stops the store (for the store fault); must
    /// return once the store is down
    #[arg(long, requires = "store_start_cmd")]
    pub store_stop_cmd: Option<String>,
    /// Shell command that starts the store again; must return once it
    /// accepts connections
    #[arg(long, requires = "store_stop_cmd")]
    pub store_start_cmd: Option<String>,
    /// Seed of the fault and load schedule [default: from the clock]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Concurrent clients (even ones speak HTTP, odd ones RESP)
    #[arg(long, default_value_t = 8,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=CHAOS_CLIENTS_MAX as u64))]
    pub clients: usize,
    /// Directory for the cluster's data and logs and a failing run's history
    #[arg(long, default_value = "tally-chaos")]
    pub dir: PathBuf,
    /// Also write the report as JSON to this file
    #[arg(long)]
    pub report_json: Option<PathBuf>,
}

fn parse_fault(s: &str) -> std::result::Result<tally_lab::chaos::Fault, String> {
    tally_lab::chaos::Fault::from_name(s.trim())
        .ok_or_else(|| format!("unknown fault '{s}': one of kill9, restart, pause, wipe, store"))
}

/// Parses `500ms`, `20s`, `10m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("'{s}': the unit must be ms, s or m")),
    }
}

/// Flags of `tally serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (keys named like the flags,
    /// with underscores).
    #[arg(long, env = "TALLY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory for the node id, journal and snapshots [default: ./tally-data]
    #[arg(long, env = "TALLY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Node id; persisted in the data directory on first start [default: random]
    #[arg(long, env = "TALLY_NODE_ID")]
    pub node_id: Option<String>,
    /// Durability of requests that do not ask for one: memory, local or
    /// replicated [default: local]
    #[arg(long, env = "TALLY_DURABILITY")]
    pub durability: Option<String>,
    /// RESP listen address, or "off" [default: 127.0.0.1:7379]
    #[arg(long, env = "TALLY_RESP_ADDR")]
    pub resp_addr: Option<String>,
    /// HTTP listen address, or "off" [default: 127.0.0.1:7070]
    #[arg(long, env = "TALLY_HTTP_ADDR")]
    pub http_addr: Option<String>,
    /// Longest delay before a `memory` increment is synced [default: 100]
    #[arg(long, env = "TALLY_MEMORY_SYNC_DELAY_MS")]
    pub memory_sync_delay_ms: Option<u64>,
    /// Journal segment size before a new one starts [default: 67108864]
    #[arg(long, env = "TALLY_SEGMENT_BYTES_MAX")]
    pub segment_bytes_max: Option<u64>,
    /// Journal bytes between snapshots [default: 268435456]
    #[arg(long, env = "TALLY_SNAPSHOT_JOURNAL_BYTES")]
    pub snapshot_journal_bytes: Option<u64>,
    /// How long idempotency keys are remembered, in seconds [default: 86400]
    #[arg(long, env = "TALLY_IDEMPOTENCY_RETENTION_S")]
    pub idempotency_retention_s: Option<u64>,
    /// Most idempotency keys held at once [default: 10000000]
    #[arg(long, env = "TALLY_IDEMPOTENCY_KEYS_MAX")]
    pub idempotency_keys_max: Option<usize>,
    /// strict, or truncate-at-corruption to accept losing every journal
    /// record after a corrupt one [default: strict]
    #[arg(long, env = "TALLY_RECOVERY_MODE")]
    pub recovery_mode: Option<String>,
    /// Most open RESP connections [default: 10000]
    #[arg(long, env = "TALLY_RESP_CONNECTIONS_MAX")]
    pub resp_connections_max: Option<usize>,
    /// Most open HTTP connections [default: 10000]
    #[arg(long, env = "TALLY_HTTP_CONNECTIONS_MAX")]
    pub http_connections_max: Option<usize>,
    /// Shared store: sqlite://PATH (nodes on one machine) or
    /// postgres://... (across machines). Without it the node runs alone.
    #[arg(long, env = "TALLY_STORE")]
    pub store: Option<String>,
    /// Address shown for this node in the cluster view [default: the HTTP
    /// address]
    #[arg(long, env = "TALLY_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    /// Longest wait before a changed counter is flushed to the store
    /// [default: 100]
    #[arg(long, env = "TALLY_FLUSH_INTERVAL_MS")]
    pub flush_interval_ms: Option<u64>,
    /// How often other nodes' shards are read from the store [default: 100]
    #[arg(long, env = "TALLY_REFRESH_INTERVAL_MS")]
    pub refresh_interval_ms: Option<u64>,
    /// How often an idle node heartbeats into the store [default: 1000]
    #[arg(long, env = "TALLY_HEARTBEAT_INTERVAL_MS")]
    pub heartbeat_interval_ms: Option<u64>,
    /// Log format: text or json [default: text]
    #[arg(long, env = "TALLY_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Log filter, e.g. info or tally=debug [default: info]
    #[arg(long, env = "TALLY_LOG")]
    pub log_level: Option<String>,
}

/// Everything `tally serve` runs with.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    pub node: Config,
    pub server: ServerConfig,
    pub log_json: bool,
    pub log_filter: String,
}

impl ServeArgs {
    /// Merges flags, environment and the TOML file into settings.
    pub fn resolve(self) -> Result<ServeSettings> {
        let file = match &self.config {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        let mut node = Config::new(
            self.data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("tally-data")),
        );
        node.node_id = self.node_id.or(file.node_id);
        if let Some(d) = self.durability.or(file.durability) {
            node.durability = d.parse::<Durability>()?;
        }
        if let Some(ms) = self.memory_sync_delay_ms.or(file.memory_sync_delay_ms) {
            node.memory_sync_delay = Duration::from_millis(ms);
        }
        if let Some(b) = self.segment_bytes_max.or(file.segment_bytes_max) {
            node.segment_bytes_max = b;
        }
        if let Some(b) = self.snapshot_journal_bytes.or(file.snapshot_journal_bytes) {
            node.snapshot_journal_bytes = b;
        }
        if let Some(s) = self
            .idempotency_retention_s
            .or(file.idempotency_retention_s)
        {
            node.idempotency_retention = Duration::from_secs(s);
        }
        if let Some(n) = self.idempotency_keys_max.or(file.idempotency_keys_max) {
            node.idempotency_keys_max = n;
        }
        if let Some(m) = self.recovery_mode.or(file.recovery_mode) {
            node.recovery_mode = m.parse::<RecoveryMode>()?;
        }
        let mut server = ServerConfig::default();
        if let Some(a) = self.resp_addr.or(file.resp_addr) {
            server.resp_addr = parse_listen_addr(&a)?;
        }
        if let Some(a) = self.http_addr.or(file.http_addr) {
            server.http_addr = parse_listen_addr(&a)?;
        }
        if let Some(n) = self.resp_connections_max.or(file.resp_connections_max) {
            server.resp_connections_max = n;
        }
        if let Some(n) = self.http_connections_max.or(file.http_connections_max) {
            server.http_connections_max = n;
        }
        if let Some(url) = self.store.or(file.store) {
            let mut c = tally::cluster::ClusterConfig::new(url);
            c.address = self
                .advertise_addr
                .or(file.advertise_addr)
                .or_else(|| server.http_addr.map(|a| a.to_string()))
                .unwrap_or_default();
            if let Some(ms) = self.flush_interval_ms.or(file.flush_interval_ms) {
                c.flush_interval = Duration::from_millis(ms);
            }
            if let Some(ms) = self.refresh_interval_ms.or(file.refresh_interval_ms) {
                c.refresh_interval = Duration::from_millis(ms);
            }
            if let Some(ms) = self.heartbeat_interval_ms.or(file.heartbeat_interval_ms) {
                c.heartbeat_interval = Duration::from_millis(ms);
            }
            node.cluster = Some(c);
        }
        let log_format = self
            .log_format
            .or(file.log_format)
            .unwrap_or_else(|| "text".into());
        let log_json = match log_format.as_str() {
            "text" => false,
            "json" => true,
            other => {
                return Err(tally::Error::InvalidInput {
                    what: "log format",
                    reason: format!("'{other}' is not text or json"),
                });
            }
        };
        Ok(ServeSettings {
            node,
            server,
            log_json,
            log_filter: self
                .log_level
                .or(file.log_level)
                .unwrap_or_else(|| "info".into()),
        })
    }
}

/// The optional TOML file: every key is optional and named like its flag
/// with dashes turned into underscores.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub node_id: Option<String>,
    pub durability: Option<String>,
    pub resp_addr: Option<String>,
    pub http_addr: Option<String>,
    pub memory_sync_delay_ms: Option<u64>,
    pub segment_bytes_max: Option<u64>,
    pub snapshot_journal_bytes: Option<u64>,
    pub idempotency_retention_s: Option<u64>,
    pub idempotency_keys_max: Option<usize>,
    pub recovery_mode: Option<String>,
    pub resp_connections_max: Option<usize>,
    pub http_connections_max: Option<usize>,
    pub log_format: Option<String>,
    pub log_level: Option<String>,
    pub store: Option<String>,
    pub advertise_addr: Option<String>,
    pub flush_interval_ms: Option<u64>,
    pub refresh_interval_ms: Option<u64>,
    pub heartbeat_interval_ms: Option<u64>,
}

impl FileConfig {
    /// Reads and parses a TOML configuration file.
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| tally::Error::InvalidInput {
            what: "config file",
            reason: format!("reading {}: {e}", path.display()),
        })?;
        toml::from_str(&text).map_err(|e| tally::Error::InvalidInput {
            what: "config file",
            reason: format!("{}: {}", path.display(), e.message()),
        })
    }
}

/// Parses `host:port`, or `off` / empty to disable a listener.
pub fn parse_listen_addr(s: &str) -> Result<Option<std::net::SocketAddr>> {
    if s.is_empty() || s == "off" {
        return Ok(None);
    }
    s.parse::<std::net::SocketAddr>()
        .map(Some)
        .map_err(|_| tally::Error::InvalidInput {
            what: "listen address",
            reason: format!("'{s}' is not host:port (for example 127.0.0.1:7379) or 'off'"),
        })
}
