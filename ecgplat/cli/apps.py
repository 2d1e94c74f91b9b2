"""The typer app, its sub-command groups, the one place that turns errors into one-line
messages with a non-zero exit status, and the argument checks that commands share.

Every command runs inside `GuardedGroup.invoke`. An error the user can fix (a missing or
unreadable file, an error type of ecgplat's own packages, or a ValueError / LookupError /
RuntimeError that a `raise` statement of ecgplat's own code raised) becomes
``error: <first line of the message>`` on stderr and exit status 2. Anything else is a bug: it
exits with status 1 and a one-line ``unexpected <Type> at <file:line>`` that leaves out the
exception text (third-party messages can quote data values, e.g. a raw patient id) and tells
how to get the traceback: rerun with ``ECGPLAT_DEBUG=1``, which lets every exception propagate.
"""

from __future__ import annotations

import linecache
import os
from pathlib import Path

import typer
from typer.core import TyperGroup

from ecgplat.allocator import limit_arenas

DEBUG_ENV = "ECGPLAT_DEBUG"
PROJECT_PACKAGES = ("ecgplat", "ingestion", "training", "retrieval")
USAGE_EXIT, BUG_EXIT = 2, 1
# builtin errors that count as a diagnosis (not a bug) when ecgplat's own code raised them
_VALIDATION_ERRORS = (ValueError, LookupError, RuntimeError)
# typer's (vendored) click signals usage errors, --help and exits with its own exceptions
_CLI_PACKAGES = ("typer", "click")


def _first_line(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _project_frames(exc: BaseException) -> list:
    """The traceback entries of `exc` that run code of ecgplat's own packages (but not this
    module's handler)."""
    frames, tb = [], exc.__traceback__
    while tb is not None:
        module = str(tb.tb_frame.f_globals.get("__name__", ""))
        if module.split(".")[0] in PROJECT_PACKAGES and module != __name__:
            frames.append(tb)
        tb = tb.tb_next
    return frames


def _raised_by_project(exc: BaseException) -> bool:
    """Whether a `raise` statement of ecgplat's own code raised `exc` (not, say, a `float()` on
    a data value inside it, whose message would quote the value)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    module = str(tb.tb_frame.f_globals.get("__name__", ""))
    line = linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno)
    return module.split(".")[0] in PROJECT_PACKAGES and line.lstrip().startswith("raise")


def describe_error(exc: Exception) -> tuple[str, bool]:
    """(one-line message, expected): expected errors are the user's to fix, the rest are bugs."""
    if isinstance(exc, OSError):
        if exc.filename is not None and exc.strerror:
            target = f" -> {exc.filename2}" if exc.filename2 is not None else ""
            return f"{exc.filename}{target}: {exc.strerror}", True
        return _first_line(exc), True
    own_type = type(exc).__module__.split(".")[0] in PROJECT_PACKAGES
    if own_type or (isinstance(exc, _VALIDATION_ERRORS) and _raised_by_project(exc)):
        return _first_line(exc), True
    frames = _project_frames(exc)
    where = ""
    if frames:
        code = frames[-1].tb_frame.f_code
        where = f" at {Path(code.co_filename).name}:{frames[-1].tb_lineno} ({code.co_name})"
    return (
        f"unexpected {type(exc).__name__}{where}; this is a bug: rerun with {DEBUG_ENV}=1 "
        "to see the traceback",
        False,
    )


class GuardedGroup(TyperGroup):
    """The command group whose `invoke` reports a failed command on one line (module docstring)."""

    def invoke(self, ctx):
        limit_arenas()  # before any command starts a thread (ecgplat/allocator.py)
        try:
            return super().invoke(ctx)
        except Exception as exc:
            if type(exc).__module__.split(".")[0] in _CLI_PACKAGES:
                raise
            if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
                raise
            message, expected = describe_error(exc)
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(USAGE_EXIT if expected else BUG_EXIT) from None


app = typer.Typer(
    name="ecgplat",
    help="Lead-agnostic self-supervised learning on ECGs: ingest, pretrain, fine-tune, evaluate, "
    "query.",
    cls=GuardedGroup,
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


def fail(message: str, code: int = USAGE_EXIT) -> None:
    """Print a one-line error to stderr and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def check_output_path(path: Path, option: str, *, directory: bool) -> None:
    """Fail unless `path` can be created as a directory (`directory`) or written as a file:
    no existing ancestor may be a file, and the path itself must be of the right kind. The rule
    of every output option (--out, --plot): its missing folders are created, like `mkdir -p`,
    when the command writes it; this check refuses beforehand what could not be created."""
    path = Path(path)
    if path.exists():
        if directory and not path.is_dir():
            fail(f"{option} {path}: is a file, not a directory")
        if not directory and path.is_dir():
            fail(f"{option} {path}: is a directory, not a file")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                fail(f"{option} {path}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                fail(f"{option} {path}: {parent} is not writable")
            return


def require_store(path: Path | str, option: str | None = None) -> None:
    """Fail unless `path` is an ecgplat feature store (a directory with zarr.json)."""
    if not (Path(path) / "zarr.json").is_file():
        fail(f"{option + ' ' if option else ''}{path}: no ecgplat store here")


def check_device(device: str, option: str = "--device") -> None:
    """Fail for `cuda` on a machine without a usable GPU (`auto` falls back to the CPU)."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            fail(f"{option} cuda: no CUDA device is available here (use auto or cpu)")
