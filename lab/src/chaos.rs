//! `tally chaos`: a fault test of a whole local cluster behind HAProxy.
//!
//! A run starts its own [`LocalCluster`] (or attaches to one that
//! `tally cluster` runs, through its control endpoint), sends increments
//! through the load balancer from many client tasks over HTTP and RESP
//! while a seeded fault scheduler kills, restarts, pauses and wipes nodes,
//! then checks every counter on every node against what the clients were
//! told.
//!
//! The checker is a pure function of the request history ([`check`]), so it
//! can be tested on a history made by hand, and so is the reading of each
//! answer as applied, not applied or unknown. This module never signals a
//! process itself: the launcher that started a node acts on it by its pid.
//! It speaks to the cluster through [`crate::wire`]'s clients.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::control::RemoteCluster;
use crate::launcher::{Action, LocalCluster, LocalClusterConfig};
use crate::process::READY_TIMEOUT;
use crate::wire::access::Access;
use crate::wire::http::{self, HttpError};
use crate::wire::resp::{self, Reply, RespError};

/// How long one request through the load balancer may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Most attempts of one logical increment (the first plus retries).
const ATTEMPTS_MAX: u32 = 200;
/// Pause before retrying an indeterminate request.
const RETRY_DELAY: Duration = Duration::from_millis(100);
/// After the load phase ends, how long clients may keep retrying
/// unresolved increments with their keys.
const RETRY_GRACE: Duration = Duration::from_secs(10);
/// How long a paused node stays stopped: long enough for HAProxy to take
/// it out of rotation (two failed checks of 200 ms plus their timeouts).
const PAUSE: Duration = Duration::from_millis(1500);
/// How long every node may take to agree on every counter at the end.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two polls of the final read.
const SETTLE_POLL: Duration = Duration::from_millis(300);
/// Largest response read from a node or the load balancer.
const RESPONSE_BYTES_MAX: usize = 64 * 1024;
/// Counters per durability level, shared by every client. Levels never
/// share a counter: a `memory` loss must not hide in a `local` counter.
const COUNTERS_PER_LEVEL: u64 = 4;
/// Largest delta of one increment.
const DELTA_MAX: u64 = 5;

/// Fault kinds, each injected at least once per run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Fault {
    /// `kill -9`; the supervisor restarts the node from its disk.
    Kill9,
    /// SIGTERM, then the supervisor starts the node again.
    Restart,
    /// SIGSTOP long enough to leave rotation, then SIGCONT.
    Pause,
    /// `kill -9` and delete the data directory (lost disk), only while
    /// every client writes at `replicated`.
    Wipe,
    /// Stop the store for `STORE_OUTAGE` (2 s), then start it again; only when
    /// the run was given a [`StoreControl`] (the store is its own).
    StoreOutage,
    /// `kill -9` of the HA store's primary PostgreSQL; Patroni promotes
    /// the synchronous standby. Only on a run's own HA store.
    PrimaryKill9,
    /// SIGSTOP of the HA store primary's Patroni and PostgreSQL for longer
    /// than the leader TTL, then SIGCONT: it must come back as a standby.
    PrimaryFreeze,
    /// A planned switchover through Patroni's REST API.
    Switchover,
    /// `kill -9` of one etcd member of three, restarted after a pause.
    EtcdKill9,
}

impl Fault {
    pub const ALL: [Fault; 9] = [
        Fault::Kill9,
        Fault::Restart,
        Fault::Pause,
        Fault::Wipe,
        Fault::StoreOutage,
        Fault::PrimaryKill9,
        Fault::PrimaryFreeze,
        Fault::Switchover,
        Fault::EtcdKill9,
    ];

