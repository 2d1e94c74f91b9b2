"""On-disk formats under crashes, concurrent readers and corrupt files: the atomic writer, one home
per format, the FAISS index as one unit, split generations, stale and half-renamed shard exports,
corrupt commit points. Kills are deterministic (``ECGPLAT_FAULT_STOP`` names the step)."""

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ecgplat import atomic
from ecgplat.cli import app
from ecgplat.faults import ENV as FAULT_ENV
from ecgplat.shard_format import StaleShardsError, check_current, read_info
from ecgplat.store import COMMIT_FILE, open_store, read_commit
from retrieval.index import GalleryIndex, build_index

ROOT = Path(__file__).parents[1]


def _python(code: str, fault: str | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (with the fault point ``fault`` armed)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, **kwargs
    )


def _one_line_error(result, *needles) -> None:
    text = result.output if hasattr(result, "output") else result.stdout + result.stderr
    assert result.exit_code != 0 if hasattr(result, "exit_code") else result.returncode != 0
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1, text
    for needle in needles:
        assert needle in text, text


# ------------------------------------------------------------------ the atomic writer


def test_atomic_writes_replace_whole_files_and_clean_up(tmp_path):
    target = tmp_path / "x.json"
    atomic.write_json(target, {"a": 1})
    atomic.write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert json.loads(target.read_text()) == {"a": 2}  # untouched by the failed write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]  # and no temp file left
    secret = atomic.write_bytes(tmp_path / "k", b"\x01" * 32, mode=0o600)
    assert secret.stat().st_mode & 0o777 == 0o600 and secret.read_bytes() == b"\x01" * 32
    atomic.link_or_copy(target, tmp_path / "y.json")
    assert (tmp_path / "y.json").read_bytes() == target.read_bytes()
    (tmp_path / ".x.json.0123.tmp").write_text("left by a killed writer")
    (tmp_path / ".x.json.4567.tmp").write_text("left by a killed writer")
    assert atomic.remove_temps(tmp_path) == 2 and not list(tmp_path.glob(".*.tmp"))


def test_fault_point_kills_only_when_named():
    code = "from ecgplat.faults import stop_point; stop_point('a.b'); print('alive')"
    assert _python(code).stdout.strip() == "alive"
    assert _python(code, fault="other").stdout.strip() == "alive"
    assert _python(code, fault="a.b").returncode == -signal.SIGKILL


# ------------------------------------------------------------------ one home per format


@pytest.mark.parametrize(
    "pattern, home",
    [
        (r'^INFO_FILE\s*=|"_info\.json"', "ecgplat/shard_format.py"),
        (
            r'"ecgplat-shards/|"seg\.npy"|"meta\.json"|"r%08d|^META_FIELDS\s*=',
            "ecgplat/shard_format.py",
        ),
        (
            r"^(SAMPLE_RATE|SEGMENT_SECONDS|SEGMENT_SAMPLES|N_LEADS|UV_PER_MV)\s*=",
            "ecgplat/store/schema.py",
        ),
        (
            r'^(COMMIT_FILE|SECRET_FILE|SCHEMA_VERSION)\s*=|"commit\.json"',
            "ecgplat/store/schema.py",
        ),
        (r'"ecgplat-checkpoint/', "training/models/checkpoint_file.py"),
        (r'"ecgplat-features/|^FEATURES_DIR\s*=', None),
        (r'"ecgplat-faiss-(index|delta)/', "retrieval/index/file.py"),
        (r"os\.replace\(|os\.fsync\(", None),
    ],
)
def test_each_format_is_defined_in_one_module(pattern, home):
    """grep over the code: each format constant has one defining module (None: checked below)."""
    rx = re.compile(pattern, re.M)
    files = [
        str(p.relative_to(ROOT))
        for folder in ("ecgplat", "ingestion", "training", "retrieval")
        for p in sorted((ROOT / folder).rglob("*.py"))
        if rx.search(p.read_text())
    ]
    if home is not None:
        assert files == [home]
    elif "features" in pattern:
        homes = {"ecgplat/store/schema.py", "retrieval/features.py"}
        assert len(files) <= 2 and set(files) <= homes
    else:  # renames of whole folders (feature sets, shard directories) besides the one helper
        assert "ecgplat/atomic.py" in files
        assert set(files) <= {
            "ecgplat/atomic.py",
            "ingestion/shards.py",
            "retrieval/feature_build.py",
        }


