"""DeepSpeed on CPU (`DS_ACCELERATOR=cpu`, gloo, loopback): config fields, ZeRO-2 on two processes
(trains, ranks identical, equals one process, saves, resumes exactly, refuses a file that would run
code), ZeRO-3 on two processes (parameters partitioned; equals ZeRO-2, saves, resumes exactly,
refuses a file that would run code) and on one (its uncut hint-stage forward leaves BatchNorm and
dropout as the cut one does; dry run), and bf16 on one process."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch.serialization import get_unsafe_globals_in_checkpoint

from fitdist.config import ModelConfig, TrainConfig, load_config
from fitdist.errors import UserError
from fitdist.models import build_model
from fitdist.strategy_deepspeed import deepspeed_config
from fitdist.trainer import train

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("ddp_worker.py")
ZERO2 = ROOT / "configs" / "deepspeed" / "zero2.json"
ZERO3 = ROOT / "configs" / "deepspeed" / "zero3.json"
TEACHER = {"name": "fitdist:fitnet", "kwargs": {"widths": [16, 32, 32], "pool_after": [1, 2]}}
STUDENT = {"name": "fitdist:fitnet", "kwargs": {"widths": [4, 4, 8, 8], "pool_after": [2], "batch_norm": False}}


def test_batch_precision_and_clipping_fields_are_written_from_fitdist_config():
    train_cfg = TrainConfig(batch_size=64, grad_accum=2)
    out = deepspeed_config({"zero_optimization": {"stage": 2}, "train_batch_size": "auto"}, train_cfg, "bf16", 4, 1.0)
    assert out["train_batch_size"] == 64 and out["gradient_accumulation_steps"] == 2
    assert out["train_micro_batch_size_per_gpu"] == 8  # 64 / (2 × 4)
    assert out["bf16"]["enabled"] and not out["fp16"]["enabled"] and out["gradient_clipping"] == 1.0
    for bad in ({"train_batch_size": 32}, {"gradient_accumulation_steps": 4}, {"bf16": {"enabled": False}},
                {"optimizer": {"type": "Adam"}}, {"zero_optimization": {"stage": 4}}):
        with pytest.raises(UserError):
            deepspeed_config(bad, train_cfg, "bf16", 4, 1.0)
    # ZeRO-3 keeps torch's own F.linear (DeepSpeed's replacement would be process-wide) unless told otherwise
    zero3 = deepspeed_config({"zero_optimization": {"stage": 3}}, train_cfg, "bf16", 4, 1.0)
    assert zero3["zero_optimization"] == {"stage": 3, "memory_efficient_linear": False}
    assert deepspeed_config(json.loads(ZERO3.read_text()), train_cfg, "bf16", 4, 1.0)["zero_optimization"]["stage"] == 3


def test_other_deepspeed_checkpoint_writers_are_refused():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is first imported here
    from deepspeed.runtime.checkpoint_engine import FastCheckpointEngine

    from fitdist.deepspeed_files import install

    engine = SimpleNamespace(checkpoint_engine=object.__new__(FastCheckpointEngine))  # as from the JSON
    with pytest.raises(UserError, match="FastCheckpointEngine is not supported"):
        install(engine)


@pytest.fixture(scope="module")
def ds_config(tmp_path_factory) -> Path:
    """Two-stage FitNets (hint, then KD with λ 4→1) with a random teacher: the mechanics, not accuracy."""
    root = tmp_path_factory.mktemp("deepspeed")
    torch.manual_seed(0)
    teacher = build_model(ModelConfig(**TEACHER), 10, 1, where="teacher")
    torch.save(teacher.state_dict(), root / "teacher.pt")
    cfg = {
        "name": "ds", "seed": 1, "student": STUDENT, "teacher": {**TEACHER, "weights": str(root / "teacher.pt")},
        "hints": [{"student": "conv3", "teacher": "conv2"}],
        "stages": [{"name": "hint", "steps": 4, "ce": 0, "hint": 1}, {"name": "kd", "steps": 6, "ce": 1, "kd": [4, 1]}],
        "optim": {"name": "sgd", "lr": 0.05, "schedule": "cosine"},
        "data": {"source": "fashion-mnist", "train_subset": 2048},
        "train": {"batch_size": 16, "grad_accum": 2, "log_every": 2, "threads": 1, "eval_batch_size": 1000,
                  "checkpoint_every": 3},
        "run": {"keep_checkpoints": 10},
        "strategy": {"kind": "deepspeed", "deepspeed_config": str(ZERO2)},
    }
    path = root / "ds.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def torchrun(config: Path, out: Path, *overrides: str) -> dict:
    result = launch(str(WORKER), str(config), str(out), *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def launch(*args: str, monitor: float = 0.1) -> subprocess.CompletedProcess:
    """Two processes under torchrun (`monitor`: seconds between its checks of the workers)."""
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "DS_ACCELERATOR": "cpu",
           "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--monitor-interval", str(monitor), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, env=env)


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def zero2_run(ds_config, tmp_path_factory) -> tuple[Path, dict]:
    """A finished two-process ZeRO-2 run: its directory and the worker's report."""
    root = tmp_path_factory.mktemp("zero2")
    return root / "a", torchrun(ds_config, root / "a.json", f"run.dir={root / 'a'}")


