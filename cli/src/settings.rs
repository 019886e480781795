//! The settings of `tally serve`, each declared once.
//!
//! One entry of the `settings!` list below gives a setting's flag, its
//! environment variable, its key in the TOML file (the flag's name with
//! underscores), the library field it sets, how its default is shown and
//! how a given value is applied. The macro turns the list into
//! [`Settings`], one struct that clap fills from flags and environment and
//! serde fills from the file, into the merge of the two and into
//! [`SETTINGS`], the list as data for `--help`, error messages and tests.
//!
//! Precedence: flag, then environment variable (`TALLY_*`), then the TOML
//! file named by `--config`, then the default. Clap settles the first two;
//! [`Settings::or`] puts them over the file.
//!
//! Defaults are never written here: `--help` shows the values of
//! `Config::new`, `ServerConfig::default()` and `ClusterConfig::new`,
//! read when the command is built. Only what the library has no default
//! for (the data directory, logging) is defaulted here, in [`Draft`].

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use tally::cluster::ClusterConfig;
use tally::config::{Config, ServerConfig};

/// Where a node keeps its data unless told otherwise. The library has no
/// default: an embedder always names the directory.
pub const DATA_DIR_DEFAULT: &str = "tally-data";
/// Log filter unless told otherwise.
pub const LOG_FILTER_DEFAULT: &str = "info";

/// One setting as data: what `--help`, error messages and tests need.
pub struct Setting {
    /// The field of [`Settings`], which is also the TOML key; the flag is
    /// this with dashes.
    pub key: &'static str,
    /// The environment variable clap reads.
    pub env: &'static str,
    /// The library field it sets, as `Config::field`; `None` for the
    /// binary's own settings (logging).
    pub sets: Option<&'static str>,
    /// Whether it is one of the named limits of docs/design.md §10.
    // Read only by the test that keeps that table in step with the code.
    #[cfg_attr(not(test), allow(dead_code))]
    pub limit: bool,
    /// The default as `--help` shows it, read from the defaults; `None`
    /// shows none.
    pub default: fn(&Draft) -> Option<String>,
}

impl Setting {
    /// The command-line flag, e.g. `--memory-sync-delay-ms`.
    pub fn flag(&self) -> String {
        format!("--{}", self.key.replace('_', "-"))
    }

    /// The three ways to give it, for error messages.
    pub fn describe(&self) -> String {
        format!(
            "{} ({}, or {} in the config file)",
            self.flag(),
            self.env,
            self.key
        )
    }
}

/// Declares every setting once; see the module documentation.
macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])+
        $key:ident: $ty:ty {
            env: $env:literal,
            sets: $sets:expr,
            limit: $limit:literal,
            default: $default:expr,
            apply: $apply:expr $(,)?
        }
    )+) => {
        /// Every setting of `tally serve`, as flags with their environment
        /// variables and as the keys of the TOML file; `None` where not
        /// given.
        #[derive(Debug, Default, clap::Args, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct Settings {
            $(
                $(#[doc = $doc])+
                #[arg(long, env = $env)]
                pub $key: Option<$ty>,
            )+
        }

        impl Settings {
            /// Each setting from `self` where given, else from `lower`.
            pub fn or(self, lower: Settings) -> Settings {
                Settings { $($key: self.$key.or(lower.$key)),+ }
            }

            /// Writes every given setting over `draft`; an invalid value is
            /// refused naming its flag, variable and key.
            pub fn apply(self, draft: &mut Draft) -> anyhow::Result<()> {
                $(
                    if let Some(value) = self.$key {
                        let apply: fn(&mut Draft, $ty) -> Result<(), String> = $apply;
                        apply(draft, value).map_err(|reason| {
                            anyhow::anyhow!("invalid {}: {reason}", setting(stringify!($key)).describe())
                        })?;
                    }
                )+
                Ok(())
            }
        }

        /// Every setting, in the order of `--help`.
        pub const SETTINGS: &[Setting] = &[
            $(Setting {
                key: stringify!($key),
                env: $env,
                sets: $sets,
                limit: $limit,
                default: $default,
            }),+
        ];
    };
}

