"""Record-level splits: grouped by patient, PTB-XL strat_fold, gallery/probe rules, atomic."""

import numpy as np
import pytest

from ecgplat.store import open_store, read_commit
from ingestion.pipeline import ingest
from ingestion.splits import gallery_probe, random_split, split_store, strat_fold_split


def test_random_split_groups_patients_and_hits_fractions():
    rng = np.random.default_rng(1)
    keys = [f"p{int(k)}" for k in rng.integers(0, 300, 1000)]
    split = random_split(keys, valid=0.1, test=0.2, seed=3)
    by_patient = {}
    for k, s in zip(keys, split, strict=True):
        by_patient.setdefault(k, set()).add(s)
    assert all(len(v) == 1 for v in by_patient.values())
    frac = {s: np.mean(split == s) for s in ("train", "valid", "test")}
    assert abs(frac["test"] - 0.2) < 0.02 and abs(frac["valid"] - 0.1) < 0.02
    assert (random_split(keys, 0.1, 0.2, seed=3) == split).all()
    assert not (random_split(keys, 0.1, 0.2, seed=4) == split).all()
    with pytest.raises(ValueError):
        random_split(keys, 0.6, 0.5)


def test_strat_fold_rule():
    assert strat_fold_split([1, 8, 9, 10, 3]).tolist() == [
        "train",
        "train",
        "valid",
        "test",
        "train",
    ]
    with pytest.raises(ValueError, match="strat_fold"):
        strat_fold_split([1, -1])


def test_gallery_probe_rules():
    keys = ["a", "b", "a", "c", "a", "b"]
    assert gallery_probe(keys).tolist() == ["gallery", "gallery", "probe", "", "probe", "probe"]
    assert gallery_probe(keys, first_two=True).tolist() == [
        "gallery",
        "gallery",
        "probe",
        "",
        "",
        "probe",
    ]


def test_fixture_store_splits(synth_store):
    frame = open_store(synth_store).records
    assert set(frame["split"]) == {"train", "valid", "test"}
    assert frame.groupby("patient_key")["split"].nunique().max() == 1
    assert (frame["ident_split"] == "gallery").sum() == 24 and (
        frame["ident_split"] == "probe"
    ).sum() == 48
    first = frame.groupby("patient_key").head(1)
    assert (first["ident_split"] == "gallery").all()


def test_split_store_rerun_sources_and_strat_fold(samples_dir, tmp_path):
    store = tmp_path / "store"
    ingest("cinc2021", samples_dir / "cinc2021", store, workers=0, progress=False)
    ingest("ptbxl", samples_dir / "ptbxl", store, workers=0, progress=False)
    split_store(store, mode="random", valid=0.25, test=0.25, seed=0, sources=["cinc2021"])
    frame = open_store(store).records
    cinc = frame["source"] == "cinc2021"
    assert (frame["split"][~cinc] == "").all() and (frame["split"][cinc] != "").all()
    before = frame["split"][cinc].tolist()
    out = split_store(store, mode="strat_fold", sources=["ptbxl"], ident=True, ident_first_two=True)
    frame = open_store(store).records
    ptb = frame[~cinc]
    want = np.where(
        ptb["strat_fold"] == 10, "test", np.where(ptb["strat_fold"] == 9, "valid", "train")
    )
    assert ptb["split"].tolist() == want.tolist()
    assert frame["split"][cinc].tolist() == before  # other sources keep their assignment
    counts = ptb.groupby("patient_key").size()
    multi = counts[counts >= 2].index
    assert (ptb["ident_split"] == "gallery").sum() == len(multi) == out["ident_split"]["gallery"]
    assert set(ptb["patient_key"][ptb["ident_split"] != ""]) == set(multi)
    with pytest.raises(ValueError, match="strat_fold"):
        split_store(store, mode="strat_fold")  # CinC records have no fold
    assert open_store(store).records["split"][cinc].tolist() == before  # failed run changed nothing
    # the current generation and the one before it are kept (for readers that opened the
    # store before the last split); older ones are deleted
    current = read_commit(store)["splits"]
    split_store(store, seed=5)
    gens = sorted(p.name for p in (store / "splits").iterdir() if p.is_dir())
    k = int(current[1:]) + 1
    assert read_commit(store)["splits"] == f"g{k}" and gens == sorted([current, f"g{k}"])


def test_random_split_does_not_depend_on_the_pseudonyms():
    """Two stores pseudonymise the same patients differently; with the record keys as order
    keys the seeded split of the same corpus is the same, and patients stay grouped."""
    rng = np.random.default_rng(0)
    patients = rng.integers(0, 40, 200)
    record_keys = [f"src/rec{i:04d}" for i in range(200)]
    store_a = [f"p-a{p:03d}" for p in patients]
    store_b = [f"p-{(97 * p + 13) % 1000:03d}b" for p in patients]  # another secret's order
    a = random_split(store_a, 0.2, 0.2, seed=5, order_keys=record_keys)
    b = random_split(store_b, 0.2, 0.2, seed=5, order_keys=record_keys)
    assert (a == b).all()
    for p in np.unique(patients):
        assert len(set(a[patients == p])) == 1
    assert not (random_split(store_b, 0.2, 0.2, seed=5) == a).all()  # the pseudonym order differs


def test_integer_codes_split_exactly_like_the_strings(synth_store):
    """split_store works on `column_codes` (no Python str per record): the codes rebuild each
    column, rank like its strings, and random_split / gallery_probe give the same result on
    codes as on the strings themselves."""
    reader = open_store(synth_store)
    for name in ("patient_key", "record_key", "source", "split", "ident_split"):
        codes, values = reader.column_codes(name)
        assert list(values[codes]) == list(reader.column(name))
        assert list(values) == sorted(set(values))  # code order = string order
    keys = reader.column("patient_key")
    order = reader.column("record_key")
    pc, rc = reader.column_codes("patient_key")[0], reader.column_codes("record_key")[0]
    for seed in (0, 1, 2):
        expect = random_split(keys, 0.2, 0.2, seed, order_keys=order)
        assert list(random_split(pc, 0.2, 0.2, seed, order_keys=rc)) == list(expect)
    assert list(gallery_probe(pc)) == list(gallery_probe(keys))
    assert list(gallery_probe(pc, first_two=True)) == list(gallery_probe(keys, first_two=True))
