"""`fitdist report`: plots and a results table from two real (tiny) Fashion-MNIST runs."""

import json
import random
import shutil
import statistics

import pytest
import torch
from conftest import STUDENT, TEACHER, run_cli, write_config
from PIL import Image

from fitdist.config import load_config
from fitdist.errors import UserError
from fitdist.models import build_model, count_macs
from fitdist.report import plot_losses, plot_schedule, plot_val, read_run, report
from fitdist.trainer import train

EVAL = {"eval_batch_size": 1000, "threads": 1, "batch_size": 32}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A scratch teacher (one stage) and a two-stage FitNets student distilled from it."""
    root = tmp_path_factory.mktemp("report-runs")
    teacher = write_config(root / "teacher.yaml", student=TEACHER,
                           stages=[{"name": "train", "steps": 10}],
                           train={**EVAL, "log_every": 5, "eval_every": 5})
    train(load_config(teacher))
    fitnets = write_config(
        root / "fitnets.yaml", student=STUDENT,
        teacher={**TEACHER, "weights": str(root / "teacher" / "student.pt")},
        hints=[{"student": "conv4", "teacher": "conv2"}],
        stages=[{"name": "hint", "steps": 6, "ce": 0.0, "hint": 1.0},
                {"name": "kd", "steps": 6, "ce": 1.0, "kd": [4.0, 1.0]}],
        train={**EVAL, "log_every": 3},
    )
    train(load_config(fitnets))
    return root / "teacher", root / "fitnets"


def test_report_writes_plots_and_table(runs, tmp_path):
    written = report([str(d) for d in runs], tmp_path / "out")
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == ["loss-fitnets.png", "loss-teacher.png", "schedule.png", "val_top1.png"]
    for name in pngs:
        with Image.open(tmp_path / "out" / name) as im:
            im.verify()  # a complete, valid PNG
        with Image.open(tmp_path / "out" / name) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
    table = written["results"].read_text().splitlines()
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| run")]
    assert len(rows) == 2
    for run_dir in runs:
        summary = json.loads((run_dir / "summary.json").read_text())
        (row,) = [r for r in rows if r.startswith(f"| {run_dir.name} |")]
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[4] == str(summary["steps"])
        assert cells[5] == f"{summary['params']:,}"
        assert cells[6] == f"{summary['macs']:,}"
        assert cells[7] == f"{summary['val/top1']:.2f}" and cells[8] == f"{summary['val/top5']:.2f}"
    fit = next(r for r in rows if r.startswith("| fitnets |"))
    assert "hint → kd" in fit and "fitdist:fitnet" in fit
    # best top-1 first
    top1 = [float(r.strip("|").split("|")[7]) for r in rows]
    assert top1 == sorted(top1, reverse=True)


def test_macs_are_per_image(runs):
    """summary.json's MACs: one 28x28 image through the student, as FlopCounterMode counts them."""
    cfg = load_config(runs[1] / "config.yaml")
    model = build_model(cfg.student, 10, 1)
    batch_of_3 = count_macs(model, torch.randn(3, 1, 28, 28))
    assert json.loads((runs[1] / "summary.json").read_text())["macs"] * 3 == batch_of_3


