"""`fitdist bench data`: the WebDataset reader versus `torchvision.datasets.ImageFolder`, and how
well its batches mix classes.

Both read the same generated ImageNet-layout JPEGs (`fitdist.bench.make_imagefolder`), with the
same decode (Pillow, `fitdist.data.transforms.decode`), the same transforms (RandomResizedCrop +
flip; both send uint8, normalised on the device), the same batch size and worker count. Reported:
- throughput: images/s over `--batches` batches after the first, best of `--reps` interleaved runs;
- time to first batch: from building the dataset (ImageFolder scans its folders, the WebDataset
  reader reads a manifest) to holding the first batch;
- bytes per batch crossing from the workers (shared memory, then pinned memory and the device
  copy): uint8 as sent, against the float32 the workers sent before;
- batch mix (`fitdist.bench.batch_mix`): distinct classes per batch of 32 on a generated folder of
  `--mix-classes` classes sharded by the writer, in the first batch of fresh streams (a stage
  start, a resume) and in steady state, against the i.i.d. expectation; beside them the same set
  sharded in source order and read as the reader did before (one shard at a time, a buffer
  starting at 100 samples): today's figures for shards written before the shuffle;
- main-process memory as the dataset grows: Python heap held by the dataset/bundle object
  (tracemalloc). Larger datasets are made of hard links (folders) and of repeated shards under a
  manifest listing them (WebDataset): no extra disk, the index structures grow as with real data.

`--soft-labels` reports stored teacher soft labels instead (fitdist.bench.soft_labels): `fitdist
label`'s throughput and bytes per image, and the reader's throughput with and without the join.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
import tracemalloc
from pathlib import Path

import torch

from fitdist.bench import batch_mix
from fitdist.bench.make_imagefolder import make_imagefolder
from fitdist.config import DataConfig
from fitdist.data.manifest import write_json_atomic
from fitdist.data.shard_writer import write_shards
from fitdist.data.sources import open_source
from fitdist.data.transforms import build_transform, decode
from fitdist.data.wds import build_webdataset


def _jpeg_loader(path: str) -> torch.Tensor:
    with open(path, "rb") as f:
        return decode(f.read(), 3)


def imagefolder_loader(root: Path, batch: int, workers: int, size: int, seed: int = 0):
    """(dataset, endless batch iterator) of torchvision's ImageFolder with our decode/transforms."""
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(
        str(root),
        transform=build_transform("imagenet", True, size, None),
        loader=_jpeg_loader,
    )
    g = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            loader = DataLoader(
                ds,
                batch_size=batch,
                shuffle=True,
                num_workers=workers,
                drop_last=True,
                generator=g,
                prefetch_factor=2 if workers else None,
                pin_memory=torch.cuda.is_available(),
            )
            yield from loader

    return ds, batches()


def wds_loader(shards: Path, batch: int, workers: int, size: int, seed: int = 0):
    cfg = DataConfig(source="webdataset", root=str(shards), num_workers=workers, image_size=size)
    bundle = build_webdataset(cfg, batch, batch, seed)
    return bundle, bundle.train_batches(0)


def _run(make, batches: int) -> dict:
    """Time to first batch (including building the dataset), img/s over the next batches, and
    the bytes of one batch's images as they cross from the workers."""
    t0 = time.perf_counter()
    _, it = make()
    x, _ = next(it)
    ttfb = time.perf_counter() - t0
    nbytes = x.element_size() * x.nelement()
    t1, n = time.perf_counter(), 0
    for _ in range(batches):
        x, _ = next(it)
        n += len(x)
    rate = n / (time.perf_counter() - t1)
    it.close()  # shuts the DataLoader workers down before the next run
    return {"ttfb_s": ttfb, "img_per_s": rate, "batch_bytes": nbytes, "dtype": str(x.dtype)}


