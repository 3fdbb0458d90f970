"""Write a `Source` as WebDataset shards (`train-%06d.tar`, `test-%06d.tar`) plus `manifest.json`.

Properties:
- Samples are shuffled across the whole split before sharding (`--seed`, default 0, recorded in
  the manifest as `settings.seed`, with `order: "shuffled"`): an image folder lists its files
  class by class, and shards in that order would hold ~2 ImageNet classes each, which no reader
  buffer can mix well. Shard `k` of a split holds positions `[k·S, (k+1)·S)` of the split's
  permutation: boundaries depend only on the input, the seed and `--shard-size`, never on skipped
  (unreadable) source files.
- A sample's key names its source: `train-000123` is index 123 of the source's train split (array
  sources), `n01440764/n01440764_10026` the file of that stem in that class folder (image folders).
- Byte-identical output for the same input and seed: fixed tar metadata (mtime 0, owner, mode),
  deterministic PNG/JPEG encoders, a permutation from Python's `random` seeded with a string
  (stable across Python versions and platforms).
- Atomic per shard: a shard is written as `NAME.tmp`, fsynced, then renamed; `.progress.json`
  records finished shards, so an interrupted run resumes at the first shard not finished.
"""

from __future__ import annotations

import hashlib
import io
import math
import multiprocessing
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from fitdist.data.manifest import FORMAT, NAME, SPLIT_PREFIX, read_manifest, write_json_atomic
from fitdist.data.sources import Source
from fitdist.errors import UserError

PROGRESS = ".progress.json"
# mtime an int: a float makes tarfile add a 1 KiB PAX header to every member
TAR_OPTIONS = {"encoder": False, "mtime": 0, "user": "fitdist", "group": "fitdist", "mode": 0o444}


# ---------------------------------------------------------------- encoding one image


def _capped(im: Image.Image, max_side: int | None) -> Image.Image:
    """`im` with its shorter side at most `max_side` (aspect ratio kept)."""
    w, h = im.size
    if not max_side or min(w, h) <= max_side:
        return im
    scale = max_side / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return im.resize(size, Image.Resampling.BICUBIC)


def _save(im: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, format="PNG", compress_level=6)
    else:
        im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode(item: np.ndarray | str, mode: str, max_side: int | None, quality: int):
    """`(extension, bytes, (width, height))` for an array (PNG, lossless) or an image file
    (its own bytes when already a JPEG/PNG in `mode` and small enough, else re-encoded)."""
    if isinstance(item, np.ndarray):
        im = _capped(Image.fromarray(item), max_side)
        return "png", _save(im, "png", quality), im.size
    raw = Path(item).read_bytes()
    with Image.open(io.BytesIO(raw)) as im:
        im.load()  # a full decode: a corrupt file is caught here, not in the training run
        fmt = {"JPEG": "jpg", "PNG": "png"}.get(im.format or "")
        resize = bool(max_side) and min(im.size) > max_side
        if fmt and im.mode == mode and not resize:
            return fmt, raw, im.size
        out = _capped(im.convert(mode), max_side)
        # lossless stays lossless unless resized; a resized or lossy image becomes a JPEG
        fmt = "jpg" if resize or fmt == "jpg" else "png"
        return fmt, _save(out, fmt, quality), out.size


def _encode_safe(args: tuple) -> tuple[bool, Any, Any, Any]:
    try:
        return (True, *encode(*args))
    except Exception as e:  # noqa: BLE001 - an unreadable source file is skipped and listed
        return False, f"{type(e).__name__}: {e}", None, None


# ---------------------------------------------------------------- atomic shard files


class _HashingFile:
    """A file being written as `NAME.tmp`, hashed on the fly (no second read for the sha256)."""

    def __init__(self, final: str):
        self.final, self.tmp = final, final + ".tmp"
        self.f = open(self.tmp, "wb")  # noqa: SIM115 - closed by commit/abort
        self.sha, self.bytes = hashlib.sha256(), 0

    def write(self, data) -> int:
        if self.f.closed:  # after an abort, tarfile's finaliser may still flush: drop it
            return len(data)
        self.sha.update(data)
        self.bytes += len(data)
        return self.f.write(data)

    def commit(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.final)  # the shard appears complete or not at all

    def abort(self) -> None:
        self.f.close()
        Path(self.tmp).unlink(missing_ok=True)