    /// The name `--faults` takes.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill9 => "kill9",
            Fault::Restart => "restart",
            Fault::Pause => "pause",
            Fault::Wipe => "wipe",
            Fault::StoreOutage => "store",
            Fault::PrimaryKill9 => "primary-kill9",
            Fault::PrimaryFreeze => "primary-freeze",
            Fault::Switchover => "switchover",
            Fault::EtcdKill9 => "etcd-kill9",
        }
    }

    /// Whether the fault acts on the HA store (not on a node).
    pub fn on_ha_store(self) -> bool {
        matches!(
            self,
            Fault::PrimaryKill9 | Fault::PrimaryFreeze | Fault::Switchover | Fault::EtcdKill9
        )
    }

    /// Whether the fault acts on the store rather than on a node.
    pub fn on_store(self) -> bool {
        self == Fault::StoreOutage || self.on_ha_store()
    }

    pub fn from_name(name: &str) -> Option<Fault> {
        Fault::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// How long a store outage lasts.
const STORE_OUTAGE: Duration = Duration::from_secs(2);

/// Stops and starts the store: a private PostgreSQL server the caller
/// owns, or the commands a user gave (`--store-stop-cmd`,
/// `--store-start-cmd`). Without one the store fault is not injected.
pub trait StoreControl: Send + Sync {
    fn stop(&self) -> anyhow::Result<()>;
    fn start(&self) -> anyhow::Result<()>;
}

/// A store stopped and started by shell commands (`sh -c`), each of which
/// must return once its work is done (the start command once the store
/// accepts connections).
#[derive(Debug, Clone)]
pub struct CommandStoreControl {
    pub stop: String,
    pub start: String,
}

impl CommandStoreControl {
    fn run(what: &str, command: &str) -> anyhow::Result<()> {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| anyhow::anyhow!("{what} command `{command}`: {e}"))?;
        if !out.status.success() {
            anyhow::bail!(
                "{what} command `{command}` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

impl StoreControl for CommandStoreControl {
    fn stop(&self) -> anyhow::Result<()> {
        CommandStoreControl::run("store stop", &self.stop)
    }
    fn start(&self) -> anyhow::Result<()> {
        CommandStoreControl::run("store start", &self.start)
    }
}

impl StoreControl for crate::pgserver::PgServer {
    fn stop(&self) -> anyhow::Result<()> {
        Ok(crate::pgserver::PgServer::stop(self)?)
    }
    fn start(&self) -> anyhow::Result<()> {
        Ok(crate::pgserver::PgServer::start(self)?)
    }
}

/// The `--store` value that makes a run start a private PostgreSQL server
/// of its own in `DIR/postgres`, and stop and start it as a fault.
pub const PRIVATE_POSTGRES: &str = "private-postgres";

/// The `--store` value that makes a run start a highly available store of
/// its own in `DIR/ha` (etcd, Patroni, PostgreSQL with a synchronous
/// standby, HAProxy; see [`crate::hastore`]) and inject the HA store faults.
pub const PRIVATE_HA_POSTGRES: &str = "private-ha-postgres";

/// How long the HA store's primary stays frozen: longer than the leader
/// TTL, so that a standby is promoted while it is stopped.
const PRIMARY_FREEZE: Duration = Duration::from_secs(
    crate::hastore::DCS_TTL_SECS as u64 + 2 * crate::hastore::DCS_LOOP_WAIT_SECS as u64 + 3,
);
/// How long a killed etcd member stays down.
const ETCD_DOWN: Duration = Duration::from_secs(2);
/// Longest wait for the HA store to have a primary with a synchronous
/// standby again after a fault.
const HA_RECOVERY_TIMEOUT: Duration = Duration::from_secs(60);

/// Marks a directory as a chaos run's own, so a later run may clear it.
const RUN_DIR_MARKER: &str = ".tally-chaos";

/// Makes `dir` ready for a run that starts its own cluster: created if
/// missing; a previous run's contents are removed (nodes' data, store,
/// logs, history), but only in a directory a run made, so a mistyped
/// `--dir` never deletes anything else.
pub fn prepare_run_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
    let entries = std::fs::read_dir(dir)
        .and_then(|d| d.collect::<std::io::Result<Vec<_>>>())
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", dir.display()))?;
    let marker = dir.join(RUN_DIR_MARKER);
    if !entries.is_empty() {
        if !marker.exists() {
            anyhow::bail!(
                "{} is not empty and was not made by tally chaos: give a new or empty --dir",
                dir.display()
            );
        }
        println!("chaos: clearing the previous run in {}", dir.display());
        for e in entries {
            if e.file_name() == RUN_DIR_MARKER {
                continue;
            }
            let path = e.path();
            let removed = if e.file_type()?.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.map_err(|err| anyhow::anyhow!("removing {}: {err}", path.display()))?;
        }
    }
    std::fs::write(
        &marker,
        "Made by `tally chaos`: the next run in this directory clears it.\n",
    )?;
    Ok(())
}

/// What a run drives: its own [`LocalCluster`], or a [`RemoteCluster`]
/// that `tally cluster` runs in another process.
pub trait Target: Sync {
    /// The load balancer's HTTP and RESP frontends.
    fn load_balancer(&self) -> anyhow::Result<(SocketAddr, SocketAddr)>;
    /// Every node's HTTP address, in node order.
    fn node_http(&self) -> Vec<SocketAddr>;
    fn act(&self, node: usize, action: Action) -> anyhow::Result<()>;
    fn wait_ready(&self, node: usize, timeout: Duration) -> anyhow::Result<()>;
    /// How the run's clients reach the cluster: plaintext, or for a
    /// secured cluster TLS and the `app` user's credentials.
    fn access(&self) -> anyhow::Result<Access>;
}

impl Target for LocalCluster {
    fn load_balancer(&self) -> anyhow::Result<(SocketAddr, SocketAddr)> {
        match self.haproxy_pid() {
            Some(_) => Ok((self.lb_http(), self.lb_resp())),
            None => anyhow::bail!("the cluster runs without HAProxy; the fault test needs it"),
        }
    }
    fn node_http(&self) -> Vec<SocketAddr> {
        self.nodes().iter().map(|n| n.http).collect()
    }
    fn act(&self, node: usize, action: Action) -> anyhow::Result<()> {
        Ok(LocalCluster::act(self, node, action)?)
    }
    fn wait_ready(&self, node: usize, timeout: Duration) -> anyhow::Result<()> {
        Ok(LocalCluster::wait_ready(self, node, timeout)?)
    }
    fn access(&self) -> anyhow::Result<Access> {
        LocalCluster::access(self, CHAOS_USER)
    }
}

impl Target for RemoteCluster {
    fn load_balancer(&self) -> anyhow::Result<(SocketAddr, SocketAddr)> {
        match (self.view().lb_http, self.view().lb_resp) {
            (Some(h), Some(r)) => Ok((h, r)),
            _ => anyhow::bail!(
                "the attached cluster runs without HAProxy (--no-haproxy); the fault test needs it"
            ),
        }
    }
    fn node_http(&self) -> Vec<SocketAddr> {
        self.view().nodes.iter().map(|n| n.http).collect()
    }
    fn act(&self, node: usize, action: Action) -> anyhow::Result<()> {
        Ok(RemoteCluster::act(self, node, action)?)
    }
    fn wait_ready(&self, node: usize, timeout: Duration) -> anyhow::Result<()> {
        Ok(RemoteCluster::wait_ready(self, node, timeout)?)
    }
    fn access(&self) -> anyhow::Result<Access> {
        match &self.view().secrets_dir {
            None => Ok(Access::open()),
            Some(dir) => crate::secrets::Secrets { dir: dir.clone() }.access(CHAOS_USER),
        }
    }
}

/// The user a run's clients are on a secured cluster (role `write`).
pub const CHAOS_USER: &str = "app";

/// The two front ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Protocol {
    Http,
    Resp,
}

/// Durability levels, as the wire names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Level {
    Memory,
    Local,
    Replicated,
}

impl Level {
    fn wire(self) -> &'static str {
        match self {
            Level::Memory => "memory",
            Level::Local => "local",
            Level::Replicated => "replicated",
        }
    }
}

/// What a client finally knows about one logical increment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Applied (possibly as a duplicate of an earlier attempt): counted.
    Acked,
    /// Definitely not applied.
    Failed,
    /// Still unknown when the run ended: may or may not be counted.
    Indeterminate,
}

/// One logical increment: every attempt shared one idempotency key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub client: usize,
    pub counter: String,
    pub protocol: Protocol,
    pub level: Level,
    pub key: String,
    pub delta: u64,
    pub attempts: u32,
    /// Attempts answered "outcome unknown" (or not answered): each may have
    /// been applied by the node that took it.
    pub unknown_attempts: u32,
    /// Milliseconds since the run started, at the first send and at the
    /// final answer.
    pub sent_ms: u64,
    pub done_ms: u64,
    pub outcome: Outcome,
    /// The last error or indeterminate answer seen, for analysis.
    pub last_error: Option<String>,
}

/// How long `replicated` increments went unacknowledged after a store
/// fault: the longest gap between acknowledgements of `replicated`
/// increments (counted from the fault's start) until the next fault or the
/// end of the load.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoreFaultGap {
    pub fault: Fault,
    pub at_ms: u64,
    pub replicated_unavailable_ms: u64,
}

