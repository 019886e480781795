//! A private PostgreSQL server for tests: the library's
//! [`crate::pgserver::PgServer`] in a temporary directory, with the fast
//! settings (no fsync: test data need not survive a power cut), and every
//! error a test failure with the library's message.
//!
//! If the server binaries are missing the test fails, saying which package
//! to install (scripts/test.sh installs it): a store test that silently
//! skips proves nothing. When the tests run as root the server runs as an
//! unprivileged user; see the library module.
//!
//! [`shared`] gives one server per test binary, stopped at process exit;
//! each test takes a database of its own on it ([`PgServer::create_database`]).
//! A test that stops the server ([`PgServer::stop`], [`PgServer::start`])
//! starts a server of its own with [`PgServer::new`].

use std::sync::OnceLock;

use crate::pgserver::{self, PgError, PgOptions};

/// Connections the server accepts: tests open several stores at once.
const CONNECTIONS_MAX: u32 = 300;

/// A running (or stopped) private PostgreSQL server.
pub struct PgServer {
    inner: pgserver::PgServer,
    /// Whether `pg_stat_statements` is loaded (its library was found).
    pub stat_statements: bool,
}

static SHARED: OnceLock<PgServer> = OnceLock::new();

/// The test binary's server, started on first use and stopped when the
/// process exits.
pub fn shared() -> &'static PgServer {
    SHARED.get_or_init(|| {
        let server = PgServer::new();
        extern "C" fn stop_shared() {
            if let Some(server) = SHARED.get() {
                let _ = server.inner.shut_down();
            }
        }
        // Statics are never dropped: an exit hook stops the server instead.
        // SAFETY: registers a plain function with no preconditions.
        unsafe { libc::atexit(stop_shared) };
        server
    })
}

impl PgServer {
    /// Creates a cluster in a new temporary directory and starts it.
    /// Panics (failing the test) with the reason if it cannot.
    #[allow(clippy::new_without_default)] // Starting a server is not a default value.
    pub fn new() -> PgServer {
        let inner = pgserver::PgServer::new(PgOptions {
            durable: false,
            connections_max: CONNECTIONS_MAX,
            preload_stat_statements: true,
            ..PgOptions::default()
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let stat_statements = inner.stat_statements();
        PgServer {
            inner,
            stat_statements,
        }
    }

    pub fn port(&self) -> u16 {
        self.inner.port()
    }

    /// A connection as the superuser to `database`.
    pub fn connect(&self, database: &str) -> Result<::postgres::Client, ::postgres::Error> {
        match self.inner.connect(database) {
            Ok(client) => Ok(client),
            Err(PgError::Sql { source, .. }) => Err(source),
            Err(e) => panic!("{e}"),
        }
    }

    /// The store URL of `database`.
    pub fn url(&self, database: &str) -> String {
        self.inner.url(database)
    }

    /// Creates an empty database of its own for one test; returns its name.
    pub fn create_database(&self) -> String {
        self.inner
            .create_database()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Stops the server (fast shutdown; killed if it takes too long) and
    /// keeps its data directory and port for [`PgServer::start`].
    pub fn stop(&self) {
        if let Err(e) = self.inner.stop() {
            panic!("stopping the private PostgreSQL server: {e}");
        }
    }

    /// Starts the server again after [`PgServer::stop`], on the same data
    /// directory and port.
    pub fn start(&self) {
        if let Err(e) = self.inner.start() {
            panic!("restarting the private PostgreSQL server: {e}");
        }
    }
}
