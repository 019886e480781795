//! TLS to a PostgreSQL store, against a private server started with
//! `ssl = on` and a certificate from a test CA: `verify-full` connects and
//! the connection is encrypted (the server's own `pg_stat_ssl` says so);
//! a wrong host name, an unknown CA and a server without TLS are refused
//! with an error that says which; `require` and `verify-ca` behave as
//! libpq's do.

use std::path::Path;

use tally::store;
use tally_lab::pgserver::{PgOptions, PgServer};
use tally_lab::pki::Ca;

struct Fixture {
    server: PgServer,
    dir: tempfile::TempDir,
    database: String,
}

impl Fixture {
    /// A server whose certificate names only `localhost`.
    fn new() -> Fixture {
        let ca = Ca::new("tally test CA").unwrap();
        let dir = tempfile::tempdir().unwrap();
        ca.write_cert(&dir.path().join("ca.crt")).unwrap();
        let other = Ca::new("another CA").unwrap();
        other.write_cert(&dir.path().join("other.crt")).unwrap();
        let server = PgServer::new(PgOptions {
            durable: false,
            tls: Some(ca.server(&["localhost"]).unwrap()),
            ..PgOptions::default()
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let database = server.create_database().unwrap_or_else(|e| panic!("{e}"));
        Fixture {
            server,
            dir,
            database,
        }
    }

    /// The store URL with `host` and the given query.
    fn url(&self, host: &str, query: &str) -> String {
        let plain = self.server.url(&self.database);
        let url = plain.replacen("127.0.0.1", host, 1);
        format!("{url}?{query}")
    }

    fn file(&self, name: &str) -> String {
        let p: &Path = self.dir.path();
        p.join(name).display().to_string()
    }

    /// How many of the server's connections from tally use TLS.
    fn encrypted_tally_connections(&self) -> i64 {
        let mut c = self.server.connect("postgres").unwrap();
        c.query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'tally' AND s.ssl",
            &[],
        )
        .unwrap()
        .get(0)
    }
}

fn open_error(url: &str) -> String {
    match store::open(url) {
        Ok(_) => panic!("opening {url} succeeded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn verify_full_connects_encrypted_and_refuses_what_it_cannot_verify() {
    let f = Fixture::new();
    let ca = f.file("ca.crt");

    // The certificate names localhost: verify-full to localhost works,
    // and the server sees an encrypted connection.
    let good = f.url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    store::check_url(&good).unwrap();
    let s = store::open(&good).unwrap_or_else(|e| panic!("verify-full to localhost: {e}"));
    assert_eq!(f.encrypted_tally_connections(), 1);
    drop(s);

    // The same server reached as 127.0.0.1: the name is not in the
    // certificate.
    let e = open_error(&f.url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ));
    assert!(
        e.contains("does not name this host") && e.contains("127.0.0.1"),
        "{e}"
    );

    // verify-ca checks the chain only: 127.0.0.1 is accepted.
    let s = store::open(&f.url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}")))
        .unwrap_or_else(|e| panic!("verify-ca: {e}"));
    drop(s);

    // A CA that did not sign the server's certificate.
    let other = f.file("other.crt");
    let e = open_error(&f.url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={other}"),
    ));
    assert!(e.contains("not signed by a CA in sslrootcert"), "{e}");

    // require: encrypted, nothing verified (libpq's meaning).
    let s = store::open(&f.url("127.0.0.1", "sslmode=require"))
        .unwrap_or_else(|e| panic!("require: {e}"));
    assert!(f.encrypted_tally_connections() >= 1);
    drop(s);
}

#[test]
fn a_missing_ca_file_or_a_server_without_tls_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere.crt").display().to_string();
    let e = store::check_url(&format!(
        "postgres://u@localhost:5432/x?sslmode=verify-full&sslrootcert={missing}"
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("sslrootcert") && e.contains("nowhere.crt"),
        "{e}"
    );

    // A server that offers no TLS.
    let plain = PgServer::new(PgOptions {
        durable: false,
        ..PgOptions::default()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let database = plain.create_database().unwrap_or_else(|e| panic!("{e}"));
    let e = open_error(&format!("{}?sslmode=require", plain.url(&database)));
    assert!(e.contains("enable ssl on the server"), "{e}");
    // The default (prefer) still connects to it in plaintext.
    store::open(&plain.url(&database)).unwrap_or_else(|e| panic!("prefer: {e}"));
}
