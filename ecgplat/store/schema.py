"""The store's schema: array shapes, codecs, file names, the record/reject/split columns, and the
small helpers that locate a store's files and arrays (local path or fsspec URL) and lock it.

The on-disk layout (every file and array, the commit point, split generations, feature sets) is
documented once, in docs/formats.md ("Feature store"); this module defines its names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np

from ecgplat.locks import WriterLock

if TYPE_CHECKING:
    import zarr

SCHEMA_VERSION = 1
SAMPLE_RATE = 500
SEGMENT_SECONDS = 5
SEGMENT_SAMPLES = SAMPLE_RATE * SEGMENT_SECONDS
N_LEADS = 12
SEGMENT_CHUNK = 1  # segments per chunk of the `segments` array
SEGMENT_SHARD = 64  # segments per shard file of the `segments` array
SEGMENT_DELTA = True  # codecs of `segments`: delta(int16) -> bytes -> Blosc(below)
SEGMENT_CNAME: Final = "zstd"
SEGMENT_CLEVEL = 1
SEGMENT_SHUFFLE: Final = "bitshuffle"
RECORD_CHUNK = 4096  # rows per chunk of record/reject columns
COMMIT_FILE = "commit.json"
SECRET_FILE = "secret.key"
LOCK_FILE = ".lock"  # advisory flock held by the one process writing the store
FEATURES_DIR = "features"  # feature sets (retrieval.embed), written under the store's lock
UNITS = "uV"
DTYPE = "int16"
UV_PER_MV = 1000.0
SPLITS_KEPT = 2  # split generations kept on disk: the current one and the one before it
FORGOTTEN_FILE = "forgotten.json"  # the tombstone table of `ecgplat forget` (store/forget.py)
FORGOTTEN_FORMAT = "ecgplat-forgotten/1"

# (name, numpy dtype, trailing shape) of the record-table columns, in storage order.
RECORD_COLUMNS: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("record_key", "str", ()),
    ("source", "str", ()),
    ("record_id", "str", ()),
    ("path", "str", ()),
    ("path_hash", "str", ()),
    ("patient_key", "str", ()),
    ("fs_original", "float64", ()),
    ("n_samples_original", "int64", ()),
    ("age", "float32", ()),
    ("sex", "str", ()),
    ("raw_codes", "str", ()),
    ("labels", "bool", (26,)),
    ("lead_mask", "bool", (N_LEADS,)),
    ("strat_fold", "int16", ()),
    ("seg_start", "int64", ()),
    ("seg_count", "int32", ()),
)
# Added to schema 1 after its first release (a store written before has no such column, or
# empty values for its older rows; both read as "uV"): the unit of each record's int16 values,
# "uV" = microvolts (voltage data) or "z" = 1/1000 of a per-lead standard deviation (z-scored
# data, ingested only with `--units z`).
RECORD_COLUMNS += (("units", "str", ()),)
UNITS_DEFAULT = "uV"
# Added to schema 1 by issue 21 (a store written before has no such column, read as the default
# below): "filter", the canonical `--filter` spec the record was conditioned with ("" = none,
# ingestion/filters.py); "derived_mask", the leads a vendor file held only as computed from
# other leads (e.g. GE MUSE's III, aVR, aVL, aVF; a subset of lead_mask).
RECORD_COLUMNS += (("filter", "str", ()), ("derived_mask", "bool", (N_LEADS,)))
# every column added after schema 1's first release, and the value its rows read as when absent
ADDED_COLUMNS: dict[str, object] = {"units": UNITS_DEFAULT, "filter": "", "derived_mask": False}
REJECT_COLUMNS: tuple[str, ...] = ("source", "path", "reason", "path_hash")
SPLIT_COLUMNS: tuple[str, ...] = ("split", "ident_split")


def quiet_zarr_warnings() -> None:
    """Silence zarr's notice that the delta filter is a numcodecs (not v3-spec) codec: a known,
    deliberate choice of this schema, repeated on every array open otherwise."""
    import warnings

    warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")


def is_url(path: str | os.PathLike) -> bool:
    """A store or shard location given as an fsspec URL (http://, s3://, ...), not a path."""
    return "://" in str(path) and not str(path).startswith("file://")


# the package fsspec needs for a URL scheme (what its ImportError asks for)
_PROTOCOL_PACKAGES = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
    "http": "aiohttp",
    "https": "aiohttp",
}


def store_file(path: str | os.PathLike, name: str) -> bytes | None:
    """The bytes of file ``name`` of a store at a local path or an fsspec URL (read-only
    stores on object storage or HTTP); None when it does not exist."""
    if is_url(path):
        import fsspec

        try:
            with fsspec.open(f"{str(path).rstrip('/')}/{name}", "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except ImportError:  # fsspec's protocol packages are optional
            scheme = str(path).split("://", 1)[0]
            package = _PROTOCOL_PACKAGES.get(scheme, f"the fsspec package for {scheme}://")
            raise ValueError(f"{path}: install {package} to read {scheme}:// stores") from None
    file = Path(path) / name
    return file.read_bytes() if file.exists() else None


def generation_number(generation: str | None) -> int:
    """k of a split generation name ``g<k>`` (0 for none)."""
    return int(generation[1:]) if generation else 0


class StoreLock(WriterLock):
    """The store's single-writer lock: an exclusive, non-blocking flock on ``STORE/.lock``;
    StoreBusyError when another process holds it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        super().__init__(
            self.path / LOCK_FILE, f"{self.path}: store is being written by another process"
        )


def as_str_array(values) -> np.ndarray:
    """A zarr string column as a plain numpy object array of Python str."""
    return np.asarray(values).astype(object)


def zarr_array(group: zarr.Group, key: str) -> zarr.Array:
    """``group[key]`` where the store layout has an array (zarr's lookup may also yield a group)."""
    import zarr

    node = group[key]
    if not isinstance(node, zarr.Array):
        raise ValueError(f"{group.store_path}/{key}: a group where the store layout has an array")
    return node
