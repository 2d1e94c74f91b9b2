"""PhysioNet/CinC Challenge 2021 reader: WFDB ``.hea`` headers + MATLAB v4 ``.mat`` signals.

Layout: ``<src>/**/<name>.hea`` with ``<name>.mat`` beside it (``training/<subset>/g<k>/`` in the
challenge release; any depth works). The ``.mat`` holds int16 ADC values under key ``val`` with
shape (n_sig, sig_len); gain, baseline and units come from the header's signal lines. Both
header dialects of the release parse: ``16+24 1000/mV`` with ``#Dx:`` comments (original files)
and ``16x1+24 1000.0(0)/mV`` with ``# Dx:`` (files rewritten by a WFDB writer). Comment lines are
read by key (``Age``, ``Sex``, ``Dx``), never by line number; ``Age: NaN`` / ``Unknown`` -> NaN.

Patient ids: the challenge publishes none, so ``patient_id`` is None — except for cohorts written
by ``ingestion.synth``, whose headers carry an extra ``#Patient: <id>`` comment that is read here.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ecgplat.labels import codes_to_multihot
from ingestion.readers.options import ReadOptions, check_length, inside_src, sibling
from ingestion.readers.recognise import refuse_other_corpus
from ingestion.readers.record import (
    RawRecord,
    RecordError,
    comment_fields,
    parse_age,
    parse_sex,
    unit_scale_to_mv,
)
from ingestion.readers.wfdb_dir import list_records as list_records  # the corpus interface
from ingestion.readers.wfdb_header import read_header

SOURCE = "cinc2021"
_SUBSET_SKIP = re.compile(r"^g\d+$")


def check_corpus(src: Path, listing: list[str]) -> None:
    """ValueError when ``src`` holds another corpus (``ingestion.readers.recognise``)."""
    refuse_other_corpus(SOURCE, src, listing, ("cinc2021", "mat"), require_own=True)


# MATLAB v4 precision digit P of the type code MOPT -> numpy dtype (without byte order)
_MAT4_DTYPES = {0: "f8", 1: "f4", 2: "i4", 3: "i2", 4: "u2", 5: "u1"}


def read_mat4(data: bytes, name: str, key: str = "val") -> np.ndarray:
    """Matrix ``key`` of a MATLAB v4 file's bytes (what ``scipy.io.savemat(format="4")`` and
    the challenge release write): per matrix a 20-byte header (int32 type = MOPT, mrows, ncols,
    imagf, namlen), the NUL-terminated name, then mrows x ncols values column-major. Returns a
    (mrows, ncols) read-only view in the file's own dtype. ValueError (one-line reason naming
    ``name``) on a bad header, a truncated file or a missing ``key``."""
    pos, size = 0, len(data)
    if size == 0:
        raise ValueError(f"{name} is empty")
    while pos < size:
        if size - pos < 20:
            raise ValueError(f"{name} is truncated (header cut at byte {pos})")
        hdr = np.frombuffer(data, "<i4", 5, pos)
        order = "<"
        if not 0 <= int(hdr[0]) < 2000:  # M digit 1 = big-endian file
            hdr, order = np.frombuffer(data, ">i4", 5, pos), ">"
        mopt, mrows, ncols, imagf, namlen = (int(v) for v in hdr)
        m, o, p, t = mopt // 1000, mopt // 100 % 10, mopt // 10 % 10, mopt % 10
        if (
            m not in (0, 1)
            or o != 0
            or p not in _MAT4_DTYPES
            or t not in (0, 1, 2)
            or mrows < 0
            or ncols < 0
            or imagf not in (0, 1)
            or not 0 < namlen < 64
        ):
            raise ValueError(f"{name} is not a MATLAB v4 file (bad matrix header at byte {pos})")
        pos += 20
        if size - pos < namlen:
            raise ValueError(f"{name} is truncated (matrix name cut at byte {pos})")
        var = data[pos : pos + namlen].split(b"\0", 1)[0].decode("latin-1")
        pos += namlen
        dtype = np.dtype(order + _MAT4_DTYPES[p])
        count = mrows * ncols
        nbytes = count * dtype.itemsize * (2 if imagf else 1)
        if size - pos < nbytes:
            raise ValueError(
                f"{name} is truncated: a {mrows}x{ncols} matrix needs "
                f"{nbytes} bytes, {size - pos} left"
            )
        if var == key:
            if t != 0 or imagf:
                raise ValueError(f"{name}: matrix 'val' is not a real full numeric matrix")
            return np.frombuffer(data, dtype, count, pos).reshape(ncols, mrows).T
        pos += nbytes
    raise KeyError(key)


def _subset(rel: str) -> str:
    parts = [p for p in Path(rel).parts[:-1] if not _SUBSET_SKIP.match(p)]
    return parts[-1] if parts else ""


def _header(src: Path, rel: str, opts: ReadOptions | None) -> tuple[Path, dict]:
    hea, hdr = read_header(src, rel, opts)
    if hdr["sig_len"] is None:
        raise RecordError(rel, "header gives no signal length")
    hdr["fields"] = comment_fields(hdr["comments"])
    return hea, hdr


def patient_hint(src: Path, rel: str, opts: ReadOptions | None = None) -> str | None:
    """The raw ``#Patient:`` id of a record's header (for redacting it from a reject), or None."""
    try:
        hea = inside_src(src, f"{rel}.hea", rel, opts)
        text = hea.read_bytes()[:65536].decode("utf-8", errors="replace")
    except (RecordError, OSError):
        return None
    return (
        comment_fields([ln for ln in text.splitlines() if ln.strip().startswith("#")]).get(
            "patient"
        )
        or None
    )


