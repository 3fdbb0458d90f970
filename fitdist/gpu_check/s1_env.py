"""Section 1, environment: the versions that decide whether fitdist runs (torch, CUDA, cuDNN, NCCL,
Triton, DeepSpeed, ...) and the device the check runs on. On CUDA it also checks what later
sections rely on: bf16 support, and that `torch.cuda.set_sync_debug_mode("error")` turns a
device-to-host copy into an error (section 6 runs training steps under that mode)."""

from __future__ import annotations

import platform
from importlib import metadata

import torch

from fitdist.gpu_check.common import CheckFailed, Checks, Context

PACKAGES = ("torch", "torchvision", "triton", "deepspeed", "webdataset", "wandb", "fitdist")


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict:
    v = {p: version(p) for p in PACKAGES}
    v["python"] = platform.python_version()
    v["cuda (torch built with)"] = torch.version.cuda or "none"
    v["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none"
    try:
        nccl = torch.cuda.nccl.version() if torch.cuda.is_available() else None
        v["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl or "none")
    except (RuntimeError, AttributeError):
        v["nccl"] = "none"
    return v


def cuda_device(checks: Checks) -> str:
    if not torch.cuda.is_available():
        raise CheckFailed(f"torch.cuda.is_available() is False (torch {torch.__version__}, built with CUDA "
                          f"{torch.version.cuda}); run with --device cpu for the CPU mode")
    props = torch.cuda.get_device_properties(0)
    checks.data["device"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                             "memory_gib": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count(),
                             "bf16": torch.cuda.is_bf16_supported()}
    return (f"cuda:0 {props.name}, sm {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
            f"{torch.cuda.device_count()} visible")


def bf16() -> str:
    if not torch.cuda.is_bf16_supported():
        raise CheckFailed("this GPU has no bf16 (the ImageNet recipes train in bf16)")
    x = torch.randn(64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = x @ x
    if y.dtype != torch.bfloat16:
        raise CheckFailed(f"autocast gave {y.dtype}")
    return "autocast matmul in bf16"


def sync_debug_mode() -> str:
    """The mode must raise on a device-to-host copy, and leave device-only work alone."""
    x = torch.ones(4, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _ = (x * 2).sum()  # device-only: fine
        try:
            x.sum().item()
        except RuntimeError:
            pass
        else:
            raise CheckFailed("set_sync_debug_mode('error') did not raise on .item()")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return "raises on .item(), silent on device work"


def run(ctx: Context, checks: Checks) -> None:
    checks.data["versions"] = versions()
    v = checks.data["versions"]
    checks.ok("versions", ", ".join(f"{k} {val}" for k, val in v.items()))
    if ctx.cuda:
        checks.run("device", cuda_device, checks)
        checks.data["device_ok"] = checks.items[-1]["status"] == "PASS"
        if checks.data["device_ok"]:
            checks.run("bf16", bf16)
            checks.run("sync_debug_mode", sync_debug_mode)
    else:
        checks.ok("device", f"cpu ({platform.processor() or platform.machine()}, "
                            f"{torch.get_num_threads()} torch threads)")
        checks.data["device_ok"] = True
        checks.skip("bf16/sync_debug_mode", "CUDA only")
    if v["triton"] == "not installed":
        checks.fail("triton", "not installed: the fused kernels fall back to chunked PyTorch")
    if v["deepspeed"] == "not installed":
        checks.skip("deepspeed", "not installed (pip install fitdist[deepspeed]): section 5 skips ZeRO")
