#!/usr/bin/env bash
# Reports of the GSM8K grid (scripts/experiment/gsm8k.sh over methods x learning rates x seeds):
#   OUT/grid.{md,png}         every method and learning rate, mean ± sd over seeds
#   OUT/lr-<lr>.{md,png}      protocol (a): every method at one learning rate, LoRA at it the reference
#   OUT/best.{md,png}         protocol (b): each method at its best learning rate (chosen from
#                             grid.md's final eval loss and given here), LoRA's best the reference
#
#   scripts/experiment/gsm8k-report.sh RUNS_DIR OUT_DIR BEST...   BEST = method:lr, e.g. lora:3e-3
# Environment: LORAGA (the binary; default target/release/loraga).
set -euo pipefail
runs=${1:?usage: gsm8k-report.sh RUNS_DIR OUT_DIR method:lr...}
out=${2:?usage: gsm8k-report.sh RUNS_DIR OUT_DIR method:lr...}
shift 2
loraga=${LORAGA:-target/release/loraga}
mkdir -p "$out"
methods="full lora lora-ga lora-ga-peft"
title="SmolLM2-135M on GSM8K, mean of seeds"
"$loraga" report --seeds "$runs"/*/ --title "$title: every run" --out "$out/grid" > /dev/null
for lr in 1e-4 3e-4 1e-3 3e-3; do
    dirs=()
    for m in $methods; do
        for d in "$runs/$m-lr$lr-s"*/; do [ -d "$d" ] && dirs+=("$d"); done
    done
    "$loraga" report --seeds "${dirs[@]}" --reference "lora-lr$lr" --title "$title: every method at lr $lr" \
        --out "$out/lr-$lr" > /dev/null
done
dirs=()
reference=
for spec in "$@"; do
    IFS=: read -r m lr <<< "$spec"
    [ "$m" = lora ] && reference="lora-lr$lr"
    for d in "$runs/$m-lr$lr-s"*/; do [ -d "$d" ] && dirs+=("$d"); done
done
if [ ${#dirs[@]} -gt 0 ]; then
    "$loraga" report --seeds "${dirs[@]}" ${reference:+--reference "$reference"} \
        --title "$title: each method at its best lr" --out "$out/best" > /dev/null
fi
ls "$out"
