"""The per-worker WebDataset pipeline: shards -> samples -> shuffle -> decode/transform -> batches.

Every batch carries a `Report` (samples skipped since the previous batch, new messages, a fatal
error), so skip counts reach the main process through the DataLoader itself, with or without
worker processes. Bad data never crashes a worker:
- an unreadable image, a sample without image or label, a label out of range: that sample is
  skipped, counted and reported with its shard and key;
- a truncated or garbage tar member: tarfile runs with `ignore_zeros`, which steps over a damaged
  header to the next valid one; a shard that ends early (or cannot be opened) has its missing
  samples counted from the manifest's per-shard count;
- a shard holding more samples than the manifest lists, or a training pass over every shard that
  yields no usable sample (which would otherwise spin forever), is fatal: the main process raises a
  UserError (exit status 2) instead of hanging;
- a `pipe:`/http(s) source that sends nothing for `read_timeout` seconds is fatal too, naming the
  shard (fitdist.data.pipes), instead of blocking the rank and, through it, every other rank.

Training mixes shards twice over: each worker reads `shard_mix` shards at once, drawing every
sample from a randomly chosen one of them, and its shuffle buffer is filled completely before the
first sample leaves it (at the start of every stream: a stage start, a resume). With the shards
`fitdist shard` writes (samples shuffled across the split), batches are as mixed as i.i.d. draws
from the first step on; with older shards in source order (ImageNet: ~2 classes per shard) the
interleaving still puts samples of `shard_mix` shards in every buffer.
Images leave the worker as uint8 (see fitdist.data.normalize).
"""

from __future__ import annotations

import itertools
import random
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info
from webdataset.tariterators import base_plus_ext

from fitdist.data.manifest import shard_name
from fitdist.data.pipes import Stalled, TimedPipe, open_shard
from fitdist.data.soft_labels import SoftSpec, attach, pick_view
from fitdist.data.transforms import IMAGE_EXTS, decode


class Report(NamedTuple):
    skipped: int  # samples skipped since the previous batch of this worker
    messages: tuple[tuple[str, str], ...]  # (where: "shard: key", why) per new bad sample
    fatal: str | None  # set once; the main process raises it as a UserError


class _Fatal(Exception):
    pass


class _Stats:
    """Skip counts and messages not yet sent; each message is sent once per worker."""

    def __init__(self):
        self.skipped, self.messages, self.sent = 0, [], set()

    def skip(self, n: int, where: str, why: str) -> None:
        self.skipped += n
        if where not in self.sent:
            self.sent.add(where)
            self.messages.append((where, re.sub(r" ?<[^<>]* at 0x[0-9a-f]+>", "", why)))

    def take(self, fatal: str | None = None) -> Report:
        report = Report(self.skipped, tuple(self.messages), fatal)
        self.skipped, self.messages = 0, []
        return report


@dataclass
class StreamSpec:
    """Everything a worker needs; built in the main process."""

    urls: list[str]  # this rank's shards (validation) or all shards (training)
    batch: int
    channels: int
    num_classes: int
    transform: Callable[[torch.Tensor], torch.Tensor]
    train: bool  # endless resampled passes, shuffled; else one ordered pass
    seed: tuple = (0, 0, 0)  # (seed, rank, first micro-batch): the training stream's RNG
    shuffle_buffer: int = 2000
    shard_mix: int = 8  # training: shards each worker reads at once, interleaved
    # samples in the buffer before the first leaves it; None: all of `shuffle_buffer` (a filled
    # buffer). `fitdist bench data` sets the former policy (100, then growing) to compare.
    shuffle_start: int | None = None
    read_timeout: float = 0.0  # seconds without data from a pipe:/http(s) source (0: no limit)
    expected: dict[str, int] = field(default_factory=dict)  # url -> manifest sample count
    limits: dict[str, int] = field(default_factory=dict)  # url -> read only this many samples
    soft: SoftSpec | None = None  # training: stored soft labels joined by key (fitdist.data.soft_labels)


