#!/usr/bin/env bash
# The fuzz targets in CI (docs/FUZZING.md): builds every target of fuzz/ (its own workspace,
# libFuzzer via cargo-fuzz, no sanitizer), replays the committed corpus of each (-runs=0), then
# fuzzes each for FUZZ_SECONDS (default 15). New inputs go to a scratch directory, so the
# committed corpus is left as it is; a crash fails the step and its input is kept under
# fuzz/artifacts/<target>/. Installs what a fresh machine lacks: a nightly toolchain (minimal
# profile) and cargo-fuzz (pinned, under ~/.cache/meshid/tools). The build is cached in
# ~/.cache/meshid/fuzz-target (or $MESHID_FUZZ_TARGET_DIR).
set -euo pipefail
cd "$(dirname "$0")/../.."
started=$(date +%s)
cargo_fuzz_version=0.13.2
seconds="${FUZZ_SECONDS:-15}"

if ! cargo +nightly --version >/dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal
fi
tools="$HOME/.cache/meshid/tools/cargo-fuzz-$cargo_fuzz_version"
if [ ! -x "$tools/bin/cargo-fuzz" ]; then
    CARGO_TARGET_DIR="$tools/build" cargo install --locked --root "$tools" cargo-fuzz \
        --version "$cargo_fuzz_version"
    rm -rf "$tools/build"
fi
export PATH="$tools/bin:$PATH"
export CARGO_TARGET_DIR="${MESHID_FUZZ_TARGET_DIR:-$HOME/.cache/meshid/fuzz-target}"
mkdir -p "$CARGO_TARGET_DIR"

cd fuzz
cargo fmt --check
fuzz=(cargo +nightly fuzz)
"${fuzz[@]}" build --sanitizer none
built=$(date +%s)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# Runs a libFuzzer command quietly: its summary lines when it passes, everything when it fails.
quiet() {
    if ! "$@" >"$scratch/log" 2>&1; then
        cat "$scratch/log"
        return 1
    fi
    grep -E '^(#[0-9]+ +DONE|Done [0-9]+ runs)' "$scratch/log" || true
}
for target in $("${fuzz[@]}" list); do
    echo "-- $target: replay corpus/$target ($(find "corpus/$target" -type f | wc -l) inputs)"
    quiet "${fuzz[@]}" run --sanitizer none "$target" "corpus/$target" -- -runs=0
    echo "-- $target: fuzz for ${seconds}s"
    mkdir -p "$scratch/$target"
    quiet "${fuzz[@]}" run --sanitizer none "$target" "$scratch/$target" "corpus/$target" -- \
        -max_total_time="$seconds"
done
echo "fuzz step: build $((built - started))s, total $(( $(date +%s) - started ))s"
