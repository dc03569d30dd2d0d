#!/usr/bin/env bash
# Start and stop the kube-apiserver + etcd test harness on 127.0.0.1.
#
#   run.sh build   compile bin/kube-harness (skipped when it is newer than its sources)
#   run.sh up      build if needed, start in the background, wait for /readyz,
#                  print `export MESHID_TEST_...=...` lines on stdout
#   run.sh env     print the export lines of the running harness again
#   run.sh status  say whether it runs, with its RSS
#   run.sh down    stop it and delete its state (idempotent)
#
# Typical use:  eval "$(tests/kube-harness/run.sh up)"
#
# Environment:
#   MESHID_HARNESS_DIR      state directory (default: tests/kube-harness/state)
#   MESHID_HARNESS_TIMEOUT  seconds `up` waits for readiness (default: 120)
#   MESHID_HARNESS_APISERVER_ARGS  extra kube-apiserver flags, space separated
#   MESHID_HARNESS_ENV_PREFIX  prefix of the printed variable names (default: MESHID_TEST_);
#                   a second instance beside the first takes another state directory and,
#                   e.g., MESHID_TEST_B_ (ports are free ones picked by the harness itself)
#
# A second instance:
#   MESHID_HARNESS_DIR=/tmp/harness-b MESHID_HARNESS_ENV_PREFIX=MESHID_TEST_B_ run.sh up
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
state="$(realpath -m "${MESHID_HARNESS_DIR:-$here/state}")"
timeout="${MESHID_HARNESS_TIMEOUT:-120}"
prefix="${MESHID_HARNESS_ENV_PREFIX:-MESHID_TEST_}"
bin="$here/bin/kube-harness"
marker=".meshid-kube-harness"

log() { echo "kube-harness: $*" >&2; }
die() { log "$*"; exit 1; }
[[ "$prefix" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "MESHID_HARNESS_ENV_PREFIX=$prefix is not a variable name prefix"

pid_running() {
    local pid
    [[ -f "$state/pid" ]] || return 1
    pid="$(cat "$state/pid")"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null
}

# Resident and peak resident memory of the harness process, in KiB.
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$(cat "$state/pid")/status" 2>/dev/null || echo 0; }
peak_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$(cat "$state/pid")/status" 2>/dev/null || echo 0; }

print_env() {
    local url
    url="$(cat "$state/ready")"
    echo "export ${prefix}KUBECONFIG=$state/kubeconfig"
    echo "export ${prefix}KUBE_URL=$url"
    echo "export ${prefix}SA_SIGNING_KEY=$state/pki/sa.key"
}

needs_build() {
    [[ -x "$bin" ]] || return 0
    local f
    for f in "$here"/*.go "$here/go.mod" "$here/go.sum"; do
        [[ "$f" -nt "$bin" ]] && return 0
    done
    return 1
}

build() {
    command -v go >/dev/null || die "go is not installed (needed to build the harness)"
    mkdir -p "$here/bin"
    log "building $bin (the first build on a machine downloads ~750 MB of modules and compiles for several minutes)"
    local start=$SECONDS
    (cd "$here" && go build -trimpath -ldflags='-s -w' -o "$bin" .)
    log "built in $((SECONDS - start))s"
}

# Deletes the state dir, but only one this script created (or an empty one),
# since MESHID_HARNESS_DIR may point anywhere.
clean_state() {
    [[ -e "$state" ]] || return 0
    if [[ -f "$state/$marker" ]] || [[ -z "$(ls -A "$state")" ]]; then
        rm -rf "$state"
    else
        die "$state exists but was not created by this script; refusing to delete it"
    fi
}

stop() {
    pid_running || return 0
    local pid i
    pid="$(cat "$state/pid")"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    log "pid $pid did not stop within 20s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
}

up() {
    if pid_running && [[ -f "$state/ready" ]]; then
        log "already running (pid $(cat "$state/pid"), RSS $(($(rss_kib) / 1024)) MiB)"
        print_env
        return 0
    fi
    stop
    clean_state
    if needs_build; then build; fi

    mkdir -p "$state"
    touch "$state/$marker"
    local start=$SECONDS
    # shellcheck disable=SC2086 # extra args are meant to be split
    setsid "$bin" --state-dir "$state" -- ${MESHID_HARNESS_APISERVER_ARGS:-} \
        >"$state/harness.log" 2>&1 </dev/null &
    echo $! >"$state/pid"

    while [[ ! -f "$state/ready" ]]; do
        if ! pid_running; then
            log "the harness exited during start-up; last lines of $state/harness.log:"
            tail -n 40 "$state/harness.log" >&2
            exit 1
        fi
        if ((SECONDS - start >= timeout)); then
            log "not ready after ${timeout}s; last lines of $state/harness.log:"
            tail -n 40 "$state/harness.log" >&2
            stop
            exit 1
        fi
        sleep 0.5
    done
    local rss
    rss="$(rss_kib)"
    echo "$rss" >"$state/rss-kib-at-ready"
    log "ready in $((SECONDS - start))s at $(cat "$state/ready") (pid $(cat "$state/pid"), RSS $((rss / 1024)) MiB)"
    print_env
}

case "${1:-}" in
build) if needs_build; then build; else log "$bin is up to date"; fi ;;
up) up ;;
env)
    pid_running && [[ -f "$state/ready" ]] || die "not running; start it with: $here/run.sh up"
    print_env
    ;;
status)
    if pid_running; then
        log "running (pid $(cat "$state/pid"), RSS $(($(rss_kib) / 1024)) MiB, peak $(($(peak_kib) / 1024)) MiB, ready: $([[ -f "$state/ready" ]] && echo yes || echo no))"
    else
        log "not running"
        exit 1
    fi
    ;;
down)
    stop
    clean_state
    log "stopped"
    ;;
*)
    echo "usage: $0 up|down|env|status|build" >&2
    exit 2
    ;;
esac
