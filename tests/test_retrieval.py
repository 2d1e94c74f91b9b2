"""Retrieval: FAISS metrics vs numpy brute force, index round trips and lineage, embedding into
the store (idempotent, atomic), identification evaluation, queries and the CLI."""

import itertools
import json
import re
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from helpers import tiny_checkpoint
from sklearn.metrics import average_precision_score

from retrieval.index import GalleryIndex, LineageError, build_index
from retrieval.index.file import _TRAILER, index_file
from training.ident_metrics import (
    chance_rank1,
    cmc_curve,
    mean_average_precision,
    nearest,
    rank_k,
)

torch.set_num_threads(1)


# ------------------------------------------------------------------ metrics and index (pure)


def _cohort(rng, patients=30, per_patient=3, probes_per=2, dim=32, noise=1.6):
    centres = rng.normal(size=(patients, dim))
    g_lab = np.repeat(np.arange(patients), per_patient)
    p_lab = np.repeat(np.arange(patients), probes_per)
    gal = centres[g_lab] + noise * rng.normal(size=(len(g_lab), dim))
    prb = centres[p_lab] + noise * rng.normal(size=(len(p_lab), dim))

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return unit(gal), g_lab, unit(prb), p_lab


def test_rank_k_cmc_and_map_equal_numpy_brute_force():
    rng = np.random.default_rng(0)
    gal, g_lab, prb, p_lab = _cohort(rng)
    index = build_index(gal, [str(i) for i in range(len(gal))], kind="flat")
    scores, rows = index.search(prb, len(gal))
    # brute force: full similarity matrix in float64
    sim = prb.astype(np.float64) @ gal.T.astype(np.float64)
    # FAISS ranks by fp32 dots of unit 32-vectors, each within 32*eps of the truth (any order of
    # the sum), and this cohort has near-ties closer than that (9e-7): the ranking must be a
    # permutation that is descending in float64 up to that error, and is then scored as given
    tol = 2 * 32 * float(np.finfo(np.float32).eps)
    assert (np.sort(rows, axis=1) == np.arange(len(gal))).all()
    ranked = np.take_along_axis(sim, rows, axis=1)
    assert (np.diff(ranked, axis=1) <= tol).all()
    assert (rows == np.argsort(-sim, axis=1, kind="stable")).mean() > 0.99
    assert np.allclose(scores, ranked, atol=tol)
    order = rows
    hit = g_lab[order] == p_lab[:, None]
    first = hit.argmax(axis=1)
    for k in (1, 5, 10):
        assert rank_k(rows, g_lab, p_lab, (k,))[k] == pytest.approx(np.mean(first < k))
    cmc = cmc_curve(rows, g_lab, p_lab)
    assert cmc[0] < 1.0 and cmc[-1] == 1.0 and (np.diff(cmc) >= 0).all()
    assert np.allclose(cmc, [np.mean(first < k) for k in range(1, len(gal) + 1)])
    position = np.argsort(rows, axis=1)  # sklearn scores the same ranking: minus the position
    ap = [average_precision_score(g_lab == p, -r) for p, r in zip(p_lab, position, strict=True)]
    assert mean_average_precision(rows, g_lab, p_lab) == pytest.approx(np.mean(ap), abs=1e-9)
    assert 0.1 < np.mean(ap) < 0.95  # a non-trivial case


def test_metrics_handle_missing_neighbours_and_patients_without_gallery_items():
    rows = np.array([[0, 1, -1], [2, -1, -1]])
    g_lab = np.array([5, 6, 7])
    p_lab = np.array([6, 9])  # patient 9 has no gallery item
    assert rank_k(rows, g_lab, p_lab, (1, 2)) == {1: 0.0, 2: 0.5}
    assert mean_average_precision(rows, g_lab, p_lab) == pytest.approx(0.5)  # probe 0 only


