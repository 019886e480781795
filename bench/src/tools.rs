//! Finding the programs the benchmark runs: the release `tally` binary
//! (built here, so one command reproduces every figure) and the Redis tools.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use tally_lab::process::{ChildGuard, run_with_timeout};

/// A cold release build of tally on a small machine takes minutes.
const BUILD_TIMEOUT: Duration = Duration::from_secs(1800);
/// `--version` of a Redis tool answers at once.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds the `tally` binary in release mode with the cargo that runs this
/// program (or `cargo` on the PATH) and returns its path, as cargo reports
/// it, so that `CARGO_TARGET_DIR` and any cargo configuration are honoured.
pub fn build_tally() -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    eprintln!("building tally (cargo build --release --bin tally) ...");
    // Build output goes straight to our stderr so a long build shows
    // progress; stdout carries cargo's JSON messages.
    let guard = ChildGuard::spawn(
        Command::new(&cargo)
            .args(["build", "--release", "-p", "tally-cli", "--bin", "tally"])
            .arg("--manifest-path")
            .arg(&manifest)
            .arg("--message-format=json-render-diagnostics")
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .stdout(Stdio::piped()),
        "cargo build",
    )
    .context("running cargo to build tally (is cargo on the PATH?)")?;
    let (status, stdout) = wait_with_stdout(guard)?;
    if !status.success() {
        bail!("cargo build --release --bin tally failed ({status})");
    }
    executable_from_cargo_messages(&stdout)
}

fn wait_with_stdout(mut guard: ChildGuard) -> Result<(std::process::ExitStatus, String)> {
    let stdout = guard.take_stdout();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut s) = stdout {
            let _ = std::io::Read::read_to_string(&mut s, &mut text);
        }
        text
    });
    let Some(status) = guard.wait_or_kill(BUILD_TIMEOUT)? else {
        bail!(
            "{} did not finish within {} s and was killed",
            guard.name(),
            BUILD_TIMEOUT.as_secs()
        );
    };
    Ok((status, reader.join().unwrap_or_default()))
}

/// The path of the `tally` executable among cargo's JSON messages.
fn executable_from_cargo_messages(messages: &str) -> Result<PathBuf> {
    for line in messages.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact"
            && msg["target"]["name"] == "tally"
            && let Some(exe) = msg["executable"].as_str()
        {
            return Ok(PathBuf::from(exe));
        }
    }
    bail!("cargo built tally but reported no executable for it")
}

/// The first line `program --version` prints, if it runs.
pub fn version(program: &Path) -> Result<String> {
    let output = run_with_timeout(
        Command::new(program).arg("--version"),
        &program.display().to_string(),
        VERSION_TIMEOUT,
    )?;
    if !output.status.success() {
        bail!("{} --version failed ({})", program.display(), output.status);
    }
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text.lines().next().unwrap_or_default().trim().to_string())
}

/// Checks that a Redis tool is installed and returns its version line.
/// A missing tool is an error naming the Debian package that has it.
pub fn require(tool: &str) -> Result<String> {
    let package = match tool {
        "redis-server" => "redis-server",
        _ => "redis-tools",
    };
    version(Path::new(tool)).map_err(|e| {
        anyhow::anyhow!(
            "{tool} is needed and did not run ({e:#}); \
             on Debian or Ubuntu install it with: apt-get install {package}"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // The binary's path is taken from cargo's compiler-artifact message for
    // the tally target, not guessed from the target directory.
    #[test]
    fn tally_executable_is_found_in_cargo_messages() {
        let messages = r#"{"reason":"compiler-artifact","package_id":"path+file:///src#tally@0.1.0","target":{"kind":["lib"],"name":"tally"},"executable":null,"fresh":true}
{"reason":"compiler-artifact","package_id":"path+file:///src#tally@0.1.0","target":{"kind":["bin"],"name":"tally"},"executable":"/build/release/tally","fresh":false}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            executable_from_cargo_messages(messages).unwrap(),
            PathBuf::from("/build/release/tally")
        );
        assert!(executable_from_cargo_messages(r#"{"reason":"build-finished"}"#).is_err());
    }
}
