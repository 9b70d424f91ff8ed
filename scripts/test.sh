#!/usr/bin/env bash
# Installs everything the tests need from this repository's own files, then runs the
# checks CI runs: ruff, mypy, pytest. Safe to re-run; reuses .venv and node_modules.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
# anvil (a local EVM) for the chain tests, pinned in package-lock.json.
npm ci --silent --no-audit --no-fund

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/pytest -q "$@"
