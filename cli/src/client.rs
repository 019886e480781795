//! `tally status` and `tally node retire`: an operator's view of a running
//! cluster, through any node's HTTP API (or the load balancer in front).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::Value;
use tally_lab::wire::access::{Access, Credentials, client_config};
use tally_lab::wire::http::request_blocking_with;

/// Longest wait for each step of a request to one node.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer read from a node.
const RESPONSE_BYTES_MAX: usize = 1024 * 1024;
/// Most hot counters `tally status` prints.
const HOT_SHOWN: usize = 10;

/// How to reach the cluster: shared by every command that talks to one.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// A node's (or the load balancer's) HTTP address: http://HOST:PORT,
    /// or https://HOST:PORT with --cacert
    #[arg(long, default_value = "http://127.0.0.1:7070", env = "TALLY_URL")]
    pub url: String,
    /// The CA certificate (PEM) that signed the node's certificate, for an
    /// https:// URL
    #[arg(long)]
    pub cacert: Option<PathBuf>,
    /// A file holding `user:secret`, sent as the bearer token (needed when
    /// the nodes have users)
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

impl Target {
    fn resolve(&self) -> anyhow::Result<(SocketAddr, Access)> {
        let (tls, rest) = if let Some(r) = self.url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = self.url.strip_prefix("http://") {
            (false, r)
        } else {
            bail!(
                "--url must start with http:// or https://, not '{}'",
                self.url
            );
        };
        let hostport = rest.trim_end_matches('/');
        let addr = hostport
            .to_socket_addrs()
            .with_context(|| format!("--url {}: not HOST:PORT", self.url))?
            .next()
            .with_context(|| format!("--url {}: the host has no address", self.url))?;
        let mut access = Access::open();
        match (tls, &self.cacert) {
            (true, Some(ca)) => access.tls = Some(client_config(ca)?),
            (true, None) => bail!("an https:// URL needs --cacert (the CA that signed the node)"),
            (false, Some(_)) => bail!("--cacert is for an https:// URL"),
            (false, None) => {}
        }
        if let Some(path) = &self.token_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --token-file {}", path.display()))?;
            let (user, secret) = text.trim().split_once(':').with_context(|| {
                format!("--token-file {} must hold user:secret", path.display())
            })?;
            access.credentials = Some(Credentials {
                user: user.into(),
                secret: secret.into(),
            });
        }
        Ok((addr, access))
    }
}

/// GET or POST `path` on `addr`; the JSON answer of a 200, else an error
/// with the node's message.
fn call(access: &Access, addr: SocketAddr, method: &str, path: &str) -> anyhow::Result<Value> {
    let r = request_blocking_with(
        access,
        addr,
        method,
        path,
        None,
        REQUEST_TIMEOUT,
        RESPONSE_BYTES_MAX,
    )
    .with_context(|| format!("{method} {path} on {addr}"))?;
    let body: Value = serde_json::from_str(&r.body).unwrap_or(Value::Null);
    if r.status != 200 {
        let why = body["error"].as_str().unwrap_or(r.body.trim());
        bail!("{method} {path} on {addr}: {} {why}", r.status);
    }
    Ok(body)
}

