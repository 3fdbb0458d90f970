"""Stored soft labels (`fitdist label`, `data.soft_labels`): exact against the online teacher for
the same view, and every mismatch refused.

Tolerances: a stored probability is the fp32 softmax rounded to fp16, so |stored − p| ≤ 2⁻¹¹·p
(half an ulp, relative) + 2⁻²⁵ (fp16 subnormals below 6.1e-5 have a fixed spacing 2⁻²⁴). The KD
step's gradient with respect to the student logits is T·(q − p)/N per element, so the two steps'
gradients differ by at most T·|Δp|/N; its loss T²/N·Σ p·(log p − log q) by at most
T²/N·Σ|Δp|·(|log p − log q| + 1) to first order. Both bounds are computed from the actual Δp.
"""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli
from soft_label_data import make_shards, make_teacher, write_cfg

from fitdist.build import build_student, build_teachers
from fitdist.config import load_config
from fitdist.data import build_data
from fitdist.data.label_writer import draw_views, label, view_generator
from fitdist.data.soft_labels import check_run, label_file, load_label_file, write_label_file
from fitdist.data.wds import train_transform
from fitdist.distiller import Distiller
from fitdist.errors import UserError

R, T = 3, 2.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("soft")
    shards = make_shards(root)
    teacher = make_teacher(root / "teacher.pt", seed=11)
    cfg_path = write_cfg(root / "kd.yaml", shards, teacher, root / "labels")
    summary = label(load_config(cfg_path), views=R, topk=10, batch=16, progress=False)
    assert summary["images"] == 37 and summary["shards"] == 4 and summary["complete"]
    return root, cfg_path


def online_probs(cfg, bundle, images):
    teacher = build_teachers(cfg, bundle)
    x = bundle.to_device(images, torch.device("cpu"))
    return F.softmax(teacher(x, True, False, T).logits.float() / T, -1), x


def fp16_close(stored, p):
    assert (stored - p).abs().le(2**-11 * p + 2**-25).all(), (stored - p).abs().max()


def test_stored_labels_are_the_teachers_softmax_of_every_recorded_view(setup):
    root, cfg_path = setup
    cfg = load_config(cfg_path)
    bundle = build_data(dataclasses.replace(cfg.data, soft_labels=None), 8, 8, 0)
    manifest = json.loads((root / "labels" / "manifest.json").read_text())
    assert (manifest["views"], manifest["topk"], manifest["temperature"]) == (R, 10, T)
    view = train_transform(cfg.data, json.loads((root / "shards" / "manifest.json").read_text()))
    entry = manifest["source"]["shards"][1]
    table = load_label_file(str(root / "labels" / entry["labels"]))
    assert len(table.rows) == entry["count"] and table.idx.shape == (entry["count"], R, 10)
    from fitdist.data.stream import _Stats, read_shard

    for sample in read_shard(str(root / "shards" / entry["name"]), None, None, _Stats()):
        from fitdist.data.transforms import decode

        row = table.rows[sample["__key__"]]
        params, pixels = draw_views(view, decode(sample["png"], 1), R,
                                    view_generator(cfg.seed, entry["name"], sample["__key__"]))
        assert (table.views[row] == params).all()  # the recorded parameters are the drawn ones
        p, _ = online_probs(cfg, bundle, pixels)
        stored = torch.zeros(R, 10).scatter_(1, torch.from_numpy(table.idx[row].astype(np.int64)),
                                             torch.from_numpy(table.prob[row]).float())
        fp16_close(stored, p)


