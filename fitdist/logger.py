"""Metrics to `metrics.jsonl`, W&B and the console on rank 0; a do-nothing logger elsewhere.

W&B runs are real `wandb` runs. `wandb.mode: auto` is online only when an API key is configured
(`WANDB_API_KEY`, or `WANDB_MODE` set by the user), offline otherwise, so nothing needs a network.
A resumed run passes its stored run id, so W&B continues the same run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from fitdist.config import WandbConfig


class NullLogger:
    """What ranks other than 0 get: every call does nothing."""

    run_id: str | None = None

    def log(self, metrics: dict, step: int) -> None: ...

    def progress(self, stage: str, step: int, total: int, metrics: dict) -> None: ...

    def print(self, text: str) -> None: ...

    def finish(self) -> None: ...


class Logger(NullLogger):
    def __init__(self, run_dir: Path, name: str, config: dict, wandb_cfg: WandbConfig, run_id: str | None):
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - closed in finish(); line-buffered so a kill loses no row
        self.tty = sys.stderr.isatty()
        self._bar = None
        # images per optimizer step (all ranks): the bar's steps/s times this is the img/s users compare
        self.batch_size = int((config.get("train") or {}).get("batch_size") or 0)
        self._wandb = _start_wandb(run_dir, name, config, wandb_cfg, run_id)
        self.run_id = self._wandb.id if self._wandb else run_id

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        if self._wandb:
            self._wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)
        if not self.tty:
            self.print(_summary(row))

    def progress(self, stage: str, step: int, total: int, metrics: dict) -> None:
        """A live bar on a terminal (rows are printed instead when output is not a terminal)."""
        if not self.tty:
            return
        from tqdm import tqdm

        if self._bar is None or self._bar.desc != stage:
            self._close_bar()
            self._bar = tqdm(total=total, desc=stage, initial=step, dynamic_ncols=True, leave=True)
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix(bar_postfix(metrics, _steps_per_s(self._bar), self.batch_size),
                              refresh=False)

    def print(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def finish(self) -> None:
        self._close_bar()
        self.jsonl.close()
        if self._wandb:
            self._wandb.finish()


def _steps_per_s(bar) -> float | None:
    """tqdm's smoothed rate once it has one (it updates it only at redraws), else the mean so far."""
    d = bar.format_dict
    if d.get("rate"):
        return d["rate"]
    done = d["n"] - d.get("initial", 0)
    return done / d["elapsed"] if done > 0 and d["elapsed"] > 0 else None


def bar_postfix(metrics: dict, steps_per_s: float | None, batch_size: int) -> dict:
    """The bar's numbers: running loss terms, then img/s (tqdm's smoothed steps/s × global batch)."""
    post = {k.split("/")[-1]: f"{v:.4g}" for k, v in metrics.items()}
    if steps_per_s and batch_size:
        post["img/s"] = f"{steps_per_s * batch_size:,.0f}"
    return post


def _plain(v):
    v = v.item() if hasattr(v, "item") else v
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _summary(row: dict) -> str:
    parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()]
    return time.strftime("%H:%M:%S ") + " ".join(parts)


def wandb_mode(cfg: WandbConfig) -> str:
    if cfg.mode != "auto":
        return cfg.mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _start_wandb(run_dir: Path, name: str, config: dict, cfg: WandbConfig, run_id: str | None):
    """A W&B run, or None. W&B trouble never stops training: metrics.jsonl has every row anyway."""
    mode = wandb_mode(cfg)
    if mode == "disabled":
        return None
    import wandb

    # A run killed a moment ago may leave its W&B service holding the run id for a few seconds.
    for attempt in range(6):
        try:
            return wandb.init(
                project=cfg.project, entity=cfg.entity, group=cfg.group, tags=cfg.tags or None, name=name,
                config=config, dir=str(run_dir), mode=mode, id=run_id, resume="allow" if run_id else None,
                settings=wandb.Settings(silent=True, console="off"),
            )
        except Exception as e:  # noqa: BLE001 - wandb raises many types; all mean "no W&B run"
            error = e
            time.sleep(2 ** attempt / 4)
    print(f"warning: W&B run could not start ({type(error).__name__}: {error}); logging to metrics.jsonl only",
          file=sys.stderr, flush=True)
    return None


def build_logger(is_main: bool, run_dir: Path, name: str, config: dict, wandb_cfg: WandbConfig, run_id: str | None):
    return Logger(run_dir, name, config, wandb_cfg, run_id) if is_main else NullLogger()
