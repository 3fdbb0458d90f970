"""What the sections train on, sized for the device: generated ImageNet-layout JPEGs written to
shards with `fitdist shard`, a random teacher's weights file, and run configs.

On CUDA the models are the ImageNet pair (torchvision ResNet-34 -> ResNet-18, 224 px, hint
`layer3` on both sides); in CPU mode thin `fitdist:fitnet`s on 32 px crops of small JPEGs (hint
`conv2` on both sides), so that every section runs in seconds. The CPU models have no BatchNorm:
under DeepSpeed bf16 on CPU a BatchNorm forward fails ("expected scalar type BFloat16 but found
Float"), which says nothing about a GPU. Images and shards are made once per report directory and
reused by later sections.
"""

from __future__ import annotations

from pathlib import Path

from fitdist.gpu_check.common import Context, fitdist_cmd, run_logged, write_yaml


def sizes(ctx: Context) -> dict:
    if ctx.cuda:
        return {"student": "torchvision:resnet18", "teacher": "torchvision:resnet34", "image_size": 224,
                "student_kwargs": {}, "teacher_kwargs": {}, "hint": "layer3",
                "classes": 10, "train_per_class": 64, "val_per_class": 8, "min_side": 300, "max_side": 500,
                "shard_max_side": 256, "shard_size": 64, "workers": 8, "batch": 64}
    return {"student": "fitdist:fitnet", "teacher": "fitdist:fitnet", "image_size": 32,
            "student_kwargs": {"widths": [8, 16, 16], "pool_after": [1, 2], "batch_norm": False},
            "teacher_kwargs": {"widths": [16, 32, 32], "pool_after": [1, 2], "batch_norm": False},
            "hint": "conv2",
            "classes": 4, "train_per_class": 16, "val_per_class": 4, "min_side": 40, "max_side": 64,
            "shard_max_side": 48, "shard_size": 16, "workers": 2, "batch": 8}


def shards(ctx: Context) -> Path:
    """`work/shards`: the generated ImageFolder through `fitdist shard` (made once, then reused)."""
    from fitdist.bench.make_imagefolder import make_imagefolder

    s = sizes(ctx)
    out = ctx.work / "shards"
    if (out / "manifest.json").is_file():
        return out
    images = make_imagefolder(ctx.work / "imagefolder", s["classes"], s["train_per_class"], s["val_per_class"],
                              s["min_side"], s["max_side"])
    run_logged(ctx, "shard", fitdist_cmd(ctx, "shard", f"imagefolder:{images}", out, "--shard-size",
                                         str(s["shard_size"]), "--max-side", str(s["shard_max_side"]),
                                         "--workers", str(s["workers"]), "--no-progress"), timeout=600)
    return out


def teacher_weights(ctx: Context) -> Path:
    """A random teacher's `state_dict` file: fitdist needs one, and random weights cost the same."""
    import torch

    from fitdist.config import ModelConfig
    from fitdist.models import build_model

    s = sizes(ctx)
    path = ctx.work / f"teacher-{ctx.device}.pt"
    if not path.is_file():
        torch.manual_seed(0)
        model = build_model(ModelConfig(s["teacher"], s["teacher_kwargs"]), s["classes"], 3, where="teacher")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return path


def run_config(ctx: Context, name: str, stages: list[dict], **sections) -> Path:
    """A two-model FitNets-style config on the generated shards, bf16 and channels_last, written
    to `work/<name>.yaml` with its run directory `work/runs/<name>`; `sections` replace blocks."""
    s = sizes(ctx)
    cfg = {
        "name": name,
        "seed": 1,
        "student": {"name": s["student"], "kwargs": s["student_kwargs"]},
        "teacher": {"name": s["teacher"], "kwargs": s["teacher_kwargs"], "weights": str(teacher_weights(ctx)),
                    "precision": "bf16", "channels_last": True},
        "hints": [{"student": s["hint"], "teacher": s["hint"], "relu": True}],
        "loss": {"temperature": 3.0},
        "stages": stages,
        "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "schedule": "cosine"},
        "data": {"source": "webdataset", "root": str(shards(ctx)), "image_size": s["image_size"],
                 "augment": "imagenet", "num_workers": s["workers"], "shuffle_buffer": 64},
        "train": {"batch_size": s["batch"], "eval_batch_size": s["batch"], "precision": "bf16",
                  "channels_last": True, "device": "cuda:0" if ctx.cuda else "cpu", "log_every": 5,
                  "checkpoint_every": 5, **({} if ctx.cuda else {"threads": 1})},
        "run": {"dir": str(ctx.work / "runs" / name), "keep_checkpoints": 10},
        "wandb": {"mode": "disabled"},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    return write_yaml(ctx.work / f"{name}.yaml", cfg)
