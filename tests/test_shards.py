"""`fitdist shard`: round trips identical to the source, samples shuffled across each split with a
recorded seed (keys naming their source), byte-identical reruns, atomic shards and resume, CIFAR
and ImageFolder writers on small inputs in the real formats, CLI errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fitdist.bench.make_imagefolder import make_imagefolder
from fitdist.data import fashion_mnist as fm
from fitdist.data import shard_writer
from fitdist.data.shard_cli import main as shard_main
from fitdist.data.shard_writer import sample_order, write_shards
from fitdist.data.sources import open_source
from fitdist.data.synthetic import write_cifar, write_fashion_mnist
from fitdist.errors import UserError


def read_tar(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) in file order, read with plain tarfile (independent of fitdist)."""
    out: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            if not out or out[-1][0] != key:
                out.append((key, {}))
            out[-1][1][ext] = tar.extractfile(m).read()
    return out


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def read_split(out: Path, prefix: str) -> list[tuple[str, dict[str, bytes]]]:
    return [s for p in sorted(out.glob(f"{prefix}-*.tar")) for s in read_tar(p)]


@pytest.mark.skipif(not fm._complete(fm.SYSTEM_DIR), reason="real Fashion-MNIST not installed")
def test_fashion_mnist_round_trip_is_identical_to_the_source(tmp_path):
    m = write_shards(open_source("fashion-mnist"), tmp_path, shard_size=25_000, progress=False)
    src = fm.load_fashion_mnist(str(fm.SYSTEM_DIR), download=False)
    for split, prefix in (("train", "train"), ("test", "test")):
        images, labels = src[split]
        samples = read_split(tmp_path, prefix)
        order = sample_order(len(labels), 0, split)  # source index at each shard position
        assert m["splits"][split]["total"] == len(samples) == len(labels)
        assert [k for k, _ in samples] == [f"{split}-{i:06d}" for i in order]
        got = np.stack([decode(f["png"]) for _, f in samples])
        assert np.array_equal(got, images[order, 0].numpy())
        assert [int(f["cls"]) for _, f in samples] == labels[order].tolist()
    assert [s["count"] for s in m["splits"]["train"]["shards"]] == [25_000, 25_000, 10_000]
    assert m["classes"] == fm.CLASSES and m["image"] == {
        "mode": "L",
        "size": [28, 28],
        "formats": ["png"],
    }


