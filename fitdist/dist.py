"""The torchrun environment: rank helpers, process-group set-up and exact reductions."""

from __future__ import annotations

import datetime
import glob
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from fitdist.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str, local_rank: int) -> torch.device:
    """`train.device`: auto is this rank's GPU when torch can use one, the CPU on a node without
    GPUs, and an error on a node whose GPUs torch cannot use (not a silent run on the CPU)."""
    if name in ("auto", "cuda") and not torch.cuda.is_available():
        driver = nvidia_driver()
        if driver is not None or name == "cuda":
            built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA (a CPU-only build)"
            found = f"NVIDIA GPUs with driver {driver}" if driver else "no usable NVIDIA GPU"
            raise UserError(f"train.device: {name}, but torch {torch.__version__} cannot use this node's GPUs "
                            f"(found {found}; torch was built for {built}; an older driver than that CUDA "
                            "needs, or a torch for another CUDA?); train.device=cpu trains on the CPU")
        name = "cpu"
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def nvidia_driver() -> str | None:
    """The NVIDIA driver's version when this node has NVIDIA GPUs ("unknown" if it cannot be read),
    else None."""
    nvidia_smi = shutil.which("nvidia-smi")
    if not glob.glob("/dev/nvidia[0-9]*") and nvidia_smi is None:
        return None
    try:  # the kernel module says it without starting anything
        text = Path("/proc/driver/nvidia/version").read_text()
        found = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", text)
        if found:
            return found.group(1)
    except OSError:
        pass
    if nvidia_smi is not None:
        try:
            out = subprocess.run([nvidia_smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20, check=False).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return "unknown"


def setup(device: str = "auto", backend: str = "auto") -> DistEnv:
    """Reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK and joins the process group when world > 1."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return DistEnv(rank, world, local_rank, dev)


def teardown() -> None:
    if not dist.is_initialized():
        return
    _CPU_GROUP.clear()  # destroyed with the default group
    ds = sys.modules.get("deepspeed.comm")
    if ds is not None and ds.is_initialized():  # DeepSpeed drops its own handles on the groups too,
        ds.destroy_process_group()  # or a later run in this process would meet the destroyed ones
    else:
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place); identity when not distributed."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order; a collective, through a gloo group of its own.

    The process may exit right after. gloo's worker threads drop a collective's tensors after the
    caller has its result, taking the GIL to do so; a thread still doing it when the interpreter
    shuts down ends inside a C++ destructor, and the process aborts (SIGABRT) instead of exiting
    with its status. `teardown` does not stop the default group's threads while DeepSpeed holds the
    group; this group's threads are joined when it is destroyed, before this function returns."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    group = dist.new_group(backend="gloo")
    out = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(out, obj, group=group)
    finally:
        dist.destroy_process_group(group)
    return out


_CPU_GROUP: list = []


def cpu_group():
    """A gloo group for small host-side collectives (None for one process): the default group
    itself when it is gloo, else one made once. A collective the first time: every rank calls it."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    if not _CPU_GROUP:
        _CPU_GROUP.append(dist.new_group(backend="gloo"))
    return _CPU_GROUP[0]


def every_rank(error: UserError) -> UserError:
    """Marks `error` as one every rank hits identically: rank 0 alone reports it."""
    error.every_rank = True
    return error


def decided_by_rank0(decide):
    """`decide()` run on rank 0, its result (or its UserError) on every rank: for choices the ranks
    must agree on, such as the checkpoint to resume from."""
    outcome = None
    if not (dist.is_initialized() and dist.get_rank() > 0):
        try:
            outcome = ("ok", decide())
        except UserError as e:
            outcome = ("error", str(e))
    outcome = gather_objects(outcome)[0]
    if outcome[0] == "error":
        raise every_rank(UserError(outcome[1]))
    return outcome[1]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
