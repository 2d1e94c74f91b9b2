"""The options that several commands declare alike, defined once: their value sets, `Annotated`
aliases of those whose help text is the same everywhere, and factories of those whose help text
says what the command does with them.

A command takes one as ``progress: ProgressOption = True`` or
``as_json: Annotated[bool, json_option("Print the summary as JSON.")] = False``; the default
stays in the command's signature.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

# option value sets, checked by typer at parse time (a usage error names the option)
Device = Literal["auto", "cpu", "cuda"]
WandbMode = Literal["offline", "online", "disabled"]
SplitName = Literal["train", "valid", "test"]
IdentSide = Literal["gallery", "probe", "all"]
Level = Literal["record", "segment"]


class Precision(StrEnum):
    """--precision of the commands that run a model (resolved by training.precision)."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


PRECISION_HELP = (
    "Numeric precision of the forward passes: auto (bf16 on CUDA and on CPUs with AMX or "
    "AVX-512-BF16, else fp32), fp32 or bf16."
)


def json_option(help: str) -> Any:
    """`--json`: print the result as JSON (`help` says which result)."""
    return typer.Option("--json", help=help)


def store_option(help: str) -> Any:
    """`--store`: a feature store directory (`help` says what the command does with it)."""
    return typer.Option("--store", help=help)


def precision_option(note: str = "") -> Any:
    """`--precision` with PRECISION_HELP, followed by `note` when the command adds one."""
    return typer.Option(help=f"{PRECISION_HELP} {note}" if note else PRECISION_HELP)


# an existing store as the first argument (split, shards, forget)
StoreArgument = Annotated[Path, typer.Argument(help="Feature store directory.")]
# a store that ingestion creates or grows (ingest, watch)
NewStoreOption = Annotated[Path, store_option("Feature store directory (created if missing).")]
# the store that `ecgplat embed` wrote a feature set into (index build, index update)
EmbeddingsStoreOption = Annotated[
    str, store_option("Feature store holding the embeddings, or its URL (s3://...: read-only).")
]
FeaturesOption = Annotated[
    str,
    typer.Option(
        help="Feature set name (see `ecgplat embed`), or DIR/NAME for one written outside the "
        "store with `embed --features-out DIR`."
    ),
]
IndexOption = Annotated[Path, typer.Option(help="Index built by `ecgplat index build` (.faiss).")]
ProgressOption = Annotated[bool, typer.Option(help="Show a progress bar.")]
DeviceOption = Annotated[Device, typer.Option(help="auto (GPU when present), cpu or cuda.")]
PrecisionOption = Annotated[Precision, precision_option()]
