"""`fitdist shard SOURCE OUT_DIR [--shard-size N] [--max-side PX] [--seed N]`: write WebDataset
shards.

SOURCE is `fashion-mnist[:DIR]`, `cifar10:DIR`, `cifar100:DIR` or `imagefolder:DIR` (DIR holding
`train/` and `val/`, one folder per class). Samples are shuffled across each split (seed `--seed`,
recorded in manifest.json), so every shard holds a mix of all classes. Re-running on the same
OUT_DIR resumes; a finished directory is left as it is.
"""

from __future__ import annotations

import argparse
import sys

from fitdist.data.shard_writer import write_shards
from fitdist.data.sources import SOURCE_FORMS, open_source


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fitdist shard", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help=SOURCE_FORMS)
    p.add_argument(
        "out_dir", help="output directory (train-%%06d.tar, test-%%06d.tar, manifest.json)"
    )
    p.add_argument(
        "--shard-size", type=int, default=10_000, help="samples per shard (default 10000)"
    )
    p.add_argument(
        "--max-side",
        type=int,
        default=None,
        help="re-encode images whose shorter side exceeds PX down to PX (e.g. 256)",
    )
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    p.add_argument("--workers", type=int, default=1, help="encoder processes (default 1)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the sample shuffle before sharding (default 0)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command; a UserError propagates (the `fitdist` CLI prints it and exits 2)."""
    args = parser().parse_args(argv)
    source = open_source(args.source)
    m = write_shards(
        source,
        args.out_dir,
        args.shard_size,
        args.max_side,
        args.quality,
        max(1, args.workers),
        progress=not args.no_progress,
        seed=args.seed,
    )
    for split, info in m["splits"].items():
        print(f"{split}: {info['total']} samples in {len(info['shards'])} shards")
    if m["skipped"]:
        print(f"skipped {len(m['skipped'])} unreadable source files (listed in manifest.json)")
    print(f"wrote {args.out_dir}/manifest.json")
    return 0


if __name__ == "__main__":
    from fitdist.errors import UserError

    try:
        sys.exit(main())
    except UserError as e:  # what the `fitdist` CLI does: one line, status 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
