"""Teacher ensembles: config, the KD targets against closed forms, which teachers a stage runs, the
`sample` draw, `fitdist eval --teachers`, check and the dry run (end-to-end runs: test_ensemble_runs.py)."""

import collections
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import STUDENT, run_cli, write_config

from fitdist.config import ModelConfig, TeacherConfig, load_config
from fitdist.distiller import Distiller, FrozenTeacher
from fitdist.ensemble import Ensemble
from fitdist.errors import UserError
from fitdist.models import build_model

SMALL = {"name": "fitdist:fitnet", "kwargs": {"widths": [8, 8, 16], "pool_after": [1, 2]}}
OTHER = {"name": "fitdist:fitnet", "kwargs": {"widths": [4, 8, 8], "pool_after": [1, 2]}}


def teacher_file(tmp_path, spec: dict, seed: int, classes: int = 10) -> str:
    """A teacher's weights file: a randomly initialised model (its outputs are what the tests need)."""
    torch.manual_seed(seed)
    path = tmp_path / f"teacher-{seed}-{classes}.pt"
    torch.save(build_model(ModelConfig(spec["name"], spec["kwargs"]), classes, 1).state_dict(), path)
    return str(path)


def two_teachers(tmp_path, **extra) -> list[dict]:
    return [{**SMALL, "weights": teacher_file(tmp_path, SMALL, 1), "id": "a", **extra.get("a", {})},
            {**OTHER, "weights": teacher_file(tmp_path, OTHER, 2), "id": "b", "weight": 3.0, **extra.get("b", {})}]


# ------------------------------------------------------------------ config


def test_teachers_config_ids_from_and_the_dumped_form(tmp_path):
    path = write_config(tmp_path / "e.yaml", teachers=[{"name": "torchvision:resnet50"}, {**SMALL, "weight": 2}],
                        hints=[{"student": "conv3", "teacher": "conv2", "from": "fitnet"}],
                        loss={"ensemble": "mean_logits"})
    from fitdist.config import dump_config, hint_teacher, teacher_ids

    cfg = load_config(path)
    assert teacher_ids(cfg) == ["resnet50", "fitnet"] and cfg.teacher is cfg.teachers[0]
    assert hint_teacher(cfg, 0) == 1 and cfg.loss.ensemble == "mean_logits"
    assert hint_teacher(load_config(path, ["hints.0.from=0"]), 0) == 0  # an index, by a dotted override
    assert hint_teacher(load_config(path, ["hints.0.from=resnet50"]), 0) == 0
    dump_config(cfg, tmp_path / "dumped.yaml")
    dumped = yaml.safe_load((tmp_path / "dumped.yaml").read_text())
    assert dumped["teacher"] is None and dumped["hints"][0]["from"] == "fitnet" and "from_" not in dumped["hints"][0]
    again = load_config(tmp_path / "dumped.yaml")  # what eval and resume read back
    assert teacher_ids(again) == teacher_ids(cfg) and [t.weight for t in again.teachers] == [1.0, 2.0]
    single = load_config(write_config(tmp_path / "s.yaml", teacher=SMALL))
    assert single.teachers == [single.teacher] and teacher_ids(single) == ["fitnet"]
    dump_config(single, tmp_path / "single.yaml")
    assert yaml.safe_load((tmp_path / "single.yaml").read_text())["teachers"] == []


