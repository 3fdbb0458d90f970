"""Atomic, code-free checkpoints of a run: `checkpoints/step-XXXXXXXX/{student.pt,trainer.pt}`.

A checkpoint is written into a temporary directory, flushed to disk, then renamed into place, so
a crash mid-save leaves the previous checkpoint loadable. Everything is loaded with
`torch.load(..., weights_only=True)`: a checkpoint file cannot run code. `student.pt` is the
backbone's plain `state_dict`; `trainer.pt` carries what exact resumption needs (student and
regressors, optimizer, scheduler, loss scaler, stage and step, RNG states, W&B run id).
"""

from __future__ import annotations

import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from fitdist.errors import UserError

PREFIX = "step-"


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": _to_plain(random.getstate()),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_plain(obj):
    return [_to_plain(v) for v in obj] if isinstance(obj, tuple) else obj


def _to_tuple(obj):
    return tuple(_to_tuple(v) for v in obj) if isinstance(obj, list) else obj


def save_file(obj, path: Path) -> None:
    """`torch.save` through a temporary file, fsync and rename: the target is whole or absent."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, global_step: int, student_state: dict, trainer_state: dict, keep: int) -> Path:
    """Writes `checkpoints/step-<global_step>` atomically and prunes all but the newest `keep`."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{global_step:08d}"
    tmp = root / f".tmp-{PREFIX}{global_step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(student_state, tmp / "student.pt")
        save_file(trainer_state, tmp / "trainer.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot save checkpoint {final}: {e.strerror or e}") from None
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def fsync_dir(path: Path) -> None:
    """Makes the entries of `path` (a rename into it) durable, not only its files' contents."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are never listed)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def load_checkpoint(run_dir: Path) -> tuple[Path, dict]:
    """The newest checkpoint that loads; a broken one is reported and the previous one tried."""
    found = list_checkpoints(run_dir)
    if not found:
        raise UserError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
    for path in reversed(found):
        try:
            return path, _load(path)
        except Exception as e:  # noqa: BLE001 - truncated/corrupt files fail in many ways
            warnings.warn(f"checkpoint {path} does not load ({type(e).__name__}); trying the previous one", stacklevel=2)
    raise UserError(f"--resume: no checkpoint in {run_dir / 'checkpoints'} loads")


def load_checkpoint_at(path: Path) -> dict:
    """The trainer state of checkpoint `path` (another rank's choice); a UserError if it does not load."""
    try:
        return _load(path)
    except Exception as e:  # noqa: BLE001 - missing, truncated or corrupt
        raise UserError(f"--resume: checkpoint {path} does not load here ({type(e).__name__}: {e})") from None


def _load(path: Path) -> dict:
    return torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
