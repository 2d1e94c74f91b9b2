"""The auto ingest: a folder of mixed formats, each file's reader told from its content, one store.

``plan_folder(src)`` walks ``SRC`` (hidden files skipped), applies the path policy of the ingest
(``ingestion.readers.options.inside_src``) and detects each file's reader from its first bytes
(``ingestion.readers.detect``). A WFDB record's other files (its ``.dat``/``.mat`` signal files,
``.atr`` annotations, ``.xyz`` ...: a file no rule matches whose name is the header's record
name plus an extension, or that the header names) belong to its header. Every other file that
matches no format is rejected: "unrecognised format".

``ingest_auto`` then ingests each reader's files with ``ingestion.pipeline.ingest`` (its
``listing``), reader after reader in name order, into one store: every record keeps its
reader's ``SOURCE`` (the record table's ``source`` column is the format) and record keys stay
unique (``<source>/<record_id>``; a repeat is the writer's "duplicate record_key" reject). A
record path is the reader's own form when its ``list_records`` lists the file (with or without
the extension), else the file's path with its extension: a file under a misleading extension
is still read by the reader its content needs. The reader fields of the options (``--units``,
``--fs``, ...) go to the readers that take them; a group whose reader refuses the options (e.g.
``numpy`` arrays without ``--fs``) is rejected file by file with the reason. Unrecognised files
are rejected under the source ``auto``, so a re-run skips them like any reject.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ingestion.readers.detect import UNRECOGNISED, detect
from ingestion.readers.options import DEFAULT_OPTIONS, READER_FIELDS, ReadOptions, inside_src
from ingestion.readers.protocol import check_reader_options, reader_options
from ingestion.readers.record import RecordError
from ingestion.readers.registry import READERS

AUTO = "auto"  # the corpus name of the auto ingest, and the source of its unrecognised files
WFDB_READERS = ("cinc2021", "wfdb")


@dataclass
class FolderPlan:
    """What an auto ingest found under SRC: the files of each reader (SRC-relative, with their
    extension), and the files it rejects with their reasons."""

    groups: dict[str, list[str]] = field(default_factory=dict)
    rejects: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    companions: int = 0  # files that belong to a WFDB header

    @property
    def n_files(self) -> int:
        return sum(map(len, self.groups.values())) + len(self.rejects) + self.companions


def _walk(src: Path) -> list[str]:
    """SRC-relative paths of the files under ``src`` (hidden names skipped), sorted."""
    out = []
    for folder, dirs, names in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_folder = os.path.relpath(folder, src)
        for name in names:
            if not name.startswith("."):
                out.append(
                    name if rel_folder == "." else f"{rel_folder}/{name}".replace(os.sep, "/")
                )
    return sorted(out)


def _header_files(path: Path) -> set[str]:
    """The file names a WFDB header's signal lines give (in the header's folder)."""
    text = path.read_bytes()[:65536].decode("utf-8", errors="replace")
    lines = [ln.split() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return {tok[0] for tok in lines[1:] if tok}


def plan_folder(src: Path, opts: ReadOptions | None = None) -> FolderPlan:
    """Detect the reader of every file under ``src`` (see the module docstring)."""
    src, opts = Path(src), opts or DEFAULT_OPTIONS
    plan, unmatched = FolderPlan(), []
    for rel in _walk(src):
        try:
            path = inside_src(src, rel, rel, opts)
            reader = detect(path) if path.is_file() else None
        except RecordError as e:
            plan.rejects.append((rel, e.reason))
            continue
        except OSError as e:
            plan.rejects.append((rel, f"unreadable file ({type(e).__name__})"))
            continue
        if reader is None:
            unmatched.append(rel)
        else:
            plan.groups.setdefault(reader, []).append(rel)
    claimed: set[str] = set()
    for reader in WFDB_READERS:
        for rel in plan.groups.get(reader, []):
            folder, _, name = rel.rpartition("/")
            prefix = f"{folder}/" if folder else ""
            stem = name[: -len(".hea")]
            named = _header_files(src / rel)
            claimed |= {
                f
                for f in unmatched
                if f.startswith(prefix)
                and "/" not in f[len(prefix) :]
                and (f[len(prefix) :].startswith(stem + ".") or f[len(prefix) :] in named)
            }
    plan.companions = len(claimed)
    plan.rejects += [(rel, UNRECOGNISED) for rel in unmatched if rel not in claimed]
    plan.rejects.sort()
    return plan


def record_paths(reader_name: str, src: Path, files: list[str]) -> list[str]:
    """The record paths ``reader_name`` reads ``files`` by: its own listing's form of each file
    (with or without the extension), else the file path itself (a misleading extension)."""
    if reader_name in WFDB_READERS:
        return [f[: -len(".hea")] for f in files]
    listed = set(READERS[reader_name].list_records(src))
    out = []
    for f in files:
        bare = f.rpartition(".")[0] if "." in f.rpartition("/")[2] else f
        out.append(f if f in listed or bare not in listed else bare)
    return out


def group_options(reader_name: str, opts: ReadOptions) -> ReadOptions:
    """``opts`` less the reader fields ``reader_name`` does not take."""
    taken = set(reader_options(READERS[reader_name]))
    dropped: dict = {k: None for k in READER_FIELDS if k not in taken}
    return dataclasses.replace(opts, **dropped)


def _check_fields(plan: FolderPlan, opts: ReadOptions) -> None:
    """ValueError for a reader field set that no reader of the files found takes."""
    taken = {k for name in plan.groups if name in READERS for k in reader_options(READERS[name])}
    unused = [k for k in READER_FIELDS if getattr(opts, k) is not None and k not in taken]
    if unused:
        flags = ", ".join(f"--{k}" for k in unused)
        found = ", ".join(sorted(plan.groups)) or "none"
        raise ValueError(f"{flags} does not apply to the readers of the files found ({found})")


def _write_rejects(store, rows: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """Append the rejects (source, path, reason) not already in the store; returns those."""
    from ecgplat.store.writer import StoreWriter, pack_batch

    with StoreWriter(store) as writer:
        by_source: dict[str, list[str]] = {}
        for source, rel, _ in rows:
            by_source.setdefault(source, []).append(rel)
        done = {(s, r) for s, rels in by_source.items() for r in writer.done_paths(s, rels)}
        new = [row for row in rows if (row[0], row[1]) not in done]
        if new:
            writer.append(pack_batch(0, [], new, writer.secret), known_keys=set())
            writer.commit()
    return new


def _jobs(plan: FolderPlan, src: Path, opts: ReadOptions):
    """(reader, record paths, its options) of each usable group, and the reject rows of the
    files no reader takes (unrecognised, refused by the path policy, refused options)."""
    rows = [(AUTO, rel, reason) for rel, reason in plan.rejects]
    jobs = []
    for name, files in sorted(plan.groups.items()):
        if name not in READERS:
            rows += [(AUTO, f, f"no reader for {name} files") for f in files]
            continue
        group_opts = group_options(name, opts)
        try:
            check_reader_options(READERS[name], group_opts)
        except ValueError as e:
            rows += [(name, f, str(e)) for f in files]
            continue
        jobs.append((name, record_paths(name, src, files), group_opts))
    return jobs, rows


def _one_cluster(n_jobs: int, kwargs: dict):
    """One Dask cluster for every format's ingest (rather than one each), or a null context
    when the ingest runs in-process, on a given scheduler, or has one format only."""
    import contextlib

    if n_jobs < 2 or kwargs.get("workers") == 0 or kwargs.get("scheduler"):
        return contextlib.nullcontext(None)
    from ingestion.pipeline import _dask_client

    return _dask_client(kwargs.get("workers"), None)


def ingest_auto(
    src: str | os.PathLike,
    store: str | os.PathLike,
    opts: ReadOptions | None = None,
    limit: int | None = None,
    **kwargs,
) -> dict:
    """Ingest every file under ``src`` by the reader its content needs (module docstring).
    ``kwargs`` go to ``ingestion.pipeline.ingest`` (workers, scheduler, batch_size, progress,
    send_bytes, commit_interval). ValueError, before the store is touched, when no file matches
    a known format. Returns ``ingest``'s summary summed over the formats (``patients``: new
    patient keys per format, summed; ``files``: files found), plus ``formats``: each reader's
    listed, records, skipped and rejected counts."""
    from ecgplat.store import read_commit, reason_kind
    from ingestion.pipeline import ingest
    from ingestion.sent_files import SEND_BYTES_CORPORA

    src, opts = Path(src), opts or DEFAULT_OPTIONS
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: source directory does not exist")
    t0 = time.perf_counter()
    plan = plan_folder(src, opts)
    if not any(name in READERS for name in plan.groups):
        raise ValueError(
            f"{src}: no file of a known ECG format here "
            f"({len(plan.rejects)} files of unrecognised format or refused)"
        )
    _check_fields(plan, opts)
    not_sent = sorted(n for n in plan.groups if n in READERS and n not in SEND_BYTES_CORPORA)
    if kwargs.get("send_bytes") and not_sent:
        raise ValueError(
            f"--send-bytes reads {', '.join(SEND_BYTES_CORPORA)} records, not {', '.join(not_sent)}"
        )
    jobs, rows = _jobs(plan, src, opts)
    new = _write_rejects(store, rows) if rows else []
    total: dict = dict.fromkeys(("listed", "skipped", "records", "segments", "patients"), 0)
    total.update(bytes_read=0, startup_seconds=0.0, formats={})
    total.update(listed=len(rows), skipped=len(rows) - len(new))
    rejected = Counter(reason_kind(r) for _, _, r in new)
    with _one_cluster(len(jobs), kwargs) as client:
        if client is not None:
            kwargs = dict(kwargs, scheduler=client.scheduler.address)
        for name, rels, group_opts in jobs:
            left = None if limit is None else limit - total["records"] - sum(rejected.values())
            if left is not None and left <= 0:
                break
            part = ingest(name, src, store, opts=group_opts, limit=left, listing=rels, **kwargs)
            for key in ("listed", "skipped", "records", "segments", "patients", "bytes_read"):
                total[key] += part[key]
            total["startup_seconds"] += part["startup_seconds"]
            rejected.update(part["rejected"])
            total["formats"][name] = {
                k: part[k] for k in ("listed", "records", "skipped", "rejected")
            }
    seconds = time.perf_counter() - t0
    state = read_commit(store)
    return {
        "corpus": AUTO,
        "store": str(store),
        **total,
        "rejected": dict(sorted(rejected.items())),
        "files": plan.n_files,
        "seconds": round(seconds, 3),
        "records_per_s": round(total["records"] / seconds, 1) if seconds > 0 else 0.0,
        "startup_seconds": round(total["startup_seconds"], 3),
        "store_records": state["n_records"],
        "store_segments": state["n_segments"],
        "store_rejects": state["n_rejects"],
    }
