"""The real-data downstream-task study: the committed real-data pretrained checkpoint against a
random init of the same preset on sex, age and the PTB-XL superclasses, fine-tuned and probed.

    python -m bench.task_study --data DIR --out OUT [--checkpoint CKPT] [--seeds 3]

DIR holds the labelled corpora in their own layouts (`ptbxl/`, `cinc2021/`, `ludb/`,
`code15/`; any subset, PTB-XL needed for the superclasses). One store `OUT/tasks.zarr` gets
them and three tasks (`ecgplat labels add`): `sex` (binary, positive F), `age` (regression) and
`superclass` (the PTB-XL diagnostic superclasses, multilabel). Splits, by patient:

* test: only records the checkpoint's pretraining never saw. `bench.real_study` held out all of
  PTB-XL, the CODE-15% records of patients with >= 2 records and its diagnosis test split
  (`random_split` of LUDB + PTB-XL + CinC 2021, test 0.35, seed 0, which depends on record ids
  only, so it is recomputed here exactly). Of these, 35 % of the PTB-XL patients and every
  non-PTB-XL one are `test`; 15 % of the PTB-XL patients are `valid`, the rest `train`.
* the records the pretraining did see (unlabelled) are `train` (85 %) or `valid` (15 %).

Arms, each with the checkpoint's normalisation (`data.normalize`, `zscore` for the committed
one) for pretrained and random init alike: fine-tuning (`train finetune --labels T`, seeds
0..n-1, the random arm's encoder drawn with the same seed) scored by `evaluate task` on test
(record level, 95 % patient-bootstrap intervals; thresholds fitted on valid), and the linear
probe (`ecgplat probe`) on record-mean embeddings of the pretrained encoder and of each seed's
random encoder; "pretrained - random" is a paired patient bootstrap of the difference on the
same test records. Diagnosis of normalisation: the same random seeds fed millivolts
(`data.normalize=none`, fine-tuned and probed), and every probe again with the 12 per-lead
standard deviations in millivolts (the amplitude that per-record z-scoring removes) appended to
the embedding, plus those 12 features alone. Results: OUT/results.json, OUT/table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import real_study
from bench.common import write_json
from bench.hardware import cpu_info
from bench.real_study import log, relative_paths

CORPORA = (("ptbxl", "ptbxl"), ("cinc2021", "cinc2021"), ("ludb", "ludb"), ("code15", "code15"))
# (task name, labels add source)
TASKS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("sex", {"field": "sex"}),
    ("age", {"field": "age"}),
    ("superclass", {"vocabulary": "ptbxl-superclass"}),
)
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "results/real_study/pretrained_tiny.pt"
# bench.real_study's diagnosis split (the records its pretraining held out)
PRETRAIN_DX = ("ludb", "ptbxl", "cinc2021")
PRETRAIN_DX_TEST, PRETRAIN_DX_SEED = 0.35, 0


# --------------------------------------------------------------------------- data


def unseen_by_pretraining(records) -> np.ndarray:
    """Bool per record: held out of `bench.real_study`'s pretraining pool (all PTB-XL, CODE-15%
    patients with >= 2 records, its diagnosis test split)."""
    from ingestion.splits import random_split

    source = records["source"].to_numpy()
    multi = records.groupby("patient_key")["record_key"].transform("count").to_numpy() >= 2
    held = (source == "ptbxl") | ((source == "code15") & multi)
    dx = np.isin(source, PRETRAIN_DX)
    if set(PRETRAIN_DX) <= set(source):  # the split is only that one with all three corpora
        split = random_split(
            records["patient_key"].to_numpy()[dx].astype(str),
            0.0,
            PRETRAIN_DX_TEST,
            PRETRAIN_DX_SEED,
            order_keys=records["record_key"].to_numpy()[dx].astype(str),
        )
        held[np.flatnonzero(dx)[split == "test"]] = True
    else:
        held |= dx  # without the full set the pretraining split is unknown: hold all out
    return held


def assign_splits(store: Path, seed: int, ptbxl_test: float, ptbxl_valid: float) -> dict:
    from ecgplat.store import open_store
    from ecgplat.store.writer import StoreWriter
    from ingestion.splits import random_split

    records = open_store(store).records
    unseen = unseen_by_pretraining(records)
    ptbxl = (records["source"] == "ptbxl").to_numpy()
    patients = records["patient_key"].to_numpy().astype(str)
    keys = records["record_key"].to_numpy().astype(str)
    split = np.full(len(records), "test", dtype=object)  # unseen non-PTB-XL records
    if ptbxl.any():
        split[ptbxl] = random_split(
            patients[ptbxl], ptbxl_valid, ptbxl_test, seed, order_keys=keys[ptbxl]
        )
    seen = ~unseen
    if seen.any():
        split[seen] = random_split(patients[seen], 0.15, 0.0, seed, order_keys=keys[seen])
    with StoreWriter(store, create=False) as writer:
        writer.write_splits(split, np.full(len(records), "", dtype=object))
    frame = records.assign(split=split, unseen=unseen)
    counts = frame.groupby(["source", "split"]).size()
    assert not (frame["split"].eq("test") & ~frame["unseen"]).any()
    return {
        "by_source": {f"{a}/{b}": int(n) for (a, b), n in counts.items()},
        "unseen_by_pretraining": int(unseen.sum()),
    }


def prepare(args, out: Path) -> dict:
    from ecgplat.task_build import add_task
    from ingestion.pipeline import ingest
    from ingestion.shards import write_shards

    store = out / "tasks.zarr"
    data: dict = {"ingest": {}}
    for folder, reader in CORPORA:
        src = args.data / folder
        if not src.is_dir():
            log(f"{folder}: missing, skipped")
            continue
        s = ingest(reader, src, store, workers=0, progress=False)
        data["ingest"][folder] = {"records": s["records"], "rejected": dict(s["rejected"])}
        log(f"ingested {folder}: {s['records']} records")
    data["splits"] = assign_splits(store, args.split_seed, args.ptbxl_test, args.ptbxl_valid)
    data["tasks"] = {}
    for name, source in TASKS:
        try:
            data["tasks"][name] = add_task(store, name, **source)
        except ValueError as e:
            log(f"task {name}: skipped ({e})")
    write_shards(store, "train", out / "shards")
    log(f"splits: {data['splits']}")
    return data


def task_counts(store: Path, name: str) -> dict:
    from ecgplat.store import open_store
    from ecgplat.store.task_store import read_task

    st = open_store(store)
    dense = read_task(st, name).dense(st.n_records)
    split = np.asarray(st.column("split")).astype(str)
    labelled = ~np.isnan(dense).any(axis=1)
    out = {}
    for s in ("train", "valid", "test"):
        rows = labelled & (split == s)
        y = dense[rows]
        entry: dict = {"records": int(rows.sum())}
        if read_task(st, name).spec.kind != "regression":
            entry["positives"] = y.sum(axis=0).astype(int).tolist()
        out[s] = entry
    return out


# --------------------------------------------------------------------------- encoders


def random_checkpoint(path: Path, preset: str, seed: int, normalize: str) -> Path:
    """A random-init pretraining checkpoint of `preset` drawn with `seed`, run config
    `data.normalize=normalize` (what `embed` applies)."""
    return real_study.random_checkpoint(path, preset, seed, "fp32", [f"data.normalize={normalize}"])


def finetune(args, out: Path, task: str, arm: str, init: str, preset: str, normalize: str, seed):
    from training.loop import train
    from training.run_config import load_config
    from training.tasks.supervised import SupervisedTask

    run = out / "runs" / f"{task}_{arm}_seed{seed}"
    cfg = load_config(
        "finetune",
        [
            f"head.task={task}",
            f"model.preset={preset}",
            f"data.shards={out / 'shards'}",
            f"data.store={out / 'tasks.zarr'}",
            f"out={run}",
            f"finetune.init={init}",
            f"seed={seed}",
            f"data.batch_size={args.ft_batch}",
            "data.num_workers=0",
            f"data.normalize={normalize}",
            f"precision={args.precision}",
            f"optim.lr={args.ft_lr}",
            f"optim.max_update={args.ft_updates}",
            "optim.max_epoch=0",
            "logging.wandb_mode=disabled",
            "logging.log_interval=1000",
            f"checkpoint.save_interval_updates={args.ft_updates}",
        ],
    )
    train(cfg, SupervisedTask(cfg))
    return run / "checkpoint_last.pt"


def headline(kind: str) -> str:
    return {"binary": "auroc", "regression": "mae"}.get(kind, "auroc_macro")


def summarise(report: dict, kind: str) -> dict:
    keys = {
        "binary": ("auroc", "auprc", "f1"),
        "multilabel": ("auroc_macro", "auprc_macro", "f1_macro"),
        "regression": ("mae", "rmse", "r2", "pearson_r"),
    }[kind]
    ci = report.get("ci95", {})
    return {k: {"value": report.get(k), "ci95": ci.get(k)} for k in keys if k in report}


def paired_gap(store: Path, task: str, a: Path, b: Path, n_boot: int) -> dict:
    """Headline metric of predictions `a` minus that of `b` (two `predictions.csv` of the same
    test records) and its 95 % interval, resampling patients once for both (paired)."""
    import pandas as pd

    from ecgplat.store import open_store
    from ecgplat.store.task_store import read_task
    from training.task_metrics import patient_bootstrap, task_metrics

    st = open_store(store)
    spec = read_task(st, task).spec
    kind, key = spec.kind, headline(spec.kind)
    pa = pd.read_csv(a)
    pb = pd.read_csv(b).set_index("record_key").loc[pa["record_key"]].reset_index()
    col = "value_" if kind == "regression" else "p_"
    sa, sb = (p[[col + c for c in spec.classes]].to_numpy(np.float64) for p in (pa, pb))
    y = pa[["target_" + c for c in spec.classes]].to_numpy(np.float64)
    patient_of = dict(
        zip(
            np.asarray(st.column("record_key")).astype(str),
            np.asarray(st.column("patient_key")).astype(str),
            strict=True,
        )
    )
    patients = np.array([patient_of[k] for k in pa["record_key"].astype(str)])

    def gap(rows: np.ndarray) -> dict:
        va, vb = (
            task_metrics(kind, y[rows], s[rows], None, spec.classes, detail=False)[key]
            for s in (sa, sb)
        )
        return {"gap": None if va is None or vb is None else float(va - vb)}

    ci = patient_bootstrap(gap, patients, ("gap",), n_boot, 0)["gap"] if n_boot else None
    return {"metric": key, "value": gap(np.arange(len(y)))["gap"], "ci95": ci}


# --------------------------------------------------------------------------- probes


def amplitude_features(store: Path) -> np.ndarray:
    """(R, 12) log10 of each lead's standard deviation in mV over the whole record (the scale
    per-record z-scoring divides out); absent leads 0."""
    from ecgplat.store import open_store
    from training.normalize import lead_stats

    st = open_store(store)
    feats = np.zeros((st.n_records, 12))
    for r in range(st.n_records):
        _, sd = lead_stats(st.record_segments(r))
        feats[r] = np.log10(np.where(sd > 0, sd, 1.0))
    return feats


def probe_arrays(store: Path, task: str, x_all: np.ndarray, rows: np.ndarray, args) -> dict:
    """`retrieval.probe`'s protocol (standardise on train, C on valid, score test with patient
    intervals) on an arbitrary record feature matrix `x_all` (rows = store record indices)."""
    import math

    from ecgplat.store import open_store
    from ecgplat.store.task_store import read_task
    from retrieval.probe import GRID, _fit_predict
    from training.evaluate_task import task_targets
    from training.task_metrics import report_with_intervals, task_metrics

    st = open_store(store)
    stored = read_task(st, task)
    kind = stored.spec.kind
    dense = stored.dense(st.n_records)[rows]
    split = np.asarray(st.column("split")).astype(str)[rows]
    labelled = ~np.isnan(dense).any(axis=1)
    tr, va, te = (np.flatnonzero(labelled & (split == s)) for s in ("train", "valid", "test"))
    mean, std = x_all[tr].mean(axis=0), x_all[tr].std(axis=0)
    x = (x_all - mean) / np.where(std > 0, std, 1.0)
    y = task_targets(kind, dense)
    key = headline(kind)
    best = None
    for c in GRID:
        (p_va,) = _fit_predict(kind, x[tr], y[tr], [x[va]], c, 0, y.shape[1])
        v = task_metrics(kind, y[va], p_va, None, stored.spec.classes, detail=False)[key]
        if v is None or not math.isfinite(v):
            continue
        score = -v if kind == "regression" else v
        if best is None or score > best[0]:
            best = (score, c)
    assert best is not None
    (p_te,) = _fit_predict(kind, x[tr], y[tr], [x[te]], best[1], 0, y.shape[1])
    patients = np.asarray(st.column("patient_key")).astype(str)[rows][te]
    report = report_with_intervals(
        kind, y[te], p_te, patients, None, stored.spec.classes, args.bootstrap, 0
    )
    return summarise(report, kind)


def probe_set(store: Path, out: Path, ckpt: Path, name: str, amp: np.ndarray, args) -> dict:
    """Embed with `ckpt` (its own normalisation), then for every task: the library probe on the
    embeddings, and the same protocol on embeddings + the 12 amplitude features."""
    from retrieval.embed import embed_store
    from retrieval.features import load_features
    from retrieval.probe import run_probe

    embed_store(store, ckpt, name, precision=args.precision, overwrite=True)
    feats = load_features(store, name, "record")
    res: dict = {}
    for task, _ in TASKS:
        if task not in args.task_names:
            continue
        kind = args.kinds[task]
        s = run_probe(
            store, name, task, out=out / "probes" / f"{name}_{task}", n_boot=args.bootstrap
        )
        plus = np.hstack([feats.embeddings.astype(np.float64), amp[feats.record_index]])
        res[task] = {
            "embedding": summarise(s["levels"]["record"], kind),
            "embedding+amplitude": probe_arrays(store, task, plus, feats.record_index, args),
        }
    return res


# --------------------------------------------------------------------------- report


def fmt(entry: dict | None) -> str:
    if not entry or entry.get("value") is None:
        return "–"
    ci = entry.get("ci95")
    band = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    return f"{entry['value']:.3f}{band}"


def table(res: dict) -> str:
    lines = [
        f"checkpoint `{res['checkpoint']['file']}` (preset `{res['checkpoint']['preset']}`, "
        f"normalize `{res['checkpoint']['normalize']}`), fine-tune {res['finetune_updates']} "
        f"updates of {res['finetune_batch']} segments, lr {res['finetune_lr']}; record level, "
        "95 % patient-bootstrap intervals; CPU flags: " + ", ".join(res["cpu"]["flags"]),
        "",
        "| task (metric) | arm | seed | pretrained | random init | pretrained − random "
        "(paired) | better | random init, mV | pretrained − random mV |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task, r in res["tasks"].items():
        metric = headline(r["kind"])
        lower = r["kind"] == "regression"
        ft, pr = r["finetune"], r["probe"]
        for how, rows in (
            (
                "fine-tune",
                zip(ft["pretrained"], ft["random"], ft["gap_random"], ft["random_mv"],
                    ft["gap_random_mv"], strict=True),
            ),
            (
                "linear probe",
                zip([pr["pretrained"]["embedding"]] * len(pr["random"]),
                    [q["embedding"] for q in pr["random"]], pr["gap_random"],
                    [q["embedding"] for q in pr["random_mv"]], pr["gap_random_mv"], strict=True),
            ),
        ):  # fmt: skip
            for s, (p, q, g, m, gm) in enumerate(rows):
                win = (g["value"] < 0) if lower else (g["value"] > 0)
                lines.append(
                    f"| {task} ({metric}) | {how} | {s} | {fmt(p[metric])} | {fmt(q[metric])} | "
                    f"{fmt(g)} | {'yes' if win else '**no**'} | {fmt(m[metric])} | {fmt(gm)} |"
                )
    lines += [
        "",
        "Normalisation diagnosis (linear probes; random init = mean over seeds of the value):",
        "",
        "| task (metric) | pretrained, z-score | + amplitude | random, z-score | + amplitude | "
        "random, mV | amplitude alone |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, r in res["tasks"].items():
        metric = headline(r["kind"])
        pr = r["probe"]

        def mean(arms, which, metric=metric):
            vals = [a[which][metric]["value"] for a in arms]
            return f"{np.mean(vals):.3f}" if vals else "–"

        lines.append(
            f"| {task} ({metric}) | {fmt(pr['pretrained']['embedding'][metric])} | "
            f"{fmt(pr['pretrained']['embedding+amplitude'][metric])} | "
            f"{mean(pr['random'], 'embedding')} | {mean(pr['random'], 'embedding+amplitude')} | "
            f"{mean(pr['random_mv'], 'embedding')} | {fmt(pr['amplitude'][metric])} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="folder holding the corpora")
    ap.add_argument("--out", type=Path, required=True, help="output folder (created)")
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tasks", default="sex,age,superclass")
    ap.add_argument("--ft-updates", type=int, default=60)
    ap.add_argument("--ft-batch", type=int, default=32)
    ap.add_argument("--ft-lr", type=float, default=1e-3)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--ptbxl-test", type=float, default=0.35)
    ap.add_argument("--ptbxl-valid", type=float, default=0.15)
    ap.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16"))
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        raise SystemExit(f"error: --data {args.data}: not a directory")
    if not args.checkpoint.is_file():
        raise SystemExit(f"error: --checkpoint {args.checkpoint}: no such file")
    args.out.mkdir(parents=True, exist_ok=True)
    if any(args.out.iterdir()):
        raise SystemExit(f"error: --out {args.out}: not empty")
    from ecgplat.file_hash import file_sha256
    from training.models import load_checkpoint
    from training.normalize import mode_of

    t0 = time.time()
    out, store = args.out, args.out / "tasks.zarr"
    ckpt = load_checkpoint(args.checkpoint)
    preset, normalize = ckpt["config"]["model"]["preset"], mode_of(ckpt)
    data = prepare(args, out)
    args.task_names = [t for t in args.tasks.split(",") if t in data["tasks"]]
    args.kinds = {t: data["tasks"][t]["kind"] for t in args.task_names}
    seeds = range(args.seeds)
    tasks: dict = {
        t: {"kind": args.kinds[t], "counts": task_counts(store, t), "finetune": {}, "probe": {}}
        for t in args.task_names
    }

    # probes first (minutes), then the fine-tunes
    amp = amplitude_features(store)
    enc = out / "encoders"
    enc.mkdir()
    pretrained = probe_set(store, out, args.checkpoint, "pretrained", amp, args)
    probes: dict[str, Any] = {"pretrained": pretrained, "random": [], "random_mv": []}
    for s in seeds:
        for arm, mode in (("random", normalize), ("random_mv", "none")):
            path = random_checkpoint(enc / f"{arm}_seed{s}.pt", preset, s, mode)
            probes[arm].append(probe_set(store, out, path, f"{arm}{s}", amp, args))
        log(f"probes seed {s} done ({(time.time() - t0) / 60:.1f} min)")
    rows = np.arange(amp.shape[0])
    for t in args.task_names:
        tasks[t]["probe"] = {
            "pretrained": probes["pretrained"][t],
            "random": [p[t] for p in probes["random"]],
            "random_mv": [p[t] for p in probes["random_mv"]],
            "amplitude": probe_arrays(store, t, amp, rows, args),
        }
        for arm in ("random", "random_mv"):
            tasks[t]["probe"][f"gap_{arm}"] = [
                paired_gap(
                    store,
                    t,
                    out / "probes" / f"pretrained_{t}" / "predictions.csv",
                    out / "probes" / f"{arm}{s}_{t}" / "predictions.csv",
                    args.bootstrap,
                )  # fmt: skip
                for s in seeds
            ]
        log(f"probe {t}: {json.dumps(tasks[t]['probe']['pretrained']['embedding'])}")

    from training.evaluate_task import evaluate_task

    arms = (
        ("pretrained", str(args.checkpoint), normalize),
        ("random", "none", normalize),
        ("random_mv", "none", "none"),
    )
    for s in seeds:
        for t in args.task_names:
            ft, preds = tasks[t]["finetune"], {}
            for arm, init, mode in arms:
                last = finetune(args, out, t, arm, init, preset, mode, s)
                preds[arm] = last.parent / "eval" / "predictions.csv"
                ev = evaluate_task(
                    last, store, "test", preds[arm].parent, n_boot=args.bootstrap,
                    precision=args.precision,
                )  # fmt: skip
                ft.setdefault(arm, []).append(summarise(ev["levels"]["record"], args.kinds[t]))
            for arm in ("random", "random_mv"):
                gap = paired_gap(store, t, preds["pretrained"], preds[arm], args.bootstrap)
                ft.setdefault(f"gap_{arm}", []).append(gap)
            key = headline(args.kinds[t])
            log(
                f"fine-tune {t} seed {s}: "
                + ", ".join(f"{a} {ft[a][-1][key]['value']:.3f}" for a, _, _ in arms)
                + f" ({(time.time() - t0) / 60:.1f} min)"
            )
    res = {
        "checkpoint": {
            "file": args.checkpoint.name,
            "sha256": file_sha256(args.checkpoint),
            "preset": preset,
            "normalize": normalize,
        },
        "data": data,
        "tasks": tasks,
        "seeds": list(seeds),
        "finetune_updates": args.ft_updates,
        "finetune_batch": args.ft_batch,
        "finetune_lr": args.ft_lr,
        "bootstrap": args.bootstrap,
        "precision": args.precision,
        "cpu": cpu_info(),
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "minutes": (time.time() - t0) / 60,
    }
    roots = (out, args.data, Path(__file__).resolve().parents[1])
    write_json(out / "results.json", relative_paths(res, roots), default=str)
    (out / "table.md").write_text(table(res))
    print(table(res))


if __name__ == "__main__":
    main()
