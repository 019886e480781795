//! The fault test: a short `tally chaos` run on a real 3-node cluster behind
//! the real HAProxy loses and double-counts nothing under every fault kind,
//! and the checker it relies on does report a lost or doubled increment.
//!
//! HAProxy must be installed (`scripts/test.sh` installs it): the run fails
//! without it rather than skip.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tally::chaos::{
    self, ChaosConfig, ChaosReport, Fault, Level, Outcome, Protocol, Request, StoreControl,
};

use support::postgres::PgServer;

fn request(counter: &str, level: Level, key: &str, delta: u64, outcome: Outcome) -> Request {
    Request {
        client: 0,
        counter: counter.into(),
        protocol: Protocol::Http,
        level,
        key: key.into(),
        delta,
        attempts: 1,
        unknown_attempts: 0,
        sent_ms: 0,
        done_ms: 1,
        outcome,
        last_error: None,
    }
}

fn values(pairs: &[(&str, &[u64])]) -> BTreeMap<String, Vec<u64>> {
    pairs
        .iter()
        .map(|(c, v)| ((*c).to_string(), v.to_vec()))
        .collect()
}

/// The checker accepts exact values, and values within the unresolved
/// increments' window.
#[test]
fn checker_accepts_a_correct_history() {
    let history = vec![
        request("a", Level::Local, "k1", 3, Outcome::Acked),
        request("a", Level::Local, "k2", 2, Outcome::Indeterminate),
        request("a", Level::Local, "k3", 7, Outcome::Failed),
        request("m", Level::Memory, "k4", 4, Outcome::Acked),
    ];
    for a in [3, 5] {
        let v = chaos::check(&history, &values(&[("a", &[a, a, a]), ("m", &[4, 4, 4])]));
        assert!(v.ok(), "{:?}", v.violations);
        assert_eq!((v.lost, v.counted_twice), (0, 0));
    }
}

/// An acknowledged increment missing from the final value is a violation,
/// and so is a value above acknowledged plus unresolved.
#[test]
fn checker_reports_lost_and_doubled_increments() {
    let history = vec![
        request("a", Level::Replicated, "k1", 3, Outcome::Acked),
        request("a", Level::Replicated, "k2", 2, Outcome::Acked),
        request("a", Level::Replicated, "k3", 4, Outcome::Failed),
    ];
    let lost = chaos::check(&history, &values(&[("a", &[3, 3, 3])]));
    assert!(!lost.ok());
    assert_eq!(lost.lost, 2);
    let doubled = chaos::check(&history, &values(&[("a", &[9, 9, 9])]));
    assert!(!doubled.ok());
    assert_eq!(doubled.counted_twice, 4);
    let split = chaos::check(&history, &values(&[("a", &[5, 5, 4])]));
    assert!(!split.ok(), "nodes that disagree must be reported");
    assert_eq!(split.disagreements, vec!["a".to_string()]);
}

/// A `memory` write lost by a crash is allowed and reported as such; the
/// same loss counted as if it were `local` is a violation.
#[test]
fn checker_holds_memory_only_to_the_upper_bound() {
    let memory = vec![request("m", Level::Memory, "k1", 5, Outcome::Acked)];
    let v = chaos::check(&memory, &values(&[("m", &[0, 0, 0])]));
    assert!(v.ok(), "{:?}", v.violations);
    assert_eq!(v.memory_lost, 5);
    let as_local = vec![request("m", Level::Local, "k1", 5, Outcome::Acked)];
    let v = chaos::check(&as_local, &values(&[("m", &[0, 0, 0])]));
    assert!(!v.ok());
    assert_eq!(v.lost, 5);
}

/// A retried `local` increment may be applied once per unknown attempt
/// (keys are per node below `replicated`), and that is reported; the same
/// history at `replicated`, whose keys are cluster-wide, is a violation.
#[test]
fn checker_allows_per_node_keys_only_below_replicated() {
    let retried = |level| {
        let mut r = request("a", level, "k1", 2, Outcome::Acked);
        r.attempts = 2;
        r.unknown_attempts = 1;
        vec![r]
    };
    let v = chaos::check(&retried(Level::Local), &values(&[("a", &[4, 4, 4])]));
    assert!(v.ok(), "{:?}", v.violations);
    assert_eq!(v.retry_applied_twice, 2);
    let v = chaos::check(&retried(Level::Local), &values(&[("a", &[6, 6, 6])]));
    assert!(
        !v.ok(),
        "two applications are the most one unknown attempt allows"
    );
    let v = chaos::check(&retried(Level::Replicated), &values(&[("a", &[4, 4, 4])]));
    assert!(!v.ok());
    assert_eq!(v.counted_twice, 2);
}

/// A test's private PostgreSQL server as a store the run may stop.
struct PgControl(Arc<PgServer>);

impl StoreControl for PgControl {
    fn stop(&self) {
        self.0.stop();
    }
    fn start(&self) {
        self.0.start();
    }
}

/// The seed of the short runs: `TALLY_CHAOS_SEED` replays another one.
fn seed() -> u64 {
    std::env::var("TALLY_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x7a11_c4a0_5eed)
}

/// The runs go one at a time: on two cores, two clusters under faults
/// would each miss their readiness and rotation windows.
static ONE_AT_A_TIME: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// Runs 20 s of chaos in a temporary directory, kept if the run fails.
fn short_run(store: Option<String>, store_control: Option<Arc<dyn StoreControl>>) -> ChaosReport {
    let _one = ONE_AT_A_TIME.lock();
    let dir = tempfile::tempdir().unwrap();
    let report = chaos::run(ChaosConfig {
        duration: Duration::from_secs(20),
        store,
        seed: seed(),
        clients: 6,
        exe: Some(env!("CARGO_BIN_EXE_tally").into()),
        base_dir: dir.path().to_path_buf(),
        store_control,
    })
    .expect("running chaos (is haproxy installed?)");
    println!("{}", report.render());
    if !report.passed() {
        // Keep the cluster's logs and the history for analysis.
        println!("kept {}", dir.keep().display());
    }
    report
}

fn assert_clean(report: &ChaosReport) {
    let table = report.render();
    for f in &report.required_faults {
        assert!(
            report.faults.get(&format!("{f:?}")).copied().unwrap_or(0) > 0,
            "{f:?} never ran\n{table}"
        );
    }
    assert_eq!(report.verdict.lost, 0, "{table}");
    assert_eq!(report.verdict.counted_twice, 0, "{table}");
    let acked: u64 = report.by_kind.values().map(|t| t.acked).sum();
    assert!(acked > 0, "no increment was acknowledged\n{table}");
    assert!(report.passed(), "{table}");
}

/// A short run with every fault kind on SQLite loses nothing and counts
/// nothing twice.
#[test]
fn chaos_short_run_sqlite() {
    let report = short_run(None, None);
    assert!(!report.required_faults.contains(&Fault::StoreOutage));
    assert_clean(&report);
}

/// The same on PostgreSQL, with a store outage among the faults.
#[test]
fn chaos_short_run_postgres() {
    let pg = Arc::new(PgServer::new());
    let url = pg.url(&pg.create_database());
    let report = short_run(Some(url), Some(Arc::new(PgControl(Arc::clone(&pg)))));
    assert!(report.required_faults.contains(&Fault::StoreOutage));
    assert_clean(&report);
}
