"""WebDataset shards as a `DataBundle` (`data.source: webdataset`).

- Shards: `data.train` / `data.val` are brace patterns (`dir/train-{000000..000127}.tar`),
  `pipe:` commands or http(s) URLs (several joined with `::`); or set only `data.root` to use
  every shard its `manifest.json` lists. Local patterns are checked up front: a pattern matching
  no file, an empty shard list or a shard the manifest does not list is a UserError naming it.
- Training: every rank and worker walks its own endless sequence of shuffled passes over all
  training shards (resampling), so no rank runs dry and DDP never waits on a finished rank; it
  reads `data.shard_mix` shards at once, interleaved, through a shuffle buffer filled before the
  first batch (fitdist.data.stream). Shards whose manifest says they hold samples in source order
  (written before `fitdist shard` shuffled them) still read, with one warning per process.
  The stream is seeded from (seed, rank, first micro-batch, worker): a resumed run continues with
  a fresh, reproducible stream rather than replaying the exact samples of the interrupted one.
- Validation: shards are dealt to ranks (balanced by the manifest's counts) and then to workers;
  shards are disjoint, so across all ranks every sample is read exactly once, and top-1 is exact
  when the evaluator sums counts (fitdist.evaluate does). Its loader workers are started at the
  first evaluation and kept for the next ones (no fork per evaluation).
- Batches hold uint8 images; `DataBundle.to_device` normalises them on the device.
- A `pipe:`/http(s) shard that sends nothing for `data.read_timeout` seconds ends the run with a
  UserError naming it (fitdist.data.pipes).
- `data.soft_labels: DIR`: stored teacher soft labels joined by key, one stored view replayed per
  sample, its top-k travelling with the batch (fitdist.data.soft_labels).
- `metrics()` gives `data/skipped`: samples this rank skipped (train and validation), counted in
  the batches the workers send, each bad sample logged once with its shard and key.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader
from webdataset.shardlists import expand_urls

from fitdist.config import DataConfig
from fitdist.data import Batch, DataBundle
from fitdist.data.manifest import (
    is_local,
    local_path,
    manifest_url,
    read_manifest,
    shard_name,
    shard_table,
)
from fitdist.data.normalize import DeviceNormalize
from fitdist.data.stream import Report, ShardStream, StreamSpec
from fitdist.data.transforms import AUTO_AUGMENT, MEAN_STD, build_transform
from fitdist.errors import UserError

log = logging.getLogger("fitdist.data")
MAX_LOGGED = 10_000  # distinct skip messages remembered per rank (logging each once)
_WARNED_ORDER: set[str] = set()  # manifests already warned about (source-order shards)


class SkipCounter:
    """Main-process side of the reports: totals, one log line per distinct skip, fatal errors."""

    def __init__(self):
        self.skipped, self.logged = 0, set()

    def absorb(self, report: Report) -> None:
        self.skipped += report.skipped
        for where, why in report.messages:  # `where` is "shard: key": each logged once per rank
            if where in self.logged or len(self.logged) > MAX_LOGGED:
                continue
            self.logged.add(where)
            log.warning("skipped sample(s): %s: %s", where, why)
            if len(self.logged) == MAX_LOGGED:
                log.warning("further skipped samples are counted in data/skipped but not logged")
        if report.fatal:
            raise UserError(report.fatal)

    def metrics(self) -> dict[str, float]:
        return {"data/skipped": self.skipped}


def expand_shards(pattern: str | None, key: str) -> list[str]:
    """The shard URLs of a pattern; local files must exist. UserError names what is wrong."""
    if not pattern or not pattern.strip():
        raise UserError(
            f"{key}: empty shard list (set a pattern such as dir/train-{{000000..000009}}.tar)"
        )
    urls = [u for u in expand_urls(pattern.strip()) if u]
    if not urls:
        raise UserError(f"{key}: the pattern {pattern!r} expands to an empty shard list")
    if len(set(urls)) != len(urls):  # a repeated validation shard would be evaluated twice
        twice = next(u for i, u in enumerate(urls) if u in urls[:i])
        raise UserError(f"{key}: shard {twice} is listed twice in {pattern}")
    local = [u for u in urls if is_local(u)]
    missing = [u for u in local if not local_path(u).is_file()]
    if missing and len(missing) == len(urls):
        raise UserError(f"{key}: no file matches {pattern}")
    if missing:
        raise UserError(
            f"{key}: shard {missing[0]} does not exist ({len(missing)} of {len(urls)} "
            f"shards of {pattern} are missing)"
        )
    return urls


def _manifest(where: str, manifests: dict, timeout: float) -> dict:
    if where not in manifests:
        manifests[where] = read_manifest(where, timeout)
    return manifests[where]


def _resolve(
    pattern: str | None, root: str | None, split: str, key: str, manifests: dict, timeout: float
):
    """(urls, manifest, manifest location) for one split; `manifests` caches parsed manifests
    (train and validation share one), which matters at ImageNet scale (thousands of shards)."""
    if pattern is None and root:
        where = os.path.join(root, "manifest.json")
        manifest = _manifest(where, manifests, timeout)
        listed = manifest["splits"].get(split, {}).get("shards")
        if not listed:
            raise UserError(f"{where}: no {split} shards listed (empty shard list)")
        urls = [os.path.join(root, s["name"]) for s in listed]  # unique: names are file names
    else:
        urls = expand_shards(pattern, key)
        where = manifest_url(urls[0])  # next to the shards, wherever they are
        manifest = _manifest(where, manifests, timeout)
    table = shard_table(manifest)
    for url in urls:
        entry = table.get(shard_name(url))
        if entry is None:
            raise UserError(f"{where} disagrees with the shards: it does not list {url}")
        if not is_local(url):
            continue
        try:
            size = os.stat(local_path(url)).st_size
        except FileNotFoundError:
            raise UserError(f"{key}: shard {url} listed in {where} does not exist") from None
        if size != entry["bytes"]:
            log.warning(
                "%s has %d bytes but %s lists %d: damaged or rewritten? Bad samples will be "
                "skipped and counted", url, size, where, entry["bytes"],
            )
    return urls, manifest, where


def _deal(urls: list[str], counts: list[int], world: int) -> list[list[str]]:
    """Shards per rank, largest first to the least loaded rank: balanced and deterministic."""
    loads, out = [0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(urls)), key=lambda i: (-counts[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        out[r].append(urls[i])
        loads[r] += counts[i]
    return out


def _subset(urls: list[str], counts: list[int], n: int) -> tuple[list[str], dict[str, int]]:
    """The first shards covering `n` samples, and how many samples to read from the last one."""
    kept, limits, total = [], {}, 0
    for url, c in zip(urls, counts):
        kept.append(url)
        if total + c >= n:
            limits[url] = n - total
            break
        total += c
    return kept, limits


def _loader(spec: StreamSpec, workers: int, seed: int, persistent: bool = False) -> DataLoader:
    return DataLoader(
        ShardStream(spec),
        batch_size=None,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=2 if workers else None,
        persistent_workers=persistent and workers > 0,
        generator=torch.Generator().manual_seed(seed),  # transform randomness in workers
    )


def _warn_source_order(manifest: dict, where: str) -> None:
    """Once per manifest and process: its shards hold samples in the order of the source."""
    if manifest.get("order") == "shuffled" or where in _WARNED_ORDER:
        return
    _WARNED_ORDER.add(where)
    log.warning(
        "%s: these shards hold samples in source order (class by class in an image folder), so "
        "batches mix fewer classes than they should; rewrite them with `fitdist shard` (which "
        "shuffles) for well-mixed batches (docs/DATA.md)", where,
    )


def _drain(loader: DataLoader, counter: SkipCounter) -> Iterator[Batch]:
    for *batch, report in loader:  # (images, labels[, top-k indices, top-k probabilities]), report
        counter.absorb(report)
        if len(batch[1]):
            yield tuple(batch)


def train_transform(cfg: DataConfig, manifest: dict):
    """The training `ViewTransform` of shards described by `manifest` (`fitdist label` draws with it)."""
    native = manifest["image"].get("size")  # [width, height] when every image has it
    augment = AUTO_AUGMENT.get(manifest.get("dataset", ""), "none") if cfg.augment == "auto" else cfg.augment
    return build_transform(augment, True, cfg.image_size or (None if native else 224), native)


def build_webdataset(
    cfg: DataConfig, micro_batch: int, eval_batch: int, seed: int, rank: int = 0, world: int = 1
) -> DataBundle:
    """The bundle for WebDataset shards written by `fitdist shard` (see docs/DATA.md)."""
    if cfg.read_timeout < 0:
        raise UserError(f"data.read_timeout: must be at least 0, got {cfg.read_timeout}")
    if cfg.shard_mix < 1:
        raise UserError(f"data.shard_mix: must be at least 1, got {cfg.shard_mix}")
    manifests: dict[str, dict] = {}
    train_urls, manifest, where = _resolve(
        cfg.train, cfg.root, "train", "data.train", manifests, cfg.read_timeout
    )
    val_urls, val_manifest, val_where = _resolve(
        cfg.val, cfg.root, "test", "data.val", manifests, cfg.read_timeout
    )
    if val_manifest["classes"] != manifest["classes"]:
        raise UserError(
            f"{val_where} and {where} list different classes: train and validation "
            f"shards come from different datasets"
        )
    _warn_source_order(manifest, where)
    num_classes = manifest["num_classes"]
    if cfg.num_classes is not None and cfg.num_classes < num_classes:
        raise UserError(
            f"data.num_classes is {cfg.num_classes} but {where} has {num_classes} classes"
        )
    dataset, image = manifest.get("dataset", ""), manifest["image"]
    channels = 1 if image["mode"] == "L" else 3
    native = image.get("size")  # [width, height] when every image has it
    augment = AUTO_AUGMENT.get(dataset, "none") if cfg.augment == "auto" else cfg.augment
    size = cfg.image_size or (None if native else 224)
    mean, std = MEAN_STD.get(dataset, ((0.5,) * channels, (0.5,) * channels))
    mean, std = cfg.mean or mean, cfg.std or std
    if len(mean) != channels or len(std) != channels:
        raise UserError(
            f"data.mean/std need {channels} values for {where} ({image['mode']} images)"
        )
    out_hw = (size, size) if size else (native[1], native[0])
    if augment == "imagenet":
        out_hw = (size or 224, size or 224)
    train_view = train_transform(cfg, manifest)

    # only URLs and counts outlive this function: main-process memory stays tiny at any scale
    table, val_table = shard_table(manifest), shard_table(val_manifest)
    train_counts = [table[shard_name(u)]["count"] for u in train_urls]
    soft, soft_manifest = None, None
    if cfg.soft_labels:  # checked against the shards here: a mismatch names the file before any step
        from fitdist.data.soft_labels import open_soft_labels

        soft, soft_manifest = open_soft_labels(cfg.soft_labels, train_urls, table, train_view.spec(),
                                               cfg.num_classes or num_classes)
    val_counts = [val_table[shard_name(u)]["count"] for u in val_urls]
    class_names, num_val = list(manifest["classes"]), sum(val_counts)
    del table, val_table, manifest, val_manifest, manifests
    limits: dict[str, int] = {}
    num_train = min(sum(train_counts), cfg.train_subset or sum(train_counts))
    if cfg.train_subset:
        train_urls, limits = _subset(train_urls, train_counts, cfg.train_subset)
    counter = SkipCounter()
    common = {
        "channels": channels,
        "num_classes": cfg.num_classes or num_classes,
        "read_timeout": cfg.read_timeout,
    }

    def train_batches(start: int = 0) -> Iterator[Batch]:
        spec = StreamSpec(
            urls=train_urls,
            batch=micro_batch,
            train=True,
            seed=(seed, rank, start),
            transform=train_view,
            soft=soft,
            shuffle_buffer=cfg.shuffle_buffer,
            shard_mix=cfg.shard_mix,
            limits=limits,
            expected=dict(zip(train_urls, train_counts)),
            **common,
        )
        # seed + rank + start: each rank's workers draw different augmentations, reproducibly
        loader = _loader(spec, cfg.num_workers, seed * 1_000_003 + rank * 7919 + start)
        return _drain(loader, counter)

    mine = _deal(val_urls, val_counts, world)[rank]
    all_counts = dict(zip(val_urls, val_counts))
    mine_counts = {u: all_counts[u] for u in mine}
    val_loader: list[DataLoader] = []  # built at the first evaluation, its workers kept after it

    def val_batches() -> Iterator[Batch]:
        if not mine:  # more ranks than validation shards: this rank has nothing to evaluate
            return iter(())
        if not val_loader:
            spec = StreamSpec(
                urls=mine,
                batch=eval_batch,
                train=False,
                transform=build_transform(augment, False, size, native),
                expected=mine_counts,
                **common,
            )
            workers = min(cfg.num_workers, len(mine))
            val_loader.append(_loader(spec, workers, seed, persistent=True))
        return _drain(val_loader[0], counter)

    return DataBundle(
        train_batches=train_batches,
        val_batches=val_batches,
        num_classes=cfg.num_classes or num_classes,
        in_channels=channels,
        image_size=out_hw,
        num_val=num_val,
        class_names=class_names,
        metrics=counter.metrics,
        num_train=num_train,
        to_device=DeviceNormalize(mean, std),
        soft_labels=soft_manifest,
    )
