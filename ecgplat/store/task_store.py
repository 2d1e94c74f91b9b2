"""The store's label sets ("tasks"): one file per task, `STORE/tasks/<name>.npz`, written whole.

Format (docs/formats.md, "Feature store"): an uncompressed ``.npz`` (read with
``allow_pickle=False``) holding

* ``spec``: 0-d str, JSON of ``TaskSpec.to_dict()`` plus ``format`` ("ecgplat-task/1"),
  ``store_uuid``, ``n_labelled`` and ``created`` (UTC);
* ``record_index``: int64 (n,), ascending store record indices of the labelled records;
* ``target``: float32 (n, W): binary (n, 1) 0/1; multilabel (n, C) 0/1; multiclass (n, 1) the
  class index into ``classes``; regression (n, C) the values in the target's units.

Nothing else: no key column of the source table is stored (a key may hold a patient id), only
the record indices it matched. The file is replaced atomically (``ecgplat.atomic``) under the
store's writer lock, so a reader sees the old task or the new one. The built-in ``diagnosis``
task is the store's ``labels`` array (every live record, all-zero rows included) and has no
file. Reads leave out forgotten records; ``ecgplat forget`` drops them from the files too.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from ecgplat import atomic
from ecgplat.tasks import DIAGNOSIS, TaskSpec, check_task_name

TASKS_DIR = "tasks"
TASK_FORMAT = "ecgplat-task/1"
BUILTIN = ("diagnosis",)


@dataclass
class TaskLabels:
    """A task's labels: `spec`, the labelled `record_index` (n,) and their `target` (n, W)."""

    spec: TaskSpec
    record_index: np.ndarray
    target: np.ndarray
    meta: dict

    def dense(self, n_records: int) -> np.ndarray:
        """float32 (n_records, W): each record's target row, NaN where it has none."""
        out = np.full((n_records, self.target.shape[1]), np.nan, dtype=np.float32)
        keep = self.record_index < n_records
        out[self.record_index[keep]] = self.target[keep]
        return out


def task_path(store: str | os.PathLike, name: str) -> Path:
    return Path(store) / TASKS_DIR / f"{check_task_name(name)}.npz"


def target_width(spec: TaskSpec) -> int:
    return 1 if spec.kind in ("binary", "multiclass") else len(spec.classes)


def write_task(
    store: str | os.PathLike,
    spec: TaskSpec,
    record_index: np.ndarray,
    target: np.ndarray,
    *,
    store_uuid: str | None,
    overwrite: bool = False,
) -> Path:
    """Write the task file (atomically; the caller holds the store's writer lock). A task of
    that name is replaced only with `overwrite`; "diagnosis" is built in and never written."""
    if spec.name in BUILTIN:
        raise ValueError(f"task name {spec.name!r} is built in (the store's 26-class labels)")
    path = task_path(store, spec.name)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: task {spec.name!r} exists (pass --overwrite to replace it)")
    record_index = np.asarray(record_index, dtype=np.int64)
    target = np.asarray(target, dtype=np.float32).reshape(len(record_index), -1)
    if target.shape[1] != target_width(spec):
        raise ValueError(f"task {spec.name}: target width {target.shape[1]} for kind {spec.kind}")
    order = np.argsort(record_index, kind="stable")
    meta = spec.to_dict() | {
        "format": TASK_FORMAT,
        "store_uuid": store_uuid,
        "n_labelled": int(len(record_index)),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    buf = io.BytesIO()
    np.savez(
        buf,
        spec=np.array(json.dumps(meta)),
        record_index=record_index[order],
        target=target[order],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, buf.getvalue())
    return path


def _load(path: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["spec"]))
            index = np.asarray(data["record_index"], dtype=np.int64)
            target = np.asarray(data["target"], dtype=np.float32)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: unreadable task file ({e})") from None
    if meta.get("format") != TASK_FORMAT:
        raise ValueError(f"{path}: not an {TASK_FORMAT} file")
    return meta, index, target


def read_task(store, name: str) -> TaskLabels:
    """The labels of task `name` of `store` (an open ``EcgStore``), forgotten records left out;
    "diagnosis" is the store's 26-class ``labels``. KeyError naming the store for an unknown
    task."""
    if name == "diagnosis":
        live = np.flatnonzero(store.live).astype(np.int64)
        return TaskLabels(
            DIAGNOSIS,
            live,
            store.labels[live].astype(np.float32),
            DIAGNOSIS.to_dict() | {"n_labelled": len(live), "builtin": True},
        )
    path = task_path(store.path, name)
    if not path.is_file():
        known = ", ".join(t["name"] for t in list_tasks(store))
        raise KeyError(f"{store.path}: no task {name!r} (tasks: {known})")
    meta, index, target = _load(path)
    if meta.get("store_uuid") not in (None, store.attrs.get("store_uuid")):
        raise ValueError(f"{path}: written for another store (store_uuid differs)")
    keep = (index < store.n_records) & store.live[np.minimum(index, store.n_records - 1)]
    return TaskLabels(TaskSpec.from_dict(meta), index[keep], target[keep], meta)


def list_tasks(store) -> list[dict]:
    """Every task of `store`: name, kind, classes, source, n_labelled (built-in first)."""
    out = [DIAGNOSIS.to_dict() | {"n_labelled": int(store.live.sum()), "builtin": True}]
    folder = Path(store.path) / TASKS_DIR
    for path in sorted(folder.glob("*.npz")) if folder.is_dir() else ():
        if path.name.startswith("."):
            continue
        meta, index, _ = _load(path)
        live = (index < store.n_records) & store.live[np.minimum(index, store.n_records - 1)]
        out.append(
            {k: meta[k] for k in ("name", "kind", "classes", "source", "created")}
            | {"n_labelled": int(live.sum()), "builtin": False}
        )
    return out


def scrub_tasks(store: str | os.PathLike, pending: np.ndarray) -> int:
    """Rewrite every task file holding rows of the `pending` (forgotten) records without them;
    the number of files rewritten (`ecgplat forget`'s scrub; idempotent)."""
    folder, n = Path(store) / TASKS_DIR, 0
    for path in sorted(folder.glob("*.npz")) if folder.is_dir() else ():
        if path.name.startswith("."):
            continue
        meta, index, target = _load(path)
        keep = ~np.isin(index, np.asarray(pending, dtype=np.int64))
        if keep.all():
            continue
        meta["n_labelled"] = int(keep.sum())
        buf = io.BytesIO()
        np.savez(
            buf, spec=np.array(json.dumps(meta)), record_index=index[keep], target=target[keep]
        )
        atomic.write_bytes(path, buf.getvalue())
        n += 1
    return n
