"""Streaming training batches from WebDataset shards (written by `ingestion.shards`).

Shards (format: `ecgplat.shard_format`, documented in docs/formats.md): `DIR/<split>-NNNNNN.tar`,
one sample per record, listed with their sample/segment counts in `DIR/_info.json`. A shard source
may be a directory (local path or fsspec URL such as `file:///...`, `s3://...`), a brace
pattern (`dir/train-{000000..000003}.tar`), a single `.tar`, or a `pipe:` command.

Pipeline per rank and DataLoader worker ("slot"): shard list (shuffled with seed+epoch, the
same order on every rank) -> split by slot (whole shards when there are at least as many
shards as slots, otherwise every slot reads all shards and keeps every slots-th record) ->
records (those whose key is in `StreamSpec.exclude_record_keys` dropped as they are read,
before the split by record) -> units (CMSC pairs or single segments) -> seeded shuffle buffer ->
batches -> int16 µV to float32 mV, lead subset (`data.leads`, zero-filled), random lead masking.
With `data.normalize=zscore` each record is z-scored per lead (`training.normalize`) as it is
read.

Training streams repeat their share as needed and stop after exactly `epoch_batches` batches
on every rank (default: units in `_info.json` // (world * batch_size)), so ranks stay in step.
The order is a pure function of (seed, epoch, rank, world, num_workers): batch k of an epoch
is always the same, and `BatchStream.start_at(k)` resumes at batch k without re-assembling
(or re-augmenting) the skipped ones; RLM draws are seeded per batch for the same reason.
Evaluation streams (`train=False`) read their share once, in order, with no augmentation.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand
import numpy as np
import torch
import webdataset as wds
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from ecgplat.leads import LEADS, parse_leads
from ecgplat.shard_format import (
    META_MEMBER,
    META_REQUIRED,
    SEG_MEMBER,
    export_entry,
    listed_urls,
    read_info,
)
from ecgplat.store import to_millivolts
from training.augment import RandomLeadMasking
from training.batch import make_batch
from training.normalize import check_mode, normalize_record

MODES = ("pairs", "segments")


# --- shard sources -------------------------------------------------------------------------
@dataclass
class ShardSet:
    """Shard URLs of one split and, when `_info.json` lists them, the record (`samples`) and
    segment counts."""

    urls: list[str]
    samples: int | None = None
    segments: int | None = None

    def units(self, mode: str) -> int | None:
        """Number of training units: segments, or pairs (estimated as segments // 2)."""
        if self.segments is None:
            return self.samples
        return self.segments if mode == "segments" else self.segments // 2


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def shard_set(shards: str | Path, split: str) -> ShardSet:
    """The shards of `split` under `shards` (see the module docstring for accepted forms)."""
    src = str(shards)
    if src.startswith("pipe:") or "{" in src or src.endswith(".tar"):
        urls = list(braceexpand.braceexpand(src))
        if src.startswith("pipe:"):
            return ShardSet(urls)
        base = src.rsplit("/", 1)[0] if "/" in src else "."
        info = read_info(base)
        if info and split in info:  # counts for exactly the listed files, when known
            by_name = {s["file"]: s for s in info[split]["shards"]}
            names = [u.rsplit("/", 1)[-1] for u in urls]
            if all(n in by_name for n in names):
                return ShardSet(
                    urls,
                    sum(by_name[n]["samples"] for n in names),
                    sum(by_name[n].get("segments", 0) for n in names) or None,
                )
        return ShardSet(urls)
    urls = listed_urls(src, split)  # FileNotFoundError / ValueError naming the problem
    files = export_entry(read_info(src) or {}, split, src)["shards"]
    if not files:
        raise ValueError(f"{src}: split '{split}' has no shards")
    segments = sum(s.get("segments", 0) for s in files) or None
    return ShardSet(urls, sum(int(s["samples"]) for s in files), segments)


def shard_urls(shards: str | Path, split: str) -> list[str]:
    """Shard URLs of `split`, read from `_info.json` (or expanded from a pattern)."""
    return shard_set(shards, split).urls


def _open(url: str):
    if url.startswith("pipe:") or not _is_remote(url):
        return gopen(url)
    import fsspec

    return fsspec.open(url, "rb").open()


# --- records and units ---------------------------------------------------------------------
class ShardError(ValueError):
    """A shard or one of its samples cannot be read; the message names the shard."""


def group_id(key: str) -> int:
    """Stable non-negative int64 id of a patient/record key (equal on every rank/process)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def iter_records(url: str) -> Iterator[tuple[str, np.ndarray, dict]]:
    """(key, int16 segments (S, 12, 2500), meta) for every sample of one shard; a malformed
    shard or sample raises ValueError naming the shard and the reason."""
    try:
        stream = _open(url)
    except OSError as e:
        raise ShardError(f"{url}: cannot open shard ({e.strerror or e})") from None
    try:
        files = tar_file_expander([{"url": url, "stream": stream}])
        for sample in group_by_keys(files):
            yield _decode(url, sample)
    except ShardError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        # tar errors arrive with long webdataset contexts appended
        reason = str(e.args[0]).split(" @ ")[0] if e.args else ""
        raise ShardError(f"{url}: unreadable shard ({type(e).__name__}: {reason})") from None
    finally:
        stream.close()


def _decode(url: str, sample: dict) -> tuple[str, np.ndarray, dict]:
    key = sample["__key__"]
    if SEG_MEMBER not in sample or META_MEMBER not in sample:
        raise ShardError(
            f"{url}: sample {key}: needs seg.npy and meta.json, "
            f"has {sorted(k for k in sample if not k.startswith('__'))}"
        )
    try:
        segs = np.load(io.BytesIO(sample[SEG_MEMBER]), allow_pickle=False)
        meta = json.loads(sample[META_MEMBER])
    except (ValueError, OSError, EOFError) as e:
        raise ShardError(f"{url}: sample {key}: cannot decode ({e})") from None
    if segs.dtype != np.int16 or segs.ndim != 3 or segs.shape[1] != len(LEADS):
        raise ShardError(
            f"{url}: sample {key}: seg.npy must be int16 (S, 12, T), got {segs.dtype} {segs.shape}"
        )
    missing = [f for f in META_REQUIRED if f not in meta]
    if missing:
        raise ShardError(f"{url}: sample {key}: meta.json lacks {', '.join(missing)}")
    return key, segs, meta


@dataclass
class Unit:
    """One training item: a pair (segments (2, 12, T)) or a single segment ((1, 12, T))."""

    segments: np.ndarray
    first: int  # index of the first segment within its record
    meta: dict = field(repr=False)


def record_units(segs: np.ndarray, meta: dict, mode: str) -> list[Unit]:
    """CMSC pairs (0,1), (2,3), ... (an odd last segment dropped) or every single segment."""
    if mode == "pairs":
        return [Unit(segs[i : i + 2], i, meta) for i in range(0, segs.shape[0] - 1, 2)]
    return [Unit(segs[i : i + 1], i, meta) for i in range(segs.shape[0])]


# --- the stream ----------------------------------------------------------------------------
@dataclass
class StreamSpec:
    """What to stream; `leads` are canonical lead indices kept (others zero-filled);
    `exclude_record_keys`: records (by `record_key`) left out of the stream. The epoch length
    is still sized from the shard counts (or `epoch_batches`)."""

    shards: ShardSet
    mode: str = "pairs"
    batch_size: int = 64
    seed: int = 1
    shuffle_buffer: int = 256
    train: bool = True
    rlm: RandomLeadMasking | None = None
    leads: tuple[int, ...] = tuple(range(len(LEADS)))
    epoch_batches: int | None = None
    exclude_record_keys: frozenset[str] | None = None
    normalize: str = "none"  # per-record amplitude normalisation (training.normalize)


class ShardStream(torch.utils.data.IterableDataset):
    """Batches of one rank for one epoch; each DataLoader worker produces every nw-th batch."""

    def __init__(
        self, spec: StreamSpec, rank: int = 0, world: int = 1, epoch: int = 0, start_batch: int = 0
    ):
        super().__init__()
        if spec.mode not in MODES:
            raise ValueError(f"stream mode '{spec.mode}' is not one of {', '.join(MODES)}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world of size {world}")
        self.spec, self.rank, self.world, self.epoch = spec, rank, world, epoch
        self.start_batch = start_batch
        self.total = self._epoch_batches() if spec.train else None

    def _epoch_batches(self) -> int:
        if self.spec.epoch_batches:
            return int(self.spec.epoch_batches)
        units = self.spec.shards.units(self.spec.mode)
        if units is None:
            raise ValueError(
                "cannot size the epoch: the shard source lists no sample counts "
                "(no _info.json); set data.epoch_batches"
            )
        return max(1, units // (self.world * self.spec.batch_size))

    # units of one slot, one pass over its share
    def _pass(self, slot: int, slots: int, pass_index: int) -> Iterator[Unit]:
        urls = list(self.spec.shards.urls)
        if self.spec.train:
            random.Random(f"shards-{self.spec.seed}-{self.epoch}-{pass_index}").shuffle(urls)
        by_shard = len(urls) >= slots
        if by_shard:
            urls = urls[slot::slots]
        exclude = self.spec.exclude_record_keys or frozenset()
        n = 0
        for url in urls:
            for _, segs, meta in iter_records(url):
                if meta["record_key"] in exclude:
                    continue
                n += 1
                if by_shard or (n - 1) % slots == slot:
                    if self.spec.normalize != "none":  # float32, already in its final unit
                        segs = normalize_record(to_millivolts(segs), self.spec.normalize)
                    yield from record_units(segs, meta, self.spec.mode)

    def _units(self, slot: int, slots: int) -> Iterator[Unit]:
        if not self.spec.train:
            yield from self._pass(slot, slots, 0)
            return
        pass_index = 0
        while True:  # repeat the share until the epoch's batch count is reached
            units = self._pass(slot, slots, pass_index)
            seed = f"buffer-{self.spec.seed}-{self.epoch}-{pass_index}-{slot}-{slots}"
            produced = False
            size = max(1, self.spec.shuffle_buffer)
            for unit in wds.filters.shuffle(size, size, rng=random.Random(seed))(units):
                produced = True
                yield unit
            if not produced:
                raise ValueError(
                    f"rank {self.rank}: no training units in its share of "
                    f"{len(self.spec.shards.urls)} shard(s) (records shorter than "
                    "10 s give no pairs; fewer records than ranks x workers?)"
                )
            pass_index += 1

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        # worker ids are rotated on resume so that the DataLoader's round-robin, which starts
        # at worker 0, delivers batch `start_batch` first
        role = (worker + self.start_batch) % nw
        slot, slots = self.rank * nw + role, self.world * nw
        units = self._units(slot, slots)
        index = role
        while self.total is None or index < self.total:
            # units is open-ended: take at most batch_size of it (range is zipped first, so
            # no unit is drawn and dropped once the batch is full)
            chunk = [u for _, u in zip(range(self.spec.batch_size), units, strict=False)]
            if not chunk:
                return
            if index >= self.start_batch:
                yield self.assemble(chunk, index)
            index += nw

    def assemble(self, units: list[Unit], index: int) -> dict:
        """The batch dict of `units` (batch number `index` of this rank's epoch)."""
        segs = np.concatenate([u.segments for u in units])  # int16 µV, or normalised float32
        x = to_millivolts(segs) if segs.dtype == np.int16 else segs
        per_unit = [u.segments.shape[0] for u in units]
        present = np.repeat([u.meta["lead_mask"] for u in units], per_unit, axis=0)
        record_index = np.repeat([int(u.meta["record_index"]) for u in units], per_unit)
        if self.spec.mode == "pairs":
            keys = [u.meta.get("patient_key") or u.meta["record_key"] for u in units]
            extra = {
                "segment": np.tile(np.array([0, 1], dtype=np.int64), len(units)),
                "group": np.repeat([group_id(k) for k in keys], 2).astype(np.int64),
            }
        else:
            extra = {
                "labels": np.array([u.meta["labels"] for u in units], dtype=np.float32),
                "patient_key": [u.meta["patient_key"] for u in units],
                "segment_index": np.array([u.first for u in units], dtype=np.int64),
            }
        rlm = self.spec.rlm if self.spec.train else None
        rng = np.random.default_rng([self.spec.seed, self.epoch, self.rank, index, 0x5A])
        return make_batch(
            x,
            present,
            record_index,
            self.spec.leads,
            rlm=rlm,
            rng=rng if rlm is not None else None,
            **extra,
        )


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class BatchStream:
    """Iterable of batch dicts for one rank and epoch, through a DataLoader with
    `num_workers` processes. `batches_consumed` counts batches handed out (resume position);
    `len()` is the number of batches left (training streams)."""

    def __init__(
        self, spec: StreamSpec, rank: int = 0, world: int = 1, epoch: int = 0, num_workers: int = 0
    ):
        self.spec, self.rank, self.world, self.epoch = spec, rank, world, epoch
        self.num_workers = num_workers
        self.dataset = ShardStream(spec, rank, world, epoch)
        self.batches_per_epoch = self.dataset.total
        self.batches_consumed = 0

    def start_at(self, batches_consumed: int) -> BatchStream:
        """Resume: the next batch handed out is batch `batches_consumed` of the epoch."""
        self.dataset.start_batch = self.batches_consumed = int(batches_consumed)
        return self

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("evaluation streams have no precomputed length")
        return self.batches_per_epoch - self.batches_consumed

    def __iter__(self) -> Iterator[dict]:
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            worker_init_fn=_worker_init if self.num_workers else None,
        )
        try:
            for batch in loader:
                self.batches_consumed += 1
                yield batch
        except ShardError as e:
            # a worker's error arrives with its traceback in the message; keep the one line
            last = str(e).strip().splitlines()[-1]
            raise ShardError(last.split("ShardError: ", 1)[-1]) from None

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batches_consumed": self.batches_consumed,
            "rank": self.rank,
            "world": self.world,
            "num_workers": self.num_workers,
            "seed": self.spec.seed,
        }


