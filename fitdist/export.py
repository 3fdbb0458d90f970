"""`fitdist export RUN --format torchscript|exported|onnx [--out PATH]`: a student that leaves fitdist.

`student.pt` is a plain state_dict, which needs the model's code to be used. The files written
here carry the code too and load without fitdist (the tests load each in a process where
`import fitdist` fails):

- `torchscript` (`student.ts`): `torch.jit.trace` of the student in eval mode;
  `torch.jit.load(path)(x)`. TorchScript is deprecated in recent PyTorch; prefer `exported`.
- `exported` (`student.pt2`): `torch.export` with a dynamic batch dimension;
  `torch.export.load(path).module()(x)`.
- `onnx` (`student.onnx`): `torch.onnx.export` (the dynamo exporter) with a dynamic batch
  dimension, input `x`, output `logits`, weights inside the one file; runs in onnxruntime. Needs the optional extra
  `pip install 'fitdist[onnx]'` (onnx, onnxscript; onnxruntime to run it).

Every file takes fp32 NCHW images normalised as in training (the config's `data.mean/std`, or
the dataset's own), any batch size, and returns logits. The input shape comes from the config
(Fashion-MNIST: 1×28×28; webdataset: `data.image_size`, 3 channels). A model that a format cannot
capture is a `UserError` naming the format and the first line of the reason.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from fitdist.config import load_config
from fitdist.errors import UserError
from fitdist.evaluate_run import architecture, locate
from fitdist.models import build_model, load_weights

SUFFIX = {"torchscript": ".ts", "exported": ".pt2", "onnx": ".onnx"}


def load_student(run: str | Path, overrides: list[str] = ()) -> tuple[torch.nn.Module, torch.Tensor, Path]:
    """The run's student in eval mode with its weights, an example input of batch 2, the weights file."""
    from fitdist.dryrun import synthetic_data

    config_path, weights = locate(Path(run), where="export")
    cfg = load_config(config_path, list(overrides))
    data = synthetic_data(cfg)  # class count and input shape from the config alone: no data read
    model = build_model(architecture(cfg.student), data.num_classes, data.in_channels)
    load_weights(model, str(weights), where="export")
    example = torch.randn(2, data.in_channels, *data.image_size, generator=torch.Generator().manual_seed(0))
    return model.eval(), example, weights


def export(run: str | Path, fmt: str, out: str | Path | None = None, overrides: list[str] = ()) -> str:
    """Writes the student of `run` as `fmt`; returns the path written."""
    if fmt not in SUFFIX:
        raise UserError(f"export: --format must be one of {', '.join(SUFFIX)}, got {fmt!r}")
    model, example, weights = load_student(run, overrides)
    path = Path(out) if out else weights.with_suffix(SUFFIX[fmt])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"export: cannot create {path.parent} ({e.strerror or e})") from None
    try:
        with torch.no_grad():
            _WRITERS[fmt](model, example, path)
    except (UserError, OSError):
        raise
    except Exception as e:  # noqa: BLE001 - each exporter fails in its own exception types
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"export: the student cannot be exported as {fmt}: {type(e).__name__}: {reason}") from None
    return str(path)


def _torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")  # said once, in the docs
        traced = torch.jit.trace(model, example)
        traced.save(str(path))


def _dynamic_batch() -> tuple[dict, ...]:
    return ({0: torch.export.Dim.DYNAMIC},)  # one positional input: its batch dimension is free


def _exported(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_batch())
    torch.export.save(program, str(path))


def _onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            raise UserError(f"export: --format onnx needs the {module} package: pip install 'fitdist[onnx]'") from None
    torch.onnx.export(model, (example,), str(path), input_names=["x"], output_names=["logits"],
                      dynamic_shapes=_dynamic_batch(), dynamo=True, verbose=False,
                      external_data=False)  # one self-contained file (weights inside; fine below 2 GB)


_WRITERS = {"torchscript": _torchscript, "exported": _exported, "onnx": _onnx}
