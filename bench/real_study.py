"""The real-data pretraining study: pretrain W2V+CMSC+RLM on real ECGs and compare the encoder
with a random init of the same preset on held-out real identification and diagnosis.

    python -m bench.real_study --data DIR --out OUT [--minutes 30]

DIR holds the corpora in their own layouts (any subset of `ptbxl_preprocessed/` (ingested with
`--units z`), `ludb/`, `code15/`, `ptbxl/`, `cinc2021/`, `cpsc2021/`). Two stores are built:

* `OUT/pool.zarr`: every corpus. Held out (split `test`): all of PTB-XL (identification:
  patients with 2 ECGs, the others are gallery-only distractors; diagnosis), the CODE-15%
  records of patients with >= 2 records (identification) and the diagnosis test records. The
  rest (split `train`) is the pretraining pool.
* `OUT/dx.zarr`: the labelled corpora (PTB-XL, CinC 2021, LUDB), split by patient into
  train/test; the diagnosis fine-tunes and the linear probe train on `train` and are scored on
  `test` (record-level macro AUROC over the classes with >= 5 test positives).

Every encoder, pretrained or random, sees per-record z-scored input (`data.normalize=zscore`):
the pool mixes `z` and microvolt records. The pretraining preset is the largest of `--presets`
whose measured step time allows `--min-updates` in the budget; the run is stopped by SIGTERM
(a clean checkpoint) when the budget is spent. Results go to OUT/results.json,
OUT/pretrain_loss.png and OUT/table.md; the pretrained checkpoint and its provenance to
OUT/pretrained_<preset>.pt and OUT/provenance.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import write_json
from bench.hardware import cpu_info

# (folder under --data, reader, --units)
CORPORA = (
    ("ptbxl_preprocessed", "wfdb", "z"),
    ("ludb", "ludb", None),
    ("code15", "code15", None),
    ("ptbxl", "ptbxl", None),
    ("cinc2021", "cinc2021", None),
    ("cpsc2021", "cpsc2021", None),
)
DX_CORPORA = ("ptbxl", "cinc2021", "ludb")
IDENT_SOURCES = ("ptbxl", "code15")
MIN_POSITIVES = 5
PRETRAIN = [
    "data.batch_size=8",
    "optim.lr=1e-3",
    "optim.update_freq=1",
    "optim.max_epoch=0",
    "data.num_workers=0",
    "logging.wandb_mode=disabled",
    "logging.log_interval=25",
    "checkpoint.save_interval_updates=250",
    "data.normalize=zscore",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- data


def ingest_all(data: Path, store: Path, corpora) -> dict:
    """Ingest every corpus folder present under `data` in-process; {folder: summary counts}."""
    from ingestion.pipeline import ingest
    from ingestion.readers.options import ReadOptions

    counts = {}
    for folder, reader, units in corpora:
        src = data / folder
        if not src.is_dir():
            log(f"{src}: missing, skipped")
            continue
        s = ingest(reader, src, store, workers=0, progress=False, opts=ReadOptions(units=units))
        counts[folder] = {"records": s["records"], "rejected": dict(s["rejected"])}
        log(f"ingested {folder}: {s['records']} records, rejected {dict(s['rejected'])}")
    return counts


def dx_split(store: Path, test: float, seed: int) -> None:
    from ingestion.splits import split_store

    split_store(store, mode="random", valid=0.0, test=test, seed=seed)


def pool_split(pool: Path, dx: Path) -> dict:
    """Hold out the evaluation records of the pool store (split `test`), the rest is `train`;
    gallery/probe over the identification records with single-record patients gallery-only."""
    from ecgplat.store import open_store
    from ecgplat.store.writer import StoreWriter
    from ingestion.splits import gallery_probe

    frame = open_store(pool).records
    dxf = open_store(dx).records
    dx_test = set(dxf["record_key"][dxf["split"] == "test"])
    source = frame["source"].to_numpy()
    patients = frame["patient_key"].to_numpy().astype(str)
    multi = frame.groupby("patient_key")["record_key"].transform("count").to_numpy() >= 2
    ident = (source == "ptbxl") | ((source == "code15") & multi)
    held = ident | frame["record_key"].isin(dx_test).to_numpy()
    split = np.where(held, "test", "train").astype(object)
    ident_split = np.full(len(frame), "", dtype=object)
    ident_split[ident] = gallery_probe(patients[ident])
    ident_split[ident & (ident_split == "")] = "gallery"  # distractors
    with StoreWriter(pool, create=False) as writer:
        writer.write_splits(split, ident_split)
    by_source = frame.assign(split=split).groupby(["source", "split"]).size()
    return {
        "pool_records": int((split == "train").sum()),
        "held_out_records": int(held.sum()),
        "by_source": {f"{a}/{b}": int(n) for (a, b), n in by_source.items()},
        "gallery": int((ident_split == "gallery").sum()),
        "probe": int((ident_split == "probe").sum()),
        "ident_patients": int(len(set(patients[ident_split == "probe"]))),
    }


# --------------------------------------------------------------------------- pretraining


def pretrain_overrides(shards: Path, run: Path, preset: str, precision: str, updates: int):
    return [
        *PRETRAIN,
        f"model.preset={preset}",
        f"precision={precision}",
        f"optim.max_update={updates}",
        f"data.shards={shards}",
        f"out={run}",
    ]


def measure_step(shards: Path, preset: str, precision: str, steps: int = 3) -> float:
    """Seconds per update of `preset` (after one warm-up update), in-process."""
    from ecgplat.tracking import read_metrics
    from training.loop import train
    from training.run_config import load_config
    from training.tasks.pretrain import PretrainTask

    with tempfile.TemporaryDirectory(prefix="study-measure-") as tmp:
        over = pretrain_overrides(shards, Path(tmp), preset, precision, steps + 1)
        cfg = load_config("w2v_cmsc_rlm", [*over, "logging.log_interval=1"])
        train(cfg, PretrainTask(cfg))
        times = [r.get("time") for r in read_metrics(tmp, "loss")]
    if len(times) >= 2 and all(t is not None for t in times):
        return (times[-1] - times[0]) / (len(times) - 1)
    raise RuntimeError(f"no timed log lines in the {preset} measurement")


def pick_preset(shards: Path, presets, precision: str, budget_s: float, min_updates: int):
    """The first (largest) preset whose projected updates in the budget reach `min_updates`."""
    timings = {}
    for preset in presets:
        timings[preset] = measure_step(shards, preset, precision)
        projected = budget_s / timings[preset]
        log(f"{preset}: {timings[preset]:.2f} s/update -> ~{projected:.0f} updates in budget")
        if projected >= min_updates:
            return preset, timings
    return presets[-1], timings


def run_pretraining(shards: Path, run: Path, preset: str, precision: str, args) -> dict:
    """`ecgplat train pretrain` in a child process, SIGTERMed when the budget is spent (the
    loop saves a checkpoint on SIGTERM), or run to `--updates` when given."""
    updates = args.updates or 10**7
    over = pretrain_overrides(shards, run, preset, precision, updates)
    over = [o for o in over if not o.startswith(("data.shards=", "out="))]
    cmd = [sys.executable, "-m", "ecgplat", "train", "pretrain", "--config", "w2v_cmsc_rlm"]
    cmd += ["--shards", str(shards), "--out", str(run), *over]
    t0 = time.time()
    with open(run.parent / "pretrain.log", "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=None if args.updates else args.minutes * 60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=600)
    seconds = time.time() - t0
    last = run / "checkpoint_last.pt"
    if not last.is_file():
        raise SystemExit(f"{run}: pretraining wrote no checkpoint (see {run.parent}/pretrain.log)")
    return {"seconds": seconds, "hours": seconds / 3600, "returncode": proc.returncode}


def relative_paths(obj, roots: tuple[Path, ...]):
    """``obj`` with every string naming a path under one of ``roots`` (the output folder, the
    data root) written relative to that root: the results hold no path of this machine."""
    if isinstance(obj, dict):
        return {k: relative_paths(v, roots) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(relative_paths(v, roots) for v in obj)
    if isinstance(obj, str):
        for root in roots:
            for base in dict.fromkeys((str(root), os.path.abspath(root))):
                if obj == base or obj.startswith(base.rstrip("/") + "/"):
                    return os.path.relpath(obj, base)
    return obj


def export_pretrained(run: Path, out: Path, data: Path, extra: dict) -> tuple[Path, dict]:
    """Model-only copy of the run's last checkpoint and its provenance record (paths in its
    config relative to the output folder or the data root)."""
    from ecgplat.file_hash import file_sha256
    from ecgplat.tracking import read_metrics
    from training.models import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(run / "checkpoint_last.pt")
    config = relative_paths(ckpt["config"], (out, data))
    preset = config["model"]["preset"]
    path = out / f"pretrained_{preset}.pt"
    save_checkpoint(
        path,
        kind="pretrain",
        encoder_config=ckpt["encoder_config"],
        model=ckpt["model"],
        config=config,
        num_updates=ckpt["num_updates"],
        extra={"recipe": "python -m bench.real_study"},
    )
    logs = read_metrics(run, "w2v_loss")
    keys = ("update", "loss", "w2v_loss", "cmsc_loss", "accuracy")
    record = {
        "checkpoint": path.name,
        "sha256": file_sha256(path),
        "bytes": path.stat().st_size,
        "num_updates": int(ckpt["num_updates"]),
        "preset": preset,
        "config": config,
        "first_log": {k: logs[0].get(k) for k in keys} if logs else None,
        "last_log": {k: logs[-1].get(k) for k in keys} if logs else None,
        **extra,
    }
    write_json(out / "provenance.json", record, default=str)
    return path, record


def random_checkpoint(
    path: Path, preset: str, seed: int, precision: str, overrides: list[str] | None = None
) -> Path:
    """A random-init pretraining checkpoint of `preset` (the weights `train` starts from with
    this seed), with the same run config as the pretrained one (so `data.normalize=zscore`)
    unless `overrides` (run-config `key=value`s, after the pretraining ones) say otherwise."""
    from training.loop import seed_everything
    from training.models import save_checkpoint
    from training.run_config import load_config
    from training.tasks.pretrain import PretrainTask

    cfg = load_config(
        "w2v_cmsc_rlm",
        [
            *PRETRAIN,
            f"model.preset={preset}",
            f"precision={precision}",
            f"seed={seed}",
            *(overrides or []),
        ],
    )
    seed_everything(seed)
    task = PretrainTask(cfg)
    model = task.build_model()
    save_checkpoint(
        path,
        kind="pretrain",
        encoder_config=task.encoder_config(model),
        model=model.state_dict(),
        config=cfg.to_dict(),
        num_updates=0,
    )
    return path


def plot_loss(run: Path, path: Path, chance_bits: float, cmsc_chance_bits: float) -> None:
    from ecgplat.tracking import read_metrics
    from retrieval.figures import pyplot, save_figure

    logs = read_metrics(run, "loss")
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 3.6))
    u = [r["update"] for r in logs]
    axes[0].plot(u, [r["loss"] for r in logs], label="total")
    axes[0].set_title("pretraining loss")
    for key, ax in (("w2v_loss", axes[1]), ("cmsc_loss", axes[1])):
        ax.plot(u, [r.get(key, math.nan) for r in logs], label=key)
    axes[1].axhline(chance_bits, color="grey", ls="--", label=f"InfoNCE chance {chance_bits:.2f}")
    axes[1].axhline(
        cmsc_chance_bits, color="grey", ls=":", label=f"CMSC chance {cmsc_chance_bits:.2f}"
    )
    axes[1].set_title("objectives (bits)")
    for ax in axes:
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path, dpi=110)


# --------------------------------------------------------------------------- evaluation


def identification(pool: Path, ckpt: Path, name: str, precision: str) -> dict:
    """The library's embed + identification evaluation, plus the mean pairwise cosine of the
    held-out pooled embeddings (1.0 = collapsed)."""
    from ecgplat.store import open_store
    from retrieval.embed import embed_store
    from retrieval.evaluate import evaluate_identification
    from retrieval.features import load_features

    embed_store(pool, ckpt, name, precision=precision, overwrite=True)
    result = evaluate_identification(pool, name)
    feats = load_features(pool, name, "record")
    held = open_store(pool).records["ident_split"].to_numpy()[feats.record_index] != ""
    emb = feats.embeddings[held].astype(np.float64)
    sim = emb @ emb.T
    n = len(emb)
    result["mean_pairwise_cosine"] = float((sim.sum() - np.trace(sim)) / (n * (n - 1)))
    return {k: result[k] for k in ("record", "segment", "mean_pairwise_cosine")}


def eligible_classes(dx: Path) -> tuple[np.ndarray, list[str]]:
    from ecgplat.labels import ABBREVIATIONS
    from ecgplat.store import open_store

    st = open_store(dx)
    split = st.records["split"].to_numpy()
    y = st.labels
    test_pos = y[split == "test"].sum(axis=0)
    train_pos = y[split == "train"].sum(axis=0)
    n_test = int((split == "test").sum())
    keep = (test_pos >= MIN_POSITIVES) & (test_pos < n_test) & (train_pos >= 1)
    return np.flatnonzero(keep), [ABBREVIATIONS[i] for i in np.flatnonzero(keep)]


def macro_auroc(y: np.ndarray, p: np.ndarray, classes: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(np.mean([roc_auc_score(y[:, c], p[:, c]) for c in classes]))


def finetune(dx: Path, shards: Path, run: Path, init: str, preset: str, seed: int, args) -> Path:
    from training.loop import train
    from training.run_config import load_config
    from training.tasks.diagnosis import DiagnosisTask

    cfg = load_config(
        "diagnosis",
        [
            f"model.preset={preset}",
            f"data.shards={shards}",
            f"out={run}",
            f"finetune.init={init}",
            f"seed={seed}",
            "data.batch_size=32",
            "data.num_workers=0",
            "data.normalize=zscore",
            f"precision={args.precision}",
            f"optim.lr={args.ft_lr}",
            f"optim.max_update={args.ft_updates}",
            "optim.max_epoch=0",
            "logging.wandb_mode=disabled",
            "logging.log_interval=1000",
        ],
    )
    train(cfg, DiagnosisTask(cfg))
    return run / "checkpoint_last.pt"


def test_auroc(dx: Path, ckpt: Path, classes: np.ndarray, precision: str) -> float:
    """Record-level macro AUROC of a diagnosis checkpoint on the dx store's test split."""
    from ecgplat.store import open_store
    from training.batch import store_batches
    from training.cinc_metrics import aggregate_records
    from training.evaluate_diagnosis import predict
    from training.models.classifier import load_diagnosis_model
    from training.normalize import mode_of, normalize_store_batches

    model, meta = load_diagnosis_model(ckpt)
    st = open_store(dx)
    records = st.select(split="test")
    batches = normalize_store_batches(st, store_batches(st, records), mode_of(meta))
    pred = predict(model, batches, precision)
    _, p, y = aggregate_records(pred.probabilities, pred.record_index, pred.labels)
    return macro_auroc(y, p, classes)


