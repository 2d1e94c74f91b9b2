"""The counts of `ecgplat info` kept in commit.json by the writers: equal to an independent count
over the raw columns after every kind of write, absent in older stores, never used when stale
or edited."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from ecgplat.store import open_store, reason_kind
from ecgplat.store.sealed_counts import COUNTS_KEY

PER = ("per_source", "per_split", "per_ident_split", "rejects_by_reason")


def independent_counts(path: Path) -> dict:
    """The counts of a store from its files, with pandas, not through ecgplat.store."""
    commit = json.loads((path / "commit.json").read_text())
    n, n_rej = commit["n_records"], commit["n_rejects"]
    root = zarr.open_group(str(path), mode="r")

    def strings(key: str, length: int) -> np.ndarray:
        out = np.full(length, "", dtype=object)
        values = np.asarray(root[key][:length]).astype(object)
        out[: len(values)] = values
        return out

    frame = pd.DataFrame(
        {
            "source": strings("records/source", n),
            "patient_key": strings("records/patient_key", n),
            "seg_count": np.asarray(root["records/seg_count"][:n], dtype=np.int64),
        }
    )
    for name in ("split", "ident_split"):
        g = commit["splits"]
        frame[name] = strings(f"splits/{g}/{name}", n) if g else ""
    forgotten = path / "forgotten.json"
    gone = json.loads(forgotten.read_text())["records"] if forgotten.exists() else []
    live = frame.drop(index=[r for r in gone if r < n])
    reasons = pd.Series(strings("rejects/reason", n_rej)).map(reason_kind)

    def vc(series: pd.Series) -> dict:
        return {str(k): int(v) for k, v in series.value_counts().sort_index().items()}

    return {
        "records": len(live),
        "segments": int(live["seg_count"].sum()),
        "patients": int(live["patient_key"].nunique()),
        "per_source": vc(live["source"]),
        "per_split": vc(live["split"].replace("", "unassigned")),
        "per_ident_split": vc(live["ident_split"].replace("", "none")),
        "rejects_by_reason": vc(reasons),
    }


def assert_counts(path: Path, stored: bool = True) -> dict:
    """info's counts equal the independent count, whether read from commit.json or tallied."""
    want = independent_counts(path)
    store = open_store(path)
    got = store.stored_counts()
    assert (got is not None) == stored
    if stored:
        assert got == want
    assert store.count() == want
    summary = store.summary()
    assert {k: summary[k] for k in want} == want
    assert summary["rejects"] == sum(want["rejects_by_reason"].values())
    return want


def _commit(path: Path) -> dict:
    return json.loads((path / "commit.json").read_text())


def _write_commit(path: Path, state: dict) -> None:
    (path / "commit.json").write_text(json.dumps(state, sort_keys=True))


@pytest.fixture
def cohort(synth_cohort, tmp_path) -> Path:
    """The synthetic cohort plus two records that are rejected (truncated .mat; bad header)."""
    src = tmp_path / "cohort"
    shutil.copytree(synth_cohort, src)
    first = sorted(src.rglob("*.hea"))[0]
    for name in ("Z00001", "Z00002"):
        first.with_name(f"{name}.hea").write_text(first.read_text().replace(first.stem, name))
        shutil.copy(first.with_suffix(".mat"), first.with_name(f"{name}.mat"))
    truncated = first.with_name("Z00001.mat")
    truncated.write_bytes(truncated.read_bytes()[:1000])
    first.with_name("Z00002.hea").write_text("Z00002 12 fast 5000\n")
    return src


