"""`fitdist bench infer RUN_OR_CONFIG ...`: measured inference speed of teacher and students.

The FitNets paper reports a speed-up column (13.36× for FitNet 1); parameters and MACs only
predict one. This times the models' forward passes on this device, the way a deployed student
runs: `eval()` mode, `torch.inference_mode()`, a fixed random batch, at batch 1 (latency) and a
large batch (throughput), in each memory format / precision the device supports:

- `fp32` (contiguous), `channels_last`;
- `bf16`, `bf16+channels_last`: weights and inputs cast to bfloat16, where the device supports
  it (CUDA with bf16, a CPU with oneDNN bf16 kernels).

All models and variants of one batch size are timed round-robin, the order rotating every round,
so that load on a shared machine hits every one of them alike; each figure is the median of `--rounds` timed calls after `--warmup`
untimed ones (CUDA: synchronised). A model's headline is its best variant at the large batch;
a student's speed-up is its headline img/s over its teacher's (the teacher of its config, or
`--teacher`). Each argument is a run directory (config.yaml; student.pt loaded when present) or
a YAML config (random weights: speed does not depend on them). Models of one architecture are
timed once. `--record` adds the headline to each run directory's `summary.json` (`infer/*` keys),
which `fitdist report` and the quickstart table show.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from fitdist.config import Config, ModelConfig, load_config
from fitdist.errors import UserError
from fitdist.evaluate_run import architecture
from fitdist.models import build_model, count_params, load_weights


@dataclass
class Target:
    """One model to time: its label, spec and where it came from."""

    label: str
    spec: ModelConfig
    shape: tuple[int, int, int]  # C, H, W of one input
    classes: int
    run_dir: Path | None = None  # a run directory whose summary.json `--record` updates
    weights: str | None = None
    teacher: Target | None = None  # the reference of its speed-up

    @property
    def key(self) -> str:
        return json.dumps([self.spec.name, self.spec.kwargs, self.shape, self.classes], sort_keys=True, default=str)


@dataclass
class Results:
    device: str
    batches: list[int]
    variants: list[str]
    rows: list[dict] = field(default_factory=list)  # one per (model key, batch, variant)

    def img_per_s(self, key: str, batch: int, variant: str | None = None) -> float | None:
        got = [r["img_per_s"] for r in self.rows if r["key"] == key and r["batch"] == batch
               and (variant is None or r["variant"] == variant)]
        return max(got) if got else None

    def best(self, key: str, batch: int) -> dict:
        return max((r for r in self.rows if r["key"] == key and r["batch"] == batch), key=lambda r: r["img_per_s"])


# ---------------------------------------------------------------- what to time


def _config_of(path: Path) -> tuple[Config, Path | None]:
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise UserError(f"bench infer: no config.yaml in {path} (is it a run directory?)")
        return load_config(path / "config.yaml"), path
    if path.suffix in (".yaml", ".yml"):
        return load_config(path), None
    raise UserError(f"bench infer: {path} is neither a run directory nor a YAML config")


def input_shape(cfg: Config) -> tuple[int, int, int, int]:
    """(classes, C, H, W) from the config alone, as a dry run finds them (no data read)."""
    from fitdist.dryrun import synthetic_data

    data = synthetic_data(cfg)
    return data.num_classes, data.in_channels, *data.image_size


def targets(paths: list[str], teacher: str | None = None) -> list[Target]:
    """Students (one per argument) with their teachers; `teacher` overrides the configs' teachers."""
    override = None
    if teacher is not None:
        cfg, run_dir = _config_of(Path(teacher))
        classes, *shape = input_shape(cfg)
        weights = run_dir / "student.pt" if run_dir and (run_dir / "student.pt").is_file() else None
        override = Target(f"teacher ({cfg.name})", cfg.student, tuple(shape), classes, None,
                          str(weights) if weights else None)
    found: list[Target] = []
    for p in paths:
        cfg, run_dir = _config_of(Path(p))
        classes, *shape = input_shape(cfg)
        weights = run_dir / "student.pt" if run_dir and (run_dir / "student.pt").is_file() else None
        student = Target(cfg.name, cfg.student, tuple(shape), classes, run_dir, str(weights) if weights else None)
        if override is not None:
            student.teacher = override
        elif cfg.teacher is not None:  # random weights: the teacher's file need not exist here
            spec = ModelConfig(cfg.teacher.name, cfg.teacher.kwargs, None)
            student.teacher = Target(f"teacher ({cfg.teacher.name})", spec, tuple(shape), classes)
        found.append(student)
    # A student of one argument can be the teacher of another (the quickstart's teacher run).
    by_key = {t.key: t for t in found}
    for t in found:
        if t.teacher is not None and t.teacher.key in by_key:
            t.teacher = by_key[t.teacher.key]
    return found