def test_nearest_and_training_rank1_equal_brute_force_and_faiss():
    from training.tasks.identify import rank1

    rng = np.random.default_rng(2)
    gal, g_lab, prb, p_lab = _cohort(rng, patients=40, noise=1.2)
    sim = prb.astype(np.float64) @ gal.T.astype(np.float64)
    order = np.argsort(-sim, axis=1, kind="stable")
    assert (nearest(gal, prb, k=1, chunk=7)[:, 0] == order[:, 0]).all()
    assert (nearest(gal, prb, k=5, chunk=7) == order[:, :5]).all()
    assert nearest(gal[:3], prb, k=10).shape == (len(prb), 3)
    expected = np.mean(g_lab[order[:, 0]] == p_lab)
    assert 0.2 < expected < 0.95  # a non-trivial case
    assert rank1(gal, g_lab, prb, p_lab) == pytest.approx(expected)
    _, rows = build_index(gal, [str(i) for i in range(len(gal))], kind="flat").search(prb, 1)
    assert rank_k(rows, g_lab, p_lab, (1,))[1] == pytest.approx(expected)
    assert np.isnan(rank1(gal[:0], g_lab[:0], prb, p_lab))


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_index_save_load_round_trip(tmp_path, kind):
    rng = np.random.default_rng(1)
    gal, g_lab, prb, _ = _cohort(rng, patients=100, per_patient=4, noise=0.3)
    ids = [f"src/r{i}" for i in range(len(gal))]
    lineage = {"checkpoint_sha256": "ab" * 32, "leads": "I,II"}
    index = build_index(
        gal, ids, lineage, kind=kind, labels=[f"p-{x}" for x in g_lab], sample_queries=prb
    )
    if kind != "flat":
        assert index.info["recall_at_1"] >= 0.9 and index.info["recall_n"] == len(prb)
    path = index.save(tmp_path / "gallery")
    assert path == tmp_path / "gallery.faiss" and sorted(tmp_path.iterdir()) == [path]
    loaded = GalleryIndex.load(tmp_path / "gallery")
    assert (loaded.kind, loaded.ids, loaded.labels, loaded.lineage) == (
        kind,
        ids,
        index.labels,
        lineage,
    )
    a, b = index.search(prb, 5), loaded.search(prb, 5)
    assert (a[1] == b[1]).all() and np.allclose(a[0], b[0])


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_large_gallery_options_copy_false_no_recall_sample_and_ivf_max_train(kind):
    rng = np.random.default_rng(2)
    gal, _, prb, _ = _cohort(rng, patients=100, per_patient=4, noise=0.3)
    ids = [str(i) for i in range(len(gal))]
    params = {"nlist": 8, "max_train": 320} if kind == "ivf" else None
    ref = build_index(gal, ids, kind=kind, params=params)
    lean = build_index(gal, ids, kind=kind, params=params, copy=False, n_sample=0)
    if kind != "flat":
        assert "recall_at_1" not in lean.info and "recall_at_1" in ref.info
    if kind == "ivf":
        assert lean.info["params"]["max_train"] == 320 and lean.index.nlist == 8
    if kind == "flat":  # indexed as given: no normalising working copy
        xb = faiss.rev_swig_ptr(lean.index.get_xb(), gal.size).reshape(gal.shape)
        assert np.array_equal(xb, gal)
    a, b = ref.search(prb, 5), lean.search(prb, 5)
    assert (a[1][:, 0] == b[1][:, 0]).mean() >= 0.95 and np.allclose(
        a[0][:, 0], b[0][:, 0], atol=1e-5
    )
    with pytest.raises(ValueError, match="float32"):
        build_index(gal.astype(np.float64), ids, kind=kind, copy=False)
    with pytest.raises(ValueError, match="normalised"):
        build_index(2 * gal, ids, kind=kind, copy=False)
    assert ref.info.get("params", {}).get("max_train") == (320 if kind == "ivf" else None)


def _parts(path) -> tuple[bytes, bytes]:
    """(FAISS part, description) of an index file, split at its trailer."""
    data = Path(path).read_bytes()
    n_meta, magic = _TRAILER.unpack(data[-_TRAILER.size :])
    assert magic == b"ECGPIDX2"
    end = len(data) - _TRAILER.size
    return data[: end - n_meta], data[end - n_meta : end]


def _trailer(description: bytes) -> bytes:
    return _TRAILER.pack(len(description), b"ECGPIDX2")


