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
