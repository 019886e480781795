//! The private PostgreSQL server of `tally_lab::pgserver` in a directory the
//! caller gives (as `tally chaos` and the benchmark use it): durability
//! settings as asked, data kept across stop and start, the directory kept
//! after the server is gone. When the tests run as root the server runs as
//! an unprivileged user, which must be able to reach the directory.

use std::os::unix::fs::PermissionsExt as _;

use tally_lab::pgserver::{PgError, PgOptions, PgServer};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A directory only its owner can pass through, as `tempfile` makes them.
fn closed_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

#[test]
fn durable_server_in_a_callers_directory_keeps_its_data() {
    let run = closed_dir();
    let dir = run.path().join("nested").join("postgres");
    let server = PgServer::new(PgOptions {
        durable: true,
        dir: Some(dir.clone()),
        reachable_from: Some(run.path().to_path_buf()),
        ..PgOptions::default()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let settings = server.settings().unwrap();
    assert!(settings.contains("fsync=on"), "{settings}");
    assert!(settings.contains("synchronous_commit=on"), "{settings}");
    assert!(settings.contains("full_page_writes=on"), "{settings}");
    assert!(
        server.version().contains("PostgreSQL"),
        "{}",
        server.version()
    );
    assert!(server.program("pgbench").ends_with("pgbench"));
    assert!(!server.stat_statements());

    let db = server.create_database().unwrap();
    server
        .connect(&db)
        .unwrap()
        .batch_execute("CREATE TABLE t (v int); INSERT INTO t VALUES (7)")
        .unwrap();
    let port = server.port();
    server.stop().unwrap();
    assert!(server.connect(&db).is_err(), "a stopped server answers");
    server.stop().unwrap();
    server.start().unwrap();
    server.start().unwrap();
    assert_eq!(server.port(), port);
    let v: i32 = server
        .connect(&db)
        .unwrap()
        .query_one("SELECT v FROM t", &[])
        .unwrap()
        .get(0);
    assert_eq!(v, 7);
    assert!(server.url(&db).ends_with(&format!(":{port}/{db}")));

    let log = server.log_path();
    drop(server);
    assert!(log.is_file(), "the caller's directory is kept");
    assert!(dir.join("data").is_dir());
}

#[test]
fn fast_server_in_a_temporary_directory_is_removed() {
    let server = PgServer::new(PgOptions {
        durable: false,
        ..PgOptions::default()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let settings = server.settings().unwrap();
    assert!(settings.contains("fsync=off"), "{settings}");
    assert!(settings.contains("synchronous_commit=off"), "{settings}");
    assert!(settings.contains("full_page_writes=off"), "{settings}");
    // The name is taken literally, not folded to lower case.
    server.create_named_database("Mixed_Case").unwrap();
    server.connect("Mixed_Case").unwrap();
    let dir = server.dir().to_path_buf();
    server.shut_down().unwrap();
    assert!(!dir.exists(), "{} is left", dir.display());
    assert!(matches!(server.start(), Err(PgError::ShutDown)));
}

#[test]
fn a_directory_the_server_cannot_reach_is_refused_as_root() {
    let run = closed_dir();
    let result = PgServer::new(PgOptions {
        durable: false,
        dir: Some(run.path().join("postgres")),
        ..PgOptions::default()
    });
    if is_root() {
        match result {
            Err(PgError::Unreachable { path, .. }) => assert_eq!(path, run.path()),
            Err(e) => panic!("expected Unreachable, got: {e}"),
            Ok(_) => panic!("the unprivileged user passed through a 0700 directory"),
        }
    } else {
        // Not root: the server runs as this user, who owns the directory.
        result.unwrap_or_else(|e| panic!("{e}"));
    }
}
