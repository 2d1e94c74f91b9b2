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
from ingestion.record import (
    RawRecord,
    RecordError,
    comment_fields,
    parse_age,
    parse_sex,
    unit_scale_to_mv,
)

SOURCE = "cinc2021"
_GAIN_RE = re.compile(
    r"^(?P<gain>[-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?)"
    r"(?:\((?P<base>[-+]?[0-9]+)\))?(?:/(?P<units>\S+))?$"
)
_SUBSET_SKIP = re.compile(r"^g\d+$")


def list_records(src: Path) -> list[str]:
    """Relative record paths (no extension) of every ``.hea`` under ``src``, sorted."""
    src = Path(src)
    return sorted(
        p.relative_to(src).with_suffix("").as_posix()
        for p in src.rglob("*.hea")
        if not p.name.startswith(".")
    )


def parse_header(text: str, where: str) -> dict:
    """The parts of a single-segment WFDB header the challenge files use. RecordError if malformed."""
    lines = [ln.strip() for ln in text.splitlines()]
    comments = [ln for ln in lines if ln.startswith("#")]
    body = [ln for ln in lines if ln and not ln.startswith("#")]
    if not body:
        raise RecordError(where, "header has no record line")
    rec = body[0].split()
    try:
        n_sig, fs, sig_len = int(rec[1]), float(rec[2].split("/")[0].split("(")[0]), int(rec[3])
    except (IndexError, ValueError):
        raise RecordError(where, f"unparsable header record line {body[0]!r}") from None
    if "/" in rec[0]:
        raise RecordError(where, "unknown format: multi-segment WFDB records are not supported")
    if len(body) - 1 < n_sig:
        raise RecordError(where, f"header declares {n_sig} signals but lists {len(body) - 1}")
    signals = []
    for line in body[1 : 1 + n_sig]:
        tok = line.split()
        m = _GAIN_RE.match(tok[2]) if len(tok) > 2 else None
        if m is None or len(tok) < 5:
            raise RecordError(where, f"unparsable header signal line {line!r}")
        gain = float(m["gain"]) or 200.0  # WFDB: gain 0 means the default 200
        adc_zero = int(tok[4])
        signals.append(
            {
                "file": tok[0],
                "fmt": tok[1],
                "gain": gain,
                "baseline": int(m["base"]) if m["base"] is not None else adc_zero,
                "units": m["units"] or "mV",
                "name": " ".join(tok[8:]) if len(tok) > 8 else f"ch{len(signals)}",
            }
        )
    return {
        "n_sig": n_sig,
        "fs": fs,
        "sig_len": sig_len,
        "signals": signals,
        "fields": comment_fields(comments),
    }


# MATLAB v4 precision digit P of the type code MOPT -> numpy dtype (without byte order)
_MAT4_DTYPES = {0: "f8", 1: "f4", 2: "i4", 3: "i2", 4: "u2", 5: "u1"}


def read_mat4(data: bytes, name: str, key: str = "val") -> np.ndarray:
    """Matrix ``key`` of a MATLAB v4 file's bytes (what ``scipy.io.savemat(format="4")`` and
    the challenge release write): per matrix a 20-byte header (int32 type = MOPT, mrows, ncols,
    imagf, namlen), the NUL-terminated name, then mrows x ncols values column-major. Returns a
    (mrows, ncols) read-only view in the file's own dtype. ValueError (one-line reason naming
    ``name``) on a bad header, a truncated file or a missing ``key``."""
    pos, size = 0, len(data)
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
                f"{name} is truncated: matrix {var!r} ({mrows}x{ncols}) needs "
                f"{nbytes} bytes, {size - pos} left"
            )
        if var == key:
            if t != 0 or imagf:
                raise ValueError(f"{name}: matrix {var!r} is not a real full numeric matrix")
            return np.frombuffer(data, dtype, count, pos).reshape(ncols, mrows).T
        pos += nbytes
    raise KeyError(key)


def _subset(rel: str) -> str:
    parts = [p for p in Path(rel).parts[:-1] if not _SUBSET_SKIP.match(p)]
    return parts[-1] if parts else ""


def read_record(src: Path, rel: str) -> RawRecord:
    """Read one challenge record (``rel`` relative to ``src``, without extension)."""
    base = Path(src) / rel
    hea = base.with_suffix(".hea")
    try:
        text = hea.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise RecordError(rel, f"missing header file {hea.name}") from None
    hdr = parse_header(text, rel)
    files = {s["file"] for s in hdr["signals"]}
    if len(files) != 1 or not next(iter(files)).lower().endswith(".mat"):
        raise RecordError(
            rel, f"unknown format: signal file(s) {sorted(files)} are not one .mat file"
        )
    if any(not s["fmt"].startswith("16") for s in hdr["signals"]):
        raise RecordError(rel, "unknown format: only WFDB format 16 .mat signals are supported")
    mat = hea.parent / next(iter(files))
    if not mat.exists():
        raise RecordError(rel, f"missing signal file {mat.name}")
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
    gains = np.array([s["gain"] for s in hdr["signals"]])
    baselines = np.array([s["baseline"] for s in hdr["signals"]], dtype=np.float64)
    scale = np.array([unit_scale_to_mv(s["units"]) or np.nan for s in hdr["signals"]])
    if np.isnan(scale).any():
        bad = [s["units"] for s in hdr["signals"] if unit_scale_to_mv(s["units"]) is None]
        raise RecordError(rel, f"non-voltage units {bad} in a challenge record")
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
