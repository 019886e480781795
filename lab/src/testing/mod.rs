//! Harnesses shared by the test suites of every crate: a node served on
//! loopback in this process ([`served`]), the real `tally` binary as a
//! child process ([`process`]), and a private PostgreSQL server
//! ([`postgres`]).

pub mod postgres;
pub mod process;
pub mod served;

use std::path::PathBuf;

/// The `tally` binary that the running test belongs with: cargo puts test
/// executables in `target/<profile>/deps/` and binaries one level up, and
/// builds a package's binaries before its integration tests run.
pub fn tally_exe() -> PathBuf {
    let me = std::env::current_exe().expect("the test executable's path");
    let dir = me
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executables live in target/<profile>/deps");
    let exe = dir.join("tally");
    assert!(
        exe.is_file(),
        "{} does not exist: run the tests that start the binary from the tally-cli package \
         (cargo test -p tally-cli), which builds it first",
        exe.display()
    );
    exe
}