def test_load_rejects_mismatched_or_missing_files(tmp_path):
    index = build_index(np.eye(4, dtype=np.float32), list("abcd"))
    index.save(tmp_path / "x")
    three = build_index(np.eye(3, 4, dtype=np.float32), list("abc")).save(tmp_path / "z")
    four_vectors = _parts(tmp_path / "x.faiss")[0]
    description = _parts(three)[1]  # 3 ids
    (tmp_path / "m.faiss").write_bytes(four_vectors + description + _trailer(description))
    with pytest.raises(ValueError, match="m.faiss: 4 vectors of dim 4 do not match"):
        GalleryIndex.load(tmp_path / "m.faiss")
    with pytest.raises(FileNotFoundError, match="y.faiss"):
        GalleryIndex.load(tmp_path / "y")
    assert index_file("a/b.faiss") == index_file("a/b") == Path("a/b.faiss")


def test_lineage_mismatch_is_refused_with_a_clear_error():
    index = build_index(
        np.eye(3, dtype=np.float32), list("abc"), {"checkpoint_sha256": "1" * 64, "leads": "I,II"}
    )
    q = np.eye(3, dtype=np.float32)[:1]
    index.search(q, 1, lineage={"checkpoint_sha256": "1" * 64, "leads": "I,II"})
    with pytest.raises(LineageError, match="checkpoint_sha256"):
        index.search(q, 1, lineage={"checkpoint_sha256": "2" * 64, "leads": "I,II"})
    with pytest.raises(LineageError, match="leads=I"):
        index.search(q, 1, lineage={"checkpoint_sha256": "1" * 64, "leads": "I"})


# ------------------------------------------------------------------ store-backed (real store)


@pytest.fixture(scope="module")
def embedded(synth_store, tmp_path_factory):
    """A private copy of the synthetic store with feature set "a" of a random tiny encoder."""
    from retrieval.embed import embed_store

    root = tmp_path_factory.mktemp("retrieval")
    store = root / "store"
    shutil.copytree(synth_store, store)
    ckpt_a = tiny_checkpoint(root / "a.pt", 0)
    ckpt_b = tiny_checkpoint(root / "b.pt", 1)
    first = embed_store(store, ckpt_a, "a", batch_size=48)
    return {"store": store, "a": ckpt_a, "b": ckpt_b, "first": first}


def test_embed_writes_unit_embeddings_with_lineage_and_is_idempotent(embedded):
    from ecgplat.file_hash import file_sha256
    from ecgplat.store import open_store
    from retrieval.embed import embed_store
    from retrieval.features import load_features

    store = open_store(embedded["store"])
    assert embedded["first"]["status"] == "written"
    seg = load_features(embedded["store"], "a", "segment")
    rec = load_features(embedded["store"], "a", "record")
    assert seg.embeddings.shape == (store.n_segments, 64) and len(rec.embeddings) == store.n_records
    assert np.allclose(np.linalg.norm(seg.embeddings, axis=1), 1, atol=1e-5)
    assert (seg.record_index == store.segment_record_index).all()
    # record embedding = normalised mean of its segments
    i = 5
    mean = seg.embeddings[seg.record_index == i].mean(0)
    assert np.allclose(
        rec.embeddings[rec.record_index == i][0], mean / np.linalg.norm(mean), atol=1e-5
    )
    lin = rec.lineage
    assert (
        lin["checkpoint_sha256"] == file_sha256(embedded["a"])
        and lin["checkpoint_kind"] == "pretrain"
    )
    assert lin["leads"] == "I,II,III,aVR,aVL,aVF,V1,V2,V3,V4,V5,V6" and lin["complete"]
    # same checkpoint + leads: no-op, nothing rewritten
    meta = embedded["store"] / "features" / "a" / "zarr.json"
    before = meta.stat().st_mtime_ns
    again = embed_store(embedded["store"], embedded["a"], "a")
    assert again["status"] == "unchanged" and meta.stat().st_mtime_ns == before


