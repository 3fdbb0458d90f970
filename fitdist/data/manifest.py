"""`manifest.json`: what a shard directory holds, written by `fitdist shard`, checked by the reader.

A manifest lists, per split, every shard with its sample count, byte size and sha256, plus the
class names, the image mode/size/format and a checksum of the source. The reader uses it for the
number of classes, the exact validation count, per-shard sample counts (a shard that ends early is
counted as skipped samples, one that holds more than listed is a disagreement) and a balanced
split of the validation shards across ranks. `order` is `"shuffled"` for shards written with the
samples of each split shuffled (`settings.seed`); manifests without it (older shards) or with
`"source"` describe shards in source order, which the reader still reads, with a warning.

The manifest of a shard URL is the file `manifest.json` in the same place: the last `*.tar` name
in the URL is replaced, which works for local paths, http(s) URLs and `pipe:` commands alike.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from fitdist.errors import UserError

FORMAT = "fitdist-shards/1"
NAME = "manifest.json"
SPLIT_PREFIX = {"train": "train", "test": "test"}  # split name -> shard file prefix
_SHARD_NAME = re.compile(r"[^/\s'\"]+\.tar(?:\.gz)?")


def shard_name(url: str) -> str:
    """The shard file name inside a path, URL or `pipe:` command (`train-000003.tar`)."""
    names = _SHARD_NAME.findall(url)
    return names[-1] if names else url


def manifest_url(shard_url: str) -> str:
    """Where the manifest of `shard_url` lives: same directory, file name `manifest.json`."""
    matches = list(_SHARD_NAME.finditer(shard_url))
    if not matches:
        raise UserError(f"cannot tell where the manifest of {shard_url} is (no *.tar name in it)")
    m = matches[-1]
    return shard_url[: m.start()] + NAME + shard_url[m.end() :]


def is_local(url: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", url) or url.startswith("file:")


def local_path(url: str) -> Path:
    return Path(re.sub(r"^file://?", "/", url) if url.startswith("file:") else url)


def read_manifest(url: str, timeout: float = 0.0) -> dict[str, Any]:
    """The parsed, structurally checked manifest at `url` (a path, http(s) URL or pipe: command);
    a remote one that sends nothing for `timeout` seconds (0: no limit) is an error."""
    try:
        if is_local(url):
            raw = local_path(url).read_bytes()
        else:
            from fitdist.data.pipes import open_shard  # (imports this module)

            f = open_shard(url, timeout)
            try:
                raw = f.read()
            finally:
                f.close()
        manifest = json.loads(raw)
    except FileNotFoundError:
        raise UserError(
            f"no {NAME} at {url}: write shards with `fitdist shard` (see docs/DATA.md)"
        ) from None
    except Exception as e:  # noqa: BLE001 - unreadable or not JSON: one clear line
        raise UserError(f"cannot read shard manifest {url}: {type(e).__name__}: {e}") from None
    check_manifest(manifest, url)
    return manifest


def check_manifest(m: Any, where: str) -> None:
    """Raise a UserError naming `where` when the manifest is not self-consistent."""
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise UserError(f"{where}: not a fitdist shard manifest (format {FORMAT!r} expected)")
    classes = m.get("classes")
    if not isinstance(classes, list) or len(classes) != m.get("num_classes"):
        raise UserError(f"{where}: manifest class list and num_classes disagree")
    for split, info in m.get("splits", {}).items():
        counts = [s.get("count") for s in info.get("shards", [])]
        if not all(isinstance(c, int) and c >= 0 for c in counts):
            raise UserError(f"{where}: manifest split {split!r} has a shard without a sample count")
        if sum(counts) != info.get("total"):
            raise UserError(
                f"{where}: manifest split {split!r} says total {info.get('total')} "
                f"but its shards add up to {sum(counts)}"
            )


def shard_table(m: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every shard entry of every split, by file name."""
    return {s["name"]: s for info in m["splits"].values() for s in info["shards"]}


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` through a temporary file and a rename: never half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
