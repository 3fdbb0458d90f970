"""Precision names and the autocast dtype each one means: the one map every module reads."""

from __future__ import annotations

import torch

# None: full fp32, autocast off. bf16 has fp32's exponent range; fp16 needs loss scaling.
DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = tuple(DTYPES)


def autocast(device: torch.device | str, precision: str):
    """Autocast to `precision`'s dtype on `device`'s type; a no-op context for fp32."""
    dtype = DTYPES[precision]
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=dtype or torch.float32, enabled=dtype is not None)