settings! {
    /// Directory for the node id, journal and snapshots
    data_dir: PathBuf {
        env: "TALLY_DATA_DIR",
        sets: Some("Config::data_dir"),
        limit: false,
        default: |d| Some(d.node.data_dir.display().to_string()),
        apply: |d, v| {
            d.node.data_dir = v;
            Ok(())
        },
    }
    /// Node id; persisted in the data directory on first start
    node_id: String {
        env: "TALLY_NODE_ID",
        sets: Some("Config::node_id"),
        limit: false,
        default: |d| Some(d.node.node_id.clone().unwrap_or_else(|| "random".into())),
        apply: |d, v| {
            d.node.node_id = Some(v);
            Ok(())
        },
    }
    /// Durability of requests that do not ask for one: memory, local or
    /// replicated
    durability: String {
        env: "TALLY_DURABILITY",
        sets: Some("Config::durability"),
        limit: false,
        default: |d| Some(d.node.durability.to_string()),
        apply: |d, v| {
            d.node.durability = parse(&v)?;
            Ok(())
        },
    }
    /// RESP listen address, or "off"
    resp_addr: String {
        env: "TALLY_RESP_ADDR",
        sets: Some("ServerConfig::resp_addr"),
        limit: false,
        default: |d| Some(show_listen_addr(d.server.resp_addr)),
        apply: |d, v| {
            d.server.resp_addr = parse_listen_addr(&v)?;
            Ok(())
        },
    }
    /// HTTP listen address, or "off"
    http_addr: String {
        env: "TALLY_HTTP_ADDR",
        sets: Some("ServerConfig::http_addr"),
        limit: false,
        default: |d| Some(show_listen_addr(d.server.http_addr)),
        apply: |d, v| {
            d.server.http_addr = parse_listen_addr(&v)?;
            Ok(())
        },
    }
    /// RESP over TLS listen address, or "off" (needs --tls-cert and
    /// --tls-key)
    resp_tls_addr: String {
        env: "TALLY_RESP_TLS_ADDR",
        sets: Some("ServerConfig::resp_tls_addr"),
        limit: false,
        default: |d| Some(show_listen_addr(d.server.resp_tls_addr)),
        apply: |d, v| {
            d.server.resp_tls_addr = parse_listen_addr(&v)?;
            Ok(())
        },
    }
    /// HTTPS listen address, or "off" (needs --tls-cert and --tls-key)
    https_addr: String {
        env: "TALLY_HTTPS_ADDR",
        sets: Some("ServerConfig::https_addr"),
        limit: false,
        default: |d| Some(show_listen_addr(d.server.https_addr)),
        apply: |d, v| {
            d.server.https_addr = parse_listen_addr(&v)?;
            Ok(())
        },
    }
    /// Certificate chain (PEM, leaf first) of the TLS ports; read again on
    /// SIGHUP
    tls_cert: PathBuf {
        env: "TALLY_TLS_CERT",
        sets: Some("ServerConfig::tls"),
        limit: false,
        default: |_| None,
        apply: |d, v| {
            d.tls_cert = Some(v);
            Ok(())
        },
    }
    /// Private key (PEM) of the TLS ports; read again on SIGHUP. It must be
    /// readable by its owner only
    tls_key: PathBuf {
        env: "TALLY_TLS_KEY",
        sets: Some("ServerConfig::tls"),
        limit: false,
        default: |_| None,
        apply: |d, v| {
            check_private(&v)?;
            d.tls_key = Some(v);
            Ok(())
        },
    }
    /// CA certificates (PEM): with it, every TLS client must present a
    /// certificate signed by one of them (mutual TLS)
    tls_client_ca: PathBuf {
        env: "TALLY_TLS_CLIENT_CA",
        sets: Some("ServerConfig::tls"),
        limit: false,
        default: |_| None,
        apply: |d, v| {
            d.tls_client_ca = Some(v);
            Ok(())
        },
    }
    /// Longest delay before a `memory` increment is synced
    memory_sync_delay_ms: u64 {
        env: "TALLY_MEMORY_SYNC_DELAY_MS",
        sets: Some("Config::memory_sync_delay"),
        limit: false,
        default: |d| Some(d.node.memory_sync_delay.as_millis().to_string()),
        apply: |d, v| {
            d.node.memory_sync_delay = Duration::from_millis(v);
            Ok(())
        },
    }
    /// Journal segment size before a new one starts
    segment_bytes_max: u64 {
        env: "TALLY_SEGMENT_BYTES_MAX",
        sets: Some("Config::segment_bytes_max"),
        limit: true,
        default: |d| Some(d.node.segment_bytes_max.to_string()),
        apply: |d, v| {
            d.node.segment_bytes_max = v;
            Ok(())
        },
    }
    /// Journal bytes between snapshots
    snapshot_journal_bytes: u64 {
        env: "TALLY_SNAPSHOT_JOURNAL_BYTES",
        sets: Some("Config::snapshot_journal_bytes"),
        limit: true,
        default: |d| Some(d.node.snapshot_journal_bytes.to_string()),
        apply: |d, v| {
            d.node.snapshot_journal_bytes = v;
            Ok(())
        },
    }
    /// How long idempotency keys are remembered, in seconds
    idempotency_retention_s: u64 {
        env: "TALLY_IDEMPOTENCY_RETENTION_S",
        sets: Some("Config::idempotency_retention"),
        limit: true,
        default: |d| Some(d.node.idempotency_retention.as_secs().to_string()),
        apply: |d, v| {
            d.node.idempotency_retention = Duration::from_secs(v);
            Ok(())
        },
    }
    /// Most idempotency keys held at once
    idempotency_keys_max: usize {
        env: "TALLY_IDEMPOTENCY_KEYS_MAX",
        sets: Some("Config::idempotency_keys_max"),
        limit: true,
        default: |d| Some(d.node.idempotency_keys_max.to_string()),
        apply: |d, v| {
            d.node.idempotency_keys_max = v;
            Ok(())
        },
    }
    /// strict, or truncate-at-corruption to accept losing every journal
    /// record after a corrupt one
    recovery_mode: String {
        env: "TALLY_RECOVERY_MODE",
        sets: Some("Config::recovery_mode"),
        limit: false,
        default: |d| Some(d.node.recovery_mode.to_string()),
        apply: |d, v| {
            d.node.recovery_mode = parse(&v)?;
            Ok(())
        },
    }
    /// Most open RESP connections
    resp_connections_max: usize {
        env: "TALLY_RESP_CONNECTIONS_MAX",
        sets: Some("ServerConfig::resp_connections_max"),
        limit: true,
        default: |d| Some(d.server.resp_connections_max.to_string()),
        apply: |d, v| {
            d.server.resp_connections_max = v;
            Ok(())
        },
    }
    /// Most open HTTP connections
    http_connections_max: usize {
        env: "TALLY_HTTP_CONNECTIONS_MAX",
        sets: Some("ServerConfig::http_connections_max"),
        limit: true,
        default: |d| Some(d.server.http_connections_max.to_string()),
        apply: |d, v| {
            d.server.http_connections_max = v;
            Ok(())
        },
    }
    /// File of users, one per line: NAME ROLE SECRET (roles read, write,
    /// admin); it must be readable by its owner only. Without it every
    /// client may do everything
    users_file: PathBuf {
        env: "TALLY_USERS_FILE",
        sets: Some("ServerConfig::users"),
        limit: false,
        default: |_| None,
        apply: |d, v| {
            d.server.users = read_users_file(&v)?;
            Ok(())
        },
    }
    /// Serve clients without authentication on a non-loopback address
    /// (true or false); without users the node otherwise refuses to start
    /// there
    insecure_no_auth: bool {
        env: "TALLY_INSECURE_NO_AUTH",
        sets: None,
        limit: false,
        default: |d| Some(d.insecure_no_auth.to_string()),
        apply: |d, v| {
            d.insecure_no_auth = v;
            Ok(())
        },
    }
    /// With users: leave GET /metrics open to clients without credentials
    /// (true or false), for scrapers that cannot send any
    metrics_without_auth: bool {
        env: "TALLY_METRICS_WITHOUT_AUTH",
        sets: Some("ServerConfig::metrics_without_auth"),
        limit: false,
        default: |d| Some(d.server.metrics_without_auth.to_string()),
        apply: |d, v| {
            d.server.metrics_without_auth = v;
            Ok(())
        },
    }
    /// Shared store: sqlite://PATH (nodes on one machine) or
    /// postgres://... (across machines). Without it the node runs alone.
    store: String {
        env: "TALLY_STORE",
        sets: Some("Config::cluster"),
        limit: false,
        default: |d| d.store.clone(),
        apply: |d, v| {
            // Checked now, before the data directory or a node id exists,
            // so that a mistyped URL changes nothing on disk.
            tally::store::check_url(&v).map_err(|e| e.to_string())?;
            d.store = Some(v);
            Ok(())
        },
    }
    /// Address shown for this node in the cluster view
    advertise_addr: String {
        env: "TALLY_ADVERTISE_ADDR",
        sets: Some("ClusterConfig::address"),
        limit: false,
        default: |d| Some(d.advertise_addr.clone().unwrap_or_else(|| "the HTTP address".into())),
        apply: |d, v| {
            d.advertise_addr = Some(v);
            Ok(())
        },
    }
    /// Longest wait before a changed counter is flushed to the store
    flush_interval_ms: u64 {
        env: "TALLY_FLUSH_INTERVAL_MS",
        sets: Some("ClusterConfig::flush_interval"),
        limit: false,
        default: |d| Some(d.cluster.flush_interval.as_millis().to_string()),
        apply: |d, v| {
            d.cluster.flush_interval = Duration::from_millis(v);
            Ok(())
        },
    }
    /// How often other nodes' shards are read from the store
    refresh_interval_ms: u64 {
        env: "TALLY_REFRESH_INTERVAL_MS",
        sets: Some("ClusterConfig::refresh_interval"),
        limit: false,
        default: |d| Some(d.cluster.refresh_interval.as_millis().to_string()),
        apply: |d, v| {
            d.cluster.refresh_interval = Duration::from_millis(v);
            Ok(())
        },
    }
    /// How often an idle node heartbeats into the store
    heartbeat_interval_ms: u64 {
        env: "TALLY_HEARTBEAT_INTERVAL_MS",
        sets: Some("ClusterConfig::heartbeat_interval"),
        limit: false,
        default: |d| Some(d.cluster.heartbeat_interval.as_millis().to_string()),
        apply: |d, v| {
            d.cluster.heartbeat_interval = Duration::from_millis(v);
            Ok(())
        },
    }
    /// Start even if another live process holds this node id, fencing it
    /// (true or false); without it such a start is refused, naming the
    /// host and pid found
    takeover: bool {
        env: "TALLY_TAKEOVER",
        sets: Some("ClusterConfig::takeover"),
        limit: false,
        default: |d| Some(d.cluster.takeover.to_string()),
        apply: |d, v| {
            d.cluster.takeover = v;
            Ok(())
        },
    }
    /// Log format: text or json
    log_format: String {
        env: "TALLY_LOG_FORMAT",
        sets: None,
        limit: false,
        default: |d| Some(if d.log_json { "json" } else { "text" }.into()),
        apply: |d, v| {
            d.log_json = match v.as_str() {
                "text" => false,
                "json" => true,
                other => return Err(format!("'{other}' is not text or json")),
            };
            Ok(())
        },
    }
    /// Log filter, e.g. info or tally=debug
    log_level: String {
        env: "TALLY_LOG_LEVEL",
        sets: None,
        limit: false,
        default: |d| Some(d.log_filter.clone()),
        apply: |d, v| {
            d.log_filter = v;
            Ok(())
        },
    }
}

