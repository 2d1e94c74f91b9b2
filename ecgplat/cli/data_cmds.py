"""Data commands: `ecgplat synth | ingest | split | shards | info | forget` (feature store and
shards)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ecgplat.cli.apps import app, check_output_path, fail, require_store
from ecgplat.cli.options import (
    NewStoreOption,
    ProgressOption,
    SplitName,
    StoreArgument,
    json_option,
)

CORPUS_NAMES: tuple[str, ...] = ("cinc2021", "ptbxl", "wfdb", "cpsc2021")
CORPUS_NAMES += ("ludb", "code15", "numpy")  # corpora of issue 12
AUTO = "auto"  # every file by the reader its content needs (ingestion/auto.py)
FILTER_HELP = (
    "Zero-phase filters at 500 Hz, e.g. bandpass=0.5-40,notch=50 (or notch=60); "
    "default: none, as in the paper."
)
UNITS_HELP = (
    "wfdb: opt into records whose channels are in a non-voltage unit (z = z-scored; stored and "
    "marked units=z); numpy: unit of the array values, mV (default), uV or z."
)
LEADS_HELP = "numpy: lead names of the arrays' rows (or columns), in order, e.g. I,II,III,aVR."
PATIENTS_HELP = "numpy: CSV with record_id and optionally patient_id, labels (SNOMED/abbrev.)."


@app.command("synth")
def synth(
    out: Annotated[Path, typer.Argument(help="New (or empty) directory for the synthetic cohort.")],
    patients: Annotated[int, typer.Option(min=1, help="Number of synthetic patients.")] = 24,
    records_per_patient: Annotated[
        int, typer.Option(min=1, help="Records written per patient.")
    ] = 3,
    seconds: Annotated[
        float, typer.Option(min=0.1, help="Length of each record in seconds.")
    ] = 10.0,
    seed: Annotated[
        int, typer.Option(min=0, help="Random seed; the same seed gives the same cohort.")
    ] = 0,
) -> None:
    """Write a synthetic 12-lead cohort in the CinC 2021 format (WFDB header + MATLAB v4)."""
    from ingestion.synth import summarize, write_cohort

    check_output_path(out, "OUT", directory=True)
    try:
        manifest = write_cohort(out, patients, records_per_patient, seconds=seconds, seed=seed)
    except (FileExistsError, ValueError, OSError) as e:
        fail(str(e))
    typer.echo(summarize(manifest))


@app.command("ingest")
def ingest(
    corpus: Annotated[
        str,
        typer.Argument(
            help=f"Corpus reader: {', '.join(CORPUS_NAMES)}; or auto: each file's format "
            "told from its content (a mixed folder)."
        ),
    ],
    src: Annotated[
        str,
        typer.Argument(
            help="Root directory of the corpus, or an object-storage prefix "
            "(s3://bucket/prefix/: wfdb, cinc2021, ludb, cpsc2021; every worker reads the "
            "bucket with the AWS credentials of its own environment)."
        ),
    ],
    store: NewStoreOption,
    workers: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Dask worker processes of a local cluster (default: one per CPU core; "
            "0 = no cluster, run in this process).",
        ),
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(
            help="Address of an existing Dask scheduler, e.g. tcp://host:8786 "
            "(overrides --workers)."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Records per worker task.")] = 128,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Ingest at most this many new records.")
    ] = None,
    progress: ProgressOption = True,
    as_json: Annotated[bool, json_option("Print the summary as JSON.")] = False,
    min_fs: Annotated[
        float, typer.Option(min=0.001, help="Lowest sampling rate accepted, Hz.")
    ] = 50.0,
    max_fs: Annotated[
        float, typer.Option(min=0.001, help="Highest sampling rate accepted, Hz.")
    ] = 10_000.0,
    max_duration: Annotated[
        float,
        typer.Option(
            min=5.0,
            help="Longest record accepted, seconds (bounds the memory one record may take).",
        ),
    ] = 3600.0,
    follow_symlinks: Annotated[
        bool,
        typer.Option(
            "--follow-symlinks",
            help="Read files through symbolic links (they must still resolve inside SRC).",
        ),
    ] = False,
    allow_outside: Annotated[
        bool,
        typer.Option(
            "--allow-outside",
            help="With --follow-symlinks: let symbolic links resolve outside SRC.",
        ),
    ] = False,
    units: Annotated[str | None, typer.Option(help=UNITS_HELP)] = None,
    fs: Annotated[
        float | None, typer.Option(help="numpy: sampling rate of the arrays, Hz.")
    ] = None,
    leads: Annotated[str | None, typer.Option(help=LEADS_HELP)] = None,
    patients: Annotated[Path | None, typer.Option(help=PATIENTS_HELP)] = None,
    signal_filter: Annotated[str | None, typer.Option("--filter", help=FILTER_HELP)] = None,
    send_bytes: Annotated[
        bool,
        typer.Option(
            "--send-bytes",
            help="Read each record's files here and send them to the workers, which then need "
            "not see SRC (wfdb, cinc2021, ludb, cpsc2021). Default: workers read SRC "
            "themselves (a filesystem shared with this machine).",
        ),
    ] = False,
) -> None:
    """Read, condition (500 Hz, 5 s int16 segments) and append a corpus to the feature store.

    Interrupted runs resume where they stopped; records already stored are skipped; bad
    records are listed in the store's rejects table with a one-line reason. Every file read
    must lie inside SRC (no absolute or '..' paths; no symbolic links unless --follow-symlinks).
    """
    from ecgplat.store import is_url

    if corpus not in (*CORPUS_NAMES, AUTO):
        fail(f"unknown corpus {corpus!r}; choose one of {', '.join(CORPUS_NAMES)} or {AUTO}")
    if is_url(src) and corpus == AUTO:
        fail(f"{src}: ingest auto reads a local folder; name the corpus of a bucket")
    local = Path(src)
    if not is_url(src) and not local.exists():
        fail(f"{src}: source directory does not exist")
    if not (is_url(src) or local.is_dir() or (corpus == "numpy" and local.is_file())):
        fail(f"{src}: the source is a file, not a directory")
    check_output_path(store, "--store", directory=True)
    if allow_outside and not follow_symlinks:
        fail("--allow-outside needs --follow-symlinks")
    if min_fs > max_fs:
        fail(f"--min-fs ({min_fs:g}) is above --max-fs ({max_fs:g})")
    from ingestion.auto import ingest_auto
    from ingestion.pipeline import ingest as run_ingest
    from ingestion.readers.options import ReadOptions

    try:
        opts = ReadOptions(
            min_fs,
            max_fs,
            max_duration,
            follow_symlinks,
            allow_outside,
            units=units,
            fs=fs,
            leads=leads,
            patients=str(patients.absolute()) if patients is not None else None,
            signal_filter=signal_filter,
        )
    except ValueError as e:
        fail(str(e))
    run: dict[str, Any] = {
        "workers": workers,
        "scheduler": scheduler,
        "batch_size": batch_size,
        "progress": progress,
        "limit": limit,
        "opts": opts,
        "send_bytes": send_bytes,
    }
    try:
        if corpus == AUTO:
            summary = ingest_auto(local, store, **run)
        else:
            summary = run_ingest(corpus, src, store, **run)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail(
            "interrupted; everything committed so far is kept: re-run the same command to resume",
            code=130,
        )
    if summary["records"] + summary["skipped"] + sum(summary["rejected"].values()) == 0:
        fail(f"{src}: no {corpus} records found here (is it the right corpus and folder?)")
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    rejected = ", ".join(f"{k} {v}" for k, v in summary["rejected"].items()) or "none"
    typer.echo(
        f"ingested {summary['records']} records ({summary['segments']} segments, "
        f"{summary['patients']} patients) in {summary['seconds']:.1f} s "
        f"({summary['records_per_s']:.0f} records/s); skipped {summary['skipped']} "
        f"already present; rejected: {rejected}; store now holds "
        f"{summary['store_records']} records"
    )
    for name, part in summary.get("formats", {}).items():
        typer.echo(f"  {name}: {part['records']} records of {part['listed']} listed")


@app.command("split")
def split(
    store: StoreArgument,
    mode: Annotated[
        str,
        typer.Option(
            help="random: grouped by patient; strat_fold: PTB-XL folds 1-8 train, 9 valid, 10 test."
        ),
    ] = "random",
    valid: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Fraction of records for valid (random mode).")
    ] = 0.1,
    test: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Fraction of records for test (random mode).")
    ] = 0.1,
    seed: Annotated[
        int, typer.Option(min=0, help="Seed of the patient shuffle (random mode).")
    ] = 0,
    ident: Annotated[
        bool,
        typer.Option(
            "--ident",
            help="Also assign identification gallery/probe: per patient with >= 2 records, "
            "first record gallery, the others probe.",
        ),
    ] = False,
    ident_first_two: Annotated[
        bool,
        typer.Option(
            "--ident-first-two",
            help="Paper rule: first record gallery, second probe, later ones unused "
            "(implies --ident).",
        ),
    ] = False,
    ident_within: Annotated[
        SplitName | None,
        typer.Option(
            help="Only records of this split take part in gallery/probe (implies --ident).",
        ),
    ] = None,
    source: Annotated[
        list[str] | None,
        typer.Option(
            help="Only split records of this source (repeatable); others keep their assignment."
        ),
    ] = None,
) -> None:
    """Assign record-level train/valid/test splits (and gallery/probe) inside the store."""
    from ingestion.splits import split_store

    require_store(store)
    try:
        summary = split_store(
            store,
            mode=mode,
            valid=valid,
            test=test,
            seed=seed,
            ident=ident or ident_first_two or ident_within is not None,
            ident_first_two=ident_first_two,
            sources=source,
            ident_within=ident_within,
        )
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        fail(str(e))
    typer.echo(json.dumps(summary))


@app.command("shards")
def shards(
    store: StoreArgument,
    split_name: Annotated[
        str, typer.Option("--split", help="Split to export (train, valid, test or all).")
    ],
    out: Annotated[
        str,
        typer.Option(
            "--out",
            help="Output directory for the tar shards and _info.json, or an object-storage "
            "prefix (s3://bucket/prefix; credentials from the standard AWS settings).",
        ),
    ],
    max_size: Annotated[
        str, typer.Option(help="Maximum shard size, e.g. 256MB or 1GiB.")
    ] = "256MB",
    max_count: Annotated[
        int, typer.Option(min=1, help="Maximum samples (records) per shard.")
    ] = 100_000,
    name: Annotated[
        str | None, typer.Option(help="Shard name prefix (default: the split name).")
    ] = None,
    progress: ProgressOption = True,
) -> None:
    """Export one split of the store as WebDataset tar shards (one sample per record)."""
    from ecgplat.store import StoreBusyError, is_url
    from ingestion.shards import write_shards

    require_store(store)
    if not is_url(out):
        check_output_path(Path(out), "--out", directory=True)
    try:
        entry = write_shards(
            store,
            split_name,
            out,
            name=name,
            max_size=max_size,
            max_count=max_count,
            progress=progress,
        )
    except (FileNotFoundError, ValueError, OSError, StoreBusyError) as e:
        fail(str(e))
    typer.echo(
        f"wrote {entry['samples']} records ({entry['segments']} segments) in "
        f"{len(entry['shards'])} shards to {out}"
    )


@app.command("info")
def info(
    store: Annotated[
        str,
        typer.Argument(help="Feature store directory, or its URL (http://, s3://: read-only)."),
    ],
    as_json: Annotated[bool, json_option("Print machine-readable JSON.")] = False,
) -> None:
    """Counts of a store: records, segments, patients, per source/split/ident_split, rejects."""
    from ecgplat.store import open_store

    try:
        summary = open_store(store).summary()
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    typer.echo(f"store {summary['path']} (schema {summary['schema_version']})")
    typer.echo(
        f"  records {summary['records']}, segments {summary['segments']}, "
        f"patients {summary['patients']}, rejects {summary['rejects']}"
    )
    if summary.get("forgotten"):
        pending = " (scrub pending: re-run `ecgplat forget`)" if summary["forget_pending"] else ""
        typer.echo(f"  forgotten {summary['forgotten']}{pending}")
    for title, key in (
        ("per source", "per_source"),
        ("per split", "per_split"),
        ("per ident_split", "per_ident_split"),
        ("rejects by reason", "rejects_by_reason"),
    ):
        if summary[key]:
            typer.echo(f"  {title}: " + ", ".join(f"{k} {v}" for k, v in summary[key].items()))


@app.command("forget")
def forget(
    store: StoreArgument,
    record: Annotated[
        str | None, typer.Option(help="Record key to forget (the store's record_key).")
    ] = None,
    patient: Annotated[
        str | None,
        typer.Option(help="Forget every record of this patient pseudonym (patient_key, p-...)."),
    ] = None,
    index: Annotated[
        list[Path] | None,
        typer.Option(help="FAISS index file built from this store to update (repeatable)."),
    ] = None,
    as_json: Annotated[bool, json_option("Print the counts as JSON.")] = False,
) -> None:
    """Withdraw a record, or every record of a patient (consent withdrawn), from the store.

    Reads, later exports and updated indexes never return them again, and the data files that
    held them are rewritten without them. Other indexes and earlier shard exports are refused
    as stale. A run that was killed is completed by running forget again.
    """
    from ecgplat.store.forget import forget as run_forget
    from retrieval.index import ForgetIndex

    require_store(store)
    if record is not None and patient is not None:
        fail("give exactly one of --record KEY or --patient PSEUDONYM")
    try:
        targets = [ForgetIndex(path) for path in index or ()]
        summary = run_forget(store, record=record, patient=patient, indexes=targets)
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as e:
        fail(str(e.args[0]) if isinstance(e, KeyError) else str(e))
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    done = "already forgotten" if summary["already"] else f"forgot {summary['forgotten']} records"
    typer.echo(
        f"{done} ({summary['segments']} segments); rewrote {summary['shard_files']} segment "
        f"files and {summary['feature_sets']} feature sets; {summary['index_rows']} rows "
        f"removed from {summary['indexes']} indexes; {summary['records_total']} records "
        f"forgotten in all (forget generation {summary['generation']})"
    )