def crashed_after(run: Path, into: Path, step: int) -> Path:
    """A copy of `run` as a crash after `step` would have left it (6: mid KD stage; 3: mid hint stage)."""
    shutil.copytree(run, into)
    later = [p for p in (into / "checkpoints").glob("step-*") if int(p.name.removeprefix("step-")) > step]
    for gone in (*later, into / "student.pt", into / "summary.json"):
        shutil.rmtree(gone) if gone.is_dir() else gone.unlink()
    return into


def test_zero2_two_processes_trains_saves_and_resumes(ds_config, zero2_run, tmp_path):
    a, first = zero2_run
    assert first["world"] == 2 and first["mismatched"] == []  # regressors included
    assert first["summary"]["steps"] == 10 and first["summary"]["val/n"] == 10000
    # each rank saved its own ZeRO-2 optimizer partition; fitdist's checkpoint names the tag
    tag = a / "deepspeed" / "step-00000006"
    assert sorted(p.name for p in tag.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    trainer = load(a / "checkpoints" / "step-00000006" / "trainer.pt")
    assert trainer["optimizer"] == {"deepspeed_tag": "step-00000006"}
    # DeepSpeed's files hold non-tensor types: exactly ones the weights_only allowlist names
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is first imported here
    from fitdist.deepspeed_files import SAFE_TYPES

    held = set().union(*(get_unsafe_globals_in_checkpoint(f) for f in tag.glob("*.pt")))
    assert held and held <= set(SAFE_TYPES), held

    # same global batch in one process without DeepSpeed: the same student (no BatchNorm)
    single = tmp_path / "single"
    train(load_config(ds_config, ["strategy.kind=single", f"run.dir={single}"]))
    two, one = load(a / "student.pt"), load(single / "student.pt")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)

    # a crash after step 6: resume (weights_only loads) from that checkpoint, end exactly where `a` ended
    b = crashed_after(a, tmp_path / "b", 6)
    resumed = torchrun(ds_config, tmp_path / "b.json", f"run.dir={b}", "run.resume=auto")
    assert resumed["mismatched"] == [] and resumed["summary"]["steps"] == 10
    for k, v in load(a / "student.pt").items():
        torch.testing.assert_close(load(b / "student.pt")[k], v, rtol=0, atol=1e-7)


