"""Runs `fitdist ARGS...` and SIGKILLs its own process at one point inside the save of one checkpoint.

usage: python kill_during_save.py POINT STEP ARGS...   (used by test_reliability.py)

  mid-file       trainer.pt's temporary file holds part of its bytes
  before-rename  both files are complete and fsynced in `.tmp-step-N`, not yet renamed to `step-N`
  before-prune   `step-N` is in place, the checkpoints beyond `run.keep_checkpoints` not yet removed

The hooks replace what `fitdist/checkpoint.py` calls (its module globals `open`, `os`, `shutil`), so
no other code sees them and the package holds no test hook: up to the kill, the save is the real one.
"""

import builtins
import os
import shutil
import signal
import sys
from pathlib import Path

from fitdist import checkpoint, cli


def die():
    os.kill(os.getpid(), signal.SIGKILL)


class Module:
    """`module` with some functions replaced."""

    def __init__(self, module, **replaced):
        self.module, self.replaced = module, replaced

    def __getattr__(self, name):
        return self.replaced[name] if name in self.replaced else getattr(self.module, name)


class DiesMidWrite:
    """A file that, once 1 KiB is written, hands half of the next chunk to the OS and dies."""

    def __init__(self, f):
        self.f, self.written = f, 0

    def write(self, data):
        if self.written >= 1024:
            self.f.write(bytes(data)[: len(data) // 2])
            self.f.flush()
            die()
        self.written += len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def main(point: str, step: str, *args: str) -> int:
    final = f"{checkpoint.PREFIX}{int(step):08d}"
    renamed = []

    def open_(path, mode="r", *rest, **kwargs):
        f = builtins.open(path, mode, *rest, **kwargs)  # noqa: SIM115 - checkpoint.py's `with` closes it
        path = Path(path)
        if point == "mid-file" and path.parent.name == f".tmp-{final}" and path.name == ".trainer.pt.tmp":
            return DiesMidWrite(f)
        return f

    def replace(src, dst):
        if point == "before-rename" and Path(src).name == f".tmp-{final}":
            die()
        os.replace(src, dst)
        renamed.append(Path(dst).name)

    def rmtree(path, *rest, **kwargs):
        if point == "before-prune" and final in renamed and Path(path).name.startswith(checkpoint.PREFIX):
            die()
        shutil.rmtree(path, *rest, **kwargs)

    checkpoint.open = open_  # a module global shadows the builtin for checkpoint.py alone
    checkpoint.os = Module(os, replace=replace)
    checkpoint.shutil = Module(shutil, rmtree=rmtree)
    return cli.main(list(args))


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
