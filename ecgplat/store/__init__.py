"""The Zarr v3 feature store, one package: its schema, read API, writer and forget.

Modules (the layout of every file and array is documented once, in docs/formats.md, "Feature
store"):

- ``schema``: shapes, codecs, file names, record/reject/split columns; locating a store's files
  and arrays (local path or fsspec URL); the single-writer lock ``StoreLock``.
- ``read``: ``open_store`` / ``EcgStore``, the view of a store at its last commit used by
  training and retrieval; ``read_commit`` and ``read_forgotten`` parse the commit point and the
  tombstone table.
- ``create``: creating a store, or finishing an interrupted creation, and recovering one to its
  commit point (everything past it is dropped) before a writer appends.
- ``writer``: ``StoreWriter`` (append, commit, splits, recount) and the worker-side
  ``pack_batch``.
- ``segment_codec``: the encoding of the ``segments`` array and its shard files.
- ``sealed_counts``: the counts of ``ecgplat info``, tallied or kept sealed in ``commit.json``.
- ``forget``: withdrawing records (`ecgplat forget`): tombstones, then the data files.

This face re-exports the schema and the read API (``from ecgplat.store import open_store``);
the writer, codec and forget are imported from their modules. Modules of the package import
each other's modules, never this face.
"""

from ecgplat.locks import StoreBusyError
from ecgplat.store.read import (
    EcgStore,
    ForgottenRecordError,
    open_store,
    read_commit,
    read_forgotten,
    to_millivolts,
)
from ecgplat.store.schema import (
    ADDED_COLUMNS,
    COMMIT_FILE,
    DTYPE,
    FEATURES_DIR,
    FORGOTTEN_FILE,
    FORGOTTEN_FORMAT,
    LOCK_FILE,
    N_LEADS,
    RECORD_CHUNK,
    RECORD_COLUMNS,
    REJECT_COLUMNS,
    SAMPLE_RATE,
    SCHEMA_VERSION,
    SECRET_FILE,
    SEGMENT_CHUNK,
    SEGMENT_CLEVEL,
    SEGMENT_CNAME,
    SEGMENT_DELTA,
    SEGMENT_SAMPLES,
    SEGMENT_SECONDS,
    SEGMENT_SHARD,
    SEGMENT_SHUFFLE,
    SPLIT_COLUMNS,
    SPLITS_KEPT,
    UNITS,
    UNITS_DEFAULT,
    UV_PER_MV,
    StoreLock,
    as_str_array,
    generation_number,
    is_url,
    quiet_zarr_warnings,
    store_file,
    zarr_array,
)
from ecgplat.store.sealed_counts import reason_kind

__all__ = [
    # schema
    "ADDED_COLUMNS",
    "COMMIT_FILE",
    "DTYPE",
    "FEATURES_DIR",
    "FORGOTTEN_FILE",
    "FORGOTTEN_FORMAT",
    "LOCK_FILE",
    "N_LEADS",
    "RECORD_CHUNK",
    "RECORD_COLUMNS",
    "REJECT_COLUMNS",
    "SAMPLE_RATE",
    "SCHEMA_VERSION",
    "SECRET_FILE",
    "SEGMENT_CHUNK",
    "SEGMENT_CLEVEL",
    "SEGMENT_CNAME",
    "SEGMENT_DELTA",
    "SEGMENT_SAMPLES",
    "SEGMENT_SECONDS",
    "SEGMENT_SHARD",
    "SEGMENT_SHUFFLE",
    "SPLIT_COLUMNS",
    "SPLITS_KEPT",
    "UNITS",
    "UNITS_DEFAULT",
    "UV_PER_MV",
    "StoreBusyError",
    "StoreLock",
    "as_str_array",
    "generation_number",
    "is_url",
    "quiet_zarr_warnings",
    "store_file",
    "zarr_array",
    # read API
    "EcgStore",
    "ForgottenRecordError",
    "open_store",
    "read_commit",
    "read_forgotten",
    "reason_kind",
    "to_millivolts",
]
