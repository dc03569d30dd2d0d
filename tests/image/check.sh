#!/usr/bin/env bash
# Builds meshid's container images without a daemon, exactly as docs/image.md prints it
# (tests/image/build.sh: crane from the Go module proxy, cached in ~/.cache/meshid/tools), then
# runs them from their unpacked root filesystems as uid 65532 and checks their config, the
# Dockerfile and the chart's default image. See tests/image/check.py. Needs root (chroot).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
command -v chroot >/dev/null || { echo "chroot (coreutils) is required" >&2; exit 1; }
exec python3 "$repo/tests/image/check.py" "$@"
