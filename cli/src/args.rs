//! The command line: subcommands and their flags. The settings of
//! `tally serve`, which also come from the environment and a TOML file,
//! live in [`crate::settings`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::settings::{Draft, ServeSettings, Settings};

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
    /// Show the cluster at a glance: every node (state, epoch, address,
    /// host and pid, uptime, heartbeat, flush lag), the store, and the
    /// hottest counters, through any node's HTTP API.
    Status {
        #[command(flatten)]
        target: crate::client::Target,
        /// HAProxy's stats socket (`stats socket` in its configuration;
        /// `tally cluster` makes DIR/haproxy.sock): adds the load
        /// balancer's view of each server
        #[arg(long)]
        haproxy_socket: Option<PathBuf>,
        /// Print the views read, as JSON
        #[arg(long)]
        json: bool,
    },
    /// Manage node ids in the cluster.
    #[command(subcommand)]
    Node(NodeCommand),
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

/// `tally node ...`.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Take a node id out of the cluster view for good, once the node has
    /// stopped cleanly (its whole shard in the store); its shard keeps
    /// counting. Needs the admin role on a node with users.
    Retire {
        /// The node id to retire
        id: String,
        #[command(flatten)]
        target: crate::client::Target,
        /// Retire a node that is down without having stopped cleanly,
        /// giving up the increments its journal may hold beyond the store
        #[arg(long)]
        force: bool,
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
    /// Shared store [default: sqlite://DIR/store.db]; `private-ha-postgres`
    /// starts a highly available store in DIR/ha (etcd, Patroni,
    /// PostgreSQL with a synchronous standby, HAProxy) and stops it with
    /// the cluster
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
    /// Secure the cluster: a private CA and certificates, users with
    /// random secrets (all in DIR/secrets, made once and kept), nodes on
    /// TLS ports only with authentication, HAProxy over TLS to them with an
    /// authenticated RESP health check
    #[arg(long)]
    pub secure: bool,
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
            secure: self.secure,
            // Every node and HAProxy stop if this process dies, even by
            // kill -9: nothing of a cluster outlives its launcher.
            exit_with_launcher: true,
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
    /// DIR/postgres, which the store fault stops and starts;
    /// `private-ha-postgres` starts a highly available store of its own in
    /// DIR/ha (etcd, Patroni, PostgreSQL with a synchronous standby,
    /// HAProxy), which the primary-kill9, primary-freeze, switchover and
    /// etcd-kill9 faults act on
    #[arg(long, conflicts_with = "attach")]
    pub store: Option<String>,
    /// Drive the cluster that `tally cluster` runs, through its control
    /// endpoint (e.g. 127.0.0.1:7069), instead of starting one
    #[arg(long)]
    pub attach: Option<std::net::SocketAddr>,
    /// With --attach: the file holding the control endpoint's token,
    /// which `tally cluster` writes to DIR/control-token
    #[arg(long, default_value = "tally-cluster/control-token")]
    pub control_token_file: PathBuf,
    /// Secure the cluster the run starts as `tally cluster --secure` does;
    /// the clients then use TLS and the `app` user. An attached cluster
    /// says itself whether it is secured
    #[arg(long, conflicts_with = "attach")]
    pub secure: bool,
    /// Fault kinds to inject, each at least once: any of kill9, restart,
    /// pause, wipe, store, primary-kill9, primary-freeze, switchover,
    /// etcd-kill9. Store kinds the run cannot inject (no store of its own)
    /// are left out and said so
    #[arg(long, value_delimiter = ',',
          default_value = "kill9,restart,pause,wipe,store,primary-kill9,primary-freeze,switchover,etcd-kill9",
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
    tally_lab::chaos::Fault::from_name(s.trim()).ok_or_else(|| {
        let names: Vec<&str> = tally_lab::chaos::Fault::ALL
            .iter()
            .map(|f| f.name())
            .collect();
        format!("unknown fault '{s}': one of {}", names.join(", "))
    })
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

/// Flags of `tally serve`: the configuration file, and every setting (see
/// [`crate::settings`]).
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (keys named like the flags,
    /// with underscores).
    #[arg(long, env = "TALLY_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: Settings,
}

impl ServeArgs {
    /// Merges flags, environment and the TOML file over the defaults.
    pub fn resolve(self) -> anyhow::Result<ServeSettings> {
        let file = match &self.config {
            Some(p) => Settings::load(p)?,
            None => Settings::default(),
        };
        let mut draft = Draft::defaults();
        self.settings.or(file).apply(&mut draft)?;
        draft.finish()
    }
}

/// The command line, with the defaults of `tally serve` shown in its help.
pub fn command() -> clap::Command {
    Cli::command().mut_subcommand("serve", crate::settings::show_defaults)
}
