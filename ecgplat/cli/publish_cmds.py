"""Publish command: `ecgplat publish STORE URL` (a committed snapshot of a store, without its
secret key, uploaded to object storage for read-only use by URL)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ecgplat.cli.apps import app, fail
from ecgplat.cli.options import json_option


@app.command("publish")
def publish(
    store: Annotated[Path, typer.Argument(help="Local feature store directory to publish.")],
    url: Annotated[
        str,
        typer.Argument(
            help="Where to publish it: an object-storage prefix (s3://bucket/prefix; credentials "
            "from the standard AWS environment variables or config)."
        ),
    ],
    as_json: Annotated[bool, json_option("Print what was uploaded as JSON.")] = False,
) -> None:
    """Upload the store's last commit (data first, commit point last; only what changed since
    the last publish there), so that `info`, `evaluate identify`, `index build` and `query`
    read it by URL while writers go on appending locally. secret.key is never uploaded."""
    from ecgplat.store import StoreBusyError
    from ecgplat.store.publish import publish as publish_store

    try:
        result = publish_store(store, url)
    except (OSError, ValueError, StoreBusyError) as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    typer.echo(
        f"{result['url']}: {result['n_records']} records, {result['n_segments']} segments, "
        f"feature sets {', '.join(result['feature_sets']) or 'none'}; uploaded "
        f"{result['uploaded']} of {result['files']} files ({result['uploaded_bytes']} bytes), "
        f"deleted {result['deleted']}"
    )
