"""`timm:<name>` models and `weights: timm` / `timm:<tag>` pretrained weights (optional extra
`fitdist[timm]`; timm is imported only when a config names it).

A model is `timm.create_model(name, num_classes=<data's>, in_chans=<data's>, **kwargs)`. Named
weights go through timm's own pretrained configs and the Hugging Face cache (`HF_HOME`,
`HF_HUB_OFFLINE` honoured by huggingface_hub itself), safetensors where timm provides them and
`weights_only=True` otherwise (timm's loaders). `kwargs.pretrained_cfg_overlay: {file: PATH}`
points timm at a local file instead. For another channel count timm adapts the stem itself (RGB
summed for grey input).

Downloads happen once per node: local rank 0 builds first (and fetches), the other ranks wait in
a collective, then build from the filled cache. A classifier for another class count than the
data's is an error for a teacher; with `head: reset` a student gets timm's fresh classifier.
"""

from __future__ import annotations

import os

from torch import nn

from fitdist import dist
from fitdist.errors import UserError, did_you_mean


def _timm(where: str):
    try:
        import timm
    except ImportError:
        raise UserError(f"{where}.name: timm models need timm: pip install 'fitdist[timm]'") from None
    return timm


def is_timm_weights(weights: str | None) -> bool:
    return weights == "timm" or bool(weights) and weights.startswith("timm:")


def full_name(name: str, weights: str | None) -> str:
    """`name.tag` for `weights: timm:<tag>`, else `name` (timm's default tag)."""
    tag = weights.partition(":")[2] if is_timm_weights(weights) else ""
    return f"{name}.{tag}" if tag else name


def pretrained_cfg(name: str, weights: str, where: str):
    """timm's pretrained config for `name` and `weights` (class count, mean, std, input size, hub id)."""
    timm = _timm(where)
    check_name(name, where)
    full = full_name(name, weights)
    try:
        cfg = timm.models.get_pretrained_cfg(full)
    except RuntimeError:  # timm's "Invalid pretrained tag"
        cfg = None
    if cfg is None:
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{name}.*")]
        raise UserError(f"{where}.weights: timm has no pretrained weights {full!r}"
                        + (f"; its tags: {', '.join(tags[:8])}" if tags else "; it has none"))
    return cfg


def check_name(name: str, where: str) -> None:
    timm = _timm(where)
    if not timm.is_model(name) or "." in name:
        models = timm.list_models()
        raise UserError(f"{where}.name: no timm model {name!r}{did_you_mean(name, models)}"
                        + (" (give a weights tag as weights: timm:<tag>)" if "." in name else ""))


def build_timm(name: str, weights: str | None, head: str, kwargs: dict, num_classes: int, in_channels: int,
               where: str) -> nn.Module:
    timm = _timm(where)
    check_name(name, where)
    for key in ("num_classes", "in_chans", "pretrained"):
        if key in kwargs:
            raise UserError(f"{where}.kwargs.{key}: set by fitdist (the data's classes and channels; "
                            f"{where}.weights for pretrained weights)")
    if not is_timm_weights(weights):
        return _create(timm, name, False, num_classes, in_channels, kwargs, where)
    cfg = pretrained_cfg(name, weights, where)
    classes = cfg.num_classes
    if classes != num_classes and head != "reset":
        hint = "" if where.startswith("teacher") else f"; {where}.head=reset replaces its classifier"
        raise UserError(f"{where}.weights: {full_name(name, weights)} predicts {classes} classes but the data has "
                        f"{num_classes}{hint}")
    full = full_name(name, weights)
    model, error = None, None
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # fills the cache for the node's other ranks
        try:
            model = _create(timm, full, True, num_classes, in_channels, kwargs, where, cfg)
        except UserError as e:
            error = str(e)
    errors = [e for e in dist.gather_objects(error) if e]
    if errors:
        raise dist.every_rank(UserError(errors[0]))
    return model if model is not None else _create(timm, full, True, num_classes, in_channels, kwargs, where, cfg)


def _create(timm, name: str, pretrained: bool, num_classes: int, in_channels: int, kwargs: dict, where: str,
            cfg=None) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels, **kwargs)
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"{where}.kwargs: cannot build timm {name}: {e}") from None
    except (OSError, RuntimeError) as e:  # a download refused offline or failed, a file that does not fit
        where_from = ""
        if cfg is not None and cfg.hf_hub_id:
            from huggingface_hub import constants

            where_from = (f"; it is fetched from the Hugging Face hub ({cfg.hf_hub_id}) into {constants.HF_HUB_CACHE}: "
                          "fill that cache on a machine with network (or give kwargs.pretrained_cfg_overlay.file)")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{where}.weights: cannot load timm {name} ({type(e).__name__}: {first}){where_from}") from None


def weights_cached(name: str, weights: str, kwargs: dict, where: str) -> bool:
    """Whether the named weights load without a download: a local overlay file, or the file
    timm would fetch already in the Hugging Face cache (the dry run never downloads)."""
    overlay = (kwargs.get("pretrained_cfg_overlay") or {}).get("file")
    if overlay:
        return os.path.isfile(overlay)
    cfg = pretrained_cfg(name, weights, where)
    if not cfg.hf_hub_id:
        return False
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", cfg.hf_hub_filename or "pytorch_model.bin"):
        found = try_to_load_from_cache(cfg.hf_hub_id.split("@")[0], filename)
        if isinstance(found, str) and os.path.isfile(found):
            return True
    return False
