"""CLI for patient identification and similar-ECG retrieval.

`ecgplat embed` (embeddings into the feature store; appends what a grown store lacks; splits the
work across `torchrun` ranks), `ecgplat index build` / `index update` (FAISS gallery index; add
newly embedded records), `ecgplat evaluate identify` (Rank-k / mAP on the gallery/probe split) and
`ecgplat query` (nearest gallery ECGs of a stored record or of a new WFDB file).
Patient keys are never printed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from ecgplat.cli.apps import app, check_device, check_output_path, evaluate_app, fail, index_app
from ecgplat.cli.options import (
    DeviceOption,
    EmbeddingsStoreOption,
    FeaturesOption,
    IdentSide,
    IndexOption,
    Level,
    Precision,
    PrecisionOption,
    WandbMode,
    json_option,
    precision_option,
    store_option,
)
from ecgplat.locks import StoreBusyError
from ecgplat.store.schema import is_url

_ERRORS = (FileNotFoundError, ValueError, KeyError, StoreBusyError)


def _message(exc: Exception) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


@app.command("embed")
def embed(
    checkpoint: Annotated[
        Path,
        typer.Option(
            help="Checkpoint whose encoder embeds the ECGs (any kind: pretrain, diagnosis, "
            "identify, imported)."
        ),
    ],
    store: Annotated[
        str,
        store_option(
            "Feature store to read the ECGs from and write the embeddings into (features/NAME), "
            "or its URL (s3://, http://: read-only, needs --features-out)."
        ),
    ],
    name: Annotated[str, typer.Option(help="Name of the feature set inside the store.")],
    features_out: Annotated[
        Path | None,
        typer.Option(
            "--features-out",
            help="Write the feature set to DIR/NAME, a local folder outside the store (for a "
            "store at a URL); other commands then take --features DIR/NAME.",
        ),
    ] = None,
    publish: Annotated[
        bool,
        typer.Option(
            "--publish",
            help="Then upload the set into the store at the URL (URL/features/NAME; needs a "
            "store URL and --features-out), where its readers take --features NAME.",
        ),
    ] = False,
    leads: Annotated[
        str,
        typer.Option(
            help="Leads fed to the encoder: preset 12/6/4/3/2/1 or a comma list such as I,II,V2; "
            "the others are zero rows."
        ),
    ] = "12",
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace an existing feature set of another checkpoint or lead set."
        ),
    ] = False,
    batch_size: Annotated[
        int | None,
        typer.Option(min=1, help="Segments per forward pass (default: sized to the model)."),
    ] = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = Precision.auto,
) -> None:
    """Embed every stored ECG (per 5 s segment and per record) with a checkpoint; on a grown
    store only the new records are embedded and appended; a killed run resumes."""
    from ecgplat.store import StoreBusyError
    from retrieval.embed import embed_store
    from training.models.checkpoint_file import CheckpointError

    if not checkpoint.is_file():
        fail(f"{checkpoint}: no such checkpoint file")
    check_device(device)
    if features_out is not None:
        check_output_path(features_out, "--features-out", directory=True)
    if publish and (features_out is None or not is_url(store)):
        fail("--publish uploads a set embedded from a store URL: give the URL and --features-out")
    try:
        result = embed_store(
            store,
            checkpoint,
            name,
            leads=leads,
            overwrite=overwrite,
            batch_size=batch_size,
            device=device,
            progress=True,
            precision=precision.value,
            features_out=features_out,
        )
    except (CheckpointError, StoreBusyError, *_ERRORS) as e:
        fail(_message(e))
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun rank 0 reports
    verb = "already up to date" if result["status"] == "unchanged" else "written"
    where = f"features/{name}" if features_out is None else str(features_out / name)
    typer.echo(
        f"{where}: {result['n_segments']} segments, {result['n_records']} records "
        f"({result['lineage']['leads']}) {verb}"
    )
    if publish and features_out is not None:
        from retrieval.feature_publish import publish_feature_set

        try:
            sent = publish_feature_set(store, features_out, name)
        except (OSError, ValueError, StoreBusyError) as e:
            fail(str(e))
        typer.echo(
            f"{sent['url']}: uploaded {sent['uploaded']} of {sent['files']} files "
            f"({sent['uploaded_bytes']} bytes), deleted {sent['deleted']}"
        )


@index_app.command("build")
def index_build(
    store: EmbeddingsStoreOption,
    features: FeaturesOption,
    out: Annotated[
        Path,
        typer.Option(
            help="Index path: writes OUT.faiss, one file holding the vectors, their ids, "
            "patient pseudonyms and lineage (missing folders are created, as for every output)."
        ),
    ],
    split: Annotated[
        IdentSide,
        typer.Option(
            help="Which records to index: gallery, probe or all (the store's ident_split).",
        ),
    ] = "gallery",
    kind: Annotated[
        str,
        typer.Option(
            help="flat (exact, default), hnsw or ivf (approximate, for large galleries; "
            "recall@1 against exact is reported)."
        ),
    ] = "flat",
    level: Annotated[
        Level,
        typer.Option(
            help="record (one vector per record) or segment (one per 5 s segment).",
        ),
    ] = "record",
) -> None:
    """Build a FAISS index over the embeddings of a store split."""
    from retrieval.index import INDEX_KINDS, index_file, index_from_features, index_lock

    if kind not in INDEX_KINDS:
        fail(f"unknown --kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
    check_output_path(out, "--out", directory=False)
    try:
        index = index_from_features(store, features, split=split, kind=kind, level=level)
        index_file(out).parent.mkdir(parents=True, exist_ok=True)  # its lock file goes there
        with index_lock(out):
            path = index.save(out)
    except _ERRORS as e:
        fail(_message(e))
    line = f"{path}: {len(index)} {level} vectors ({kind}, dim {index.dim})"
    if "recall_at_1" in index.info:
        info = index.info
        line += f", recall@1 vs exact {info['recall_at_1']:.4f} on {info['recall_n']} queries"
    typer.echo(line)


@index_app.command("update")
def index_update(
    index: IndexOption,
    store: EmbeddingsStoreOption,
    features: FeaturesOption,
    compact_at: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Compact (fold the delta segments into a new main file) once their rows "
            "exceed this fraction of the main file's.",
        ),
    ] = 0.1,
) -> None:
    """Add the records embedded since an index was built to it, without a rebuild: the new
    vectors go into a small delta segment next to the index file (compacted when large)."""
    from retrieval.index import LineageError, update_index

    try:
        r = update_index(index, store, features, compact_fraction=compact_at)
    except (LineageError, *_ERRORS) as e:
        fail(_message(e))
    where = "compacted into the main file" if r["compacted"] else f"{r['deltas']} delta segments"
    typer.echo(f"{r['path']}: added {r['added']} vectors, {r['count']} in all ({where})")


@index_app.command("compact")
def index_compact(
    index: IndexOption,
) -> None:
    """Fold an index's delta segments (from `index update`) into a new main file."""
    from retrieval.index import LineageError, compact_index

    try:
        r = compact_index(index)
    except (LineageError, *_ERRORS) as e:
        fail(_message(e))
    typer.echo(f"{r['path']}: folded {r['folded']} delta vectors, {r['count']} in all")


