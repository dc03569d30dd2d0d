#!/usr/bin/env bash
# Builds meshid's container image without a container engine (see docs/image.md): the release
# binary (or, with --agent, the agent-only binary), the shared libraries `ldd` says it loads and
# the dynamic loader, /etc/passwd and /etc/group naming the distroless `nonroot` user and a
# world-writable /tmp, as ONE layer on an empty OCI base, with the image config the Dockerfile
# gives: user 65532:65532, entrypoint /usr/local/bin/meshid (the agent image: cmd `agent`).
#
# Usage: tests/image/build.sh [--agent] OUT.tar
#
# OUT.tar is a docker-style image tarball named ghcr.io/meshid/meshid:<Cargo version> (with
# --agent: <version>-agent), or $MESHID_IMAGE_TAG: `crane push OUT.tar REF`, `docker load -i
# OUT.tar` or `podman load -i OUT.tar`. It uses go-containerregistry's crane, built from the Go module proxy
# into ~/.cache/meshid/tools the first time, and a crane registry on 127.0.0.1 (in memory, for
# the duration of the build) for `crane mutate`. The libraries come from this machine, so the
# image matches the Dockerfile's (distroless/cc-debian12) when this is Debian 12 as well.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

CRANE_VERSION=v0.22.1
agent=0
if [[ "${1:-}" == "--agent" ]]; then
    agent=1
    shift
fi
[[ $# -eq 1 ]] || { echo "usage: $0 [--agent] OUT.tar" >&2; exit 2; }
out="$(realpath -m "$1")"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/Cargo.toml" | head -n1)"
suffix=""
[[ $agent == 0 ]] || suffix=-agent
tag="${MESHID_IMAGE_TAG:-ghcr.io/meshid/meshid:$version$suffix}"
mkdir -p "$(dirname "$out")"

crane_dir="${XDG_CACHE_HOME:-$HOME/.cache}/meshid/tools/crane-$CRANE_VERSION"
crane="$crane_dir/crane"
if [[ ! -x "$crane" ]]; then
    echo "== building crane $CRANE_VERSION from the Go module proxy into $crane_dir" >&2
    (cd / && GOBIN="$crane_dir" GOFLAGS=-mod=mod go install "github.com/google/go-containerregistry/cmd/crane@$CRANE_VERSION")
fi

target_dir="${CARGO_TARGET_DIR:-$repo/target}"
if [[ $agent == 1 ]]; then
    echo "== cargo build --profile agent --no-default-features --locked" >&2
    (cd "$repo" && cargo build --profile agent --no-default-features --locked)
    binary="$target_dir/agent/meshid"
else
    echo "== cargo build --release --locked" >&2
    (cd "$repo" && cargo build --release --locked)
    binary="$target_dir/release/meshid"
fi

work="$(mktemp -d)"
registry_pid=""
cleanup() {
    [[ -z "$registry_pid" ]] || kill "$registry_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# The root filesystem of the layer.
root="$work/rootfs"
install -D -m 0755 "$binary" "$root/usr/local/bin/meshid"
# `ldd` lines: "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" and the loader
# "/lib64/ld-linux-x86-64.so.2 (0x...)"; linux-vdso has no file.
libs="$(ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')"
[[ -n "$libs" ]] || { echo "ldd found no shared libraries in $binary" >&2; exit 1; }
for lib in $libs; do
    install -D -m 0755 "$(realpath "$lib")" "$root$lib"
done
mkdir -p "$root/etc" "$root/tmp"
chmod 1777 "$root/tmp"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$root" -cf "$work/layer.tar" .

# crane mutate works on a registry: a throwaway one on loopback.
"$crane" registry serve --address 127.0.0.1:0 >"$work/registry.log" 2>&1 &
registry_pid=$!
port=""
for _ in $(seq 1 100); do
    port="$(sed -n 's/.*serving on port \([0-9]*\).*/\1/p' "$work/registry.log")"
    [[ -n "$port" ]] && break
    sleep 0.1
done
[[ -n "$port" ]] || { echo "crane registry did not start:" >&2; cat "$work/registry.log" >&2; exit 1; }
ref="127.0.0.1:$port/meshid:build"

"$crane" append --oci-empty-base --platform linux/amd64 -f "$work/layer.tar" -t "$ref" >/dev/null
mutate=(--user 65532:65532 --entrypoint /usr/local/bin/meshid)
[[ $agent == 0 ]] || mutate+=(--cmd agent)
"$crane" mutate "$ref" "${mutate[@]}" --set-platform linux/amd64 -t "$tag" -o "$out" >/dev/null
echo "== image $tag written to $out" >&2
