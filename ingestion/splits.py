"""Record-level train/valid/test splits and identification gallery/probe assignment.

Splits are assigned to whole records (never to single segments, unlike the original pipeline
which split segment files and could put the two halves of one record in different splits):

* ``random``: grouped by ``patient_key`` so that all records of a patient share a split. Patients
  are shuffled with ``seed`` and taken in that order into test, then valid, until each holds its
  fraction of the records; the rest is train.
* ``strat_fold``: PTB-XL's recommended folds: 1-8 train, 9 valid, 10 test (the folds already keep
  each patient in one fold).

Identification (``ident_split``): for each patient with at least 2 records, the first record
(lowest record index, i.e. listing order) goes to the gallery and the others to the probe set;
with ``first_two`` (the paper's rule) only the second record is a probe and later ones are
unused. Patients with a single record get "".

The result is stored in the store itself (``StoreWriter.write_splits``: one atomic commit);
records outside the selected sources keep their current assignment.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ecgplat.store import SPLIT_COLUMNS, open_store
from ecgplat.store.sealed_counts import value_counts

MODES = ("random", "strat_fold")
VALID_FOLD, TEST_FOLD = 9, 10
SPLIT_NAMES = np.array(["train", "valid", "test"], dtype=object)
IDENT_NAMES = np.array(["", "gallery", "probe"], dtype=object)


def _comparable(keys) -> np.ndarray:
    """Keys as an array that sorts like them: integer codes as they are (codes from
    `EcgStore.column_codes` rank like their strings), anything else as str."""
    arr = np.asarray(keys)
    return arr if arr.dtype.kind in "iu" else np.asarray(keys, dtype=object).astype(str)


def random_split(
    patient_keys: Sequence[str],
    valid: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
    order_keys: Sequence[str] | None = None,
) -> np.ndarray:
    """Per-record "train"/"valid"/"test", grouped by patient.

    `order_keys` (one per record, e.g. the record keys) makes the split independent of the
    pseudonyms: patients are put in the order of their smallest order key before the seeded
    permutation, so the same corpus gets the same split in every store (each store has its
    own pseudonym secret, and ordering by pseudonym would differ between stores)."""
    if valid < 0 or test < 0 or valid + test >= 1:
        raise ValueError(f"valid ({valid}) and test ({test}) must be >= 0 and sum to < 1")
    keys = _comparable(patient_keys)
    if len(keys) == 0:
        return np.full(0, "train", dtype=object)
    patients, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    stable = np.arange(len(patients))
    if order_keys is not None:
        ok = _comparable(order_keys)
        by_patient = np.lexsort((ok, inverse))  # records by patient, then by order key
        starts = np.r_[0, np.flatnonzero(np.diff(inverse[by_patient])) + 1]
        stable = np.argsort(ok[by_patient][starts], kind="stable")  # patients by smallest key
    order = stable[np.random.default_rng(seed).permutation(len(patients))]
    before = np.cumsum(counts[order]) - counts[order]  # records already placed before each patient
    n = len(keys)
    per_patient = np.empty(len(patients), dtype=np.int8)  # index into SPLIT_NAMES
    per_patient[order] = np.where(before < test * n, 2, np.where(before < (test + valid) * n, 1, 0))
    return SPLIT_NAMES[per_patient[inverse]]


def strat_fold_split(folds: Sequence[int] | np.ndarray) -> np.ndarray:
    """Per-record split from PTB-XL ``strat_fold`` (1-8 train, 9 valid, 10 test)."""
    folds = np.asarray(folds, dtype=np.int64)
    bad = ~np.isin(folds, np.arange(1, 11))
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} records have no PTB-XL strat_fold (1..10); "
            "use --mode random or --source ptbxl"
        )
    return np.where(
        folds == TEST_FOLD, "test", np.where(folds == VALID_FOLD, "valid", "train")
    ).astype(object)


def gallery_probe(patient_keys: Sequence[str] | np.ndarray, first_two: bool = False) -> np.ndarray:
    """Per-record "gallery"/"probe"/"" in the given (record) order (keys: str or integer codes)."""
    keys = _comparable(patient_keys)
    if not len(keys):
        return np.full(0, "", dtype=object)
    _, patient, count = np.unique(keys, return_inverse=True, return_counts=True)
    by_patient = np.argsort(patient, kind="stable")  # each patient's records in record order
    starts = np.cumsum(count) - count
    rank = np.empty(len(keys), dtype=np.int64)  # 0 for a patient's first record, 1, 2, ...
    rank[by_patient] = np.arange(len(keys)) - np.repeat(starts, count)
    role = np.zeros(len(keys), dtype=np.int8)  # index into IDENT_NAMES
    several = count[patient] >= 2
    role[several & (rank == 0)] = 1
    role[several & ((rank == 1) if first_two else (rank >= 1))] = 2
    return IDENT_NAMES[role]


def split_store(
    store: str | os.PathLike,
    mode: str = "random",
    valid: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
    ident: bool = False,
    ident_first_two: bool = False,
    sources: Sequence[str] | None = None,
    ident_within: str | None = None,
) -> dict:
    """Assign splits (and with ``ident`` the gallery/probe sets) to the records of ``sources``
    (default: all) and commit them to the store; returns counts per split and ident_split.

    ``ident_within``: only records of that split take part in gallery/probe.
    """
    from ecgplat.store.writer import StoreWriter

    if mode not in MODES:
        raise ValueError(f"unknown split mode {mode!r}; choose one of {', '.join(MODES)}")
    reader = open_store(store)  # the columns a split needs, as integer codes
    source, source_names = reader.column_codes("source")
    selected = reader.live.copy()  # forgotten records keep no split
    if sources:
        unknown = sorted(set(sources) - set(source_names[np.unique(source[selected])]))
        if unknown:
            raise ValueError(f"{store}: no records of source(s) {', '.join(unknown)}")
        selected &= np.isin(source_names, list(sources))[source]
    if not selected.any():
        raise ValueError(f"{store}: no records to split")
    if (selected == reader.live).all():  # every assignment is replaced: none is read
        split, ident_split = (np.full(reader.n_records, "", dtype=object) for _ in SPLIT_COLUMNS)
    else:  # object arrays holding one str object per distinct value (not one per record)
        split, ident_split = (
            values.astype(object)[codes]
            for codes, values in map(reader.column_codes, SPLIT_COLUMNS)
        )
    split[~reader.live] = ident_split[~reader.live] = ""
    patient_key = reader.column_codes("patient_key")[0]
    if mode == "random":
        split[selected] = random_split(
            patient_key[selected],
            valid,
            test,
            seed,
            order_keys=reader.column_codes("record_key")[0][selected],
        )
    else:
        split[selected] = strat_fold_split(reader.column("strat_fold")[selected])
    if ident:
        take = selected & (split == ident_within if ident_within else True)
        if ident_within and not take.any():
            raise ValueError(
                f"{store}: ident_within={ident_within!r}: no selected record is in that split "
                "(train, valid or test), so there is nothing to assign gallery/probe to"
            )
        ident_split[selected] = ""
        ident_split[take] = gallery_probe(patient_key[take], first_two=ident_first_two)
    with StoreWriter(store, create=False) as writer:
        if writer.n_records != reader.n_records:
            raise RuntimeError(f"{store}: the store changed while splitting; run split again")
        writer.write_splits(split, ident_split)

    return {
        "mode": mode,
        "records": int(selected.sum()),
        "split": value_counts(split[selected], empty="none"),
        "ident_split": value_counts(ident_split[selected], empty="none"),
    }
