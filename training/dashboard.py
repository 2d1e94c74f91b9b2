"""W&B dashboards of fine-tuning and evaluation: per-class tables, ROC, PR, calibration and
scatter charts, the confusion matrix, and the checkpoint as an artifact with its lineage.

`evaluation_media(task, y, scores, prefix)` turns one level of one evaluation (any task kind:
`training.tasks.heads`) into W&B objects keyed ``<prefix><name>``:

* binary / multilabel: ``per_class`` (support, AUROC, AUPRC, sensitivity, specificity, F1 at
  the task's thresholds, threshold, and the confusion counts TP/FP/FN/TN), ``roc``, ``pr`` and
  ``calibration`` charts (one line per class; calibration: the observed frequency of each of
  ten equal-width probability bins against its mean probability), ``confusion`` (the 2 x 2
  matrix of each class, as a table; a binary task also as a W&B confusion-matrix chart);
* multiclass: ``per_class``, one-vs-rest ``roc`` and ``pr``, ``calibration`` of the top-class
  confidence, ``confusion`` (W&B's confusion-matrix chart of true class vs the argmax);
* regression: ``per_target`` (MAE, RMSE, R², Pearson r) and one ``scatter_<target>`` chart of
  predicted against true values.

Charts are W&B tables drawn by W&B's stock Vega presets (``wandb.plot_table``); curves keep at
most `CURVE_POINTS` of their points per class. Metrics come from `training.task_metrics`, curves
from `training.cinc_metrics`. Only class names and numbers go in, never a record key; the
`Tracker` drops any key that looks like a patient key as well.

`checkpoint_lineage(...)` describes a checkpoint and where its data came from (the store's
uuid and counts, the shards' export, the init checkpoint's SHA-256, a feature set's lineage
without paths), and `log_checkpoint(tracker, ...)` logs it as a W&B artifact of type
``model``: a reference to the file (``file://``, checksummed, not copied: an identification
checkpoint's class map holds the training patients' pseudonyms, which must not reach W&B) with
the lineage as the artifact's metadata. W&B records "used" artifacts (the lineage graph) only
online; offline runs, the default, carry the lineage in that metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ecgplat.file_hash import file_sha256
from ecgplat.shard_format import read_info

CURVE_POINTS = 200  # per class and curve: 26 classes stay under W&B's 10,000 table rows
SCATTER_POINTS = 5000
AUC_CHART = "wandb/area-under-curve/v0"
LINE_CHART = "wandb/line/v0"


def _wandb():
    import wandb

    return wandb


def _thin(*arrays: np.ndarray, points: int = CURVE_POINTS) -> list[np.ndarray]:
    """At most `points` evenly spaced entries of each array (first and last kept)."""
    n = len(arrays[0])
    if n <= points:
        return list(arrays)
    keep = np.unique(np.linspace(0, n - 1, points).round().astype(int))
    return [a[keep] for a in arrays]


def _num(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and not np.isfinite(v)) else float(v)


def _curve_chart(rows: list, x: str, y: str, title: str, x_title: str, y_title: str):
    wandb = _wandb()
    table = wandb.Table(columns=["class", x, y], data=rows)
    return wandb.plot_table(
        AUC_CHART,
        table,
        {"x": x, "y": y, "class": "class"},
        {"title": title, "x-axis-title": x_title, "y-axis-title": y_title},
    )


def _curves(yb: np.ndarray, p: np.ndarray, classes: list[str], title: str) -> dict[str, Any]:
    """ROC and PR charts, one line per class with both label values."""
    from training.cinc_metrics import pr_curve, roc_curve

    roc, pr = [], []
    for k, name in enumerate(classes):
        fpr, tpr = roc_curve(yb[:, k], p[:, k])
        roc += [[name, float(a), float(b)] for a, b in zip(*_thin(fpr, tpr), strict=True)]
        rec, prec = pr_curve(yb[:, k], p[:, k])
        pr += [[name, float(a), float(b)] for a, b in zip(*_thin(rec, prec), strict=True)]
    return {
        "roc": _curve_chart(roc, "fpr", "tpr", f"ROC, {title}", "1 - specificity", "sensitivity"),
        "pr": _curve_chart(pr, "recall", "precision", f"PR, {title}", "recall", "precision"),
    }


def _calibration(yb: np.ndarray, p: np.ndarray, classes: list[str], title: str, top: bool):
    """Reliability chart: each class's bins (or, `top`, the top-class confidence's)."""
    from training.task_metrics import expected_calibration_error

    wandb = _wandb()
    series = (
        [("top class", p.argmax(1) == yb.argmax(1), p.max(1))]
        if top
        else [(name, yb[:, k], p[:, k]) for k, name in enumerate(classes)]
    )
    rows = []
    for name, hit, conf in series:
        _, curve = expected_calibration_error(hit, conf)
        for c, f, n in zip(curve["confidence"], curve["frequency"], curve["count"], strict=True):
            if n:
                rows.append([name, float(c), float(f), int(n)])
    rows += [["ideal", 0.0, 0.0, 0], ["ideal", 1.0, 1.0, 0]]
    table = wandb.Table(columns=["class", "mean_probability", "observed_frequency", "n"], data=rows)
    return wandb.plot_table(
        LINE_CHART,
        table,
        {"x": "mean_probability", "y": "observed_frequency", "stroke": "class"},
        {"title": f"calibration, {title}"},
    )


def _classification(task: dict, y: np.ndarray, p: np.ndarray, title: str) -> dict[str, Any]:
    from training.task_metrics import classification_metrics

    wandb = _wandb()
    kind, classes = task["kind"], list(task["classes"])
    report = classification_metrics(kind, y, p, task.get("thresholds"), classes)
    if kind == "multiclass":
        idx = np.asarray(y, dtype=np.int64).reshape(-1)
        yb = np.zeros_like(p, dtype=bool)
        yb[np.arange(len(idx)), idx] = True
        pred = p.argmax(1)
    else:
        yb = np.asarray(y, dtype=bool).reshape(p.shape)
        t = np.asarray(task.get("thresholds") or [0.5] * p.shape[1], dtype=np.float64)
        predb = p >= t[None, :]
    columns = ["class", "support", "auroc", "auprc", "sensitivity", "specificity", "f1"]
    if kind != "multiclass":
        columns += ["threshold", "tp", "fp", "fn", "tn"]
    rows = []
    for k, row in enumerate(report["per_class"]):
        values = [row["class"], row["support"]] + [_num(row[c]) for c in columns[2:7]]
        if kind != "multiclass":
            counts = [
                int((yb[:, k] & predb[:, k]).sum()),
                int((~yb[:, k] & predb[:, k]).sum()),
                int((yb[:, k] & ~predb[:, k]).sum()),
                int((~yb[:, k] & ~predb[:, k]).sum()),
            ]
            values += [row["threshold"], *counts]
        rows.append(values)
    media: dict[str, Any] = {"per_class": wandb.Table(columns=columns, data=rows)}
    media.update(_curves(yb, p, classes, title))
    media["calibration"] = _calibration(yb, p, classes, title, top=kind == "multiclass")
    if kind == "multiclass":
        media["confusion"] = wandb.plot.confusion_matrix(
            y_true=idx.tolist(), preds=pred.tolist(), class_names=classes, title=title
        )
    else:
        media["confusion"] = wandb.Table(
            columns=["class", "tp", "fp", "fn", "tn"], data=[[r[0], *r[-4:]] for r in rows]
        )
        if kind == "binary":
            media["confusion_matrix"] = wandb.plot.confusion_matrix(
                y_true=yb[:, 0].astype(int).tolist(),
                preds=predb[:, 0].astype(int).tolist(),
                class_names=[f"not {classes[0]}", classes[0]],
                title=title,
            )
    return media


def _regression(task: dict, y: np.ndarray, v: np.ndarray, title: str) -> dict[str, Any]:
    from training.task_metrics import regression_metrics

    wandb = _wandb()
    targets = list(task["classes"])
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    v = np.asarray(v, dtype=np.float64).reshape(y.shape)
    report = regression_metrics(y, v, targets)
    cols = ["target", "mae", "rmse", "r2", "pearson_r"]
    media: dict[str, Any] = {
        "per_target": wandb.Table(
            columns=[*cols, "n"],
            data=[
                [r["target"], *(_num(r[c]) for c in cols[1:]), len(y)] for r in report["per_target"]
            ],
        )
    }
    for k, name in enumerate(targets):
        ok = np.isfinite(y[:, k]) & np.isfinite(v[:, k])
        true, pred = _thin(y[ok, k], v[ok, k], points=SCATTER_POINTS)
        table = wandb.Table(
            columns=["true", "predicted"],
            data=[[float(a), float(b)] for a, b in zip(true, pred, strict=True)],
        )
        media[f"scatter_{name}"] = wandb.plot.scatter(
            table, "true", "predicted", title=f"{name}: predicted vs true, {title}"
        )
    return media


def evaluation_media(
    task: dict, y: np.ndarray, scores: np.ndarray, prefix: str = "", title: str = ""
) -> dict[str, Any]:
    """The W&B objects of one evaluation level (module docstring). `y`: binary/multilabel
    (N, C) 0/1, multiclass (N,) class index, regression (N, C) values; `scores`: (N, C)
    probabilities or predicted values."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) == 0:
        return {}
    title = title or task["name"]
    if task["kind"] == "regression":
        media = _regression(task, y, scores, title)
    else:
        media = _classification(task, y, scores, title)
    return {f"{prefix}{k}": v for k, v in media.items()}


