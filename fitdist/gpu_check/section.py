"""One section in a child process: `python -m fitdist.gpu_check.section N CONTEXT.json RESULT.json`.

Runs the section's checks and writes `{"status", "detail", "checks", "data"}` to RESULT.json. An
exception that escapes the section becomes a FAIL check, so a result is written whenever the
process lives to the end; the runner covers crashes and timeouts.
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback
from pathlib import Path

from fitdist.gpu_check import SECTIONS
from fitdist.gpu_check.common import Checks, Context


def main(argv: list[str]) -> int:
    number, context, result = int(argv[0]), Path(argv[1]), Path(argv[2])
    ctx = Context.load(context)
    module = next(m for n, _, m in SECTIONS if n == number)
    checks = Checks()
    try:
        importlib.import_module(f"fitdist.gpu_check.{module}").run(ctx, checks)
    except Exception as e:  # noqa: BLE001  reported as the section's failure, with the trace in its log
        traceback.print_exc()
        checks.fail("section", f"{type(e).__name__}: {e}")
    result.write_text(json.dumps({"status": checks.status(), "detail": checks.summary(),
                                  "checks": checks.items, "data": checks.data}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
