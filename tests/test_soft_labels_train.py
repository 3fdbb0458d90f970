"""Training with stored soft labels beside a hint stage (the teacher online for hints only), and an
ensemble labelling with its mean_probs target."""

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from soft_label_data import TEACHER, make_shards, make_teacher, write_cfg

from fitdist.build import build_teacher
from fitdist.config import load_config
from fitdist.data import build_data
from fitdist.data.label_writer import draw_views, label, view_generator
from fitdist.data.soft_labels import load_label_file
from fitdist.data.stream import _Stats, read_shard
from fitdist.data.transforms import decode
from fitdist.data.wds import train_transform
from fitdist.distiller import FrozenTeacher


def test_hint_stage_runs_the_teacher_for_hints_only(tmp_path, monkeypatch):
    shards = make_shards(tmp_path)
    path = write_cfg(tmp_path / "fitnets.yaml", shards, make_teacher(tmp_path / "t.pt", seed=2), tmp_path / "labels")
    cfg = yaml.safe_load(path.read_text())
    cfg["hints"] = [{"student": "conv1", "teacher": "conv1"}]
    cfg["stages"] = [{"name": "hint", "steps": 2, "hint": 1.0}, {"name": "kd", "steps": 2, "ce": 1.0, "kd": 1.0}]
    path.write_text(yaml.safe_dump(cfg))
    label(load_config(path), views=2, topk=3, batch=64, progress=False)
    calls = []
    original = FrozenTeacher.forward

    def counted(self, images, need_logits=True):
        calls.append(need_logits)
        return original(self, images, need_logits)

    monkeypatch.setattr(FrozenTeacher, "forward", counted)
    from fitdist.trainer import train

    summary = train(load_config(path))
    assert summary["steps"] == 4
    assert calls and not any(calls)  # hint-stage forwards only, stopped at the hint layer: kd read the stored labels


def test_an_ensemble_labels_with_its_mean_probabilities(tmp_path):
    shards = make_shards(tmp_path, n_train=12)
    path = write_cfg(tmp_path / "ens.yaml", shards, make_teacher(tmp_path / "a.pt", seed=5), tmp_path / "labels")
    cfg = yaml.safe_load(path.read_text())
    first = cfg.pop("teacher")
    cfg["teachers"] = [{**first, "id": "a", "weight": 1.0},
                       {**TEACHER, "weights": str(make_teacher(tmp_path / "b.pt", seed=6)), "id": "b", "weight": 3.0}]
    path.write_text(yaml.safe_dump(cfg))
    c = load_config(path)
    assert label(c, views=2, topk=10, batch=64, progress=False)["images"] == 12
    bundle = build_data(c.data, 4, 4, 0)
    teachers = [build_teacher(c, bundle, i) for i in range(2)]
    view = train_transform(c.data, {"image": {"size": [28, 28]}, "dataset": "fashion-mnist"})
    table = load_label_file(str(tmp_path / "labels" / "train-000000.soft.npz"))
    for sample in read_shard(str(shards / "train-000000.tar"), None, None, _Stats()):
        _, pixels = draw_views(view, decode(sample["png"], 1), 2, view_generator(c.seed, "train-000000.tar",
                                                                                sample["__key__"]))
        x = bundle.to_device(pixels, torch.device("cpu"))
        p = sum(w * F.softmax(t(x)[0].float() / 2.0, -1) for w, t in zip((0.25, 0.75), teachers))
        row = table.rows[sample["__key__"]]
        stored = np.zeros((2, 10), np.float32)
        np.put_along_axis(stored, table.idx[row].astype(np.int64), table.prob[row].astype(np.float32), 1)
        assert np.all(np.abs(stored - p.numpy()) <= 2**-11 * p.numpy() + 2**-25)


def test_a_quiet_step_from_stored_labels_makes_no_host_sync(tmp_path):
    """The real trainer (fitdist train, no workers: the reader runs inside the step too) with every
    host read of a tensor and every collective recorded per step (tests/test_step_syncs.py): from
    stored labels, none but one CPU `item` in step 1 (the DataLoader drawing its base seed when
    the stream starts, as every WebDataset run does)."""
    from test_step_syncs import STEPS, quiet_steps, run

    shards = make_shards(tmp_path)
    path = write_cfg(tmp_path / "quiet.yaml", shards, make_teacher(tmp_path / "t.pt", seed=8), tmp_path / "labels")
    cfg = yaml.safe_load(path.read_text())
    label(load_config(path), views=2, topk=4, batch=64, progress=False)
    cfg["stages"] = [{"name": "kd", "steps": STEPS, "ce": 1.0, "kd": 1.0}]
    cfg["train"].update(log_every=1000, eval_every=0, checkpoint_every=0)
    path.write_text(yaml.safe_dump(cfg))
    (tmp_path / "stored").mkdir()
    (tmp_path / "online-events").mkdir()
    stored = run(tmp_path / "stored", path, nproc=1)[0]
    cfg["data"]["soft_labels"] = None
    online_path = tmp_path / "online.yaml"
    online_path.write_text(yaml.safe_dump({**cfg, "run": {"dir": str(tmp_path / "online")}}))
    online = run(tmp_path / "online-events", online_path, nproc=1)[0]
    assert quiet_steps(stored, STEPS) == {s: [["read", "item"]] if s == 1 else [] for s in range(1, STEPS)}
    # the online run's reader draws each crop inside the step (CPU reads of its RNG draws): the
    # counter does watch the data path, which with stored labels replays recorded views instead
    assert all(["read", "__int__"] in events for events in quiet_steps(online, STEPS).values())
    assert any(e[0] == STEPS for e in stored)  # the last step logs: the counter does see reads
