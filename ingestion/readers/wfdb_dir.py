"""Generic WFDB directory reader (any rate, any lead names, multi-file records), and the shared
``read_wfdb`` helper the PTB-XL and CPSC 2021 readers build on.

Every ``*.hea`` under the source root is one record (single-segment; multi-segment records are
rejected). The header is parsed strictly by ``ingestion.readers.wfdb_header`` (rate, gains,
data-file sizes, paths inside SRC, all checked before a sample is read); samples are decoded by
wfdb's format decoders, the ADC baseline removed and divided by the gain, then scaled to millivolts
from each channel's units (mV, uV, V). Channels whose units are not a voltage (pleth ``NU``, ABP
``mmHg``, ...) are dropped here; a record with no voltage channel is rejected with a reason
naming its unit when it is one the user may opt into: with ``--units z`` (``ReadOptions.units``)
a record whose channels are all in unit ``z`` is read as it is (baseline removed, divided by the
gain) and marked ``units="z"`` (see ``ingestion.readers.units``). Channels that are
voltages but not one of the 12 leads (Frank ``vx vy vz``, a bare ``V``) are kept in the
``RawRecord`` and dropped by conditioning. Age and sex come from ``key: value`` comments when the
header has them (PTB Diagnostic style); otherwise NaN / "". Generic WFDB folders have no patient
field: ``patient_id`` is None. ``open_record`` is ``read_record`` with the samples left in the
files (a ``WfdbSignal``, decoded block by block while the ingest conditions it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ingestion.readers.options import ReadOptions, check_length, sibling
from ingestion.readers.recognise import WFDB_KINDS, refuse_other_corpus
from ingestion.readers.record import (
    RawRecord,
    RecordError,
    comment_fields,
    parse_age,
    parse_sex,
    unit_scale_to_mv,
)
from ingestion.readers.units import VOLTAGE, accepted_unit, not_voltage_reason
from ingestion.readers.wfdb_header import (
    DAT_FMTS,
    check_data_sizes,
    read_digital,
    read_header,
    reads_in_blocks,
)

SOURCE = "wfdb"
OPTIONS = ("units",)  # the ReadOptions reader fields `ecgplat ingest wfdb` takes


def check_options(opts: ReadOptions) -> None:
    """ValueError for a ``--units`` that is not a non-voltage unit one can opt into."""
    accepted_unit(opts.units)


def check_corpus(src: Path, listing: list[str]) -> None:
    """ValueError when ``src`` holds arrays and no WFDB header (any WFDB folder is read, a
    corpus's own included)."""
    refuse_other_corpus(SOURCE, src, listing, WFDB_KINDS, require_own=False)


def list_records(src: Path) -> list[str]:
    """Relative record paths (no extension) of every ``.hea`` under ``src``, sorted."""
    src = Path(src)
    return sorted(
        p.relative_to(src).with_suffix("").as_posix()
        for p in src.rglob("*.hea")
        if not p.name.startswith(".")
    )


def _signal_paths(src: Path, rel: str, hdr: dict, opts: ReadOptions | None) -> dict[str, Path]:
    bad = sorted({s["fmt"] for s in hdr["signals"] if s["fmt"] not in DAT_FMTS})
    if bad:
        raise RecordError(rel, f"unknown format: WFDB sample format(s) {bad} not supported")
    paths = {}
    for s in hdr["signals"]:
        name = s["file"]
        if name in paths:
            continue
        if name == "~" or not name:
            raise RecordError(rel, "unknown format: a signal has no data file")
        path = sibling(src, rel, name, rel, opts)
        if not path.is_file():
            raise RecordError(rel, f"missing signal file {Path(name).name}")
        paths[name] = path
    return paths


def read_wfdb(
    src: Path, rel: str, opts: ReadOptions | None = None
) -> tuple[np.ndarray, float, list[str], list[str]]:
    """(signal (n_ch, n) float32 mV, fs, channel names, header comments) of a WFDB record;
    non-voltage channels dropped. RecordError for every way a record can be unreadable, for a
    record without any voltage channel, and before any signal is read for a rate/duration
    outside ``opts`` or a data file whose size does not match the header."""
    return read_wfdb_units(src, rel, opts)[:4]


class WfdbSignal:
    """The kept channels of a WFDB record in their unit, read from the data files block by block
    (``ingestion.readers.record.BlockSignal``): ``block(start, stop)`` decodes only those
    samples and gives exactly the values of the whole read, (channels, stop - start) float32."""

    dtype = np.dtype(np.float32)

    def __init__(self, rel: str, hdr: dict, folder: Path, sig_len: int, keep, scale):
        sigs = [hdr["signals"][i] for i in keep]
        self.shape = (len(keep), sig_len)
        self.in_blocks = reads_in_blocks(hdr)  # False: a block decodes the whole (FLAC) file
        self._rel, self._hdr, self._folder = rel, hdr, folder
        self._keep = None if keep == list(range(hdr["n_sig"])) else keep
        self._baseline = np.array([s["baseline"] for s in sigs], dtype=np.float64)
        self._factor = np.array([f / s["gain"] for f, s in zip(scale, sigs, strict=True)])

    def block(self, start: int, stop: int) -> np.ndarray:
        try:
            digital = read_digital(self._hdr, self._folder, self.shape[1], start, stop)
        except Exception:  # noqa: BLE001 - wfdb raises many types on short/damaged files
            raise RecordError(self._rel, "signal file truncated or unreadable") from None
        # the same float64 operations as ((digital[:, keep] - baseline) * factor), in place on
        # one array (no temporaries); one float32 conversion at the end
        signal = digital if self._keep is None else digital[:, self._keep]
        signal -= self._baseline
        signal *= self._factor
        return signal.T.astype(np.float32)

    def whole(self) -> np.ndarray:
        return self.block(0, self.shape[1])


def read_wfdb_units(
    src: Path, rel: str, opts: ReadOptions | None = None, accept: str | None = None
) -> tuple[np.ndarray, float, list[str], list[str], str]:
    """``read_wfdb`` plus the signal's unit: "mV", or ``accept`` (a non-voltage unit such as
    "z") for a record with no voltage channel whose channels are in that unit."""
    lazy, fs, names, comments, unit = open_wfdb_units(src, rel, opts, accept)
    return lazy.whole(), fs, names, comments, unit


def open_wfdb_units(
    src: Path, rel: str, opts: ReadOptions | None = None, accept: str | None = None
) -> tuple[WfdbSignal, float, list[str], list[str], str]:
    """``read_wfdb_units`` with every check done but no sample read: the signal is a
    ``WfdbSignal``."""
    hea, hdr = read_header(Path(src), rel, opts)
    paths = _signal_paths(Path(src), rel, hdr, opts)
    sig_len = check_data_sizes(hdr, paths, rel)
    check_length(rel, hdr["fs"], sig_len, opts)
    units = [s["units"] for s in hdr["signals"]]
    keep, scale, unit = channel_scales(units, accept)
    if not keep:
        raise RecordError(rel, not_voltage_reason(units))
    if sig_len == 0:
        raise RecordError(rel, "zero-length signal (the header gives 0 samples)")
    lazy = WfdbSignal(rel, hdr, hea.parent, sig_len, keep, scale)
    names = [hdr["signals"][i]["name"] for i in keep]
    return lazy, float(hdr["fs"]), names, list(hdr["comments"]), unit


def channel_scales(units: list[str], accept: str | None) -> tuple[list[int], list[float], str]:
    """(channels kept, factor of each, signal unit): the voltage channels scaled to mV; when
    there are none and ``accept`` names a non-voltage unit (``--units z``), the channels in that
    unit as they are."""
    keep, scale = [], []
    for i, unit in enumerate(units):
        factor = unit_scale_to_mv(unit)
        if factor is not None:
            keep.append(i)
            scale.append(factor)
    if keep or accept is None:
        return keep, scale, VOLTAGE
    keep = [i for i, unit in enumerate(units) if str(unit).strip().lower() == accept]
    return keep, [1.0] * len(keep), accept


def read_record(src: Path, rel: str, opts: ReadOptions | None = None) -> RawRecord:
    """Read one WFDB record (``rel`` relative to ``src``, without extension); ``opts.units``
    (``--units``, e.g. "z") opts into records whose channels are in that non-voltage unit."""
    return _record(src, rel, opts, blocks=False)


def open_record(src: Path, rel: str, opts: ReadOptions | None = None) -> RawRecord:
    """``read_record`` after every check, with the samples left in the files: the signal is a
    ``WfdbSignal`` that conditioning reads block by block (the ingest's path: memory does not
    grow with a record's duration)."""
    return _record(src, rel, opts, blocks=True)


def _record(src: Path, rel: str, opts: ReadOptions | None, blocks: bool) -> RawRecord:
    accept = accepted_unit(opts.units) if opts is not None else None
    lazy, fs, names, comments, unit = open_wfdb_units(src, rel, opts, accept)
    signal: np.ndarray | WfdbSignal = lazy if blocks and lazy.in_blocks else lazy.whole()
    fields = comment_fields(comments)
    return RawRecord(
        source=SOURCE,
        record_id=rel,
        path=rel,
        signal=signal,
        fs=fs,
        lead_names=names,
        patient_id=None,
        age=parse_age(fields.get("age")),
        sex=parse_sex(fields.get("sex")),
        units=unit,
    )