@pytest.mark.parametrize("sections, overrides, message", [
    ({"teachers": [SMALL, OTHER]}, [], r"^teachers.0 and teachers.1 both have the id 'fitnet': give each an `id`"),
    ({"teachers": [SMALL, {**OTHER, "id": "o"}], "hints": [{"student": "conv3", "teacher": "conv2", "from": "x"}]},
     [], r"^hints.0.from: no teacher 'x'; the teachers are fitnet, o$"),
    ({"teachers": [SMALL, {**OTHER, "id": "o"}], "hints": [{"student": "conv3", "teacher": "conv2", "from": 2}]},
     [], r"^hints.0.from: no teacher 2; there are 2"),
    ({"teachers": [SMALL, {**OTHER, "id": "o", "weight": 0}]}, [], r"^teachers.1.weight: must be > 0, got 0"),
    ({"teachers": [SMALL, {**OTHER, "id": "o"}]}, ["teachers.0.weight=-1"], r"^teachers.0.weight: must be > 0"),
    ({"teacher": SMALL, "teachers": [OTHER]}, [], r"^teacher and teachers: give one of them"),
    ({"teachers": [SMALL]}, ["teacher.name=fitdist:fitnet"], r"^teacher and teachers: give one of them"),
    ({"teachers": [SMALL]}, ["hints=[{student: conv3, teacher: conv2, form: fitnet}]"], r"'hints.0.form'.*hints.0.from"),
    ({"teachers": [SMALL]}, ["loss.ensemble=median"], r"^loss.ensemble: 'median' is not one of mean_probs"),
])
def test_bad_teachers_configs_are_one_line_errors(tmp_path, sections, overrides, message):
    path = write_config(tmp_path / "bad.yaml", **sections)
    with pytest.raises(UserError, match=message):
        load_config(path, overrides)


def test_a_config_built_in_code_with_both_forms_is_refused_and_validation_is_idempotent():
    from fitdist.config import Config, validate

    a, b = TeacherConfig(**SMALL, id="a"), TeacherConfig(**OTHER, id="b")
    with pytest.raises(UserError, match=r"^teacher and teachers: give one of them"):
        validate(Config(teacher=a, teachers=[b]))
    cfg = validate(validate(Config(teachers=[a, b])))  # a validated config validates again unchanged
    assert cfg.teacher is a and cfg.teachers == [a, b]


def test_a_teacher_predicting_other_classes_is_an_error_naming_it(tmp_path):
    from fitdist.build import build_student, ensemble_of
    from fitdist.dryrun import synthetic_data

    path = write_config(tmp_path / "c.yaml", teachers=[{**SMALL, "id": "a"}, {**OTHER, "id": "seven"}],
                        stages=[{"name": "kd", "steps": 1, "kd": 1}])
    cfg = load_config(path)
    models = [build_model(ModelConfig(SMALL["name"], SMALL["kwargs"]), 10, 1),
              build_model(ModelConfig(OTHER["name"], OTHER["kwargs"]), 7, 1)]
    ensemble = ensemble_of(cfg, [FrozenTeacher(m, []) for m in models])
    with pytest.raises(UserError, match=r"^teachers.1 \(seven\): predicts 7 classes but the data has 10$"):
        build_student(cfg, synthetic_data(cfg), ensemble)


# ------------------------------------------------------------------ losses against closed forms


def frozen(spec: dict, seed: int, hints: list[str] = (), logit_scale: float = 1.0) -> FrozenTeacher:
    torch.manual_seed(seed)
    model = build_model(ModelConfig(spec["name"], spec["kwargs"]), 10, 1)
    with torch.no_grad():  # a freshly initialised net's logits are small (std ~0.3): sharpen them on request
        [head for head in model.modules() if isinstance(head, torch.nn.Linear)][-1].weight.mul_(logit_scale)
    return FrozenTeacher(model, list(hints))


