#!/usr/bin/env bash
# Installs NVRTC and the CUDA headers from PyPI's pinned CUDA 13.0 `nvidia-*` wheels into
# .cache/cuda13 (git-ignored), once, and prints the environment that points loraga at them.
# That is all loraga needs to compile its kernels on a machine without a GPU or CUDA toolkit.
# Usage: eval "$(scripts/cuda-wheels.sh)"
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.cache/cuda13
# 13.0.x: the GPU machines' driver (580, CUDA 13.0) rejects PTX from newer toolkits.
wheels="nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96"
if [ ! -f "$dest/.installed" ] || [ "$(cat "$dest/.installed")" != "$wheels" ]; then
    rm -rf "$dest"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$dest" $wheels >&2
    echo "$wheels" > "$dest/.installed"
fi
root=$(cd "$dest/nvidia/cu13" && pwd)
echo "export LD_LIBRARY_PATH=\"$root/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
echo "export LORAGA_CUDA_INCLUDE=\"$root/include\""
