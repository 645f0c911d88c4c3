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
$PY -m pip install -q --disable-pip-version-check ray tensordict omegaconf hydra-core codetiming pylatexenc orjson
# a real browser for the dashboard tests
if ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
exec $PY -m pytest -n 2 --headless "$@"
