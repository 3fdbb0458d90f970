"""What every section shares: its context (device, directories, sizes), its list of checks, and
how it runs fitdist's commands as a user would (child processes, output kept in `logs/`)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml


class CheckFailed(Exception):
    """A check's failure, with a one-line reason."""


@dataclass
class Context:
    """Everything a section needs to know, written to JSON by the runner for the section's child."""

    device: str  # "cuda" or "cpu"
    out: str  # report directory
    repo: str  # the checkout holding configs/ and launch/ (None of it is written to)
    python: str = sys.executable

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def work(self) -> Path:
        """Scratch space: generated images, shards, run directories (kept for inspection)."""
        return Path(self.out) / "work"

    @property
    def logs(self) -> Path:
        return Path(self.out) / "logs"

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> Context:
        return cls(**json.loads(Path(path).read_text()))

    def env(self) -> dict[str, str]:
        """The environment of every child: no W&B service shared, DeepSpeed on CPU in CPU mode."""
        env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
        env["WANDB_MODE"] = "disabled"  # a check must never log to someone's W&B project
        env.setdefault("PYTHONUNBUFFERED", "1")
        if not self.cuda:
            env["DS_ACCELERATOR"] = "cpu"
            env["CUDA_VISIBLE_DEVICES"] = ""  # CPU mode means CPU, even on a GPU machine
        return env


@dataclass
class Checks:
    """The checks of one section, in order: each PASS, FAIL or SKIP with a one-line detail."""

    items: list[dict] = field(default_factory=list)
    data: dict = field(default_factory=dict)  # figures for report.json

    def ok(self, name: str, detail: str = "") -> None:
        self.items.append({"name": name, "status": "PASS", "detail": detail})

    def fail(self, name: str, reason: str) -> None:
        self.items.append({"name": name, "status": "FAIL", "detail": one_line(reason)})

    def skip(self, name: str, reason: str) -> None:
        self.items.append({"name": name, "status": "SKIP", "detail": reason})

    def run(self, name: str, fn, *args, **kwargs):
        """Runs `fn`; its return value (a string) is the PASS detail, an exception a FAIL."""
        try:
            detail = fn(*args, **kwargs)
        except CheckFailed as e:
            self.fail(name, str(e))
            return None
        except Exception as e:  # noqa: BLE001  any error is this check's failure, not the section's
            self.fail(name, f"{type(e).__name__}: {e}")
            return None
        self.ok(name, detail or "")
        return detail

    def status(self) -> str:
        states = {c["status"] for c in self.items}
        if "FAIL" in states:
            return "FAIL"
        return "PASS" if "PASS" in states else "SKIP"

    def summary(self) -> str:
        """One line: the failures first (they are what a reader needs), then the rest."""
        order = {"FAIL": 0, "PASS": 1, "SKIP": 2}
        parts = []
        for c in sorted(self.items, key=lambda c: order[c["status"]]):
            word = {"PASS": "ok", "FAIL": "FAIL", "SKIP": "skipped"}[c["status"]]
            parts.append(f"{c['name']} {word}" + (f" ({c['detail']})" if c["detail"] else ""))
        return "; ".join(parts)


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def last_error_line(text: str) -> str:
    """The line of a child's output that says what went wrong (its last error line, else its last)."""
    lines = [ln.strip().removeprefix("[rank0]: ") for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        # torchrun's own summary (ChildFailedError) comes after the worker's error: skip it
        if re.search(r"(Error|Exception|error|Preempted)\b:? \S", ln) and "ChildFailedError" not in ln:
            return ln
    return lines[-1] if lines else "(no output)"


def run_logged(ctx: Context, log_name: str, cmd: list[str], timeout: float, cwd: Path | None = None,
               env: dict | None = None, expect: int | None = 0) -> tuple[int, str]:
    """Runs `cmd` in its own process group, its output into `logs/<log_name>.log`; returns
    `(exit status, output)`. With `expect`, another status raises CheckFailed naming the error."""
    ctx.logs.mkdir(parents=True, exist_ok=True)
    log = ctx.logs / f"{log_name}.log"
    with open(log, "w") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        proc = subprocess.Popen(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, cwd=cwd,
                                env=env or ctx.env(), start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            raise CheckFailed(f"{log_name}: no result after {timeout:.0f} s (log: {log})") from None
    output = log.read_text(errors="replace")
    if expect is not None and rc != expect:
        raise CheckFailed(f"{log_name}: exit {rc}, expected {expect}: {last_error_line(output)} (log: {log})")
    return rc, output


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the process group this module started for `proc`."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def fitdist_cmd(ctx: Context, *args: str) -> list[str]:
    """`fitdist ARGS` as a user runs it, through the same interpreter."""
    return [ctx.python, "-m", "fitdist.cli", *args]


def torchrun_cmd(ctx: Context, *args: str, nproc: int = 1) -> list[str]:
    """`torchrun --standalone --nproc-per-node N ARGS` (a free port, one node)."""
    return [ctx.python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def summary_of(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    if not path.is_file():
        raise CheckFailed(f"{path} was not written")
    return json.loads(path.read_text())


def timed(fn):
    """`(result, seconds)` of calling fn."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0