def test_embed_refuses_another_checkpoint_and_survives_interruptions(embedded, monkeypatch):
    import retrieval.embed as embed_mod
    from ecgplat.file_hash import file_sha256
    from retrieval.embed import embed_store
    from retrieval.features import FeatureError, load_features

    store = embedded["store"]
    with pytest.raises(FeatureError, match="use another --name or --overwrite"):
        embed_store(store, embedded["b"], "a")

    real = embed_mod.commit_rows

    def crash_after_writing(*args):
        real(*args)
        raise KeyboardInterrupt  # killed after writing, before the rename

    # an interrupted first embed leaves no feature set under its name
    monkeypatch.setattr(embed_mod, "commit_rows", crash_after_writing)
    with pytest.raises(KeyboardInterrupt):
        embed_store(store, embedded["b"], "b")
    with pytest.raises(FeatureError, match="no feature set 'b'"):
        load_features(store, "b", "record")
    monkeypatch.setattr(embed_mod, "commit_rows", real)
    assert embed_store(store, embedded["b"], "b")["status"] == "written"
    assert not list((store / "features").glob(".tmp-b-*"))  # the leftover was cleaned
    old = load_features(store, "b", "record")
    assert old.lineage["checkpoint_sha256"] == file_sha256(embedded["b"])
    assert not np.allclose(old.embeddings, load_features(store, "a", "record").embeddings)
    # an interrupted overwrite keeps the previous set intact
    monkeypatch.setattr(embed_mod, "commit_rows", crash_after_writing)
    with pytest.raises(KeyboardInterrupt):
        embed_store(store, embedded["a"], "b", overwrite=True)
    kept = load_features(store, "b", "record")
    assert kept.lineage == old.lineage and np.array_equal(kept.embeddings, old.embeddings)


def test_overwrite_killed_between_its_renames_shows_the_new_set(embedded, tmp_path):
    """An `embed --overwrite` SIGKILLed after moving the old set aside and before moving the
    new one in: readers see the new set (the old bug: no set until the next embed recomputed
    it), and the next embed only finishes the move."""
    import os
    import subprocess
    import sys

    from ecgplat.file_hash import file_sha256
    from retrieval.embed import embed_store
    from retrieval.features import list_features, load_features

    store = tmp_path / "store"
    shutil.copytree(embedded["store"], store)
    code = "import sys; from retrieval.embed import embed_store as e; e(*sys.argv[1:3], 'a', "
    code += "overwrite=True, batch_size=48)"
    env = dict(os.environ, OMP_NUM_THREADS="1", ECGPLAT_FAULT_STOP="embed.between_renames")
    argv = [sys.executable, "-c", code, str(store), str(embedded["b"])]
    proc = subprocess.run(argv, env=env, capture_output=True, timeout=600)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]  # SIGKILL
    assert not (store / "features" / "a").exists()  # killed where the old code lost the set
    new = load_features(store, "a", "record")
    assert new.lineage["checkpoint_sha256"] == file_sha256(embedded["b"])
    assert "a" in list_features(store)
    # the next embed finishes the move (nothing to embed) and deletes the old set moved aside
    assert embed_store(store, embedded["b"], "a", batch_size=48)["embedded"] == 0
    names = {p.name for p in (store / "features").iterdir()}
    assert "a" in names and ".build-a" not in names
    assert not [n for n in names if n.startswith(".tmp-a-")]
    assert load_features(store, "a", "record").lineage == new.lineage
    embed_store(store, embedded["b"], "z", batch_size=48)
    for level in ("segment", "record"):
        moved, fresh = load_features(store, "a", level), load_features(store, "z", level)
        assert np.array_equal(moved.embeddings, fresh.embeddings)


def test_evaluate_identification_matches_brute_force(embedded, tmp_path, monkeypatch):
    import retrieval.evaluate as evaluate_mod
    from ecgplat.store import open_store
    from retrieval.evaluate import evaluate_identification
    from retrieval.features import load_features

    monkeypatch.setattr(evaluate_mod, "PROBE_CHUNK", 7)  # probes ranked in several chunks

    result = evaluate_identification(embedded["store"], "a", plot=tmp_path / "cmc.png")
    assert (tmp_path / "cmc.png").stat().st_size > 1000
    store = open_store(embedded["store"])
    frame = store.records
    for level in ("record", "segment"):
        f = load_features(embedded["store"], "a", level)
        ident = frame["ident_split"].to_numpy()[f.record_index]
        pid = frame["patient_key"].to_numpy()[f.record_index]
        g, p = ident == "gallery", ident == "probe"
        sim = f.embeddings[p].astype(np.float64) @ f.embeddings[g].T.astype(np.float64)
        hits = pid[g][None, :] == pid[p][:, None]
        # the index ranks by fp32 dots of unit 64-vectors (each within 64*eps): near-ties closer
        # than that may fall either way on another CPU, so the reference is the pair of rankings
        # that put hits last / first among them (equal when there are no such near-ties)
        tol = 2 * 64 * float(np.finfo(np.float32).eps)
        bounds = []
        for shift in (-tol, tol):
            s = sim + shift * hits
            order = np.argsort(-s, axis=1, kind="stable")
            first = np.take_along_axis(hits, order, axis=1).argmax(1)
            ap = np.mean([average_precision_score(h, row) for h, row in zip(hits, s, strict=True)])
            bounds.append({"rank1": np.mean(first < 1), "rank5": np.mean(first < 5), "mAP": ap})
        r = result[level]
        assert (r["n_gallery"], r["n_probe"]) == (g.sum(), p.sum())
        for key in ("rank1", "rank5", "mAP"):
            assert bounds[0][key] - 1e-6 <= r[key] <= bounds[1][key] + 1e-6, (key, bounds)
    assert result["record"]["n_gallery"] == len(store.select(ident_split="gallery"))


