"""How DeepSpeed's checkpoint files are read and written: without running code, durably.

DeepSpeed does all checkpoint file I/O through the engine's `checkpoint_engine`, an instance of
its pluggable `CheckpointEngine` interface. The default `TorchCheckpointEngine` loads with
`torch.load(..., weights_only=False)`, so a crafted file would run code on `--resume`.
`SafeCheckpointEngine` loads with `weights_only=True`, allowing exactly the non-tensor types
DeepSpeed stores (`SAFE_TYPES`, listed with `torch.serialization.get_unsafe_globals_in_checkpoint`
over real ZeRO 0/1/2/3 × fp32/bf16/fp16 checkpoints of DeepSpeed 0.19.8 (ZeRO-3's hold no other); plain data classes whose
unpickling only sets attributes), and saves through fitdist's temporary file + fsync + rename, so
the files a fitdist checkpoint names are on disk before that checkpoint is renamed into place.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from fitdist.checkpoint import fsync_dir, save_file
from fitdist.errors import UserError

SAFE_TYPES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # ZeRO 1-3 partitions (fp32, bf16)
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # ZeRO 1-3 partitions (fp16)
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def safe_types() -> list[type]:
    out = []
    for name in SAFE_TYPES:
        module, _, attr = name.rpartition(".")
        out.append(getattr(importlib.import_module(module), attr))
    return out


class SafeCheckpointEngine(CheckpointEngine):
    """What DeepSpeed's `TorchCheckpointEngine` does, with a code-free `load` and a durable `save`."""

    def __init__(self):
        super().__init__()
        self.name = "fitdist"
        self.allowed = safe_types()

    def create(self, info) -> None:
        """Called before a tag's files are written: nothing to prepare."""

    def load(self, path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(self.allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - a refused, truncated or missing file, reported alike
            raise UserError(f"DeepSpeed checkpoint file {path} does not load: {_reason(e)}") from None

    def save(self, state_dict, path: str) -> None:
        save_file(state_dict, Path(path))

    def commit(self, info) -> bool:
        """Called once a rank has written its files of `info.tag`: their names reach the disk too."""
        fsync_dir(Path(info.save_dir) / info.tag)
        return True


def install(engine) -> None:
    """Gives a just-initialized DeepSpeed engine a `SafeCheckpointEngine`, before any save or load.

    `deepspeed.initialize` takes no checkpoint engine (it picks one from the JSON config alone), so
    the engine's `checkpoint_engine` attribute, which all of its checkpoint I/O goes through, is
    set here: only this engine changes; no DeepSpeed function is patched."""
    current = type(engine.checkpoint_engine)
    if current is not TorchCheckpointEngine:  # a configured writer (fast, decoupled, DataStates)
        raise UserError(f"strategy.deepspeed_config: DeepSpeed's {current.__name__} is not supported: "
                        f"fitdist reads and writes DeepSpeed checkpoints itself (remove the checkpoint "
                        f"writer / datastates settings)")
    engine.checkpoint_engine = SafeCheckpointEngine()


def _reason(e: Exception) -> str:
    refused = re.search(r"GLOBAL (\S+)", str(e))
    if refused:
        return f"it asks for {refused.group(1)}, which a checkpoint may not hold (loading it could run code)"
    if isinstance(e, FileNotFoundError):
        return "file not found"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first.split('. ')[0]}" if first else type(e).__name__