def test_same_input_gives_byte_identical_shards(tmp_path):
    src_dir = write_fashion_mnist(tmp_path / "src", 70, 30)
    a = write_shards(open_source(f"fashion-mnist:{src_dir}"), tmp_path / "a", 32, progress=False)
    b = write_shards(open_source(f"fashion-mnist:{src_dir}"), tmp_path / "b", 32, progress=False)
    names = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert names == ["test-000000.tar", "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes()
    assert (
        a["splits"] == b["splits"]
        and a["settings"]["source_sha256"] == b["settings"]["source_sha256"]
    )
    entry = a["splits"]["train"]["shards"][2]
    assert entry["count"] == 6 and entry["bytes"] == (tmp_path / "a" / entry["name"]).stat().st_size


def test_interrupted_write_leaves_no_half_shard_and_resumes(tmp_path, monkeypatch):
    src_dir = write_fashion_mnist(tmp_path / "src", 100, 20)
    clean = tmp_path / "clean"
    write_shards(open_source(f"fashion-mnist:{src_dir}"), clean, 30, progress=False)

    calls = {"n": 0}
    real = shard_writer._encode_safe

    def dying(args):  # the 75th training image: in the middle of the third shard
        calls["n"] += 1
        if calls["n"] == 75:
            raise KeyboardInterrupt
        return real(args)

    out = tmp_path / "out"
    monkeypatch.setattr(shard_writer, "_encode_safe", dying)
    with pytest.raises(KeyboardInterrupt):
        write_shards(open_source(f"fashion-mnist:{src_dir}"), out, 30, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        ".progress.json",
        "train-000000.tar",
        "train-000001.tar",
    ]
    assert not (out / "manifest.json").exists()

    calls["n"] = 0
    monkeypatch.setattr(
        shard_writer,
        "_encode_safe",
        lambda args: (calls.__setitem__("n", calls["n"] + 1), real(args))[1],
    )
    m = write_shards(open_source(f"fashion-mnist:{src_dir}"), out, 30, progress=False)
    assert calls["n"] == 100 - 60 + 20  # resumed at the first unfinished shard
    for p in clean.glob("*.tar"):
        assert (out / p.name).read_bytes() == p.read_bytes()
    assert not (out / ".progress.json").exists() and m["splits"]["train"]["total"] == 100

    calls["n"] = 0  # a finished directory is left alone
    write_shards(open_source(f"fashion-mnist:{src_dir}"), out, 30, progress=False)
    assert calls["n"] == 0


def test_rewriting_with_other_settings_is_refused(tmp_path):
    src_dir = write_fashion_mnist(tmp_path / "src", 20, 10)
    write_shards(open_source(f"fashion-mnist:{src_dir}"), tmp_path / "out", 10, progress=False)
    with pytest.raises(UserError, match="other input or settings"):
        write_shards(open_source(f"fashion-mnist:{src_dir}"), tmp_path / "out", 7, progress=False)


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_writer_keeps_every_pixel_and_label(tmp_path, kind):
    write_cifar(tmp_path / "src", kind, 23, 9)
    m = write_shards(
        open_source(f"{kind}:{tmp_path / 'src'}"), tmp_path / "out", 10, progress=False
    )
    ncls = 10 if kind == "cifar10" else 100
    assert (
        m["num_classes"] == ncls and m["classes"][3] == "class3" and m["image"]["size"] == [32, 32]
    )
    from fitdist.data.synthetic import indexed_images

    for split, n, seed in (("train", 23, 1), ("test", 9, 2)):
        samples = read_split(tmp_path / "out", split)
        order = sample_order(n, 0, split)
        expected = indexed_images(n, (32, 32, 3), seed)[order]
        assert len(samples) == n == m["splits"][split]["total"]
        assert [k for k, _ in samples] == [f"{split}-{i:06d}" for i in order]
        assert np.array_equal(np.stack([decode(f["png"]) for _, f in samples]), expected)
        assert [int(f["cls"]) for _, f in samples] == [i % ncls for i in order]


def test_cifar_missing_batch_is_a_user_error(tmp_path):
    write_cifar(tmp_path, "cifar10", 10, 5)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(UserError, match="data_batch_3"):
        open_source(f"cifar10:{tmp_path}")


def test_imagefolder_writer_copies_jpegs_and_caps_the_shorter_side(tmp_path):
    root = make_imagefolder(tmp_path / "in", classes=3, train=4, val=2, min_side=40, max_side=90)
    Image.new("L", (70, 50), 128).save(root / "train" / "n00000001" / "grey.png")  # mode converted
    (root / "train" / "n00000002" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "train" / "n00000002" / "notes.txt").write_text("ignored: not an image")
    m = write_shards(open_source(f"imagefolder:{root}"), tmp_path / "plain", 5, progress=False)
    assert m["classes"] == ["n00000000", "n00000001", "n00000002"]
    assert (
        m["splits"]["train"]["total"] == 13 and m["splits"]["test"]["total"] == 6
    )  # 14 listed, 1 broken
    assert [s["key"] for s in m["skipped"]] == ["n00000002/broken"]
    samples = dict(read_split(tmp_path / "plain", "train"))
    original = root / "train" / "n00000000" / "n00000000_train_000000.JPEG"
    assert (
        samples["n00000000/n00000000_train_000000"]["jpg"] == original.read_bytes()
    )  # no re-encode
    grey = decode(samples["n00000001/grey"]["png"])
    assert grey.shape == (50, 70, 3) and (grey == 128).all()
    assert int(samples["n00000002/n00000002_train_000003"]["cls"]) == 2

    m = write_shards(
        open_source(f"imagefolder:{root}"), tmp_path / "capped", 5, max_side=32, progress=False
    )
    for _, fields in read_split(tmp_path / "capped", "train") + read_split(
        tmp_path / "capped", "test"
    ):
        ((ext, data),) = [(k, v) for k, v in fields.items() if k != "cls"]
        assert ext == "jpg" and min(Image.open(io.BytesIO(data)).size) == 32
    assert m["settings"]["max_side"] == 32


def test_imagefolder_without_val_is_a_user_error(tmp_path):
    make_imagefolder(tmp_path, classes=1, train=1, val=0, min_side=8, max_side=8)
    (tmp_path / "val").rename(tmp_path / "validation")
    with pytest.raises(UserError, match="val"):
        open_source(f"imagefolder:{tmp_path}")


def test_cli_main_and_exit_status_2(tmp_path, capsys):
    src_dir = write_fashion_mnist(tmp_path / "src", 12, 4)
    assert (
        shard_main(
            [
                f"fashion-mnist:{src_dir}",
                str(tmp_path / "out"),
                "--shard-size",
                "5",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "train: 12 samples in 3 shards" in capsys.readouterr().out
    assert (
        json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"]["test"]["total"] == 4
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fitdist.data.shard_cli",
            f"cifar10:{tmp_path}/nowhere",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        check=False,
        text=True,
    )
    assert r.returncode == 2 and "nowhere" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(UserError, match="unknown source"):
        shard_main(["mnist", str(tmp_path / "o")])


def test_written_shards_decode_like_the_source_through_the_reader(tmp_path):
    """The reader's decode of a shard equals the source pixels, in shard order."""
    from fitdist.config import DataConfig
    from fitdist.data import build_data

    src_dir = write_fashion_mnist(tmp_path / "src", 10, 25)
    write_shards(open_source(f"fashion-mnist:{src_dir}"), tmp_path / "out", 10, progress=False)
    bundle = build_data(DataConfig(source="webdataset", root=str(tmp_path / "out")), 4, 8, 0)
    images = torch.cat([x for x, _ in bundle.val_batches()])
    raw = fm.load_fashion_mnist(str(src_dir), download=False)["test"][0]
    assert torch.equal(images, raw[sample_order(25, 0, "test")])  # uint8: bit for bit


def test_samples_are_shuffled_across_the_split_and_keys_name_their_source(tmp_path):
    """Class-ordered input (as ImageFolder lists it) gives shards that each mix many classes; the
    seed is recorded and changes the order; each key leads back to its source file."""
    root = make_imagefolder(tmp_path / "in", classes=6, train=8, val=2, min_side=8, max_side=12)
    m = write_shards(open_source(f"imagefolder:{root}"), tmp_path / "a", 8, progress=False)
    assert m["order"] == "shuffled" and m["settings"]["seed"] == 0
    shards = sorted((tmp_path / "a").glob("train-*.tar"))
    classes = [{int(f["cls"]) for _, f in read_tar(p)} for p in shards]
    assert len(shards) == 6 and min(len(c) for c in classes) >= 3  # source order: 1 class each
    samples = read_split(tmp_path / "a", "train")
    for key, fields in samples:  # the key is the file's path under train/, without extension
        (path,) = (root / "train").glob(f"{key}.*")
        assert fields["jpg"] == path.read_bytes() and int(fields["cls"]) == int(key[1:9])
    assert sorted(k for k, _ in samples) == sorted(
        f"{p.parent.name}/{p.stem}" for p in (root / "train").glob("*/*.JPEG")
    )

    assert shard_main([f"imagefolder:{root}", str(tmp_path / "b"), "--shard-size", "8",
                       "--seed", "7", "--no-progress"]) == 0
    other = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert other["settings"]["seed"] == 7
    assert [k for k, _ in read_split(tmp_path / "b", "train")] != [k for k, _ in samples]
    assert sorted(k for k, _ in read_split(tmp_path / "b", "train")) == sorted(k for k, _ in samples)
    with pytest.raises(UserError, match="other input or settings"):  # a seed is a setting
        write_shards(open_source(f"imagefolder:{root}"), tmp_path / "a", 8, progress=False, seed=7)
