"""`fitdist report RUN_DIR [RUN_DIR ...] --out DIR`: plots and a results table from finished runs.

A directory that is not itself a run (no `metrics.jsonl`) stands for every run below it, as a
TensorBoard log directory does: `fitdist report runs/quickstart` reports the teacher and the three
students. Reads each run directory's `metrics.jsonl` (one row per log step), `summary.json` (final
evaluation, written at the end of a run) and `config.yaml` (the resolved config), and writes to
`--out`:

- `loss-<run>.png`: the training loss terms (`train/loss`, `ce`, `kd`, `hint`), one panel per stage;
- `schedule.png`: λ (the KD weight) and the learning rate against the global step, every run;
- `diag-<run>.png` (runs with `train.diagnostics`): activation RMS and dead-unit fraction of each
  watched layer against the global step, stage ends as dashed lines, hint-only stages shaded;
- `val_top1.png`: validation top-1 of every run on one chart, one curve per run (seeds of one
  config: each run thin, their mean bold). Points from hint-only stages (FitNets stage 1: no
  weight on ce or kd, so the classifier is untrained and scores chance) are left out and the span
  of those stages is shaded instead;
- `results.md`: one table row per run with its final numbers (and the measured inference img/s and
  speed-up over the teacher, when `fitdist bench infer --record` or the quickstart put them in
  `summary.json`) and, when several runs share a config name (seeds), one row per config with the
  mean ± sample standard deviation over its runs.

Unfinished runs (no `summary.json`) are reported from their last evaluated row and marked as such.
Bad input (a missing directory, no or an empty `metrics.jsonl`, a line that is not JSON) is a
`UserError` naming the path, so the CLI prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fitdist.errors import UserError

TERMS = ("train/loss", "train/ce", "train/kd", "train/hint")


@dataclass
class Run:
    name: str
    path: Path
    rows: list[dict]
    summary: dict | None = None
    config: dict = field(default_factory=dict)

    def stages(self) -> list[str]:
        """Stage names in the order they ran."""
        seen: list[str] = []
        for row in self.rows:
            if row.get("stage") not in seen:
                seen.append(row.get("stage"))
        return seen

    def hint_only_stages(self) -> set[str]:
        """Stages whose ce and kd weights are zero throughout: the classifier does not train."""
        def zero(w) -> bool:
            return all(v == 0 for v in w) if isinstance(w, list) else not w

        return {st.get("name") for st in self.config.get("stages") or []
                if zero(st.get("ce", 1.0)) and zero(st.get("kd", 0.0))}

    def val_curve(self, key: str = "val/top1") -> dict[int, float]:
        """Validation top-1 by step (`val_ema/top1`: the student EMA's), hint-only stages left out."""
        hint_only = self.hint_only_stages()
        return {r["step"]: r[key] for r in self.rows if key in r and r.get("stage") not in hint_only}

    def hint_spans(self) -> list[tuple[int, int]]:
        """(first, last) global step span of each hint-only stage, from the config's step counts."""
        spans, start = [], 0
        for st in self.config.get("stages") or []:
            steps = int(st.get("steps", 0))
            if st.get("name") in self.hint_only_stages():
                spans.append((start, start + steps))
            start += steps
        return spans

    def final(self) -> dict:
        """Final metrics: `summary.json`, or else the last evaluated row (unfinished run)."""
        if self.summary is not None:
            return self.summary
        evaluated = [r for r in self.rows if "val/top1" in r]
        return {**(evaluated[-1] if evaluated else {}), "unfinished": True}


def find_runs(path: str | Path) -> list[Path]:
    """`path` itself when it is a run directory, else every run directory below it, sorted."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"report: run directory not found: {path}")
    if (path / "metrics.jsonl").is_file():
        return [path]
    found = sorted(m.parent for m in path.rglob("metrics.jsonl"))
    # a run inside another run's directory (none today) would be reported once, as its own run
    if not found:
        raise UserError(f"report: no metrics.jsonl in {path} or below it (is it a run directory?)")
    return found


def read_run(path: str | Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"report: run directory not found: {path}")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"report: no metrics.jsonl in {path} (is it a run directory?)")
    rows = []
    for i, line in enumerate(metrics.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"report: {metrics}:{i} is not a JSON line") from None
        if not isinstance(row, dict) or "step" not in row:
            raise UserError(f"report: {metrics}:{i} has no 'step'")
        rows.append(row)
    if not rows:
        raise UserError(f"report: {metrics} is empty (the run logged nothing yet)")
    summary = _read_json(path / "summary.json")
    config = _read_yaml(path / "config.yaml")
    return Run(config.get("name") or path.name, path, rows, summary, config)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"report: {path} is not valid JSON") from None


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise UserError(f"report: {path} is not valid YAML") from None


def unique_names(runs: list[Run]) -> None:
    """Two runs of the same config (e.g. seeds) get their directory names appended."""
    names = [r.name for r in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = f"{run.name} ({run.path.name})"


# ---------------------------------------------------------------- plots


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("report: matplotlib is needed: pip install 'fitdist[report]'") from None
    matplotlib.use("Agg")  # files only: never open a window, work without a display
    import matplotlib.pyplot as plt

    return plt


def plot_losses(run: Run):
    """One panel per stage, one line per logged loss term."""
    plt = _pyplot()
    stages = run.stages()
    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 3.4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        rows = [r for r in run.rows if r.get("stage") == stage]
        for term in TERMS:
            points = [(r["step"], r[term]) for r in rows if term in r]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 20 else None,
                        label=term.removeprefix("train/"))
        ax.set_title(f"stage {stage}")
        ax.set_xlabel("step")
        ax.set_yscale("log" if _positive(rows) else "linear")  # terms differ by orders of magnitude
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("training loss")
    fig.suptitle(run.name)
    fig.tight_layout()
    return fig


def diag_layers(run: Run) -> list[str]:
    """Layers with `diag/<layer>/...` values in the run's rows, in first-logged order."""
    seen: dict[str, None] = {}
    for row in run.rows:
        for key in row:
            if key.startswith("diag/") and key.count("/") >= 2:
                seen.setdefault(key[len("diag/"):key.rindex("/")], None)
    return list(seen)


def plot_diagnostics(run: Run):
    """Activation RMS and dead fraction per watched layer over steps (train.diagnostics); stage
    ends dashed and hint-only stages shaded, as in the validation chart."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ends = [max(r["step"] for r in run.rows if r.get("stage") == st) for st in run.stages()][:-1]
    for ax, what, title in ((axes[0], "rms", "activation RMS"), (axes[1], "dead", "dead-unit fraction")):
        for start, end in run.hint_spans():
            ax.axvspan(start, end, color="0.5", alpha=0.12, lw=0)
        for end in ends:
            ax.axvline(end, color="0.4", ls="--", lw=0.8)
        for i, layer in enumerate(diag_layers(run)):  # a layer keeps its colour (maxout ones have no dead line)
            key = f"diag/{layer}/{what}"
            points = [(r["step"], r[key]) for r in run.rows if key in r]
            if points:
                ax.plot(*zip(*points), color=f"C{i % 10}", marker="." if len(points) < 20 else None, label=layer)
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
    axes[1].set_ylim(-0.02, 1.02)
    if axes[0].lines:
        axes[0].legend(fontsize=8)
    fig.suptitle(f"{run.name}: student layers")
    fig.tight_layout()
    return fig


def _positive(rows: list[dict]) -> bool:
    values = [r[t] for r in rows for t in TERMS if t in r]
    return bool(values) and min(values) > 0


def plot_schedule(runs: list[Run]):
    """λ (the KD weight) and the learning rate of every run against the global step."""
    plt = _pyplot()
    fig, (ax_l, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.4))
    for run in runs:
        for ax, key in ((ax_l, "lambda"), (ax_lr, "lr")):
            points = [(r["step"], r[key]) for r in run.rows if key in r]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 20 else None, label=run.name)
    ax_l.set(title="λ (KD weight)", xlabel="step")
    ax_lr.set(title="learning rate", xlabel="step")
    ax_lr.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_val(runs: list[Run]):
    """Validation top-1 of every run on one chart, one curve per run. Runs of one config (seeds) are
    drawn thin, with their mean bold and the band between the lowest and highest run, so many
    seeds stay readable. Hint-only stages are shaded, not plotted (see the module docstring)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    spans = sorted({span for run in runs for span in run.hint_spans()})  # seeds share theirs
    for i, (start, end) in enumerate(spans):
        ax.axvspan(start, end, color="0.5", alpha=0.12, lw=0,
                   label="_span" if i else "hint-only stage (classifier untrained)")
    for index, (name, group) in enumerate(_by_config(runs).items()):
        colour = f"C{index % 10}"
        labelled = [(run.name, run.val_curve()) for run in group]
        labelled = [(label, curve) for label, curve in labelled if curve]
        curves = [curve for _, curve in labelled]
        if len(labelled) == 1:
            ax.plot(*zip(*sorted(curves[0].items())), color=colour, marker=_marker(curves[0]),
                    label=labelled[0][0])
        elif curves:
            for _, curve in labelled:  # every run's own curve, thin; "_" keeps it out of the legend
                ax.plot(*zip(*sorted(curve.items())), color=colour, lw=0.8, alpha=0.5, label="_seed")
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            values = [[c[s] for c in curves] for s in steps]
            if steps:
                ax.plot(steps, [statistics.mean(v) for v in values], color=colour, lw=2,
                        marker=_marker(steps), label=f"{name} (mean of {len(curves)})")
                ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values],
                                color=colour, alpha=0.15)
        _plot_ema(ax, name if len(group) > 1 else group[0].name, group, colour)
    ax.set(title="validation top-1", xlabel="step", ylabel="top-1 (%)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _plot_ema(ax, name: str, group: list[Run], colour: str) -> None:
    """The student EMA's top-1 (`train.ema`), dashed in its run's colour: one run's, or the mean of
    the seeds' at the steps they share."""
    curves = [c for c in (run.val_curve("val_ema/top1") for run in group) if c]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    if steps:
        mean = [statistics.mean(c[s] for c in curves) for s in steps]
        ax.plot(steps, mean, color=colour, lw=1.5, ls="--", marker=_marker(steps),
                label=f"{name} EMA" + (f" (mean of {len(curves)})" if len(curves) > 1 else ""))


def _marker(points) -> str | None:
    return "o" if len(points) < 30 else None  # dots while they can be told apart


def _by_config(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped by their config's name (the seeds of one config), in first-seen order."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.config.get("name") or run.path.name, []).append(run)
    return groups


# ---------------------------------------------------------------- table


def results_table(runs: list[Run]) -> str:
    """A markdown table of the final result of every run, best top-1 first."""
    ema = any(run.final().get("val_ema/top1") is not None for run in runs)  # a column only when some run has one
    header = (
        "| run | student | teacher | stages | steps | params | MACs | top-1 (%) | top-5 (%) | "
        + ("EMA top-1 (%) | " if ema else "") + "time (s) | img/s | speed-up |\n"
        "|---|---|---|---|---:|---:|---:|---:|---:|" + ("---:|" if ema else "") + "---:|---:|---:|\n"
    )
    lines = []
    ordered = sorted(runs, key=lambda r: -(r.final().get("val/top1") or -1.0))
    for run in ordered:
        final, cfg = run.final(), run.config
        teachers = cfg.get("teachers") or []
        teacher = (f"{len(teachers)} teachers ({(cfg.get('loss') or {}).get('ensemble', 'mean_probs')})"
                   if len(teachers) > 1 else (cfg.get("teacher") or {}).get("name", "—"))
        student = final.get("student") or (cfg.get("student") or {}).get("name", "?")
        stages = " → ".join(str(s) for s in run.stages())
        name = run.name + (" (unfinished)" if final.get("unfinished") else "")
        steps = final.get("steps", run.rows[-1]["step"])
        cells = [name, student, teacher, stages, str(steps), _int(final.get("params")),
                 _int(final.get("macs")), _num(final.get("val/top1")), _num(final.get("val/top5")),
                 *([_num(final.get("val_ema/top1"))] if ema else []), _num(final.get("wall_time_s"), 0), _num(final.get("infer/img_per_s"), 0),
                 _speedup(final.get("infer/speedup"))]
        lines.append("| " + " | ".join(cells) + " |")
    return header + "\n".join(lines) + "\n" + _infer_note(runs)


def _speedup(value) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _infer_note(runs: list[Run]) -> str:
    """Where the img/s column was measured (it means nothing without the device)."""
    measured = [r.final() for r in runs if r.final().get("infer/device")]
    if not measured:
        return ""
    devices = sorted({f["infer/device"] for f in measured})
    batch = measured[0].get("infer/batch")
    return (f"\nimg/s: `fitdist bench infer`, batch {batch}, best of fp32 / channels_last / bf16, on "
            f"{'; '.join(devices)}; speed-up: over the run's teacher on the same device.\n")


def grouped_table(runs: list[Run]) -> str:
    """Runs of the same config (seeds) as one row: top-1 mean ± sample std, params, MACs, time."""
    groups = {name: [run.final() for run in group] for name, group in _by_config(runs).items()}
    header = ("| config | runs | top-1 (%) mean ± std | params | MACs | time (s) mean |\n"
              "|---|---:|---:|---:|---:|---:|\n")
    lines = []
    for name, finals in groups.items():
        top1 = [f["val/top1"] for f in finals if f.get("val/top1") is not None]
        times = [f["wall_time_s"] for f in finals if f.get("wall_time_s") is not None]
        spread = f" ± {statistics.stdev(top1):.2f}" if len(top1) > 1 else ""
        cells = [name, str(len(finals)), (_num(statistics.mean(top1)) + spread) if top1 else "—",
                 _int(finals[0].get("params")), _int(finals[0].get("macs")),
                 _num(statistics.mean(times) if times else None, 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return header + "\n".join(lines) + "\n"


def _num(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _int(value) -> str:
    return "—" if value is None else f"{value:,}"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"


# ---------------------------------------------------------------- command


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit status 2, like every other bad input
        raise UserError(f"{self.prog}: {message}")


def report(run_dirs: list[str], out: str | Path) -> dict[str, Path]:
    """Writes every plot and `results.md` to `out`; returns what was written, by kind."""
    paths = list(dict.fromkeys(p for d in run_dirs for p in find_runs(d)))  # a run named twice: once
    runs = [read_run(p) for p in paths]
    unique_names(runs)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"report: cannot create {out} ({e.strerror or e})") from None
    plt = _pyplot()
    written: dict[str, Path] = {}
    figures = [(f"loss-{_slug(r.name)}", plot_losses(r)) for r in runs]
    figures += [(f"diag-{_slug(r.name)}", plot_diagnostics(r)) for r in runs if diag_layers(r)]
    figures += [("schedule", plot_schedule(runs)), ("val_top1", plot_val(runs))]
    for stem, fig in figures:
        written[stem] = out / f"{stem}.png"
        fig.savefig(written[stem], dpi=110)
        plt.close(fig)
    written["results"] = out / "results.md"
    text = "# Results\n\n" + results_table(runs)
    if len(_by_config(runs)) < len(runs):
        text += "\n## By config (mean ± std over runs)\n\n" + grouped_table(runs)
    written["results"].write_text(text)
    return written


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="fitdist report", description="Plots and a results table from runs.")
    p.add_argument("runs", nargs="+", help="run directories (each holding metrics.jsonl), or folders of runs")
    p.add_argument("--out", default="report", help="output directory (default: report)")
    args = p.parse_args(argv)
    written = report(args.runs, args.out)
    for path in written.values():
        print(path)
    return 0
