"""Pretrained weights by name: `weights: torchvision:ResNet34_Weights.IMAGENET1K_V1` (or `DEFAULT`).

The name is resolved through torchvision's own weight enums; the file lives in the torch hub cache
(`$TORCH_HOME/hub/checkpoints/<file name of the enum's URL>`, where torchvision itself puts it), so
a cache filled once, by fitdist or by torchvision, serves every later run with no network.

A missing file is downloaded once per node: local rank 0 fetches it (with a progress bar, its
SHA-256 prefix checked as torchvision checks it) while the other ranks wait in a collective, then
every rank reads the cache; no eight-way download race. Offline (`HF_HUB_OFFLINE=1`), or when the
download fails, the run stops with exit status 2 naming the URL and the cache path to fill.

Every file is read with `torch.load(weights_only=True)`: torchvision's own loader does not ask
for it, which is why the model is built here and not by `get_model(weights=...)`.
"""

from __future__ import annotations

import os
import re
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from fitdist import dist
from fitdist.errors import UserError, did_you_mean

PREFIX = "torchvision:"
# builder arguments torchvision sets itself when it builds with weights (torchvision/models/*.py,
# `_ovewrite_named_param`): the checkpoint holds the layers these arguments make
_BUILT_WITH = {
    "googlenet": {"transform_input": True, "aux_logits": True, "init_weights": False},
    "inception_v3": {"transform_input": True, "aux_logits": True, "init_weights": False},
}
# auxiliary heads torchvision drops after loading unless `aux_logits: true` was asked for
_AUX_HEADS = {"googlenet": ("aux1", "aux2"), "inception_v3": ("AuxLogits",)}


def is_named(weights: str | None) -> bool:
    """True for torchvision weights given by name rather than as a local file."""
    return bool(weights) and weights.startswith(PREFIX)


def named_kind(weights: str | None) -> str | None:
    """"torchvision" or "timm" for weights given by name (fitdist/timm_models.py), None for a file."""
    if is_named(weights):
        return "torchvision"
    if weights == "timm" or (bool(weights) and weights.startswith("timm:")):
        return "timm"
    return None


def offline() -> bool:
    """`HF_HUB_OFFLINE` (the switch users of the Hugging Face cache already set) forbids downloads."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve(model_name: str, weights: str, where: str):
    """The torchvision `WeightsEnum` member `weights` names for the torchvision model `model_name`."""
    import torchvision

    spec = weights[len(PREFIX):]
    try:
        enum = torchvision.models.get_model_weights(model_name)
    except (ValueError, KeyError):
        raise UserError(f"{where}.weights: torchvision has no weights for {model_name!r}") from None
    cls, _, tag = spec.rpartition(".")
    if cls and cls != enum.__name__:
        raise UserError(f"{where}.weights: {cls} are not {model_name}'s weights; its weights are {enum.__name__}")
    if tag not in enum.__members__:
        raise UserError(f"{where}.weights: {enum.__name__} has no {tag!r}{did_you_mean(tag, enum.__members__)}")
    return enum[tag]


def cache_path(url: str) -> Path:
    """Where torchvision's `load_state_dict_from_url` looks for (and stores) the file of `url`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def fetch(url: str, label: str, where: str) -> Path:
    """The cached file of `url`, downloaded first by each node's local rank 0 when missing.

    Every rank calls this (it is a collective under torchrun): the others wait for the download,
    and a failure on any node stops every rank with the same one-line error."""
    path = cache_path(url)
    error = None
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and not path.is_file():
        try:
            _download(url, path, label, where)
        except UserError as e:
            error = str(e)
    errors = [e for e in dist.gather_objects(error) if e]
    if errors:
        raise dist.every_rank(UserError(errors[0]))
    if not path.is_file():  # a node whose ranks do not share the cache directory
        raise UserError(f"{where}.weights: {label} is not at {path} after local rank 0 fetched it: "
                        "give every rank of a node the same TORCH_HOME")
    return path


def _download(url: str, path: Path, label: str, where: str) -> None:
    fill = f"put {url} at {path}"
    if offline():
        raise UserError(f"{where}.weights: {label} is not in the cache and HF_HUB_OFFLINE is set: {fill}")
    path.parent.mkdir(parents=True, exist_ok=True)
    found = re.search(r"-([a-f0-9]+)\.", path.name)  # torchvision's names end in a SHA-256 prefix
    try:  # writes a temporary file and renames it: a reader never sees half a file
        torch.hub.download_url_to_file(url, str(path), hash_prefix=found.group(1) if found else None, progress=True)
    except (OSError, urllib.error.URLError, RuntimeError) as e:
        raise UserError(f"{where}.weights: cannot download {label} ({type(e).__name__}: {e}); "
                        f"on a machine without network {fill}") from None


