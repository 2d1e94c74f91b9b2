"""Building a task's labels from its source (a table, a store field or a vocabulary), checked.

`add_task(store, name, ...)` is `ecgplat labels add`: it builds the labels, refuses a bad table
with a one-line `TaskTableError` naming the file and the reason (keys matching no record,
duplicate keys, keys of forgotten records, missing or mixed-type targets, a class with a single
member), then writes the task file under the store's writer lock (`ecgplat.store.task_store`).
Reports name table rows by number (row 1 = the first data row), never by key: a key column may
hold patient identifiers, which are never printed or stored.

Table keys (``--key COL``) match records by their store ``record_key``, their ``path`` as
ingested (relative to the ingested folder, with or without the file extension) or their
``record_id``; ``key_type="auto"`` takes whichever of the three matches most keys.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ecgplat.tasks import KINDS, TaskSpec, check_task_name

KEY_TYPES = ("auto", "record_key", "path", "record_id")
FIELDS = ("age", "sex")
_MISSING = {"", "nan", "na", "n/a", "null", "none"}
_TRUE, _FALSE = {"true", "yes", "1", "1.0"}, {"false", "no", "0", "0.0"}


class TaskTableError(ValueError):
    """A label table (or source) that cannot make a task; one line naming the file and why."""


@dataclass
class BuiltTask:
    spec: TaskSpec
    record_index: np.ndarray
    target: np.ndarray
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = self.spec.to_dict() | {"n_labelled": int(len(self.record_index))}
        if self.spec.kind == "regression":
            out["target_mean"] = [float(v) for v in self.target.mean(axis=0)]
            out["target_std"] = [float(v) for v in self.target.std(axis=0)]
        elif self.spec.kind == "multiclass":
            counts = np.bincount(self.target[:, 0].astype(int), minlength=len(self.spec.classes))
            out["class_counts"] = dict(zip(self.spec.classes, map(int, counts), strict=True))
        else:
            pos = self.target.sum(axis=0).astype(int)
            out["positives"] = dict(zip(self.spec.classes, map(int, pos), strict=True))
        if self.notes:
            out["notes"] = list(self.notes)
        return out


def _rows(positions, limit: int = 5) -> str:
    pos = [int(p) + 1 for p in positions]
    text = ", ".join(map(str, pos[:limit]))
    return f"data row{'s' if len(pos) > 1 else ''} {text}{' ...' if len(pos) > limit else ''}"


# --- the table ---------------------------------------------------------------------------------


def read_table(path: str | os.PathLike) -> tuple[list[str], dict[str, list]]:
    """(column names, {column: list of python values}) of a CSV or Parquet file; CSV cells are
    read as text (ids keep their leading zeros)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise TaskTableError(f"{path}: no such table file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        elif suffix in (".csv", ".tsv", ".txt"):
            frame = pd.read_csv(
                path, dtype=str, keep_default_na=False, sep="\t" if suffix == ".tsv" else ","
            )
        else:
            raise TaskTableError(f"{path}: a label table must be .csv, .tsv or .parquet")
    except TaskTableError:
        raise
    except Exception as e:  # noqa: BLE001 - pandas/pyarrow raise many types for a bad file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise TaskTableError(f"{path}: unreadable table ({type(e).__name__}: {first})") from None
    names = [str(c) for c in frame.columns]
    if len(set(names)) != len(names):
        raise TaskTableError(f"{path}: duplicate column names")
    return names, {str(c): frame[c].tolist() for c in frame.columns}


def _cell(value) -> Any:
    """None (missing), float (a number) or str (anything else) for one table cell."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return None if math.isnan(float(value)) else float(value)
    text = str(value).strip()
    if text.lower() in _MISSING:
        return None
    try:
        number = float(text)
    except ValueError:
        return text
    return number if math.isfinite(number) else None


def _match_keys(store, keys: list[str], key_type: str) -> tuple[str, np.ndarray, np.ndarray]:
    """(key type used, record index per key or -1, number of records each key names)."""
    live = store.live
    candidates = KEY_TYPES[1:] if key_type == "auto" else (key_type,)
    best = None
    for kind in candidates:
        column = store.column(kind)
        lookup: dict[str, list[int]] = {}
        for i in np.flatnonzero(live):
            lookup.setdefault(str(column[i]), []).append(int(i))
        index = np.full(len(keys), -1, dtype=np.int64)
        hits = np.zeros(len(keys), dtype=np.int64)
        for j, key in enumerate(keys):
            found = lookup.get(key)
            if found is None and kind == "path":
                stem = key[2:] if key.startswith("./") else key
                found = lookup.get(stem) or lookup.get(os.path.splitext(stem)[0])
            if found:
                index[j], hits[j] = found[0], len(found)
        score = int((hits > 0).sum())
        if best is None or score > best[0]:
            best = (score, kind, index, hits)
    assert best is not None
    return best[1], best[2], best[3]


def _forgotten_keys(store, keys: list[str], kind: str) -> np.ndarray:
    """bool per key: the key names a record that `ecgplat forget` took out (tombstone hashes)."""
    from ecgplat.privacy import tombstone_hash
    from ecgplat.store.writer import path_hash

    table = store.tombstones
    if not table.get("records"):
        return np.zeros(len(keys), dtype=bool)
    secret_file = Path(store.path) / "secret.key"
    if not secret_file.is_file():
        return np.zeros(len(keys), dtype=bool)
    secret = secret_file.read_bytes()
    key_hashes = set(table["key_hash"])
    gone = np.asarray(table["records"], dtype=np.int64)
    gone = gone[gone < store.n_records]
    path_hashes = set(np.asarray(store.column("path_hash"))[gone].tolist())
    sources = sorted(set(np.asarray(store.column("source"))[gone].tolist()))
    out = np.zeros(len(keys), dtype=bool)
    for j, key in enumerate(keys):
        if kind == "record_key":
            out[j] = tombstone_hash("record", key, secret) in key_hashes
        elif kind == "record_id":
            out[j] = any(
                tombstone_hash("record", f"{s}/{key}", secret) in key_hashes for s in sources
            )
        else:
            out[j] = any(path_hash(s, key, secret) in path_hashes for s in sources)
    return out


def _infer_kind(values: list[list[Any]]) -> str:
    if len(values) > 1:
        flat = {v for col in values for v in col}
        return "multilabel" if flat <= {0.0, 1.0} else "regression"
    col = values[0]
    if any(isinstance(v, str) for v in col):
        distinct = {str(v).lower() for v in col}
        return "binary" if distinct <= (_TRUE | _FALSE) else "multiclass"
    distinct_f = set(col)
    if distinct_f <= {0.0, 1.0}:
        return "binary"
    return "regression"


def _check_members(path, spec: TaskSpec, target: np.ndarray) -> None:
    """A class with fewer than two members cannot be split, thresholded or evaluated."""
    if spec.kind == "regression":
        if len(target) < 2 or np.any(target.std(axis=0) == 0):
            raise TaskTableError(f"{path}: a regression target is constant over the matched rows")
        return
    if spec.kind == "multiclass":
        counts = np.bincount(target[:, 0].astype(int), minlength=len(spec.classes))
        names = spec.classes
    elif spec.kind == "binary":
        pos = int(target[:, 0].sum())
        counts = np.array([len(target) - pos, pos])
        names = (f"not {spec.classes[0]}", spec.classes[0])
    else:
        counts = target.sum(axis=0).astype(int)
        names = spec.classes
    for name, n in zip(names, counts, strict=True):
        if n < 2:
            raise TaskTableError(
                f"{path}: class {name!r} has {'a single member' if n == 1 else 'no member'} "
                "among the matched records (each class needs at least 2)"
            )


def _table_keys(path: Path, data: dict[str, list], key: str) -> list[str]:
    """The key column as text, refused when a key is empty or repeated."""
    keys = ["" if _cell(v) is None else str(v).strip() for v in data[key]]
    if not keys:
        raise TaskTableError(f"{path}: the table has no rows")
    empty = [i for i, k in enumerate(keys) if not k]
    if empty:
        raise TaskTableError(
            f"{path}: {len(empty)} empty key(s) in column {key!r} ({_rows(empty)})"
        )
    seen: set[str] = set()
    dup = []
    for i, k in enumerate(keys):
        if k in seen:
            dup.append(i)
        seen.add(k)
    if dup:
        raise TaskTableError(
            f"{path}: {len(dup)} duplicate key(s) in column {key!r} ({_rows(dup)})"
        )
    return keys


def _matched(store, path: Path, keys: list[str], key_type: str, allow_unmatched: bool):
    """(key type used, record index per key (-1: none), rows that matched, rows that did not);
    keys of forgotten records, keys naming several records and (unless allowed) unmatched keys
    are refused."""
    used, index, hits = _match_keys(store, keys, key_type)
    many = np.flatnonzero(hits > 1)
    if len(many):
        raise TaskTableError(
            f"{path}: {len(many)} key(s) name several records as {used} ({_rows(many)}); "
            "key the table by record_key"
        )
    unmatched = np.flatnonzero(index < 0)
    if len(unmatched):
        forgotten = np.flatnonzero(_forgotten_keys(store, [keys[i] for i in unmatched], used))
        if len(forgotten):
            raise TaskTableError(
                f"{path}: {len(forgotten)} key(s) name records withdrawn by `ecgplat forget` "
                f"({_rows(unmatched[forgotten])}); remove those rows"
            )
        if not allow_unmatched or len(unmatched) == len(keys):
            hint = "" if len(unmatched) == len(keys) else "; pass --allow-unmatched to drop them"
            raise TaskTableError(
                f"{path}: {len(unmatched)} of {len(keys)} key(s) match no record of the store "
                f"(as {used}; {_rows(unmatched)}){hint}"
            )
    return used, index, np.flatnonzero(index >= 0), unmatched


def _target_values(path: Path, data: dict[str, list], targets: list[str], rows) -> list[list]:
    """Each target column's cells at `rows`, refused when one is missing or when a column mixes
    numbers and text."""
    values = []
    for t in targets:
        cells = [_cell(data[t][i]) for i in rows]
        missing = [int(rows[j]) for j, v in enumerate(cells) if v is None]
        if missing:
            raise TaskTableError(
                f"{path}: {len(missing)} missing or NaN target(s) in column {t!r} "
                f"({_rows(missing)})"
            )
        if len({type(v) for v in cells}) > 1 and not all(
            isinstance(v, float) or str(v).lower() in _TRUE | _FALSE for v in cells
        ):
            texts = [int(rows[j]) for j, v in enumerate(cells) if isinstance(v, str)]
            raise TaskTableError(
                f"{path}: column {t!r} mixes numbers and text ({_rows(texts)} hold text)"
            )
        values.append(cells)
    return values


def _text(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _encode_binary(path: Path, column: str, cells: list, positive: str | None):
    col = [_text(v) for v in cells]
    distinct = sorted(set(col))
    if positive is None and {d.lower() for d in distinct} <= (_TRUE | _FALSE):
        positive_values, classes = {d for d in distinct if d.lower() in _TRUE}, (column,)
    else:
        if positive is None:
            shown = ", ".join(map(repr, distinct[:3]))
            raise TaskTableError(
                f"{path}: binary column {column!r} holds {shown}: name the positive value "
                "with --positive"
            )
        if positive not in distinct:
            raise TaskTableError(f"{path}: --positive {positive!r} is not a value of {column!r}")
        if len(distinct) > 2:
            raise TaskTableError(
                f"{path}: binary column {column!r} has {len(distinct)} values "
                "(use --kind multiclass)"
            )
        positive_values, classes = {positive}, (positive,)
    return classes, np.array([[1.0 if v in positive_values else 0.0] for v in col])


def _encode(path: Path, kind: str, targets: list[str], values: list[list], rows, positive):
    """(classes, (n, W) targets) of the matched rows for `kind` (module docstring of
    `ecgplat.store.task_store` for the encoding)."""
    if kind in ("binary", "multiclass") and len(targets) != 1:
        raise TaskTableError(f"{path}: a {kind} task takes one target column, got {len(targets)}")
    if kind == "regression":
        texts = [int(rows[j]) for col in values for j, v in enumerate(col) if isinstance(v, str)]
        if texts:
            raise TaskTableError(f"{path}: regression targets must be numbers ({_rows(texts)})")
        return tuple(targets), np.asarray(values, dtype=np.float64).T
    if kind == "multilabel":
        target = np.zeros((len(rows), len(targets)))
        for c, col in enumerate(values):
            for j, v in enumerate(col):
                flag = v.lower() if isinstance(v, str) else _text(v)
                if flag not in _TRUE | _FALSE:
                    raise TaskTableError(
                        f"{path}: multilabel column {targets[c]!r} must hold 0/1 "
                        f"({_rows([rows[j]])})"
                    )
                target[j, c] = float(flag in _TRUE)
        return tuple(targets), target
    if kind == "binary":
        return _encode_binary(path, targets[0], values[0], positive)
    col = [_text(v) for v in values[0]]  # multiclass
    classes = tuple(sorted(set(col)))
    if len(classes) < 2:
        raise TaskTableError(f"{path}: multiclass column {targets[0]!r} has a single value")
    where = {c: i for i, c in enumerate(classes)}
    return classes, np.array([[where[v]] for v in col], dtype=np.float64)


def labels_from_table(
    store,
    name: str,
    table: str | os.PathLike,
    key: str,
    targets: list[str],
    kind: str = "auto",
    key_type: str = "auto",
    positive: str | None = None,
    allow_unmatched: bool = False,
) -> BuiltTask:
    """A task from a CSV/Parquet table keyed by record (module docstring), checked."""
    path = Path(table)
    if key_type not in KEY_TYPES:
        raise TaskTableError(f"--key-type {key_type}: choose one of {', '.join(KEY_TYPES)}")
    columns, data = read_table(path)
    for col in [key, *targets]:
        if col not in columns:
            raise TaskTableError(f"{path}: no column {col!r} (columns: {', '.join(columns)})")
    if key in targets:
        raise TaskTableError(f"{path}: column {key!r} is both the key and a target")
    keys = _table_keys(path, data, key)
    used, index, rows, unmatched = _matched(store, path, keys, key_type, allow_unmatched)
    values = _target_values(path, data, targets, rows)
    if kind == "auto":
        kind = _infer_kind(values)
    if kind not in KINDS:
        raise TaskTableError(f"--kind {kind}: choose one of auto, {', '.join(KINDS)}")
    classes, target = _encode(path, kind, targets, values, rows, positive)
    source = {"table": path.name, "key": key, "key_type": used, "targets": list(targets)}
    spec = TaskSpec(name, kind, classes, source)
    _check_members(path, spec, target)
    notes = (
        [f"{len(unmatched)} row(s) matched no record and were left out"] if len(unmatched) else []
    )
    return BuiltTask(spec, index[rows], target.astype(np.float32), notes)


def labels_from_field(store, name: str, field: str, positive: str | None = None) -> BuiltTask:
    """`age` (regression, records with a known age) or `sex` (binary, positive `positive`,
    default F; records with M or F)."""
    live = store.live
    if field == "age":
        age = np.asarray(store.column("age"), dtype=np.float64)
        rows = np.flatnonzero(live & np.isfinite(age))
        spec = TaskSpec(name, "regression", ("age",), {"field": "age"})
        target = age[rows][:, None]
    elif field == "sex":
        sex = np.asarray(store.column("sex")).astype(str)
        rows = np.flatnonzero(live & np.isin(sex, ["M", "F"]))
        pos = positive or "F"
        if pos not in ("M", "F"):
            raise TaskTableError(f"--positive {pos}: the sex field holds M or F")
        spec = TaskSpec(name, "binary", (pos,), {"field": "sex"})
        target = (sex[rows] == pos).astype(np.float32)[:, None]
    else:
        raise TaskTableError(f"--field {field}: choose one of {', '.join(FIELDS)}")
    _check_members(f"{store.path} (field {field})", spec, target)
    return BuiltTask(spec, rows.astype(np.int64), target.astype(np.float32))


def labels_from_vocabulary(store, name: str, vocabulary: str) -> BuiltTask:
    from ecgplat.vocabularies import vocabulary_labels

    kind, classes, rows, target = vocabulary_labels(store, vocabulary)
    notes = []
    if vocabulary != "cinc26" and kind == "multilabel":  # keep classes the store can evaluate
        keep = target.sum(axis=0) >= 2
        if not keep.any():
            raise TaskTableError(
                f"{store.path}: vocabulary {vocabulary}: no class has 2 or more records"
            )
        if not keep.all():
            notes.append(f"{int((~keep).sum())} class(es) with fewer than 2 records left out")
            classes = tuple(c for c, k in zip(classes, keep, strict=True) if k)
            target = target[:, keep]
            has = target.any(axis=1)
            rows, target = rows[has], target[has]
    spec = TaskSpec(name, kind, classes, {"vocabulary": vocabulary})
    if vocabulary != "cinc26":
        _check_members(f"{store.path} (vocabulary {vocabulary})", spec, target)
    return BuiltTask(spec, rows, target.astype(np.float32), notes)


def add_task(
    store_path: str | os.PathLike,
    name: str,
    *,
    table: str | os.PathLike | None = None,
    key: str | None = None,
    targets: list[str] | None = None,
    field: str | None = None,
    vocabulary: str | None = None,
    kind: str = "auto",
    key_type: str = "auto",
    positive: str | None = None,
    allow_unmatched: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """`ecgplat labels add`: build task `name` from exactly one source, check it and write it
    (atomically, under the store's writer lock). Returns its summary."""
    from ecgplat.store import StoreLock, is_url, open_store
    from ecgplat.store.task_store import BUILTIN, task_path, write_task

    check_task_name(name)
    if name in BUILTIN:
        raise TaskTableError(f"task name {name!r} is built in; choose another --name")
    given = [s for s in (table, field, vocabulary) if s is not None]
    if len(given) != 1:
        raise TaskTableError("give exactly one source: --table, --field or --vocabulary")
    if is_url(store_path):
        raise TaskTableError(f"{store_path}: a store at a URL is read-only")
    if task_path(store_path, name).exists() and not overwrite:
        raise FileExistsError(
            f"{task_path(store_path, name)}: task {name!r} exists (pass --overwrite to replace it)"
        )
    with StoreLock(store_path):
        store = open_store(store_path)
        if table is not None:
            if not key or not targets:
                raise TaskTableError(f"{table}: a table source needs --key and --target")
            built = labels_from_table(
                store, name, table, key, targets, kind, key_type, positive, allow_unmatched
            )
        elif field is not None:
            built = labels_from_field(store, name, field, positive)
        else:
            assert vocabulary is not None
            built = labels_from_vocabulary(store, name, vocabulary)
        if kind != "auto" and built.spec.kind != kind:
            raise TaskTableError(
                f"--kind {kind}: the {next(iter(built.spec.source))} source makes a "
                f"{built.spec.kind} task"
            )
        uuid = store.attrs.get("store_uuid")
        path = write_task(
            store_path,
            built.spec,
            built.record_index,
            built.target,
            store_uuid=None if uuid is None else str(uuid),
            overwrite=overwrite,
        )
    return built.summary() | {"file": str(path)}
