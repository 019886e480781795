//! The settings of `tally serve` as a user meets them: `--help` shows the
//! library's defaults, and errors about a setting name the flag that
//! changes it, not the library's field.

use std::process::{Command, Output};

use tally::cluster::ClusterConfig;
use tally::{Config, IncrementOptions, Node, ServerConfig};

fn tally(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        // A setting from the test's own environment would change what is
        // checked.
        .env_remove("TALLY_CONFIG")
        .output()
        .unwrap()
}

/// The `[default: ...]` that `--help` shows for `flag`, if any.
fn help_default(help: &str, flag: &str) -> Option<String> {
    let start = help
        .find(&format!("{flag} <"))
        .unwrap_or_else(|| panic!("--help lists no {flag}"));
    // Every setting ends with its `[env: ...]`, after its default.
    let block = &help[start..];
    let block = &block[..block
        .find("[env: ")
        .expect("an [env: ...] for every setting")];
    let value = block.split_once("[default: ")?.1;
    Some(value[..value.find(']').unwrap()].to_string())
}

// `tally serve --help` shows, for each setting the library has a default
// for, the value of `Config::new`, `ServerConfig::default()` or
// `ClusterConfig::new`, and none for the store.
#[test]
fn help_shows_the_library_defaults() {
    let out = tally(&["serve", "--help"]);
    assert!(out.status.success());
    // Wrapped lines joined, so that a wrap inside `[default: ...]` does not
    // matter.
    let help = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let node = Config::new("unused");
    let server = ServerConfig::default();
    let cluster = ClusterConfig::new("unused");
    let addr = |a: Option<std::net::SocketAddr>| a.map_or("off".into(), |a| a.to_string());
    let expected = [
        ("--durability", node.durability.to_string()),
        (
            "--memory-sync-delay-ms",
            node.memory_sync_delay.as_millis().to_string(),
        ),
        ("--segment-bytes-max", node.segment_bytes_max.to_string()),
        (
            "--snapshot-journal-bytes",
            node.snapshot_journal_bytes.to_string(),
        ),
        (
            "--idempotency-retention-s",
            node.idempotency_retention.as_secs().to_string(),
        ),
        (
            "--idempotency-keys-max",
            node.idempotency_keys_max.to_string(),
        ),
        ("--recovery-mode", node.recovery_mode.to_string()),
        ("--resp-addr", addr(server.resp_addr)),
        ("--http-addr", addr(server.http_addr)),
        (
            "--resp-connections-max",
            server.resp_connections_max.to_string(),
        ),
        (
            "--http-connections-max",
            server.http_connections_max.to_string(),
        ),
        (
            "--flush-interval-ms",
            cluster.flush_interval.as_millis().to_string(),
        ),
        (
            "--refresh-interval-ms",
            cluster.refresh_interval.as_millis().to_string(),
        ),
        (
            "--heartbeat-interval-ms",
            cluster.heartbeat_interval.as_millis().to_string(),
        ),
    ];
    for (flag, want) in expected {
        assert_eq!(
            help_default(&help, flag).as_deref(),
            Some(want.as_str()),
            "{flag}"
        );
    }
    assert_eq!(help_default(&help, "--store"), None);
}

// The library refuses `replicated` without a store in its `durability`
// field; the binary says which flag, variable and file key set it.
#[test]
fn a_refused_setting_is_named_by_its_flag() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = tally(&[
        "serve",
        "--data-dir",
        data.to_str().unwrap(),
        "--durability",
        "replicated",
        "--resp-addr",
        "off",
        "--http-addr",
        "off",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid --durability (TALLY_DURABILITY, or durability in the config file)"),
        "{err}"
    );

    // A value the binary cannot parse, from the file, is named the same way.
    let file = dir.path().join("tally.toml");
    std::fs::write(&file, "recovery_mode = \"lenient\"\n").unwrap();
    let out = tally(&["serve", "--config", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid --recovery-mode") && err.contains("'lenient'"),
        "{err}"
    );
}

// Corruption that strict recovery refuses is reported with the flag that
// accepts it; the library's message names `Config::recovery_mode`.
#[test]
fn refused_corruption_names_the_recovery_mode_flag() {
    let written = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut c = Config::new(written.path());
    c.segment_bytes_max = 4096;
    let node = Node::open(c).unwrap();
    rt.block_on(async {
        for i in 0..300 {
            node.increment(&format!("c{}", i % 10), 1, IncrementOptions::default())
                .await
                .unwrap();
        }
    });
    // No shutdown, which would snapshot the journal away. The dropped
    // node's threads may still hold its directory's lock, so the binary
    // gets a copy.
    drop(node);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(written.path().join("node-id"), dir.path().join("node-id")).unwrap();
    std::fs::create_dir(dir.path().join("journal")).unwrap();
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(written.path().join("journal")).unwrap() {
        let from = entry.unwrap().path();
        let to = dir.path().join("journal").join(from.file_name().unwrap());
        std::fs::copy(&from, &to).unwrap();
        segments.push(to);
    }
    segments.sort();
    assert!(segments.len() >= 2, "{segments:?}");
    // A flipped byte in the first segment is not a torn tail.
    let mut bytes = std::fs::read(&segments[0]).unwrap();
    bytes[40] ^= 0xff;
    std::fs::write(&segments[0], &bytes).unwrap();

    let out = tally(&[
        "serve",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--resp-addr",
        "off",
        "--http-addr",
        "off",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--recovery-mode to truncate-at-corruption") && !err.contains("Config::"),
        "{err}"
    );
}