def _build(t: Target) -> torch.nn.Module:
    model = build_model(architecture(t.spec), t.classes, t.shape[0], where=t.label)
    if t.weights:
        load_weights(model, t.weights, where="bench infer")
    return model.eval()


# ---------------------------------------------------------------- timing


def describe_device(device: torch.device) -> str:
    """The device in words, as tables print it: `cuda: NVIDIA H200` or `cpu: AMD EPYC (2 threads)`."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"cpu: {name} ({threads} thread{'s' if threads > 1 else ''})"


def supported_variants(device: torch.device) -> list[str]:
    variants = ["fp32", "channels_last"]
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
    else:
        try:
            bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            bf16 = False
    return variants + (["bf16", "bf16+channels_last"] if bf16 else [])


def _prepared(model: torch.nn.Module, x: torch.Tensor, variant: str):
    """A (model, input) pair in the variant's precision and memory format (a copy of the model)."""
    import copy

    m, x = copy.deepcopy(model), x.clone()
    if variant.startswith("bf16"):
        m, x = m.to(torch.bfloat16), x.to(torch.bfloat16)
    if variant.endswith("channels_last"):
        m, x = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    return m, x


def measure(found: list[Target], batches: list[int], variants: list[str], device: torch.device,
            rounds: int = 15, warmup: int = 3) -> Results:
    """Median time of one forward per (model, batch, variant), models timed round-robin."""
    models: dict[str, tuple[Target, torch.nn.Module]] = {}
    for t in found:
        for m in (t.teacher, t):
            if m is not None and m.key not in models:
                models[m.key] = (m, _build(m).to(device))
    res = Results(describe_device(device), batches, variants)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    for batch in batches:
        # every (model, variant) of this batch size in one rotation: load that comes and goes on a
        # shared machine then hits all of them alike, and their ratios stay meaningful
        pairs = {}
        for key, (t, model) in models.items():
            x = torch.randn(batch, *t.shape, generator=gen).to(device)
            for variant in variants:
                pairs[key, variant] = _prepared(model, x, variant)
        times: dict[tuple[str, str], list[float]] = {k: [] for k in pairs}
        order = list(pairs)
        with torch.inference_mode():
            for r in range(warmup + rounds):
                for k in order[r % len(order):] + order[: r % len(order)]:  # the order rotates
                    m, x = pairs[k]
                    sync()
                    start = time.perf_counter()
                    m(x)
                    sync()
                    if r >= warmup:
                        times[k].append(time.perf_counter() - start)
        for (key, variant), ts in times.items():
            median = statistics.median(ts)
            res.rows.append({"key": key, "model": models[key][0].label, "batch": batch, "variant": variant,
                             "ms": median * 1e3, "img_per_s": batch / median})
        del pairs
    return res


# ---------------------------------------------------------------- headline, record, table


def headline(t: Target, res: Results) -> dict:
    """A model's numbers: best img/s at the large batch, batch-1 latency, speed-up over its teacher."""
    large, small = max(res.batches), min(res.batches)
    best = res.best(t.key, large)
    out = {"infer/img_per_s": best["img_per_s"], "infer/batch": large, "infer/variant": best["variant"],
           "infer/latency_ms": res.best(t.key, small)["ms"], "infer/latency_batch": small,
           "infer/device": res.device}
    if t.teacher is not None and t.teacher.key != t.key:
        teacher = res.best(t.teacher.key, large)["img_per_s"]
        out.update({"infer/teacher_img_per_s": teacher, "infer/speedup": best["img_per_s"] / teacher,
                    "infer/speedup_latency": res.best(t.teacher.key, small)["ms"] / out["infer/latency_ms"]})
    return out