@pytest.mark.parametrize("kd_t2, impl", [(True, "auto"), (False, "auto"), (True, "reference")])
def test_mean_probs_and_mean_logits_equal_their_closed_forms(seed, kd_t2, impl):
    # confident teachers: with near-uniform ones the arithmetic and geometric means would coincide
    teachers = [frozen(SMALL, seed + i, logit_scale=20.0) for i in range(3)]
    raw = torch.rand(3).add(0.2).tolist()
    w = [r / sum(raw) for r in raw]
    x, labels = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    s = torch.randn(6, 10, requires_grad=True)
    student = lambda images, hints, need_logits: (s, [])  # fixed student logits
    T = 1.0 + 4 * torch.rand(()).item()
    with torch.no_grad():
        t = [m.model(x) for m in teachers]
    log_q = F.log_softmax(s / T, -1)
    p_bar = sum(wi * F.softmax(ti / T, -1) for wi, ti in zip(w, t))
    t_bar = sum(wi * ti for wi, ti in zip(w, t))
    p_geo = F.softmax(t_bar / T, -1)
    scale = T * T if kd_t2 else 1.0
    expected = {"mean_probs": scale * (p_bar * (p_bar.log() - log_q)).sum() / 6,
                "mean_logits": scale * (p_geo * (p_geo.log() - log_q)).sum() / 6}
    # mean_logits is the normalised weighted geometric mean of the softened probabilities
    geo = math.prod(F.softmax(ti / T, -1) ** wi for wi, ti in zip(w, t))
    torch.testing.assert_close(p_geo, geo / geo.sum(-1, keepdim=True))
    ce = F.cross_entropy(s, labels)
    for mode, kd in expected.items():
        ens = Ensemble(teachers, raw, mode=mode)
        terms = Distiller(student, ens, T, impl, kd_t2, ["ce", "kd"])(x, labels, {"ce": 0.5, "kd": 2.0})
        torch.testing.assert_close(terms["kd"], kd.detach())
        torch.testing.assert_close(terms["ce"], ce.detach())
        (grad,) = torch.autograd.grad(terms["loss"], s)
        (want,) = torch.autograd.grad(0.5 * ce + 2.0 * kd, s, retain_graph=True)
        torch.testing.assert_close(grad, want)
    assert (p_bar - p_geo).abs().max() > 1e-3  # the two modes' targets differ


def test_one_teacher_is_the_single_teacher_path_in_every_mode(seed):
    teacher = frozen(SMALL, seed)
    x, labels = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    torch.manual_seed(seed)
    backbone = build_model(ModelConfig(STUDENT["name"], STUDENT["kwargs"]), 10, 1)
    from fitdist.distiller import Student

    student = Student(backbone, [], [])
    want = Distiller(student, teacher, 3.0, "reference", True, ["ce", "kd"])(x, labels, {"ce": 1.0, "kd": 1.0})
    from fitdist.losses import kd_loss

    with torch.no_grad():
        torch.testing.assert_close(want["kd"], kd_loss(backbone(x), teacher.model(x), 3.0), rtol=0, atol=0)
    for mode in ("mean_probs", "mean_logits", "sample"):
        got = Distiller(student, Ensemble([teacher], [2.0], mode=mode), 3.0, "reference", True,
                        ["ce", "kd"])(x, labels, {"ce": 1.0, "kd": 1.0})
        assert torch.equal(got["loss"], want["loss"]) and torch.equal(got["kd"], want["kd"])


# ------------------------------------------------------------------ which teachers a stage runs


def count_calls(model: torch.nn.Module) -> collections.Counter:
    calls = collections.Counter()
    for name, module in model.named_modules():
        if name:
            module.register_forward_hook(lambda m, a, o, n=name: calls.update([n]))
    return calls


