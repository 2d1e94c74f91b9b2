"""Incremental feature store: `embed` of 1 % new records against a full embed, and `index update`
with 1 % new vectors against a rebuild.

Embed: a synthetic cohort (`--records` of 10 s, two segments each) is written; the first 99 % of
its records are ingested and embedded with a fresh `--preset` encoder, then the rest are ingested
and (a) the incremental `embed_store` (which re-embeds at most `batch_size - 1` committed
segments: the batch the old set ended in) and (b) a full embed of the grown store into another
set are timed in the same process. (a) runs `--repeat` times from the same old set (the median
is reported: the machine may be shared). `computed_fraction` is the share of the store's
segments the incremental run pushes through the encoder (new plus recomputed): the ratio's floor;
`fixed_s` is what (a) costs beyond that share of (b). At 2,000 segments the floor alone is above
the 3 % target (a recomputed batch is up to 63 segments next to 20 new ones); use
`--records 10000` (20,000 segments) for a meaningful ratio. Index, per `--vectors` N and kind: a
store of N records written through the store writer (`bench/scale.py`) holds a feature set of N
synthetic unit vectors of `--dim`, first with 99 % of its rows committed; an index is built over
those, the rest are committed, and (c) what `ecgplat index build --split all` runs (read the set
from the store, build, write) is timed against (d) what `ecgplat index update` runs (a delta
segment of the new 1 %, read from the store's appended rows). `--parts` picks embed and/or
index. Output: JSON on stdout (and in `--out FILE`).

    python bench/incremental.py [--records 1000] [--vectors 100000 1000000] [--kinds flat,hnsw,ivf]
    python bench/incremental.py --records 10000 --parts embed --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

# the repository root first: bench/retrieval.py would otherwise shadow the retrieval package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import workdir, write_report  # noqa: E402

TARGET_EMBED = 0.03
TARGET_INDEX = 0.05


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _link_or_copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)  # a hard link: the 99 % subset of a large cohort costs no copy
    except OSError:
        shutil.copy(src, dest)


def _grown_store(root: Path, records: int, preset: str, batch_size: int) -> dict:
    """The store of the first 99 % of the records embedded as "f", then grown to all of them."""
    from bench.embed import fresh_checkpoint
    from ecgplat.store import open_store
    from ingestion.pipeline import ingest
    from ingestion.synth import write_cohort
    from retrieval.embed import embed_store

    cohort, old, store = root / "cohort", root / "old", root / "store"
    write_cohort(cohort, records, 1, seconds=10.0, seed=0)
    for hea in sorted(cohort.rglob("*.hea"))[: records - max(1, records // 100)]:
        for f in (hea, hea.with_suffix(".mat")):
            _link_or_copy(f, old / f.relative_to(cohort))
    ingest("cinc2021", old, store, workers=0, progress=False)
    ckpt = fresh_checkpoint(root / "enc.pt", preset)
    kw = dict(batch_size=batch_size, device="cpu", precision="fp32")
    t_old, _ = _timed(lambda: embed_store(store, ckpt, "f", **kw))
    n_old = open_store(store).n_segments
    shutil.copytree(store / "features" / "f", root / "f-old")
    ingest("cinc2021", cohort, store, workers=0, progress=False)
    return {"store": store, "ckpt": ckpt, "kw": kw, "n_old": n_old, "old_embed_s": t_old}


def bench_embed(root: Path, records: int, preset: str, batch_size: int, repeat: int) -> dict:
    from ecgplat.store import open_store
    from retrieval.embed import embed_store

    g = _grown_store(root, records, preset, batch_size)
    store, n_old = g["store"], g["n_old"]
    n_all = open_store(store).n_segments

    def incremental():
        shutil.rmtree(store / "features" / "f")
        shutil.copytree(root / "f-old", store / "features" / "f")
        t, out = _timed(lambda: embed_store(store, g["ckpt"], "f", **g["kw"]))
        assert out["embedded"] == n_all - n_old, out
        return t

    t_incs = [incremental() for _ in range(max(1, repeat))]
    t_full, _ = _timed(lambda: embed_store(store, g["ckpt"], "full", **g["kw"]))
    t_inc = statistics.median(t_incs)
    recomputed = n_old - (n_old // batch_size) * batch_size
    computed = (n_all - n_old + recomputed) / n_all
    return {
        "segments": n_all,
        "new_segments": n_all - n_old,
        "recomputed_old_segments": recomputed,
        "batch_size": batch_size,
        "incremental_s": round(t_inc, 3),
        "incremental_runs_s": [round(t, 3) for t in t_incs],
        "full_s": round(t_full, 3),
        "old_embed_s": round(g["old_embed_s"], 3),
        "computed_fraction": round(computed, 4),
        "fixed_s": round(t_inc - computed * t_full, 3),
        "ratio": round(t_inc / t_full, 4),
        "target": TARGET_EMBED,
    }


def _feature_set(store: Path, dim: int, committed: int) -> None:
    """Feature set "f" of the store's records (one segment each): synthetic unit vectors of
    `dim` at both levels, `committed` rows of them committed (the layout `ecgplat embed`
    writes, docs/formats.md; the rows past the count are what a later embed commits)."""
    import numpy as np
    import zarr

    from ecgplat.store import open_store
    from retrieval.features import FeatureSet

    view = open_store(store)
    n = view.n_records
    x = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    group = zarr.open_group(str(FeatureSet(store, "f").path), mode="w")
    rows = np.arange(n, dtype=np.int64)
    for level in ("segment", "record"):
        sub = group.create_group(level)
        sub.create_array("embedding", shape=(n, dim), dtype=np.float32, chunks=(4096, dim))
        sub.create_array("record_index", shape=(n,), dtype=np.int64, chunks=(4096,))
        sub["embedding"][:], sub["record_index"][:] = x, rows
        if level == "segment":
            sub.create_array("segment_number", shape=(n,), dtype=np.int32, chunks=(4096,))
            sub["segment_number"][:] = np.zeros(n, np.int32)
    _commit_rows(store, dim, committed, view.attrs.get("store_uuid"))


def _commit_rows(store: Path, dim: int, rows: int, store_uuid) -> None:
    import zarr

    from retrieval.features import FeatureSet

    zarr.open_group(str(FeatureSet(store, "f").path), mode="r+").attrs["lineage"] = {
        "schema": "ecgplat-features/1",
        "name": "f",
        "checkpoint_sha256": "0" * 64,
        "leads": "I,II,III,aVR,aVL,aVF,V1,V2,V3,V4,V5,V6",
        "precision": "fp32",
        "normalize": "none",
        "dim": dim,
        "batch_size": 64,
        "store_uuid": store_uuid,
        "n_segments": rows,
        "n_records": rows,
        "n_record_rows": rows,
        "complete": True,
    }


def bench_index(root: Path, n: int, dim: int, kinds: list[str]) -> list[dict]:
    """Per kind: `ecgplat index build --split all` from the store's feature set (read from
    disk, built, written) against `ecgplat index update` of the last 1 % of its rows (a delta
    segment; compaction past `COMPACT_FRACTION`) of an index built over the first 99 %."""
    from bench.scale import write_million
    from ecgplat.store import open_store
    from retrieval.index import delta_file, index_from_features, update_index

    store = root / f"store{n}"
    t_store, _ = _timed(lambda: write_million(store, n))
    cut = n - max(1, n // 100)
    _feature_set(store, dim, cut)
    uuid = open_store(store).attrs.get("store_uuid")
    out = []
    for kind in kinds:
        _commit_rows(store, dim, cut, uuid)
        t_old, _ = _timed(
            lambda k=kind: index_from_features(store, "f", split="all", kind=k).save(
                root / f"{k}-old"
            )
        )
        _commit_rows(store, dim, n, uuid)  # the embed of the new records has committed them

        def rebuild(k=kind):
            return index_from_features(store, "f", split="all", kind=k).save(root / f"{k}-full")

        t_full, _ = _timed(rebuild)
        t_upd, upd = _timed(lambda k=kind: update_index(root / f"{k}-old", store, "f"))
        assert upd["added"] == n - cut and not upd["compacted"], upd
        out.append(
            {
                "kind": kind,
                "vectors": n,
                "new_vectors": n - cut,
                "dim": dim,
                "store_write_s": round(t_store, 1),
                "build_99pct_s": round(t_old, 3),
                "update_s": round(t_upd, 3),
                "rebuild_s": round(t_full, 3),
                "ratio": round(t_upd / t_full, 4),
                "delta_bytes": delta_file(root / f"{kind}-old", 1).stat().st_size,
                "main_bytes": (root / f"{kind}-full.faiss").stat().st_size,
                "target": TARGET_INDEX,
            }
        )
        print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    shutil.rmtree(store, ignore_errors=True)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=1000, help="10 s records (2 segments each)")
    p.add_argument("--repeat", type=int, default=1, help="incremental runs (median reported)")
    p.add_argument("--parts", default="embed,index", help="embed and/or index")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--vectors", type=int, nargs="+", default=[100_000])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--kinds", default="flat,hnsw,ivf")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    with workdir(None, "ecgplat-bench-incremental-") as root:
        parts, result = args.parts.split(","), {}
        if "embed" in parts:
            result["embed"] = bench_embed(
                root, args.records, args.preset, args.batch_size, args.repeat
            )
        if "index" in parts:
            kinds = args.kinds.split(",")
            result["index"] = [
                r for n in args.vectors for r in bench_index(root, n, args.dim, kinds)
            ]
    write_report(result, args.out, indent=1)
    return result


if __name__ == "__main__":
    main()