def _read_val(src: Path, rel: str, hdr: dict, opts: ReadOptions | None) -> np.ndarray:
    files = {s["file"] for s in hdr["signals"]}
    if len(files) != 1 or not next(iter(files)).lower().endswith(".mat"):
        raise RecordError(rel, f"unknown format: {len(files)} signal file(s), not one .mat file")
    if any(s["fmt"] != "16" or s["spf"] != 1 for s in hdr["signals"]):
        raise RecordError(rel, "unknown format: only WFDB format 16 .mat signals are supported")
    name = next(iter(files))
    mat = sibling(src, rel, name, rel, opts)
    if not mat.is_file():
        raise RecordError(rel, f"missing signal file {Path(name).name}")
    # a MATLAB v4 matrix of at most 8-byte values plus its name: anything larger is not this
    # record, and is refused before it is read into memory
    if mat.stat().st_size > hdr["n_sig"] * hdr["sig_len"] * 8 + 4096:
        raise RecordError(
            rel, f"{mat.name} is larger than the header's {hdr['n_sig']} x {hdr['sig_len']} allow"
        )
    try:
        val = read_mat4(mat.read_bytes(), mat.name)
    except KeyError:
        raise RecordError(rel, f"{mat.name} has no 'val' matrix") from None
    except (ValueError, OSError) as e:
        raise RecordError(
            rel, f"cannot read {mat.name} (truncated or not MATLAB v4): {e}"
        ) from None
    expected = (hdr["n_sig"], hdr["sig_len"])
    if val.shape != expected:
        raise RecordError(
            rel,
            f"{mat.name} holds shape {val.shape}, header says {expected} "
            "(leads x samples): truncated or mismatched",
        )
    return val


def read_record(src: Path, rel: str, opts: ReadOptions | None = None) -> RawRecord:
    """Read one challenge record (``rel`` relative to ``src``, without extension)."""
    base = Path(src) / rel
    _, hdr = _header(Path(src), rel, opts)
    check_length(rel, hdr["fs"], hdr["sig_len"], opts)
    if not any(unit_scale_to_mv(s["units"]) is not None for s in hdr["signals"]):
        raise RecordError(rel, "no channel in voltage units (mV, uV or V)")
    val = _read_val(Path(src), rel, hdr, opts)
    gains = np.array([s["gain"] for s in hdr["signals"]])
    baselines = np.array([s["baseline"] for s in hdr["signals"]], dtype=np.float64)
    scale = np.array([unit_scale_to_mv(s["units"]) or np.nan for s in hdr["signals"]])
    if np.isnan(scale).any():
        bad = sum(unit_scale_to_mv(s["units"]) is None for s in hdr["signals"])
        raise RecordError(rel, f"{bad} channel(s) in non-voltage units in a challenge record")
    # in place, same float64 operations (and so the same values) as
    # (val - baseline) / gain * scale; subtracting 0 and multiplying by 1 are skipped (exact)
    signal = val.astype(np.float64)
    if baselines.any():
        signal -= baselines[:, None]
    signal /= gains[:, None]
    if (scale != 1.0).any():
        signal *= scale[:, None]
    fields = hdr["fields"]
    codes = [c for c in re.split(r"[,\s]+", fields.get("dx", "")) if c]
    return RawRecord(
        source=SOURCE,
        record_id=base.name,
        path=rel,
        signal=signal.astype(np.float32),
        fs=hdr["fs"],
        lead_names=[s["name"] for s in hdr["signals"]],
        patient_id=fields.get("patient") or None,
        codes=codes,
        labels=codes_to_multihot(codes),
        age=parse_age(fields.get("age")),
        sex=parse_sex(fields.get("sex")),
        extra={"subset": _subset(rel)},
    )
