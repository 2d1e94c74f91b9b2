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
`--records 10000` (20,000 segments) for a meaningful ratio. Index: `--vectors` synthetic unit
vectors of `--dim`; (c) `build_index` + save over all of them against (d) load +
`GalleryIndex.add` of the last 1 % + save of an index built over the first 99 %, per kind.
`--parts` picks embed and/or index. Output: JSON on stdout (and in `--out FILE`).

    python bench/incremental.py [--records 1000] [--vectors 100000] [--kinds flat,hnsw,ivf]
    python bench/incremental.py --records 10000 --parts embed --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# the repository root first: bench/retrieval.py would otherwise shadow the retrieval package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def bench_index(root: Path, n: int, dim: int, kind: str) -> dict:
    import numpy as np

    from retrieval.index import GalleryIndex, build_index

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"r{i}" for i in range(n)]
    cut = n - max(1, n // 100)
    build_index(x[:cut], ids[:cut], kind=kind, n_sample=0).save(root / f"{kind}-old")

    def rebuild():
        return build_index(x, ids, kind=kind, n_sample=0).save(root / f"{kind}-full")

    def update():
        index = GalleryIndex.load(root / f"{kind}-old")
        index.add(x[cut:], ids[cut:])
        return index.save(root / f"{kind}-old")

    t_full, _ = _timed(rebuild)
    t_upd, _ = _timed(update)
    return {
        "kind": kind,
        "vectors": n,
        "new_vectors": n - cut,
        "dim": dim,
        "update_s": round(t_upd, 3),
        "rebuild_s": round(t_full, 3),
        "ratio": round(t_upd / t_full, 4),
        "target": TARGET_INDEX,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=1000, help="10 s records (2 segments each)")
    p.add_argument("--repeat", type=int, default=1, help="incremental runs (median reported)")
    p.add_argument("--parts", default="embed,index", help="embed and/or index")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--vectors", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--kinds", default="flat,hnsw,ivf")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        parts, result = args.parts.split(","), {}
        if "embed" in parts:
            result["embed"] = bench_embed(
                root, args.records, args.preset, args.batch_size, args.repeat
            )
        if "index" in parts:
            kinds = args.kinds.split(",")
            result["index"] = [bench_index(root, args.vectors, args.dim, k) for k in kinds]
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