def test_evaluate_reads_the_gallery_in_bounded_parts_with_the_same_result(embedded, monkeypatch):
    """The gallery is read from the store part by part (never whole); with parts of 5 rows the
    metrics are those of the in-memory ranking, exactly."""
    import training.ident_metrics as im
    from retrieval.evaluate import evaluate_identification
    from retrieval.features import FeatureRows

    whole = evaluate_identification(embedded["store"], "a")
    reads = []
    read = FeatureRows.__getitem__

    def spy(self, key):
        out = read(self, key)
        reads.append(len(out))
        return out

    monkeypatch.setattr(FeatureRows, "__getitem__", spy)
    monkeypatch.setattr(im, "GALLERY_CHUNK", 5)
    parts = evaluate_identification(embedded["store"], "a")
    assert parts == whole
    probes = {whole[level]["n_probe_evaluated"] for level in ("record", "segment")}
    assert all(n <= 5 or n in probes for n in reads)  # gallery parts, or the probes once
    gallery = sum(whole[level]["n_gallery"] for level in ("record", "segment"))
    assert sum(n for n in reads if n not in probes) >= 2 * gallery - 10  # two passes


def test_feature_rows_read_any_positions_like_the_loaded_set(embedded):
    from retrieval.features import open_features

    stored = open_features(embedded["store"], "a", "segment")
    whole = stored.load().embeddings
    assert len(stored.rows) == len(whole) and stored.rows.shape == whole.shape
    at = np.array([7, 2, 2, len(whole) - 1, 0])
    assert np.array_equal(stored.rows[at], whole[at])
    assert np.array_equal(stored.rows[3:17], whole[3:17])
    some = stored.rows.take(np.array([1, 4, 9, 10]))
    assert np.array_equal(some[:], whole[[1, 4, 9, 10]]) and np.array_equal(
        some[1:3], whole[[4, 9]]
    )
    assert some[np.zeros(0, dtype=np.int64)].shape == (0, whole.shape[1])


def test_index_built_from_stored_rows_equals_the_in_memory_build(embedded, monkeypatch):
    """`index build` adds the gallery part by part from the store: the same vectors, ids and
    labels as one build over the loaded array, for every kind."""
    import retrieval.index.build as index_mod
    from ecgplat.store import open_store
    from retrieval.features import load_features
    from retrieval.index import index_from_features

    f = load_features(embedded["store"], "a", "segment")
    store = open_store(embedded["store"])
    take = store.column("ident_split")[f.record_index] == "gallery"
    for kind in ("flat", "ivf"):
        params = {"nlist": 4} if kind == "ivf" else None
        ref = build_index(
            f.embeddings[take], [str(i) for i in range(take.sum())], kind=kind, params=params
        )
        monkeypatch.setattr(index_mod, "ADD_ROWS", 7)  # added in parts of 7 rows
        got = index_from_features(embedded["store"], "a", level="segment", kind=kind, params=params)
        monkeypatch.undo()
        assert got.ids == [
            f"{k}#{s}"
            for k, s in zip(
                store.column("record_key")[f.record_index[take]],
                f.segment_number[take],
                strict=True,
            )
        ]
        assert got.labels == list(store.column("patient_key")[f.record_index[take]])
        q = f.embeddings[~take][:20]
        a, b = ref.search(q, 5), got.search(q, 5)
        assert (a[1] == b[1]).all() and np.array_equal(a[0], b[0])


