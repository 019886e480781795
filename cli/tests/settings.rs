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

// Without users a node does not listen on a network address unless told
// to; a users file others may read is refused; neither error quotes a
// secret, and neither touches the data directory.
#[test]
fn an_open_node_on_a_network_is_a_decision() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_arg = data.to_str().unwrap();
    let out = tally(&[
        "serve",
        "--data-dir",
        data_arg,
        "--resp-addr",
        "off",
        "--http-addr",
        "0.0.0.0:0",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to serve 0.0.0.0:0 without authentication")
            && err.contains("--users-file")
            && err.contains("--insecure-no-auth true"),
        "{err}"
    );
    assert!(
        !data.exists(),
        "the refused start created the data directory"
    );

    let secret = "a-secret-that-must-not-show-0123";
    let users = dir.path().join("users");
    // Each attempt is refused while reading the file, before any port or
    // directory.
    let serve_with_users = || {
        tally(&[
            "serve",
            "--data-dir",
            data_arg,
            "--resp-addr",
            "off",
            "--http-addr",
            "off",
            "--users-file",
            users.to_str().unwrap(),
        ])
    };
    std::fs::write(&users, format!("app write {secret}\n")).unwrap();
    std::fs::set_permissions(&users, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = serve_with_users();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid --users-file") && err.contains("chmod 600"),
        "{err}"
    );
    assert!(!err.contains(secret), "{err}");

    std::fs::write(&users, "app write short\n").unwrap();
    std::fs::set_permissions(&users, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = serve_with_users();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 1: the secret of user 'app' is 5 bytes"),
        "{err}"
    );
    assert!(!err.contains("short"), "{err}");
}

// The real binary with users and debug logging: after failed and good
// attempts on both front ends, no secret is in its log, its command line,
// its environment (the file is named there, not the secrets) or a reply.
#[test]
fn secrets_never_show() {
    use std::io::{Read as _, Write as _};
    use std::os::unix::fs::PermissionsExt as _;
    use tally_lab::testing::process::TallyProcess;
    let dir = tempfile::tempdir().unwrap();
    let secret = "s3cret-that-must-not-show-0123456";
    let users = dir.path().join("users");
    std::fs::write(&users, format!("app write {secret}\n")).unwrap();
    std::fs::set_permissions(&users, std::fs::Permissions::from_mode(0o600)).unwrap();
    let data = dir.path().join("data");
    let node = TallyProcess::start_with(
        &[
            "--data-dir",
            data.to_str().unwrap(),
            "--users-file",
            users.to_str().unwrap(),
            "--log-level",
            "debug",
        ],
        &[],
    );
    let resp = node.resp.unwrap();
    let http = node.http.unwrap();
    let talk = |addr: std::net::SocketAddr, bytes: &[u8]| -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        // Each request ends the connection (QUIT, Connection: close).
        s.write_all(bytes).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let wrong = format!("{}X", &secret[..secret.len() - 1]);
    let replies = [
        talk(resp, format!("AUTH app {wrong}\r\nAUTH app {secret}\r\nINCR c\r\nINFO\r\nCLIENT INFO\r\nQUIT\r\n").as_bytes()),
        talk(http, format!("GET /v1/cluster HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer app:{wrong}\r\nConnection: close\r\n\r\n").as_bytes()),
        talk(http, format!("GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer app:{secret}\r\nConnection: close\r\n\r\n").as_bytes()),
    ];
    assert!(
        replies[0].contains("WRONGPASS") && replies[0].contains(":1\r\n"),
        "{}",
        replies[0]
    );
    assert!(replies[1].starts_with("HTTP/1.1 401"), "{}", replies[1]);
    assert!(
        replies[2].contains("tally_auth_failures_total 2"),
        "{}",
        replies[2]
    );
    for (i, reply) in replies.iter().enumerate() {
        assert!(
            !reply.contains(secret) && !reply.contains(&wrong),
            "reply {i}: {reply}"
        );
    }
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", node.pid())).unwrap();
    let environ = std::fs::read(format!("/proc/{}/environ", node.pid())).unwrap();
    let mut node = node;
    node.terminate();
    let log = std::fs::read_to_string(&node.stderr_path).unwrap();
    assert!(log.contains("connection"), "the debug log is empty: {log}");
    // Written to a file, not a terminal: no colour codes.
    assert!(!log.contains('\x1b'), "colour codes in a log file: {log:?}");
    for (what, text) in [
        ("log", log.as_bytes()),
        ("command line", &cmdline[..]),
        ("environment", &environ[..]),
    ] {
        let text = String::from_utf8_lossy(text);
        assert!(
            !text.contains(secret) && !text.contains(&wrong),
            "the {what} shows a secret"
        );
    }
}

// A store URL that can never work is refused before anything is written:
// no data directory, no node id to trip over when the command is fixed.
#[test]
fn a_bad_store_url_changes_nothing_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for (url, says) in [
        ("bogus://x", "scheme 'bogus' is not supported"),
        (
            "postgres://u:pw@db:notaport/tally",
            "PostgreSQL URL is invalid",
        ),
        (
            "postgres://u@h1:5432,h2:5432/t?port=1,2,3",
            "PostgreSQL URL names 2 hosts but",
        ),
        ("sqlite://", "names no file"),
    ] {
        let out = tally(&[
            "serve",
            "--data-dir",
            data.to_str().unwrap(),
            "--resp-addr",
            "off",
            "--http-addr",
            "off",
            "--store",
            url,
        ]);
        assert!(!out.status.success(), "{url}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("invalid --store (TALLY_STORE") && err.contains(says),
            "{url}: {err}"
        );
        assert!(!err.contains("pw@"), "{url}: the password is shown: {err}");
        assert!(!data.exists(), "{url}: the data directory was created");
    }
}
