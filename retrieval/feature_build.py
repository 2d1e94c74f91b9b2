"""The write protocol of a feature set: plan a run under the store's writer lock (append, resume
a killed build, or build anew), create an empty set, commit rows, publish a new build.

Feature row p is segment p of the store in record order (`SegmentOrder`). Rows are written
first, then the lineage's counts (`n_segments`, `n_records`, `n_record_rows`) are replaced
atomically: the commit point; readers use only the committed rows. A new set (or an overwrite) is
written under `features/.build-<name>` and renamed into place when complete, so an interrupted
first embed never shows a half set under its name and an interrupted overwrite keeps the old set.
An overwrite moves the old set aside, then the new one into place: readers find the complete
build while neither is there (`FeatureSet.published`), and the next run finishes the move.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecgplat.atomic import fsync_dir
from ecgplat.faults import stop_point
from retrieval.features import SCHEMA, FeatureError, FeatureSet, dir_lineage
from retrieval.lineage import Lineage

CHUNK_ROWS = 4096  # rows per zarr chunk of a feature array


@dataclass
class SegmentOrder:
    """The store's segments in record order: feature row p is segment `rows[p]` of the store."""

    rows: np.ndarray  # int64 store segment rows
    record: np.ndarray  # int64 record index of each
    number: np.ndarray  # int64 segment number inside its record
    record_end: np.ndarray  # int64 (R,) feature row after each record's last segment

    @classmethod
    def of(cls, store) -> SegmentOrder:
        # two int columns, not the record table (its string columns cost O(records) Python work)
        starts = np.asarray(store.column("seg_start"), dtype=np.int64)
        counts = np.asarray(store.column("seg_count"), dtype=np.int64)
        ends = np.cumsum(counts)
        number = np.arange(int(ends[-1]) if len(ends) else 0) - np.repeat(ends - counts, counts)
        return cls(
            np.repeat(starts, counts) + number,
            np.repeat(np.arange(len(counts), dtype=np.int64), counts),
            number,
            ends,
        )

    def records_covered(self, n_segments: int) -> int:
        """Number of leading records all of whose segments are among the first `n_segments`."""
        return int(np.searchsorted(self.record_end, n_segments, side="right"))

    def rows_of(self, r0: int, r1: int) -> tuple[int, int]:
        """Feature rows [lo, hi) of records r0 .. r1 - 1."""
        return (int(self.record_end[r0 - 1]) if r0 else 0), (
            int(self.record_end[r1 - 1]) if r1 else 0
        )

    def record_span(self, first: int, last: int) -> tuple[int, int]:
        """Feature rows [lo, hi) of the whole records holding rows `first` and `last - 1`."""
        return self.rows_of(int(self.record[first]), int(self.record[last - 1]) + 1)


@dataclass
class BuildPlan:
    """Where a run writes, decided under the writer lock."""

    dir: Path  # the published set (an append) or its build directory
    lineage: dict | None  # the committed lineage to go on from; None: a new, empty build
    fresh: bool  # a build, renamed into place at the end


@dataclass
class SegmentRows:
    """Segment rows computed by a run, to be written from feature row `start` on."""

    start: int
    embedding: np.ndarray  # float32 (n, D)
    record_index: np.ndarray  # int64 (n,)
    segment_number: np.ndarray  # int32 (n,)

    @property
    def stop(self) -> int:
        return self.start + len(self.record_index)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "embedding": self.embedding,
            "record_index": self.record_index,
            "segment_number": self.segment_number,
        }


def unchanged_lineage(
    fs: FeatureSet, want: Lineage, order: SegmentOrder, overwrite: bool
) -> dict | None:
    """The lineage of the set when it already holds every segment of the store with `want`'s
    model (a first look, without the lock), else None."""
    old = fs.lineage()
    if (
        old is not None
        and not overwrite
        and fs.path.exists()  # else the move of a killed overwrite, finished under the lock
        and Lineage(old).same_model(want)
        and old.get("store_uuid") == want["store_uuid"]
        and old.get("n_segments") == len(order.rows)
        and old.get("n_records", len(order.record_end)) == len(order.record_end)
    ):
        return old
    return None


