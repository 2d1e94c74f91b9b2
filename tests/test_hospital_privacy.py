"""The guard: no identifying value of a hospital sample file reaches any byte the platform writes.

Every hospital sample (the bundled permissive ones always; the GPL/unlicensed ones of
``$ECGPLAT_HOSPITAL_DATA`` when it is set) goes through the whole pipeline by the CLI, each
command run as the console script runs it, in two subprocesses (``tests/cli_batch.py``: one
Python start per batch, not per command): ``ingest auto`` (a Dask cluster of one worker, so
worker logs count), ``split``, ``shards``, ``embed`` (a tiny random checkpoint), ``index build``,
``query``, ``evaluate identify``, one pretraining update with W&B offline (its run folder and W&B
files), ``evaluate diagnosis`` with its W&B dashboard and checkpoint artifact, ``predict`` on
the sample files themselves, ``explain`` of a stored record and an ``export``'s metadata.

Then every byte written is searched for every identifying value, read from the sample files
by plain parsers independent of the readers (``hospital_samples.identifying_values``):
every file under the store (zarr chunks decompressed: each array is read back through zarr
and its decoded values searched too, the string columns as text), the shards (tar members),
the index, the run folder and W&B files, every stdout and stderr. Values are never written in
the repository: they are extracted here, each run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_checkpoint
from hospital_samples import identifying_values, restricted_root, sample_files
from test_auto_ingest import mixed_folder
from test_export import diagnosis_checkpoint
from wandb_files import records

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.slow


def run_cli(commands: list[list], outputs: dict[str, bytes], tmp: Path) -> None:
    """Run ``commands`` in order in one subprocess (``tests/cli_batch.py``: each as ``python -m
    ecgplat`` runs it) and keep each one's stdout and stderr in ``outputs``."""
    from cli_batch import MARKER

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HOME=str(tmp / "home"))
    env.update(WANDB_SILENT="true", WANDB_MODE="offline")
    batch = json.dumps([[str(a) for a in args] for args in commands])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "cli_batch.py"), batch],
        cwd=tmp,
        env=env,
        capture_output=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    for stream, data in (("stdout", proc.stdout), ("stderr", proc.stderr)):
        before, _, rest = data.partition(MARKER.format(0).encode())
        outputs[f"<{stream} before {len(outputs)}>"] = before
        for i, args in enumerate(commands):
            here, _, rest = rest.partition(MARKER.format(i + 1).encode())
            name = f"<{stream} {' '.join(map(str, args[:2]))}>"
            outputs[name if name not in outputs else f"{name} {len(outputs)}"] = here


def file_blobs(root: Path) -> dict[str, bytes]:
    """Every file under ``root``; tar archives also by member."""
    blobs = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        blobs[str(path)] = path.read_bytes()
        if path.suffix == ".tar":
            with tarfile.open(path) as tar:
                for m in tar.getmembers():
                    f = tar.extractfile(m)
                    if f is not None:
                        blobs[f"{path}:{m.name}"] = f.read()
    return blobs


def decoded_store(store: Path) -> dict[str, bytes]:
    """Every zarr array of the store (its feature sets too), decoded, as bytes; string arrays
    as their text."""
    import zarr

    blobs = {}
    for path in store.rglob("zarr.json"):
        key = path.parent.relative_to(store).as_posix()
        if key == ".":
            continue
        node = zarr.open(str(store), mode="r", path=key)
        if isinstance(node, zarr.Array) and node.size:
            values = np.asarray(node[...])
            text = values.dtype.kind in "OUT" or str(values.dtype).startswith("StringDType")
            data = "\n".join(map(str, values.ravel().tolist())).encode() if text else b""
            blobs[f"<decoded {key}>"] = data if text else values.tobytes()
    return blobs


HEADS = (8, 4)  # bytes of a needle's head looked up first: the longest it has (MIN_LENGTH
# characters: every needle has 4; 8 keep int16 samples that spell "19" in UTF-16 from matching)
STEP = 1 << 24  # bytes hashed at a time
_HASH = {  # a multiplicative hash to 20 bits, per head width
    4: (np.uint32(2654435761), np.uint32(32 - 20), "<u4"),
    8: (np.uint64(11400714819323198485), np.uint64(64 - 20), "<u8"),
}