def test_evaluate_probe_budget_samples_the_probes_deterministically(embedded):
    from ecgplat.store import open_store
    from retrieval.evaluate import evaluate_identification, probe_sample
    from retrieval.features import load_features
    from training.ident_metrics import rank1_band, rank_statistics

    store = embedded["store"]
    full = evaluate_identification(store, "a", max_probes=0)
    n_seg = full["segment"]["n_probe"]
    assert n_seg > full["record"]["n_probe"] > 6
    assert evaluate_identification(store, "a", max_probes=n_seg) == full  # budget >= n_probe
    for level in ("record", "segment"):
        r = full[level]
        assert r["n_probe_evaluated"] == r["n_probe"] and r["rank1_ci95"] == 0.0
    sample = evaluate_identification(store, "a", max_probes=6, seed=3)
    assert evaluate_identification(store, "a", max_probes=6, seed=3) == sample
    frame = open_store(store).records
    for level in ("record", "segment"):
        r = sample[level]
        assert (r["n_probe"], r["n_probe_evaluated"]) == (full[level]["n_probe"], 6)
        assert r["rank1_ci95"] == pytest.approx(rank1_band(r["rank1"], 6, r["n_probe"]))
        # the sample's metrics are the full evaluation's per-probe results at the seeded draw
        f = load_features(store, "a", level)
        ident = frame["ident_split"].to_numpy()[f.record_index]
        pid = frame["patient_key"].to_numpy()[f.record_index]
        g, p = ident == "gallery", ident == "probe"
        _, ap = rank_statistics(f.embeddings[g], f.embeddings[p], pid[g], pid[p])
        chosen = probe_sample(int(p.sum()), 6, seed=3)
        assert r["mAP"] == pytest.approx(np.nanmean(ap[chosen]), abs=1e-12)
        cmc, _ = rank_statistics(f.embeddings[g], f.embeddings[p][chosen], pid[g], pid[p][chosen])
        assert r["rank1"] == cmc[0] and r["rank5"] == cmc[min(5, len(cmc)) - 1]


def test_lead_subset_evaluation_embeds_with_the_subset(embedded):
    from retrieval.evaluate import evaluate_identification
    from retrieval.features import load_features

    result = evaluate_identification(embedded["store"], "a", leads="2")
    assert result["features"] == "a@I-II" and result["leads"] == "I,II"
    full = load_features(embedded["store"], "a", "record").embeddings
    sub = load_features(embedded["store"], "a@I-II", "record").embeddings
    assert not np.allclose(full, sub)


def test_queries_by_record_and_by_signal_agree(embedded, tmp_path):
    from ecgplat.store import open_store
    from retrieval.index import index_from_features
    from retrieval.query import plot_matches, query_record, query_signal

    index = index_from_features(embedded["store"], "a", split="gallery")
    path = index.save(tmp_path / "idx")
    index = GalleryIndex.load(path)
    store = open_store(embedded["store"])
    probe = int(store.select(ident_split="probe")[0])
    key = store.records["record_key"].iloc[probe]
    by_record = query_record(index, key, k=4)
    assert [m["rank"] for m in by_record] == [1, 2, 3, 4]
    assert all(a["score"] >= b["score"] for a, b in itertools.pairwise(by_record))
    assert all("same_patient" in m for m in by_record)
    by_signal = query_signal(index, store.record_segments(probe), store.lead_masks[probe], k=4)
    assert [m["id"] for m in by_signal] == [m["id"] for m in by_record]
    assert np.allclose([m["score"] for m in by_signal], [m["score"] for m in by_record], atol=1e-4)
    # a gallery record never matches itself
    g_key = store.records["record_key"].iloc[int(store.select(ident_split="gallery")[0])]
    assert g_key not in [m["id"] for m in query_record(index, g_key, k=5)]
    out = plot_matches(
        store.record_segments(probe)[0], by_record, tmp_path / "q.png", str(embedded["store"])
    )
    assert out.stat().st_size > 1000
    with pytest.raises(KeyError, match="no record"):
        query_record(index, "cinc2021/NOPE", 3)


