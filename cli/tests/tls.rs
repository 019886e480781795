//! TLS on the front ends of the real binary: a RESP TLS port that
//! `redis-cli --tls` and the `redis` crate (`rediss://`) use, HTTPS that
//! `curl --cacert` uses, mutual TLS that takes only certificates from its
//! CA, a certificate reloaded on SIGHUP for new connections while old ones
//! go on, and TLS settings checked before anything is written.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tally_lab::pki::{Ca, Issued, write_file};
use tally_lab::testing::process::TallyProcess;

/// How long a reload may take to be seen by new connections.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("tally test CA").unwrap();
        ca.write_cert(&dir.path().join("ca.crt")).unwrap();
        let server = ca.server(&["localhost", "127.0.0.1"]).unwrap();
        server.write(dir.path(), "server").unwrap();
        Pki { dir, ca }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

/// A node with TLS ports only (both plaintext ports off), plus `extra`.
fn start_tls_only(pki: &Pki, data: &Path, extra: &[&str]) -> TallyProcess {
    let cert = pki.arg("server.crt");
    let key = pki.arg("server.key");
    let mut args = vec![
        "--data-dir",
        data.to_str().unwrap(),
        "--resp-addr",
        "off",
        "--http-addr",
        "off",
        "--resp-tls-addr",
        "127.0.0.1:0",
        "--https-addr",
        "127.0.0.1:0",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ];
    args.extend_from_slice(extra);
    TallyProcess::start_with(&args, &[])
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program} (is it installed?): {e}"))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn redis_cli_tls(port: u16, tls_args: &[&str], command: &[&str]) -> Output {
    let port = port.to_string();
    let mut args = vec!["-h", "127.0.0.1", "-p", &port, "--tls"];
    args.extend_from_slice(tls_args);
    args.extend_from_slice(command);
    run("redis-cli", &args)
}

fn curl(url: &str, tls_args: &[&str]) -> Output {
    let mut args = vec!["-sS", "--max-time", "10", "--fail"];
    args.extend_from_slice(tls_args);
    args.push(url);
    run("curl", &args)
}

/// A `rediss://` client of the `redis` crate trusting `ca_pem`, with an
/// optional client certificate.
fn rediss(port: u16, ca_pem: &str, client: Option<&Issued>) -> redis::Client {
    redis::Client::build_with_tls(
        format!("rediss://127.0.0.1:{port}/"),
        redis::TlsCertificates {
            client_tls: client.map(|c| redis::ClientTlsConfig {
                client_cert: c.cert_pem.clone().into_bytes(),
                client_key: c.key_pem.clone().into_bytes(),
            }),
            root_cert: Some(ca_pem.as_bytes().to_vec()),
        },
    )
    .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn tls_ports_serve_redis_cli_curl_and_the_redis_crate() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let node = start_tls_only(&pki, data.path(), &[]);
    assert_eq!(
        (node.resp, node.http),
        (None, None),
        "plaintext ports are off"
    );
    let resp_port = node.resp_tls.expect("a RESP TLS port").port();
    let https = node.https.expect("an HTTPS port");
    let ca = pki.arg("ca.crt");

    let out = redis_cli_tls(resp_port, &["--cacert", &ca], &["INCRBY", "tls", "5"]);
    assert_eq!(stdout(&out), "5", "{out:?}");

    // The redis crate over rediss://, in RESP2 and after HELLO 3.
    let rt = runtime();
    let client = rediss(resp_port, &pki.ca.cert_pem(), None);
    let v: i64 = rt.block_on(async {
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("INCR")
            .arg("tls")
            .query_async(&mut c)
            .await
            .unwrap()
    });
    assert_eq!(v, 6);

    // HTTPS with curl trusting the CA: the value written over RESP.
    let out = curl(
        &format!("https://127.0.0.1:{}/v1/counters/tls", https.port()),
        &["--cacert", &ca],
    );
    assert!(out.status.success(), "{out:?}");
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["value"], 6, "{body}");
    // The same name the certificate gives.
    let out = curl(
        &format!("https://localhost:{}/healthz", https.port()),
        &["--cacert", &ca],
    );
    assert!(out.status.success(), "{out:?}");

    // Without the CA, curl refuses the certificate (exit 60).
    let out = curl(&format!("https://127.0.0.1:{}/healthz", https.port()), &[]);
    assert_eq!(out.status.code(), Some(60), "{out:?}");

    // Plaintext RESP on the TLS port gets no answer as RESP.
    let out = run(
        "redis-cli",
        &["-h", "127.0.0.1", "-p", &resp_port.to_string(), "PING"],
    );
    assert_ne!(stdout(&out), "PONG", "{out:?}");
}

