"""Metric tracking for runs: console (rich progress), `metrics.jsonl` and Weights & Biases.

`Tracker(run_dir, ...)` appends one JSON object per `log()` call to `run_dir/metrics.jsonl`,
mirrors it to W&B (offline by default, files under `run_dir/wandb`; "disabled" writes nothing;
"online" needs an API key and falls back to offline without one) and shows a rich progress
bar with the loss and samples/s on the console (plain one-line records when stdout is not a
terminal). `log_metrics(...)` is the one-shot helper for commands such as `ecgplat evaluate`;
`read_metrics(run_dir)` reads the records back. `Tracker.log_media` and `Tracker.log_artifact`
carry the W&B dashboards and model artifacts of `training.dashboard` (W&B only).

Privacy: pseudonymised patient keys start with `p-`. Nothing that looks like one is ever
logged: keys starting with `p-` are dropped and string values containing one are redacted
(`sanitize`), in the JSONL file, the console and W&B alike (config included).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from ecgplat import atomic
from ecgplat.progress import ProgressBar

METRICS_FILE = "metrics.jsonl"

PATIENT_KEY = re.compile(r"(?<![A-Za-z0-9_])p-[0-9a-fA-F]{4,}")
REDACTED = "[redacted]"


def looks_like_patient_key(text: str) -> bool:
    return text.startswith("p-") or bool(PATIENT_KEY.search(text))


def sanitize(obj: Any) -> Any:
    """A copy of `obj` without patient-key-like dict keys and with such strings redacted."""
    if isinstance(obj, dict):
        return {
            k: sanitize(v)
            for k, v in obj.items()
            if not (isinstance(k, str) and looks_like_patient_key(k))
        }
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    if isinstance(obj, str):
        return REDACTED if obj.startswith("p-") else PATIENT_KEY.sub(REDACTED, obj)
    return obj


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):  # numpy / torch scalars
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class Tracker:
    """Console + JSONL + W&B logger of one run (create it on rank 0 only)."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        config: dict | None = None,
        mode: str = "offline",
        project: str = "ecgplat",
        name: str | None = None,
        job_type: str = "train",
        resume: bool = False,
        console: bool = True,
    ):
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"unknown W&B mode '{mode}' (offline, online, disabled)")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / METRICS_FILE
        # held open for the whole run (one line per log call); close() and truncate_after close it
        self._jsonl = open(self.jsonl_path, "a" if resume else "w", encoding="utf-8")  # noqa: SIM115
        self.console = console
        self._progress: ProgressBar | None = None
        self._task = None
        self._tty = sys.stdout.isatty()
        self.wandb_run = None
        if mode != "disabled":
            self.wandb_run = self._start_wandb(config or {}, mode, project, name, job_type, resume)

    # --- W&B ---------------------------------------------------------------------------------
    def _start_wandb(
        self, config: dict, mode: str, project: str, name: str | None, job_type: str, resume: bool
    ):
        wdir = self.run_dir / "wandb"
        wdir.mkdir(exist_ok=True)
        # keep every wandb file (cache, config, artifacts) inside the run directory
        for var, sub in (
            ("WANDB_DIR", ""),
            ("WANDB_CACHE_DIR", ".cache"),
            ("WANDB_CONFIG_DIR", ".config"),
            ("WANDB_DATA_DIR", ".data"),
        ):
            os.environ[var] = str(wdir / sub) if sub else str(self.run_dir)
        os.environ.setdefault("WANDB_SILENT", "true")
        if os.environ.get("WANDB_MODE", None) == "":
            del os.environ["WANDB_MODE"]  # an empty WANDB_MODE crashes wandb.init
        import wandb

        id_file = self.run_dir / "wandb_run_id.txt"
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        kwargs = dict(
            project=project,
            name=name,
            dir=str(self.run_dir),
            job_type=job_type,
            config=sanitize(config),
            id=run_id,
            resume="allow" if run_id else None,
        )
        try:
            # mode is "online" or "offline" here ("disabled" never starts W&B)
            run = wandb.init(mode="online" if mode == "online" else "offline", **kwargs)
        except Exception as e:
            if mode != "online":
                raise
            print(
                f"warning: W&B online mode failed ({type(e).__name__}); logging offline",
                file=sys.stderr,
            )
            run = wandb.init(mode="offline", **kwargs)
        if getattr(run, "id", None):
            id_file.write_text(str(run.id))
        return run

    # --- logging -----------------------------------------------------------------------------
    def log(self, metrics: dict[str, Any], step: int | None = None, prefix: str = "") -> dict:
        """Write one record (sanitised); returns what was written."""
        record = {f"{prefix}{k}": _jsonable(v) for k, v in sanitize(dict(metrics)).items()}
        line = dict(record)
        if step is not None:
            line = {"update": int(step), **line}
        line.setdefault("time", round(time.time(), 3))
        self._jsonl.write(json.dumps(line) + "\n")
        self._jsonl.flush()
        if self.wandb_run is not None:
            numeric = {k: v for k, v in record.items() if isinstance(v, (int, float, str))}
            self.wandb_run.log(numeric, step=step)
        if self.console and not self._tty and self._progress is None:
            print(" | ".join(f"{k} {_fmt(v)}" for k, v in line.items() if k != "time"), flush=True)
        return line

    def log_media(self, media: dict[str, Any], step: int | None = None) -> None:
        """Log W&B objects (tables, charts, images: `training.dashboard`) to the W&B run only;
        keys that look like patient keys are dropped. Nothing without a W&B run."""
        clean = {k: v for k, v in media.items() if not looks_like_patient_key(k)}
        if self.wandb_run is not None and clean:
            self.wandb_run.log(clean, step=step)

    def log_artifact(
        self,
        name: str,
        kind: str,
        metadata: dict[str, Any],
        references: dict[str, str] | None = None,
        aliases: list[str] | None = None,
    ) -> None:
        """Log a W&B artifact `name` of type `kind` whose entries are `references` (entry name
        -> URI, checksummed, never copied) and whose metadata is `metadata` (sanitised).
        Nothing without a W&B run."""
        if self.wandb_run is None:
            return
        import wandb

        if looks_like_patient_key(name):
            raise ValueError(f"artifact name {name!r} looks like a patient key")
        artifact = wandb.Artifact(name, type=kind, metadata=sanitize(metadata))
        for entry, uri in (references or {}).items():
            artifact.add_reference(uri, name=entry, checksum=True)
        self.wandb_run.log_artifact(artifact, aliases=aliases)

    def summary(self, metrics: dict[str, Any]) -> None:
        clean = {k: _jsonable(v) for k, v in sanitize(dict(metrics)).items()}
        (self.run_dir / "summary.json").write_text(json.dumps(clean, indent=2))
        if self.wandb_run is not None:
            for k, v in clean.items():
                self.wandb_run.summary[k] = v

    def truncate_after(self, step: int) -> None:
        """Drop JSONL records with `update > step` (re-done after a resume)."""
        self._jsonl.close()
        keep = []
        for raw, rec in _records(self.jsonl_path):
            if rec.get("update", -1) <= step:
                keep.append(raw)
        atomic.write_text(self.jsonl_path, "".join(line + "\n" for line in keep))
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115 (run-long handle)

    # --- progress bar ------------------------------------------------------------------------
    def start_progress(
        self, total: int | None, description: str = "train", completed: int = 0
    ) -> None:
        self.stop_progress()
        self._progress = ProgressBar(
            bool(self.console and self._tty), total, description, completed=completed
        )

    def advance(self, n: int = 1, **fields: Any) -> None:
        if self._progress is not None:
            self._progress.advance(
                n, "  ".join(f"{k} {_fmt(v)}" for k, v in sanitize(fields).items())
            )

    def stop_progress(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def close(self) -> None:
        self.stop_progress()
        if not self._jsonl.closed:
            self._jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def log_metrics(
    run_dir: str | Path,
    metrics: dict[str, Any],
    *,
    config: dict | None = None,
    mode: str = "offline",
    project: str = "ecgplat",
    name: str | None = None,
    job_type: str = "evaluate",
    step: int | None = None,
) -> dict:
    """One-shot: append `metrics` to run_dir/metrics.jsonl and a W&B run; returns the record."""
    with Tracker(
        run_dir,
        config=config,
        mode=mode,
        project=project,
        name=name,
        job_type=job_type,
        resume=True,
        console=False,
    ) as t:
        record = t.log(metrics, step=step)
        t.summary(metrics)
    return record


def _records(path: Path):
    """(line, record) pairs of a metrics file; a line torn by a kill is skipped."""
    if not path.exists():
        return
    for raw in path.read_text(encoding="utf-8").splitlines():
        try:
            yield raw, json.loads(raw)
        except json.JSONDecodeError:
            continue


def read_metrics(run_dir: str | Path, key: str | None = None) -> list[dict]:
    """The records of run_dir/metrics.jsonl in order; with `key`, only those that have it."""
    return [rec for _, rec in _records(Path(run_dir) / METRICS_FILE) if key is None or key in rec]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