def read_state_dict(path: Path, label: str, where: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file of any kind
        raise UserError(f"{where}.weights: {path} ({label}) is not a loadable state_dict ({type(e).__name__}); "
                        "delete it to download it again") from None
    if not isinstance(state, dict):
        raise UserError(f"{where}.weights: {path} ({label}) does not hold a state_dict")
    return state


def build_pretrained(name: str, weights: str, kwargs: dict, where: str) -> tuple[nn.Module, int]:
    """torchvision model `name` with the named weights loaded, and the class count they predict."""
    import torchvision

    entry = resolve(name, weights, where)
    classes = len(entry.meta["categories"])
    built_with = {"num_classes": classes, **_BUILT_WITH.get(name, {})}
    for key in ("num_classes", *built_with):
        if key in kwargs and kwargs[key] != built_with[key] and key != "aux_logits":
            raise UserError(f"{where}.kwargs.{key}: {weights} fixes {key} to {built_with[key]}")
    args = {**kwargs, **built_with}
    if name.startswith("vit_"):  # weights for another resolution build another size
        args.setdefault("image_size", entry.meta["min_size"][0])
    if name == "maxvit_t":
        args.setdefault("input_size", entry.meta["min_size"])
    try:
        model = torchvision.models.get_model(name, weights=None, **args)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}.kwargs: cannot build torchvision {name}: {e}") from None
    path = fetch(entry.url, weights, where)
    state = read_state_dict(path, weights, where)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1:2] or [str(e)]
        raise UserError(f"{where}.weights: {path} ({weights}) does not fit {name}: {first[0].strip()}") from None
    if not kwargs.get("aux_logits", False):
        for aux in _AUX_HEADS.get(name, ()):
            model.aux_logits = False
            setattr(model, aux, None)
    return model, classes


def input_spec(cfg, in_channels: int) -> tuple[list[float] | None, list[float] | None, int | None] | None:
    """`(mean, std, size)` the named weights were trained and evaluated with (torchvision's transforms
    meta: its crop size; timm's pretrained config: its square input size), or None for a local file.
    mean/std are None for weights trained on another channel count than the data's (e.g. RGB weights
    on grey data: the data's own statistics stand); size is None when not square."""
    kind = named_kind(cfg.weights)
    if kind is None:
        return None
    if kind == "timm":
        from fitdist.timm_models import pretrained_cfg

        timm_cfg = pretrained_cfg(cfg.name.partition(":")[2], cfg.weights, "teacher")
        mean, std = list(timm_cfg.mean or []), list(timm_cfg.std or [])
        sides = tuple(timm_cfg.input_size or ())[-2:]
    else:
        preset = resolve(cfg.name.partition(":")[2], cfg.weights, "teacher").transforms()
        mean, std = list(getattr(preset, "mean", []) or []), list(getattr(preset, "std", []) or [])
        sides = tuple(getattr(preset, "crop_size", []) or [])
        sides = sides * 2 if len(sides) == 1 else sides
    size = sides[0] if len(sides) == 2 and sides[0] == sides[1] else None
    if len(mean) != in_channels or len(std) != in_channels:
        return None, None, size
    return mean, std, size


def reset_head(model: nn.Module, old_classes: int, num_classes: int, where: str) -> str:
    """Replaces the classifier (the last Linear or 1×1 Conv2d with `old_classes` outputs) by a freshly
    initialised one with `num_classes` outputs; returns its module path."""
    found = None
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == old_classes:
            found = path, nn.Linear(module.in_features, num_classes, bias=module.bias is not None)
        elif isinstance(module, nn.Conv2d) and module.out_channels == old_classes and module.kernel_size == (1, 1):
            found = path, nn.Conv2d(module.in_channels, num_classes, 1, bias=module.bias is not None)
    if found is None:
        raise UserError(f"{where}.head: no classifier layer with {old_classes} outputs to reset")
    model.set_submodule(*found)
    return found[0]


def adapt_stem(model: nn.Module, in_channels: int, where: str) -> None:
    """A pretrained RGB stem for 1-channel input: its weights summed over the colour channels, so
    the model computes on a grey image exactly what it computed on that image repeated as RGB."""
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return
            if in_channels != 1:
                raise UserError(f"{where}.weights: pretrained on {module.in_channels} channels; the data has "
                                f"{in_channels} (only 1-channel data can use RGB weights)")
            new = nn.Conv2d(1, module.out_channels, module.kernel_size, module.stride, module.padding,
                            module.dilation, module.groups, module.bias is not None, module.padding_mode)
            with torch.no_grad():
                new.weight.copy_(module.weight.sum(1, keepdim=True))
                if module.bias is not None:
                    new.bias.copy_(module.bias)
            model.set_submodule(path, new)
            return
