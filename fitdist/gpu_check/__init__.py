"""`launch/gpu_check.sh`: one command that tells a person with one GPU whether fitdist works there.

Six sections, each run in a child process of its own (`section.py`) so that a crash, a hang (a
per-section timeout), a CUDA error or the sync-debug mode of one cannot spoil the next:

1. `env`: versions (torch, CUDA, cuDNN, NCCL, Triton, DeepSpeed, ...) and the device picked;
2. `kernels`: the Triton loss kernels against the reference losses, values and gradients;
3. `dryruns`: `fitdist train configs/imagenet/*.yaml --dry-run`, compiled and under ZeRO-3 + bf16;
4. `end_to_end`: ImageFolder -> `fitdist shard` -> `fitdist train`, SIGTERM -> exit 75 -> `--resume`;
5. `distributed`: single-rank DDP (NCCL) and DeepSpeed ZeRO-2 / ZeRO-3 bf16 under torchrun;
6. `throughput`: loader img/s, and the ResNet-34 -> ResNet-18 step under the sync-debug mode.

`runner.py` runs them and writes `report.json` and `report.md`; `--device cpu` runs every section
with small shapes (the test suite runs that mode), skipping what a CPU cannot do.
"""

# (number, name, module under fitdist.gpu_check): the order they run in
SECTIONS = [
    (1, "env", "s1_env"),
    (2, "kernels", "s2_kernels"),
    (3, "dryruns", "s3_dryruns"),
    (4, "end_to_end", "s4_end_to_end"),
    (5, "distributed", "s5_distributed"),
    (6, "throughput", "s6_throughput"),
]
