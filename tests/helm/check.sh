#!/usr/bin/env bash
# Checks the Helm chart charts/meshid (see tests/helm/check.py for the list of checks):
#
#   1. helm lint and values.schema.json, through helm-python-sdk (Helm v4's Go SDK shipped as a
#      native library inside the PyPI wheel: no helm binary, nothing downloaded at run time);
#   2. kubernetes-validate --strict (Kubernetes 1.33 and 1.35) on every rendered object;
#   3. the chart's contract (hardening, probes, exact RBAC rules, meshid's config file);
#   4. with a kube-apiserver (MESHID_TEST_KUBECONFIG from `tests/kube-harness/run.sh up`):
#      server-side apply, RBAC exercised with the chart's ServiceAccount token, and a Helm
#      install/upgrade/uninstall; skipped without one, a failure under CI=true;
#   5. `cargo test --test helm_chart`: every rendered config file is accepted by
#      `meshid server --config` (skip with --no-cargo).
#
# Usage: tests/helm/check.sh [--no-cargo] [SCENARIO...]    (scenarios: tests/helm/values/*.yaml)
#
# Python packages (tests/helm/requirements.txt) go into a venv that is reused while the
# requirements file is unchanged: $MESHID_HELM_VENV, default ~/.cache/meshid/helm-venv.
# Rendered manifests and config files go to $CARGO_TARGET_DIR/helm (default target/helm).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"

run_cargo=1
if [[ "${1:-}" == "--no-cargo" ]]; then
    run_cargo=0
    shift
fi

venv="$("$repo/tests/helm/venv.sh")"

out="${CARGO_TARGET_DIR:-$repo/target}/helm"
rm -rf "$out"
echo "== helm chart checks (charts/meshid)"
"$venv/bin/python" "$repo/tests/helm/check.py" --out "$out" "$@"

if [[ "$run_cargo" == 1 ]]; then
    echo "== meshid server accepts the rendered config files"
    MESHID_HELM_RENDERED="$out" cargo test --locked --test helm_chart -- --nocapture
fi