/// The setting whose key is `key`. Panics on a key not declared above,
/// which only code in this module passes.
fn setting(key: &str) -> &'static Setting {
    SETTINGS
        .iter()
        .find(|s| s.key == key)
        .unwrap_or_else(|| panic!("no setting {key}"))
}

impl Settings {
    /// Reads and parses a TOML configuration file.
    pub fn load(path: &Path) -> tally::Result<Settings> {
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

/// Settings being built: the library's defaults with the given settings
/// written over them. The cluster's settings wait here until the end,
/// since they apply only if a store was given.
#[derive(Debug, Clone)]
pub struct Draft {
    pub node: Config,
    pub server: ServerConfig,
    pub cluster: ClusterConfig,
    pub store: Option<String>,
    pub advertise_addr: Option<String>,
    pub insecure_no_auth: bool,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub log_json: bool,
    pub log_filter: String,
}

/// Refuses a file of secrets that other users may read.
fn check_private(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} may be read by other users (mode {:o}); it holds secrets: chmod 600 it",
            path.display(),
            mode & 0o777
        ));
    }
    Ok(())
}

/// Reads and parses a users file, refusing one that other users may read
/// (it holds secrets). Errors never quote a secret.
fn read_users_file(path: &Path) -> Result<tally::auth::Users, String> {
    check_private(path)?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let users = tally::auth::Users::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if !users.enabled() {
        return Err(format!("{} names no user", path.display()));
    }
    Ok(users)
}