def plan_build(
    fs: FeatureSet, want: Lineage, order: SegmentOrder, overwrite: bool, batch_size
) -> BuildPlan:
    """What to do, decided under the writer lock: append to the set, resume a killed build of
    the same lineage, or start a new build. FeatureError when the set holds another model's
    embeddings (without `overwrite`) or was embedded in other batches."""
    if not (fs.root / "zarr.json").is_file():  # `features` as a zarr group
        import zarr

        zarr.open_group(str(fs.root), mode="a")
    _finish_publish(fs)
    old = fs.lineage()
    if old is not None and not overwrite:
        if not Lineage(old).same_model(want) or not Lineage(old).same_normalize(want):
            raise FeatureError(
                f"{fs.store_path}: feature set {fs.name!r} holds embeddings of checkpoint "
                f"{old.get('checkpoint_sha256', '?')[:12]} with leads "
                f"{old.get('leads')} in {old.get('precision', 'fp32')}; "
                "use another --name or --overwrite"
            )
        if (
            old.get("store_uuid") == want["store_uuid"]
            and old["n_segments"] <= len(order.rows)
            and _aligned(fs, old, order)
        ):
            _check_batch_size(fs, old, batch_size)
            if "n_record_rows" not in old:  # a set written before appends: all rows committed
                ends = order.record_end[: order.records_covered(old["n_segments"])]
                old = {**old, "n_record_rows": int(np.count_nonzero(np.diff(ends, prepend=0)))}
            return BuildPlan(fs.path, old, fresh=False)
    _remove_leftovers(fs)
    partial = dir_lineage(fs.build_path)
    if (
        partial is not None
        and Lineage(partial).same_build(want)
        and partial.get("batch_size") == (batch_size or partial.get("batch_size"))
        and partial["n_segments"] <= len(order.rows)
    ):
        return BuildPlan(fs.build_path, partial, fresh=True)  # resume a killed build
    shutil.rmtree(fs.build_path, ignore_errors=True)
    return BuildPlan(fs.build_path, None, fresh=True)


def _aligned(fs: FeatureSet, old: dict, order: SegmentOrder) -> bool:
    """Whether the set's rows are the store's segments in order (row = segment position). Sets
    written before appends existed may lack the rows of records forgotten before their embed;
    those are rebuilt rather than appended to."""
    if "n_record_rows" in old:  # written by the incremental embed: aligned by construction
        return True
    n = int(old["n_segments"])
    rows = np.asarray(fs.group("segment")["record_index"][:n], dtype=np.int64)
    return len(rows) == n and np.array_equal(rows, order.record[:n])


def _check_batch_size(fs: FeatureSet, old: dict, batch_size) -> None:
    if batch_size and old.get("batch_size", batch_size) != batch_size:
        raise FeatureError(
            f"{fs.store_path}: feature set {fs.name!r} was embedded in batches of "
            f"{old['batch_size']}; appending in batches of {batch_size} would not give the same "
            "embeddings (drop --batch-size or use --overwrite)"
        )