class RunsCode:
    """Unpickled with `weights_only=False`, it runs a shell command: one that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_zero2_resume_refuses_a_deepspeed_file_that_would_run_code(ds_config, zero2_run, tmp_path):
    c = crashed_after(zero2_run[0], tmp_path / "c", 6)
    marker = tmp_path / "code-ran"
    # rank 1's partition alone: rank 0 loads its own files fine and must still stop, not wait for rank 1
    crafted = c / "deepspeed" / "step-00000006" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": RunsCode(marker)}, crafted)
    control = tmp_path / "control"  # the payload is real: DeepSpeed's own engine would run it
    torch.save(RunsCode(control), tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()
    # a 5 s monitor: torchrun sees both ranks' own exit, not one stopped by it after the other failed
    result = launch("-m", "fitdist.cli", "train", str(ds_config), f"run.dir={c}", "wandb.mode=disabled",
                    "--resume", monitor=5)
    assert not marker.exists(), "a checkpoint file ran code"
    assert result.returncode != 0
    message = (f"fitdist: error: --resume: DeepSpeed checkpoint file {crafted} does not load: it asks for "
               f"posix.system, which a checkpoint may not hold (loading it could run code); "
               f"remove {c / 'checkpoints' / 'step-00000006'} to resume from the previous checkpoint")
    assert result.stderr.count(message) == 2, result.stderr[-3000:]  # both ranks, in one line each
    summary = re.findall(r"^\s*exitcode\s*:\s*(\S+)", result.stderr, re.MULTILINE)  # torchrun's, per rank
    assert summary == ["2", "2"], result.stderr[-3000:]
    assert not (c / "student.pt").exists()


@pytest.fixture(scope="module")
def zero3_run(ds_config, tmp_path_factory) -> tuple[Path, Path, dict]:
    """A finished two-process ZeRO-3 run: its directory, its DeepSpeed JSON and the worker's report.

    `configs/deepspeed/zero3.json` with `stage3_param_persistence_threshold` 100 instead of 10,000
    (under which all of this tiny student would stay whole): its weights of more than 100 elements
    (conv2-4, the regressor) are partitioned, while its biases, conv1 (36) and fc (80) stay whole
    on every rank, which ZeRO-3 gathers again at the end of a checkpoint load (a collective)."""
    root = tmp_path_factory.mktemp("zero3")
    user = json.loads(ZERO3.read_text())
    user["zero_optimization"]["stage3_param_persistence_threshold"] = 100
    (root / "zero3.json").write_text(json.dumps(user))
    over = [f"strategy.deepspeed_config={root / 'zero3.json'}"]
    return root / "a", root / "zero3.json", torchrun(ds_config, root / "a.json", f"run.dir={root / 'a'}", *over)


def test_zero3_two_processes_partitions_equals_zero2_saves_and_resumes(ds_config, zero2_run, zero3_run, tmp_path):
    a, zero3_json, first = zero3_run
    over = [f"strategy.deepspeed_config={zero3_json}"]
    assert first["world"] == 2 and first["mismatched"] == []  # whole again after the run, on both ranks
    assert first["summary"]["steps"] == 10 and first["summary"]["val/n"] == 10000
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is first imported here
    from fitdist.deepspeed_files import SAFE_TYPES, safe_types

    # fitdist's own checkpoint holds the gathered student, as under the other strategies
    plain = build_model(ModelConfig(**STUDENT), 10, 1, where="student")
    trainer = load(a / "checkpoints" / "step-00000003" / "trainer.pt")
    assert trainer["optimizer"] == {"deepspeed_tag": "step-00000003"}
    assert {k: v.shape for k, v in trainer["student"].items() if k.startswith("backbone.")} == {
        f"backbone.{k}": v.shape for k, v in plain.state_dict().items()}
    # the parameters themselves were partitioned: DeepSpeed's module state holds none of them, and
    # each rank's optimizer partition half of every trainable parameter (hint stage: conv1-3, regressor)
    trainable = ("backbone.conv1.", "backbone.conv2.", "backbone.conv3.", "regressors.")
    half = sum((v.numel() + 1) // 2 for k, v in trainer["student"].items() if k.startswith(trainable))
    tag = a / "deepspeed" / "step-00000003"
    for rank in (0, 1):
        with torch.serialization.safe_globals(safe_types()):
            model = torch.load(tag / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", weights_only=True)
            optim = torch.load(tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=True)
        assert model["module"] and all(v.numel() == 0 for v in model["module"].values())
        assert sum(t.numel() for t in optim["optimizer_state_dict"]["fp32_flat_groups"]) == half
    held = set().union(*(get_unsafe_globals_in_checkpoint(f) for f in tag.glob("*.pt")))
    assert held and held <= set(SAFE_TYPES), held  # no type beyond ZeRO 0-2's

    # student.pt: the same keys and fp32 weights as ZeRO-2's on the same seed and global batch, and
    # a plain model of the student's architecture loads it
    zero3, zero2 = load(a / "student.pt"), load(zero2_run[0] / "student.pt")
    assert zero3.keys() == zero2.keys()
    for k in zero2:
        assert zero3[k].dtype == torch.float32
        torch.testing.assert_close(zero3[k], zero2[k], rtol=1e-4, atol=1e-5)
    plain.load_state_dict(zero3)

    # a crash after step 3 (mid hint stage, frozen parameters in the engine): resume from it through
    # both stages and end exactly where `a` ended
    b = crashed_after(a, tmp_path / "b", 3)
    resumed = torchrun(ds_config, tmp_path / "b.json", f"run.dir={b}", "run.resume=auto", *over)
    assert resumed["mismatched"] == [] and resumed["summary"]["steps"] == 10
    for k, v in zero3.items():
        torch.testing.assert_close(load(b / "student.pt")[k], v, rtol=0, atol=1e-7)


def test_zero3_resume_refuses_a_deepspeed_file_that_would_run_code(ds_config, zero3_run, tmp_path):
    """ZeRO-3's load ends in a collective (the parameters kept whole gathered again): rank 0, whose
    files load, must not enter it while rank 1 stops; both stop with the same line instead."""
    a, zero3_json, _ = zero3_run
    c = crashed_after(a, tmp_path / "c", 6)
    marker = tmp_path / "code-ran"
    crafted = c / "deepspeed" / "step-00000006" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": RunsCode(marker)}, crafted)
    result = launch("-m", "fitdist.cli", "train", str(ds_config), f"run.dir={c}", "wandb.mode=disabled",
                    f"strategy.deepspeed_config={zero3_json}", "--resume", monitor=5)
    assert not marker.exists(), "a checkpoint file ran code"
    message = (f"fitdist: error: --resume: DeepSpeed checkpoint file {crafted} does not load: it asks for "
               f"posix.system, which a checkpoint may not hold (loading it could run code); "
               f"remove {c / 'checkpoints' / 'step-00000006'} to resume from the previous checkpoint")
    assert result.stderr.count(message) == 2, result.stderr[-3000:]
    summary = re.findall(r"^\s*exitcode\s*:\s*(\S+)", result.stderr, re.MULTILINE)
    assert summary == ["2", "2"], result.stderr[-3000:]
    assert not (c / "student.pt").exists()


def test_zero3_hint_stage_leaves_batchnorm_and_dropout_as_the_cut_forward_does(ds_config, tmp_path):
    """One process (a 1-process group), `configs/deepspeed/zero3.json` as shipped. ZeRO-3 runs the
    student's hint-stage forward to its logits instead of cutting it after the guided layer; a
    student with BatchNorm after that layer and dropout before its fc still ends as the single
    strategy's does: running statistics, and the RNG stream the KD stage's dropout draws from."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    student = 'student.kwargs={"widths": [4, 4, 8, 8], "pool_after": [2], "batch_norm": true, "dropout": 0.3}'
    train(load_config(ds_config, [student, "strategy.kind=single", f"run.dir={tmp_path / 'single'}"]))
    train(load_config(ds_config, [student, f"strategy.deepspeed_config={ZERO3}", f"run.dir={tmp_path / 'zero3'}"]))
    single, zero3 = load(tmp_path / "single" / "student.pt"), load(tmp_path / "zero3" / "student.pt")
    assert "conv4.1.running_mean" in single and single.keys() == zero3.keys()
    for k in single:
        torch.testing.assert_close(zero3[k], single[k], rtol=1e-4, atol=1e-5)