def test_counts_follow_ingest_split_forget(cohort, samples_dir, tmp_path):
    from ecgplat.store.forget import forget
    from ingestion.pipeline import ingest
    from ingestion.splits import split_store

    store = tmp_path / "store"
    # two runs with a commit per batch; patients span both runs (3 records each, 40 = 13 1/3)
    ingest(
        "cinc2021",
        cohort,
        store,
        workers=0,
        progress=False,
        limit=40,
        batch_size=7,
        commit_interval=0,
    )
    first = assert_counts(store)
    assert first["records"] == 40 and first["patients"] == 14
    ingest("cinc2021", cohort, store, workers=0, progress=False, batch_size=5, commit_interval=0)
    counts = assert_counts(store)
    assert (counts["records"], counts["patients"], counts["segments"]) == (72, 24, 144)
    assert sum(counts["rejects_by_reason"].values()) == 2
    assert counts["per_split"] == {"unassigned": 72} and counts["per_ident_split"] == {"none": 72}
    ingest("ptbxl", samples_dir / "ptbxl", store, workers=0, progress=False)
    counts = assert_counts(store)
    assert set(counts["per_source"]) == {"cinc2021", "ptbxl"}

    split_store(store, valid=0.2, test=0.2, seed=0, sources=["cinc2021"])
    counts = assert_counts(store)
    assert counts["per_split"]["unassigned"] == counts["per_source"]["ptbxl"]
    split_store(store, valid=0.3, test=0.1, seed=4, ident=True)  # a re-split, all sources
    counts = assert_counts(store)
    assert "unassigned" not in counts["per_split"] and counts["per_ident_split"]["gallery"] > 0

    frame = open_store(store).records
    patient = frame["patient_key"][frame["source"] == "cinc2021"].iloc[0]
    rows = np.flatnonzero(frame["patient_key"] == patient)
    before = counts
    forget(store, record=frame["record_key"][rows[0]])  # the patient keeps two records
    counts = assert_counts(store)
    assert (counts["records"], counts["patients"]) == (before["records"] - 1, before["patients"])
    forget(store, patient=patient)
    counts = assert_counts(store)
    assert (counts["records"], counts["patients"]) == (
        before["records"] - 3,
        before["patients"] - 1,
    )
    split_store(store, seed=1)  # a split after a forget leaves the forgotten records out
    assert_counts(store)
    ingest("ludb", samples_dir / "ludb", store, workers=0, progress=False)
    counts = assert_counts(store)
    assert counts["per_split"]["unassigned"] == counts["per_source"]["ludb"]
    # a run that adds nothing keeps the counts
    before = _commit(store)[COUNTS_KEY]
    ingest("ludb", samples_dir / "ludb", store, workers=0, progress=False)
    assert _commit(store)[COUNTS_KEY] == before


def test_store_without_counts_reads_as_before_and_heals(cohort, samples_dir, tmp_path):
    """A store written before the counts were kept (commit.json without them) gives the same
    info, tallied; the next write stores them again."""
    from ecgplat.store.forget import forget
    from ingestion.pipeline import ingest
    from ingestion.splits import split_store

    store = tmp_path / "store"
    ingest("cinc2021", cohort, store, workers=0, progress=False)
    split_store(store, seed=0, ident=True)
    summary = open_store(store).summary()
    old = {k: v for k, v in _commit(store).items() if k != COUNTS_KEY}
    _write_commit(store, old)  # what the code before them wrote
    assert_counts(store, stored=False)
    assert open_store(store).summary() == summary
    ingest("ptbxl", samples_dir / "ptbxl", store, workers=0, progress=False)
    assert_counts(store)

    _write_commit(store, {k: v for k, v in _commit(store).items() if k != COUNTS_KEY})
    split_store(store, seed=2)
    assert_counts(store)
    _write_commit(store, {k: v for k, v in _commit(store).items() if k != COUNTS_KEY})
    forget(store, record=open_store(store).records["record_key"][3])
    assert_counts(store)


def test_stale_or_edited_counts_are_not_shown(cohort, tmp_path):
    from ingestion.pipeline import ingest
    from ingestion.splits import split_store

    store = tmp_path / "store"
    ingest("cinc2021", cohort, store, workers=0, progress=False, limit=30)
    earlier = _commit(store)[COUNTS_KEY]
    ingest("cinc2021", cohort, store, workers=0, progress=False)
    split_store(store, seed=0, ident=True)
    state = _commit(store)
    sealed = state[COUNTS_KEY]
    assert_counts(store)

    def shown_with(counts: dict) -> None:
        _write_commit(store, dict(state, **{COUNTS_KEY: counts}))
        assert_counts(store, stored=False)  # tallied: equal to the files, not to the edit

    # an edit that keeps every sum: moved one record from train to valid
    moved = dict(sealed["per_split"], train=sealed["per_split"]["train"] - 1)
    moved["valid"] += 1
    shown_with(dict(sealed, per_split=moved))
    shown_with(dict(sealed, patients=sealed["patients"] - 1))
    shown_with({k: v for k, v in sealed.items() if k != "mac"})
    # counts of an earlier commit (stale), with their genuine seal
    shown_with(earlier)
    # the commit's counts with the split generation of another commit
    _write_commit(store, dict(state, splits="g7"))
    store_view = open_store(store)
    assert store_view.stored_counts() is None
    _write_commit(store, state)
    assert_counts(store)
    # a forget by code that does not keep the counts (forgotten.json changed, commit.json not)
    table = {
        "format": "ecgplat-forgotten/1",
        "generation": 1,
        "scrubbed": 1,
        "records": [5],
        "key_hash": ["0" * 32],
        "patient_hash": [""],
        "record_generation": [1],
        "operations": [],
    }
    (store / "forgotten.json").write_text(json.dumps(table))
    counts = assert_counts(store, stored=False)
    assert counts["records"] == 71
    # a pending forget: the scrub may have rewritten reject reasons already
    (store / "forgotten.json").write_text(json.dumps(dict(table, scrubbed=0)))
    assert_counts(store, stored=False)
    (store / "forgotten.json").unlink()
    assert_counts(store)
    # a reader without the key (a copy published without secret.key) cannot check the seal
    (store / "secret.key").unlink()
    assert_counts(store, stored=False)
