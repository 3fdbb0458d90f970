"""train.diagnostics: per-layer activation RMS and dead-unit fraction, against values computed by hand."""

import json

import pytest
import torch
from conftest import run_cli, write_config

from fitdist.diagnostics import Diagnostics, watched_layers
from fitdist.errors import UserError
from fitdist.features import FeatureTap
from fitdist.zoo import ZOO

WIDTHS = [6, 8, 8, 10, 10, 12, 12, 12, 16]


def by_hand(out: torch.Tensor) -> tuple[float, float]:
    """RMS over every element; the fraction of channels with no positive output anywhere (loops)."""
    out = out.detach()
    rms = float((out.double() ** 2).sum() / out.numel()) ** 0.5
    channels = out.transpose(0, 1).reshape(out.shape[1], -1)
    dead = sum(1 for c in channels if all(v <= 0 for v in c.tolist())) / out.shape[1]
    return rms, dead


def test_armed_forward_matches_hand_computed_rms_and_dead_fraction(seed):
    model = ZOO["fitnet"](num_classes=10, in_channels=3, widths=WIDTHS, pool_after=[3, 6], batch_norm=False)
    model.train()
    killed = {}
    with torch.no_grad():  # a random set of channels per layer that ReLU zeroes everywhere: dead for sure
        for i in (6, 7, 8):
            conv = model.get_submodule(f"conv{i}.0")
            idx = torch.randperm(WIDTHS[i - 1])[: int(torch.randint(1, WIDTHS[i - 1], ()))]
            conv.bias[idx] = -1e4
            killed[f"conv{i}"] = len(idx) / WIDTHS[i - 1]
    paths = watched_layers(model, True, "conv6")
    assert paths == ["conv6", "conv7", "conv8", "conv9"]
    diag = Diagnostics(model, paths)
    x = torch.randn(5, 3, 16, 16)
    model(x)
    assert diag.take() == {}  # not armed: nothing measured
    diag.arm()
    model(x)
    model(torch.randn(5, 3, 16, 16))  # a second forward of the same step (grad_accum) is not measured
    stats = diag.take()
    assert all(v.dim() == 0 for v in stats.values())
    h = x
    for i, child in enumerate(model.children(), start=1):
        h = child(h)
        if f"conv{i}" in paths:
            rms, dead = by_hand(h)
            assert stats[f"diag/conv{i}/rms"].item() == pytest.approx(rms, rel=1e-5)
            assert stats[f"diag/conv{i}/dead"].item() == pytest.approx(dead, abs=1e-7)
            if f"conv{i}" in killed:
                assert dead >= killed[f"conv{i}"] > 0
        if i == len(WIDTHS):
            break
    assert set(stats) == {f"diag/{p}/{k}" for p in paths for k in ("rms", "dead")}
    model(x)
    assert diag.take() == {}  # take disarms


def test_the_guided_layer_is_measured_when_a_hint_tap_cuts_the_forward_there(seed):
    model = ZOO["fitnet"](widths=WIDTHS, pool_after=[3, 6])
    tap = FeatureTap(model, ["conv6"], where="student hint")  # registered first, as in a run
    diag = Diagnostics(model, watched_layers(model, True, "conv6"))
    diag.arm()
    logits, (feat,) = tap(torch.randn(4, 3, 16, 16), stop_early=True)
    assert logits is None
    stats = diag.take()
    assert set(stats) == {"diag/conv6/rms", "diag/conv6/dead"}  # layers above never ran: absent
    assert stats["diag/conv6/rms"].item() == pytest.approx(by_hand(feat)[0], rel=1e-5)


def test_which_layers_are_watched():
    model = ZOO["fitnet"](widths=WIDTHS, pool_after=[3, 6], hidden=20)
    assert watched_layers(model, False, "conv6") == []
    assert watched_layers(model, True, "conv8") == ["conv8", "conv9"]  # fewer than 3 above: all of them
    assert watched_layers(model, True, None) == [f"conv{i}" for i in range(1, 10)]
    assert watched_layers(model, ["conv2", "hidden"], None) == ["conv2", "hidden"]
    resnet = ZOO["resnet8"]()
    assert watched_layers(resnet, True, "layer1") == ["layer1", "layer2", "layer3"]
    assert watched_layers(resnet, True, "layer2.0") == ["layer2.0"]  # no sibling after it
    with pytest.raises(UserError, match=r"train.diagnostics: no module 'conv99'.*did you mean"):
        watched_layers(model, ["conv99"], None)
    with pytest.raises(UserError, match="train.diagnostics: an empty list"):
        watched_layers(model, [], None)


