"""Typed run configuration: dataclasses, YAML loading and dotted `key=value` overrides.

Every knob lives here with a one-line comment. Unknown keys and wrongly typed values are
`UserError`s naming the key (and the closest valid one), so the CLI exits with status 2.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from fitdist.errors import UserError, did_you_mean
from fitdist.kernels import IMPLS
from fitdist.losses import HINT_REDUCTIONS
from fitdist.precision import PRECISIONS
from fitdist.regressors import REGRESSOR_KINDS

Weight = float | list[float]  # a constant, or [start, end] annealed linearly over the stage

# YAML 1.1 (PyYAML) reads an exponent without a dot, 1e-6, as a string: accepted where a float is due
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


@dataclass
class ModelConfig:
    name: str = "fitdist:fitnet"  # torchvision:<name> | fitdist:<zoo name> | pkg.module:factory
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra factory arguments
    # a local state_dict file (e.g. a trained teacher's student.pt), or pretrained weights by name for a
    # torchvision model: torchvision:<Enum>.<TAG> | torchvision:<TAG> | torchvision:DEFAULT (torch hub cache)
    weights: str | None = None
    # pretrained weights predicting another class count than the data's: keep (an error) | reset (a new
    # classifier for the data's classes; students only: a teacher's logits must be trained ones)
    head: Literal["keep", "reset"] = "keep"


@dataclass
class TeacherInputConfig:
    """The input the teacher was trained on; the student's batch is re-made so on the device."""

    # per-channel statistics (None: those of the named pretrained weights, else the data's own)
    mean: list[float] | None = None
    std: list[float] | None = None
    # square input side in pixels (None: the named pretrained weights' own, else the data's image size)
    size: int | None = None


@dataclass
class TeacherConfig(ModelConfig):
    precision: Literal[PRECISIONS] = "fp32"  # the teacher's own forward precision
    channels_last: bool = False  # run the teacher in channels_last memory format
    input: TeacherInputConfig = field(default_factory=TeacherInputConfig)  # see fitdist/teacher_input.py
    # the handle hints' `from` names (None: the model name after its last ':' or '.', e.g. resnet50)
    id: str | None = None
    weight: float = 1.0  # this teacher's share of an ensemble's target (> 0; normalised to sum 1)


@dataclass
class HintConfig:
    student: str = ""  # module path of the guided layer in the student
    teacher: str = ""  # module path of the hint layer in the teacher
    regressor: Literal[REGRESSOR_KINDS] = "auto"  # see fitdist/regressors.py
    bn: bool = False  # BatchNorm after the regressor
    # ReLU after the regressor. The paper gives the regressor the hint layer's non-linearity: true
    # when the teacher's hint is post-ReLU (fitdist:fitnet `convN`, ResNet `layerN`), false when it
    # can be negative (a pre-activation such as a WRN block's residual sum, a maxout output)
    relu: bool = False
    # the teacher the hint layer is in: its id or index in `teachers` (YAML key `from`; None: the first)
    from_: str | int | None = field(default=None, metadata={"key": "from"})


@dataclass
class LossConfig:
    temperature: float = 3.0  # KD temperature τ (FitNets default 3)
    hint_reduction: Literal[HINT_REDUCTIONS] = "mean"  # mean: MSE; paper: ½·Σ(diff²)/batch
    # KD term as λ·T²·KL (Hinton et al.); false: λ·KL, the scale of FitNets' λ·H(P_t^τ, P_s^τ),
    # with which the paper's λ 4→1 was chosen (the two differ by T², i.e. 9× at τ = 3)
    kd_t2: bool = True
    impl: Literal[IMPLS] = "auto"  # see fitdist/kernels (auto: fused)
    # several teachers' KD target (fitdist/ensemble.py): mean_probs: Σ wᵢ·softmax(tᵢ/T) (Hinton);
    # mean_logits: softmax(Σ wᵢ·tᵢ/T), a geometric mean of the probabilities; sample: one teacher per micro-step
    ensemble: Literal["mean_probs", "mean_logits", "sample"] = "mean_probs"


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw", "rmsprop"] = "sgd"
    lr: float = 0.05  # base learning rate (before optional world-size scaling)
    momentum: float = 0.9  # sgd / rmsprop momentum
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    alpha: float = 0.99  # rmsprop smoothing
    eps: float = 1e-8
    schedule: Literal["constant", "cosine", "multistep"] = "cosine"  # per stage, step-based
    warmup_steps: int = 0  # linear warm-up at the start of each stage
    milestones: list[float] = field(default_factory=list)  # multistep: fractions of the stage (0.5) or steps
    gamma: float = 0.1  # multistep decay factor
    min_lr: float = 0.0  # cosine floor
    scale_lr: Literal["none", "linear"] = "none"  # linear: lr × world size
    max_grad_norm: float = 0.0  # clip the gradient norm (0 = off)
    # clip each output unit's incoming-weight L2 norm (Conv/Linear weights) to this after every step,
    # as pylearn2's maxout/FitNets training did (0 or null = off; see fitdist/max_norm.py)
    max_norm: float | None = 0.0