/// The [`StoreFaultGap`] of every store fault in `events`.
fn replicated_gaps(events: &[FaultEvent], history: &[Request], load_ms: u64) -> Vec<StoreFaultGap> {
    let mut acked: Vec<u64> = history
        .iter()
        .filter(|r| r.level == Level::Replicated && r.outcome == Outcome::Acked)
        .map(|r| r.done_ms)
        .collect();
    acked.sort_unstable();
    events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.fault.on_store())
        .map(|(i, e)| {
            let end = events.get(i + 1).map_or(load_ms, |next| next.at_ms);
            let mut last = e.at_ms;
            let mut longest = 0;
            for done in acked.iter().copied().filter(|d| *d > e.at_ms && *d <= end) {
                longest = longest.max(done - last);
                last = done;
            }
            StoreFaultGap {
                fault: e.fault,
                at_ms: e.at_ms,
                replicated_unavailable_ms: longest.max(end.saturating_sub(last)),
            }
        })
        .collect()
}

/// One injected fault.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultEvent {
    pub at_ms: u64,
    pub fault: Fault,
    pub node: usize,
    pub error: Option<String>,
}

/// How to run.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// Length of the load phase (faults included).
    pub duration: Duration,
    /// Store URL; `None` means SQLite in `base_dir`, [`PRIVATE_POSTGRES`]
    /// a private PostgreSQL server the run starts (and may stop: it
    /// enables the store fault). Unused when attached.
    pub store: Option<String>,
    pub seed: u64,
    pub clients: usize,
    /// The `tally` binary the nodes run; `None` means the current one.
    pub exe: Option<PathBuf>,
    /// Holds the cluster's data, logs and a failing run's history.
    pub base_dir: PathBuf,
    /// Enables the store-outage fault.
    pub store_control: Option<Arc<dyn StoreControl>>,
    /// The run's own HA store ([`PRIVATE_HA_POSTGRES`]), set by the run;
    /// enables the HA store faults.
    pub ha_store: Option<Arc<crate::hastore::HaStore>>,
    /// Drive the cluster behind this control endpoint (`tally cluster`)
    /// instead of starting one.
    pub attach: Option<SocketAddr>,
    /// The attached cluster's control token (see `control`).
    pub attach_token: String,
    /// The run's own cluster is secured (see
    /// [`LocalClusterConfig::secure`]); an attached one says whether it is.
    pub secure: bool,
    /// The fault kinds to inject (each at least once); the store fault
    /// only with a `store_control`.
    pub faults: Vec<Fault>,
    /// For testing the checker only: clients send `memory` increments and
    /// record them as `local`, so a `kill -9` before the background sync
    /// really loses increments the checker believes durable. A run with
    /// this set must fail.
    pub mislabel_memory_as_local: bool,
    /// Set (by a signal handler) to end the load phase early: the run then
    /// checks what happened so far, stops its cluster, and fails.
    pub interrupt: Option<Arc<AtomicBool>>,
}

impl Default for ChaosConfig {
    fn default() -> Self {
        ChaosConfig {
            duration: Duration::from_secs(60),
            store: None,
            seed: 0,
            clients: 8,
            exe: None,
            base_dir: PathBuf::from("tally-chaos"),
            store_control: None,
            ha_store: None,
            attach: None,
            attach_token: String::new(),
            secure: false,
            faults: Fault::ALL.to_vec(),
            mislabel_memory_as_local: false,
            interrupt: None,
        }
    }
}

impl std::fmt::Debug for dyn StoreControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreControl")
    }
}

/// Per-counter verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CounterCheck {
    pub counter: String,
    pub level: Level,
    pub acked: u64,
    pub unresolved: u64,
    pub attempted: u64,
    /// The value each node reported, in node order.
    pub values: Vec<u64>,
}

/// What the checker found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Verdict {
    /// Acknowledged `local`/`replicated` increments missing from a value.
    pub lost: u64,
    /// Value above what could have been applied.
    pub counted_twice: u64,
    /// Acknowledged `memory` increments missing (allowed, reported).
    pub memory_lost: u64,
    /// `local`/`memory` increments applied again by a retry that reached
    /// another node: their keys are per node (design §8), so this is
    /// allowed up to the number of unknown attempts, and reported.
    pub retry_applied_twice: u64,
    /// Counters on which nodes disagree.
    pub disagreements: Vec<String>,
    /// One sentence per violation.
    pub violations: Vec<String>,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Checks final values against a history. `values` maps each counter to
/// what every node reported for it (a counter never read counts as 0).
pub fn check(history: &[Request], values: &BTreeMap<String, Vec<u64>>) -> Verdict {
    #[derive(Default)]
    struct Sums {
        level: Option<Level>,
        acked: u64,
        unresolved: u64,
        /// Extra applications that per-node keys allow (`local`/`memory`).
        per_node_extra: u64,
    }
    let mut sums: BTreeMap<&str, Sums> = BTreeMap::new();
    for r in history {
        let s = sums.entry(&r.counter).or_default();
        s.level = Some(r.level);
        match r.outcome {
            Outcome::Acked => s.acked += r.delta,
            Outcome::Indeterminate => s.unresolved += r.delta,
            Outcome::Failed => {}
        }
        if r.level != Level::Replicated {
            // Every unknown attempt may have been applied on a node other
            // than the one that finally answered; only `replicated` keys
            // are recognised across nodes.
            let applications_max = match r.outcome {
                Outcome::Acked => 1 + u64::from(r.unknown_attempts),
                Outcome::Indeterminate => u64::from(r.unknown_attempts.max(1)),
                Outcome::Failed => 0,
            };
            let counted = u64::from(r.outcome != Outcome::Failed);
            s.per_node_extra += r.delta * applications_max.saturating_sub(counted);
        }
    }
    let mut v = Verdict::default();
    for (name, s) in &sums {
        let level = s.level.unwrap_or(Level::Local);
        let reported = values.get(*name).cloned().unwrap_or_default();
        if reported.is_empty() {
            v.violations
                .push(format!("{name}: no node reported a value"));
            continue;
        }
        if reported.iter().any(|x| *x != reported[0]) {
            v.disagreements.push((*name).to_string());
            v.violations
                .push(format!("{name}: nodes disagree once settled: {reported:?}"));
        }
        // Each counter is counted once, at the node that is furthest out;
        // a disagreement is reported above.
        let exact_upper = s.acked + s.unresolved;
        let upper = exact_upper + s.per_node_extra;
        let highest = reported.iter().copied().max().unwrap_or(0);
        let lowest = reported.iter().copied().min().unwrap_or(0);
        if highest > exact_upper {
            v.retry_applied_twice += (highest - exact_upper).min(s.per_node_extra);
        }
        if highest > upper {
            v.counted_twice += highest - upper;
            v.violations.push(format!(
                "{name} ({level:?}): value {highest} above acknowledged {} + unresolved {} + retried on another node {}",
                s.acked, s.unresolved, s.per_node_extra
            ));
        }
        if lowest < s.acked {
            if level == Level::Memory {
                v.memory_lost += s.acked - lowest;
            } else {
                v.lost += s.acked - lowest;
                v.violations.push(format!(
                    "{name} ({level:?}): value {lowest} below acknowledged {}",
                    s.acked
                ));
            }
        }
    }
    v
}

