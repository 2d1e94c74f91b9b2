"""`index update` as delta segments: merged search equals one index, chain and lineage checks,
forget and compaction cover the deltas, and a kill at any step leaves a loadable index."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ecgplat.cli import app
from ecgplat.faults import ENV as FAULT_ENV
from retrieval.index import (
    GalleryIndex,
    LineageError,
    build_index,
    compact_index,
    delta_file,
    index_file,
)

ROOT = Path(__file__).parents[1]
DIM = 16
LINEAGE = {"checkpoint_sha256": "a" * 64, "leads": "I,II", "dim": DIM}


def _unit(n, seed):
    x = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ids(lo, hi):
    return [f"r{i}" for i in range(lo, hi)]


def _chained(tmp_path, kind="flat", cuts=(300, 340, 370), n=400, params=None, x=None):
    """(path, all vectors `x`, default random): main over [0, cuts[0]), one delta per following
    cut and the end."""
    x = _unit(n, 0) if x is None else x
    labels = [f"p{i // 3}" for i in range(n)]
    main = build_index(
        x[: cuts[0]],
        _ids(0, cuts[0]),
        dict(LINEAGE),
        kind=kind,
        labels=labels[: cuts[0]],
        params=params,
        n_sample=0,
    )
    path = main.save(tmp_path / "g")
    bounds = [*cuts, n]
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        g = GalleryIndex.load(path)
        g.add(x[lo:hi], _ids(lo, hi), labels[lo:hi])
        assert g.save_delta(path) == delta_file(path, g.seq)
    return path, x


def test_flat_main_plus_deltas_searches_exactly_like_one_flat_index(tmp_path):
    path, x = _chained(tmp_path)
    assert path.read_bytes()[-8:] == b"ECGPIDX2"
    assert [p.name for p in sorted(tmp_path.glob("g.faiss.delta-*"))] == [
        "g.faiss.delta-000001",
        "g.faiss.delta-000002",
        "g.faiss.delta-000003",
    ]
    g = GalleryIndex.load(path)
    one = build_index(x, _ids(0, 400), dict(LINEAGE))
    assert (g.n_main, g.n_delta, len(g)) == (300, 100, 400) and g.ids == one.ids
    assert g.labels == [f"p{i // 3}" for i in range(400)]
    queries = np.concatenate([_unit(50, 9), x[::37]])  # some are gallery rows (self matches)
    for k in (1, 5, 30):
        s1, r1 = g.search(queries, k)
        s2, r2 = one.search(queries, k)
        assert np.array_equal(r1, r2) and np.array_equal(s1, s2), k
    # a self-query of a delta row finds it first, with its global row number
    _, rows = g.search(x[[5, 310, 399]], 1)
    assert rows[:, 0].tolist() == [5, 310, 399]
    # k beyond the gallery: every row once, none missing
    _, rows = g.search(queries[:2], 1000)
    assert rows.shape == (2, 400) and sorted(rows[0].tolist()) == list(range(400))


def test_exact_ties_rank_in_row_order_with_or_without_deltas(tmp_path):
    """Rows that tie exactly (copies of three directions): main + deltas and one flat index
    return the same rows in the same order, equal scores by lower row as `nearest` ranks them
    (the old bug: one FAISS index returned a tie in its own order, the merge in row order)."""
    from training.ident_metrics import nearest

    basis = _unit(3, 5)
    x = basis[np.random.default_rng(1).integers(0, 3, 400)]
    path, _ = _chained(tmp_path, x=x)
    g, one = GalleryIndex.load(path), build_index(x, _ids(0, 400), dict(LINEAGE))
    queries = np.concatenate([basis, _unit(30, 9)])  # 1 query and more than 20 (FAISS's BLAS)
    for q in (queries[:1], queries):
        for k in (1, 5, 150, 400):
            (s1, r1), (s2, r2) = g.search(q, k), one.search(q, k)
            assert np.array_equal(r1, r2) and np.array_equal(s1, s2), k
            assert np.array_equal(r1, nearest(x, q, k)), k


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_main_plus_deltas_keeps_recall(tmp_path, kind):
    path, x = _chained(tmp_path, kind, params={"nlist": 8, "nprobe": 4} if kind == "ivf" else None)
    g = GalleryIndex.load(path)
    exact = build_index(x, _ids(0, 400), dict(LINEAGE))
    queries = x[::3] + np.random.default_rng(1).normal(0, 0.05, (134, DIM)).astype(np.float32)
    _, got = g.search(queries, 1)
    _, want = exact.search(queries, 1)
    assert (got[:, 0] == want[:, 0]).mean() >= 0.9
    _, rows = g.search(x[300:], 1)  # the delta rows are searched exactly
    assert rows[:, 0].tolist() == list(range(300, 400))


def test_compaction_equals_a_rebuild_and_removes_the_deltas(tmp_path):
    path, x = _chained(tmp_path)
    out = compact_index(path)
    assert out == {"folded": 100, "count": 400, "path": path}
    assert not list(tmp_path.glob("g.faiss.delta-*"))
    g, one = GalleryIndex.load(path), build_index(x, _ids(0, 400), dict(LINEAGE))
    assert (g.n_main, g.n_delta) == (400, 0) and g.ids == one.ids
    assert np.array_equal(g.index.reconstruct_n(0, 400), one.index.reconstruct_n(0, 400))
    q = _unit(40, 3)
    assert all(np.array_equal(a, b) for a, b in zip(g.search(q, 7), one.search(q, 7), strict=True))
    assert compact_index(path)["folded"] == 0  # nothing left to fold: nothing written


def test_a_delta_of_another_index_or_a_gap_is_refused_in_one_line(tmp_path):
    path, _ = _chained(tmp_path / "a")
    other, _ = _chained(tmp_path / "b")
    saved = delta_file(path, 2).read_bytes()
    shutil.copy(delta_file(other, 2), delta_file(path, 2))  # same name, another index's chain
    with pytest.raises(ValueError, match="delta segment of another index, not of g.faiss"):
        GalleryIndex.load(path)
    r = CliRunner().invoke(app, ["index", "compact", "--index", str(path)])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "g.faiss.delta-000002" in r.output and "another index" in r.output
    delta_file(path, 2).write_bytes(saved)
    assert len(GalleryIndex.load(path)) == 400
    delta_file(path, 1).unlink()  # a gap: delta 2 without delta 1
    with pytest.raises(ValueError, match="delta segment 1 of g.faiss is missing"):
        GalleryIndex.load(path)
    r = CliRunner().invoke(app, ["query", "--index", str(path), "--record", "x"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output


def test_a_delta_of_another_lineage_is_refused(tmp_path):
    path, x = _chained(tmp_path, cuts=(300,))
    g = GalleryIndex.load(path)
    g.lineage = dict(g.lineage, checkpoint_sha256="b" * 64)  # vectors of another checkpoint
    g.add(_unit(5, 7), ["z0", "z1", "z2", "z3", "z4"])
    g.save_delta(path)
    with pytest.raises(LineageError, match="delta-000002: delta segment has checkpoint_sha256"):
        GalleryIndex.load(path)


def test_a_stale_in_memory_index_does_not_write_a_delta(tmp_path):
    path, x = _chained(tmp_path, cuts=(300,))
    a, b = GalleryIndex.load(path), GalleryIndex.load(path)
    a.add(_unit(3, 4), ["a0", "a1", "a2"])
    a.save_delta(path)
    b.add(_unit(3, 5), ["b0", "b1", "b2"])
    with pytest.raises(ValueError, match="changed since this index was loaded"):
        b.save_delta(path)
    assert GalleryIndex.load(path).ids[-3:] == ["a0", "a1", "a2"]


def test_drop_rows_covers_the_deltas(tmp_path):
    path, x = _chained(tmp_path)
    g = GalleryIndex.load(path)
    gone = [2, 299, 300, 355, 399]
    g.drop_rows(gone)
    g.save(path)
    assert not list(tmp_path.glob("g.faiss.delta-*"))
    kept = np.setdiff1d(np.arange(400), gone)
    back, want = GalleryIndex.load(path), build_index(x[kept], [f"r{i}" for i in kept])
    assert back.ids == want.ids and not {f"r{i}" for i in gone} & set(back.ids)
    assert back.labels == [f"p{i // 3}" for i in kept]
    q = _unit(30, 8)
    assert np.array_equal(back.search(q, 10)[1], want.search(q, 10)[1])


def _python(code: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )


ADD_CODE = """
import numpy as np
from retrieval.index import GalleryIndex
g = GalleryIndex.load({path!r})
x = np.random.default_rng(11).normal(size=(20, {dim})).astype(np.float32)
g.add(x, [f"k{{i}}" for i in range(20)])
g.{method}({path!r})
"""


@pytest.mark.parametrize(
    "method, fault, after",
    [
        ("save_delta", "index.delta_before_replace", False),
        ("save", "index.before_replace", False),  # compaction killed before its rename
        ("save", "index.before_delta_removal", True),  # after it, the old deltas left behind
    ],
)
def test_a_killed_update_or_compaction_leaves_the_index_before_or_after(
    tmp_path, method, fault, after
):
    path, x = _chained(tmp_path)
    q = _unit(25, 6)
    before = GalleryIndex.load(path).search(q, 8)
    code = ADD_CODE.format(path=str(path), dim=DIM, method=method)
    killed = _python(code, fault)
    assert killed.returncode == -9, killed.stderr
    g = GalleryIndex.load(path)
    if after:
        assert len(g) == 420 and g.ids[-1] == "k19" and g.n_delta == 0
        assert sorted(p.name for p in tmp_path.glob("g.faiss.delta-*")) == [
            "g.faiss.delta-000001",
            "g.faiss.delta-000002",
            "g.faiss.delta-000003",
        ]  # superseded leftovers: ignored on load, removed by the next writer
    else:
        assert len(g) == 400 and g.ids == _ids(0, 400)
        s, r = g.search(q, 8)
        assert np.array_equal(s, before[0]) and np.array_equal(r, before[1])
    # the next writer works on what it finds, and cleans up after the kill
    assert _python(ADD_CODE.format(path=str(path), dim=DIM, method="save_delta")).returncode == 0
    g = GalleryIndex.load(path)
    assert len(g) == len(set(g.ids)) + (20 if after else 0) and g.ids[-1] == "k19"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(list(tmp_path.glob("g.faiss.delta-*"))) == (1 if after else 4)
    assert index_file(tmp_path / "g") == path


def test_a_build_over_an_index_with_deltas_replaces_them(tmp_path):
    path, x = _chained(tmp_path)
    new = build_index(x[:50], _ids(0, 50), dict(LINEAGE)).save(tmp_path / "g")
    assert new == path and not list(tmp_path.glob("g.faiss.delta-*"))
    assert GalleryIndex.load(path).ids == _ids(0, 50)
    # deltas of a replaced main file that a kill left behind are ignored, not refused
    chained, _ = _chained(tmp_path / "k")
    leftovers = {p.name: p.read_bytes() for p in (tmp_path / "k").glob("g.faiss.delta-*")}
    build_index(x[:50], _ids(0, 50), dict(LINEAGE)).save(chained)
    for name, data in leftovers.items():
        (tmp_path / "k" / name).write_bytes(data)
    g = GalleryIndex.load(chained)
    assert g.ids == _ids(0, 50) and g.n_delta == 0


@pytest.mark.parametrize("big", [False, True])
def test_an_update_reads_the_main_description_up_to_its_row_names(tmp_path, big):
    """`load(main_ids=False)` parses the head of the description (growing prefixes of it), the
    same values as a whole parse, whatever the lineage strings hold."""
    lineage = dict(
        LINEAGE, store='/data/"ids": [1, 2],\\n ü ✓}', note="x" * (300_000 if big else 3)
    )
    x = _unit(50, 2)
    path = build_index(x, _ids(0, 50), lineage, labels=[f"p{i}" for i in range(50)]).save(
        tmp_path / "g"
    )
    full = GalleryIndex.load(path, main_vectors=False)
    head = GalleryIndex.load(path, main_vectors=False, main_ids=False)
    assert head.lineage == full.lineage == lineage and head.info == full.info
    assert head.uid == full.uid and len(head) == len(full) == 50 and head.dim == DIM
    assert head.ids == [None] * 50 and head.labels == [None] * 50 and full.ids == _ids(0, 50)
    head.add(_unit(2, 3), ["n0", "n1"], ["q0", "q1"])
    head.save_delta(path)
    back = GalleryIndex.load(path)
    assert back.ids == [*_ids(0, 50), "n0", "n1"] and back.labels[-3:] == ["p49", "q0", "q1"]


def test_a_description_written_before_deltas_is_read_whole(tmp_path):
    import json
    import struct

    import faiss

    from retrieval.index.file import META_FORMAT, TRAILER_MAGIC

    x = _unit(20, 4)
    flat = faiss.IndexFlatIP(DIM)
    flat.add(x)
    meta = {
        "format": META_FORMAT,
        "kind": "flat",
        "dim": DIM,
        "count": 20,
        "ids": _ids(0, 20),
        "labels": None,
        "lineage": dict(LINEAGE),
        "info": {},
    }  # the old key order, no uid
    raw = json.dumps(meta).encode()
    data = (
        faiss.serialize_index(flat).tobytes() + raw + struct.pack("<Q8s", len(raw), TRAILER_MAGIC)
    )
    path = tmp_path / "old.faiss"
    path.write_bytes(data)
    head = GalleryIndex.load(path, main_vectors=False, main_ids=False)
    assert head.ids == _ids(0, 20) and head.lineage == LINEAGE and len(head.uid) == 32
    head.add(_unit(3, 5), ["a", "b", "c"])
    head.save_delta(path)  # chained to the old file by the hash of its description
    back = GalleryIndex.load(path)
    assert back.ids == [*_ids(0, 20), "a", "b", "c"] and path.read_bytes() == data
    one = build_index(np.concatenate([x, _unit(3, 5)]), back.ids)
    q = _unit(10, 6)
    assert np.array_equal(back.search(q, 5)[1], one.search(q, 5)[1])


def test_a_second_writer_of_an_index_is_refused_while_one_holds_it(tmp_path):
    """Two writers would both take the next delta number (one rename would silently replace
    the other's vectors): the second one is refused in one line and nothing changes."""
    from ecgplat.locks import StoreBusyError
    from retrieval.index import index_lock

    path, _ = _chained(tmp_path)
    lock = index_lock(path)  # another writer, mid-update (a separate open file: flock conflicts)
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        with pytest.raises(StoreBusyError, match="index is being written by another process"):
            compact_index(path)
        r = CliRunner().invoke(app, ["index", "compact", "--index", str(path)])
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
        assert "being written by another process" in r.output
        assert sorted(p.name for p in tmp_path.iterdir()) == before
    finally:
        lock.release()
    assert compact_index(path)["folded"] == 100  # free again once released
    assert [p.name for p in tmp_path.iterdir() if "delta" in p.name] == []