# ------------------------------------------------------------------ the FAISS index as one unit


def _vectors(n, seed):
    return np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)


def test_index_is_one_file_and_a_killed_rebuild_keeps_the_old_one(tmp_path):
    old = build_index(_vectors(10, 0), [f"old{i}" for i in range(10)], {"leads": "I"})
    path = old.save(tmp_path / "g")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.faiss"]
    assert faiss.read_index(str(path)).ntotal == 10  # still a FAISS file for other tools
    code = (
        "import numpy as np; from retrieval.index import build_index\n"
        "x = np.random.default_rng(1).normal(size=(25, 8)).astype(np.float32)\n"
        f"build_index(x, [f'new{{i}}' for i in range(25)]).save({str(path)!r})\n"
    )
    killed = _python(code, fault="index.before_replace")
    assert killed.returncode == -signal.SIGKILL
    loaded = GalleryIndex.load(path)  # the old index, whole: vectors and description agree
    assert loaded.ids == old.ids and len(loaded) == 10 and loaded.lineage == {"leads": "I"}
    scores, rows = loaded.search(_vectors(10, 0), 1)
    assert rows[:, 0].tolist() == list(range(10)) and np.allclose(scores[:, 0], 1, atol=1e-5)
    assert _python(code).returncode == 0  # the next build replaces it and removes the temp
    assert GalleryIndex.load(path).ids == [f"new{i}" for i in range(25)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.faiss"]


def test_readers_of_a_rebuilt_index_see_old_or_new_never_a_mix(tmp_path):
    path = tmp_path / "g.faiss"
    versions = {
        n: build_index(_vectors(n, n), [f"v{n}-{i}" for i in range(n)]) for n in (5, 40, 300)
    }
    versions[5].save(path)
    errors, seen, stop = [], set(), threading.Event()

    def read():
        while not stop.is_set():
            try:
                idx = GalleryIndex.load(path)
                assert len(idx) == len(idx.ids) and idx.ids[0].startswith(f"v{len(idx)}-")
                seen.add(len(idx))
            except Exception as e:  # noqa: BLE001 - any failure is what this test counts
                errors.append(repr(e))

    reader = threading.Thread(target=read)
    reader.start()
    for _ in range(30):
        for v in versions.values():
            v.save(path)
    stop.set()
    reader.join()
    assert errors == [] and len(seen) >= 2


def _index_bytes(tmp_path) -> bytes:
    return build_index(_vectors(6, 3), list("abcdef")).save(tmp_path / "good").read_bytes()


def _with_description(good: bytes, description) -> bytes:
    from retrieval.index.file import _TRAILER

    n_meta, magic = _TRAILER.unpack(good[-_TRAILER.size :])
    faiss_part = good[: len(good) - _TRAILER.size - n_meta]
    text = json.dumps(description).encode()
    return faiss_part + text + _TRAILER.pack(len(text), magic)


def _good_description(good: bytes) -> dict:
    from retrieval.index.file import _TRAILER

    n_meta, _ = _TRAILER.unpack(good[-_TRAILER.size :])
    end = len(good) - _TRAILER.size
    return json.loads(good[end - n_meta : end])


MALFORMED = {
    "empty": lambda good: b"",
    "pickle": lambda good: pickle.dumps({"ids": ["a"], "count": 1}),
    "random": lambda good: np.random.default_rng(0).bytes(4096),
    "truncated_end": lambda good: good[: len(good) // 2],
    "truncated_start": lambda good: good[len(good) // 2 :],
    "faiss_only": lambda good: _with_description(good, {})[: -len(b"{}") - 16],
    "faiss_part_cut": lambda good: (
        good[:40] + good[len(good) - len(json.dumps(_good_description(good))) - 16 :]
    ),
    "description_list": lambda good: _with_description(good, [1, 2, 3]),
    "no_count": lambda good: _with_description(
        good, {k: v for k, v in _good_description(good).items() if k != "count"}
    ),
    "ids_wrong_length": lambda good: _with_description(
        good, {**_good_description(good), "ids": ["a"]}
    ),
    "bad_kind": lambda good: _with_description(good, {**_good_description(good), "kind": 7}),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_index_files_give_one_line_errors(tmp_path, case):
    bad = tmp_path / f"{case}.faiss"
    bad.write_bytes(MALFORMED[case](_index_bytes(tmp_path)))
    with pytest.raises(ValueError) as err:
        GalleryIndex.load(bad)
    message = str(err.value)
    assert message.startswith(f"{bad}: ") and "\n" not in message and len(message) < 300
    result = CliRunner().invoke(app, ["query", "--index", str(bad), "--record", "src/x"])
    _one_line_error(result, str(bad))


# ------------------------------------------------------------------ store: commit point, splits


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe garbage", "not JSON"),
        (b"", "not JSON"),
        (None, "cannot read"),  # a directory in its place
        (b"[1, 2]", "not a JSON object"),
        (b'{"n_records": 3, "n_segments": 6, "splits": null}', "n_rejects=None"),
        (b'{"n_records": -1, "n_segments": 0, "n_rejects": 0}', "n_records=-1"),
        (b'{"n_records": 1, "n_segments": 2, "n_rejects": 0, "splits": "../x"}', "splits="),
    ],
)
def test_corrupt_commit_point_is_named(synth_store, tmp_path, content, reason):
    store = tmp_path / "store"
    shutil.copytree(synth_store, store)
    if content is None:
        (store / COMMIT_FILE).unlink()
        (store / COMMIT_FILE).mkdir()
    else:
        (store / COMMIT_FILE).write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"{store / COMMIT_FILE}: c")):
        open_store(store)
    _one_line_error(CliRunner().invoke(app, ["info", str(store)]), str(store / COMMIT_FILE), reason)
    result = CliRunner().invoke(app, ["split", str(store)])
    _one_line_error(result, str(store / COMMIT_FILE))


