"""`fitdist bench infer`: what it times and how it reports it (behaviour only, never speed)."""

import json

import pytest
import torch
import yaml
from conftest import STUDENT, TEACHER, run_cli, write_config

from fitdist.bench import infer
from fitdist.errors import UserError


@pytest.fixture
def kd_config(tmp_path):
    return write_config(tmp_path / "kd.yaml", teacher={**TEACHER, "weights": str(tmp_path / "not-yet.pt")},
                        stages=[{"name": "kd", "steps": 2, "ce": 1.0, "kd": 1.0}])


def test_every_model_batch_and_variant_is_timed(kd_config):
    res, heads = infer.run([str(kd_config)], batches=[1, 4], variants=["fp32", "channels_last"],
                           device="cpu", rounds=2, warmup=1)
    assert res.device.startswith("cpu: ") and "thread" in res.device
    assert len(res.rows) == 2 * 2 * 2  # teacher and student, two batches, two variants
    assert all(r["img_per_s"] > 0 and r["ms"] > 0 for r in res.rows)
    ((student, h),) = heads
    assert student.label == "kd" and student.teacher.label == "teacher (fitdist:fitnet)"
    assert h["infer/batch"] == 4 and h["infer/latency_batch"] == 1
    teacher_best = max(r["img_per_s"] for r in res.rows if r["key"] == student.teacher.key and r["batch"] == 4)
    assert h["infer/speedup"] == pytest.approx(h["infer/img_per_s"] / teacher_best)
    assert h["infer/img_per_s"] == max(r["img_per_s"] for r in res.rows if r["key"] == student.key and r["batch"] == 4)


def test_variants_compute_the_same_function(kd_config):
    """channels_last and bf16 change how the forward runs, not what it computes."""
    (t,) = infer.targets([str(kd_config)])
    model = infer._build(t)
    assert not model.training
    x = torch.randn(3, *t.shape)
    with torch.inference_mode():
        ref = model(x)
        for variant in infer.supported_variants(torch.device("cpu")):
            m, xv = infer._prepared(model, x, variant)
            tol = 0.1 if variant.startswith("bf16") else 1e-4  # bf16 keeps 8 bits of mantissa
            torch.testing.assert_close(m(xv).float(), ref, atol=tol, rtol=tol)


def test_one_architecture_is_timed_once_and_a_teacher_run_is_the_reference(tmp_path, kd_config):
    teacher = write_config(tmp_path / "teacher.yaml", student=TEACHER)
    scratch = write_config(tmp_path / "scratch.yaml", student=STUDENT)
    res, heads = infer.run([str(teacher), str(kd_config), str(scratch)], teacher=str(teacher),
                           batches=[2], variants=["fp32"], device="cpu", rounds=1, warmup=0)
    assert len({r["key"] for r in res.rows}) == 2  # two architectures
    by_label = {t.label: h for t, h in heads}
    assert by_label["kd"]["infer/speedup"] == by_label["scratch"]["infer/speedup"]
    assert "infer/speedup" not in by_label["teacher"]  # the reference has none
    table = infer.format_table(res, heads)
    assert "1× (reference)" in table and "| kd |" in table and res.device in table


def test_record_adds_the_headline_to_summary_json(tmp_path, kd_config):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(kd_config.read_text())
    (run / "summary.json").write_text(json.dumps({"val/top1": 50.0}))
    infer.run([str(run)], batches=[1, 2], variants=["fp32"], device="cpu", rounds=1, warmup=0, write=True)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val/top1"] == 50.0 and summary["infer/speedup"] > 0
    assert summary["infer/device"].startswith("cpu: ") and summary["infer/batch"] == 2


def test_bad_input_is_one_line(tmp_path, kd_config):
    with pytest.raises(UserError, match="neither a run directory nor a YAML config"):
        infer.targets([str(tmp_path / "student.pt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.yaml"):
        infer.targets([str(tmp_path / "empty")])
    wds = write_config(tmp_path / "w.yaml", data={"source": "webdataset", "train": "x.tar"})
    with pytest.raises(UserError, match="data.num_classes"):
        infer.targets([str(wds)])
    bad = run_cli("bench", "infer", kd_config, "--variants", "fp64")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "fp64" in bad.stderr


def test_cli_prints_the_table(kd_config):
    ok = run_cli("bench", "infer", kd_config, "--batch", "1", "2", "--rounds", "1", "--warmup", "0",
                 "--variants", "fp32")
    assert ok.returncode == 0, ok.stderr
    assert "speed-up" in ok.stdout and "measured on cpu: " in ok.stdout
    js = run_cli("bench", "infer", kd_config, "--batch", "2", "--rounds", "1", "--variants", "fp32", "--json")
    assert set(json.loads(js.stdout)) == {"device", "rows", "students"}
    assert yaml.safe_load(kd_config.read_text())["teacher"]["weights"].endswith("not-yet.pt")  # never needed


def test_quickstart_table_gains_measured_speed(tmp_path, monkeypatch):
    """The quickstart times its runs after training and shows img/s and speed-up, device named."""
    from functools import partial

    from fitdist import quickstart

    runs = []
    for name, student, teacher in (("t", TEACHER, None), ("s", STUDENT, TEACHER)):
        sections = {"student": student} | ({"teacher": {**teacher, "weights": "x.pt"}} if teacher else {})
        cfg = write_config(tmp_path / f"{name}.yaml", **sections)
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(cfg.read_text())
        (run / "summary.json").write_text(json.dumps({"val/top1": 80.0}))
        runs.append(run)
    monkeypatch.setattr(infer, "run", partial(infer.run, batches=[1, 2], variants=["fp32"], rounds=1, warmup=0))
    rows = [{"model": m, "params": 1, "method": "x", "stages": "train 1", "top1": 80.0, "wall_time_s": 1.0}
            for m in ("teacher", "student")]
    note = quickstart.measure_speed(rows, runs)
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] > 0 and rows[1]["img_per_s"] > 0
    table = quickstart.format_table(rows)
    assert table.splitlines()[0].endswith("| img/s | speed-up |")
    assert table.splitlines()[3].endswith(f"| {rows[1]['speedup']:.2f}× |")
    assert "measured by `fitdist bench infer` on cpu: " in note
    assert json.loads((runs[1] / "summary.json").read_text())["infer/speedup"] == rows[1]["speedup"]


@pytest.mark.parametrize("name", ["fmnist-teacher", "fmnist-scratch", "fmnist-kd", "fmnist-fitnets"])
def test_quickstart_configs_evaluate_during_training(name):
    from fitdist.config import load_config
    from fitdist.quickstart import config_path

    cfg = load_config(config_path(name))
    assert 0 < cfg.train.eval_every < sum(s.steps for s in cfg.stages) // 4  # several points per curve
