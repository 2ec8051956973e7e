#!/usr/bin/env bash
# Brings the SmolLM2 GGUF (94 MB) to a remote GPU machine whose transfers carry at most 64 MiB:
# in two halves, on two consecutive calls, while the machine stays warm between them.
#
#   here:   scripts/gpu-model.sh split      -> .gpu-model/1/part, .gpu-model/2/part (git-ignored)
#   there:  call 1 carries .gpu-model/1, call 2 carries .gpu-model/2; each starts with
#           scripts/gpu-model.sh receive    (moves the half it brought into .cache/models/parts,
#                                            and once both are there, joins them and checks sha256)
# Also carries the pure-Python `gguf` wheel (.whl/, git-ignored) that transformers needs to read
# GGUF files, if it is here: `receive` installs it into .cache/pylib (put that on PYTHONPATH).
set -euo pipefail
cd "$(dirname "$0")/.."
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
model=.cache/models/$NAME

case "${1:-}" in
split)
    [ -f "$model" ] || scripts/fetch-smollm2.sh
    rm -rf .gpu-model && mkdir -p .gpu-model/1 .gpu-model/2
    half=$(( ($(stat -c %s "$model") + 1) / 2 ))
    head -c "$half" "$model" > .gpu-model/1/part
    tail -c +"$((half + 1))" "$model" > .gpu-model/2/part
    ls -la .gpu-model/1 .gpu-model/2
    ;;
receive)
    mkdir -p .cache/models/parts
    for i in 1 2; do
        if [ -f ".gpu-model/$i/part" ]; then mv ".gpu-model/$i/part" ".cache/models/parts/$i"; fi
    done
    if [ -f "$model" ] && [ "$(sha256sum "$model" | cut -d' ' -f1)" = "$SHA256" ]; then
        echo "model present: $model"
    elif [ -f .cache/models/parts/1 ] && [ -f .cache/models/parts/2 ]; then
        cat .cache/models/parts/1 .cache/models/parts/2 > "$model.tmp"
        got=$(sha256sum "$model.tmp" | cut -d' ' -f1)
        if [ "$got" != "$SHA256" ]; then
            echo "error: joined $NAME has sha256 $got, expected $SHA256" >&2
            rm -f "$model.tmp"
            exit 1
        fi
        mv "$model.tmp" "$model" && rm -rf .cache/models/parts
        echo "model joined, sha256 ok: $model"
    else
        echo "model: waiting for the other half ($(ls .cache/models/parts | tr '\n' ' ')present)"
    fi
    if ls .whl/gguf-*.whl > /dev/null 2>&1 && [ ! -d .cache/pylib/gguf ]; then
        python3 -m pip install --quiet --no-deps --no-index --target .cache/pylib .whl/gguf-*.whl
        echo "installed gguf into .cache/pylib"
    fi
    ;;
*)
    echo "usage: scripts/gpu-model.sh split|receive" >&2
    exit 2
    ;;
esac