@evaluate_app.command("identify")
def evaluate_identify(
    store: Annotated[
        str, store_option("Feature store with a gallery/probe split, or its URL (s3://...).")
    ],
    features: FeaturesOption,
    leads: Annotated[
        str | None,
        typer.Option(
            help="Evaluate with this lead subset (12/6/4/3/2/1 or a list); embeddings are computed "
            "with the subset by the feature set's checkpoint."
        ),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(help="Write the CMC curves to this PNG (missing folders are created)."),
    ] = None,
    as_json: Annotated[bool, json_option("Print the metrics as JSON.")] = False,
    precision: Annotated[
        Precision | None, precision_option("Used with --leads (default: the feature set's).")
    ] = None,
    max_probes: Annotated[
        int,
        typer.Option(
            help="Probes evaluated per level; above it a uniform sample of this many (drawn "
            "with --seed) is ranked against the whole gallery, so the cost grows linearly with "
            "the gallery; n_probe_evaluated and rank1_ci95 (95 % band of Rank-1) report it. "
            "0 = every probe."
        ),
    ] = 20_000,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the --max-probes sample.")] = 0,
    wandb_mode: Annotated[
        WandbMode,
        typer.Option(help="W&B run of the evaluation (in --out): offline, online or disabled."),
    ] = "disabled",
    out: Annotated[
        Path | None, typer.Option(help="Folder of the W&B run (needed with --wandb-mode).")
    ] = None,
) -> None:
    """Patient identification: Rank-1/5/10 and exact mAP per record and per segment."""
    from retrieval.evaluate import evaluate_identification

    if max_probes < 0:
        fail(f"--max-probes must be >= 0 (0 = every probe), got {max_probes}")
    if wandb_mode != "disabled" and out is None:
        fail(f"--wandb-mode {wandb_mode} needs --out DIR (the folder of the W&B run)")
    if out is not None:
        check_output_path(out, "--out", directory=True)
    if plot is not None:
        check_output_path(plot, "--plot", directory=False)
    try:
        result = evaluate_identification(
            store,
            features,
            leads=leads,
            plot=plot,
            progress=True,
            precision=precision.value if precision else None,
            max_probes=max_probes,
            seed=seed,
            wandb_mode=wandb_mode,
            out=out,
        )
    except _ERRORS as e:
        fail(_message(e))
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"identification: {result['features']} ({result['leads']})")
    table.add_column("metric")
    table.add_column("record", justify="right")
    table.add_column("segment", justify="right")
    keys = ("rank1", "rank1_ci95", "rank5", "rank10", "mAP", "chance_rank1")
    for key in (*keys, "n_gallery", "n_probe", "n_probe_evaluated"):
        r, s = result["record"][key], result["segment"][key]
        fmt = (lambda v: str(v)) if key.startswith("n_") else (lambda v: f"{v:.4f}")
        table.add_row(key, fmt(r), fmt(s))
    Console().print(table)
    if plot is not None:
        typer.echo(f"CMC plot: {result['cmc_plot']}")


