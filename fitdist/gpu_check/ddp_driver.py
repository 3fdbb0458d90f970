"""`torchrun --nproc-per-node 1 -m fitdist.gpu_check.ddp_driver CONFIG [key=value ...] [--resume]`:
`fitdist train` inside a process group of one, so that `strategy.kind: ddp` really wraps the
student in DistributedDataParallel (NCCL on CUDA, gloo on CPU).

Why a driver: `fitdist train` joins a process group only when torchrun starts more than one
process (`fitdist.dist.setup`), and without one `build_strategy` runs the module unwrapped; on a
machine with one GPU that leaves the DDP path unexercised. Everything else is `fitdist train`'s
own code: `load_config` and `fitdist.trainer.train`, which finds the group already made.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from fitdist.config import load_config
from fitdist.preemption import PREEMPTED_EXIT, Preempted
from fitdist.trainer import train


def main(argv: list[str]) -> int:
    resume = "--resume" in argv
    args = [a for a in argv if a != "--resume"]
    cfg = load_config(args[0], args[1:])
    cuda = cfg.train.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo")  # torchrun's env:// rendezvous, world size 1
    print(f"gpu_check ddp driver: backend {dist.get_backend()}, world size {dist.get_world_size()}", flush=True)
    try:
        train(cfg, resume=resume)  # tears the group down at its end
    except Preempted as e:
        print(f"fitdist: {e}", file=sys.stderr)
        return PREEMPTED_EXIT
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
