#!/usr/bin/env bash
# Set up fitdist in a virtual environment and run the test suite.
#   bash launch/test.sh          # the default suite (what CI runs)
#   bash launch/test.sh --slow   # also the slow tests
# Environment: VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup.sh
export WANDB_MODE=offline WANDB_SILENT=true
if [ "${1:-}" = "--slow" ]; then
  shift
  exec "$VENV/bin/python" -m pytest -q -m "" "$@"
fi
exec "$VENV/bin/python" -m pytest -q "$@"
