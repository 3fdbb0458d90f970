"""Student EMA: the closed form on random weights, exact resume, `student_ema.pt`, evaluation
beside the student, and a quiet step that still makes no host sync with the EMA and a teacher
that re-normalises its input on. Under DeepSpeed: ZeRO-2 exports it; ZeRO-3 updates it per
partition without reads or collectives, gathers it whole (equal to ZeRO-2's on two processes,
the ranks agreeing) and resumes it exactly; NVMe parameter offload is refused."""

import json
import shutil

import pytest
import torch
from conftest import STUDENT, TEACHER, write_config
from test_step_syncs import STEPS, preemption_checks_only, quiet_config, quiet_steps, run

from fitdist.config import ModelConfig, load_config
from fitdist.ema import StudentEMA
from fitdist.models import build_model
from fitdist.trainer import train


def test_updates_follow_the_closed_form_with_warmup_and_every():
    torch.manual_seed(int(torch.randint(0, 1 << 30, ())))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.randn(2, 3, 6, 6))
    ema = StudentEMA(model, decay=0.9, every=2, warmup=True)
    want = {k: v.double().clone() for k, v in model.state_dict().items()}
    n = 0
    for step in range(1, 12):
        with torch.no_grad():  # a "training step": every float weight and buffer moves
            for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
                t.add_(torch.randn_like(t))
            model[1].num_batches_tracked += 1
        ema.maybe_update(step)
        if step % 2 == 0:
            d = min(0.9, (1 + n) / (10 + n))
            n += 1
            for k, v in model.state_dict().items():
                want[k] = d * want[k] + (1 - d) * v.double() if v.is_floating_point() else v.double()
    assert ema.updates == n == 5
    got = ema.module.state_dict()
    for k, v in want.items():
        assert got[k].dtype == model.state_dict()[k].dtype
        torch.testing.assert_close(got[k].double(), v, rtol=1e-6, atol=1e-6)  # float32 lerp vs float64
    assert got["1.num_batches_tracked"].item() == 11


def ema_config(tmp_path, name="ema"):
    return write_config(tmp_path / f"{name}.yaml", stages=[{"name": "a", "steps": 10}, {"name": "b", "steps": 8}],
                        train={"batch_size": 32, "log_every": 5, "eval_batch_size": 1000, "threads": 1,
                               "ema": {"decay": 0.9, "every": 2}})


def test_resume_reproduces_the_ema_exactly_and_it_is_exported_and_evaluated(tmp_path):
    overrides = ["deterministic=true", "train.checkpoint_every=5", "run.keep_checkpoints=10"]
    path = ema_config(tmp_path)
    cfg = load_config(path, overrides)
    summary = train(cfg)
    assert 0 <= summary["val_ema/top1"] <= 100 and summary["val_ema/n"] == 10000
    assert summary["val_ema/top1"] != summary["val/top1"] or summary["val_ema/loss"] != summary["val/loss"]
    full = (cfg.run_dir / "student_ema.pt").read_bytes()
    state = torch.load(cfg.run_dir / "student_ema.pt", weights_only=True)
    model = build_model(ModelConfig(**STUDENT), 10, 1)
    model.load_state_dict(state)  # a plain state_dict of the backbone
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    ckpt = torch.load(cfg.run_dir / "checkpoints" / "step-00000005" / "trainer.pt", weights_only=True)
    assert ckpt["ema"]["updates"] == 2
    for ckpt in sorted((cfg.run_dir / "checkpoints").iterdir()):  # "kill" the run after step 13
        if int(ckpt.name.split("-")[1]) > 13:
            shutil.rmtree(ckpt)
    (cfg.run_dir / "student_ema.pt").unlink()
    train(load_config(path, overrides), resume=True)
    assert (cfg.run_dir / "student_ema.pt").read_bytes() == full


def test_a_quiet_kd_step_with_ema_and_a_renormalising_teacher_makes_no_host_sync(tmp_path, trained_teacher):
    teacher = {**TEACHER, "weights": str(trained_teacher), "input": {"mean": [0.5], "std": [0.25], "size": 32}}
    config = quiet_config(tmp_path / "kd.yaml", {"ema": {"decay": 0.99}}, teacher=teacher,
                          stages=[{"name": "kd", "steps": STEPS, "kd": 1.0}])
    events = run(tmp_path, config, nproc=1)[0]
    assert quiet_steps(events, STEPS) == {s: [] for s in range(1, STEPS)}


