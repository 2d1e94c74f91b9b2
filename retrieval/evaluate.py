"""Identification evaluation on a store's gallery/probe split (`ident_split`), from stored features.

For each level (`record`: one embedding per record; `segment`: one per 5 s segment, the original's
unit) every probe is scored against the whole gallery (inner product of unit vectors = cosine,
the paper's rule: docs/method.md §6.2), and a probe's match is correct when the gallery item has
the probe's patient key. Reported per level: Rank-1/5/10, exact mAP over the gallery items of the
probe's patient, and the gallery/probe sizes; optionally a CMC plot. Above `max_probes` probes a
seeded uniform sample of that many is evaluated (with the sampling error of Rank-1), so the cost
is linear in the gallery instead of quadratic in the store.

Lead-subset evaluation uses embeddings computed with the subset: when the requested leads differ
from the feature set's, the set's checkpoint is re-run with those leads into `<name>@<leads>`
(same checkpoint, verified by its SHA-256), which later runs reuse.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ecgplat.store import open_store
from retrieval.embed import embed_store
from retrieval.features import (
    FeatureError,
    FeatureSet,
    StoredFeatures,
    lead_names,
    open_features,
)
from retrieval.figures import pyplot, save_figure
from retrieval.model import LoadedModel
from training.ident_metrics import chance_rank1, rank1_band, rank_statistics, ranks_from_cmc

PROBE_CHUNK = 1024
MAX_PROBES = 20_000  # per level; 0 = every probe
CMC_DEPTH = 20  # ranks kept of the CMC curve (the plot's)


def subset_features(
    store_path, name: str, leads, progress: bool = False, precision: str | None = None
) -> str:
    """The feature set of `name`'s checkpoint with `leads` (computed once into `name@leads`),
    embedded in `precision` (default: the precision `name` was embedded in)."""
    lineage = open_features(store_path, name, "record").lineage
    wanted = lead_names(leads)
    if lineage["leads"] == wanted:
        return name
    checkpoint = lineage.get("checkpoint")
    if not checkpoint or not Path(checkpoint).is_file():
        raise FeatureError(
            f"{store_path}: feature set {name!r} was embedded with leads "
            f"{lineage['leads']}; its checkpoint {checkpoint} is needed to embed "
            f"with {wanted} and is missing"
        )
    model = LoadedModel.load(checkpoint)  # one read: hashed here, then embedded with
    if model.sha256 != lineage["checkpoint_sha256"]:
        raise FeatureError(
            f"{checkpoint}: changed since feature set {name!r} was embedded "
            f"(SHA-256 differs); re-embed explicitly with `ecgplat embed`"
        )
    fs = FeatureSet.named(store_path, name)  # DIR/NAME: the variant is written beside it
    sub = f"{fs.name}@{wanted.replace(',', '-')}"
    precision = precision or lineage.get("precision", "fp32")
    embed_store(
        store_path,
        checkpoint,
        sub,
        leads=wanted,
        progress=progress,
        precision=precision,
        model=model,
        features_out=fs.folder,
    )
    return sub if fs.folder is None else f"{fs.folder}/{sub}"


def probe_sample(n_probe: int, max_probes: int, seed: int = 0) -> np.ndarray:
    """Ascending positions of the probes evaluated: all when `max_probes` is 0 or at least
    `n_probe`, else `max_probes` drawn uniformly without replacement with `seed`."""
    if max_probes < 0:
        raise ValueError(f"max_probes must be >= 0 (0 = all probes), got {max_probes}")
    if max_probes == 0 or max_probes >= n_probe:
        return np.arange(n_probe)
    return np.sort(np.random.default_rng(seed).choice(n_probe, size=max_probes, replace=False))


def evaluate_level(
    store,
    features: StoredFeatures,
    ks=(1, 5, 10),
    max_probes: int = MAX_PROBES,
    seed: int = 0,
    columns: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[dict, np.ndarray]:
    """Metrics and CMC curve of one feature level; `features` from `open_features`, `columns`
    the store's (ident_split, patient codes) when already read. The gallery embeddings are read
    from the store part by part (`rank_statistics`), so memory does not grow with the gallery;
    only the evaluated probes are held."""
    # two per-record columns, not the whole record table (features hold live records only)
    ident, patient = columns or (store.column("ident_split"), store.column_codes("patient_key")[0])
    is_gallery, is_probe = (ident == "gallery"), (ident == "probe")
    g = np.flatnonzero(is_gallery[features.record_index])
    p = np.flatnonzero(is_probe[features.record_index])
    if not len(g) or not len(p):
        raise FeatureError(f"{store.path}: no gallery/probe split (run `ecgplat split --ident`)")
    g_labels = patient[features.record_index[g]]
    p_labels = patient[features.record_index[p]]
    chosen = probe_sample(len(p), max_probes, seed)
    cmc, ap = rank_statistics(
        features.rows.take(g),
        features.rows.take(p[chosen])[:],
        g_labels,
        p_labels[chosen],
        depth=max(CMC_DEPTH, *ks),
        chunk=PROBE_CHUNK,
    )
    metrics = {f"rank{k}": v for k, v in ranks_from_cmc(cmc, ks).items()}
    metrics.update(
        {
            "mAP": float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"),
            "n_gallery": len(g),
            "n_probe": len(p),
            "n_probe_evaluated": len(chosen),
            "rank1_ci95": rank1_band(metrics["rank1"], len(chosen), len(p)),
            "chance_rank1": chance_rank1(g_labels, p_labels),
        }
    )
    return metrics, cmc


def plot_cmc(curves: dict[str, np.ndarray], out: str | os.PathLike, max_rank: int = 20) -> Path:
    fig, ax = pyplot().subplots(figsize=(5, 4))
    for level, cmc in curves.items():
        n = min(max_rank, len(cmc))
        ax.plot(np.arange(1, n + 1), cmc[:n], marker="o", ms=3, label=level)
    ax.set_xlabel("rank")
    ax.set_ylabel("identification rate")
    ax.set_ylim(0, 1.02)
    ax.set_title("CMC (gallery/probe)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, out, dpi=120)


def evaluate_identification(
    store_path,
    name: str,
    leads=None,
    plot: str | os.PathLike | None = None,
    progress: bool = False,
    precision: str | None = None,
    max_probes: int = MAX_PROBES,
    seed: int = 0,
    wandb_mode: str = "disabled",
    out: str | os.PathLike | None = None,
) -> dict:
    """{"record": {...}, "segment": {...}, "features": name used, "leads": ...} for feature set
    `name` (or its `leads` variant, embedded in `precision`, default `name`'s) on the store's
    gallery/probe split; each level evaluates at most `max_probes` probes (0: all), a uniform
    sample drawn with `seed`. With W&B on (`wandb_mode`), a W&B run in `out` gets the metrics,
    the table and CMC chart of `training.dashboard.identification_media`, the plot and the
    checkpoint artifact with the lineage of the store and the feature set."""
    probe_sample(0, max_probes)  # a bad budget fails before anything is embedded
    store = open_store(store_path)
    if leads is not None:
        name = subset_features(store_path, name, leads, progress=progress, precision=precision)
    result, curves = {}, {}
    columns = (store.column("ident_split"), store.column_codes("patient_key")[0])  # both levels
    for level in ("record", "segment"):
        feats = open_features(store_path, name, level)
        if feats.lineage.get("n_records") != store.n_records:
            raise FeatureError(
                f"{store_path}: feature set {name!r} covers "
                f"{feats.lineage.get('n_records')} records but the store now holds "
                f"{store.n_records}; re-run `ecgplat embed`"
            )
        result[level], curves[level] = evaluate_level(
            store, feats, max_probes=max_probes, seed=seed, columns=columns
        )
    lineage = feats.lineage
    result.update(
        {
            "features": name,
            "leads": lineage["leads"],
            "checkpoint_sha256": lineage["checkpoint_sha256"],
            "precision": lineage.get("precision", "fp32"),
        }
    )
    if plot is not None:
        result["cmc_plot"] = str(plot_cmc(curves, plot))
    if wandb_mode != "disabled":
        _log_dashboard(store, lineage, result, curves, wandb_mode, out)
    return result


def _log_dashboard(store, lineage: dict, result: dict, curves: dict, mode: str, out) -> None:
    from training.dashboard import (
        features_lineage,
        identification_media,
        log_evaluation,
        store_lineage,
    )

    if out is None:
        raise ValueError("a W&B run of the evaluation needs an output folder (--out)")
    levels = {k: result[k] for k in ("record", "segment")}
    checkpoint = Path(str(lineage.get("checkpoint", "")))
    log_evaluation(
        out,
        mode=mode,
        name=f"eval-identify-{result['features']}",
        config={"features": result["features"], "leads": result["leads"]},
        metrics={f"{lv}/{k}": v for lv, r in levels.items() for k, v in r.items()},
        levels=[],
        images={"cmc_png": Path(result["cmc_plot"])} if "cmc_plot" in result else {},
        media=identification_media(levels, curves),
        checkpoint=checkpoint if checkpoint.is_file() else None,
        lineage={"store": store_lineage(store), "features": features_lineage(lineage)},
    )