class _SplitWriter:
    """`webdataset.ShardWriter` whose shards go through `_HashingFile`; records finished shards."""

    def __init__(self, out_dir: Path, prefix: str, start: int, on_shard):
        self.files: dict[str, _HashingFile] = {}
        self.on_shard, self.aborted = on_shard, False
        self.writer = wds.ShardWriter(
            str(out_dir / f"{prefix}-%06d.tar"),
            maxcount=1 << 62,
            maxsize=float("inf"),
            start_shard=start,
            verbose=0,
            opener=self._open,
            post=self._post,
            **TAR_OPTIONS,
        )

    def _open(self, fname: str) -> _HashingFile:
        self.files[fname] = _HashingFile(fname)
        return self.files[fname]

    def _post(self, fname: str) -> None:
        f = self.files.pop(fname)
        if self.aborted:
            f.abort()
            return
        f.commit()
        self.on_shard(Path(fname).name, f.bytes, f.sha.hexdigest())

    def abort(self) -> None:
        self.aborted = True
        for f in self.files.values():
            f.abort()
        self.files.clear()


# ---------------------------------------------------------------- the whole directory


def sample_order(n: int, seed: int | None, split: str) -> list[int]:
    """Source indices in shard order: a permutation fixed by (seed, split); None: source order."""
    order = list(range(n))
    if seed is not None:
        random.Random(f"fitdist-shard:{seed}:{split}").shuffle(order)
    return order


def _settings(
    source: Source, shard_size: int, max_side: int | None, quality: int, seed: int | None
) -> dict:
    return {
        "dataset": source.dataset,
        "source_sha256": source.checksum,
        "shard_size": shard_size,
        "max_side": max_side,
        "quality": quality,
        "mode": source.mode,
        "seed": seed,  # None: source order (not offered by the CLI; benchmarks compare with it)
    }


def _previous_state(out_dir: Path, settings: dict) -> dict[str, list[dict]]:
    """Finished shards from an earlier run with the same settings (manifest or progress file)."""
    for name in (NAME, PROGRESS):
        path = out_dir / name
        if not path.exists():
            continue
        state = read_manifest(str(path)) if name == NAME else _read_progress(path)
        if state["settings"] != settings:
            raise UserError(
                f"{path}: {out_dir} holds shards written from other input or settings "
                f"({state['settings']}); remove them or choose another directory"
            )
        return {split: info["shards"] for split, info in state["splits"].items()}
    return {}


