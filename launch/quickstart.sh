#!/usr/bin/env bash
# Set up fitdist in a virtual environment and run the Fashion-MNIST quickstart:
# a teacher, then the same thin deep student from scratch, with KD, and with FitNets.
#   bash launch/quickstart.sh [--scale S] [key=value ...]
# Environment: VENV (default .venv), OUT (default runs/quickstart).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup.sh
export WANDB_MODE="${WANDB_MODE:-offline}"
exec "$VENV/bin/fitdist" quickstart --out "${OUT:-runs/quickstart}" "$@"