/// A seeded splitmix64: the run is replayable from its printed seed (up to
/// the timing of the processes it drives).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// The answer to one attempt.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Acked,
    Failed(String),
    Unknown(String),
}

/// One HTTP request through the load balancer, within [`REQUEST_TIMEOUT`]
/// and [`RESPONSE_BYTES_MAX`]: a fresh connection, so that the load
/// balancer picks a server for each.
async fn http_request(
    access: &Access,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<http::Response, HttpError> {
    http::request_async_with(
        access,
        addr,
        method,
        path,
        body,
        REQUEST_TIMEOUT,
        RESPONSE_BYTES_MAX,
    )
    .await
}

async fn http_increment(access: &Access, addr: SocketAddr, r: &Request, level: Level) -> Answer {
    let body = serde_json::json!({
        "by": r.delta,
        "idempotency_key": r.key,
        "durability": level.wire(),
    })
    .to_string();
    let path = format!("/v1/counters/{}/increment", r.counter);
    http_answer(
        http_request(access, addr, "POST", &path, Some(&body))
            .await
            .map(|a| (a.status, a.body)),
    )
}

/// What an HTTP answer (or its absence) says about an increment.
fn http_answer(answer: Result<(u16, String), HttpError>) -> Answer {
    match answer {
        Err(e) => Answer::Unknown(e.to_string()),
        Ok((200, body)) => match serde_json::from_str::<serde_json::Value>(&body) {
            Ok(v) if v.get("value").is_some() => Answer::Acked,
            _ => Answer::Unknown(format!("200 without a value: {body}")),
        },
        Ok((status, body)) => {
            let json = serde_json::from_str::<serde_json::Value>(&body).ok();
            let unknown = json
                .as_ref()
                .and_then(|v| v.get("outcome"))
                .and_then(|o| o.as_str())
                == Some("unknown");
            // An answer that is not the node's own JSON (HAProxy's 502/503/
            // 504 when a server died mid-request) says nothing about
            // whether the node applied it: unknown, retried with the key.
            if unknown || json.is_none() || status == 504 {
                Answer::Unknown(format!("{status}: {}", body.trim()))
            } else {
                Answer::Failed(format!("{status}: {}", body.trim()))
            }
        }
    }
}

/// One `TALLY.INCRBY` on a fresh connection through the load balancer,
/// within [`REQUEST_TIMEOUT`] and [`RESPONSE_BYTES_MAX`].
async fn resp_increment(access: &Access, addr: SocketAddr, r: &Request, level: Level) -> Answer {
    let delta = r.delta.to_string();
    let args = [
        "TALLY.INCRBY",
        &r.counter,
        &delta,
        "IDEMPOTENCY",
        &r.key,
        "DURABILITY",
        level.wire(),
    ];
    resp_answer(
        resp::command_once_with(access, addr, &args, REQUEST_TIMEOUT, RESPONSE_BYTES_MAX).await,
    )
}

/// What a RESP reply (or its absence) says about an increment: applied
/// when it is `*2 :value :duplicate`; not applied when it is an error
/// other than `INDETERMINATE`; unknown otherwise.
fn resp_answer(reply: Result<Reply, RespError>) -> Answer {
    match reply {
        Err(e) => Answer::Unknown(e.to_string()),
        Ok(Reply::Array(Some(items)))
            if items.len() == 2 && matches!(items[0], Reply::Integer(_)) =>
        {
            Answer::Acked
        }
        Ok(Reply::Error(e)) if e.starts_with("INDETERMINATE") => {
            Answer::Unknown(format!("-{}", e.trim_end()))
        }
        Ok(Reply::Error(e)) => Answer::Failed(format!("-{}", e.trim_end())),
        Ok(other) => Answer::Unknown(format!("unexpected reply {other:?}")),
    }
}

/// Shared state of a run's clients.
struct Load {
    lb_http: SocketAddr,
    lb_resp: SocketAddr,
    /// TLS and credentials, for a secured cluster.
    access: Access,
    started: Instant,
    /// Unique to this run, in every counter name and key: a rerun in the
    /// same directory (same store, keys remembered for a day) must neither
    /// find old values nor have its keys taken for duplicates.
    run_id: String,
    /// Set when clients should stop starting new increments.
    stop: AtomicBool,
    /// Set in the final phase: only `replicated` writes.
    replicated_only: AtomicBool,
    /// See [`ChaosConfig::mislabel_memory_as_local`].
    mislabel_memory_as_local: bool,
    /// See [`ChaosConfig::interrupt`].
    interrupt: Arc<AtomicBool>,
    /// Clients give up on unresolved increments after this.
    retry_deadline: Mutex<Option<Instant>>,
    history: Mutex<Vec<Request>>,
    /// Milliseconds since start of every acknowledgement.
    acks_ms: Mutex<Vec<u64>>,
    sequence: AtomicU64,
}

impl Load {
    fn ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

async fn client(load: Arc<Load>, id: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let protocol = if id.is_multiple_of(2) {
        Protocol::Http
    } else {
        Protocol::Resp
    };
    while !load.stop.load(Ordering::SeqCst) {
        let level = if load.mislabel_memory_as_local {
            Level::Local
        } else if load.replicated_only.load(Ordering::SeqCst) {
            Level::Replicated
        } else {
            [Level::Memory, Level::Local, Level::Replicated][rng.below(3) as usize]
        };
        // What goes on the wire; differs from the recorded level only when
        // the checker is under test.
        let wire = if load.mislabel_memory_as_local {
            Level::Memory
        } else {
            level
        };
        let seq = load.sequence.fetch_add(1, Ordering::SeqCst);
        let mut r = Request {
            client: id,
            // Clients share counters, so one counter gets concurrent
            // increments through every node (a shard on each).
            counter: format!(
                "chaos-{}-{}-{}",
                load.run_id,
                level.wire(),
                rng.below(COUNTERS_PER_LEVEL)
            ),
            protocol,
            level,
            key: format!("{}-{id}-{seq}", load.run_id),
            delta: 1 + rng.below(DELTA_MAX),
            attempts: 0,
            unknown_attempts: 0,
            sent_ms: load.ms(),
            done_ms: 0,
            outcome: Outcome::Indeterminate,
            last_error: None,
        };
        loop {
            r.attempts += 1;
            let answer = match protocol {
                Protocol::Http => http_increment(&load.access, load.lb_http, &r, wire).await,
                Protocol::Resp => resp_increment(&load.access, load.lb_resp, &r, wire).await,
            };
            match answer {
                Answer::Acked => {
                    r.outcome = Outcome::Acked;
                    load.acks_ms.lock().push(load.ms());
                    break;
                }
                // A refusal settles the increment only if no earlier attempt
                // could have been applied: after an unknown attempt it says
                // only that this attempt was not, so the key is retried.
                Answer::Failed(e) if r.attempts == 1 => {
                    r.outcome = Outcome::Failed;
                    r.last_error = Some(e);
                    break;
                }
                Answer::Failed(e) => r.last_error = Some(e),
                Answer::Unknown(e) => {
                    r.unknown_attempts += 1;
                    r.last_error = Some(e);
                }
            }
            let past = load
                .retry_deadline
                .lock()
                .is_some_and(|d| Instant::now() >= d);
            if past || r.attempts >= ATTEMPTS_MAX {
                break;
            }
            tokio::time::sleep(RETRY_DELAY).await;
        }
        r.done_ms = load.ms();
        load.history.lock().push(r);
    }
}

/// Sleeps for `d` unless `flag` is set first; returns whether it was.
fn sleep_unless(flag: &AtomicBool, d: Duration) -> bool {
    const STEP: Duration = Duration::from_millis(50);
    let deadline = Instant::now() + d;
    loop {
        if flag.load(Ordering::SeqCst) {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep(STEP.min(deadline - now));
    }
}

/// Whether a run with `config` can stop and start its store: it was given
/// a [`StoreControl`], or it will start a private server of its own.
fn store_fault_possible(config: &ChaosConfig) -> bool {
    config.store_control.is_some()
        || (config.attach.is_none() && config.store.as_deref() == Some(PRIVATE_POSTGRES))
}

/// Whether a run with `config` owns an HA store to inject faults into.
fn ha_faults_possible(config: &ChaosConfig) -> bool {
    config.ha_store.is_some()
        || (config.attach.is_none() && config.store.as_deref() == Some(PRIVATE_HA_POSTGRES))
}

/// The fault kinds a run with `config` must inject: the ones asked for,
/// without the store fault when nothing can stop the store.
pub fn required_faults(config: &ChaosConfig) -> Vec<Fault> {
    let mut kinds: Vec<Fault> = Fault::ALL
        .into_iter()
        .filter(|f| config.faults.contains(f))
        .filter(|f| *f != Fault::StoreOutage || store_fault_possible(config))
        .filter(|f| !f.on_ha_store() || ha_faults_possible(config))
        .collect();
    kinds.dedup();
    kinds
}

/// The fault scheduler: runs on the calling thread because the target's
/// calls block. Returns the faults it injected.
fn inject_faults(
    target: &dyn Target,
    load: &Load,
    rng: &mut Rng,
    duration: Duration,
    kinds: &[Fault],
    store: Option<&dyn StoreControl>,
    ha: Option<&crate::hastore::HaStore>,
) -> Vec<FaultEvent> {
    let nodes = target.node_http().len();
    let mut events = Vec::new();
    let final_phase = duration.mul_f64(0.6);
    let wipe_wanted = kinds.contains(&Fault::Wipe);
    // Every kind but the lost disk may run at any time; the lost disk only
    // in the final, replicated-only phase.
    let repeatable: Vec<Fault> = kinds
        .iter()
        .copied()
        .filter(|f| *f != Fault::Wipe)
        .collect();
    // The first faults are one of each repeatable kind in a seeded order,
    // so every kind runs even in a short run.
    let mut first = repeatable.clone();
    for i in (1..first.len()).rev() {
        first.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut wiped = false;
    // A slow machine may reach the end before every kind has run: the run
    // then goes on, up to twice its duration, until it has.
    let owed = |first: &[Fault], wiped: bool, elapsed: Duration| {
        (!first.is_empty() || (wipe_wanted && !wiped)) && elapsed < duration * 2
    };
    loop {
        let gap = Duration::from_millis(500 + rng.below(1500));
        if sleep_unless(&load.interrupt, gap) {
            break;
        }
        let elapsed = load.started.elapsed();
        if elapsed >= duration && !owed(&first, wiped, elapsed) {
            break;
        }
        let fault = if wipe_wanted && elapsed >= final_phase && first.is_empty() {
            if !load.replicated_only.swap(true, Ordering::SeqCst) {
                // Let in-flight writes at other levels finish and flush
                // before the first disk is lost.
                std::thread::sleep(Duration::from_millis(1500));
            }
            if !wiped || repeatable.is_empty() || rng.below(2) == 0 {
                Fault::Wipe
            } else {
                repeatable[rng.below(repeatable.len() as u64) as usize]
            }
        } else if !first.is_empty() {
            first.remove(0)
        } else if repeatable.is_empty() {
            continue;
        } else {
            repeatable[rng.below(repeatable.len() as u64) as usize]
        };
        let node = rng.below(nodes as u64) as usize;
        let at_ms = load.ms();
        let on = if fault.on_store() {
            "store".to_string()
        } else {
            format!("node{}", node + 1)
        };
        println!(
            "chaos: {:>6.1} s  {:<11}  {on:<6}  ({} acknowledged so far)",
            at_ms as f64 / 1000.0,
            format!("{fault:?}"),
            load.acks_ms.lock().len()
        );
        let result = match fault {
            Fault::Kill9 => target.act(node, Action::Kill9),
            Fault::Restart => target.act(node, Action::Restart),
            Fault::Pause => target.act(node, Action::Pause).map(|()| {
                std::thread::sleep(PAUSE);
            }),
            Fault::Wipe => target.act(node, Action::Wipe),
            Fault::StoreOutage => match store {
                Some(store) => store.stop().and_then(|()| {
                    std::thread::sleep(STORE_OUTAGE);
                    store.start()
                }),
                None => Err(anyhow::anyhow!("no store control")),
            },
            kind => match ha {
                Some(ha) => ha_fault(ha, kind, rng),
                None => Err(anyhow::anyhow!("no HA store of the run's own")),
            },
        };
        let resumed = if fault == Fault::Pause {
            target.act(node, Action::Resume)
        } else {
            Ok(())
        };
        if fault == Fault::Wipe && result.is_ok() {
            wiped = true;
        }
        // One fault at a time: the next waits for this node to be back.
        let ready = target.wait_ready(node, READY_TIMEOUT);
        let error = result
            .and(resumed)
            .and(ready)
            .err()
            .map(|e| format!("{e:#}"));
        events.push(FaultEvent {
            at_ms,
            fault,
            node,
            error,
        });
    }
    events
}

/// Injects one HA store fault and waits until the store has a primary
/// with a synchronous standby again, so that faults never pile up.
fn ha_fault(ha: &crate::hastore::HaStore, fault: Fault, rng: &mut Rng) -> anyhow::Result<()> {
    match fault {
        Fault::PrimaryKill9 => {
            // Patroni promotes the synchronous standby, or, when it judges
            // no standby fit to take over (one lagging, or not answering
            // under load), starts the old primary again in place: both
            // are recoveries, and the run goes on once either is done.
            let killed = ha.kill9_primary_postgres()?;
            let primary = ha.wait_after_kill(killed, HA_RECOVERY_TIMEOUT)?;
            if primary == killed.member {
                tracing::info!(
                    member = primary,
                    "Patroni restarted the killed primary in place rather than fail over"
                );
            }
        }
        Fault::PrimaryFreeze => {
            ha.freeze_primary(PRIMARY_FREEZE)?;
        }
        Fault::Switchover => {
            ha.switchover(None)?;
        }
        Fault::EtcdKill9 => {
            let member = rng.below(crate::hastore::ETCD_MEMBERS as u64) as usize;
            ha.kill9_etcd(member)?;
            std::thread::sleep(ETCD_DOWN);
            ha.restart_etcd(member)?;
        }
        other => anyhow::bail!("{other:?} is not an HA store fault"),
    }
    ha.wait_for_sync(HA_RECOVERY_TIMEOUT)?;
    Ok(())
}

/// Reads one counter from one node; `None` if the node did not answer.
async fn read_value(access: &Access, node: SocketAddr, counter: &str) -> Option<u64> {
    let path = format!("/v1/counters/{counter}");
    let answer = http_request(access, node, "GET", &path, None).await;
    match answer.map(|a| (a.status, a.body)) {
        Ok((404, _)) => Some(0),
        Ok((200, body)) => serde_json::from_str::<serde_json::Value>(&body)
            .ok()?
            .get("value")?
            .as_u64(),
        _ => None,
    }
}

/// Deletes `counters` through every node (with a shared store one delete
/// suffices; without one each node holds its own), then reads them back:
/// each must read 0 on every node.
async fn clean_up(access: &Access, nodes: &[SocketAddr], counters: &[String]) -> Cleanup {
    let mut errors = Vec::new();
    for c in counters {
        for n in nodes {
            let path = format!("/v1/counters/{c}");
            match http_request(access, *n, "DELETE", &path, None).await {
                Ok(r) if r.status == 200 => {}
                Ok(r) => errors.push(format!("DELETE {c} on {n}: {} {}", r.status, r.body)),
                Err(e) => errors.push(format!("DELETE {c} on {n}: {e:?}")),
            }
        }
    }
    if errors.is_empty() {
        for (c, values) in settle(access, nodes, counters).await {
            if values.len() != nodes.len() || values.iter().any(|v| *v != 0) {
                errors.push(format!("{c} reads {values:?} after its delete"));
            }
        }
    }
    Cleanup {
        counters: counters.len(),
        errors,
    }
}

/// Polls every node until each reports the same value for every counter
/// twice in a row, or `SETTLE_TIMEOUT` passes; returns the last reading.
async fn settle(
    access: &Access,
    nodes: &[SocketAddr],
    counters: &[String],
) -> BTreeMap<String, Vec<u64>> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut previous: Option<BTreeMap<String, Vec<u64>>> = None;
    loop {
        let mut reading = BTreeMap::new();
        let mut complete = true;
        for c in counters {
            let mut values = Vec::new();
            for n in nodes {
                match read_value(access, *n, c).await {
                    Some(v) => values.push(v),
                    None => complete = false,
                }
            }
            reading.insert(c.clone(), values);
        }
        let agreed = complete && reading.values().all(|v| v.iter().all(|x| *x == v[0]));
        if (agreed && previous.as_ref() == Some(&reading)) || Instant::now() >= deadline {
            return reading;
        }
        previous = Some(reading);
        tokio::time::sleep(SETTLE_POLL).await;
    }
}

/// Counts by protocol and level.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Tally {
    pub acked: u64,
    pub failed: u64,
    pub indeterminate: u64,
    pub retried: u64,
}

/// Everything a run produced.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    /// For each store fault, how long `replicated` increments could not be
    /// acknowledged after it was injected.
    pub store_faults: Vec<StoreFaultGap>,
    pub seed: u64,
    pub duration_ms: u64,
    pub by_kind: BTreeMap<String, Tally>,
    pub faults: BTreeMap<String, u64>,
    pub fault_errors: Vec<String>,
    pub longest_without_ack_ms: u64,
    pub verdict: Verdict,
    /// Where the history was written when the run failed.
    pub history_path: Option<PathBuf>,
    /// The fault kinds this run had to inject.
    pub required_faults: Vec<Fault>,
    /// When the run was interrupted, if it was: it then proves too little
    /// to pass, whatever it found.
    pub interrupted_at_ms: Option<u64>,
    /// The counters the run created, deleted at its end when everything
    /// else passed (`None`: the run failed, and they are left for study).
    pub cleanup: Option<Cleanup>,
}

/// What deleting a passing run's counters did.
#[derive(Debug, Clone, Serialize)]
pub struct Cleanup {
    pub counters: usize,
    /// Deletes that failed, and counters that did not read 0 on every node
    /// afterwards.
    pub errors: Vec<String>,
}

impl ChaosReport {
    /// True when nothing was lost, nothing was counted twice, the nodes
    /// agree, and every fault kind ran without an error.
    pub fn passed(&self) -> bool {
        self.interrupted_at_ms.is_none()
            && self.verdict.ok()
            && self.cleanup.as_ref().is_none_or(|c| c.errors.is_empty())
            && self.fault_errors.is_empty()
            && self
                .required_faults
                .iter()
                .all(|f| self.faults.get(&format!("{f:?}")).copied().unwrap_or(0) > 0)
    }

    /// The table printed at the end of a run.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "seed                          {}", self.seed);
        let _ = writeln!(o, "duration                      {} ms", self.duration_ms);
        let _ = writeln!(
            o,
            "{:<28}  {:>8} {:>8} {:>13} {:>8}",
            "requests", "acked", "failed", "indeterminate", "retried"
        );
        for (k, t) in &self.by_kind {
            let _ = writeln!(
                o,
                "  {:<26}  {:>8} {:>8} {:>13} {:>8}",
                k, t.acked, t.failed, t.indeterminate, t.retried
            );
        }
        let _ = writeln!(o, "faults injected");
        for f in &self.required_faults {
            let n = self.faults.get(&format!("{f:?}")).copied().unwrap_or(0);
            let _ = writeln!(o, "  {:<26}  {n:>8}", format!("{f:?}"));
        }
        for e in &self.fault_errors {
            let _ = writeln!(o, "  fault error: {e}");
        }
        let _ = writeln!(
            o,
            "longest without an ack        {} ms",
            self.longest_without_ack_ms
        );
        for g in &self.store_faults {
            let _ = writeln!(
                o,
                "  {:<13} at {:>7.1} s: replicated unavailable for {} ms",
                format!("{:?}", g.fault),
                g.at_ms as f64 / 1000.0,
                g.replicated_unavailable_ms
            );
        }
        let _ = writeln!(
            o,
            "memory increments lost        {} (allowed)",
            self.verdict.memory_lost
        );
        let _ = writeln!(
            o,
            "local/memory retries applied on two nodes  {} (per-node keys)",
            self.verdict.retry_applied_twice
        );
        let _ = writeln!(
            o,
            "increments lost               {} (must be 0)",
            self.verdict.lost
        );
        let _ = writeln!(
            o,
            "increments counted twice      {} (must be 0)",
            self.verdict.counted_twice
        );
        for v in &self.verdict.violations {
            let _ = writeln!(o, "VIOLATION: {v}");
        }
        if let Some(c) = &self.cleanup {
            let _ = writeln!(
                o,
                "counters deleted at the end   {} of {}",
                c.counters - c.errors.len().min(c.counters),
                c.counters
            );
            for e in &c.errors {
                let _ = writeln!(o, "  cleanup error: {e}");
            }
        }
        if let Some(ms) = self.interrupted_at_ms {
            let _ = writeln!(o, "interrupted at {ms} ms: the load phase ended early");
        }
        if let Some(p) = &self.history_path {
            let _ = writeln!(o, "history (JSON lines): {}", p.display());
        }
        let _ = writeln!(
            o,
            "result                        {}",
            if self.passed() { "PASS" } else { "FAIL" }
        );
        o
    }
}