def image_media(paths: dict[str, Path], prefix: str = "") -> dict[str, Any]:
    """The evaluation's PNG plots (those that exist) as W&B images."""
    wandb = _wandb()
    return {f"{prefix}{k}": wandb.Image(str(p)) for k, p in paths.items() if Path(p).is_file()}


# --------------------------------------------------------------------------- lineage


_FEATURE_KEYS = (
    "name",
    "checkpoint_sha256",
    "checkpoint_kind",
    "leads",
    "precision",
    "normalize",
    "filters",
    "dim",
    "store_uuid",
    "n_records",
    "n_segments",
    "created",
)


def store_lineage(store) -> dict[str, Any]:
    """A store's identity: uuid, committed counts, split and forget generations, folder name
    (`store`: a path or an open `EcgStore`)."""
    from ecgplat.store import open_store

    st = open_store(store) if isinstance(store, (str, Path)) else store
    attrs = st.attrs
    return {
        "store_uuid": attrs.get("store_uuid"),
        "name": Path(str(st.path)).name,
        "n_records": int(st.n_records),
        "n_segments": int(st.n_segments),
        "schema_version": attrs.get("schema_version"),
        "split_generation": st.split_generation,
        "forget_generation": int(st.forget_generation),
    }


def shards_lineage(shards: str | Path, split: str = "train") -> dict[str, Any] | None:
    """The store a shard export came from (its `_info.json`), without the store's path."""
    manifest = read_info(shards)
    if manifest is None:
        return None
    info = (manifest.get(split) or {}).copy()
    store = dict(info.get("store") or {})
    if "path" in store:
        store["name"] = Path(store.pop("path")).name
    return {
        "split": split,
        "samples": info.get("samples"),
        "segments": info.get("segments"),
        "created": info.get("created"),
        "store": store,
    }