def read_shard(
    url: str, expected: int | None, limit: int | None, stats: _Stats, timeout: float = 0.0
) -> Iterator[dict]:
    """Samples (dicts of raw fields by extension, plus `__key__`, `__url__`) of one shard."""
    name, seen, key, sample = shard_name(url), 0, None, None
    try:
        stream = open_shard(url, timeout)
    except Exception as e:  # noqa: BLE001 - a missing or unreachable shard is skipped whole
        why = f"cannot open ({type(e).__name__}: {e}); {expected or 'its'} samples skipped"
        stats.skip(expected or 0, name, why)
        return
    try:
        # ignore_zeros: step over a damaged member header instead of ending the shard there.
        # A local file is read in random-access mode: headers and members straight from the
        # file, without the stream mode's copying through 10 KiB chunks (a third less CPU per
        # sample read; it pays for filling the shuffle buffer before the first batch).
        mode = "r|*" if isinstance(stream, TimedPipe) or not stream.seekable() else "r:*"
        tar = tarfile.open(fileobj=stream, mode=mode, ignore_zeros=True)  # noqa: SIM115
        for info in tar:
            if not info.isreg():
                continue
            data = tar.extractfile(info).read()
            tar.members = []  # streaming: do not keep every header in memory
            prefix, ext = base_plus_ext(info.name)
            if prefix is None or prefix.startswith("__"):
                continue
            if prefix != key:
                if sample is not None:
                    yield sample
                key, sample, seen = prefix, {"__key__": prefix, "__url__": url}, seen + 1
                if limit is not None and seen > limit:
                    sample = None
                    return
                if expected is not None and seen > expected:
                    raise _Fatal(
                        f"the shard manifest disagrees with shard {url}: the shard holds "
                        f"more than the {expected} samples listed"
                    )
            sample[ext.lower()] = data
        if sample is not None:
            yield sample
            sample = None
    except _Fatal:
        raise
    except Stalled as e:  # ends the run: waiting on would hold every rank until NCCL times out
        raise _Fatal(str(e)) from None
    except Exception as e:  # noqa: BLE001 - truncated or garbage tar data
        if sample is not None:
            stats.skip(1, f"{name}: {key}", f"damaged tar data ({type(e).__name__}: {e})")
    finally:
        try:
            stream.close()
        except Exception:  # noqa: BLE001, S110 - a pipe closed early reports SIGPIPE: expected
            pass
    want = expected if limit is None else min(limit, expected or limit)
    if want is not None and seen < want:
        why = f"{want - seen} of {want} samples missing (truncated or damaged shard)"
        stats.skip(want - seen, f"{name}: after {key}" if key else name, why)  # key: None if nothing read


