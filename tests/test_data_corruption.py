"""Bad input to the WebDataset reader: each case is injected into real shards and must give a
skip that is counted (`data/skipped`) and logged once with shard and key, or a UserError naming
the path (exit status 2 in the CLI); never a crash, never a hang, nothing silently lost. A source
that stalls (a hung pipe: command, an http read that never returns) is a UserError naming the
shard after data.read_timeout."""

from __future__ import annotations

import functools
import http.server
import itertools
import json
import logging
import os
import shutil
import tarfile
import threading
import time

import pytest

from fitdist.config import DataConfig
from fitdist.data import build_data
from fitdist.data.shard_writer import write_shards
from fitdist.data.sources import open_source
from fitdist.data.synthetic import image_index, write_fashion_mnist
from fitdist.errors import UserError


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """40 train and 40 test samples in shards of 10 (keys test-000000 ... test-000039, shuffled
    across the shards: `keys` tells which shard holds which)."""
    tmp = tmp_path_factory.mktemp("clean")
    src = write_fashion_mnist(tmp / "src", 40, 40)
    write_shards(open_source(f"fashion-mnist:{src}"), tmp / "out", 10, progress=False)
    return tmp / "out"


@pytest.fixture
def shards(clean, tmp_path):
    shutil.copytree(clean, tmp_path / "s")
    return tmp_path / "s"


def bundle(root, **kw):
    return build_data(DataConfig(source="webdataset", root=str(root), **kw), 8, 6, 0)


def val_indices(b) -> list[int]:
    return [image_index(im[0].numpy()) for x, _ in b.val_batches() for im in x]


def keys(path) -> list[str]:
    """The sample keys of a shard in file order (`test-000013`: source index 13)."""
    with tarfile.open(path) as tar:
        return list(dict.fromkeys(m.name.split(".")[0] for m in tar.getmembers()))


def index(key: str) -> int:
    return int(key.rsplit("-", 1)[1])


def member(path, name) -> tarfile.TarInfo:
    with tarfile.open(path) as tar:
        return tar.getmember(name)


