"""Label vocabularies a corpus carries, turned into task labels from what the store keeps.

* ``cinc26``: the 26 scored CinC 2021 classes (the store's ``labels``; every live record);
* ``ptbxl-scp``: PTB-XL's 71 SCP-ECG statements (multilabel; PTB-XL records, from their
  ``raw_codes``; every listed statement counts whatever its likelihood), classes in the order of
  ``scp_statements.csv``;
* ``ptbxl-superclass``: the 5 diagnostic superclasses NORM, MI, STTC, CD, HYP (multilabel): a
  statement's ``diagnostic_class`` in ``scp_statements.csv``; a PTB-XL record without any
  diagnostic statement has no label (the usual PTB-XL benchmark rule);
* ``code15-chagas``: CODE-15%'s Chagas label (binary, positive class ``chagas``) from the raw
  codes ``chagas:True`` / ``chagas:False``.

``scp_statements.csv`` is PTB-XL's own table, CC BY 4.0, in ``ecgplat/data/ptbxl`` (with its
licence and attribution).
"""

from __future__ import annotations

import csv
import io
from functools import cache
from importlib import resources

import numpy as np

VOCABULARIES = ("cinc26", "ptbxl-scp", "ptbxl-superclass", "code15-chagas")
SUPERCLASSES = ("NORM", "MI", "STTC", "CD", "HYP")


@cache
def scp_statements() -> dict[str, str]:
    """PTB-XL statement -> its diagnostic_class ("" for form/rhythm-only statements), file order."""
    text = resources.files("ecgplat").joinpath("data", "ptbxl", "scp_statements.csv")
    rows = csv.DictReader(io.StringIO(text.read_text(encoding="utf-8")))
    return {r[""].strip(): (r.get("diagnostic_class") or "").strip() for r in rows}


def _codes(raw: str) -> list[str]:
    return [c.strip() for c in str(raw or "").split(";") if c.strip()]


def vocabulary_labels(store, name: str) -> tuple[str, tuple[str, ...], np.ndarray, np.ndarray]:
    """(kind, classes, record_index, target) of vocabulary `name` over the live records of
    `store` (an open EcgStore); ValueError for an unknown name or a store without such records."""
    live = store.live
    if name == "cinc26":
        from ecgplat.labels import CLASS_NAMES

        idx = np.flatnonzero(live).astype(np.int64)
        return "multilabel", tuple(CLASS_NAMES), idx, store.labels[idx].astype(np.float32)
    source = store.column("source")
    raw = store.column("raw_codes")
    if name in ("ptbxl-scp", "ptbxl-superclass"):
        rows = np.flatnonzero(live & (source == "ptbxl"))
        if not len(rows):
            raise ValueError(f"{store.path}: vocabulary {name}: the store holds no PTB-XL records")
        table = scp_statements()
        classes = tuple(table) if name == "ptbxl-scp" else SUPERCLASSES
        col = {c: i for i, c in enumerate(classes)}
        target = np.zeros((len(rows), len(classes)), dtype=np.float32)
        for j, r in enumerate(rows):
            for code in _codes(raw[r]):
                key = code if name == "ptbxl-scp" else table.get(code, "")
                if key in col:
                    target[j, col[key]] = 1.0
        keep = target.any(axis=1)  # superclass: no diagnostic statement, no label
        return "multilabel", classes, rows[keep].astype(np.int64), target[keep]
    if name == "code15-chagas":
        found: list[int] = []
        values: list[float] = []
        for r in np.flatnonzero(live & (source == "code15")):
            flags = [c.split(":", 1)[1].lower() for c in _codes(raw[r]) if c.startswith("chagas:")]
            if flags and flags[0] in ("true", "false"):
                found.append(int(r))
                values.append(1.0 if flags[0] == "true" else 0.0)
        if not found:
            raise ValueError(
                f"{store.path}: vocabulary {name}: no CODE-15% record with a Chagas label"
            )
        return (
            "binary",
            ("chagas",),
            np.asarray(found, dtype=np.int64),
            np.asarray(values, np.float32)[:, None],
        )
    raise ValueError(f"unknown vocabulary {name!r}; choose one of {', '.join(VOCABULARIES)}")
