#!/usr/bin/env bash
# Runs every check and test meshid has: format, lints, unit and integration tests against the
# real components (kube-apiserver harness, Envoy, moto). This is the README's test command;
# .ci/run installs the system prerequisites and then calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --all-targets --locked
