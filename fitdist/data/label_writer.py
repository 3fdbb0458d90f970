"""`fitdist label CONFIG [key=value ...] [--views R] [--topk K] [--batch-size N] [--out DIR]`:
the config's teacher (or ensemble) labels R augmented views of every training image once.

For each image of the training shards it draws R views with the config's training augmentation
(`ViewTransform.draw`, a generator seeded by (seed, shard, key): the same views whoever labels the
shard, whenever), records each view's parameters, runs the teacher on the views and stores the
top-k probabilities at `loss.temperature` (fp16) with their class indices, one label file per image
shard beside a `manifest.json` (format: fitdist.data.soft_labels). `--out` defaults to
`data.soft_labels`, the key training reads them from.

Resumable per shard (a label file is written whole, through a rename, and an existing one is kept);
under torchrun each rank labels shards rank, rank + world, ... and waits for the others at the
end. A directory whose manifest belongs to another teacher, temperature, k, R, augmentation or
other shards is refused (UserError: exit 2, one line).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fitdist import dist
from fitdist.config import Config, load_config
from fitdist.data import DataBundle, build_data
from fitdist.data.manifest import shard_name, shard_table
from fitdist.data.soft_labels import (
    FORMAT,
    MANIFEST,
    label_file,
    teacher_identity,
    write_label_file,
)
from fitdist.data.stream import _Stats, read_shard
from fitdist.data.transforms import IMAGE_EXTS, ViewTransform, decode
from fitdist.data.wds import _resolve, train_transform
from fitdist.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and status 2, like every other bad input
        raise UserError(f"{self.prog}: {message}")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fitdist label", description=__doc__.split("\n\n")[0],
                usage="fitdist label CONFIG [key=value ...] [--views R] [--topk K] [--batch-size N] [--out DIR] "
                      "[--no-progress]", epilog="key=value: dotted overrides of the config, as for train")
    p.add_argument("config", help="YAML config file (its teacher, data and loss.temperature)")
    p.add_argument("--views", type=int, default=10, help="augmented views stored per image, R (default 10)")
    p.add_argument("--topk", type=int, default=10, help="probabilities stored per view, k (default 10)")
    p.add_argument("--batch-size", type=int, default=256, help="views per teacher forward (default 256)")
    p.add_argument("--out", help="output directory (default: data.soft_labels)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, rest = p.parse_known_args(argv)
    bad = [arg for arg in rest if arg.startswith("-") or "=" not in arg]  # overrides may follow the flags
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = rest
    if not Path(args.config).is_file():
        raise UserError(f"config file not found: {args.config}")
    cfg = load_config(args.config, args.overrides)
    summary = label(cfg, args.views, args.topk, args.batch_size, args.out, not args.no_progress)
    # one write of one line: under torchrun every rank prints its summary to the same stdout, and
    # a single write() of under PIPE_BUF bytes is never interleaved with another process's
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (json.dumps(summary) + "\n").encode())
    return 0


def view_generator(seed: int, shard: str, key: str) -> torch.Generator:
    """The generator of one image's views: from (seed, shard, key) alone."""
    digest = hashlib.sha256(f"fitdist-label:{seed}:{shard}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def draw_views(view: ViewTransform, image: torch.Tensor, n: int, generator: torch.Generator):
    """`n` views of a decoded image: (their parameters [n, 5], their uint8 pixels [n, C, H, W])."""
    prepared = view.prepare(image)
    params = [view.draw(prepared, generator) for _ in range(n)]
    return np.array(params, dtype=np.int32), torch.stack([view.replay(prepared, p) for p in params])


def expected_manifest(cfg: Config, bundle: DataBundle, view: ViewTransform, urls: list[str], table: dict,
                      views: int, topk: int) -> dict:
    shards = []
    for url in urls:
        e = table[shard_name(url)]
        shards.append({"name": e["name"], "bytes": e["bytes"], "sha256": e.get("sha256"), "count": e["count"],
                       "labels": label_file(e["name"])})
    return {
        "format": FORMAT,
        "teacher": teacher_identity(cfg),
        "temperature": float(cfg.loss.temperature),
        "topk": topk,
        "views": views,
        "num_classes": bundle.num_classes,
        "augmentation": view.spec(),
        "image_size": list(bundle.image_size),
        "seed": cfg.seed,
        "source": {"shards": shards},
    }


def claim_directory(out: Path, want: dict) -> None:
    """Writes the manifest, or checks the one there (each rank the same way: nothing decided by one)."""
    where = out / MANIFEST
    if where.is_file():
        have = json.loads(where.read_text())
        diff = [k for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
        if diff:
            raise UserError(f"{where}: labels of another {', '.join(diff)} are there; label into another "
                            "directory (--out) or remove it")
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{MANIFEST}.tmp{os.getpid()}"  # every rank writes the same bytes: a race is harmless
    tmp.write_text(json.dumps(want, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, where)


class Labeller:
    """Teacher top-k of batches of views; results kept in the order the views came."""

    def __init__(self, teacher, bundle: DataBundle, device: torch.device, temperature: float, topk: int,
                 batch: int):
        self.teacher, self.bundle, self.device = teacher, bundle, device
        self.temperature, self.topk, self.batch = temperature, topk, batch
        self.index_dtype = np.uint16 if bundle.num_classes <= 2**16 else np.int32
        self.pending: list[torch.Tensor] = []
        self.idx: list[np.ndarray] = []
        self.prob: list[np.ndarray] = []

    def add(self, pixels: torch.Tensor) -> None:
        self.pending.extend(pixels)
        if len(self.pending) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        x = self.bundle.to_device(torch.stack(self.pending), self.device)
        self.pending = []
        target = self.teacher(x, True, False, self.temperature)  # an Ensemble: one teacher or several
        probs = target.probs if target.probs is not None else F.softmax(target.logits.float() / self.temperature, -1)
        values, idx = probs.float().topk(self.topk, dim=-1)
        self.idx.append(idx.cpu().numpy().astype(self.index_dtype))  # labelling reads back: not a training step
        self.prob.append(values.half().cpu().numpy())

    def take(self, n: int, views: int) -> tuple[np.ndarray, np.ndarray]:
        self.flush()
        k = self.topk
        idx = np.concatenate(self.idx) if self.idx else np.zeros((0, k), self.index_dtype)
        prob = np.concatenate(self.prob) if self.prob else np.zeros((0, k), np.float16)
        self.idx, self.prob = [], []
        return idx.reshape(n, views, k), prob.reshape(n, views, k)


def label(cfg: Config, views: int = 10, topk: int = 10, batch: int = 256, out: str | None = None,
          progress: bool = True) -> dict:
    """Labels this rank's share of the training shards; returns a summary (this rank's)."""
    from fitdist.build import build_teachers

    if cfg.data.source != "webdataset":
        raise UserError(f"fitdist label: stored soft labels need data.source: webdataset, not {cfg.data.source!r}")
    out = out or cfg.data.soft_labels
    if not out:
        raise UserError("fitdist label: name the output directory (--out DIR or data.soft_labels=DIR)")
    if views < 1 or batch < 1:
        raise UserError(f"fitdist label: --views and --batch-size must be at least 1, got {views} and {batch}")
    data_cfg = dataclasses.replace(cfg.data, soft_labels=None, train_subset=0)
    bundle = build_data(data_cfg, 1, 1, cfg.seed)
    if not 1 <= topk <= bundle.num_classes:
        raise UserError(f"fitdist label: --topk must be 1 to {bundle.num_classes} (the classes), got {topk}")
    if cfg.teacher is None and not getattr(cfg, "teachers", None):
        raise UserError("fitdist label: the config has no teacher to label with")
    if cfg.loss.ensemble == "sample" and len(getattr(cfg, "teachers", [])) > 1:
        raise UserError("fitdist label: loss.ensemble: sample draws a teacher per step; label with mean_probs "
                        "or mean_logits")
    urls, manifest, _ = _resolve(data_cfg.train, data_cfg.root, "train", "data.train", {}, data_cfg.read_timeout)
    table, view = shard_table(manifest), train_transform(data_cfg, manifest)
    out_dir = Path(out)
    claim_directory(out_dir, expected_manifest(cfg, bundle, view, urls, table, views, topk))

    env = dist.setup(cfg.train.device, backend="gloo")  # gloo: the one collective is the closing barrier
    try:
        teacher = build_teachers(cfg, bundle, env.rank).place(env.device)
        mine = [u for u in urls[env.rank :: env.world] if not (out_dir / label_file(shard_name(u))).is_file()]
        total = sum(table[shard_name(u)]["count"] for u in mine)
        labeller = Labeller(teacher, bundle, env.device, cfg.loss.temperature, topk, batch)
        stats, done, written, started = _Stats(), 0, 0, time.perf_counter()
        bar = tqdm(total=total, unit="img", disable=not progress or not total, desc=f"label rank {env.rank}")
        for url in mine:
            name = shard_name(url)
            keys, params = [], []
            for sample in read_shard(url, table[name]["count"], None, stats, data_cfg.read_timeout):
                raw = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
                try:
                    image = decode(raw, bundle.in_channels)
                except Exception:  # noqa: BLE001 - unreadable: no labels; the reader skips it too
                    stats.skip(1, f"{name}: {sample['__key__']}", "unreadable image")
                    continue
                p, pixels = draw_views(view, image, views, view_generator(cfg.seed, name, sample["__key__"]))
                keys.append(sample["__key__"])
                params.append(p)
                labeller.add(pixels)
                bar.update(1)
            idx, prob = labeller.take(len(keys), views)
            grid = np.stack(params) if params else np.zeros((0, views, 5), np.int32)
            written += write_label_file(out_dir / label_file(name), keys, grid, idx, prob)
            done += len(keys)
        bar.close()
        seconds = time.perf_counter() - started
        dist.barrier()  # every rank's shards written before anyone reports the set complete
        missing = [label_file(shard_name(u)) for u in urls if not (out_dir / label_file(shard_name(u))).is_file()]
    finally:
        dist.teardown()
    return {
        "rank": env.rank,
        "out": str(out_dir),
        "shards": len(mine),
        "images": done,
        "skipped": stats.skipped,
        "views": views,
        "topk": topk,
        "seconds": round(seconds, 3),
        "img_per_s": round(done / seconds, 1) if done and seconds > 0 else None,
        "bytes_per_image": round(written / done, 1) if done else None,
        "complete": not missing,
    }
