"""One rich progress bar for every long job (ingest, shards, training, evaluation, embedding).

`ProgressBar(enabled, total, label)` is a no-op object when disabled (or when there is nothing
to count), so callers never branch on it; `info=...` on `advance` shows a short status text
(e.g. the training loss). Usable as a context manager; `close()` is idempotent.
"""

from __future__ import annotations

from typing import Any


class ProgressBar:
    def __init__(
        self,
        enabled: bool,
        total: int | None,
        label: str,
        *,
        completed: int = 0,
        transient: bool = False,
    ):
        self._bar = None
        if not enabled or total == 0:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            transient=transient,
        )
        self._bar.start()
        self._task = self._bar.add_task(label, total=total, completed=completed, info="")

    def advance(self, n: int = 1, info: str | None = None) -> None:
        if self._bar is None:
            return
        fields: dict[str, Any] = {} if info is None else {"info": info}
        self._bar.update(self._task, advance=n, **fields)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
