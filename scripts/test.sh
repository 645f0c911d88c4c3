#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh machine, then runs it.
#   bash scripts/test.sh            # whole suite (slow end-to-end tests included)
#   bash scripts/test.sh -m "not slow"   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# CPU build of torch (a bare `pip install torch` would pull a multi-GB CUDA build)
$PY -m pip install -q --disable-pip-version-check torch==2.13.0
# fsspec, s3fs and datasets pin one another exactly: resolved together here, with versions that exist
$PY -m pip install -q --disable-pip-version-check -e ".[demo,test]" datasets==5.2.0 s3fs==2026.9.0 fsspec==2026.9.0
# verl's own functions are the reference of the agreement tests; its pins do not fit, so no deps
$PY -m pip install -q --disable-pip-version-check --no-deps verl==0.9.1
$PY -m pip install -q --disable-pip-version-check ray==2.60.0 tensordict==0.15.3 omegaconf==2.3.1 hydra-core==1.3.8 codetiming==1.4.0 pylatexenc==2.11 orjson fastapi==0.165.0 uvicorn==0.54.0
# pins of the real third-party software the tests run against (S3 server, trackers, Ray)
$PY -m pip install -q --disable-pip-version-check "moto[server]==5.2.1" s3fs==2026.9.0 prometheus_client==0.26.0 \
  tensorboard==2.21.0 mlflow-skinny==3.17.2 sqlalchemy==2.1.9 alembic==1.20.1 wandb==0.31.0 trackio==0.43.0 \
  ruff==0.17.6 mypy==2.4.1
# OpenRLHF's real PolicyLoss is the reference of its adaptor test (its GPU-only imports are stubbed there)
$PY -m pip install -q --disable-pip-version-check --no-deps openrlhf==0.11.2
$PY -m pip install -q --disable-pip-version-check peft==0.21.2
# SkyRL's own dump code writes the importer test's pickles (it declares Python 3.12; its batch module runs on 3.11)
$PY -m pip install -q --disable-pip-version-check --no-deps jaxtyping==0.3.11
$PY -m pip install -q --disable-pip-version-check --no-deps --ignore-requires-python skyrl-train==0.3.1
# a real browser for the dashboard tests; real Prometheus and Alertmanager for the alerting tests
NEED=""
command -v chromedriver >/dev/null 2>&1 || NEED="$NEED chromium chromium-driver"
command -v prometheus >/dev/null 2>&1 || NEED="$NEED prometheus"
command -v prometheus-alertmanager >/dev/null 2>&1 || NEED="$NEED prometheus-alertmanager"
if [ -n "$NEED" ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $NEED >/dev/null
fi
# the project's lint and format settings (pyproject.toml) hold over the whole tree
$PY -m ruff check rldiag app tests benchmarks
$PY -m ruff format --check rldiag app tests benchmarks
$PY -m mypy rldiag app
exec $PY -m pytest -n 2 --headless "$@"