@pytest.mark.parametrize("count, extra", [("n_records", 5), ("n_segments", 3), ("n_rejects", 2)])
def test_commit_point_counting_rows_the_arrays_lack_is_refused(synth_store, tmp_path, count, extra):
    """A commit.json that counts more rows than the arrays hold (a copy taken mid-write) is
    refused by readers and writers alike: no phantom records read, split, sealed or exported,
    and nothing in the store changes (the old bug: info crashed, split grew the arrays)."""
    store = tmp_path / "store"
    shutil.copytree(synth_store, store)
    state = json.loads((store / COMMIT_FILE).read_bytes())
    state[count] += extra
    (store / COMMIT_FILE).write_text(json.dumps(state))
    before = {p: p.read_bytes() for p in store.rglob("zarr.json")}
    commit = (store / COMMIT_FILE).read_bytes()
    with pytest.raises(ValueError, match=re.escape(f"{store / COMMIT_FILE}: corrupt commit")):
        open_store(store)
    runner = CliRunner()
    out = tmp_path / "out"
    for args in (["info"], ["split"], ["shards", "--split", "train", "--out", str(out)]):
        result = runner.invoke(app, [args[0], str(store), *args[1:]])
        assert result.exit_code == 2, result.output
        _one_line_error(result, str(store / COMMIT_FILE), f"{count}={state[count]}")
    assert (store / COMMIT_FILE).read_bytes() == commit and not out.exists()
    assert {p: p.read_bytes() for p in store.rglob("zarr.json")} == before


def test_readers_never_fail_while_split_runs(synth_store, tmp_path):
    """Readers that opened the store before a split keep reading their generation: a split
    deletes only generations older than the one it replaces. 0 errors over concurrent reads."""
    store = tmp_path / "store"
    shutil.copytree(synth_store, store)
    splitter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from ingestion.splits import split_store\n"
            "for seed in range(1, 9): split_store(sys.argv[1], seed=seed, ident=True)\n",
            str(store),
        ],
        env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
    )
    errors, reads = [], 0
    views = []
    while splitter.poll() is None:
        try:
            views.append(open_store(store))
            for view in views[-3:]:  # fresh views and views opened a little earlier
                frame = view.records
                assert set(frame["split"]) <= {"train", "valid", "test"}
                view.__dict__.pop("records", None)
            views = views[-3:]
            reads += 1
        except Exception as e:  # noqa: BLE001 - any failure is what this test counts
            errors.append(repr(e))
    assert splitter.returncode == 0
    assert errors == [] and reads >= 5
    assert read_commit(store)["splits"] == "g9"
    assert sorted(p.name for p in (store / "splits").iterdir() if p.is_dir()) == ["g8", "g9"]


