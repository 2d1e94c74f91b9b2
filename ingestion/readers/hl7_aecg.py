"""HL7 v3 annotated ECG (aECG, the FDA's XML format): one record per file, the rhythm series in
millivolts.

A file is recognised by its content (root element ``AnnotatedECG`` in the namespace
``urn:hl7-org:v3``), not by its extension, and parsed by defusedxml
(``ingestion.readers.clinical.parse_xml``: entity declarations and external entities are refused,
never expanded or fetched). The signal is the first ``series`` whose code is ``RHYTHM`` (the
derived representative beat, ``derivedSeries``, is ignored), from its first ``sequenceSet``:

- the time sequence (code ``TIME_ABSOLUTE`` or ``TIME_RELATIVE``, a ``GLIST_TS`` or ``GLIST_PQ``)
  gives the sampling rate as ``1 / increment`` (increment unit ``s``, ``ms`` or ``us``);
- each lead sequence (code ``MDC_ECG_LEAD_<name>``, an ``SLIST_PQ``) holds integer ``digits``
  with a ``scale`` and an ``origin`` in a voltage unit (``uV``, ``mV``, ...): the value is
  ``origin + scale * digit``, converted to millivolts. Leads that are not one of the 12 standard
  leads (``MDC_ECG_LEAD_V7``, Frank and EASI leads ...) are dropped; the first of a repeated lead
  is kept.

The reader returns whatever length the file holds (the minimal aECG has 13 samples); conditioning
decides whether it is long enough.

Allow-list (``ingestion.readers.clinical``): only ``trialSubject/id@extension`` (the raw
identifier, pseudonymised by the store writer), ``administrativeGenderCode@code`` (M/F) and the
age, computed from ``birthTime`` and the ECG's ``effectiveTime`` (whole years, capped at 90; the
dates are then dropped) are read. Names, investigators, sites, trial ids and titles, times,
annotations and free text never reach the record.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from xml.etree.ElementTree import Element

import numpy as np

from ecgplat.leads import canonical_lead
from ingestion.readers.clinical import (
    age_from_dates,
    compact_date,
    file_record,
    list_xml_files,
    load_xml,
)
from ingestion.readers.options import ReadOptions, check_length, check_rate
from ingestion.readers.record import RawRecord, RecordError, parse_sex, unit_scale_to_mv

SOURCE = "hl7_aecg"
NS = "urn:hl7-org:v3"
ROOT = f"{{{NS}}}AnnotatedECG"
_XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"
_LEAD_PREFIX = "MDC_ECG_LEAD_"
_SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}  # increment units of the time sequence


def _q(name: str) -> str:
    return f"{{{NS}}}{name}"


def list_records(src: Path) -> list[str]:
    """Paths (with extension) of the aECG files: ``src`` itself, or every one below it."""
    return list_xml_files(src, {ROOT})


def _child(el: Element | None, *path: str) -> Element | None:
    """The first descendant along ``path`` (local names in the HL7 namespace), or None."""
    for name in path:
        if el is None:
            return None
        el = el.find(_q(name))
    return el


def _code(el: Element) -> str:
    code = el.find(_q("code"))
    return "" if code is None else str(code.get("code", ""))


def _number(el: Element | None, rel: str, what: str) -> tuple[float, str]:
    """``(value, unit)`` of a physical-quantity element; RecordError when missing or not a
    finite number."""
    if el is None:
        raise RecordError(rel, f"{what} is missing")
    try:
        value = float(el.get("value", ""))
    except ValueError:
        raise RecordError(rel, f"{what} is not a number") from None
    if not math.isfinite(value):
        raise RecordError(rel, f"{what} is not a finite number")
    return value, str(el.get("unit", "")).strip()


def rhythm_series(root: Element, rel: str) -> Element:
    """The first ``series`` coded RHYTHM (derived series are other elements)."""
    for series in root.iter(_q("series")):
        if _code(series) == "RHYTHM":
            return series
    raise RecordError(rel, "no RHYTHM series")


def _sequences(series: Element, rel: str) -> list[Element]:
    seq_set = series.find(f"{_q('component')}/{_q('sequenceSet')}")
    if seq_set is None:
        raise RecordError(rel, "the RHYTHM series has no sequenceSet")
    return [s for s in seq_set.iterfind(f"{_q('component')}/{_q('sequence')}")]


def _rate(sequences: list[Element], rel: str, opts: ReadOptions | None) -> float:
    """The sampling rate, Hz, from the time sequence's increment."""
    for seq in sequences:
        value = seq.find(_q("value"))
        if _code(seq).startswith("TIME_") and value is not None:
            step, unit = _number(value.find(_q("increment")), rel, "time increment")
            if unit not in _SECONDS:
                raise RecordError(rel, "time increment unit is not s, ms or us")
            if step <= 0:
                raise RecordError(rel, "time increment is not positive")
            fs = 1.0 / (step * _SECONDS[unit])
            check_rate(rel, fs, opts)
            return fs
    raise RecordError(rel, "no time sequence (GLIST_TS increment) in the RHYTHM series")


