#!/usr/bin/env bash
# Builds every test and bench binary (and the loraga CLI) on this machine, which needs no GPU,
# and stages them with the runner in one folder small enough to copy to a remote GPU machine
# that has no Rust toolchain. Then, on the GPU machine, from the repository root:
#
#     gpu-stage/run.sh OUT_DIR [all|tests|bench|info] [TEST_FILTER]
#
# Usage here: scripts/gpu-stage.sh [STAGE_DIR]      (default gpu-stage/, git-ignored)
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:-gpu-stage}
profile=gpu
rm -rf "$stage"
mkdir -p "$stage/tests" "$stage/benches"

list_executables() { # cargo JSON on stdin -> "name path" for each executable of target kind $1
    python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and (m["profile"]["test"] or m["target"]["kind"][0] == "bench"):
        kind = m["target"]["kind"][0]
        if (kind == "bench") == (sys.argv[1] == "bench"):
            print(m["target"]["name"] + ("-" + kind if kind in ("lib", "bin") else ""), m["executable"])
' "$1"
}

echo "building tests ($profile profile)" >&2
cargo test --workspace --profile "$profile" --no-run --message-format=json 2>/dev/null | list_executables test |
    while read -r name path; do cp "$path" "$stage/tests/$name"; done
echo "building benches" >&2
cargo bench --workspace --profile "$profile" --no-run --message-format=json 2>/dev/null | list_executables bench |
    while read -r name path; do cp "$path" "$stage/benches/$name"; done
echo "building the CLI" >&2
cargo build --profile "$profile" --bin loraga
cp "target/$profile/loraga" "$stage/loraga"
cp scripts/gpu-run.sh "$stage/run.sh"
git rev-parse --short HEAD > "$stage/COMMIT" 2>/dev/null || true
du -sh "$stage" >&2
ls -la "$stage" "$stage/tests" "$stage/benches" >&2
