"""The one strict parser of single-segment WFDB headers, the data-file size check, and the read
of ``.dat`` samples for the WFDB-based readers.

Grammar (WFDB ``header(5)``): record line ``name[/n_seg] n_sig [fs[/cfreq[(base)]] [sig_len ...]]``;
signal lines ``file fmt[xspf][:skew][+offset] [gain[(baseline)][/units] [adc_res [adc_zero
[init [checksum [block [description]]]]]]]``. Everything wfdb would silently default is checked
here instead: a sampling frequency that is present must be a finite positive number (absent
means WFDB's 250 Hz), every gain must be a number (0 means WFDB's 200), multi-segment headers are
refused. Reasons are fixed templates plus counts, never the offending header text.

Samples are decoded by wfdb's own format decoders (``wfdb.io._signal._rd_segment``) from the
file names parsed here, so non-ASCII file names work (``wfdb.rdheader`` reads headers as ASCII
and silently drops such characters).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from ingestion.readers.record import RecordError

try:  # the sample formats wfdb can decode (a private table; fall back to wfdb 4.x's list)
    from wfdb.io._signal import DAT_FMTS as DAT_FMTS
except ImportError:  # pragma: no cover
    DAT_FMTS = ["8", "16", "32", "61", "80", "160", "212", "310", "311", "24", "508", "516", "524"]
_COMPRESSED = {"508", "516", "524"}
_FMT_RE = re.compile(r"^(?P<fmt>\d+)(?:x(?P<spf>\d+))?(?::(?P<skew>\d+))?(?:\+(?P<off>\d+))?$")
_GAIN_RE = re.compile(
    r"^(?P<gain>[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)"
    r"(?:\((?P<base>[-+]?[0-9]+)\))?(?:/(?P<units>\S+))?$"
)
WFDB_DEFAULT_FS = 250.0
WFDB_DEFAULT_GAIN = 200.0


def _record_line(tokens: list[str], where: str) -> tuple[int, float, int | None]:
    if "/" in tokens[0]:
        raise RecordError(where, "multi-segment WFDB records are not supported")
    try:
        n_sig = int(tokens[1])
    except (IndexError, ValueError):
        raise RecordError(where, "unparsable header: no signal count in the record line") from None
    if n_sig < 1:
        raise RecordError(where, "header declares no signals")
    fs = WFDB_DEFAULT_FS
    if len(tokens) > 2:
        try:
            fs = float(tokens[2].split("/")[0].split("(")[0])
        except ValueError:
            raise RecordError(
                where, "unparsable header: the sampling frequency is not a number"
            ) from None
        if not (math.isfinite(fs) and fs > 0):
            raise RecordError(where, "sampling rate is not a finite positive number")
    sig_len = None
    if len(tokens) > 3:
        try:
            sig_len = int(tokens[3])
        except ValueError:
            raise RecordError(
                where, "unparsable header: the signal length is not an integer"
            ) from None
        if sig_len < 0:
            raise RecordError(where, "unparsable header: the signal length is negative")
    return n_sig, fs, sig_len


def _signal_line(tok: list[str], k: int, where: str) -> dict:
    if len(tok) < 2 or (m := _FMT_RE.match(tok[1])) is None:
        raise RecordError(where, f"unparsable header signal line {k + 1}: sample format")
    gain, base, units = WFDB_DEFAULT_GAIN, None, "mV"
    if len(tok) > 2:
        g = _GAIN_RE.match(tok[2])
        if g is None:
            raise RecordError(where, f"unparsable header signal line {k + 1}: gain is not a number")
        gain = float(g["gain"]) or WFDB_DEFAULT_GAIN
        if not math.isfinite(gain):
            raise RecordError(where, f"unparsable header signal line {k + 1}: gain is not finite")
        base = int(g["base"]) if g["base"] is not None else None
        units = g["units"] or "mV"
    ints = []
    for pos in (3, 4, 5):  # adc_res, adc_zero, init_value
        try:
            ints.append(int(tok[pos]) if len(tok) > pos else 0)
        except ValueError:
            raise RecordError(
                where, f"unparsable header signal line {k + 1}: non-integer ADC field"
            ) from None
    return {
        "file": tok[0],
        "fmt": m["fmt"],
        "spf": int(m["spf"] or 1),
        "skew": int(m["skew"] or 0),
        "offset": int(m["off"] or 0),
        "gain": gain,
        "baseline": base if base is not None else ints[1],
        "units": units,
        "adc_zero": ints[1],
        "init": ints[2],
        "name": " ".join(tok[8:]) if len(tok) > 8 else f"ch{k}",
    }


def parse_header(text: str, where: str) -> dict:
    """``{"n_sig", "fs", "sig_len", "signals": [...], "comments"}`` of a single-segment header."""
    lines = [ln.strip() for ln in text.splitlines()]
    comments = [ln for ln in lines if ln.startswith("#")]
    body = [ln for ln in lines if ln and not ln.startswith("#")]
    if not body:
        raise RecordError(where, "unparsable header: no record line")
    n_sig, fs, sig_len = _record_line(body[0].split(), where)
    if len(body) - 1 < n_sig:
        raise RecordError(where, f"header declares {n_sig} signals but lists {len(body) - 1}")
    signals = [_signal_line(line.split(), k, where) for k, line in enumerate(body[1 : 1 + n_sig])]
    return {"n_sig": n_sig, "fs": fs, "sig_len": sig_len, "signals": signals, "comments": comments}


MAX_HEADER_BYTES = 1 << 20  # real headers are a few KB; a larger one is not read into memory


def read_header(src: Path, rel: str, opts=None) -> tuple[Path, dict]:
    """(path of ``SRC/rel.hea``, its parsed header); the path is checked by
    ``ingestion.readers.options.inside_src`` and the text decoded as UTF-8 (file names may be
    non-ASCII)."""
    from ingestion.readers.options import inside_src

    hea = inside_src(src, f"{rel}.hea", rel, opts)
    try:
        if hea.stat().st_size > MAX_HEADER_BYTES:
            raise RecordError(rel, f"header file larger than {MAX_HEADER_BYTES} bytes")
        text = hea.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        raise RecordError(rel, f"missing header file {hea.name}") from None
    except OSError:
        raise RecordError(rel, "header file unreadable") from None
    return hea, parse_header(text, rel)


def _files(hdr: dict) -> dict[str, list[int]]:
    """Signal file name -> indices of its signals (header order)."""
    out: dict[str, list[int]] = {}
    for i, s in enumerate(hdr["signals"]):
        out.setdefault(s["file"], []).append(i)
    return out


def _data_bytes(fmt: str, n_samples: int) -> int:
    from wfdb.io._signal import _required_byte_num

    return int(_required_byte_num("read", fmt, n_samples))


def expected_data_sizes(hdr: dict) -> dict[str, int | None]:
    """Signal file name -> the bytes a complete data file holds by the header (None where the
    header does not tell: compressed or unknown formats, mixed formats, no signal length)."""
    out: dict[str, int | None] = {}
    for name, idx in _files(hdr).items():
        sigs = [hdr["signals"][i] for i in idx]
        fmt = sigs[0]["fmt"]
        known = fmt in DAT_FMTS and fmt not in _COMPRESSED and hdr["sig_len"] is not None
        if not known or any(s["fmt"] != fmt for s in sigs):
            out[name] = None
            continue
        frame = sum(s["spf"] for s in sigs)
        out[name] = sigs[0]["offset"] + _data_bytes(fmt, hdr["sig_len"] * frame)
    return out


def check_data_sizes(hdr: dict, paths: dict[str, Path], where: str) -> int:
    """Compare each data file's size with what the header implies (samples x signals x bytes per
    sample of the format, plus the byte offset); RecordError on a mismatch. Returns sig_len
    (inferred from the file size when the header omits it)."""
    sig_len = hdr["sig_len"]
    for k, (name, idx) in enumerate(_files(hdr).items()):
        sigs = [hdr["signals"][i] for i in idx]
        fmts = {s["fmt"] for s in sigs}
        if len(fmts) != 1:
            raise RecordError(where, f"signal file {k + 1} mixes sample formats")
        fmt = fmts.pop()
        if fmt in _COMPRESSED:
            continue  # FLAC: the size does not follow from the header
        size = paths[name].stat().st_size
        offset = sigs[0]["offset"]
        frame = sum(s["spf"] for s in sigs)
        if sig_len is None:
            per = frame * _data_bytes(fmt, 1) if fmt not in ("212", "310", "311") else None
            if per is None or (size - offset) % per:
                raise RecordError(
                    where, "no signal length in the header and a data file is not whole frames"
                )
            sig_len = (size - offset) // per
            continue
        expected = offset + _data_bytes(fmt, sig_len * frame)
        if size != expected:
            raise RecordError(
                where,
                f"data file {k + 1} holds {size} bytes but the header implies {expected} "
                f"({sig_len} samples x {frame} signals, format {fmt}): wrong signal count, "
                "truncated or extra data",
            )
    return int(sig_len or 0)


def reads_in_blocks(hdr: dict) -> bool:
    """Whether ``read_digital`` of a block reads only that block: False when a data file is
    FLAC-compressed (wfdb decodes the whole file for any block of it)."""
    return not any(s["fmt"] in _COMPRESSED for s in hdr["signals"])


_FMT16_NAN = -32768  # WFDB's "invalid sample" value of format 16


def _read_format16(
    hdr: dict, folder: Path, sig_len: int, start: int = 0, stop: int | None = None
) -> np.ndarray | None:
    """``read_digital`` for the commonest layout (PTB-XL, LUDB, CODE-15%): every signal in one
    format-16 file, one sample per frame, no skew: one ``np.fromfile`` of interleaved int16
    instead of wfdb's general decoder (same values: int16 -> float64 is exact). None for any
    other layout."""
    s = hdr["signals"]
    if any(x["fmt"] != "16" or x["spf"] != 1 or x["skew"] or x["file"] != s[0]["file"] for x in s):
        return None
    n_sig = hdr["n_sig"]
    n = (sig_len if stop is None else stop) - start
    offset = s[0]["offset"] + 2 * n_sig * start
    raw = np.fromfile(folder / s[0]["file"], dtype="<i2", count=n * n_sig, offset=offset)
    if raw.size != n * n_sig:
        raise ValueError("short read")
    raw = raw.reshape(n, n_sig)
    out = raw.astype(np.float64)
    out[raw == _FMT16_NAN] = np.nan
    return out


def read_digital(
    hdr: dict, folder: Path, sig_len: int, start: int = 0, stop: int | None = None
) -> np.ndarray:
    """(stop - start, n_sig) float64 ADC values of every signal from sample ``start`` to
    ``stop`` (default: all ``sig_len``), frames smoothed like wfdb's ``smooth_frames=True``
    (the mean of a frame's samples). A block holds exactly the rows of the whole read."""
    from wfdb.io._signal import _digi_nan, _rd_segment

    s = hdr["signals"]
    stop = sig_len if stop is None else stop
    fast = _read_format16(hdr, folder, sig_len, start, stop)
    if fast is not None:
        return fast
    n = stop - start
    per_sig = _rd_segment(
        file_name=[x["file"] for x in s],
        dir_name=str(folder),
        pn_dir=None,
        fmt=[x["fmt"] for x in s],
        n_sig=hdr["n_sig"],
        sig_len=sig_len,
        byte_offset=[x["offset"] for x in s],
        samps_per_frame=[x["spf"] for x in s],
        skew=[x["skew"] for x in s],
        init_value=[x["init"] for x in s],
        sampfrom=start,
        sampto=stop,
        channels=list(range(hdr["n_sig"])),
        ignore_skew=False,
        return_res=64,
    )
    out = np.empty((n, hdr["n_sig"]), dtype=np.float64)
    for i, (x, sig) in enumerate(zip(s, per_sig, strict=True)):
        v = np.asarray(sig, dtype=np.float64)
        v[np.asarray(sig) == _digi_nan(x["fmt"])] = np.nan  # WFDB's "invalid sample" value
        if x["spf"] > 1:
            v = v[: n * x["spf"]].reshape(n, x["spf"]).mean(axis=1)
        if v.shape[0] != n:
            raise ValueError("short read")
        out[:, i] = v
    return out