def test_under_ddp_the_ema_adds_no_collective_and_is_exported(tmp_path):
    every = 3
    config = quiet_config(tmp_path / "ddp.yaml", {"ema": {"decay": 0.9}}, strategy={"kind": "ddp"},
                          run={"dir": str(tmp_path / "ddp"), "preempt_check_every": every})
    for events in run(tmp_path, config, nproc=2).values():  # the preemption agreement alone, as without the EMA
        assert quiet_steps(events, STEPS) == preemption_checks_only(every)
    ema = torch.load(tmp_path / "ddp" / "student_ema.pt", weights_only=True)
    student = torch.load(tmp_path / "ddp" / "student.pt", weights_only=True)
    assert ema.keys() == student.keys() and any(not torch.equal(ema[k], student[k]) for k in ema)



def test_under_deepspeed_zero2_the_ema_is_exported_and_zero3_nvme_offload_is_refused(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from test_cli_errors import assert_one_line_error

    zero = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"
    config = write_config(tmp_path / "ds.yaml", stages=[{"name": "train", "steps": 6}],
                          data={"source": "fashion-mnist", "train_subset": 512},
                          strategy={"kind": "deepspeed", "deepspeed_config": str(zero / "zero2.json")},
                          train={"batch_size": 16, "log_every": 3, "checkpoint_every": 0, "threads": 1,
                                 "eval_batch_size": 1000, "ema": {"decay": 0.9}})
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "DS_ACCELERATOR": "cpu",
           "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "fitdist.cli", "train", str(config)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "ds"
    ema = torch.load(run_dir / "student_ema.pt", weights_only=True)
    student = torch.load(run_dir / "student.pt", weights_only=True)
    build_model(ModelConfig(**STUDENT), 10, 1).load_state_dict(ema)
    assert all(v.dtype == torch.float32 for v in ema.values() if v.is_floating_point())
    assert any(not torch.equal(ema[k], student[k]) for k in ema)
    user = json.loads((zero / "zero3.json").read_text())
    user["zero_optimization"]["offload_param"] = {"device": "nvme", "nvme_path": str(tmp_path / "nvme")}
    (tmp_path / "nvme.json").write_text(json.dumps(user))
    nvme = [sys.executable, "-m", "fitdist.cli", "train", str(config), f"strategy.deepspeed_config={tmp_path / 'nvme.json'}"]
    assert_one_line_error(subprocess.run(nvme, env=env, capture_output=True, text=True, timeout=600, check=False),
                          "train.ema: not available under DeepSpeed ZeRO-3 with zero_optimization.offload_param.device nvme")


@pytest.mark.slow  # minutes of 2-process DeepSpeed / compilation: `bash launch/test.sh -m slow`
def test_under_deepspeed_zero3_the_ema_is_updated_per_partition_gathered_exported_and_resumed(tmp_path):
    """Two processes, ZeRO-3 with `stage3_param_persistence_threshold` 100 (the convolutions' weights
    partitioned), two stages (the student partitioned, made whole, partitioned again). The ranks end
    with the same EMA; it equals ZeRO-2's (same seed and global batch, whole weights: the reference)
    within fp32 reduction-order noise and is far from the student's weights; a run crashed mid-stage
    and resumed exports the same EMA bit for bit."""
    from test_deepspeed import ZERO2, ZERO3, crashed_after, torchrun

    user = json.loads(ZERO3.read_text())
    user["zero_optimization"]["stage3_param_persistence_threshold"] = 100
    (tmp_path / "zero3.json").write_text(json.dumps(user))
    config = write_config(tmp_path / "ds.yaml", stages=[{"name": "a", "steps": 4}, {"name": "b", "steps": 4}],
                          data={"source": "fashion-mnist", "train_subset": 512},
                          strategy={"kind": "deepspeed", "deepspeed_config": str(tmp_path / "zero3.json")},
                          train={"batch_size": 16, "log_every": 2, "checkpoint_every": 3, "threads": 1,
                                 "eval_batch_size": 1000, "ema": {"decay": 0.8}},
                          run={"dir": str(tmp_path / "a"), "keep_checkpoints": 10})
    a, z2 = tmp_path / "a", tmp_path / "z2"
    first = torchrun(config, tmp_path / "a.json")
    # DeepSpeed keeps each rank's own BatchNorm statistics (rank 0's are saved): the EMA's of those
    # buffers differ as the student's do, and every averaged parameter is the same on both ranks
    differ = {k.removeprefix("backbone.") for k in first["mismatched"]}
    assert first["world"] == 2 and all(k.endswith(("running_mean", "running_var")) for k in differ)
    assert set(first["ema_mismatched"]) == differ
    assert first["summary"]["val_ema/n"] == 10000
    assert load_pt(a / "checkpoints" / "step-00000003" / "trainer.pt")["ema"]["updates"] == 3
    ema, student = load_pt(a / "student_ema.pt"), load_pt(a / "student.pt")
    build_model(ModelConfig(**STUDENT), 10, 1).load_state_dict(ema)
    assert ema.keys() == student.keys() and all(v.dtype == torch.float32 for v in ema.values() if v.is_floating_point())

    reference = torchrun(config, tmp_path / "z2.json", f"run.dir={z2}", f"strategy.deepspeed_config={ZERO2}")
    ema2, student2 = load_pt(z2 / "student_ema.pt"), load_pt(z2 / "student.pt")
    for k in ema2:
        torch.testing.assert_close(student[k], student2[k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ema[k], ema2[k], rtol=1e-4, atol=1e-5)
    # the EMA is not the student: an export of the raw (or half-updated) weights would fail above
    assert max((ema[k] - student[k]).abs().max().item() for k in ema if ema[k].is_floating_point()) > 1e-2
    for key in ("val_ema/loss", "val_ema/top1"):  # each rank evaluated its share with its own (whole) EMA
        assert abs(first["summary"][key] - reference["summary"][key]) <= 1e-3 * max(1.0, abs(reference["summary"][key]))

    b = crashed_after(a, tmp_path / "b", 3)  # mid stage a: the resumed run crosses the stage boundary
    (b / "student_ema.pt").unlink()
    resumed = torchrun(config, tmp_path / "b.json", f"run.dir={b}", "run.resume=auto")
    assert set(resumed["ema_mismatched"]) == differ and resumed["summary"]["steps"] == 8
    again = load_pt(b / "student_ema.pt")
    assert all(torch.equal(again[k], ema[k]) for k in ema)


def load_pt(path):
    return torch.load(path, weights_only=True)


def test_under_zero3_an_update_reads_nothing_and_calls_no_collective_and_decay_0_is_the_student(tmp_path, monkeypatch):
    """One process (a 1-process group), ZeRO-3 as shipped: every EMA update takes the per-partition
    path and makes no host read and no collective (each gather one all-gather); with decay 0 the
    exported EMA is the final student exactly (weights and BatchNorm buffers)."""
    import os

    from test_deepspeed import ZERO3

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is first imported here
    import torch.distributed as tdist

    from fitdist import ema as ema_module

    inside, events, partitioned, gathers = [False], [], [], []
    real_update, real_gather = ema_module.StudentEMA.update, ema_module.StudentEMA.gather

    def update(self):
        inside[0] = True
        try:
            real_update(self)
        finally:
            inside[0] = False
        partitioned.append(len(self._partitioned))

    def gather(self):
        before = len(events)
        inside[0] = "gather"
        try:
            real_gather(self)
        finally:
            inside[0] = False
        gathers.append([name for _, name in events[before:]])
        del events[before:]

    def record(owner, name):
        real = getattr(owner, name)

        def wrapper(*a, **k):
            if inside[0]:
                events.append((inside[0], name))
            return real(*a, **k)
        monkeypatch.setattr(owner, name, wrapper)

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"):
        record(torch.Tensor, name)
    for name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                 "reduce_scatter_tensor", "barrier", "all_gather_object", "broadcast_object_list"):
        record(tdist, name)
    monkeypatch.setattr(ema_module.StudentEMA, "update", update)
    monkeypatch.setattr(ema_module.StudentEMA, "gather", gather)
    config = write_config(tmp_path / "z3.yaml", stages=[{"name": "train", "steps": 5}],
                          data={"source": "fashion-mnist", "train_subset": 256},
                          strategy={"kind": "deepspeed", "deepspeed_config": str(ZERO3)},
                          train={"batch_size": 16, "log_every": 2, "checkpoint_every": 0, "threads": 1,
                                 "eval_batch_size": 1000, "ema": {"decay": 0.0}})
    cfg = load_config(config)
    train(cfg)
    assert events == [] and len(partitioned) == 5 and min(partitioned) > 0
    assert ["all_gather"] in gathers and all(g in ([], ["all_gather"]) for g in gathers), gathers
    ema, student = load_pt(cfg.run_dir / "student_ema.pt"), load_pt(cfg.run_dir / "student.pt")
    assert ema.keys() == student.keys() and any("running_mean" in k for k in ema)
    for k in student:
        assert torch.equal(ema[k], student[k].to(ema[k].dtype)), k
