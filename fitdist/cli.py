"""The `fitdist` command: train, eval, quickstart, shard, bench, report (thin: parse, call, exit codes).

Bad input of any kind (`UserError`) is reported as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from fitdist.errors import UserError
from fitdist.preemption import PREEMPTED_EXIT, Preempted
from fitdist.trainer import Diverged

BENCHES = ("losses", "data", "step", "ddp")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and status 2, like every other bad input
        raise UserError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fitdist", description="FitNets hints and knowledge distillation for image classifiers.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="run every stage of a config")
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=0.01 stages.1.steps=500")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run directory")
    t.add_argument("--dry-run", action="store_true",
                   help="build the models, probe hint shapes and run one step on random data; no data needed")
    e = sub.add_parser("eval", help="top-1/top-5 of a run or a student.pt on the test split, as one JSON line")
    e.add_argument("path", help="run directory, checkpoint directory or student.pt inside a run")
    e.add_argument("overrides", nargs="*", help="key=value overrides of the run's config (e.g. data.root=...)")
    q = sub.add_parser("quickstart", help="teacher, then FitNets / KD / scratch students on Fashion-MNIST")
    q.add_argument("--out", default="runs/quickstart", help="directory for the runs (default runs/quickstart)")
    q.add_argument("--scale", type=float, default=1.0, help="multiply every step count (e.g. 0.1 for a smoke run)")
    q.add_argument("overrides", nargs="*", help="key=value overrides applied to every run (e.g. data.root=DIR)")
    sub.add_parser("shard", help="write WebDataset shards (see `fitdist shard --help`)", add_help=False)
    sub.add_parser("bench", help=f"benchmarks: {', '.join(BENCHES)}", add_help=False)
    sub.add_parser("report", help="plots and a results table from runs' metrics.jsonl", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return _dispatch(argv)
    except UserError as e:
        print(f"fitdist: error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"fitdist: {e}", file=sys.stderr)
        return PREEMPTED_EXIT
    except Diverged as e:
        print(f"fitdist: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("fitdist: interrupted", file=sys.stderr)
        return 130


def _dispatch(argv: list[str]) -> int:
    # shard and bench take their own arguments
    if argv[:1] == ["shard"]:
        return importlib.import_module("fitdist.data.shard_cli").main(argv[1:])
    if argv[:1] == ["report"]:
        return importlib.import_module("fitdist.report").main(argv[1:])
    if argv[:1] == ["bench"]:
        if len(argv) < 2 or argv[1] not in BENCHES:
            raise UserError(f"bench: name one of {', '.join(BENCHES)}")
        return importlib.import_module(f"fitdist.bench.{argv[1]}").main(argv[2:])
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    # overrides may also follow a flag (`train CONFIG --dry-run optim.lr=0.1`)
    if any(arg.startswith("-") or "=" not in arg for arg in rest):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.overrides = [*args.overrides, *rest]
    if args.command == "train":
        from fitdist.config import load_config
        from fitdist.trainer import train

        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            from fitdist.dryrun import dry_run

            print(json.dumps(dry_run(cfg)))
        else:
            train(cfg, resume=args.resume)
        return 0
    if args.command == "eval":
        from fitdist.evaluate_run import evaluate_run

        print(json.dumps(evaluate_run(args.path, args.overrides)))
        return 0
    from fitdist.quickstart import quickstart

    quickstart(args.out, args.scale, args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
