//! Operating the binary: `tally inspect` verdicts and exit codes, settings
//! from flags, environment and the TOML file, and idempotency-key expiry.

use tally_lab::testing::process as common;

use std::process::Command;
use std::time::Duration;

use common::TallyProcess;
use tally::{Config, Durability, IncrementOptions, Node};

fn inspect(dir: &std::path::Path, json: bool) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tally"));
    cmd.arg("inspect").arg(dir);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn fill(dir: &std::path::Path, increments: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut c = Config::new(dir);
    c.segment_bytes_max = 4096;
    let node = Node::open(c).unwrap();
    rt.block_on(async {
        for i in 0..increments {
            node.increment(&format!("c{}", i % 10), 1, IncrementOptions::default())
                .await
                .unwrap();
        }
    });
    // Drop without shutdown: no final snapshot, the journal stays.
    drop(node);
}

fn segments(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("journal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

// inspect verifies every checksum, counts records, tells a torn tail (exit
// 0) from corruption recovery would refuse (exit 1), and changes nothing.
#[test]
fn inspect_reports_health_torn_tails_and_corruption() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), 300);
    let (code, text) = inspect(dir.path(), false);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("300 journal records"), "{text}");
    let (_, json) = inspect(dir.path(), true);
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(report["journal_records"], 300);
    assert_eq!(report["healthy"], true);

    let segs = segments(dir.path());
    // Half a record at the end of the newest segment: a torn write.
    let newest = segs.last().unwrap().clone();
    let mut bytes = std::fs::read(&newest).unwrap();
    bytes.extend_from_slice(&[7, 7, 7]);
    std::fs::write(&newest, &bytes).unwrap();
    let (code, text) = inspect(dir.path(), false);
    assert_eq!(code, 0, "a torn tail is a crash artifact: {text}");
    assert!(text.contains("torn-tail"), "{text}");
    assert_eq!(
        std::fs::read(&newest).unwrap(),
        bytes,
        "inspect changed a file"
    );

    // Flip a byte inside the first segment: corruption strict recovery refuses.
    let first = &segs[0];
    let mut bytes = std::fs::read(first).unwrap();
    bytes[40] ^= 0xff;
    std::fs::write(first, &bytes).unwrap();
    let (code, text) = inspect(dir.path(), false);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("corrupt") && text.contains("FAILED"),
        "{text}"
    );
}

// Flags beat environment variables, which beat the TOML file; a bad file is
// refused with its name in the message.
#[test]
fn settings_come_from_flags_env_and_file_in_that_order() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tally.toml");
    std::fs::write(
        &file,
        format!(
            "data_dir = \"{}\"\nnode_id = \"from-file\"\nhttp_addr = \"off\"\n",
            dir.path().join("from-file").display()
        ),
    )
    .unwrap();
    // The file alone decides the data dir and node id.
    let mut node = TallyProcess::start_with(&["--config", file.to_str().unwrap()], &[]);
    assert_eq!(node.node_id, "from-file");
    assert!(node.http.is_none(), "http_addr = off in the file");
    assert!(node.terminate().success());
    assert!(dir.path().join("from-file/node-id").exists());

    // The environment beats the file; a flag beats the environment.
    let env_dir = dir.path().join("from-env");
    let mut node = TallyProcess::start_with(
        &["--config", file.to_str().unwrap(), "--node-id", "from-flag"],
        &[
            ("TALLY_DATA_DIR", env_dir.to_str().unwrap()),
            ("TALLY_NODE_ID", "from-env"),
        ],
    );
    assert_eq!(node.node_id, "from-flag");
    assert!(node.terminate().success());
    assert!(env_dir.join("node-id").exists());

    std::fs::write(&file, "no_such_setting = 1\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tally.toml") && err.contains("no_such_setting"),
        "{err}"
    );
}

// A data directory belongs to one node id: starting it under another id is
// refused, since that would count one node's journal under two names.
#[test]
fn a_data_dir_refuses_a_different_node_id() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Config::new(dir.path());
    c.node_id = Some("a".into());
    Node::open(c.clone()).unwrap().shutdown().unwrap();
    c.node_id = Some("b".into());
    let err = Node::open(c).err().expect("a second id was accepted");
    assert!(err.to_string().contains("belongs to node 'a'"), "{err}");
}

