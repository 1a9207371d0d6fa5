#!/usr/bin/env bash
# Install everything the test suite needs and run it (README command 2; CI runs this via .ci/run).
#
#   bash scripts/test.sh                 # whole suite, real-vLLM stage included
#   bash scripts/test.sh -m "not real_vllm"   # extra arguments go to pytest
#
# Steps: the gateway's own venv (.venv) with the test extras; the real-vLLM venv and test models
# (scripts/setup_vllm.sh, idempotent, ~2 min the first time); then pytest. Redis tests need a server at
# MAESTRO_TEST_REDIS_URL (default redis://127.0.0.1:6379/15): outside CI they skip without one, in CI they fail.
# Set MAESTRO_SKIP_REAL_VLLM=1 to skip the real-vLLM stage (it then reports as skipped, never as passed).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
    echo "[test] creating .venv"
    "$PY" -m venv .venv
fi
echo "[test] installing maestro with test extras"
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import gateway, backends, predictor, loadgen" || { echo "[test] install failed" >&2; exit 1; }
if [[ "${MAESTRO_SKIP_REAL_VLLM:-0}" != "1" ]]; then
    bash scripts/setup_vllm.sh
fi
echo "[test] running pytest"
exec .venv/bin/python -m pytest "$@"
