"""`fitdist quickstart`: the whole story on real Fashion-MNIST in one command.

Trains a teacher (reused when a finished one with the same config is present), then the same thin
deep student three ways (from scratch, with KD alone, with the FitNets two-stage recipe) and
prints one table: model, parameters, method, test top-1, wall time, and the inference speed of
teacher and student measured on this device (`fitdist bench infer`: img/s at batch 256 on CPU,
1024 on CUDA, and the student's speed-up over the teacher; also written to each summary.json).
Every run evaluates during training (`train.eval_every`), so `fitdist report runs/quickstart`
draws learning curves.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

from fitdist.config import Config, load_config, to_dict
from fitdist.trainer import train

RUNS = [  # (config, method shown in the table)
    ("fmnist-scratch", "scratch (labels only)"),
    ("fmnist-kd", "KD (λ 4→1, τ=3)"),
    ("fmnist-fitnets", "FitNets: hints, then KD"),
]


def config_path(name: str) -> Path:
    return Path(str(resources.files("fitdist") / "configs" / f"{name}.yaml"))


def _load(name: str, out: Path, scale: float, overrides: list[str], teacher: Path | None) -> Config:
    cfg = load_config(config_path(name), [f"run.dir={out / name}", *overrides])
    if cfg.teacher is not None and teacher is not None:
        cfg.teacher.weights = str(teacher)
    for stage in cfg.stages:
        if stage.epochs is not None:
            stage.epochs *= scale
        else:
            stage.steps = max(1, round(stage.steps * scale))
    if cfg.train.eval_every:  # a scaled run keeps its curve's points
        cfg.train.eval_every = max(1, round(cfg.train.eval_every * scale))
    return cfg


def _finished_with(cfg: Config) -> dict | None:
    """The summary of a finished run of exactly this config, if there is one."""
    summary, saved = cfg.run_dir / "summary.json", cfg.run_dir / "config.yaml"
    if not (summary.is_file() and (cfg.run_dir / "student.pt").is_file() and saved.is_file()):
        return None
    import yaml

    return json.loads(summary.read_text()) if yaml.safe_load(saved.read_text()) == to_dict(cfg) else None


def quickstart(out: str, scale: float = 1.0, overrides: list[str] = ()) -> list[dict]:
    out_dir = Path(out)
    teacher_cfg = _load("fmnist-teacher", out_dir, scale, overrides, None)
    teacher_cfg.run.resume = "auto"  # an interrupted teacher continues where it stopped
    rows = []
    summary = _finished_with(teacher_cfg)
    if summary is None:
        summary = train(teacher_cfg)
        rows.append(_row("teacher", summary, "trained on labels"))
    else:
        print(f"reusing the trained teacher in {teacher_cfg.run_dir}")
        rows.append(_row("teacher", summary, "trained on labels (reused)"))
    run_dirs = [teacher_cfg.run_dir]
    for name, method in RUNS:
        cfg = _load(name, out_dir, scale, overrides, teacher_cfg.run_dir / "student.pt")
        shutil.rmtree(cfg.run_dir, ignore_errors=True)  # students are retrained on every call
        rows.append(_row("student", train(cfg), method, [f"{s.name} {s.steps}" for s in cfg.stages]))
        run_dirs.append(cfg.run_dir)
    device = measure_speed(rows, run_dirs)
    table = format_table(rows) + f"\n\ninference {device}"
    (out_dir / "results.md").write_text(table + "\n")
    print("\n" + table)
    return rows


def measure_speed(rows: list[dict], run_dirs: list[Path]) -> str:
    """Times every run's model (`fitdist bench infer --record`, the teacher the reference); adds
    img/s and speed-up to the rows; returns what was measured where, for the table's note."""
    from fitdist.bench.infer import run

    res, heads = run([str(d) for d in run_dirs], teacher=str(run_dirs[0]), write=True)
    for row, (_, numbers) in zip(rows, heads):
        row["img_per_s"] = numbers["infer/img_per_s"]
        row["speedup"] = numbers.get("infer/speedup", 1.0)
    return (f"img/s: measured by `fitdist bench infer` on {res.device}, batch {max(res.batches)}, "
            f"best of {' / '.join(res.variants)}")


def _row(model: str, summary: dict, method: str, stages: list[str] | None = None) -> dict:
    return {"model": model, "params": summary["params"], "method": method,
            "stages": ", ".join(stages) if stages else f"train {summary['steps']}",
            "top1": summary["val/top1"], "wall_time_s": summary["wall_time_s"]}


def format_table(rows: list[dict]) -> str:
    lines = ["| model | params | method | stages (steps) | test top-1 | wall time | img/s | speed-up |",
             "|---|---:|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['params']:,} | {r['method']} | {r['stages']} | {r['top1']:.2f}% | "
              f"{r['wall_time_s']:.0f} s | {_speed(r, 'img_per_s', '{:,.0f}')} | {_speed(r, 'speedup', '{:.2f}×')} |"
              for r in rows]
    return "\n".join(lines)


def _speed(row: dict, key: str, fmt: str) -> str:
    return fmt.format(row[key]) if row.get(key) is not None else "—"
