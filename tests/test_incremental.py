"""Incremental feature store: appends equal a fresh embed bit for bit, a SIGKILLed embed resumes,
two torchrun ranks equal one process, and `index update` equals a rebuild."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_checkpoint
from typer.testing import CliRunner

from ecgplat.store import open_store
from ingestion.pipeline import ingest
from ingestion.splits import split_store
from retrieval.embed import embed_store
from retrieval.features import FeatureError, load_features

torch.set_num_threads(1)
ROOT = Path(__file__).parents[1]
BATCH, EVERY = 16, 16  # small batches and commits: several of each on the 144-segment store
N_A = 36  # records (12 whole patients) in the first ingest


def _split(store):
    split_store(store, mode="random", valid=0.2, test=0.2, seed=0, ident=True)


@pytest.fixture(scope="module")
def grown(synth_cohort, tmp_path_factory):
    """Store "a" (first 36 records, split, embedded as "f"), and "ab" = a copy then grown by
    the other 36 records and split again (not embedded again)."""
    root = tmp_path_factory.mktemp("incremental")
    part = root / "cohort_a"
    files = sorted(p for p in synth_cohort.rglob("*.hea"))[:N_A]
    for hea in files:
        for f in (hea, hea.with_suffix(".mat")):
            dest = part / f.relative_to(synth_cohort)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest)
    store_a = root / "a"
    ingest("cinc2021", part, store_a, workers=0, progress=False)
    _split(store_a)
    ckpt = tiny_checkpoint(root / "a.pt", 0)
    first = embed_store(
        store_a, ckpt, "f", batch_size=BATCH, commit_segments=EVERY, precision="fp32"
    )
    store_ab = root / "ab"
    shutil.copytree(store_a, store_ab)
    ingest("cinc2021", synth_cohort, store_ab, workers=0, progress=False)
    _split(store_ab)
    return {"root": root, "a": store_a, "ab": store_ab, "ckpt": ckpt, "first": first}


def _assert_same_features(store, name, reference):
    for level in ("segment", "record"):
        got, want = load_features(store, name, level), load_features(store, reference, level)
        assert np.array_equal(got.embeddings, want.embeddings), level
        assert np.array_equal(got.record_index, want.record_index), level
        if level == "segment":
            assert np.array_equal(got.segment_number, want.segment_number)


def _fresh(store, ckpt, name="fresh"):
    return embed_store(store, ckpt, name, batch_size=BATCH, commit_segments=10**6, precision="fp32")


def test_grown_store_embeds_only_new_records_and_equals_a_fresh_embed(grown, tmp_path):
    store = tmp_path / "ab"
    shutil.copytree(grown["ab"], store)
    n_a = open_store(grown["a"]).n_segments
    reader = open_store(store)
    assert grown["first"]["n_segments"] == n_a and reader.n_segments > n_a
    assert n_a % BATCH != 0  # the old set ends inside a batch: that batch is recomputed
    with pytest.raises(FeatureError, match="batches of 16"):
        embed_store(store, grown["ckpt"], "f", batch_size=8, precision="fp32")
    result = embed_store(store, grown["ckpt"], "f", commit_segments=EVERY, precision="fp32")
    assert result["status"] == "written" and result["embedded"] == reader.n_segments - n_a
    lin = load_features(store, "f", "record").lineage
    assert lin["n_segments"] == reader.n_segments and lin["n_records"] == reader.n_records
    assert lin["n_record_rows"] == reader.n_records and lin["batch_size"] == BATCH
    _fresh(store, grown["ckpt"])
    _assert_same_features(store, "f", "fresh")
    seg = load_features(store, "f", "segment")
    assert (seg.record_index == reader.segment_record_index).all()
    again = embed_store(store, grown["ckpt"], "f", precision="fp32")
    assert again["status"] == "unchanged" and again["embedded"] == 0


def _killed_embed(store, ckpt, name, commits):
    code = (
        "from retrieval.embed import embed_store; "
        f"embed_store({str(store)!r}, {str(ckpt)!r}, {name!r}, batch_size={BATCH}, "
        f"commit_segments={EVERY}, precision='fp32', device='cpu')"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", ECGPLAT_FAULT_STOP=f"embed.commit:{commits}")
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, timeout=600
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]


def test_sigkilled_embeds_resume_from_the_last_commit(grown, tmp_path):
    store = tmp_path / "ab"
    shutil.copytree(grown["ab"], store)
    total = open_store(store).n_segments
    # a first embed killed after its 3rd commit: nothing under its name yet, 48 rows committed
    _killed_embed(store, grown["ckpt"], "k", 3)
    with pytest.raises(FeatureError, match="no feature set 'k'"):
        load_features(store, "k", "segment")
    result = embed_store(store, grown["ckpt"], "k", commit_segments=EVERY, precision="fp32")
    assert result["embedded"] == total - 3 * EVERY
    # an append killed after its 1st commit: readers see the old set plus whole commits only
    n_a = grown["first"]["n_segments"]
    _killed_embed(store, grown["ckpt"], "f", 1)
    mid = load_features(store, "f", "segment")
    done = (n_a // BATCH + 1) * BATCH
    assert mid.lineage["complete"] and mid.lineage["n_segments"] == len(mid.embeddings) == done
    rec = load_features(store, "f", "record")
    assert len(rec.embeddings) == mid.lineage["n_record_rows"] == done // 2  # 2 segments each
    result = embed_store(store, grown["ckpt"], "f", commit_segments=EVERY, precision="fp32")
    assert result["embedded"] == total - done
    _fresh(store, grown["ckpt"])
    _assert_same_features(store, "k", "fresh")
    _assert_same_features(store, "f", "fresh")


def test_two_torchrun_ranks_write_the_same_set_as_one_process(grown, tmp_path):
    store = tmp_path / "ab"
    shutil.copytree(grown["ab"], store)
    ecgplat = Path(sys.executable).with_name("ecgplat")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(ecgplat), "embed", "--checkpoint", str(grown["ckpt"]), "--store", str(store),
        "--name", "ddp", "--batch-size", str(BATCH), "--device", "cpu", "--precision", "fp32",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=600, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("features/ddp:") == 1  # rank 0 reports
    _fresh(store, grown["ckpt"])
    _assert_same_features(store, "ddp", "fresh")


def _index_then_grow(grown, tmp_path, split: str):
    """(store, index path, index as built): an index of the first cohort's features over
    `split`, then a copy of the grown store whose feature set is extended to its new records."""
    from retrieval.index import index_from_features

    store = tmp_path / "ab"
    shutil.copytree(grown["ab"], store)
    old = index_from_features(grown["a"], "f", split=split)
    old.lineage["store"] = str(store.resolve())  # the copy is where it grew
    path = old.save(tmp_path / "idx")
    embed_store(store, grown["ckpt"], "f", precision="fp32")
    return store, path, old


def test_index_update_equals_a_rebuild_and_refuses_another_lineage(grown, tmp_path):
    from ecgplat.cli import app
    from retrieval.index import (
        GalleryIndex,
        LineageError,
        index_from_features,
        update_from_features,
    )

    store, path, old = _index_then_grow(grown, tmp_path, "gallery")
    runner = CliRunner()
    out = runner.invoke(
        app, ["index", "update", "--index", str(path), "--store", str(store), "--features", "f"]
    )
    assert out.exit_code == 0, out.output
    updated, rebuilt = GalleryIndex.load(path), index_from_features(store, "f", split="gallery")
    assert f"added {len(rebuilt) - len(old)} vectors" in out.output and len(old) < len(rebuilt)
    assert updated.ids == rebuilt.ids and updated.labels == rebuilt.labels
    assert updated.ids[: len(old)] == old.ids  # the id map is kept, new rows appended
    queries = load_features(store, "f", "record").embeddings
    s1, r1 = updated.search(queries, 5)
    s2, r2 = rebuilt.search(queries, 5)
    assert np.array_equal(r1, r2) and np.array_equal(s1, s2)
    assert updated.lineage["checkpoint_sha256"] == rebuilt.lineage["checkpoint_sha256"]
    assert updated.lineage["n_segments"] == rebuilt.lineage["n_segments"]
    # nothing new: nothing added; another checkpoint's vectors: refused, index untouched
    assert update_from_features(GalleryIndex.load(path), store, "f") == 0
    other = tiny_checkpoint(tmp_path / "b.pt", 1)
    embed_store(store, other, "g", precision="fp32")
    with pytest.raises(LineageError, match="checkpoint_sha256"):
        update_from_features(GalleryIndex.load(path), store, "g")
    before = path.read_bytes()
    out = runner.invoke(
        app, ["index", "update", "--index", str(path), "--store", str(store), "--features", "g"]
    )
    assert out.exit_code != 0 and "rebuild the index" in out.output
    assert len(out.output.strip().splitlines()) == 1 and path.read_bytes() == before


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_index_update_of_approximate_kinds_finds_the_new_records(grown, tmp_path, kind):
    from retrieval.index import index_from_features, update_from_features

    store = tmp_path / "ab"
    shutil.copytree(grown["ab"], store)
    index = index_from_features(grown["a"], "f", split="all", kind=kind, params={"nlist": 2})
    embed_store(store, grown["ckpt"], "f", precision="fp32")
    added = update_from_features(index, store, "f")
    feats = load_features(store, "f", "record")
    assert added == len(feats.embeddings) - N_A and len(index) == len(feats.embeddings)
    _, rows = index.search(feats.embeddings[N_A:], 1)
    assert (rows[:, 0] == np.arange(N_A, len(feats.embeddings))).mean() > 0.9


def test_a_set_written_before_commit_counts_is_appended_to(grown, tmp_path):
    import zarr

    store = tmp_path / "ab"
    shutil.copytree(grown["ab"], store)
    group = zarr.open_group(str(store / "features" / "f"), mode="r+")
    legacy = {k: v for k, v in group.attrs["lineage"].items() if k != "n_record_rows"}
    del legacy["batch_size"]  # then: all rows committed, batches of the size given
    group.attrs["lineage"] = legacy
    assert len(load_features(store, "f", "record").embeddings) == N_A
    result = embed_store(store, grown["ckpt"], "f", batch_size=BATCH, precision="fp32")
    assert result["embedded"] == open_store(store).n_segments - grown["first"]["n_segments"]
    _fresh(store, grown["ckpt"])
    _assert_same_features(store, "f", "fresh")


def _raw_rows(store, name, level):
    import zarr

    group = zarr.open_group(str(store / "features" / name / level), mode="r")
    lineage = load_features(store, name, level).lineage
    rows = int(lineage["n_segments" if level == "segment" else "n_record_rows"])
    return np.asarray(group["embedding"][:rows]), np.asarray(group["record_index"][:rows])


def test_an_append_across_a_forget_equals_a_fresh_embed_and_stale_indexes_are_not_updated(
    grown, tmp_path
):
    from ecgplat.store.forget import forget
    from retrieval.index import (
        ForgetIndex,
        GalleryIndex,
        StaleIndexError,
        index_from_features,
        update_from_features,
    )

    store = tmp_path / "ab"
    shutil.copytree(grown["ab"], store)
    path = index_from_features(store, "f", split="all").save(tmp_path / "idx")
    keys = open_store(store).records["record_key"]
    gone = [3, N_A + 2]  # one record embedded already, one not yet
    for r in gone:
        forget(store, record=keys[r])
    emb, rec = _raw_rows(store, "f", "segment")  # the scrub zeroed the embedded one's rows
    assert (rec == 3).sum() == 2 and not emb[rec == 3].any() and emb[rec != 3].any(axis=1).all()
    result = embed_store(store, grown["ckpt"], "f", commit_segments=EVERY, precision="fp32")
    assert result["embedded"] == open_store(store).n_segments - grown["first"]["n_segments"]
    _fresh(store, grown["ckpt"])
    for level in ("segment", "record"):  # on disk, forgotten rows included: bit-equal, zero
        (a, ra), (b, rb) = _raw_rows(store, "f", level), _raw_rows(store, "fresh", level)
        assert np.array_equal(a, b) and np.array_equal(ra, rb), level
        assert set(gone) <= set(ra.tolist()) and not a[np.isin(ra, gone)].any(), level
        assert np.all(np.linalg.norm(a[~np.isin(ra, gone)], axis=1) > 0.99), level
    _assert_same_features(store, "f", "fresh")  # reads leave the forgotten rows out
    assert not set(gone) & set(load_features(store, "f", "record").record_index.tolist())
    # the index built before the forgets may hold record 3: not extended until forget --index
    stale = GalleryIndex.load(path, check_store=False)
    with pytest.raises(StaleIndexError, match="forget generation 0, store at 2"):
        update_from_features(stale, store, "f")
    forget(store, indexes=[ForgetIndex(path)])
    index = GalleryIndex.load(path)
    assert update_from_features(index, store, "f") > 0
    assert index.lineage["forget_generation"] == 2
    rebuilt = index_from_features(store, "f", split="all")
    assert sorted(index.ids) == sorted(rebuilt.ids) and keys[3] not in index.ids


def test_index_update_writes_a_delta_equal_to_a_rebuild_then_compacts(grown, tmp_path, monkeypatch):
    import retrieval.index as I
    import retrieval.index.deltas as deltas
    from ecgplat.cli import app

    store = tmp_path / "ab"
    shutil.copytree(grown["ab"], store)
    old = I.index_from_features(grown["a"], "f", split="all")
    old.lineage["store"] = str(store.resolve())
    path = old.save(tmp_path / "idx")
    main_bytes = path.read_bytes()
    embed_store(store, grown["ckpt"], "f", precision="fp32")

    def whole(*args):  # the index holds exactly the rows before the appended ones
        raise AssertionError("update read the whole selection")

    monkeypatch.setattr(deltas, "_whole_selection", whole)
    runner = CliRunner()
    args = ["index", "update", "--index", str(path), "--store", str(store), "--features", "f"]
    out = runner.invoke(app, [*args, "--compact-at", "2"])
    assert out.exit_code == 0 and "1 delta segments" in out.output, out.output
    assert path.read_bytes() == main_bytes  # the main file is not rewritten
    assert I.delta_file(path, 1).is_file()
    updated, rebuilt = I.GalleryIndex.load(path), I.index_from_features(store, "f", split="all")
    assert updated.n_delta == len(rebuilt) - N_A and updated.ids == rebuilt.ids
    assert updated.labels == rebuilt.labels
    queries = load_features(store, "f", "record").embeddings
    for a, b in zip(updated.search(queries, 5), rebuilt.search(queries, 5), strict=True):
        assert np.array_equal(a, b)
    assert updated.lineage["n_record_rows"] == rebuilt.lineage["n_record_rows"]
    out = runner.invoke(app, args)  # nothing new: nothing written
    assert out.exit_code == 0 and "added 0 vectors" in out.output
    out = runner.invoke(app, ["index", "compact", "--index", str(path)])
    assert out.exit_code == 0 and f"folded {len(rebuilt) - N_A} delta vectors" in out.output
    assert not I.delta_file(path, 1).exists()
    compacted = I.GalleryIndex.load(path)
    assert compacted.n_delta == 0 and compacted.ids == rebuilt.ids
    assert np.array_equal(
        compacted.index.reconstruct_n(0, len(rebuilt)), rebuilt.index.reconstruct_n(0, len(rebuilt))
    )


def test_forget_removes_records_from_the_main_file_and_its_deltas(grown, tmp_path):
    from ecgplat.store.forget import forget
    from retrieval.index import (
        ForgetIndex,
        GalleryIndex,
        delta_file,
        index_from_features,
        update_index,
    )

    store, path, _ = _index_then_grow(grown, tmp_path, "all")
    assert not update_index(path, store, "f", compact_fraction=5)["compacted"]
    keys = open_store(store).records["record_key"]
    gone = [keys[2], keys[N_A + 3]]  # one in the main file, one in the delta
    assert {GalleryIndex.load(path).ids.index(k) >= N_A for k in gone} == {False, True}
    for key in gone:
        forget(store, record=key, indexes=[ForgetIndex(path)])
    index = GalleryIndex.load(path)
    assert not set(gone) & set(index.ids) and not delta_file(path, 1).exists()
    rebuilt = index_from_features(store, "f", split="all")
    assert index.ids == rebuilt.ids and len(index) == 2 * N_A - 2
    queries = load_features(store, "f", "record").embeddings
    assert np.array_equal(index.search(queries, 3)[1], rebuilt.search(queries, 3)[1])
