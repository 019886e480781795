#!/usr/bin/env bash
# Runs every test of tally on a fresh machine: installs what the tests need
# (Debian packages, Rust components), then format, lint and test checks.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v redis-server >/dev/null || need_pkgs+=(redis-server)
command -v redis-cli >/dev/null || need_pkgs+=(redis-tools)
command -v haproxy >/dev/null || need_pkgs+=(haproxy)
# The benchmark's smoke run drives tally's HTTP increments with wrk.
command -v wrk >/dev/null || need_pkgs+=(wrk)
# The dashboard's test loads it in headless Chromium.
command -v chromium >/dev/null || need_pkgs+=(chromium)
# The TLS tests drive HTTPS with curl (--cacert, --cert).
command -v curl >/dev/null || need_pkgs+=(curl)
# The highly available store: Patroni managing PostgreSQL, with etcd.
command -v patroni >/dev/null || need_pkgs+=(patroni)
command -v etcd >/dev/null || need_pkgs+=(etcd-server)
# The store tests start a private PostgreSQL server; they need the server
# binaries (initdb, postgres), which Debian keeps in /usr/lib/postgresql/*/bin.
if ! command -v initdb >/dev/null && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
  need_pkgs+=(postgresql)
fi
if ((${#need_pkgs[@]})); then
  echo "installing Debian packages: ${need_pkgs[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need_pkgs[@]}"
fi
# Real Redis client libraries for the compatibility suite (compat/):
# redis-py from PyPI, ioredis and node-redis from npm, at pinned versions.
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -r compat/python/requirements.txt
npm ci --prefix compat/node --no-audit --no-fund --loglevel=error
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The library without its optional parts (store backends, front ends)
# builds, lints clean, and pulls in none of the binary's dependencies.
cargo clippy -p tally --no-default-features -- -D warnings
forbidden=$(cargo tree -p tally --no-default-features -e normal --prefix none \
  | awk '{print $1}' \
  | grep -xE 'clap|toml|tracing-subscriber|anyhow|axum|hyper|rusqlite|postgres' \
  | sort -u || true)
if [ -n "$forbidden" ]; then
  echo "tally --no-default-features depends on: $forbidden" >&2
  exit 1
fi
# API documentation builds without broken links.
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
# The benchmark program at its smallest sizes (about a minute once built),
# so that a change that breaks it is caught here, not when someone needs
# the figures.
cargo run --release -p tally-bench -- --quick > /dev/null
cargo test --workspace --features tally-cli/long-tests,tally-lab/long-tests
