"""The `ecgplat` command line: a thin typer layer over the library.

The app and its sub-apps live in `ecgplat.cli.apps`; each `*_cmds` module registers its
commands on them. Command bodies import the heavy packages (`ingestion`, `training`,
`retrieval`, torch, dask) lazily so that `ecgplat --help` stays fast.
"""

from ecgplat.cli import (  # noqa: F401
    data_cmds,
    diagnosis_cmds,
    model_cmds,
    retrieval_cmds,
    train_cmds,
    watch_cmds,
)
from ecgplat.cli.apps import app

__all__ = ["app"]
