"""Generate an ImageNet-layout folder of real-size JPEGs (`OUT/{train,val}/<class>/<name>.JPEG`).

The images are smooth random fields plus texture and noise, sized like ImageNet photos (sides of a
few hundred pixels, varying aspect), so JPEG sizes and decode costs are realistic. Deterministic in
`--seed`. Used by `fitdist bench data` and to try `fitdist shard imagefolder:DIR` without ImageNet.

    python -m fitdist.bench.make_imagefolder OUT --classes 10 --train 300 --val 50
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def _image(rng: np.random.Generator, min_side: int, max_side: int) -> Image.Image:
    w, h = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
    coarse = rng.random((max(2, h // 32), max(2, w // 32), 3)) * 255  # large blobs of colour
    base = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BICUBIC), float)
    yy, xx = np.mgrid[0:h, 0:w]
    f = rng.uniform(0.02, 0.2, 2)
    texture = 30 * np.sin(xx * f[0] + yy * f[1])[..., None]  # edges and stripes
    noise = rng.normal(0, 12, (h, w, 3))  # sensor-like grain: keeps the JPEGs photo-sized
    return Image.fromarray(np.clip(base + texture + noise, 0, 255).astype(np.uint8))


def make_imagefolder(
    out: str | Path,
    classes: int = 10,
    train: int = 300,
    val: int = 50,
    min_side: int = 300,
    max_side: int = 500,
    quality: int = 90,
    seed: int = 0,
) -> Path:
    """Write `classes` class folders with `train` / `val` JPEGs each; returns `out`."""
    out = Path(out)
    for s, (split, per_class) in enumerate((("train", train), ("val", val))):
        for c in range(classes):
            folder = out / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                path = folder / f"n{c:08d}_{split}_{i:06d}.JPEG"
                if path.exists():  # re-running completes a partial folder
                    continue
                rng = np.random.default_rng([seed, s, c, i])  # per image: order-independent
                _image(rng, min_side, max_side).save(path, format="JPEG", quality=quality)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fitdist.bench.make_imagefolder", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("out")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train", type=int, default=300, help="training images per class")
    p.add_argument("--val", type=int, default=50, help="validation images per class")
    p.add_argument("--min-side", type=int, default=300)
    p.add_argument("--max-side", type=int, default=500)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    make_imagefolder(a.out, a.classes, a.train, a.val, a.min_side, a.max_side, a.quality, a.seed)
    print(f"wrote {a.classes * (a.train + a.val)} JPEGs under {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