def _seed_copies(run_dir, root, shifts):
    """Copies of a finished run whose validation top-1 is moved by each shift (fake seeds)."""
    copies = []
    for i, shift in enumerate(shifts):
        copy = root / f"{run_dir.name}-s{i}"
        shutil.copytree(run_dir, copy)
        rows = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
        rows = [{**r, "val/top1": r["val/top1"] + shift} if "val/top1" in r else r for r in rows]
        (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        summary = json.loads((copy / "summary.json").read_text())
        summary["val/top1"] += shift
        (copy / "summary.json").write_text(json.dumps(summary))
        copies.append(copy)
    return copies


def test_seeds_of_one_config_are_aggregated(runs, tmp_path):
    shifts = [random.uniform(-3, 3) for _ in range(3)]
    seeds = _seed_copies(runs[1], tmp_path, shifts)
    written = report([str(runs[0]), *map(str, seeds)], tmp_path / "out")
    text = written["results"].read_text()
    grouped = text.split("## By config")[1]
    (row,) = [r for r in grouped.splitlines() if r.startswith("| fitnets |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    final = json.loads((runs[1] / "summary.json").read_text())["val/top1"]
    top1 = [final + s for s in shifts]
    assert cells[1] == "3"
    assert cells[2] == f"{statistics.mean(top1):.2f} ± {statistics.stdev(top1):.2f}"
    assert "| teacher | 1 |" in grouped  # a config run once has no spread
    val = plot_val([read_run(s) for s in seeds]).axes[0]
    (line,) = [ln for ln in val.lines if not ln.get_label().startswith("_")]
    assert line.get_label() == "fitnets (mean of 3)"
    assert len(val.lines) == 4  # every seed's own curve too, kept out of the legend
    assert line.get_ydata()[-1] == pytest.approx(statistics.mean(top1))


def test_plot_contents(runs):
    teacher, fitnets = read_run(runs[0]), read_run(runs[1])
    fig = plot_losses(fitnets)
    hint_ax, kd_ax = fig.axes[:2]
    assert [ln.get_label() for ln in hint_ax.lines] == ["loss", "hint"]
    assert [ln.get_label() for ln in kd_ax.lines] == ["loss", "ce", "kd"]
    val = plot_val([teacher, fitnets]).axes[0]
    assert [ln.get_label() for ln in val.lines] == ["teacher", "fitnets"]
    assert len(val.lines[0].get_xdata()) == 2  # the teacher was evaluated at steps 5 and 10
    # the hint stage's end-of-stage evaluation (step 6: an untrained classifier) is not drawn; its
    # span is shaded instead
    assert list(val.lines[1].get_xdata()) == [12]
    (span,) = val.patches
    assert span.get_label().startswith("hint-only stage")
    assert span.get_x() == 0 and span.get_width() == 6
    lam, lr = plot_schedule([teacher, fitnets]).axes
    # 0 in the hint stage, then annealed 4 -> 1 over 6 steps (λ_s = 4 − 3s/5); each row logs the
    # mean λ of its 3 steps: (4 + 3.4 + 2.8)/3, then (2.2 + 1.6 + 1)/3
    lam_fitnets = list(lam.lines[1].get_ydata())
    assert lam_fitnets == pytest.approx([0.0, 0.0, 3.4, 1.6])
    assert len(lr.lines) == 2


def test_unfinished_run_is_marked(runs, tmp_path):
    run = tmp_path / "partial"
    run.mkdir()
    rows = (runs[0] / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(rows[0] + "\n")  # the first row: evaluated at step 5
    written = report([str(run)], tmp_path / "out")
    assert "partial (unfinished)" in written["results"].read_text()


@pytest.mark.parametrize("case", ["missing", "no-metrics", "empty", "not-json"])
def test_bad_input_names_the_path(tmp_path, case):
    run = tmp_path / "run"
    if case != "missing":
        run.mkdir()
    if case == "empty":
        (run / "metrics.jsonl").write_text("")
    if case == "not-json":
        (run / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(UserError, match=str(run)):
        report([str(run)], tmp_path / "out")


def test_cli_exit_status(runs, tmp_path):
    ok = run_cli("report", *runs, "--out", tmp_path / "cli")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "cli" / "results.md").is_file()
    bad = run_cli("report", tmp_path / "nowhere", "--out", tmp_path / "cli2")
    assert bad.returncode == 2 and str(tmp_path / "nowhere") in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_folder_of_runs_is_every_run_inside_it(runs, tmp_path):
    root = runs[0].parent  # teacher/ and fitnets/ (and their YAML files) side by side
    written = report([str(root)], tmp_path / "out")
    table = written["results"].read_text()
    assert "| teacher |" in table and "| fitnets |" in table
    assert sorted(p.name for p in (tmp_path / "out").glob("loss-*.png")) == ["loss-fitnets.png", "loss-teacher.png"]
    ok = run_cli("report", root, "--out", tmp_path / "cli")
    assert ok.returncode == 0, ok.stderr
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no metrics.jsonl in .*empty or below it"):
        report([str(tmp_path / "empty")], tmp_path / "out2")


def test_measured_speed_is_reported_with_its_device(runs, tmp_path):
    run = tmp_path / "fitnets"
    shutil.copytree(runs[1], run)
    summary = json.loads((run / "summary.json").read_text())
    summary.update({"infer/img_per_s": 12345.6, "infer/speedup": 2.345, "infer/batch": 256,
                    "infer/device": "cpu: Test CPU (2 threads)"})
    (run / "summary.json").write_text(json.dumps(summary))
    text = report([str(runs[0]), str(run)], tmp_path / "out")["results"].read_text()
    (row,) = [r for r in text.splitlines() if r.startswith("| fitnets |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[10:12] == ["12346", "2.35×"]
    (teacher_row,) = [r for r in text.splitlines() if r.startswith("| teacher |")]
    assert teacher_row.rstrip(" |").endswith("—")
    assert "batch 256" in text and "cpu: Test CPU (2 threads)" in text


def test_a_student_ema_is_plotted_dashed_and_tabled(tmp_path):
    """A run with `train.ema` (real, 10 steps): its EMA top-1 curve is drawn dashed, next to the
    student's, with the values logged, and the table gains an EMA column with the final one."""
    from fitdist.report import results_table

    path = write_config(tmp_path / "ema.yaml", student=TEACHER, stages=[{"name": "train", "steps": 10}],
                        train={**EVAL, "log_every": 5, "eval_every": 5, "ema": {"decay": 0.5}})
    train(load_config(path))
    run = read_run(tmp_path / "ema")
    logged = {r["step"]: r["val_ema/top1"] for r in run.rows if "val_ema/top1" in r}
    assert sorted(logged) == [5, 10]
    student, ema = plot_val([run]).axes[0].lines
    assert ema.get_label() == "ema EMA" and ema.get_linestyle() == "--"
    assert dict(zip(ema.get_xdata(), ema.get_ydata())) == logged
    assert student.get_linestyle() == "-"
    table = results_table([run])
    assert "EMA top-1 (%)" in table.splitlines()[0]
    row = table.splitlines()[2].split(" | ")
    assert row[9] == f"{run.final()['val_ema/top1']:.2f}"