def test_embed_takes_the_store_lock(synth_store, tmp_path):
    from ecgplat.store import StoreBusyError
    from ecgplat.store.writer import StoreWriter
    from retrieval.embed import embed_store

    store = tmp_path / "store"
    shutil.copytree(synth_store, store)
    ckpt = Path(__file__).parent / "fixtures" / "pretrained_tiny" / "w2v_cmsc_rlm_tiny_synth.pt"
    with StoreWriter(store, create=False), pytest.raises(StoreBusyError, match="another process"):
        embed_store(store, ckpt, "f", device="cpu")
    assert not (store / "features" / "f").exists()
    assert not list((store / "features").glob(".build-*"))  # refused before writing anything
    embed_store(store, ckpt, "f", device="cpu")
    assert (store / "features" / "f" / "zarr.json").is_file()


# ------------------------------------------------------------------ shards


def _export(store, out, split, max_count, fault=None):
    code = (
        "from ingestion.shards import write_shards\n"
        f"write_shards({str(store)!r}, {split!r}, {str(out)!r}, max_count={max_count})\n"
    )
    return _python(code, fault=fault)


@pytest.fixture
def own_store_and_shards(synth_store, tmp_path):
    from ingestion.shards import write_shards

    store, out = tmp_path / "store", tmp_path / "shards"
    shutil.copytree(synth_store, store)
    write_shards(store, "train", out, max_count=16)
    write_shards(store, "valid", out, max_count=16)
    return store, out


def test_info_records_the_split_generation_and_stale_exports_are_refused(own_store_and_shards):
    from ingestion.splits import split_store

    store, out = own_store_and_shards
    generation = read_commit(store)["splits"]
    assert read_info(out)["train"]["store"]["split_generation"] == generation
    check_current(out, ["train", "valid"])  # current: accepted
    split_store(store, seed=7)
    with pytest.raises(StaleShardsError, match=f"generation {generation} but .* now at g"):
        check_current(out, ["train", "valid"])
    check_current(out, ["train"], allow_stale=True)
    result = CliRunner().invoke(
        app, ["train", "pretrain", "--shards", str(out), "--out", str(out.parent / "run")]
    )
    _one_line_error(result, "_info.json", "--allow-stale")
    assert not (out.parent / "run").exists()


def test_killed_reexport_never_leaves_a_mixed_export(own_store_and_shards):
    from training.data import iter_records, shard_set

    store, out = own_store_and_shards
    before = {s["file"]: (out / s["file"]).read_bytes() for s in read_info(out)["train"]["shards"]}
    killed = _export(store, out, "train", 5, fault="shards.between_renames")
    assert killed.returncode == -signal.SIGKILL
    changed = [f for f, data in before.items() if (out / f).read_bytes() != data]
    assert changed  # the kill landed after some old shards were replaced ...
    info = read_info(out)
    assert "train" not in info and "valid" in info  # ... so the export is withdrawn, not mixed
    with pytest.raises(ValueError, match="no split 'train'"):
        shard_set(out, "train")
    assert _export(store, out, "train", 5).returncode == 0
    entry = read_info(out)["train"]
    keys = [k for url in shard_set(out, "train").urls for k, _, _ in iter_records(url)]
    train = open_store(store).select(split="train")
    assert keys == [f"r{i:08d}" for i in train] and entry["samples"] == len(train)
    assert all(s["samples"] <= 5 for s in entry["shards"])
    assert not list(out.glob(".*.tmp"))


def test_temp_files_of_killed_exports_are_removed_by_the_next_run(own_store_and_shards):
    store, out = own_store_and_shards
    before = read_info(out)
    killed = _export(store, out, "valid", 2, fault="shards.before_renames")
    assert killed.returncode == -signal.SIGKILL
    temps = list(out.glob(".*.tmp"))
    assert len(temps) >= 3 and all(t.stat().st_size > 0 for t in temps)
    assert read_info(out)["train"] == before["train"]  # other exports untouched
    assert _export(store, out, "train", 16).returncode == 0  # any later run cleans up
    assert not list(out.glob(".*.tmp"))


def test_torch_checkpoints_go_through_the_atomic_writer(tmp_path, monkeypatch):
    from training.models import build_encoder, save_checkpoint

    torch.manual_seed(0)
    enc = build_encoder("tiny")
    kw = {"kind": "pretrain", "encoder_config": enc.cfg, "model": enc.state_dict()}
    path = save_checkpoint(tmp_path / "c.pt", **kw)
    good = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, **kw)
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
