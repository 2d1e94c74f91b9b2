"""`make demo`: the whole pipeline end to end on the data bundled in the repository.

Every step is the public command a user would type (printed before it runs), so the demo
doubles as a walk-through of the CLI:

1. `ecgplat synth` writes a small synthetic cohort (patients with several records each);
2. `ecgplat ingest` puts the bundled real samples (PhysioNet/CinC 2021, PTB-XL, CPSC 2021)
   and the cohort into one Zarr feature store with a Dask LocalCluster, `ecgplat info` prints it;
3. `ecgplat split` assigns record-level splits and the identification gallery/probe;
4. `ecgplat shards` exports WebDataset shards;
5. `ecgplat train pretrain` pretrains a `tiny` W2V+CMSC+RLM encoder (the loss goes down);
6. `ecgplat train diagnosis` fine-tunes it, and a random-init baseline, on the 26 classes;
   `ecgplat evaluate diagnosis` prints both evaluations;
7. `ecgplat train identify` fine-tunes it with ArcFace, `ecgplat embed` writes embeddings into
   the store, `ecgplat index build` builds the FAISS gallery, `ecgplat evaluate identify`
   reports Rank-1/mAP, and `ecgplat query` answers one query with a plot.

Outputs go to `demo_out/` (override with ECGPLAT_DEMO_OUT); a re-run starts afresh.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ecgplat.tracking import read_metrics

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"


def run(*args: str) -> None:
    """Run one `ecgplat` command, echoing it first; its output streams through."""
    cmd = [sys.executable, "-m", "ecgplat", *args]
    print(f"\n$ ecgplat {shlex.join(args)}", flush=True)
    t0 = time.time()
    env = {**os.environ, "COLUMNS": os.environ.get("COLUMNS", "120")}
    code = subprocess.run(cmd, check=False, env=env).returncode
    if code != 0:
        raise SystemExit(f"demo step failed (exit {code}): ecgplat {shlex.join(args)}")
    print(f"[{time.time() - t0:.1f} s]", flush=True)


def loss_curve(run_dir: Path, key: str = "loss", points: int = 6) -> str:
    """A few evenly spaced training-loss values from the run's metrics.jsonl."""
    rows = [r for r in read_metrics(run_dir, key) if r.get("phase", "train") == "train"]
    if not rows:
        return "(no training rows logged)"
    step = max(1, (len(rows) - 1) // (points - 1))
    picked = rows[::step][: points - 1] + [rows[-1]]
    return "  ".join(f"{r.get('update', '?')}:{r[key]:.3f}" for r in picked)


def main() -> None:
    out = Path(os.environ.get("ECGPLAT_DEMO_OUT", REPO / "demo_out"))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.time()
    store, shards, cohort = out / "store.zarr", out / "shards", out / "cohort"
    wandb = "logging.wandb_mode=offline"

    print("== 1. data: bundled real samples + a synthetic cohort -> Zarr feature store -> shards")
    run("synth", str(cohort), "--patients", "60", "--records-per-patient", "3", "--seed", "7")
    for corpus, src in (
        ("cinc2021", SAMPLES / "cinc2021"),
        ("ptbxl", SAMPLES / "ptbxl"),
        ("cpsc2021", SAMPLES / "cpsc2021"),
        ("cinc2021", cohort),
    ):
        run("ingest", corpus, str(src), "--store", str(store), "--workers", "2", "--no-progress")
    run(
        "split",
        str(store),
        "--mode",
        "random",
        "--valid",
        "0.15",
        "--test",
        "0.3",
        "--seed",
        "1",
        "--ident",
        "--ident-within",
        "test",
    )
    run("info", str(store))
    for split in ("train", "valid"):
        run("shards", str(store), "--split", split, "--out", str(shards), "--no-progress")

    print("\n== 2. pretraining: W2V + CMSC + RLM, tiny preset")
    pre = out / "runs" / "pretrain"
    run(
        "train",
        "pretrain",
        "--config",
        "w2v_cmsc_rlm",
        "--shards",
        str(shards),
        "--out",
        str(pre),
        "model.preset=tiny",
        "data.batch_size=8",
        "optim.update_freq=1",
        "optim.lr=2e-3",
        "optim.max_update=150",
        "optim.max_epoch=0",
        "data.num_workers=0",
        "logging.log_interval=25",
        wandb,
    )
    print(f"pretraining loss (update:bits): {loss_curve(pre)}")

    print("\n== 3. arrhythmia classification (26 CinC 2021 classes), pretrained vs random init")
    results = {}
    for name, init in (("pretrained", str(pre / "checkpoint_last.pt")), ("random-init", "none")):
        run_dir = out / "runs" / f"diagnosis_{name}"
        run(
            "train",
            "diagnosis",
            "--init",
            init,
            "--shards",
            str(shards),
            "--store",
            str(store),
            "--out",
            str(run_dir),
            "model.preset=tiny",
            "data.batch_size=16",
            "optim.lr=1e-3",
            "optim.max_update=60",
            "optim.max_epoch=0",
            "model.feature_grad_mult=1.0",
            "checkpoint.best_metric=auroc_macro",
            "checkpoint.patience=-1",
            "data.num_workers=0",
            "logging.log_interval=20",
            wandb,
        )
        run(
            "evaluate",
            "diagnosis",
            "--checkpoint",
            str(run_dir / "checkpoint_best.pt"),
            "--store",
            str(store),
            "--split",
            "test",
            "--out",
            str(run_dir / "eval"),
        )
        results[name] = json.loads((run_dir / "eval" / "metrics.json").read_text())
    print("\ntest split, record level: pretrained vs random init (same updates)")
    keys = ("challenge_score", "auroc_macro", "auroc_micro", "auprc_macro", "f1_macro")
    print(f"{'':12s}" + "".join(f"{k:>17s}" for k in keys))
    for name, metrics in results.items():
        rec = metrics["results"]["12"]["record"]
        print(
            f"{name:12s}"
            + "".join(f"{rec[k]:17.4f}" if rec[k] is not None else f"{'n/a':>17s}" for k in keys)
        )
    print(
        "(150 pretraining updates leave the InfoNCE term at chance and the test split is small,\n"
        " so this order is not stable; docs/results.md 'Does pretraining help?' compares them at"
        " 1000"
        " updates)"
    )
    run(
        "evaluate",
        "diagnosis",
        "--checkpoint",
        str(out / "runs" / "diagnosis_pretrained" / "checkpoint_best.pt"),
        "--store",
        str(store),
        "--split",
        "test",
        "--leads",
        "all",
        "--out",
        str(out / "runs" / "diagnosis_leads"),
    )

    print("\n== 4. patient identification: ArcFace, embeddings in the store, FAISS gallery/probe")
    ident = out / "runs" / "identify"
    run(
        "train",
        "identify",
        "--init",
        str(pre / "checkpoint_last.pt"),
        "--shards",
        str(shards),
        "--store",
        str(store),
        "--out",
        str(ident),
        "model.preset=tiny",
        "data.batch_size=32",
        "optim.lr=1e-3",
        "optim.max_update=120",
        "optim.max_epoch=0",
        "model.feature_grad_mult=1.0",
        "checkpoint.patience=-1",
        "data.num_workers=0",
        "logging.log_interval=20",
        wandb,
    )
    run(
        "embed",
        "--checkpoint",
        str(ident / "checkpoint_last.pt"),
        "--store",
        str(store),
        "--name",
        "arcface_tiny",
    )
    run(
        "index",
        "build",
        "--store",
        str(store),
        "--features",
        "arcface_tiny",
        "--split",
        "gallery",
        "--out",
        str(out / "gallery"),
    )
    run(
        "evaluate",
        "identify",
        "--store",
        str(store),
        "--features",
        "arcface_tiny",
        "--plot",
        str(out / "cmc.png"),
    )
    probe = _first_probe(store)
    run(
        "query",
        "--index",
        str(out / "gallery"),
        "--record",
        probe,
        "--k",
        "5",
        "--plot",
        str(out / "query.png"),
    )
    print(f"\ndemo finished in {time.time() - t0:.0f} s; outputs in {out}")


def _first_probe(store_path: Path) -> str:
    from ecgplat.store import open_store

    store = open_store(store_path)
    idx = store.select(ident_split="probe")
    return str(store.records.loc[idx[0], "record_key"])


if __name__ == "__main__":
    main()
