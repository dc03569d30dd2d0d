#!/usr/bin/env bash
# Prints the path of the Python venv holding tests/helm/requirements.txt, creating or refreshing
# it first when the requirements changed: $MESHID_HELM_VENV, default ~/.cache/meshid/helm-venv.
# Used by tests/helm/check.sh and tests/docs/check.sh. Progress goes to stderr.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${MESHID_HELM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/meshid/helm-venv}"
requirements="$repo/tests/helm/requirements.txt"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [[ ! -x "$venv/bin/python" || "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]]; then
    echo "== installing the chart checks' Python packages into $venv" >&2
    command -v python3 >/dev/null || { echo "python3 is required (3.10 or later)" >&2; exit 1; }
    if ! python3 -m venv --clear "$venv" >&2; then
        echo "python3 -m venv failed: on Debian/Ubuntu install python3-venv" >&2
        exit 1
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$requirements" >&2
    echo "$want" >"$stamp"
fi
echo "$venv"
