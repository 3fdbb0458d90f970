"""Model construction from a name: `torchvision:<name>`, `timm:<name>`, `fitdist:<zoo name>` or
`pkg.module:factory`.

Every model is built with the data's number of classes and input channels; torchvision models
get their stem convolution rebuilt for a different channel count (e.g. 1-channel Fashion-MNIST).
Weights come from a local file or, for torchvision models, by name through torchvision's weight
enums and the torch hub cache (fitdist/pretrained.py), for timm models through timm's pretrained
configs and the Hugging Face cache (fitdist/timm_models.py); every load is `weights_only=True`.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import torch
from torch import nn

from fitdist import pretrained
from fitdist.config import ModelConfig
from fitdist.errors import UserError, did_you_mean


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int, where: str = "student") -> nn.Module:
    """The model named by `cfg`, with its weights file loaded if one is given."""
    kind, sep, name = cfg.name.partition(":")
    if not sep or not name:
        raise UserError(f"{where}.name: {cfg.name!r} is not of the form torchvision:NAME, timm:NAME, fitdist:NAME or pkg.module:factory")
    if cfg.head == "reset" and where.startswith("teacher"):  # `teacher` or an ensemble's `teachers.N`
        raise UserError(f"{where}.head: reset would give the teacher an untrained classifier: its logits "
                        "would be meaningless; a teacher's weights must predict the data's classes")
    named = pretrained.named_kind(cfg.weights)
    # without weights (export and eval rebuild the student so) the classifier is the data's anyway
    if cfg.head != "keep" and cfg.weights and named is None:
        raise UserError(f"{where}.head: {cfg.head} applies to pretrained weights by name "
                        f"(weights: torchvision:<Enum>.<TAG> or timm[:<tag>]), not to {cfg.weights or 'no weights'}")
    if named is not None and named != kind:
        raise UserError(f"{where}.weights: {cfg.weights} names {named} weights but {where}.name is {cfg.name}")
    if named == "torchvision":
        return _torchvision_pretrained(cfg, name, num_classes, in_channels, where)
    if kind == "timm":  # the optional extra: timm is imported only here
        from fitdist.timm_models import build_timm

        model = build_timm(name, cfg.weights if named else None, cfg.head, cfg.kwargs, num_classes, in_channels, where)
    elif kind == "torchvision":
        model = _torchvision(name, num_classes, in_channels, cfg.kwargs, where)
    elif kind == "fitdist":
        from fitdist.zoo import ZOO

        if name not in ZOO:
            raise UserError(f"{where}.name: no fitdist model {name!r}{did_you_mean(name, ZOO)}")
        model = _call(ZOO[name], num_classes, in_channels, cfg.kwargs, where)
    else:
        model = _call(_import(kind, name, where), num_classes, in_channels, cfg.kwargs, where)
    if cfg.weights and named is None:
        load_weights(model, cfg.weights, where)
    return model


def _call(factory, num_classes: int, in_channels: int, kwargs: dict, where: str) -> nn.Module:
    params = inspect.signature(factory).parameters
    extra = {"num_classes": num_classes}
    if "in_channels" in params or any(p.kind == p.VAR_KEYWORD for p in params.values()):
        extra["in_channels"] = in_channels
    try:
        return factory(**extra, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}.kwargs: cannot build {getattr(factory, '__name__', factory)}: {e}") from None


def _import(module: str, attr: str, where: str):
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"{where}.name: cannot import {module}:{attr} ({e})") from None


def _torchvision(name: str, num_classes: int, in_channels: int, kwargs: dict, where: str) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models()
    if name not in available:
        raise UserError(f"{where}.name: no torchvision model {name!r}{did_you_mean(name, available)}")
    if "weights" in kwargs:
        raise UserError(f"{where}.kwargs.weights: name pretrained weights in {where}.weights "
                        f"(e.g. torchvision:DEFAULT) or give a local file there")
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}.kwargs: cannot build torchvision {name}: {e}") from None
    if in_channels != 3:
        _adapt_stem(model, in_channels)
    return model


def _torchvision_pretrained(cfg: ModelConfig, name: str, num_classes: int, in_channels: int, where: str) -> nn.Module:
    """A torchvision model with its named weights; a classifier for another class count is an
    error for a teacher (its logits would not be the data's classes) and replaced on `head: reset`."""
    import torchvision

    available = torchvision.models.list_models()
    if name not in available:
        raise UserError(f"{where}.name: no torchvision model {name!r}{did_you_mean(name, available)}")
    model, classes = pretrained.build_pretrained(name, cfg.weights, cfg.kwargs, where)
    if classes != num_classes:
        if cfg.head != "reset":
            hint = "" if where.startswith("teacher") else f"; {where}.head=reset replaces its classifier"
            raise UserError(f"{where}.weights: {cfg.weights} predicts {classes} classes but the data has "
                            f"{num_classes}{hint}")
        pretrained.reset_head(model, classes, num_classes, where)
    if in_channels != 3:
        pretrained.adapt_stem(model, in_channels, where)
    return model


def _adapt_stem(model: nn.Module, in_channels: int) -> None:
    """Rebuilds the first convolution for `in_channels` inputs, keeping its other settings."""
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            new = nn.Conv2d(
                in_channels, module.out_channels, module.kernel_size, module.stride,
                module.padding, module.dilation, module.groups, module.bias is not None,
            )
            model.set_submodule(path, new)
            return


def load_weights(model: nn.Module, path: str, where: str) -> None:
    """Loads a plain state_dict file; a missing file or a misfit is a `UserError` naming it."""
    if not Path(path).is_file():
        raise UserError(f"{where}.weights: file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle/zip errors of every kind mean "not loadable"
        raise UserError(f"{where}.weights: {path} is not a loadable state_dict ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise UserError(f"{where}.weights: {path} does not hold a state_dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1:2] or [str(e)]
        raise UserError(f"{where}.weights: {path} does not fit the model: {first[0].strip()}") from None


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: torch.nn.Module, x: torch.Tensor) -> int | None:
    """Multiply-accumulates of one forward on `x` (FlopCounterMode counts 2 FLOPs per MAC)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:  # older torch: MACs are a nicety, not a check
        return None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