/// `tally status`: prints the cluster at a glance; with `json`, the views
/// it read.
pub fn status(target: &Target, json: bool) -> anyhow::Result<()> {
    let (addr, access) = target.resolve()?;
    let view = call(&access, addr, "GET", "/v1/cluster")?;
    // Each node's own hot counters, from the node itself.
    let mut hot: BTreeMap<String, f64> = BTreeMap::new();
    let mut unreachable = Vec::new();
    let mut per_node = serde_json::Map::new();
    for n in view["nodes"].as_array().into_iter().flatten() {
        let id = n["node_id"].as_str().unwrap_or("?").to_string();
        let theirs = if id == view["node_id"] {
            Some(view.clone())
        } else if n["state"] == "stopped" || n["state"] == "down" {
            None
        } else {
            match n["address"].as_str().map(str::parse::<SocketAddr>) {
                Some(Ok(a)) => match call(&access, a, "GET", "/v1/cluster") {
                    Ok(v) => Some(v),
                    Err(e) => {
                        unreachable.push(format!("{id}: {e:#}"));
                        None
                    }
                },
                _ => {
                    unreachable.push(format!("{id}: no address to ask"));
                    None
                }
            }
        };
        if let Some(v) = theirs {
            for h in v["hot_counters"].as_array().into_iter().flatten() {
                if let (Some(name), Some(rate)) =
                    (h["name"].as_str(), h["increments_per_second"].as_f64())
                {
                    *hot.entry(name.to_string()).or_default() += rate;
                }
            }
            per_node.insert(id, v["hot_counters"].clone());
        }
    }
    let mut hot: Vec<(String, f64)> = hot.into_iter().collect();
    hot.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    hot.truncate(HOT_SHOWN);
    if json {
        let out = serde_json::json!({
            "view": view,
            "hot_counters": hot.iter().map(|(n, r)| serde_json::json!({"name": n, "increments_per_second": r})).collect::<Vec<_>>(),
            "unreachable": unreachable,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    print!("{}", render(&target.url, &view, &hot, &unreachable));
    Ok(())
}

fn ms(v: &Value) -> String {
    let Some(ms) = v.as_u64() else {
        return "-".into();
    };
    match ms {
        0..1000 => format!("{ms} ms"),
        1000..120_000 => format!("{} s", ms / 1000),
        120_000..7_200_000 => format!("{} min", ms / 60_000),
        _ => format!("{} h {} min", ms / 3_600_000, ms / 60_000 % 60),
    }
}

fn render(url: &str, view: &Value, hot: &[(String, f64)], unreachable: &[String]) -> String {
    let mut o = String::new();
    let store = view["store"].as_str();
    let _ = writeln!(o, "cluster through {url} (node {})", text(&view["node_id"]));
    match store {
        None => {
            let _ = writeln!(o, "store      none: the node runs alone");
        }
        Some(backend) => {
            let reach = match view["store_error"].as_str() {
                None => "reachable".to_string(),
                Some(e) => format!("UNREACHABLE: {e}"),
            };
            let replication = match view["store_replication"].as_object() {
                Some(r) => format!(
                    ", {} standby(s), {} synchronous",
                    r["standbys"],
                    r["synchronous_standbys"]
                        .as_u64()
                        .map_or("?".into(), |s| s.to_string())
                ),
                None => String::new(),
            };
            let _ = writeln!(o, "store      {backend}, {reach}{replication}");
            if let Some(w) = view["store_warning"].as_str() {
                let _ = writeln!(o, "           note: {w}");
            }
            let _ = writeln!(
                o,
                "reads      at most {} ms stale (this node's last refresh {} ago); replicated: {}",
                text(&view["staleness_bound_ms"]),
                ms(&view["last_refresh_age_ms"]),
                if view["replicated_available"] == true {
                    "available"
                } else {
                    "UNAVAILABLE"
                }
            );
        }
    }
    let _ = writeln!(o);
    let header = [
        "NODE",
        "STATE",
        "EPOCH",
        "ADDRESS",
        "HOST",
        "PID",
        "UPTIME",
        "HEARTBEAT",
        "FLUSH LAG",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for n in view["nodes"].as_array().into_iter().flatten() {
        rows.push(vec![
            text(&n["node_id"]),
            text(&n["state"]),
            text(&n["epoch"]),
            text(&n["address"]),
            text(&n["host"]),
            text(&n["pid"]),
            ms(&n["uptime_ms"]),
            match n["heartbeat_age_ms"].as_u64() {
                Some(_) => format!("{} ago", ms(&n["heartbeat_age_ms"])),
                None => "-".into(),
            },
            text(&n["flush_lag"]),
        ]);
    }
    table(&mut o, &rows);
    for u in unreachable {
        let _ = writeln!(o, "  not asked for its hot counters: {u}");
    }
    let _ = writeln!(o);
    if hot.is_empty() {
        let _ = writeln!(o, "hottest counters: none sampled in the last 10 s");
    } else {
        let _ = writeln!(
            o,
            "hottest counters (increments/s over the last 10 s, all nodes):"
        );
        let mut rows = vec![vec!["COUNTER".to_string(), "INCREMENTS/S".to_string()]];
        for (name, rate) in hot {
            rows.push(vec![name.clone(), format!("{rate:.0}")]);
        }
        table(&mut o, &rows);
    }
    o
}

/// A JSON value as a cell: strings bare, absent as `-`.
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Left-aligned columns, two spaces apart.
fn table(o: &mut String, rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, s)| format!("{s:<w$}", w = widths[c]))
            .collect();
        let _ = writeln!(o, "{}", line.join("  ").trim_end());
    }
}

/// `tally node retire ID`.
pub fn retire(target: &Target, id: &str, force: bool) -> anyhow::Result<()> {
    let (addr, access) = target.resolve()?;
    let path = format!("/v1/nodes/{}/retire?force={force}", percent_encode(id));
    let body = call(&access, addr, "POST", &path)?;
    println!(
        "node {} retired (it last served {}); its shard keeps counting",
        text(&body["node_id"]),
        text(&body["address"])
    );
    Ok(())
}

/// A node id as one path segment.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}