#[test]
fn mutual_tls_accepts_only_certificates_from_its_ca() {
    let pki = Pki::new();
    pki.ca
        .client("app")
        .unwrap()
        .write(pki.dir.path(), "app")
        .unwrap();
    let stranger_ca = Ca::new("a stranger's CA").unwrap();
    let stranger = stranger_ca.client("app").unwrap();
    stranger.write(pki.dir.path(), "stranger").unwrap();
    let data = tempfile::tempdir().unwrap();
    let client_ca = pki.arg("ca.crt");
    let node = start_tls_only(&pki, data.path(), &["--tls-client-ca", &client_ca]);
    let resp_port = node.resp_tls.unwrap().port();
    let url = format!(
        "https://127.0.0.1:{}/v1/counters/m",
        node.https.unwrap().port()
    );
    let ca = pki.arg("ca.crt");
    let (cert, key) = (pki.arg("app.crt"), pki.arg("app.key"));
    let (s_cert, s_key) = (pki.arg("stranger.crt"), pki.arg("stranger.key"));

    // HTTPS: a certificate from the CA is let in; none, or one from
    // another CA, is not.
    let with_cert = [
        "--cacert",
        ca.as_str(),
        "--cert",
        cert.as_str(),
        "--key",
        key.as_str(),
    ];
    let out = curl(&url, &with_cert);
    // The counter does not exist yet: a 404 is an answer from the node.
    assert!(
        out.status.success() || String::from_utf8_lossy(&out.stderr).contains("404"),
        "{out:?}"
    );
    let out = curl(&url, &["--cacert", &ca]);
    assert!(
        !out.status.success(),
        "no client certificate was let in: {out:?}"
    );
    let out = curl(&url, &["--cacert", &ca, "--cert", &s_cert, "--key", &s_key]);
    assert!(
        !out.status.success(),
        "a stranger's certificate was let in: {out:?}"
    );

    // RESP: the same.
    let out = redis_cli_tls(
        resp_port,
        &["--cacert", &ca, "--cert", &cert, "--key", &key],
        &["INCR", "m"],
    );
    assert_eq!(stdout(&out), "1", "{out:?}");
    let out = redis_cli_tls(resp_port, &["--cacert", &ca], &["INCR", "m"]);
    assert_ne!(
        stdout(&out),
        "2",
        "no client certificate was let in: {out:?}"
    );
    let rt = runtime();
    let refused = rt.block_on(async {
        let c = rediss(resp_port, &pki.ca.cert_pem(), Some(&stranger));
        match c.get_multiplexed_async_connection().await {
            Ok(mut c) => redis::cmd("INCR")
                .arg("m")
                .query_async::<i64>(&mut c)
                .await
                .is_err(),
            Err(_) => true,
        }
    });
    assert!(refused, "a stranger's certificate was let in over RESP");
    // Only the one admitted INCR counted.
    let out = redis_cli_tls(
        resp_port,
        &["--cacert", &ca, "--cert", &cert, "--key", &key],
        &["GET", "m"],
    );
    assert_eq!(stdout(&out), "1", "{out:?}");
}