def test_zero3_dry_run_steps_every_stage(ds_config):
    """`--dry-run` ends each stage's engine like training does: the KD stage's probe sees the
    student whole again and trains its whole backbone."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from fitdist.dryrun import dry_run

    zero3 = dry_run(load_config(ds_config, [f"strategy.deepspeed_config={ZERO3}"]))["stages"]
    single = dry_run(load_config(ds_config, ["strategy.kind=single"]))["stages"]
    assert [s["trainable_params"] for s in zero3] == [s["trainable_params"] for s in single]
    for a, b in zip(zero3, single):
        assert a["terms"] == pytest.approx(b["terms"], rel=1e-5)


def test_bf16_one_process_exports_fp32_student(ds_config, tmp_path):
    """One process, no launcher (a 1-process group); bf16 master weights come back as fp32."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    summary = train(load_config(ds_config, ["train.precision=bf16", f"run.dir={tmp_path / 'bf16'}"]))
    assert summary["steps"] == 10
    state = load(tmp_path / "bf16" / "student.pt")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state.values())


def test_trainable_all_leaves_what_the_losses_do_not_reach_as_it_is(ds_config, tmp_path):
    """DeepSpeed steps a parameter without a gradient on a zero one (weight decay and momentum
    still move it), where torch's optimizers and DDP leave it: a `trainable: all` hint stage must
    leave the layers above the guided one as the other strategies do, untouched."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    stages = "stages=[{name: hint, steps: 3, ce: 0, hint: 1, trainable: all}]"
    cfg = load_config(ds_config, [stages, "optim.weight_decay=0.1", f"run.dir={tmp_path / 'all'}"])
    train(cfg)
    torch.manual_seed(cfg.seed)
    fresh = build_model(ModelConfig(**STUDENT), 10, 1).state_dict()
    state = load(tmp_path / "all" / "student.pt")
    changed = {k.split(".")[0] for k, v in state.items() if not torch.equal(v, fresh[k])}
    assert changed == {"conv1", "conv2", "conv3"}


@pytest.mark.parametrize("zero", [ZERO2, ZERO3])
def test_channels_last_trains_under_deepspeed(ds_config, tmp_path, zero):
    """DeepSpeed views each weight as bytes to flatten it: the student's weights stay contiguous and
    the images alone are channels_last (a channels_last weight made `deepspeed.initialize` fail)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    summary = train(load_config(ds_config, ["train.channels_last=true", f"strategy.deepspeed_config={zero}",
                                            f"run.dir={tmp_path / 'cl'}"]))
    assert summary["steps"] == 10
    assert all(torch.isfinite(v).all() for v in load(tmp_path / "cl" / "student.pt").values())


def test_bf16_with_batchnorm_on_the_cpu_is_a_clear_error(ds_config, tmp_path):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    cfg = load_config(ds_config, ["train.precision=bf16", "student.kwargs.batch_norm=true", f"run.dir={tmp_path / 'bn'}"])
    with pytest.raises(UserError, match=r"^train.precision: bf16 with strategy.kind=deepspeed on the CPU cannot run "
                                        r"a student with BatchNorm"):
        train(cfg)
