"""Times identification ranking before and after the scale work on synthetic features (not a test).

`old`: the former `evaluate_level` core, a FAISS flat index over the gallery asked for the full
ranking of every probe (depth = gallery size), scored by the neighbour-matrix metrics. `new`:
`training.ident_metrics.rank_statistics` (one matrix product per probe block, only the relevant
items ranked), on every probe and on a fixed probe budget as `evaluate identify` runs it.
Usage: python bench/identify_timing.py [--sizes 5000 20000] [--budget 2000] [--skip-old]
[--skip-full] (the last two skip the all-probe runs, for galleries the size of a real store)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

# the repository root first: bench/retrieval.py would otherwise shadow the retrieval package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.evaluate import CMC_DEPTH, PROBE_CHUNK, probe_sample
from retrieval.index import build_index
from training.ident_metrics import average_precision, cmc_curve, rank_statistics


def cohort(n: int, dim: int = 64, per_patient: int = 10, seed: int = 0):
    """n gallery and n probe unit vectors, `per_patient` of each per patient around a centre."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n // per_patient + 1), per_patient)[:n]
    centres = rng.normal(size=(labels.max() + 1, dim))

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    gal = unit(centres[labels] + 1.5 * rng.normal(size=(n, dim)))
    prb = unit(centres[labels] + 1.5 * rng.normal(size=(n, dim)))
    return gal, labels, prb, labels.copy()


def old_core(gal, g_lab, prb, p_lab):
    index = build_index(gal, [str(i) for i in range(len(gal))], kind="flat")
    depth = len(index)
    cmc_sum, ap = np.zeros(depth), []
    for s in range(0, len(prb), PROBE_CHUNK):
        _, rows = index.search(prb[s : s + PROBE_CHUNK], depth)
        labels = p_lab[s : s + PROBE_CHUNK]
        cmc_sum += cmc_curve(rows, g_lab, labels) * len(labels)
        ap.append(average_precision(rows, g_lab, labels))
    return cmc_sum / len(prb), np.concatenate(ap)


def new_core(gal, g_lab, prb, p_lab, budget=0):
    chosen = probe_sample(len(prb), budget)
    return rank_statistics(gal, prb[chosen], g_lab, p_lab[chosen], CMC_DEPTH, PROBE_CHUNK)


def timed(fn, *args, **kw):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kw)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000])
    ap.add_argument("--budget", type=int, default=2000)
    ap.add_argument("--skip-old", action="store_true")
    ap.add_argument("--skip-full", action="store_true")
    args = ap.parse_args()
    rows = {}
    for n in args.sizes:
        gal, g_lab, prb, p_lab = cohort(n)
        row = {}
        (cmc, ap_new), row["budget_wall"], row["budget_cpu"] = timed(
            new_core, gal, g_lab, prb, p_lab, budget=args.budget
        )
        if not args.skip_full:
            (cmc, ap_new), row["new_wall"], row["new_cpu"] = timed(new_core, gal, g_lab, prb, p_lab)
        if not (args.skip_old or args.skip_full):
            (cmc_old, ap_old), row["old_wall"], row["old_cpu"] = timed(
                old_core, gal, g_lab, prb, p_lab
            )
            # FAISS and numpy may round near-tied scores apart: the metrics agree closely
            row["max_abs_diff_rank1"] = float(abs(cmc[0] - cmc_old[0]))
            row["max_abs_diff_mAP"] = float(abs(np.nanmean(ap_new) - np.nanmean(ap_old)))
        row["rank1"], row["mAP"] = float(cmc[0]), float(np.nanmean(ap_new))
        rows[n] = row
        print(n, json.dumps({k: round(v, 4) for k, v in row.items()}), flush=True)
    if len(args.sizes) >= 2:
        a, b = args.sizes[0], args.sizes[-1]
        growth = {
            key: (rows[b][key] / b) / (rows[a][key] / a)
            for key in rows[a]
            if key.endswith(("_wall", "_cpu"))
        }
        growth = {k: round(v, 2) for k, v in growth.items()}
        print(f"time per item at {b} / at {a}:", json.dumps(growth))


if __name__ == "__main__":
    main()
