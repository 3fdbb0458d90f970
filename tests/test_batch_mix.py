"""Training batches from shards written by `fitdist shard imagefolder:...` mix classes as i.i.d.
draws do, from the first batch of a stream (a stage start, a resume) and in steady state.

The set is ImageNet-like in the proportions that matter: an image folder listed class by class,
shards of two classes' worth of images (ImageNet: 1,281 per shard, ~1,300 per class), a shuffle
buffer of ~4 classes' worth (ImageNet: 5,000). Batches are read through the real bundle; shards in
source order, as written before the shuffle, are the contrast: far fewer classes per batch.
"""

from __future__ import annotations

import itertools
import statistics

import pytest

from fitdist.bench.batch_mix import iid_distinct
from fitdist.bench.make_imagefolder import make_imagefolder
from fitdist.config import DataConfig
from fitdist.data import build_data
from fitdist.data.shard_writer import write_shards
from fitdist.data.sources import open_source

CLASSES, PER_CLASS, SHARD, BUFFER, BATCH = 50, 20, 40, 80, 32
IID = iid_distinct([PER_CLASS] * CLASSES, BATCH)  # 24.1 distinct classes of 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mix")
    root = make_imagefolder(tmp / "if", CLASSES, PER_CLASS, 1, min_side=8, max_side=8)
    return tmp, root


def distinct(root, rank=0, world=1, start=0, batches=1, skip=0) -> list[int]:
    cfg = DataConfig(source="webdataset", root=str(root), augment="none", shuffle_buffer=BUFFER)
    b = build_data(cfg, BATCH, BATCH, 0, rank, world)
    got = itertools.islice(b.train_batches(start), skip, skip + batches)
    return [len(set(y.tolist())) for _, y in got]


def mix(root) -> dict[str, float]:
    streams = range(8)  # 8 ranks' streams: one first batch is a noisy figure, 8 are not
    return {
        "first": statistics.mean(distinct(root, r, 8)[0] for r in streams),
        "resumed": statistics.mean(distinct(root, r, 8, start=5000)[0] for r in streams),
        "steady": statistics.mean(distinct(root, batches=30, skip=10)),
    }


def test_batches_mix_classes_like_iid_draws_from_the_first_batch(folder):
    tmp, root = folder
    write_shards(open_source(f"imagefolder:{root}"), tmp / "shards", SHARD, progress=False)
    got = mix(tmp / "shards")
    for when, value in got.items():  # within 10% of the i.i.d. expectation
        assert abs(value - IID) <= 0.1 * IID, (when, value, IID)


def test_shards_in_source_order_mix_far_fewer_classes(folder):
    """The contrast: the same folder sharded in class order (as before the writer shuffled)."""
    tmp, root = folder
    write_shards(open_source(f"imagefolder:{root}"), tmp / "old", SHARD, progress=False, seed=None)
    got = mix(tmp / "old")
    assert max(got.values()) < 0.7 * IID, (got, IID)