@dataclass
class StageConfig:
    name: str = "train"
    steps: int | None = None  # optimizer steps in this stage; or:
    # passes over the training set (steps = ⌈epochs × samples / train.batch_size⌉, from the data's
    # size at the start of training): scaling the batch then keeps the epochs, not the steps
    epochs: float | None = None
    ce: Weight = 1.0  # weight of cross-entropy with the labels
    # λ: weight of the KD term; [4, 1] anneals linearly (FitNets stage 2). By default λ multiplies
    # T²·KL(P_t^τ ‖ P_s^τ), Hinton's scale; loss.kd_t2: false makes it multiply the KL alone, the
    # scale of FitNets' λ·H(P_t^τ, P_s^τ) for which its λ 4 → 1 was chosen (T² = 9× less at τ = 3)
    kd: Weight = 0.0
    hint: Weight = 0.0  # weight of the hint loss(es)
    # A term whose weight is ever non-zero is computed on every step of the stage (at weight 0 too).
    # auto: freeze what the stage's losses do not reach (FitNets stage 1: the student above its
    # guided layer); all: keep it trainable (it still gets no gradient and stays as it is)
    trainable: Literal["auto", "all"] = "auto"
    optim: OptimConfig | None = None  # this stage's keys over the top-level optim (None: that one)


@dataclass
class DataConfig:
    source: Literal["fashion-mnist", "webdataset"] = "fashion-mnist"
    root: str | None = None  # directory of the source files (None: the standard places)
    download: bool = True  # fall back to torchvision's downloader when no local copy is found
    train: str | None = None  # webdataset: training shards (brace pattern, pipe:cmd, http(s) URL)
    val: str | None = None  # webdataset: validation shards
    num_classes: int | None = None  # None: from the source or the shards' manifest
    image_size: int | None = None  # train crop / eval resize side (None: native size)
    augment: Literal["auto", "none", "light", "cifar", "imagenet"] = "auto"
    mean: list[float] | None = None  # per-channel normalisation (None: the dataset's own)
    std: list[float] | None = None
    num_workers: int = 0  # loader worker processes per rank
    shuffle_buffer: int = 256  # webdataset: samples per loader worker, filled before its first batch
    shard_mix: int = 8  # webdataset: training shards each loader worker reads at once, interleaved
    # webdataset: seconds a pipe:/http(s) shard may send nothing before the run fails naming it
    read_timeout: float = 300.0  # (0: wait forever)
    train_subset: int = 0  # use only the first N training samples (0 = all)
    # webdataset: directory of stored teacher soft labels (`fitdist label`); KD reads them, no teacher forward
    soft_labels: str | None = None


@dataclass
class EmaConfig:
    """An exponential moving average of the student (fitdist/ema.py), evaluated and exported beside it."""

    decay: float = 0.9998  # ema ← decay·ema + (1 − decay)·student
    every: int = 1  # optimizer steps between updates
    warmup: bool = True  # decay ramps as min(decay, (1 + n)/(10 + n)) after n updates (timm's ModelEmaV3)