def _shuffled(
    samples: Iterator[dict], bufsize: int, initial: int, rng: random.Random
) -> Iterator[dict]:
    """Buffer shuffle; the first sample leaves once `initial` samples are in (`initial` =
    `bufsize`: a filled buffer), and the buffer grows by one for every two samples to `bufsize`."""
    buf: list[dict] = []
    for n, s in enumerate(samples):
        buf.append(s)
        if len(buf) >= min(bufsize, initial + n // 2):
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def _interleaved(shards: list[Iterator[dict]], k: int, rng: random.Random) -> Iterator[dict]:
    """Samples of `shards` (in this order), `k` read at once: each sample comes from a randomly
    chosen open shard, and a finished shard is replaced by the next one."""
    pending = iter(shards)
    live = list(itertools.islice(pending, k))
    while live:
        i = rng.randrange(len(live))
        try:
            yield next(live[i])
        except StopIteration:
            following = next(pending, None)
            if following is not None:
                live[i] = following
            else:
                live[i] = live[-1]
                live.pop()


class ShardStream(IterableDataset):
    """Batches `(images, labels[, top-k indices, top-k probabilities], Report)` of one rank; each
    DataLoader worker takes its own part."""

    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, Report]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        stats = _Stats()
        try:
            yield from self._batches(worker, workers, stats)
        except _Fatal as e:
            yield torch.empty(0), torch.empty(0, dtype=torch.int64), stats.take(fatal=str(e))

    def _samples(
        self, worker: int, workers: int, stats: _Stats, rng: random.Random
    ) -> Iterator[dict]:
        s = self.spec

        def shard(url: str) -> Iterator[dict]:
            samples = read_shard(url, s.expected.get(url), s.limits.get(url), stats, s.read_timeout)
            return attach(samples, shard_name(url), s.soft, stats.skip) if s.soft and s.train else samples

        if not s.train:  # one pass over this worker's share: every sample exactly once
            for url in s.urls[worker::workers]:
                yield from shard(url)
            return
        while True:  # resampled: an endless sequence of shuffled passes, so no rank runs dry
            order, produced = list(s.urls), 0
            rng.shuffle(order)
            # shard readers are generators: a shard is opened when first drawn from
            for sample in _interleaved([shard(url) for url in order], s.shard_mix, rng):
                produced += 1
                yield sample
            if produced == 0:
                raise _Fatal(
                    f"no readable sample in any of the {len(order)} training shards "
                    f"(first: {order[0]}); see the skipped-sample warnings"
                )

    def _example(self, sample: dict, view_rng: random.Random) -> tuple:
        image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        if image is None:
            raise ValueError("no image in the sample")
        if "cls" not in sample:
            raise ValueError("no label (.cls) in the sample")
        label = int(sample["cls"])
        if not 0 <= label < self.spec.num_classes:
            raise ValueError(f"label {label} outside 0..{self.spec.num_classes - 1}")
        image = decode(image, self.spec.channels)
        if "__soft__" not in sample:
            return self.spec.transform(image), label
        # the stored view: one of R, seeded like the stream (reproducible, fresh after a resume)
        params, idx, prob = pick_view(sample["__soft__"], view_rng.randrange(self.spec.soft.views))
        t = self.spec.transform
        return t.replay(t.prepare(image), params), label, idx, prob

    def samples(self, worker: int = 0, workers: int = 1, stats: _Stats | None = None):
        """Undecoded samples in the order worker `worker` of `workers` batches them (training:
        interleaved shards through the shuffle buffer). `fitdist bench data` reads labels here."""
        s, stats = self.spec, stats or _Stats()
        rng = random.Random("fitdist:{}:{}:{}:{}".format(*s.seed, worker))  # str seeds are stable
        samples = self._samples(worker, workers, stats, rng)
        if s.train and s.shuffle_buffer > 1:
            start = s.shuffle_buffer if s.shuffle_start is None else s.shuffle_start
            samples = _shuffled(samples, s.shuffle_buffer, start, rng)
        return samples

    def _batches(self, worker: int, workers: int, stats: _Stats):
        """Batches assembled in the worker; default_collate stacks them (uint8) straight into
        shared memory there, which saves a copy of every batch on its way to the main process."""
        s = self.spec
        examples: list[tuple] = []
        view_rng = random.Random("fitdist-view:{}:{}:{}:{}".format(*s.seed, worker))
        for sample in self.samples(worker, workers, stats):
            try:
                example = self._example(sample, view_rng)
            except Exception as e:  # noqa: BLE001 - a bad sample is skipped, counted and reported
                where = f"{shard_name(sample['__url__'])}: {sample['__key__']}"
                stats.skip(1, where, f"{type(e).__name__}: {e}")
                continue
            examples.append(example)
            if len(examples) == s.batch:
                yield *default_collate(examples), stats.take()
                examples = []
        if examples:
            yield *default_collate(examples), stats.take()
        if stats.skipped or stats.messages:  # skips after the last batch still reach the counter
            yield torch.empty(0), torch.empty(0, dtype=torch.int64), stats.take()
