"""`fitdist bench data --soft-labels`: stored teacher soft labels, written and read.

On generated ImageNet-layout JPEGs sharded by `fitdist shard`:
- writing: `fitdist label`'s throughput (images/s, R views each, through the given teacher; random
  weights cost the same to run) and the bytes per image its label files take;
- reading: the WebDataset reader's training throughput with and without the label join
  (`data.soft_labels`: each shard's label file loaded, every sample joined by key, its stored view
  replayed instead of a fresh draw), both streams open at once and timed in alternating rounds
  (`--reps` rounds of `--batches` batches), the ratio taken per round; target ≥ 0.95×;
- storage per image for a grid of (R, k), from the format (fitdist.data.soft_labels): R views ×
  (k × (index + fp16 value) + 5 int16 view parameters) + the key, before the file's small headers.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from fitdist.config import Config, DataConfig, LossConfig, TeacherConfig
from fitdist.data.wds import build_webdataset

VIEW_BYTES = 5 * 2  # top, left, height, width, flip as int16


def bytes_per_image(views: int, topk: int, classes: int, key: int = 25) -> int:
    """Label bytes of one image: the arrays of the format, without the file's headers (`key`: the
    key's bytes, ~25 for ImageNet's `n01440764/n01440764_10026`)."""
    index = 2 if classes <= 2**16 else 4
    return views * (topk * (index + 2) + VIEW_BYTES) + key


def make_teacher_file(path: Path, name: str, classes: int) -> Path:
    from fitdist.config import ModelConfig
    from fitdist.models import build_model

    torch.manual_seed(0)
    kwargs = {"widths": [16, 32, 64], "pool_after": [1, 2]} if name == "fitdist:fitnet" else {}
    torch.save(build_model(ModelConfig(name, kwargs), classes, 3).state_dict(), path)
    return path


def paired_rates(plain, joined, rounds: int, batches: int) -> tuple[list[float], list[float]]:
    """img/s of the two streams over `rounds` alternating rounds of `batches` batches each (the
    order flips every round), in this process (no workers: nothing prefetches while the other is
    timed), one thread: load on a shared machine hits both alike, and the ratio is taken per round."""
    its = {"plain": plain.train_batches(0), "joined": joined.train_batches(0)}
    for it in its.values():
        next(it)  # the buffer fill and first shards are not timed
    rates: dict[str, list[float]] = {"plain": [], "joined": []}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for r in range(rounds):
            for name in (("plain", "joined") if r % 2 == 0 else ("joined", "plain")):
                t0, n = time.perf_counter(), 0
                for _ in range(batches):
                    n += len(next(its[name])[0])
                rates[name].append(n / (time.perf_counter() - t0))
    finally:
        torch.set_num_threads(threads)
    return rates["plain"], rates["joined"]


def soft_label_figures(shards: Path, out: Path, classes: int, size: int, batch: int, batches: int, rounds: int,
                       views: int, topk: int, teacher: str) -> dict:
    from fitdist.data.label_writer import label

    t_kwargs = {"widths": [16, 32, 64], "pool_after": [1, 2]} if teacher == "fitdist:fitnet" else {}
    weights = make_teacher_file(out / "teacher.pt", teacher, classes)
    labels = out / f"labels-R{views}-k{topk}"
    cfg = Config(teacher=TeacherConfig(teacher, t_kwargs, weights=str(weights)), loss=LossConfig(temperature=4.0),
                 data=DataConfig(source="webdataset", root=str(shards), image_size=size, soft_labels=str(labels)))
    if labels.exists():
        import shutil

        shutil.rmtree(labels)  # the writing figure is a fresh run's
    written = label(cfg, views, topk, batch=64, progress=False)
    arrays, images, key = 0, 0, 0
    for f in sorted(labels.glob("*.soft.npz")):  # what the arrays hold, headers aside
        with np.load(f) as z:
            arrays += sum(z[name].nbytes for name in z.files)
            images, key = images + len(z["keys"]), max(key, z["keys"].dtype.itemsize)
    plain_cfg = dataclasses.replace(cfg.data, soft_labels=None, num_workers=0)
    plain, joined = paired_rates(build_webdataset(plain_cfg, batch, batch, 0),
                                 build_webdataset(dataclasses.replace(plain_cfg, soft_labels=str(labels)), batch, batch, 0),
                                 rounds, batches)
    best = {"plain": statistics.median(plain), "joined": statistics.median(joined)}
    ratio = statistics.median(j / p for p, j in zip(plain, joined))
    return {
        "teacher": teacher,
        "views": views,
        "topk": topk,
        "label_img_per_s": written["img_per_s"],
        "label_views_per_s": round(written["img_per_s"] * views, 1),
        "bytes_per_image": written["bytes_per_image"],
        "bytes_per_image_arrays": round(arrays / images, 1),
        "bytes_per_image_formula": bytes_per_image(views, topk, classes, key),
        "key_bytes": key,
        "reader_img_per_s": {k: round(v, 1) for k, v in best.items()},
        "rounds": rounds,
        "join_over_plain": round(ratio, 3),  # median over rounds of the paired ratio
        "join_target_met": ratio >= 0.95,
        "grid_bytes_per_image_1000_classes": {
            f"R={r},k={k}": bytes_per_image(r, k, 1000) for r in (1, 5, 10, 20) for k in (5, 10, 20)
        },
    }


def lines(res: dict, batch: int, size: int) -> list[str]:
    grid = ", ".join(f"{k}: {v}" for k, v in res["grid_bytes_per_image_1000_classes"].items())
    verdict = "met" if res["join_target_met"] else "MISSED"
    return [
        f"Soft labels (R={res['views']}, k={res['topk']}, teacher {res['teacher']} with random weights):",
        (f"- fitdist label: {res['label_img_per_s']} img/s ({res['label_views_per_s']} views/s), "
         f"{res['bytes_per_image']} bytes/image on disk ({res['bytes_per_image_arrays']} in the arrays, keys of "
         f"{res['key_bytes']} bytes)"),
        (f"- reader, batch {batch}, in-process, 1 thread, RandomResizedCrop {size}, median of {res['rounds']} "
         f"alternating rounds: {res['reader_img_per_s']['plain']} img/s without the join, "
         f"{res['reader_img_per_s']['joined']} with it; paired ratio {res['join_over_plain']}x "
         f"(target >= 0.95: {verdict})"),
        f"- bytes/image at 1000 classes: {grid}",
    ]
