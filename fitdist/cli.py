"""The `fitdist` command: train, check, eval, quickstart, export, shard, label, bench, report (thin: parse,
call, exit codes).

Bad input of any kind (`UserError`) is reported as one line on stderr with exit status 2. Under
torchrun, an error that every rank hits identically (bad arguments, config keys, types, world-size
rules, model names and hint paths: everything decided before a rank touches a file) is printed by
rank 0 alone, and the other ranks exit 2 silently. Any other `UserError` (a missing file, bad data)
(and a `pkg.module:factory` model that fails to import) is printed by each rank that meets it: it
may be one node's alone (a node-local path, a node's environment), and a rank that failed silently
would leave nobody to say why.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
from pathlib import Path

from fitdist.errors import UserError
from fitdist.preemption import PREEMPTED_EXIT, PeersLost, Preempted
from fitdist.trainer import Diverged
from fitdist.versions import check_versions

BENCHES = ("losses", "data", "step", "ddp", "infer")


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
    c = sub.add_parser("check", help="validate a config and overrides without data or weights (the launch scripts' "
                                     "first step); exit 2 with one line if bad")
    c.add_argument("config", help="YAML config file")
    c.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for train")
    c.add_argument("--nproc-per-node", help="processes per node the run will have (checks world-size rules)")
    c.add_argument("--nnodes", help="nodes the run will have (a min:max range skips the world-size rules)")
    c.add_argument("--resume", action="store_true", help="accepted and ignored (train's flags pass through)")
    c.add_argument("--dry-run", action="store_true", help="accepted and ignored")
    e = sub.add_parser("eval", help="top-1/top-5 of a run or a student.pt on the test split, as one JSON line")
    e.add_argument("path", help="run directory, checkpoint directory or student.pt inside a run (with --teachers: a "
                                "config or run directory naming teachers)")
    e.add_argument("--teachers", action="store_true",
                   help="evaluate the config's teachers, each and as their ensemble (weighted mean of probabilities)")
    e.add_argument("overrides", nargs="*", help="key=value overrides of the run's config (e.g. data.root=...)")
    q = sub.add_parser("quickstart", help="teacher, then FitNets / KD / scratch students on Fashion-MNIST")
    q.add_argument("--out", default="runs/quickstart", help="directory for the runs (default runs/quickstart)")
    q.add_argument("--scale", type=float, default=1.0, help="multiply every step count (e.g. 0.1 for a smoke run)")
    q.add_argument("overrides", nargs="*", help="key=value overrides applied to every run (e.g. data.root=DIR)")
    x = sub.add_parser("export", help="the student as a file that runs without fitdist: torchscript, exported, onnx")
    x.add_argument("run", help="run directory (or student.pt inside one)")
    x.add_argument("--format", required=True, choices=("torchscript", "exported", "onnx"), dest="fmt")
    x.add_argument("--out", help="output file (default: <run>/student.<ts|pt2|onnx>)")
    x.add_argument("overrides", nargs="*", help="key=value overrides of the run's config")
    sub.add_parser("shard", help="write WebDataset shards (see `fitdist shard --help`)", add_help=False)
    sub.add_parser("label", help="store the teacher's soft labels of augmented views (see `fitdist label --help`)",
                   add_help=False)
    sub.add_parser("bench", help=f"benchmarks: {', '.join(BENCHES)}", add_help=False)
    sub.add_parser("report", help="plots and a results table from runs' metrics.jsonl", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        check_versions()  # torch and torchvision: the ranges fitdist is tested with
        return _dispatch(argv)
    except UserError as e:
        if not (getattr(e, "every_rank", False) and _rank() > 0):
            print(f"fitdist: error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"fitdist: {e}", file=sys.stderr)
        return PREEMPTED_EXIT
    except Diverged as e:
        print(f"fitdist: error: {e}", file=sys.stderr)
        return 3
    except PeersLost as e:  # torchrun is stopping the group to restart it: leave now, quietly
        print(f"fitdist: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fitdist: interrupted", file=sys.stderr)
        return 130


def _rank() -> int:
    """This process's rank in a torchrun job with several processes, else 0."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


@contextlib.contextmanager
def _every_rank():
    """Marks a `UserError` raised inside as one every rank hits identically (rank 0 reports it)."""
    try:
        yield
    except UserError as e:
        e.every_rank = not getattr(e, "local", False)  # `local`: may differ between nodes
        raise


def _dispatch(argv: list[str]) -> int:
    # shard and bench take their own arguments
    if argv[:1] == ["shard"]:
        return importlib.import_module("fitdist.data.shard_cli").main(argv[1:])
    if argv[:1] == ["label"]:
        return importlib.import_module("fitdist.data.label_writer").main(argv[1:])
    if argv[:1] == ["report"]:
        return importlib.import_module("fitdist.report").main(argv[1:])
    if argv[:1] == ["bench"]:
        if len(argv) < 2 or argv[1] not in BENCHES:
            raise UserError(f"bench: name one of {', '.join(BENCHES)}")
        return importlib.import_module(f"fitdist.bench.{argv[1]}").main(argv[2:])
    with _every_rank():  # every rank parses the same arguments
        args = _parse(argv)
    if args.command == "check":
        from fitdist.check import check, parse_world
        from fitdist.config import load_config

        world = parse_world(args.nproc_per_node, args.nnodes)
        print(check(load_config(args.config, args.overrides), world or 1, files=True)
              + ("" if world else " (elastic: world-size rules not checked)"))
        return 0
    if args.command == "train":
        from fitdist.check import deterministic_checks
        from fitdist.config import load_config
        from fitdist.trainer import train

        if not Path(args.config).is_file():  # may be missing on one node only: each rank says so
            raise UserError(f"config file not found: {args.config}")
        with _every_rank():  # from here on only the arguments decide: every rank decides the same
            cfg = load_config(args.config, args.overrides)
            deterministic_checks(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        if args.dry_run:
            from fitdist.dryrun import dry_run

            print(json.dumps(dry_run(cfg)))
        else:
            train(cfg, resume=args.resume)
        return 0
    if args.command == "eval" and args.teachers:
        from fitdist.evaluate_ensemble import evaluate_teachers

        print(json.dumps(evaluate_teachers(args.path, args.overrides)))
        return 0
    if args.command == "eval":
        from fitdist.evaluate_run import evaluate_run

        print(json.dumps(evaluate_run(args.path, args.overrides)))
        return 0
    if args.command == "export":
        from fitdist.export import export

        print(export(args.run, args.fmt, args.out, args.overrides))
        return 0
    from fitdist.quickstart import quickstart

    quickstart(args.out, args.scale, args.overrides)
    return 0


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    # overrides may also follow a flag (`train CONFIG --dry-run optim.lr=0.1`)
    if any(arg.startswith("-") or "=" not in arg for arg in rest):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.overrides = [*args.overrides, *rest]
    return args


if __name__ == "__main__":
    sys.exit(main())