def features_lineage(lineage: dict) -> dict[str, Any]:
    """A feature set's lineage without paths or the run config."""
    return {k: lineage[k] for k in _FEATURE_KEYS if k in lineage}


def checkpoint_lineage(
    checkpoint: str | Path,
    *,
    store: dict | None = None,
    shards: dict | None = None,
    features: dict | None = None,
    init: str | Path | None = None,
) -> dict[str, Any]:
    """What the model artifact of `checkpoint` says about itself and its data."""
    from training.models.checkpoint_file import load_checkpoint_hashed

    checkpoint = Path(checkpoint)
    ckpt, sha = load_checkpoint_hashed(checkpoint)
    task = ckpt.get("task")
    meta: dict[str, Any] = {
        "checkpoint_sha256": sha,
        "kind": ckpt["kind"],
        "num_updates": int(ckpt.get("num_updates") or 0),
        "encoder": {
            k: ckpt["encoder_config"].get(k) for k in ("encoder_embed_dim", "encoder_layers")
        },
        "task": None
        if task is None
        else {k: task.get(k) for k in ("name", "kind")}
        | {"n_outputs": len(task.get("classes") or [])},
        "trained_leads": (ckpt.get("extra") or {}).get("leads"),
    }
    init_path = Path(str(init)) if init and str(init).lower() != "none" else None
    if init_path is not None and init_path.is_file():
        meta["init_checkpoint_sha256"] = file_sha256(init_path)
    for key, value in (("store", store), ("shards", shards), ("features", features)):
        if value:
            meta[key] = value
    return meta


