"""Reading back an offline W&B run from its files, without a W&B server: the run's ``.wandb``
transaction log (a LevelDB-style log of ``wandb_internal_pb2.Record`` protobufs: a 7-byte
``:W&B`` header, then 32 KiB blocks of chunks with a 7-byte header each, checksum, length and
type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) and the media files beside it."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

BLOCK, HEADER = 32768, 7


def records(path: Path):
    """The Record protobufs of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 1:
            whole = chunk
        elif kind == 2:
            pending = chunk
            continue
        elif kind == 3:
            pending += chunk
            continue
        elif kind == 4:
            whole, pending = pending + chunk, b""
        else:
            continue
        record = pb.Record()
        record.ParseFromString(whole)
        yield record


@dataclass
class OfflineRun:
    folder: Path  # .../wandb/offline-run-*
    history: dict[str, object] = field(default_factory=dict)  # key -> last value (JSON-decoded)
    artifacts: list[dict] = field(default_factory=list)  # name, type, metadata, entries, aliases

    def table(self, key: str) -> dict:
        """A logged table (or a chart's table, ``<key>_table``) read from its media file."""
        entry = self.history.get(key) or self.history.get(f"{key}_table")
        assert isinstance(entry, dict) and "path" in entry, (key, entry)
        return json.loads((self.folder / "files" / entry["path"]).read_text())


def read_run(run_dir: Path) -> OfflineRun:
    """The one offline run under ``run_dir/wandb``: its history (nested keys joined by "/")
    and its artifacts."""
    import wandb

    wandb.teardown()  # the W&B service writes the log asynchronously: let it finish first
    (log,) = list(Path(run_dir).glob("wandb/offline-run-*/*.wandb"))
    run = OfflineRun(log.parent)
    for record in records(log):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                run.history[key] = json.loads(item.value_json)
        elif kind == "artifact":
            a = record.artifact
            run.artifacts.append(
                {
                    "name": a.name,
                    "type": a.type,
                    "metadata": json.loads(a.metadata or "{}"),
                    "entries": {e.path: e.ref for e in a.manifest.contents},
                    "aliases": list(a.aliases),
                }
            )
    # history items of a logged object arrive as "<key>/<field>": fold them into one dict
    folded: dict[str, object] = {}
    for key, value in run.history.items():
        head, _, tail = key.rpartition("/")
        if tail in ("_type", "path", "sha256", "nrows", "ncols", "artifact_path", "log_mode",
                    "size", "format", "width", "height", "panel_type", "panel_config"):  # fmt: skip
            folded.setdefault(head, {})[tail] = value  # type: ignore[index]
        else:
            folded[key] = value
    run.history = folded
    return run
