"""The WebDataset reader: bundle fields, uint8 batches normalised by `to_device`, exactly-once
validation across ranks and workers (its workers kept between evaluations), an endless
reproducible training stream, subsets, pipe:/http(s) URLs, CIFAR/ImageNet transforms, the warning
for shards in source order, and a short training run of the foundation's Fashion-MNIST config from
shards."""

from __future__ import annotations

import functools
import http.server
import itertools
import json
import logging
import multiprocessing
import threading

import pytest
import torch

from fitdist.config import DataConfig
from fitdist.data import build_data
from fitdist.data.shard_writer import sample_order, write_shards
from fitdist.data.sources import open_source
from fitdist.data.synthetic import image_index, write_cifar, write_fashion_mnist

MEAN, STD = 0.2860, 0.3530


def indices(images: torch.Tensor) -> list[int]:
    """Source indices of uint8 Fashion-MNIST-like images (see fitdist.data.synthetic)."""
    assert images.dtype == torch.uint8
    return [image_index(im[0].numpy()) for im in images]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """37 train samples in shards of 10, 7 (i mod 10 labels); 53 test samples in shards of 10."""
    tmp = tmp_path_factory.mktemp("wds")
    src = write_fashion_mnist(tmp / "src", 37, 53)
    write_shards(open_source(f"fashion-mnist:{src}"), tmp / "out", 10, progress=False)
    return tmp / "out"


def bundle(root, rank=0, world=1, micro=8, eval_batch=7, **kw):
    return build_data(
        DataConfig(source="webdataset", root=str(root), **kw), micro, eval_batch, 0, rank, world
    )


def test_bundle_fields_from_the_manifest(shards):
    b = bundle(shards)
    assert (b.num_classes, b.in_channels, b.image_size, b.num_val) == (10, 1, (28, 28), 53)
    assert b.class_names[0] == "T-shirt/top" and b.metrics() == {"data/skipped": 0}
    x, y = next(b.train_batches(0))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert [i % 10 for i in indices(x)] == y.tolist()  # labels travel with their images
    on_device = b.to_device(x, torch.device("cpu"))  # normalised with the dataset's statistics
    assert on_device.dtype == torch.float32
    assert torch.allclose(on_device, (x.float() / 255 - MEAN) / STD, atol=1e-6)


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (3, 0), (4, 2), (7, 1)])
def test_validation_sees_every_sample_exactly_once(shards, world, workers):
    seen, per_rank = [], []
    for rank in range(world):
        got = [
            i
            for x, _ in bundle(shards, rank, world, num_workers=workers).val_batches()
            for i in indices(x)
        ]
        seen += got
        per_rank.append(len(got))
    assert sorted(seen) == list(range(53))
    assert max(per_rank) - min(per_rank) <= 10 or world > 6  # balanced by manifest counts


def test_training_stream_is_endless_and_reproducible(shards):
    b = bundle(shards)
    first = list(itertools.islice(b.train_batches(0), 20))  # 160 samples from 37: never runs dry
    again = list(itertools.islice(b.train_batches(0), 20))
    assert all(torch.equal(a[1], c[1]) and torch.equal(a[0], c[0]) for a, c in zip(first, again))
    seen = [i for x, _ in first for i in indices(x)]
    assert set(seen) == set(range(37))
    other_rank = next(bundle(shards, rank=1, world=2).train_batches(0))[1]
    resumed = next(b.train_batches(5))[1]
    assert not torch.equal(other_rank, first[0][1]) and not torch.equal(resumed, first[0][1])


def test_training_with_worker_processes(shards):
    b = bundle(shards, num_workers=2)
    batches = [y for _, y in itertools.islice(b.train_batches(0), 30)]
    assert not torch.equal(batches[0], batches[1])  # the two workers draw different streams
    seen = [i for x, _ in itertools.islice(b.train_batches(0), 30) for i in indices(x)]
    assert len(seen) == 240 and set(seen) == set(range(37)) and b.metrics()["data/skipped"] == 0


def test_train_subset_reads_only_the_first_samples(shards):
    b = bundle(shards, train_subset=13)
    seen = {i for x, _ in itertools.islice(b.train_batches(0), 10) for i in indices(x)}
    # the first 13 in shard order: a random subset of the split, not its first 13 classes' worth
    assert seen == set(sample_order(37, 0, "train")[:13]) and b.metrics()["data/skipped"] == 0


