#!/usr/bin/env bash
# The GSM8K convergence experiment of issue 8: SmolLM2-135M-Instruct fine-tuned on GSM8K train
# (prompt "Question: <q>\nAnswer: ", loss on the answer + EOS, max length 384), batch 16, 300
# steps, AdamW, 3% warmup then cosine, gradient clipping 1.0; LoRA and LoRA-GA with r = 8,
# alpha = 16 on all seven linear types (LoRA-GA's gradient from 32 held-apart batches of 4);
# eval loss on the first 256 GSM8K test answers every 50 steps. Then one PNG + table per call.
#
#   scripts/experiment/gsm8k.sh OUT_DIR RUN...      RUN = method:lr[:seed], method one of
#                                                   full, lora, lora-ga, lora-ga-peft, pissa
# e.g. scripts/experiment/gsm8k.sh runs/gsm8k lora:3e-4 lora-ga:3e-4 lora-ga-peft:3e-4 full:3e-5
#
# Environment: LORAGA (the binary; default target/release/loraga), MODEL (default the SmolLM2
# GGUF in .cache/models), GSM8K (folder with train.jsonl and test.jsonl; default
# ../shared/data/gsm8k), STEPS (default 300), DEADLINE (seconds; runs not started by then are
# skipped, so a time-limited machine still returns what finished), JOBS (runs at once, default 1:
# a 135M model leaves most of an H200 idle, so several runs share it; each run's per-step
# tokens/s is then not a throughput measurement), EXTRA (more `loraga train` flags for every run),
# EXACT=1 (after each run, GSM8K test exact match of its result by greedy decoding over all
# 1,319 test problems, into OUT_DIR/NAME/exact.json; EXACT_BATCH examples at a time, default 64).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: gsm8k.sh OUT_DIR method:lr[:seed]...}
shift
loraga=${LORAGA:-target/release/loraga}
model=${MODEL:-.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf}
data=${GSM8K:-../shared/data/gsm8k}
steps=${STEPS:-300}
deadline=$(( $(date +%s) + ${DEADLINE:-1000000} ))
mkdir -p "$out"
jobs=${JOBS:-1}

run_one() { # method lr seed name
    local method=$1 lr=$2 seed=$3 name=$4 extra started status
    case "$method" in
        lora-ga-peft) extra=(--method lora-ga --loraga-variant peft) ;;
        *) extra=(--method "$method") ;;
    esac
    started=$(date +%s)
    # shellcheck disable=SC2086 # EXTRA is a list of flags
    "$loraga" train --model "$model" --data "$data/train.jsonl" --eval-data "$data/test.jsonl" \
        --eval-examples 256 --rank 8 --alpha 16 --lr "$lr" --schedule cosine --warmup-ratio 0.03 \
        --max-grad-norm 1.0 --batch-size 16 --max-len 384 --steps "$steps" --seed "$seed" \
        --eval-every 50 --checkpoint-every 0 --loraga-batches 32 --loraga-batch-size 4 \
        --name "$name" --out "$out/$name" "${extra[@]}" ${EXTRA:-} > "$out/$name.log" 2>&1
    status=$?
    echo "$name: exit $status in $(( $(date +%s) - started )) s; $(tail -1 "$out/$name.log")"
    if [ $status = 0 ] && [ "${EXACT:-0}" = 1 ]; then
        local result=(--adapter "$out/$name/adapter")
        [ "$method" = full ] && result=(--weights "$out/$name/model.safetensors")
        "$loraga" eval --model "$model" "${result[@]}" --data "$data/test.jsonl" --examples 0 --gsm8k \
            --batch-size "${EXACT_BATCH:-64}" --max-new-tokens 256 --out "$out/$name/exact.json" \
            > "$out/$name.exact.log" 2>&1
        echo "$name: exact match exit $? $(grep 'exact match' "$out/$name.exact.log")"
    fi
    return $status
}

names=()
for spec in "$@"; do
    IFS=: read -r method lr seed <<< "$spec"
    seed=${seed:-0}
    name="$method-lr$lr-s$seed"
    if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "skipped $spec: past the deadline" | tee -a "$out/skipped.txt"
        continue
    fi
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; done
    run_one "$method" "$lr" "$seed" "$name" &
    names+=("$name")
done
wait
done_runs=()
for name in "${names[@]}"; do
    # A run is done when it exported its result (train writes run.json first, the adapter last).
    if [ -e "$out/$name/adapter" ] || [ -e "$out/$name/model.safetensors" ]; then done_runs+=("$out/$name"); fi
done
if [ ${#done_runs[@]} -gt 0 ]; then
    "$loraga" report "${done_runs[@]}" --out "$out/report"
fi