def log_checkpoint(tracker, checkpoint: str | Path, lineage: dict, alias: str = "latest") -> None:
    """Log `checkpoint` as a W&B model artifact (a checksummed file reference) whose metadata
    is `lineage`; nothing when the tracker has no W&B run."""
    checkpoint = Path(checkpoint).resolve()
    name = f"{lineage['kind']}-{lineage['checkpoint_sha256'][:16]}"
    tracker.log_artifact(
        name,
        "model",
        lineage,
        references={checkpoint.name: checkpoint.as_uri()},
        aliases=[alias],
    )


def identification_media(results: dict[str, dict], curves: dict[str, np.ndarray]) -> dict:
    """Identification evaluation: ``identification`` (a row per level: Rank-1/5/10, mAP,
    chance, counts) and the ``cmc`` chart (identification rate by rank, ranks 1-20)."""
    wandb = _wandb()
    cols = ["rank1", "rank1_ci95", "rank5", "rank10", "mAP", "chance_rank1", "n_gallery",
            "n_probe", "n_probe_evaluated"]  # fmt: skip
    table = wandb.Table(
        columns=["level", *cols],
        data=[[level, *(_num(r.get(c)) for c in cols)] for level, r in results.items()],
    )
    rows = [[level, float(k + 1), float(v)] for level, c in curves.items() for k, v in
            enumerate(np.asarray(c)[:20])]  # fmt: skip
    cmc = wandb.plot_table(
        LINE_CHART,
        wandb.Table(columns=["level", "rank", "rate"], data=rows),
        {"x": "rank", "y": "rate", "stroke": "level"},
        {"title": "CMC (gallery/probe)"},
    )
    return {"identification": table, "cmc": cmc}


def log_evaluation(
    out_dir: str | Path,
    *,
    mode: str,
    name: str,
    config: dict,
    metrics: dict[str, float],
    levels: list[tuple[str, dict, np.ndarray, np.ndarray]],
    images: dict[str, Path],
    checkpoint: str | Path | None = None,
    lineage: dict | None = None,
    media: dict | None = None,
) -> None:
    """One evaluation's W&B run in `out_dir` (and its metrics.jsonl): the scalar `metrics`,
    `evaluation_media` of each (prefix, task, y, scores) in `levels`, other `media`, the PNG
    `images` and the checkpoint artifact with `lineage` (`checkpoint_lineage`'s keywords)."""
    from ecgplat.tracking import Tracker

    with Tracker(
        out_dir,
        config=config,
        mode=mode,
        name=name,
        job_type="evaluate",
        resume=True,
        console=False,
    ) as tracker:
        tracker.log(metrics)
        tracker.summary(metrics)
        for prefix, task, y, scores in levels:
            tracker.log_media(evaluation_media(task, y, scores, prefix))
        tracker.log_media({**(media or {}), **image_media(images)})
        if checkpoint is not None and tracker.wandb_run is not None:
            log_checkpoint(tracker, checkpoint, checkpoint_lineage(checkpoint, **(lineage or {})))


def log_training_run(tracker, task, cfg, step: int) -> None:
    """The end of a training run (rank 0, W&B on): the last validation's record-level
    dashboard (a task with a head that kept ``last_validation``) under ``valid/record/``, and
    the best checkpoint (else the last) as the model artifact with the lineage of its shards'
    store, its store (``data.store``) and its init checkpoint."""
    run_dir = Path(cfg.out)
    head = task.checkpoint_task()
    last = getattr(task, "last_validation", None)
    if head is not None and last is not None:
        y, scores = last
        if head["kind"] == "multiclass":
            y = np.asarray(y).reshape(len(y), -1)[:, 0].round().astype(np.int64)
        elif head["kind"] != "regression":
            y = np.asarray(y) > 0.5
        tracker.log_media(evaluation_media(head, y, scores, "valid/record/"), step=step)
    checkpoint = run_dir / "checkpoint_best.pt"
    if not checkpoint.is_file():
        checkpoint = run_dir / "checkpoint_last.pt"
    if not checkpoint.is_file():
        return
    store = None
    if getattr(cfg.data, "store", None) and "://" not in str(cfg.data.store):
        store = store_lineage(cfg.data.store)
    lineage = checkpoint_lineage(
        checkpoint,
        store=store,
        shards=shards_lineage(cfg.data.shards, cfg.data.train_split),
        init=None if task.name == "pretrain" else cfg.finetune.init,
    )
    log_checkpoint(tracker, checkpoint, lineage, alias=checkpoint.stem.replace("checkpoint_", ""))
