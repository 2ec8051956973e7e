#!/usr/bin/env bash
# Runs what scripts/gpu-stage.sh staged, on a GPU machine with no Rust toolchain, from the
# repository root (tests find their fixtures relative to it). Every test runs, the ignored GPU
# tests included; benches print their markdown summaries. Logs go to OUT_DIR:
#   env.log        GPU, driver, libraries seen
#   info.log       `loraga info` twice on a fresh kernel cache: cold (NVRTC) then warm (disk)
#   tests.log      every test binary with --include-ignored
#   bench.log      every bench, with Criterion's report
#   summary.md     the benches' summary tables
#   criterion.tgz  Criterion's data
# Usage: gpu-stage/run.sh OUT_DIR [all|tests|bench|info] [TEST_FILTER]
set -uo pipefail
stage=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: run.sh OUT_DIR [all|tests|bench|info] [TEST_FILTER]}
what=${2:-all}
filter=${3:-}
mkdir -p "$out"
out=$(cd "$out" && pwd)
status=0

{
    echo "commit $(cat "$stage/COMMIT" 2>/dev/null)"; date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
    ldconfig -p 2>/dev/null | grep -E 'libcuda\.so|libnvrtc\.so|libcublas\.so' | head
    echo "CUDA_HOME=${CUDA_HOME:-} LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
} > "$out/env.log" 2>&1

if [ "$what" = all ] || [ "$what" = info ]; then
    export LORAGA_KERNEL_CACHE=$(mktemp -d)
    { echo "## cold cache"; "$stage/loraga" info; echo; echo "## warm cache (second process)"; "$stage/loraga" info; } > "$out/info.log" 2>&1 || status=1
    unset LORAGA_KERNEL_CACHE
fi

if [ "$what" = all ] || [ "$what" = tests ]; then
    : > "$out/tests.log"
    export LORAGA_BIN="$stage/loraga" LORAGA_ROOT=$PWD
    passed=0; failed=0
    for t in "$stage"/tests/*; do
        echo "=== $(basename "$t")" >> "$out/tests.log"
        # The real-model tests (CPU tests; CI runs them) need the 94 MB GGUF, which is larger than
        # one transfer to a GPU machine: they run here only if it was brought separately.
        case "$(basename "$t")" in *_smollm2) needs_model=1 ;; *) needs_model=0 ;; esac
        if [ $needs_model = 1 ] && [ ! -f .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
            echo "NOT RUN: .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf is not on this machine" | tee -a "$out/tests.log"
            continue
        fi
        if "$t" --include-ignored $filter >> "$out/tests.log" 2>&1; then :; else status=1; fi
    done
    passed=$(grep -Eo '[0-9]+ passed' "$out/tests.log" | awk '{s+=$1} END {print s+0}')
    failed=$(grep -Eo '[0-9]+ failed' "$out/tests.log" | awk '{s+=$1} END {print s+0}')
    grep -E '^test .* FAILED|panicked' "$out/tests.log" | head -20
    echo "tests: $passed passed, $failed failed"
fi

if [ "$what" = all ] || [ "$what" = bench ]; then
    : > "$out/bench.log"
    export LORAGA_BENCH_OUT="$out/bench-md" CRITERION_HOME="$out/criterion"
    for b in "$stage"/benches/*; do
        echo "=== $(basename "$b")" >> "$out/bench.log"
        "$b" --bench >> "$out/bench.log" 2>&1 || status=1
    done
    cat "$out"/bench-md/*.md > "$out/summary.md" 2>/dev/null
    rm -rf "$out/bench-md"
    tar -czf "$out/criterion.tgz" -C "$out" criterion 2>/dev/null && rm -rf "$out/criterion"
    cat "$out/summary.md" 2>/dev/null
fi

[ -f "$out/info.log" ] && cat "$out/info.log"
exit $status