def test_cli_embed_index_evaluate_query(embedded, tmp_path):
    from typer.testing import CliRunner

    from ecgplat.cli import app

    run = CliRunner().invoke
    store = str(embedded["store"])
    ok = run(app, ["embed", "--checkpoint", str(embedded["a"]), "--store", store, "--name", "a"])
    assert ok.exit_code == 0 and "already up to date" in ok.output
    bad = run(
        app, ["embed", "--checkpoint", str(tmp_path / "none.pt"), "--store", store, "--name", "a"]
    )
    assert bad.exit_code != 0 and "no such checkpoint" in bad.output
    out = run(
        app,
        [
            "index",
            "build",
            "--store",
            store,
            "--features",
            "a",
            "--out",
            str(tmp_path / "g"),
            "--kind",
            "hnsw",
        ],
    )
    assert out.exit_code == 0 and "recall@1" in out.output
    ev = run(app, ["evaluate", "identify", "--store", store, "--features", "a", "--json"])
    assert ev.exit_code == 0
    assert set(json.loads(ev.output)["record"]) >= {
        "rank1",
        "rank5",
        "rank10",
        "mAP",
        "n_gallery",
        "n_probe",
    }
    few = run(
        app,
        ["evaluate", "identify", "--store", store, "--features", "a", "--json"]
        + ["--max-probes", "2", "--seed", "1"],
    )
    assert few.exit_code == 0
    assert [json.loads(few.output)[lv]["n_probe_evaluated"] for lv in ("record", "segment")] == [
        2,
        2,
    ]
    table = run(
        app,
        ["evaluate", "identify", "--store", store, "--features", "a"]
        + ["--seed", "1"]
        + ["--max-probes", "2"],
    )
    assert table.exit_code == 0 and "rank1_ci95" in table.output, table.output
    row = next(line for line in table.output.splitlines() if "n_probe_evaluated" in line)
    assert re.findall(r"\b\d+\b", row) == ["2", "2"], row
    missing = run(app, ["evaluate", "identify", "--store", store, "--features", "zzz"])
    assert missing.exit_code != 0 and "no feature set 'zzz'" in missing.output
    q = run(app, ["query", "--index", str(tmp_path / "g.faiss"), "--record", "cinc2021/NOPE"])
    assert q.exit_code != 0 and "no record" in q.output
    both = run(app, ["query", "--index", str(tmp_path / "g.faiss")])
    assert both.exit_code != 0
    hea = next((embedded["store"].parent).glob("*.pt"))  # not a header: clear refusal
    f = run(app, ["query", "--index", str(tmp_path / "g.faiss"), "--file", str(hea)])
    assert f.exit_code != 0 and ".hea" in f.output
    assert "p-" not in q.output + ev.output  # no patient pseudonyms on the console


def test_cli_query_by_file_finds_the_stored_record(embedded, synth_cohort, tmp_path):
    from typer.testing import CliRunner

    from ecgplat.cli import app
    from ecgplat.store import open_store
    from retrieval.index import index_from_features

    index_from_features(embedded["store"], "a", split="gallery").save(tmp_path / "g")
    store = open_store(embedded["store"])
    row = store.records.iloc[int(store.select(ident_split="gallery")[3])]
    hea = synth_cohort / f"{row['path']}.hea"
    out = CliRunner().invoke(
        app, ["query", "--index", str(tmp_path / "g.faiss"), "--file", str(hea), "--json"]
    )
    assert out.exit_code == 0, out.output
    matches = json.loads(out.output)
    assert matches[0]["id"] == row["record_key"] and matches[0]["score"] > 0.9999
    bad = tmp_path / "bad.hea"
    bad.write_text(hea.read_text().replace(".mat", ".dat"))
    err = CliRunner().invoke(
        app, ["query", "--index", str(tmp_path / "g.faiss"), "--file", str(bad)]
    )
    assert err.exit_code != 0 and str(bad) in err.output and "Traceback" not in err.output


def test_chance_rank1_by_hand_and_against_the_pairwise_definition():
    gallery = np.array(["a", "a", "b", "c"], dtype=object)
    probes = np.array(["a", "b", "d"], dtype=object)
    assert chance_rank1(gallery, probes) == (2 / 4 + 1 / 4 + 0) / 3
    rng = np.random.default_rng(3)
    g = np.array([f"p-{k}" for k in rng.integers(0, 40, 300)], dtype=object)
    q = np.array([f"p-{k}" for k in rng.integers(0, 50, 200)], dtype=object)
    pairwise = np.mean([np.mean(g == x) for x in q])  # one comparison per (probe, gallery) pair
    assert chance_rank1(g, q) == pytest.approx(pairwise, rel=1e-12)
    assert np.isnan(chance_rank1(g, q[:0]))