// Keys are forgotten after the retention window, and that also holds
// after a restart (expiry is stored, on the wall clock).
#[test]
fn idempotency_keys_expire_after_the_retention_window() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut c = Config::new(dir.path());
    c.idempotency_retention = Duration::from_millis(300);
    let opts = IncrementOptions {
        durability: Some(Durability::Local),
        idempotency_key: Some("k"),
    };
    let node = Node::open(c.clone()).unwrap();
    rt.block_on(async {
        assert!(!node.increment("x", 1, opts).await.unwrap().duplicate);
        assert!(node.increment("x", 1, opts).await.unwrap().duplicate);
    });
    node.shutdown().unwrap();
    drop(node);
    let node = Node::open(c.clone()).unwrap();
    assert!(rt.block_on(node.increment("x", 1, opts)).unwrap().duplicate);
    std::thread::sleep(Duration::from_millis(400));
    let again = rt.block_on(node.increment("x", 1, opts)).unwrap();
    assert!(!again.duplicate, "an expired key was still remembered");
    assert_eq!(again.value, 2);
}

/// Runs `tally ARGS...`; returns the exit code, stdout and stderr.
fn tally_cmd(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Polls `tally status --json` through `url` until `check` accepts it.
fn status_until(
    url: &str,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    tally_lab::testing::eventually_blocking(what, || {
        let (code, out, err) = tally_cmd(&["status", "--url", url, "--json"]);
        let v: serde_json::Value =
            serde_json::from_str(&out).map_err(|e| format!("{code} {e}: {out}{err}"))?;
        if check(&v) { Ok(v) } else { Err(out) }
    })
}

// `tally status` shows every node of a cluster with its state, host and
// pid, the store, and the hottest counters summed over the nodes;
// `tally node retire` refuses a running node and retires it once it has
// stopped cleanly, after which status no longer lists it; a node killed
// with -9 is down, and retiring it needs --force.
#[test]
fn status_shows_the_cluster_and_node_retire_takes_out_a_stopped_node() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("store.db").display());
    let flags = tally_lab::testing::FAST.serve_flags();
    let start = |id: &str| {
        let mut args = vec!["--store", store.as_str(), "--node-id", id];
        args.extend(flags.iter().map(String::as_str));
        TallyProcess::start(&dir.path().join(id), &args)
    };
    let n1 = start("n1");
    let mut n2 = start("n2");
    let mut n3 = start("n3");
    let url = format!("http://{}", n1.http.unwrap());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut con = redis::Client::open(n2.resp_url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        for _ in 0..2000 {
            let _: i64 = redis::cmd("INCR")
                .arg("busy")
                .query_async(&mut con)
                .await
                .unwrap();
        }
    });
    let v = status_until(&url, "every node alive and busy sampled", |v| {
        let states: Vec<_> = v["view"]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["state"].clone())
            .collect();
        states == vec![serde_json::json!("alive"); 3] && v["hot_counters"][0]["name"] == "busy"
    });
    assert_eq!(v["view"]["nodes"][1]["pid"], n2.pid());
    assert!(v["unreachable"].as_array().unwrap().is_empty(), "{v}");
    let (code, table, err) = tally_cmd(&["status", "--url", &url]);
    assert_eq!(code, 0, "{err}");
    for expected in [
        "NODE",
        "n1",
        "n2",
        "alive",
        "store      sqlite, reachable",
        "busy",
    ] {
        assert!(table.contains(expected), "no {expected:?} in:\n{table}");
    }

    let (code, _, err) = tally_cmd(&["node", "retire", "n2", "--url", &url]);
    assert_eq!(code, 1);
    assert!(err.contains("is running"), "{err}");
    assert!(n2.terminate().success());
    status_until(&url, "n2 stopped", |v| {
        v["view"]["nodes"][1]["state"] == "stopped"
    });
    let (code, out, err) = tally_cmd(&["node", "retire", "n2", "--url", &url]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("node n2 retired"), "{out}");
    let v = status_until(&url, "n2 gone from the view", |v| {
        v["view"]["nodes"].as_array().unwrap().len() == 2
    });
    assert_eq!(v["view"]["nodes"][1]["node_id"], "n3");

    // Killed with -9: down once its heartbeat is ten intervals old, and
    // its journal may hold what it never flushed, so only --force retires.
    n3.kill9();
    status_until(&url, "n3 down", |v| {
        v["view"]["nodes"][1]["state"] == "down"
    });
    let (code, _, err) = tally_cmd(&["node", "retire", "n3", "--url", &url]);
    assert_eq!(code, 1);
    assert!(err.contains("--force") || err.contains("force"), "{err}");
    let (code, _, err) = tally_cmd(&["node", "retire", "n3", "--force", "--url", &url]);
    assert_eq!(code, 0, "{err}");
    let v = status_until(&url, "n3 gone from the view", |v| {
        v["view"]["nodes"].as_array().unwrap().len() == 1
    });
    assert_eq!(v["view"]["nodes"][0]["node_id"], "n1");
    let (code, _, err) = tally_cmd(&["status", "--url", "https://127.0.0.1:1"]);
    assert_eq!(code, 1);
    assert!(err.contains("--cacert"), "{err}");
    drop(n1);
}
