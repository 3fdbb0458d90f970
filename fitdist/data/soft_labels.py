"""Stored teacher soft labels (`data.soft_labels: DIR`, written by `fitdist label`): format and join.

Layout of DIR:
- `manifest.json`: format, teacher identity (name, weights, sha256 of a weights file; every
  teacher and the ensemble mode for `teachers:`), temperature T, top-k `k`, views per image `R`,
  number of classes, the training augmentation (`ViewTransform.spec`), the labelling seed and
  every source shard (name, bytes, sha256, count) with its label file.
- one `<shard stem>.soft.npz` per source shard (uncompressed): `keys` [n] (bytes, the image
  shards' keys), `views` [n, R, 5] (int16, int32 for images of 32768 px or more: top, left,
  height, width, flip of each view, fitdist.data.transforms), `idx` [n, R, k] (uint16, int32
  beyond 65536 classes) and `prob` [n, R, k] (fp16): the teacher's top-k probabilities at T.

Reading: the worker that opens an image shard loads its label file, joins every sample by key,
picks one of the R views (a generator seeded like the stream: seed, rank, first micro-batch,
worker), replays exactly that view and yields its top-k with the batch. The dense target is
made on the device (`dense_target`), as FKD (Shen & Xing 2022) recovers it: the k stored
probabilities, and the remaining mass 1 − Σ top-k spread evenly over the other C − k classes.
A label set that does not fit the run (other shards, augmentation, classes, teacher, T) or a
missing label file is a UserError naming the file; a sample without stored labels is skipped
and counted in `data/skipped`.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fitdist.errors import UserError

FORMAT = "fitdist-soft-labels/1"
MANIFEST = "manifest.json"
VIEW_PARAMS = 5  # top, left, height, width, flip


def label_file(shard: str) -> str:
    """The label file of an image shard (`train-000003.tar` -> `train-000003.soft.npz`)."""
    name = os.path.basename(shard)
    for ext in (".tar.gz", ".tar"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return name + ".soft.npz"


def write_label_file(path: Path, keys: list[str], views: np.ndarray, idx: np.ndarray, prob: np.ndarray) -> int:
    """Writes one shard's labels through a temporary file and a rename (a shard is all or nothing:
    what makes labelling resumable per shard). Returns the file's size in bytes."""
    views = views.astype(np.int16 if views.size == 0 or views.max() < 2**15 else np.int32)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, keys=np.array([k.encode() for k in keys], dtype=bytes), views=views, idx=idx, prob=prob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


@dataclass
class LabelTable:
    """One shard's stored labels, by key."""

    rows: dict[str, int]
    views: np.ndarray
    idx: np.ndarray
    prob: np.ndarray


def load_label_file(path: str) -> LabelTable:
    with np.load(path, allow_pickle=False) as z:
        keys, views, idx, prob = z["keys"], z["views"], z["idx"], z["prob"]
    return LabelTable({k.decode(): i for i, k in enumerate(keys)}, views, idx, prob)