def test_a_hint_stage_runs_only_the_hint_teacher_up_to_its_hint_layer_and_kd_runs_all(seed):
    a, b = frozen(SMALL, seed), frozen(OTHER, seed + 1, ["conv2"])
    calls_a, calls_b = count_calls(a.model), count_calls(b.model)
    ens = Ensemble([a, b], [1, 1], ["a", "b"], hint_from=[1])
    x = torch.randn(2, 1, 28, 28)
    out = ens(x, kd=False, hints=True)
    assert out.probs is None and out.logits is None and len(out.hints) == 1
    assert not calls_a  # the KD-only teacher did not run at all
    # (conv2's own counter hook comes after the tap's, which ends the forward: its first layer counts it)
    assert calls_b["conv1"] == 1 and calls_b["conv2.0"] == 1 and not calls_b["conv3.0"] and not calls_b["fc"]
    with torch.no_grad():  # the hint is teacher b's conv2 output
        feats = {}
        h = b.model.get_submodule("conv2").register_forward_hook(lambda m, i, o: feats.update(o=o))
        b.model(x)
        h.remove()
    assert torch.equal(out.hints[0], feats["o"])
    calls_a.clear(), calls_b.clear()
    ens = Ensemble([a, b], [1, 3], ["a", "b"], hint_from=[1])  # b, the hint teacher, runs first
    out = ens(x, kd=True, hints=True, temperature=2.0)  # a mixed stage: both to their logits, b's hint too
    assert calls_a["fc"] == 1 and calls_b["fc"] == 1 and len(out.hints) == 1
    with torch.no_grad():  # each teacher's probabilities with its own weight
        want = 0.25 * F.softmax(a.model(x) / 2, -1) + 0.75 * F.softmax(b.model(x) / 2, -1)
    torch.testing.assert_close(out.probs, want)


def test_the_sample_draw_is_reproducible_follows_the_weights_and_differs_by_rank(seed):
    teachers = [frozen(SMALL, seed + i) for i in range(3)]
    ens = Ensemble(teachers, [1, 2, 5], mode="sample", seed=seed)
    draws = [ens.draw(step, micro) for step in range(3000) for micro in range(2)]
    again = Ensemble(teachers, [1, 2, 5], mode="sample", seed=seed)
    assert draws == [again.draw(step, micro) for step in range(3000) for micro in range(2)]
    freq = collections.Counter(draws)
    for i, w in enumerate([1 / 8, 2 / 8, 5 / 8]):  # 6000 draws: 4 standard deviations < 0.025
        assert abs(freq[i] / len(draws) - w) < 0.025, freq
    other_rank = Ensemble(teachers, [1, 2, 5], mode="sample", seed=seed, rank=1)
    assert draws != [other_rank.draw(step, micro) for step in range(3000) for micro in range(2)]
    # the target is the drawn teacher's logits, and only that teacher runs
    calls = [count_calls(t.model) for t in teachers]
    x = torch.randn(2, 1, 28, 28)
    out = ens(x, kd=True, hints=False, temperature=3.0, step=7, micro=1)
    drawn = ens.draw(7, 1)
    assert [bool(c) for c in calls] == [i == drawn for i in range(3)]
    with torch.no_grad():
        assert torch.equal(out.logits, teachers[drawn].model(x))


# ------------------------------------------------------------------ fitdist eval --teachers


def test_eval_teachers_reports_each_member_and_the_weighted_mean_probs_ensemble(tmp_path):
    import json

    from fitdist.build import build_teachers
    from fitdist.data import build_data

    teachers = two_teachers(tmp_path)  # fp32: bf16 logits of random teachers tie, and ties break by kernel
    path = write_config(tmp_path / "ev.yaml", teachers=teachers, stages=[{"name": "kd", "steps": 1, "kd": 1}])
    result = run_cli("eval", path, "--teachers", "train.eval_batch_size=2500")
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    # by hand: every test image through each teacher, the weights 1 and 3 normalised
    cfg = load_config(path)
    data = build_data(cfg.data, 1, 2500, cfg.seed, 0, 1)
    ens = build_teachers(cfg, data)
    hits, n = torch.zeros(3, 2), 0
    with torch.no_grad():
        for images, labels in data.val_batches():
            x = data.to_device(images, torch.device("cpu"))
            logits = [t(x)[0].float() for t in ens.teachers]
            mean = 0.25 * logits[0].softmax(-1) + 0.75 * logits[1].softmax(-1)
            for i, scores in enumerate([*logits, mean]):
                ranked = scores.argsort(-1, descending=True)
                hits[i, 0] += (ranked[:, 0] == labels).sum()
                hits[i, 1] += (ranked[:, :5] == labels[:, None]).any(-1).sum()
            n += len(labels)
    assert got["n"] == n == 10000
    for i, tid in enumerate(["a", "b"]):
        assert got["teachers"][tid]["top1"] == pytest.approx(100 * hits[i, 0].item() / n)
        assert got["teachers"][tid]["top5"] == pytest.approx(100 * hits[i, 1].item() / n)
    assert [got["teachers"][t]["weight"] for t in "ab"] == [0.25, 0.75]
    assert got["ensemble"]["top1"] == pytest.approx(100 * hits[2, 0].item() / n)
    assert got["ensemble"]["top5"] == pytest.approx(100 * hits[2, 1].item() / n)
    assert got["ensemble"]["top1"] not in (got["teachers"]["a"]["top1"], got["teachers"]["b"]["top1"])
    bad = run_cli("eval", write_config(tmp_path / "none.yaml"), "--teachers")
    assert bad.returncode == 2 and "has no teacher" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    from fitdist.evaluate_ensemble import evaluate_teachers

    for wrong in (teachers[0]["weights"], tmp_path / "absent.yaml", tmp_path / "empty-dir"):
        (tmp_path / "empty-dir").mkdir(exist_ok=True)
        with pytest.raises(UserError, match=r"^eval --teachers: no YAML config "):
            evaluate_teachers(str(wrong))


