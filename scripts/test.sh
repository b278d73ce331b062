#!/usr/bin/env bash
# Install optserve with its test dependencies and run every check: lint, types, the
# OpenAPI document, the Python suite (core, sessions, api, clients, e2e), the JavaScript
# client's tests and the examples. Works on a fresh machine with Python 3.11 and Node 20.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --quiet --upgrade pip
# torch is pinned exactly: any range would pull a multi-gigabyte CUDA build.
python -m pip install --quiet -e ".[dev]" -e "clients/python[torch]" "torch==2.13.0"

echo "== ruff"
ruff check .
ruff format --check .
echo "== mypy"
mypy
(cd clients/python && mypy)
if [ -f clients/openapi.json ]; then
  echo "== openapi"
  python -m service.api.openapi --check clients/openapi.json
fi

if [ -f clients/js/package.json ]; then
  echo "== javascript client: build"
  # built before pytest: tests/docs runs the documentation's JavaScript blocks against it
  (cd clients/js && npm ci --no-audit --no-fund && npm run build)
fi

echo "== pytest"
python -m pytest

if [ -f clients/js/package.json ]; then
  echo "== javascript client: tests"
  (cd clients/js && npm test)
fi
