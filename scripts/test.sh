#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh machine, then runs it.
#   bash scripts/test.sh            # whole suite (slow end-to-end tests included)
#   bash scripts/test.sh -m "not slow"   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# CPU build of torch (a bare `pip install torch` would pull a multi-GB CUDA build)
$PY -m pip install -q --disable-pip-version-check torch==2.13.0
$PY -m pip install -q --disable-pip-version-check -e ".[demo,test]"
# verl's own functions are the reference of the agreement tests; its pins do not fit, so no deps
$PY -m pip install -q --disable-pip-version-check --no-deps verl==0.9.1
$PY -m pip install -q --disable-pip-version-check ray==2.60.0 tensordict==0.15.3 omegaconf==2.3.1 hydra-core==1.3.8 codetiming==1.4.0 pylatexenc==2.11 orjson fastapi==0.165.0 uvicorn==0.54.0
# a real browser for the dashboard tests
if ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
exec $PY -m pytest -n 2 --headless "$@"
