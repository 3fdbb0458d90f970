"""`python -m fitdist.gpu_check`: see `fitdist/gpu_check/runner.py` (and `launch/gpu_check.sh`)."""

from fitdist.gpu_check.runner import main

raise SystemExit(main())