def overwrite(path, offset, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_corrupt_image_is_skipped_counted_and_logged_once(shards, caplog):
    key = keys(shards / "test-000001.tar")[3]
    m = member(shards / "test-000001.tar", f"{key}.png")
    overwrite(shards / "test-000001.tar", m.offset_data, b"\x00garbage" * (m.size // 8))
    b = bundle(shards, num_workers=2)
    with caplog.at_level(logging.WARNING, logger="fitdist.data"):
        assert sorted(val_indices(b)) == [i for i in range(40) if i != index(key)]
        assert sorted(val_indices(b)) == [i for i in range(40) if i != index(key)]
    assert b.metrics() == {"data/skipped": 2}  # counted on every pass ...
    lines = [r.getMessage() for r in caplog.records if key in r.getMessage()]
    assert len(lines) == 1 and "test-000001.tar" in lines[0]  # ... logged once, shard and key


def test_sample_without_label_is_skipped(shards, caplog):
    path = shards / "test-000002.tar"
    key = keys(path)[5]
    with tarfile.open(path) as tar:
        kept = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.name != f"{key}.cls"]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in kept:
            tar.addfile(m, __import__("io").BytesIO(data))
    b = bundle(shards)
    with caplog.at_level(logging.WARNING, logger="fitdist.data"):
        assert sorted(val_indices(b)) == [i for i in range(40) if i != index(key)]
    assert b.metrics()["data/skipped"] == 1
    assert any(key in r.getMessage() and "no label" in r.getMessage() for r in caplog.records)


def test_garbage_tar_member_header_is_stepped_over(shards, caplog):
    path = shards / "test-000003.tar"
    key = keys(path)[1]
    m = member(path, f"{key}.png")
    header = m.offset_data - 512  # the member's own header block
    overwrite(path, header, bytes((7 + 3 * i) % 256 for i in range(512)))  # fails its checksum
    b = bundle(shards)
    with caplog.at_level(logging.WARNING, logger="fitdist.data"):
        # the 8 samples after it in the shard are still read
        assert sorted(val_indices(b)) == [i for i in range(40) if i != index(key)]
    assert b.metrics()["data/skipped"] == 1
    assert any(key in r.getMessage() for r in caplog.records)


def test_truncated_shard_counts_every_missing_sample(shards, caplog):
    path = shards / "test-000003.tar"
    in_shard = keys(path)
    m = member(path, f"{in_shard[4]}.png")
    with open(path, "r+b") as f:
        f.truncate(m.offset_data + m.size // 2)  # cut inside the image of the fifth sample
    with caplog.at_level(logging.WARNING, logger="fitdist.data"):
        b = bundle(shards)
        got = sorted(val_indices(b))
    lost = {index(k) for k in in_shard[4:]}
    assert got == [i for i in range(40) if i not in lost]
    assert b.metrics()["data/skipped"] == 6  # the cut one and the 5 after: 40 = 34 read + 6 skipped
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "test-000003.tar" in text and "truncated" in text and in_shard[4] in text


def test_bad_training_samples_are_counted_through_worker_processes(shards):
    m = member(shards / "train-000002.tar", f"{keys(shards / 'train-000002.tar')[1]}.png")
    overwrite(shards / "train-000002.tar", m.offset_data, b"\xff" * m.size)
    b = bundle(shards, num_workers=2, shuffle_buffer=1)
    labels = [y for _, y in itertools.islice(b.train_batches(0), 25)]  # 200 samples: > 2 passes
    assert sum(len(y) for y in labels) == 200
    assert b.metrics()["data/skipped"] >= 2  # each worker passed the bad sample at least once


def test_training_on_only_unreadable_shards_fails_instead_of_hanging(shards):
    for p in shards.glob("train-*.tar"):
        p.write_bytes(b"\x5a" * p.stat().st_size)  # no valid tar header anywhere
    b = bundle(shards, num_workers=1)
    with pytest.raises(UserError, match="no readable sample"):
        next(b.train_batches(0))
    assert b.metrics()["data/skipped"] == 40


def test_pattern_matching_no_file_names_it(shards):
    cfg = DataConfig(
        source="webdataset",
        train=f"{shards}/train-{{000100..000103}}.tar",
        val=f"{shards}/test-000000.tar",
    )
    with pytest.raises(UserError, match=r"data.train: no file matches .*train-\{000100..000103\}"):
        build_data(cfg, 8, 8, 0)
    cfg.train = f"{shards}/train-{{000000..000003}}.tar"
    cfg.val = f"{shards}/test-000000.tar::{shards}/test-000000.tar"
    with pytest.raises(UserError, match="test-000000.tar is listed twice"):
        build_data(cfg, 8, 8, 0)
    cfg.val = f"{shards}/test-000000.tar"
    cfg.train = f"{shards}/train-{{000000..000004}}.tar"  # one past the end
    with pytest.raises(UserError, match="train-000004.tar does not exist"):
        build_data(cfg, 8, 8, 0)


def test_empty_shard_list(shards, tmp_path):
    with pytest.raises(UserError, match="data.val: empty shard list"):
        build_data(
            DataConfig(source="webdataset", train=f"{shards}/train-000000.tar", val=" "), 8, 8, 0
        )
    with pytest.raises(UserError, match="data.train: empty shard list"):
        build_data(DataConfig(source="webdataset"), 8, 8, 0)
    m = json.loads((shards / "manifest.json").read_text())
    m["splits"]["test"] = {"total": 0, "shards": []}
    (shards / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match=f"{shards}/manifest.json: no test shards"):
        bundle(shards)


def test_missing_manifest_names_the_path(shards):
    (shards / "manifest.json").unlink()
    with pytest.raises(UserError, match=f"no manifest.json at {shards}/manifest.json"):
        bundle(shards)


def test_shard_the_manifest_does_not_list(shards):
    shutil.copy(shards / "train-000000.tar", shards / "train-000004.tar")
    cfg = DataConfig(
        source="webdataset",
        train=f"{shards}/train-{{000000..000004}}.tar",
        val=f"{shards}/test-000000.tar",
    )
    with pytest.raises(
        UserError, match=f"{shards}/manifest.json disagrees .* does not list .*train-000004.tar"
    ):
        build_data(cfg, 8, 8, 0)


def test_manifest_with_fewer_samples_than_a_shard(shards):
    m = json.loads((shards / "manifest.json").read_text())
    m["splits"]["test"]["shards"][1]["count"] = 7
    m["splits"]["test"]["total"] = 37
    (shards / "manifest.json").write_text(json.dumps(m))
    b = bundle(shards, num_workers=1)
    assert b.num_val == 37
    with pytest.raises(
        UserError, match=r"disagrees with shard .*test-000001.tar: .* more than the 7"
    ):
        list(b.val_batches())


def test_manifest_whose_counts_do_not_add_up(shards):
    m = json.loads((shards / "manifest.json").read_text())
    m["splits"]["train"]["total"] = 41
    (shards / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(
        UserError, match=f"{shards}/manifest.json: .*total 41 but its shards add up to 40"
    ):
        bundle(shards)


STALL = """case "$1" in
  *.tar) head -c 3000 "$1"; echo $$ >> "$0.pids"; exec sleep 60 ;;
  *) cat "$1" ;;
esac
"""


def gone(pid: int) -> bool:
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as f:  # a zombie is gone too: it only awaits its parent
            if f.read().split(")")[-1].split()[0] == "Z":
                return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("split", ["val", "train"])
@pytest.mark.parametrize("workers", [0, 1])
def test_a_stalled_pipe_ends_the_run_naming_the_shard(shards, tmp_path, split, workers):
    """A pipe: command that sends part of a shard and then nothing: a UserError naming the
    shard after data.read_timeout, not a hang (the manifest, through the same command, reads)."""
    script = tmp_path / "stall.sh"
    script.write_text(STALL)
    stalled = f"pipe:sh {script} {shards}/{'test' if split == 'val' else 'train'}-000001.tar"
    local = {"val": f"{shards}/test-000000.tar", "train": f"{shards}/train-000000.tar"}
    cfg = DataConfig(source="webdataset", num_workers=workers, read_timeout=1.0,
                     **{**local, split: stalled})
    b = build_data(cfg, 8, 6, 0)
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"no data from pipe:.*-000001\.tar for 1 s"):
        if split == "val":
            list(b.val_batches())
        else:
            next(b.train_batches(0))
    assert time.monotonic() - t0 < 20  # the timeout, not the command's 60 s
    pids = [int(p) for p in (tmp_path / "stall.sh.pids").read_text().split()]
    assert pids and all(gone(p) for p in pids)  # the command's own children killed too


def test_a_stalled_http_read_ends_the_run_naming_the_shard(shards):
    class Stalling(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if not self.path.endswith(".tar"):
                return super().do_GET()
            data = (shards / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:3000])
            self.wfile.flush()
            time.sleep(30)  # the connection stays open, sending nothing

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Stalling, directory=str(shards))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        cfg = DataConfig(source="webdataset", train=f"{url}/train-000000.tar",
                         val=f"{url}/test-{{000000..000001}}.tar", read_timeout=1.0)
        b = build_data(cfg, 8, 6, 0)
        t0 = time.monotonic()
        with pytest.raises(UserError, match=r"no data from http://.*/test-000000\.tar for 1 s"):
            list(b.val_batches())
        assert time.monotonic() - t0 < 20
    finally:
        server.shutdown()