def _read_progress(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(
            f"{path}: unreadable progress file ({e}); delete it to start over"
        ) from None


def _finished_prefix(out_dir: Path, entries: list[dict], prefix: str) -> list[dict]:
    """The leading entries whose shard files exist with the recorded size."""
    kept = []
    for k, e in enumerate(entries):
        path = out_dir / e["name"]
        if (
            e["name"] != f"{prefix}-{k:06d}.tar"
            or not path.is_file()
            or path.stat().st_size != e["bytes"]
        ):
            break
        kept.append(e)
    return kept


def _uniform(values: list) -> Any:
    return values[0] if values and all(v == values[0] for v in values) else None


def write_shards(
    source: Source,
    out_dir: str | Path,
    shard_size: int = 10_000,
    max_side: int | None = None,
    quality: int = 90,
    workers: int = 1,
    progress: bool = True,
    seed: int | None = 0,
) -> dict:
    """Write (or finish writing) the shards of `source` into `out_dir`; returns the manifest.
    `seed` fixes the shuffle of each split; None keeps the source order (old-style shards)."""
    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {shard_size}")
    if max_side is not None and max_side < 1:
        raise UserError(f"--max-side must be at least 1, got {max_side}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.tar.tmp"):  # left by an interrupted run: never complete
        stale.unlink()
    settings = _settings(source, shard_size, max_side, quality, seed)
    previous = _previous_state(out_dir, settings)
    state = {
        split: _finished_prefix(out_dir, previous.get(split, []), SPLIT_PREFIX[split])
        for split in source.splits
    }
    total = sum(len(s) for s in source.splits.values())
    done = sum(min(len(state[n]) * shard_size, len(s)) for n, s in source.splits.items())
    bar = tqdm(total=total, initial=done, unit="img", disable=not progress, desc=str(out_dir))
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        for name, split in source.splits.items():
            _write_split(
                source,
                name,
                split,
                out_dir,
                shard_size,
                (max_side, quality),
                state,
                settings,
                pool,
                bar,
            )
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    manifest = _manifest(source, settings, state)
    write_json_atomic(out_dir / NAME, manifest)
    (out_dir / PROGRESS).unlink(missing_ok=True)
    return manifest


def _write_split(
    source, name, split, out_dir, shard_size, opts, state, settings, pool, bar
) -> None:
    entries = state[name]
    n, start = len(split), len(state[name])
    if start >= math.ceil(n / shard_size):
        return
    order = sample_order(n, settings["seed"], name)
    pending: dict[int, dict] = {}

    def on_shard(fname: str, nbytes: int, sha: str) -> None:
        k = int(fname.rsplit("-", 1)[1].split(".")[0])
        e = pending.pop(k)
        entries.append(
            {
                "name": fname,
                "count": e["count"],
                "bytes": nbytes,
                "sha256": sha,
                "size": _uniform(e["sizes"]),
                "formats": sorted(set(e["formats"])),
                "skipped": e["skipped"],
            }
        )
        write_json_atomic(
            out_dir / PROGRESS,
            {"settings": settings, "splits": {s: {"shards": v} for s, v in state.items()}},
        )

    writer = _SplitWriter(out_dir, SPLIT_PREFIX[name], start, on_shard)
    args = ((split.item(order[i]), source.mode, *opts) for i in range(start * shard_size, n))
    results = pool.imap(_encode_safe, args, chunksize=16) if pool else map(_encode_safe, args)
    current = start
    try:
        for i, (ok, ext, data, size) in zip(range(start * shard_size, n), results):
            k, j = i // shard_size, order[i]  # position i holds source sample j
            if k != current:  # boundaries by source index, so skips never shift later shards
                writer.writer.next_stream()
                current = k
            e = pending.setdefault(k, {"count": 0, "sizes": [], "formats": [], "skipped": []})
            if ok:
                writer.writer.write(
                    {"__key__": split.key(j), ext: data, "cls": str(split.label(j)).encode()}
                )
                e["count"] += 1
                e["sizes"].append(list(size))
                e["formats"].append(ext)
            else:
                e["skipped"].append(
                    {"key": split.key(j), "item": _describe(split.item(j)), "reason": ext}
                )
                tqdm.write(f"skipped {_describe(split.item(j))}: {ext}")
            bar.update(1)
        pending.setdefault(current, {"count": 0, "sizes": [], "formats": [], "skipped": []})
        writer.writer.close()
    except BaseException:
        writer.abort()  # an interrupted shard must never be renamed into place
        raise


def _describe(item) -> str:
    return item if isinstance(item, str) else f"array {item.shape}"


def _manifest(source: Source, settings: dict, state: dict[str, list[dict]]) -> dict:
    entries = [e for v in state.values() for e in v if e["count"]]
    formats = sorted({f for e in entries for f in e["formats"]})
    return {
        "format": FORMAT,
        "dataset": source.dataset,
        "source": source.spec,
        "classes": source.classes,
        "num_classes": len(source.classes),
        "image": {
            "mode": source.mode,
            "size": _uniform([e["size"] for e in entries]),
            "formats": formats,
        },
        "settings": settings,
        # the reader warns about shards without this (source order: poorly mixed batches)
        "order": "source" if settings["seed"] is None else "shuffled",
        "splits": {
            name: {"total": sum(e["count"] for e in v), "shards": v} for name, v in state.items()
        },
        "skipped": [s for v in state.values() for e in v for s in e["skipped"]],
    }