class Recorder(torch.nn.Module):
    """The student, keeping its logits' gradient (what the KD term hands to the backbone)."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, images, hints=None, need_logits=True):
        logits, h = self.student(images, hints, need_logits)
        logits.retain_grad()
        self.logits = logits
        return logits, h


def test_reader_replays_the_stored_view_and_the_kd_step_equals_the_online_one(setup):
    _, cfg_path = setup
    cfg = load_config(cfg_path)
    bundle = build_data(cfg.data, 8, 8, 0)
    images, labels, idx, prob = next(bundle.train_batches(0))
    assert idx.shape == (8, 10) and prob.dtype == torch.float16
    from fitdist.data.soft_labels import dense_target

    p, x = online_probs(cfg, bundle, images)
    soft = dense_target(idx, prob, 10)
    fp16_close(soft, p)  # the batch's images are the labelled views, exactly

    teacher = build_teachers(cfg, bundle)
    torch.manual_seed(5)
    student = Recorder(build_student(cfg, bundle, teacher))
    weights, n = {"ce": 0.7, "kd": 1.3}, len(labels)
    out = []
    for stored in (True, False):  # stored target (no teacher at all), then the online teacher
        distiller = Distiller(student, None if stored else teacher, T, "reference", True, {"ce", "kd"}, soft=stored)
        student.zero_grad()
        terms = distiller(x, labels, weights, soft=(idx, prob) if stored else None)
        terms["loss"].backward()
        out.append((terms, student.logits.grad.clone(), [q.grad.clone() for q in student.parameters()]))
    (a, ga, pa), (b, gb, pb) = out
    q = F.softmax(student.logits.detach().float() / T, -1)
    dp = soft - p
    # first order in Δp (see the module docstring), 1% and 1e-7 for the fp32 arithmetic
    kd_bound = T * T / n * (dp.abs() * ((p.log() - q.log()).abs() + 1)).sum() * 1.01 + 1e-7
    assert (a["kd"] - b["kd"]).abs() <= kd_bound
    assert (a["loss"] - b["loss"]).abs() <= weights["kd"] * kd_bound + 1e-7
    assert torch.equal(a["ce"], b["ce"])
    # d/ds of T²·Σ p̃ (log p̃ − log q) is T·(q·Σp̃ − p̃)/N: the stored target's sum is 1 only to fp16 rounding
    g_bound = weights["kd"] * T / n * (dp.abs() + q * dp.sum(1, keepdim=True).abs()) * 1.01 + 1e-8
    assert (ga - gb).abs().le(g_bound).all()
    assert (ga - gb).abs().max() > 0  # fp16 storage does show (a test that cannot fail proves nothing)
    for u, v in zip(pa, pb):  # the parameters' gradients: the logits' difference carried back
        torch.testing.assert_close(u, v, rtol=1e-3, atol=1e-5)


def test_view_choice_is_seeded_and_reproducible(setup):
    _, cfg_path = setup
    cfg = load_config(cfg_path)

    def first(start, n=4):
        it = build_data(cfg.data, 8, 8, 0).train_batches(start)
        return [next(it) for _ in range(n)]

    a, b = first(0), first(0)
    for x, y in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    c = first(7)  # another start: a fresh, different stream (as after a resume)
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c))


def test_labelling_resumes_per_shard_and_refuses_another_manifest(setup, tmp_path):
    root, cfg_path = setup
    labels = tmp_path / "labels"
    shutil.copytree(root / "labels", labels)
    cfg = load_config(cfg_path, [f"data.soft_labels={labels}"])
    name = label_file("train-000002.tar")
    before = load_label_file(str(labels / name))
    (labels / name).unlink()
    mtime = (labels / label_file("train-000000.tar")).stat().st_mtime_ns
    summary = label(cfg, views=R, topk=10, batch=5, progress=False)
    assert summary["shards"] == 1 and summary["images"] == 10 and summary["complete"]
    assert (labels / label_file("train-000000.tar")).stat().st_mtime_ns == mtime  # kept as it was
    after = load_label_file(str(labels / name))
    assert after.rows == before.rows and (after.views == before.views).all() and (after.idx == before.idx).all()
    np.testing.assert_allclose(after.prob.astype(np.float32), before.prob.astype(np.float32), rtol=2**-10)
    # another k, T or teacher into the same directory: one line, exit 2, naming the manifest
    from fitdist.data.label_writer import main as label_main

    with pytest.raises(UserError, match="^fitdist label: unrecognized arguments: --bogus$"):
        label_main([str(cfg_path), "loss.temperature=2", "--bogus"])
    with pytest.raises(UserError, match="--topk must be 1 to 10"):
        label_main([str(cfg_path), f"data.soft_labels={tmp_path / 'other'}", "--topk", "11"])
    for extra in (["--topk", "5"], ["loss.temperature=4"]):
        r = run_cli("label", cfg_path, f"data.soft_labels={labels}", "--views", str(R), "--no-progress", *extra)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "manifest.json" in r.stderr, r.stderr


def test_missing_key_is_skipped_and_counted(setup, tmp_path, caplog):
    root, cfg_path = setup
    labels = tmp_path / "labels"
    shutil.copytree(root / "labels", labels)
    name = label_file("train-000001.tar")
    t = load_label_file(str(labels / name))
    keys = sorted(t.rows, key=t.rows.get)
    dropped, kept = keys[4], [k for k in keys if k != keys[4]]
    rows = [t.rows[k] for k in kept]
    write_label_file(labels / name, kept, t.views[rows], t.idx[rows], t.prob[rows])
    cfg = load_config(cfg_path, [f"data.soft_labels={labels}", "data.shuffle_buffer=1", "data.shard_mix=1"])
    bundle = build_data(cfg.data, 36, 8, 0)
    images, *_ = next(bundle.train_batches(0))  # one pass: 37 samples, one without labels
    assert len(images) == 36 and bundle.metrics() == {"data/skipped": 1}
    assert f"train-000001.tar: {dropped}" in caplog.text and "no stored soft labels" in caplog.text


def test_mismatched_labels_are_errors_naming_the_file(setup, tmp_path):
    root, cfg_path = setup
    where = str(root / "labels" / "manifest.json")
    cfg = load_config(cfg_path)
    bundle = build_data(cfg.data, 8, 8, 0)
    check_run(cfg, bundle.soft_labels)  # the run's own: accepted
    from fitdist.check import check

    assert check(cfg).startswith("config OK")  # `fitdist check` (the launch scripts' first step) agrees
    with pytest.raises(UserError, match="loss.temperature is 4.0"):
        check(load_config(cfg_path, ["loss.temperature=4"]))
    with pytest.raises(UserError, match="temperature 2.0 but loss.temperature is 4.0") as e:
        check_run(load_config(cfg_path, ["loss.temperature=4"]), bundle.soft_labels)
    assert where in str(e.value)
    other = make_teacher(tmp_path / "other.pt", seed=12)
    with pytest.raises(UserError, match="labels of the teacher") as e:
        check_run(load_config(cfg_path, [f"teacher.weights={other}"]), bundle.soft_labels)
    assert where in str(e.value)
    with pytest.raises(UserError, match="augmentation") as e:
        build_data(load_config(cfg_path, ["data.augment=cifar"]).data, 8, 8, 0)
    assert where in str(e.value)
    others = make_shards(tmp_path / "o", n_train=21, seed=1)  # other shards of the same names
    with pytest.raises(UserError, match="labels of another train-000000.tar"):
        build_data(load_config(cfg_path, [f"data.root={others}"]).data, 8, 8, 0)
    gone = tmp_path / "labels"
    shutil.copytree(root / "labels", gone)
    (gone / label_file("train-000003.tar")).unlink()
    with pytest.raises(UserError, match=f"{gone / label_file('train-000003.tar')} is missing"):
        build_data(load_config(cfg_path, [f"data.soft_labels={gone}"]).data, 8, 8, 0)
    with pytest.raises(UserError, match="no .*manifest.json"):
        build_data(load_config(cfg_path, [f"data.soft_labels={tmp_path}"]).data, 8, 8, 0)
    with pytest.raises(UserError, match="need data.source: webdataset"):
        build_data(load_config(cfg_path, ["data.source=fashion-mnist"]).data, 8, 8, 0)


def test_training_from_stored_labels_builds_no_teacher(setup, tmp_path, monkeypatch):
    _, cfg_path = setup
    from fitdist import trainer

    def no_teacher(*a, **k):
        raise AssertionError("a teacher was built for a stage that only needs logits")

    monkeypatch.setattr(trainer, "build_teachers", no_teacher)
    summary = trainer.train(load_config(cfg_path, [f"run.dir={tmp_path / 'run'}"]))
    assert summary["steps"] == 2 and summary["val/n"] == 13


def test_loader_workers_replay_the_stored_views_too(setup):
    _, cfg_path = setup
    cfg = load_config(cfg_path, ["data.num_workers=2"])
    bundle = build_data(cfg.data, 8, 8, 0)
    from fitdist.data.soft_labels import dense_target

    it = bundle.train_batches(0)
    for _ in range(3):  # batches from both workers (each with its own view generator)
        images, _, idx, prob = next(it)
        p, _ = online_probs(cfg, bundle, images)
        fp16_close(dense_target(idx, prob, 10), p)
    it.close()