/// Summarises a history by protocol and level.
pub fn tally_history(history: &[Request]) -> BTreeMap<String, Tally> {
    let mut out: BTreeMap<String, Tally> = BTreeMap::new();
    for r in history {
        let t = out
            .entry(format!("{:?} {}", r.protocol, r.level.wire()))
            .or_default();
        match r.outcome {
            Outcome::Acked => t.acked += 1,
            Outcome::Failed => t.failed += 1,
            Outcome::Indeterminate => t.indeterminate += 1,
        }
        if r.attempts > 1 {
            t.retried += 1;
        }
    }
    out
}

/// The cluster a run starts: three nodes on free loopback ports, HAProxy
/// in front, short flush and refresh intervals so the end settles fast.
pub fn cluster_config(config: &ChaosConfig) -> std::io::Result<LocalClusterConfig> {
    Ok(LocalClusterConfig {
        store: config.store.clone(),
        exe: config.exe.clone(),
        secure: config.secure,
        ..LocalClusterConfig::for_fault_tests(3, &config.base_dir)?
    })
}

/// Runs the whole test: cluster (its own, or the attached one), load,
/// faults, check. Blocks; starts its own tokio runtime, so it must not be
/// called from inside one.
pub fn run(config: ChaosConfig) -> anyhow::Result<ChaosReport> {
    if required_faults(&config).is_empty() {
        anyhow::bail!(
            "no fault to inject: the store fault needs a store the run can stop and start, \
             and no other kind was chosen"
        );
    }
    println!("chaos: seed {}", config.seed);
    match config.attach {
        Some(addr) => {
            std::fs::create_dir_all(&config.base_dir)?;
            let remote = RemoteCluster::connect(addr, config.attach_token.clone())?;
            println!(
                "chaos: attached to {} nodes through the control endpoint {addr}",
                remote.view().nodes.len()
            );
            run_on(&remote, &config)
        }
        None => {
            prepare_run_dir(&config.base_dir)?;
            // Declared first, so dropped last: the nodes stop before their
            // store does.
            let mut private_pg = None;
            let mut config = config;
            if config.store.as_deref() == Some(PRIVATE_POSTGRES) {
                if config.store_control.is_some() {
                    anyhow::bail!(
                        "{PRIVATE_POSTGRES} is stopped and started by the run itself: \
                         give no store commands with it"
                    );
                }
                let dir = std::path::absolute(config.base_dir.join("postgres"))?;
                println!(
                    "chaos: starting a private PostgreSQL server in {}",
                    dir.display()
                );
                let pg = crate::pgserver::PgServer::new(crate::pgserver::PgOptions {
                    reachable_from: Some(std::path::absolute(&config.base_dir)?),
                    dir: Some(dir),
                    ..Default::default()
                })
                .map_err(|e| match e {
                    crate::pgserver::PgError::Unreachable { .. } => {
                        anyhow::anyhow!("{e}: choose such a --dir, e.g. under /tmp")
                    }
                    e => anyhow::Error::from(e),
                })?;
                let pg = Arc::new(pg);
                config.store = Some(pg.url(&pg.create_database()?));
                config.store_control = Some(pg.clone());
                private_pg = Some(pg);
            }
            let mut private_ha = None;
            if config.store.as_deref() == Some(PRIVATE_HA_POSTGRES) {
                if config.store_control.is_some() {
                    anyhow::bail!(
                        "{PRIVATE_HA_POSTGRES} has faults of its own: give no store commands with it"
                    );
                }
                let dir = std::path::absolute(config.base_dir.join("ha"))?;
                println!(
                    "chaos: starting a highly available store (etcd, Patroni, PostgreSQL, \
                     HAProxy) in {}",
                    dir.display()
                );
                let ha = Arc::new(crate::hastore::HaStore::start(
                    crate::hastore::HaOptions::new(dir),
                )?);
                // Both ways to reach the primary are exercised, one per
                // seed parity: through HAProxy, or with every host named.
                let url = match (config.seed % 2, ha.store_url_haproxy()) {
                    (0, Some(url)) => {
                        println!("chaos: nodes reach the primary through HAProxy");
                        url
                    }
                    _ => {
                        println!("chaos: nodes reach the primary with a multi-host URL");
                        ha.store_url_multi_host()
                    }
                };
                config.store = Some(url);
                config.ha_store = Some(ha.clone());
                private_ha = Some(ha);
            }
            let mut cluster = LocalCluster::start(cluster_config(&config)?)?;
            let report = run_on(&cluster, &config);
            cluster.shutdown();
            drop(config);
            if let Some(ha) = private_ha.and_then(|ha| Arc::try_unwrap(ha).ok()) {
                ha.shutdown()?;
            }
            // The server is kept on error paths too (its directory holds
            // its log); here it is stopped and a failure to stop reported.
            if let Some(pg) = private_pg.and_then(|pg| Arc::try_unwrap(pg).ok()) {
                pg.shut_down()?;
            }
            report
        }
    }
}