def stream_from_config(
    cfg,
    mode: str,
    rank: int = 0,
    world: int = 1,
    epoch: int = 0,
    split: str | None = None,
    train: bool = True,
    exclude_record_keys: frozenset[str] | None = None,
) -> BatchStream:
    """A BatchStream from a RunConfig: `cfg.data.shards`, the split (default
    `cfg.data.train_split`), `batch_size`, `num_workers`, `shuffle_buffer`, `leads`, RLM
    options and `epoch_batches`, seeded by `cfg.seed`; without the records of
    `exclude_record_keys`."""
    d = cfg.data
    if not d.shards:
        raise ValueError("data.shards is not set (pass --shards DIR)")
    spec = StreamSpec(
        shards=shard_set(d.shards, split or d.train_split),
        mode=mode,
        batch_size=int(d.batch_size),
        seed=int(cfg.seed),
        shuffle_buffer=int(d.shuffle_buffer),
        train=train,
        rlm=RandomLeadMasking.from_config(d) if train else None,
        leads=parse_leads(d.leads),
        epoch_batches=d.epoch_batches,
        exclude_record_keys=exclude_record_keys,
        normalize=check_mode(getattr(d, "normalize", "none")),
    )
    return BatchStream(spec, rank, world, epoch, int(d.num_workers))