def _remove_leftovers(fs: FeatureSet) -> None:
    for tmp in fs.root.glob(f".tmp-{fs.name}-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def _finish_publish(fs: FeatureSet) -> None:
    """Under the writer lock: move into place the complete build of an overwrite killed between
    its two renames (readers already see it), and delete the old set it moved aside."""
    if not fs.path.exists() and (dir_lineage(fs.build_path) or {}).get("complete"):
        os.replace(fs.build_path, fs.path)
        fsync_dir(fs.root)
        _remove_leftovers(fs)


def record_filters(store) -> list[str]:
    """The `--filter` specs the store's records were ingested with ("" = none), sorted: the
    `filters` of the lineage of the sets embedded from them."""
    return sorted(str(v) for v in store.column_codes("filter")[1])


def new_lineage(
    fs: FeatureSet, want: Lineage, model, dim: int, batch_size: int, filters=()
) -> dict:
    """The lineage of a new, empty set (complete=False) of `model` (a `LoadedModel`); `filters`:
    the `--filter` specs of the records it embeds (`record_filters`)."""
    return {
        "schema": SCHEMA,
        "name": fs.name,
        "checkpoint_sha256": want["checkpoint_sha256"],
        "checkpoint_kind": model.kind,
        "checkpoint": str(model.checkpoint.resolve()),
        "config": model.config,
        "leads": want["leads"],
        "precision": want["precision"],
        "normalize": want["normalize"],
        "filters": sorted(filters),
        "dim": int(dim),
        "batch_size": int(batch_size),
        "created": _now(),
        "store_uuid": want["store_uuid"],
        "n_records": 0,
        "n_segments": 0,
        "n_record_rows": 0,
        "complete": False,
    }


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def create(path: Path, lineage: dict, dim: int) -> None:
    """An empty feature set (complete=False) at `path`."""
    import zarr

    group = zarr.open_group(str(path), mode="w")
    columns = {
        "segment": (("embedding", np.float32, dim), ("record_index", np.int64, 0)),
        "record": (("embedding", np.float32, dim), ("record_index", np.int64, 0)),
    }
    columns["segment"] += (("segment_number", np.int32, 0),)
    for level, arrays in columns.items():
        sub = group.create_group(level)
        for key, dtype, width in arrays:
            shape = (0, width) if width else (0,)
            chunks = (CHUNK_ROWS, width) if width else (CHUNK_ROWS,)
            sub.create_array(key, shape=shape, dtype=dtype, chunks=chunks)
    group.attrs["lineage"] = lineage


def _put_rows(group, start: int, arrays: dict) -> None:
    for key, value in arrays.items():
        arr = group[key]
        end = start + len(value)
        if arr.shape[0] != end:
            arr.resize((end, *arr.shape[1:]))
        if len(value):
            arr[start:end] = value


def commit_rows(
    path: Path, lineage: dict, rows: SegmentRows, order: SegmentOrder, done: int
) -> dict:
    """Write segment rows past the committed counts, then the rows of the records they complete
    (means of the set's segment rows, `done` = the committed segment count before), then the
    lineage that commits both (one atomic replacement of the group's zarr.json); returns it."""
    import zarr

    from training.models.identifier import record_means

    group = zarr.open_group(str(path), mode="r+")
    _put_rows(group["segment"], rows.start, rows.arrays())
    r0, r1 = order.records_covered(done), order.records_covered(rows.stop)
    lo, hi = order.rows_of(r0, r1)
    emb = np.asarray(group["segment"]["embedding"][lo:hi], dtype=np.float32)
    rec_ids, rec_emb = record_means(emb, order.record[lo:hi])
    n_rows = int(lineage.get("n_record_rows", 0))
    _put_rows(group["record"], n_rows, {"embedding": rec_emb, "record_index": rec_ids})
    lineage = {
        **lineage,
        "n_segments": rows.stop,
        "n_records": r1,
        "n_record_rows": n_rows + len(rec_ids),
    }
    group.attrs["lineage"] = lineage  # last: the commit point
    return lineage


def finish(fs: FeatureSet, plan: BuildPlan, lineage: dict) -> dict:
    """Mark the set complete with the final counts (and move a new build into place)."""
    import zarr

    lineage = {**lineage, "complete": True}
    if plan.fresh:
        lineage["created"] = _now()
    group = zarr.open_group(str(plan.dir), mode="r+")
    group.attrs["lineage"] = lineage
    if plan.fresh:
        _publish(fs, plan.dir)
    return lineage


def _publish(fs: FeatureSet, build: Path) -> None:
    target = fs.path
    if target.exists():  # overwrite: move the old set aside first, then swap in the new one
        trash = fs.root / f".tmp-{fs.name}-old-{uuid.uuid4().hex[:8]}"
        os.replace(target, trash)
        stop_point("embed.between_renames")  # readers see the complete build (`published`)
        os.replace(build, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(build, target)
    fsync_dir(fs.root)