def mix_figures(out: Path, classes: int, per_class: int, shard: int, buffer: int) -> dict:
    """Batch mix of writer-shuffled shards (this reader) and of source-order shards (this reader,
    and the former one), on a folder of tiny JPEGs (the mix does not depend on image size)."""
    folder = make_imagefolder(out / f"mix-{classes}x{per_class}", classes, per_class, 1, 8, 8)
    source = open_source(f"imagefolder:{folder}")
    shuffled, ordered = (
        out / f"mix-{classes}x{per_class}-shards",
        out / f"mix-{classes}x{per_class}-source-order",
    )
    write_shards(source, shuffled, shard, progress=False)
    write_shards(source, ordered, shard, progress=False, seed=None)
    default = DataConfig()
    now = {"shuffle_buffer": buffer, "shard_mix": default.shard_mix}
    before = {"shuffle_buffer": buffer, "shard_mix": 1, "shuffle_start": 100}  # the former reader
    return {
        "iid": batch_mix.iid_distinct([per_class] * classes, 32),
        "shuffled shards, this reader": batch_mix.measure(shuffled, 32, **now),
        "source-order shards, this reader": batch_mix.measure(ordered, 32, **now),
        "source-order shards, former reader (today)": batch_mix.measure(ordered, 32, **before),
    }


def _index_bytes(make) -> int:
    """Python heap still held by the dataset object right after building it (no workers)."""
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    ds, it = make()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    size = sum(s.size_diff for s in after.compare_to(before, "filename"))
    del ds, it
    return size


