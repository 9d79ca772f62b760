#!/usr/bin/env bash
# Installs everything the tests need and runs the whole suite: lint, types, the browser
# client's tests (Node), Python tests (the browser ones in Debian's chromium).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh test

# Redis is a real dependency of the Redis backends' tests.
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
fi

# The browser tests drive Debian's chromium through Playwright; never a downloaded browser.
if ! command -v chromium >/dev/null 2>&1; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium chromium-driver
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff check .
.venv/bin/mypy

# The browser client's development dependencies (TypeScript, which generates its declarations).
if grep -Eq '"(dev|peer|optional)?[dD]ependencies"' client_js/package.json; then
  if [ -f client_js/package-lock.json ]; then npm --prefix client_js ci; else npm --prefix client_js install; fi
fi
npm --prefix client_js test --silent

.venv/bin/pytest "$@"
