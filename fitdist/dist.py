"""The torchrun environment: rank helpers, process-group set-up and exact reductions."""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


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
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


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


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
