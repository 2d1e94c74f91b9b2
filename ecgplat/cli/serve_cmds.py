"""Service command: `ecgplat serve` (queries, predictions, records over HTTP, with a web page)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from ecgplat.cli.apps import app, check_device, fail, require_store
from ecgplat.cli.options import DeviceOption, store_option

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _check_args(store: str, index, checkpoint, host: str, tokens) -> None:
    from ecgplat.store import is_url

    if not is_url(store):  # a URL is checked when it is opened
        require_store(store, "--store")
    if index is not None and not Path(index).is_file():
        fail(f"--index {index}: no such index file")
    if checkpoint is not None and not Path(checkpoint).is_file():
        fail(f"--checkpoint {checkpoint}: no such checkpoint file")
    if index is None and checkpoint is None:
        fail("give --index (queries, embeddings) and/or --checkpoint (predictions)")
    if host not in LOOPBACK and tokens is None:
        fail(f"--host {host}: a service reachable from other machines needs --tokens FILE")
    if tokens is not None and not Path(tokens).is_file():
        fail(f"--tokens {tokens}: no such file")


def _logging() -> None:
    """The service's own one-line logs (access lines, reloads) on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("ecgplat.serve")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


@app.command("serve")
def serve(
    store: Annotated[
        str,
        store_option(
            "Feature store whose records are served and queried, or the URL of a published "
            "store (s3://...: read-only)."
        ),
    ],
    index: Annotated[
        Path | None,
        typer.Option(
            help="Gallery index of the store (`ecgplat index build`, .faiss): /query and "
            "/embed; reloaded when `index update`, `watch` or `forget` change it."
        ),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="Fine-tuned checkpoint for /predict (as `ecgplat predict` uses it)."),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on; other than loopback needs --tokens.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    tokens: Annotated[
        Path | None,
        typer.Option(
            help="Bearer tokens with scopes (query, predict, records), JSON, mode 0600 "
            "(docs/formats.md, 'Service tokens'); without it every caller has every scope."
        ),
    ] = None,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(help="Allow browser pages of this origin to call the API (repeatable)."),
    ] = None,
    max_upload_mb: Annotated[
        float, typer.Option(min=0.001, help="Largest request body accepted, MiB.")
    ] = 32.0,
    timeout: Annotated[
        float, typer.Option(min=0.01, help="Seconds a request may take, its upload included.")
    ] = 30.0,
    rate: Annotated[
        float, typer.Option(min=0.001, help="Requests per second per token (default of a token).")
    ] = 20.0,
    burst: Annotated[int, typer.Option(min=1, help="Requests a token may send at once.")] = 40,
    reload_every: Annotated[
        float, typer.Option(min=0.05, help="Seconds between checks of the index for changes.")
    ] = 1.0,
    threads: Annotated[int, typer.Option(min=1, help="Concurrent model and search runs.")] = 2,
    device: DeviceOption = "auto",
) -> None:
    """Serve similar-ECG queries, predictions, embeddings and records over HTTP, with a web page
    at / and the API documented at /docs."""
    _check_args(store, index, checkpoint, host, tokens)
    check_device(device)
    import uvicorn

    from ecgplat.cli.serve.app import create_app
    from ecgplat.cli.serve.settings import ServeSettings

    settings = ServeSettings(
        store=store,
        index=index,
        checkpoint=checkpoint,
        tokens=tokens,
        max_upload_bytes=int(max_upload_mb * 2**20),
        request_timeout=timeout,
        rate=rate,
        burst=burst,
        cors_origins=tuple(cors_origin or ()),
        reload_interval=reload_every,
        threads=threads,
        device=device,
    )
    web = create_app(settings)  # loads the models and the index: errors end here, one line
    _logging()
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"ecgplat serve: open http://{shown}:{port}/ (API: /docs), Ctrl-C stops", err=True)
    uvicorn.run(web, host=host, port=port, access_log=False, log_level="warning")