impl Draft {
    /// The defaults: the library's, and the binary's own for what the
    /// library leaves to its caller.
    pub fn defaults() -> Draft {
        Draft {
            node: Config::new(DATA_DIR_DEFAULT),
            server: ServerConfig::default(),
            // The URL is replaced by `--store` before this is used.
            cluster: ClusterConfig::new(String::new()),
            store: None,
            advertise_addr: None,
            insecure_no_auth: false,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            log_json: false,
            log_filter: LOG_FILTER_DEFAULT.into(),
        }
    }

    /// What `tally serve` runs with; an error for TLS settings that do not
    /// go together.
    pub fn finish(self) -> anyhow::Result<ServeSettings> {
        let Draft {
            mut node,
            mut server,
            mut cluster,
            store,
            advertise_addr,
            insecure_no_auth,
            tls_cert,
            tls_key,
            tls_client_ca,
            log_json,
            log_filter,
        } = self;
        let tls_port = server.resp_tls_addr.is_some() || server.https_addr.is_some();
        server.tls = match (tls_cert, tls_key) {
            (Some(cert), Some(key)) => Some(tally::config::TlsFiles {
                cert,
                key,
                client_ca: tls_client_ca,
            }),
            (None, None) if tls_client_ca.is_none() => None,
            _ => anyhow::bail!(
                "TLS needs both --tls-cert (TALLY_TLS_CERT) and --tls-key (TALLY_TLS_KEY)"
            ),
        };
        match (tls_port, server.tls.is_some()) {
            (true, false) => {
                anyhow::bail!("--resp-tls-addr and --https-addr need --tls-cert and --tls-key")
            }
            (false, true) => anyhow::bail!(
                "--tls-cert is given but no TLS port: give --resp-tls-addr or --https-addr"
            ),
            _ => {}
        }
        if let Some(url) = store {
            cluster.store_url = url;
            cluster.address = advertise_addr
                .or_else(|| server.http_addr.map(|a| a.to_string()))
                .unwrap_or_default();
            node.cluster = Some(cluster);
        }
        Ok(ServeSettings {
            node,
            server,
            insecure_no_auth,
            log_json,
            log_filter,
        })
    }
}