def test_brace_patterns_pipe_commands_and_http_urls(shards):
    local = f"{shards}/test-{{000000..000005}}.tar"
    expected = sample_order(53, 0, "test")  # shard order: the writer's shuffle of the split
    for pattern in (local, f"pipe:cat {local}"):
        cfg = DataConfig(
            source="webdataset", train=f"{shards}/train-{{000000..000003}}.tar", val=pattern
        )
        b = build_data(cfg, 8, 16, 0)
        assert [i for x, _ in b.val_batches() for i in indices(x)] == expected and b.num_val == 53

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        cfg = DataConfig(
            source="webdataset",
            train=f"{url}/train-{{000000..000003}}.tar",
            val=f"{url}/test-{{000000..000005}}.tar",
        )
        b = build_data(cfg, 8, 16, 0)
        assert [i for x, _ in b.val_batches() for i in indices(x)] == expected
        assert len(next(b.train_batches(0))[1]) == 8
    finally:
        server.shutdown()


def test_cifar_and_imagenet_transforms(tmp_path):
    write_cifar(tmp_path / "c", "cifar10", 20, 10)
    write_shards(open_source(f"cifar10:{tmp_path / 'c'}"), tmp_path / "cs", 8, progress=False)
    b = bundle(tmp_path / "cs")
    x, _ = next(b.train_batches(0))
    assert b.image_size == (32, 32) and x.shape == (8, 3, 32, 32)
    # zero padding of the CIFAR crop shows as the normalised value of black
    black = torch.tensor([-0.4914 / 0.2470, -0.4822 / 0.2435, -0.4465 / 0.2616])
    x = b.to_device(x, torch.device("cpu"))
    assert (x.permute(0, 2, 3, 1) - black).abs().sum(-1).lt(1e-4).any()

    from fitdist.bench.make_imagefolder import make_imagefolder

    make_imagefolder(tmp_path / "if", classes=2, train=5, val=3, min_side=40, max_side=80)
    write_shards(open_source(f"imagefolder:{tmp_path / 'if'}"), tmp_path / "ifs", 4, progress=False)
    b = bundle(tmp_path / "ifs", micro=4, eval_batch=6, image_size=48)
    assert b.image_size == (48, 48) and next(b.train_batches(0))[0].shape == (4, 3, 48, 48)
    ((x, y),) = list(b.val_batches())
    assert x.shape == (6, 3, 48, 48) and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    assert bundle(tmp_path / "ifs").image_size == (224, 224)  # mixed sizes: the ImageNet default


def test_foundation_config_trains_from_shards(shards, tmp_path):
    from fitdist.config import load_config
    from fitdist.quickstart import config_path
    from fitdist.trainer import train

    cfg = load_config(
        config_path("fmnist-scratch"),
        [
            f"run.dir={tmp_path / 'run'}",
            "data.source=webdataset",
            f"data.root={shards}",
            "train.batch_size=8",
            "train.eval_batch_size=16",
            "train.log_every=1",
            "wandb.mode=disabled",
        ],
    )
    cfg.stages[0].steps = 3
    summary = train(cfg)
    assert summary["val/n"] == 53 and 0 <= summary["val/top1"] <= 100


def test_evaluation_keeps_its_workers_between_passes(shards):
    b = bundle(shards, num_workers=2)
    before = {p.pid for p in multiprocessing.active_children()}
    first = [i for x, _ in b.val_batches() for i in indices(x)]
    workers = {p.pid for p in multiprocessing.active_children()} - before
    second = [i for x, _ in b.val_batches() for i in indices(x)]
    assert len(workers) == 2  # alive after the first pass ...
    assert workers <= {p.pid for p in multiprocessing.active_children()}  # ... and still the same
    assert sorted(first) == sorted(second) == list(range(53))


def test_shards_in_source_order_read_with_one_warning(shards, tmp_path, caplog):
    src = write_fashion_mnist(tmp_path / "src", 20, 10)
    m = write_shards(open_source(f"fashion-mnist:{src}"), tmp_path / "old", 10, progress=False,
                     seed=None)
    assert m["order"] == "source"
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    del manifest["order"], manifest["settings"]["seed"]  # as written before the shuffle existed
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="fitdist.data"):
        for _ in range(2):
            b = bundle(tmp_path / "old")
            assert [i for x, _ in b.val_batches() for i in indices(x)] == list(range(10))
    warnings = [r.getMessage() for r in caplog.records if "source order" in r.getMessage()]
    assert len(warnings) == 1 and str(tmp_path / "old" / "manifest.json") in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fitdist.data"):
        bundle(shards)  # shuffled shards: no warning
    assert not [r for r in caplog.records if "source order" in r.getMessage()]


def test_bad_reader_settings_are_user_errors(shards):
    from fitdist.errors import UserError

    with pytest.raises(UserError, match="data.shard_mix: must be at least 1, got 0"):
        bundle(shards, shard_mix=0)
    with pytest.raises(UserError, match="data.read_timeout: must be at least 0, got -1"):
        bundle(shards, read_timeout=-1)