def _to_mv(el: Element | None, rel: str, what: str) -> float:
    """A voltage quantity (``scale``, ``origin``) in millivolts."""
    value, unit = _number(el, rel, what)
    factor = unit_scale_to_mv(unit)
    if factor is None or not unit:
        raise RecordError(rel, f"{what} is not in a voltage unit (uV, mV, V)")
    return value * factor


def _leads(sequences: list[Element], rel: str) -> list[tuple[str, Element]]:
    """``(canonical lead, SLIST_PQ value)`` of the standard lead sequences, first of each lead."""
    out: dict[str, Element] = {}
    for seq in sequences:
        code, value = _code(seq), seq.find(_q("value"))
        if not code.startswith(_LEAD_PREFIX) or value is None:
            continue
        lead = canonical_lead(code[len(_LEAD_PREFIX) :])
        if lead is None or lead in out:
            continue
        if value.get(_XSI_TYPE, "SLIST_PQ").rpartition(":")[2] != "SLIST_PQ":
            raise RecordError(rel, f"lead {lead} is not an SLIST_PQ sequence")
        out[lead] = value
    if not out:
        raise RecordError(rel, "no standard ECG lead (MDC_ECG_LEAD_*) in the RHYTHM series")
    return list(out.items())


def _signal(leads, fs: float, rel: str, opts: ReadOptions | None) -> np.ndarray:
    """(leads, samples) float32 millivolts; the sample counts are checked before converting."""
    tokens = []
    for lead, value in leads:
        digits = value.find(_q("digits"))
        tokens.append((digits.text or "").split() if digits is not None else [])
        if not tokens[-1]:
            raise RecordError(rel, f"lead {lead} has no samples")
    lengths = {len(t) for t in tokens}
    if len(lengths) != 1:
        raise RecordError(rel, "leads have different numbers of samples")
    check_length(rel, fs, lengths.pop(), opts)
    rows = []
    for (lead, value), digits in zip(leads, tokens, strict=True):
        scale = _to_mv(value.find(_q("scale")), rel, f"lead {lead} scale")
        origin_el = value.find(_q("origin"))
        origin = 0.0 if origin_el is None else _to_mv(origin_el, rel, f"lead {lead} origin")
        try:
            raw = np.asarray(digits, dtype=np.float64)
        except ValueError:
            raise RecordError(rel, f"lead {lead} digits are not numbers") from None
        if not np.isfinite(raw).all():
            raise RecordError(rel, f"lead {lead} digits are not finite")
        rows.append(origin + scale * raw)
    return np.asarray(rows, dtype=np.float32)


def _acquired(root: Element, series: Element) -> dt.date | None:
    """The ECG's date: the document's ``effectiveTime`` (center or low), else the series'."""
    for owner in (root, series):
        for part in ("center", "low"):
            el = _child(owner, "effectiveTime", part)
            found = compact_date(el.get("value")) if el is not None else None
            if found is not None:
                return found
    return None


def _demographics(root: Element, series: Element) -> tuple[str | None, str, float]:
    """(raw patient id, sex, age) by the allow-list of the module docstring."""
    subject = next(root.iter(_q("trialSubject")), None)
    if subject is None:
        return None, "", math.nan
    ident = subject.find(_q("id"))
    patient = str(ident.get("extension", "")).strip() if ident is not None else ""
    person = subject.find(_q("subjectDemographicPerson"))
    gender = _child(person, "administrativeGenderCode")
    sex = parse_sex(gender.get("code", "")) if gender is not None else ""
    birth = _child(person, "birthTime")
    born = compact_date(birth.get("value")) if birth is not None else None
    age = age_from_dates(born, _acquired(root, series)) if born is not None else math.nan
    return patient or None, sex, age


def read_record(src: Path, rel: str, opts: ReadOptions | None = None) -> RawRecord:
    """Read one aECG file (``rel`` below ``src``): the RHYTHM series, float32 millivolts."""
    root = load_xml(src, rel, opts)
    if root.tag != ROOT:
        raise RecordError(rel, "not an HL7 aECG document (root is not AnnotatedECG)")
    series = rhythm_series(root, rel)
    sequences = _sequences(series, rel)
    fs = _rate(sequences, rel, opts)
    leads = _leads(sequences, rel)
    signal = _signal(leads, fs, rel, opts)
    patient, sex, age = _demographics(root, series)
    return file_record(
        SOURCE,
        rel,
        signal=signal,
        fs=fs,
        lead_names=[lead for lead, _ in leads],
        patient_id=patient,
        age=age,
        sex=sex,
    )
