#!/usr/bin/env bash
# Installs pixelstream and serves it on embedded defaults (no Redis needed).
# Extra arguments go to `pixelstream serve` (e.g. --port 9000).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/pixelstream serve "$@"
