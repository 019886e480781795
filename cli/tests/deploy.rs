//! The files in `deploy/` stay true to the code: HAProxy accepts the
//! configuration and checks what the nodes answer, over TLS to the TLS
//! ports the example environment opens (and no plaintext port), every
//! variable of that environment is one `tally serve` reads, and the
//! systemd unit runs `tally serve` with that environment, restarts it
//! whatever the exit and reloads its certificate on `systemctl reload`.
//!
//! HAProxy must be installed (`scripts/test.sh` installs it): the check
//! fails without it rather than skip.

use std::path::Path;
use std::process::Command;

fn deploy_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Lines that are not comments or blank, trimmed.
fn settings(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// The value of `KEY=value` among the settings of an environment file.
fn env_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    settings(text)
        .into_iter()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn haproxy_config_is_valid_and_checks_what_nodes_answer() {
    // `haproxy -c` reads the certificate files the configuration names, so
    // it checks a copy that names throwaway ones instead of /etc/haproxy's.
    let text = deploy_file("haproxy.cfg");
    let dir = tempfile::tempdir().unwrap();
    let ca = tally_lab::pki::Ca::new("deploy test CA").unwrap();
    let issued = ca.server(&["localhost", "127.0.0.1"]).unwrap();
    let pem = dir.path().join("tally.pem");
    let ca_file = dir.path().join("tally-ca.crt");
    std::fs::write(
        &pem,
        format!("{}\n{}", issued.cert_pem.trim_end(), issued.key_pem),
    )
    .unwrap();
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let copy = text
        .replace("/etc/haproxy/tally.pem", &pem.display().to_string())
        .replace("/etc/haproxy/tally-ca.crt", &ca_file.display().to_string());
    let unprovided: Vec<&str> = settings(&copy)
        .into_iter()
        .filter(|l| l.contains("/etc/haproxy/"))
        .collect();
    assert!(
        unprovided.is_empty(),
        "files this test does not provide: {unprovided:?}"
    );
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, &copy).unwrap();
    tally_lab::testing::assert_haproxy_accepts(&path);
    let lines = settings(&text);
    // The checks must ask what a ready node answers: /readyz is 200 only
    // once the node has recovered, and PING gets +PONG.
    for expected in [
        "option httpchk GET /readyz",
        "http-check expect status 200",
        "tcp-check expect string +OK",
        "tcp-check send PING\\r\\n",
        "tcp-check expect string +PONG",
    ] {
        assert!(lines.contains(&expected), "missing `{expected}`");
    }
    let servers = lines.iter().filter(|l| l.starts_with("server ")).count();
    let checked = lines
        .iter()
        .filter(|l| l.starts_with("server ") && l.split_whitespace().any(|w| w == "check"))
        .count();
    assert!(servers >= 2, "{servers} servers");
    assert_eq!(checked, servers, "every server is health-checked");
}