/// Everything `tally serve` runs with.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    pub node: Config,
    pub server: ServerConfig,
    /// Serve without users on a non-loopback address.
    pub insecure_no_auth: bool,
    pub log_json: bool,
    pub log_filter: String,
}

/// Adds `[default: ...]` to the help of every setting of `serve`, read
/// from the defaults now, so that the help cannot drift from the library.
pub fn show_defaults(serve: clap::Command) -> clap::Command {
    let defaults = Draft::defaults();
    SETTINGS.iter().fold(serve, |cmd, s| {
        let Some(value) = (s.default)(&defaults) else {
            return cmd;
        };
        cmd.mut_arg(s.key, |arg| {
            let with_default =
                |help: &clap::builder::StyledStr| format!("{help} [default: {value}]");
            let help = arg.get_help().map(with_default);
            let long_help = arg.get_long_help().map(with_default);
            let arg = match help {
                Some(h) => arg.help(h),
                None => arg,
            };
            match long_help {
                Some(h) => arg.long_help(h),
                None => arg,
            }
        })
    })
}

/// The setting that sets the library field `field`: a field of `Config`
/// or `ServerConfig` by its bare name (as [`tally::Error::InvalidConfig`]
/// gives it), or any field qualified (`ClusterConfig::flush_interval`).
pub fn setting_for_field(field: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| {
        s.sets.is_some_and(|sets| {
            sets == field
                || ["Config::", "ServerConfig::"]
                    .iter()
                    .any(|ty| sets.strip_prefix(ty) == Some(field))
        })
    })
}

/// `text` with every qualified library field that a setting sets
/// (`Config::recovery_mode`) replaced by its flag (`--recovery-mode`).
pub fn name_flags(text: &str) -> String {
    let mut out = text.to_string();
    for s in SETTINGS {
        let Some(sets) = s.sets else { continue };
        let mut from = 0;
        while let Some(i) = out[from..].find(sets).map(|i| i + from) {
            let end = i + sets.len();
            let word = |c: char| c.is_alphanumeric() || c == '_';
            // `ClusterConfig::x` must not be read as `Config::x`, nor
            // `Config::x` as the start of `Config::x_max`.
            let whole = !out[..i].ends_with(word) && !out[end..].starts_with(word);
            if whole {
                let flag = s.flag();
                out.replace_range(i..end, &flag);
                from = i + flag.len();
            } else {
                from = end;
            }
        }
    }
    out
}

