"""Two real processes (torch.distributed, gloo on 127.0.0.1) evaluate WebDataset validation shards:
together they see every test sample exactly once, and the all-reduced top-1 is the exact value."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

from fitdist.data.shard_writer import write_shards
from fitdist.data.sources import open_source
from fitdist.data.synthetic import write_fashion_mnist

N_TEST = 50  # in shards of 7: eight shards of uneven size (7 × 7 + 1)

RANK_SCRIPT = textwrap.dedent('''
    import json, sys
    import torch
    import torch.distributed as dist
    from torch import nn
    from fitdist.config import DataConfig
    from fitdist.data import build_data
    from fitdist.evaluate import evaluate

    root, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    def index_of(x):  # pixels (0,0) and (0,1) hold the source index; float: normalised
        raw = x.long() if x.dtype == torch.uint8 else ((x * 0.3530 + 0.2860) * 255).round().long()
        return raw[:, 0, 0, 0] + 256 * raw[:, 0, 0, 1]

    class Oracle(nn.Module):
        """Right (label i mod 10) exactly when i mod 3 != 0."""
        def forward(self, x):
            i = index_of(x)
            pred = torch.where(i % 3 != 0, i % 10, (i + 1) % 10)
            return nn.functional.one_hot(pred, 10).float()

    bundle = build_data(DataConfig(source="webdataset", root=root, num_workers=2), 8, 5, 0, rank, world)
    seen = [int(i) for x, _ in bundle.val_batches() for i in index_of(x)]
    metrics = evaluate(Oracle(), bundle.val_batches(), torch.device("cpu"), to_device=bundle.to_device)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"seen": seen, "metrics": metrics, "num_val": bundle.num_val}, f)
    dist.destroy_process_group()
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_evaluate_every_sample_exactly_once(tmp_path):
    src = write_fashion_mnist(tmp_path / "src", 10, N_TEST)
    write_shards(open_source(f"fashion-mnist:{src}"), tmp_path / "shards", 7, progress=False)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(script),
        str(tmp_path / "shards"),
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, check=False)
    assert r.returncode == 0, r.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    seen = ranks[0]["seen"] + ranks[1]["seen"]
    assert len(seen) == N_TEST and sorted(seen) == list(range(N_TEST))  # no duplicates, no drops
    assert all(len(r["seen"]) >= 21 for r in ranks)  # both ranks did real work (balanced shards)
    exact = 100 * sum(1 for i in range(N_TEST) if i % 3 != 0) / N_TEST
    for r in ranks:  # every rank holds the same, exact, all-reduced figure
        assert r["metrics"]["val/n"] == N_TEST and r["num_val"] == N_TEST
        assert r["metrics"]["val/top1"] == exact