def record(t: Target, numbers: dict) -> Path | None:
    """Adds `numbers` to the run's summary.json (nothing when the target is not a finished run)."""
    if t.run_dir is None or not (t.run_dir / "summary.json").is_file():
        return None
    path = t.run_dir / "summary.json"
    summary = json.loads(path.read_text())
    summary.update(numbers)
    path.write_text(json.dumps(summary, indent=1) + "\n")
    return path


def run(paths: list[str], teacher: str | None = None, batches: list[int] | None = None,
        variants: list[str] | None = None, device: str = "auto", rounds: int = 15, warmup: int = 3,
        write: bool = False) -> tuple[Results, list[tuple[Target, dict]]]:
    """Times the models of `paths` (and their teachers); the headline of each student."""
    from fitdist.dist import pick_device

    dev = pick_device(device, 0)
    batches = batches or [1, 1024 if dev.type == "cuda" else 256]
    supported = supported_variants(dev)
    variants = variants or supported
    for v in variants:
        if v not in supported:
            raise UserError(f"bench infer: --variants: {v!r} is not supported here (supported: {', '.join(supported)})")
    found = targets(paths, teacher)
    res = measure(found, batches, variants, dev, rounds, warmup)
    heads = [(t, headline(t, res)) for t in found]
    if write:
        for t, numbers in heads:
            record(t, numbers)
    return res, heads


def format_table(res: Results, heads: list[tuple[Target, dict]]) -> str:
    large, small = max(res.batches), min(res.batches)
    lines = [f"measured on {res.device}, torch {torch.__version__}; median of timed forwards, eval + inference_mode",
             "",
             f"| model | params | latency, batch {small} (ms) | img/s, batch {large} | best variant | speed-up |",
             "|---|---:|---:|---:|---|---:|"]
    shown = set()
    rows = []
    for t, h in heads:
        if t.teacher is not None and t.teacher.key not in shown and t.teacher.key not in {s.key for s, _ in heads}:
            rows.append((t.teacher, headline(replace(t.teacher, teacher=None), res)))
            shown.add(t.teacher.key)
        rows.append((t, h))
    for t, h in rows:
        params = count_params(build_model(architecture(t.spec), t.classes, t.shape[0], where=t.label))
        speedup = f"{h['infer/speedup']:.2f}×" if "infer/speedup" in h else "1× (reference)" if any(
            s.teacher is not None and s.teacher.key == t.key for s, _ in heads) else "—"
        lines.append(f"| {t.label} | {params:,} | {h['infer/latency_ms']:.2f} | {h['infer/img_per_s']:,.0f} | "
                     f"{h['infer/variant']} | {speedup} |")
    detail = ["", "img/s per variant:", "", f"| model | batch | {' | '.join(res.variants)} |", "|---|---:|" + "---:|" * len(res.variants)]
    labels = {}
    for t, _ in rows:
        labels.setdefault(t.key, t.label)
    for key, label in labels.items():
        for b in res.batches:
            cells = [f"{res.img_per_s(key, b, v):,.0f}" for v in res.variants]
            detail.append(f"| {label} | {b} | {' | '.join(cells)} |")
    return "\n".join(lines + detail)


def main(argv: list[str] | None = None) -> int:
    from fitdist.cli import _Parser

    p = _Parser(prog="fitdist bench infer", description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", help="run directories or YAML configs (their students are timed)")
    p.add_argument("--teacher", help="the speed-up's reference (a run or config); default: each config's teacher")
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes (default: 1 and 256 on CPU, 1024 on CUDA)")
    p.add_argument("--variants", nargs="+", help="subset of fp32 channels_last bf16 bf16+channels_last")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--rounds", type=int, default=15, help="timed forwards per figure (median; default 15)")
    p.add_argument("--warmup", type=int, default=3, help="untimed forwards first (default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--record", action="store_true", help="add the results to each run's summary.json")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rounds < 1 or args.warmup < 0 or any(b < 1 for b in args.batch or []):
        raise UserError("bench infer: --rounds and --batch must be >= 1, --warmup >= 0")
    res, heads = run(args.paths, args.teacher, args.batch, args.variants, args.device, args.rounds,
                     args.warmup, args.record)
    if args.json:
        print(json.dumps({"device": res.device, "rows": res.rows,
                          "students": {t.label: h for t, h in heads}}, indent=1))
    else:
        print(format_table(res, heads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
