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

/// Longest wait for HAProxy's stats socket.
const HAPROXY_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest answer read from it.
const HAPROXY_ANSWER_BYTES_MAX: u64 = 1024 * 1024;

/// One server as HAProxy sees it.
#[derive(Debug, Clone, serde::Serialize)]
struct LbServer {
    backend: String,
    server: String,
    /// `UP`, `DOWN`, `MAINT`, `UP 1/2` (going down)...
    status: String,
    /// The last check's result, e.g. `L7OK`, `L4CON`.
    check: String,
    /// Seconds since the status last changed.
    since_s: Option<u64>,
}

/// HAProxy's view of its servers, from `show stat` on its stats socket.
fn haproxy_view(socket: &std::path::Path) -> anyhow::Result<Vec<LbServer>> {
    use std::io::{Read as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connecting to HAProxy's stats socket {}", socket.display()))?;
    s.set_read_timeout(Some(HAPROXY_TIMEOUT))?;
    s.set_write_timeout(Some(HAPROXY_TIMEOUT))?;
    s.write_all(b"show stat\n")?;
    let mut text = String::new();
    s.take(HAPROXY_ANSWER_BYTES_MAX)
        .read_to_string(&mut text)
        .with_context(|| format!("reading HAProxy's stats socket {}", socket.display()))?;
    parse_show_stat(&text)
}

/// The servers in `show stat`'s CSV (its first line names the columns,
/// after `# `); the frontend and backend summary rows are left out.
fn parse_show_stat(text: &str) -> anyhow::Result<Vec<LbServer>> {
    let mut lines = text.lines();
    let header = lines
        .next()
        .and_then(|h| h.strip_prefix("# "))
        .with_context(|| format!("not HAProxy's show stat answer: {:?}", text.lines().next()))?;
    let cols: Vec<&str> = header.split(',').collect();
    let at = |name: &str| {
        cols.iter()
            .position(|c| *c == name)
            .with_context(|| format!("show stat has no column {name}"))
    };
    let (px, sv, st, ck, lc) = (
        at("pxname")?,
        at("svname")?,
        at("status")?,
        at("check_status")?,
        at("lastchg")?,
    );
    let last = px.max(sv).max(st).max(ck).max(lc);
    Ok(lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f.len() > last && f[sv] != "FRONTEND" && f[sv] != "BACKEND")
        .map(|f| LbServer {
            backend: f[px].to_string(),
            server: f[sv].to_string(),
            status: f[st].to_string(),
            check: f[ck].to_string(),
            since_s: f[lc].parse().ok(),
        })
        .collect())
}

/// `tally status`: prints the cluster at a glance; with `json`, the views
/// it read.
pub fn status(
    target: &Target,
    haproxy_socket: Option<&std::path::Path>,
    json: bool,
) -> anyhow::Result<()> {
    let (addr, access) = target.resolve()?;
    let lb = haproxy_socket.map(|p| haproxy_view(p).map_err(|e| format!("{e:#}")));
    let view = call(&access, addr, "GET", "/v1/cluster")?;
    // Each node's own hot counters, from the node itself.
    let mut hot: BTreeMap<String, f64> = BTreeMap::new();
    let mut unreachable = Vec::new();
    for n in view["nodes"].as_array().into_iter().flatten() {
        let id = n["node_id"].as_str().unwrap_or("?").to_string();
        let theirs = if id == view["node_id"] {
            Some(view["hot_counters"].clone())
        } else if n["state"] == "stopped" || n["state"] == "down" {
            None
        } else {
            match n["address"].as_str().map(str::parse::<SocketAddr>) {
                Some(Ok(a)) => match call(&access, a, "GET", "/v1/cluster") {
                    Ok(mut v) => Some(v["hot_counters"].take()),
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
        if let Some(counters) = theirs {
            for h in counters.as_array().into_iter().flatten() {
                if let (Some(name), Some(rate)) =
                    (h["name"].as_str(), h["increments_per_second"].as_f64())
                {
                    *hot.entry(name.to_string()).or_default() += rate;
                }
            }
        }
    }
    let mut hot: Vec<(String, f64)> = hot.into_iter().collect();
    hot.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    hot.truncate(HOT_SHOWN);
    if json {
        let out = serde_json::json!({
            "view": view,
            "load_balancer": match &lb {
                Some(Ok(servers)) => serde_json::json!(servers),
                Some(Err(e)) => serde_json::json!({ "error": e }),
                None => Value::Null,
            },
            "hot_counters": hot.iter().map(|(n, r)| serde_json::json!({"name": n, "increments_per_second": r})).collect::<Vec<_>>(),
            "unreachable": unreachable,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    print!("{}", render(&target.url, &view, &hot, &unreachable));
    if let Some(lb) = &lb {
        print!("{}", render_lb(lb));
    }
    Ok(())
}

fn render_lb(lb: &Result<Vec<LbServer>, String>) -> String {
    let mut o = String::new();
    let _ = writeln!(o);
    match lb {
        Err(e) => {
            let _ = writeln!(o, "load balancer: {e}");
        }
        Ok(servers) => {
            let _ = writeln!(o, "load balancer (HAProxy's view):");
            let mut rows = vec![
                ["BACKEND", "SERVER", "STATUS", "LAST CHECK", "SINCE"]
                    .map(String::from)
                    .to_vec(),
            ];
            for s in servers {
                rows.push(vec![
                    s.backend.clone(),
                    s.server.clone(),
                    s.status.clone(),
                    if s.check.is_empty() {
                        "-".into()
                    } else {
                        s.check.clone()
                    },
                    s.since_s.map_or("-".into(), |v| format!("{v} s")),
                ]);
            }
            table(&mut o, &rows);
        }
    }
    o
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

#[cfg(test)]
mod tests {
    use super::*;

    // The servers come out of HAProxy's CSV by column name; the summary
    // rows do not, and an answer that is not `show stat` is an error.
    #[test]
    fn show_stat_is_read_by_column_name() {
        let text = "# pxname,svname,qcur,status,lastchg,check_status\n\
                    tally_http,FRONTEND,,OPEN,,\n\
                    tally_http_nodes,node1,0,UP,12,L7OK\n\
                    tally_http_nodes,node2,0,DOWN,3,L4CON\n\
                    tally_http_nodes,BACKEND,0,UP,40,\n";
        let servers = parse_show_stat(text).unwrap();
        let got: Vec<(&str, &str, &str, Option<u64>)> = servers
            .iter()
            .map(|s| {
                (
                    s.server.as_str(),
                    s.status.as_str(),
                    s.check.as_str(),
                    s.since_s,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("node1", "UP", "L7OK", Some(12)),
                ("node2", "DOWN", "L4CON", Some(3))
            ]
        );
        assert!(parse_show_stat("Unknown command\n").is_err());
    }
}
