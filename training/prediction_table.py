"""The predictions file of `ecgplat predict`: one row per record, its columns named from the
checkpoint's task, written atomically as CSV, Parquet or JSON (told by the extension) and read
back with the same types whatever the encoding (docs/formats.md, "Predictions").

Columns, in order: ``record`` (the key), ``error`` ("" or the one-line reason the record could
not be read), ``n_segments`` (5 s segments predicted; 0 for an error), then by task kind

* binary / multilabel: ``p_<class>`` (record probability) for every class, then
  ``label_<class>`` (1 when ``p_<class>`` >= the class's threshold, else 0);
* multiclass: ``p_<class>`` for every class, then ``label`` (the most probable class's name);
* regression: ``value_<target>`` (the prediction in the target's units);

and last ``checkpoint_sha256``. An error row leaves the output columns empty (NaN / null).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ecgplat.atomic import atomic_path

FORMATS = (".csv", ".parquet", ".json")
RECORD, ERROR, N_SEGMENTS, SHA256 = "record", "error", "n_segments", "checkpoint_sha256"
PROBABILITY, LABEL, VALUE = "p_", "label_", "value_"
MULTICLASS_LABEL = "label"


def check_format(path: str | Path) -> str:
    """The file's extension (lower case) when it is one of FORMATS, else ValueError."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(
            f"{path}: unknown predictions file extension {suffix or '(none)'!r} "
            f"(use {', '.join(FORMATS)})"
        )
    return suffix


def output_columns(task: dict) -> list[str]:
    """The columns that hold a record's predictions for `task` (a task_of_checkpoint dict)."""
    classes, kind = list(task["classes"]), task["kind"]
    if kind == "regression":
        return [VALUE + c for c in classes]
    probs = [PROBABILITY + c for c in classes]
    if kind == "multiclass":
        return [*probs, MULTICLASS_LABEL]
    return probs + [LABEL + c for c in classes]


def columns(task: dict) -> list[str]:
    return [RECORD, ERROR, N_SEGMENTS, *output_columns(task), SHA256]


def make_row(
    task: dict,
    key: str,
    sha256: str,
    n_segments: int = 0,
    predictions: dict | None = None,
    error: str = "",
) -> dict[str, Any]:
    """One row: `predictions` is ``outputs_to_predictions`` of one record (arrays of one row),
    or None for a record that could not be read (`error`)."""
    row: dict[str, Any] = {RECORD: key, ERROR: error, N_SEGMENTS: int(n_segments)}
    classes, kind = list(task["classes"]), task["kind"]
    if predictions is None:
        row.update(dict.fromkeys(output_columns(task)))
    elif kind == "regression":
        values = np.asarray(predictions["values"], dtype=np.float64).reshape(-1)
        row.update({VALUE + c: float(v) for c, v in zip(classes, values, strict=True)})
    else:
        p = np.asarray(predictions["probabilities"], dtype=np.float64).reshape(-1)
        row.update({PROBABILITY + c: float(v) for c, v in zip(classes, p, strict=True)})
        labels = np.asarray(predictions["labels"]).reshape(-1)
        if kind == "multiclass":
            row[MULTICLASS_LABEL] = classes[int(labels[0])]
        else:
            row.update({LABEL + c: int(bool(v)) for c, v in zip(classes, labels, strict=True)})
    row[SHA256] = sha256
    return row


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """The column types of every encoding: strings ("" when missing), float64 outputs (NaN when
    missing), nullable Int8 labels, int64 segment counts."""
    out = frame.copy()
    for col in out.columns:
        if col.startswith(PROBABILITY) or col.startswith(VALUE):
            out[col] = pd.to_numeric(out[col].replace("", np.nan)).astype(np.float64)
        elif col.startswith(LABEL):
            out[col] = pd.to_numeric(out[col].replace("", np.nan)).astype("Int8")
        elif col == N_SEGMENTS:
            out[col] = pd.to_numeric(out[col]).astype(np.int64)
        else:  # record, error, checkpoint_sha256, multiclass label
            out[col] = out[col].fillna("").astype(str).astype(object)
    return out


def to_frame(rows: Iterable[dict], task: dict) -> pd.DataFrame:
    return _typed(pd.DataFrame(list(rows), columns=columns(task)))


def _json_value(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is pd.NA:
        return None
    return value.item() if isinstance(value, np.generic) else value


def write_predictions(rows: Iterable[dict], task: dict, path: str | Path) -> Path:
    """Write the rows to `path` (format by extension, FORMATS) atomically; returns the path."""
    path = Path(path)
    fmt = check_format(path)
    frame = to_frame(rows, task)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        if fmt == ".csv":
            frame.to_csv(tmp, index=False)
        elif fmt == ".parquet":
            frame.to_parquet(tmp, index=False)
        else:
            records = [
                {k: _json_value(v) for k, v in rec.items()}
                for rec in frame.to_dict(orient="records")
            ]
            tmp.write_text(json.dumps(records, indent=1, allow_nan=False) + "\n")
    return path


def read_predictions(path: str | Path) -> pd.DataFrame:
    """A predictions file (any of FORMATS) as a DataFrame with the types of `to_frame`."""
    path = Path(path)
    fmt = check_format(path)
    if fmt == ".csv":
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    elif fmt == ".parquet":
        frame = pd.read_parquet(path)
    else:
        frame = pd.DataFrame(json.loads(path.read_text()))
    return _typed(frame)
