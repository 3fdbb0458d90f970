"""Run under torchrun by test_ddp.py: train, then record whether every rank holds the same weights."""

import json
import sys

import torch

from fitdist import dist as fdist
from fitdist.config import load_config
from fitdist.trainer import _Run


def main(config: str, out: str, *overrides: str) -> None:
    cfg = load_config(config, list(overrides))
    env = fdist.setup(cfg.train.device, cfg.strategy.backend)
    run = _Run(cfg, env, resume=False)
    summary = run.run()
    state = {k: v.clone() for k, v in run.student.state_dict().items()}  # regressors included
    gathered = fdist.gather_objects(state)
    if env.is_main:
        mismatched = [k for k in state if not all(torch.equal(g[k], state[k]) for g in gathered)]
        report = {"world": env.world, "mismatched": mismatched, "keys": len(state), "summary": summary}
    if run.ema is not None:  # train.ema: whether every rank ends with the same (whole) EMA
        ema = {k: v.clone() for k, v in run.ema.module.state_dict().items()}
        everyone = fdist.gather_objects(ema)
        if env.is_main:
            report["ema_mismatched"] = [k for k in ema if not all(torch.equal(g[k], ema[k]) for g in everyone)]
    if env.is_main:
        with open(out, "w") as f:
            json.dump(report, f)
    fdist.teardown()


if __name__ == "__main__":
    main(*sys.argv[1:])