@dataclass
class TrainConfig:
    batch_size: int = 128  # global batch per optimizer step (all ranks, all micro-steps)
    grad_accum: int = 1  # micro-steps per optimizer step
    eval_batch_size: int = 512  # per rank
    precision: Literal[PRECISIONS] = "fp32"  # autocast precision of the student
    log_every: int = 50  # steps between metrics.jsonl rows
    eval_every: int = 0  # steps between evaluations (0: end of each stage only)
    checkpoint_every: int = 500  # steps between checkpoints (0: end of each stage only)
    channels_last: bool = False  # student in channels_last memory format
    # torch.compile the student's and teacher's forward, hint capture and stage-1 cut included;
    # a model that does not compile whole runs eager, with one warning (fitdist/compile.py)
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"  # torch.compile mode
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch intra-op threads (0: leave torch's default)
    max_skipped_steps: int = 20  # stop after this many consecutive non-finite steps
    ema: EmaConfig | None = None  # student EMA (None: off); exported as student_ema.pt
    # per-layer activation RMS and dead-unit fraction of the student in each log row (diag/<layer>/rms,
    # /dead), measured on the log step's micro-batch only: true (the guided layer and 3 above it), or layer paths
    diagnostics: bool | list[str] = False


@dataclass
class RunConfig:
    dir: str | None = None  # run directory (None: runs/<name>)
    resume: Literal["none", "auto"] = "none"  # auto: continue from the latest checkpoint
    keep_checkpoints: int = 2  # how many checkpoints to keep
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])  # save, then exit 75
    # several processes agree on a signal every this many steps (one CPU all-reduce): the bound on
    # the steps between a signal and the checkpoint
    preempt_check_every: int = 10


@dataclass
class WandbConfig:
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: offline without an API key
    project: str = "fitdist"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class StrategyConfig:
    kind: Literal["single", "ddp", "deepspeed"] = "single"  # launch ddp/deepspeed with torchrun
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    sync_bn: bool = False  # convert the student's BatchNorm to SyncBatchNorm under DDP
    # deepspeed: a DeepSpeed JSON (ZeRO stage etc.); batch, precision and clipping fields are
    # written from train.* / optim.*, so a value there that disagrees is an error
    deepspeed_config: str | None = None


@dataclass
class Config:
    name: str = "run"  # run name (run directory and W&B run name)
    seed: int = 0
    deterministic: bool = False  # deterministic algorithms and data order
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig | None = None  # None: train on labels alone (the same as teachers: [it])
    teachers: list[TeacherConfig] = field(default_factory=list)  # an ensemble (loss.ensemble); teacher is the first
    hints: list[HintConfig] = field(default_factory=list)
    loss: LossConfig = field(default_factory=LossConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig(steps=1000)])
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir or f"runs/{self.name}")


