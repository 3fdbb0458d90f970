#!/usr/bin/env bash
# One command that tells a person with one GPU whether fitdist works there (about 9 minutes):
#   launch/gpu_check.sh [--device cuda|cpu] [--out DIR] [--sections 1,2,...]
# Prints `PASS|FAIL|SKIP section N name (seconds): detail` per section and writes DIR/report.json
# and DIR/report.md (default DIR: ./gpu-check; logs of every command it ran in DIR/logs).
# Exit status 0 when every section that ran passed, 1 otherwise, 2 for bad arguments.
# `--device cpu` runs every section with small shapes in 2-3 minutes (the test suite does).
# Environment: PYTHON, the interpreter with fitdist installed (default: $VENV or <repo>/.venv,
# else python3).
set -euo pipefail

# the interpreter: $PYTHON, else the virtual environment launch/setup.sh makes, else python3
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${VENV:-$root/.venv}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$venv/bin/python" ]; then PYTHON="$venv/bin/python"; else PYTHON=python3; fi
fi
# the checkout's fitdist, whichever directory this is started from
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m fitdist.gpu_check "$@"