def dense_target(idx: torch.Tensor, prob: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[N, C] fp32 target from top-k indices [N, k] and probabilities [N, k] (FKD's recovery: the
    mass 1 − Σ top-k spread evenly over the other C − k classes; with k = C, the stored values).
    On the device of the inputs, without reading anything back."""
    p = prob.float()
    k = p.shape[1]
    rest = (1.0 - p.sum(1, keepdim=True)).clamp_min(0.0) / max(num_classes - k, 1)
    return rest.expand(-1, num_classes).clone().scatter_(1, idx.long(), p)


@dataclass
class SoftSpec:
    """What a loader worker needs to join stored labels (built in the main process)."""

    directory: str
    views: int  # R
    files: dict[str, str]  # image shard name -> label file path


def attach(samples: Iterator[dict], shard: str, spec: SoftSpec, skip) -> Iterator[dict]:
    """`samples` of one image shard with `__soft__` = (views, idx, prob) of its key; a sample
    without stored labels is skipped through `skip(n, where, why)` (counted in data/skipped)."""
    table: LabelTable | None = None
    for sample in samples:
        if table is None:  # loaded when the shard is first drawn from, like the shard itself
            table = load_label_file(spec.files[shard])
        row = table.rows.get(sample["__key__"])
        if row is None:
            skip(1, f"{shard}: {sample['__key__']}", f"no stored soft labels in {spec.files[shard]}")
            continue
        sample["__soft__"] = (table.views[row], table.idx[row], table.prob[row])
        yield sample


def pick_view(soft: tuple[np.ndarray, np.ndarray, np.ndarray], v: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """View `v`'s parameters and its top-k (indices int64, probabilities fp16) as tensors."""
    views, idx, prob = soft
    return views[v], torch.from_numpy(idx[v].astype(np.int64)), torch.from_numpy(prob[v].copy())


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def teacher_identity(cfg) -> dict[str, Any] | None:
    """The teachers a label set comes from: name, weights and the sha256 of a weights file."""
    from fitdist.config import teacher_list

    teachers = teacher_list(cfg)
    if not teachers:
        return None
    out = []
    for t in teachers:
        w = t.weights
        entry = {"name": t.name, "weights": w, "precision": t.precision}
        if w and os.path.isfile(w):
            entry["sha256"] = sha256_file(w)
            entry["weights"] = os.path.basename(w)  # the file may move; its checksum is what counts
        if len(teachers) > 1:
            entry["weight"] = t.weight
        out.append(entry)
    return {"teachers": out, **({"ensemble": cfg.loss.ensemble} if len(teachers) > 1 else {})}


def read_labels_manifest(directory: str) -> tuple[dict, str]:
    where = os.path.join(directory, MANIFEST)
    try:
        with open(where) as f:
            m = json.load(f)
    except FileNotFoundError:
        raise UserError(f"data.soft_labels: no {where}: write the labels with `fitdist label` (docs/DATA.md)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"data.soft_labels: cannot read {where}: {type(e).__name__}: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise UserError(f"{where}: not a fitdist soft-label manifest (format {FORMAT!r} expected)")
    return m, where


def open_soft_labels(directory: str, urls: list[str], table: dict[str, dict], view_spec: dict,
                     num_classes: int) -> tuple[SoftSpec, dict]:
    """Checks the label set in `directory` against the training shards `urls` (with their image
    manifest entries `table`), the reader's augmentation and the number of classes; returns the
    workers' spec and the manifest (with `__path__`). Every mismatch names the file."""
    from fitdist.data.manifest import shard_name

    m, where = read_labels_manifest(directory)
    if m.get("augmentation") != view_spec:
        raise UserError(f"{where}: labels drawn with the augmentation {m.get('augmentation')}, but this run's is "
                        f"{view_spec} (data.augment / data.image_size): relabel or match them")
    if m.get("num_classes") != num_classes:
        raise UserError(f"{where}: labels for {m.get('num_classes')} classes, the data has {num_classes}")
    listed = {s["name"]: s for s in m["source"]["shards"]}
    files = {}
    for url in urls:
        name = shard_name(url)
        entry, image = listed.get(name), table[name]
        if entry is None:
            raise UserError(f"{where}: no labels for the training shard {url} (labels of other shards?)")
        if (entry.get("sha256"), entry.get("bytes")) != (image.get("sha256"), image.get("bytes")):
            raise UserError(f"{where}: labels of another {name} (sha256/size differ from the image manifest's): "
                            "relabel after rewriting shards")
        path = os.path.join(directory, entry["labels"])
        if not os.path.isfile(path):
            raise UserError(f"data.soft_labels: {path} is missing (labels of {name} not written: rerun `fitdist label`)")
        try:
            with zipfile.ZipFile(path) as z:
                bad = {"keys.npy", "views.npy", "idx.npy", "prob.npy"} - set(z.namelist())
        except (OSError, zipfile.BadZipFile) as e:
            raise UserError(f"data.soft_labels: {path} is not a label file ({type(e).__name__}: {e})") from None
        if bad:
            raise UserError(f"data.soft_labels: {path} lacks {sorted(bad)}")
        files[name] = path
    return SoftSpec(directory, int(m["views"]), files), {**m, "__path__": where}


def check_run(cfg, manifest: dict) -> None:
    """The labels' temperature and teacher against the run's (`loss.temperature`, `teacher(s)`)."""
    where = manifest["__path__"]
    if float(manifest["temperature"]) != float(cfg.loss.temperature):
        raise UserError(f"{where}: labels at temperature {manifest['temperature']} but loss.temperature is "
                        f"{cfg.loss.temperature}: they must be equal (relabel, or set loss.temperature)")
    ident = teacher_identity(cfg)
    if ident is not None and ident != manifest["teacher"]:
        raise UserError(f"{where}: labels of the teacher {manifest['teacher']}, but this config's is {ident}")


def stored_only(cfg) -> bool:
    """True when stored labels replace the teacher in every stage (no stage has a hint term): then
    no teacher is built at all."""
    from fitdist.stage import stage_terms

    return bool(cfg.data.soft_labels) and not any("hint" in stage_terms(s) for s in cfg.stages)