def test_check_names_the_ensemble_member_at_fault(tmp_path):
    from fitdist.check import check

    teachers = two_teachers(tmp_path)
    good = write_config(tmp_path / "ok.yaml", teachers=teachers,
                        hints=[{"student": "conv3", "teacher": "conv2", "from": "b"}])
    assert check(load_config(good)).startswith("config OK")
    with pytest.raises(UserError, match=r"^teachers.1.weights: file not found: .*nope.pt$"):
        check(load_config(good, [f"teachers.1.weights={tmp_path / 'nope.pt'}"]))
    with pytest.raises(UserError, match=r"^teachers.1 hint: no module 'conv9'"):
        check(load_config(good, ["hints.0.teacher=conv9"]))
    assert check(load_config(good, ["hints.0.from=a"])).startswith("config OK")  # a's layers are named alike


def test_dry_run_lists_each_teacher_its_macs_and_the_stages_that_run_it(tmp_path):
    from fitdist.dryrun import dry_run
    from fitdist.models import count_macs

    teachers = two_teachers(tmp_path)
    teachers[0]["weights"] = str(tmp_path / "not-yet.pt")  # a teacher still to be trained: random weights
    path = write_config(tmp_path / "d.yaml", teachers=teachers,
                        hints=[{"student": "conv3", "teacher": "conv3", "from": "b"}],
                        stages=[{"name": "hint", "steps": 2, "ce": 0, "hint": 1},
                                {"name": "kd", "steps": 2, "ce": 1, "kd": 1}, {"name": "ce", "steps": 1}])
    out = dry_run(load_config(path))
    listed = {t["id"]: t for t in out["teachers"]}
    assert list(listed) == ["a", "b"] and out["ensemble"] == "mean_probs"
    assert listed["a"]["stages"] == ["kd"] and listed["b"]["stages"] == ["hint", "kd"]
    assert listed["a"]["weight"] == 0.25 and listed["b"]["weight"] == 0.75
    assert listed["a"]["weights"].startswith("random") and listed["b"]["weights"].startswith("loaded")
    for spec, t in zip((SMALL, OTHER), out["teachers"]):
        model = build_model(ModelConfig(spec["name"], spec["kwargs"]), 10, 1)
        assert t["macs"] == count_macs(model, torch.randn(1, 1, 28, 28)) and t["name"] == spec["name"]
    assert out["teacher"]["macs"] == listed["a"]["macs"]
    assert out["hints"][0]["teacher_shape"] == [8, 7, 7]  # b's conv3 (widths 4, 8, 8), not a's (8, 8, 16)


