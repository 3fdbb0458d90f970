"""`fitdist eval`: the test-split accuracy of a finished run, a checkpoint or a student.pt."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from fitdist import dist
from fitdist.config import ModelConfig, load_config
from fitdist.data import build_data
from fitdist.errors import UserError
from fitdist.evaluate import evaluate
from fitdist.models import build_model, load_weights


def architecture(spec: ModelConfig) -> ModelConfig:
    """The model's spec without its weights: what a trained `student.pt` is loaded into. A `head`
    setting only applies to weights loaded by name, so it goes too (the built classifier already
    has the data's class count)."""
    bare = replace(spec, weights=None)
    if getattr(bare, "head", "keep") != "keep":
        bare = replace(bare, head="keep")
    return bare


def locate(path: Path, where: str = "eval") -> tuple[Path, Path]:
    """`(config.yaml, student.pt)` for a run directory, a checkpoint directory or a weights file
    (`where`: the command named in errors)."""
    if not path.exists():
        raise UserError(f"{where}: no such file or directory: {path}")
    weights = path / "student.pt" if path.is_dir() else path
    if path.is_dir() and not weights.is_file():
        from fitdist.checkpoint import list_checkpoints

        found = list_checkpoints(path)
        if not found:
            raise UserError(f"{where}: {path} holds neither student.pt nor checkpoints/")
        weights = found[-1] / "student.pt"
    for parent in weights.parents:
        if (parent / "config.yaml").is_file():
            return parent / "config.yaml", weights
    raise UserError(f"{where}: no config.yaml in {weights.parent} or above it (is it inside a run directory?)")


def evaluate_run(path: str, overrides: list[str] = ()) -> dict:
    config_path, weights = locate(Path(path))
    cfg = load_config(config_path, list(overrides))
    env = dist.setup(cfg.train.device, cfg.strategy.backend)
    try:
        data = build_data(cfg.data, 1, cfg.train.eval_batch_size, cfg.seed, env.rank, env.world)
        model = build_model(architecture(cfg.student), data.num_classes, data.in_channels)
        load_weights(model, str(weights), where="eval")
        metrics = evaluate(model.to(env.device), data.val_batches(), env.device, cfg.train.precision, data.to_device)
    finally:
        dist.teardown()
    return {"checkpoint": str(weights), "top1": metrics["val/top1"], "top5": metrics["val/top5"],
            "loss": metrics["val/loss"], "n": metrics["val/n"]}
