"""The `ecgplat` command line: a thin typer layer over the library.

The app and its sub-apps live in `ecgplat.cli.apps`, the options that several commands share
in `ecgplat.cli.options`; each `*_cmds` module registers its commands on the apps. Command
bodies import the heavy packages (`ingestion`, `training`, `retrieval`, torch, dask) lazily so
that `ecgplat --help` stays fast.
"""

from ecgplat.cli import (  # noqa: F401
    data_cmds,
    deploy_cmds,
    diagnosis_cmds,
    model_cmds,
    predict_cmds,
    publish_cmds,
    retrieval_cmds,
    serve_cmds,
    task_cmds,
    train_cmds,
    watch_cmds,
)
from ecgplat.cli.apps import app

__all__ = ["app"]