def _scaled(base_images: Path, base_shards: Path, out: Path, factor: int) -> tuple[Path, Path]:
    """A folder and a shard directory `factor` times the base, made of hard links."""
    folder, shards = out / f"x{factor}-images", out / f"x{factor}-shards"
    if not folder.exists():
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for cls in sorted((base_images / "train").iterdir()):
            (tmp / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir()):
                for k in range(factor):
                    os.link(f, tmp / cls.name / f"{f.stem}_{k}{f.suffix}")
        tmp.rename(folder)
    if not shards.exists():
        tmp = shards.with_name(shards.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        m = json.loads((base_shards / "manifest.json").read_text())
        base = m["splits"]["train"]["shards"]
        entries = []
        for k in range(factor * len(base)):
            e = dict(base[k % len(base)], name=f"train-{k:06d}.tar")
            os.link(base_shards / base[k % len(base)]["name"], tmp / e["name"])
            entries.append(e)
        for e in m["splits"]["test"]["shards"]:
            os.link(base_shards / e["name"], tmp / e["name"])
        m["splits"]["train"] = {"total": sum(e["count"] for e in entries), "shards": entries}
        write_json_atomic(tmp / "manifest.json", m)
        tmp.rename(shards)
    return folder, shards


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {platform.system()} {platform.release()}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fitdist bench data", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="runs/bench-data", help="where images and shards are generated")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=300, help="training JPEGs per class")
    p.add_argument("--workers", type=int, default=2, help="loader workers (both loaders)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224, help="RandomResizedCrop size")
    p.add_argument("--batches", type=int, default=15, help="timed batches after the first")
    p.add_argument("--reps", type=int, default=2, help="interleaved runs per loader (best kept)")
    p.add_argument(
        "--scales",
        default="1,10,100,427",
        help="dataset size multiples for memory/TTFB (427 x 3,000 = ImageNet's 1.28 M)",
    )
    p.add_argument("--mix-classes", type=int, default=100, help="classes of the batch-mix set")
    p.add_argument("--mix-per-class", type=int, default=100, help="images per class (mix set)")
    p.add_argument(
        "--mix-shard-size",
        type=int,
        default=200,
        help="mix set shard size (default: 2 classes' worth, as ImageNet's 1,281)",
    )
    p.add_argument(
        "--mix-buffer",
        type=int,
        default=385,
        help="mix set shuffle buffer (default: ~3.85 classes' worth, as 5,000 for ImageNet)",
    )
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--soft-labels", action="store_true",
                   help="only the stored-soft-label figures: labelling, bytes/image, reader with/without the join")
    p.add_argument("--views", type=int, default=10, help="--soft-labels: views per image R (default 10)")
    p.add_argument("--topk", type=int, default=10, help="--soft-labels: probabilities per view k (default 10)")
    p.add_argument("--teacher", default="fitdist:fitnet", help="--soft-labels: the labelling teacher's model name")
    a = p.parse_args(argv)

    out = Path(a.dir)
    images = make_imagefolder(out / "images", a.classes, a.per_class, 2, seed=0)
    shards = out / "shards"
    write_shards(open_source(f"imagefolder:{images}"), shards, shard_size=250, progress=False)
    n = a.classes * a.per_class
    if a.soft_labels:
        from fitdist.bench.soft_labels import lines, soft_label_figures

        res = soft_label_figures(shards, out, a.classes, a.size, a.batch, a.batches, a.reps, a.views, a.topk,
                                 a.teacher)
        print("\n".join([f"Machine: {machine()}", f"{n} JPEGs ({a.classes} classes)", *lines(res, a.batch, a.size)]))
        if a.json:
            Path(a.json).write_text(json.dumps({"machine": machine(), "soft_labels": res}, indent=1))
        return 0

    def folder_at(root):
        return lambda: imagefolder_loader(root, a.batch, a.workers, a.size)

    def shards_at(root):
        return lambda: wds_loader(root, a.batch, a.workers, a.size)

    mix = mix_figures(out, a.mix_classes, a.mix_per_class, a.mix_shard_size, a.mix_buffer)

    runs = {"ImageFolder": [], "WebDataset": []}
    for _ in range(a.reps):  # interleaved, so drifting machine load hits both alike
        runs["ImageFolder"].append(_run(folder_at(images / "train"), a.batches))
        runs["WebDataset"].append(_run(shards_at(shards), a.batches))
    best = {
        k: {"img_per_s": max(r["img_per_s"] for r in v), "ttfb_s": min(r["ttfb_s"] for r in v)}
        for k, v in runs.items()
    }

    scaling = []
    for factor in (int(s) for s in a.scales.split(",")):
        folder, sh = (
            (images / "train", shards) if factor == 1 else _scaled(images, shards, out, factor)
        )
        row = {"images": n * factor}
        row["if_ttfb_s"] = _run(folder_at(folder), 0)["ttfb_s"]
        row["wds_ttfb_s"] = _run(shards_at(sh), 0)["ttfb_s"]
        row["if_index_mib"] = (
            _index_bytes(lambda f=folder: imagefolder_loader(f, a.batch, 0, a.size)) / 2**20
        )
        row["wds_index_mib"] = _index_bytes(lambda s=sh: wds_loader(s, a.batch, 0, a.size)) / 2**20
        scaling.append(row)

    ratio = best["WebDataset"]["img_per_s"] / best["ImageFolder"]["img_per_s"]
    sent = runs["WebDataset"][0]
    mib = sent["batch_bytes"] / 2**20
    lines = [
        f"Machine: {machine()}",
        (
            f"{n} JPEGs ({a.classes} classes), batch {a.batch}, {a.workers} workers, "
            f"RandomResizedCrop {a.size} + flip, best of {a.reps}"
        ),
        "",
        "| loader | img/s | time to first batch |",
        "|---|---:|---:|",
        *[f"| {k} | {v['img_per_s']:.0f} | {v['ttfb_s']:.2f} s |" for k, v in best.items()],
        (
            f"| WebDataset / ImageFolder | {ratio:.2f}× | "
            f"{best['WebDataset']['ttfb_s'] / best['ImageFolder']['ttfb_s']:.2f}× |"
        ),
        "",
        (
            "| images | ImageFolder first batch | WebDataset first batch | ratio "
            "| ImageFolder index (main process) | WebDataset index (main process) |"
        ),
        "|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {r['images']:,} | {r['if_ttfb_s']:.2f} s | {r['wds_ttfb_s']:.2f} s | "
            f"{r['wds_ttfb_s'] / r['if_ttfb_s']:.2f}× | {r['if_index_mib']:.2f} MiB | "
            f"{r['wds_index_mib']:.2f} MiB |"
            for r in scaling
        ],
        "",
        (
            f"Bytes per batch of {a.batch} from the workers: {mib:.1f} MiB ({sent['dtype']}); "
            f"float32, as sent before: {4 * mib:.1f} MiB"
        ),
        "",
        (
            f"Batch mix: {a.mix_classes} classes × {a.mix_per_class} images, shards of "
            f"{a.mix_shard_size}, shuffle buffer {a.mix_buffer}, batch 32; i.i.d.: "
            f"{mix['iid']:.1f} distinct classes"
        ),
        "",
        "| shards, reader | first batch | first 10 batches | steady state |",
        "|---|---:|---:|---:|",
        *[
            f"| {k} | {v['first']:.1f} | {v['first10']:.1f} | {v['steady']:.1f} |"
            for k, v in mix.items()
            if k != "iid"
        ],
    ]
    print("\n".join(lines))
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {"machine": machine(), "runs": runs, "best": best, "scaling": scaling, "mix": mix},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