// Proves: the example is TLS end to end. The nodes open no plaintext port;
// HAProxy ends HTTPS with its own certificate and reaches every node's
// HTTPS port over TLS, verifying it; RESP is passed through to every
// node's RESP TLS port, and its check speaks TLS and verifies too.
#[test]
fn haproxy_speaks_tls_to_the_tls_ports_the_nodes_open() {
    let env = deploy_file("tally.env");
    let value =
        |key: &str| env_value(&env, key).unwrap_or_else(|| panic!("tally.env does not set {key}"));
    assert_eq!(value("TALLY_RESP_ADDR"), "off", "no plaintext RESP port");
    assert_eq!(value("TALLY_HTTP_ADDR"), "off", "no plaintext HTTP port");
    assert!(value("TALLY_TLS_CERT").starts_with('/'));
    assert!(value("TALLY_TLS_KEY").starts_with('/'));
    let port = |key: &str| {
        let addr = value(key);
        addr.rsplit_once(':')
            .unwrap_or_else(|| panic!("{key}={addr} has no port"))
            .1
            .to_string()
    };
    let https_port = port("TALLY_HTTPS_ADDR");
    let resp_tls_port = port("TALLY_RESP_TLS_ADDR");
    assert!(
        value("TALLY_ADVERTISE_ADDR").ends_with(&format!(":{https_port}")),
        "the advertised address is the HTTPS one"
    );
    assert!(
        value("TALLY_STORE").contains("sslmode=verify-full")
            && value("TALLY_STORE").contains("sslrootcert=/"),
        "the store's certificate is verified"
    );

    let text = deploy_file("haproxy.cfg");
    let lines = settings(&text);
    assert!(lines.contains(&"ssl-default-bind-options ssl-min-ver TLSv1.2"));
    // Each backend's server lines, by the backend they follow.
    let mut backend = "";
    let mut servers: Vec<(&str, Vec<&str>)> = Vec::new();
    for l in &lines {
        if let Some(name) = l.strip_prefix("backend ") {
            backend = name;
        } else if l.starts_with("server ") {
            servers.push((backend, l.split_whitespace().collect()));
        }
    }
    let verified = |words: &[&str]| {
        words.windows(2).any(|w| w == ["verify", "required"]) && words.contains(&"ca-file")
    };
    let mut https = 0;
    let mut resp = 0;
    for (backend, words) in &servers {
        let addr = words[2];
        if backend.contains("http") {
            https += 1;
            assert!(addr.ends_with(&format!(":{https_port}")), "{words:?}");
            assert!(words.contains(&"ssl") && verified(&words[..]), "{words:?}");
        } else if backend.contains("resp") {
            resp += 1;
            assert!(addr.ends_with(&format!(":{resp_tls_port}")), "{words:?}");
            // Passed through: HAProxy's own TLS only for its check.
            assert!(!words.contains(&"ssl"), "{words:?}");
            assert!(
                words.contains(&"check-ssl") && verified(&words[..]),
                "{words:?}"
            );
        }
    }
    assert!(https >= 2 && resp >= 2, "{servers:?}");
    let binds: Vec<&&str> = lines.iter().filter(|l| l.starts_with("bind ")).collect();
    assert!(
        binds.iter().any(|b| b.contains(" ssl crt ")),
        "HTTPS ends at HAProxy: {binds:?}"
    );
}

#[test]
fn example_environment_names_only_variables_tally_serve_reads() {
    let help = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    let text = deploy_file("tally.env");
    let vars: Vec<&str> = settings(&text)
        .into_iter()
        .map(|l| l.split_once('=').map_or(l, |(k, _)| k))
        .collect();
    assert!(vars.contains(&"TALLY_STORE"), "{vars:?}");
    for var in &vars {
        assert!(
            help.contains(&format!("[env: {var}=")),
            "deploy/tally.env sets {var}, which `tally serve` does not read"
        );
    }
}

#[test]
fn systemd_unit_runs_the_node_with_that_environment_and_always_restarts_it() {
    let text = deploy_file("tally.service");
    let lines = settings(&text);
    let value = |key: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("tally.service has no {key}"))
    };
    assert!(value("ExecStart").ends_with("tally serve"));
    assert_eq!(value("EnvironmentFile"), "/etc/tally/tally.env");
    assert_eq!(value("Restart"), "always");
    assert_eq!(value("KillSignal"), "SIGTERM", "a stop is graceful");
    // `systemctl reload tally` sends SIGHUP, which reloads the certificate.
    assert_eq!(value("ExecReload"), "/bin/kill -HUP $MAINPID");
    // The journal and snapshots are not encrypted: only the node reads them.
    assert_eq!(value("StateDirectoryMode"), "0700");
    assert_eq!(value("CapabilityBoundingSet"), "", "no privilege");
    // The env file's data directory is one the unit lets the node write.
    let env = deploy_file("tally.env");
    let data_dir = settings(&env)
        .into_iter()
        .find_map(|l| l.strip_prefix("TALLY_DATA_DIR="))
        .expect("TALLY_DATA_DIR in tally.env");
    assert!(
        value("ReadWritePaths")
            .split_whitespace()
            .any(|p| p == data_dir),
        "ReadWritePaths must include {data_dir}"
    );
}