fn run_on(target: &dyn Target, config: &ChaosConfig) -> anyhow::Result<ChaosReport> {
    let mut rng = Rng::new(config.seed);
    let (lb_http, lb_resp) = target.load_balancer()?;
    let access = target.access()?;
    let required_faults = required_faults(config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let load = Arc::new(Load {
        lb_http,
        lb_resp,
        access: access.clone(),
        started: Instant::now(),
        run_id: format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        ),
        stop: AtomicBool::new(false),
        replicated_only: AtomicBool::new(false),
        mislabel_memory_as_local: config.mislabel_memory_as_local,
        interrupt: config.interrupt.clone().unwrap_or_default(),
        retry_deadline: Mutex::new(None),
        history: Mutex::new(Vec::new()),
        acks_ms: Mutex::new(Vec::new()),
        sequence: AtomicU64::new(0),
    });
    let clients: Vec<_> = (0..config.clients)
        .map(|i| {
            let seed = rng.next_u64();
            runtime.spawn(client(Arc::clone(&load), i, seed))
        })
        .collect();
    let events = inject_faults(
        target,
        &load,
        &mut rng,
        config.duration,
        &required_faults,
        config.store_control.as_deref(),
        config.ha_store.as_deref(),
    );
    let load_ms = load.ms();
    load.stop.store(true, Ordering::SeqCst);
    *load.retry_deadline.lock() = Some(Instant::now() + RETRY_GRACE);
    println!("chaos: load stopped at {load_ms} ms; retrying unresolved increments, then settling");
    runtime.block_on(async {
        for c in clients {
            let _ = c.await;
        }
    });
    let node_addrs = target.node_http();
    let mut not_ready = Vec::new();
    for i in 0..node_addrs.len() {
        if let Err(e) = target.wait_ready(i, READY_TIMEOUT) {
            not_ready.push(format!("{e:#}"));
        }
    }
    let history = std::mem::take(&mut *load.history.lock());
    let mut counters: Vec<String> = history.iter().map(|r| r.counter.clone()).collect();
    counters.sort();
    counters.dedup();
    let values = runtime.block_on(settle(&access, &node_addrs, &counters));
    let verdict = check(&history, &values);

    let mut acks = std::mem::take(&mut *load.acks_ms.lock());
    acks.sort_unstable();
    let mut longest = 0;
    let mut last = 0;
    for a in acks.iter().copied().filter(|a| *a <= load_ms) {
        longest = longest.max(a - last);
        last = a;
    }
    longest = longest.max(load_ms.saturating_sub(last));

    let mut faults: BTreeMap<String, u64> = BTreeMap::new();
    let mut fault_errors = not_ready;
    for e in &events {
        *faults.entry(format!("{:?}", e.fault)).or_default() += 1;
        if let Some(err) = &e.error {
            fault_errors.push(format!(
                "{:?} node{} (at {} ms): {err}",
                e.fault,
                e.node + 1,
                e.at_ms
            ));
        }
    }
    let store_faults = replicated_gaps(&events, &history, load_ms);
    let mut report = ChaosReport {
        store_faults,
        seed: config.seed,
        duration_ms: load_ms,
        by_kind: tally_history(&history),
        faults,
        fault_errors,
        longest_without_ack_ms: longest,
        verdict,
        history_path: None,
        required_faults,
        interrupted_at_ms: load.interrupt.load(Ordering::SeqCst).then_some(load_ms),
        cleanup: None,
    };
    if report.passed() {
        println!(
            "chaos: passed; deleting the {} counters it created",
            counters.len()
        );
        report.cleanup = Some(runtime.block_on(clean_up(&access, &node_addrs, &counters)));
    }
    if !report.passed() {
        let path = config.base_dir.join("chaos-history.jsonl");
        let mut out = String::new();
        for e in &events {
            out.push_str(&serde_json::json!({ "fault": e }).to_string());
            out.push('\n');
        }
        for r in &history {
            out.push_str(&serde_json::to_string(r)?);
            out.push('\n');
        }
        for (c, v) in &values {
            out.push_str(&serde_json::json!({ "counter": c, "values": v }).to_string());
            out.push('\n');
        }
        std::fs::write(&path, out)?;
        report.history_path = Some(path);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    // An RESP reply is applied only as `*2 :value :duplicate`, refused only
    // as an error other than INDETERMINATE, and unknown in every other case
    // (no reply, a cut connection, anything unexpected).
    #[test]
    fn resp_replies_are_classified() {
        let acked = Reply::Array(Some(vec![Reply::Integer(7), Reply::Integer(0)]));
        assert_eq!(resp_answer(Ok(acked)), Answer::Acked);
        assert_eq!(
            resp_answer(Ok(Reply::Error("INDETERMINATE store unreachable".into()))),
            Answer::Unknown("-INDETERMINATE store unreachable".into())
        );
        assert_eq!(
            resp_answer(Ok(Reply::Error("ERR not an integer".into()))),
            Answer::Failed("-ERR not an integer".into())
        );
        for other in [
            Reply::Simple("OK".into()),
            Reply::Integer(7),
            Reply::Array(Some(vec![Reply::Integer(7)])),
            Reply::Array(Some(vec![Reply::Bulk(None), Reply::Integer(0)])),
        ] {
            assert!(matches!(resp_answer(Ok(other)), Answer::Unknown(_)));
        }
        assert!(matches!(
            resp_answer(Err(RespError::Closed)),
            Answer::Unknown(_)
        ));
    }

    // An HTTP answer is applied only as a 200 with a value; a node's own
    // JSON refusal is not applied unless it says the outcome is unknown;
    // anything else (no answer, HAProxy's pages, 504) is unknown.
    #[test]
    fn http_answers_are_classified() {
        let ok = |status: u16, body: &str| Ok((status, body.to_string()));
        assert_eq!(http_answer(ok(200, r#"{"value":3}"#)), Answer::Acked);
        assert!(matches!(http_answer(ok(200, "{}")), Answer::Unknown(_)));
        assert!(matches!(
            http_answer(ok(400, r#"{"error":"bad"}"#)),
            Answer::Failed(_)
        ));
        assert!(matches!(
            http_answer(ok(503, r#"{"error":"x","outcome":"unknown"}"#)),
            Answer::Unknown(_)
        ));
        assert!(matches!(
            http_answer(ok(502, "<html>bad gateway</html>")),
            Answer::Unknown(_)
        ));
        assert!(matches!(
            http_answer(ok(504, r#"{"error":"timeout"}"#)),
            Answer::Unknown(_)
        ));
        assert!(matches!(
            http_answer(Err(HttpError::TimedOut(REQUEST_TIMEOUT))),
            Answer::Unknown(_)
        ));
    }
}