def linear_probe(dx: Path, ckpt: Path, name: str, classes: np.ndarray, precision: str) -> float:
    """Logistic regression per class on frozen pooled record embeddings (train -> test)."""
    from sklearn.linear_model import LogisticRegression

    from ecgplat.store import open_store
    from retrieval.embed import embed_store
    from retrieval.features import load_features

    embed_store(dx, ckpt, name, precision=precision, overwrite=True)
    feats = load_features(dx, name, "record")
    st = open_store(dx)
    split = st.records["split"].to_numpy()[feats.record_index]
    y = st.labels[feats.record_index]
    x = feats.embeddings
    tr, te = split == "train", split == "test"
    p = np.zeros((int(te.sum()), y.shape[1]))
    for c in classes:
        clf = LogisticRegression(C=1.0, max_iter=2000).fit(x[tr], y[tr, c])
        p[:, c] = clf.predict_proba(x[te])[:, 1]
    return macro_auroc(y[te], p, classes)


def mean_sd(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {
        "values": v.tolist(),
        "mean": float(v.mean()),
        "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
    }


# --------------------------------------------------------------------------- report


def table(res: dict) -> str:
    pt, ident, dx = res["pretraining"], res["identification"], res["diagnosis"]

    def cell(d) -> str:
        return f"{d['mean']:.3f} ± {d['sd']:.3f}" if isinstance(d, dict) else f"{d:.3f}"

    rows = [
        ("identification record Rank-1", "rank1", "record"),
        ("identification record Rank-5", "rank5", "record"),
        ("identification record mAP", "mAP", "record"),
        ("identification segment Rank-1", "rank1", "segment"),
    ]
    lines = [
        f"preset `{pt['preset']}`, {pt['num_updates']} updates of 8 pairs, "
        f"{pt['hours']:.2f} h, precision {pt['precision']}, CPU flags: "
        f"{', '.join(res['cpu']['flags'])}",
        "",
        "| metric | pretrained | random init (mean ± SD over seeds) | chance |",
        "|---|---|---|---|",
    ]
    for label, key, level in rows:
        rnd = mean_sd([r[level][key] for r in ident["random"]])
        chance = ident["pretrained"][level]["chance_rank1"] if key == "rank1" else None
        chance = "–" if chance is None else f"{chance:.3f}"
        lines.append(
            f"| {label} | {ident['pretrained'][level][key]:.3f} | {cell(rnd)} | {chance} |"
        )
    lines.append(
        f"| diagnosis fine-tune macro AUROC | {cell(dx['finetune']['pretrained'])} | "
        f"{cell(dx['finetune']['random'])} | 0.5 |"
    )
    lines.append(
        f"| diagnosis linear probe macro AUROC | {cell(dx['probe']['pretrained'])} | "
        f"{cell(dx['probe']['random'])} | 0.5 |"
    )
    lines.append(
        f"| mean pairwise cosine of pooled embeddings | "
        f"{ident['pretrained']['mean_pairwise_cosine']:.3f} | "
        f"{cell(mean_sd([r['mean_pairwise_cosine'] for r in ident['random']]))} | |"
    )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def prepare(args, out: Path) -> dict:
    from ingestion.shards import write_shards

    data = {"pool": ingest_all(args.data, out / "pool.zarr", CORPORA)}
    dx_corpora = [c for c in CORPORA if c[0] in DX_CORPORA]
    data["dx"] = ingest_all(args.data, out / "dx.zarr", dx_corpora)
    dx_split(out / "dx.zarr", args.dx_test, seed=0)
    data["split"] = pool_split(out / "pool.zarr", out / "dx.zarr")
    write_shards(out / "pool.zarr", "train", out / "pool_shards")
    write_shards(out / "dx.zarr", "train", out / "dx_shards")
    log(f"splits: {data['split']}")
    return data


def pretrain(args, out: Path, data: dict) -> tuple[Path, dict]:
    from training.precision import resolve_precision

    shards = out / "pool_shards"
    precision = resolve_precision(args.precision, "cpu")
    presets = args.presets.split(",")
    timings = {}
    if len(presets) > 1 and not args.updates:
        preset, timings = pick_preset(
            shards, presets, args.precision, args.minutes * 60, args.min_updates
        )
    else:
        preset = presets[-1]
    log(f"pretraining {preset} ({precision}) for {args.updates or f'{args.minutes} min'}")
    run = out / "pretrain_run"
    info = run_pretraining(shards, run, preset, args.precision, args)
    extra = {"data": data, "step_seconds": timings, **info}
    ckpt, record = export_pretrained(run, out, args.data, extra)
    chance = math.log2(record["config"]["criterion"]["num_negatives"] + 1)
    cmsc_chance = math.log2(record["config"]["data"]["batch_size"])  # P x P logits
    plot_loss(run, out / "pretrain_loss.png", chance, cmsc_chance)
    summary = {
        "preset": preset,
        "precision": precision,
        "num_updates": record["num_updates"],
        "hours": info["hours"],
        "step_seconds_measured": timings,
        "sha256": record["sha256"],
        "checkpoint_bytes": record["bytes"],
        "first_log": record["first_log"],
        "last_log": record["last_log"],
        "infonce_chance_bits": chance,
        "cmsc_chance_bits": cmsc_chance,
    }
    return ckpt, summary


def evaluate(args, out: Path, ckpt: Path, preset: str) -> tuple[dict, dict]:
    pool, dx = out / "pool.zarr", out / "dx.zarr"
    seeds = range(args.seeds)
    randoms = [
        random_checkpoint(out / f"random_{preset}_seed{s}.pt", preset, s, args.precision)
        for s in seeds
    ]
    ident = {"pretrained": identification(pool, ckpt, "pretrained", args.precision)}
    ident["random"] = [
        identification(pool, r, f"random{s}", args.precision)
        for s, r in zip(seeds, randoms, strict=True)
    ]
    log(f"identification: {json.dumps(ident['pretrained']['record'])}")
    classes, names = eligible_classes(dx)
    if len(classes) == 0:
        raise SystemExit(f"{dx}: no class has {MIN_POSITIVES} test positives")
    ft = {"pretrained": [], "random": []}
    for s in seeds:
        for arm, init in (("pretrained", str(ckpt)), ("random", "none")):
            run = finetune(dx, out / "dx_shards", out / f"ft_{arm}{s}", init, preset, s, args)
            ft[arm].append(test_auroc(dx, run, classes, args.precision))
        log(
            f"fine-tune seed {s}: pretrained {ft['pretrained'][-1]:.3f} "
            f"random {ft['random'][-1]:.3f}"
        )
    probe = {
        "pretrained": linear_probe(dx, ckpt, "pretrained", classes, args.precision),
        "random": mean_sd(
            [
                linear_probe(dx, r, f"random{s}", classes, args.precision)
                for s, r in zip(seeds, randoms, strict=True)
            ]
        ),
    }
    gaps = np.subtract(ft["pretrained"], ft["random"])
    dx_res = {
        "classes": names,
        "finetune": {k: mean_sd(v) for k, v in ft.items()},
        "finetune_gaps": gaps.tolist(),
        "probe": probe,
        "finetune_updates": args.ft_updates,
        "finetune_lr": args.ft_lr,
    }
    return ident, dx_res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="folder holding the corpora")
    ap.add_argument("--out", type=Path, required=True, help="output folder (created)")
    ap.add_argument("--minutes", type=float, default=30.0, help="pretraining budget")
    ap.add_argument("--updates", type=int, default=0, help="fixed pretraining updates (tests)")
    ap.add_argument("--presets", default="small,tiny", help="candidates, largest first")
    ap.add_argument("--min-updates", type=int, default=1000)
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--dx-test", type=float, default=0.35, help="diagnosis test fraction")
    ap.add_argument("--seeds", type=int, default=3, help="fine-tune and random-init seeds")
    ap.add_argument("--ft-updates", type=int, default=100)
    ap.add_argument("--ft-lr", type=float, default=1e-3)
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        raise SystemExit(f"error: --data {args.data}: not a directory")
    args.out.mkdir(parents=True, exist_ok=True)
    if any(args.out.iterdir()):
        raise SystemExit(f"error: --out {args.out}: not empty")
    t0 = time.time()
    data = prepare(args, args.out)
    ckpt, pt = pretrain(args, args.out, data)
    ident, dx = evaluate(args, args.out, ckpt, pt["preset"])
    res = {
        "data": data,
        "pretraining": pt,
        "identification": ident,
        "diagnosis": dx,
        "cpu": cpu_info(),
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "total_hours": (time.time() - t0) / 3600,
    }
    write_json(args.out / "results.json", relative_paths(res, (args.out, args.data)), default=str)
    (args.out / "table.md").write_text(table(res))
    print(table(res))


if __name__ == "__main__":
    main()