// Proves: the Patroni configuration is one Patroni accepts, and it asks for
// what the README promises: a synchronous standby for every commit, no
// acknowledgement by the primary alone, etcd's v3 API, a leader TTL of at
// least 20 s, and no promotion of a standby that lags.
#[test]
fn patroni_config_is_valid_and_synchronous() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy/patroni.yml");
    let out = Command::new("patroni")
        .arg("--validate-config")
        .arg(&path)
        .output()
        .expect(
            "running patroni --validate-config (is patroni installed? apt-get install patroni)",
        );
    assert!(
        out.status.success(),
        "patroni rejects deploy/patroni.yml: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = deploy_file("patroni.yml");
    let lines = settings(&text);
    for expected in [
        "synchronous_mode: true",
        "synchronous_mode_strict: true",
        "maximum_lag_on_failover: 0",
        "synchronous_commit: \"on\"",
        "etcd3:",
    ] {
        assert!(lines.contains(&expected), "missing `{expected}`");
    }
    let ttl: u64 = lines
        .iter()
        .find_map(|l| l.strip_prefix("ttl: "))
        .expect("a ttl")
        .parse()
        .unwrap();
    assert!(ttl >= 20, "ttl {ttl} s is below Patroni's advice");
}

// Proves: the store's HAProxy configuration is valid and sends connections
// only to the member Patroni says is the primary.
#[test]
fn store_haproxy_routes_to_the_patroni_primary() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy/haproxy-store.cfg");
    tally_lab::testing::assert_haproxy_accepts(&path);
    let text = deploy_file("haproxy-store.cfg");
    let lines = settings(&text);
    assert!(lines.contains(&"option httpchk OPTIONS /primary"));
    assert!(lines.contains(&"http-check expect status 200"));
    let servers: Vec<&&str> = lines.iter().filter(|l| l.starts_with("server ")).collect();
    assert_eq!(servers.len(), 3, "{servers:?}");
    for s in servers {
        let words: Vec<&str> = s.split_whitespace().collect();
        assert!(
            words.contains(&"check") && words.windows(2).any(|w| w == ["port", "8008"]),
            "{s} is not checked on Patroni's REST port"
        );
    }
    // The example environment points the nodes at this listener.
    let env = deploy_file("tally.env");
    let bind = lines
        .iter()
        .find_map(|l| l.strip_prefix("bind "))
        .expect("a bind line");
    assert!(
        settings(&env)
            .iter()
            .any(|l| l.starts_with("TALLY_STORE=") && l.contains(&format!("@{bind}/"))),
        "tally.env's TALLY_STORE does not use the store listener {bind}"
    );
}

/// HAProxy's `tcp-check send` argument with its escapes undone: `\ ` is a
/// space, `\r` and `\n` are CR and LF.
fn unescape_haproxy(arg: &str) -> Vec<u8> {
    arg.replace("\\ ", " ")
        .replace("\\r", "\r")
        .replace("\\n", "\n")
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp_health_check_authenticates_as_the_example_users_allow() {
    // The RESP check of haproxy.cfg, byte for byte, against a node with the
    // users of deploy/users: +OK to its AUTH, then +PONG to PING. And the
    // example environment names the users file. (HAProxy sends these bytes
    // inside TLS, `check-ssl`; the plaintext port here gets the same ones.)
    use tally_lab::testing::served::{ServedNode, read_at_least};
    use tokio::io::AsyncWriteExt;
    let users = tally::auth::Users::parse(&deploy_file("users")).expect("deploy/users parses");
    assert!(users.authenticate(b"healthcheck", b"wrong").is_none());
    let env = deploy_file("tally.env");
    assert!(settings(&env).contains(&"TALLY_USERS_FILE=/etc/tally/users"));

    let text = deploy_file("haproxy.cfg");
    let sends: Vec<Vec<u8>> = settings(&text)
        .iter()
        .filter_map(|l| l.strip_prefix("tcp-check send "))
        .map(unescape_haproxy)
        .collect();
    let expects: Vec<&str> = settings(&text)
        .iter()
        .filter_map(|l| l.strip_prefix("tcp-check expect string "))
        .collect();
    assert_eq!(sends.len(), expects.len(), "one expect per send");

    let dir = tempfile::tempdir().unwrap();
    let config = tally::ServerConfig {
        resp_addr: Some(([127, 0, 0, 1], 0).into()),
        http_addr: Some(([127, 0, 0, 1], 0).into()),
        users,
        ..tally::ServerConfig::default()
    };
    let server = ServedNode::open_with(dir.path(), config).await;
    let mut s = server.raw().await;
    for (send, expect) in sends.iter().zip(&expects) {
        s.write_all(send).await.unwrap();
        let reply = read_at_least(&mut s, expect.len() + 2).await;
        assert_eq!(
            String::from_utf8_lossy(&reply),
            format!("{expect}\r\n"),
            "reply to {:?}",
            String::from_utf8_lossy(send)
        );
    }
    server.stop().await;
}