/// An error as the binary prints it: its chain joined like anyhow's `{:#}`,
/// with the library's field names turned into the flags that set them.
pub fn render_error(e: &anyhow::Error) -> String {
    e.chain()
        .map(|cause| match cause.downcast_ref::<tally::Error>() {
            Some(tally::Error::InvalidConfig { field, reason }) => match setting_for_field(field) {
                Some(s) => format!("invalid {}: {}", s.describe(), name_flags(reason)),
                None => name_flags(&cause.to_string()),
            },
            _ => name_flags(&cause.to_string()),
        })
        .collect::<Vec<_>>()
        .join(": ")
}

/// Parses a library enum, keeping only the reason of its error: the
/// caller names the setting.
fn parse<T: FromStr<Err = tally::Error>>(s: &str) -> Result<T, String> {
    s.parse::<T>().map_err(|e| match e {
        tally::Error::InvalidInput { reason, .. } | tally::Error::InvalidConfig { reason, .. } => {
            reason
        }
        other => other.to_string(),
    })
}

/// Parses `host:port`, or `off` / empty to disable a listener.
pub fn parse_listen_addr(s: &str) -> Result<Option<std::net::SocketAddr>, String> {
    if s.is_empty() || s == "off" {
        return Ok(None);
    }
    s.parse::<std::net::SocketAddr>()
        .map(Some)
        .map_err(|_| format!("'{s}' is not host:port (for example 127.0.0.1:7379) or 'off'"))
}