# ---------------------------------------------------------------- building from plain data


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if typing.get_origin(tp) is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against the annotation `tp`; dataclasses are built recursively."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = _unwrap_optional(tp)
        if dataclasses.is_dataclass(inner) and isinstance(value, dict):  # errors inside name their key
            return _build(inner, value, key)
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except UserError as e:
                errors.append(e)
        names = " or ".join(_type_name(a) for a in args)
        raise UserError(f"{key}: expected {names}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise UserError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise UserError(f"{key}: expected {tp.__name__}, got {value!r}")
    if not isinstance(value, tp):
        raise UserError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _key(f: dataclasses.Field) -> str:
    """A field's key as users write it (`from` for the field `from_`, a Python keyword)."""
    return f.metadata.get("key", f.name)


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {_key(f): f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            valid = [f"{prefix}.{n}" if prefix else n for n in fields]
            raise UserError(f"unknown config key {key!r}{did_you_mean(key, valid)}")
        kwargs[fields[k]] = _convert(v, hints[fields[k]], key)
    return cls(**kwargs)


def _default_for(tp: Any) -> Any:
    """A default value to create when an override reaches into an unset optional section."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return {}
    return None


def _set_dotted(data: dict, cls: type, dotted: str, value: Any) -> None:
    """Sets `a.b.0.c = value` inside plain `data`, checking each key against the dataclasses."""
    parts = dotted.split(".")
    node, tp = data, cls
    for i, part in enumerate(parts):
        key = ".".join(parts[: i + 1])
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(f"override {dotted!r}: {key} is out of range (list has {len(node)} items)")
            idx = int(part)
            if last:
                node[idx] = value
                return
            node, tp = node[idx], typing.get_args(tp)[0]
            continue
        fields = {_key(f): f for f in dataclasses.fields(tp)} if dataclasses.is_dataclass(tp) else None
        if fields is None:  # free-form dict such as model kwargs
            if last:
                node[part] = value
                return
            node = node.setdefault(part, {})
            continue
        if part not in fields:
            prefix = ".".join(parts[:i])
            valid = [f"{prefix}.{n}" if prefix else n for n in fields]
            raise UserError(f"unknown config key {key!r}{did_you_mean(key, valid)}")
        ftype = typing.get_type_hints(tp)[fields[part].name]
        if last:
            node[part] = value
            return
        if node.get(part) is None:
            node[part] = _plain_default(fields[part]) or _default_for(ftype) or {}
        node = node[part]
        tp = _unwrap_optional(ftype)


def _unwrap_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def _plain_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return to_dict(f.default_factory())
    return None if f.default is dataclasses.MISSING else to_dict(f.default)


def to_dict(obj: Any) -> Any:
    """Plain YAML-able data from a config (dataclasses become dicts)."""
    if dataclasses.is_dataclass(obj):
        return {_key(f): to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` with the value parsed as YAML (`0.1` → float, `[4, 1]` → list, `null`)."""
    if "=" not in text:
        raise UserError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return key.strip(), raw


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Config from a YAML file (or the defaults) plus dotted overrides, fully validated."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise UserError(f"{path}:{where} is not valid YAML") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: the top level must be a mapping")
        data.setdefault("name", path.stem)
    # Overrides edit the data as written (no defaults filled in), so that a stage's optim block
    # holds only the keys the user set when it is merged over the top-level one below.
    # Each state is type-checked before the next override descends into it, and the last before
    # the merge copies the top-level optim keys into stages: errors name keys where they were written.
    _build(Config, data)
    for text in overrides:
        _set_dotted(data, Config, *parse_override(text))
        _build(Config, data)
    if data.get("teacher") is not None and data.get("teachers"):
        raise UserError("teacher and teachers: give one of them (a single teacher: X is teachers: [X])")
    return validate(_build(Config, _merge_stage_optims(data)))


def _merge_stage_optims(data: dict) -> dict:
    """Each stage's `optim` keys over the top-level `optim` block, both as the user wrote them."""
    top = data.get("optim") or {}
    for stage in data.get("stages") or []:
        if stage.get("optim") is not None:
            stage["optim"] = {**top, **stage["optim"]}
    return data


def validate(cfg: Config) -> Config:
    """Cross-field checks that types alone cannot express."""
    _validate_teachers(cfg)
    if not cfg.stages:
        raise UserError("stages: the stage list is empty")
    for i, st in enumerate(cfg.stages):
        if (st.steps is None) == (st.epochs is None):
            raise UserError(f"stages.{i} ({st.name}): give steps or epochs, one of them "
                            f"(got steps {st.steps}, epochs {st.epochs})")
        if st.steps is not None and st.steps <= 0:
            raise UserError(f"stages.{i}.steps: must be > 0, got {st.steps}")
        if st.epochs is not None and not st.epochs > 0:
            raise UserError(f"stages.{i}.epochs: must be > 0, got {st.epochs}")
        for term in ("ce", "kd", "hint"):
            w = getattr(st, term)
            if isinstance(w, list) and len(w) != 2:
                raise UserError(f"stages.{i}.{term}: a schedule is [start, end], got {w}")
        uses_teacher = any(nonzero_weight(getattr(st, t)) for t in ("kd", "hint"))
        if uses_teacher and cfg.teacher is None:
            raise UserError(f"stages.{i} ({st.name}): kd/hint weights need a teacher, but teacher is null")
        if nonzero_weight(st.hint) and not cfg.hints:
            raise UserError(f"stages.{i} ({st.name}): hint weight set, but the hints list is empty")
        if not any(nonzero_weight(getattr(st, t)) for t in ("ce", "kd", "hint")):
            raise UserError(f"stages.{i} ({st.name}): all loss weights (ce, kd, hint) are zero")
    for i, h in enumerate(cfg.hints):
        if not h.student or not h.teacher:
            raise UserError(f"hints.{i}: both 'student' and 'teacher' module paths are required")
    if cfg.train.batch_size <= 0 or cfg.train.grad_accum <= 0:
        raise UserError("train.batch_size and train.grad_accum must be > 0")
    if cfg.loss.temperature <= 0:
        raise UserError(f"loss.temperature: must be > 0, got {cfg.loss.temperature}")
    for where, optim in [("optim", cfg.optim)] + [(f"stages.{i}.optim", s.optim) for i, s in enumerate(cfg.stages)]:
        if optim is not None and optim.max_norm is not None and not optim.max_norm >= 0:
            raise UserError(f"{where}.max_norm: must be >= 0 (0 or null = off), got {optim.max_norm}")
    ema = cfg.train.ema
    if ema is not None and not (0.0 <= ema.decay < 1.0 and ema.every >= 1):
        raise UserError(f"train.ema: decay must be in [0, 1) and every >= 1, got decay {ema.decay}, every {ema.every}")
    if cfg.loss.impl == "triton" and cfg.deterministic and cfg.hints:
        raise UserError("loss.impl: 'triton' sums the hint gradients with atomics, in no fixed order; "
                        "deterministic: true needs loss.impl auto or fused")
    return cfg


def _validate_teachers(cfg: Config) -> None:
    """`teacher` and `teachers` made one list (`teachers`, `teacher` its first: the same objects),
    ids unique, weights positive, and each hint's `from` naming one of them."""
    if cfg.teacher is not None and cfg.teachers and cfg.teacher != cfg.teachers[0]:  # built in code, not loaded
        raise UserError("teacher and teachers: give one of them (a single teacher: X is teachers: [X])")
    if cfg.teacher is not None and not cfg.teachers:
        cfg.teachers = [cfg.teacher]
    elif cfg.teachers:
        cfg.teacher = cfg.teachers[0]
    ids = teacher_ids(cfg)
    for i, (t, tid) in enumerate(zip(cfg.teachers, ids)):
        key = teacher_key(cfg, i)
        if not t.weight > 0:
            raise UserError(f"{key}.weight: must be > 0, got {t.weight}")
        if tid in ids[:i]:
            raise UserError(f"teachers.{ids.index(tid)} and teachers.{i} both have the id {tid!r}: "
                            "give each an `id` of its own")
    for i in range(len(cfg.hints)):
        hint_teacher(cfg, i)


def teacher_key(cfg: Config, i: int) -> str:
    """The config key of teacher `i` in errors: `teacher` alone, `teachers.i` in an ensemble."""
    return "teacher" if len(cfg.teachers) <= 1 else f"teachers.{i}"


def teacher_list(cfg: Config) -> list[TeacherConfig]:
    """Every teacher of `cfg` (`teachers`, or `[teacher]` for a config not yet validated)."""
    return cfg.teachers or ([cfg.teacher] if cfg.teacher is not None else [])


def teacher_ids(cfg: Config) -> list[str]:
    """Each teacher's handle: its `id`, else its model name after the last ':' or '.'."""
    return [t.id or re.split(r"[:.]", t.name)[-1] for t in teacher_list(cfg)]


def hint_teacher(cfg: Config, i: int) -> int:
    """The index in `teachers` of the teacher hint `i` reads (its `from`: an id or an index)."""
    src, ids = cfg.hints[i].from_, teacher_ids(cfg)
    if src is None:
        return 0
    if isinstance(src, int):
        if not 0 <= src < len(ids):
            raise UserError(f"hints.{i}.from: no teacher {src}; there are {len(ids)} (0 to {len(ids) - 1})")
        return src
    if src not in ids:
        raise UserError(f"hints.{i}.from: no teacher {src!r}; the teachers are {', '.join(ids) or 'none'}")
    return ids.index(src)


def nonzero_weight(w: Weight) -> bool:
    return any(v != 0 for v in w) if isinstance(w, list) else w != 0


def dump_config(cfg: Config, path: Path) -> None:
    """The config as YAML, its teachers in one of the two forms (`teacher` for one, else `teachers`)."""
    data = to_dict(cfg)
    if len(cfg.teachers) > 1:
        data["teacher"] = None
    else:
        data["teachers"] = []
    path.write_text(yaml.safe_dump(data, sort_keys=False))