def test_a_maxout_layer_reports_rms_alone(seed):
    model = ZOO["fitnet"](widths=[4, 6], pool_after=[1], maxout_pieces=2, batch_norm=False)
    diag = Diagnostics(model, watched_layers(model, True, None))
    diag.arm()
    x = torch.randn(3, 3, 8, 8)
    model(x)
    stats = diag.take()
    assert set(stats) == {"diag/conv1/rms", "diag/conv2/rms"}
    assert stats["diag/conv1/rms"].item() == pytest.approx(by_hand(model.conv1(x))[0], rel=1e-5)


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_run_logs_the_diagnostics_of_its_log_step_batch(tmp_path, nproc):
    """A 1-step run logs once, on its only step: the first micro-batch through the initial weights,
    rebuilt here from the same seed and data position; under 2-process DDP, rank 0's micro-batch."""
    from test_ddp import torchrun

    from fitdist.build import build_student
    from fitdist.config import load_config
    from fitdist.data import build_data

    cfg_path = write_config(tmp_path / "diag.yaml", stages=[{"name": "train", "steps": 1}],
                            train={"batch_size": 16, "log_every": 1, "eval_batch_size": 1000, "threads": 1,
                                   "diagnostics": True},
                            data={"source": "fashion-mnist", "train_subset": 256},
                            strategy={"kind": "ddp" if nproc == 2 else "single"})
    if nproc == 1:
        done = run_cli("train", cfg_path)
        assert done.returncode == 0, done.stderr[-2000:]
    else:
        assert torchrun(cfg_path, tmp_path / "ddp.json")["world"] == 2
    rows = [json.loads(line) for line in (tmp_path / "diag" / "metrics.jsonl").read_text().splitlines()]
    logged = {k: v for row in rows for k, v in row.items() if k.startswith("diag/")}
    assert set(logged) == {f"diag/conv{i}/{k}" for i in range(1, 6) for k in ("rms", "dead")}

    cfg = load_config(cfg_path)
    torch.manual_seed(cfg.seed)
    data = build_data(cfg.data, 16 // nproc, 1000, cfg.seed, 0, nproc)  # rank 0's stream
    torch.manual_seed(cfg.seed)
    student = build_student(cfg, data, None)
    images, _ = next(data.train_batches(0))
    h = data.to_device(images, torch.device("cpu"))
    student.train()
    for i, child in enumerate(student.backbone.children(), start=1):
        if i > 5:
            break
        h = child(h)
        rms, dead = by_hand(h)
        assert logged[f"diag/conv{i}/rms"] == pytest.approx(rms, rel=1e-4)
        assert logged[f"diag/conv{i}/dead"] == pytest.approx(dead, abs=1e-6)


def test_an_unknown_diagnostics_layer_is_a_one_line_error(tmp_path):
    cfg = write_config(tmp_path / "bad.yaml", stages=[{"name": "train", "steps": 1}])
    done = run_cli("train", cfg, "train.diagnostics=[conv1, convv2]")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.diagnostics" in lines[0] and "convv2" in lines[0], done.stderr
    from fitdist.config import load_config

    with pytest.raises(UserError, match="train.diagnostics: expected bool or list, got 'sometimes'"):
        load_config(cfg, ["train.diagnostics=sometimes"])


def test_diagnostics_off_by_default():
    from fitdist.config import load_config

    assert load_config(None).train.diagnostics is False
    assert load_config(None, ["train.diagnostics=[conv2]"]).train.diagnostics == ["conv2"]


def test_report_plots_the_logged_diagnostics_per_layer(tmp_path):
    from PIL import Image

    from fitdist.report import plot_diagnostics, read_run, report

    cfg_path = write_config(tmp_path / "two.yaml", stages=[{"name": "a", "steps": 2}, {"name": "b", "steps": 2}],
                            train={"batch_size": 16, "log_every": 1, "eval_batch_size": 1000, "threads": 1,
                                   "diagnostics": ["conv2", "conv4"]},
                            data={"source": "fashion-mnist", "train_subset": 256})
    done = run_cli("train", cfg_path)
    assert done.returncode == 0, done.stderr[-2000:]
    run = read_run(tmp_path / "two")
    fig = plot_diagnostics(run)
    rms, dead = fig.axes[:2]
    for ax, what in ((rms, "rms"), (dead, "dead")):
        lines = {line.get_label(): line for line in ax.lines if not line.get_label().startswith("_")}
        assert set(lines) == {"conv2", "conv4"}
        for layer, line in lines.items():
            logged = [(r["step"], r[f"diag/{layer}/{what}"]) for r in run.rows]
            assert list(zip(line.get_xdata(), line.get_ydata())) == logged
        boundary = [line for line in ax.lines if line.get_linestyle() == "--"]
        assert [list(b.get_xdata()) for b in boundary] == [[2, 2]]  # stage a ends at step 2
    written = report([str(tmp_path / "two")], tmp_path / "out")
    with Image.open(written["diag-two"]) as im:
        assert im.format == "PNG" and im.size[0] > 300


def test_compiled_forwards_leave_the_hooks_out_and_an_eager_step_measures(seed):
    """Under train.compile the hooks never enter a graph (fullgraph, armed or not); the armed step
    runs eager (`fitdist.compile.eager`) and measures as an eager run does."""
    from fitdist.compile import eager

    model = ZOO["fitnet"](widths=[4, 6, 8], pool_after=[1], batch_norm=False)
    diag = Diagnostics(model, ["conv2", "conv3"])
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(2, 3, 8, 8)
    diag.arm()
    compiled(x)
    assert diag.take() == {}  # traced and run without the hooks' work
    diag.arm()
    with eager():
        compiled(x)
    stats = diag.take()
    assert stats["diag/conv2/rms"].item() == pytest.approx(by_hand(model.conv2(model.conv1(x)))[0], rel=1e-5)
