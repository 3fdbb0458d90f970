"""`fitdist label` under torchrun (2 real processes, gloo on loopback): the ranks split the shards,
and the label set equals the one a single process writes."""

import json
import subprocess
import sys

import numpy as np
from soft_label_data import make_shards, make_teacher, write_cfg

from fitdist.bench.soft_labels import bytes_per_image
from fitdist.config import load_config
from fitdist.data.label_writer import label
from fitdist.data.soft_labels import label_file, load_label_file


def test_two_ranks_split_the_shards_and_write_what_one_process_writes(tmp_path):
    shards = make_shards(tmp_path)
    cfg_path = write_cfg(tmp_path / "kd.yaml", shards, make_teacher(tmp_path / "t.pt", seed=4), tmp_path / "two")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "fitdist.cli", "label", str(cfg_path), "--views", "2", "--topk", "4", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = sorted((json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")), key=lambda d: d["rank"])
    assert [d["rank"] for d in rows] == [0, 1]
    # 4 shards of 10, 10, 10, 7: rank 0 labels shards 0 and 2, rank 1 shards 1 and 3
    assert [(d["shards"], d["images"]) for d in rows] == [(2, 20), (2, 17)]
    assert all(d["complete"] for d in rows)

    one = label(load_config(cfg_path, [f"data.soft_labels={tmp_path / 'one'}"]), 2, 4, 256, progress=False)
    assert one["shards"] == 4 and one["images"] == 37
    assert (tmp_path / "two" / "manifest.json").read_text() == (tmp_path / "one" / "manifest.json").read_text()
    for i in range(4):
        name = label_file(f"train-{i:06d}.tar")
        a, b = load_label_file(str(tmp_path / "two" / name)), load_label_file(str(tmp_path / "one" / name))
        assert a.rows == b.rows and (a.views == b.views).all() and (a.idx == b.idx).all()
        np.testing.assert_allclose(a.prob.astype(np.float32), b.prob.astype(np.float32), rtol=2**-10)
        with np.load(tmp_path / "two" / name) as z:  # the storage formula the docs and the bench quote
            arrays, n, key = sum(z[f].nbytes for f in z.files), len(z["keys"]), z["keys"].dtype.itemsize
        assert arrays == n * bytes_per_image(2, 4, 10, key) and n in (10, 7)


def test_bench_data_soft_labels_smoke(tmp_path, capsys):
    from fitdist.bench import data as bench_data

    out = tmp_path / "bench.json"
    assert bench_data.main(["--soft-labels", "--dir", str(tmp_path), "--classes", "3", "--per-class", "4",
                            "--size", "32", "--batch", "4", "--batches", "1", "--reps", "2", "--views", "3",
                            "--topk", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["soft_labels"]
    assert (res["views"], res["topk"], res["rounds"]) == (3, 2, 2)
    key = len("n00000000/n00000000_train_000000")  # imagefolder keys: <class>/<file stem>
    assert res["key_bytes"] == key
    assert res["bytes_per_image_arrays"] == res["bytes_per_image_formula"] == 3 * (2 * 4 + 10) + key
    assert res["bytes_per_image"] > res["bytes_per_image_arrays"]  # plus the npz headers
    assert res["label_img_per_s"] > 0 and min(res["reader_img_per_s"].values()) > 0
    assert res["grid_bytes_per_image_1000_classes"]["R=10,k=10"] == 525
    assert "Soft labels (R=3, k=2" in capsys.readouterr().out
