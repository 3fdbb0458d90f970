"""How well training batches mix classes: distinct classes per batch, against i.i.d. draws.

A batch drawn i.i.d. (without replacement) from a set with class sizes `n_c` out of `N` holds on
average `Σ_c 1 − C(N − n_c, B) / C(N, B)` distinct classes. A reader fed shards in class order
holds far fewer at every stream start (a stage start, a resume) and, with a bounded shuffle
buffer, in steady state too. The labels are read with the real reader code (`ShardStream.samples`:
interleaved shards, shuffle buffer), without decoding the images: the order is the one the
worker batches in.
"""

from __future__ import annotations

import itertools
import math
import os
import statistics
from pathlib import Path

from fitdist.data.manifest import read_manifest
from fitdist.data.stream import ShardStream, StreamSpec


def iid_distinct(class_counts: list[int], batch: int) -> float:
    """Expected distinct classes in `batch` draws without replacement."""
    n = sum(class_counts)
    log_all = math.lgamma(n + 1) - math.lgamma(batch + 1) - math.lgamma(n - batch + 1)

    def log_choose(k: int) -> float:  # log C(k, batch), -inf when k < batch
        if k < batch:
            return -math.inf
        return math.lgamma(k + 1) - math.lgamma(batch + 1) - math.lgamma(k - batch + 1)

    return sum(1 - math.exp(log_choose(n - c) - log_all) for c in class_counts if c)


def label_batches(
    shards: str | Path,
    batch: int,
    shuffle_buffer: int,
    shard_mix: int,
    shuffle_start: int | None = None,
    seed: tuple = (0, 0, 0),
):
    """Endless label batches of one worker's training stream over the shards in `shards`."""
    m = read_manifest(os.path.join(shards, "manifest.json"))
    listed = m["splits"]["train"]["shards"]
    urls = [os.path.join(shards, s["name"]) for s in listed]
    spec = StreamSpec(
        urls=urls,
        batch=batch,
        channels=3,
        num_classes=m["num_classes"],
        transform=lambda x: x,
        train=True,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        shard_mix=shard_mix,
        shuffle_start=shuffle_start,
        expected={u: s["count"] for u, s in zip(urls, listed)},
    )
    labels = (int(s["cls"]) for s in ShardStream(spec).samples())
    while True:
        yield list(itertools.islice(labels, batch))


def measure(
    shards: str | Path,
    batch: int,
    shuffle_buffer: int,
    shard_mix: int,
    shuffle_start: int | None = None,
    streams: int = 16,
    steady: tuple[int, int] = (100, 200),
) -> dict[str, float]:
    """Mean distinct classes per batch: in the first batch of `streams` fresh streams (as at a
    stage start or a resume: the seed differs, nothing else), over their first 10 batches, and
    over batches `steady` of one stream."""
    kw = {"shuffle_buffer": shuffle_buffer, "shard_mix": shard_mix, "shuffle_start": shuffle_start}
    firsts, first10 = [], []
    for k in range(streams):
        got = list(itertools.islice(label_batches(shards, batch, seed=(0, k, 0), **kw), 10))
        firsts.append(len(set(got[0])))
        first10 += [len(set(b)) for b in got]
    later = itertools.islice(label_batches(shards, batch, **kw), *steady)
    return {
        "first": statistics.mean(firsts),
        "first10": statistics.mean(first10),
        "steady": statistics.mean(len(set(b)) for b in later),
    }