def _conditioned_file(path: Path):
    """(float32 (S, 12, 2500) mV, lead mask) of a record file, read by `ingestion`."""
    from ecgplat.store import to_millivolts
    from ingestion.one_file import read_one
    from ingestion.readers.record import RecordError

    try:
        rec = read_one(path)
    except RecordError as e:
        fail(str(e))
    return to_millivolts(rec.segments), rec.lead_mask


@app.command("query")
def query(
    index: IndexOption,
    record: Annotated[
        str | None, typer.Option(help="Record key of the index's store, e.g. ptbxl/00013.")
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            help="A new ECG as a WFDB header (.hea) not in the store; it is conditioned and "
            "embedded with the index's checkpoint."
        ),
    ] = None,
    k: Annotated[int, typer.Option(min=1, help="Number of matches.")] = 5,
    plot: Annotated[
        Path | None,
        typer.Option(
            help="Write the 12-lead traces of the query and its matches to this PNG (missing "
            "folders are created, as for every output)."
        ),
    ] = None,
    as_json: Annotated[bool, json_option("Print the matches as JSON.")] = False,
    precision: Annotated[
        Precision | None, precision_option("Used with --file (default: the gallery's).")
    ] = None,
) -> None:
    """Nearest gallery ECGs (cosine similarity) of a stored record or a new file."""
    from retrieval.index import GalleryIndex, LineageError
    from retrieval.query import plot_matches, query_record, query_signal

    # a CheckpointError (--file) is a ValueError, caught as one of _ERRORS: its module imports
    # torch, which a query by --record does not need
    if (record is None) == (file is None):
        fail("give exactly one of --record KEY or --file PATH.hea")
    if plot is not None:
        check_output_path(plot, "--plot", directory=False)
    try:
        idx = GalleryIndex.load(index)
        if record is not None:
            matches = query_record(idx, record, k)
            trace, title = None, record
        else:
            assert file is not None  # exactly one of --record / --file (checked above)
            segments, mask = _conditioned_file(file)
            matches = query_signal(
                idx, segments, mask, k, precision=precision.value if precision else None
            )
            trace, title = segments[0], file.name
        if plot is not None:
            if trace is None:
                from ecgplat.store import open_store
                from retrieval.query import record_trace

                trace = record_trace(open_store(idx.lineage["store"]), title)
            if trace is None:  # the store lost the record since query_record found it
                raise KeyError(f"{idx.lineage['store']}: no record {title!r}")
            plot_matches(trace, matches, plot, idx.lineage.get("store"), title=title)
    except (LineageError, *_ERRORS) as e:
        fail(_message(e))
    if as_json:
        typer.echo(json.dumps(matches, indent=1))
        return
    for m in matches:
        same = "" if "same_patient" not in m else ("  same patient" if m["same_patient"] else "")
        typer.echo(f"{m['rank']:>3}  {m['score']:.4f}  {m['id']}{same}")
    if plot is not None:
        typer.echo(f"plot: {plot}")