fn show_listen_addr(addr: Option<std::net::SocketAddr>) -> String {
    addr.map_or_else(|| "off".into(), |a| a.to_string())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use clap::FromArgMatches;

    use super::*;

    fn repo_file(name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The text of the section that starts with `heading`, up to the next
    /// section of the same level.
    fn section<'a>(text: &'a str, heading: &str) -> &'a str {
        let start = text
            .find(&format!("\n{heading}\n"))
            .unwrap_or_else(|| panic!("no section {heading}"));
        let rest = &text[start + heading.len() + 2..];
        &rest[..rest.find("\n## ").unwrap_or(rest.len())]
    }

    /// The body rows of every Markdown table in `text`, as trimmed cells.
    fn table_rows(text: &str) -> Vec<Vec<String>> {
        let mut rows = Vec::new();
        let mut in_header = true;
        for line in text.lines().map(str::trim) {
            let Some(inner) = line.strip_prefix('|').and_then(|l| l.strip_suffix('|')) else {
                in_header = true;
                continue;
            };
            let cells: Vec<String> = inner.split('|').map(|c| c.trim().to_string()).collect();
            if cells.iter().all(|c| c.trim_matches(['-', ':']).is_empty()) {
                in_header = false;
            } else if !in_header {
                rows.push(cells);
            }
        }
        rows
    }

    /// A quantity as docs write it and as `Debug` prints it.
    #[derive(Debug, PartialEq)]
    enum Quantity {
        Count(u128),
        Nanos(u128),
    }

    /// Reads the number at the start of `s` and the unit after it:
    /// `64 MiB`, `10,000`, `30 s, then disconnect`, `100ms`, `1024 commands`.
    fn quantity(s: &str) -> Option<Quantity> {
        let s = s.trim().trim_start_matches('`');
        let digits_len = s
            .find(|c: char| !(c.is_ascii_digit() || c == ','))
            .unwrap_or(s.len());
        let n: u128 = s[..digits_len].replace(',', "").parse().ok()?;
        let unit = s[digits_len..]
            .split_whitespace()
            .next()
            .unwrap_or("")
            .trim_end_matches(|c: char| !c.is_alphanumeric());
        Some(match unit {
            "KiB" => Quantity::Count(n << 10),
            "MiB" => Quantity::Count(n << 20),
            "GiB" => Quantity::Count(n << 30),
            "ns" => Quantity::Nanos(n),
            "µs" => Quantity::Nanos(n * 1_000),
            "ms" => Quantity::Nanos(n * 1_000_000),
            "s" => Quantity::Nanos(n * 1_000_000_000),
            "min" => Quantity::Nanos(n * 60 * 1_000_000_000),
            "h" => Quantity::Nanos(n * 3600 * 1_000_000_000),
            // A count of something named after it: bytes, commands, ...
            _ => Quantity::Count(n),
        })
    }

    /// The top-level fields of a struct's pretty `Debug`, as printed.
    fn debug_fields(debug: &str) -> HashMap<String, String> {
        debug
            .lines()
            .filter_map(|l| l.strip_prefix("    "))
            .filter(|l| !l.starts_with(' '))
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.to_string(), v.trim_end_matches(',').to_string()))
            .collect()
    }

    /// The library's defaults by qualified field, e.g. `Config::segment_bytes_max`,
    /// read from `Debug` so that no field is listed twice.
    fn library_defaults() -> HashMap<String, String> {
        let mut all = HashMap::new();
        for (ty, debug) in [
            ("Config", format!("{:#?}", Config::new(DATA_DIR_DEFAULT))),
            ("ServerConfig", format!("{:#?}", ServerConfig::default())),
            ("ClusterConfig", format!("{:#?}", ClusterConfig::new(""))),
        ] {
            for (field, value) in debug_fields(&debug) {
                all.insert(format!("{ty}::{field}"), value);
            }
        }
        all
    }

    // docs/design.md §10 gives each library limit its default value, and
    // every limit `tally serve` sets has a row there.
    #[test]
    fn design_named_limits_match_the_library_defaults() {
        let design = repo_file("docs/design.md");
        let rows = table_rows(section(&design, "## 10. Named limits"));
        let defaults = library_defaults();
        let mut checked = 0;
        let mut wheres = Vec::new();
        for row in &rows {
            let [limit, value, place] = &row[..] else {
                panic!("§10 row {row:?} is not limit | value | where");
            };
            let place = place.trim_matches('`');
            wheres.push(place.to_string());
            let Some((ty, _)) = place.split_once("::") else {
                continue;
            };
            if !["Config", "ServerConfig", "ClusterConfig"].contains(&ty) {
                continue;
            }
            let code = defaults
                .get(place)
                .unwrap_or_else(|| panic!("§10 row {limit:?} names {place}, which does not exist"));
            let documented = quantity(value)
                .unwrap_or_else(|| panic!("§10 row {limit:?}: cannot read {value:?}"));
            let actual = quantity(code)
                .unwrap_or_else(|| panic!("{place} = {code}: not a number or a duration"));
            assert_eq!(
                documented, actual,
                "§10 row {limit:?} says {value:?}, but {place} is {code}"
            );
            checked += 1;
        }
        assert!(checked >= 10, "only {checked} rows name a library field");
        for s in SETTINGS.iter().filter(|s| s.limit) {
            let sets = s.sets.expect("a limit sets a library field");
            assert!(
                wheres.iter().any(|w| w == sets),
                "{} is a limit, but docs/design.md §10 has no row for {sets}",
                s.flag()
            );
        }
    }

    // A new `_max` setting is marked a limit, so the check above sees it.
    #[test]
    fn every_max_setting_is_a_limit() {
        for s in SETTINGS {
            if s.key.ends_with("_max") {
                assert!(s.limit, "{} is not marked a limit", s.key);
            }
        }
    }

    // The README's table of flags names real flags with the defaults
    // `--help` shows.
    #[test]
    fn readme_flag_table_matches_the_settings() {
        let readme = repo_file("README.md");
        let defaults = Draft::defaults();
        let mut checked = 0;
        for row in table_rows(section(&readme, "## Operating")) {
            let flags: Vec<&str> = row[0].split('`').filter(|t| t.starts_with("--")).collect();
            if flags.is_empty() {
                continue;
            }
            let values: Vec<&str> = if flags.len() > 1 {
                row[1].split(", ").collect()
            } else {
                vec![row[1].as_str()]
            };
            assert_eq!(values.len(), flags.len(), "README row {row:?}");
            for (flag, value) in flags.iter().zip(values) {
                let s = SETTINGS
                    .iter()
                    .find(|s| s.flag() == *flag)
                    .unwrap_or_else(|| panic!("README names {flag}, which `tally serve` lacks"));
                let value = value.replace('`', "");
                let value = value.trim().trim_start_matches("./");
                let default = (s.default)(&defaults).unwrap_or_else(|| "none".into());
                let rest = value.strip_prefix(default.as_str());
                assert!(
                    rest.is_some_and(|r| !r.starts_with(|c: char| c.is_alphanumeric())),
                    "README gives {flag} the default {value:?}; --help shows {default:?}"
                );
                checked += 1;
            }
        }
        assert!(checked >= 10, "only {checked} flags in the README's table");
    }

    // Each entry's flag and variable are the ones clap reads, so that error
    // messages name them right.
    #[test]
    fn settings_describe_the_flags_clap_reads() {
        let cmd = crate::args::command();
        let serve = cmd.find_subcommand("serve").unwrap();
        for s in SETTINGS {
            let arg = serve
                .get_arguments()
                .find(|a| a.get_id() == s.key)
                .unwrap_or_else(|| panic!("no argument {}", s.key));
            assert_eq!(Some(&s.flag()[2..]), arg.get_long(), "{}", s.key);
            assert_eq!(Some(std::ffi::OsStr::new(s.env)), arg.get_env());
        }
    }

    // The file takes every setting by its key and nothing else, not even
    // `config`.
    #[test]
    fn file_keys_are_the_settings() {
        for s in SETTINGS {
            let as_number = toml::from_str::<Settings>(&format!("{} = 1", s.key));
            let as_text = toml::from_str::<Settings>(&format!("{} = \"1\"", s.key));
            let as_bool = toml::from_str::<Settings>(&format!("{} = true", s.key));
            assert!(
                as_number.is_ok() || as_text.is_ok() || as_bool.is_ok(),
                "{}",
                s.key
            );
        }
        let err = toml::from_str::<Settings>("config = \"x.toml\"").unwrap_err();
        assert!(err.message().contains("unknown field"), "{err}");
    }

    // A flag beats the file; the file fills what no flag gives; the
    // defaults fill the rest.
    #[test]
    fn flags_beat_the_file_which_beats_the_defaults() {
        let matches = crate::args::command()
            .try_get_matches_from([
                "tally",
                "serve",
                "--node-id",
                "flag",
                "--flush-interval-ms",
                "7",
            ])
            .unwrap();
        let crate::args::Command::Serve(args) = crate::args::Cli::from_arg_matches(&matches)
            .unwrap()
            .command
        else {
            panic!("not serve");
        };
        let file: Settings =
            toml::from_str("node_id = \"file\"\nhttp_addr = \"off\"\nstore = \"sqlite://s.db\"\n")
                .unwrap();
        let mut draft = Draft::defaults();
        args.settings.or(file).apply(&mut draft).unwrap();
        let got = draft.finish().unwrap();
        let want = Draft::defaults().finish().unwrap();
        assert_eq!(got.node.node_id.as_deref(), Some("flag"));
        assert_eq!(got.server.http_addr, None);
        assert_eq!(got.server.resp_addr, want.server.resp_addr);
        let cluster = got.node.cluster.expect("store from the file");
        assert_eq!(cluster.store_url, "sqlite://s.db");
        assert_eq!(cluster.flush_interval, Duration::from_millis(7));
        assert_eq!(cluster.address, "", "no HTTP address to advertise");
        assert_eq!(got.node.segment_bytes_max, want.node.segment_bytes_max);
    }

    // Library errors name fields; printed by the binary they name flags.
    #[test]
    fn library_fields_are_printed_as_flags() {
        let e = anyhow::Error::new(tally::Error::InvalidConfig {
            field: "cluster",
            reason: "needed".into(),
        })
        .context("cannot open the node");
        let text = render_error(&e);
        assert!(
            text.starts_with("cannot open the node: invalid --store (TALLY_STORE"),
            "{text}"
        );
        let e = anyhow::Error::new(tally::Error::InvalidConfig {
            field: "durability",
            reason: "no".into(),
        });
        assert!(render_error(&e).contains("--durability"));
        assert_eq!(
            name_flags("Set Config::recovery_mode to truncate-at-corruption"),
            "Set --recovery-mode to truncate-at-corruption"
        );
        assert_eq!(
            name_flags("Config::idempotency_keys_max, ClusterConfig::address"),
            "--idempotency-keys-max, --advertise-addr"
        );
        // Fields no setting sets, and look-alikes, stay as they are.
        let plain = "ClusterConfig::replicated_queue_max and Config::segment_bytes_maximal";
        assert_eq!(name_flags(plain), plain);
    }
}
