"""An uploaded ECG read the way `ecgplat ingest auto` reads a file: its format told from its
content, read by that format's reader and conditioned like every stored record.

An upload is the files of one record (a WFDB header and its signal files, or one file of a
one-file format: MUSE, Philips, HL7 aECG, DICOM, SCP-ECG, EDF, numpy), or one zip archive of
them. The files are written to a private temporary folder, a zip is unpacked there within
bounds (members, bytes, compression ratio; no member may name a path outside the folder or be
a link), and `ingestion.input_files.plan_inputs` finds the record as `ecgplat predict` finds
it. Anything that is not exactly one readable record is an `UploadError`: a one-line reason
without the uploaded file's path or a raw patient identifier.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import stat
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np

from ecgplat.printable import one_line
from ecgplat.store import to_millivolts
from ecgplat.store.writer import redact
from ingestion.auto import group_options
from ingestion.conditioning import condition
from ingestion.input_files import InputPlan, PlannedRecord, plan_inputs
from ingestion.readers.detect import UNRECOGNISED, detect
from ingestion.readers.options import ReadOptions
from ingestion.readers.protocol import open_record, patient_hint
from ingestion.readers.record import RecordError
from ingestion.readers.registry import READERS

CHUNK = 1 << 16
MAX_RATIO = 100  # a zip member expanding more than this (past 1 MiB) is refused as a bomb
RATIO_FLOOR = 1 << 20
REDACTED = "<patient>"


class UploadError(ValueError):
    """An upload that is not one readable ECG record; `status` is the HTTP status to answer."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.status = status


@dataclass
class Upload:
    """A conditioned uploaded record: float32 mV segments (S, 12, 2500) and what it holds."""

    segments: np.ndarray
    lead_mask: np.ndarray
    format: str
    fs_original: float
    n_samples_original: int
    patient_id: str | None = field(default=None, repr=False)  # RAW: only ever pseudonymised


@dataclass(frozen=True)
class UploadLimits:
    max_unpacked_bytes: int
    max_zip_members: int
    max_record_seconds: float


def _check_name(name: str | None) -> str:
    name = (name or "").strip()
    bad = (
        not name
        or len(name) > 255
        or name in (".", "..")
        or name.startswith(".")
        or any(c in name for c in "/\\\0")
        or not name.isprintable()
    )
    if bad:
        raise UploadError("an uploaded file name is empty, hidden, or holds a path")
    return name


def _member_parts(info: zipfile.ZipInfo) -> tuple[str, ...]:
    """The folder parts of a zip member's name; UploadError when it would land outside the
    folder it is unpacked into (absolute, a drive, ``..``) or is a link."""
    if stat.S_ISLNK(info.external_attr >> 16):
        raise UploadError("the zip holds a symbolic link; links are not unpacked")
    raw = info.filename.replace("\\", "/")
    parts = PurePosixPath(raw).parts
    if raw.startswith("/") or not parts or ".." in parts or ":" in parts[0]:
        raise UploadError("a path in the zip escapes the archive (absolute or '..')")
    if not all(p.isprintable() and "\0" not in p for p in parts):
        raise UploadError("a path in the zip holds control characters")
    return parts


