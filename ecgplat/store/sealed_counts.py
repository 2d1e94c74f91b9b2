"""The counts `ecgplat info` shows: tallied from the record columns, or kept by the writers in
``commit.json`` (sealed with the store's key and bound to the commit and forget state they
describe, so that a stale or edited copy is never used). Rejects count by the kind of their
reason (``reason_kind``). Layout: docs/formats.md.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable

import numpy as np
import pandas as pd

COUNTS_KEY = "counts"  # the key of the sealed counts in commit.json
FIELDS = (
    "records",
    "segments",
    "patients",
    "per_source",
    "per_split",
    "per_ident_split",
    "rejects_by_reason",
)
UNASSIGNED = "unassigned"  # per_split name of records without a split
NO_IDENT = "none"  # per_ident_split name of records outside gallery/probe
_MAC_DOMAIN = b"ecgplat-counts/1\0"


def value_counts(values, empty: str | None = None) -> dict[str, int]:
    """{value: occurrences} of a string array, sorted by value; ``empty`` renames ""."""
    codes, uniques = pd.factorize(np.asarray(values, dtype=object))
    counts = np.bincount(codes[codes >= 0], minlength=len(uniques))
    out = {str(k): int(n) for k, n in zip(uniques, counts, strict=True)}
    if empty is not None and "" in out:
        out[empty] = out.get(empty, 0) + out.pop("")
    return dict(sorted(out.items()))


def tally(source, patient_key, seg_count, split, ident_split, reject_kinds) -> dict:
    """The counts of live records given as columns (one entry per live record) and of all
    rejects given by reason kind."""
    return {
        "records": len(source),
        "segments": int(np.sum(np.asarray(seg_count, dtype=np.int64))),
        "patients": len(pd.unique(np.asarray(patient_key, dtype=object))),
        "per_source": value_counts(source),
        "per_split": value_counts(split, empty=UNASSIGNED),
        "per_ident_split": value_counts(ident_split, empty=NO_IDENT),
        "rejects_by_reason": value_counts(list(reject_kinds)),
    }


def _merge(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return dict(sorted({k: a.get(k, 0) + b.get(k, 0) for k in {*a, *b}}.items()))


def add_rows(
    counts: dict, source, seg_count, new_patients: int, reject_kinds: Iterable[str]
) -> dict:
    """``counts`` after appending records (columns of the new rows; they have no split yet)
    that bring ``new_patients`` patients not seen before, and rejects (by reason kind)."""
    n = len(source)
    return dict(
        counts,
        records=counts["records"] + n,
        segments=counts["segments"] + int(np.sum(np.asarray(seg_count, dtype=np.int64))),
        patients=counts["patients"] + new_patients,
        per_source=_merge(counts["per_source"], value_counts(source)),
        per_split=_merge(counts["per_split"], {UNASSIGNED: n} if n else {}),
        per_ident_split=_merge(counts["per_ident_split"], {NO_IDENT: n} if n else {}),
        rejects_by_reason=_merge(counts["rejects_by_reason"], value_counts(list(reject_kinds))),
    )


def _binding(commit: dict, forgotten: dict) -> dict:
    """What sealed counts describe: the commit's counts and split generation, the tombstone
    table's generation and scrub state."""
    return {
        "n_records": commit["n_records"],
        "n_segments": commit["n_segments"],
        "n_rejects": commit["n_rejects"],
        "splits": commit.get("splits"),
        "forget_generation": forgotten["generation"],
        "forget_scrubbed": forgotten["scrubbed"],
    }


def _mac(body: dict, secret: bytes) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(bytes(secret), _MAC_DOMAIN + text.encode(), hashlib.sha256).hexdigest()


def seal(counts: dict, commit: dict, forgotten: dict, secret: bytes) -> dict:
    """The ``commit.json`` entry of ``counts`` for the commit ``commit`` (the state being
    written) and the tombstone table ``forgotten``."""
    body = {**{k: counts[k] for k in FIELDS}, **_binding(commit, forgotten)}
    return {**body, "mac": _mac(body, secret)}


def unseal(commit: dict, forgotten: dict, secret: bytes | None) -> dict | None:
    """The counts stored in ``commit`` when their seal verifies with ``secret`` and they
    describe this commit and tombstone table and add up; None otherwise (no stored counts,
    written before a later commit or forget by code that does not keep them, or edited) and
    while a forget is pending (its scrub rewrites reject reasons)."""
    sealed = commit.get(COUNTS_KEY)
    if not secret or not isinstance(sealed, dict) or not isinstance(sealed.get("mac"), str):
        return None
    if forgotten["scrubbed"] != forgotten["generation"]:
        return None
    body = {k: v for k, v in sealed.items() if k != "mac"}
    if not hmac.compare_digest(sealed["mac"], _mac(body, secret)):
        return None
    if any(body.get(k) != v for k, v in _binding(commit, forgotten).items()):
        return None
    counts = {k: body.get(k) for k in FIELDS}
    gone = len({r for r in forgotten["records"] if r < commit["n_records"]})
    return counts if _adds_up(counts, commit, gone) else None


def _is_count(value) -> bool:
    return type(value) is int and value >= 0


def _adds_up(counts: dict, commit: dict, n_forgotten: int) -> bool:
    """Stored counts agree with each other and with the commit (a guard against a writer bug:
    the seal already rules out edits)."""
    per = ("per_source", "per_split", "per_ident_split", "rejects_by_reason")
    if not all(_is_count(counts[k]) for k in ("records", "segments", "patients")):
        return False
    if not all(
        isinstance(counts[k], dict) and all(map(_is_count, counts[k].values())) for k in per
    ):
        return False
    records = counts["records"]
    return (
        records == commit["n_records"] - n_forgotten
        and all(sum(counts[k].values()) == records for k in per[:3])
        and sum(counts["rejects_by_reason"].values()) == commit["n_rejects"]
        and counts["segments"] <= commit["n_segments"]
        and (counts["patients"] >= 1 if records else counts["patients"] == 0)
        and counts["patients"] <= records
    )


def reason_kind(reason: str) -> str:
    """A reject reason reduced to its kind, for counting: at most 5 words before the first
    ':', '(', ',' or quote, with file names and numbers replaced by '*' ("missing signal file
    E1.mat" -> "missing signal file *")."""
    text = str(reason)
    for sep in (":", "(", ",", "'", '"'):
        text = text.split(sep, 1)[0]
    words = ["*" if any(ch.isdigit() or ch in "./\\" for ch in w) else w for w in text.split()]
    return " ".join(words[:5]) or "unknown"