#[test]
fn sighup_reloads_the_certificate_for_new_connections_while_old_ones_go_on() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let mut node = start_tls_only(&pki, data.path(), &[]);
    let port = node.resp_tls.unwrap().port();
    let rt = runtime();
    let old_ca = pki.ca.cert_pem();
    let mut old = rt.block_on(async {
        rediss(port, &old_ca, None)
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    });
    let incr = |c: &mut redis::aio::MultiplexedConnection| -> redis::RedisResult<i64> {
        rt.block_on(redis::cmd("INCR").arg("r").query_async(c))
    };
    assert_eq!(incr(&mut old).unwrap(), 1);

    // A new certificate from a new CA, written over the files.
    let new_ca = Ca::new("the next CA").unwrap();
    new_ca
        .server(&["localhost", "127.0.0.1"])
        .unwrap()
        .write(pki.dir.path(), "server")
        .unwrap();
    node.child.signal(libc::SIGHUP).unwrap();
    let connects = |ca: &str| {
        rt.block_on(async {
            match rediss(port, ca, None)
                .get_multiplexed_async_connection()
                .await
            {
                Ok(mut c) => redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok(),
                Err(_) => false,
            }
        })
    };
    let deadline = Instant::now() + RELOAD_TIMEOUT;
    while !connects(&new_ca.cert_pem()) {
        assert!(
            Instant::now() < deadline,
            "new connections did not get the new certificate"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!connects(&old_ca), "the old certificate is still served");
    // The connection made before the reload goes on.
    assert_eq!(incr(&mut old).unwrap(), 2);

    // A broken key: the reload fails, says so, and the certificate in use
    // stays.
    write_file(&pki.path("server.key"), b"not a key\n", 0o600).unwrap();
    node.child.signal(libc::SIGHUP).unwrap();
    let deadline = Instant::now() + RELOAD_TIMEOUT;
    let log = loop {
        let log = std::fs::read_to_string(&node.stderr_path).unwrap();
        if log.contains("TLS reload failed") {
            break log;
        }
        assert!(
            Instant::now() < deadline,
            "no reload failure logged:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(log.contains("--tls-key"), "{log}");
    assert!(connects(&new_ca.cert_pem()));
    assert!(node.terminate().success());
}

#[test]
fn tls_settings_are_checked_before_anything_is_written() {
    let pki = Pki::new();
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let tally = |args: &[&str]| {
        let mut all = vec!["serve", "--data-dir", data.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = run(env!("CARGO_BIN_EXE_tally"), &all);
        assert!(!out.status.success(), "{args:?} started");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let (cert, key) = (pki.arg("server.crt"), pki.arg("server.key"));

    let e = tally(&["--https-addr", "127.0.0.1:0"]);
    assert!(e.contains("need --tls-cert and --tls-key"), "{e}");
    let e = tally(&["--tls-cert", &cert]);
    assert!(e.contains("needs both --tls-cert"), "{e}");
    let e = tally(&["--tls-cert", &cert, "--tls-key", &key]);
    assert!(e.contains("no TLS port"), "{e}");
    // A key others may read is refused, like the users file.
    let open_key = pki.path("open.key");
    std::fs::copy(pki.path("server.key"), &open_key).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&open_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = tally(&[
        "--https-addr",
        "127.0.0.1:0",
        "--tls-cert",
        &cert,
        "--tls-key",
        open_key.to_str().unwrap(),
    ]);
    assert!(e.contains("--tls-key") && e.contains("chmod 600"), "{e}");
    // A certificate file that holds no certificate.
    let e = tally(&[
        "--https-addr",
        "127.0.0.1:0",
        "--tls-cert",
        &key,
        "--tls-key",
        &key,
    ]);
    assert!(
        e.contains("--tls-cert") && e.contains("no PEM certificate"),
        "{e}"
    );
    assert!(!data.exists(), "a refused start created the data directory");
}
