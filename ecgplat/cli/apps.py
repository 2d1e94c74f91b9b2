"""The typer app and its sub-command groups, shared by the `*_cmds` modules."""

from enum import Enum

import typer

app = typer.Typer(
    name="ecgplat",
    help="Lead-agnostic self-supervised learning on ECGs: ingest, pretrain, fine-tune, evaluate, query.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)
evaluate_app = typer.Typer(
    help="Evaluate a model: arrhythmia classification or patient identification.",
    no_args_is_help=True,
)
import_app = typer.Typer(
    help="Import checkpoints from other implementations.", no_args_is_help=True
)
index_app = typer.Typer(
    help="Build FAISS gallery indexes over stored embeddings.", no_args_is_help=True
)

app.add_typer(evaluate_app, name="evaluate")
app.add_typer(import_app, name="import")
app.add_typer(index_app, name="index")


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error to stderr and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


class Precision(str, Enum):
    """--precision of the commands that run a model (resolved by training.precision)."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


PRECISION_HELP = (
    "Numeric precision of the forward passes: auto (bf16 on CUDA and on CPUs with AMX or "
    "AVX-512-BF16, else fp32), fp32 or bf16."
)
