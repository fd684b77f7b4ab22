#!/usr/bin/env bash
# The project's one test command: `bash tests/run.sh [pytest args]`.
# On a fresh machine with only Python 3.10+ it creates .venv, installs the package with its test
# dependencies (nnunetv2 2.8.x and a torch that runs on the CPU too), and runs the whole CPU suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
echo "== installing nnunetv2-mobilevim[test] (first time: torch + nnU-Net, a few minutes)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
.venv/bin/python -c "import torch, nnunetv2_mobilevim; print('== torch', torch.__version__, '| nnunetv2_mobilevim', nnunetv2_mobilevim.__version__)"
echo "== lint (ruff, configured in pyproject.toml)"
.venv/bin/python -m ruff check nnunetv2_mobilevim tests
echo "== running the test suite"
# two workers, one test file each at a time (module fixtures stay shared within a file); PYTEST_WORKERS=0: one process
exec .venv/bin/python -m pytest -ra -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