def _unzip(archive: Path, dest: Path, limits: UploadLimits) -> None:
    """Unpack `archive` into `dest` within `limits` (module docstring)."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError):
        raise UploadError("not a readable zip archive (truncated or corrupt)") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_zip_members:
            raise UploadError(
                f"the zip has {len(infos)} members (at most {limits.max_zip_members})"
            )
        if sum(i.file_size for i in infos) > limits.max_unpacked_bytes:
            raise UploadError(
                f"the zip would expand past {limits.max_unpacked_bytes} bytes (a zip bomb?)", 413
            )
        written = 0
        for info in infos:
            parts = _member_parts(info)
            if info.is_dir():
                continue
            if info.flag_bits & 0x1:
                raise UploadError("the zip is encrypted")
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            member = 0
            try:
                with zf.open(info) as src, open(target, "wb") as out:
                    while chunk := src.read(CHUNK):
                        member += len(chunk)
                        written += len(chunk)
                        if written > limits.max_unpacked_bytes:
                            raise UploadError(
                                f"the zip expands past {limits.max_unpacked_bytes} bytes "
                                "(a zip bomb?)",
                                413,
                            )
                        if member > RATIO_FLOOR and member > MAX_RATIO * max(info.compress_size, 1):
                            raise UploadError(
                                f"a zip member expands more than {MAX_RATIO}-fold (a zip bomb?)",
                                413,
                            )
                        out.write(chunk)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError):
                raise UploadError(
                    "a zip member is corrupt, truncated or of an unknown method"
                ) from None


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        magic = f.read(4)
    return magic in (b"PK\x03\x04", b"PK\x05\x06") and detect(path) != "numpy"


def _one_record(src: Path, opts: ReadOptions) -> tuple[PlannedRecord, InputPlan]:
    """The one readable record under `src`, planned as `ecgplat predict` plans a folder
    (`ingestion.input_files`); UploadError when there is none or more than one."""
    try:
        plan = plan_inputs([src], opts)
    except ValueError as e:
        raise UploadError(f"upload: {str(e).splitlines()[0]}") from None
    found = [r for r in plan.records if r.reader is not None]
    if len(found) > 1:
        raise UploadError(f"the upload holds {len(found)} records; send one record at a time")
    if not found:
        reasons = {r.reason for r in plan.records} - {UNRECOGNISED}
        if reasons:  # a file of a known format that its reader refused (options)
            raise UploadError(f"upload: {one_line(sorted(reasons)[0])}")
        raise UploadError(
            f"no file of a known ECG format in the upload ({len(plan.records)} file(s) of "
            "unrecognised format)",
            415,
        )
    return found[0], plan


def read_upload(
    files: list[tuple[str | None, BinaryIO]],
    limits: UploadLimits,
    options: ReadOptions | None = None,
) -> Upload:
    """The conditioned record of uploaded `files` ((name, binary stream) pairs): one record's
    files, or one zip of them. `options` carries reader fields (numpy arrays: fs, leads)."""
    if not files:
        raise UploadError("no file uploaded")
    opts = dataclasses.replace(options or ReadOptions(), max_seconds=limits.max_record_seconds)
    with tempfile.TemporaryDirectory(prefix="ecgplat-upload-") as tmp:
        root = Path(tmp) / "files"
        root.mkdir()
        seen: set[str] = set()
        for name, stream in files:
            name = _check_name(name)
            if name in seen:
                raise UploadError("two uploaded files have the same name")
            seen.add(name)
            with open(root / name, "wb") as out:
                shutil.copyfileobj(stream, out, CHUNK)
        src = root
        if len(seen) == 1 and _is_zip(root / next(iter(seen))):
            src = Path(tmp) / "unzipped"
            src.mkdir()
            _unzip(root / next(iter(seen)), src, limits)
        rec, plan = _one_record(src, opts)
        return _read(rec, plan, tmp)


def _read(rec: PlannedRecord, plan: InputPlan, tmp: str) -> Upload:
    """Read and condition the planned record as `input_files.read_record` does, keeping its
    raw patient id for the same-patient flags (the caller pseudonymises it, then drops it)."""
    assert rec.reader is not None
    reader = READERS[rec.reader]
    opts = group_options(rec.reader, plan.opts)
    try:
        cond = condition(open_record(reader, rec.src, rec.rel, opts), opts)
    except RecordError as e:
        hint = None
        with contextlib.suppress(Exception):  # a hint only; the reason is redacted anyway
            hint = patient_hint(reader, rec.src, rec.rel, opts)
        reason = redact(e.reason.replace(f"{tmp}/", ""), hint, REDACTED)
        raise UploadError(f"{rec.reader} upload: {one_line(reason) or 'unreadable'}") from None
    except Exception as e:  # noqa: BLE001 - a file no reader foresaw is the client's 400
        raise UploadError(f"{rec.reader} upload: unreadable file ({type(e).__name__})") from None
    return Upload(
        segments=to_millivolts(cond.segments),
        lead_mask=np.asarray(cond.lead_mask, dtype=bool),
        format=rec.reader,
        fs_original=float(cond.fs_original),
        n_samples_original=int(cond.n_samples_original),
        patient_id=cond.patient_id,
    )