def heads_in(data: bytes, heads: set[bytes], width: int = 4) -> set[bytes]:
    """The ``width``-byte strings of ``heads`` that occur in ``data``, exactly: every
    ``width``-byte window of ``data`` (read as a little-endian unsigned integer at each offset)
    is hashed into a table of the heads' hashes, and the windows that hit are compared with the
    heads themselves."""
    mul, shift, dtype = _HASH[width]
    keys = np.unique(np.frombuffer(b"".join(heads), dtype))
    table = np.zeros(1 << 20, dtype=bool)
    table[(keys * mul) >> shift] = True
    hits = [keys[:0]]
    for offset in range(min(width, len(data) - width + 1)):
        words = np.frombuffer(data, dtype, count=(len(data) - offset) // width, offset=offset)
        for start in range(0, len(words), STEP // width):
            w = words[start : start + STEP // width]
            hits.append(w[table[(w * mul) >> shift]])
    found = np.intersect1d(np.concatenate(hits), keys).astype(dtype).tobytes()
    return {found[i : i + width] for i in range(0, len(found), width)}


def _head(needle: bytes) -> bytes:
    return next((needle[:w] for w in HEADS if len(needle) >= w), needle)


def leaks(values: dict[str, set[str]], blobs: dict[str, bytes]) -> list[str]:
    """Each (value, output) where the value occurs, in UTF-8 or UTF-16-LE. Every needle is
    searched in full (``in``) in each output that holds its head, its first 8 bytes or else 4
    (``heads_in``, one pass per output and width instead of one per needle): an output without
    them cannot hold it."""
    heads = {_head(n) for v in set().union(*values.values()) for n in _needles(v)}
    present: dict[str, set[bytes]] = {where: set() for where in blobs}
    for width in HEADS:
        of_width = {h for h in heads if len(h) == width}
        if of_width:
            for where, data in blobs.items():
                present[where] |= heads_in(data, of_width, width)
    found = []
    for sample, wanted in values.items():
        for value in wanted:
            needles = _needles(value)
            for where, data in blobs.items():
                if any(
                    (len(n) < min(HEADS) or _head(n) in present[where]) and n in data
                    for n in needles
                ):
                    found.append(f"{sample}: a value of {len(value)} chars in {where}")
    return found


def _needles(value: str) -> set[bytes]:
    return {value.encode("utf-8"), value.encode("utf-16-le")}


def test_leak_search_finds_every_planted_value_where_a_plain_search_does():
    """``leaks`` (heads looked up first) finds exactly what searching each needle in each output
    finds: values planted at either end of an output, across the 16 MB steps of ``heads_in``, in
    UTF-8 and UTF-16-LE, a value shorter than ``HEAD`` bytes, near misses, tiny outputs."""
    rng = np.random.default_rng(0)
    values = {"a.xml": {"Doe^Jane", "19620314", "Müller"}, "b.dcm": {"ZZ7", "1962-03-14"}}
    big = bytearray(rng.integers(0, 256, (1 << 24) + 4096, dtype=np.uint8).tobytes())
    big[(1 << 24) - 2 : (1 << 24) + 6] = b"Doe^Jane"  # across a step of the 4-byte words
    blobs = {
        "big": bytes(big),
        "start": "Müller".encode("utf-16-le") + bytes(50),
        "end": bytes(5) + b"1962-03-1" + b"19620314",
        "near": b"Doe^Jan Doe^JanE 1962-03-41 M\xc3\xbclle",
        "short": b"ZZ7",
        "tiny": b"Doe",
        "empty": b"",
    }
    plain = [
        f"{sample}: a value of {len(value)} chars in {where}"
        for sample, wanted in values.items()
        for value in wanted
        for where, data in blobs.items()
        if any(n in data for n in _needles(value))
    ]
    assert leaks(values, blobs) == plain, plain
    wheres = {p.rsplit(" in ", 1)[1] for p in plain}
    assert {"big", "start", "end", "short"} <= wheres and not wheres & {"near", "tiny", "empty"}


def test_no_identifying_value_in_any_output(tmp_path):
    if restricted_root() is None:
        print("ECGPLAT_HOSPITAL_DATA not set: only the bundled hospital samples are checked")
    values = {path.name: identifying_values(path) for _, path in sample_files()}
    assert sum(map(len, values.values())) > 20, values.keys()
    src, _ = mixed_folder(tmp_path)
    store, shards, index, run = (tmp_path / n for n in ("store", "shards", "idx", "run"))
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    out: dict[str, bytes] = {}
    run_cli(
        [
            ["ingest", "auto", src, "--store", store, "--workers", 1, "--json", "--no-progress"],
            ["info", store],
            ["split", store, "--ident", "--valid", "0.3", "--test", "0"],
            *[
                ["shards", store, "--split", split, "--out", shards, "--no-progress"]
                for split in ("all", "train")
            ],
            ["embed", "--checkpoint", ckpt, "--store", store, "--name", "emb", "--device", "cpu"],
            ["index", "build", "--store", store, "--features", "emb", "--out", index,
             "--split", "all"],
        ],
        out,
        tmp_path,
    )  # fmt: skip
    sources = set(json.loads(out["<stdout ingest auto>"])["formats"])
    stored = _stored_sources(store)
    assert stored - {"wfdb", "cinc2021"}, f"no hospital-format record stored ({sources})"
    key = _first_key(store)
    later = [["query", "--index", f"{index}.faiss", "--record", key, "--json"]]
    if _has_probes(store):  # the samples of one subject in several formats make a gallery/probe
        later.append(["evaluate", "identify", "--store", store, "--features", "emb", "--json"])
    overrides = ["model.preset=tiny", "criterion.num_negatives=2", "data.batch_size=2"]
    overrides += ["data.num_workers=0", "optim.max_update=1", "optim.max_epoch=0"]
    overrides += ["logging.wandb_mode=offline", "logging.log_interval=1"]
    later.append(["train", "pretrain", *overrides, "--shards", shards, "--out", run])
    # issue 22: an evaluation's W&B dashboard and artifact, an explanation of a stored record,
    # and an export's metadata (a diagnosis checkpoint: the pretrained tiny encoder + a head)
    dx, deployed = diagnosis_checkpoint(tmp_path / "dx.pt"), tmp_path / "deployed"
    evaluate = ["evaluate", "diagnosis", "--checkpoint", dx, "--store", store, "--split", "train"]
    later.append([*evaluate, "--out", deployed / "eval", "--wandb-mode", "offline", "--json"])
    later.append(["predict", "--checkpoint", dx, src, "--out", deployed / "predictions.csv",
                  "--no-progress", "--json"])  # fmt: skip
    run_cli(later, out, tmp_path)
    assert list((run / "wandb").rglob("*.wandb")), "no W&B offline file was written"
    assert list((deployed / "eval" / "wandb").rglob("*.wandb")), "no W&B evaluation run"
    assert (deployed / "predictions.csv").stat().st_size > 0
    _explain_and_export(dx, store, key, deployed)
    blobs = {**out, **decoded_store(store)}
    for folder in (store, shards, run, deployed, tmp_path / "home"):
        blobs.update(file_blobs(folder) if folder.exists() else {})
    for log in (*run.rglob("*.wandb"), *deployed.rglob("*.wandb")):  # decoded as well
        blobs[f"<decoded {log}>"] = "\n".join(str(r) for r in records(log)).encode()
    blobs.update({str(p): p.read_bytes() for p in tmp_path.glob("idx*") if p.is_file()})
    found = leaks(values, blobs)
    print(
        f"searched {sum(map(len, blobs.values()))} bytes in {len(blobs)} outputs for "
        f"{sum(map(len, values.values()))} values of {len(values)} files"
    )
    assert not found, "\n".join(found)


def _explain_and_export(checkpoint: Path, store: Path, key: str, out: Path) -> None:
    """`ecgplat explain`'s files for stored record `key` and an export's metadata, under `out`
    (in-process: the same functions the commands call)."""
    import json

    from ecgplat.store import open_store
    from training.explain import explain_record
    from training.export import export_checkpoint, read_metadata
    from training.models.deployable import load_deployable

    st = open_store(store)
    i = int(np.flatnonzero(st.column("record_key") == key)[0])
    explain_record(load_deployable(checkpoint), st.record_segments(i), st.lead_masks[i],
                   out / "why", class_name="AF", steps=4)  # fmt: skip
    export_checkpoint(checkpoint, "torchscript", out / "dx.ts")
    (out / "export_metadata.json").write_text(json.dumps(read_metadata(out / "dx.ts")))


def _first_key(store: Path) -> str:
    from ecgplat.store import open_store

    return str(open_store(store).records["record_key"].iloc[0])


def _has_probes(store: Path) -> bool:
    from ecgplat.store import open_store

    return bool((open_store(store).column("ident_split") == "probe").any())


def _stored_sources(store: Path) -> set[str]:
    from ecgplat.store import open_store

    return set(open_store(store).records["source"])
