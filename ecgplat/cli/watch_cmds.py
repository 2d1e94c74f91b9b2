"""Streaming command: `ecgplat watch` (follow a folder, ingest, embed and index as ECGs land)."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from ecgplat.cli.apps import app, check_device, check_output_path, fail
from ecgplat.cli.options import (
    DeviceOption,
    NewStoreOption,
    Precision,
    PrecisionOption,
    json_option,
)

WATCH_CORPORA = ("wfdb", "cinc2021")  # ingestion.watch.WATCH_CORPORA (not imported: fast --help)


def _check_args(corpus, src, embed, checkpoint, index, leads) -> None:
    from ecgplat.leads import parse_leads

    try:
        parse_leads(leads)
    except ValueError as e:
        fail(f"--leads {leads}: {e}")
    if corpus not in WATCH_CORPORA:
        fail(f"--corpus {corpus}: watch follows {', '.join(WATCH_CORPORA)} folders")
    if not src.exists():
        fail(f"{src}: source directory does not exist")
    if not src.is_dir():
        fail(f"{src}: the source is a file, not a directory")
    if (embed is None) != (checkpoint is None):
        fail("--embed and --checkpoint go together (the feature set and the model that fills it)")
    if index is not None and embed is None:
        fail("--index needs --embed and --checkpoint (the index holds their embeddings)")
    if checkpoint is not None and not checkpoint.is_file():
        fail(f"{checkpoint}: no such checkpoint file")
    if index is not None and index.is_dir():
        fail(f"--index {index}: is a directory, not a file")


def _publisher(store: Path, embed, checkpoint, index, leads, device, precision):
    """The call that makes committed records queryable (None when only ingesting)."""
    if embed is None:
        return None
    from retrieval.stream import Embedder, check_targets, embed_missing, index_missing

    embedder = Embedder(checkpoint, leads=leads, device=device, precision=precision)
    check_targets(store, embed, embedder, index)  # before any record is read

    def publish() -> None:
        embed_missing(store, embed, embedder)
        if index is not None:
            index_missing(index, store, embed)

    return publish


@app.command("watch")
def watch(
    src: Annotated[Path, typer.Argument(help="Folder to follow (records may land in subfolders).")],
    store: NewStoreOption,
    corpus: Annotated[
        str, typer.Option(help=f"Reader of the records: {', '.join(WATCH_CORPORA)}.")
    ] = "wfdb",
    embed: Annotated[
        str | None, typer.Option(help="Feature set (features/NAME) to embed new records into.")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Checkpoint whose encoder embeds (with --embed).")
    ] = None,
    index: Annotated[
        Path | None,
        typer.Option(help="FAISS index file of all records to add new records to (with --embed)."),
    ] = None,
    leads: Annotated[str, typer.Option(help="Leads fed to the encoder (as for embed).")] = "12",
    poll: Annotated[float, typer.Option(min=0.05, help="Seconds between scans of SRC.")] = 1.0,
    settle: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Seconds a record whose data file is missing or shorter than its header says "
            "must stay unchanged before it is read (and rejected if still short).",
        ),
    ] = 30.0,
    max_seconds: Annotated[
        float | None, typer.Option(min=0.0, help="Stop after this many seconds (default: never).")
    ] = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = Precision.auto,
    as_json: Annotated[bool, json_option("Print the summary as JSON.")] = False,
) -> None:
    """Follow SRC and ingest each record once its files are complete; with --embed, embed it
    (and with --index, add it to the index) so that it is queryable.

    Restarts skip what the store already holds. Ctrl-C / SIGTERM finish the current record,
    commit and exit (130 / 143). Prints each record's latency from landing to queryable (by its
    pseudonymised store key) and a summary with the median and 95th percentile."""
    _check_args(corpus, src, embed, checkpoint, index, leads)
    check_output_path(store, "--store", directory=True)
    check_device(device)
    from ecgplat.store import StoreBusyError
    from ingestion.watch import Watcher
    from retrieval.features import FeatureError
    from retrieval.index import LineageError

    stop, got = threading.Event(), []

    def on_signal(signum, _frame) -> None:
        got.append(signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        publish = _publisher(store, embed, checkpoint, index, leads, device, precision.value)
        watcher = Watcher(corpus, src, store, publish, poll=poll, settle=settle, echo=_echo)
        watcher.catch_up()
        _echo(f"watching {src} every {poll:g} s (store {store})")
        summary = watcher.run(stop, max_seconds=max_seconds)
    # a CheckpointError is a ValueError (its module imports torch: not needed to ingest only)
    except (FeatureError, LineageError, StoreBusyError, OSError, ValueError) as e:
        fail(str(e).splitlines()[0])
    _print_summary(summary, as_json)
    if got:
        raise typer.Exit(128 + got[0])


def _echo(line: str) -> None:
    from ecgplat.printable import one_line

    typer.echo(one_line(line))  # SRC or --store may hold a newline
    import sys

    sys.stdout.flush()


def _print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        _echo(json.dumps(summary))
        return
    lat = (
        f"landing to queryable: median {summary['latency_median_s']:.2f} s, "
        f"p95 {summary['latency_p95_s']:.2f} s"
        if summary["ingested"]
        else "nothing new"
    )
    _echo(
        f"watched {summary['seconds']:.0f} s: ingested {summary['ingested']} records, "
        f"rejected {summary['rejected']}; {lat}"
    )
